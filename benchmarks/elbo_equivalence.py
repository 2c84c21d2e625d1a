"""Trace_ELBO vs AmortizedFilteringELBO with the same IterativeGuide: expected loss, variance, step executions.

Both losses estimate the same filtering free energy; AmortizedFilteringELBO uses analytic KL terms where it can.
Neither replays the model: each time step runs K + 1 times (K inference iterations, the first also being the
prior prediction, plus the final run).

Usage::

    python benchmarks/elbo_equivalence.py --samples 400
"""

from __future__ import annotations

import argparse
import time

import pyro
import torch
from pyro.infer import Trace_ELBO

from pyro_avf import AmortizedFilteringELBO, IterativeGuide
from pyro_avf.models.lgssm import LinearGaussianSSM


def measure(K: int, samples: int, seed: int = 0) -> dict:
    ssm = LinearGaussianSSM.random(latent_dim=4, obs_dim=8, seed=seed)
    xs, _ = ssm.sample(16, 10, seed=seed + 1)
    pyro.set_rng_seed(seed)
    guide = IterativeGuide(ssm.model, num_iterations=K, hidden_size=64)
    out = {"K": K}
    for name, elbo in (("amortized_filtering_elbo", AmortizedFilteringELBO()), ("trace_elbo", Trace_ELBO())):
        elbo.loss(ssm.model, guide, xs)  # warm-up: Trace_ELBO guesses max_plate_nesting on its first call
        pyro.set_rng_seed(seed + 1)
        t0 = time.perf_counter()
        losses = torch.tensor([elbo.loss(ssm.model, guide, xs) for _ in range(samples)])
        seconds = (time.perf_counter() - t0) / samples
        out[name] = {
            "mean_loss": losses.mean().item(),
            "standard_error": (losses.std() / samples**0.5).item(),
            "std": losses.std().item(),
            "step_executions_per_time_step": guide.last_pass.step_executions / xs.shape[1],
            "seconds_per_loss": seconds,
            "losses": losses,
        }
    # both passes start from the same seed and draw the same samples: pair them
    diff = out["amortized_filtering_elbo"].pop("losses") - out["trace_elbo"].pop("losses")
    out["paired_difference"] = {"mean": diff.mean().item(), "standard_error": (diff.std() / samples**0.5).item()}
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=400)
    p.add_argument("--iterations", type=int, nargs="+", default=[0, 1, 5])
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    print(
        "| K | loss: AmortizedFilteringELBO | loss: Trace_ELBO | paired difference (same samples) | "
        "std ratio (ours/Trace) | step runs per time step (ours / Trace) |"
    )
    print("|---|---|---|---|---|---|")
    for K in args.iterations:
        r = measure(K, args.samples)
        a, b, d = r["amortized_filtering_elbo"], r["trace_elbo"], r["paired_difference"]
        print(
            f"| {K} | {a['mean_loss']:.2f} ± {a['standard_error']:.2f} | {b['mean_loss']:.2f} ± "
            f"{b['standard_error']:.2f} | {d['mean']:.2f} ± {d['standard_error']:.2f} | {a['std'] / b['std']:.2f} | "
            f"{a['step_executions_per_time_step']:.0f} / {b['step_executions_per_time_step']:.0f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
