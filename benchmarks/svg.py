"""SVG-LP trained with amortized variational filtering vs with its original filter, at equal wall time.

The AVF paper (Marino et al. 2018, Table 2) trains SVG (Denton & Fergus 2018) on KTH Actions with a Gaussian
output density and no KL down-weighting, and reports the filtering free energy per step: baseline 15,097,
AVF 11,714 nats. KTH is not available here; this runs the same comparison on Moving MNIST at CPU size.

Methods (each trains a fresh :class:`~pyro_avf.models.svg.SVG` with Adam for ``--minutes`` of measured
training time, one :class:`pyro_avf.trainer.Trainer` step per batch; the methods' steps are interleaved, the
one with the least time so far going next, so that a drifting machine load hits both alike: a loop of this
script's own, since :func:`pyro_avf.training.fit` trains one model at a time):

* ``AVF``: ``IterativeGuide(svg.model, num_iterations=K)`` + ``AmortizedFilteringELBO``;
* ``baseline``: ``svg.guide`` (posterior LSTM on the current frame's encoding) + ``TraceMeanField_ELBO`` (the
  analytic KL given the sampled past: the estimator of AVF's objective, so both train the same free energy).

``--steps S`` gives every method S optimiser steps instead of a time budget (equal epochs, interleaved the same
way). With ``--curve-every N`` every method is scored on the test sequences every N of its steps; the curve
(steps, measured training seconds, test free energy) goes to ``--curve`` (CSV) and a figure beside it, so one
table gives the comparison both at equal steps and at equal training time.

Data: one digit, ``--frame-size`` square frames, ``--frames`` steps, dequantized 8-bit values
:math:`(v + u)/256` (fresh noise per training batch, one fixed draw for the test set). Score: the test
filtering free energy (:func:`~pyro_avf.evaluation.filtering_free_energy`) in nats per sequence and per
frame, and its KL part (how much the latent variables are used).

Example::

    python benchmarks/svg.py --minutes 3 --threads 1 --out /tmp/svg_table.md
"""

from __future__ import annotations

import argparse
import datetime
import math
import platform
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import pandas as pd
import pyro
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from data_loaders.moving_mnist import dequantize  # noqa: E402
from pyro_avf.evaluation import filtering_free_energy  # noqa: E402
from pyro_avf.models.svg import SVG  # noqa: E402
from pyro_avf.trainer import Trainer  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from flows import add_data_args, load_data  # noqa: E402  (the same Moving MNIST sequences as the flows benchmark)

METHODS = ("AVF", "baseline")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_data_args(p)
    p.add_argument("--minutes", type=float, default=3.0, help="wall-clock training budget per method")
    p.add_argument("--steps", type=int, default=None, help="train every method for exactly this many steps "
                   "(instead of --minutes: equal epochs)")
    p.add_argument("--curve-every", type=int, default=None, help="score the test sequences every this many steps "
                   "of each method (None: only at the end)")
    p.add_argument("--curve", type=Path, default=None, help="CSV of the learning curves (and a PNG beside it)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--g-dim", type=int, default=64)
    p.add_argument("--z-dim", type=int, default=8)
    p.add_argument("--rnn-size", type=int, default=64)
    p.add_argument("--nf", type=int, default=16)
    p.add_argument("--iterations", type=int, default=1, help="K, AVF inference iterations per step")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path("/tmp/svg_table.md"))
    args = p.parse_args(argv)
    if args.steps is not None and args.steps < 1:
        p.error(f"--steps must be positive, got {args.steps}")
    if args.minutes <= 0:
        p.error(f"--minutes must be positive, got {args.minutes}")
    return args


class Method:
    """One method's model and :class:`~pyro_avf.trainer.Trainer` in its own Pyro parameter store
    (``ParamStore.scope``)."""

    def __init__(self, method: str, args, frame_shape: torch.Size):
        self.name, self.seconds, self.steps = method, 0.0, 0
        self.gen = torch.Generator().manual_seed(args.seed)
        pyro.set_rng_seed(args.seed)
        with pyro.get_param_store().scope() as self.scope:
            self.svg = SVG(frame_shape, g_dim=args.g_dim, z_dim=args.z_dim, rnn_size=args.rnn_size, nf=args.nf)
            if method == "AVF":
                options = dict(guide_kwargs=dict(num_iterations=args.iterations, encode_observation=True))
            else:
                options = dict(inference="baseline")  # svg.guide with TraceMeanField_ELBO (the analytic KL, as AVF)
            self.trainer = Trainer(self.svg, lr=args.lr, clip_norm=None, **options)
            self.guide = self.trainer.guide

    def step(self, train_u8: torch.Tensor, batch_size: int) -> float:
        """One optimiser step, timed (batch drawing, the param-store swap and the first batch's building of the
        update networks excluded); returns the batch's summed loss."""
        idx = torch.randint(len(train_u8), (batch_size,), generator=self.gen)
        x = dequantize(train_u8[idx], generator=self.gen)
        with pyro.get_param_store().scope(self.scope):
            self.trainer.build(x)
            start = time.perf_counter()
            loss = self.trainer.step(x)
            self.seconds += time.perf_counter() - start
        self.steps += 1
        if not math.isfinite(loss):
            raise FloatingPointError(f"{self.name}: loss became {loss} at step {self.steps}")
        if self.steps % 100 == 0:
            print(f"  {self.name} step {self.steps} ({self.seconds:.0f} s): {loss / batch_size:.0f} nats/sequence",
                  flush=True)  # fmt: skip
        return loss

    def evaluate(self, test_x: torch.Tensor) -> Dict[str, float]:
        """Test free energy per sequence/frame, KL per frame, steps."""
        fe, kl = [], []
        with pyro.get_param_store().scope(self.scope):
            for i in range(0, len(test_x), 50):
                out = filtering_free_energy(self.svg.model, self.guide, test_x[i : i + 50])
                fe.append(out["free_energy"].sum(1).detach())
                kl.append(out["kl"].sum(1).detach())
        fe, kl = torch.cat(fe), torch.cat(kl)
        frames = test_x.size(1)
        return {
            "per_sequence": fe.mean().item(),
            "per_sequence_se": (fe.std() / math.sqrt(len(fe))).item(),
            "per_frame": fe.mean().item() / frames,
            "kl_per_frame": kl.mean().item() / frames,
            "steps": self.steps,
            "train_minutes": self.seconds / 60,
        }


def train_interleaved(methods, train_u8: torch.Tensor, args, test_x: Optional[torch.Tensor] = None) -> List[dict]:
    """Give every method ``args.minutes`` of measured training time (or ``args.steps`` steps), always stepping
    the one that has had the least so far: machine load that drifts during the run hits all methods alike.
    Returns the learning-curve rows (every ``args.curve_every`` steps of a method, scored on ``test_x``)."""
    budget = 60 * args.minutes
    curve: List[dict] = []
    while True:
        if args.steps is None:
            behind = min(methods, key=lambda m: m.seconds)
            if behind.seconds >= budget:
                return curve
        else:
            behind = min(methods, key=lambda m: (m.steps, m.seconds))
            if behind.steps >= args.steps:
                return curve
        behind.step(train_u8, args.batch_size)
        if args.curve_every and test_x is not None and behind.steps % args.curve_every == 0:
            r = behind.evaluate(test_x)
            curve.append({"method": behind.name, "steps": behind.steps, "train_seconds": behind.seconds,
                          "test_free_energy_per_sequence": r["per_sequence"], "se": r["per_sequence_se"],
                          "kl_per_frame": r["kl_per_frame"]})  # fmt: skip
            print(f"  {behind.name} at step {behind.steps} ({behind.seconds:.0f} s): test {r['per_sequence']:.1f} "
                  "nats/sequence", flush=True)  # fmt: skip


def plot_curve(curve: pd.DataFrame, path: Path) -> None:
    """Test free energy against training steps and against measured training time, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    for method, g in curve.groupby("method"):
        for ax, x in zip(axes, ("steps", "train_seconds")):
            ax.errorbar(g[x] / (60 if x == "train_seconds" else 1), g["test_free_energy_per_sequence"], yerr=g["se"],
                        marker="o", ms=3, capsize=2, label=method)  # fmt: skip
    axes[0].set(xlabel="training steps", ylabel="test free energy (nats/sequence)", title="equal steps")
    axes[1].set(xlabel="measured training time (min)", title="equal time")
    for ax in axes:
        ax.ticklabel_format(useOffset=False, style="plain", axis="y")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(f"SVG on Moving MNIST: AVF vs SVG's own filter ({curve.attrs.get('test', '?')} test sequences)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> Dict[str, Dict[str, float]]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    train_u8, test_u8 = load_data(args)
    test_x = dequantize(test_u8, generator=torch.Generator().manual_seed(args.seed + 1))
    methods = [Method(name, args, train_u8.shape[2:]) for name in args.methods]
    curve = train_interleaved(methods, train_u8, args, test_x)
    if curve and args.curve is not None:
        args.curve.parent.mkdir(parents=True, exist_ok=True)
        table = pd.DataFrame(curve)
        table.to_csv(args.curve, index=False, float_format="%.2f")
        table.attrs["test"] = len(test_x)
        plot_curve(table, args.curve.with_suffix(".png"))
    results = {}
    for m in methods:
        results[m.name] = r = m.evaluate(test_x)
        print(f"{m.name}: {r['per_sequence']:.1f} ± {r['per_sequence_se']:.1f} nats/sequence, "
              f"{r['per_frame']:.1f} nats/frame (KL {r['kl_per_frame']:.2f}), {r['steps']} steps")  # fmt: skip
    lines = [
        f"Command: `python benchmarks/svg.py {' '.join(argv if argv is not None else sys.argv[1:])}`  ",
        f"Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; "
        f"torch {torch.__version__}, {platform.python_version()}; {torch.get_num_threads()} thread(s)  ",
        f"Data: Moving MNIST, 1 digit, {args.frame_size}x{args.frame_size}, {args.frames} frames, "
        f"{args.num_train} train / {args.num_test} test sequences, dequantized 8-bit values in (0, 1); "
        + (f"{args.minutes:g} min of measured training time" if args.steps is None else f"{args.steps} steps")
        + " per method, the methods' steps interleaved; "
        f"AVF with K = {args.iterations}",
        "",
        "| SVG filter | test free energy (nats/sequence, ± s.e.) | nats/frame | KL nats/frame | training steps |",
        "| --- | --- | --- | --- | --- |",
    ]
    for method, r in results.items():
        lines.append(f"| {method} | {r['per_sequence']:.1f} ± {r['per_sequence_se']:.1f} | {r['per_frame']:.1f} | "
                     f"{r['kl_per_frame']:.2f} | {r['steps']} |")  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return results


if __name__ == "__main__":
    main()
