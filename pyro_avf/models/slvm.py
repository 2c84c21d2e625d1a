"""A small sequential latent variable model (SLVM) for frames, optionally with a 1-AF likelihood.

Base model for frames ``u_t`` (vectors (D,) or square images (C, H, W)), t = 1..T, ``u_0 = 0``, ``z_0 = 0``::

    d_t = GRU(d_{t-1}, Enc(u_{t-1}))                  deterministic state, computed for all t up front
    z_t ~ N(μ_p, σ_p),  (μ_p, σ_p) = Prior(z_{t-1}, d_t)                  site "z_{t}", (B, z_dim)
    u_t ~ N(Dec_μ(z_t, d_t), exp(Dec_logσ(z_t, d_t)))                     Gaussian output

Without a flow ``u = x`` and the output is the observe site ``x_{t}``. With ``flow`` (an
:class:`~pyro_avf.flows.AffineAutoregressiveFlow`, Marino et al., "Improving sequential latent variable
models with autoregressive flows") the base model runs on ``y_t = (x_t - μ_θ(x_{<t})) / σ_θ(x_{<t})`` and
the observe site ``x_{t}`` has the pushed-forward density (:func:`~pyro_avf.flows.flow_observation`)

.. math::

    \\log p(x_t \\mid x_{<t}, z_{\\le t})
        = \\log p(y_t \\mid y_{<t}, z_{\\le t}) - \\sum_d \\log \\sigma_{\\theta,d}(x_{<t}),

so the model's log joint is the base model's log joint on ``y`` minus :math:`\\sum_{t,d} \\log \\sigma`. There is
one observe site per step either way, and the model trains with ``IterativeGuide(model)`` and
``AmortizedFilteringELBO`` unchanged. Vector frames use MLPs; image frames the DCGAN-like convolutional
encoder/decoder of :mod:`pyro_avf.models.svg` (without skip connections).
"""

from __future__ import annotations

from typing import Optional, Sequence

import pyro
import pyro.distributions as dist
import torch
from torch import Tensor, nn

from pyro_avf.flows import AffineAutoregressiveFlow, flow_observation
from pyro_avf.models._layers import check_sizes, mask_context, mlp, normal_mlp
from pyro_avf.models.lgssm import validate_mask
from pyro_avf.models.svg import LOG_SCALE_BOUND, ConvDecoder, ConvEncoder, GaussianFrame, check_frames
from pyro_avf.step import filtering_step

__all__ = ["SLVM"]


class _VectorOutput(nn.Module):
    """h -> N(μ, σ) over a (D,) frame (``to_event(1)``), log σ soft-clamped to (-7, 7)."""

    def __init__(self, in_dim: int, hidden: int, dim: int) -> None:
        super().__init__()
        self.net = nn.Sequential(mlp([in_dim, hidden], nn.ELU), nn.Linear(hidden, 2 * dim))

    def forward(self, h: Tensor) -> dist.TorchDistribution:
        loc, raw = self.net(h).chunk(2, -1)
        return dist.Normal(loc, (LOG_SCALE_BOUND * torch.tanh(raw / LOG_SCALE_BOUND)).exp()).to_event(1)


class _ImageEncoder(ConvEncoder):
    """:class:`~pyro_avf.models.svg.ConvEncoder` returning the frame encoding only (no skip features)."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x)[0]


class _ImageOutput(nn.Module):
    """h -> ConvDecoder -> N(μ, σ) over a (C, H, W) frame (linear mean: ``y`` is unbounded)."""

    def __init__(self, frame_shape: torch.Size, in_dim: int, nf: int) -> None:
        super().__init__()
        self.decoder = ConvDecoder(frame_shape, in_dim, nf, 2 * frame_shape[0], skips=False)
        self.output = GaussianFrame(sigmoid_mean=False)

    def forward(self, h: Tensor) -> dist.TorchDistribution:
        return self.output(self.decoder(h))


class SLVMGenerative(nn.Module):
    """Frame encoder, GRU, prior p(z_t | z_{t-1}, d_t) and output p(u_t | z_t, d_t) of the base model."""

    def __init__(self, frame_shape: torch.Size, z_dim: int, d_dim: int, e_dim: int, hidden: int, nf: int) -> None:
        super().__init__()
        self.frame_shape = frame_shape
        if len(frame_shape) == 1:
            self.encoder = mlp([frame_shape[0], hidden, e_dim], nn.ELU)
            self.output = _VectorOutput(z_dim + d_dim, hidden, frame_shape[0])
        elif len(frame_shape) == 3:
            self.encoder = _ImageEncoder(frame_shape, e_dim, nf)
            self.output = _ImageOutput(frame_shape, z_dim + d_dim, nf)
        else:
            raise ValueError(f"frame_shape must be (D,) or (C, H, W), got {tuple(frame_shape)}")
        self.rnn = nn.GRU(e_dim, d_dim, batch_first=True)
        self.prior = normal_mlp(z_dim + d_dim, [hidden], z_dim, nn.ELU)

    def deterministic(self, us: Tensor) -> Tensor:
        """d_{1:T} (B, T, d_dim), d_t = GRU(d_{t-1}, Enc(u_{t-1})), u_0 = 0: depends on observations only."""
        batch, steps = us.shape[:2]
        prev = torch.cat([us.new_zeros(batch, 1, *us.shape[2:]), us[:, :-1]], 1)
        e = self.encoder(prev.reshape(batch * steps, *us.shape[2:])).reshape(batch, steps, -1)
        return self.rnn(e)[0]


class SLVM(nn.Module):
    """Sequential latent variable model with a marked step (sites ``z_{t}``, ``x_{t}``), t = 1..T.

    :param frame_shape: ``(D,)`` or ``(C, H, W)`` (square, power-of-two side ≥ 8).
    :param flow: optional :class:`~pyro_avf.flows.AffineAutoregressiveFlow` over the same frames: the
        observation model becomes a 1-AF whose base is this SLVM (registered as ``pyro.module("slvm_flow")``).
    :param z_dim, d_dim, e_dim, hidden, nf: latent size, GRU state, frame encoding, MLP units, conv channels.
    """

    def __init__(
        self,
        frame_shape: Sequence[int],
        z_dim: int = 16,
        d_dim: int = 64,
        e_dim: int = 64,
        hidden: int = 128,
        nf: int = 16,
        flow: Optional[AffineAutoregressiveFlow] = None,
    ) -> None:
        super().__init__()
        check_sizes(z_dim=z_dim, d_dim=d_dim, e_dim=e_dim, hidden=hidden, nf=nf)
        self.frame_shape = torch.Size(frame_shape)
        if flow is not None:
            if not isinstance(flow, AffineAutoregressiveFlow):
                raise TypeError(f"flow must be an AffineAutoregressiveFlow, got {type(flow).__name__}")
            if flow.frame_shape != self.frame_shape:
                raise ValueError(
                    f"flow frame shape {tuple(flow.frame_shape)} differs from the model's {tuple(self.frame_shape)}"
                )
        self.z_dim = z_dim
        self.generative = SLVMGenerative(self.frame_shape, z_dim, d_dim, e_dim, hidden, nf)
        self.flow = flow

    def _check(self, xs: object, mask: object) -> tuple[Tensor, Optional[Tensor]]:
        xs = check_frames(xs, self.frame_shape)
        return xs, validate_mask(mask, xs.size(0), xs.size(1))

    def transform(self, xs: Tensor) -> tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
        """``(u, μ, σ)``: the sequence the base model sees (``y`` with a flow, else ``x``) and the flow's
        per-step shift and scale (None without a flow)."""
        if self.flow is None:
            return xs, None, None
        shift, scale = self.flow.shift_and_scale_all(xs)
        return (xs - shift) / scale, shift, scale

    @filtering_step
    def step(
        self,
        t: int,
        z_prev: Tensor,
        d_t: Tensor,
        x_t: Tensor,
        shift_t: Optional[Tensor] = None,
        scale_t: Optional[Tensor] = None,
        mask_t: Optional[Tensor] = None,
    ) -> Tensor:
        """z_t ~ Prior(z_{t-1}, d_t); x_t ~ p(u_t | z_t, d_t) pushed through the flow (if any). Returns z_t."""
        gen = self.generative
        loc, scale = gen.prior(torch.cat([z_prev, d_t], -1))
        with mask_context(mask_t):
            z = pyro.sample(f"z_{t}", dist.Normal(loc, scale).to_event(1))
            base = gen.output(torch.cat([z, d_t], -1))
            fn = base if shift_t is None else flow_observation(base, shift_t, scale_t)
            pyro.sample(f"x_{t}", fn, obs=x_t)
        return z

    def model(self, xs: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        """Score ``xs`` ``(B, T, *frame_shape)``; ``mask`` (B, T) bool is False on padding. Returns z_T."""
        xs, mask = self._check(xs, mask)
        pyro.module("slvm", self.generative)
        if self.flow is not None:
            pyro.module("slvm_flow", self.flow)
        us, shift, scale = self.transform(xs)
        d = self.generative.deterministic(us)
        z = xs.new_zeros(xs.size(0), self.z_dim)
        with pyro.plate("sequences", xs.size(0)):
            for t in pyro.markov(range(1, xs.size(1) + 1)):
                i = t - 1
                z = self.step(t, z, d[:, i], xs[:, i], None if shift is None else shift[:, i],
                              None if scale is None else scale[:, i], None if mask is None else mask[:, i])  # fmt: skip
        return z
