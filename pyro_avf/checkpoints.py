"""Checkpoints of a training run: plain tensors and containers, written atomically, read with
``torch.load(weights_only=True)``.

A checkpoint holds what an uninterrupted run would carry into the next epoch: the parameters, the optimiser
and learning-rate scheduler states, the epoch, and the states of the torch, Python and NumPy random number
generators (:func:`rng_state`), so that a resumed run continues exactly as if it had never stopped. Nothing
in it needs pickled code: :func:`read_checkpoint` loads with ``weights_only=True`` and turns every failure
(a truncated file, another kind of file, a pickle that asks for code) into a one-line
:class:`CheckpointError` naming the file.

>>> import tempfile
>>> path = Path(tempfile.mkdtemp()) / "checkpoint.pt"
>>> save_checkpoint(path, version=CHECKPOINT_VERSION, epoch=3, net={"w": torch.zeros(2)}, rng=rng_state())
>>> read_checkpoint(path)["epoch"]
3
>>> _ = path.write_text("not a checkpoint")
>>> read_checkpoint(path)
Traceback (most recent call last):
...
pyro_avf.checkpoints.CheckpointError: ... is not a readable checkpoint (UnpicklingError: ...
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Dict, Union

import numpy as np
import torch

from pyro_avf.run_folder import atomic_write

__all__ = ["CHECKPOINT_VERSION", "CheckpointError", "read_checkpoint", "rng_state", "save_checkpoint", "set_rng_state"]

CHECKPOINT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: unreadable, of another kind or version, or of other parameters."""


def rng_state() -> Dict[str, Any]:
    """The torch, Python and NumPy random number generator states, as tensors and numbers."""
    version, state, gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "python": {"version": version, "state": torch.tensor(state, dtype=torch.int64), "gauss": gauss},
        "numpy": {"keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)},
    }  # fmt: skip


def set_rng_state(state: Dict[str, Any]) -> None:
    """Restore the generator states of :func:`rng_state`."""
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss"]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))


def save_checkpoint(path: Union[str, Path], **state: Any) -> None:
    """``torch.save(state)`` through :func:`~pyro_avf.run_folder.atomic_write`: a kill never leaves half a file."""
    with atomic_write(path) as f:
        torch.save(state, f)


def read_checkpoint(path: Union[str, Path]) -> Dict[str, Any]:
    """``torch.load(path, weights_only=True)`` of a file :func:`save_checkpoint` wrote (with ``version`` and
    ``net`` entries); anything else raises a one-line :class:`CheckpointError` naming the file (not torch's
    advice to load untrusted pickles)."""
    try:
        state = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as err:  # truncated zip, foreign pickle, refused global, ...: all mean "not our checkpoint"
        raise CheckpointError(
            f"{path} is not a readable checkpoint ({type(err).__name__}: it is truncated, damaged or another kind "
            "of file); delete it, or start the run again with --overwrite (overwrite=True)"
        ) from None
    if not isinstance(state, dict) or "version" not in state or "net" not in state:
        raise CheckpointError(f"{path} is not a checkpoint of pyro_avf (no version and parameters in it); delete it, "
                              "or start the run again with --overwrite (overwrite=True)")  # fmt: skip
    if state["version"] != CHECKPOINT_VERSION:
        raise CheckpointError(f"{path} has checkpoint version {state['version']}, expected {CHECKPOINT_VERSION}")
    return state
