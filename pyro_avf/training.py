r"""Training from Python: :func:`fit` trains a sequence model with amortized variational filtering, filtering EM
or its own filter, and :func:`~pyro_avf.evaluation.evaluate` scores it on whole sequences.

A model needs only a method ``model(xs, mask)``, its Pyro program over a batch, with the time step marked by
:func:`~pyro_avf.filtering_step` (:class:`~pyro_avf.trainer.SequenceModel`); data are a list of
variable-length tensors, a padded ``(xs, mask)`` pair or one tensor of equal-length sequences
(:mod:`pyro_avf.sequences`).

Every epoch :math:`e = 0, 1, \dots` draws one random crop of ``crop_length`` steps from every training
sequence and takes one optimiser step per batch of ``batch_size`` crops on the free energy per sequence
:math:`\frac1B \sum_n \mathcal{F}_n` (:class:`~pyro_avf.trainer.Trainer`), with the KL weight
:math:`\beta_e = \min(1, (e + 1)/E_{KL})` (``kl_anneal_epochs`` :math:`E_{KL}`; 0: :math:`\beta = 1`) and the
learning rate of ``lr_schedule`` or of a ``pyro.optim`` scheduler. After each epoch:

- with ``valid_data``, every ``valid_every`` epochs, the validation free energy per step
  :math:`\bar{\mathcal{F}} = \sum_{n,t} m_{n,t}\mathcal{F}_{n,t} / \sum m` on whole sequences; the
  parameters with the lowest are kept (:attr:`TrainingResult.best_state`, and in the model at the end), and
  training stops once ``patience`` validations in a row have not improved on it (early stopping);
- with ``test_data``, every ``eval_every`` epochs and after the last one, the test free energy per step (after
  the last epoch, of the best parameters when there are validation data);
- one row of :attr:`TrainingResult.history` (a pandas DataFrame: ``epoch``, ``wall_time_s`` and ``cpu_time_s``
  (training wall-clock and CPU time, evaluations excluded), ``updates`` (optimiser steps),
  ``train_loss_per_step`` (the β-weighted loss over the epoch's real steps),
  ``kl_weight``, ``lr``, and ``valid_free_energy_per_step``, ``valid_free_energy_paper``,
  ``best_valid_free_energy_per_step``, ``best_epoch``, ``test_free_energy_per_step``, ``test_free_energy_paper``,
  ``test_steps``, ``test_sequences``, ``tested_epoch`` where they apply: ``*_per_step`` in our normalisation,
  ``*_paper`` in the AVF paper's, see :class:`~pyro_avf.evaluation.FreeEnergy`; the best parameters are chosen
  on ``valid_free_energy_per_step``);
- a progress bar (tqdm) on a terminal, else one line per epoch on standard error.

``max_minutes`` ends the epoch under way once the wall-clock budget of the call is spent, and then finishes
as after any epoch. With ``out_dir`` the run lives in a run folder (:class:`~pyro_avf.run_folder.RunFolder`:
its settings in ``config.json``, locked while training), and every file goes through
:func:`~pyro_avf.run_folder.atomic_write`: ``checkpoint.pt`` after every epoch (parameters, optimiser and
scheduler states, RNG states; plain tensors for ``torch.load(weights_only=True)``), ``best.pt`` (the
parameters of the best validation score), ``results.csv`` (the history) and the figures of
:func:`pyro_avf.plots.plot_run`. ``resume=True`` continues from the checkpoint exactly as if the run had not
stopped (an interrupted epoch is redone from its start with the same crops and random numbers).

Under ``torchrun`` (``WORLD_SIZE`` > 1) every process trains on its share of each global batch and the
gradients are averaged (:mod:`pyro_avf.distributed`); process 0 writes the files.

Example, a random walk observed in noise, on variable-length sequences::

    >>> import pyro, pyro.distributions as dist, torch, pyro_avf
    >>> class RandomWalk(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.log_noise = torch.nn.Parameter(torch.zeros(()))
    ...     @pyro_avf.filtering_step
    ...     def step(self, t, z_prev, x_t, mask_t):
    ...         z = pyro.sample(f"z_{t}", dist.Normal(0.9 * z_prev, 1.0).to_event(1))
    ...         with pyro.poutine.mask(mask=mask_t):
    ...             pyro.sample(f"x_{t}", dist.Normal(z, self.log_noise.exp()).to_event(1), obs=x_t)
    ...         return z
    ...     def model(self, xs, mask):
    ...         pyro.module("walk", self)
    ...         z = xs.new_zeros(xs.size(0), 2)
    ...         with pyro.plate("sequences", xs.size(0)):
    ...             for t in pyro.markov(range(xs.size(1))):
    ...                 z = self.step(t, z, xs[:, t], mask[:, t])
    >>> songs = [torch.randn(n, 2) for n in (12, 9, 15, 7)]
    >>> result = fit(RandomWalk(), songs, valid_data=songs[:2], epochs=2, batch_size=2, lr=1e-2,
    ...              guide_kwargs={"num_iterations": 2, "hidden_size": 8}, progress=False)
    >>> result.history[["epoch", "kl_weight", "best_epoch"]].shape
    (2, 3)
    >>> result.evaluate(songs).steps    # whole sequences: 12 + 9 + 15 + 7 steps
    43
"""

from __future__ import annotations

import functools
import math
import time
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import pandas as pd
import pyro
import torch
from pyro.infer.elbo import ELBO
from pyro.optim.optim import PyroOptim
from torch.utils.data import DataLoader, DistributedSampler

from pyro_avf.checkpoints import (
    CHECKPOINT_VERSION,
    CheckpointError,
    read_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from pyro_avf.distributed import Dist
from pyro_avf.evaluation import FreeEnergy, evaluate, score_batches
from pyro_avf.plots import CURVES_PNG, PER_ITERATION_PNG, PIANO_ROLL_PNG, plot_run
from pyro_avf.progress import Progress
from pyro_avf.run_folder import RunFolder, RunFolderError, atomic_write
from pyro_avf.sequences import Batch, EpochCrops, Sequences, as_sequences, collate
from pyro_avf.trainer import Trainer

__all__ = ["BEST", "CHECKPOINT", "OUTPUTS", "RESULTS", "TrainingResult", "evaluate", "fit", "kl_weight"]

CHECKPOINT = "checkpoint.pt"
BEST = "best.pt"  # the parameters with the lowest validation free energy
RESULTS = "results.csv"
OUTPUTS = (CHECKPOINT, BEST, RESULTS, CURVES_PNG, PER_ITERATION_PNG, PIANO_ROLL_PNG)  # any of them: a run is there
Stream = Optional[Callable[[Any], Any]]


def kl_weight(epoch: int, anneal_epochs: int, power: float = 1.0) -> float:
    """β in (0-based) epoch ``epoch``: :math:`\\min(1, ((e + 1)/E)^p)`, rising from :math:`(1/E)^p` to 1 over
    the first E epochs (E = 0: always 1); p = 1 is linear, p = 2 the AVF paper code's :math:`(e/50)^2` (one
    epoch earlier)."""
    return 1.0 if anneal_epochs == 0 else min(1.0, ((epoch + 1) / anneal_epochs) ** power)


@dataclass
class TrainingResult:
    """What :func:`fit` returns. The model and guide hold the best parameters when there were validation
    data (``best_state``, of epoch ``best_epoch``), else the last ones. ``stop_reason``: ``"epochs"``,
    ``"max_minutes"`` or ``"patience"``."""

    model: Any
    guide: Callable
    trainer: Trainer
    history: pd.DataFrame
    best_state: Optional[Dict[str, Any]] = None
    best_epoch: Optional[int] = None
    stop_reason: str = "epochs"
    out_dir: Optional[Path] = None
    stream: Stream = None
    eval_batch_size: int = 16
    seed: int = 0

    def evaluate(self, data: Any, *, batch_size: Optional[int] = None, seed: Optional[int] = None) -> FreeEnergy:
        """:func:`~pyro_avf.evaluation.evaluate` of the trained model and guide on whole sequences."""
        return evaluate(self.model, self.guide, data, batch_size=batch_size or self.eval_batch_size,
                        stream=self.stream, seed=self.seed if seed is None else seed)  # fmt: skip


def fit(
    model: Any,
    train_data: Any,
    *,
    inference: str = "avf",
    guide: Optional[Callable] = None,
    elbo: Optional[ELBO] = None,
    guide_kwargs: Optional[Dict[str, Any]] = None,
    valid_data: Any = None,
    test_data: Any = None,
    epochs: int = 10,
    batch_size: int = 16,
    crop_length: Optional[int] = None,
    batches_per_epoch: Optional[int] = None,
    lr: float = 1e-3,
    clip_norm: Optional[float] = 10.0,
    optimizer: Optional[PyroOptim] = None,
    lr_schedule: Optional[Callable[[int], float]] = None,
    kl_anneal_epochs: int = 0,
    kl_anneal_power: float = 1.0,
    valid_every: int = 1,
    patience: Optional[int] = None,
    lr_drop_patience: Optional[int] = None,
    lr_drop_factor: float = 0.1,
    min_lr: float = 0.0,
    eval_every: int = 1,
    eval_batch_size: int = 16,
    stream: Stream = None,
    max_minutes: Optional[float] = None,
    out_dir: Union[str, Path, None] = None,
    resume: bool = False,
    overwrite: bool = False,
    config: Optional[Dict[str, Any]] = None,
    plots: bool = True,
    columns: Optional[Callable[[Dict[str, Any]], Dict[str, Any]]] = None,
    seed: int = 0,
    device: Union[str, torch.device, None] = None,
    progress: bool = True,
    on_batch: Optional[Callable[[int, float], None]] = None,
) -> TrainingResult:
    """Train ``model`` on ``train_data`` (see the module docstring); returns a :class:`TrainingResult`.

    :param model: a :class:`~pyro_avf.trainer.SequenceModel` (``model(xs, mask)``, optionally ``guide``), or a
        Pyro function ``model(xs, mask)``.
    :param train_data: a list of (T_i, ...) tensors, a padded ``(xs, mask)`` pair, or one (N, T, ...) tensor.
    :param inference, guide, elbo, guide_kwargs, optimizer, lr, clip_norm, lr_schedule: the
        :class:`~pyro_avf.trainer.Trainer`: ``"avf"`` (``IterativeGuide(model.model, **guide_kwargs)``),
        ``"em"`` (the same with ``update="adam"``) or ``"baseline"`` (``model.guide`` or ``guide``, with
        ``elbo``); the optimiser a ``pyro.optim`` optimiser or scheduler, else ``ClippedAdam(lr, clip_norm)``.
    :param valid_data, test_data: whole sequences to validate on (every ``valid_every`` epochs; early
        stopping after ``patience`` validations without improvement, None: never) and to test on (every
        ``eval_every`` epochs and at the end), in batches of ``eval_batch_size``.
    :param lr_drop_patience: multiply the learning rate by ``lr_drop_factor`` each time this many validations in
        a row have not improved on the best (None: never); against the over-fitting after the validation peak.
    :param min_lr: the floor of the learning rate (0: none): after every epoch's schedule step and every drop,
        η ← max(η, ``min_lr``), so that neither a long plateau nor the schedule's decay stalls training.
    :param int epochs: train until this many epochs are done (a resumed run counts its earlier ones).
    :param int batch_size: sequences per optimiser step (the global batch under torchrun).
    :param crop_length: steps per random training crop (None: whole sequences).
    :param batches_per_epoch: a cap on the optimiser steps per epoch (None: every batch).
    :param int kl_anneal_epochs: β rises to 1 over these epochs (0: β = 1), as :math:`((e+1)/E)^p` with
        ``kl_anneal_power`` p (1: linearly; see :func:`kl_weight`).
    :param stream: ``model -> stream`` to evaluate one step at a time (see
        :func:`~pyro_avf.evaluation.evaluate`).
    :param max_minutes: wall-clock budget of this call (None: none).
    :param out_dir: the run folder (None: nothing is written and ``resume`` is impossible).
    :param bool resume: continue the run in ``out_dir`` from its checkpoint (same ``config``).
    :param bool overwrite: replace the run in ``out_dir``.
    :param config: the settings that identify the run, stored in ``config.json`` (default: fit's own).
    :param bool plots: write the figures into ``out_dir`` (after each test evaluation and at the end).
    :param columns: maps each history row (a dict) to the row kept, e.g. to add columns naming the run.
    :param int seed: the seed of the crops, the batch order and the evaluations. The model's initial parameters
        and the noise of training come from Pyro's global generators: call ``pyro.set_rng_seed`` before building
        the model for a reproducible run. Like a fresh SVI run, fit starts from an empty Pyro param store.
    :param device: where the modules and batches go (None: where they are).
    :param bool progress: show progress (tqdm) on a terminal, one line per epoch otherwise.
    :param on_batch: called as ``on_batch(batches_done, loss)`` after every optimiser step of this call.
    """
    options = types.SimpleNamespace(**locals())  # fit's arguments, as attributes
    checks = {"epochs": epochs, "batch_size": batch_size, "valid_every": valid_every, "eval_every": eval_every,
              "eval_batch_size": eval_batch_size, "crop_length": crop_length, "batches_per_epoch": batches_per_epoch,
              "patience": patience, "lr_drop_patience": lr_drop_patience}  # fmt: skip
    for name, value in checks.items():
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if not isinstance(kl_anneal_epochs, int) or kl_anneal_epochs < 0:
        raise ValueError(f"kl_anneal_epochs must be a non-negative integer, got {kl_anneal_epochs!r}")
    if not (isinstance(kl_anneal_power, (int, float)) and math.isfinite(kl_anneal_power) and kl_anneal_power > 0):
        raise ValueError(f"kl_anneal_power must be a positive number, got {kl_anneal_power!r}")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    if clip_norm is not None and not clip_norm > 0:
        raise ValueError(f"clip_norm must be positive or None, got {clip_norm!r}")
    if max_minutes is not None and not max_minutes > 0:
        raise ValueError(f"max_minutes must be positive, got {max_minutes}")
    if not 0 < lr_drop_factor < 1:
        raise ValueError(f"lr_drop_factor must be in (0, 1), got {lr_drop_factor!r}")
    if not (isinstance(min_lr, (int, float)) and math.isfinite(min_lr) and min_lr >= 0):
        raise ValueError(f"min_lr must be a non-negative number, got {min_lr!r}")
    if (resume or overwrite) and out_dir is None:
        raise ValueError("resume and overwrite need out_dir, the run folder")
    if resume and overwrite:
        raise ValueError("resume continues the run in out_dir and overwrite replaces it: pass one of them")
    if resume and not (Path(out_dir) / CHECKPOINT).is_file():
        raise FileNotFoundError(f"resume=True: no checkpoint at {Path(out_dir) / CHECKPOINT}; start without resume")
    data = {"train": as_sequences(train_data, "train_data")}
    for split, given in (("valid", valid_data), ("test", test_data)):
        if given is not None:
            data[split] = as_sequences(given, f"{split}_data")
    settings = dict(inference=inference, guide=guide, elbo=elbo, guide_kwargs=guide_kwargs, optimizer=optimizer,
                    lr=lr, clip_norm=clip_norm, lr_schedule=lr_schedule)  # fmt: skip
    if config is None:
        options.config = _describe({"model": model, **settings, "batch_size": batch_size, "crop_length": crop_length,
                                    "batches_per_epoch": batches_per_epoch, "kl_anneal_epochs": kl_anneal_epochs,
                                    "kl_anneal_power": kl_anneal_power,
                                    "valid_every": valid_every, "patience": patience, "eval_every": eval_every,
                                    "lr_drop_patience": lr_drop_patience, "lr_drop_factor": lr_drop_factor,
                                    **({"min_lr": min_lr} if min_lr else {}),  # older runs' configs lack it
                                    "eval_batch_size": eval_batch_size, "seed": seed,
                                    **{f"{k}_data": f"{len(d)} sequences, {d.steps} steps" for k, d in data.items()}})
    dist = Dist()
    try:
        if batch_size % dist.world:
            raise ValueError(f"batch_size {batch_size} must be divisible by the number of processes {dist.world}")
        pyro.clear_param_store()
        if device is not None and isinstance(model, torch.nn.Module):
            model.to(device)
        trainer = Trainer(model, **settings)
        if min_lr > trainer.lr:
            raise ValueError(f"min_lr {min_lr} is above the initial learning rate {trainer.lr}: it would raise it")
        return _Run(trainer, data, dist, options).run()
    finally:
        dist.close()


def _describe(value: Any) -> Any:
    """``value`` as JSON: numbers and strings as they are, a pyro.optim optimiser as its class and arguments,
    anything else as its (qualified) name."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, dict):
        return {str(k): _describe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_describe(v) for v in value]
    if isinstance(value, PyroOptim):
        args = {**value.pt_optim_args, **getattr(value, "kwargs", {}), **value.pt_clip_args}
        return {"class": type(value).__name__, "optimizer": _describe(value.pt_optim_constructor), **_describe(args)}
    return getattr(value, "__qualname__", type(value).__qualname__)


class _Run:
    """The state of one :func:`fit` call: data, trainer, the best parameters, the history, the run folder."""

    def __init__(self, trainer: Trainer, data: Dict[str, Sequences], dist: Dist, options: types.SimpleNamespace):
        self.trainer, self.data, self.dist, self.options = trainer, data, dist, options
        self.out_dir = None if self.options.out_dir is None else Path(self.options.out_dir)
        self.crops = EpochCrops(data["train"], self.options.crop_length, self.options.seed)
        self.sampler = DistributedSampler(self.crops, num_replicas=dist.world, rank=dist.rank, seed=self.options.seed,
                                          drop_last=True)  # fmt: skip
        self.loader = DataLoader(self.crops, batch_size=self.options.batch_size // dist.world, sampler=self.sampler,
                                 collate_fn=functools.partial(collate, masked=data["train"].masked))  # fmt: skip
        self.n_batches = min(len(self.loader), self.options.batches_per_epoch or len(self.loader))
        self.eval = {k: [self._to(b) for b in data[k].batches(self.options.eval_batch_size)]
                     for k in ("valid", "test") if k in data}  # fmt: skip
        self.rows: List[Dict[str, Any]] = []
        self.start_epoch, self.wall, self.batches_run = 0, 0.0, 0
        self.cpu, self.updates = 0.0, 0  # training CPU seconds (all threads) and optimiser steps, over the run
        self.best_valid, self.best_epoch, self.stale = math.inf, 0, 0
        self.best_state: Optional[Dict[str, Any]] = None
        self.folder: Optional[RunFolder] = None
        self.notes: List[str] = []  # shown when the progress display starts

    def _to(self, batch: Batch) -> Batch:
        device = self.options.device
        return batch if device is None else tuple(None if t is None else t.to(device) for t in batch)

    # ----- setting up -----

    def run(self) -> TrainingResult:
        first = collate([self.crops[i] for i in range(min(2, len(self.crops)))], self.data["train"].masked)
        self.trainer.build(*self._to(first))  # the lazily built networks exist before DDP, a checkpoint or a step
        if self.options.device is not None:
            self.trainer.net.to(self.options.device)
        if self.dist.world > 1:
            self.trainer.data_parallel()
        self.folder = self._open_folder()
        try:
            if self.options.resume:
                self._resume()
            stop_reason = self._epochs()
        finally:
            if self.folder is not None:
                self.folder.close()
        if self.best_state is not None:
            self.trainer.restore(self.best_state)
        return TrainingResult(self.options.model, self.trainer.guide, self.trainer, pd.DataFrame(self.rows),
                              self.best_state, self.best_epoch or None, stop_reason, self.out_dir, self.options.stream,
                              self.options.eval_batch_size, self.options.seed)  # fmt: skip

    def _open_folder(self) -> Optional[RunFolder]:
        """Process 0 creates and locks the run folder; every process learns whether that worked."""
        if self.out_dir is None:
            return None
        folder, refusal = None, None
        if self.dist.main:
            try:
                o = self.options
                folder = RunFolder.open(self.out_dir, o.config, resume=o.resume, overwrite=o.overwrite, outputs=OUTPUTS)
            except RunFolderError as err:
                refusal = str(err)
        if self.dist.any(refusal is not None):
            raise RunFolderError(refusal or f"process 0 could not open the run folder {self.out_dir}")
        return folder

    def _resume(self) -> None:
        """Restore the checkpoint and the best parameters; keep the history rows up to the checkpoint."""
        path = self.out_dir / CHECKPOINT
        state = read_checkpoint(path)
        try:
            self.trainer.load_state_dict(state)
        except (RuntimeError, KeyError, ValueError) as err:
            reason = " ".join(str(err).split())[:300]
            raise CheckpointError(f"{path} holds the state of another model or inference ({reason}); resume with "
                                  "the settings that wrote it, or start again with --overwrite (overwrite=True)"
                                  ) from None  # fmt: skip
        self.start_epoch, self.wall = state["epoch"], state["wall_time"]
        self.cpu, self.updates = state.get("cpu_time", 0.0), state.get("updates", 0)
        self.best_valid, self.best_epoch, self.stale = state["best_valid"], state["best_epoch"], state["stale"]
        if self.best_epoch:
            self.best_state = read_checkpoint(self.out_dir / BEST)
        results = self.out_dir / RESULTS
        if results.is_file() and results.stat().st_size > 0:
            rows = pd.read_csv(results)
            self.rows = rows[rows["epoch"] <= self.start_epoch].to_dict("records")
        set_rng_state(state["rng"])
        self.notes.append(f"resumed from {path} after epoch {self.start_epoch}")

    # ----- training -----

    def _epochs(self) -> str:
        o = self.options
        progress = Progress(o.progress and self.dist.main, o.epochs, self.start_epoch)
        for note in self.notes:
            progress.note(note)
        deadline = time.monotonic() + 60 * o.max_minutes if o.max_minutes else math.inf
        stop_reason = "epochs"
        try:
            for epoch in range(self.start_epoch, o.epochs):
                self.crops.epoch = epoch
                self.sampler.set_epoch(epoch)
                self.trainer.kl_weight = beta = kl_weight(epoch, o.kl_anneal_epochs, o.kl_anneal_power)
                lr, started, cpu_started = self.trainer.lr, time.monotonic(), time.process_time()
                loss_sum, step_sum, out_of_time = self._train_epoch(progress, deadline)
                self.trainer.end_epoch()
                self.trainer.floor_lr(o.min_lr)
                self.wall += time.monotonic() - started
                self.cpu += time.process_time() - cpu_started
                done = epoch + 1
                row = {"epoch": done, "wall_time_s": self.wall, "cpu_time_s": self.cpu, "updates": self.updates,
                       "train_loss_per_step": loss_sum / max(step_sum, 1), "kl_weight": beta, "lr": lr}  # fmt: skip
                stop_reason = "max_minutes" if out_of_time else stop_reason
                last = done == o.epochs or out_of_time
                if "valid" in self.eval and (done % o.valid_every == 0 or last):
                    row.update(self._validate(done))
                    drop = o.lr_drop_patience
                    if drop is not None and self.stale and self.stale % drop == 0:  # kept by the checkpoint
                        self.trainer.scale_lr(o.lr_drop_factor)
                        self.trainer.floor_lr(o.min_lr)
                    if o.patience is not None and self.stale >= o.patience and not last:
                        stop_reason, last = "patience", True
                evaluated = done % o.eval_every == 0 or last
                if "test" in self.eval and evaluated:
                    row.update(self._test(use_best=last and "valid" in self.eval, epoch=done))
                progress.epoch(row)
                self._record(row, plot=evaluated)
                if last:
                    break
        finally:
            progress.close()
        if self.start_epoch >= o.epochs:
            progress.note(f"nothing to do: the checkpoint has {self.start_epoch} epochs and epochs is {o.epochs}")
        elif stop_reason != "epochs":
            reasons = {"max_minutes": f"the budget of {o.max_minutes} minutes is spent",
                       "patience": f"{o.patience} validations without improvement"}  # fmt: skip
            progress.note(f"stopped after epoch {self.rows[-1]['epoch']}: {reasons[stop_reason]}")
        return stop_reason

    def _train_epoch(self, progress: Progress, deadline: float) -> Tuple[float, float, bool]:
        """One epoch of optimiser steps; returns the summed loss, the real steps seen (over all processes) and
        whether the time budget ran out."""
        loss_sum = step_sum = 0.0
        out_of_time = False
        batches = progress.batches(self.loader, self.n_batches)
        for b, batch in enumerate(batches):
            if b >= self.n_batches:
                break
            xs, mask = self._to(batch)
            loss = self.trainer.step(xs, mask)
            self.updates += 1
            steps = xs.shape[0] * xs.shape[1] if mask is None else mask.sum().item()
            loss_sum, step_sum = loss_sum + loss, step_sum + steps
            batches.set_postfix(loss_per_step=f"{loss / max(steps, 1):.3f}", refresh=False)
            self.batches_run += 1
            if self.options.on_batch is not None:
                self.options.on_batch(self.batches_run, loss)
            if self.dist.any(time.monotonic() > deadline):
                out_of_time = True
                break
        batches.close()
        loss_sum, step_sum = self.dist.sum(loss_sum, step_sum)
        return loss_sum, step_sum, out_of_time

    def _score(self, split: str) -> FreeEnergy:
        """The free energy per step on the whole ``split`` sequences (this process's share, then summed)."""
        shard = self.eval[split][self.dist.rank :: self.dist.world]
        o = self.options
        score = score_batches(o.model, self.trainer.guide, shard, stream=o.stream, seed=o.seed)
        return FreeEnergy.from_sums(*self.dist.sum(*score.sums))

    def _validate(self, epoch: int) -> Dict[str, Any]:
        """Score the validation sequences; keep (and save) the parameters when they improve on the best."""
        scored = self._score("valid")
        score = scored.per_step
        if score < self.best_valid:
            self.best_valid, self.best_epoch, self.stale = score, epoch, 0
            self.best_state = self.trainer.snapshot()
            if self.dist.main and self.out_dir is not None:
                save_checkpoint(self.out_dir / BEST, version=CHECKPOINT_VERSION, epoch=epoch, valid=score,
                                **self.best_state)  # fmt: skip
        else:
            self.stale += 1
        return {"valid_free_energy_per_step": score, "valid_free_energy_paper": scored.paper,
                "best_valid_free_energy_per_step": self.best_valid, "best_epoch": self.best_epoch}  # fmt: skip

    def _test(self, use_best: bool, epoch: int) -> Dict[str, Any]:
        """Score the test sequences with the current parameters, or with the best ones (restored after)."""
        if not (use_best and self.best_state is not None):
            return self._test_row(self._score("test"), epoch)
        current = self.trainer.snapshot()
        self.trainer.restore(self.best_state)
        try:
            score = self._score("test")
        finally:
            self.trainer.restore(current)
        return self._test_row(score, self.best_epoch)

    @staticmethod
    def _test_row(score: FreeEnergy, epoch: int) -> Dict[str, Any]:
        return {"test_free_energy_per_step": score.per_step, "test_free_energy_paper": score.paper,
                "test_steps": score.steps, "test_sequences": score.sequences, "tested_epoch": epoch}  # fmt: skip

    def _record(self, row: Dict[str, Any], plot: bool) -> None:
        """Add the row to the history; process 0 rewrites results.csv, draws the figures and saves the
        checkpoint (in that order: a run killed in between redoes the epoch and rewrites the row)."""
        self.rows.append(row if self.options.columns is None else self.options.columns(row))
        if not (self.dist.main and self.out_dir is not None):
            return
        with atomic_write(self.out_dir / RESULTS, "w") as f:
            pd.DataFrame(self.rows).to_csv(f, index=False)
        if plot and self.options.plots:
            split = next(name for name in ("test", "valid", "train") if self.data.get(name))
            counts = {name: len(data) for name, data in self.data.items() if data}
            plot_run(self.out_dir, pd.DataFrame(self.rows), self.trainer.model_fn, self.trainer.guide,
                     self.data[split].head(4), self.options.seed, counts, split)  # fmt: skip
        save_checkpoint(self.out_dir / CHECKPOINT, version=CHECKPOINT_VERSION, epoch=row["epoch"],
                        wall_time=self.wall, cpu_time=self.cpu, updates=self.updates, config=self.options.config,
                        **self.trainer.state_dict(), rng=rng_state(),
                        best_valid=self.best_valid, best_epoch=self.best_epoch, stale=self.stale)  # fmt: skip
