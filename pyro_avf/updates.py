r"""Inference updates :math:`\lambda_{k+1} = f(\lambda_k, \nabla_\lambda \mathcal{F}_t)`, behind one protocol.

The approximate posterior of a step has parameters :math:`\lambda = (\mu_i, \log\sigma_i)_i`, one pair per latent
slot ``i``, each shaped ``batch + (D_i,)`` (a full-covariance slot adds a third part, its Cholesky factor's
strictly-lower entries, ``batch + (D_i(D_i-1)/2,)``; every rule below updates it too). An *update rule* has two methods:

- ``start(lambdas) -> state``: fresh per-step state (optimiser moments; ``None`` for learned rules);
- ``rule(state, k, lambdas, grads, run) -> lambdas``: iteration ``k``'s new estimate, given the gradients of
  the step free energy and the re-run ``run`` (an :class:`~pyro_avf.inference.StepRun`, for the encodings).

Rules with learned parameters (:class:`LearnedUpdate`) are *amortized*; the others are the non-amortized
variational filtering EM of AVF Algorithm 1.

* :class:`UpdateNetwork` — iterative amortized inference (Marino et al., 2018; AVF Eq. 13). Each input term
  (per slot) is normalised separately (layer normalisation over its features, plus its log-RMS so that scale
  is not lost), passed through a two-layer highway MLP with ELU units, and turned into

  - ``"highway"`` (gated output): :math:`\lambda \leftarrow g \odot \lambda + (1 - g) \odot \Delta`;
  - ``"residual"`` (gated residual, zero-initialised so that an untrained network keeps the prior):
    :math:`\lambda \leftarrow \lambda + (1 - g) \odot \Delta`;
  - ``"learned_sgd"``: a learned natural-gradient step inside a learned trust region. With
    :math:`\mathcal{I}^{-1} = (\sigma^2, \tfrac12)` the inverse Fisher information of
    :math:`\mathcal{N}(\mu, \sigma^2)` in :math:`(\mu, \log\sigma)`, the natural gradient in units of the
    current scale is :math:`u = (\sigma \nabla_\mu F, \tfrac12 \nabla_{\log\sigma} F)` (free of the scale of
    the latent), and

    .. math::

        \mu \leftarrow \mu - \sigma\, r_\mu \tanh(\eta_\mu u_\mu / r_\mu) + \Delta_\mu, \qquad
        \log\sigma \leftarrow \log\sigma - r_\sigma \tanh(\eta_\sigma u_\sigma / r_\sigma) + \Delta_\sigma,

    with learned positive steps :math:`\eta = \mathrm{softplus}(b_\eta + W_\eta h)` and radii
    :math:`r = \mathrm{softplus}(b_r + W_r h)` per dimension and state. A small gradient gives the natural
    step :math:`\eta u`; a large one (a likelihood far sharper than the prior) moves μ by at most
    :math:`r_\mu` standard deviations and log σ by :math:`r_\sigma` per iteration, so the update can travel far
    over K iterations and never diverges. With Δ = 0 the fixed point does not depend on η (:math:`\nabla F = 0`). The
    network h reads the encoding (gradients or prediction errors); the step always follows the gradient.
    W and Δ start at 0: an untrained network is bounded natural-gradient descent with step ``init_lr`` and
    radii (1 σ, 0.5); no gate holds λ near its start.

  A full-covariance slot (``IterativeGuide(posterior="full")``) adds the strictly-lower entries :math:`\ell` of
  its Cholesky factor to λ (and their gradients to the inputs); every form updates them like μ, and
  ``"learned_sgd"`` steps them in units of their row's scale: around :math:`L = \operatorname{diag}\sigma` the
  Fisher information of :math:`L_{ij}` is :math:`1/\sigma_i^2`, so :math:`u_{\ell_{ij}} = \sigma_i
  \nabla_{\ell_{ij}} F` and :math:`\ell_{ij} \leftarrow \ell_{ij} - \sigma_i r \tanh(\eta u / r) + \Delta`.

  All inputs are detached: no second-order gradients.
* :class:`SGDUpdate`, :class:`AdamUpdate` — a few optimiser steps per time step, from the prior.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import pyro
import torch
from torch import nn
from torch.nn import functional as F

from pyro_avf.encoders import Encoding

Lambda = Tuple[torch.Tensor, ...]  # (loc, log_scale) or (loc, log_scale, lower)
FORMS = ("highway", "residual", "learned_sgd")
NETWORKS = ("joint", "per_slot")
LOG_SCALE_RANGE = (-9.0, 5.0)  # posterior scales kept in [1.2e-4, 148] so a wild update cannot underflow
INIT_RADIUS = (1.0, 0.5)  # the learned_sgd trust region at initialisation: 1 σ for μ, 0.5 for log σ


def _softplus_inverse(x: torch.Tensor) -> torch.Tensor:
    r""":math:`\mathrm{softplus}^{-1}(x) = x + \log(1 - e^{-x})`."""
    return x + torch.log(-torch.expm1(-x))


def _log_rms(x: torch.Tensor) -> torch.Tensor:
    r""":math:`\tfrac{1}{20}\log(\overline{x^2} + 10^{-12})` over the last dim (kept): the scale that layer
    normalisation removes."""
    return x.pow(2).mean(-1, keepdim=True).add(1e-12).log() / 20


class _Normalise(nn.Module):
    r"""Layer normalisation of one input term plus its log root-mean-square (:func:`_log_rms`),
    :math:`[\mathrm{LN}(x), \tfrac{1}{20}\log(\overline{x^2} + 10^{-12})]` (signed log for D = 1)."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim) if dim > 1 else None
        self.out_dim = dim + 1 if dim > 1 else 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.norm is None:
            return torch.cat([x.sign() * x.abs().log1p(), x.abs().add(1e-8).log() / 10], -1)
        return torch.cat([self.norm(x), _log_rms(x)], -1)


def _same_size_runs(dims: Sequence[int]) -> List[Tuple[int, int]]:
    """``(start, stop)`` of each run of consecutive terms with the same size D > 1 (a term of size 1 alone)."""
    runs: List[Tuple[int, int]] = []
    for i, d in enumerate(dims):
        if runs and d > 1 and dims[runs[-1][0]] == d:
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    return runs


def _normalise_run(norms: Sequence[_Normalise], terms: Sequence[torch.Tensor]) -> torch.Tensor:
    """``torch.cat([n(t) for n, t in zip(norms, terms)], -1)`` for terms of one size D > 1, computed on them
    stacked (a dozen tensor operations instead of seven per term: the update network's hot path)."""
    if len(terms) == 1:
        return norms[0](terms[0])
    x = torch.stack(terms, -2)  # batch + (n, D)
    layers = [n.norm for n in norms]
    weight = torch.stack([ln.weight for ln in layers])
    bias = torch.stack([ln.bias for ln in layers])
    normed = torch.addcmul(bias, F.layer_norm(x, x.shape[-1:], eps=layers[0].eps), weight)
    return torch.cat([normed, _log_rms(x)], -1).flatten(-2)


def _coupling(entries: int, dim: int) -> Optional[int]:
    """P for a slot of dimension ``dim`` with ``entries`` = 0 or D(D−1)/2 + D·P lower entries (None: neither)."""
    if entries == 0:
        return 0
    rest = entries - dim * (dim - 1) // 2
    return rest // dim if rest >= 0 and rest % dim == 0 else None


def _lower_rows(slot_dims: Sequence[int], lower_dims: Sequence[int]) -> torch.Tensor:
    """For each lower entry of the joined slots, the index of its row's log-scale in the joined log-scales: the
    D·P coupling entries of a joint slot (row-major), then its strictly-lower entries."""
    rows, offset = [], 0
    for d, n in zip(slot_dims, lower_dims):
        if n:
            coupled = torch.arange(d).repeat_interleave(_coupling(n, d))
            rows.append(torch.cat([coupled, torch.tril_indices(d, d, -1)[0]]) + offset)
        offset += d
    return torch.cat(rows) if rows else torch.zeros(0, dtype=torch.long)


class HighwayMLP(nn.Module):
    r"""Two ELU layers; the second is a highway layer :math:`h_2 = g \odot \mathrm{ELU}(W h_1) + (1-g) \odot h_1`."""

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
    r"""The learned update :math:`f_\phi` of one latent slot, or of several slots together (shared over time).

    :param int dim: flattened size D of the unconstrained latent (the sum over slots for a joint network).
    :param str form: ``"highway"`` (gated), ``"residual"`` (gated residual) or ``"learned_sgd"``.
    :param str encoding: ``"gradient"`` or ``"error"``.
    :param int error_dim: size of the flattened observation error (error encoding only).
    :param int obs_dim: size of the flattened observation to encode as well (0: none).
    :param int hidden: units per hidden layer (the AVF paper used 1024).
    :param slot_dims: the slots' sizes (summing to ``dim``): each slot's terms are normalised on their own.
    :param lower_dims: each slot's number of strictly-lower Cholesky entries (D(D−1)/2 for a full-covariance
        slot, D(D−1)/2 + D·P for a joint slot coupled to P earlier dimensions, 0 for a diagonal one; None: all
        diagonal). With any, λ and the gradients get a third part.

    Example::

        >>> net = UpdateNetwork(dim=4, hidden=8)
        >>> loc, log_scale = net((torch.zeros(2, 4), torch.zeros(2, 4)), grads=(torch.ones(2, 4), torch.ones(2, 4)))
        >>> loc.shape
        torch.Size([2, 4])
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
        slot_dims: Optional[Sequence[int]] = None,
        lower_dims: Optional[Sequence[int]] = None,
    ):
        super().__init__()
        if form not in FORMS:
            raise ValueError(f"update form must be one of {FORMS}, got {form!r}")
        if encoding not in ("gradient", "error"):
            raise ValueError(f"encoding must be 'gradient' or 'error', got {encoding!r}")
        self.slot_dims = list(slot_dims) if slot_dims is not None else [dim]
        if sum(self.slot_dims) != dim:
            raise ValueError(f"slot_dims {self.slot_dims} do not add up to dim {dim}")
        self.lower_dims = list(lower_dims) if lower_dims is not None else [0] * len(self.slot_dims)
        pairs = zip(self.lower_dims, self.slot_dims)
        if len(self.lower_dims) != len(self.slot_dims) or any(_coupling(n, d) is None for n, d in pairs):
            raise ValueError(
                f"lower_dims {self.lower_dims} must give 0 or D(D-1)/2 + D P (P >= 0 coupled dimensions) per slot "
                f"of slot_dims {self.slot_dims}"
            )
        self.form, self.encoding = form, encoding
        self.dim, self.error_dim, self.obs_dim = dim, error_dim, obs_dim
        self.lower_dim = lower = sum(self.lower_dims)
        per_slot = 4 if encoding == "gradient" else 3  # loc, log-scale, then 2 gradients or 1 latent error
        term_dims = [d for _ in range(per_slot) for d in self.slot_dims]
        term_dims += [d for _ in range(2 if encoding == "gradient" else 1) for d in self.lower_dims] if lower else []
        term_dims += [error_dim] if encoding == "error" else []
        term_dims += [obs_dim] if obs_dim else []
        self.norms = nn.ModuleList(_Normalise(d) for d in term_dims if d > 0)
        self.norm_runs = _same_size_runs([d for d in term_dims if d > 0])
        self.body = HighwayMLP(sum(n.out_dim for n in self.norms), hidden)
        out = 2 * dim + lower
        self.delta = nn.Linear(hidden, out)
        if form == "highway":
            self.out_gate = nn.Linear(hidden, out)
            nn.init.constant_(self.out_gate.bias, 2.0)  # start close to "keep the prior"
        elif form == "residual":
            self.out_gate = nn.Linear(hidden, out)
            nn.init.zeros_(self.delta.weight)  # starts as the identity: the posterior stays at the prior
            nn.init.zeros_(self.delta.bias)
        else:
            nn.init.zeros_(self.delta.weight)
            nn.init.zeros_(self.delta.bias)
            self.raw_lr = nn.Parameter(_softplus_inverse(torch.full((out,), float(init_lr))))
            self.step_size = nn.Linear(hidden, out, bias=False)  # per element and state, starts at 0
            radius = torch.cat([torch.full((dim,), INIT_RADIUS[0]), torch.full((dim,), INIT_RADIUS[1]),
                                torch.full((lower,), INIT_RADIUS[0])])  # fmt: skip
            self.raw_radius = nn.Parameter(_softplus_inverse(radius))
            self.radius = nn.Linear(hidden, out, bias=False)
            nn.init.zeros_(self.step_size.weight)
            nn.init.zeros_(self.radius.weight)

        # the constructor's sizes, saved beside the weights so that a fresh guide can rebuild the network
        spec = [dim, error_dim, obs_dim, hidden, FORMS.index(form), ("gradient", "error").index(encoding)]
        spec += self.slot_dims + ([-2] + self.lower_dims if lower else [])
        self.register_buffer("spec", torch.tensor(spec))
        self.register_buffer("lower_rows", _lower_rows(self.slot_dims, self.lower_dims), persistent=False)

    def __setstate__(self, state: Dict[str, object]) -> None:
        super().__setstate__(state)
        if "norm_runs" not in self.__dict__:  # a network pickled by an earlier version
            self.norm_runs = _same_size_runs([n.out_dim - 1 if n.norm is not None else 1 for n in self.norms])

    @staticmethod
    def from_spec(spec: torch.Tensor) -> "UpdateNetwork":
        """The (untrained) network that the ``spec`` buffer of a saved one describes."""
        dim, error_dim, obs_dim, hidden, form, encoding, *rest = (int(v) for v in spec)
        lower_dims = None
        if -2 in rest:  # the slots' numbers of lower entries
            slot_dims, lower_dims = rest[: rest.index(-2)], rest[rest.index(-2) + 1 :]
        elif -1 in rest:  # earlier format: a full-covariance flag per slot
            slot_dims, full = rest[: rest.index(-1)], rest[rest.index(-1) + 1 :]
            lower_dims = [d * (d - 1) // 2 * f for d, f in zip(slot_dims, full)]
        else:
            slot_dims = rest
        return UpdateNetwork(dim, FORMS[form], ("gradient", "error")[encoding], error_dim, obs_dim, hidden,
                             slot_dims=slot_dims, lower_dims=lower_dims)  # fmt: skip

    def forward(
        self,
        lam: Lambda,
        grads: Optional[Lambda] = None,
        errors: Optional[Lambda] = None,
        obs: Optional[torch.Tensor] = None,
    ) -> Lambda:
        if (len(lam) > 2) != bool(self.lower_dim):
            raise ValueError(
                f"pyro_avf: this update network was built for {'full-covariance' if self.lower_dim else 'diagonal'} "
                f"posteriors but got λ with {len(lam)} parts"
            )
        lam_cat = torch.cat(list(lam), -1).detach()
        signal = grads if self.encoding == "gradient" else errors
        if signal is None:
            raise ValueError(f"{self.encoding} encoding needs its {self.encoding} inputs")
        slotted = [lam[0], lam[1], signal[0]] + ([signal[1]] if self.encoding == "gradient" else [])
        terms = [part for term in slotted for part in term.split(self.slot_dims, -1)]
        if self.lower_dim:
            lowers = [lam[2]] + ([grads[2]] if self.encoding == "gradient" else [])
            terms += [part for term in lowers for part in term.split(self.lower_dims, -1)]
        terms += ([signal[1]] if self.encoding == "error" else []) + ([obs] if obs is not None else [])
        terms = [t.detach() for t in terms if t is not None and t.size(-1) > 0]
        shape = terms[0].shape[:-1]
        if any(t.shape[:-1] != shape for t in terms):
            shape = torch.broadcast_shapes(*(t.shape[:-1] for t in terms))
            terms = [t.expand(shape + t.shape[-1:]) for t in terms]
        norms = list(self.norms)
        x = torch.cat([_normalise_run(norms[a:b], terms[a:b]) for a, b in self.norm_runs], -1)
        h = self.body(x)
        delta = self.delta(h)
        if self.form == "highway":
            g = torch.sigmoid(self.out_gate(h))
            new = g * lam_cat + (1 - g) * delta
        elif self.form == "residual":
            new = lam_cat + (1 - torch.sigmoid(self.out_gate(h))) * delta
        else:  # a bounded natural-gradient step, in units of the current scale for μ
            if grads is None:
                raise ValueError("the 'learned_sgd' form steps along the gradient: pass grads")
            scale = lam[1].detach().exp()
            units, natural = [scale, torch.ones_like(scale)], [scale * grads[0], grads[1] / 2]
            if self.lower_dim:  # the lower entries of row i move in units of σ_i, like μ_i
                units.append(scale.index_select(-1, self.lower_rows))
                natural.append(units[2] * grads[2])
            natural = torch.cat(natural, -1).detach()
            eta = F.softplus(self.raw_lr + self.step_size(h))
            radius = F.softplus(self.raw_radius + self.radius(h))
            step = radius * torch.tanh(eta * natural / radius)
            new = lam_cat - torch.cat(units, -1) * step + delta
        loc, log_scale, *lower = new.split([self.dim, self.dim] + [self.lower_dim] * bool(self.lower_dim), -1)
        return (loc, log_scale.clamp(*LOG_SCALE_RANGE), *lower)


class UpdateNetworks(nn.ModuleDict):
    """The update networks of a guide, keyed by the slots they update (``"slot0"``, ``"slot0_1"``, ...).

    Networks are built when a step first shows the sizes they need. Each carries its sizes in a buffer
    (``spec``), so ``load_state_dict`` on a fresh guide rebuilds them before loading the weights: no warm-up
    call is needed.
    """

    def __init__(self, prefix: str = "avf_update_"):
        super().__init__()
        self.prefix = prefix  # of the networks' names in Pyro's param store
        self.registered: Optional[List[torch.Tensor]] = None  # the parameters at the last register()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        for name, value in state_dict.items():
            key = name[len(prefix) :].rsplit(".", 1)
            if name.startswith(prefix) and len(key) == 2 and key[1] == "spec" and key[0] not in self:
                self[key[0]] = UpdateNetwork.from_spec(value)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def register(self) -> None:
        """Register every network with Pyro's param store (``pyro.module``). Values already in the store
        under the same names take over, so ``ParamStoreDict.load`` restores a trained guide."""
        for key, net in self.items():
            name = f"{self.prefix}{key}"
            store = pyro.get_param_store()
            for pname, p in net.named_parameters():
                full = f"{name}$$${pname}"
                if full in store and store[full].shape != p.shape:
                    raise ValueError(
                        f"pyro_avf: the param store holds '{full}' of shape {tuple(store[full].shape)} but this "
                        f"guide's network needs {tuple(p.shape)}: it belongs to another guide. Call "
                        "pyro.clear_param_store() before building a guide for another model."
                    )
            pyro.module(name, net, update_module_params=True)
        self.registered = list(self.parameters())  # read once per step by the inference re-runs


class LearnedUpdate:
    r"""The amortized update: learned networks over the step's slots (all together, or one per slot).

    :param str form: ``"highway"``, ``"residual"`` or ``"learned_sgd"`` (see :class:`UpdateNetwork`).
    :param encoding: an :class:`~pyro_avf.encoders.Encoding` (what the network sees besides λ).
    :param str networks: ``"joint"`` (one network over all the step's posterior parameters and gradients,
        as the AVF paper's inference model) or ``"per_slot"`` (one network per latent slot).
    :param int hidden_size: units per hidden layer.
    :param float lr: initial step of ``"learned_sgd"``.
    """

    amortized = True

    def __init__(self, form: str, encoding: Encoding, networks: str = "joint", hidden_size: int = 256,
                 lr: float = 0.1):  # fmt: skip
        if form not in FORMS:
            raise ValueError(f"update form must be one of {FORMS}, got {form!r}")
        if networks not in NETWORKS:
            raise ValueError(f"networks must be one of {NETWORKS}, got {networks!r}")
        self.form, self.encoding, self.networks = form, encoding, networks
        self.hidden_size, self.lr = hidden_size, lr
        self.nets = UpdateNetworks()

    def start(self, lambdas: List[Lambda]) -> None:
        return None

    def __call__(self, state, k: int, lambdas: List[Lambda], grads: List[Lambda], run) -> List[Lambda]:
        groups = [[i] for i in range(len(lambdas))] if self.networks == "per_slot" else [list(range(len(lambdas)))]
        out: List[Optional[Lambda]] = [None] * len(lambdas)
        for group in groups:
            inputs = self.encoding.inputs(run, group, lambdas, grads)
            net = self._network("slot" + "_".join(map(str, group)), inputs)
            new_lam = net(inputs.lam, grads=inputs.grads, errors=inputs.errors, obs=inputs.obs)
            for i, new in zip(group, inputs.unflatten(*new_lam)):
                out[i] = new
        return out  # type: ignore[return-value]

    def _network(self, key: str, inputs) -> UpdateNetwork:
        if key not in self.nets:
            like = inputs.lam[0]
            # a forked generator: building a network does not shift the caller's random stream, so a fresh
            # guide restored from the param store draws the same samples as the guide it was saved from
            with torch.random.fork_rng(devices=[like.device] if like.device.type == "cuda" else []):
                net = UpdateNetwork(inputs.dim, self.form, self.encoding.signal, inputs.error_dim, inputs.obs_dim,
                                    self.hidden_size, self.lr, inputs.slot_dims, inputs.lower_dims)  # fmt: skip
            self.nets[key] = net.to(like)
            self.nets.register()
        net = self.nets[key]
        sizes = (inputs.dim, inputs.error_dim, inputs.obs_dim, sum(inputs.lower_dims))
        if (net.dim, net.error_dim, net.obs_dim, net.lower_dim) != sizes:
            raise ValueError(
                f"pyro_avf: latent slots {key} need an update network for sizes (latent {sizes[0]}, errors "
                f"{sizes[1]}, observation {sizes[2]}, lower Cholesky entries {sizes[3]}) but have one for "
                f"({net.dim}, {net.error_dim}, {net.obs_dim}, {net.lower_dim}); a network trained for "
                "posterior='diagonal' cannot serve posterior='full' or the other way round."
            )
        return net


class SGDUpdate:
    r"""Plain gradient descent on λ: :math:`\lambda_{k+1} = \lambda_k - \eta_k \nabla_\lambda F`,
    with :math:`\eta_k = \eta / (1 + k)^{\gamma}` (``decay`` γ; 0 keeps it constant).

    Example::

        >>> rule = SGDUpdate(lr=0.5)
        >>> [(loc, _)] = rule(rule.start(None), 0, [(torch.ones(1), torch.zeros(1))], [(torch.ones(1), torch.zeros(1))])
        >>> loc
        tensor([0.5000])
    """

    amortized = False

    def __init__(self, lr: float, decay: float = 0.0):
        self.lr, self.decay = lr, decay

    def start(self, lambdas) -> List[Dict]:
        return [{} for _ in lambdas or [()]]

    def __call__(self, state: List[Dict], k: int, lambdas: List[Lambda], grads: List[Lambda], run=None) -> List[Lambda]:
        return [self.step(s, k, lam, g) for s, lam, g in zip(state, lambdas, grads)]

    def step(self, state: Dict, k: int, lam: Lambda, grads: Lambda) -> Lambda:
        lr = self.lr / (1 + k) ** self.decay
        loc, log_scale, *lower = (p.detach() - lr * g for p, g in zip(lam, grads))
        return (loc, log_scale.clamp(*LOG_SCALE_RANGE), *lower)


class AdamUpdate(SGDUpdate):
    r"""Adam on λ with fresh moments at every time step (Kingma & Ba, 2015):
    :math:`m \leftarrow \beta_1 m + (1-\beta_1) g`, :math:`v \leftarrow \beta_2 v + (1-\beta_2) g^2`,
    :math:`\lambda \leftarrow \lambda - \eta_k \hat m / (\sqrt{\hat v} + \epsilon)`."""

    def __init__(self, lr: float, decay: float = 0.0, betas=(0.9, 0.999), eps: float = 1e-8):
        super().__init__(lr, decay)
        self.betas, self.eps = betas, eps

    def step(self, state: Dict, k: int, lam: Lambda, grads: Lambda) -> Lambda:
        b1, b2 = self.betas
        lr = self.lr / (1 + k) ** self.decay
        out: List[torch.Tensor] = []
        for i, (p, g) in enumerate(zip(lam, grads)):
            m = b1 * state.get(("m", i), torch.zeros_like(g)) + (1 - b1) * g
            v = b2 * state.get(("v", i), torch.zeros_like(g)) + (1 - b2) * g * g
            state[("m", i)], state[("v", i)] = m, v
            m_hat, v_hat = m / (1 - b1 ** (k + 1)), v / (1 - b2 ** (k + 1))
            out.append(p.detach() - lr * m_hat / (v_hat.sqrt() + self.eps))
        return (out[0], out[1].clamp(*LOG_SCALE_RANGE), *out[2:])


UPDATES = FORMS + ("sgd", "adam")


def update_rule(update, encoding, encode_observation: bool, networks: str, hidden_size: int, lr: float,
                lr_decay: float):  # fmt: skip
    """The update rule for :class:`~pyro_avf.IterativeGuide`'s options: a rule object as it is, or the rule
    that a string names (``"highway"``, ``"residual"``, ``"learned_sgd"``, ``"sgd"``, ``"adam"``)."""
    if not isinstance(update, str):
        if not (callable(update) and callable(getattr(update, "start", None))):
            raise TypeError(f"update must be one of {UPDATES} or a rule with start() and __call__, got {update!r}")
        return update
    if update not in UPDATES:
        raise ValueError(f"update must be one of {UPDATES}, got {update!r}")
    if update == "sgd":
        return SGDUpdate(lr, lr_decay)
    if update == "adam":
        return AdamUpdate(lr, lr_decay)
    if isinstance(encoding, str):
        encoding = Encoding(encoding, encode_observation)
    return LearnedUpdate(update, encoding, networks, hidden_size, lr)
