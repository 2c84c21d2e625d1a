"""Autoregressive flows across time on Moving MNIST: 1-AF, 2-AF, an SLVM, and the SLVM with a 1-AF likelihood.

Reproduces, at a CPU-feasible size, the comparison of Marino, Chen, He & Mandt ("Improving sequential latent
variable models with autoregressive flows", poster numbers on 64x64 Moving MNIST: 1-AF 2.15, 2-AF 2.13,
SLVM ≤ 1.92, SLVM w/ 1-AF ≤ 1.86 nats/dim; temporal correlation of adjacent frames 0.24 in x, 0.02 in y).

Data: one digit, ``--frame-size`` square frames, ``--frames`` steps, 8-bit values with uniform
dequantization :math:`x = (v + u) / 256` (fresh noise for every training batch, one fixed draw for the test set).
Models (each trains with Adam for ``--minutes`` of wall-clock time, one :class:`pyro_avf.trainer.Trainer` step
per batch; the loop is this script's own because every batch draws its sequences with replacement and fresh
dequantization noise):

* ``1-AF``, ``2-AF``: :class:`~pyro_avf.flows.FlowSequenceModel` (conv flows, learned i.i.d. Normal base),
  trained on the exact log-likelihood (its Pyro program ``flow.model`` has no latent site: ``Trace_ELBO`` with
  an empty guide is :math:`-\\log p(x)`);
* ``SLVM``: :class:`~pyro_avf.models.slvm.SLVM`, ``IterativeGuide`` + ``AmortizedFilteringELBO``;
* ``SLVM w/ 1-AF``: the same SLVM with ``flow=AffineAutoregressiveFlow(...)`` (same flow settings as 1-AF).

Test score: nats per dimension of the 8-bit data, :math:`(\\text{NLL} + D\\log 256)/D` with D = T·H·W; exact
for the flows, the filtering free energy (an upper bound) for the SLVMs. Temporal correlation of adjacent
frames (:func:`~pyro_avf.flows.temporal_correlation`) is measured on the test x and on the trained 1-AF's y.

Example::

    python benchmarks/flows.py --minutes 3 --threads 1 --out /tmp/flows_table.md --png /tmp/flows_frames.png
"""

from __future__ import annotations

import argparse
import datetime
import math
import platform
import sys
import time
from pathlib import Path
from typing import Callable, Dict

import pyro
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from data_loaders.moving_mnist import dequantize, moving_mnist_splits, nats_per_dim  # noqa: E402
from pyro_avf.evaluation import filtering_free_energy  # noqa: E402
from pyro_avf.flows import AffineAutoregressiveFlow, FlowSequenceModel, temporal_correlation  # noqa: E402
from pyro_avf.models.slvm import SLVM  # noqa: E402
from pyro_avf.plots_flows import plot_flow_frames  # noqa: E402
from pyro_avf.trainer import Trainer as ModelTrainer  # noqa: E402

MODELS = ("1-AF", "2-AF", "SLVM", "SLVM w/ 1-AF")
POSTER = {"1-AF": "2.15", "2-AF": "2.13", "SLVM": "≤ 1.92", "SLVM w/ 1-AF": "≤ 1.86"}


def add_data_args(p: argparse.ArgumentParser) -> None:
    """The Moving MNIST options that :func:`load_data` reads (shared with ``benchmarks/svg.py``)."""
    p.add_argument("--frame-size", type=int, default=32)
    p.add_argument("--frames", type=int, default=10)
    p.add_argument("--num-train", type=int, default=2000)
    p.add_argument("--num-test", type=int, default=200)
    p.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data", help="folder holding mnist/")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_data_args(p)
    p.add_argument("--minutes", type=float, default=3.0, help="wall-clock training budget per model")
    p.add_argument("--steps", type=int, default=None, help="train every model for exactly this many steps "
                   "(instead of --minutes: equal work however loaded the machine is)")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--flow-hidden", type=int, default=16, help="channels of the flows' conv networks")
    p.add_argument("--flow-layers", type=int, default=3)
    p.add_argument("--flow-window", type=int, default=2, help="past frames the flows condition on")
    p.add_argument("--z-dim", type=int, default=16)
    p.add_argument("--nf", type=int, default=16, help="channels of the SLVM's first conv layer")
    p.add_argument("--iterations", type=int, default=1, help="K, AVF inference iterations per step")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path("/tmp/flows_table.md"))
    p.add_argument("--png", type=Path, default=Path("/tmp/flows_frames.png"))
    args = p.parse_args(argv)
    if args.minutes <= 0:
        p.error(f"--minutes must be positive, got {args.minutes}")
    return args


def load_data(args) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 train and test sequences (N, T, 1, H, W) from disjoint digit pools."""
    train, test = moving_mnist_splits(
        args.data / "mnist", num_train=args.num_train, num_test=args.num_test, seed=args.seed,
        frame_size=args.frame_size, num_frames=args.frames, num_digits=1, as_uint8=True,
    )  # fmt: skip
    return torch.stack([train[i] for i in range(len(train))]), torch.stack([test[i] for i in range(len(test))])


def flow_kwargs(args) -> dict:
    return dict(network="conv", hidden=args.flow_hidden, num_layers=args.flow_layers, window=args.flow_window)


def no_latents(xs: torch.Tensor) -> None:
    """The guide of a model without latent sites."""


class Trainer:
    """One model: ``step(x)`` does one Adam step on a dequantized batch (returns the summed loss, nats),
    ``nll(x)`` gives (B,) nats."""

    def __init__(self, name: str, args, frame_shape: torch.Size):
        self.name = name
        pyro.clear_param_store()
        if name in ("1-AF", "2-AF"):
            self.flow = FlowSequenceModel(frame_shape, num_flows=int(name[0]), base="learned", **flow_kwargs(args))
            self.trainer = ModelTrainer(self.flow, inference="baseline", guide=no_latents, lr=args.lr, clip_norm=None)
        else:
            flow = AffineAutoregressiveFlow(frame_shape, **flow_kwargs(args)) if "1-AF" in name else None
            self.slvm = SLVM(frame_shape, z_dim=args.z_dim, nf=args.nf, flow=flow)
            self.trainer = ModelTrainer(self.slvm, lr=args.lr, clip_norm=None,
                                        guide_kwargs=dict(num_iterations=args.iterations, encode_observation=True))
            self.guide = self.trainer.guide

    def step(self, x: torch.Tensor) -> float:
        return self.trainer.step(x)

    def nll(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "flow"):
            with torch.no_grad():
                return -self.flow.log_prob(x)
        return filtering_free_energy(self.slvm.model, self.guide, x)["free_energy"].sum(1).detach()


def train(trainer: Trainer, train_u8: torch.Tensor, args, log: Callable[[str], None]) -> int:
    """Adam for ``args.steps`` steps, or else ``args.minutes`` of wall time; returns the number of steps taken."""
    gen = torch.Generator().manual_seed(args.seed)
    deadline, steps, start = time.monotonic() + 60 * args.minutes, 0, time.monotonic()
    dims = train_u8[0].numel()
    while steps < args.steps if args.steps else time.monotonic() < deadline:
        idx = torch.randint(len(train_u8), (args.batch_size,), generator=gen)
        loss = trainer.step(dequantize(train_u8[idx], generator=gen))
        steps += 1
        if not math.isfinite(loss):
            raise FloatingPointError(f"{trainer.name}: loss became {loss} at step {steps}")
        if steps % 100 == 0:
            npd = nats_per_dim(loss / args.batch_size, dims).item()
            log(f"  {trainer.name} step {steps} ({time.monotonic() - start:.0f} s): train {npd:.3f} nats/dim")
    return steps


def evaluate(trainer: Trainer, test_x: torch.Tensor, batch: int = 50) -> float:
    """Mean test nats per dimension of the 8-bit data."""
    nll = torch.cat([trainer.nll(test_x[i : i + batch]) for i in range(0, len(test_x), batch)])
    return nats_per_dim(nll.mean(), test_x[0].numel()).item()


def main(argv=None) -> Dict[str, float]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    pyro.set_rng_seed(args.seed)
    log = lambda s: print(s, flush=True)  # noqa: E731
    train_u8, test_u8 = load_data(args)
    test_x = dequantize(test_u8, generator=torch.Generator().manual_seed(args.seed + 1))
    frame_shape = train_u8.shape[2:]
    log(f"train {tuple(train_u8.shape)}, test {tuple(test_u8.shape)}")
    results, steps, corr = {}, {}, {}
    for name in args.models:
        pyro.set_rng_seed(args.seed)
        trainer = Trainer(name, args, frame_shape)
        steps[name] = train(trainer, train_u8, args, log)
        results[name] = evaluate(trainer, test_x)
        log(f"{name}: {results[name]:.3f} nats/dim after {steps[name]} steps")
        if name == "1-AF":
            flow = trainer.flow.flows[0]
            with torch.no_grad():
                mu, sigma = flow.shift_and_scale_all(test_x)
                y = (test_x - mu) / sigma
            corr = {"x": temporal_correlation(test_x).item(), "y": temporal_correlation(y).item()}
            plot_flow_frames(test_x[0], mu[0], sigma[0], y[0], args.png, num_frames=min(6, args.frames))
            log(f"corr_x {corr['x']:.3f} -> corr_y {corr['y']:.3f}; frames written to {args.png}")
    write_table(args, results, steps, corr, argv)
    return results


def write_table(args, results, steps, corr, argv) -> None:
    lines = [
        f"Command: `python benchmarks/flows.py {' '.join(argv if argv is not None else sys.argv[1:])}`  ",
        f"Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; "
        f"torch {torch.__version__}, {platform.python_version()}; {torch.get_num_threads()} thread(s)  ",
        f"Data: Moving MNIST, 1 digit, {args.frame_size}x{args.frame_size}, {args.frames} frames, "
        f"{args.num_train} train / {args.num_test} test sequences; "
        + (f"{args.steps} training steps per model" if args.steps else f"{args.minutes:g} min of training per model"),
        "",
        "| model | test nats/dim (here) | training steps | poster (64x64 M-MNIST) |",
        "| --- | --- | --- | --- |",
    ]
    for name, value in results.items():
        bound = "≤ " if name.startswith("SLVM") else ""
        lines.append(f"| {name} | {bound}{value:.3f} | {steps[name]} | {POSTER[name]} |")
    if corr:
        lines += [
            "",
            "| temporal correlation of adjacent frames | here (1-AF) | poster |",
            "| --- | --- | --- |",
            f"| corr_x | {corr['x']:.3f} | 0.24 |",
            f"| corr_y | {corr['y']:.3f} | 0.02 |",
        ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
