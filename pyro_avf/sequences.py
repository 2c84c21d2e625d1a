"""Sequence data for training and evaluation: checked sequences, random crops per epoch, padded batches.

Data come in one of three forms, each turned into :class:`Sequences` by :func:`as_sequences`:

- a list of variable-length tensors ``x_i`` of shape ``(T_i, ...)`` (songs, utterances); batches are padded
  and the model is called as ``model(xs, mask)`` with ``mask`` (B, T) bool, False on padding;
- a pair ``(xs, mask)``: a padded tensor (N, T, ...) and its (N, T) bool mask; each sequence ends at its last
  True step, and False steps before it (missing observations) stay masked; called as ``model(xs, mask)``;
- one tensor (N, T, ...) of equal-length sequences with every step real; called as ``model(xs)``.

Training draws, in every epoch, one random crop of ``length`` steps from every sequence (:class:`EpochCrops`;
the start depends only on the seed, the epoch and the sequence, so a resumed run and any number of
data-parallel processes see the same crops). Evaluation scores whole sequences, sorted by length so that a
batch holds little padding (:meth:`Sequences.batches`).

>>> data = as_sequences([torch.ones(5, 2), torch.ones(3, 2)])
>>> len(data), data.steps, data.masked
(2, 8, True)
>>> xs, mask = data.batches(2)[0]
>>> xs.shape, mask.sum(1).tolist()
(torch.Size([2, 5, 2]), [5, 3])
>>> crops = EpochCrops(data, length=4, seed=0)
>>> [tuple(x.shape) for x, _ in crops]   # the short sequence is padded
[(4, 2), (4, 2)]
"""

from __future__ import annotations

from typing import Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import Dataset

__all__ = ["Batch", "EpochCrops", "Sequences", "as_sequences", "collate"]

Batch = Tuple[Tensor, Optional[Tensor]]  # xs (B, T, ...) and mask (B, T) bool, or None when every step is real
Item = Tuple[Tensor, Tensor]  # x (T, ...) and mask (T,) bool
Data = Union[Sequence[Tensor], Tuple[Tensor, Tensor], Tensor]


class Sequences:
    """Checked sequences: ``items`` ``[(x_i (T_i, ...), mask_i (T_i,) bool), ...]``; ``masked``: whether
    batches carry a mask (lists and ``(xs, mask)`` pairs) or not (one tensor of equal-length sequences)."""

    def __init__(self, items: List[Item], masked: bool):
        self.items, self.masked = items, masked

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self) -> Iterator[Item]:
        return iter(self.items)

    @property
    def steps(self) -> int:
        """The number of real (unmasked) steps."""
        return int(sum(m.sum().item() for _, m in self.items))

    def head(self, n: int) -> Sequences:
        """The first ``n`` sequences."""
        return Sequences(self.items[:n], self.masked)

    def batches(self, batch_size: int) -> List[Batch]:
        """Whole sequences, longest first, in padded batches of ``batch_size``."""
        order = sorted(range(len(self.items)), key=lambda i: -self.items[i][0].shape[0])
        return [collate([self.items[i] for i in order[k : k + batch_size]], self.masked)
                for k in range(0, len(order), batch_size)]  # fmt: skip


def collate(items: Sequence[Item], masked: bool = True) -> Batch:
    """``[(x_i, mask_i), ...]`` -> zero-padded ``xs`` (B, T_max, ...) and ``mask`` (B, T_max) bool (or ``None``
    when ``masked`` is False: the sequences then have equal lengths and no masked step)."""
    xs = pad_sequence([x for x, _ in items], batch_first=True)
    return xs, pad_sequence([m for _, m in items], batch_first=True, padding_value=False) if masked else None


def as_sequences(data: Data, name: str = "data") -> Sequences:
    """Check ``data`` (see the module docstring) and return its :class:`Sequences`; errors name ``name``."""
    if isinstance(data, Sequences):
        return data
    if isinstance(data, Tensor):
        if data.dim() < 2:
            raise ValueError(f"{name} must have shape (sequences, time, ...), got {tuple(data.shape)}")
        full = torch.ones(data.shape[1], dtype=torch.bool)
        return _checked([(x, full) for x in data], False, name)
    if isinstance(data, tuple) and len(data) == 2 and all(isinstance(d, Tensor) for d in data):
        xs, mask = data
        if xs.dim() < 2 or mask.shape != xs.shape[:2] or mask.dtype != torch.bool:
            raise ValueError(
                f"{name} as (xs, mask) needs xs of shape (sequences, time, ...) and a bool mask of shape "
                f"(sequences, time); got xs {tuple(xs.shape)} and mask {tuple(mask.shape)} of dtype {mask.dtype}"
            )
        lengths = [int(m.nonzero().max()) + 1 if m.any() else 0 for m in mask]
        return _checked([(x[:n], m[:n]) for x, m, n in zip(xs, mask, lengths)], True, name)
    if isinstance(data, (list, tuple)) and all(isinstance(x, Tensor) for x in data):
        return _checked([(x, torch.ones(x.shape[:1], dtype=torch.bool)) for x in data], True, name)
    raise TypeError(
        f"{name} must be a list of (time, ...) tensors, a pair (xs, mask) of a padded (sequences, time, ...) tensor "
        f"and its bool mask, or one (sequences, time, ...) tensor; got {type(data).__name__}"
    )


def _checked(items: List[Item], masked: bool, name: str) -> Sequences:
    if not items:
        raise ValueError(f"{name} holds no sequences")
    shape = items[0][0].shape[1:]
    for i, (x, m) in enumerate(items):
        if x.dim() < 1 or x.shape[0] == 0 or not m.any():
            raise ValueError(f"{name}[{i}] is empty: every sequence needs at least one real step")
        if x.shape[1:] != shape:
            raise ValueError(f"{name}[{i}] has steps of shape {tuple(x.shape[1:])}, {name}[0] {tuple(shape)}")
        if x.is_floating_point() and not torch.isfinite(x).all():
            t = int((~torch.isfinite(x)).reshape(x.shape[0], -1).any(1).nonzero()[0])
            raise ValueError(
                f"{name}[{i}] holds NaN or infinite values (first at step {t}); give missing observations a finite "
                "value and mask them out with (xs, mask)"
            )
    return Sequences(items, masked)


class EpochCrops(Dataset):
    """One random crop of ``length`` steps per sequence (``None``: whole sequences), drawn anew every epoch.

    Set :attr:`epoch` before iterating. The start of crop ``i`` in epoch ``e`` is uniform on
    ``0 .. T_i - length`` and drawn from a generator seeded with ``(seed, e, i)`` alone: reproducible on
    resume and across any number of data-parallel processes. A shorter sequence is returned whole, padded to
    ``length`` with a False mask (with unmasked data the crop is the whole sequence).
    """

    def __init__(self, data: Sequences, length: Optional[int], seed: int):
        if length is not None and length < 1:
            raise ValueError(f"crop length must be a positive integer or None, got {length}")
        self.data, self.length, self.seed, self.epoch = data, length, seed, 0

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> Item:
        x, mask = self.data.items[index]
        steps = x.shape[0]
        if self.length is None or (steps < self.length and not self.data.masked):
            return x, mask
        if steps >= self.length:
            key = ((self.seed * 1_000_003 + self.epoch) * 1_000_033 + index) % (2**63)
            start = int(torch.randint(steps - self.length + 1, (), generator=torch.Generator().manual_seed(key)))
            return x[start : start + self.length], mask[start : start + self.length]
        crop, crop_mask = x.new_zeros((self.length,) + tuple(x.shape[1:])), mask.new_zeros(self.length)
        crop[:steps], crop_mask[:steps] = x, mask
        return crop, crop_mask
