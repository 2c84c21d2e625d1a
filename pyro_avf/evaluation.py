"""Per-step filtering free energy on whole test sequences, online and with constant memory.

For :class:`~pyro_avf.IterativeGuide` the guide runs in *online* mode: each step is inferred (the K
iterations still use gradients with respect to λ), scored with its final posterior, and its return value is
detached before the next step, so no autograd graph or trace grows with the sequence length.

For an ordinary Pyro guide (a model's hand-designed filter) the guide is traced once, the model replayed
against it under ``torch.no_grad()``, and each site's terms are grouped by the marked step it belongs to.

Two normalisations of a data set's free energy are reported (:class:`FreeEnergy`): ours, the total over
real steps divided by the number of real steps,

.. math::

    \\bar{\\mathcal{F}} = \\frac{\\sum_{n,t} m_{n,t}\\, \\mathcal{F}_{n,t}}{\\sum_{n,t} m_{n,t}},

and the AVF paper code's, which leaves out each sequence's first step, divides by its length and averages over
the sequences, :math:`\\frac1N \\sum_n \\frac{1}{T_n}\\sum_{t>1} \\mathcal{F}_{n,t}`. Every guide is scored with
the same estimator: the analytic KL wherever prior and posterior are both Normal (:func:`score_replayed`).

:func:`evaluate` gives it for a whole data set (a list of sequences, a padded ``(xs, mask)`` pair or one
tensor), in batches sorted by length; with a ``stream`` each batch is filtered one step at a time
(:func:`~pyro_avf.online.streamed_free_energy`), so memory stays flat in the length of the sequences.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import torch
from pyro import poutine
from pyro.poutine.messenger import Messenger

from pyro_avf.free_energy import SequenceScores, StepContext, Terms, check_plate_shape, score_site, stack_terms
from pyro_avf.guide import IterativeGuide
from pyro_avf.online import streamed_sequence_scores
from pyro_avf.posterior import normal_parameters
from pyro_avf.sequences import as_sequences


class StepTagger(Messenger):
    """Tags each sample site with the index of the marked step it runs in (``infer["avf_step"]``)."""

    def __init__(self):
        super().__init__()
        self.t = -1
        self.depth = 0
        self.contexts = []

    def _pyro_filtering_step(self, msg) -> None:
        self.t += 1
        self.depth += 1
        self.contexts.append(StepContext(tuple(msg["cond_indep_stack"]), msg["scale"], msg["mask"]))

    def _pyro_post_filtering_step(self, msg) -> None:
        self.depth -= 1

    def _pyro_sample(self, msg) -> None:
        if self.depth:
            msg["infer"]["avf_step"] = self.t


def _iterative(guide: IterativeGuide, args, kwargs) -> Dict[str, torch.Tensor]:
    return guide.run(args, kwargs, online=True).online.stacked()


def _replayed(model: Callable, guide: Callable, args, kwargs) -> Dict[str, torch.Tensor]:
    with torch.no_grad():
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        tagger = StepTagger()
        with tagger:
            model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args, **kwargs)
        terms = score_replayed(model_trace, guide_trace, tagger.contexts)
    return {
        "free_energy": stack_terms([t.free_energy for t in terms]),
        "kl": stack_terms([t.kl for t in terms]),
        "reconstruction": stack_terms([t.reconstruction for t in terms]),
        "observed": stack_terms([t.observed for t in terms]),
    }


def score_replayed(model_trace, guide_trace, contexts: List[StepContext]) -> List[Terms]:
    """The step free energy terms of a model trace replayed against a guide trace, one :class:`Terms` per
    marked step (sites tagged by :class:`StepTagger`): :math:`-\\log p(x_t \\mid \\cdot)` of the observed sites
    and, for the latent sites, the analytic KL when guide and prior are both Normal, else
    :math:`\\log q(z) - \\log p(z)` at the guide's sample."""
    terms = [Terms(ctx.batch_shape) for ctx in contexts]
    for name, site in model_trace.nodes.items():
        t = site["infer"].get("avf_step") if site["type"] == "sample" else None
        if t is None:
            continue
        check_plate_shape(site)
        q = None if site["is_observed"] else guide_trace.nodes[name]["fn"]
        params = None if q is None else normal_parameters(q)
        score_site(terms[t], site, site["fn"], q, None if params is None else (params[0], params[1].log()))
    return terms


def filtering_free_energy(model: Callable, guide: Callable, *args, **kwargs) -> Dict[str, torch.Tensor]:
    """Per-step free energy of ``guide`` on the sequences in ``args``.

    :returns: ``free_energy``, ``kl``, ``reconstruction`` (batch, time) float tensors and ``observed``
        (batch, time) bool: whether the step observed anything unmasked.

    Example::

        out = filtering_free_energy(srnn.model, guide, xs, mask)
        per_step = (out["free_energy"] * out["observed"]).sum() / out["observed"].sum()
    """
    iterative = isinstance(guide, IterativeGuide)
    out = _iterative(guide, args, kwargs) if iterative else _replayed(model, guide, args, kwargs)
    if out["free_energy"].numel() == 0 or not out["observed"].any():
        raise ValueError(
            "pyro_avf: nothing was observed in these data: the model ran no time step with an unmasked "
            f"observation (free energy of shape {tuple(out['free_energy'].shape)}; an empty time dimension?), so "
            "there is no free energy per step to report."
        )
    return out


def mean_free_energy_per_step(out: Dict[str, torch.Tensor]) -> float:
    """:math:`\\sum m \\mathcal{F} / \\sum m` over real (observed) steps."""
    mask = out["observed"].to(out["free_energy"].dtype)
    return ((out["free_energy"] * mask).sum() / mask.sum().clamp_min(1)).item()


# ---------------------------------------------------------------------------------------------------------
# Whole data sets


class FreeEnergy(NamedTuple):
    r"""The filtering free energy of a data set of N sequences, in both normalisations:

    - ``per_step`` (ours): :math:`\sum_{n,t} m_{n,t}\mathcal{F}_{n,t} / \sum_{n,t} m_{n,t}`, the total over all
      real steps divided by their number ``steps``; ``total`` is the numerator;
    - ``paper`` (the AVF paper's code): each sequence's first step is not scored and its sum is divided by its
      length, then the mean is taken over the ``sequences``,
      :math:`\frac1N \sum_n \frac{1}{T_n} \sum_{t > t_0} m_{n,t}\mathcal{F}_{n,t}` (about 0.18 nats/step
      below ``per_step`` on JSB Chorales: the first step of a song is the hardest to predict).

    >>> import torch
    >>> from pyro_avf.free_energy import SequenceScores
    >>> scores = SequenceScores.from_steps(torch.tensor([[4.0, 2.0, 2.0], [6.0, 1.0, 0.0]]),
    ...                                    torch.tensor([[True, True, True], [True, True, False]]))
    >>> fe = FreeEnergy.from_scores(scores)
    >>> fe.per_step, fe.paper                # 15 / 5 and ((2 + 2) / 3 + 1 / 2) / 2
    (3.0, 0.9166666666666666)
    """

    per_step: float
    steps: int
    total: float
    paper: float = math.nan
    sequences: int = 0

    @classmethod
    def from_sums(cls, total: float, steps: float, paper_sum: float, sequences: float) -> "FreeEnergy":
        """From the four sums that add up over batches and processes (``paper_sum`` is N times ``paper``)."""
        paper = paper_sum / sequences if sequences else math.nan
        return cls(total / max(steps, 1.0), int(steps), total, paper, int(sequences))

    @classmethod
    def from_scores(cls, scores: SequenceScores) -> "FreeEnergy":
        """From the per-sequence sums of one or more batches."""
        return cls.from_sums(*score_sums(scores))

    @property
    def sums(self) -> Tuple[float, float, float, float]:
        """``(total, steps, paper_sum, sequences)``, the numbers :meth:`from_sums` takes."""
        return self.total, float(self.steps), self.paper * self.sequences if self.sequences else 0.0, self.sequences


def score_sums(scores: SequenceScores) -> Tuple[float, float, float, float]:
    """``(total, steps, paper_sum, sequences)`` of per-sequence sums (sequences without a real step left out)."""
    return (scores.total.sum().item(), float(scores.steps.sum().item()), scores.paper_sum(),
            float((scores.steps > 0).sum().item()))  # fmt: skip


def batch_scores(model: Any, guide: Callable, xs: torch.Tensor, mask: Optional[torch.Tensor] = None,
                 stream: Optional[Callable[[Any], Any]] = None) -> SequenceScores:  # fmt: skip
    """The per-sequence sums of one batch: streamed when ``stream`` is given and can filter with ``guide``
    (see :func:`evaluate`), else one :func:`filtering_free_energy` pass."""
    fn = getattr(model, "model", model)
    if stream is not None:
        streamer = stream(model)
        own_guide = guide == getattr(model, "guide", None)
        if isinstance(guide, IterativeGuide) or (own_guide and hasattr(streamer, "baseline_traces")):
            return streamed_sequence_scores(streamer, guide, xs, mask)
    out = filtering_free_energy(fn, guide, *((xs,) if mask is None else (xs, mask)))
    real = out["observed"] if mask is None else out["observed"] & mask
    return SequenceScores.from_steps(out["free_energy"], real)


def evaluate(model: Any, guide: Callable, data: Any, *, batch_size: int = 16,
             stream: Optional[Callable[[Any], Any]] = None, seed: int = 0) -> FreeEnergy:  # fmt: skip
    r"""The filtering free energy of ``guide`` on whole sequences, in both normalisations (:class:`FreeEnergy`:
    ``per_step`` :math:`\sum_{n,t} m_{n,t}\mathcal{F}_{n,t} / \sum_{n,t} m_{n,t}` and the AVF paper's
    ``paper``).

    :param model: a model with ``model(xs, mask)`` (:class:`~pyro_avf.trainer.SequenceModel`) or that Pyro
        function itself; an ``nn.Module`` (or its bound method) is scored in eval mode, dropout off
        (:func:`eval_mode`).
    :param guide: an :class:`~pyro_avf.IterativeGuide` (scored online, β = 1) or any Pyro guide (traced
        once, the model replayed against it).
    :param data: a list of (T_i, ...) tensors, a padded ``(xs, mask)`` pair or one (N, T, ...) tensor
        (:func:`pyro_avf.sequences.as_sequences`); scored in batches of ``batch_size``, longest first.
    :param stream: optional ``model -> stream`` (an object for :class:`~pyro_avf.online.OnlineFilter` with
        ``step(state, x_t, mask_t)``): each batch is then filtered one step at a time, so memory stays flat in
        the length of the sequences; a stream that also has ``baseline_traces`` streams the model's own guide.
    :param int seed: the evaluation's random numbers are drawn from this seed under a forked generator.
    """
    batches = as_sequences(data, "data").batches(batch_size)
    return score_batches(model, guide, batches, stream=stream, seed=seed)


@contextlib.contextmanager
def eval_mode(model: Any) -> Iterator[None]:
    """``model.eval()`` while scoring when it is (or is the bound method of) an ``nn.Module`` (dropout off), its
    modules' own training flags restored after."""
    module = model if isinstance(model, torch.nn.Module) else getattr(model, "__self__", None)
    if not isinstance(module, torch.nn.Module):
        yield
        return
    flags = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def score_batches(model: Any, guide: Callable, batches: Sequence[Tuple[torch.Tensor, Optional[torch.Tensor]]], *,
                  stream: Optional[Callable[[Any], Any]] = None, seed: int = 0) -> FreeEnergy:  # fmt: skip
    """:func:`batch_scores` over ``batches``, with random numbers from ``seed`` (forked generator)."""
    sums = [0.0, 0.0, 0.0, 0.0]
    with torch.random.fork_rng(), eval_mode(model):
        torch.manual_seed(seed)
        for xs, mask in batches:
            sums = [a + b for a, b in zip(sums, score_sums(batch_scores(model, guide, xs, mask, stream)))]
    return FreeEnergy.from_sums(*sums)
