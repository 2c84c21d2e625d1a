"""Progress of a training run: a tqdm bar on a terminal, else one readable line per epoch on standard error
(a log file, a notebook, a batch job), e.g.::

    epoch 3/10: train 1.2345 nats/step, valid 1.3001 (best 1.3001 at epoch 3), test 1.3120; β 0.3, lr 0.001, 4.2 s
"""

from __future__ import annotations

import sys
from typing import Any, Dict, Iterable

from tqdm.auto import tqdm

__all__ = ["Progress"]


class Progress:
    """A tqdm bar over the epochs on a terminal; otherwise one readable line per epoch on standard error."""

    def __init__(self, enabled: bool, epochs: int, start: int):
        self.enabled, self.epochs = enabled, epochs
        self.interactive = enabled and sys.stderr.isatty()
        self.bar = tqdm(total=epochs, initial=start, desc="epochs", disable=not self.interactive)

    def batches(self, loader: Iterable, total: int) -> tqdm:
        """``loader`` with a bar over its batches (a terminal only)."""
        return tqdm(loader, total=total, desc="batches", leave=False, disable=not self.interactive)

    def epoch(self, row: Dict[str, Any]) -> None:
        """Report a finished epoch (a row of :func:`pyro_avf.training.fit`'s history)."""
        parts = [f"train {row['train_loss_per_step']:.4f} nats/step"]
        if "valid_free_energy_per_step" in row:
            best = row["best_valid_free_energy_per_step"], row["best_epoch"]
            parts.append(f"valid {row['valid_free_energy_per_step']:.4f} (best {best[0]:.4f} at epoch {best[1]})")
        if "test_free_energy_per_step" in row:
            parts.append(f"test {row['test_free_energy_per_step']:.4f}")
        text = f"{', '.join(parts)}; β {row['kl_weight']:.3g}, lr {row['lr']:.3g}, {row['wall_time_s']:.1f} s"
        if self.interactive:
            self.bar.set_postfix_str(text, refresh=False)
            self.bar.update()
        elif self.enabled:
            print(f"epoch {row['epoch']}/{self.epochs}: {text}", file=sys.stderr, flush=True)

    def note(self, text: str) -> None:
        """A message between the epochs (resumed, stopped, ...)."""
        if self.enabled:
            tqdm.write(text, file=sys.stderr)

    def close(self) -> None:
        self.bar.close()
