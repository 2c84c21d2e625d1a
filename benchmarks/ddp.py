"""Data-parallel training throughput: samples per second of ``pyro_avf.train`` with 1 and 2 processes.

Each configuration is one ``python -m torch.distributed.run --nproc_per_node N -m pyro_avf.train`` run (gloo on
CPU, PyTorch DDP) over the same global batch and the same number of training batches; throughput is
``epochs × batches × global batch / wall_time_s`` from the run's ``results.csv`` (``wall_time_s`` is training
time only, evaluation excluded). Configurations: one process with one torch thread, one process with
``N`` threads (what the same cores give without DDP), and ``N`` processes with one thread each. The
configurations alternate over ``--rounds`` so that machine noise hits them alike; the table reports the median.

Usage::

    python benchmarks/ddp.py --inference avf --iterations 1 --rounds 3
    python benchmarks/ddp.py --inference baseline --rounds 3
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, List

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]


def run(procs: int, threads: int, args: argparse.Namespace, out_dir: Path) -> float:
    """Train once; return samples per second."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs),
        "-m", "pyro_avf.train", "--model", args.model, "--dataset", args.dataset, "--inference", args.inference,
        "--iterations", str(args.iterations), "--hidden-size", str(args.hidden_size), "--threads", str(threads),
        "--epochs", str(args.epochs), "--max-train-batches", str(args.batches), "--batch-size", str(args.batch_size),
        "--eval-every", "1000000", "--max-eval-songs", "1", "--no-plots", "--out-dir", str(out_dir),
    ]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed with code {done.returncode}:\n{done.stderr[-3000:]}")
    row = pd.read_csv(out_dir / "results.csv").iloc[-1]
    return int(row["epoch"]) * args.batches * args.batch_size / float(row["wall_time_s"])


def main(argv=None) -> List[Dict[str, object]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="srnn")
    p.add_argument("--dataset", default="jsb_chorales")
    p.add_argument("--inference", default="avf", choices=["avf", "baseline"])
    p.add_argument("--iterations", type=int, default=1)
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batches", type=int, default=6, help="training batches per epoch")
    p.add_argument("--batch-size", type=int, default=16, help="global batch")
    p.add_argument("--procs", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    configs = [(1, 1), (1, args.procs), (args.procs, 1)]
    rates: Dict[tuple, List[float]] = {c: [] for c in configs}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for procs, threads in configs if r % 2 == 0 else reversed(configs):
                rates[(procs, threads)].append(run(procs, threads, args, Path(tmp) / f"{procs}x{threads}_{r}"))
    base = statistics.median(rates[(1, 1)])
    rows = [
        {"processes": procs, "threads": threads, "samples_per_s": statistics.median(v),
         "speed_up": statistics.median(v) / base, "rounds": [round(x, 2) for x in v]}
        for (procs, threads), v in rates.items()
    ]  # fmt: skip
    print(f"{args.model} {args.inference} K={args.iterations} width {args.hidden_size}, global batch "
          f"{args.batch_size}, {args.epochs}×{args.batches} batches per run, median of {args.rounds} rounds\n")
    print("| processes | threads each | samples/s | vs 1×1 | per round |\n|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['processes']} | {row['threads']} | {row['samples_per_s']:.2f} | {row['speed_up']:.2f} | "
              f"{row['rounds']} |")
    return rows


if __name__ == "__main__":
    main()
