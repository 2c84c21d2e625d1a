"""One execution of a filtering step for inference: latents drawn from given posteriors, nothing traced.

:class:`StepRun` sits on top of the handler stack while the guide re-runs a step. Every sample site of the
step stops at it (so no trace outside sees the re-runs), after it has received what the handlers around
the step would have added (outer plates, scale, mask). Parameter sites pass through unchanged, so model
parameters used inside the step stay visible to :class:`~pyro.infer.SVI`.
"""

from __future__ import annotations

from typing import List, NamedTuple, Optional, Tuple

import torch
from pyro.poutine.broadcast_messenger import BroadcastMessenger
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample
from torch.distributions import biject_to

from pyro_avf.free_energy import StepContext, Terms
from pyro_avf.posterior import check_continuous_latent, normal_parameters, posterior, unconstrained_moments, unwrap

Lambda = Tuple[torch.Tensor, torch.Tensor]


class LatentRecord(NamedTuple):
    name: str
    prior: object
    lam: Lambda
    value: torch.Tensor


class ObservedRecord(NamedTuple):
    name: str
    fn: object
    value: torch.Tensor


def combine_masks(outer, inner):
    """Logical and of two optional masks."""
    if outer is None:
        return inner
    if inner is None:
        return outer
    return outer & inner


def check_finite_observation(name: str, value) -> None:
    """Refuse NaN or infinite observed data with a clear error."""
    if isinstance(value, torch.Tensor) and value.is_floating_point() and not torch.isfinite(value).all():
        bad = (~torch.isfinite(value)).sum().item()
        raise ValueError(
            f"pyro_avf: observed site '{name}' contains {bad} NaN or infinite value(s); clean the data or "
            "replace missing entries with finite values and mask them out with poutine.mask."
        )


def apply_context(msg, ctx: StepContext) -> None:
    """Give ``msg`` the plates, scale and mask of the handlers around the step, then broadcast it."""
    msg["cond_indep_stack"] = tuple(ctx.frames) + tuple(msg["cond_indep_stack"])
    msg["scale"] = ctx.scale * msg["scale"]
    msg["mask"] = combine_masks(ctx.mask, msg["mask"])
    if not _has_plate_shape(msg["fn"], msg["cond_indep_stack"]):
        BroadcastMessenger._pyro_sample(msg)


def _has_plate_shape(fn, frames) -> bool:
    """Whether ``fn`` already has every plate's size at the plate's dim (broadcasting would not change it)."""
    shape = getattr(fn, "batch_shape", None)
    if shape is None:
        return False
    return all(f.dim is None or f.size == -1 or (len(shape) >= -f.dim and shape[f.dim] == f.size) for f in frames)


class StepRun(Messenger):
    """Run a step once with latent slot ``i`` drawn from ``q(lambdas[i])``.

    With ``lambdas=None`` every slot starts at its prior (the prediction, iteration 0) and the initial
    parameters are available as :attr:`initial_lambdas` (detached leaves that require grad).
    """

    def __init__(self, ctx: StepContext, lambdas: Optional[List[Lambda]], kl_weight: float = 1.0):
        super().__init__()
        self.ctx = ctx
        self.lambdas = lambdas
        self.latents: List[LatentRecord] = []
        self.observations: List[ObservedRecord] = []
        self.terms = Terms(ctx.batch_shape, kl_weight)

    @property
    def initial_lambdas(self) -> List[Lambda]:
        return [rec.lam for rec in self.latents]

    def _process_message(self, msg) -> None:
        if msg["type"] != "sample":
            return
        apply_context(msg, self.ctx)
        msg["stop"] = True
        if site_is_subsample(msg):
            return
        name, fn = msg["name"], msg["fn"]
        if msg["is_observed"]:
            check_finite_observation(name, msg["value"])
            self.terms.add_observation(fn, msg["value"], msg["mask"], msg["scale"])
            self.observations.append(ObservedRecord(name, fn, msg["value"]))
            return
        check_continuous_latent(name, fn)
        i = len(self.latents)
        if self.lambdas is None:
            loc, scale = unconstrained_moments(fn)
            lam = (loc.requires_grad_(), scale.log().requires_grad_())
        elif i < len(self.lambdas):
            lam = self.lambdas[i]
        else:
            raise RuntimeError(
                f"pyro_avf: the step produced more latent sites than on its first run (extra site '{name}'); "
                "a filtering step must sample the same latent sites every time it runs."
            )
        q = posterior(lam[0], lam[1], fn)
        z = q.rsample()
        msg["value"], msg["done"] = z, True
        self.latents.append(LatentRecord(name, fn, lam, z))
        self.terms.add_latent(q, fn, z, msg["mask"], msg["scale"], q_params=lam)

    def latent_errors(self, i: int) -> torch.Tensor:
        """:math:`\\varepsilon_z = (u - \\mu_p)/\\sigma_p` of slot ``i`` in the unconstrained space."""
        rec = self.latents[i]
        params = normal_parameters(rec.prior)
        if params is None:
            raise ValueError(
                f"pyro_avf: error encoding needs Normal (or LogNormal) priors; site '{rec.name}' has "
                f"{type(unwrap(rec.prior)[0]).__name__}. Use encoding='gradient'."
            )
        u = biject_to(rec.prior.support).inv(rec.value)
        return (u - params[0]) / params[1]

    def observation_errors(self, batch_shape: torch.Size) -> torch.Tensor:
        """:math:`\\varepsilon_x = (x - \\mu_x)/\\sigma_x` of every Normal observation, flattened and joined."""
        parts = []
        for rec in self.observations:
            params = normal_parameters(rec.fn)
            if params is None:
                raise ValueError(
                    f"pyro_avf: error encoding needs Normal observations; site '{rec.name}' has "
                    f"{type(unwrap(rec.fn)[0]).__name__}. Use encoding='gradient'."
                )
            parts.append(flatten_to((rec.value - params[0]) / params[1], batch_shape, rec.name))
        return torch.cat(parts, -1) if parts else torch.zeros(batch_shape + (0,))

    def observed_values(self, batch_shape: torch.Size) -> torch.Tensor:
        """Every observed value of the step, flattened per batch element and joined."""
        parts = [
            flatten_to(rec.value.to(torch.get_default_dtype()), batch_shape, rec.name) for rec in self.observations
        ]
        return torch.cat(parts, -1) if parts else torch.zeros(batch_shape + (0,))


def flatten_to(x: torch.Tensor, batch_shape: torch.Size, name: str) -> torch.Tensor:
    """Reshape ``x`` to ``batch_shape + (-1,)``, broadcasting its leading dims; error if they do not align."""
    n = len(batch_shape)
    try:
        aligned = x.dim() >= n and torch.broadcast_shapes(x.shape[:n], batch_shape) == batch_shape
    except RuntimeError:
        aligned = False
    if not aligned:
        raise ValueError(
            f"pyro_avf: cannot align site '{name}' of shape {tuple(x.shape)} with the latent batch shape "
            f"{tuple(batch_shape)} for encoding; its leading dims must be the latent's batch dims."
        )
    return x.expand(batch_shape + x.shape[n:]).reshape(batch_shape + (-1,))
