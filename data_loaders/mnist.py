"""The MNIST test set (10,000 digits, LeCun et al.) read from its gzipped IDX files.

IDX format (big-endian): a 4-byte magic ``0x00 0x00 <type> <ndim>`` (type ``0x08`` = unsigned byte), then
``ndim`` 4-byte dimension sizes, then ``prod(dims)`` values in C order. Images are ``idx3`` with dims
``(N, 28, 28)``, labels ``idx1`` with dims ``(N,)``.

The digits feed static-model examples (:func:`mnist_tensor_dataset`) and Moving MNIST; split them into
disjoint train/test pools first (:func:`split_digits`).
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch.utils.data import TensorDataset

from data_loaders.files import PathLike, find_data_file

MNIST_URL = "https://ossci-datasets.s3.amazonaws.com/mnist/{filename}"
IMAGES_FILE = "t10k-images-idx3-ubyte.gz"
LABELS_FILE = "t10k-labels-idx1-ubyte.gz"
MNIST_SHA256 = {
    IMAGES_FILE: "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
    LABELS_FILE: "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
}
NUM_TEST_DIGITS = 10_000
_UBYTE = 0x08


def parse_idx(data: bytes, ndim: int, where: str = "IDX data") -> np.ndarray:
    """Decode uncompressed IDX bytes holding unsigned bytes in ``ndim`` dimensions.

    :raises ValueError: naming ``where`` for a wrong magic number, type, rank, or a size that does not
        match the header.
    """
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{where}: {len(data)} bytes, shorter than an IDX header of {header} bytes")
    if data[0:2] != b"\x00\x00" or data[2] != _UBYTE or data[3] != ndim:
        raise ValueError(
            f"{where}: bad IDX magic number 0x{data[:4].hex()}, expected 0x0000{_UBYTE:02x}{ndim:02x} "
            f"(unsigned bytes, {ndim} dimensions)"
        )
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    expected = header + int(np.prod(dims))
    if len(data) != expected:
        raise ValueError(
            f"{where}: header gives dimensions {dims} ({expected} bytes in all) but the file has "
            f"{len(data)} bytes; it is truncated or corrupt"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def read_idx_gz(path: PathLike, ndim: int) -> np.ndarray:
    """Decompress and decode a gzipped IDX file (see :func:`parse_idx`)."""
    try:
        data = gzip.decompress(Path(path).read_bytes())
    except (OSError, EOFError, zlib.error) as err:
        raise ValueError(f"{path}: not a readable gzip file ({err})") from err
    return parse_idx(data, ndim, str(path))


def load_mnist_test(path: Optional[PathLike] = None, download: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The 10,000 MNIST test digits: uint8 images ``(10000, 28, 28)`` and int64 labels ``(10000,)``.

    Files are found and SHA-256 checked by :func:`data_loaders.files.find_data_file` (``subdir="mnist"``).
    """
    files = {
        name: find_data_file(name, digest, MNIST_URL.format(filename=name), path, download=download, subdir="mnist")
        for name, digest in MNIST_SHA256.items()
    }
    images = read_idx_gz(files[IMAGES_FILE], 3)
    labels = read_idx_gz(files[LABELS_FILE], 1)
    if images.shape[1:] != (28, 28) or images.shape[0] != labels.shape[0]:
        raise ValueError(f"MNIST images {images.shape} and labels {labels.shape} do not match")
    if labels.max() > 9:
        raise ValueError(f"MNIST labels should be digits 0..9, found {int(labels.max())}")
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


def split_digits(
    seed: int = 0, test_fraction: float = 0.2, num_digits: int = NUM_TEST_DIGITS
) -> tuple[torch.Tensor, torch.Tensor]:
    """Disjoint, sorted train and test index pools over ``range(num_digits)`` from a seeded permutation.

    The test pool has ``round(test_fraction * num_digits)`` indices; the same seed gives the same pools.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    perm = torch.randperm(num_digits, generator=torch.Generator().manual_seed(seed))
    num_test = int(round(test_fraction * num_digits))
    return perm[num_test:].sort().values, perm[:num_test].sort().values


def mnist_tensor_dataset(
    images: torch.Tensor,
    labels: torch.Tensor,
    indices: Optional[torch.Tensor] = None,
    binarize: str = "sample",
    seed: int = 0,
    flatten: bool = True,
) -> TensorDataset:
    """A ``TensorDataset`` of float digits in [0, 1] (and labels) for a static VAE.

    :param binarize: ``"sample"``: each pixel ``~ Bernoulli(intensity / 255)``, drawn once with ``seed``
        (static binarisation); ``"threshold"``: ``intensity > 127``; ``"none"``: ``intensity / 255``.
    :param flatten: items of shape ``(784,)`` instead of ``(28, 28)``.
    """
    if indices is not None:
        images, labels = images[indices], labels[indices]
    x = images.to(torch.float32) / 255.0
    if binarize == "sample":
        x = torch.bernoulli(x, generator=torch.Generator().manual_seed(seed))
    elif binarize == "threshold":
        x = (images > 127).to(torch.float32)
    elif binarize != "none":
        raise ValueError(f"binarize must be 'sample', 'threshold' or 'none', got {binarize!r}")
    if flatten:
        x = x.reshape(x.shape[0], -1)
    return TensorDataset(x, labels)
