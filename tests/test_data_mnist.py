"""MNIST test-set loader on the real IDX files."""

import gzip
import shutil
from pathlib import Path

import pytest
import torch

from data_loaders.files import ChecksumError
from data_loaders.mnist import (
    IMAGES_FILE,
    LABELS_FILE,
    load_mnist_test,
    mnist_tensor_dataset,
    parse_idx,
    read_idx_gz,
    split_digits,
)

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
MNIST = DATA / "mnist"
# digits 0..9 in the MNIST test set (LeCun et al.)
LABEL_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


@pytest.fixture(autouse=True)
def _isolated_lookup(monkeypatch, tmp_path):
    monkeypatch.delenv("PYRO_AVF_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def mnist():
    if not MNIST.is_dir():
        pytest.skip(f"shared data folder {MNIST} not present")
    return load_mnist_test(DATA)


def test_shapes_and_labels(mnist):
    images, labels = mnist
    assert images.shape == (10000, 28, 28) and images.dtype == torch.uint8
    assert labels.shape == (10000,) and labels.dtype == torch.int64
    counts = torch.bincount(labels, minlength=10)
    assert counts.tolist() == LABEL_COUNTS and counts.sum() == 10000
    assert images.max() == 255 and images.min() == 0
    assert images[:, 0, :].max() < 50  # the digits are centred: the top row is (nearly) blank


def test_split_digits_disjoint_and_deterministic():
    train, test = split_digits(seed=0, test_fraction=0.2)
    assert len(train) == 8000 and len(test) == 2000
    assert torch.equal(torch.cat([train, test]).sort().values, torch.arange(10000))
    assert not set(train.tolist()) & set(test.tolist())
    again = split_digits(seed=0, test_fraction=0.2)
    assert torch.equal(train, again[0]) and torch.equal(test, again[1])
    assert not torch.equal(test, split_digits(seed=1, test_fraction=0.2)[1])
    with pytest.raises(ValueError, match="test_fraction"):
        split_digits(0, 1.0)


def test_tensor_dataset(mnist):
    images, labels = mnist
    train, _ = split_digits(0, 0.5)
    sampled = mnist_tensor_dataset(images, labels, train, binarize="sample", seed=0)
    x, y = sampled.tensors
    assert x.shape == (5000, 784) and x.dtype == torch.float32 and torch.equal(y, labels[train])
    assert set(x.unique().tolist()) == {0.0, 1.0}
    # E[Bernoulli(I / 255)] = mean intensity / 255; 3.9M pixels make the sampling error ~2e-4
    intensity = images[train].float().mean() / 255
    assert abs(x.mean() - intensity) < 2e-3
    assert torch.equal(x, mnist_tensor_dataset(images, labels, train, seed=0).tensors[0])
    grey = mnist_tensor_dataset(images, labels, train, binarize="none", flatten=False).tensors[0]
    assert grey.shape == (5000, 28, 28) and torch.allclose(grey.mean(), intensity)
    thresholded = mnist_tensor_dataset(images, labels, binarize="threshold").tensors[0]
    assert torch.equal(thresholded, (images > 127).float().reshape(10000, 784))
    with pytest.raises(ValueError, match="binarize"):
        mnist_tensor_dataset(images, labels, binarize="otsu")


def test_tampered_copy_refused(tmp_path):
    if not MNIST.is_dir():
        pytest.skip(f"shared data folder {MNIST} not present")
    shutil.copy(MNIST / LABELS_FILE, tmp_path / LABELS_FILE)
    data = bytearray((MNIST / IMAGES_FILE).read_bytes())
    data[5000] ^= 0x10
    (tmp_path / IMAGES_FILE).write_bytes(bytes(data))
    with pytest.raises(ChecksumError, match=IMAGES_FILE):
        load_mnist_test(tmp_path)


def test_truncated_and_corrupt_idx(tmp_path):
    if not MNIST.is_dir():
        pytest.skip(f"shared data folder {MNIST} not present")
    raw = gzip.decompress((MNIST / LABELS_FILE).read_bytes())
    assert parse_idx(raw, 1).shape == (10000,)
    with pytest.raises(ValueError, match=r"dimensions \(10000,\).*truncated"):
        parse_idx(raw[:-1], 1)
    with pytest.raises(ValueError, match="bad IDX magic number 0x00000801"):
        parse_idx(raw, 3)  # a label file where images are expected
    with pytest.raises(ValueError, match="shorter than an IDX header"):
        parse_idx(raw[:6], 1)
    cut = tmp_path / "cut.gz"
    cut.write_bytes((MNIST / LABELS_FILE).read_bytes()[:2000])
    with pytest.raises(ValueError, match="not a readable gzip file"):
        read_idx_gz(cut, 1)
