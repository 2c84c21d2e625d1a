r"""Stochastic recurrent neural network (SRNN; Fraccaro et al., NIPS 2016) as a Pyro program.

Generative model, time indices 1-based, x_0 = 0, d_0 = 0, z_0 = 0::

    d_t = LSTM(d_{t-1}, x_{t-1})                      deterministic layer, advanced step by step
    z_t ~ N(μ_p, σ_p),  (μ_p, σ_p) = prior(z_{t-1}, d_t)               site "z_{t}", (B, z_dim)
    x_t ~ p(x_t | z_t, d_t)  (Bernoulli or Normal, see ObservationHead)  site "x_{t}", (B, x_dim)

The LSTM replaces the original GRU, as in the AVF paper (Marino et al. 2018, App. B). Every MLP uses the
clipped leaky ReLU clip(max(x, x/3), -3, 3) of Fraccaro et al.'s code.

Dropout (``SRNN(dropout=p)``, against over-fitting): in training mode the prior and the emitter read
:math:`\tilde d_t = m_t \odot d_t / (1 - p)` with :math:`m_t \sim \mathrm{Bernoulli}(1 - p)` per unit, one mask per
pass drawn where d_{1:T} is computed, so every re-run of a step inside one pass (AVF's inference iterations) sees
the same model; the LSTM's own recurrence keeps the undropped d_t. ``srnn.eval()`` (what
:func:`pyro_avf.evaluation.evaluate` sets while it scores) turns it off. The baseline guide computes its own
d_{1:T} and so draws its own mask: its q then depends on noise independent of the model's, which keeps the
bound valid (it loosens it by the mutual information between z and that noise).

Baseline filter (the filtering form of SRNN's inference network, no backward RNN)::

    a_t = MLP(d_t, x_t)
    q(z_t | z_{t-1}, a_t) = N(μ_p(z_{t-1}, d_t) + Δ(z_{t-1}, a_t), σ_q(z_{t-1}, a_t))   residual mean

Masked steps (``mask`` False: padding) contribute nothing: both z_t and x_t are masked, in model and guide.

The model follows the step-model protocol of :mod:`pyro_avf.transition`: :meth:`SRNN.advance` takes the carry
:class:`SRNNCarry` (z_{t-1}, x_{t-1} and the LSTM state), advances the LSTM by one step and calls the marked
step, so :class:`~pyro_avf.online.OnlineFilter` streams the model with memory flat in the length of the stream.
The batch pass :meth:`SRNN.model` (and the baseline guide) run the LSTM over the whole batch up front, which is
faster, and then the same marked step: the same d_{1:T} and numbers up to floating-point rounding.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from torch import Tensor, nn

from pyro_avf.evaluation import StepTagger
from pyro_avf.models._layers import (
    ClippedLeakyReLU,
    check_inputs,
    check_sizes,
    mask_context,
    mlp,
    normal_mlp,
    observation_mlp,
    recurrent_step,
)
from pyro_avf.online import StepStream
from pyro_avf.step import filtering_step


class SRNNGenerative(nn.Module):
    """The SRNN generative networks: LSTM over x_{t-1}, prior p(z_t | z_{t-1}, d_t), emitter p(x_t | z_t, d_t)."""

    def __init__(self, x_dim: int, d_dim: int, z_dim: int, hidden_dim: int, n_layers: int, likelihood: str,
                 dropout: float = 0.0):  # fmt: skip
        super().__init__()
        hidden = [hidden_dim] * n_layers
        self.rnn = nn.LSTM(x_dim, d_dim, batch_first=True)
        self.dropout = nn.Dropout(dropout)  # on d_t where the prior and the emitter read it (training mode)
        self.prior = normal_mlp(d_dim + z_dim, hidden, z_dim, ClippedLeakyReLU)
        self.emitter = observation_mlp(d_dim + z_dim, hidden, x_dim, likelihood, ClippedLeakyReLU)

    def deterministic(self, xs: Tensor) -> Tensor:
        """d_{1:T} (B, T, d_dim) with d_t = LSTM(d_{t-1}, x_{t-1}), x_0 = 0: depends on observations only
        (with dropout in training mode, see the module docstring)."""
        u = torch.cat([xs.new_zeros(xs.size(0), 1, xs.size(2)), xs[:, :-1]], dim=1)
        return self.dropout(self.rnn(u)[0])

    def recur(self, x_prev: Tensor, state: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        """One step of the same LSTM: (d_t, c_t) = LSTM((d_{t-1}, c_{t-1}), x_{t-1}), each (B, d_dim)."""
        return recurrent_step(self.rnn, x_prev, state)


class SRNNCarry(NamedTuple):
    """What step t needs from step t-1, each (B, ...): z_{t-1}, x_{t-1} and the LSTM state (d_{t-1}, c_{t-1})."""

    z: Tensor
    x: Tensor
    d: Tensor
    c: Tensor


class SRNNFilter(nn.Module):
    """SRNN's filtering inference network: a_t = MLP(d_t, x_t); (Δ, σ_q) = MLP(z_{t-1}, a_t)."""

    def __init__(self, x_dim: int, d_dim: int, z_dim: int, a_dim: int, hidden_dim: int, n_layers: int):
        super().__init__()
        self.a_net = mlp([d_dim + x_dim] + [a_dim] * n_layers, ClippedLeakyReLU)
        self.q_net = normal_mlp(a_dim + z_dim, [hidden_dim] * n_layers, z_dim, ClippedLeakyReLU)


class SRNN(nn.Module):
    """SRNN with a marked filtering step (:meth:`step`) and its original filtering guide (:meth:`guide`).

    Model parameters live in ``self.generative`` (registered as ``pyro.module("srnn", ...)``), guide
    parameters in ``self.inference`` (``pyro.module("srnn_guide", ...)``). Defaults are the music sizes of
    Fraccaro et al.'s code (d 300, z 100, a 300, one 500-unit layer per MLP); see :meth:`music`, :meth:`speech`.
    ``dropout`` is the rate of dropout on :math:`d_t` in training mode (see the module docstring).
    """

    def __init__(
        self,
        x_dim: int = 88,
        d_dim: int = 300,
        z_dim: int = 100,
        a_dim: int = 300,
        hidden_dim: int = 500,
        n_layers: int = 1,
        likelihood: str = "bernoulli",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        check_sizes(x_dim=x_dim, d_dim=d_dim, z_dim=z_dim, a_dim=a_dim, hidden_dim=hidden_dim, n_layers=n_layers)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        self.x_dim, self.z_dim, self.likelihood = x_dim, z_dim, likelihood
        self.generative = SRNNGenerative(x_dim, d_dim, z_dim, hidden_dim, n_layers, likelihood, dropout)
        self.inference = SRNNFilter(x_dim, d_dim, z_dim, a_dim, hidden_dim, n_layers)

    @classmethod
    def music(cls, **overrides) -> SRNN:
        """Polyphonic-music SRNN (Fraccaro et al.'s midi settings): 88 Bernoulli keys."""
        kwargs = dict(x_dim=88, d_dim=300, z_dim=100, a_dim=300, hidden_dim=500, n_layers=1, likelihood="bernoulli")
        return cls(**{**kwargs, **overrides})

    @classmethod
    def speech(cls, **overrides) -> SRNN:
        """TIMIT SRNN (Fraccaro et al.'s settings): 200-sample frames, Gaussian output, 2-layer 512-unit MLPs."""
        kwargs = dict(x_dim=200, d_dim=1024, z_dim=256, a_dim=1024, hidden_dim=512, n_layers=2, likelihood="gaussian")
        return cls(**{**kwargs, **overrides})

    plate_name = "sequences"

    @filtering_step
    def step(
        self, t: int, z_prev: Tensor, d_t: Tensor, x_t: Optional[Tensor], mask_t: Optional[Tensor] = None
    ) -> tuple[Tensor, Tensor]:
        """z_t ~ N(prior(z_{t-1}, d_t)); x_t ~ p(x_t | z_t, d_t); both masked by ``mask_t``.

        Returns (z_t, x_t), each (B, ...): the latent and the observation (drawn when ``x_t`` is None)."""
        loc, scale = self.generative.prior(torch.cat([z_prev, d_t], dim=-1))
        with mask_context(mask_t):
            z = pyro.sample(f"z_{t}", dist.Normal(loc, scale).to_event(1))
            x = pyro.sample(f"x_{t}", self.generative.emitter(torch.cat([z, d_t], dim=-1)), obs=x_t)
        return z, x

    def initial_state(self, batch_size: int, like: Tensor) -> SRNNCarry:
        """The carry before step 1: z_0 = 0, x_0 = 0, d_0 = c_0 = 0."""
        d_dim = self.generative.rnn.hidden_size
        return SRNNCarry(like.new_zeros(batch_size, self.z_dim), like.new_zeros(batch_size, self.x_dim),
                         like.new_zeros(batch_size, d_dim), like.new_zeros(batch_size, d_dim))  # fmt: skip

    def advance(self, t: int, carry: SRNNCarry, x_t: Optional[Tensor], mask_t: Optional[Tensor] = None) -> SRNNCarry:
        """Step t of :mod:`pyro_avf.transition`: :math:`d_t = \\mathrm{LSTM}(d_{t-1}, x_{t-1})`, then the marked
        :meth:`step`; returns (z_t, x_t, d_t, c_t)."""
        d, c = self.generative.recur(carry.x, (carry.d, carry.c))
        z, x = self.step(t, carry.z, self.generative.dropout(d), x_t, mask_t)
        return SRNNCarry(z, x, d, c)

    def validate(self, xs: object, mask: object = None) -> tuple[Tensor, Optional[Tensor]]:
        """``xs`` (B, T, x_dim) (binary for a Bernoulli likelihood), ``mask`` None or (B, T) bool."""
        return check_inputs(xs, mask, self.x_dim, self.likelihood)

    def model(self, xs: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        """Score ``xs`` (B, T, x_dim); ``mask`` (B, T) bool is False on padding. Returns z_T (B, z_dim).

        The batch pass runs the LSTM over the whole batch in one call (:meth:`SRNNGenerative.deterministic`,
        faster than one cell per step) and then the marked :meth:`step` per time step; :meth:`advance`, which
        streams use, computes the same :math:`d_t` one step at a time (equal up to floating-point rounding)."""
        xs, mask = self.validate(xs, mask)
        pyro.module("srnn", self.generative)
        d = self.generative.deterministic(xs)
        z = xs.new_zeros(xs.size(0), self.z_dim)
        with pyro.plate(self.plate_name, xs.size(0)):
            for t in pyro.markov(range(1, xs.size(1) + 1)):
                z, _ = self.step(t, z, d[:, t - 1], xs[:, t - 1], None if mask is None else mask[:, t - 1])
        return z

    def stream(self) -> SRNNStream:
        """This model as a stream for :class:`~pyro_avf.online.OnlineFilter`, with its own filter step by step
        too (what ``OnlineFilter(srnn, guide)`` and :func:`~pyro_avf.online.streamed_free_energy` use)."""
        return SRNNStream(self)

    def guide(self, xs: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        """SRNN's filtering guide q(z_t | z_{t-1}, d_t, x_t) with residual mean μ_p + Δ. Returns z_T."""
        xs, mask = check_inputs(xs, mask, self.x_dim, self.likelihood)
        pyro.module("srnn_guide", self.inference)
        gen, inf = self.generative, self.inference
        d = gen.deterministic(xs)
        a = inf.a_net(torch.cat([d, xs], dim=-1))
        z = xs.new_zeros(xs.size(0), self.z_dim)
        with pyro.plate(self.plate_name, xs.size(0)):
            for t in pyro.markov(range(1, xs.size(1) + 1)):
                z = self.guide_step(t, z, d[:, t - 1], a[:, t - 1], None if mask is None else mask[:, t - 1])
        return z

    def guide_step(self, t: int, z_prev: Tensor, d_t: Tensor, a_t: Tensor, mask_t: Optional[Tensor] = None) -> Tensor:
        """One step of the filtering guide:
        :math:`z_t \\sim \\mathcal{N}(\\mu_p(z_{t-1}, d_t) + \\Delta, \\sigma_q)` with
        :math:`(\\Delta, \\sigma_q) = \\mathrm{MLP}(z_{t-1}, a_t)`. Returns z_t (B, z_dim)."""
        loc_p, _ = self.generative.prior(torch.cat([z_prev, d_t], dim=-1))
        delta, scale = self.inference.q_net(torch.cat([z_prev, a_t], dim=-1))
        with mask_context(mask_t):
            return pyro.sample(f"z_{t}", dist.Normal(loc_p + delta, scale).to_event(1))


class SRNNStream(StepStream):
    """:class:`~pyro_avf.online.StepStream` of an SRNN (``OnlineFilter(srnn, guide)`` makes the same), plus
    SRNN's own filter one step at a time (:meth:`baseline_traces`).

    Example::

        f = OnlineFilter(SRNNStream(srnn), guide)
        f.init(batch_size=1)
        out = f.step(song[t].unsqueeze(0))
    """

    def __init__(self, srnn: SRNN):
        super().__init__(srnn)
        self.srnn = srnn

    def baseline_traces(self, state: dict, x_t: Tensor, mask_t: Optional[Tensor] = None):
        """One step of SRNN's own filter and of the model's :meth:`SRNN.advance` replayed against it (for streamed
        evaluation of the baseline): returns the guide's and the model's trace of step t and the step's
        :class:`~pyro_avf.free_energy.StepContext`, for :func:`pyro_avf.evaluation.score_replayed`. The state
        moves on with the guide's :math:`z_t`."""
        x_t, mask_t = self.check(state, x_t, mask_t)
        srnn, carry, t = self.srnn, state["carry"], state["t"] + 1
        d_t, _ = srnn.generative.recur(carry.x, (carry.d, carry.c))
        a_t = srnn.inference.a_net(torch.cat([d_t, x_t], dim=-1))
        tagger = StepTagger()  # outside the plate, so the step's context includes it
        with tagger, pyro.plate(srnn.plate_name, x_t.size(0)):
            guide_trace = poutine.trace(srnn.guide_step).get_trace(t, carry.z, d_t, a_t, mask_t)
            model_trace = poutine.trace(poutine.replay(srnn.advance, trace=guide_trace)).get_trace(
                t, carry, x_t, mask_t
            )
        state["t"], state["carry"] = t, model_trace.nodes["_RETURN"]["value"]
        return guide_trace, model_trace, tagger.contexts[0]
