"""Streamed (online) evaluation time of one long test song: SRNN with AVF K=1 and K=5 against SRNN's own filter.

The song: the first ``--steps`` (default 500) steps of the longest MuseData test song (SRNN preprocessing,
3,401 steps in all). The model: ``pyro_avf.models.srnn.SRNN.music()`` with seeded, untrained weights (timing
only; every method gets the same weights). Each method scores the song one step at a time through the library's
own streaming entry point, the one the CLI's evaluation uses: :func:`pyro_avf.evaluation.evaluate` with
``stream=pyro_avf.experiments.stream_for(srnn)`` (:func:`~pyro_avf.online.as_stream`, i.e. ``SRNNStream``),
which calls :func:`pyro_avf.online.streamed_sequence_scores`:

- ``avf_k1``, ``avf_k5``: the CLI's ``--inference avf --iterations K`` guide (``pyro_avf.train.build_inference``:
  an ``IterativeGuide`` with the CLI's update network) filtered through :class:`~pyro_avf.online.OnlineFilter`;
- ``own_filter``: SRNN's own filtering guide (``--inference baseline``), streamed with
  ``SRNNStream.baseline_traces`` and scored with :func:`~pyro_avf.evaluation.score_replayed`.

Timing as in ``benchmarks/speed.py``: each method has its own Pyro parameter store (``ParamStore.scope``);
after ``--warmup`` untimed rounds on the first ``--warmup-steps`` steps of the song, ``--reps`` rounds each
stream the whole song once per method, in a fresh random order. Reported: seconds per song per method (median)
and the median [q25, q75] over rounds of the within-round ratios AVF K=1 / own filter and AVF K=5 / own filter
(goals from the issue: ≤ 1.5 and ≤ 5; an earlier measurement had K=5 at 41 s against 4.4 s for 500 MuseData
steps), and each method's free energy per step as a sanity check (finite).

Usage::

    python benchmarks/stream_speed.py --steps 500 --reps 3 --json stream_speed.json
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import pyro
import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from speed import quartiles  # noqa: E402

from data_loaders.files import default_data_dir  # noqa: E402
from data_loaders.polyphonic import load_polyphonic  # noqa: E402
from pyro_avf import experiments  # noqa: E402
from pyro_avf import train as cli  # noqa: E402
from pyro_avf.evaluation import FreeEnergy, evaluate  # noqa: E402
from pyro_avf.models.srnn import SRNN  # noqa: E402

RATIOS = {"AVF K=1 / own filter": ("avf_k1", "own_filter"), "AVF K=5 / own filter": ("avf_k5", "own_filter")}
GOALS = {"AVF K=1 / own filter": 1.5, "AVF K=5 / own filter": 5.0}
METHODS = {"avf_k1": ("avf", 1), "avf_k5": ("avf", 5), "own_filter": ("baseline", 0)}


class Method:
    """One way of streaming the song: an SRNN, a guide for it and its own param-store scope."""

    def __init__(self, name: str, srnn: SRNN, guide: Callable, scope: dict, seed: int):
        self.name, self.srnn, self.guide, self.scope, self.seed = name, srnn, guide, scope, seed
        self.stream = experiments.stream_for(srnn)
        self.result: Optional[FreeEnergy] = None

    def score(self, song: Tensor) -> float:
        """Stream ``song`` (T, 88) once; returns the wall time in seconds (the param-store swap is not timed)."""
        with pyro.get_param_store().scope(self.scope):
            start = time.perf_counter()
            self.result = evaluate(self.srnn, self.guide, [song], batch_size=1, stream=self.stream, seed=self.seed)
            return time.perf_counter() - start


def build_methods(song: Tensor, hidden_size: int, seed: int, names: List[str]) -> Dict[str, Method]:
    """Each method with an SRNN initialised from ``seed`` (update networks from ``seed + 1``), made by the CLI's
    ``build_inference``; the lazily built update networks are made by one training pass on 3 steps of ``song``."""
    methods: Dict[str, Method] = {}
    for name in names:
        inference, k = METHODS[name]
        args = cli.build_parser().parse_args(
            ["--model", "srnn", "--hidden-size", str(hidden_size), "--inference", inference, "--iterations", str(k)]
        )
        torch.manual_seed(seed)
        srnn = SRNN.music()
        guide, net = cli.build_inference(args, srnn)
        torch.manual_seed(seed + 1)
        with pyro.get_param_store().scope() as scope:
            net(song[None, :3], torch.ones(1, 3, dtype=torch.bool))  # builds the update networks lazily
        methods[name] = Method(name, srnn, guide, scope, seed)
    return methods


def measure(methods: Dict[str, Method], song: Tensor, reps: int, warmup: int, warmup_steps: int,
            seed: int) -> Dict[str, List[float]]:  # fmt: skip
    """``warmup`` untimed rounds on ``song[:warmup_steps]``, then ``reps`` timed rounds in a shuffled order each."""
    order = list(methods)
    rng = random.Random(seed)
    times: Dict[str, List[float]] = {name: [] for name in order}
    for r in range(warmup + reps):
        rng.shuffle(order)
        for name in order:
            if r < warmup:
                methods[name].score(song[:warmup_steps])
            else:
                times[name].append(methods[name].score(song))
                print(f"round {r - warmup + 1}/{reps}: {name} {times[name][-1]:.2f} s", flush=True)
    return times


def summarise(times: Dict[str, List[float]], methods: Dict[str, Method], steps: int) -> dict:
    """Median s/song per method, within-round ratios with their goals, and the free energies (sanity)."""
    ratios = {}
    for label, (a, b) in RATIOS.items():
        if a in times and b in times:
            median, q25, q75 = quartiles([x / y for x, y in zip(times[a], times[b])])
            ratios[label] = {"median": median, "q25": q25, "q75": q75, "goal": GOALS[label],
                             "meets_goal": median <= GOALS[label]}  # fmt: skip
    medians = {name: statistics.median(t) for name, t in times.items()}
    free_energy = {name: m.result.per_step for name, m in methods.items()}
    return {
        "steps": steps,
        "reps": len(next(iter(times.values()))),
        "median_seconds_per_song": medians,
        "median_ms_per_step": {name: 1000 * s / steps for name, s in medians.items()},
        "ratios": ratios,
        "free_energy_per_step": free_energy,
        "free_energies_finite": all(math.isfinite(v) for v in free_energy.values()),
    }


def markdown(summary: dict) -> str:
    lines = [f"| method | median s/song ({summary['steps']} steps) | ms/step | free energy/step |", "|---|---|---|---|"]
    for name, s in summary["median_seconds_per_song"].items():
        lines.append(f"| {name} | {s:.2f} | {summary['median_ms_per_step'][name]:.1f} | "
                     f"{summary['free_energy_per_step'][name]:.2f} |")  # fmt: skip
    lines += ["", "| ratio (within-round, median [q25, q75]) | value | goal | met |", "|---|---|---|---|"]
    for label, v in summary["ratios"].items():
        met = "yes" if v["meets_goal"] else "no"
        lines.append(f"| {label} | {v['median']:.2f} [{v['q25']:.2f}, {v['q75']:.2f}] | ≤ {v['goal']} | {met} |")
    ok = summary["free_energies_finite"]
    lines += ["", f"sanity: free energies per step {'all finite' if ok else 'NOT ALL FINITE'}"]
    return "\n".join(lines)


def longest_song(dataset: str) -> Tensor:
    """The longest test song of ``dataset`` (T, 88)."""
    songs = load_polyphonic(dataset, "test", path=default_data_dir())
    return max(songs, key=len)


def main(argv: Optional[List[str]] = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=500, help="the first this many steps of the song")
    p.add_argument("--reps", type=int, default=3, help="timed rounds (each streams the song once per method)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first, on --warmup-steps steps")
    p.add_argument("--warmup-steps", type=int, default=20)
    p.add_argument("--dataset", default="muse_data", help="polyphonic data set whose longest test song is used")
    p.add_argument("--hidden-size", type=int, default=1024, help="update network width (the CLI's default)")
    p.add_argument("--methods", nargs="*", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="write the summary here")
    args = p.parse_args(argv)
    if args.reps < 1 or args.warmup < 0 or args.steps < 1 or args.warmup_steps < 1:
        p.error("--reps, --steps and --warmup-steps must be >= 1, --warmup >= 0")
    pyro.set_rng_seed(args.seed)
    full = longest_song(args.dataset)
    song = full[: args.steps]
    print(f"{args.dataset}: longest test song {len(full)} steps, streaming the first {len(song)}", flush=True)
    methods = build_methods(song, args.hidden_size, args.seed, args.methods)
    times = measure(methods, song, args.reps, args.warmup, min(args.warmup_steps, len(song)), args.seed)
    summary = summarise(times, methods, len(song))
    summary.update({"dataset": args.dataset, "song_length": len(full), "hidden_size": args.hidden_size,
                    "seed": args.seed, "threads": torch.get_num_threads()})  # fmt: skip
    print(markdown(summary))
    if args.json is not None:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    return summary


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
