"""AmortizedFilteringELBO: the filtering free energy of one guide pass, without replaying the model.

The loss of a call is

.. math::

    \\mathcal{L} = \\sum_t \\mathcal{F}_t(\\lambda_{t,K}) + \\text{(sites outside steps)}
        + \\sum_t \\sum_{0<k<K} \\lambda_{t,k}^\\top
          \\mathrm{sg}\\left[\\nabla_\\lambda \\mathcal{F}_t(\\lambda_{t,k})\\right] - \\mathrm{sg}[\\cdot],

so the model parameters θ learn from the final step free energies (AVF Algorithm 1, M-step) and the update
networks φ from the free energies of every inference iteration (the last sum has value 0; ``sg`` stops
gradients). KL terms are analytic where prior and posterior are both Normal (in the unconstrained space).
"""

from __future__ import annotations

import contextlib
from functools import partial
from typing import Dict, List, Tuple

import torch
from pyro.infer.elbo import ELBO
from pyro.poutine.messenger import Messenger, _context_wrap

from pyro_avf.free_energy import Terms, check_plate_shape, score_site, stack_terms
from pyro_avf.guide import IterativeGuide


class AmortizedFilteringELBO(ELBO):
    r"""The ELBO for :class:`~pyro_avf.IterativeGuide`.

    :param int num_particles: independent guide passes averaged per step.
    :param float kl_weight: β multiplying every KL term (KL annealing: set it each epoch, e.g.
        ``elbo.kl_weight = min(1.0, epoch / 50)``).
    :param bool train_all_iterations: train the update networks on the free energy of every inference iteration
        (True, the default) or only on the final one.

    After each call, :attr:`diagnostics` holds ``free_energy``, ``kl`` and ``reconstruction`` tensors shaped
    ``(batch, time, K + 1)`` (iteration 0 is the prior prediction, iteration K the final posterior; batch is
    the flattened outer plates of the step), ``observed`` ``(batch, time)`` (whether a step observed anything
    unmasked) and ``step_executions`` (executions of step functions in the pass).

    Example (``model`` as in :func:`~pyro_avf.filtering_step`)::

        >>> import pyro, torch
        >>> from pyro_avf.step import examples_model as model
        >>> elbo = AmortizedFilteringELBO()
        >>> svi = pyro.infer.SVI(model, IterativeGuide(model, 3, hidden_size=8), pyro.optim.Adam({"lr": 1e-3}), elbo)
        >>> loss = svi.step(torch.randn(4, 6, 2))
        >>> elbo.diagnostics["free_energy"].shape  # (sequences, time, K + 1): per step and inference iteration
        torch.Size([4, 6, 4])
    """

    def __init__(
        self,
        num_particles: int = 1,
        kl_weight: float = 1.0,
        train_all_iterations: bool = True,
        max_plate_nesting: float = float("inf"),
        vectorize_particles: bool = False,
    ):
        super().__init__(
            num_particles=num_particles,
            max_plate_nesting=max_plate_nesting,
            vectorize_particles=vectorize_particles,
        )
        self.kl_weight = kl_weight
        self.train_all_iterations = train_all_iterations
        self.diagnostics: Dict[str, object] = {}

    def _pass(self, guide: IterativeGuide, handlers: List[Messenger], args, kwargs) -> torch.Tensor:
        def one_pass(*args, **kwargs):
            with contextlib.ExitStack() as stack:
                for handler in handlers:  # outermost first, as the wrapped guide would enter them
                    stack.enter_context(handler)
                return guide.run(args, kwargs, kl_weight=self.kl_weight, local_gradients=True)

        if self.vectorize_particles and self.num_particles > 1:
            record = self._vectorized_num_particles(one_pass)(*args, **kwargs)
        else:
            record = one_pass(*args, **kwargs)
        model_trace, _ = guide.get_traces()
        step_terms = [r.final_terms for r in record.steps]  # scored by the guide after each step
        other = Terms(torch.Size(), self.kl_weight)  # sites outside any step
        for site in model_trace.nodes.values():
            infer = site["infer"]
            if site["type"] != "sample" or infer.get("_deterministic") or infer.get("avf_step") is not None:
                continue
            check_plate_shape(site)
            score_site(other, site, site["fn"], guide.trace.nodes[site["name"]]["fn"], site["infer"].get("avf_lambda"))
        loss = sum((t.loss for t in step_terms), other.loss)
        for surrogate in (record.final_surrogate, record.surrogate if self.train_all_iterations else None):
            if surrogate is not None:
                loss = loss + surrogate
        self._record_diagnostics(record, step_terms)
        return loss

    def _record_diagnostics(self, record, step_terms) -> None:
        # per-step tables only when every step has the same batch and number of recorded iterations (a step
        # whose latents are all conditioned on, e.g. by poutine.condition, records one)
        if (
            not record.steps
            or any(t.free_energy.shape != step_terms[0].free_energy.shape for t in step_terms)
            or any(len(r.free_energy) != len(record.steps[0].free_energy) for r in record.steps)
        ):
            self.diagnostics = {"step_executions": record.step_executions}
            return

        fe = [[*r.free_energy, t.free_energy.detach()] for r, t in zip(record.steps, step_terms)]
        kl = [[*r.kl, t.kl.detach()] for r, t in zip(record.steps, step_terms)]
        rec = [[*r.reconstruction, t.reconstruction.detach()] for r, t in zip(record.steps, step_terms)]
        self.diagnostics = {
            "free_energy": _stack(fe),
            "kl": _stack(kl),
            "reconstruction": _stack(rec),
            "observed": stack_terms([t.observed for t in step_terms]),
            "step_executions": record.step_executions,
        }

    def _get_trace(self, model, guide, args, kwargs):
        """Not used: this ELBO reads the traces of the guide's single pass (see :meth:`differentiable_loss`)."""
        guide(*args, **kwargs)
        return unwrap_guide(guide)[0].get_traces()

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
        """The loss as a differentiable tensor (averaged over particles)."""
        inner, handlers = unwrap_guide(guide)
        n = 1 if self.vectorize_particles else self.num_particles
        loss = sum(self._pass(inner, handlers, args, kwargs) for _ in range(n)) / n
        if self.vectorize_particles and self.num_particles > 1:
            loss = loss / self.num_particles
        return loss

    def loss(self, model, guide, *args, **kwargs) -> float:
        """The loss value (inference still needs gradients with respect to λ, so autograd stays on)."""
        return self.differentiable_loss(model, guide, *args, **kwargs).item()

    def loss_and_grads(self, model, guide, *args, **kwargs) -> float:
        loss = self.differentiable_loss(model, guide, *args, **kwargs)
        loss.backward()
        return loss.item()


def _stack(per_step) -> torch.Tensor:
    """``[[(batch...) per iteration] per step]`` -> ``(batch, time, iterations)``."""
    return torch.stack([torch.stack([x.reshape(-1) for x in its], -1) for its in per_step], 1)


def unwrap_guide(guide) -> Tuple[IterativeGuide, List[Messenger]]:
    """The :class:`~pyro_avf.IterativeGuide` inside ``guide`` and the Pyro handlers wrapped around it
    (``poutine.scale(guide, scale=N / B)``, ``poutine.mask``, ...), outermost first.

    Example::

        >>> from pyro import poutine
        >>> from pyro_avf.step import examples_model as model
        >>> guide = IterativeGuide(model, 1, hidden_size=8)
        >>> inner, handlers = unwrap_guide(poutine.scale(guide, scale=2.0))
        >>> inner is guide, [type(h).__name__ for h in handlers]
        (True, ['ScaleMessenger'])
    """
    handlers: List[Messenger] = []
    inner = guide
    while isinstance(inner, partial):
        call = inner.func if isinstance(inner.func, partial) else inner  # Pyro's _bound_partial holds a partial
        if call.func is not _context_wrap or len(call.args) != 2:
            break
        handler, inner = call.args
        handlers.append(handler)
    if not isinstance(inner, IterativeGuide):
        raise TypeError(
            f"AmortizedFilteringELBO needs a pyro_avf.IterativeGuide (or one wrapped in Pyro handlers), got "
            f"{type(inner).__name__}; use pyro.infer.Trace_ELBO for other guides."
        )
    return inner, handlers
