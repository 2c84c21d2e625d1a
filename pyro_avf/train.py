"""Train and evaluate a deep sequence model on polyphonic music from the command line.

Example::

    python -m pyro_avf.train --model srnn --dataset jsb_chorales --inference avf --iterations 5
    torchrun --nproc_per_node 2 -m pyro_avf.train --model dmm --inference baseline   # data-parallel

Training (AVF paper, App. B.2): random crops of ``--crop-length`` steps, batches of ``--batch-size`` (the global
batch, split over the ranks), gradients clipped element-wise (``ClippedAdam``), learning rate
:math:`\\eta_e = \\eta \\cdot 0.999^{e}` in epoch e, KL weight :math:`\\beta_e = \\min(1, (e + 1) / E_{KL})`.
The objective of a batch of B crops is the free energy per crop, :math:`\\frac1B \\sum_n \\mathcal{F}_n`.

Inference (``--inference``):

- ``avf``: :class:`~pyro_avf.IterativeGuide` with a learned update and :class:`~pyro_avf.AmortizedFilteringELBO`;
- ``em``: the same guide with per-step Adam (non-amortized variational filtering EM);
- ``baseline``: the model's own filtering guide with ``Trace_ELBO``; β multiplies the log densities of every
  latent site in model and guide (``poutine.scale`` on latent sites only), giving
  :math:`-\\log p(x|z) + \\beta (\\log q(z) - \\log p(z))`;
- ``autonormal``: refused with an explanation (see :func:`check_args`).

Evaluation: whole test songs; the number reported is the test free energy per step (nats),
:math:`\\sum_{n,t} m_{n,t} \\mathcal{F}_{n,t} / \\sum m`. SRNN is filtered one step at a time, with AVF or EM
through :class:`~pyro_avf.online.OnlineFilter` over :class:`~pyro_avf.models.srnn.SRNNStream` and with its own
filter step by step too, so memory stays flat in the song's length; VRNN and DMM use
:func:`pyro_avf.evaluation.filtering_free_energy`.

Data: ``--data-dir``, ``$PYRO_AVF_DATA`` and the user cache are looked in (:mod:`data_loaders.files`);
``--download`` fetches a file found nowhere. A missing or corrupt data file (or checkpoint) ends the command
with one line naming it and what to do, before anything is written.

Run folders (:mod:`pyro_avf.run_folder`): ``--out-dir`` (default
``runs/<model>-<dataset>-<inference>-k<iterations>-seed<seed>-<hash8>``, no ``-k`` for the baseline, the hash
that of the settings that change the results, :func:`run_config`) holds one run. A second run with the same
settings refuses to touch it unless given ``--resume`` (continue it; the settings in its ``config.json`` must
match) or ``--overwrite`` (replace it); a run holds an exclusive lock on the folder (``.lock``) while it lives,
so two runs never write into one folder; every file is written to a temporary file and renamed into place, so a
killed run leaves whole files only (and the next run in the folder removes its temporary files). At the end
the command prints the folder and the final test free energy.
The folder receives ``config.json``, ``checkpoint.pt`` (after every epoch:
state dicts, optimizer and scheduler state, epoch, RNG states, all plain tensors and containers for
``torch.load(weights_only=True)``), ``results.csv`` (one row per evaluation: model, dataset, inference,
iterations, epoch, ``wall_time_s`` (cumulative training time, evaluation excluded), ``train_loss_per_step`` (the
β-weighted loss of the epoch over its real steps), ``test_free_energy_per_step``, ``test_steps``, ``kl_weight``,
``lr``, ``processes``; with ``--valid-every`` also ``valid_free_energy_per_step``, the best validation score so
far, and ``tested_epoch``) and PNG plots (:mod:`pyro_avf.plots`). Early stopping (``--valid-every E``): every E
epochs the validation songs are scored and the best parameters so far are saved to ``best.pt``; the final test
evaluation uses those parameters (JSB Chorales overfits within an hour at ``--lr 1e-3``).
``--max-minutes`` ends the epoch under way when
the budget of this invocation is spent, then evaluates and saves as after any epoch. ``--resume`` continues
from the checkpoint; an interrupted epoch is redone from its start with the same data and random numbers.

Under ``torchrun`` (``WORLD_SIZE`` > 1) the ranks join a gloo process group, each trains on its shard of every
global batch (``DistributedSampler``), and :class:`torch.nn.parallel.DistributedDataParallel` averages the
gradients; rank 0 writes the outputs.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import random
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import pandas as pd
import pyro
import torch
import torch.distributed as torch_dist
from pyro import poutine
from pyro.infer import Trace_ELBO
from pyro.optim.clipped_adam import ClippedAdam
from pyro.poutine.messenger import Messenger
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm.auto import tqdm

from data_loaders.files import ChecksumError, DataFileNotFoundError, default_data_dir
from data_loaders.polyphonic import POLYPHONIC_DATASETS, RandomCropDataset, collate_sequences, load_polyphonic
from pyro_avf import plots
from pyro_avf.elbo import AmortizedFilteringELBO
from pyro_avf.evaluation import filtering_free_energy, score_replayed
from pyro_avf.guide import IterativeGuide
from pyro_avf.models.dmm import DMM
from pyro_avf.models.srnn import SRNN, SRNNStream
from pyro_avf.models.vrnn import VRNN
from pyro_avf.online import OnlineFilter
from pyro_avf.run_folder import RunFolder, RunFolderError, atomic_write, config_digest

log = logging.getLogger("pyro_avf.train")

MODELS = ("srnn", "vrnn", "dmm")
INFERENCES = ("avf", "baseline", "em", "autonormal")
CHECKPOINT = "checkpoint.pt"
BEST = "best.pt"  # the parameters with the lowest validation free energy (--valid-every)
RESULTS = "results.csv"
CURVES_PNG = "training_curves.png"
PER_ITERATION_PNG = "free_energy_per_iteration.png"
PIANO_ROLL_PNG = "piano_roll.png"
OUTPUTS = (CHECKPOINT, BEST, RESULTS, CURVES_PNG, PER_ITERATION_PNG, PIANO_ROLL_PNG)  # any of them: a run is there
CHECKPOINT_VERSION = 1
# options that fix the shapes of the parameters: a checkpoint only resumes a run with the same values
STRUCTURE = ("model", "dataset", "inference", "iterations", "update", "z_dim", "model_size", "hidden_size")
# options that do not change what a run computes: where it reads and writes, how fast, and where this invocation
# stops (a run is resumed with a larger --epochs or another --max-minutes); every other option is in run_config
NOT_CONFIG = ("data_dir", "download", "out_dir", "resume", "overwrite", "threads", "max_minutes", "epochs",
              "no_plots", "simulate_kill_after")  # fmt: skip


class SimulatedKill(SystemExit):
    """Raised by ``--simulate-kill-after``: the run stops at once, as if killed, without saving anything."""


# ---------------------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    """The command line; ``--help`` shows every option's default."""
    p = argparse.ArgumentParser(prog="python -m pyro_avf.train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # fmt: skip
    p.add_argument("--model", choices=MODELS, default="srnn", help="sequence model")
    p.add_argument("--dataset", choices=sorted(POLYPHONIC_DATASETS), default="jsb_chorales", help="music data set")
    p.add_argument(
        "--data-dir", default=None,
        help="folder holding the data files (None: $PYRO_AVF_DATA, else the project's shared data); the user cache "
        "~/.cache/pyro_avf is looked in too",
    )  # fmt: skip
    p.add_argument(
        "--download", action="store_true",
        help="fetch data files found nowhere from their public sources into the user cache, checking their SHA-256",
    )  # fmt: skip
    p.add_argument(
        "--inference",
        choices=INFERENCES,
        default="avf",
        help="avf: learned iterative filtering; em: per-step Adam (non-amortized); baseline: the model's own "
        "filtering guide; autonormal: refused with an explanation",
    )
    p.add_argument("--iterations", type=int, default=5, help="inference iterations K per step (avf, em)")
    p.add_argument(
        "--update", choices=("highway", "residual", "learned_sgd"), default="highway", help="AVF update form"
    )
    p.add_argument("--hidden-size", type=int, default=1024, help="units per layer of the update networks")
    p.add_argument("--encode-observation", action="store_true", help="AVF: also feed x_t to the update network")
    p.add_argument("--inference-lr", type=float, default=0.1, help="step size of the em inference optimiser")
    p.add_argument("--z-dim", type=int, default=None, help="latent size (None: the model's music size)")
    p.add_argument("--model-size", type=int, default=None, help="width of every other model layer (None: the music "
                   "sizes; small values for tiny runs)")  # fmt: skip
    p.add_argument("--epochs", type=int, default=800, help="train until this many epochs are done")
    p.add_argument("--batch-size", type=int, default=16, help="global batch, split over the ranks")
    p.add_argument("--crop-length", type=int, default=25, help="steps per random training crop")
    p.add_argument("--lr", type=float, default=1e-4, help="learning rate of the first epoch")
    p.add_argument("--lr-decay", type=float, default=0.999, help="learning-rate factor per epoch")
    p.add_argument("--clip-norm", type=float, default=10.0, help="element-wise gradient clipping (ClippedAdam)")
    p.add_argument("--kl-anneal-epochs", type=int, default=50, help="β rises linearly to 1 over these epochs")
    p.add_argument("--seed", type=int, default=0, help="random seed of the parameters, crops and noise")
    p.add_argument("--threads", type=int, default=None, help="torch threads per process (None: torch's choice)")
    p.add_argument("--max-minutes", type=float, default=None, help="wall-clock budget of this invocation "
                   "(None: no limit)")  # fmt: skip
    p.add_argument("--max-train-batches", type=int, default=None, help="cap on training batches per epoch "
                   "(None: all)")  # fmt: skip
    p.add_argument("--eval-every", type=int, default=10, help="evaluate every this many epochs (and at the end)")
    p.add_argument("--eval-batch-size", type=int, default=16, help="test songs per evaluation batch")
    p.add_argument("--max-eval-songs", type=int, default=None, help="evaluate on the first N test songs only "
                   "(None: all)")  # fmt: skip
    p.add_argument(
        "--valid-every", type=int, default=0,
        help="early stopping: score the validation songs every this many epochs, keep the best parameters and "
        "report the test free energy of those (0: off, the last parameters are tested)",
    )  # fmt: skip
    p.add_argument("--max-valid-songs", type=int, default=None, help="validate on the first N validation songs only "
                   "(None: all)")  # fmt: skip
    p.add_argument("--no-plots", action="store_true", help="write no PNG plots")
    p.add_argument("--out-dir", default=None, help="the run folder (None: runs/<model>-<dataset>-<inference>-"
                   "k<iterations>-seed<seed>-<hash8>, the hash that of every setting that changes the results)")
    p.add_argument("--resume", action="store_true", help="continue the run in the run folder from its checkpoint "
                   "(its settings must be the same)")  # fmt: skip
    p.add_argument("--overwrite", action="store_true", help="replace the run in the run folder, deleting its "
                   "results and checkpoints")  # fmt: skip
    p.add_argument(
        "--simulate-kill-after",
        type=int,
        default=None,
        help="testing aid: stop abruptly (no saving) after this many training batches of this invocation "
        "(None: never)",
    )
    return p


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Reject values that cannot work, with a message naming the option (``parser.error`` exits with 2)."""
    positive = ["epochs", "batch_size", "crop_length", "hidden_size", "eval_every", "eval_batch_size"]
    optional_positive = ["z_dim", "model_size", "threads", "max_train_batches", "max_eval_songs", "max_valid_songs"]
    optional_positive.append("simulate_kill_after")
    for name in positive + [n for n in optional_positive if getattr(args, n) is not None]:
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    if args.iterations < 0:
        parser.error(f"--iterations must be >= 0, got {args.iterations}")
    if args.inference == "em" and args.iterations < 1:
        parser.error("--inference em needs --iterations >= 1 (K = 0 leaves the posterior at the prior)")
    if args.kl_anneal_epochs < 0:
        parser.error(f"--kl-anneal-epochs must be >= 0, got {args.kl_anneal_epochs}")
    for name in ("lr", "inference_lr", "clip_norm"):
        value = getattr(args, name)
        if not (math.isfinite(value) and value > 0):
            parser.error(f"--{name.replace('_', '-')} must be a positive number, got {value}")
    if not 0 < args.lr_decay <= 1:
        parser.error(f"--lr-decay must be in (0, 1], got {args.lr_decay}")
    if args.max_minutes is not None and not args.max_minutes > 0:
        parser.error(f"--max-minutes must be positive, got {args.max_minutes}")
    if args.data_dir is not None and not Path(args.data_dir).is_dir():
        parser.error(f"--data-dir {args.data_dir} is not a folder")
    if args.resume and args.overwrite:
        parser.error("--resume continues the run in the folder and --overwrite replaces it: pass one of them")
    if args.inference == "autonormal":
        parser.error(
            "--inference autonormal does not make sense for these sequence models: AutoNormalMessenger keeps one "
            "posterior per latent site name and batch row (z_1..z_T of the B crops of a batch), while every batch "
            "brings new songs and the test songs have other lengths and counts, so nothing learned carries over. "
            "Use --inference em for non-amortized filtering or avf for amortized filtering."
        )


# ---------------------------------------------------------------------------------------------------------
# Model, inference and objective


def build_model(args: argparse.Namespace) -> nn.Module:
    """The music model (88 Bernoulli keys) with optional ``--z-dim`` / ``--model-size`` overrides."""
    sizes: Dict[str, int] = {} if args.z_dim is None else {"z_dim": args.z_dim}
    s = args.model_size
    if args.model == "srnn":
        return SRNN.music(**sizes, **({} if s is None else {"d_dim": s, "a_dim": s, "hidden_dim": s}))
    if args.model == "vrnn":
        return VRNN.music(**sizes, **({} if s is None else {"h_dim": s, "phi_dim": s, "hidden_dim": s}))
    widths = {} if s is None else {"emission_dim": s, "transition_dim": s, "rnn_dim": s}
    return DMM(x_dim=88, likelihood="bernoulli", **sizes, **widths)


class ScaleLatents(Messenger):
    """Multiply the scale of every latent (unobserved) sample site by β: KL annealing for ``Trace_ELBO``."""

    def __init__(self, beta: float):
        super().__init__()
        self.beta = beta

    def _pyro_sample(self, msg) -> None:
        if not msg["is_observed"]:
            msg["scale"] = self.beta * msg["scale"]


class Objective:
    """The summed free energy of a batch, :math:`\\sum_n \\mathcal{F}_n` with KL weight :attr:`kl_weight`."""

    def __init__(self, model: Callable, guide: Callable, elbo):
        self.model, self.guide, self.elbo = model, guide, elbo
        self.kl_weight = 1.0

    def __call__(self, xs: Tensor, mask: Tensor) -> Tensor:
        if isinstance(self.elbo, AmortizedFilteringELBO):
            self.elbo.kl_weight = self.kl_weight
            return self.elbo.differentiable_loss(self.model, self.guide, xs, mask)
        with ScaleLatents(self.kl_weight):
            return self.elbo.differentiable_loss(self.model, self.guide, xs, mask)


class Trainable(nn.Module):
    """All trained modules in one container (what DDP wraps and the checkpoint saves); ``forward`` is the loss."""

    def __init__(self, parts: Dict[str, nn.Module], objective: Objective):
        super().__init__()
        self.parts = nn.ModuleDict(parts)
        self.objective = objective

    def forward(self, xs: Tensor, mask: Tensor) -> Tensor:
        return self.objective(xs, mask)


def build_inference(args: argparse.Namespace, model: nn.Module) -> Tuple[Callable, Trainable]:
    """The guide and the container of trained modules for ``--inference``."""
    if args.inference == "baseline":
        objective = Objective(model.model, model.guide, Trace_ELBO(max_plate_nesting=1))
        return model.guide, Trainable({"model": model}, objective)
    guide = IterativeGuide(
        model.model,
        num_iterations=args.iterations,
        update=args.update if args.inference == "avf" else "adam",
        hidden_size=args.hidden_size,
        lr=args.inference_lr,
        encode_observation=args.encode_observation,
    )
    objective = Objective(model.model, guide, AmortizedFilteringELBO())
    return guide, Trainable({"model": model.generative, "guide": guide}, objective)


def kl_weight(epoch: int, anneal_epochs: int) -> float:
    """β in (0-based) epoch ``epoch``: linear from 1/E to 1 over the first E epochs."""
    return 1.0 if anneal_epochs == 0 else min(1.0, (epoch + 1) / anneal_epochs)


# ---------------------------------------------------------------------------------------------------------
# Data


class EpochCrops(Dataset):
    """Random crops whose start depends only on (seed, epoch, song index): reproducible on resume and across
    any number of ranks. Item ``i`` is ``RandomCropDataset([song_i], length)[0]`` drawn from its own generator."""

    def __init__(self, songs: Sequence[Tensor], length: int, seed: int):
        self.songs, self.length, self.seed, self.epoch = list(songs), length, seed, 0

    def __len__(self) -> int:
        return len(self.songs)

    def __getitem__(self, index: int) -> Tuple[Tensor, Tensor]:
        key = ((self.seed * 1_000_003 + self.epoch) * 1_000_033 + index) % (2**63)
        return RandomCropDataset([self.songs[index]], self.length, generator=torch.Generator().manual_seed(key))[0]


def load_songs(args: argparse.Namespace, split: str) -> List[Tensor]:
    """One split of ``--dataset``; a missing or corrupt data file ends the command with a one-line message that
    names the file and what to do."""
    data_dir = args.data_dir or default_data_dir()
    try:
        return load_polyphonic(args.dataset, split, path=data_dir, download=args.download)
    except DataFileNotFoundError as err:
        where = ", ".join(str(p) for p in err.places)
        fetch = f"pass --download to fetch it from {err.url}, or " if err.url and not args.download else ""
        message = f"data file {err.data_file} not found (looked in: {where}); {fetch}put it in the --data-dir folder"
    except ChecksumError as err:
        message = (f"data file {err.path} is corrupt, truncated or another version (its SHA-256 is {err.actual}, "
                   f"expected {err.expected}); delete it and run again with --download, or pass --data-dir with a "
                   "good copy")  # fmt: skip
    except (OSError, ValueError) as err:  # a failed download, or a file that passes its checksum but not parsing
        message = f"cannot load the {args.dataset} {split} data: {err}"
    raise SystemExit(" ".join(message.split()))


def eval_batches(songs: Sequence[Tensor], batch_size: int) -> List[Tuple[Tensor, Tensor]]:
    """Whole songs sorted by length (less padding), batched and padded with a mask."""
    order = sorted(range(len(songs)), key=lambda i: -songs[i].shape[0])
    return [
        collate_sequences(
            [(songs[i], torch.ones(songs[i].shape[0], dtype=torch.bool)) for i in order[k : k + batch_size]]
        )
        for k in range(0, len(order), batch_size)
    ]


# ---------------------------------------------------------------------------------------------------------
# Distributed helpers


class Dist:
    """Rank and world size; a gloo process group when ``WORLD_SIZE`` > 1 (set by torchrun)."""

    def __init__(self):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.started = False
        if self.world > 1 and not torch_dist.is_initialized():
            torch_dist.init_process_group("gloo", rank=self.rank, world_size=self.world)
            self.started = True

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sum(self, *values: float) -> List[float]:
        t = torch.tensor(values, dtype=torch.float64)
        if self.world > 1:
            torch_dist.all_reduce(t)
        return t.tolist()

    def any(self, flag: bool) -> bool:
        return self.sum(float(flag))[0] > 0 if self.world > 1 else flag

    def close(self) -> None:
        if self.started:
            torch_dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------------------
# Checkpoints (plain tensors and containers only, for torch.load(weights_only=True))


def rng_state() -> dict:
    version, state, gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "python": {"version": version, "state": torch.tensor(state, dtype=torch.int64), "gauss": gauss},
        "numpy": {"keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)},
    }  # fmt: skip


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss"]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))


def save_checkpoint(path: Path, **state) -> None:
    """``torch.save`` through :func:`~pyro_avf.run_folder.atomic_write`: a kill never leaves half a checkpoint."""
    with atomic_write(path) as f:
        torch.save(state, f)


def read_checkpoint(path: Path) -> dict:
    """``torch.load(path, weights_only=True)`` of a file this command wrote; a truncated or foreign file ends the
    command with a one-line message naming it (not torch's advice to load untrusted pickles)."""
    try:
        state = torch.load(path, weights_only=True)
    except Exception as err:  # truncated zip, foreign pickle, refused global, ...: all mean "not our checkpoint"
        raise SystemExit(
            f"{path} is not a readable checkpoint of pyro_avf.train ({type(err).__name__}: it is truncated, damaged "
            "or another kind of file); delete it, or start the run again with --overwrite"
        ) from None
    if not isinstance(state, dict) or "version" not in state or "net" not in state:
        raise SystemExit(f"{path} is not a checkpoint of pyro_avf.train (no version and parameters in it); delete "
                         "it, or start the run again with --overwrite")  # fmt: skip
    return state


def load_checkpoint(path: Path, args: argparse.Namespace) -> dict:
    """The checkpoint to resume from, checked to come from a run with the same parameter shapes."""
    if not path.is_file():
        raise SystemExit(f"--resume: no checkpoint at {path}; run without --resume to start training")
    state = read_checkpoint(path)
    if state.get("version") != CHECKPOINT_VERSION:
        raise SystemExit(
            f"--resume: {path} has checkpoint version {state.get('version')}, expected {CHECKPOINT_VERSION}"
        )
    differ = [k for k in STRUCTURE if state["config"].get(k) != getattr(args, k)]
    if differ:
        saved = ", ".join(f"--{k.replace('_', '-')} {state['config'].get(k)}" for k in differ)
        raise SystemExit(f"--resume: {path} was written by a run with {saved}; pass the same values to resume it")
    return state


def structure(args: argparse.Namespace) -> dict:
    return {k: getattr(args, k) for k in STRUCTURE}


def run_config(args: argparse.Namespace) -> Dict[str, Any]:
    """The settings that change a run's results (every option but :data:`NOT_CONFIG`): the run's identity,
    stored in ``config.json`` and hashed into the default folder name."""
    return {k: v for k, v in sorted(vars(args).items()) if k not in NOT_CONFIG}


def default_out_dir(args: argparse.Namespace) -> Path:
    """``runs/<model>-<dataset>-<inference>-k<K>-seed<seed>-<hash8>``: a readable name and the hash of
    :func:`run_config`, so runs with other settings never share a folder."""
    k = f"-k{args.iterations}" if args.inference != "baseline" else ""
    name = f"{args.model}-{args.dataset}-{args.inference}{k}-seed{args.seed}-{config_digest(run_config(args))}"
    return Path("runs") / name


# ---------------------------------------------------------------------------------------------------------
# Evaluation and figures


def masked_total(free_energy: Tensor, observed: Tensor, mask: Tensor) -> Tuple[float, float]:
    """:math:`\\sum m\\,\\mathcal{F}` and :math:`\\sum m` with :math:`m` = observed and not padding."""
    m = observed & mask
    return (free_energy * m).sum().item(), m.sum().item()


def streamed_free_energy(srnn: SRNN, guide: IterativeGuide, xs: Tensor, mask: Tensor) -> Tuple[float, float]:
    """Sum of :math:`m_{n,t}\\mathcal{F}_{n,t}` and of :math:`m_{n,t}` over a batch of padded songs, filtered one
    step at a time: nothing but the filter's current state is kept, so memory does not grow with the length."""
    f = OnlineFilter(SRNNStream(srnn), guide)
    f.init(batch_size=xs.size(0))
    total = steps = 0.0
    for t in range(xs.size(1)):
        out = f.step(xs[:, t], mask[:, t])
        step_total, step_count = masked_total(out.free_energy, out.observed, mask[:, t])
        total, steps = total + step_total, steps + step_count
    return total, steps


def streamed_baseline_free_energy(srnn: SRNN, xs: Tensor, mask: Tensor) -> Tuple[float, float]:
    """:func:`streamed_free_energy` for SRNN's own filter: each step's guide is traced, the model step replayed
    against it and scored (:func:`pyro_avf.evaluation.score_replayed`), then both traces are dropped."""
    stream = SRNNStream(srnn)
    state: dict = {}
    stream.init(state, batch_size=xs.size(0))
    total = steps = 0.0
    with torch.no_grad():
        for t in range(xs.size(1)):
            guide_trace, model_trace, ctx = stream.baseline_traces(state, xs[:, t], mask[:, t])
            (terms,) = score_replayed(model_trace, guide_trace, [ctx])
            step_total, step_count = masked_total(terms.free_energy, terms.observed, mask[:, t])
            total, steps = total + step_total, steps + step_count
    return total, steps


def evaluate(model: nn.Module, guide: Callable, batches: Sequence[Tuple[Tensor, Tensor]], dist: Dist, seed: int
             ) -> dict:  # fmt: skip
    """Total free energy and number of real steps over the test batches (this rank's share, then summed)."""
    total = steps = 0.0
    if isinstance(guide, IterativeGuide):
        guide.kl_weight = 1.0  # the true free energy, whatever β training used last
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        shard = batches[dist.rank :: dist.world]
        for xs, mask in tqdm(shard, desc="test songs", leave=False, disable=not dist.main or None):
            if isinstance(model, SRNN) and isinstance(guide, IterativeGuide):
                batch_total, batch_steps = streamed_free_energy(model, guide, xs, mask)
            elif isinstance(model, SRNN) and guide == model.guide:
                batch_total, batch_steps = streamed_baseline_free_energy(model, xs, mask)
            else:
                out = filtering_free_energy(model.model, guide, xs, mask)
                batch_total, batch_steps = masked_total(out["free_energy"], out["observed"], mask)
            total += batch_total
            steps += batch_steps
    total, steps = dist.sum(total, steps)
    return {"free_energy_per_step": total / max(steps, 1.0), "steps": int(steps)}


def validate(run: Run, dist: Dist, seed: int, epoch: int) -> None:
    """Score the validation songs; when they improve on the best so far, save the parameters to ``best.pt``."""
    result = evaluate(run.model, run.guide, run.valid, dist, seed)
    log.info("epoch %d: validation free energy %.4f nats/step", epoch, result["free_energy_per_step"])
    if result["free_energy_per_step"] < run.best_valid:
        run.best_valid, run.best_epoch = result["free_energy_per_step"], epoch
        if dist.main:
            save_checkpoint(run.out_dir / BEST, version=CHECKPOINT_VERSION, epoch=epoch, net=run.net.state_dict())
    if dist.world > 1:
        torch_dist.barrier()


def test_selected(run: Run, dist: Dist, seed: int) -> dict:
    """The test free energy of the parameters with the best validation score (early stopping); the training
    parameters are restored afterwards."""
    current = {k: v.clone() for k, v in run.net.state_dict().items()}
    best = read_checkpoint(run.out_dir / BEST)
    run.net.load_state_dict(best["net"])
    try:
        result = evaluate(run.model, run.guide, run.test, dist, seed)
    finally:
        run.net.load_state_dict(current)
    log.info("testing the parameters of epoch %d (best validation free energy %.4f)", best["epoch"], run.best_valid)
    return {**result, "epoch": best["epoch"]}


class StepRecorder(Messenger):
    """Records ``(fn, args, kwargs)`` of every executed filtering step (post-processing only, so the guide's
    probes of the handler stack are not counted)."""

    def __init__(self):
        super().__init__()
        self.calls: List[tuple] = []

    def _pyro_post_filtering_step(self, msg) -> None:
        self.calls.append((msg["fn"], msg["args"], msg["kwargs"]))


def _observation_mean(fn: Callable, args, kwargs, latent_values: Dict[str, Tensor]) -> Tensor:
    trace = poutine.trace(poutine.condition(fn, data=latent_values)).get_trace(*args, **kwargs)
    means = [s["fn"].mean for n, s in trace.nodes.items() if s["type"] == "sample" and n not in latent_values]
    return torch.cat([m.reshape(m.shape[0], -1) for m in means], -1)


def prediction_and_reconstruction(model: Callable, guide: Callable, xs: Tensor, mask: Tensor) -> Tuple[Tensor, Tensor]:
    """Observation means of each step of ``xs`` (B, T, D) under the prior mean (the prediction, iteration 0)
    and under the final posterior mean (the reconstruction), both given the sampled history; each (B, T, D).

    Each recorded step is re-run with its latent sites conditioned on those means.
    """
    recorder = StepRecorder()
    if isinstance(guide, IterativeGuide):
        with recorder:
            guide(xs, mask)
        trace = guide.get_traces()[1]  # the guide trace: its latent sites hold the final posteriors
    else:
        trace = poutine.trace(guide).get_trace(xs, mask)
        with recorder:
            poutine.replay(model, trace=trace)(xs, mask)
    predictions, reconstructions = [], []
    with torch.no_grad():
        for fn, args, kwargs in recorder.calls:
            prior_trace = poutine.trace(fn).get_trace(*args, **kwargs)
            latent = [n for n, s in prior_trace.nodes.items() if s["type"] == "sample" and not s["is_observed"]]
            predictions.append(
                _observation_mean(fn, args, kwargs, {n: prior_trace.nodes[n]["fn"].mean for n in latent})
            )
            reconstructions.append(_observation_mean(fn, args, kwargs, {n: trace.nodes[n]["fn"].mean for n in latent}))
    return torch.stack(predictions, 1), torch.stack(reconstructions, 1)


def make_plots(out_dir: Path, results: pd.DataFrame, model: nn.Module, guide: Callable, songs, seed: int) -> None:
    """Training curves, free energy per inference iteration (IterativeGuide only) and a piano roll."""
    plots.plot_training_curves(results, out_dir / CURVES_PNG)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        xs, mask = eval_batches(songs[:4], 4)[0]
        if isinstance(guide, IterativeGuide):
            elbo = AmortizedFilteringELBO(kl_weight=1.0)
            elbo.loss(model.model, guide, xs, mask)
            diag = elbo.diagnostics
            plots.plot_free_energy_per_iteration(
                diag["free_energy"], diag["observed"], out_dir / PER_ITERATION_PNG
            )
        one = songs[0].unsqueeze(0)
        prediction, reconstruction = prediction_and_reconstruction(
            model.model, guide, one, torch.ones(one.shape[:2], dtype=torch.bool)
        )
    plots.plot_piano_roll(songs[0], prediction[0], reconstruction[0], out_dir / PIANO_ROLL_PNG)


# ---------------------------------------------------------------------------------------------------------
# Training


def read_results(path: Path) -> Optional[pd.DataFrame]:
    """The rows of ``results.csv``; ``None`` when there is none yet (or an empty file, as a kill during a
    non-atomic write of an older version could leave)."""
    return pd.read_csv(path) if path.is_file() and path.stat().st_size > 0 else None


def write_results(path: Path, results: pd.DataFrame) -> None:
    with atomic_write(path, "w") as f:
        results.to_csv(f, index=False)


def append_result(path: Path, row: dict) -> pd.DataFrame:
    """Add one row to ``results.csv`` (rewritten atomically); return all rows."""
    frame, old = pd.DataFrame([row]), read_results(path)
    results = frame if old is None else pd.concat([old, frame], ignore_index=True)
    write_results(path, results)
    return results


def trim_results(path: Path, epochs_done: int) -> None:
    """Drop rows of epochs after the checkpoint (written before an interruption), so they are not repeated."""
    results = read_results(path)
    if results is not None:
        write_results(path, results[results["epoch"] <= epochs_done])


def train(args: argparse.Namespace) -> dict:
    """Run the training loop described in the module docstring; return the last evaluation's row."""
    dist = Dist()
    try:
        return _train(args, dist)
    finally:
        dist.close()


@dataclass
class Run:
    """Everything one training invocation holds."""

    model: nn.Module
    guide: Callable
    net: Trainable
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    crops: EpochCrops
    sampler: DistributedSampler
    loader: DataLoader
    n_batches: int
    test_songs: List[Tensor]
    test: List[Tuple[Tensor, Tensor]]
    out_dir: Path
    valid: List[Tuple[Tensor, Tensor]]
    start_epoch: int = 0
    best_valid: float = math.inf
    best_epoch: int = 0
    wall: float = 0.0
    batches_run: int = 0  # training batches of this invocation
    folder: Optional[RunFolder] = None  # the locked run folder (rank 0 only)


def open_run_folder(args: argparse.Namespace, dist: Dist, out_dir: Path) -> Optional[RunFolder]:
    """Rank 0 creates and locks the run folder (:class:`~pyro_avf.run_folder.RunFolder`); every rank learns
    whether that worked, so a refusal ends all of them with rank 0's one-line message."""
    folder, refusal = None, None
    if dist.main:
        try:
            folder = RunFolder.open(out_dir, run_config(args), resume=args.resume, overwrite=args.overwrite,
                                    outputs=OUTPUTS)  # fmt: skip
        except RunFolderError as err:
            refusal = str(err)
    if dist.any(refusal is not None):
        raise SystemExit(refusal or f"rank 0 could not open the run folder {out_dir}")
    return folder


def setup(args: argparse.Namespace, dist: Dist) -> Run:
    """Data, model, inference, optimizer and learning-rate schedule; the locked run folder; the checkpoint's
    state with ``--resume``. Nothing is written before the data are loaded, so a missing or corrupt data file
    leaves no folder behind."""
    out_dir = Path(args.out_dir) if args.out_dir else default_out_dir(args)
    if args.resume and not (out_dir / CHECKPOINT).is_file():
        raise SystemExit(f"--resume: no checkpoint at {out_dir / CHECKPOINT}; run without --resume to start training")
    train_songs = load_songs(args, "train")
    test_songs = load_songs(args, "test")[: args.max_eval_songs]
    valid_songs = load_songs(args, "valid")[: args.max_valid_songs] if args.valid_every else []

    pyro.clear_param_store()
    pyro.set_rng_seed(args.seed)
    model = build_model(args)
    guide, net = build_inference(args, model)
    crops = EpochCrops(train_songs, args.crop_length, args.seed)
    with torch.random.fork_rng():  # creates the update networks (lazily built) without touching the RNG
        net(*collate_sequences([crops[0], crops[1]]))
    optimizer = ClippedAdam(net.parameters(), lr=args.lr, clip_norm=args.clip_norm)
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=args.lr_decay)
    sampler = DistributedSampler(crops, num_replicas=dist.world, rank=dist.rank, seed=args.seed, drop_last=True)
    loader = DataLoader(crops, batch_size=args.batch_size // dist.world, sampler=sampler, collate_fn=collate_sequences)
    n_batches = min(len(loader), args.max_train_batches or len(loader))
    test = eval_batches(test_songs, args.eval_batch_size)
    valid = eval_batches(valid_songs, args.eval_batch_size) if valid_songs else []
    run = Run(model, guide, net, optimizer, scheduler, crops, sampler, loader, n_batches, test_songs, test, out_dir,
              valid, folder=open_run_folder(args, dist, out_dir))  # fmt: skip
    try:
        if args.resume:
            resume(run, args, dist)
    except BaseException:
        if run.folder is not None:
            run.folder.close()
        raise
    log.info(
        "%s on %s with %s inference: %d train songs (%d batches/epoch), %d test songs, %d parameters, %d process(es)",
        args.model, args.dataset, args.inference, len(train_songs), n_batches, len(test_songs),
        sum(p.numel() for p in net.parameters()), dist.world,
    )  # fmt: skip
    return run


def resume(run: Run, args: argparse.Namespace, dist: Dist) -> None:
    """Restore the state of ``<out-dir>/checkpoint.pt`` and drop the result rows written after it."""
    state = load_checkpoint(run.out_dir / CHECKPOINT, args)
    run.net.load_state_dict(state["net"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    run.start_epoch, run.wall = state["epoch"], state["wall_time"]
    run.best_valid, run.best_epoch = state.get("best_valid", math.inf), state.get("best_epoch", 0)
    set_rng_state(state["rng"])
    if dist.main:
        trim_results(run.out_dir / RESULTS, run.start_epoch)
    log.info("resumed from %s after epoch %d", run.out_dir / CHECKPOINT, run.start_epoch)


def train_epoch(
    run: Run, ddp: nn.Module, args: argparse.Namespace, dist: Dist, deadline: float
) -> Tuple[float, float, bool]:
    """One epoch of gradient steps on ``(1/B) Σ_n F_n``; returns the summed loss, the real steps seen (over all
    ranks) and whether the time budget ran out."""
    loss_sum = step_sum = 0.0
    out_of_time = False
    batches = tqdm(run.loader, desc="batches", total=run.n_batches, leave=False, disable=not dist.main or None)
    for b, (xs, mask) in enumerate(batches):
        if b >= run.n_batches:
            break
        loss = ddp(xs, mask)
        (loss / xs.size(0)).backward()
        run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)
        loss_sum, step_sum = loss_sum + loss.item(), step_sum + mask.sum().item()
        batches.set_postfix(loss_per_step=f"{loss.item() / max(mask.sum().item(), 1):.3f}")
        run.batches_run += 1
        if args.simulate_kill_after is not None and run.batches_run >= args.simulate_kill_after:
            raise SimulatedKill(f"simulated kill after {run.batches_run} training batches")
        if dist.any(time.monotonic() > deadline):
            out_of_time = True
            break
    batches.close()
    loss_sum, step_sum = dist.sum(loss_sum, step_sum)
    return loss_sum, step_sum, out_of_time


def _train(args: argparse.Namespace, dist: Dist) -> dict:
    if args.batch_size % dist.world:
        raise SystemExit(f"--batch-size {args.batch_size} must be divisible by the number of processes {dist.world}")
    log.setLevel(logging.INFO if dist.main else logging.WARNING)  # one rank reports
    if args.threads:
        torch.set_num_threads(args.threads)
    run = setup(args, dist)
    with run.folder or nullcontext():  # the lock is held until the run ends, however it ends
        row = train_loop(run, args, dist)
    if dist.main and row:
        print(f"results in {run.out_dir}: test free energy {row['test_free_energy_per_step']:.4f} nats/step "
              f"(epoch {row['epoch']})", flush=True)  # fmt: skip
    return row


def train_loop(run: Run, args: argparse.Namespace, dist: Dist) -> dict:
    """The epochs from the checkpoint's (or the first) to ``--epochs``; returns the last evaluation's row."""
    ddp = nn.parallel.DistributedDataParallel(run.net) if dist.world > 1 else run.net
    deadline = time.monotonic() + 60 * args.max_minutes if args.max_minutes else math.inf
    row: dict = {}
    epochs = tqdm(range(run.start_epoch, args.epochs), desc="epochs", initial=run.start_epoch, total=args.epochs,
                  disable=not dist.main or None)  # fmt: skip
    for epoch in epochs:
        run.crops.epoch = epoch
        run.sampler.set_epoch(epoch)
        run.net.objective.kl_weight = beta = kl_weight(epoch, args.kl_anneal_epochs)
        lr = run.optimizer.param_groups[0]["lr"]
        epoch_start = time.monotonic()
        loss_sum, step_sum, out_of_time = train_epoch(run, ddp, args, dist, deadline)
        run.scheduler.step()
        run.wall += time.monotonic() - epoch_start
        done, train_loss = epoch + 1, loss_sum / max(step_sum, 1)
        log.info("epoch %d: train loss %.4f nats/step (β %.3f, lr %.3g)", done, train_loss, beta, lr)
        last = done == args.epochs or out_of_time
        if args.valid_every and (done % args.valid_every == 0 or last):
            validate(run, dist, args.seed, done)
        if done % args.eval_every == 0 or last:
            result = test_selected(run, dist, args.seed) if args.valid_every and last else (
                evaluate(run.model, run.guide, run.test, dist, args.seed))  # fmt: skip
            row = {
                "model": args.model, "dataset": args.dataset, "inference": args.inference,
                "iterations": args.iterations if args.inference != "baseline" else 0, "epoch": done,
                "wall_time_s": run.wall, "train_loss_per_step": train_loss,
                "test_free_energy_per_step": result["free_energy_per_step"], "test_steps": result["steps"],
                "kl_weight": beta, "lr": lr, "processes": dist.world,
            }  # fmt: skip
            if args.valid_every:
                row.update(valid_free_energy_per_step=run.best_valid, tested_epoch=result.get("epoch", done))
            log.info("epoch %d: test free energy %.4f nats/step over %d steps", done, row["test_free_energy_per_step"],
                     row["test_steps"])  # fmt: skip
            if dist.main:
                results = append_result(run.out_dir / RESULTS, row)
                if not args.no_plots:
                    make_plots(run.out_dir, results, run.model, run.guide, run.test_songs, args.seed)
        if dist.main:
            save_checkpoint(
                run.out_dir / CHECKPOINT, version=CHECKPOINT_VERSION, epoch=done, wall_time=run.wall,
                config=structure(args), net=run.net.state_dict(), optimizer=run.optimizer.state_dict(),
                scheduler=run.scheduler.state_dict(), rng=rng_state(), best_valid=run.best_valid,
                best_epoch=run.best_epoch,
            )  # fmt: skip
        if out_of_time:
            log.info("stopping: the --max-minutes budget of %s minutes is spent", args.max_minutes)
            break
    epochs.close()
    if run.start_epoch >= args.epochs:
        log.info("nothing to do: the checkpoint has %d epochs and --epochs is %d", run.start_epoch, args.epochs)
    return row


def main(argv: Optional[Sequence[str]] = None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    return train(args)


if __name__ == "__main__":
    main()
