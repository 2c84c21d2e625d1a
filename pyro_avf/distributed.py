"""Data-parallel training helpers: the rank and world size of this process, and sums over all processes.

Under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) :class:`Dist` joins a gloo process group; every
process then trains on its shard of each global batch, :class:`torch.nn.parallel.DistributedDataParallel`
averages the gradients, and process 0 writes the outputs. With one process every method is a no-op.
"""

from __future__ import annotations

import os
from typing import List

import torch
import torch.distributed as torch_dist

__all__ = ["Dist"]


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
        """Whether this is process 0 (the one that writes and reports)."""
        return self.rank == 0

    def sum(self, *values: float) -> List[float]:
        """The sums of ``values`` over all processes."""
        t = torch.tensor(values, dtype=torch.float64)
        if self.world > 1:
            torch_dist.all_reduce(t)
        return t.tolist()

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` is true in any process."""
        return self.sum(float(flag))[0] > 0 if self.world > 1 else flag

    def close(self) -> None:
        """Leave the process group this object joined."""
        if self.started:
            torch_dist.destroy_process_group()
            self.started = False
