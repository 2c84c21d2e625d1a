"""Video data loaders: Moving MNIST from the real MNIST digits, KTH and BAIR from small files written here
in the layout a user downloads."""

import hashlib
import math
import os
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from data_loaders import bair, kth
from data_loaders.moving_mnist import (
    MovingMNIST,
    dequantize,
    load_digit_pools,
    moving_mnist_splits,
    nats_per_dim,
)

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
MNIST = DATA / "mnist"


# ---------------------------------------------------------------- Moving MNIST


@pytest.fixture(scope="module")
def pools():
    if not (MNIST / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"MNIST test digits not found in {MNIST}")
    return load_digit_pools(MNIST, split_seed=0, test_fraction=0.2)


def test_digit_pools_are_disjoint(pools):
    train_images, train_idx = pools["train"]
    test_images, test_idx = pools["test"]
    assert len(train_idx) == 8000 and len(test_idx) == 2000
    assert not set(train_idx.tolist()) & set(test_idx.tolist())
    digest = lambda im: hashlib.sha1(im.tobytes()).hexdigest()  # noqa: E731
    assert not {digest(im) for im in train_images} & {digest(im) for im in test_images}


def test_train_and_test_sequences_use_only_their_own_digits(pools):
    train, test = moving_mnist_splits(MNIST, num_train=40, num_test=40, frame_size=32, num_frames=3)
    used_train = {int(i) for k in range(len(train)) for i in train.sequence_digits(k)}
    used_test = {int(i) for k in range(len(test)) for i in test.sequence_digits(k)}
    assert used_train <= set(pools["train"][1].tolist())
    assert used_test <= set(pools["test"][1].tolist())
    assert not used_train & used_test
    # a digit image seen in a test frame never appears in the training pool
    seen = {hashlib.sha1(test.digits[i].tobytes()).hexdigest() for i in range(len(test.digits))}
    assert not seen & {hashlib.sha1(im.tobytes()).hexdigest() for im in train.digits}


def test_deterministic_for_a_seed_and_different_for_another(pools):
    images = pools["train"][0]
    a = MovingMNIST(images, 10, num_frames=8, seed=3)
    b = MovingMNIST(images, 10, num_frames=8, seed=3)
    c = MovingMNIST(images, 10, num_frames=8, seed=4)
    later_first = b[7]  # generating in another order gives the same sequences
    torch.testing.assert_close(a[7], later_first)
    torch.testing.assert_close(a[2], b[2])
    assert not torch.equal(a[2], c[2])
    assert not torch.equal(a[2], a[3])


@pytest.mark.parametrize("frame_size,digit_size", [(64, 28), (32, 14)])
def test_shapes_and_value_range(pools, frame_size, digit_size):
    ds = MovingMNIST(pools["train"][0], 5, num_frames=10, frame_size=frame_size, num_digits=2)
    assert ds.digit_size == digit_size and ds.digits.shape[1:] == (digit_size, digit_size)
    x = ds[0]
    assert x.shape == (10, 1, frame_size, frame_size) and x.dtype == torch.float32
    assert x.min() >= 0.0 and x.max() <= 1.0 and x.max() > 0.9
    raw = MovingMNIST(pools["train"][0], 5, num_frames=10, frame_size=frame_size, as_uint8=True)[0]
    assert raw.dtype == torch.uint8
    torch.testing.assert_close(raw.float() / 255.0, x)
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=5)))
    assert batch.shape == (5, 10, 1, frame_size, frame_size)


def test_bouncing_keeps_digits_inside_the_frame(pools):
    ds = MovingMNIST(pools["test"][0], 20, num_frames=60, frame_size=32, num_digits=1, speed_range=(4.0, 6.0))
    limit = ds.frame_size - ds.digit_size
    bounces = 0
    for k in range(len(ds)):
        frames, chosen, corners = ds.generate(k)
        assert corners.min() >= 0 and corners.max() <= limit
        # the whole digit is drawn in every frame: no ink is lost at a wall
        mass = frames.reshape(60, -1).sum(1, dtype=np.int64)
        assert (mass == int(ds.digits[chosen[0]].sum(dtype=np.int64))).all()
        steps = np.diff(corners[:, 0], axis=0)  # (59, 2) moves of row and column
        bounces += int((np.sign(steps[1:]) * np.sign(steps[:-1]) < 0).sum())
    assert bounces > 20  # digits do reach the walls and turn back


def test_bad_configuration_is_refused(pools):
    with pytest.raises(ValueError, match="num_digits"):
        MovingMNIST(pools["train"][0], 2, num_digits=3)
    with pytest.raises(ValueError, match="no room"):
        MovingMNIST(pools["train"][0], 2, frame_size=30, digit_size=28)
    with pytest.raises(ValueError, match="uint8"):
        MovingMNIST(pools["train"][0].astype(np.float32), 2)
    with pytest.raises(IndexError, match="out of range"):
        MovingMNIST(pools["train"][0], 2).generate(2)


def test_dequantize_and_nats_per_dim():
    x = torch.arange(256, dtype=torch.uint8).repeat(40)
    d = dequantize(x, torch.Generator().manual_seed(0))
    assert d.min() > 0.0 and d.max() < 1.0
    assert torch.equal(torch.floor(d * 256).to(torch.uint8), x)  # noise stays inside each bin
    assert abs((d * 256 - x.float()).mean().item() - 0.5) < 0.02
    with pytest.raises(TypeError, match="uint8"):
        dequantize(x.float())
    # the uniform density on [0, 1] has NLL 0 per sequence: log 256 nats per 8-bit dimension
    torch.testing.assert_close(nats_per_dim(0.0, 20 * 64 * 64), torch.tensor(math.log(256), dtype=torch.float64))
    torch.testing.assert_close(nats_per_dim(300.0, 100, scale=1.0), torch.tensor(3.0, dtype=torch.float64))


# ---------------------------------------------------------------- KTH


def _write_avi(path: Path, levels: list[int]) -> None:
    """A 160x120 video whose centre 120x120 square has grey level ``levels[t]`` in frame t and whose
    20-pixel side bands are white (cut away by the centre crop)."""
    import imageio.v2 as iio

    writer = iio.get_writer(path, format="FFMPEG", fps=25, codec="png", pixelformat="rgb24", macro_block_size=1)
    for level in levels:
        frame = np.full((120, 160, 3), 255, np.uint8)
        frame[:, 20:140] = level
        writer.append_data(frame)
    writer.close()


@pytest.fixture(scope="module")
def kth_root(tmp_path_factory):
    pytest.importorskip("imageio_ffmpeg")
    root = tmp_path_factory.mktemp("kth")
    for action in ("boxing", "walking"):
        (root / action).mkdir()
        for person, length in ((11, 45), (19, 25), (22, 45), (2, 15)):
            levels = [10 + 4 * t + (person % 5) for t in range(length)]
            _write_avi(root / action / f"person{person:02d}_{action}_d1_uncomp.avi", levels)
    return root


def test_kth_split_by_person(kth_root):
    persons = {s: {v.person for v in kth.list_videos(kth_root, s)} for s in kth.SPLITS}
    assert persons == {"train": {11}, "valid": {19}, "test": {2, 22}}
    assert set(kth.SPLITS["train"]).isdisjoint(kth.SPLITS["test"])
    assert sorted(sum(map(list, kth.SPLITS.values()), [])) == list(range(1, 26))


def test_kth_clips_shapes_and_grey_values(kth_root, tmp_path):
    train = kth.KTHDataset(kth_root, "train", clip_length=20)
    assert len(train) == 2 * 2  # two 45-frame videos, two non-overlapping 20-frame clips each
    x = train[1]
    assert x.shape == (20, 1, 64, 64) and x.dtype == torch.float32
    video, start = train.clip_info(1)
    assert (video.action, video.person, start) == ("boxing", 11, 20)
    expected = torch.tensor([10 + 4 * t + 1 for t in range(20, 40)], dtype=torch.float32) / 255
    # the centre crop removes the white bands; the frame is the uniform grey level of its time step
    torch.testing.assert_close(x.amax((1, 2, 3)), expected, atol=1.5 / 255, rtol=0)
    torch.testing.assert_close(x.amin((1, 2, 3)), expected, atol=1.5 / 255, rtol=0)
    test = kth.KTHDataset(kth_root, "test", clip_length=20, stride=5, cache_dir=tmp_path)
    # person 22: 45 frames -> (45 - 20) // 5 + 1 = 6 clips per action; person 02 (15 frames): none
    assert len(test) == 12 and {test.clip_info(i)[0].person for i in range(len(test))} == {22}
    assert len(list(tmp_path.glob("*.npy"))) == 4
    cached = kth.KTHDataset(kth_root, "test", clip_length=20, stride=5, cache_dir=tmp_path)
    torch.testing.assert_close(cached[7], test[7])
    squashed = kth.KTHDataset(kth_root, "valid", clip_length=20, center_crop=False)
    assert squashed[0][:, :, :, 0].min() > 0.95  # without the crop the white band is at the edge


def test_kth_refuses_bad_layouts(kth_root, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="split"):
        kth.list_videos(kth_root, "validation")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        kth.list_videos(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="no KTH videos"):
        kth.list_videos(tmp_path)
    (tmp_path / "boxing").mkdir()
    (tmp_path / "boxing" / "person03_walking_d1_uncomp.avi").write_bytes(b"")
    with pytest.raises(ValueError, match="not a KTH file name"):
        kth.list_videos(tmp_path)
    broken = tmp_path / "broken.avi"
    broken.write_bytes(b"RIFF not really a video")
    with pytest.raises(ValueError, match="cannot decode"):
        kth.read_video(broken)
    monkeypatch.setitem(sys.modules, "imageio.v2", None)  # as if imageio were not installed
    with pytest.raises(ImportError, match="pip install imageio imageio-ffmpeg"):
        kth.read_video(broken)


# ---------------------------------------------------------------- BAIR


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _example(features: dict) -> bytes:
    """Serialise a tf.train.Example: bytes lists, packed float lists and packed int64 lists."""
    entries = b""
    for key, value in features.items():
        if isinstance(value, bytes):
            feature = _field(1, _field(1, value))
        elif value.dtype == np.float32:
            feature = _field(2, _field(1, value.astype("<f4").tobytes()))
        else:
            feature = _field(3, _field(1, b"".join(_varint(int(v) % (1 << 64)) for v in value)))
        entries += _field(1, _field(1, key.encode()) + _field(2, feature))
    return _field(1, entries)


def _masked(data: bytes) -> int:
    crc = bair.crc32c(data)
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


def _write_tfrecord(path: Path, records: list) -> None:
    with path.open("wb") as f:
        for data in records:
            length = struct.pack("<Q", len(data))
            f.write(length + struct.pack("<I", _masked(length)) + data + struct.pack("<I", _masked(data)))


def _trajectory(rng: np.random.Generator, num_frames: int) -> tuple[bytes, np.ndarray]:
    frames = rng.integers(0, 256, size=(num_frames, 64, 64, 3), dtype=np.uint8)
    features = {}
    for i in range(num_frames):
        features[f"{i}/image_aux1/encoded"] = frames[i].tobytes()
        features[f"{i}/image_main/encoded"] = frames[i, ::-1].tobytes()
        features[f"{i}/action"] = rng.normal(size=4).astype(np.float32)
        features[f"{i}/endeffector_pos"] = np.array([i, -i, 1 << 40], dtype=np.int64)
    return _example(features), frames


@pytest.fixture()
def bair_root(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "softmotion30_44k" / "train"
    folder.mkdir(parents=True)
    frames = []
    for first in (2, 0):  # written out of order: the loader orders files by their first trajectory
        records = [_trajectory(rng, 6) for _ in range(2)]
        _write_tfrecord(folder / f"traj_{first}_to_{first + 1}.tfrecords", [r for r, _ in records])
        frames = [f for _, f in records] + frames
    (tmp_path / "softmotion30_44k" / "test").mkdir()
    return tmp_path, frames


def test_crc32c_known_values():
    # RFC 3720 (iSCSI) test vectors and the usual check value
    assert bair.crc32c(b"123456789") == 0xE3069283
    assert bair.crc32c(bytes(32)) == 0x8A9136AA
    assert bair.crc32c(b"\xff" * 32) == 0x62A8AB43
    assert bair.crc32c(bytes(range(32))) == 0x46DD794E

    def bitwise(data):
        crc = 0xFFFFFFFF
        for byte in data:
            crc ^= byte
            for _ in range(8):
                crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
        return crc ^ 0xFFFFFFFF

    rng = np.random.default_rng(1)
    for n in (0, 3, 511, 512, 1000, 70_001):  # both the short loop and the row-parallel path
        data = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        assert bair.crc32c(data) == bitwise(data)


def test_bair_reads_frames_and_features(bair_root):
    root, frames = bair_root
    ds = bair.BAIRDataset(root, "train", num_frames=6)
    assert [p.name for p in ds.files] == ["traj_0_to_1.tfrecords", "traj_2_to_3.tfrecords"]
    assert len(ds) == 4
    for i in range(4):
        np.testing.assert_array_equal(ds.frames(i), frames[i])
    x = ds[3]
    assert x.shape == (6, 3, 64, 64) and x.dtype == torch.float32 and 0.0 <= x.min() and x.max() <= 1.0
    torch.testing.assert_close(x, torch.from_numpy(frames[3]).permute(0, 3, 1, 2).float() / 255)
    records = list(bair.iter_tfrecord(ds.files[0]))
    example = bair.parse_example(records[0])
    assert len(example) == 6 * 4
    assert example["5/action"].dtype == np.float32 and example["5/action"].shape == (4,)
    np.testing.assert_array_equal(example["5/endeffector_pos"], [5, -5, 1 << 40])
    main = bair.decode_frames(example, 6, camera="image_main")
    np.testing.assert_array_equal(main, frames[0][:, ::-1])
    assert bair.BAIRDataset(root / "softmotion30_44k", num_frames=2)[0].shape == (2, 3, 64, 64)
    with pytest.raises(bair.TFRecordError, match="6/image_aux1/encoded"):
        bair.BAIRDataset(root, num_frames=8)[0]
    with pytest.raises(FileNotFoundError, match="no traj"):
        bair.BAIRDataset(root, "test")


def test_bair_refuses_corrupt_files(bair_root):
    root, _ = bair_root
    path = root / "softmotion30_44k" / "train" / "traj_0_to_1.tfrecords"
    good = path.read_bytes()
    corrupt = bytearray(good)
    corrupt[5000] ^= 0x01  # one bit inside the first record's data
    path.write_bytes(bytes(corrupt))
    ds = bair.BAIRDataset(root)  # the length headers are intact, so the file indexes
    with pytest.raises(bair.TFRecordError, match="data CRC mismatch"):
        ds[0]
    assert bair.BAIRDataset(root, verify=False, num_frames=6)[0].shape == (6, 3, 64, 64)
    path.write_bytes(good[: len(good) - 100])
    with pytest.raises(bair.TFRecordError, match="truncated"):
        bair.BAIRDataset(root)
    bad_length = bytearray(good)
    bad_length[0] ^= 0x01
    path.write_bytes(bytes(bad_length))
    with pytest.raises(bair.TFRecordError, match="length CRC mismatch"):
        list(bair.iter_tfrecord(path))
    with pytest.raises(bair.TFRecordError, match="beyond the end"):
        bair.parse_example(_field(1, b"\x0a\xff\x01abc"))


def test_kth_cache_is_written_atomically_and_a_truncated_one_rebuilt(kth_root, tmp_path, monkeypatch, caplog):
    cache = tmp_path / "cache"
    first = kth.KTHDataset(kth_root, "valid", clip_length=20, cache_dir=cache)
    files = sorted(cache.glob("*.npy"))
    assert len(files) == 2 and not list(cache.glob("*.tmp"))
    whole = files[0].read_bytes()
    files[0].write_bytes(whole[: len(whole) // 2])  # what a kill while caching used to leave
    with caplog.at_level("WARNING", logger="data_loaders.kth"):
        again = kth.KTHDataset(kth_root, "valid", clip_length=20, cache_dir=cache)
    assert str(files[0]) in caplog.text and "decoding" in caplog.text
    torch.testing.assert_close(again[0], first[0])
    assert files[0].read_bytes() == whole  # rebuilt, whole

    files[0].unlink()

    def killed(src, dst):
        raise KeyboardInterrupt  # as if the process were stopped between writing and renaming

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        kth.KTHDataset(kth_root, "valid", clip_length=20, cache_dir=cache)
    assert sorted(p.name for p in cache.iterdir()) == [files[1].name]  # no half file, no temporary file


def test_bair_non_utf8_feature_key_is_an_error_naming_the_file(bair_root):
    root, _ = bair_root
    path = root / "softmotion30_44k" / "train" / "traj_0_to_1.tfrecords"
    feature = _field(1, _field(1, b"\x00" * 10))
    _write_tfrecord(path, [_field(1, _field(1, _field(1, b"0/image_aux1/\xff\xfe") + _field(2, feature)))])
    with pytest.raises(bair.TFRecordError, match=r"traj_0_to_1\.tfrecords, record 0: feature key .* is not UTF-8"):
        bair.BAIRDataset(root)[0]
