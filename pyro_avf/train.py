"""Train and evaluate a sequence model on music, speech, video or simulated data from the command line.

Example::

    python -m pyro_avf.train --model srnn --dataset jsb_chorales --inference avf --iterations 5
    torchrun --nproc_per_node 2 -m pyro_avf.train --model dmm --inference baseline   # data-parallel
    python -m pyro_avf.train --model vrnn --dataset timit --data-dir ~/data/timit --inference avf
    python -m pyro_avf.train --model svg --dataset moving_mnist --frame-size 32 --sequence-length 10
    python -m pyro_avf.train --model 1-af --dataset kth --data-dir ~/data/kth --inference baseline
    python -m pyro_avf.train --model lgssm --dataset simulated --inference em

The command parses its options, loads the data set, builds the model and hands them to
:func:`pyro_avf.training.fit`, which does the training, evaluation, checkpoints and figures.

Models and data sets (:mod:`pyro_avf.experiments`, which builds and loads them):

- ``srnn``, ``vrnn``, ``dmm`` on music (``jsb_chorales``, ``piano_midi``, ``muse_data``, ``nottingham``: 88
  Bernoulli keys) and speech (``timit``: 200-sample frames, Gaussian output, from the user's copy in
  ``--data-dir``);
- ``svg``, ``slvm``, ``slvm-1af`` (the SLVM with a 1-AF likelihood), ``1-af`` and ``2-af`` (autoregressive
  flows, no latent variables: ``--inference baseline`` only, the exact log-likelihood) on video
  (``moving_mnist``, generated from the MNIST digits; ``kth`` and ``bair`` from the user's copies), frames of
  ``--frame-size`` pixels in clips of ``--sequence-length`` frames, dequantized 8-bit values;
- ``lgssm`` on ``simulated`` sequences of a seeded random LG-SSM.

A model on a data set it does not fit, and ``--inference baseline`` for a model without a filter of its own
(``slvm``, ``slvm-1af``, ``lgssm``), are refused with a message saying what to use.

Training (AVF paper, App. B.2): random crops of ``--crop-length`` steps, batches of ``--batch-size`` (the global
batch, split over the ranks), gradients clipped element-wise (``pyro.optim.ClippedAdam``), learning rate
:math:`\\eta_e = \\eta \\cdot 0.999^{e}` in epoch e (``pyro.optim.ExponentialLR``), KL weight
:math:`\\beta_e = \\min(1, ((e + 1) / E_{KL})^p)` (``--kl-anneal-power`` p). The objective of a batch of B
crops is the free energy per crop,
:math:`\\frac1B \\sum_n \\mathcal{F}_n`.

Inference (``--inference``, :mod:`pyro_avf.trainer`):

- ``avf``: :class:`~pyro_avf.IterativeGuide` with a learned update and :class:`~pyro_avf.AmortizedFilteringELBO`;
- ``em``: the same guide with per-step Adam (non-amortized variational filtering EM);
- ``baseline``: the model's own filtering guide with ``TraceMeanField_ELBO`` (the analytic KL given the sampled
  past, the estimator AVF's objective uses); β multiplies the log densities of every latent site in model and
  guide (``poutine.scale`` on latent sites only), giving :math:`-\\log p(x|z) + \\beta D_{KL}(q \\| p)`;
- ``autonormal``: refused with an explanation (see :func:`check_args`).

Evaluation: whole test songs (utterances, clips, sequences); the number reported is the test free energy
per step (nats),
:math:`\\sum_{n,t} m_{n,t} \\mathcal{F}_{n,t} / \\sum m`. Every model is filtered one step at a time
(:func:`pyro_avf.online.streamed_free_energy`: AVF and EM through :class:`~pyro_avf.online.OnlineFilter`,
SRNN's own filter step by step too), so memory stays flat in the song's length; the own filters of VRNN
and DMM, SVG's and the flows' are scored with :func:`pyro_avf.evaluation.filtering_free_energy`. Video runs
also report the test free energy per sequence and in nats per dimension of the 8-bit data
(``test_free_energy_per_sequence``, ``test_nats_per_dim``), the LG-SSM the exact negative log-likelihood per
step of the test data under the learned and the true model (``test_kalman_nll_per_step``,
``true_kalman_nll_per_step``; Kalman filter).

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
The folder receives ``config.json``, ``checkpoint.pt`` (after every epoch: parameters, optimizer and scheduler
state, epoch, RNG states, all plain tensors and containers for ``torch.load(weights_only=True)``),
``results.csv`` (one row per epoch: model, dataset, inference, iterations, epoch, ``wall_time_s`` (cumulative
training time, evaluation excluded), ``train_loss_per_step`` (the β-weighted loss of the epoch over its real
steps), ``kl_weight``, ``lr``, ``processes``; every ``--eval-every`` epochs and at the end
``test_free_energy_per_step``, ``test_steps`` and ``tested_epoch``; with ``--valid-every``, on the epochs it
validates, ``valid_free_energy_per_step`` (the best validation score so far), ``epoch_valid_free_energy_per_step``
(that epoch's) and ``best_epoch``) and PNG plots (:func:`pyro_avf.plots.plot_run`). Early stopping
(``--valid-every E``): every E epochs the validation songs are scored and the best parameters so far are saved
to ``best.pt``; the final test evaluation uses those parameters (JSB Chorales overfits within an hour at
``--lr 1e-3``). ``--max-minutes`` ends the epoch under way when the budget of this invocation is spent, then
evaluates and saves as after any epoch. ``--resume`` continues from the checkpoint; an interrupted epoch is
redone from its start with the same data and random numbers.

Under ``torchrun`` (``WORLD_SIZE`` > 1) the ranks join a gloo process group, each trains on its shard of every
global batch (``DistributedSampler``), and :class:`torch.nn.parallel.DistributedDataParallel` averages the
gradients; rank 0 writes the outputs.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import pyro
import pyro.optim
import torch
from pyro.infer import TraceMeanField_ELBO
from pyro.optim.clipped_adam import ClippedAdam
from torch import nn

from data_loaders.polyphonic import load_polyphonic  # noqa: F401  (train.load_polyphonic, used by the tests)
from pyro_avf import experiments
from pyro_avf.checkpoints import CheckpointError
from pyro_avf.run_folder import RunFolderError, config_digest
from pyro_avf.trainer import Trainable, Trainer
from pyro_avf.training import BEST, CHECKPOINT, RESULTS, fit

__all__ = ["BEST", "CHECKPOINT", "RESULTS", "build_inference", "build_model", "build_parser", "main", "train"]

log = logging.getLogger("pyro_avf.train")

MODELS = tuple(experiments.MODELS)
DATASETS = tuple(experiments.DATASETS)
INFERENCES = ("avf", "baseline", "em", "autonormal")
# options that do not change what a run computes: where it reads and writes, how fast, and where this invocation
# stops (a run is resumed with a larger --epochs or another --max-minutes); every other option is in run_config
NOT_CONFIG = ("data_dir", "download", "out_dir", "resume", "overwrite", "threads", "max_minutes", "epochs",
              "no_plots", "simulate_kill_after", "preset")  # fmt: skip
#: Options added after runs were made, left out of :func:`run_config` at their default so those runs keep their
#: folder and can resume.
ADDED_LATER = {"min_lr": 0.0, "dropout": 0.0}


class SimulatedKill(SystemExit):
    """Raised by ``--simulate-kill-after``: the run stops at once, as if killed, without saving anything."""


# ---------------------------------------------------------------------------------------------------------
# Command line


PRESETS: Dict[str, Dict[str, Any]] = {
    "paper": {},  # the defaults of build_parser: the AVF paper's music settings
    "cpu": {  # a 10-minute run on 2 CPU cores (README's main job), measured in benchmarks/RESULTS.md
        "model_size": 128, "z_dim": 32, "iterations": 2, "update": "learned_sgd", "encode_observation": True,
        "hidden_size": 256, "lr": 3e-3, "lr_decay": 0.99, "kl_anneal_epochs": 3, "eval_every": 1000,
        "max_minutes": 10.0,
    },  # fmt: skip
    # the AVF paper's code: an "epoch" of 10 batches, β = (e/50)², 2x1,024 learned-SGD update networks
    "avf_code": {"max_train_batches": 10, "kl_anneal_epochs": 50, "kl_anneal_power": 2.0, "update": "learned_sgd",
                 "hidden_size": 1024, "iterations": 5, "epochs": 800},  # fmt: skip
}


def preset_flags(name: str) -> str:
    """The options that preset ``name`` sets, as command-line flags."""
    flags = [f"--{k.replace('_', '-')}" + ("" if v is True else f" {v:g}" if isinstance(v, float) else f" {v}")
             for k, v in PRESETS[name].items()]  # fmt: skip
    return " ".join(flags)


def build_parser() -> argparse.ArgumentParser:
    """The command line; ``--help`` shows every option's default."""
    p = argparse.ArgumentParser(prog="python -m pyro_avf.train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # fmt: skip
    p.add_argument("--model", choices=MODELS, default="srnn", help="sequence model (pyro_avf.experiments: the data "
                   "sets each one fits)")  # fmt: skip
    p.add_argument("--dataset", choices=DATASETS, default="jsb_chorales", help="data set: music, timit (speech), "
                   "moving_mnist, kth, bair (video) or simulated (LG-SSM); the defaults shown are the AVF paper's "
                   "music settings, video and simulated data have training defaults of their own where an option "
                   "is not given (pyro_avf.experiments.TRAINING_DEFAULTS: lr, KL annealing, K, update width, "
                   "epochs)")  # fmt: skip
    p.add_argument("--frame-size", type=int, default=None, help="video: side of the square frames, a power of two "
                   "(None: 32 for moving_mnist, 64 for kth and bair)")  # fmt: skip
    p.add_argument("--sequence-length", type=int, default=None, help="video: frames per clip (None: 10 moving_mnist, "
                   "20 kth, 30 bair); simulated: steps per sequence (None: 20)")  # fmt: skip
    p.add_argument("--train-sequences", type=int, default=None, help="moving_mnist, simulated: training sequences "
                   "to generate (None: 2000, 3200); timit, kth, bair: use the first N (None: all)")  # fmt: skip
    p.add_argument("--test-sequences", type=int, default=None, help="moving_mnist, simulated: test (and validation) "
                   "sequences to generate (None: 200, 256)")  # fmt: skip
    p.add_argument("--data-seed", type=int, default=0, help="video and simulated: seed of the generated sequences "
                   "and of the dequantization noise")  # fmt: skip
    p.add_argument(
        "--preset", choices=sorted(PRESETS), default="paper",
        help="paper: the AVF paper's settings (the defaults shown here); cpu: a short run on a laptop CPU that "
        f"learns in minutes ({preset_flags('cpu')}); avf_code: the schedule of the AVF paper's code "
        f"({preset_flags('avf_code')}); options given explicitly win over the preset",
    )  # fmt: skip
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
    p.add_argument("--num-samples", type=int, default=1, help="avf, em: Monte-Carlo samples per inference "
                   "gradient (1: the AVF paper's; the library's IterativeGuide defaults to an antithetic pair)")
    p.add_argument("--antithetic", action="store_true", help="avf, em: draw the samples in antithetic pairs "
                   "(with --num-samples 2: the library's default)")  # fmt: skip
    p.add_argument("--z-dim", type=int, default=None, help="latent size (None: the model's size for the data set)")
    p.add_argument("--model-size", type=int, default=None, help="width of every other model layer, the flows' conv "
                   "channels (None: the model's sizes for the data set; small values for tiny runs)")  # fmt: skip
    p.add_argument("--epochs", type=int, default=800, help="train until this many epochs are done")
    p.add_argument("--batch-size", type=int, default=16, help="global batch, split over the ranks")
    p.add_argument("--crop-length", type=int, default=25, help="steps per random training crop")
    p.add_argument("--lr", type=float, default=1e-4, help="learning rate of the first epoch")
    p.add_argument("--lr-decay", type=float, default=0.999, help="learning-rate factor per epoch")
    p.add_argument("--clip-norm", type=float, default=10.0, help="element-wise gradient clipping (ClippedAdam)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="L2 penalty on every trained parameter "
                   "(ClippedAdam's weight_decay), against over-fitting")  # fmt: skip
    p.add_argument("--dropout", type=float, default=0.0, help="SRNN: dropout rate on d_t where the prior and the "
                   "emitter read it, in training only (one mask per pass), against over-fitting")  # fmt: skip
    p.add_argument("--kl-anneal-epochs", type=int, default=50, help="β rises to 1 over these epochs")
    p.add_argument("--kl-anneal-power", type=float, default=1.0, help="β in epoch e is min(1, ((e+1)/E)^p): 1 "
                   "linear, 2 the AVF code's quadratic schedule")  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="random seed of the parameters, crops and noise")
    p.add_argument("--device", choices=("cpu", "cuda", "auto"), default="cpu",
                   help="where the model, the guide and the batches live (auto: cuda when a GPU is available)")
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
    p.add_argument("--patience", type=int, default=None, help="with --valid-every: stop after this many "
                   "validations without improvement (None: never)")  # fmt: skip
    p.add_argument("--lr-drop-patience", type=int, default=None, help="with --valid-every: multiply the learning "
                   "rate by the drop factor each time this many validations in a row do not improve (None: never)")
    p.add_argument("--lr-drop-factor", type=float, default=0.1, help="the factor of each learning-rate drop")
    p.add_argument("--min-lr", type=float, default=0.0,
                   help="the floor of the learning rate, under both the decay and the drops (0: none)")
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
    optional_positive = ["z_dim", "model_size", "threads", "max_train_batches", "max_eval_songs", "max_valid_songs",
                         "patience", "lr_drop_patience"]  # fmt: skip
    optional_positive.append("simulate_kill_after")
    for name in positive + [n for n in optional_positive if getattr(args, n) is not None]:
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available here (torch.cuda.is_available() is False); use "
                     "--device cpu or --device auto")  # fmt: skip
    if args.iterations < 0:
        parser.error(f"--iterations must be >= 0, got {args.iterations}")
    if args.inference == "em" and args.iterations < 1:
        parser.error("--inference em needs --iterations >= 1 (K = 0 leaves the posterior at the prior)")
    if not (math.isfinite(args.kl_anneal_power) and args.kl_anneal_power > 0):
        parser.error(f"--kl-anneal-power must be a positive number, got {args.kl_anneal_power}")
    if args.kl_anneal_epochs < 0:
        parser.error(f"--kl-anneal-epochs must be >= 0, got {args.kl_anneal_epochs}")
    for name in ("lr", "inference_lr", "clip_norm"):
        value = getattr(args, name)
        if not (math.isfinite(value) and value > 0):
            parser.error(f"--{name.replace('_', '-')} must be a positive number, got {value}")
    if not (math.isfinite(args.weight_decay) and args.weight_decay >= 0):
        parser.error(f"--weight-decay must be a non-negative number, got {args.weight_decay}")
    if not 0.0 <= args.dropout < 1.0:
        parser.error(f"--dropout must be in [0, 1), got {args.dropout}")
    if args.dropout and args.model != "srnn":
        parser.error(f"--dropout is implemented for --model srnn only, not {args.model}")
    if not 0 < args.lr_drop_factor < 1:
        parser.error(f"--lr-drop-factor must be in (0, 1), got {args.lr_drop_factor}")
    if not (math.isfinite(args.min_lr) and 0 <= args.min_lr <= args.lr):
        parser.error(f"--min-lr must be a number in [0, --lr={args.lr}], got {args.min_lr}")
    if (args.patience or args.lr_drop_patience) and not args.valid_every:
        parser.error("--patience and --lr-drop-patience count validations: pass --valid-every too")
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
    experiments.check(parser, args)


# ---------------------------------------------------------------------------------------------------------
# Model, inference and data


def build_model(args: argparse.Namespace) -> nn.Module:
    """``--model`` for ``--dataset`` (:func:`pyro_avf.experiments.build_model`) with optional ``--z-dim`` /
    ``--model-size`` overrides."""
    return experiments.build_model(args)


def inference_options(args: argparse.Namespace) -> Dict[str, Any]:
    """The :class:`~pyro_avf.trainer.Trainer` settings of ``--inference`` (``TraceMeanField_ELBO`` with one
    plate for the baseline: the analytic KL, the same estimator as AVF's; the ``IterativeGuide`` options for avf
    and em)."""
    if args.inference == "baseline":
        return {"inference": "baseline", "elbo": TraceMeanField_ELBO(max_plate_nesting=1)}
    guide_kwargs = dict(num_iterations=args.iterations, update=args.update if args.inference == "avf" else "adam",
                        hidden_size=args.hidden_size, lr=args.inference_lr, encode_observation=args.encode_observation,
                        num_samples=args.num_samples, antithetic=args.antithetic)  # fmt: skip
    return {"inference": args.inference, "guide_kwargs": guide_kwargs}


def build_inference(args: argparse.Namespace, model: nn.Module) -> Tuple[Callable, Trainable]:
    """The guide and the container of trained modules (whose ``forward`` is the loss) for ``--inference``."""
    trainer = Trainer(model, **inference_options(args))
    return trainer.guide, trainer.net


def optimizer(args: argparse.Namespace) -> pyro.optim.PyroLRScheduler:
    """``ClippedAdam(--lr, --clip-norm, --weight-decay)`` with the learning rate multiplied by ``--lr-decay``
    after every epoch."""
    adam = {"lr": args.lr, "clip_norm": args.clip_norm, "weight_decay": args.weight_decay}
    return pyro.optim.ExponentialLR({"optimizer": ClippedAdam, "optim_args": adam, "gamma": args.lr_decay})


def run_config(args: argparse.Namespace) -> Dict[str, Any]:
    """The settings that change a run's results (every option but :data:`NOT_CONFIG`; a preset counts by the
    values it sets): the run's identity, stored in ``config.json`` and hashed into the default folder name."""
    unused = set(NOT_CONFIG) | set(experiments.unused_options(args))  # other data sets' options
    unused |= {k for k, default in ADDED_LATER.items() if getattr(args, k) == default}
    return {k: v for k, v in sorted(vars(args).items()) if k not in unused}


def default_out_dir(args: argparse.Namespace) -> Path:
    """``runs/<model>-<dataset>-<inference>-k<K>-seed<seed>-<hash8>``: a readable name and the hash of
    :func:`run_config`, so runs with other settings never share a folder."""
    k = f"-k{args.iterations}" if args.inference != "baseline" else ""
    name = f"{args.model}-{args.dataset}-{args.inference}{k}-seed{args.seed}-{config_digest(run_config(args))}"
    return Path("runs") / name


# ---------------------------------------------------------------------------------------------------------
# Training


def results_row(args: argparse.Namespace, processes: int, row: Dict[str, Any]) -> Dict[str, Any]:
    """A row of ``results.csv``: the run's names, the epoch's numbers, and (``--valid-every``) the best
    validation score so far as ``valid_free_energy_per_step``."""
    names = {"model": args.model, "dataset": args.dataset, "inference": args.inference,
             "iterations": args.iterations if args.inference != "baseline" else 0}  # fmt: skip
    row = {**names, **row, "processes": processes}
    if "valid_free_energy_per_step" in row:
        row["epoch_valid_free_energy_per_step"] = row["valid_free_energy_per_step"]
        row["valid_free_energy_per_step"] = row.pop("best_valid_free_energy_per_step")
    return row


def kill_after(batches: Optional[int]) -> Optional[Callable[[int, float], None]]:
    """``--simulate-kill-after``: raise :class:`SimulatedKill` after this many training batches."""
    if batches is None:
        return None

    def on_batch(done: int, loss: float) -> None:
        if done >= batches:
            raise SimulatedKill(f"simulated kill after {done} training batches")

    return on_batch


def train(args: argparse.Namespace) -> Dict[str, Any]:
    """Load the data, build the model and run :func:`pyro_avf.training.fit`; return the last results row."""
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    if args.batch_size % world:
        raise SystemExit(f"--batch-size {args.batch_size} must be divisible by the number of processes {world}")
    log.setLevel(logging.INFO if rank == 0 else logging.WARNING)  # one rank reports
    if args.threads:
        torch.set_num_threads(args.threads)
    out_dir = Path(args.out_dir) if args.out_dir else default_out_dir(args)
    if args.resume and not (out_dir / CHECKPOINT).is_file():
        raise SystemExit(f"--resume: no checkpoint at {out_dir / CHECKPOINT}; run without --resume to start training")
    data = experiments.load_data(args)

    pyro.clear_param_store()
    pyro.set_rng_seed(args.seed)
    model = build_model(args)
    report = experiments.Report(args, data, model)
    log.info("%s on %s with %s inference: %d train sequences, %d test sequences, %d process(es)", args.model,
             args.dataset, args.inference, len(data.train), len(data.test), world)  # fmt: skip

    def columns(row: Dict[str, Any]) -> Dict[str, Any]:
        return report(results_row(args, world, row))

    try:
        result = fit(
            model, data.train, **inference_options(args), optimizer=optimizer(args), valid_data=data.valid,
            test_data=data.test, epochs=args.epochs, batch_size=args.batch_size, crop_length=args.crop_length,
            batches_per_epoch=args.max_train_batches, kl_anneal_epochs=args.kl_anneal_epochs,
            kl_anneal_power=args.kl_anneal_power,
            valid_every=args.valid_every or 1, patience=args.patience, lr_drop_patience=args.lr_drop_patience,
            lr_drop_factor=args.lr_drop_factor, min_lr=args.min_lr, eval_every=args.eval_every,
            eval_batch_size=args.eval_batch_size,
            stream=experiments.stream_for(model), max_minutes=args.max_minutes, out_dir=out_dir,
            resume=args.resume, overwrite=args.overwrite, config=run_config(args), plots=not args.no_plots,
            columns=columns, seed=args.seed, device=resolve_device(args.device),
            on_batch=kill_after(args.simulate_kill_after),
        )  # fmt: skip
    except (RunFolderError, CheckpointError) as err:
        raise SystemExit(" ".join(str(err).split())) from None
    row = result.history.iloc[-1].to_dict() if len(result.history) else {}
    if rank == 0 and row:
        print(f"results in {out_dir}: test free energy {row['test_free_energy_per_step']:.4f} nats/step "
              f"(epoch {row['epoch']}){report.summary(row)}", flush=True)  # fmt: skip
    return row


def resolve_device(name: str) -> torch.device:
    """``--device``: ``auto`` is CUDA when a GPU is available, else the CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def parse_args(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse ``argv``: the data set's training defaults (:data:`pyro_avf.experiments.TRAINING_DEFAULTS`, for
    video and simulated data) and then the settings of ``--preset`` replace the defaults, and options given
    explicitly win."""
    known = parser.parse_known_args(argv)[0]
    parser.set_defaults(**experiments.TRAINING_DEFAULTS.get(known.dataset, {}))
    parser.set_defaults(**PRESETS[known.preset])
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    parser = build_parser()
    args = parse_args(parser, argv)
    check_args(parser, args)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    return train(args)


if __name__ == "__main__":
    main()
