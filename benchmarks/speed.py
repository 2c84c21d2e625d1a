"""Per-step training time of SRNN on JSB crops: library AVF (K=1, K=5), SRNN's baseline filter, plain-torch AVF.

The library AVF methods use one sample per inference gradient, as the plain-torch reference and the AVF paper
do (the CLI's default); ``library_avf_k1_pair`` / ``library_avf_k5_pair`` use ``IterativeGuide``'s own default,
an antithetic pair (two re-runs of the step per iteration).

One training step = the loss of a batch of 16 random crops of 25 steps of real quarter-note JSB songs (SRNN
music sizes), ``(loss / B).backward()``, one Adam step — what ``pyro_avf.train`` does per batch. Library methods
go through the CLI's own objects (:func:`pyro_avf.train.build_inference`, i.e. ``IterativeGuide`` +
``AmortizedFilteringELBO`` or the model's guide + ``Trace_ELBO``); the plain-torch reference is
:func:`benchmarks.plain_torch_srnn_avf.avf_loss` with the same networks and update network.

Timing: every method has its own model (same initial weights) and its own Pyro parameter store
(``ParamStore.scope``); after a warm-up the methods run in a fresh random order in each of ``--reps`` rounds,
all on the same batch within a round. Reported: per-method median seconds per step and, for each ratio,
the median over rounds of the within-round ratio (robust to the machine's load drifting between rounds).
``--profile`` adds a cProfile of a few library steps (top functions by own time).

``--config speech`` times the AVF paper's own timing setting instead (SRNN on TIMIT: speech sizes, Gaussian
output, update networks that also encode :math:`x_t`, batch 64 of 40-step clips; stand-in frames, since TIMIT
is licensed). The per-step Python cost of the library is fixed, so the larger batch and model make it small
next to the arithmetic.

Usage::

    python benchmarks/speed.py --reps 20 --profile
    python benchmarks/speed.py --config speech --reps 8 --methods library_avf_k1 plain_avf_k1 baseline
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import pyro
import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from plain_torch_srnn_avf import avf_loss, jsb_crops  # noqa: E402

from pyro_avf import train as cli  # noqa: E402
from pyro_avf.models.srnn import SRNN  # noqa: E402
from pyro_avf.updates import UpdateNetwork  # noqa: E402

RATIOS = {
    "AVF K=1 / baseline": ("library_avf_k1", "baseline"),
    "AVF K=5 / baseline": ("library_avf_k5", "baseline"),
    "library / plain-torch, K=1": ("library_avf_k1", "plain_avf_k1"),
    "library / plain-torch, K=5": ("library_avf_k5", "plain_avf_k5"),
    "AVF K=1, antithetic pair / one sample": ("library_avf_k1_pair", "library_avf_k1"),
    "AVF K=5, antithetic pair / one sample": ("library_avf_k5_pair", "library_avf_k5"),
    "AVF K=1, antithetic pair / baseline": ("library_avf_k1_pair", "baseline"),
}


class Method:
    """One training configuration: a step function ``(xs, mask) -> loss`` inside its own param-store scope."""

    def __init__(self, name: str, loss_fn: Callable[[Tensor, Tensor], Tensor], params, scope: Optional[dict] = None):
        self.name, self.loss_fn = name, loss_fn
        self.optimizer = torch.optim.Adam(params, lr=1e-4)
        self.scope: dict = scope if scope is not None else {"params": {}, "constraints": {}}

    def step(self, xs: Tensor, mask: Tensor) -> float:
        """One training step; returns its wall time in seconds (the param-store swap is not timed)."""
        with pyro.get_param_store().scope(self.scope):
            start = time.perf_counter()
            loss = self.loss_fn(xs, mask)
            (loss / xs.size(0)).backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            return time.perf_counter() - start


def build_srnn(config: str, model_size: Optional[int] = None) -> SRNN:
    """SRNN at the music sizes (88 Bernoulli keys) or the speech sizes (200-sample frames, Gaussian output)."""
    overrides = {} if model_size is None else {"d_dim": model_size, "a_dim": model_size, "hidden_dim": model_size}
    return (SRNN.speech if config == "speech" else SRNN.music)(**overrides)


def speech_frames(batch_size: int, length: int = 40, seed: int = 0) -> Tuple[Tensor, Tensor]:
    """Stand-in for normalised TIMIT frames (the corpus is licensed and not here): standard-normal
    ``(B, length, 200)`` frames and an all-true mask. Only the shapes matter for timing."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch_size, length, 200, generator=generator), torch.ones(batch_size, length, dtype=torch.bool)


def make_batch(config: str, batch_size: int, length: int, seed: int) -> Tuple[Tensor, Tensor]:
    return (speech_frames if config == "speech" else jsb_crops)(batch_size, length, seed=seed)


def build_methods(hidden_size: int, model_size=None, seed: int = 0, config: str = "music") -> Dict[str, Method]:
    """The seven methods, each with an SRNN initialised from ``seed`` (update networks from ``seed + 1``).

    ``config="speech"``: SRNN's speech sizes, and the update networks also encode :math:`x_t` (the AVF paper's
    TIMIT setting, where it reports 13.1 ms per step for AVF against 15.6 ms for the baseline)."""
    methods: Dict[str, Method] = {}
    cli_args = ["--model", "srnn", "--hidden-size", str(hidden_size)]
    if config == "speech":
        cli_args.append("--encode-observation")
    pairs = ["--num-samples", "2", "--antithetic"]  # the library's default inference gradient
    library = [("library_avf_k1", "avf", 1, []), ("library_avf_k5", "avf", 5, []),
               ("library_avf_k1_pair", "avf", 1, pairs), ("library_avf_k5_pair", "avf", 5, pairs),
               ("baseline", "baseline", 0, [])]  # fmt: skip
    for name, inference, k, extra in library:
        args = cli.build_parser().parse_args(cli_args + ["--inference", inference, "--iterations", str(k), *extra])
        torch.manual_seed(seed)
        model = build_srnn(config, model_size)
        guide, net = cli.build_inference(args, model)
        torch.manual_seed(seed + 1)
        with pyro.get_param_store().scope() as scope:
            net(*make_batch(config, 2, 3, 0))  # builds the update networks lazily
        methods[name] = Method(name, net, net.parameters(), scope)
    for k in (1, 5):
        torch.manual_seed(seed)
        srnn = build_srnn(config, model_size)
        torch.manual_seed(seed + 1)
        update = UpdateNetwork(srnn.z_dim, hidden=hidden_size, obs_dim=srnn.x_dim if config == "speech" else 0)
        params = list(srnn.generative.parameters()) + list(update.parameters())
        methods[f"plain_avf_k{k}"] = Method(
            f"plain_avf_k{k}", lambda xs, mask, s=srnn, u=update, k=k: avf_loss(s, u, xs, mask, k).loss, params
        )
    return methods


def measure(methods: Dict[str, Method], batches: List[Tuple[Tensor, Tensor]], reps: int, warmup: int, seed: int):
    """Interleaved timing: ``warmup`` untimed rounds, then ``reps`` rounds in a shuffled order each."""
    order = list(methods)
    rng = random.Random(seed)
    times: Dict[str, List[float]] = {name: [] for name in order}
    for r in range(warmup + reps):
        xs, mask = batches[r % len(batches)]
        rng.shuffle(order)
        for name in order:
            elapsed = methods[name].step(xs, mask)
            if r >= warmup:
                times[name].append(elapsed)
    return times


def quartiles(values: List[float]) -> Tuple[float, float, float]:
    """(median, q25, q75) of the rounds; inclusive quartiles stay within the observed values (the default method
    extrapolates beyond them when there are few rounds); one value for all three when there is one."""
    if len(values) < 2:
        return values[0], values[0], values[0]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return statistics.median(values), q[0], q[2]


def summarise(times: Dict[str, List[float]]) -> dict:
    """Median seconds per step per method, and the median within-round ratio of each pair in :data:`RATIOS`."""
    medians = {name: statistics.median(t) for name, t in times.items()}
    ratios = {}
    for label, (a, b) in RATIOS.items():
        if a in times and b in times:
            per_round = [x / y for x, y in zip(times[a], times[b])]
            median, q25, q75 = quartiles(per_round)
            ratios[label] = {"median": median, "q25": q25, "q75": q75}
    return {"median_seconds": medians, "ratios": ratios, "reps": len(next(iter(times.values())))}


def profile(method: Method, batches, steps: int, top: int) -> str:
    """cProfile ``steps`` training steps of ``method``; the ``top`` functions by own (tottime) time."""
    profiler = cProfile.Profile()
    profiler.enable()
    for i in range(steps):
        method.step(*batches[i % len(batches)])
    profiler.disable()
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out)
    stats.sort_stats("tottime").print_stats(top)
    stats.sort_stats("cumulative").print_stats("pyro_avf", top)
    return out.getvalue()


def markdown(summary: dict) -> str:
    lines = ["| method | median s/step |", "|---|---|"]
    lines += [f"| {name} | {s:.4f} |" for name, s in summary["median_seconds"].items()]
    lines += ["", "| ratio (within-round, median [q25, q75]) | value |", "|---|---|"]
    lines += [f"| {k} | {v['median']:.2f} [{v['q25']:.2f}, {v['q75']:.2f}] |" for k, v in summary["ratios"].items()]
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=20, help="timed rounds (each runs every method once)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--config", choices=["music", "speech"], default="music",
                   help="music: JSB crops, music sizes; speech: the paper's TIMIT timing setting (stand-in frames)")
    p.add_argument("--batch-size", type=int, default=None, help="default: 16 (music), 64 (speech)")
    p.add_argument("--crop-length", type=int, default=None, help="default: 25 (music), 40 (speech)")
    p.add_argument("--hidden-size", type=int, default=1024, help="update network width (the CLI's default)")
    p.add_argument("--model-size", type=int, default=None, help="SRNN layer width (default: music sizes)")
    p.add_argument("--methods", nargs="*", default=None, help="subset of method names")
    p.add_argument("--profile", action="store_true", help="also cProfile a few library AVF steps")
    p.add_argument("--profile-steps", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    speech = args.config == "speech"
    batch_size = args.batch_size or (64 if speech else 16)
    length = args.crop_length or (40 if speech else 25)
    methods = build_methods(args.hidden_size, args.model_size, args.seed, args.config)
    if args.methods:
        unknown = set(args.methods) - set(methods)
        if unknown:
            raise SystemExit(f"unknown methods {sorted(unknown)}; known: {sorted(methods)}")
        methods = {k: v for k, v in methods.items() if k in args.methods}
    batches = [make_batch(args.config, batch_size, length, args.seed + i) for i in range(4)]
    summary = summarise(measure(methods, batches, args.reps, args.warmup, args.seed))
    print(markdown(summary))
    if args.profile:
        for name in ("library_avf_k1", "library_avf_k5"):
            if name in methods:
                summary[f"profile_{name}"] = text = profile(methods[name], batches, args.profile_steps, 25)
                print(f"\n### cProfile of {args.profile_steps} steps of {name}\n{text}")
    return summary


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
