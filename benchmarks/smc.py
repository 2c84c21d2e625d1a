r"""SMC benchmark: particle estimates of log p(x_{1:T}) with the AVF proposal and the bootstrap filter, against
the exact Kalman value, on the LG-SSM of ``benchmarks/lgssm.py`` (latent 4, observation 8).

An AVF guide (K = 5, the library's defaults) is trained as ``benchmarks/lgssm.py`` does, for ``--train-steps``
steps; then, for each number of particles N and each of ``--seeds`` seeds, :func:`pyro_avf.smc.smc_log_likelihood`
estimates :math:`\log \hat p(x_{1:T})` of every held-out sequence, and the error in nats per step is

.. math::

    e = \frac{1}{T}\big(\log p(x_{1:T}) - \log \hat p(x_{1:T})\big)
      = -\frac{\log \hat p}{T} - \Big(-\frac{\log p}{T}\Big) \qquad (\mathbb{E}[e] \ge 0),

reported as its mean over seeds and sequences, the spread (standard deviation over seeds of the per-seed mean)
and the mean absolute error per sequence, for the AVF proposal and for the bootstrap filter (the same code with
``num_iterations=0``) at the same N and at more particles, with the wall time per sequence. The last column says
how many particles the bootstrap filter needs for the AVF proposal's mean error (interpolated in its sweep). Two
reference rows use the exact step posterior of the LG-SSM: ``oracle_full`` proposes from it (the locally optimal
proposal), ``oracle_diag`` from its best diagonal Normal (the floor of the guide's family).

Usage::

    python benchmarks/smc.py --train-steps 600 --out benchmarks/results/smc_lgssm.csv
"""

from __future__ import annotations

import argparse
import math
import platform
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pyro
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from lgssm import benchmark_data, train_avf  # noqa: E402

from pyro_avf import IterativeGuide  # noqa: E402
from pyro_avf.baselines.kalman import kalman_filter, step_optimum  # noqa: E402
from pyro_avf.online import streamed_free_energy  # noqa: E402
from pyro_avf.smc import ParticleWeights, SMCEstimate, smc_log_likelihood, systematic_resample  # noqa: E402


def oracle_log_likelihood(ssm, xs, num_particles, seed, diagonal=False) -> SMCEstimate:
    r"""SMC on the LG-SSM with the exact step posterior :math:`p(z_t \mid z_{t-1}, x_t)` as proposal (the locally
    optimal one, ``oracle_full``), or with the best member of the guide's family (``diagonal``: its mean and the
    variances :math:`1/L_{ii}`, the minimiser of :math:`D_{KL}(q \| p)` over diagonal Normals, ``oracle_diag``):
    what the AVF proposal would be with a perfect update network. Same weights and resampling as
    :class:`~pyro_avf.smc.ParticleFilter`."""
    from torch.distributions import MultivariateNormal

    A, C, Q, R = (v.detach().double() for v in (ssm.A, ssm.C, ssm.Q, ssm.R))
    batch, steps, _ = xs.shape
    n, d = num_particles, A.size(0)
    weights = ParticleWeights(batch, n)
    ess, resampled = torch.zeros(batch, steps, dtype=torch.float64), torch.zeros(batch, steps, dtype=torch.bool)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        z = torch.zeros(batch, n, d, dtype=torch.float64)
        observed = torch.ones(batch, dtype=torch.bool)
        for t in range(steps):
            x = xs[:, t, None].double().expand(batch, n, -1)
            opt = step_optimum(A, C, Q, R, z, x)
            if diagonal:
                cov = torch.diag_embed(torch.diagonal(opt.precision, dim1=-2, dim2=-1).reciprocal())
            else:
                cov = torch.linalg.inv(opt.precision)
            q = MultivariateNormal(opt.mean, covariance_matrix=cov)
            new = q.sample()
            log_w = (MultivariateNormal(new @ C.T, R).log_prob(x) + MultivariateNormal(z @ A.T, Q).log_prob(new)
                     - q.log_prob(new))  # fmt: skip
            weights.update(log_w, observed)
            ess[:, t], z = weights.ess(), new
            resampled[:, t] = which = ess[:, t] < 0.5 * n
            if which.any():
                index = systematic_resample(weights.normalized[which])
                z[which] = torch.gather(z[which], 1, index[..., None].expand(-1, -1, d))
                weights.reset(which)
    return SMCEstimate(weights.log_marginal, ess, resampled)


def sweep(name, estimate, xs, exact_nll, particles, seeds) -> list:
    """One row per N: the error of -log p̂/T against the exact value over ``seeds`` seeds, and the time;
    ``estimate(num_particles, seed)`` is an :class:`~pyro_avf.smc.SMCEstimate`."""
    T, rows = xs.size(1), []
    for n in particles:
        errors, ess, resampled, seconds = [], [], [], 0.0
        for seed in seeds:
            start = time.perf_counter()
            est = estimate(n, seed)
            seconds += time.perf_counter() - start
            errors.append((exact_nll + est.log_marginal) / -T)  # (log p - log p̂) / T per sequence
            ess.append(est.ess.mean().item() / n)
            resampled.append(est.resampled.float().mean().item())
        err = torch.stack(errors)  # (seeds, sequences)
        rows.append({
            "proposal": name, "particles": n, "seeds": len(seeds), "sequences": xs.size(0), "T": T,
            "error_mean": err.mean().item(), "error_sd_over_seeds": err.mean(1).std().item() if len(seeds) > 1
            else float("nan"), "abs_error_per_sequence": err.abs().mean().item(),
            "ess_fraction": sum(ess) / len(ess), "resample_fraction": sum(resampled) / len(resampled),
            "seconds_per_sequence": seconds / (len(seeds) * xs.size(0)),
        })  # fmt: skip
        print(f"{name:>10} N={n:<5} error {rows[-1]['error_mean']:+.4f} ± {rows[-1]['error_sd_over_seeds']:.4f} "
              f"nats/step, {rows[-1]['seconds_per_sequence']:.3f} s/sequence", flush=True)  # fmt: skip
    return rows


def bootstrap_needed(table: pd.DataFrame) -> pd.DataFrame:
    """For each other row, the bootstrap N with the same mean error: interpolated linearly in (log N, log error)
    between the two bootstrap runs around it (the bootstrap error falls monotonically in the sweep)."""
    boot = table[table.proposal == "bootstrap"].sort_values("particles")
    log_n, log_e = boot.particles.map(math.log).tolist(), boot.error_mean.map(math.log).tolist()
    needed = []
    for _, row in table.iterrows():
        target = math.log(row.error_mean) if row.error_mean > 0 else -math.inf
        if row.proposal == "bootstrap":
            needed.append("")
        elif target >= log_e[0]:
            needed.append(f"<= {int(boot.particles.iloc[0])}")
        elif target < log_e[-1]:
            needed.append(f"> {int(boot.particles.iloc[-1])}")
        else:
            i = next(i for i in range(len(log_e) - 1) if log_e[i] >= target > log_e[i + 1])
            frac = (log_e[i] - target) / (log_e[i] - log_e[i + 1])
            needed.append(str(round(math.exp(log_n[i] + frac * (log_n[i + 1] - log_n[i])))))
    return table.assign(bootstrap_particles_for_same_error=needed)


def markdown(table: pd.DataFrame, header: dict) -> str:
    cols = ["proposal", "particles", "error_mean", "error_sd_over_seeds", "abs_error_per_sequence", "ess_fraction",
            "resample_fraction", "seconds_per_sequence", "bootstrap_particles_for_same_error"]  # fmt: skip
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, row in table[cols].iterrows():
        cells = [f"{v:.4f}" if isinstance(v, float) else str(v) for v in row]
        lines.append("| " + " | ".join(cells) + " |")
    head = [f"- {k}: {v}" for k, v in header.items()]
    return "\n".join(["# SMC on the LG-SSM: AVF proposal vs bootstrap filter", "", *head, "", *lines, "",
                      *summary(table), ""])  # fmt: skip


def summary(table: pd.DataFrame) -> list:
    """One sentence per AVF row: its error, the bootstrap particles for the same error, the oracles' errors."""
    by = {(row.proposal, row.particles): row for _, row in table.iterrows()}
    out = []
    for (name, n), row in by.items():
        if not name.startswith("avf"):
            continue
        needed = row.bootstrap_particles_for_same_error
        ratio = f" ({int(needed) / n:.1f}× as many)" if needed.isdigit() else ""
        oracles = [f"{o} {by[(o, n)].error_mean:.4f}" for o in ("oracle_diag", "oracle_full") if (o, n) in by]
        out.append(f"- {name} at N = {n}: {row.error_mean:.4f} nats/step from exact "
                   f"({row.seconds_per_sequence:.3f} s/sequence); the bootstrap filter needs about {needed} particles "
                   f"for the same error{ratio}; at this N: {', '.join(oracles)}.")  # fmt: skip
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train-steps", type=int, default=600)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--K", type=int, default=5, help="inference iterations of the AVF guide")
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--T", type=int, default=20)
    p.add_argument("--test-sequences", type=int, default=32)
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--particles", type=int, nargs="+", default=[16, 64, 256])
    p.add_argument("--bootstrap-particles", type=int, nargs="+", default=[16, 64, 256, 1024, 4096])
    p.add_argument("--guide", type=Path, default=None, help="a state dict from --save-guide, instead of training")
    p.add_argument("--save-guide", type=Path, default=None, help="torch.save the trained guide's state dict here")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/smc_lgssm.csv"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    pyro.set_rng_seed(args.seed)

    ssm, xs_train, xs_test = benchmark_data(args.seed, args.T, args.test_sequences)
    exact_nll = kalman_filter(ssm.A.detach(), ssm.C.detach(), ssm.Q, ssm.R, xs_test).nll.sum(1).double()

    start = time.perf_counter()
    if args.guide is not None:
        saved = torch.load(args.guide, weights_only=True)
        guide = IterativeGuide(ssm.model, num_iterations=args.K, encode_observation=True, hidden_size=args.hidden_size)
        guide.load_state_dict(saved["state_dict"])
        train_seconds = saved["train_seconds"]
    else:
        guide = train_avf(ssm, xs_train, args.train_steps, args.K, args.lr, args.seed, encode_observation=True,
                          hidden_size=args.hidden_size)  # fmt: skip
        train_seconds = time.perf_counter() - start
        if args.save_guide is not None:
            torch.save({"state_dict": guide.state_dict(), "train_seconds": train_seconds}, args.save_guide)
    free_energy, _ = streamed_free_energy(ssm, guide, xs_test, seed=args.seed + 10, per_sequence=True)
    filtering_gap = ((free_energy - exact_nll) / args.T).mean().item()  # the N = 1 estimate's error, in expectation
    print(f"trained in {train_seconds:.0f} s; filtering free energy - exact NLL: {filtering_gap:.4f} nats/step")

    seeds = list(range(args.seed + 100, args.seed + 100 + args.seeds))
    bootstrap = IterativeGuide(ssm.model, num_iterations=0, name="bootstrap")
    rows = sweep(f"avf_K{args.K}", lambda n, s: smc_log_likelihood(ssm, guide, xs_test, num_particles=n, seed=s),
                 xs_test, exact_nll, args.particles, seeds)  # fmt: skip
    rows += sweep("bootstrap", lambda n, s: smc_log_likelihood(ssm, bootstrap, xs_test, num_particles=n, seed=s),
                  xs_test, exact_nll, args.bootstrap_particles, seeds)  # fmt: skip
    for name, diagonal in (("oracle_diag", True), ("oracle_full", False)):
        rows += sweep(name, lambda n, s, diagonal=diagonal: oracle_log_likelihood(ssm, xs_test, n, s, diagonal),
                      xs_test, exact_nll, args.particles, seeds)  # fmt: skip
    table = bootstrap_needed(pd.DataFrame(rows))

    args.out.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out, index=False)
    header = {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} thread(s), "
        f"{torch.__version__}, shared with other jobs",
        "date": subprocess.run(["date"], capture_output=True, text=True).stdout.strip(),
        "command": "python " + " ".join(["benchmarks/smc.py", *(argv if argv is not None else sys.argv[1:])]),
        "model": f"LinearGaussianSSM.random(latent_dim=4, obs_dim=8, seed={args.seed}), T = {args.T}, "
        f"{args.test_sequences} held-out sequences, {args.seeds} seeds per N",
        "AVF guide": f"K = {args.K}, hidden {args.hidden_size}, {args.train_steps} training steps "
        f"({train_seconds:.0f} s); its filtering free energy is {filtering_gap:.3f} nats/step above the exact NLL "
        f"(the N = 1 estimate's expected error)",
        "exact": f"-log p(x_1:T)/T = {exact_nll.mean().item() / args.T:.4f} (Kalman filter)",
        "error": "(log p - log p̂)/T in nats/step: mean over seeds and sequences, sd over seeds of the per-seed "
        "mean, mean |error| per sequence",
        "oracle rows": "the exact step posterior p(z_t | z_t-1, x_t) as proposal (oracle_full), and the best diagonal "
        "Normal for it, the KL(q||p) minimiser in the guide's family (oracle_diag): the floor of a perfect guide",
        "bootstrap_particles_for_same_error": "interpolated in (log N, log error) between the bootstrap runs",
    }
    md = markdown(table, header)
    args.out.with_suffix(".md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
