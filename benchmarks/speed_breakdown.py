"""Where the time of one AVF K=1 training step goes: the library against plain PyTorch, part by part.

The methods of ``benchmarks/speed.py`` (same SRNN, batch of real JSB crops, update-network width) are timed
with wall-clock timers around the parts each one calls: for the library the inference re-runs of a step
(:meth:`pyro_avf.inference.StepInference._run`, the step function under its ``StepRun`` handler), the inner
``autograd.grad`` with respect to λ, the update network's forward pass and the scoring of each step's final run
(:meth:`FinalRun.finish`); for the plain-PyTorch reference its step free energy (one decoder run and the KL),
its ``autograd.grad`` and the same update network. "other" is the rest of the forward pass: for the library the
step's final run through Pyro's handler stack, the prior network and the LSTM; for the reference the prior
network and the LSTM. The timers wrap functions (a few microseconds each), so the parts add up to slightly
more than an untimed pass.

Usage::

    python benchmarks/speed_breakdown.py --reps 8
"""

from __future__ import annotations

import argparse
import collections
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List

import pyro
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import plain_torch_srnn_avf as plain  # noqa: E402
import speed  # noqa: E402

from pyro_avf import inference, updates  # noqa: E402

PARTS = {  # (object, attribute, label)
    "library_avf_k1": [
        (inference.StepInference, "_run", "inference re-runs of the step"),
        (inference, "_grads", "autograd.grad w.r.t. λ"),
        (updates.UpdateNetwork, "forward", "update network"),
        (inference.FinalRun, "finish", "scoring the final run"),
    ],
    "plain_avf_k1": [
        (plain, "step_free_energy", "step free energy (decoder + KL)"),
        (plain.torch.autograd, "grad", "autograd.grad w.r.t. λ"),
        (updates.UpdateNetwork, "forward", "update network"),
    ],
}


def timed(fn: Callable, label: str, totals: Dict[str, float]) -> Callable:
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            totals[label] += time.perf_counter() - start

    return wrapper


def breakdown(method: speed.Method, parts, xs, mask, reps: int) -> Dict[str, List[float]]:
    """Per-pass milliseconds of each part, of the whole forward pass and of the backward pass, ``reps`` times."""
    rows: Dict[str, List[float]] = collections.defaultdict(list)
    totals: Dict[str, float] = collections.defaultdict(float)
    saved = [(obj, attr, getattr(obj, attr)) for obj, attr, _ in parts]
    for obj, attr, label in parts:
        setattr(obj, attr, timed(getattr(obj, attr), label, totals))
    try:
        for _ in range(reps):
            totals.clear()
            with pyro.get_param_store().scope(method.scope):
                start = time.perf_counter()
                loss = method.loss_fn(xs, mask)
                middle = time.perf_counter()
                (loss / xs.size(0)).backward()
                end = time.perf_counter()
                method.optimizer.step()
                method.optimizer.zero_grad(set_to_none=True)
            forward = middle - start
            for _, _, label in parts:
                rows[label].append(1e3 * totals[label])
            rows["other (forward)"].append(1e3 * (forward - sum(totals[label] for _, _, label in parts)))
            rows["forward pass"].append(1e3 * forward)
            rows["backward pass"].append(1e3 * (end - middle))
    finally:
        for obj, attr, fn in saved:
            setattr(obj, attr, fn)
    return rows


def main(argv=None) -> Dict[str, Dict[str, float]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=8)
    p.add_argument("--hidden-size", type=int, default=256, help="update network width")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--crop-length", type=int, default=25)
    p.add_argument("--model-size", type=int, default=None, help="SRNN layer width (default: music sizes)")
    args = p.parse_args(argv)
    methods = speed.build_methods(args.hidden_size, args.model_size)
    xs, mask = speed.make_batch("music", args.batch_size, args.crop_length, 0)
    medians: Dict[str, Dict[str, float]] = {}
    for name, parts in PARTS.items():
        for _ in range(2):  # warm-up
            methods[name].step(xs, mask)
        rows = breakdown(methods[name], parts, xs, mask, args.reps)
        medians[name] = {label: statistics.median(values) for label, values in rows.items()}
    print(f"| part (ms per training step, median of {args.reps}) | library AVF K=1 | plain-PyTorch AVF K=1 |")
    print("|---|---|---|")
    labels = list(dict.fromkeys(label for m in medians.values() for label in m))
    for label in labels:
        cells = [f"{medians[n][label]:.1f}" if label in medians[n] else "–" for n in PARTS]
        print(f"| {label} | " + " | ".join(cells) + " |")
    return medians


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
