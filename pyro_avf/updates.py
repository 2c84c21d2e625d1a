"""Inference updates λ ← f(λ, ∇λ F): learned (amortized) networks and plain optimisers.

The approximate posterior of one latent slot has parameters :math:`\\lambda = (\\mu, \\log\\sigma)`, each
shaped ``batch + (D,)``. An update maps the current estimate and the free-energy signal to a new estimate.

* :class:`UpdateNetwork` — iterative amortized inference (Marino et al., 2018; AVF Eq. 13). Each input term
  is normalised separately (layer normalisation over the D features, plus its log-RMS so that scale is not
  lost), passed through a two-layer highway MLP with ELU units, and turned into

  - ``"highway"`` (gated output):
    :math:`\\lambda \\leftarrow g \\odot \\lambda + (1 - g) \\odot \\Delta`;
  - ``"residual"`` (gated residual, zero-initialised so that an untrained network keeps the prior):
    :math:`\\lambda \\leftarrow \\lambda + (1 - g) \\odot \\Delta`;
  - ``"learned_sgd"``: :math:`\\lambda \\leftarrow \\lambda - \\eta \\odot \\nabla_\\lambda F + \\Delta`,
    with a learned positive per-dimension step :math:`\\eta`.

  *Gradient encoding* feeds :math:`(\\mu, \\log\\sigma, \\nabla_\\mu F, \\nabla_{\\log\\sigma} F)`;
  *error encoding* (Gaussian models) feeds :math:`(\\mu, \\log\\sigma, \\varepsilon_z, \\varepsilon_x)` with
  :math:`\\varepsilon_z = (z - \\mu_z)/\\sigma_z` the latent's prediction error under its prior and
  :math:`\\varepsilon_x = (x - \\mu_x(z))/\\sigma_x` the observation's. The observation itself may be added.
  All inputs are detached: no second-order gradients.
* :class:`SGDUpdate`, :class:`AdamUpdate` — non-amortized variational filtering EM (AVF Algorithm 1): a few
  optimiser steps per time step, from the prior, with no learned parameters.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn
from torch.nn import functional as F

Lambda = Tuple[torch.Tensor, torch.Tensor]
FORMS = ("highway", "residual", "learned_sgd")
LOG_SCALE_RANGE = (-9.0, 5.0)  # posterior scales kept in [1.2e-4, 148] so a wild update cannot underflow


class _Normalise(nn.Module):
    """Layer normalisation of one input term plus its log root-mean-square (signed log for D = 1)."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim) if dim > 1 else None
        self.out_dim = dim + 1 if dim > 1 else 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.norm is None:
            return torch.cat([x.sign() * x.abs().log1p(), x.abs().add(1e-8).log() / 10], -1)
        log_rms = x.pow(2).mean(-1, keepdim=True).add(1e-12).log() / 20
        return torch.cat([self.norm(x), log_rms], -1)


class HighwayMLP(nn.Module):
    """Two ELU layers; the second is a highway layer :math:`h_2 = g \\odot \\mathrm{ELU}(W h_1) + (1-g) \\odot h_1`."""

    def __init__(self, in_dim: int, hidden: int):
        super().__init__()
        self.inp = nn.Linear(in_dim, hidden)
        self.hidden = nn.Linear(hidden, hidden)
        self.gate = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.elu(self.inp(x))
        g = torch.sigmoid(self.gate(h))
        return g * F.elu(self.hidden(h)) + (1 - g) * h


class UpdateNetwork(nn.Module):
    """The learned update :math:`f_\\phi` of one latent slot (shared over time steps).

    :param int dim: flattened size D of the slot's unconstrained latent.
    :param str form: ``"highway"`` (gated), ``"residual"`` (gated residual) or ``"learned_sgd"``.
    :param str encoding: ``"gradient"`` or ``"error"``.
    :param int error_dim: size of the flattened observation error (error encoding only).
    :param int obs_dim: size of the flattened observation to encode as well (0: none).
    :param int hidden: units per hidden layer (the AVF paper used 1024).

    Example::

        net = UpdateNetwork(dim=4)
        loc, log_scale = net((loc, log_scale), grads=(g_loc, g_log_scale))
    """

    def __init__(
        self,
        dim: int,
        form: str = "highway",
        encoding: str = "gradient",
        error_dim: int = 0,
        obs_dim: int = 0,
        hidden: int = 256,
        init_lr: float = 0.1,
    ):
        super().__init__()
        if form not in FORMS:
            raise ValueError(f"update form must be one of {FORMS}, got {form!r}")
        if encoding not in ("gradient", "error"):
            raise ValueError(f"encoding must be 'gradient' or 'error', got {encoding!r}")
        if form == "learned_sgd" and encoding != "gradient":
            raise ValueError("the 'learned_sgd' form needs gradient encoding")
        self.form, self.encoding = form, encoding
        self.dim, self.error_dim, self.obs_dim = dim, error_dim, obs_dim
        term_dims = [dim, dim] + ([dim, dim] if encoding == "gradient" else [dim, error_dim])
        if obs_dim:
            term_dims.append(obs_dim)
        self.norms = nn.ModuleList(_Normalise(d) for d in term_dims if d > 0)
        self.body = HighwayMLP(sum(n.out_dim for n in self.norms), hidden)
        self.delta = nn.Linear(hidden, 2 * dim)
        if form == "highway":
            self.out_gate = nn.Linear(hidden, 2 * dim)
            nn.init.constant_(self.out_gate.bias, 2.0)  # start close to "keep the prior"
        elif form == "residual":
            self.out_gate = nn.Linear(hidden, 2 * dim)
            nn.init.zeros_(self.delta.weight)  # starts as the identity: the posterior stays at the prior
            nn.init.zeros_(self.delta.bias)
        else:
            nn.init.zeros_(self.delta.weight)
            nn.init.zeros_(self.delta.bias)
            self.raw_lr = nn.Parameter(torch.full((2 * dim,), math.log(math.expm1(init_lr))))

    def forward(
        self,
        lam: Lambda,
        grads: Optional[Lambda] = None,
        errors: Optional[Lambda] = None,
        obs: Optional[torch.Tensor] = None,
    ) -> Lambda:
        lam_cat = torch.cat([lam[0], lam[1]], -1).detach()
        signal = grads if self.encoding == "gradient" else errors
        if signal is None:
            raise ValueError(f"{self.encoding} encoding needs its {self.encoding} inputs")
        terms = [lam[0], lam[1], signal[0], signal[1]] + ([obs] if obs is not None else [])
        terms = [t.detach() for t in terms if t is not None and t.size(-1) > 0]
        shape = torch.broadcast_shapes(*(t.shape[:-1] for t in terms))
        x = torch.cat([n(t.expand(shape + t.shape[-1:])) for n, t in zip(self.norms, terms)], -1)
        h = self.body(x)
        delta = self.delta(h)
        if self.form == "highway":
            g = torch.sigmoid(self.out_gate(h))
            new = g * lam_cat + (1 - g) * delta
        elif self.form == "residual":
            new = lam_cat + (1 - torch.sigmoid(self.out_gate(h))) * delta
        else:
            grad_cat = torch.cat([grads[0], grads[1]], -1).detach()
            new = lam_cat - F.softplus(self.raw_lr) * grad_cat + delta
        loc, log_scale = new.chunk(2, -1)
        return loc, log_scale.clamp(*LOG_SCALE_RANGE)


class SGDUpdate:
    """Plain gradient descent on λ: :math:`\\lambda_{k+1} = \\lambda_k - \\eta_k \\nabla_\\lambda F`,
    with :math:`\\eta_k = \\eta / (1 + k)^{\\gamma}` (``decay`` γ; 0 keeps it constant)."""

    def __init__(self, lr: float, decay: float = 0.0):
        self.lr, self.decay = lr, decay

    def start(self) -> Dict:
        return {}

    def __call__(self, state: Dict, k: int, lam: Lambda, grads: Lambda) -> Lambda:
        lr = self.lr / (1 + k) ** self.decay
        loc, log_scale = (p.detach() - lr * g for p, g in zip(lam, grads))
        return loc, log_scale.clamp(*LOG_SCALE_RANGE)


class AdamUpdate(SGDUpdate):
    """Adam on λ with fresh moments at every time step (Kingma & Ba, 2015):
    :math:`m \\leftarrow \\beta_1 m + (1-\\beta_1) g`, :math:`v \\leftarrow \\beta_2 v + (1-\\beta_2) g^2`,
    :math:`\\lambda \\leftarrow \\lambda - \\eta_k \\hat m / (\\sqrt{\\hat v} + \\epsilon)`."""

    def __init__(self, lr: float, decay: float = 0.0, betas=(0.9, 0.999), eps: float = 1e-8):
        super().__init__(lr, decay)
        self.betas, self.eps = betas, eps

    def __call__(self, state: Dict, k: int, lam: Lambda, grads: Lambda) -> Lambda:
        b1, b2 = self.betas
        lr = self.lr / (1 + k) ** self.decay
        out: List[torch.Tensor] = []
        for i, (p, g) in enumerate(zip(lam, grads)):
            m = b1 * state.get(("m", i), torch.zeros_like(g)) + (1 - b1) * g
            v = b2 * state.get(("v", i), torch.zeros_like(g)) + (1 - b2) * g * g
            state[("m", i)], state[("v", i)] = m, v
            m_hat, v_hat = m / (1 - b1 ** (k + 1)), v / (1 - b2 ** (k + 1))
            out.append(p.detach() - lr * m_hat / (v_hat.sqrt() + self.eps))
        return out[0], out[1].clamp(*LOG_SCALE_RANGE)
