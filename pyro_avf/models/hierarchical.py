"""Two-level linear-Gaussian state-space model: two latent sites per step, of different sizes.

With z1_0 = 0, for t = 1..T::

    z1_t ~ N(A z1_{t-1}, diag(q1²))     site "z1_{t}", shape (B, d1)
    z2_t ~ N(B z1_t, diag(q2²))         site "z2_{t}", shape (B, d2)
    x_t  ~ N(C z2_t, diag(r²))          site "x_{t}",  shape (B, n)

It tests a guide's handling of several latent slots per step, where the second depends on the first.
(Marginally it is an LG-SSM in (z1, z2), so its evidence is exact with a Kalman filter.)
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
    stable_matrix,
    uniform,
    validate_mask,
    validate_sequences,
)
from pyro_avf.step import filtering_step
from pyro_avf.transition import run_steps


class TwoLevelSSM(ParameterStore):
    """Two-level LG-SSM with ``A`` (d1×d1), ``B`` (d2×d1), ``C`` (n×d2) and diagonal noise scales ``q1``
    (d1), ``q2`` (d2), ``r`` (n). When ``learnable`` the scales are stored as ``log_q1`` etc."""

    def __init__(
        self,
        A: Tensor,
        B: Tensor,
        C: Tensor,
        q1: ArrayLike,
        q2: ArrayLike,
        r: ArrayLike,
        learnable: bool = False,
    ):
        super().__init__()
        A, B, C = torch.as_tensor(A), torch.as_tensor(B), torch.as_tensor(C)
        if A.dim() != 2 or A.size(0) != A.size(1):
            raise ValueError(f"A must be a square (d1, d1) matrix, got shape {tuple(A.shape)}")
        d1 = A.size(0)
        if B.dim() != 2 or B.size(1) != d1:
            raise ValueError(f"B must have shape (d2, {d1}) to match A, got {tuple(B.shape)}")
        d2 = B.size(0)
        if C.dim() != 2 or C.size(1) != d2:
            raise ValueError(f"C must have shape (n, {d2}) to match B, got {tuple(C.shape)}")
        n = C.size(0)
        dtype = torch.get_default_dtype()
        self.learnable = bool(learnable)
        self.z1_dim, self.z2_dim, self.obs_dim = d1, d2, n
        self._store("A", A)
        self._store("B", B)
        self._store("C", C)
        self._store("q1", torch.as_tensor(q1, dtype=dtype).expand(d1), positive=True)
        self._store("q2", torch.as_tensor(q2, dtype=dtype).expand(d2), positive=True)
        self._store("r", torch.as_tensor(r, dtype=dtype).expand(n), positive=True)

    @classmethod
    def random(
        cls,
        z1_dim: int = 2,
        z2_dim: int = 3,
        obs_dim: int = 4,
        seed: int = 0,
        spectral_radius: float = 0.9,
        scale_range: tuple[float, float] = (0.3, 0.7),
        learnable: bool = False,
    ) -> TwoLevelSSM:
        """Random stable model: ``max |eig(A)| = spectral_radius``, B_ij ~ N(0, 1/d1), C_ij ~ N(0, 1/d2),
        all noise scales uniform in ``scale_range``. Deterministic for a given ``seed``."""
        if min(z1_dim, z2_dim, obs_dim) < 1:
            raise ValueError(f"all dimensions must be >= 1, got {z1_dim}, {z2_dim}, {obs_dim}")
        g = torch.Generator().manual_seed(seed)
        A = stable_matrix(z1_dim, spectral_radius, g)
        B = torch.randn(z2_dim, z1_dim, generator=g) / z1_dim**0.5
        C = torch.randn(obs_dim, z2_dim, generator=g) / z2_dim**0.5
        q1, q2, r = (uniform(*scale_range, size, g) for size in (z1_dim, z2_dim, obs_dim))
        return cls(A, B, C, q1, q2, r, learnable=learnable)

    @property
    def q1(self) -> Tensor:
        """Scales of z1's process noise (d1,)."""
        return self.log_q1.exp()

    @property
    def q2(self) -> Tensor:
        """Scales of z2's noise given z1 (d2,)."""
        return self.log_q2.exp()

    @property
    def r(self) -> Tensor:
        """Observation noise scales (n,)."""
        return self.log_r.exp()

    plate_name = "sequences"

    @filtering_step
    def step(self, t: int, z1_prev: Tensor, x_t: Optional[Tensor], mask_t: Optional[Tensor] = None) -> Tensor:
        """One step: samples z1_t then z2_t, observes x_t (masked by ``mask_t``); returns z1_t."""
        z1 = pyro.sample(f"z1_{t}", dist.Normal(z1_prev @ self.A.T, self.q1).to_event(1))
        z2 = pyro.sample(f"z2_{t}", dist.Normal(z1 @ self.B.T, self.q2).to_event(1))
        with mask_context(mask_t):
            pyro.sample(f"x_{t}", dist.Normal(z2 @ self.C.T, self.r).to_event(1), obs=x_t)
        return z1

    def initial_state(self, batch_size: int, like: Tensor) -> Tensor:
        """The carry before step 1 (:mod:`pyro_avf.transition`): ``z1_0 = 0``, (batch_size, d1)."""
        return like.new_zeros(batch_size, self.z1_dim)

    def advance(self, t: int, z1_prev: Tensor, x_t: Optional[Tensor], mask_t: Optional[Tensor] = None) -> Tensor:
        """Step t: the marked :meth:`step`; the carry is ``z1_t``."""
        return self.step(t, z1_prev, x_t, mask_t)

    def validate(self, xs: object, mask: object = None) -> tuple[Tensor, Optional[Tensor]]:
        """``xs`` (B, T, n) of the parameters' dtype and ``mask`` None or (B, T) bool; raises ValueError."""
        xs = validate_sequences(xs, self.obs_dim, self.A.dtype)
        return xs, validate_mask(mask, xs.size(0), xs.size(1))

    def model(self, xs: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        """Score ``xs`` (B, T, n); ``mask`` (B, T) bool hides observations where False. Returns z1_T."""
        xs, mask = self.validate(xs, mask)
        if self.learnable:
            pyro.module("two_level_ssm", self)
        return run_steps(self, xs, mask)

    @torch.no_grad()
    def sample(self, num_sequences: int, T: int, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
        """Draw ``(xs, z1s, z2s)`` of shapes (N, T, n), (N, T, d1), (N, T, d2), reproducibly for ``seed``."""
        if num_sequences < 1 or T < 1:
            raise ValueError(f"num_sequences and T must be >= 1, got {num_sequences}, {T}")
        g = torch.Generator().manual_seed(seed)
        A, B, C = self.A, self.B, self.C
        dtype = A.dtype
        z1 = torch.zeros(num_sequences, self.z1_dim, dtype=dtype)
        xs, z1s, z2s = [], [], []
        for _ in range(T):
            z1 = z1 @ A.T + self.q1 * torch.randn(z1.shape, generator=g, dtype=dtype)
            z2 = z1 @ B.T + self.q2 * torch.randn(num_sequences, self.z2_dim, generator=g, dtype=dtype)
            x = z2 @ C.T + self.r * torch.randn(num_sequences, self.obs_dim, generator=g, dtype=dtype)
            z1s.append(z1)
            z2s.append(z2)
            xs.append(x)
        return torch.stack(xs, 1), torch.stack(z1s, 1), torch.stack(z2s, 1)
