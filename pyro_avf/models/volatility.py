"""Stochastic volatility model as a Pyro program: a small non-linear, non-Gaussian test model.

Log-variance form (default), per dimension and with h_0 = mu::

    h_t ~ N(mu + phi (h_{t-1} - mu), sigma²)      site "h_{t}", shape (B, d)
    x_t ~ N(0, exp(h_t / 2))                      site "x_{t}", shape (B, d)   (scale exp(h_t/2))

Positive-latent form (``positive_latent=True``): the latent is the variance v_t = exp(h_t), with v_0 = e^mu::

    v_t ~ LogNormal(mu + phi (log v_{t-1} - mu), sigma)   site "v_{t}"
    x_t ~ N(0, sqrt(v_t))

Both forms define the same distribution over x; the second has a latent with positive support, which
exercises a guide's handling of constrained sites.
"""

from __future__ import annotations

from typing import Optional

import pyro
import pyro.distributions as dist
import torch
from torch import Tensor

from pyro_avf.models.lgssm import (
    ArrayLike,
    ParameterStore,
    mask_context,
    validate_mask,
    validate_sequences,
)
from pyro_avf.step import filtering_step
from pyro_avf.transition import run_steps


class StochasticVolatility(ParameterStore):
    """Stochastic volatility with per-dimension level ``mu``, persistence ``phi`` in (-1, 1), and
    log-volatility noise scale ``sigma`` > 0 (scalars are broadcast to ``dim``).

    When ``learnable``, the parameters are ``mu``, ``atanh_phi`` and ``log_sigma``.
    """

    def __init__(
        self,
        dim: int = 1,
        mu: ArrayLike = 0.0,
        phi: ArrayLike = 0.9,
        sigma: ArrayLike = 0.5,
        positive_latent: bool = False,
        learnable: bool = False,
    ):
        super().__init__()
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        dtype = torch.get_default_dtype()
        phi = torch.as_tensor(phi, dtype=dtype).expand(dim)
        if not bool((phi.abs() < 1).all()):
            raise ValueError(f"phi must lie in (-1, 1) for a stationary volatility process, got {phi}")
        self.dim = self.latent_dim = self.obs_dim = dim
        self.positive_latent = bool(positive_latent)
        self.learnable = bool(learnable)
        self._store("mu", torch.as_tensor(mu, dtype=dtype).expand(dim))
        self._store("atanh_phi", torch.atanh(phi))
        self._store("sigma", torch.as_tensor(sigma, dtype=dtype).expand(dim), positive=True)

    @property
    def phi(self) -> Tensor:
        """Persistence (d,), in (-1, 1)."""
        return torch.tanh(self.atanh_phi)

    @property
    def sigma(self) -> Tensor:
        """Scale of the log-volatility noise (d,)."""
        return self.log_sigma.exp()

    @property
    def latent_name(self) -> str:
        """Prefix of the latent sites: ``"v"`` in the positive-latent form, else ``"h"``."""
        return "v" if self.positive_latent else "h"

    plate_name = "sequences"

    def initial_state(self, batch_size: int, like: Optional[Tensor] = None) -> Tensor:
        """h_0 = mu (or v_0 = exp(mu)), shape (batch_size, d): the carry before step 1
        (:mod:`pyro_avf.transition`)."""
        h0 = self.mu.expand(batch_size, self.dim)
        return h0.exp() if self.positive_latent else h0

    @filtering_step
    def step(self, t: int, prev: Tensor, x_t: Optional[Tensor], mask_t: Optional[Tensor] = None) -> Tensor:
        """One step; ``prev`` is h_{t-1} (or v_{t-1} when ``positive_latent``); returns h_t (or v_t)."""
        h_prev = prev.log() if self.positive_latent else prev
        loc = self.mu + self.phi * (h_prev - self.mu)
        if self.positive_latent:
            state = pyro.sample(f"v_{t}", dist.LogNormal(loc, self.sigma).to_event(1))
            obs_scale = state.sqrt()
        else:
            state = pyro.sample(f"h_{t}", dist.Normal(loc, self.sigma).to_event(1))
            obs_scale = (state / 2).exp()
        with mask_context(mask_t):
            pyro.sample(f"x_{t}", dist.Normal(torch.zeros_like(obs_scale), obs_scale).to_event(1), obs=x_t)
        return state

    def advance(self, t: int, prev: Tensor, x_t: Optional[Tensor], mask_t: Optional[Tensor] = None) -> Tensor:
        """Step t: the marked :meth:`step`; the carry is h_t (or v_t)."""
        return self.step(t, prev, x_t, mask_t)

    def validate(self, xs: object, mask: object = None) -> tuple[Tensor, Optional[Tensor]]:
        """``xs`` (B, T, d) of the parameters' dtype and ``mask`` None or (B, T) bool; raises ValueError."""
        xs = validate_sequences(xs, self.dim, self.mu.dtype)
        return xs, validate_mask(mask, xs.size(0), xs.size(1))

    def model(self, xs: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        """Score ``xs`` (B, T, d); ``mask`` (B, T) bool hides observations where False. Returns the last
        latent state (B, d)."""
        xs, mask = self.validate(xs, mask)
        if self.learnable:
            pyro.module("stochastic_volatility", self)
        return run_steps(self, xs, mask)

    @torch.no_grad()
    def sample(self, num_sequences: int, T: int, seed: int = 0) -> tuple[Tensor, Tensor]:
        """Draw ``(xs, latents)``, both (N, T, d), reproducibly for ``seed``; the latents are h_t, or v_t
        when ``positive_latent``."""
        if num_sequences < 1 or T < 1:
            raise ValueError(f"num_sequences and T must be >= 1, got {num_sequences}, {T}")
        g = torch.Generator().manual_seed(seed)
        mu, phi, sigma = self.mu, self.phi, self.sigma
        h = mu.expand(num_sequences, self.dim)
        xs, hs = [], []
        for _ in range(T):
            h = mu + phi * (h - mu) + sigma * torch.randn(h.shape, generator=g, dtype=h.dtype)
            xs.append((h / 2).exp() * torch.randn(h.shape, generator=g, dtype=h.dtype))
            hs.append(h)
        latents = torch.stack(hs, 1)
        return torch.stack(xs, 1), latents.exp() if self.positive_latent else latents
