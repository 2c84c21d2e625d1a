"""Data sets for pyro-avf: polyphonic music, MNIST digits and TIMIT speech, with checksums and safe parsing.

Importing this package reads nothing from disk and downloads nothing; each loader finds its files when called.
"""

from data_loaders.files import ChecksumError, default_data_dir, find_data_file
from data_loaders.mnist import load_mnist_test, mnist_tensor_dataset, split_digits
from data_loaders.polyphonic import (
    POLYPHONIC_DATASETS,
    RandomCropDataset,
    SequenceDataset,
    UnsafePickleError,
    collate_sequences,
    load_polyphonic,
)
from data_loaders.timit import TimitStats, load_timit

__all__ = [
    "POLYPHONIC_DATASETS",
    "ChecksumError",
    "RandomCropDataset",
    "SequenceDataset",
    "TimitStats",
    "UnsafePickleError",
    "collate_sequences",
    "default_data_dir",
    "find_data_file",
    "load_mnist_test",
    "load_polyphonic",
    "load_timit",
    "mnist_tensor_dataset",
    "split_digits",
]
