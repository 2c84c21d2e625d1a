"""Variational recurrent neural network (VRNN; Chung et al., NIPS 2015) as a Pyro program.

Generative model, time indices 1-based, h_0 = c_0 = 0 (LSTM state)::

    z_t ~ N(μ_p, σ_p),  (μ_p, σ_p) = prior(h_{t-1})                   site "z_{t}", (B, z_dim)
    x_t ~ p(x_t | φz(z_t), h_{t-1})  (Bernoulli or Normal)             site "x_{t}", (B, x_dim)
    h_t = LSTM(h_{t-1}, [φx(x_t), φz(z_t)])

φx, φz, prior, emitter and the guide's encoder are ReLU MLPs with ``n_layers`` hidden layers. The marked step
samples z_t and x_t given h_{t-1} and returns (z_t, x_t); the deterministic recurrence h_t runs after it, in
:meth:`VRNN.advance` (the step-model protocol of :mod:`pyro_avf.transition`, carry (h_{t-1}, c_{t-1})), so
:class:`~pyro_avf.online.OnlineFilter` streams the model as it is, and a simulated x_t feeds the recurrence.

Baseline filter (Chung et al.'s encoder, filtering by construction)::

    q(z_t | x_{≤t}, z_{<t}) = N(encoder(φx(x_t), h_{t-1})), the guide running the same recurrence on its z_t.

Masked steps (``mask`` False: padding) contribute nothing: both z_t and x_t are masked, in model and guide.
"""

from __future__ import annotations

from typing import Optional

import pyro
import pyro.distributions as dist
import torch
from torch import Tensor, nn

from pyro_avf.models._layers import check_inputs, check_sizes, mask_context, mlp, normal_mlp, observation_mlp
from pyro_avf.step import filtering_step
from pyro_avf.transition import run_steps

LSTMState = tuple[Tensor, Tensor]


class VRNNGenerative(nn.Module):
    """The VRNN generative networks: feature extractors φx, φz, prior, emitter and the LSTM cell."""

    def __init__(
        self, x_dim: int, h_dim: int, z_dim: int, phi_dim: int, hidden_dim: int, n_layers: int, likelihood: str
    ):
        super().__init__()
        self.phi_x = mlp([x_dim] + [phi_dim] * n_layers)
        self.phi_z = mlp([z_dim] + [phi_dim] * n_layers)
        self.prior = normal_mlp(h_dim, [hidden_dim] * n_layers, z_dim)
        self.emitter = observation_mlp(phi_dim + h_dim, [hidden_dim] * n_layers, x_dim, likelihood)
        self.cell = nn.LSTMCell(2 * phi_dim, h_dim)

    def recur(self, state: LSTMState, phi_x_t: Tensor, phi_z_t: Tensor) -> LSTMState:
        """(h_t, c_t) = LSTM((h_{t-1}, c_{t-1}), [φx(x_t), φz(z_t)])."""
        return self.cell(torch.cat([phi_x_t, phi_z_t], dim=-1), state)


class VRNN(nn.Module):
    """VRNN with a marked filtering step (:meth:`step`) and its original encoder as guide (:meth:`guide`).

    Model parameters live in ``self.generative`` (``pyro.module("vrnn", ...)``), guide parameters (the
    encoder) in ``self.inference`` (``pyro.module("vrnn_guide", ...)``). The music defaults are sized like
    the SRNN music model (the VRNN paper has no music runs); :meth:`speech` follows Chung et al.'s TIMIT model.
    """

    def __init__(
        self,
        x_dim: int = 88,
        h_dim: int = 300,
        z_dim: int = 100,
        phi_dim: int = 300,
        hidden_dim: int = 300,
        n_layers: int = 1,
        likelihood: str = "bernoulli",
    ) -> None:
        super().__init__()
        check_sizes(x_dim=x_dim, h_dim=h_dim, z_dim=z_dim, phi_dim=phi_dim, hidden_dim=hidden_dim, n_layers=n_layers)
        self.x_dim, self.h_dim, self.likelihood = x_dim, h_dim, likelihood
        self.generative = VRNNGenerative(x_dim, h_dim, z_dim, phi_dim, hidden_dim, n_layers, likelihood)
        self.inference = normal_mlp(phi_dim + h_dim, [hidden_dim] * n_layers, z_dim)

    @classmethod
    def music(cls, **overrides) -> VRNN:
        """Polyphonic-music VRNN: 88 Bernoulli keys, the constructor's default sizes."""
        return cls(**{"x_dim": 88, "likelihood": "bernoulli", **overrides})

    @classmethod
    def speech(cls, **overrides) -> VRNN:
        """TIMIT VRNN after Chung et al.: 200-sample frames, Gaussian output, LSTM of 2000 units, z of 200 and
        4-layer ReLU MLPs (600 units for φx, φz; 500 for prior, encoder, emitter)."""
        kwargs = dict(x_dim=200, h_dim=2000, z_dim=200, phi_dim=600, hidden_dim=500, n_layers=4)
        return cls(**{**kwargs, "likelihood": "gaussian", **overrides})

    plate_name = "sequences"

    def initial_state(self, batch_size: int, like: Tensor) -> LSTMState:
        """(h_0, c_0) = (0, 0), each (batch_size, h_dim): the carry before step 1."""
        return like.new_zeros(batch_size, self.h_dim), like.new_zeros(batch_size, self.h_dim)

    @filtering_step
    def step(
        self, t: int, h_prev: Tensor, x_t: Optional[Tensor], mask_t: Optional[Tensor] = None
    ) -> tuple[Tensor, Tensor]:
        """z_t ~ N(prior(h_{t-1})); x_t ~ p(x_t | φz(z_t), h_{t-1}); both masked by ``mask_t``.

        Returns (z_t, x_t): the latent and the observation (drawn when ``x_t`` is None).
        """
        gen = self.generative
        loc, scale = gen.prior(h_prev)
        with mask_context(mask_t):
            z = pyro.sample(f"z_{t}", dist.Normal(loc, scale).to_event(1))
            x = pyro.sample(f"x_{t}", gen.emitter(torch.cat([gen.phi_z(z), h_prev], dim=-1)), obs=x_t)
        return z, x

    def advance(self, t: int, state: LSTMState, x_t: Optional[Tensor], mask_t: Optional[Tensor] = None) -> LSTMState:
        """Step t of :mod:`pyro_avf.transition`: the marked :meth:`step` on h_{t-1}, then
        (h_t, c_t) = LSTM((h_{t-1}, c_{t-1}), [φx(x_t), φz(z_t)]). Returns (h_t, c_t)."""
        z, x = self.step(t, state[0], x_t, mask_t)
        gen = self.generative
        return gen.recur(state, gen.phi_x(x), gen.phi_z(z))

    def validate(self, xs: object, mask: object = None) -> tuple[Tensor, Optional[Tensor]]:
        """``xs`` (B, T, x_dim) (binary for a Bernoulli likelihood), ``mask`` None or (B, T) bool."""
        return check_inputs(xs, mask, self.x_dim, self.likelihood)

    def model(self, xs: Tensor, mask: Optional[Tensor] = None) -> LSTMState:
        """Score ``xs`` (B, T, x_dim); ``mask`` (B, T) bool is False on padding. Returns (h_T, c_T)."""
        xs, mask = self.validate(xs, mask)
        pyro.module("vrnn", self.generative)
        return run_steps(self, xs, mask)

    def guide(self, xs: Tensor, mask: Optional[Tensor] = None) -> LSTMState:
        """VRNN's encoder q(z_t | φx(x_t), h_{t-1}), with h advanced on the guide's own z_t. Returns (h_T, c_T)."""
        xs, mask = check_inputs(xs, mask, self.x_dim, self.likelihood)
        pyro.module("vrnn_guide", self.inference)
        gen = self.generative
        phi_x = gen.phi_x(xs)
        state = self.initial_state(xs.size(0), xs)
        with pyro.plate(self.plate_name, xs.size(0)):
            for t in pyro.markov(range(1, xs.size(1) + 1)):
                loc, scale = self.inference(torch.cat([phi_x[:, t - 1], state[0]], dim=-1))
                with mask_context(None if mask is None else mask[:, t - 1]):
                    z = pyro.sample(f"z_{t}", dist.Normal(loc, scale).to_event(1))
                state = gen.recur(state, phi_x[:, t - 1], gen.phi_z(z))
        return state
