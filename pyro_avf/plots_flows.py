"""Picture of what an autoregressive flow does to a video (the poster's "Visualizing Autoregressive
Flows"): rows are the data ``x_t``, the flow's prediction ``mu_t``, its scale ``sigma_t`` and the
residual ``y_t = (x_t - mu_t) / sigma_t``; columns are frames."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure

__all__ = ["plot_flow_frames"]

_ROWS = ("data x", "prediction μ", "scale σ", "residual y")
_CELL_INCHES = 1.6


def _to_images(frames: torch.Tensor | np.ndarray, name: str) -> np.ndarray:
    """``(T, C, H, W)`` with C in {1, 3}, or ``(T, H, W)``, to ``(T, H, W)`` or ``(T, H, W, 3)`` numpy."""
    arr = frames.detach().cpu().numpy() if torch.is_tensor(frames) else np.asarray(frames)
    if arr.ndim == 4 and arr.shape[1] in (1, 3):
        arr = arr[:, 0] if arr.shape[1] == 1 else arr.transpose(0, 2, 3, 1)
    elif arr.ndim != 3:
        raise ValueError(f"{name} must have shape (T, C, H, W) with C in (1, 3) or (T, H, W), got {arr.shape}")
    return arr.astype(np.float64)


def _normalise(img: np.ndarray) -> np.ndarray:
    """Colour images are rescaled to [0, 1] for display; grey ones keep their values (a colour map)."""
    if img.ndim == 3:
        lo, hi = img.min(), img.max()
        return (img - lo) / (hi - lo) if hi > lo else np.zeros_like(img)
    return img


def plot_flow_frames(
    x: torch.Tensor,
    mu: torch.Tensor,
    sigma: torch.Tensor,
    y: torch.Tensor,
    path: str | Path,
    num_frames: int = 4,
    dpi: int = 100,
) -> Path:
    """Write a PNG grid of 4 rows (x, mu, sigma, y) by ``num_frames`` columns (the first frames).

    Each argument is one sequence ``(T, C, H, W)`` or ``(T, H, W)``. Every cell is 1.6 inches square, so
    the image is ``4 * 1.6 * dpi`` pixels high and ``num_frames * 1.6 * dpi`` wide. Data and prediction
    share one grey scale, sigma and y get their own. Returns the path written.
    """
    rows = [_to_images(a, n) for a, n in zip((x, mu, sigma, y), ("x", "mu", "sigma", "y"))]
    if any(r.shape != rows[0].shape for r in rows):
        raise ValueError(f"x, mu, sigma and y must have the same shape, got {[r.shape for r in rows]}")
    steps = rows[0].shape[0]
    if not 1 <= num_frames <= steps:
        raise ValueError(f"num_frames must be between 1 and the sequence length {steps}, got {num_frames}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data_range = (min(rows[0].min(), rows[1].min()), max(rows[0].max(), rows[1].max()))
    ranges = [data_range, data_range, (rows[2].min(), rows[2].max()), (rows[3].min(), rows[3].max())]
    fig = Figure(figsize=(num_frames * _CELL_INCHES, 4 * _CELL_INCHES), dpi=dpi)
    axes = fig.subplots(4, num_frames, squeeze=False)
    for i, (images, (lo, hi)) in enumerate(zip(rows, ranges)):
        for t in range(num_frames):
            ax = axes[i, t]
            ax.imshow(_normalise(images[t]), cmap="gray", vmin=lo, vmax=hi, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if t == 0:
                ax.set_ylabel(_ROWS[i], fontsize=8)
            if i == 0:
                ax.set_title(f"t = {t + 1}", fontsize=8)
    fig.subplots_adjust(left=0.08, right=0.99, top=0.93, bottom=0.01, wspace=0.05, hspace=0.05)
    fig.savefig(path, dpi=dpi)
    return path
