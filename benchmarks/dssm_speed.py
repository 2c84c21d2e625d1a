"""Training-step time on a deep state-space model the library has never seen: AVF K=1 against a hand-written
filter, each through Pyro and in plain PyTorch.

"The same must hold on models the benchmarks do not contain": the model here is a plain Pyro program written
in this script, not one of :mod:`pyro_avf.models`. A small deep state-space model (DSSM) of piano rolls,

.. math::

    z_t \\sim \\mathcal{N}(\\mu(z_{t-1}), \\operatorname{softplus}(s(z_{t-1}))), \\qquad
    x_t \\sim \\mathrm{Bernoulli}(\\mathrm{logits} = e(z_t)),

with a 32-d latent (:math:`z_0 = 0`), a 2×128-unit MLP for the transition's loc and scale and a 2×128-unit MLP
emitting 88 keys; the per-step function is marked with :func:`pyro_avf.filtering_step` and called in a
``pyro.markov`` loop inside ``pyro.plate("sequences", B)``; padded steps are masked with ``.mask(m_t)`` on both
distributions, as Pyro's DMM example does.

Five methods, the same model weights at the start (the filter's too in its two versions; the plain update network
is built by the library's constructor with its own random weights), each trained by its own Adam (``lr`` 1e-3):

- ``avf_k1``: ``pyro_avf.IterativeGuide(model, num_iterations=1, num_samples=1)`` (its defaults but one sample
  per inference gradient, the AVF paper's algorithm and the plain version's; ``avf_k1_pair`` is the same with
  the guide's default antithetic pair, two re-runs of the step) with
  ``pyro_avf.AmortizedFilteringELBO()``, in ``pyro.infer.SVI`` with ``pyro.optim.Adam`` and its own Pyro
  parameter store (``ParamStore.scope``);
- ``handwritten``: a filtering guide written by hand, a forward GRU (hidden 128) over :math:`x_{1:t}` and a
  combiner MLP (Pyro's DMM ``Combiner``, but with the GRU running forward, so
  :math:`q(z_t \\mid z_{t-1}, x_{1:t})` is a filter) giving a Normal, with ``pyro.infer.TraceMeanField_ELBO()``,
  likewise in its own ``SVI`` and scope;
- ``plain_avf_k1``: the same AVF K=1 training loss in plain PyTorch, no Pyro in the loop, on the same DSSM
  networks and the update network the library builds by default (``UpdateNetwork(dim=32, form="learned_sgd",
  obs_dim=88, hidden=256)``, gradient encoding plus the observation), as in ``benchmarks/plain_torch_srnn_avf.py``.
  Per step, with :math:`(\\mu_p, \\sigma_p)` = transition(:math:`z_{t-1}`): :math:`\\lambda_0 = (\\mu_p,
  \\log\\sigma_p)` detached; :math:`z = \\mu + \\sigma\\epsilon`; the step free energy :math:`\\mathcal{F}_t` =
  Bernoulli NLL + analytic KL to the prior; :math:`g = \\nabla_\\lambda \\mathcal{F}_t(\\lambda_0)`
  (``torch.autograd.grad``); :math:`\\lambda_1 = f_\\phi(\\lambda_0, g, x_t)`; a final sample from
  :math:`\\lambda_1` scores :math:`\\mathcal{F}_t(\\lambda_1)` (with the prior not detached), which trains θ and
  φ; :math:`z_t` is detached before the next step; padding is masked with ``torch.where``. The loss is
  :math:`\\sum_t \\mathcal{F}_t(\\lambda_1)` (K = 1 has no intermediate-iteration surrogate);
  ``torch.optim.Adam``;
- ``plain_filter``: the hand-written GRU + combiner filter and the model in plain PyTorch: loss =
  :math:`\\sum_t` Bernoulli NLL + analytic KL (torch's Normal-Normal formula), reparameterised through time as
  ``TraceMeanField_ELBO`` does; ``torch.optim.Adam``.

One timed unit is one training step on a batch of random 25-step crops of real JSB Chorales training songs
(quarter notes): ``svi.step(xs, mask)`` for the Pyro methods; loss, ``backward``, ``optimizer.step``,
``zero_grad`` and ``loss.item()`` for the plain ones. Timing as in ``benchmarks/speed.py``: after ``--warmup``
untimed rounds, ``--reps`` rounds, each running every method once in a fresh random order on the same batch;
reported per batch size are the median seconds per step of each method and the median [q25, q75] over rounds of
five within-round ratios:

- AVF K=1 / hand-written (the library; goals from the issue: ≤ 1.2 at batch 16, ≤ 1.0 at batch 64);
- the same with the guide's default antithetic pair (one more run of the step per iteration);
- plain AVF / plain filter (the algorithm's inherent cost: two runs of the step, an inner ``autograd.grad`` and
  the update network);
- library AVF / plain AVF (the library's overhead, Pyro's included);
- library filter / plain filter (Pyro's own overhead, for comparison).

A check line (``--no-check`` skips it) compares, on the first batch, the loss of each plain method with its
library counterpart's from the same weights and the same random seed (the plain code draws its standard normals
in the library's order: one ``(B, 32)`` draw per step and iteration); a sanity line checks that every method's
loss after the timed steps is finite.

Usage::

    python benchmarks/dssm_speed.py --reps 20 --warmup 2 --batch-sizes 16 64 --json dssm_speed.json
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import pyro
import pyro.distributions as dist
import torch
from torch import Tensor, nn
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from plain_torch_srnn_avf import jsb_crops, normal_kl  # noqa: E402
from speed import measure, quartiles  # noqa: E402

import pyro_avf  # noqa: E402
from pyro_avf.updates import UpdateNetwork  # noqa: E402

X_DIM, Z_DIM, HIDDEN = 88, 32, 128
UPDATE_HIDDEN = 256  # IterativeGuide's default hidden_size
GOALS = {16: 1.2, 64: 1.0}  # AVF K=1 / hand-written guide, from the issue
GOAL_RATIO = "library"
RATIOS = {  # name: (numerator, denominator, label)
    "library": ("avf_k1", "handwritten", "AVF K=1 / hand-written (library)"),
    "library_default": ("avf_k1_pair", "handwritten", "AVF K=1 with the default antithetic pair / hand-written"),
    "inherent": ("plain_avf_k1", "plain_filter", "plain AVF / plain filter (inherent)"),
    "avf_overhead": ("avf_k1", "plain_avf_k1", "library AVF / plain AVF (library overhead)"),
    "pyro_overhead": ("handwritten", "plain_filter", "library filter / plain filter (Pyro overhead)"),
}
LABELS = {"avf_k1": "AVF K=1 (IterativeGuide + AmortizedFilteringELBO), one sample",
          "avf_k1_pair": "AVF K=1, IterativeGuide's default antithetic pair",
          "handwritten": "hand-written GRU filter (TraceMeanField_ELBO)",
          "plain_avf_k1": "plain-PyTorch AVF K=1 (same networks, no Pyro)",
          "plain_filter": "plain-PyTorch GRU filter (no Pyro)"}  # fmt: skip


def mlp(sizes: List[int]) -> nn.Sequential:
    """Linear layers with ReLU between them (none after the last)."""
    layers: List[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class DSSM(nn.Module):
    """The deep state-space model: transition MLP :math:`z_{t-1} \\mapsto (\\mu, \\sigma)`, emission MLP
    :math:`z_t \\mapsto` logits of 88 keys. :meth:`model` is the Pyro program, :meth:`step` its marked step."""

    def __init__(self, z_dim: int = Z_DIM, x_dim: int = X_DIM, hidden: int = HIDDEN):
        super().__init__()
        self.z_dim, self.x_dim = z_dim, x_dim
        self.transition = mlp([z_dim, hidden, hidden, 2 * z_dim])
        self.emitter = mlp([z_dim, hidden, hidden, x_dim])

    @pyro_avf.filtering_step
    def step(self, t: int, z_prev: Tensor, x_t: Tensor, m_t: Tensor) -> Tensor:
        """z_t ~ N(loc, softplus(·)) from z_{t-1}; x_t ~ Bernoulli(emitter(z_t)); both masked by ``m_t`` (B,)."""
        loc, raw_scale = self.transition(z_prev).chunk(2, dim=-1)
        z = pyro.sample(f"z_{t}", dist.Normal(loc, F.softplus(raw_scale)).to_event(1).mask(m_t))
        pyro.sample(f"x_{t}", dist.Bernoulli(logits=self.emitter(z)).to_event(1).mask(m_t), obs=x_t)
        return z

    def model(self, xs: Tensor, mask: Tensor) -> None:
        """Score ``xs`` (B, T, 88) with ``mask`` (B, T) bool, False on padding."""
        pyro.module("dssm", self)
        z = xs.new_zeros(xs.size(0), self.z_dim)
        with pyro.plate("sequences", xs.size(0)):
            for t in pyro.markov(range(1, xs.size(1) + 1)):
                z = self.step(t, z, xs[:, t - 1], mask[:, t - 1])


class Combiner(nn.Module):
    """Pyro's DMM ``Combiner``: :math:`h = \\frac12(\\tanh(W z_{t-1}) + h^{\\mathrm{rnn}}_t)`, then loc and
    softplus scale of :math:`q(z_t)`."""

    def __init__(self, z_dim: int = Z_DIM, rnn_dim: int = HIDDEN):
        super().__init__()
        self.z_to_hidden = nn.Linear(z_dim, rnn_dim)
        self.hidden_to_loc = nn.Linear(rnn_dim, z_dim)
        self.hidden_to_scale = nn.Linear(rnn_dim, z_dim)

    def forward(self, z_prev: Tensor, h_rnn: Tensor) -> Tuple[Tensor, Tensor]:
        h = 0.5 * (torch.tanh(self.z_to_hidden(z_prev)) + h_rnn)
        return self.hidden_to_loc(h), F.softplus(self.hidden_to_scale(h))


class FilteringGuide(nn.Module):
    """Hand-written filter :math:`q(z_t \\mid z_{t-1}, x_{1:t})`: a forward GRU over the observations (its state
    after :math:`x_t`) and the :class:`Combiner`."""

    def __init__(self, z_dim: int = Z_DIM, x_dim: int = X_DIM, rnn_dim: int = HIDDEN):
        super().__init__()
        self.z_dim = z_dim
        self.rnn = nn.GRU(x_dim, rnn_dim, batch_first=True)
        self.combiner = Combiner(z_dim, rnn_dim)

    def guide(self, xs: Tensor, mask: Tensor) -> None:
        pyro.module("filter", self)
        h = self.rnn(xs)[0]  # h[:, t-1] has seen x_1..x_t
        z = xs.new_zeros(xs.size(0), self.z_dim)
        with pyro.plate("sequences", xs.size(0)):
            for t in pyro.markov(range(1, xs.size(1) + 1)):
                loc, scale = self.combiner(z, h[:, t - 1])
                z = pyro.sample(f"z_{t}", dist.Normal(loc, scale).to_event(1).mask(mask[:, t - 1]))


def bernoulli_nll(logits: Tensor, x: Tensor) -> Tensor:
    """:math:`-\\log \\mathrm{Bernoulli}(x; \\mathrm{logits})` summed over the 88 keys (Pyro's formula)."""
    return F.binary_cross_entropy_with_logits(logits, x, reduction="none").sum(-1)


def kl_normal(loc: Tensor, scale: Tensor, p_loc: Tensor, p_scale: Tensor) -> Tensor:
    """:math:`D_{KL}(\\mathcal{N}(\\mu, \\sigma^2) \\| \\mathcal{N}(\\mu_p, \\sigma_p^2))` summed over the last dim
    (torch's ``kl_normal_normal``, which ``TraceMeanField_ELBO`` uses)."""
    var_ratio = (scale / p_scale).pow(2)
    t1 = ((loc - p_loc) / p_scale).pow(2)
    return (0.5 * (var_ratio + t1 - 1 - var_ratio.log())).sum(-1)


def avf_step_free_energy(emitter: nn.Module, lam: Tuple[Tensor, Tensor], prior: Tuple[Tensor, Tensor],
                         x_t: Tensor) -> Tuple[Tensor, Tensor]:  # fmt: skip
    """One sample :math:`z = \\mu + e^{\\log\\sigma}\\epsilon`; returns (per-row :math:`\\mathcal{F}_t`, z)."""
    loc, log_scale = lam
    z = loc + torch.empty_like(loc).normal_() * log_scale.exp()
    return bernoulli_nll(emitter(z), x_t) + normal_kl(loc, log_scale, *prior), z


def plain_avf_k1_loss(dssm: DSSM, update: UpdateNetwork, xs: Tensor, mask: Tensor) -> Tensor:
    """The AVF K=1 training loss of ``xs`` (B, T, 88), ``mask`` (B, T), with no Pyro: what
    ``IterativeGuide(num_iterations=1)`` + ``AmortizedFilteringELBO`` compute on :class:`DSSM`."""
    z = xs.new_zeros(xs.size(0), dssm.z_dim)
    total = xs.new_zeros(())
    for t in range(xs.size(1)):
        x_t, m_t = xs[:, t], mask[:, t]
        p_loc, raw_scale = dssm.transition(z).chunk(2, dim=-1)
        p_scale = F.softplus(raw_scale)
        prior_const = (p_loc.detach(), p_scale.detach())
        lam = (p_loc.detach().requires_grad_(), p_scale.detach().log().requires_grad_())
        fe, _ = avf_step_free_energy(dssm.emitter, lam, prior_const, x_t)
        grads = torch.autograd.grad(torch.where(m_t, fe, 0.0).sum(), lam)
        final = update(lam, grads=grads, obs=x_t)
        fe, z = avf_step_free_energy(dssm.emitter, final, (p_loc, p_scale), x_t)
        total = total + torch.where(m_t, fe, 0.0).sum()
        z = z.detach()  # later steps see z_t as data
    return total


def plain_filter_loss(dssm: DSSM, filt: FilteringGuide, xs: Tensor, mask: Tensor) -> Tensor:
    """The negative ELBO of the hand-written filter with analytic KL, with no Pyro: what
    ``TraceMeanField_ELBO`` computes for ``dssm.model`` and ``filt.guide``."""
    h = filt.rnn(xs)[0]
    z = xs.new_zeros(xs.size(0), dssm.z_dim)
    total = xs.new_zeros(())
    for t in range(xs.size(1)):
        x_t, m_t = xs[:, t], mask[:, t]
        loc, scale = filt.combiner(z, h[:, t])
        p_loc, raw_scale = dssm.transition(z).chunk(2, dim=-1)
        z = loc + torch.empty_like(loc).normal_() * scale
        fe = bernoulli_nll(dssm.emitter(z), x_t) + kl_normal(loc, scale, p_loc, F.softplus(raw_scale))
        total = total + torch.where(m_t, fe, 0.0).sum()
    return total


class Method:
    """One inference method; subclasses define :meth:`train_step` (one step, returns the loss)."""

    def __init__(self, name: str):
        self.name = name
        self.losses: List[float] = []

    def train_step(self, xs: Tensor, mask: Tensor) -> float:
        raise NotImplementedError

    def step(self, xs: Tensor, mask: Tensor) -> float:
        """One training step; returns its wall time in seconds."""
        start = time.perf_counter()
        loss = self.train_step(xs, mask)
        elapsed = time.perf_counter() - start
        self.losses.append(loss)
        return elapsed


class PyroMethod(Method):
    """A Pyro method: its own model copy, guide, SVI and param-store scope (the scope swap is not timed)."""

    def __init__(self, name: str, svi: pyro.infer.SVI, scope: dict):
        super().__init__(name)
        self.svi, self.scope = svi, scope

    def step(self, xs: Tensor, mask: Tensor) -> float:
        with pyro.get_param_store().scope(self.scope):
            return super().step(xs, mask)

    def train_step(self, xs: Tensor, mask: Tensor) -> float:
        return self.svi.step(xs, mask)

    def loss_value(self, xs: Tensor, mask: Tensor) -> float:
        """The loss of a batch, no parameter update."""
        with pyro.get_param_store().scope(self.scope):
            return self.svi.evaluate_loss(xs, mask)


class PlainMethod(Method):
    """A plain-PyTorch method: a loss function of the batch over ``modules``, trained by ``torch.optim.Adam``."""

    def __init__(self, name: str, loss_fn: Callable[[Tensor, Tensor], Tensor], modules: List[nn.Module]):
        super().__init__(name)
        self.loss_fn, self.modules = loss_fn, modules
        self.optimizer = torch.optim.Adam([p for m in modules for p in m.parameters()], lr=1e-3)

    def train_step(self, xs: Tensor, mask: Tensor) -> float:
        loss = self.loss_fn(xs, mask)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.item()

    def loss_value(self, xs: Tensor, mask: Tensor) -> float:
        """The loss of a batch, no parameter update (autograd stays on: AVF differentiates w.r.t. λ)."""
        return self.loss_fn(xs, mask).item()


def build_methods(seed: int, update_hidden: int = UPDATE_HIDDEN) -> Dict[str, Method]:
    """All five methods with the same DSSM weights at the start (from ``seed``); the filter (both versions) and
    the plain update network from ``seed + 1``; both AVF versions' update networks ``update_hidden`` wide."""
    torch.manual_seed(seed)
    dssm = DSSM()
    methods: Dict[str, Method] = {}

    for name, guide_kwargs in (("avf_k1", {"num_samples": 1}), ("avf_k1_pair", {})):  # {}: the default pair
        avf_model = copy.deepcopy(dssm)
        torch.manual_seed(seed + 1)
        guide = pyro_avf.IterativeGuide(avf_model.model, num_iterations=1, hidden_size=update_hidden, **guide_kwargs)
        elbo = pyro_avf.AmortizedFilteringELBO()
        svi = pyro.infer.SVI(avf_model.model, guide, pyro.optim.Adam({"lr": 1e-3}), loss=elbo)
        methods[name] = PyroMethod(name, svi, {"params": {}, "constraints": {}})

    hw_model = copy.deepcopy(dssm)
    torch.manual_seed(seed + 1)
    filt = FilteringGuide()
    plain_filt = copy.deepcopy(filt)
    elbo = pyro.infer.TraceMeanField_ELBO()
    svi = pyro.infer.SVI(hw_model.model, filt.guide, pyro.optim.Adam({"lr": 1e-3}), loss=elbo)
    methods["handwritten"] = PyroMethod("handwritten", svi, {"params": {}, "constraints": {}})

    plain_avf_model = copy.deepcopy(dssm)
    torch.manual_seed(seed + 1)
    # the network IterativeGuide builds by default: update="learned_sgd", gradient encoding with the observation
    update = UpdateNetwork(dim=Z_DIM, form="learned_sgd", obs_dim=X_DIM, hidden=update_hidden)
    methods["plain_avf_k1"] = PlainMethod("plain_avf_k1", lambda xs, mask: plain_avf_k1_loss(plain_avf_model, update,
                                          xs, mask), [plain_avf_model, update])  # fmt: skip

    plain_filter_model = copy.deepcopy(dssm)
    methods["plain_filter"] = PlainMethod("plain_filter", lambda xs, mask: plain_filter_loss(plain_filter_model,
                                          plain_filt, xs, mask), [plain_filter_model, plain_filt])  # fmt: skip
    return methods


def check_losses(seed: int, xs: Tensor, mask: Tensor, update_hidden: int = UPDATE_HIDDEN) -> dict:
    """Each plain method's loss on ``xs`` against its library counterpart's, from fresh methods with the same
    weights (the library's update network, built by one untimed call, copied into the plain one) and the same
    seed before each loss: first from the initial weights, then after one training step of each on ``xs`` (at
    initialisation the learned_sgd network's output layers are zero, so only the second value depends on the
    update network's hidden layers and on the gradients that reach them)."""
    methods = build_methods(seed, update_hidden)
    lib_avf, plain_avf = methods["avf_k1"], methods["plain_avf_k1"]
    assert isinstance(lib_avf, PyroMethod) and isinstance(plain_avf, PlainMethod)
    lib_avf.loss_value(xs, mask)  # builds the library's update network
    (lib_net,) = lib_avf.svi.guide.update_nets.values()
    plain_net = plain_avf.modules[1]
    same_spec = bool(torch.equal(lib_net.spec, plain_net.spec))
    plain_net.load_state_dict(lib_net.state_dict())
    out: dict = {"update_network_spec_equal": same_spec}
    for lib, plain in (("avf_k1", "plain_avf_k1"), ("handwritten", "plain_filter")):
        pair = [methods[lib], methods[plain]]
        values: Dict[str, List[float]] = {"initial": [], "after_one_step": []}
        for m in pair:
            pyro.set_rng_seed(seed)
            values["initial"].append(m.loss_value(xs, mask))  # type: ignore[attr-defined]
            pyro.set_rng_seed(seed + 1)
            m.step(xs, mask)
            pyro.set_rng_seed(seed)
            values["after_one_step"].append(m.loss_value(xs, mask))  # type: ignore[attr-defined]
        out[plain] = {key: {"library": v[0], "plain": v[1], "relative_difference": abs(v[0] - v[1]) / abs(v[0])}
                      for key, v in values.items()}  # fmt: skip
    return out


def summarise(times: Dict[str, List[float]], methods: Dict[str, Method], batch_size: int) -> dict:
    """Median s/step per method, the within-round ratios of :data:`RATIOS`, the goal and the final losses."""
    ratios = {}
    for key, (a, b, _) in RATIOS.items():
        median, q25, q75 = quartiles([x / y for x, y in zip(times[a], times[b])])
        ratios[key] = {"numerator": a, "denominator": b, "median": median, "q25": q25, "q75": q75}
    final = {name: m.losses[-1] for name, m in methods.items()}
    goal: Optional[float] = GOALS.get(batch_size)
    return {
        "batch_size": batch_size,
        "reps": len(next(iter(times.values()))),
        "median_seconds": {name: statistics.median(t) for name, t in times.items()},
        "ratio": ratios[GOAL_RATIO],
        "ratios": ratios,
        "goal": goal,
        "meets_goal": None if goal is None else ratios[GOAL_RATIO]["median"] <= goal,
        "final_loss": final,
        "losses_finite": all(math.isfinite(v) for v in final.values()),
    }


def markdown(summaries: List[dict]) -> str:
    lines = ["| batch | method | median s/step |", "|---|---|---|"]
    for s in summaries:
        lines += [f"| {s['batch_size']} | {LABELS[n]} | {v:.4f} |" for n, v in s["median_seconds"].items()]
    lines += ["", "| batch | " + " | ".join(label for _, _, label in RATIOS.values()) + " | goal (library) | met |"]
    lines += ["|---" * (len(RATIOS) + 3) + "|"]
    for s in summaries:
        goal = s["goal"]
        met = "-" if goal is None else ("yes" if s["meets_goal"] else "no")
        cells = [f"{r['median']:.2f} [{r['q25']:.2f}, {r['q75']:.2f}]" for r in s["ratios"].values()]
        goal_cell = "-" if goal is None else f"≤ {goal}"
        lines.append(f"| {s['batch_size']} | " + " | ".join(cells) + f" | {goal_cell} | {met} |")
    lines.append("")
    lines.append("(ratios: within-round, median [q25, q75] over the timed rounds)")
    return "\n".join(lines)


def check_line(check: dict, batch_size: int) -> str:
    parts = []
    for name, c in check.items():
        if isinstance(c, dict):
            a, b = c["initial"], c["after_one_step"]
            parts.append(f"{name} {a['plain']:.4f} vs library {a['library']:.4f} (relative difference "
                         f"{a['relative_difference']:.1e}), after one step {b['plain']:.4f} vs {b['library']:.4f} "
                         f"({b['relative_difference']:.1e})")  # fmt: skip
    spec = "same" if check["update_network_spec_equal"] else "DIFFERENT"
    head = f"check (first batch, B={batch_size}, same weights and seed; update network spec {spec}): "
    return head + "; ".join(parts)


def sanity_line(summaries: List[dict]) -> str:
    parts = [f"B={s['batch_size']}: " + ", ".join(f"{n} {v:.1f}" for n, v in s["final_loss"].items())
             for s in summaries]  # fmt: skip
    ok = all(s["losses_finite"] for s in summaries)
    return f"sanity: losses after the timed steps {'all finite' if ok else 'NOT ALL FINITE'} ({'; '.join(parts)})"


def run(batch_size: int, length: int, reps: int, warmup: int, seed: int,
        progress: Callable[[str], None] = print, update_hidden: int = UPDATE_HIDDEN) -> dict:  # fmt: skip
    """Build every method afresh and time them at one batch size."""
    methods = build_methods(seed, update_hidden)
    batches = [jsb_crops(batch_size, length, seed=seed + i) for i in range(4)]
    start = time.perf_counter()
    times = measure(methods, batches, reps, warmup, seed)
    progress(f"batch {batch_size}: {warmup + reps} rounds in {time.perf_counter() - start:.1f} s")
    return summarise(times, methods, batch_size)


def main(argv: Optional[List[str]] = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=20, help="timed rounds (each runs every method once)")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 64])
    p.add_argument("--crop-length", type=int, default=25)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="write the summary here")
    p.add_argument("--no-check", action="store_true", help="skip the plain-vs-library loss check")
    p.add_argument("--update-hidden", type=int, default=UPDATE_HIDDEN,
                   help="width of the AVF update networks, library and plain (default: the guide's default)")
    args = p.parse_args(argv)
    if args.reps < 1 or args.warmup < 0:
        p.error("--reps must be >= 1 and --warmup >= 0")
    pyro.set_rng_seed(args.seed)
    random.seed(args.seed)
    check: Optional[dict] = None
    if not args.no_check:
        b = args.batch_sizes[0]
        check = check_losses(args.seed, *jsb_crops(b, args.crop_length, seed=args.seed), args.update_hidden)
        print(check_line(check, b))
        pyro.set_rng_seed(args.seed)
    summaries = [run(b, args.crop_length, args.reps, args.warmup, args.seed, update_hidden=args.update_hidden)
                 for b in args.batch_sizes]
    print(markdown(summaries))
    print(sanity_line(summaries))
    summary = {"benchmark": "dssm_speed", "crop_length": args.crop_length, "warmup": args.warmup,
               "seed": args.seed, "update_hidden": args.update_hidden, "threads": torch.get_num_threads(),
               "check": check, "results": summaries}  # fmt: skip
    if args.json is not None:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    return summary


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
