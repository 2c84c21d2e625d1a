"""A small sequential latent variable model (SLVM) for frames, optionally with a 1-AF likelihood.

Base model for frames ``u_t`` (vectors (D,) or square images (C, H, W)), t = 1..T, ``u_0 = 0``, ``z_0 = 0``::

    d_t = GRU(d_{t-1}, Enc(u_{t-1}))                  deterministic state, one GRU step per time step
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

The model follows the step-model protocol of :mod:`pyro_avf.transition`: :meth:`SLVM.advance` computes the
flow's :math:`(\\mu_\\theta, \\sigma_\\theta)` from the last ``window`` frames, advances the GRU by one step and
calls the marked step; the carry (:class:`SLVMCarry`) is z_{t-1}, d_{t-1}, u_{t-1} and the frame window.
:meth:`SLVM.model` is that loop, so :class:`~pyro_avf.online.OnlineFilter` streams the model as it is.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import pyro
import pyro.distributions as dist
import torch
from torch import Tensor, nn

from pyro_avf.flows import AffineAutoregressiveFlow, flow_observation
from pyro_avf.models._layers import check_sizes, mask_context, mlp, normal_mlp, recurrent_step
from pyro_avf.models.lgssm import validate_mask
from pyro_avf.models.svg import LOG_SCALE_BOUND, ConvDecoder, ConvEncoder, GaussianFrame, check_frames
from pyro_avf.step import filtering_step
from pyro_avf.transition import run_steps

__all__ = ["SLVM", "SLVMCarry"]


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


class SLVMCarry(NamedTuple):
    """What step t needs from step t-1, each (B, ...): z_{t-1}, the GRU state d_{t-1}, the base model's frame
    u_{t-1} (``y`` with a flow, else ``x``) and, with a flow, its window x_{t-w:t-1} (B, w, ...) (else None)."""

    z: Tensor
    d: Tensor
    u: Tensor
    window: Optional[Tensor]


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

    plate_name = "sequences"

    def validate(self, xs: object, mask: object = None) -> tuple[Tensor, Optional[Tensor]]:
        """``xs`` a finite float tensor ``(B, T, *frame_shape)``, ``mask`` None or (B, T) bool; raises ValueError."""
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
        x_t: Optional[Tensor],
        shift_t: Optional[Tensor] = None,
        scale_t: Optional[Tensor] = None,
        mask_t: Optional[Tensor] = None,
    ) -> tuple[Tensor, Tensor]:
        """z_t ~ Prior(z_{t-1}, d_t); x_t ~ p(u_t | z_t, d_t) pushed through the flow (if any).

        Returns (z_t, x_t): the latent and the frame (drawn when ``x_t`` is None)."""
        gen = self.generative
        loc, scale = gen.prior(torch.cat([z_prev, d_t], -1))
        with mask_context(mask_t):
            z = pyro.sample(f"z_{t}", dist.Normal(loc, scale).to_event(1))
            base = gen.output(torch.cat([z, d_t], -1))
            fn = base if shift_t is None else flow_observation(base, shift_t, scale_t)
            x = pyro.sample(f"x_{t}", fn, obs=x_t)
        return z, x

    def initial_state(self, batch_size: int, like: Tensor) -> SLVMCarry:
        """The carry before step 1: z_0 = 0, d_0 = 0, u_0 = 0 and (with a flow) an all-zero window."""
        frame = like.new_zeros(batch_size, *self.frame_shape)
        window = None if self.flow is None else like.new_zeros(batch_size, self.flow.window, *self.frame_shape)
        d_dim = self.generative.rnn.hidden_size
        return SLVMCarry(like.new_zeros(batch_size, self.z_dim), like.new_zeros(batch_size, d_dim), frame, window)

    def advance(self, t: int, carry: SLVMCarry, x_t: Optional[Tensor], mask_t: Optional[Tensor] = None) -> SLVMCarry:
        """Step t of :mod:`pyro_avf.transition`: :math:`(\\mu_t, \\sigma_t) = \\mathrm{flow}(x_{t-w:t-1})`,
        :math:`d_t = \\mathrm{GRU}(d_{t-1}, \\mathrm{Enc}(u_{t-1}))`, the marked :meth:`step`, then
        :math:`u_t = (x_t - \\mu_t) / \\sigma_t` (:math:`u_t = x_t` without a flow)."""
        gen = self.generative
        d = recurrent_step(gen.rnn, gen.encoder(carry.u), carry.d)
        if self.flow is None:
            z, x = self.step(t, carry.z, d, x_t, None, None, mask_t)
            return SLVMCarry(z, d, x, None)
        shift, scale = self.flow.shift_and_scale(carry.window)
        z, x = self.step(t, carry.z, d, x_t, shift, scale, mask_t)
        return SLVMCarry(z, d, (x - shift) / scale, torch.cat([carry.window[:, 1:], x.unsqueeze(1)], 1))

    def model(self, xs: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        """Score ``xs`` ``(B, T, *frame_shape)``; ``mask`` (B, T) bool is False on padding. Returns z_T."""
        xs, mask = self.validate(xs, mask)
        pyro.module("slvm", self.generative)
        if self.flow is not None:
            pyro.module("slvm_flow", self.flow)
        return run_steps(self, xs, mask).z
