"""Moving MNIST (Srivastava et al., 2015): MNIST digits moving and bouncing in a square frame.

Each sequence places ``num_digits`` digits (``digit_size`` pixels square) at random positions in a
``frame_size`` square and moves each with a constant speed in a random direction; a digit that would
leave the frame is reflected at the wall (position mirrored, that velocity component negated), so it
always stays entirely inside. Overlapping digits combine by the pixel-wise maximum. Values are 8-bit
(``uint8``), returned as floats ``x / 255`` in [0, 1].

Sequence ``i`` of a data set is generated from ``numpy.random.default_rng([seed, i])`` alone: the same
seed gives the same sequences in any order, without storing them. Train and test sequences draw their
digits from disjoint pools of the 10,000 MNIST test digits (a seeded permutation,
:func:`data_loaders.mnist.split_digits`).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from data_loaders.files import PathLike

__all__ = [
    "MovingMNIST",
    "dequantize",
    "generate_sequence",
    "load_digit_pools",
    "moving_mnist_splits",
    "nats_per_dim",
    "resize_digits",
]


def _load_mnist_digits(path: PathLike | None, download: bool) -> np.ndarray:
    """The 10,000 MNIST test images as uint8 ``(10000, 28, 28)`` (SHA-256 checked by ``data_loaders.mnist``)."""
    from data_loaders.mnist import load_mnist_test

    images, _ = load_mnist_test(path, download=download)
    return images.numpy()


def load_digit_pools(
    path: PathLike | None = None, split_seed: int = 0, test_fraction: float = 0.2, download: bool = False
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Disjoint train/test digit pools: ``{"train": (images, indices), "test": (images, indices)}``.

    ``images`` are uint8 ``(n, 28, 28)``; ``indices`` are their positions among the 10,000 MNIST test
    digits (the pools never share an index).
    """
    from data_loaders.mnist import split_digits

    images = _load_mnist_digits(path, download)
    train_idx, test_idx = (i.numpy() for i in split_digits(split_seed, test_fraction, len(images)))
    return {"train": (images[train_idx], train_idx), "test": (images[test_idx], test_idx)}


def resize_digits(digits: np.ndarray, size: int) -> np.ndarray:
    """Resize uint8 digits ``(n, h, w)`` to ``(n, size, size)`` (antialiased bilinear), rounded to uint8."""
    if digits.ndim != 3:
        raise ValueError(f"digits must have shape (n, height, width), got {digits.shape}")
    if digits.shape[1:] == (size, size):
        return digits.astype(np.uint8, copy=False)
    x = torch.from_numpy(digits.astype(np.float32)).unsqueeze(1)
    x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x.squeeze(1).round().clamp(0, 255).to(torch.uint8).numpy()


def _bounce(position: np.ndarray, velocity: np.ndarray, limit: float) -> tuple[np.ndarray, np.ndarray]:
    """One step ``p <- p + v`` reflected into ``[0, limit]``: ``p -> -p`` below 0, ``p -> 2 limit - p`` above."""
    position = position + velocity
    low, high = position < 0, position > limit
    position = np.where(low, -position, np.where(high, 2 * limit - position, position))
    velocity = np.where(low | high, -velocity, velocity)
    return position, velocity


def generate_sequence(
    rng: np.random.Generator,
    digits: np.ndarray,
    num_frames: int,
    frame_size: int,
    num_digits: int,
    speed_range: tuple[float, float],
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One sequence from the square uint8 ``digits`` pool ``(n, s, s)``.

    Each digit starts at a uniform top-left position in ``[0, frame_size - s]^2`` with speed
    ``~ U(speed_range)`` pixels per frame in a uniform direction, and bounces off the walls.

    :returns: frames uint8 ``(num_frames, frame_size, frame_size)``, the pool indices of the digits used
        ``(num_digits,)`` and the integer top-left positions ``(num_frames, num_digits, 2)`` (row, column).
    """
    size = digits.shape[1]
    limit = float(frame_size - size)
    if limit <= 0:
        raise ValueError(f"digits of {size} pixels do not fit in a {frame_size}-pixel frame")
    if speed_range[1] >= limit:
        raise ValueError(f"speed {speed_range[1]} must be below the free space {limit} of the frame")
    chosen = rng.choice(len(digits), size=num_digits, replace=num_digits > len(digits))
    position = rng.uniform(0.0, limit, size=(num_digits, 2))
    angle = rng.uniform(0.0, 2 * math.pi, size=num_digits)
    speed = rng.uniform(*speed_range, size=num_digits)
    velocity = speed[:, None] * np.stack([np.sin(angle), np.cos(angle)], axis=1)
    frames = np.zeros((num_frames, frame_size, frame_size), dtype=np.uint8)
    corners = np.zeros((num_frames, num_digits, 2), dtype=np.int64)
    for t in range(num_frames):
        if t > 0:
            position, velocity = _bounce(position, velocity, limit)
        corners[t] = np.clip(np.rint(position), 0, limit).astype(np.int64)
        for k, (r, c) in enumerate(corners[t]):
            window = frames[t, r : r + size, c : c + size]
            np.maximum(window, digits[chosen[k]], out=window)
    return frames, chosen, corners


class MovingMNIST(Dataset):
    """A deterministic, lazily generated Moving MNIST data set.

    Item ``i`` is a float32 tensor ``(num_frames, 1, frame_size, frame_size)`` in [0, 1] (``uint8 / 255``),
    or the raw uint8 frames with ``as_uint8=True`` (for :func:`dequantize`).

    :param digits: uint8 digit pool ``(n, 28, 28)`` (e.g. one side of :func:`load_digit_pools`).
    :param num_sequences: data set length.
    :param frame_size: side of the square frame (64 as in the literature; 32 for quick CPU work).
    :param digit_size: side of the digits in the frame; default ``round(28 * frame_size / 64)``.
    :param speed_range: digit speeds in pixels per frame at 64x64, scaled by ``frame_size / 64``.
    :param digit_indices: optional MNIST indices of the pool, reported by :meth:`sequence_digits`.
    """

    def __init__(
        self,
        digits: np.ndarray,
        num_sequences: int,
        num_frames: int = 20,
        frame_size: int = 64,
        num_digits: int = 2,
        digit_size: int | None = None,
        speed_range: tuple[float, float] = (2.0, 5.0),
        seed: int = 0,
        as_uint8: bool = False,
        digit_indices: np.ndarray | None = None,
    ) -> None:
        digits = np.asarray(digits)
        if digits.dtype != np.uint8 or digits.ndim != 3 or len(digits) == 0:
            raise ValueError(f"digits must be a non-empty uint8 array (n, h, w), got {digits.dtype} {digits.shape}")
        if num_digits not in (1, 2):
            raise ValueError(f"num_digits must be 1 or 2, got {num_digits}")
        if num_sequences < 1 or num_frames < 1:
            raise ValueError(f"need at least one sequence and one frame, got {num_sequences}, {num_frames}")
        if digit_indices is not None and len(digit_indices) != len(digits):
            raise ValueError(f"digit_indices has {len(digit_indices)} entries for {len(digits)} digits")
        self.digit_size = digit_size if digit_size is not None else int(round(28 * frame_size / 64))
        self.digits = resize_digits(digits, self.digit_size)
        self.num_sequences = int(num_sequences)
        self.num_frames = int(num_frames)
        self.frame_size = int(frame_size)
        self.num_digits = int(num_digits)
        scale = frame_size / 64
        self.speed_range = (speed_range[0] * scale, speed_range[1] * scale)
        self.seed = int(seed)
        self.as_uint8 = as_uint8
        self.digit_indices = None if digit_indices is None else np.asarray(digit_indices)
        if self.frame_size - self.digit_size <= self.speed_range[1]:
            raise ValueError(
                f"a {self.frame_size}-pixel frame leaves no room for {self.digit_size}-pixel digits moving "
                f"up to {self.speed_range[1]:.1f} pixels per frame"
            )

    def __len__(self) -> int:
        return self.num_sequences

    def generate(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Frames, pool indices and positions of sequence ``index`` (see :func:`generate_sequence`)."""
        if not 0 <= index < self.num_sequences:
            raise IndexError(f"sequence index {index} out of range for {self.num_sequences} sequences")
        rng = np.random.default_rng([self.seed, index])
        return generate_sequence(rng, self.digits, self.num_frames, self.frame_size, self.num_digits, self.speed_range)

    def sequence_digits(self, index: int) -> np.ndarray:
        """MNIST indices (or pool indices when ``digit_indices`` was not given) of the digits in a sequence."""
        chosen = self.generate(index)[1]
        return chosen if self.digit_indices is None else self.digit_indices[chosen]

    def __getitem__(self, index: int) -> torch.Tensor:
        frames = torch.from_numpy(self.generate(int(index))[0]).unsqueeze(1)
        return frames if self.as_uint8 else frames.to(torch.float32) / 255.0


def moving_mnist_splits(
    path: PathLike | None = None,
    num_train: int = 10_000,
    num_test: int = 1_000,
    split_seed: int = 0,
    test_fraction: float = 0.2,
    seed: int = 0,
    download: bool = False,
    **kwargs,
) -> tuple[MovingMNIST, MovingMNIST]:
    """Train and test :class:`MovingMNIST` data sets built from disjoint digit pools.

    The test set uses seed ``seed + 1`` so that it never repeats a train trajectory; ``kwargs`` go to
    :class:`MovingMNIST` (``frame_size``, ``num_frames``, ``num_digits``, ...).
    """
    pools = load_digit_pools(path, split_seed, test_fraction, download)
    train = MovingMNIST(pools["train"][0], num_train, seed=seed, digit_indices=pools["train"][1], **kwargs)
    test = MovingMNIST(pools["test"][0], num_test, seed=seed + 1, digit_indices=pools["test"][1], **kwargs)
    return train, test


def dequantize(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Uniform dequantization of 8-bit values: ``(x + u) / 256`` with ``u ~ U(0, 1)``, giving ``(0, 1)``.

    A density ``p`` on the dequantized values bounds the discrete likelihood:
    ``log P(x) >= E_u[log p((x + u) / 256)] - D log 256`` (see :func:`nats_per_dim`).
    """
    if x.dtype != torch.uint8:
        raise TypeError(f"dequantize expects uint8 values 0..255, got {x.dtype}")
    noise = torch.rand(x.shape, generator=generator, dtype=torch.float32)
    return (x.to(torch.float32) + noise) / 256.0


def nats_per_dim(nll_per_sequence: torch.Tensor | float, dims_per_sequence: int, scale: float = 256.0) -> torch.Tensor:
    """Convert a negative log-likelihood in nats per sequence to nats per dimension of the 8-bit data.

    With a density over values ``(x + u) / scale`` (see :func:`dequantize`), the change of variables to the
    0..255 grid adds ``log(scale)`` per dimension:

    .. math:: \\text{nats/dim} = (\\text{NLL} + D \\log(\\text{scale})) / D.

    Pass ``scale=1`` when the density was already over the 0..255 values.
    """
    if dims_per_sequence < 1:
        raise ValueError(f"dims_per_sequence must be positive, got {dims_per_sequence}")
    nll = torch.as_tensor(nll_per_sequence, dtype=torch.float64)
    return (nll + dims_per_sequence * math.log(scale)) / dims_per_sequence
