"""Streaming filtering: one observation in, the current posterior and a k-step-ahead predictive out.

:class:`OnlineFilter` runs any model with a marked step one observation at a time. The model is either

- a *step model* (:mod:`pyro_avf.transition`): ``initial_state(batch_size, like)`` and
  ``advance(t, carry, x_t, mask_t)`` around its :func:`~pyro_avf.filtering_step`, which every reference
  model in :mod:`pyro_avf.models` follows; :class:`StepStream` adapts it (``OnlineFilter(dmm, guide)`` does
  so by itself), so no stream class is written by hand; or
- an object shaped like a model of Pyro's :class:`~pyro.infer.SMCFilter`, with two methods

  - ``init(state, *args, **kwargs)``: fill the dict ``state`` with the initial state of the model;
  - ``step(state, *args, **kwargs)``: advance the model by one time step by calling a
    :func:`~pyro_avf.filtering_step` function exactly once (under the plates it needs), and store what the
    next step needs back into ``state``. Called with the observation ``None`` it must *simulate* the step
    (``pyro.sample(..., obs=None)`` does so): that is how predictions are made.

Every tensor in ``state`` and in the step's tensor arguments leads with the batch dimension (one row per
stream), and ``step`` stores new values into ``state`` rather than changing its tensors in place (the filter
keeps the previous state to simulate futures from).
At each :meth:`OnlineFilter.step` the trained :class:`~pyro_avf.IterativeGuide` infers
:math:`q(z_t)` from the prior prediction with its K iterations, exactly as the online evaluation of
:func:`pyro_avf.evaluation.filtering_free_energy` does (same random draws for the same seed), and the state
moves on with :math:`z_t \\sim q_{\\lambda_K}(z_t)`. Memory is constant per step: the filter keeps the current
state and the previous step's inputs, and no autograd graph leaves a step. :func:`streamed_free_energy`
scores a batch of whole (padded) sequences this way: the batch pass's numbers with memory flat in the length.

The k-step-ahead predictive of an observation site is the mixture over :math:`P` simulated futures

.. math::

    p(x_{t+k} \\mid x_{\\le t}) \\approx \\frac{1}{P} \\sum_{p=1}^{P}
        p_\\theta\\big(x_{t+k} \\mid z^{(p)}_{\\le t+k}, x^{(p)}_{t+1:t+k-1}, x_{\\le t}\\big),
    \\qquad z^{(p)}_t \\sim q_{\\lambda_K}(z_t), \\quad z^{(p)}_{t+j}, x^{(p)}_{t+j} \\sim p_\\theta,

returned as a :class:`~pyro.distributions.MixtureSameFamily` with batch shape ``(batch,)``.

Example::

    f = OnlineFilter(dmm, guide, predict_steps=1)   # any step model: SRNN, VRNN, DMM, SVG, SLVM, the LG-SSM
    f.init(batch_size=1)
    for x_t in sensor:                             # x_t: (1, x_dim)
        out = f.step(x_t)
        out.posterior["z_1"].mean, out.predictive  # q(z_t) and p(x_{t+1} | x_{<=t})

    total, steps = streamed_free_energy(dmm, guide, xs, mask)   # Σ m F and Σ m over padded songs
"""

from __future__ import annotations

import itertools
import warnings
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Tuple, Union

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample
from torch import Tensor, nn
from torch.utils._pytree import tree_leaves, tree_map

from pyro_avf.free_energy import SequenceScores
from pyro_avf.guide import IterativeGuide
from pyro_avf.inference import Lambda, detached, explained
from pyro_avf.posterior import JointDraws, site_posterior
from pyro_avf.transition import StepModel, missing_members, plate_name


class FilterStep(NamedTuple):
    """What :meth:`OnlineFilter.step` returns for step ``t`` (1-based count of observations so far).

    ``posterior``: latent site name → :math:`q_{\\lambda_K}(z_t)`; ``free_energy``, ``kl``,
    ``reconstruction``: this step's terms per stream, shape ``(batch,)``; ``predictive``: observation site
    name → k-step-ahead predictive (``None`` when the filter was built with ``predict_steps=0``);
    ``observed``: per stream, whether the step observed anything unmasked.
    """

    t: int
    posterior: Dict[str, dist.Distribution]
    free_energy: torch.Tensor
    kl: torch.Tensor
    reconstruction: torch.Tensor
    predictive: Optional[Dict[str, dist.Distribution]]
    observed: Optional[torch.Tensor] = None


class _DrawLatents(Messenger):
    """Draw the latent sites of one step from given posteriors ``q(λ_i)``, in their order in the step."""

    def __init__(self, lambdas: List[Lambda], family: str = "diagonal"):
        super().__init__()
        self.lambdas = lambdas
        self.count = 0
        self.draws = JointDraws(family)  # joint slots: each drawn given the earlier ones

    def _pyro_sample(self, msg) -> None:
        if msg["is_observed"] or site_is_subsample(msg) or self.count >= len(self.lambdas):
            return
        msg["fn"] = site_posterior(self.draws.condition(self.lambdas[self.count], msg["fn"]), msg["fn"])
        self.count += 1

    def _pyro_post_sample(self, msg) -> None:
        if not msg["is_observed"]:
            self.draws.add(msg["value"])  # no-op unless the site was a joint slot drawn here


def repeat_streams(tree: Any, times: int) -> Any:
    """Repeat every tensor of ``tree`` ``times`` times along its leading (batch) dimension, row by row:
    row ``b`` becomes rows ``b·times … b·times + times − 1``."""
    return tree_map(lambda v: v.repeat_interleave(times, 0) if isinstance(v, torch.Tensor) else v, tree)


def split_streams(fn: dist.Distribution, batch: int, times: int) -> dist.Distribution:
    """Reshape the leading batch dimension ``batch·times`` of ``fn`` into ``(batch, times)``.

    Supports :class:`~torch.distributions.Independent` wrappers around element-wise distributions
    (Normal, Bernoulli, LogNormal, Gamma, ... : every parameter has the distribution's batch shape).
    """
    if isinstance(fn, torch.distributions.Independent):
        return dist.Independent(split_streams(fn.base_dist, batch, times), fn.reinterpreted_batch_ndims)
    if fn.event_shape != torch.Size():
        raise ValueError(
            f"pyro_avf: cannot form a predictive mixture of {type(fn).__name__} (event shape "
            f"{tuple(fn.event_shape)}); predictions support element-wise observation distributions."
        )
    params = {name: getattr(fn, name) for name in fn.arg_constraints if name in fn.__dict__}
    if "logits" in params:  # probs and logits are alternatives; a cached one may sit beside the other
        params.pop("probs", None)
    shape = fn.batch_shape
    grouped = {
        name: v.expand(shape).reshape((batch, times) + shape[1:]) for name, v in params.items() if v is not None
    }
    return type(fn)(**grouped, validate_args=False)


def predictive_mixture(fn: dist.Distribution, batch: int, times: int) -> dist.MixtureSameFamily:
    """The equally weighted mixture over the ``times`` simulated futures of each stream."""
    grouped = split_streams(fn, batch, times)
    ndims = len(fn.batch_shape) - 1  # batch dims after the stream dimension become the mixture's event
    component = dist.Independent(grouped, ndims) if ndims else grouped
    weights = dist.Categorical(logits=grouped.mean.new_zeros(batch, times))  # the data's dtype and device
    return dist.MixtureSameFamily(weights, component)


def leading_size(tree: Any) -> int:
    """The leading (batch) size of the first tensor in ``tree``."""
    for v in tree_leaves(tree):
        if isinstance(v, torch.Tensor):
            return v.size(0)
    raise ValueError("pyro_avf: the stream's state holds no tensor to read the number of streams from")


class StepStream:
    r"""A step model (:mod:`pyro_avf.transition`) as a stream for :class:`OnlineFilter`: no stream class
    written by hand.

    The state holds the step count ``t`` and the model's ``carry``;
    :meth:`step` is :math:`c_t = \mathrm{advance}(t, c_{t-1}, x_t, m_t)` under the model's batch plate,
    the very code of the model's batch pass (:func:`~pyro_avf.transition.run_steps`), one step per call. With
    ``x_t = None`` the step is simulated and the carry moves on with the simulated observation.

    :param model: an object with ``initial_state(batch_size, like)`` and ``advance(t, carry, x_t, mask_t)``;
        its ``validate(xs, mask)``, when it has one, checks each observation.

    Example::

        f = OnlineFilter(StepStream(vrnn), guide)   # what OnlineFilter(vrnn, guide) does
        f.init(batch_size=2)
        out = f.step(x_t, mask_t)                   # x_t (2, x_dim), mask_t (2,) bool or None
    """

    def __init__(self, model: StepModel):
        missing = missing_members(model)
        if missing:
            raise TypeError(
                f"pyro_avf: {type(model).__name__} cannot be streamed: it has no {' and no '.join(missing)}. "
                "A model streams when it exposes its transition around its @pyro_avf.filtering_step (see "
                "pyro_avf.transition), or when it is an object with init(state, ...) and step(state, ...)."
            )
        self.model = model

    def _like(self) -> Tensor:
        """A tensor of the model's dtype and device: its first parameter or buffer (else the default dtype)."""
        if isinstance(self.model, nn.Module):
            first = next(itertools.chain(self.model.parameters(), self.model.buffers()), None)
            if first is not None:
                return first.detach()
        return torch.zeros(())

    def init(self, state: dict, batch_size: int = 1, like: Optional[Tensor] = None) -> None:
        """``t = 0`` and the carry ``initial_state(batch_size, like)`` for ``batch_size`` streams; ``like``
        (default: the model's parameters) gives dtype and device."""
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        state["t"] = 0
        state["carry"] = self.model.initial_state(batch_size, self._like() if like is None else like)

    def check(self, state: dict, x_t: Tensor, mask_t: Optional[Tensor]) -> Tuple[Tensor, Optional[Tensor]]:
        """``x_t`` (batch, ...) for the streams started by :meth:`init`, ``mask_t`` (batch,) bool or None,
        checked with the model's ``validate`` (on ``x_t[:, None]``) when it has one; raises ValueError."""
        batch = leading_size(state["carry"])
        if not isinstance(x_t, torch.Tensor) or x_t.dim() < 1 or x_t.size(0) != batch:
            shape = tuple(x_t.shape) if isinstance(x_t, torch.Tensor) else type(x_t).__name__
            raise ValueError(f"x_t must have shape ({batch}, ...): one observation per stream, got {shape}")
        if mask_t is not None and (
            not isinstance(mask_t, torch.Tensor) or mask_t.dtype != torch.bool or tuple(mask_t.shape) != (batch,)
        ):
            raise ValueError(f"mask_t must be None or a bool tensor of shape ({batch},), got {mask_t!r:.80}")
        validate = getattr(self.model, "validate", None)
        if validate is not None:
            try:
                xs, mask = validate(x_t.unsqueeze(1), None if mask_t is None else mask_t.unsqueeze(1))
            except ValueError as err:
                raise ValueError(f"x_t of shape {tuple(x_t.shape)}, checked as xs = x_t[:, None]: {err}") from err
            x_t, mask_t = xs[:, 0], None if mask is None else mask[:, 0]
        return x_t, mask_t

    def step(self, state: dict, x_t: Optional[Tensor], mask_t: Optional[Tensor] = None) -> None:
        """Advance by one step with observation ``x_t`` (batch, ...), or simulate it when ``x_t`` is None;
        ``mask_t`` (batch,) bool masks the step's sites of streams that have ended (padding)."""
        if x_t is not None:
            x_t, mask_t = self.check(state, x_t, mask_t)
        t = state["t"] + 1
        with pyro.plate(plate_name(self.model), leading_size(state["carry"])):
            carry = self.model.advance(t, state["carry"], x_t, mask_t)
        state["t"], state["carry"] = t, carry


def as_stream(model: Any) -> Any:
    """``model`` itself when it has ``init`` and ``step`` (SMCFilter-shaped); for a step model its own
    ``stream()`` when it has one (SRNN's adds its baseline filter), else a :class:`StepStream`; else a TypeError
    naming what is missing."""
    if callable(getattr(model, "init", None)) and callable(getattr(model, "step", None)):
        return model
    if not missing_members(model):
        own = getattr(model, "stream", None)
        return own() if callable(own) else StepStream(model)
    lacks = missing_members(model) + [f"{m}(state, ...)" for m in ("init", "step") if not hasattr(model, m)]
    raise TypeError(
        f"model must be a step model, with initial_state(batch_size, like) and advance(t, carry, x_t, mask_t) "
        f"around its @pyro_avf.filtering_step (pyro_avf.transition), or an object with methods init(state, ...) "
        f"and step(state, ...) like pyro.infer.SMCFilter's models; {type(model).__name__} has no "
        f"{', no '.join(lacks)}"
    )


class OnlineFilter:
    """Amortized variational filtering of streams, one observation at a time.

    :param model: a step model (wrapped in a :class:`StepStream`), or an object with ``init(state, ...)`` and
        ``step(state, ...)`` (see the module docstring).
    :param IterativeGuide guide: a (trained) guide; its update networks are used as they are, not trained.
    :param int predict_steps: k of the k-step-ahead predictive returned by every :meth:`step` (0: none); the
        future is simulated by running the model's step with the observation None (``advance`` with
        ``x_t=None``, or ``step(state, None)``), which must then sample it.
    :param int num_samples: P, the simulated futures per stream that form a predictive mixture.

    Example::

        f = OnlineFilter(ssm, guide, predict_steps=3, num_samples=200)
        f.init(batch_size=4)
        out = f.step(x_t)                # out.posterior: q(z_t); out.predictive: p(x_{t+3} | x_{<=t})
        f.predict(10)                    # any other horizon
    """

    def __init__(self, model: Any, guide: IterativeGuide, *, predict_steps: int = 0, num_samples: int = 100):
        if not isinstance(guide, IterativeGuide):
            raise TypeError(f"guide must be a pyro_avf.IterativeGuide, got {type(guide).__name__}")
        model = as_stream(model)
        if not isinstance(predict_steps, int) or predict_steps < 0:
            raise ValueError(f"predict_steps must be a non-negative integer, got {predict_steps!r}")
        if not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")
        self.model, self.guide = model, guide
        self.predict_steps, self.num_samples = predict_steps, num_samples
        self.state: Optional[Dict[str, Any]] = None
        self.t = 0
        self._last: Optional[tuple] = None  # (state before the step, args, kwargs, λ_K)

    def init(self, *args, **kwargs) -> None:
        """Start new streams: ``model.init(state, *args, **kwargs)`` fills an empty state (for a step model:
        ``init(batch_size=1, like=None)``)."""
        self.state, self.t, self._last = {}, 0, None
        self.guide.update_nets.register()  # once per stream: values in the param store take over
        with torch.no_grad():
            self.model.init(self.state, *args, **kwargs)

    def step(self, *args, **kwargs) -> FilterStep:
        """Filter one time step: ``model.step(state, *args, **kwargs)`` under the guide."""
        if self.state is None:
            raise RuntimeError("OnlineFilter.step() called before init()")
        before = dict(self.state)
        record = self.guide.run(args, kwargs, fn=lambda *a, **k: self.model.step(self.state, *a, **k), online=True,
                                first_step=self.t)  # fmt: skip
        calls = record.online.count
        if calls != 1:
            where = "advance()" if isinstance(self.model, StepStream) else "model.step()"
            raise RuntimeError(
                f"pyro_avf: {where} must call a @pyro_avf.filtering_step function exactly once, it called {calls}."
            )
        self.state = detached(self.state)
        run = record.last_run
        lambdas = [rec.lam for rec in run.latents]
        self._last = (before, args, kwargs, lambdas)
        self.t += 1
        terms = record.online.last()
        return FilterStep(
            t=self.t,
            posterior={**{rec.name: site_posterior(rec.posterior_lambda, rec.prior) for rec in run.latents},
                       **run.prior_sites},  # fmt: skip
            free_energy=terms["free_energy"],
            kl=terms["kl"],
            reconstruction=terms["reconstruction"],
            predictive=self.predict(self.predict_steps) if self.predict_steps else None,
            observed=terms["observed"],
        )

    def predict(self, k: int, num_samples: Optional[int] = None) -> Dict[str, dist.Distribution]:
        """k-step-ahead predictive of every observation site of the last filtered step (keyed by the
        predicted site's name), a mixture over ``num_samples`` simulated futures per stream.

        Drawn with a forked random number generator: predicting does not change later filtering results.
        """
        if self._last is None:
            raise RuntimeError("OnlineFilter.predict() needs at least one step() after init()")
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        before, args, kwargs, lambdas = self._last
        times = num_samples or self.num_samples
        state = repeat_streams(before, times)
        args, kwargs = repeat_streams((args, kwargs), times)
        batch = leading_size(before)
        with torch.random.fork_rng(devices=[]), torch.no_grad(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*not registered in the param store because requires_grad")
            family = getattr(self.guide, "posterior_family", "diagonal")
            with _DrawLatents(repeat_streams(lambdas, times), family):  # z_t ~ q(z_t), x_t as observed
                filtered = poutine.trace(self.model.step).get_trace(state, *args, **kwargs)
            for _ in range(k):
                with explained(lambda e: f"predicting {k} step(s) ahead simulates the future as model.step(state, "
                               f"None), which failed: {type(e).__name__}: {e}. The model's step must accept None as "
                               "its observation and then sample it (take batch sizes from the state, not from the "
                               "data), or filter with predict_steps=0.", errors=(Exception,)):  # fmt: skip
                    simulated = poutine.trace(self.model.step).get_trace(state, None)
        pattern = [s["is_observed"] for s in _sample_sites(filtered)]
        sites = _sample_sites(simulated)
        if len(sites) != len(pattern):
            raise RuntimeError(
                f"pyro_avf: a simulated step (observation None) sampled {len(sites)} sites, but the filtered step "
                f"had {len(pattern)}; model.step(state, None) must sample the observations it would otherwise "
                "observe, and nothing else."
            )
        predicted = [s for s, was_observed in zip(sites, pattern) if was_observed]
        return {s["name"]: predictive_mixture(s["fn"], batch, times) for s in predicted}


def _sample_sites(trace) -> List[dict]:
    return [s for s in trace.nodes.values() if s["type"] == "sample" and not site_is_subsample(s)]


def streamed_free_energy(
    model: Any,
    guide: Callable,
    xs: Tensor,
    mask: Optional[Tensor] = None,
    *,
    seed: Optional[int] = None,
    per_sequence: bool = False,
) -> Union[Tuple[float, float], Tuple[Tensor, Tensor]]:
    r"""Filter a batch of whole (padded) sequences one step at a time and sum the step free energies,

    .. math::

        \sum_{n,t} m_{n,t}\, \mathcal{F}_{n,t} \quad\text{and}\quad \sum_{n,t} m_{n,t},
        \qquad m_{n,t} = \mathrm{mask}_{n,t} \wedge \mathrm{observed}_{n,t}:

    the numbers of :func:`pyro_avf.evaluation.filtering_free_energy` over ``(xs, mask)`` for the same random
    state, but nothing except the filter's current state is kept, so memory does not grow with the length of the
    sequences (each step reads ``xs[:, t]`` only). An :class:`~pyro_avf.IterativeGuide` filters through
    :class:`OnlineFilter`; the model's own guide is streamed when the model's stream offers
    ``baseline_traces(state, x_t, mask_t)`` (SRNN's :class:`~pyro_avf.models.srnn.SRNNStream`): each step's
    guide is traced, the model's step replayed against it and scored
    (:func:`pyro_avf.evaluation.score_replayed`), and both traces are dropped.

    :param model: a step model (:mod:`pyro_avf.transition`: SRNN, VRNN, DMM, SVG, SLVM, the LG-SSM, ...) or a
        stream (an object with ``init(state, batch_size)`` and ``step(state, x_t, mask_t)``).
    :param guide: a (trained) :class:`~pyro_avf.IterativeGuide` of ``model.model``, or ``model.guide`` when
        the model's stream has ``baseline_traces``.
    :param xs: (B, T, ...) sequences; ``mask``: (B, T) bool, False on padding, or None.
    :param seed: when given, the random state is seeded with it for the pass and restored afterwards.
    :param per_sequence: return two (B,) tensors (float64 sums, long counts) instead of two floats.
    :returns: ``(total, steps)``: :math:`\sum m \mathcal{F}` and :math:`\sum m`, floats (or per sequence).

    Example::

        total, steps = streamed_free_energy(dmm, guide, xs, mask)   # test free energy per step: total / steps
        total, steps = streamed_free_energy(srnn, srnn.guide, xs, mask)   # SRNN's own filter
    """
    scores = streamed_sequence_scores(model, guide, xs, mask, seed=seed)
    if per_sequence:
        return scores.total, scores.steps
    return scores.total.sum().item(), float(scores.steps.sum().item())


def streamed_sequence_scores(
    model: Any, guide: Callable, xs: Tensor, mask: Optional[Tensor] = None, *, seed: Optional[int] = None
) -> SequenceScores:
    r"""What :func:`streamed_free_energy` sums, per sequence: a :class:`~pyro_avf.free_energy.SequenceScores`
    with :math:`\sum_t m_{n,t}\mathcal{F}_{n,t}`, :math:`T_n` and the free energy of each sequence's first real
    step (the AVF paper's normalisation leaves it out). Arguments as for :func:`streamed_free_energy`."""
    if not isinstance(xs, torch.Tensor) or xs.dim() < 2:
        raise ValueError(f"xs must be a tensor of shape (batch, time, ...), got {getattr(xs, 'shape', xs)!r}")
    batch, steps = xs.shape[:2]
    if mask is not None and (
        not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != (batch, steps)
    ):
        raise ValueError(f"mask must be None or a bool tensor of shape ({batch}, {steps}), got {mask!r:.80}")
    stream = as_stream(model)
    if not isinstance(guide, IterativeGuide):
        owner = getattr(stream, "model", model)
        if not (callable(getattr(stream, "baseline_traces", None)) and guide == getattr(owner, "guide", None)):
            raise TypeError(
                "pyro_avf: streamed_free_energy streams an IterativeGuide, or the model's own guide when its "
                f"stream has baseline_traces(state, x_t, mask_t); for this guide of {type(owner).__name__} use "
                "pyro_avf.evaluation.filtering_free_energy."
            )
    total = torch.zeros(batch, dtype=torch.float64, device=xs.device)
    count = torch.zeros(batch, dtype=torch.long, device=xs.device)
    first = torch.zeros(batch, dtype=torch.float64, device=xs.device)
    devices = [xs.device.index or 0] if xs.is_cuda else []
    with torch.random.fork_rng(devices=devices, enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        for t, (free_energy, observed) in enumerate(_step_terms(stream, guide, xs, mask)):
            real = observed if mask is None else observed & mask[:, t]
            f = torch.where(real, free_energy.double(), 0.0)
            first = torch.where(real & (count == 0), f, first)
            total += f
            count += real
    return SequenceScores(total, count, first)


def _step_terms(stream: Any, guide: Callable, xs: Tensor, mask: Optional[Tensor]):
    """(free energy, observed) of each step of ``xs``, each (B,): filtered by ``guide`` (an IterativeGuide) or
    by the stream's own filter (``baseline_traces``)."""
    from pyro_avf.evaluation import score_replayed  # evaluation reaches the filter lazily too

    masks = [None if mask is None else mask[:, t] for t in range(xs.size(1))]
    if isinstance(guide, IterativeGuide):
        f = OnlineFilter(stream, guide)
        f.init(batch_size=xs.size(0))
        for t, mask_t in enumerate(masks):
            out = f.step(xs[:, t]) if mask_t is None else f.step(xs[:, t], mask_t)
            yield out.free_energy, out.observed
        return
    state: Dict[str, Any] = {}
    stream.init(state, batch_size=xs.size(0))
    with torch.no_grad():
        for t, mask_t in enumerate(masks):
            guide_trace, model_trace, ctx = stream.baseline_traces(state, xs[:, t], mask_t)
            (terms,) = score_replayed(model_trace, guide_trace, [ctx])
            yield terms.free_energy, terms.observed
