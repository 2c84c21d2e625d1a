"""Polyphonic music, the AVF paper's Table 3 made fair: SRNN with its own filter, AVF K=1 and AVF K=5.

Every method is trained by ``python -m pyro_avf.train`` with the same schedule (``--epochs``, the same crops, KL
annealing, learning rates, regularisation and seed) and the same objective estimator (the analytic KL: AVF's
``AmortizedFilteringELBO`` and ``TraceMeanField_ELBO`` for the baseline); the parameters are selected on the
validation songs (``--valid-every``, our normalisation) and the selected parameters are scored on all the
test songs in both normalisations (:class:`pyro_avf.evaluation.FreeEnergy`):

- ``per_step`` (ours): the total free energy over all test steps divided by their number;
- ``paper`` (the AVF paper's code): each song's first step left out, each song's sum divided by its length,
  then the mean over songs.

Each (data set, method, seed) is one run folder under ``--out-root``; a run that exists is resumed (its
checkpoint), so an interrupted benchmark continues where it stopped. ``--max-minutes`` bounds one invocation
of a run (it then stops after the epoch under way and is resumed by the next invocation). When a run has all
its epochs, its two rows (one per normalisation) replace that run's rows in ``--csv``
(``benchmarks/results/music.csv``): ``dataset, inference, iterations, seed, normalisation,
test_free_energy_per_step, valid_free_energy_per_step, epochs, updates, cpu_hours, commit`` (``cpu_hours``:
training CPU time of all threads, evaluations excluded; ``commit``: the code that started the run, ``+dirty``
when it had uncommitted changes).

Usage::

    python benchmarks/music.py --datasets jsb_chorales --methods baseline avf_k1 avf_k5 --epochs 100 --seeds 0
    python benchmarks/music.py --epochs 2 --max-eval-songs 8 --csv /tmp/music.csv   # a quick look
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
DATASETS = ("piano_midi", "muse_data", "jsb_chorales", "nottingham")
PAPER: Dict[str, Dict[str, float]] = {  # AVF paper, Table 3 (JSB K=1: §4.2.2), in the paper's normalisation
    "avf_k5": {"piano_midi": 8.12, "muse_data": 5.99, "jsb_chorales": 6.77, "nottingham": 3.13},
    "avf_k1": {"jsb_chorales": 6.97},
    "baseline": {"piano_midi": 8.19, "muse_data": 6.27, "jsb_chorales": 6.92, "nottingham": 3.19},
}
METHODS = {"avf_k1": ("avf", 1), "avf_k5": ("avf", 5), "baseline": ("baseline", 0)}
COLUMNS = ["dataset", "inference", "iterations", "seed", "normalisation", "test_free_energy_per_step",
           "valid_free_energy_per_step", "epochs", "updates", "cpu_hours", "commit"]  # fmt: skip
# the schedule every method shares (the CLI's "cpu" preset, without its 10-minute budget, with validation)
SCHEDULE = ["--preset", "cpu", "--valid-every", "5", "--lr-drop-patience", "2", "--lr-drop-factor", "0.3"]


def commit() -> str:
    """The code's commit, ``+dirty`` when tracked files differ from it."""
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True,
                           text=True).stdout.strip()  # fmt: skip
    return (head.stdout.strip() or "unknown") + ("+dirty" if dirty else "")


def train_command(dataset: str, method: str, seed: int, epochs: int, out_dir: Path, threads: int,
                  max_minutes: Optional[float], extra: Sequence[str]) -> List[str]:  # fmt: skip
    """The ``pyro_avf.train`` command line of one run (resumed when its folder holds a checkpoint)."""
    inference, k = METHODS[method]
    cmd = [sys.executable, "-m", "pyro_avf.train", "--model", "srnn", "--dataset", dataset, "--inference", inference,
           "--iterations", str(k), "--seed", str(seed), "--epochs", str(epochs), *SCHEDULE,
           "--max-minutes", str(max_minutes or 10**6), "--threads", str(threads), "--no-plots",
           "--out-dir", str(out_dir), *extra]  # fmt: skip
    return cmd + (["--resume"] if (out_dir / "checkpoint.pt").is_file() else [])


def run(dataset: str, method: str, seed: int, args: argparse.Namespace, extra: Sequence[str]) -> Optional[List[dict]]:
    """Train (or resume) one run; its two result rows when all its epochs are done, else None."""
    out_dir = Path(args.out_root) / f"srnn-{dataset}-{method}-seed{seed}"
    out_dir.mkdir(parents=True, exist_ok=True)
    if not (out_dir / "commit.txt").is_file():
        (out_dir / "commit.txt").write_text(commit() + "\n")
    cmd = train_command(dataset, method, seed, args.epochs, out_dir, args.threads, args.max_minutes, extra)
    print(" ".join(cmd[1:]), flush=True)
    with open(out_dir / "train.log", "a") as log:
        if subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT).returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed; see {out_dir / 'train.log'}")
    history = pd.read_csv(out_dir / "results.csv")
    last = history.iloc[-1]
    if last["epoch"] < args.epochs:
        print(f"  {out_dir}: {int(last['epoch'])} of {args.epochs} epochs done; run again to continue", flush=True)
        return None
    best = history[history["epoch"] == last["tested_epoch"]].iloc[-1]
    inference, k = METHODS[method]
    common = {"dataset": dataset, "inference": inference, "iterations": k, "seed": seed, "epochs": int(last["epoch"]),
              "updates": int(last["updates"]), "cpu_hours": last["cpu_time_s"] / 3600,
              "commit": (out_dir / "commit.txt").read_text().strip()}  # fmt: skip
    rows = [
        {**common, "normalisation": "per_step", "test_free_energy_per_step": last["test_free_energy_per_step"],
         "valid_free_energy_per_step": best["epoch_valid_free_energy_per_step"]},
        {**common, "normalisation": "paper", "test_free_energy_per_step": last["test_free_energy_paper"],
         "valid_free_energy_per_step": best["valid_free_energy_paper"]},
    ]  # fmt: skip
    print(f"  {method} seed {seed}: test {rows[0]['test_free_energy_per_step']:.3f} (ours) "
          f"{rows[1]['test_free_energy_per_step']:.3f} (paper's), selected epoch {int(last['tested_epoch'])}")
    return rows


def merge(csv: Path, rows: List[dict]) -> pd.DataFrame:
    """``csv`` with the rows of the same (dataset, inference, iterations, seed) replaced by ``rows``."""
    new = pd.DataFrame(rows, columns=COLUMNS)
    if csv.is_file():
        old = pd.read_csv(csv)
        keys = ["dataset", "inference", "iterations", "seed"]
        replaced = old.set_index(keys).index.isin(new.set_index(keys).index)
        new = pd.concat([old[~replaced], new], ignore_index=True)
    new = new.sort_values(["dataset", "inference", "iterations", "seed", "normalisation"], ignore_index=True)
    csv.parent.mkdir(parents=True, exist_ok=True)
    new.to_csv(csv, index=False, float_format="%.4f")
    return new


def markdown(table: pd.DataFrame) -> str:
    """Test free energy per step, both normalisations, beside the AVF paper's figure (its normalisation)."""
    lines = ["| data set | method | seed | epochs | updates | CPU h | valid (ours) | test (ours) | valid (paper's) "
             "| test (paper's) | AVF paper |", "|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for (dataset, inference, k, seed), g in table.groupby(["dataset", "inference", "iterations", "seed"]):
        method = "baseline" if inference == "baseline" else f"avf_k{k}"
        ours, paper = (g[g["normalisation"] == n].iloc[0] for n in ("per_step", "paper"))
        published = PAPER.get(method, {}).get(dataset)
        lines.append(
            f"| {dataset} | {method} | {seed} | {ours['epochs']} | {ours['updates']} | {ours['cpu_hours']:.2f} | "
            f"{ours['valid_free_energy_per_step']:.3f} | {ours['test_free_energy_per_step']:.3f} | "
            f"{paper['valid_free_energy_per_step']:.3f} | {paper['test_free_energy_per_step']:.3f} | "
            f"{'—' if published is None else f'{published:.2f}'} |"
        )
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> pd.DataFrame:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # fmt: skip
    p.add_argument("--datasets", nargs="+", choices=DATASETS, default=["jsb_chorales"])
    p.add_argument("--methods", nargs="+", choices=sorted(METHODS), default=["baseline", "avf_k1", "avf_k5"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--epochs", type=int, default=100, help="epochs of every run (the same for every method)")
    p.add_argument("--max-minutes", type=float, default=None, help="wall-clock budget of one invocation of a run")
    p.add_argument("--max-eval-songs", type=int, default=None, help="score the first N test/valid songs only")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument("--out-root", default="runs/music", help="folder of the run folders")
    p.add_argument("--csv", default=str(ROOT / "benchmarks" / "results" / "music.csv"), help="the results table")
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more pyro_avf.train options (last)")
    args = p.parse_args(argv)
    if args.epochs < 1:
        p.error(f"--epochs must be positive, got {args.epochs}")
    extra = list(args.extra)
    if args.max_eval_songs is not None:
        extra += ["--max-eval-songs", str(args.max_eval_songs), "--max-valid-songs", str(args.max_eval_songs)]
    table = pd.read_csv(args.csv) if Path(args.csv).is_file() else pd.DataFrame(columns=COLUMNS)
    for dataset in args.datasets:
        for seed in args.seeds:
            for method in args.methods:
                rows = run(dataset, method, seed, args, extra)
                if rows is not None:
                    table = merge(Path(args.csv), rows)
    if len(table):
        print(markdown(table))
    return table


if __name__ == "__main__":
    main()
