"""Affine autoregressive flows across time (Marino, Chen, He & Mandt, "Improving sequential latent
variable models with autoregressive flows").

One flow maps a sequence ``x_{1:T}`` to a less temporally correlated sequence ``y_{1:T}``:

.. math::

    x_t = \\mu_\\theta(x_{t-w:t-1}) + \\sigma_\\theta(x_{t-w:t-1}) \\odot y_t,
    \\qquad y_t = (x_t - \\mu_\\theta) / \\sigma_\\theta,

with a conditioning window of ``w`` past frames (zeros stand in for frames before ``t = 1``). Because
``mu`` and ``sigma`` see only the observed past, ``x -> y`` is computed for all steps at once, while
``y -> x`` (generation) is sequential. The Jacobian ``dy/dx`` is block lower-triangular with diagonal
blocks ``diag(1/sigma_t)``, so

.. math::

    \\log p(x_{1:T}) = \\log p(y_{1:T}) - \\sum_t \\sum_d \\log \\sigma_{t,d}.

Flows stack: in a 2-AF the second flow maps the ``y`` of the first to a new ``y``. Frames are vectors
``(D,)`` (fully-connected networks) or images ``(C, H, W)`` (convolutional networks).
"""

from __future__ import annotations

from collections.abc import Sequence

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from torch import nn

from pyro_avf.step import filtering_step

__all__ = [
    "AffineAutoregressiveFlow",
    "FlowSequenceModel",
    "flow_observation",
    "temporal_correlation",
]


def _soft_clamp(log_scale: torch.Tensor, bound: float) -> torch.Tensor:
    """``bound * tanh(log_scale / bound)``: keeps ``log sigma`` in ``(-bound, bound)``, smooth near 0."""
    return bound * torch.tanh(log_scale / bound)


class AffineAutoregressiveFlow(nn.Module):
    """One affine autoregressive flow across time: ``y_t = (x_t - mu(x_{<t})) / sigma(x_{<t})``.

    :param frame_shape: shape of one frame, ``(D,)`` for vectors or ``(C, H, W)`` for images.
    :param window: number of past frames ``w`` that ``mu`` and ``sigma`` see (zero-padded at the start).
    :param network: ``"fc"`` (an MLP on the flattened window) or ``"conv"`` (a 3x3 convolutional net on
        the window's frames stacked along channels; needs image frames).
    :param hidden: hidden units (fc) or channels (conv).
    :param num_layers: number of hidden layers.
    :param log_scale_bound: ``log sigma`` is soft-clamped to ``(-bound, bound)`` for stable training.
    :param init_identity: zero the output layer so that the flow starts as ``y = x`` (``mu = 0``,
        ``sigma = 1``).
    """

    def __init__(
        self,
        frame_shape: Sequence[int],
        window: int = 1,
        network: str = "fc",
        hidden: int = 64,
        num_layers: int = 2,
        log_scale_bound: float = 5.0,
        init_identity: bool = True,
    ) -> None:
        super().__init__()
        self.frame_shape = torch.Size(frame_shape)
        if window < 1:
            raise ValueError(f"window must be at least 1 past frame, got {window}")
        if num_layers < 1:
            raise ValueError(f"num_layers must be at least 1, got {num_layers}")
        self.window = int(window)
        self.network = network
        self.log_scale_bound = float(log_scale_bound)
        if network == "fc":
            dim = self.frame_shape.numel()
            layers: list[nn.Module] = []
            width = self.window * dim
            for _ in range(num_layers):
                layers += [nn.Linear(width, hidden), nn.ELU()]
                width = hidden
            out = nn.Linear(width, 2 * dim)
        elif network == "conv":
            if len(self.frame_shape) != 3:
                raise ValueError(f"network='conv' needs image frames (C, H, W), got {tuple(frame_shape)}")
            channels = self.frame_shape[0]
            layers = []
            width = self.window * channels
            for _ in range(num_layers):
                layers += [nn.Conv2d(width, hidden, 3, padding=1), nn.ELU()]
                width = hidden
            out = nn.Conv2d(width, 2 * channels, 3, padding=1)
        else:
            raise ValueError(f"network must be 'fc' or 'conv', got {network!r}")
        if init_identity:
            nn.init.zeros_(out.weight)
            nn.init.zeros_(out.bias)
        self.net = nn.Sequential(*layers, out)

    def _check_sequence(self, x: torch.Tensor, name: str) -> None:
        if x.dim() != 2 + len(self.frame_shape) or x.shape[2:] != self.frame_shape:
            raise ValueError(
                f"{name} must have shape (batch, time, {', '.join(map(str, self.frame_shape))}), got {tuple(x.shape)}"
            )

    def shift_and_scale(self, history: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mu, sigma)`` for one step from ``history`` of shape ``(B, window, *frame)``.

        ``history[:, -1]`` is the most recent frame ``x_{t-1}``; pad with zeros for ``t <= window``.
        Returns two tensors of shape ``(B, *frame)``.
        """
        if history.dim() != 2 + len(self.frame_shape) or history.shape[1:] != (
            self.window,
            *self.frame_shape,
        ):
            raise ValueError(
                f"history must have shape (batch, {self.window}, {', '.join(map(str, self.frame_shape))}), "
                f"got {tuple(history.shape)}"
            )
        batch = history.shape[0]
        if self.network == "fc":
            out = self.net(history.reshape(batch, -1))
        else:
            out = self.net(history.reshape(batch, -1, *self.frame_shape[1:]))
        out = out.reshape(batch, 2, *self.frame_shape)
        mu, log_scale = out[:, 0], out[:, 1]
        return mu, _soft_clamp(log_scale, self.log_scale_bound).exp()

    def histories(self, x: torch.Tensor) -> torch.Tensor:
        """All conditioning windows of a sequence: ``(B, T, window, *frame)``, zero-padded at the start.

        Entry ``[:, t, k]`` is ``x_{t - window + k}`` (``x`` with zeros before the first frame).
        """
        pad = x.new_zeros(x.shape[0], self.window, *x.shape[2:])
        padded = torch.cat([pad, x[:, :-1]], dim=1)  # frame t of padded[:, window:] is x_{t-1}
        steps = x.shape[1]
        return torch.stack([padded[:, k : k + steps] for k in range(self.window)], dim=2)

    def shift_and_scale_all(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mu_t, sigma_t)`` for every step of an observed sequence ``x`` ``(B, T, *frame)``, in parallel."""
        self._check_sequence(x, "x")
        batch, steps = x.shape[:2]
        hist = self.histories(x).reshape(batch * steps, self.window, *self.frame_shape)
        mu, sigma = self.shift_and_scale(hist)
        return mu.reshape(x.shape), sigma.reshape(x.shape)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Map data to noise: ``y = (x - mu) / sigma``.

        Returns ``y`` (same shape as ``x``) and ``log|det dy/dx| = -sum_{t,d} log sigma_{t,d}`` of shape
        ``(B,)``, so that ``log p(x) = log p(y) + log_abs_det``.
        """
        mu, sigma = self.shift_and_scale_all(x)
        y = (x - mu) / sigma
        log_abs_det = -sigma.log().reshape(x.shape[0], -1).sum(-1)
        return y, log_abs_det

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        """Map noise to data sequentially: ``x_t = mu(x_{<t}) + sigma(x_{<t}) * y_t``."""
        self._check_sequence(y, "y")
        batch, steps = y.shape[:2]
        history = y.new_zeros(batch, self.window, *self.frame_shape)
        frames = []
        for t in range(steps):
            mu, sigma = self.shift_and_scale(history)
            x_t = mu + sigma * y[:, t]
            frames.append(x_t)
            history = torch.cat([history[:, 1:], x_t.unsqueeze(1)], dim=1)
        return torch.stack(frames, dim=1)


def flow_observation(
    base_dist: dist.TorchDistribution, shift: torch.Tensor, scale: torch.Tensor
) -> dist.TransformedDistribution:
    """Distribution of ``x_t = shift + scale * y_t`` with ``y_t ~ base_dist``.

    This is the conditional likelihood of a sequential latent variable model under a 1-AF: ``base_dist``
    is ``p(y_t | y_{<t}, z_{<=t})`` and ``shift``, ``scale`` are ``mu_theta(x_{<t})``,
    ``sigma_theta(x_{<t})`` from the observed history. Its log density is

    .. math:: \\log p(x_t) = \\log p_{base}((x_t - \\mu) / \\sigma) - \\sum_d \\log \\sigma_d,

    summed over the base distribution's event dimensions, so one observe site per step carries the
    ``-log|det dx_t/dy_t|`` term of the flow ELBO.
    """
    if not torch.is_tensor(shift) or not torch.is_tensor(scale):
        raise TypeError("shift and scale must be tensors")
    event_dim = len(base_dist.event_shape)
    if event_dim and (
        shift.shape[shift.dim() - event_dim :] != base_dist.event_shape
        or scale.shape[scale.dim() - event_dim :] != base_dist.event_shape
    ):
        raise ValueError(
            f"shift {tuple(shift.shape)} and scale {tuple(scale.shape)} must end with the base "
            f"distribution's event shape {tuple(base_dist.event_shape)}"
        )
    transform = dist.transforms.AffineTransform(shift, scale, event_dim=event_dim)
    return dist.TransformedDistribution(base_dist, [transform])


def compose_affine(shifts: Sequence[torch.Tensor], scales: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold a stack of per-step affine maps into one.

    With ``x = s_1 + c_1 (s_2 + c_2 (... + c_K y))`` for flows ``1..K`` (flow 1 nearest the data),
    returns ``(s, c)`` with ``x = s + c y``.
    """
    shift, scale = shifts[-1], scales[-1]
    for s, c in zip(reversed(shifts[:-1]), reversed(scales[:-1])):
        shift, scale = s + c * shift, c * scale
    return shift, scale


class FlowSequenceModel(nn.Module):
    """A standalone sequence model: a stack of affine autoregressive flows on an i.i.d. base.

    ``y_t ~ N(loc, diag(scale^2))`` independently over time (``loc = 0, scale = 1`` for
    ``base="standard"``, learned per dimension for ``base="learned"``), and ``x = f_1(f_2(...f_K(y)))``.
    The exact log-likelihood is

    .. math:: \\log p(x) = \\log p(y^{(K)}) - \\sum_{k=1}^{K} \\sum_{t,d} \\log \\sigma^{(k)}_{t,d}.

    :param flow_kwargs: passed to each :class:`AffineAutoregressiveFlow`.
    """

    def __init__(self, frame_shape: Sequence[int], num_flows: int = 1, base: str = "standard", **flow_kwargs) -> None:
        super().__init__()
        if num_flows < 1:
            raise ValueError(f"num_flows must be at least 1, got {num_flows}")
        if base not in ("standard", "learned"):
            raise ValueError(f"base must be 'standard' or 'learned', got {base!r}")
        self.frame_shape = torch.Size(frame_shape)
        self.flows = nn.ModuleList(AffineAutoregressiveFlow(frame_shape, **flow_kwargs) for _ in range(num_flows))
        self.base = base
        if base == "learned":
            self.base_loc = nn.Parameter(torch.zeros(self.frame_shape))
            self.base_log_scale = nn.Parameter(torch.zeros(self.frame_shape))
        else:
            self.register_buffer("base_loc", torch.zeros(self.frame_shape))
            self.register_buffer("base_log_scale", torch.zeros(self.frame_shape))

    def base_distribution(self) -> dist.TorchDistribution:
        """The per-frame base distribution ``p(y_t)`` with event shape ``frame_shape``."""
        return dist.Normal(self.base_loc, self.base_log_scale.exp()).to_event(len(self.frame_shape))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Map data through all flows: returns the last ``y`` and ``log|det dy/dx|`` of shape ``(B,)``."""
        log_abs_det = x.new_zeros(x.shape[0])
        y = x
        for flow in self.flows:
            y, ld = flow(y)
            log_abs_det = log_abs_det + ld
        return y, log_abs_det

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        """Map base noise to data, last flow first."""
        x = y
        for flow in reversed(self.flows):
            x = flow.inverse(x)
        return x

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """Exact ``log p(x_{1:T})`` in nats per sequence, shape ``(B,)``."""
        y, log_abs_det = self(x)
        return self.base_distribution().log_prob(y).sum(-1) + log_abs_det

    @torch.no_grad()
    def sample(self, num: int, steps: int) -> torch.Tensor:
        """Draw ``num`` sequences of ``steps`` frames: ``(num, steps, *frame)``."""
        y = self.base_distribution().sample((num, steps))
        return self.inverse(y)

    def step_shift_and_scale(self, xs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-step composite affine map of the whole stack given observed ``xs``: ``x_t = s_t + c_t y_t``.

        Flow ``k`` conditions on the observed sequence mapped through flows ``1..k-1``, which depends on
        ``x_{<t}`` only, so ``p(x_t | x_{<t})`` is the base pushed through one affine map.
        """
        shifts, scales = [], []
        h = xs
        for flow in self.flows:
            mu, sigma = flow.shift_and_scale_all(h)
            shifts.append(mu)
            scales.append(sigma)
            h = (h - mu) / sigma
        return compose_affine(shifts, scales)

    @filtering_step
    def step(self, t: int, base: dist.TorchDistribution, shift_t: torch.Tensor, scale_t: torch.Tensor,
             x_t: torch.Tensor, mask_t: torch.Tensor | None = None) -> None:
        """Frame t: the observe site ``x_{t}``, the base pushed through the stack's affine map (masked by
        ``mask_t``). A marked step (:func:`~pyro_avf.filtering_step`) without latent sites, so that
        :func:`~pyro_avf.evaluation.evaluate` scores the exact :math:`-\\log p(x_t \\mid x_{<t})` per step."""
        with poutine.mask(mask=True if mask_t is None else mask_t.bool()):
            pyro.sample(f"x_{t}", flow_observation(base, shift_t, scale_t), obs=x_t)

    def model(self, xs: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """The flow model as a Pyro program: one observe site ``x_{t}`` per step (:meth:`step`), no latent sites.

        Trains with ``SVI(model, guide=lambda *a, **k: None, ..., Trace_ELBO())`` or with
        ``Trainer(flow, inference="baseline")`` (:meth:`guide`); the ELBO is then the exact log-likelihood.
        ``mask`` (B, T) switches off padded steps.
        """
        pyro.module("flow_sequence_model", self)
        shift, scale = self.step_shift_and_scale(xs)
        batch, steps = xs.shape[:2]
        base = self.base_distribution().expand((batch,))
        with pyro.plate("sequences", batch):
            for t in range(steps):
                self.step(t, base, shift[:, t], scale[:, t], xs[:, t], None if mask is None else mask[:, t])

    def guide(self, xs: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """The exact "filter" of a model without latent variables: it samples nothing."""


def temporal_correlation(seq: torch.Tensor, eps: float = 1e-8, per_dim: bool = False) -> torch.Tensor:
    """Average correlation between adjacent frames.

    For a batch of sequences ``seq`` of shape ``(N, T, *frame)`` (or one sequence ``(T, *frame)``), each
    dimension ``d`` (pixel or vector entry) gets the Pearson correlation of the pairs
    ``(s[n, t, d], s[n, t+1, d])`` pooled over all sequences ``n`` and steps ``t = 1..T-1``:

    .. math::

        \\rho_d = \\frac{\\sum_{n,t} (a_{ntd} - \\bar a_d)(b_{ntd} - \\bar b_d)}
                       {\\sqrt{\\sum_{n,t} (a_{ntd} - \\bar a_d)^2 \\sum_{n,t} (b_{ntd} - \\bar b_d)^2}},
        \\quad a_{ntd} = s_{n,t,d},\\; b_{ntd} = s_{n,t+1,d}.

    The result is the mean of ``rho_d`` over dimensions where both variances exceed ``eps`` (pixels that
    never change, such as an always-black corner, carry no correlation and are left out). With
    ``per_dim=True`` the map ``rho`` (shape ``frame``, NaN where left out) is returned instead.
    """
    if seq.dim() < 2:
        raise ValueError(f"seq must have shape (N, T, *frame) or (T, *frame), got {tuple(seq.shape)}")
    if seq.dim() == 2:
        seq = seq.unsqueeze(0)
    if seq.shape[1] < 2:
        raise ValueError(f"need at least 2 time steps to correlate adjacent frames, got {seq.shape[1]}")
    seq = seq.double()
    frame = seq.shape[2:]
    a = seq[:, :-1].reshape(-1, *frame)
    b = seq[:, 1:].reshape(-1, *frame)
    a = a - a.mean(0)
    b = b - b.mean(0)
    var_a, var_b = (a * a).mean(0), (b * b).mean(0)
    valid = (var_a > eps) & (var_b > eps)
    rho = (a * b).mean(0) / (var_a * var_b).clamp_min(eps * eps).sqrt()
    rho = torch.where(valid, rho, torch.full_like(rho, float("nan")))
    if per_dim:
        return rho
    if not valid.any():
        raise ValueError("every dimension is constant over time: temporal correlation is undefined")
    return rho[valid].mean()
