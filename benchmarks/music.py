"""Polyphonic music: SRNN with AVF (K=1, K=5) and with its baseline filter under the same wall-clock budget.

Each (data set, method) is one ``python -m pyro_avf.train`` run in its own process (sequentially, so runs do
not compete for the cores; or, with ``--concurrent``, a data set's methods at once, so that a machine whose load
drifts treats them alike) with ``--max-minutes`` as the training budget; the CLI then evaluates the test free
energy per step on whole test songs (``--max-eval-songs`` caps the songs for quick runs). The table puts
the last row of each run's ``results.csv`` beside the AVF paper's SRNN numbers (Marino et al. 2018, Table 2,
test free energy in nats per step).

Usage::

    python benchmarks/music.py --minutes 60 --datasets jsb_chorales piano_midi muse_data nottingham
    python benchmarks/music.py --minutes 3 --max-eval-songs 16     # a quick look at the table format
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
PAPER: Dict[str, Dict[str, float]] = {  # AVF paper, Table 2: SRNN test free energy (nats per step)
    "avf": {"piano_midi": 8.12, "muse_data": 5.99, "jsb_chorales": 6.77, "nottingham": 3.13},
    "baseline": {"piano_midi": 8.19, "muse_data": 6.27, "jsb_chorales": 6.92, "nottingham": 3.19},
}
METHODS = {"avf_k1": ("avf", 1), "avf_k5": ("avf", 5), "baseline": ("baseline", 0)}


def train_command(
    dataset: str, method: str, minutes: float, out_dir: Path, threads: int, extra: Sequence[str] = ()
) -> List[str]:
    """The ``pyro_avf.train`` command line of one run (no intermediate evaluations, no plots)."""
    inference, k = METHODS[method]
    return [
        sys.executable, "-m", "pyro_avf.train", "--model", "srnn", "--dataset", dataset, "--inference", inference,
        "--iterations", str(k), "--max-minutes", str(minutes), "--epochs", "1000000", "--eval-every", "1000000",
        "--threads", str(threads), "--no-plots", "--out-dir", str(out_dir), *extra,
    ]  # fmt: skip


def start_one(dataset: str, method: str, minutes: float, out_root: Path, threads: int, extra: Sequence[str]):
    """Start the training process of one (data set, method); returns (process, command, output folder)."""
    out_dir = out_root / f"srnn_{dataset}_{method}"
    out_dir.mkdir(parents=True, exist_ok=True)
    cmd = train_command(dataset, method, minutes, out_dir, threads, extra)
    with open(out_dir / "train.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, text=True)
    return proc, cmd, out_dir


def finish_one(dataset: str, method: str, started) -> dict:
    """Wait for a run; returns its last results row plus the paper's number."""
    proc, cmd, out_dir = started
    if proc.wait():
        tail = (out_dir / "train.log").read_text()[-3000:]
        raise RuntimeError(f"{' '.join(cmd)} failed with code {proc.returncode}:\n{tail}")
    row = pd.read_csv(out_dir / "results.csv").iloc[-1].to_dict()
    row["method"] = method
    row["paper"] = PAPER[METHODS[method][0]][dataset]
    return row


def run_one(dataset: str, method: str, minutes: float, out_root: Path, threads: int, extra: Sequence[str]) -> dict:
    """Train and evaluate one (data set, method) on its own."""
    return finish_one(dataset, method, start_one(dataset, method, minutes, out_root, threads, extra))


def markdown(rows: List[dict], minutes: float, eval_songs: Optional[int]) -> str:
    """The results table (one row per data set and method)."""
    songs = "all" if eval_songs is None else f"first {eval_songs}"
    lines = [
        f"Budget: {minutes:g} min of training per run; test songs: {songs}. F = test free energy per step (nats).",
        "",
        "| data set | method | K | train min | epochs | β at end | train loss/step | best valid F/step (epoch) "
        "| test F/step | paper F/step |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        valid = r.get("valid_free_energy_per_step", float("nan"))
        selected = f"{valid:.3f} ({int(r['tested_epoch'])})" if valid == valid else "—"
        lines.append(
            f"| {r['dataset']} | {r['method']} | {int(r['iterations'])} | {r['wall_time_s'] / 60:.1f} | "
            f"{int(r['epoch'])} | {r['kl_weight']:.2f} | {r['train_loss_per_step']:.3f} | {selected} | "
            f"{r['test_free_energy_per_step']:.3f} | {r['paper']:.2f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> List[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, required=True, help="training budget of every run")
    p.add_argument("--datasets", nargs="+", choices=DATASETS, default=["jsb_chorales"])
    p.add_argument("--methods", nargs="+", choices=sorted(METHODS), default=list(METHODS))
    p.add_argument("--max-eval-songs", type=int, default=None, help="evaluate on the first N test songs only")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument("--concurrent", action="store_true",
                   help="run a data set's methods at the same time (equal share of a loaded machine)")
    p.add_argument("--out-root", default="runs/music_benchmark", help="folder for the runs' outputs")
    p.add_argument("--out", default=None, help="also write the markdown table to this file")
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more pyro_avf.train options (last)")
    args = p.parse_args(argv)
    if not args.minutes > 0:
        p.error(f"--minutes must be positive, got {args.minutes}")
    extra = list(args.extra)
    if args.max_eval_songs is not None:
        extra += ["--max-eval-songs", str(args.max_eval_songs)]
    rows = []
    for dataset in args.datasets:
        if args.concurrent:  # the methods share the machine's load alike
            started = {m: start_one(dataset, m, args.minutes, Path(args.out_root), args.threads, extra)
                       for m in args.methods}  # fmt: skip
            rows += [finish_one(dataset, m, started[m]) for m in args.methods]
        else:
            rows += [run_one(dataset, m, args.minutes, Path(args.out_root), args.threads, extra) for m in args.methods]
    table = markdown(rows, args.minutes, args.max_eval_songs)
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")
    return rows


if __name__ == "__main__":
    main()
