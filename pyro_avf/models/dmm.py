"""Deep Markov model (DMM; Krishnan et al., AAAI 2017) as a Pyro program, after Pyro's ``dmm`` example.

Generative model, time indices 1-based, z_0 a learned vector::

    z_t ~ N(μ, σ),  (μ, σ) = GatedTransition(z_{t-1})                site "z_{t}", (B, z_dim)
    x_t ~ p(x_t | Emitter(z_t))  (Bernoulli or Normal)                site "x_{t}", (B, x_dim)

GatedTransition (Krishnan et al. eq. 5)::

    g = sigmoid(W_g2 relu(W_g1 z + b) + b);   m = W_m2 relu(W_m1 z + b) + b
    μ = (1 - g) ⊙ (W_μ z + b) + g ⊙ m  (W_μ initialised to the identity);   σ = softplus(W_σ relu(m) + b)

Emitter: two ReLU layers, then the observation head (Bernoulli logits or a Normal with learned scale).

Baseline filter (the "ST-L" combiner of Pyro's example with a forward RNN, i.e. filtering)::

    h^rnn_t = RNN_relu(h^rnn_{t-1}, x_t), h^rnn_0 learned;  h = ½ (tanh(W z_{t-1} + b) + h^rnn_t)
    q(z_t | z_{t-1}, x_{≤t}) = N(W_μ h + b, softplus(W_σ h + b)),  z^q_0 learned.

Masked steps (``mask`` False: padding) contribute nothing: both z_t and x_t are masked, in model and guide.

The model follows the step-model protocol of :mod:`pyro_avf.transition` (carry: ``z_{t-1}``, from the learned
``z_0``), so :class:`~pyro_avf.online.OnlineFilter` streams it as it is.
"""

from __future__ import annotations

from typing import Optional

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pyro_avf.models._layers import (
    MIN_SCALE,
    NormalHead,
    check_inputs,
    check_sizes,
    mask_context,
    mlp,
    observation_mlp,
)
from pyro_avf.step import filtering_step
from pyro_avf.transition import run_steps


class GatedTransition(nn.Module):
    """p(z_t | z_{t-1}) = N(μ, σ) with the gated mean of Krishnan et al. (see the module docstring)."""

    def __init__(self, z_dim: int, transition_dim: int) -> None:
        super().__init__()
        self.gate = nn.Sequential(*mlp([z_dim, transition_dim]), nn.Linear(transition_dim, z_dim), nn.Sigmoid())
        self.proposed = nn.Sequential(*mlp([z_dim, transition_dim]), nn.Linear(transition_dim, z_dim))
        self.z_to_loc = nn.Linear(z_dim, z_dim)
        self.scale = nn.Linear(z_dim, z_dim)
        with torch.no_grad():
            self.z_to_loc.weight.copy_(torch.eye(z_dim))
            self.z_to_loc.bias.zero_()

    def forward(self, z_prev: Tensor) -> tuple[Tensor, Tensor]:
        gate, proposed = self.gate(z_prev), self.proposed(z_prev)
        loc = (1 - gate) * self.z_to_loc(z_prev) + gate * proposed
        return loc, F.softplus(self.scale(F.relu(proposed))) + MIN_SCALE


class DMMGenerative(nn.Module):
    """The DMM generative networks: learned z_0, gated transition, emitter."""

    def __init__(self, x_dim: int, z_dim: int, emission_dim: int, transition_dim: int, likelihood: str):
        super().__init__()
        self.z_0 = nn.Parameter(torch.zeros(z_dim))
        self.trans = GatedTransition(z_dim, transition_dim)
        self.emitter = observation_mlp(z_dim, [emission_dim, emission_dim], x_dim, likelihood)


class DMMFilter(nn.Module):
    """The DMM filtering guide's networks: forward ReLU RNN over x, combiner, learned z^q_0 and h^rnn_0."""

    def __init__(self, x_dim: int, z_dim: int, rnn_dim: int) -> None:
        super().__init__()
        self.rnn = nn.RNN(x_dim, rnn_dim, nonlinearity="relu", batch_first=True)
        self.h_0 = nn.Parameter(torch.zeros(1, 1, rnn_dim))
        self.z_q_0 = nn.Parameter(torch.zeros(z_dim))
        self.z_to_hidden = nn.Linear(z_dim, rnn_dim)
        self.head = NormalHead(rnn_dim, z_dim)

    def combine(self, z_prev: Tensor, h_rnn_t: Tensor) -> tuple[Tensor, Tensor]:
        """(loc, scale) of q(z_t) from h = ½ (tanh(W z_{t-1} + b) + h^rnn_t)."""
        return self.head(0.5 * (torch.tanh(self.z_to_hidden(z_prev)) + h_rnn_t))


class DMM(nn.Module):
    """DMM with a marked filtering step (:meth:`step`) and a filtering combiner guide (:meth:`guide`).

    Model parameters live in ``self.generative`` (``pyro.module("dmm", ...)``), guide parameters in
    ``self.inference`` (``pyro.module("dmm_guide", ...)``). Defaults are the sizes of Pyro's example.
    """

    def __init__(
        self,
        x_dim: int = 88,
        z_dim: int = 100,
        emission_dim: int = 100,
        transition_dim: int = 200,
        rnn_dim: int = 600,
        likelihood: str = "bernoulli",
    ) -> None:
        super().__init__()
        check_sizes(x_dim=x_dim, z_dim=z_dim, emission_dim=emission_dim, transition_dim=transition_dim, rnn_dim=rnn_dim)
        self.x_dim, self.likelihood = x_dim, likelihood
        self.generative = DMMGenerative(x_dim, z_dim, emission_dim, transition_dim, likelihood)
        self.inference = DMMFilter(x_dim, z_dim, rnn_dim)

    plate_name = "sequences"

    @filtering_step
    def step(self, t: int, z_prev: Tensor, x_t: Optional[Tensor], mask_t: Optional[Tensor] = None) -> Tensor:
        """z_t ~ N(GatedTransition(z_{t-1})); x_t ~ p(x_t | Emitter(z_t)); both masked by ``mask_t``.

        Returns z_t (B, z_dim).
        """
        loc, scale = self.generative.trans(z_prev)
        with mask_context(mask_t):
            z = pyro.sample(f"z_{t}", dist.Normal(loc, scale).to_event(1))
            pyro.sample(f"x_{t}", self.generative.emitter(z), obs=x_t)
        return z

    def initial_state(self, batch_size: int, like: Optional[Tensor] = None) -> Tensor:
        """The carry before step 1: the learned z_0, (batch_size, z_dim)."""
        return self.generative.z_0.expand(batch_size, -1)

    def advance(self, t: int, z_prev: Tensor, x_t: Optional[Tensor], mask_t: Optional[Tensor] = None) -> Tensor:
        """Step t of :mod:`pyro_avf.transition`: the marked :meth:`step`; the carry is z_t."""
        return self.step(t, z_prev, x_t, mask_t)

    def validate(self, xs: object, mask: object = None) -> tuple[Tensor, Optional[Tensor]]:
        """``xs`` (B, T, x_dim) (binary for a Bernoulli likelihood), ``mask`` None or (B, T) bool."""
        return check_inputs(xs, mask, self.x_dim, self.likelihood)

    def model(self, xs: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        """Score ``xs`` (B, T, x_dim); ``mask`` (B, T) bool is False on padding. Returns z_T (B, z_dim)."""
        xs, mask = self.validate(xs, mask)
        pyro.module("dmm", self.generative)
        return run_steps(self, xs, mask)

    def guide(self, xs: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        """Filtering guide q(z_t | z_{t-1}, x_{≤t}) = N(Combiner(z_{t-1}, h^rnn_t)). Returns z_T (B, z_dim)."""
        xs, mask = check_inputs(xs, mask, self.x_dim, self.likelihood)
        pyro.module("dmm_guide", self.inference)
        inf = self.inference
        h_rnn = inf.rnn(xs, inf.h_0.expand(1, xs.size(0), -1).contiguous())[0]
        z = inf.z_q_0.expand(xs.size(0), -1)
        with pyro.plate("sequences", xs.size(0)):
            for t in pyro.markov(range(1, xs.size(1) + 1)):
                loc, scale = inf.combine(z, h_rnn[:, t - 1])
                with mask_context(None if mask is None else mask[:, t - 1]):
                    z = pyro.sample(f"z_{t}", dist.Normal(loc, scale).to_event(1))
        return z
