"""PNG figures of a training run (matplotlib, Agg backend).

- :func:`plot_training_curves`: train loss per step and test free energy per step against the epoch, from the
  rows of a run's ``results.csv``;
- :func:`plot_free_energy_per_iteration`: the average step free energy after each inference iteration
  (AVF paper, Fig. 4b), :math:`\\bar{\\mathcal{F}}_k = \\sum_{n,t} m_{n,t} \\mathcal{F}_{n,t,k} / \\sum m`;
- :func:`plot_piano_roll`: a piano roll of the data, the prediction (observation mean under the prior, iteration
  0) and the reconstruction (observation mean under the final posterior) of one sequence (AVF paper, Fig. 3).
"""

from __future__ import annotations

from pathlib import Path
from typing import Union

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure

from pyro_avf.run_folder import atomic_write

__all__ = [
    "mean_free_energy_per_iteration",
    "plot_free_energy_per_iteration",
    "plot_piano_roll",
    "plot_training_curves",
]

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
    """Two panels against ``epoch``: ``train_loss_per_step`` and ``test_free_energy_per_step`` (nats)."""
    missing = {"epoch", "train_loss_per_step", "test_free_energy_per_step"} - set(results.columns)
    if missing:
        raise ValueError(f"results are missing the columns {sorted(missing)}")
    fig = Figure(figsize=(9, 3.5))
    axes = fig.subplots(1, 2)
    for ax, column, title in zip(
        axes, ("train_loss_per_step", "test_free_energy_per_step"), ("train loss / step", "test free energy / step")
    ):
        ax.plot(results["epoch"], results[column], marker="o", markersize=3)
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
