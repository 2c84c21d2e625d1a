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
from typing import Callable, Dict, List, Tuple, Union

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure
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


def plot_training_curves(results: pd.DataFrame, path: PathLike) -> Path:
    """Panels against ``epoch``: ``train_loss_per_step`` and, where the rows have them,
    ``valid_free_energy_per_step`` and ``test_free_energy_per_step`` (nats; epochs without a value skipped)."""
    missing = {"epoch", "train_loss_per_step"} - set(results.columns)
    if missing:
        raise ValueError(f"results are missing the columns {sorted(missing)}")
    panels = {"train_loss_per_step": "train loss / step", "valid_free_energy_per_step": "validation free energy / "
              "step", "test_free_energy_per_step": "test free energy / step"}  # fmt: skip
    panels = {c: title for c, title in panels.items() if c in results and results[c].notna().any()}
    fig = Figure(figsize=(4.5 * len(panels), 3.5))
    axes = np.atleast_1d(fig.subplots(1, len(panels)))
    for ax, (column, title) in zip(axes, panels.items()):
        rows = results[["epoch", column]].dropna()
        ax.plot(rows["epoch"], rows[column], marker="o", markersize=3)
        ax.set_xlabel("epoch")
        ax.set_ylabel("nats")
        ax.set_title(title)
        ax.grid(alpha=0.3)
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


def plot_free_energy_per_iteration(free_energy: torch.Tensor, observed: torch.Tensor, path: PathLike) -> Path:
    """Average step free energy (nats) after inference iteration k = 0 (the prior) .. K."""
    curve = mean_free_energy_per_iteration(free_energy, observed)
    fig = Figure(figsize=(4.5, 3.5))
    ax = fig.subplots()
    ax.plot(np.arange(len(curve)), curve, marker="o")
    ax.set_xlabel("inference iteration")
    ax.set_ylabel("free energy / step (nats)")
    ax.set_xticks(np.arange(len(curve)))
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
             seed: int = 0) -> List[Path]:  # fmt: skip
    """The figures of a run in ``folder``: :data:`CURVES_PNG` from ``results``; with an IterativeGuide,
    :data:`PER_ITERATION_PNG` over the first four sequences of ``data``; when the data are binary
    (time, keys) rolls (music), :data:`PIANO_ROLL_PNG` of the first one. ``model`` is the Pyro program; the
    random numbers come from ``seed`` under a forked generator."""
    folder = Path(folder)
    paths = [plot_training_curves(results, folder / CURVES_PNG)]
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        xs, mask = collate(data.items[:4], data.masked)
        args = (xs,) if mask is None else (xs, mask)
        if isinstance(guide, IterativeGuide):
            elbo = AmortizedFilteringELBO(kl_weight=1.0)
            elbo.loss(model, guide, *args)
            diag = elbo.diagnostics
            if "free_energy" in diag:
                paths.append(plot_free_energy_per_iteration(diag["free_energy"], diag["observed"],
                                                            folder / PER_ITERATION_PNG))  # fmt: skip
        song = data.items[0][0]
        if data.masked and song.dim() == 2 and bool(((song == 0) | (song == 1)).all()):
            one = song.unsqueeze(0)
            prediction, reconstruction = prediction_and_reconstruction(model, guide, one, torch.ones(one.shape[:2],
                                                                       dtype=torch.bool))  # fmt: skip
            paths.append(plot_piano_roll(song, prediction[0], reconstruction[0], folder / PIANO_ROLL_PNG))
    return paths
