"""Small building blocks shared by the deep sequence models (SRNN, VRNN, DMM).

- :func:`mlp`: a stack of linear layers, each followed by a non-linearity;
- :class:`ClippedLeakyReLU`: Fraccaro et al.'s clipped "very leaky" rectifier;
- :class:`NormalHead`: features -> (loc, softplus scale) of a diagonal Normal;
- :class:`ObservationHead`: features -> the observation distribution p(x_t | ...) (Bernoulli or Normal);
- :func:`normal_mlp`, :func:`observation_mlp`: an MLP followed by one of these heads;
- :func:`check_inputs`: validation of the (xs, mask) pair every model and guide receives;
- :func:`recurrent_step`: one time step of a one-layer ``nn.LSTM`` / ``nn.GRU`` with its own weights.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import pyro.distributions as dist
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pyro_avf.models.lgssm import mask_context, validate_mask, validate_sequences

__all__ = [
    "LIKELIHOODS",
    "MIN_SCALE",
    "ClippedLeakyReLU",
    "NormalHead",
    "ObservationHead",
    "check_inputs",
    "check_sizes",
    "mask_context",
    "mlp",
    "normal_mlp",
    "observation_mlp",
    "recurrent_step",
]

LIKELIHOODS = ("bernoulli", "gaussian")
MIN_SCALE = 1e-4  # floor added to every softplus scale so that log densities stay finite


class ClippedLeakyReLU(nn.Module):
    """f(x) = clip(max(x, a·x), -c, c): the "clipped very leaky rectifier" of Fraccaro et al. (2016)
    (a = 1/3, c = 3 in their music and speech runs; the AVF paper's "clipped (±3) leaky ReLU")."""

    def __init__(self, negative_slope: float = 1.0 / 3.0, bound: float = 3.0) -> None:
        super().__init__()
        self.negative_slope, self.bound = negative_slope, bound

    def forward(self, x: Tensor) -> Tensor:
        return F.leaky_relu(x, self.negative_slope).clamp(-self.bound, self.bound)


def mlp(sizes: Sequence[int], activation: Callable[[], nn.Module] = nn.ReLU) -> nn.Sequential:
    """h_k = act(W_k h_{k-1} + b_k) for k = 1..len(sizes)-1, h_0 = input; sizes = [in, hidden_1, ...].

    ``mlp([n])`` is the identity (no hidden layer).
    """
    layers: list[nn.Module] = []
    for n_in, n_out in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(n_in, n_out), activation()]
    return nn.Sequential(*layers)


class NormalHead(nn.Module):
    """h -> (μ, σ) = (W_μ h + b_μ, softplus(W_σ h + b_σ) + MIN_SCALE), the parameters of a diagonal Normal."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.loc = nn.Linear(in_dim, out_dim)
        self.scale = nn.Linear(in_dim, out_dim)

    def forward(self, h: Tensor) -> tuple[Tensor, Tensor]:
        return self.loc(h), F.softplus(self.scale(h)) + MIN_SCALE


def normal_mlp(
    in_dim: int, hidden: Sequence[int], out_dim: int, activation: Callable[[], nn.Module] = nn.ReLU
) -> nn.Sequential:
    """x -> MLP([in_dim, *hidden]) -> :class:`NormalHead`: returns (loc, scale), each (..., out_dim)."""
    return nn.Sequential(mlp([in_dim, *hidden], activation), NormalHead([in_dim, *hidden][-1], out_dim))


def observation_mlp(
    in_dim: int,
    hidden: Sequence[int],
    x_dim: int,
    likelihood: str,
    activation: Callable[[], nn.Module] = nn.ReLU,
) -> nn.Sequential:
    """x -> MLP([in_dim, *hidden]) -> :class:`ObservationHead`: returns the distribution of x_t."""
    return nn.Sequential(mlp([in_dim, *hidden], activation), ObservationHead([in_dim, *hidden][-1], x_dim, likelihood))


class ObservationHead(nn.Module):
    """h -> p(x_t | h), independent over the x_dim features (``to_event(1)``):

    - ``"bernoulli"``: Bernoulli(logits = W h + b) (binary piano rolls);
    - ``"gaussian"``: Normal(W_μ h + b_μ, softplus(W_σ h + b_σ) + MIN_SCALE), a learned per-step scale
      (real-valued speech frames).
    """

    def __init__(self, in_dim: int, x_dim: int, likelihood: str = "bernoulli") -> None:
        super().__init__()
        if likelihood not in LIKELIHOODS:
            raise ValueError(f"likelihood must be one of {LIKELIHOODS}, got {likelihood!r}")
        self.likelihood = likelihood
        self.head = nn.Linear(in_dim, x_dim) if likelihood == "bernoulli" else NormalHead(in_dim, x_dim)

    def forward(self, h: Tensor) -> dist.TorchDistribution:
        if self.likelihood == "bernoulli":
            return dist.Bernoulli(logits=self.head(h)).to_event(1)
        loc, scale = self.head(h)
        return dist.Normal(loc, scale).to_event(1)


def check_sizes(**sizes: int) -> None:
    """Raise ValueError naming the first size that is not a positive int."""
    for name, value in sizes.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")


def check_inputs(xs: object, mask: object, x_dim: int, likelihood: str) -> tuple[Tensor, Optional[Tensor]]:
    """Validate a batch: ``xs`` a float tensor (B, T, x_dim) of finite values (binary for a Bernoulli
    likelihood), ``mask`` None or a bool tensor (B, T). Raises ValueError naming the problem."""
    xs = validate_sequences(xs, x_dim)
    mask = validate_mask(mask, xs.size(0), xs.size(1))
    if not torch.isfinite(xs).all():
        raise ValueError("xs contains NaN or infinite values; replace padding with finite values and mask it")
    if likelihood == "bernoulli" and not ((xs == 0) | (xs == 1)).all():
        raise ValueError("xs must be binary (0/1) for a Bernoulli likelihood; use likelihood='gaussian'")
    return xs, mask


def recurrent_step(
    rnn: Union[nn.LSTM, nn.GRU], x_t: Tensor, state: Union[Tensor, tuple[Tensor, Tensor]]
) -> Union[Tensor, tuple[Tensor, Tensor]]:
    """One step of a one-layer, one-direction ``nn.LSTM`` (state ``(h, c)``) or ``nn.GRU`` (state ``h``), each
    (B, hidden), on ``x_t`` (B, input), with the module's own weights: step t of ``rnn`` run over a whole
    sequence, up to floating-point rounding. Returns the next state (its ``h`` is the output at t)."""
    if rnn.num_layers != 1 or rnn.bidirectional or not rnn.bias or getattr(rnn, "proj_size", 0):
        raise ValueError("recurrent_step needs a one-layer, one-direction RNN with biases and no projection")
    weights = (rnn.weight_ih_l0, rnn.weight_hh_l0, rnn.bias_ih_l0, rnn.bias_hh_l0)
    if isinstance(rnn, nn.LSTM):
        return tuple(torch.lstm_cell(x_t, tuple(state), *weights))
    if isinstance(rnn, nn.GRU):
        return torch.gru_cell(x_t, state, *weights)
    raise TypeError(f"recurrent_step supports nn.LSTM and nn.GRU, got {type(rnn).__name__}")
