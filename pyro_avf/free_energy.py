"""The step free energy of AVF Eq. 9, site by site.

.. math::

    \\mathcal{F}_t = \\underbrace{-\\mathbb{E}_{q(z_t)}\\left[\\log p_\\theta(x_t \\mid x_{<t}, z_{\\le t})\\right]}
        _{\\text{reconstruction}}
        + \\beta\\, \\underbrace{D_{KL}\\left(q(z_t) \\,\\|\\, p_\\theta(z_t \\mid x_{<t}, z_{<t})\\right)}_{\\text{KL}}

Every term is kept per element of the step's *outer* plates (the plates the step is called in, e.g. the
batch of sequences): dimensions of plates opened inside the step are summed. Masked elements contribute 0.
The loss multiplies each term by the site's scale (subsampling, ``poutine.scale``); diagnostics do not.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import torch

from pyro_avf.posterior import kl_or_log_ratio


class StepContext(NamedTuple):
    """What the handlers outside a step contribute to each of its sites."""

    frames: tuple  # CondIndepStackFrames of the plates around the step
    scale: object  # float or tensor
    mask: Optional[torch.Tensor]
    whole_model: bool = False  # a static model run as one step: its own plates give the batch

    @property
    def batch_shape(self) -> Optional[torch.Size]:
        """Shape of the outer plates, with size 1 at dims that no outer plate occupies (None for a whole
        model without outer plates: the batch shape of its first site is used)."""
        if self.whole_model and not self.frames:
            return None
        dims = [f.dim for f in self.frames if f.dim is not None]
        shape = [1] * (max(-d for d in dims) if dims else 0)
        for f in self.frames:
            if f.dim is not None:
                shape[f.dim] = f.size
        return torch.Size(shape)


def reduce_to(x: torch.Tensor, batch_shape: torch.Size) -> torch.Tensor:
    """Sum ``x`` over every dim that is not an outer plate, giving a tensor of ``batch_shape``."""
    n = len(batch_shape)
    while x.dim() > n:
        x = x.sum(0)
    for d in range(-x.dim(), 0):
        if batch_shape[d] == 1 and x.size(d) > 1:
            x = x.sum(d, keepdim=True)
    return x.expand(batch_shape) if x.shape != batch_shape else x


def apply_mask(x: torch.Tensor, mask) -> torch.Tensor:
    """Zero the masked-out elements (``mask`` False)."""
    if mask is None or mask is True:
        return x
    if mask is False:
        return torch.zeros_like(x)
    return torch.where(mask, x, x.new_zeros(()))


class Terms:
    """Accumulates reconstruction and KL terms of one step (per outer element and scaled for the loss)."""

    def __init__(self, batch_shape: Optional[torch.Size], kl_weight: float = 1.0):
        self.kl_weight = kl_weight
        self.loss = torch.zeros(())
        self.scaled = False  # whether any site carries a scale other than 1 (subsampling, poutine.scale)
        self._start(torch.Size() if batch_shape is None else batch_shape)
        self.batch_shape = batch_shape  # None: taken from the first site

    def _start(self, batch_shape: torch.Size) -> None:
        self.batch_shape = batch_shape
        self.reconstruction = torch.zeros(batch_shape)
        self.kl = torch.zeros(batch_shape)
        self.observed = torch.zeros(batch_shape, dtype=torch.bool)

    def add_observation(self, fn, value: torch.Tensor, mask, scale) -> None:
        """:math:`-\\log p(x)` of an observed site."""
        if self.batch_shape is None:
            self._start(fn.batch_shape)
        nll = apply_mask(-fn.log_prob(value), mask)
        self.reconstruction = self.reconstruction + reduce_to(nll, self.batch_shape)
        self.loss = self.loss + (scale * nll).sum()
        self.scaled = self.scaled or not _is_one(scale)
        seen = (
            torch.ones_like(nll, dtype=torch.bool)
            if mask is None
            else apply_mask(torch.ones_like(nll, dtype=torch.bool), mask)
        )
        self.observed = self.observed | reduce_to(seen.to(torch.int64), self.batch_shape).bool()

    def add_latent(self, q, prior, value: torch.Tensor, mask, scale, q_params=None) -> None:
        """:math:`D_{KL}(q \\| p)` (analytic when both are Normal) or :math:`\\log q(z) - \\log p(z)`."""
        if self.batch_shape is None:
            self._start(prior.batch_shape)
        kl = apply_mask(kl_or_log_ratio(q, prior, value, q_params), mask)
        self.kl = self.kl + reduce_to(kl, self.batch_shape)
        self.loss = self.loss + self.kl_weight * (scale * kl).sum()
        self.scaled = self.scaled or not _is_one(scale)

    @property
    def free_energy(self) -> torch.Tensor:
        """Per-element :math:`\\mathcal{F}_t` (unscaled, masked)."""
        return self.reconstruction + self.kl_weight * self.kl


def _is_one(scale) -> bool:
    return not isinstance(scale, torch.Tensor) and scale == 1.0


def stack_terms(per_step: Sequence[torch.Tensor]) -> torch.Tensor:
    """Stack per-step tensors of equal batch shape into ``(batch, time)`` (batch flattened)."""
    return torch.stack([t.reshape(-1) for t in per_step], 1)
