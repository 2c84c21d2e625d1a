"""Stochastic video generation with a learned prior (SVG-LP; Denton & Fergus, ICML 2018) as a Pyro program.

Generative model for frames ``x_t`` (C, H, W), t = 1..T, with ``x_0 = 0``::

    h_{t-1}, s_{t-1} = Enc(x_{t-1})                 frame encoding and skip features (observations only)
    (μ_p, σ_p)_t = PriorLSTM(h_{1:t-1})             learned prior, one LSTM step per time step
    z_t ~ N(μ_p, σ_p)                                                      site "z_{t}", (B, z_dim)
    g_t, c_t = PredictorLSTM([h_{t-1}, z_t], c_{t-1})                      frame predictor, carries c_t
    x_t ~ N(Dec_μ(g_t, s_{t-1}), exp(Dec_logvar(g_t, s_{t-1})))           site "x_{t}", (B, C, H, W)

as in the AVF paper's SVG (Marino et al. 2018, App. B.3): a Gaussian output density with a learned
per-pixel log-variance instead of a mean squared error, and no KL down-weighting, so the loss is the free
energy. Encoder and decoder are DCGAN-like: 4x4 stride-2 convolutions halving the frame down to 4x4, a
4x4 convolution to a ``g_dim`` vector (tanh), and the mirror image with skip connections from the encoder
features of the previous frame.

Original filter (the baseline guide, :meth:`SVG.guide`)::

    q(z_t | x_{≤t}) = N(μ_q, σ_q),  (μ_q, σ_q)_t = PosteriorLSTM(Enc(x_1), ..., Enc(x_t))

Masked steps (``mask`` False) contribute nothing.

The model follows the step-model protocol of :mod:`pyro_avf.transition`: :meth:`SVG.advance` encodes x_{t-1},
advances the prior LSTM by one step and calls the marked step; the carry (:class:`SVGCarry`) is x_{t-1} and the
two LSTM states. :meth:`SVG.model` is that loop, so :class:`~pyro_avf.online.OnlineFilter` streams the model as
it is, with memory flat in the number of frames.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional, Sequence

import pyro
import pyro.distributions as dist
import torch
from torch import Tensor, nn

from pyro_avf.models._layers import check_sizes, mask_context, recurrent_step
from pyro_avf.models.lgssm import validate_mask
from pyro_avf.step import filtering_step
from pyro_avf.transition import run_steps

__all__ = ["SVG", "SVGCarry", "ConvDecoder", "ConvEncoder", "GaussianFrame", "check_frames"]

LSTMState = tuple[Tensor, Tensor]

LOG_SCALE_BOUND = 7.0  # output log σ is soft-clamped to (-7, 7): σ ≥ 1e-3, below the 1/256 quantisation step


def check_frames(xs: object, frame_shape: torch.Size, name: str = "xs") -> Tensor:
    """Validate a batch of sequences: a finite float tensor ``(B, T, *frame_shape)``. Raises ValueError."""
    if not torch.is_tensor(xs) or not xs.is_floating_point():
        raise ValueError(f"{name} must be a float tensor, got {type(xs).__name__}")
    if xs.dim() != 2 + len(frame_shape) or xs.shape[2:] != frame_shape:
        raise ValueError(
            f"{name} must have shape (batch, time, {', '.join(map(str, frame_shape))}), got {tuple(xs.shape)}"
        )
    if xs.size(1) < 1:
        raise ValueError(f"{name} has no time steps")
    if not torch.isfinite(xs).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return xs


def _num_halvings(frame_shape: Sequence[int]) -> int:
    """Stride-2 layers that take an (H, W) square power-of-two frame (≥ 8) down to 4x4."""
    if len(frame_shape) != 3 or frame_shape[1] != frame_shape[2]:
        raise ValueError(f"frames must be square images (C, H, W), got {tuple(frame_shape)}")
    size = frame_shape[1]
    if size < 8 or size & (size - 1):
        raise ValueError(f"frame side must be a power of two ≥ 8 (e.g. 32 or 64), got {size}")
    return int(math.log2(size)) - 2


class ConvEncoder(nn.Module):
    """DCGAN-like encoder: x (N, C, H, W) -> (h (N, g_dim) in (-1, 1), skip features [finest, ..., 4x4]).

    Layer k (k = 1..L, L = log2(H) - 2) is a 4x4 stride-2 convolution to ``nf * 2^(k-1)`` channels with a
    leaky ReLU (slope 0.2); a final 4x4 valid convolution maps the 4x4 map to ``g_dim`` (tanh).
    """

    def __init__(self, frame_shape: Sequence[int], g_dim: int, nf: int) -> None:
        super().__init__()
        check_sizes(g_dim=g_dim, nf=nf)
        layers, width = [], frame_shape[0]
        for k in range(_num_halvings(frame_shape)):
            layers.append(nn.Sequential(nn.Conv2d(width, nf * 2**k, 4, 2, 1), nn.LeakyReLU(0.2)))
            width = nf * 2**k
        self.layers = nn.ModuleList(layers)
        self.out = nn.Conv2d(width, g_dim, 4, 1, 0)

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        skips = []
        for layer in self.layers:
            x = layer(x)
            skips.append(x)
        return torch.tanh(self.out(x)).flatten(1), skips


class ConvDecoder(nn.Module):
    """Mirror of :class:`ConvEncoder`: g (N, in_dim) [+ skip features] -> (N, out_channels, H, W).

    A 4x4 transposed convolution makes a 4x4 map, then 4x4 stride-2 transposed convolutions double it
    (leaky ReLU between layers); with ``skips`` each layer also reads the encoder features of the same size.
    The last layer is linear.
    """

    def __init__(self, frame_shape: Sequence[int], in_dim: int, nf: int, out_channels: int, skips: bool) -> None:
        super().__init__()
        check_sizes(in_dim=in_dim, nf=nf, out_channels=out_channels)
        n = _num_halvings(frame_shape)
        widths = [nf * 2**k for k in range(n)]  # encoder widths, finest first
        self.skips = skips
        self.inp = nn.Sequential(nn.ConvTranspose2d(in_dim, widths[-1], 4, 1, 0), nn.LeakyReLU(0.2))
        layers = []
        for k in reversed(range(n)):
            width_in = widths[k] * (2 if skips else 1)
            width_out = widths[k - 1] if k > 0 else out_channels
            conv = nn.ConvTranspose2d(width_in, width_out, 4, 2, 1)
            layers.append(nn.Sequential(conv, nn.LeakyReLU(0.2)) if k > 0 else conv)
        self.layers = nn.ModuleList(layers)

    def forward(self, g: Tensor, skips: Optional[Sequence[Tensor]] = None) -> Tensor:
        if self.skips and skips is None:
            raise ValueError("this decoder was built with skip connections; pass the encoder's skip features")
        x = self.inp(g.reshape(g.size(0), -1, 1, 1))
        for layer, skip in zip(self.layers, reversed(skips) if self.skips else [None] * len(self.layers)):
            x = layer(x if skip is None else torch.cat([x, skip], 1))
        return x


class GaussianFrame(nn.Module):
    """Decoder output (N, 2C, H, W) -> N(μ, σ) over a (C, H, W) frame (``to_event(3)``), with
    ``log σ = 7 tanh(raw / 7)`` (half the learned log-variance, soft-clamped) and μ = ``mean_fn(raw_μ)``."""

    def __init__(self, sigmoid_mean: bool) -> None:
        super().__init__()
        self.sigmoid_mean = sigmoid_mean

    def forward(self, out: Tensor) -> dist.TorchDistribution:
        loc, raw = out.chunk(2, dim=-3)
        if self.sigmoid_mean:
            loc = torch.sigmoid(loc)
        log_scale = LOG_SCALE_BOUND * torch.tanh(raw / LOG_SCALE_BOUND)
        return dist.Normal(loc, log_scale.exp()).to_event(3)


class _GaussianLSTM(nn.Module):
    """u_{1:T} (B, T, in_dim) -> LSTM -> linear -> (μ, σ) each (B, T, z_dim), σ = exp(½ logvar)."""

    def __init__(self, in_dim: int, hidden: int, z_dim: int) -> None:
        super().__init__()
        self.rnn = nn.LSTM(in_dim, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 2 * z_dim)

    def forward(self, u: Tensor) -> tuple[Tensor, Tensor]:
        return self.gaussian(self.rnn(u)[0])

    def gaussian(self, out: Tensor) -> tuple[Tensor, Tensor]:
        """LSTM output -> (μ, σ) with σ = exp(½ clamp(logvar, -20, 10))."""
        loc, logvar = self.head(out).chunk(2, -1)
        return loc, (0.5 * logvar.clamp(-20.0, 10.0)).exp()

    def step(self, u_t: Tensor, state: LSTMState) -> tuple[Tensor, Tensor, LSTMState]:
        """One time step of :meth:`forward`: ``u_t`` (B, in_dim), LSTM ``state`` (h, c) -> (μ_t, σ_t, state)."""
        state = recurrent_step(self.rnn, u_t, state)
        return (*self.gaussian(state[0]), state)


class SVGGenerative(nn.Module):
    """Encoder, decoder, learned prior LSTM and frame-predictor LSTM of SVG-LP."""

    def __init__(self, frame_shape: torch.Size, g_dim: int, z_dim: int, rnn_size: int, nf: int) -> None:
        super().__init__()
        self.encoder = ConvEncoder(frame_shape, g_dim, nf)
        self.decoder = ConvDecoder(frame_shape, g_dim, nf, 2 * frame_shape[0], skips=True)
        self.output = GaussianFrame(sigmoid_mean=True)
        self.prior = _GaussianLSTM(g_dim, rnn_size, z_dim)
        self.embed = nn.Linear(g_dim + z_dim, rnn_size)
        self.predictor = nn.LSTMCell(rnn_size, rnn_size)
        self.predictor_out = nn.Sequential(nn.Linear(rnn_size, g_dim), nn.Tanh())

    def encode_previous(self, xs: Tensor) -> tuple[Tensor, list[Tensor]]:
        """Enc(x_{t-1}) for t = 1..T (x_0 = 0): h (B, T, g_dim) and skips, each (B, T, ...)."""
        batch, steps = xs.shape[:2]
        prev = torch.cat([xs.new_zeros(batch, 1, *xs.shape[2:]), xs[:, :-1]], 1)
        return self.encode(prev)

    def encode(self, xs: Tensor) -> tuple[Tensor, list[Tensor]]:
        """Enc applied to every frame of ``xs`` (B, T, C, H, W)."""
        batch, steps = xs.shape[:2]
        h, skips = self.encoder(xs.reshape(batch * steps, *xs.shape[2:]))
        return h.reshape(batch, steps, -1), [s.reshape(batch, steps, *s.shape[1:]) for s in skips]


class SVGCarry(NamedTuple):
    """What step t needs from step t-1, each (B, ...): the frame x_{t-1}, the prior LSTM's state and the frame
    predictor's state."""

    x: Tensor
    prior: LSTMState
    predictor: LSTMState


class SVG(nn.Module):
    """SVG-LP with a marked filtering step (:meth:`step`) and its original posterior-LSTM filter (:meth:`guide`).

    Model parameters live in ``self.generative`` (``pyro.module("svg", ...)``), the baseline guide's posterior
    LSTM in ``self.posterior`` (``pyro.module("svg_guide", ...)``; it shares the model's frame encoder, as in
    the original). Denton & Fergus used 64x64 frames, g_dim 128, z_dim 10, 256-unit LSTMs and nf 64; the
    defaults here are a CPU-sized 32x32 configuration.

    :param frame_shape: (C, H, W), square with a power-of-two side ≥ 8.
    """

    def __init__(
        self,
        frame_shape: Sequence[int] = (1, 32, 32),
        g_dim: int = 64,
        z_dim: int = 8,
        rnn_size: int = 64,
        nf: int = 16,
    ) -> None:
        super().__init__()
        check_sizes(g_dim=g_dim, z_dim=z_dim, rnn_size=rnn_size, nf=nf)
        self.frame_shape = torch.Size(frame_shape)
        _num_halvings(self.frame_shape)
        self.z_dim, self.rnn_size = z_dim, rnn_size
        self.generative = SVGGenerative(self.frame_shape, g_dim, z_dim, rnn_size, nf)
        self.posterior = _GaussianLSTM(g_dim, rnn_size, z_dim)

    plate_name = "sequences"

    def validate(self, xs: object, mask: object = None) -> tuple[Tensor, Optional[Tensor]]:
        """``xs`` a finite float tensor (B, T, C, H, W), ``mask`` None or (B, T) bool; raises ValueError."""
        xs = check_frames(xs, self.frame_shape)
        return xs, validate_mask(mask, xs.size(0), xs.size(1))

    @filtering_step
    def step(
        self,
        t: int,
        state: LSTMState,
        h_prev: Tensor,
        skips_prev: list[Tensor],
        prior_loc: Tensor,
        prior_scale: Tensor,
        x_t: Optional[Tensor],
        mask_t: Optional[Tensor] = None,
    ) -> tuple[LSTMState, Tensor]:
        """z_t ~ N(μ_p, σ_p); predictor LSTM on [h_{t-1}, z_t]; x_t ~ N(Dec(g_t, skips)).

        Returns ((h, c), x_t): the predictor's state and the frame (drawn when ``x_t`` is None)."""
        gen = self.generative
        with mask_context(mask_t):
            z = pyro.sample(f"z_{t}", dist.Normal(prior_loc, prior_scale).to_event(1))
            state = gen.predictor(gen.embed(torch.cat([h_prev, z], -1)), state)
            out = gen.decoder(gen.predictor_out(state[0]), skips_prev)
            x = pyro.sample(f"x_{t}", gen.output(out), obs=x_t)
        return state, x

    def initial_state(self, batch_size: int, like: Tensor) -> SVGCarry:
        """The carry before step 1: x_0 = 0 and both LSTM states 0."""
        zeros = like.new_zeros(batch_size, self.rnn_size)
        return SVGCarry(like.new_zeros(batch_size, *self.frame_shape), (zeros, zeros), (zeros, zeros))

    def advance(self, t: int, carry: SVGCarry, x_t: Optional[Tensor], mask_t: Optional[Tensor] = None) -> SVGCarry:
        """Step t of :mod:`pyro_avf.transition`: :math:`h_{t-1}, s_{t-1} = \\mathrm{Enc}(x_{t-1})`, one step of
        the prior LSTM, :math:`(\\mu_p, \\sigma_p)_t`, then the marked :meth:`step`."""
        gen = self.generative
        h_prev, skips = gen.encoder(carry.x)
        prior_loc, prior_scale, prior_state = gen.prior.step(h_prev, carry.prior)
        state, x = self.step(t, carry.predictor, h_prev, skips, prior_loc, prior_scale, x_t, mask_t)
        return SVGCarry(x, prior_state, state)

    def model(self, xs: Tensor, mask: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        """Score ``xs`` (B, T, C, H, W) in [0, 1]; ``mask`` (B, T) bool is False on padding. Returns the frame
        predictor's last state (h_T, c_T)."""
        xs, mask = self.validate(xs, mask)
        pyro.module("svg", self.generative)
        return run_steps(self, xs, mask).predictor

    def guide(self, xs: Tensor, mask: Optional[Tensor] = None) -> None:
        """SVG's filter: q(z_t) = N(PosteriorLSTM(Enc(x_{1:t}))), no dependence on z_{<t}."""
        xs, mask = self.validate(xs, mask)
        pyro.module("svg_guide", self.posterior)
        pyro.module("svg", self.generative)
        loc, scale = self.posterior(self.generative.encode(xs)[0])
        with pyro.plate(self.plate_name, xs.size(0)):
            for t in pyro.markov(range(1, xs.size(1) + 1)):
                with mask_context(None if mask is None else mask[:, t - 1]):
                    pyro.sample(f"z_{t}", dist.Normal(loc[:, t - 1], scale[:, t - 1]).to_event(1))
