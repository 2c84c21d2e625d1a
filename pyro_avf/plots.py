"""PNG figures of a training run (matplotlib, Agg backend).

- :func:`plot_training_curves`: train loss per step and the validation and test free energies per step
  against the epoch, from the rows of a run's ``results.csv``;
- :func:`plot_free_energy_per_iteration`: the average step free energy after each inference iteration
  (AVF paper, Fig. 4b), :math:`\\bar{\\mathcal{F}}_k = \\sum_{n,t} m_{n,t} \\mathcal{F}_{n,t,k} / \\sum m`;
- :func:`plot_piano_roll`: a piano roll of the data, the prediction (observation mean under the prior, iteration
  0) and the reconstruction (observation mean under the final posterior) of one sequence (AVF paper, Fig. 3),
  computed by :func:`prediction_and_reconstruction`;
- :func:`plot_run`: those of a trained model and guide, as :func:`pyro_avf.training.fit` writes them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple, Union

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from pyro import poutine
from pyro.poutine.messenger import Messenger

from pyro_avf.elbo import AmortizedFilteringELBO
from pyro_avf.guide import IterativeGuide
from pyro_avf.run_folder import atomic_write
from pyro_avf.sequences import Sequences, collate

__all__ = [
    "CURVES_PNG",
    "PER_ITERATION_PNG",
    "PIANO_ROLL_PNG",
    "mean_free_energy_per_iteration",
    "plot_free_energy_per_iteration",
    "plot_piano_roll",
    "plot_run",
    "plot_training_curves",
    "prediction_and_reconstruction",
]

CURVES_PNG = "training_curves.png"
PER_ITERATION_PNG = "free_energy_per_iteration.png"
PIANO_ROLL_PNG = "piano_roll.png"

PathLike = Union[str, Path]


def _save(fig, path: PathLike) -> Path:
    """Write the figure atomically (:func:`~pyro_avf.run_folder.atomic_write`), in the format of the suffix."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    with atomic_write(path) as f:
        fig.savefig(f, dpi=100, format=path.suffix.lstrip(".") or "png")
    return path


SPLIT_NAMES = {"train_loss_per_step": "train", "valid_free_energy_per_step": "valid",
               "test_free_energy_per_step": "test"}  # fmt: skip


def _songs(counts: Optional[Dict[str, int]], split: str) -> str:
    n = (counts or {}).get(split)
    return "" if n is None else f", {n} sequences"


def _epoch_axis(ax) -> None:
    """Integer epoch ticks and plain numbers (no offset or scientific notation) on both axes."""
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.ticklabel_format(axis="y", useOffset=False, style="plain")
    ax.set_xlabel("epoch")
    ax.grid(alpha=0.3)


def plot_training_curves(results: pd.DataFrame, path: PathLike, counts: Optional[Dict[str, int]] = None) -> Path:
    """Against ``epoch`` (every epoch that has a value, integer ticks): ``train_loss_per_step`` (the β-weighted
    loss over the epoch's crops) and ``valid_free_energy_per_step`` / ``test_free_energy_per_step`` (nats per
    step on whole sequences). A series with at least three values gets a panel of its own; sparser ones (e.g.
    one test score at the end) are drawn as labelled markers in the training panel. ``counts``: the number of
    sequences per split (``"train"``, ``"valid"``, ``"test"``), shown in the titles and legends."""
    missing = {"epoch", "train_loss_per_step"} - set(results.columns)
    if missing:
        raise ValueError(f"results are missing the columns {sorted(missing)}")
    present = {c: results[["epoch", c]].dropna() for c in SPLIT_NAMES if c in results and results[c].notna().any()}
    own = [c for c, rows in present.items() if c == "train_loss_per_step" or len(rows) >= 3]
    fig = Figure(figsize=(4.8 * len(own), 3.6))
    axes = dict(zip(own, np.atleast_1d(fig.subplots(1, len(own)))))
    for column, rows in present.items():
        split = SPLIT_NAMES[column]
        what = "train loss" if split == "train" else f"{'validation' if split == 'valid' else 'test'} free energy"
        label = f"{what} ({split}{_songs(counts, split)})"
        if column in axes:
            ax = axes[column]
            ax.plot(rows["epoch"], rows[column], marker="o", markersize=3, label=label)
            ax.set_title(f"{what} / step{_songs(counts, split)}")
            ax.set_ylabel("nats / step")
            _epoch_axis(ax)
        else:
            ax = axes["train_loss_per_step"]
            ax.plot(rows["epoch"], rows[column], linestyle="none", marker="D", markersize=7, label=label)
            for epoch, value in zip(rows["epoch"], rows[column]):
                ax.annotate(f"{value:.3f}", (epoch, value), textcoords="offset points", xytext=(-8, 8), ha="right")
    if len(present) > 1 and any(c not in axes for c in present):
        axes["train_loss_per_step"].legend(fontsize="small")
    return _save(fig, path)


def mean_free_energy_per_iteration(free_energy: torch.Tensor, observed: torch.Tensor) -> np.ndarray:
    """``free_energy`` (B, T, K+1) and ``observed`` (B, T) bool -> (K+1,) mean over observed steps."""
    if free_energy.dim() != 3 or observed.shape != free_energy.shape[:2]:
        raise ValueError(
            f"free_energy must be (batch, time, K+1) and observed (batch, time); got {tuple(free_energy.shape)} "
            f"and {tuple(observed.shape)}"
        )
    m = observed.to(free_energy.dtype).unsqueeze(-1)
    return ((free_energy * m).sum((0, 1)) / m.sum().clamp_min(1)).detach().cpu().numpy()


def plot_free_energy_per_iteration(free_energy: torch.Tensor, observed: torch.Tensor, path: PathLike,
                                   title: Optional[str] = None) -> Path:  # fmt: skip
    """Average step free energy (nats) after inference iteration k = 0 (the prior prediction) .. K, each point
    labelled with its value; ``title`` (default: the number of sequences) says what was scored."""
    curve = mean_free_energy_per_iteration(free_energy, observed)
    fig = Figure(figsize=(4.8, 3.6))
    ax = fig.subplots()
    ax.plot(np.arange(len(curve)), curve, marker="o")
    for k, value in enumerate(curve):
        ax.annotate(f"{value:.2f}", (k, value), textcoords="offset points", xytext=(6, 6))
    ax.set_xlabel("inference iteration k (0: prior prediction)")
    ax.set_ylabel("free energy / step (nats)")
    ax.set_xticks(np.arange(len(curve)))
    ax.ticklabel_format(axis="y", useOffset=False, style="plain")
    ax.set_title(title or f"free energy per inference iteration ({free_energy.size(0)} sequences)")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_piano_roll(data: torch.Tensor, prediction: torch.Tensor, reconstruction: torch.Tensor, path: PathLike) -> Path:
    """Three stacked piano rolls, each (T, keys) with values in [0, 1]: time on x, key on y."""
    rolls = {"data": data, "prediction (iteration 0)": prediction, "reconstruction (final)": reconstruction}
    shapes = {tuple(r.shape) for r in rolls.values()}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2:
        raise ValueError(f"piano rolls must share one (time, keys) shape, got {sorted(shapes)}")
    fig = Figure(figsize=(9, 7))
    axes = fig.subplots(3, 1, sharex=True)
    for ax, (title, roll) in zip(axes, rolls.items()):
        ax.imshow(roll.detach().cpu().numpy().T, aspect="auto", origin="lower", cmap="gray_r", vmin=0, vmax=1)
        ax.set_title(title)
        ax.set_ylabel("key")
    axes[-1].set_xlabel("step")
    return _save(fig, path)


class StepRecorder(Messenger):
    """Records ``(fn, args, kwargs)`` of every executed filtering step (post-processing only, so the guide's
    probes of the handler stack are not counted)."""

    def __init__(self):
        super().__init__()
        self.calls: List[tuple] = []

    def _pyro_post_filtering_step(self, msg) -> None:
        self.calls.append((msg["fn"], msg["args"], msg["kwargs"]))


def _observation_mean(fn: Callable, args, kwargs, latent_values: Dict[str, torch.Tensor]) -> torch.Tensor:
    trace = poutine.trace(poutine.condition(fn, data=latent_values)).get_trace(*args, **kwargs)
    means = [s["fn"].mean for n, s in trace.nodes.items() if s["type"] == "sample" and n not in latent_values]
    return torch.cat([m.reshape(m.shape[0], -1) for m in means], -1)


def prediction_and_reconstruction(model: Callable, guide: Callable, xs: torch.Tensor, mask: torch.Tensor
                                  ) -> Tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
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


def plot_run(folder: PathLike, results: pd.DataFrame, model: Callable, guide: Callable, data: Sequences,
             seed: int = 0, counts: Optional[Dict[str, int]] = None, split: str = "test") -> List[Path]:  # fmt: skip
    """The figures of a run in ``folder``: :data:`CURVES_PNG` from ``results``; with an IterativeGuide,
    :data:`PER_ITERATION_PNG` over the first four sequences of ``data``; when the data are binary
    (time, keys) rolls (music), :data:`PIANO_ROLL_PNG` of the first one. ``model`` is the Pyro program; the
    random numbers come from ``seed`` under a forked generator. ``counts``: sequences per split, for the titles;
    ``split``: which split ``data`` comes from."""
    folder = Path(folder)
    paths = [plot_training_curves(results, folder / CURVES_PNG, counts)]
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        xs, mask = collate(data.items[:4], data.masked)
        args = (xs,) if mask is None else (xs, mask)
        if isinstance(guide, IterativeGuide):
            elbo = AmortizedFilteringELBO(kl_weight=1.0)
            elbo.loss(model, guide, *args)
            diag = elbo.diagnostics
            if "free_energy" in diag:
                title = f"free energy per inference iteration\n(first {len(xs)} {split} sequences, trained guide)"
                paths.append(plot_free_energy_per_iteration(diag["free_energy"], diag["observed"],
                                                            folder / PER_ITERATION_PNG, title))  # fmt: skip
        song = data.items[0][0]
        if data.masked and song.dim() == 2 and bool(((song == 0) | (song == 1)).all()):
            one = song.unsqueeze(0)
            prediction, reconstruction = prediction_and_reconstruction(model, guide, one, torch.ones(one.shape[:2],
                                                                       dtype=torch.bool))  # fmt: skip
            paths.append(plot_piano_roll(song, prediction[0], reconstruction[0], folder / PIANO_ROLL_PNG))
    return paths
