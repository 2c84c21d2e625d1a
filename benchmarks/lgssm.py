"""LG-SSM benchmark: AVF and non-amortized filtering EM against the closed-form per-step optimum.

Measures, on held-out sequences of a random stable linear-Gaussian SSM (latent 4, observation 8):

* the gap between each method's analytic step free energy and the best diagonal-Normal posterior given the
  method's own sample z_{t-1} (``F*_t + (Σ log L_ii − log det L)/2``), in nats per step;
* that the filtering bound is never below the exact Kalman negative log-likelihood;
* the average analytic free energy per inference iteration (iteration 0 = prior prediction);
* amortization: how many Adam iterations per step non-amortized filtering EM needs to match AVF's K = 5.

Usage::

    python benchmarks/lgssm.py --train-steps 1500 --out benchmarks/results/lgssm.json
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import pyro
import torch
from tqdm import tqdm

from pyro_avf import AmortizedFilteringELBO, IterativeGuide
from pyro_avf.baselines.kalman import diagonal_gap, expected_step_free_energy, kalman_filter, step_optimum
from pyro_avf.models.lgssm import LinearGaussianSSM
from pyro_avf.training import fit


def benchmark_data(seed: int, T: int, test_sequences: int):
    """The benchmark's LG-SSM (latent 4, observation 8, random stable dynamics from ``seed``), 3,200 training
    sequences and ``test_sequences`` held-out ones of T steps: ``(ssm, xs_train, xs_test)``."""
    ssm = LinearGaussianSSM.random(latent_dim=4, obs_dim=8, seed=seed)
    xs_train, _ = ssm.sample(64 * 50, T, seed=seed + 1)
    xs_test, _ = ssm.sample(test_sequences, T, seed=seed + 2)
    return ssm, xs_train, xs_test


def analytic_gap(ssm: LinearGaussianSSM, guide: IterativeGuide, xs: torch.Tensor) -> dict:
    """Run the guide once; compare its analytic step free energies with the diagonal optimum per step."""
    elbo = AmortizedFilteringELBO()
    elbo.loss(ssm.model, guide, xs)
    A, C, Q, R = (p.detach() for p in (ssm.A, ssm.C, ssm.Q, ssm.R))
    z_prev = torch.zeros(xs.shape[0], A.shape[0])
    fe, best, per_iteration = [], [], []
    for t in range(xs.shape[1]):
        site = guide.trace.nodes[f"z_{t + 1}"]
        per_iteration.append(
            torch.stack(
                [
                    expected_step_free_energy(A, C, Q, R, z_prev, xs[:, t], loc, log_scale.exp()).mean()
                    for ((loc, log_scale),) in guide.last_pass.steps[t].lambdas
                ]
            )
        )
        loc, log_scale = (p.detach() for p in site["infer"]["avf_lambda"])
        fe.append(expected_step_free_energy(A, C, Q, R, z_prev, xs[:, t], loc, log_scale.exp()))
        opt = step_optimum(A, C, Q, R, z_prev, xs[:, t])
        best.append(opt[0] + diagonal_gap(opt[2]))
        z_prev = site["value"].detach()
    fe, best = torch.stack(fe, 1), torch.stack(best, 1)
    return {
        "free_energy_per_step": fe.mean().item(),
        "diagonal_optimum_per_step": best.mean().item(),
        "gap_per_step": (fe - best).mean().item(),
        "per_iteration": torch.stack(per_iteration).mean(0).tolist() if guide.num_iterations else [],
        "per_iteration_monte_carlo": elbo.diagnostics["free_energy"].mean((0, 1)).tolist(),
        "mc_bound_per_sequence": elbo.diagnostics["free_energy"][..., -1].sum(1),
    }


def train_avf(ssm, xs_train, steps, K, lr, seed, batch=64, **guide_kwargs) -> IterativeGuide:
    """``steps`` Adam steps (rounded up to whole epochs of shuffled batches) with :func:`pyro_avf.training.fit`."""
    pyro.set_rng_seed(seed)
    per_epoch = math.ceil(xs_train.shape[0] / batch)
    result = fit(ssm, xs_train, epochs=math.ceil(steps / per_epoch), batches_per_epoch=min(steps, per_epoch),
                 batch_size=batch, lr=lr, clip_norm=None, guide_kwargs=dict(num_iterations=K, **guide_kwargs),
                 seed=seed)  # fmt: skip
    return result.guide


def em_sweep(ssm, xs_test, args) -> dict:
    """Non-amortized filtering EM (per-step Adam from the prior) at each number of iterations."""
    em = {}
    for K in tqdm(args.em_iterations, desc="filtering EM"):
        pyro.set_rng_seed(args.seed + 10)
        g = IterativeGuide(
            ssm.model, num_iterations=K, update="adam", lr=args.em_lr, lr_decay=0.5, num_samples=args.em_samples
        )
        out = analytic_gap(ssm, g, xs_test[: args.em_sequences])
        for key in ("mc_bound_per_sequence", "per_iteration", "per_iteration_monte_carlo"):
            out.pop(key)
        em[K] = out
    return em


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train-steps", type=int, default=1500)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--T", type=int, default=20)
    p.add_argument("--test-sequences", type=int, default=256)
    p.add_argument("--em-iterations", type=int, nargs="+", default=[5, 10, 20, 50, 100, 200, 400])
    p.add_argument("--em-lr", type=float, default=0.1)
    p.add_argument("--em-samples", type=int, default=16)
    p.add_argument("--em-sequences", type=int, default=64, help="held-out sequences for the (slow) EM sweep")
    p.add_argument("--em-only", action="store_true", help="skip AVF training; only the filtering EM sweep")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/lgssm.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    pyro.set_rng_seed(args.seed)

    ssm, xs_train, xs_test = benchmark_data(args.seed, args.T, args.test_sequences)
    kalman = kalman_filter(ssm.A.detach(), ssm.C.detach(), ssm.Q, ssm.R, xs_test)
    kalman_nll = kalman.nll.sum(1)
    results = {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} thread(s)",
        "date": time.strftime("%Y-%m-%d"),
        "args": {k: str(v) for k, v in vars(args).items()},
    }

    if args.em_only:
        results["em_adam"] = em_sweep(ssm, xs_test, args)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))
        print(json.dumps(results, indent=2))
        return
    t0 = time.time()
    guide = train_avf(ssm, xs_train, args.train_steps, 5, args.lr, args.seed, encode_observation=True)
    results["avf_train_seconds"] = time.time() - t0
    pyro.set_rng_seed(args.seed + 10)
    avf = analytic_gap(ssm, guide, xs_test)
    pyro.set_rng_seed(args.seed + 10)
    avf_em_subset = analytic_gap(ssm, guide, xs_test[: args.em_sequences])
    avf_em_subset.pop("mc_bound_per_sequence")
    results["avf_K5_on_em_sequences"] = avf_em_subset
    below = (avf.pop("mc_bound_per_sequence") < kalman_nll).float().mean().item()
    results["avf_K5"] = {**avf, "fraction_of_sequences_with_bound_below_kalman_nll": below}
    results["kalman_nll_per_step"] = kalman_nll.mean().item() / args.T

    em = em_sweep(ssm, xs_test, args)
    results["em_adam"] = em
    target = avf_em_subset["free_energy_per_step"]
    matching = [K for K in args.em_iterations if em[K]["free_energy_per_step"] <= target]
    gap_matching = [K for K in args.em_iterations if em[K]["gap_per_step"] <= avf_em_subset["gap_per_step"]]
    results["em_iterations_to_match_avf_K5_gap"] = gap_matching[0] if gap_matching else f"> {args.em_iterations[-1]}"
    results["em_iterations_to_match_avf_K5"] = matching[0] if matching else f"> {args.em_iterations[-1]}"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
