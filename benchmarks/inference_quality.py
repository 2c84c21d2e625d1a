"""Inference quality: how close the learned amortized update gets to the best step posterior.

Three parts (``--part``). Each amortized configuration is an ``IterativeGuide(model, num_iterations=K, **kwargs)``
trained with SVI + ``AmortizedFilteringELBO`` + ``pyro.optim.Adam({"lr": 1e-3})`` (the README's optimiser;
``--lr`` changes it) on *fresh* simulated batches of ``--batch-size`` sequences (batch ``i`` is drawn with
seed ``seed * 100003 + 1000 + i``, so every configuration sees the same batches), and is scored at checkpoints
on held-out sequences with :func:`pyro_avf.evaluation.filtering_free_energy` -- the same estimator, the same
sequences and the same evaluation seed for every method (analytic KL, one Monte-Carlo sample of the
reconstruction per step). Each model's step records the z_(t-1) it is handed (the guide's own sample), so each
method's per-step free energy is compared with the best step posterior *given that method's own z_(t-1)*.

``defaults``
    LG-SSM, latent 4, observation 8 (``LinearGaussianSSM.random``). Reference: the best *diagonal* step
    posterior given z_(t-1) in closed form (``step_optimum`` + ``diagonal_gap`` of
    ``pyro_avf.baselines.kalman``). Grid: updates × encodings × encode_observation (preset ``updates``),
    plus the prior prediction (K = 0) and non-amortized per-step Adam (``--adam-kwargs``, default
    ``update="adam", lr=0.05, num_iterations=200``).
``coupled``
    A two-level linear-Gaussian chain with two coupled latent sites per step,
    z1_t ~ N(A z1_(t-1), Q1), z2_t ~ N(B z1_t, Q2), x_t ~ N(C z2_t, R) (z1, z2 2-d, x 4-d). The best fully
    factorised step posterior given z1_(t-1) is closed form: the step is an LG-SSM step in w = (z1, z2) with a
    full prior covariance, so the same two functions apply (free energy -log p(x_t | z1_(t-1)) +
    (Σ log L_ii - log det L)/2). Every configuration is also trained on the ``defaults`` LG-SSM for the same
    budget (issue goal: coupled gap <= 0.15 nats/step and <= 2x the single-site gap).
``nonlinear``
    A stochastic Lotka-Volterra (predator-prey) model on log-populations with Poisson counts, simulated with
    fixed parameters (no real counts here). No closed form: the reference is non-amortized per-step Adam run to
    convergence (``--reference-kwargs``, default lr 0.1, decay 0.5, 4 samples, 500 iterations), run on the
    same held-out sequences given each method's own z_(t-1) (a model that takes the recorded z_(t-1) as data),
    so every gap is paired step by step. Rows ``reference@500`` (the reference against itself: a check of the
    paired estimator, ≈ 0) and ``reference@300`` (``--check-iterations``: the convergence check). The unpaired
    difference of the filtering free energies (each method on its own trajectory) is in ``unpaired_gap``.

Columns of the tidy CSV ``benchmarks/results/inference_quality_<part>.csv`` (one row per model, config and
training step; methods without training have ``kind`` "fixed" and step 0): ``gap`` (nats/step, mean over
held-out sequences and steps), ``se`` (its standard error over sequences), ``prior_gap`` / ``prior_se``: the
K = 0 prior prediction's gap given the same z_(t-1) -- how far the update must move from where it starts --,
``free_energy`` and ``reference`` per step. Beside it a PNG (gap vs SVI steps, log y, one line per config) and a
printed table. Configurations the guide refuses (a ``ValueError``) are skipped and listed at the end.

Usage::

    python benchmarks/inference_quality.py --part defaults
    python benchmarks/inference_quality.py --part coupled --guide-kwargs '{"update": "residual"}'
    python benchmarks/inference_quality.py --part coupled --grid '{"joint": {"networks": "joint"},
        "per_slot": {"networks": "per_slot"}}'
    python benchmarks/inference_quality.py --part nonlinear --grid '{"highway": {}, "residual": {"update": "residual"}}'

``--grid`` takes a JSON object {name: guide kwargs (an ``"elbo"`` entry: AmortizedFilteringELBO kwargs)},
``@file.json``, or a preset name (``default``: the guide's defaults, the default for ``coupled`` and
``nonlinear``; ``updates``: the 12 update × encoding × encode_observation configurations, the default for
``defaults``). ``--guide-kwargs`` (JSON) is applied under every grid entry; any ``IterativeGuide`` keyword
passes through (``num_iterations`` too, over ``--num-iterations``).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import itertools
import json
import math
import random
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from torch import Tensor
from tqdm import tqdm

from pyro_avf import AmortizedFilteringELBO, IterativeGuide, filtering_step
from pyro_avf.baselines.kalman import diagonal_gap, step_optimum
from pyro_avf.evaluation import filtering_free_energy, mean_free_energy_per_step
from pyro_avf.models.lgssm import LinearGaussianSSM, stable_matrix, uniform

PARTS = ("defaults", "coupled", "nonlinear")
RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_CHECKPOINTS = {
    "defaults": [0, 50, 100, 200, 400, 600],
    "coupled": [0, 100, 300, 600],
    "nonlinear": [0, 50, 100, 200, 400, 600],
}
DEFAULT_T = {"defaults": 20, "coupled": 20, "nonlinear": 30}
ADAM = {"update": "adam", "lr": 0.05, "num_iterations": 200}
REFERENCE = {"update": "adam", "lr": 0.1, "lr_decay": 0.5, "num_samples": 4, "num_iterations": 500}


UPDATES = ("highway", "residual", "learned_sgd")


def grid_preset(name: str) -> Dict[str, dict]:
    if name == "default":
        return {"default": {}}
    if name == "updates":
        return {
            f"{u}/{e}/{'obs' if o else 'no-obs'}": {"update": u, "encoding": e, "encode_observation": o}
            for u, e, o in itertools.product(UPDATES, ("gradient", "error"), (False, True))
        }
    raise ValueError(f"unknown grid preset {name!r} (known: default, updates)")


def parse_grid(spec: Optional[str], part: str, base: dict) -> Dict[str, dict]:
    """{name: guide kwargs} from ``--grid`` (JSON, @file or preset), each merged over ``--guide-kwargs``."""
    if spec is None:
        spec = "updates" if part == "defaults" else "default"
    if spec.startswith("@"):
        grid = json.loads(Path(spec[1:]).read_text())
    elif spec.lstrip().startswith("{"):
        grid = json.loads(spec)
    else:
        grid = grid_preset(spec)
    if not isinstance(grid, dict) or not all(isinstance(v, dict) for v in grid.values()):
        raise ValueError("--grid must be a JSON object {name: {guide keyword: value}}")
    return {name: {**base, **kwargs} for name, kwargs in grid.items()}


@contextlib.contextmanager
def seeded(seed: int):
    """Run a block under ``pyro.set_rng_seed(seed)`` and restore every RNG afterwards (evaluations then do not
    change the training stream, whichever checkpoints are asked for)."""
    states = torch.get_rng_state(), random.getstate(), np.random.get_state()
    pyro.set_rng_seed(seed)
    try:
        yield
    finally:
        torch.set_rng_state(states[0])
        random.setstate(states[1])
        np.random.set_state(states[2])


# ----------------------------------------------------------------------------------------------- models
#
# Each model is an ordinary Pyro program with a @filtering_step. The step records the z_(t-1) it is handed
# (all K + 1 runs of a step get the same one: the guide's sample from the previous step), which is how the
# closed-form optimum is computed given the guide's own sample, using the public API only.


class SteppedModel:
    latent_dim: int
    obs_dim: int

    def __init__(self):
        self.record: Dict[int, Tensor] = {}

    def _record(self, t: int, z_prev: Tensor) -> None:
        self.record[t] = z_prev.detach().clone()

    def recorded_z_prev(self, steps: int) -> Tensor:
        """The z_(t-1) of the latest run, (B, T, latent_dim)."""
        return torch.stack([self.record[t] for t in range(1, steps + 1)], 1)

    def initial_state(self, batch: int) -> Tensor:
        return torch.zeros(batch, self.latent_dim)

    def model(self, xs: Tensor) -> None:
        self.record = {}
        batch, steps, _ = xs.shape
        z = self.initial_state(batch)
        with pyro.plate("sequences", batch):
            for t in pyro.markov(range(1, steps + 1)):
                z = self.step(t, z, xs[:, t - 1])

    def conditioned_model(self, xs: Tensor, z_prevs: Tensor) -> None:
        """Each step given the recorded z_(t-1) as data (for per-step references given a method's samples)."""
        self.record = {}
        with pyro.plate("sequences", xs.size(0)):
            for t in pyro.markov(range(1, xs.size(1) + 1)):
                self.step(t, z_prevs[:, t - 1], xs[:, t - 1])

    def best_diagonal(self, xs: Tensor, z_prevs: Tensor) -> Tensor:
        """Free energy of the best fully factorised step posterior given z_(t-1), (B, T)."""
        raise NotImplementedError


class LGSSMProgram(SteppedModel):
    """``LinearGaussianSSM.model`` (same sites, same distributions) with the step's z_(t-1) recorded."""

    def __init__(self, ssm: LinearGaussianSSM):
        super().__init__()
        self.ssm = ssm
        self.latent_dim, self.obs_dim = ssm.latent_dim, ssm.obs_dim

    @filtering_step
    def step(self, t: int, z_prev: Tensor, x_t: Tensor) -> Tensor:
        self._record(t, z_prev)
        z = pyro.sample(f"z_{t}", dist.Normal(z_prev @ self.ssm.A.T, self.ssm.q).to_event(1))
        pyro.sample(f"x_{t}", dist.Normal(z @ self.ssm.C.T, self.ssm.r).to_event(1), obs=x_t)
        return z

    def sample(self, n: int, T: int, seed: int) -> Tensor:
        return self.ssm.sample(n, T, seed=seed)[0]

    def best_diagonal(self, xs: Tensor, z_prevs: Tensor) -> Tensor:
        A, C, Q, R = (p.detach() for p in (self.ssm.A, self.ssm.C, self.ssm.Q, self.ssm.R))
        opt = step_optimum(A, C, Q, R, z_prevs, xs)
        return opt.free_energy + diagonal_gap(opt.precision)

    def exact_step(self, xs: Tensor, z_prevs: Tensor) -> Tensor:
        """The exact step optimum F*_t = -log p(x_t | z_(t-1)) given z_(t-1), (B, T)."""
        A, C, Q, R = (p.detach() for p in (self.ssm.A, self.ssm.C, self.ssm.Q, self.ssm.R))
        return step_optimum(A, C, Q, R, z_prevs, xs).free_energy


class CoupledChain(SteppedModel):
    """z1_t ~ N(A z1_(t-1), diag q1²), z2_t ~ N(B z1_t, diag q2²), x_t ~ N(C z2_t, diag r²); z1_0 = 0.

    Sites ``z1_{t}`` (B, d1), ``z2_{t}`` (B, d2), ``x_{t}`` (B, n). The step hands on z1_t only.
    """

    def __init__(self, d1: int = 2, d2: int = 2, n: int = 4, seed: int = 0, coupling: float = 1.0):
        super().__init__()
        g = torch.Generator().manual_seed(10_000 + seed)
        self.A = stable_matrix(d1, 0.9, g)
        self.B = coupling * torch.randn(d2, d1, generator=g) / d1**0.5
        self.C = torch.randn(n, d2, generator=g) / d2**0.5
        self.q1, self.q2, self.r = uniform(0.3, 0.7, d1, g), uniform(0.3, 0.7, d2, g), uniform(0.3, 0.7, n, g)
        self.d1, self.d2, self.latent_dim, self.obs_dim = d1, d2, d1, n

    @filtering_step
    def step(self, t: int, z1_prev: Tensor, x_t: Tensor) -> Tensor:
        self._record(t, z1_prev)
        z1 = pyro.sample(f"z1_{t}", dist.Normal(z1_prev @ self.A.T, self.q1).to_event(1))
        z2 = pyro.sample(f"z2_{t}", dist.Normal(z1 @ self.B.T, self.q2).to_event(1))
        pyro.sample(f"x_{t}", dist.Normal(z2 @ self.C.T, self.r).to_event(1), obs=x_t)
        return z1

    @torch.no_grad()
    def sample(self, n: int, T: int, seed: int) -> Tensor:
        g = torch.Generator().manual_seed(seed)
        z1, xs = torch.zeros(n, self.d1), []
        for _ in range(T):
            z1 = z1 @ self.A.T + self.q1 * torch.randn(z1.shape, generator=g)
            z2 = z1 @ self.B.T + self.q2 * torch.randn(n, self.d2, generator=g)
            xs.append(z2 @ self.C.T + self.r * torch.randn(n, self.obs_dim, generator=g))
        return torch.stack(xs, 1)

    def stacked(self):
        """The step as one LG-SSM step in w = (z1, z2): w_t ~ N(A_w w_(t-1), Q_w), x_t ~ N(C_w w_t, R)."""
        d1, d2 = self.d1, self.d2
        Q1, Q2 = torch.diag(self.q1**2), torch.diag(self.q2**2)
        A_w = torch.zeros(d1 + d2, d1 + d2)
        A_w[:d1, :d1], A_w[d1:, :d1] = self.A, self.B @ self.A
        Q_w = torch.cat([torch.cat([Q1, Q1 @ self.B.T], 1), torch.cat([self.B @ Q1, self.B @ Q1 @ self.B.T + Q2], 1)])
        C_w = torch.cat([torch.zeros(self.obs_dim, d1), self.C], 1)
        return A_w, C_w, Q_w, torch.diag(self.r**2)

    def step_precision(self) -> Tensor:
        """Precision L of the joint step posterior of (z1_t, z2_t), written out directly (for checking)."""
        Q1i, Q2i, Ri = torch.diag(self.q1**-2), torch.diag(self.q2**-2), torch.diag(self.r**-2)
        top = torch.cat([Q1i + self.B.T @ Q2i @ self.B, -self.B.T @ Q2i], 1)
        bottom = torch.cat([-Q2i @ self.B, Q2i + self.C.T @ Ri @ self.C], 1)
        return torch.cat([top, bottom])

    def best_diagonal(self, xs: Tensor, z_prevs: Tensor) -> Tensor:
        opt = self._optimum(xs, z_prevs)
        return opt.free_energy + diagonal_gap(opt.precision)

    def exact_step(self, xs: Tensor, z_prevs: Tensor) -> Tensor:
        """The exact step optimum F*_t = -log p(x_t | z1_(t-1)) given z1_(t-1) (the joint family's floor), (B, T)."""
        return self._optimum(xs, z_prevs).free_energy

    def _optimum(self, xs: Tensor, z_prevs: Tensor):
        A_w, C_w, Q_w, R = self.stacked()
        w_prev = torch.cat([z_prevs, z_prevs.new_zeros(z_prevs.shape[:-1] + (self.d2,))], -1)
        return step_optimum(A_w, C_w, Q_w, R, w_prev, xs)


class LotkaVolterra(SteppedModel):
    """Stochastic predator-prey dynamics on log-populations z = (log prey, log predator), Poisson counts::

        z_t ~ N(z_(t-1) + dt (a - b e^{v}, -c + d e^{u}), σ²)     (σ0 at t = 1, from a fixed z_0)
        x_t ~ Poisson(e^{z_t})                                      two counts per step

    Equilibrium: prey c/d, predators a/b. Log-rates are clamped to [-10, 12] for numerical safety only.
    """

    def __init__(self, a=1.0, b=0.01, c=1.0, d=0.005, dt=0.2, sigma=0.15, sigma0=0.3, z0=(5.6, 4.3)):
        super().__init__()
        self.a, self.b, self.c, self.d, self.dt = a, b, c, d, dt
        self.sigma, self.sigma0 = sigma, sigma0
        self.z0 = torch.tensor(z0)
        self.latent_dim, self.obs_dim = 2, 2

    def initial_state(self, batch: int) -> Tensor:
        return self.z0.expand(batch, 2)

    def drift(self, z: Tensor) -> Tensor:
        e = z.clamp(-10.0, 12.0).exp()
        du = self.a - self.b * e[..., 1]
        dv = self.d * e[..., 0] - self.c
        return z + self.dt * torch.stack([du, dv], -1)

    @filtering_step
    def step(self, t: int, z_prev: Tensor, x_t: Tensor) -> Tensor:
        self._record(t, z_prev)
        scale = self.sigma0 if t == 1 else self.sigma
        z = pyro.sample(f"z_{t}", dist.Normal(self.drift(z_prev), scale).to_event(1))
        pyro.sample(f"x_{t}", dist.Poisson(z.clamp(-10.0, 12.0).exp()).to_event(1), obs=x_t)
        return z

    @torch.no_grad()
    def sample(self, n: int, T: int, seed: int) -> Tensor:
        g = torch.Generator().manual_seed(seed)
        z, xs = self.initial_state(n), []
        for t in range(1, T + 1):
            z = self.drift(z) + (self.sigma0 if t == 1 else self.sigma) * torch.randn(n, 2, generator=g)
            xs.append(torch.poisson(z.clamp(-10.0, 12.0).exp(), generator=g))
        return torch.stack(xs, 1)


# ------------------------------------------------------------------------------------------- measuring


def summary(per_step: Tensor, observed: Tensor) -> tuple:
    """Mean over observed (sequence, step) and its standard error over sequences."""
    w = observed.to(per_step.dtype)
    mean = ((per_step * w).sum() / w.sum()).item()
    per_seq = (per_step * w).sum(1) / w.sum(1).clamp_min(1)
    se = (per_seq.std() / math.sqrt(per_seq.numel())).item() if per_seq.numel() > 1 else float("nan")
    return mean, se


def run_filter(m: SteppedModel, guide: IterativeGuide, xs: Tensor, seed: int) -> tuple:
    """Filtering free energy per step (B, T), observed flags and the z_(t-1) the guide sampled."""
    with seeded(seed):
        out = filtering_free_energy(m.model, guide, xs)
    return checked(out["free_energy"]), out["observed"], m.recorded_z_prev(xs.size(1))


def run_given(m: SteppedModel, kwargs: dict, xs: Tensor, z_prevs: Tensor, seed: int) -> Tensor:
    """Filtering free energy per step of a non-amortized guide (``kwargs``) run on every step given the recorded
    z_(t-1) as data. Such a guide registers no parameters, so this can run between training steps."""
    with seeded(seed):
        guide = make_guide(m.conditioned_model, 0, kwargs)
        return checked(filtering_free_energy(m.conditioned_model, guide, xs, z_prevs)["free_energy"])


def checked(fe: Tensor) -> Tensor:
    if not torch.isfinite(fe).all():
        raise FloatingPointError("non-finite filtering free energy")
    return fe


def make_guide(model: Callable, K: int, kwargs: dict) -> IterativeGuide:
    kwargs = dict(kwargs)
    return IterativeGuide(model, num_iterations=kwargs.pop("num_iterations", K), **kwargs)


PRIOR = {"num_iterations": 0}


def make_measure(m: SteppedModel, xs: Tensor, args, reference: Optional[dict] = None):
    """``measure(guide)``: the guide's held-out filtering free energy per step minus the reference free energy
    given the guide's own z_(t-1) (closed-form best diagonal posterior, or the non-amortized ``reference``), and
    the same for the prior prediction given those z_(t-1) (how far the update must move from where it starts)."""
    eval_seed, given_seed = args.seed + 77, args.seed + 78

    def measure(guide: IterativeGuide) -> dict:
        fe, observed, z_prevs = run_filter(m, guide, xs, eval_seed)
        if reference is None:
            best = m.exact_step(xs, z_prevs) if args.exact else m.best_diagonal(xs, z_prevs)
        else:
            best = run_given(m, reference, xs, z_prevs, given_seed)
        prior = run_given(m, PRIOR, xs, z_prevs, given_seed)
        gap, se = summary(fe - best, observed)
        prior_gap, prior_se = summary(prior - best, observed)
        return {"gap": gap, "se": se, "prior_gap": prior_gap, "prior_se": prior_se,
                "free_energy": mean_free_energy_per_step({"free_energy": fe, "observed": observed}),
                "reference": summary(best, observed)[0]}  # fmt: skip

    return measure


def train_and_track(m: SteppedModel, kwargs: dict, args, checkpoints: List[int], measure, desc: str) -> List[dict]:
    """Train one guide on fresh batches; ``measure(guide)`` at each checkpoint (step 0 = untrained)."""
    pyro.clear_param_store()
    pyro.set_rng_seed(args.seed)
    kwargs = dict(kwargs)
    elbo = AmortizedFilteringELBO(**kwargs.pop("elbo", {}))  # e.g. {"elbo": {"train_all_iterations": false}}
    guide = make_guide(m.model, args.num_iterations, kwargs)
    svi = pyro.infer.SVI(m.model, guide, pyro.optim.Adam({"lr": args.lr}), elbo)

    def batch(i: int) -> Tensor:
        return m.sample(args.batch_size, args.T, seed=args.seed * 100003 + 1000 + i)

    svi.evaluate_loss(batch(0))  # builds the update networks from the training seed, before step 0 is measured
    trainable = len(pyro.get_param_store().keys()) > 0  # e.g. num_iterations=0: nothing to train, measure only
    rows, train_seconds = [], 0.0
    bar = tqdm(range(max(checkpoints) + 1), desc=desc, leave=False)
    for i in bar:
        if i in checkpoints:
            rows.append({"step": i, "train_seconds": round(train_seconds, 1), **measure(guide)})
            bar.set_postfix(gap=f"{rows[-1]['gap']:.3f}")
        if i == max(checkpoints):
            break
        t0 = time.time()
        loss = svi.step(batch(i)) if trainable else 0.0
        train_seconds += time.time() - t0
        if not math.isfinite(loss):
            raise FloatingPointError(f"{desc}: non-finite loss at step {i}")
    return rows


def fixed_row(m: SteppedModel, kwargs: dict, measure) -> dict:
    """A non-amortized method (nothing to train), measured like a guide at a checkpoint."""
    pyro.clear_param_store()
    t0 = time.time()
    row = {"step": 0, "kind": "fixed", **measure(make_guide(m.model, 0, kwargs))}
    return {**row, "train_seconds": round(time.time() - t0, 1)}


SKIPPED: List[str] = []  # configurations the guide refused (ValueError), reported at the end


def grid_rows(m: SteppedModel, model_name: str, args, grid, measure) -> List[dict]:
    rows = []
    for name, kwargs in tqdm(grid.items(), desc=f"{model_name} configs"):
        try:
            tracked = train_and_track(m, kwargs, args, args.checkpoints, measure, f"{model_name} {name}")
        except ValueError as e:  # e.g. a combination of options the guide does not support
            SKIPPED.append(f"{model_name} {name} {json.dumps(kwargs)}: {e}")
            tqdm.write(f"skipped {SKIPPED[-1]}")
            continue
        rows += [{"model": model_name, "config": name, "kind": "amortized", **r} for r in tracked]
    return rows


# ---------------------------------------------------------------------------------------------- parts


def closed_form_part(m: SteppedModel, model_name: str, args, grid) -> List[dict]:
    xs = m.sample(args.test_sequences, args.T, seed=999_999 + args.seed)
    measure = make_measure(m, xs, args)
    rows = grid_rows(m, model_name, args, grid, measure)
    adam = f"adam{args.adam_kwargs['num_iterations']}"
    for name, kwargs in (("prior", PRIOR), (adam, args.adam_kwargs)):
        rows.append({"model": model_name, "config": name, **fixed_row(m, kwargs, measure)})
    return rows


def part_defaults(args, grid) -> List[dict]:
    m = LGSSMProgram(LinearGaussianSSM.random(latent_dim=4, obs_dim=8, seed=args.seed))
    return closed_form_part(m, "lgssm", args, grid)


def part_coupled(args, grid) -> List[dict]:
    rows = closed_form_part(CoupledChain(seed=args.seed), "coupled", args, grid)
    if args.no_single_site:
        return rows
    single = LGSSMProgram(LinearGaussianSSM.random(latent_dim=4, obs_dim=8, seed=args.seed))
    return rows + closed_form_part(single, "single_site", args, grid)


def part_nonlinear(args, grid) -> List[dict]:
    m = LotkaVolterra()
    xs = m.sample(args.test_sequences, args.T, seed=999_999 + args.seed)
    reference = args.reference_kwargs
    measure = make_measure(m, xs, args, reference)
    name = "lotka_volterra"
    # the reference on its own trajectory first: its paired gap to itself is a check of the estimator (≈ 0 within
    # Monte-Carlo error), and its free energy is the baseline of the unpaired differences
    rows = [{"model": name, "config": f"reference@{reference['num_iterations']}",
             **fixed_row(m, reference, measure)}]  # fmt: skip
    rows += grid_rows(m, name, args, grid, measure)
    fixed = {
        f"adam{args.adam_kwargs['num_iterations']}": args.adam_kwargs,
        f"reference@{args.check_iterations}": {**reference, "num_iterations": args.check_iterations},
    }
    for config, kwargs in fixed.items():
        rows.append({"model": name, "config": config, **fixed_row(m, kwargs, measure)})
    for r in rows:
        r["unpaired_gap"] = r["free_energy"] - rows[0]["free_energy"]
    return rows


# --------------------------------------------------------------------------------------------- output

COLUMNS = ["part", "model", "config", "kind", "step", "gap", "se", "prior_gap", "prior_se", "free_energy", "reference",
           "unpaired_gap", "train_seconds"]  # fmt: skip


def write_csv(rows: List[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})


def plot(rows: List[dict], path: Path, title: str) -> None:
    """Gap vs SVI steps (log y), one line per configuration; dotted: the prior prediction's gap given the same
    configuration's z_(t-1) (how far its update must move); dashed: the methods without training."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    floor = 1e-3
    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, len(models), figsize=(7 * len(models), 5), squeeze=False)
    for ax, model in zip(axes[0], models):
        mine = [r for r in rows if r["model"] == model]
        last = max([r["step"] for r in mine if r["kind"] == "amortized"] or [1])
        for config in dict.fromkeys(r["config"] for r in mine):
            pts = [r for r in mine if r["config"] == config]
            if pts[0]["kind"] == "fixed":
                y = max(pts[0]["gap"], floor)
                ax.axhline(y, ls="--", lw=1, color="k" if config == "prior" else "gray")
                ax.annotate(f"{config}: {pts[0]['gap']:.3g}", (last, y), fontsize=7, ha="right", va="bottom")
                continue
            steps = [r["step"] for r in pts]
            (line,) = ax.plot(steps, [max(r["gap"], floor) for r in pts], marker="o", label=config)
            ax.plot(steps, [max(r["prior_gap"], floor) for r in pts], ls=":", lw=1, color=line.get_color())
        ax.set_yscale("log")
        ax.set_xlabel("SVI steps")
        ax.set_ylabel(f"held-out gap, nats/step (clipped at {floor})")
        ax.set_title(f"{title}: {model}  (dotted: prior prediction given the same z_(t-1))", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def cell(r: dict, key: str = "gap") -> str:
    return f"{r[key]:.4f} ± {r[key.replace('gap', 'se')]:.4f}"


def table(rows: List[dict]) -> str:
    lines = []
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model]
        steps = sorted({r["step"] for r in mine if r["kind"] == "amortized"})
        width = max(len(r["config"]) for r in mine) + 2
        lines.append(f"\n{model}: held-out gap, nats/step (± standard error over sequences)")
        head = "config".ljust(width) + "".join(f"step {s}".rjust(21) for s in steps)
        lines.append(head + "prior pred. (last)".rjust(22) + "free energy".rjust(13))
        for config in dict.fromkeys(r["config"] for r in mine):
            pts = {r["step"]: r for r in mine if r["config"] == config}
            last = pts[max(pts)]
            if last["kind"] == "fixed":
                cells = [""] * (len(steps) - 1) + [cell(last)]  # no training: in the last column
            else:
                cells = [cell(pts[s]) if s in pts else "" for s in steps]
            lines.append(config.ljust(width) + "".join(c.rjust(21) for c in cells) + cell(last, "prior_gap").rjust(22)
                         + f"{last['free_energy']:.4f}".rjust(13))  # fmt: skip
    lines.append("prior pred.: the K = 0 prior prediction's gap given the same z_(t-1), at the last checkpoint")
    return "\n".join(lines)


def coupled_goal(rows: List[dict]) -> str:
    final = max(r["step"] for r in rows if r["kind"] == "amortized")
    out = [f"\ncoupled vs single-site at {final} SVI steps (goal: coupled <= 0.15 and <= 2x single-site)"]
    for config in dict.fromkeys(r["config"] for r in rows if r["kind"] == "amortized"):
        get = {r["model"]: r["gap"] for r in rows if r["config"] == config and r["step"] == final}
        c, s = get.get("coupled"), get.get("single_site")
        if c is None or s is None:
            continue
        ok = c <= 0.15 and c <= 2 * s
        out.append(f"{config}: coupled {c:.4f}, single-site {s:.4f}, ratio {c / s if s > 0 else float('inf'):.2f}"
                   f" -> {'met' if ok else 'not met'}")  # fmt: skip
    return "\n".join(out)


def main(argv=None) -> List[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=PARTS, required=True)
    p.add_argument("--steps", type=int, default=600, help="SVI steps (the last checkpoint)")
    p.add_argument("--checkpoints", type=int, nargs="+", default=None, help="SVI steps to measure at (<= --steps)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--num-iterations", type=int, default=5, help="K of the amortized guides")
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate of pyro.optim.Adam for SVI")
    p.add_argument("--T", type=int, default=None, help="sequence length (default 20; nonlinear 30)")
    p.add_argument("--test-sequences", type=int, default=256)
    p.add_argument("--guide-kwargs", type=json.loads, default={}, help="JSON kwargs for every IterativeGuide")
    p.add_argument("--grid", default=None, help="JSON {name: kwargs}, @file.json, or preset 'default' / 'updates'")
    p.add_argument("--adam-kwargs", type=json.loads, default={}, help=f"per-step Adam baseline, over {ADAM}")
    p.add_argument("--reference-kwargs", type=json.loads, default={},
                   help=f"nonlinear: the converged per-step reference, over {REFERENCE}")  # fmt: skip
    p.add_argument("--check-iterations", type=int, default=300, help="nonlinear: reference convergence check")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--exact", action="store_true",
                   help="gap to the exact step optimum -log p(x_t | z_(t-1)) instead of the best diagonal posterior "
                        "(for posterior='full' / 'joint' guides)")
    p.add_argument("--no-single-site", action="store_true", help="coupled: skip the single-site LG-SSM comparison")
    p.add_argument("--out-dir", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.T = args.T or DEFAULT_T[args.part]
    args.adam_kwargs = {**ADAM, **args.adam_kwargs}
    args.reference_kwargs = {**REFERENCE, **args.reference_kwargs}
    checkpoints = args.checkpoints or DEFAULT_CHECKPOINTS[args.part]
    args.checkpoints = sorted({c for c in checkpoints if c < args.steps} | {args.steps})
    grid = parse_grid(args.grid, args.part, args.guide_kwargs)

    t0 = time.time()
    SKIPPED.clear()
    rows = {"defaults": part_defaults, "coupled": part_coupled, "nonlinear": part_nonlinear}[args.part](args, grid)
    rows = [{"part": args.part, **r} for r in rows]
    stem = args.out_dir / f"inference_quality_{args.part}"
    write_csv(rows, stem.with_suffix(".csv"))
    title = args.part + (", gap to the exact step optimum" if args.exact else ", gap to the best diagonal posterior")
    plot(rows, stem.with_suffix(".png"), title)
    print(table(rows))
    if args.part == "coupled":
        print(coupled_goal(rows))
    if args.part == "nonlinear":
        print(f"\nnonlinear: gap = paired, each method's own z_(t-1) on the same sequences, reference "
              f"{json.dumps(args.reference_kwargs)}; unpaired = difference of the filtering free energies, each "
              "method on its own trajectory:")  # fmt: skip
        for r in rows:
            print(f"  {r['config']:<24} step {r['step']:>4}: free energy {r['free_energy']:.4f}, "
                  f"unpaired {r['unpaired_gap']:.4f}")  # fmt: skip
    for line in SKIPPED:
        print(f"skipped (refused by the guide): {line}")
    print(f"\nwrote {stem}.csv and {stem}.png ({time.time() - t0:.0f} s)")
    return rows


if __name__ == "__main__":
    main()
