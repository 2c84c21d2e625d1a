"""Linear-Gaussian state-space model (LG-SSM) as a Pyro program.

Generative process for one sequence of length T (time indices are 1-based, as in the paper)::

    z_0 = 0
    z_t ~ N(A z_{t-1}, diag(q²))      t = 1..T      site "z_{t}", shape (B, d)
    x_t ~ N(C z_t, diag(r²))                        site "x_{t}", shape (B, n)

The model follows the step-model protocol of :mod:`pyro_avf.transition` (carry: ``z_{t-1}``), so
:class:`~pyro_avf.online.OnlineFilter` streams it as it is. The exact filter for this model is
:func:`pyro_avf.baselines.kalman.kalman_filter`. The helpers
:func:`validate_sequences`, :func:`validate_mask`, :func:`stable_matrix` and :class:`ParameterStore`
are shared with the other small reference models in this package.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Optional, Union

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import torch
from torch import Tensor, nn

from pyro_avf.step import filtering_step
from pyro_avf.transition import run_steps

if TYPE_CHECKING:
    from pyro_avf.online import StepStream

ArrayLike = Union[Tensor, float]


def validate_sequences(xs: object, obs_dim: int, dtype: Optional[torch.dtype] = None, name: str = "xs") -> Tensor:
    """Check that ``xs`` is a float tensor of shape (B, T, obs_dim) with B, T >= 1 (and of ``dtype`` when
    given, the dtype of the model's parameters); return it."""
    if not isinstance(xs, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape (B, T, {obs_dim}), got {type(xs).__name__}")
    if not xs.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {xs.dtype}")
    if xs.dim() != 3 or xs.size(-1) != obs_dim:
        raise ValueError(f"{name} must have shape (B, T, {obs_dim}), got {tuple(xs.shape)}")
    if xs.size(0) == 0 or xs.size(1) == 0:
        raise ValueError(f"{name} must hold at least one sequence of at least one step, got {tuple(xs.shape)}")
    if dtype is not None and xs.dtype != dtype:
        raise ValueError(
            f"{name} has dtype {xs.dtype} but the model's parameters are {dtype}; convert one of them "
            "(e.g. model.double() or xs.float())"
        )
    return xs


def validate_mask(mask: object, batch: int, steps: int) -> Optional[Tensor]:
    """Check that ``mask`` is ``None`` or a bool tensor of shape (batch, steps); return it."""
    if mask is None:
        return None
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor of shape ({batch}, {steps}), got {mask!r:.80}")
    if tuple(mask.shape) != (batch, steps):
        raise ValueError(f"mask must have shape ({batch}, {steps}) like xs[..., 0], got {tuple(mask.shape)}")
    return mask


def mask_context(mask_t: Optional[Tensor]):
    """``poutine.mask(mask=mask_t)`` when a mask is given, else a no-op context."""
    return contextlib.nullcontext() if mask_t is None else poutine.mask(mask=mask_t)


def stable_matrix(dim: int, spectral_radius: float, generator: torch.Generator) -> Tensor:
    """Random Gaussian (dim × dim) matrix rescaled so that ``max |eigenvalue| = spectral_radius``."""
    if spectral_radius < 0:
        raise ValueError(f"spectral_radius must be non-negative, got {spectral_radius}")
    m = torch.randn(dim, dim, generator=generator, dtype=torch.float64)
    radius = torch.linalg.eigvals(m).abs().max()
    return (m * (spectral_radius / radius)).float()


def uniform(low: float, high: float, size: int, generator: torch.Generator) -> Tensor:
    """``size`` draws from U(low, high) with ``generator``; checks 0 < low <= high."""
    if not 0.0 < low <= high:
        raise ValueError(f"a noise scale range must satisfy 0 < low <= high, got ({low}, {high})")
    return low + (high - low) * torch.rand(size, generator=generator)


class ParameterStore(nn.Module):
    """Base module that stores a tensor as a learnable parameter or a fixed buffer (``self.learnable``).

    Positive quantities are stored as ``log_<name>`` so that any real value of the learnable
    parameter maps to a valid scale.
    """

    learnable: bool

    def _store(self, name: str, value: ArrayLike, positive: bool = False) -> None:
        value = torch.as_tensor(value, dtype=torch.get_default_dtype()).clone()
        if positive:
            if not bool((value > 0).all()):
                raise ValueError(f"{name} must be strictly positive, got {value}")
            name, value = f"log_{name}", value.log()
        if self.learnable:
            setattr(self, name, nn.Parameter(value))
        else:
            self.register_buffer(name, value)


class LinearGaussianSSM(ParameterStore):
    """LG-SSM with dynamics ``A`` (d×d), emission ``C`` (n×d), diagonal noise scales ``q`` (d), ``r`` (n).

    :param learnable: store the parameters as ``nn.Parameter`` (``A``, ``C``, ``log_q``, ``log_r``) and
        register the module with ``pyro.module`` inside :meth:`model`; otherwise they are fixed buffers.
    """

    def __init__(self, A: Tensor, C: Tensor, q: ArrayLike, r: ArrayLike, learnable: bool = False):
        super().__init__()
        A, C = torch.as_tensor(A), torch.as_tensor(C)
        if A.dim() != 2 or A.size(0) != A.size(1):
            raise ValueError(f"A must be a square (d, d) matrix, got shape {tuple(A.shape)}")
        d = A.size(0)
        if C.dim() != 2 or C.size(1) != d:
            raise ValueError(f"C must have shape (n, {d}) to match A, got {tuple(C.shape)}")
        n = C.size(0)
        q = torch.as_tensor(q, dtype=torch.get_default_dtype()).expand(d)
        r = torch.as_tensor(r, dtype=torch.get_default_dtype()).expand(n)
        self.learnable = bool(learnable)
        self.latent_dim, self.obs_dim = d, n
        self._store("A", A)
        self._store("C", C)
        self._store("q", q, positive=True)
        self._store("r", r, positive=True)

    @classmethod
    def random(
        cls,
        latent_dim: int = 4,
        obs_dim: int = 8,
        seed: int = 0,
        spectral_radius: float = 0.9,
        q_range: tuple[float, float] = (0.3, 0.7),
        r_range: tuple[float, float] = (0.3, 0.7),
        learnable: bool = False,
    ) -> LinearGaussianSSM:
        """A random stable LG-SSM: ``max |eig(A)| = spectral_radius``, C_ij ~ N(0, 1/d), q and r uniform in
        the given ranges. Deterministic for a given ``seed``."""
        if latent_dim < 1 or obs_dim < 1:
            raise ValueError(f"latent_dim and obs_dim must be >= 1, got {latent_dim}, {obs_dim}")
        g = torch.Generator().manual_seed(seed)
        A = stable_matrix(latent_dim, spectral_radius, g)
        C = torch.randn(obs_dim, latent_dim, generator=g) / latent_dim**0.5
        q = uniform(*q_range, latent_dim, g)
        r = uniform(*r_range, obs_dim, g)
        return cls(A, C, q, r, learnable=learnable)

    # ----- accessors -----
    @property
    def q(self) -> Tensor:
        """Process noise scales (d,)."""
        return self.log_q.exp()

    @property
    def r(self) -> Tensor:
        """Observation noise scales (n,)."""
        return self.log_r.exp()

    @property
    def Q(self) -> Tensor:
        """Process noise covariance diag(q²), (d, d)."""
        return torch.diag(self.q**2)

    @property
    def R(self) -> Tensor:
        """Observation noise covariance diag(r²), (n, n)."""
        return torch.diag(self.r**2)

    # ----- Pyro program -----
    plate_name = "sequences"

    @filtering_step
    def step(self, t: int, z_prev: Tensor, x_t: Optional[Tensor], mask_t: Optional[Tensor] = None) -> Tensor:
        """One step: ``z_t ~ N(A z_{t-1}, diag q²)``, ``x_t ~ N(C z_t, diag r²)`` (masked by ``mask_t``)."""
        z = pyro.sample(f"z_{t}", dist.Normal(z_prev @ self.A.T, self.q).to_event(1))
        with mask_context(mask_t):
            pyro.sample(f"x_{t}", dist.Normal(z @ self.C.T, self.r).to_event(1), obs=x_t)
        return z

    def initial_state(self, batch_size: int, like: Tensor) -> Tensor:
        """The carry before step 1: ``z_0 = 0``, (batch_size, d)."""
        return like.new_zeros(batch_size, self.latent_dim)

    def advance(self, t: int, z_prev: Tensor, x_t: Optional[Tensor], mask_t: Optional[Tensor] = None) -> Tensor:
        """Step t of :mod:`pyro_avf.transition`: the marked :meth:`step`; the carry is ``z_t``."""
        return self.step(t, z_prev, x_t, mask_t)

    def validate(self, xs: object, mask: object = None) -> tuple[Tensor, Optional[Tensor]]:
        """``xs`` (B, T, n) of the parameters' dtype and ``mask`` None or (B, T) bool; raises ValueError."""
        xs = validate_sequences(xs, self.obs_dim, self.A.dtype)
        return xs, validate_mask(mask, xs.size(0), xs.size(1))

    def model(self, xs: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        """Score ``xs`` (B, T, n) under the LG-SSM; ``mask`` (B, T) bool hides observations where False.

        Returns the last latent state z_T, shape (B, d).
        """
        xs, mask = self.validate(xs, mask)
        if self.learnable:
            pyro.module("lgssm", self)
        return run_steps(self, xs, mask)

    def stream(self) -> StepStream:
        """This model as a stream for :class:`~pyro_avf.online.OnlineFilter`: a
        :class:`~pyro_avf.online.StepStream` (``OnlineFilter(ssm, guide)`` wraps the model the same way)."""
        from pyro_avf.online import StepStream  # the models do not depend on the filter

        return StepStream(self)

    @torch.no_grad()
    def sample(self, num_sequences: int, T: int, seed: int = 0) -> tuple[Tensor, Tensor]:
        """Draw ``(xs, zs)`` of shapes (N, T, n) and (N, T, d) from the model, reproducibly for ``seed``."""
        if num_sequences < 1 or T < 1:
            raise ValueError(f"num_sequences and T must be >= 1, got {num_sequences}, {T}")
        g = torch.Generator().manual_seed(seed)
        A, C, q, r = self.A, self.C, self.q, self.r
        z = torch.zeros(num_sequences, self.latent_dim, dtype=A.dtype)
        xs, zs = [], []
        for _ in range(T):
            z = z @ A.T + q * torch.randn(z.shape, generator=g, dtype=A.dtype)
            x = z @ C.T + r * torch.randn(num_sequences, self.obs_dim, generator=g, dtype=A.dtype)
            zs.append(z)
            xs.append(x)
        return torch.stack(xs, 1), torch.stack(zs, 1)
