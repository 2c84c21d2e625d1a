"""BAIR robot pushing (Ebert et al., 2017) read from the TFRecord files a user downloads, without
TensorFlow.

Layout: ``<root>/softmotion30_44k/{train,test}/traj_<a>_to_<b>.tfrecords``. A TFRecord file is a run of
records, each framed as

    uint64 length (little-endian) | uint32 masked_crc32c(length bytes) | data | uint32 masked_crc32c(data)

with ``masked_crc32c(b) = ((c >> 15) | (c << 17)) + 0xa282ead8 (mod 2^32)``, ``c`` the CRC-32C
(Castagnoli) of ``b``. Each record is a ``tf.train.Example`` protobuf; one trajectory holds 30 frames,
frame ``i`` of camera ``image_aux1`` under the key ``"<i>/image_aux1/encoded"`` as 64 * 64 * 3 raw uint8
bytes (RGB, row-major). The protobuf subset decoded here::

    Example  { Features features = 1; }
    Features { map<string, Feature> feature = 1; }       // entries {string key = 1; Feature value = 2;}
    Feature  { oneof { BytesList bytes_list = 1; FloatList float_list = 2; Int64List int64_list = 3; } }
    BytesList { repeated bytes value = 1; }   FloatList { repeated float value = 1; }
    Int64List { repeated int64 value = 1; }
"""

from __future__ import annotations

import re
import struct
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from torch.utils.data import Dataset

from data_loaders.files import PathLike

__all__ = [
    "BAIRDataset",
    "TFRecordError",
    "bair_files",
    "crc32c",
    "decode_frames",
    "index_tfrecord",
    "iter_tfrecord",
    "masked_crc32c",
    "parse_example",
    "read_record",
]

IMAGE_SHAPE = (64, 64, 3)


class TFRecordError(ValueError):
    """A TFRecord file or an Example in it is truncated or corrupt."""


# ---------------------------------------------------------------- CRC-32C


def _crc_table() -> np.ndarray:
    """Byte table of the reflected CRC-32C polynomial 0x82f63b78."""
    table = np.arange(256, dtype=np.uint32)
    for _ in range(8):
        table = np.where(table & 1, (table >> 1) ^ np.uint32(0x82F63B78), table >> 1).astype(np.uint32)
    return table


_TABLE = _crc_table()
_TABLE_LIST = _TABLE.tolist()


@lru_cache(maxsize=4)
def _zeros_operator(length: int) -> tuple[list[int], ...]:
    """Four byte tables of the linear map ``state -> raw CRC state after length zero bytes``."""
    basis = (np.arange(256, dtype=np.uint32)[None, :] << (8 * np.arange(4, dtype=np.uint32))[:, None]).ravel()
    state = basis
    for _ in range(length):
        state = _TABLE[state & 0xFF] ^ (state >> 8)
    return tuple(row.tolist() for row in state.reshape(4, 256))


def crc32c(data: bytes | bytearray | memoryview) -> int:
    """CRC-32C (Castagnoli) of ``data``; ``crc32c(b"123456789") == 0xe3069283``.

    Long inputs are cut into equal rows whose (zero-initialised, linear) CRCs are computed column by
    column with numpy, then chained: ``raw(A + B) = zeros_op_{|B|}(raw(A)) ^ raw(B)``. The initial state
    ``0xffffffff`` is folded in by inverting the first four bytes, which is equivalent for a reflected CRC.
    """
    buf = np.frombuffer(data, dtype=np.uint8)
    if len(buf) < 512:
        crc = 0xFFFFFFFF
        for byte in buf.tolist():
            crc = _TABLE_LIST[(crc ^ byte) & 0xFF] ^ (crc >> 8)
        return crc ^ 0xFFFFFFFF
    width = 1024 if len(buf) >= 1 << 16 else 64
    buf = buf.copy()
    buf[:4] ^= 0xFF
    columns = np.concatenate([np.zeros((-len(buf)) % width, np.uint8), buf]).reshape(-1, width).T.copy()
    rows = np.zeros(columns.shape[1], dtype=np.uint32)
    for column in columns:
        rows = _TABLE[(rows ^ column) & 0xFF] ^ (rows >> 8)
    t0, t1, t2, t3 = _zeros_operator(width)
    crc = 0
    for row in rows.tolist():
        crc = t0[crc & 0xFF] ^ t1[(crc >> 8) & 0xFF] ^ t2[(crc >> 16) & 0xFF] ^ t3[crc >> 24] ^ row
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes | bytearray | memoryview) -> int:
    """TFRecord's masked CRC: ``((c >> 15) | (c << 17)) + 0xa282ead8`` mod 2^32, ``c = crc32c(data)``."""
    crc = crc32c(data)
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


# ---------------------------------------------------------------- TFRecord framing


def index_tfrecord(path: PathLike) -> list[tuple[int, int]]:
    """``(data offset, data length)`` of every record, from the length headers alone (CRC-checked).

    :raises TFRecordError: naming the file and byte offset of a bad length CRC or a truncated record.
    """
    path = Path(path)
    size = path.stat().st_size
    records = []
    with path.open("rb") as f:
        offset = 0
        while offset < size:
            header = f.read(12)
            if len(header) < 12:
                raise TFRecordError(f"{path}: truncated record header at byte {offset}")
            (length,) = struct.unpack("<Q", header[:8])
            (length_crc,) = struct.unpack("<I", header[8:])
            if masked_crc32c(header[:8]) != length_crc:
                raise TFRecordError(f"{path}: length CRC mismatch at byte {offset} (not a TFRecord file?)")
            end = offset + 12 + length + 4
            if end > size:
                raise TFRecordError(
                    f"{path}: record at byte {offset} claims {length} bytes but the file ends at {size} (truncated)"
                )
            records.append((offset + 12, length))
            f.seek(end)
            offset = end
    return records


def read_record(f: BinaryIO, offset: int, length: int, verify: bool = True, where: str = "TFRecord") -> bytes:
    """Read one record's data from an open binary file, checking its masked CRC-32C when ``verify``."""
    f.seek(offset)
    data = f.read(length + 4)
    if len(data) != length + 4:
        raise TFRecordError(f"{where}: record at byte {offset - 12} is truncated")
    payload, (crc,) = data[:length], struct.unpack("<I", data[length:])
    if verify and masked_crc32c(payload) != crc:
        raise TFRecordError(f"{where}: data CRC mismatch in the record at byte {offset - 12} (corrupt file)")
    return payload


def iter_tfrecord(path: PathLike, verify: bool = True) -> Iterator[bytes]:
    """Every record's data in a TFRecord file, in order (see :func:`index_tfrecord`, :func:`read_record`)."""
    records = index_tfrecord(path)
    with Path(path).open("rb") as f:
        for offset, length in records:
            yield read_record(f, offset, length, verify, str(path))


# ---------------------------------------------------------------- protobuf subset


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise TFRecordError("truncated varint in protobuf")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift >= 70:
            raise TFRecordError("varint longer than 10 bytes in protobuf")


def _fields(buf: memoryview) -> Iterator[tuple[int, int, int | memoryview]]:
    """``(field number, wire type, value)`` of a message: an int for wire types 0/1/5, bytes for 2."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1 or wire == 5:
            width = 8 if wire == 1 else 4
            if pos + width > len(buf):
                raise TFRecordError("truncated fixed-width field in protobuf")
            value = int.from_bytes(buf[pos : pos + width], "little")
            pos += width
        elif wire == 2:
            length, pos = _varint(buf, pos)
            if pos + length > len(buf):
                raise TFRecordError(f"field {number} claims {length} bytes beyond the end of its message")
            value = buf[pos : pos + length]
            pos += length
        else:
            raise TFRecordError(f"unsupported protobuf wire type {wire} (field {number})")
        yield number, wire, value


def _feature(buf: memoryview) -> list[bytes] | np.ndarray:
    """Decode a ``Feature``: a list of bytes, a float32 array or an int64 array."""
    for number, wire, value in _fields(buf):
        if wire != 2:
            continue
        if number == 1:
            return [bytes(v) for n, w, v in _fields(value) if n == 1 and w == 2]
        if number == 2:
            floats = []
            for n, w, v in _fields(value):
                if n == 1 and w == 2:
                    if len(v) % 4:
                        raise TFRecordError("packed float list length is not a multiple of 4")
                    floats.extend(np.frombuffer(v, dtype="<f4").tolist())
                elif n == 1 and w == 5:
                    floats.append(struct.unpack("<f", v.to_bytes(4, "little"))[0])
            return np.array(floats, dtype=np.float32)
        if number == 3:
            ints = []
            for n, w, v in _fields(value):
                if n == 1 and w == 2:
                    pos = 0
                    while pos < len(v):
                        item, pos = _varint(v, pos)
                        ints.append(item)
                elif n == 1 and w == 0:
                    ints.append(v)
            return np.array([i - (1 << 64) if i >= 1 << 63 else i for i in ints], dtype=np.int64)
    return []


def parse_example(data: bytes) -> dict[str, list[bytes] | np.ndarray]:
    """Decode a serialised ``tf.train.Example`` into ``{key: list of bytes | float32 array | int64 array}``."""
    features: dict[str, list[bytes] | np.ndarray] = {}
    for number, wire, value in _fields(memoryview(data)):
        if number != 1 or wire != 2:
            continue
        for n, w, entry in _fields(value):
            if n != 1 or w != 2:
                continue
            key, feature = None, memoryview(b"")
            for en, ew, ev in _fields(entry):
                if en == 1 and ew == 2:
                    try:
                        key = bytes(ev).decode("utf-8")
                    except UnicodeDecodeError:
                        raise TFRecordError(f"feature key {bytes(ev)[:40]!r} is not UTF-8 (corrupt Example)") from None
                elif en == 2 and ew == 2:
                    feature = ev
            if key is None:
                raise TFRecordError("feature map entry without a key")
            features[key] = _feature(feature)
    return features


def decode_frames(
    features: dict[str, list[bytes] | np.ndarray], num_frames: int = 30, camera: str = "image_aux1"
) -> np.ndarray:
    """Frames ``0..num_frames-1`` of ``camera`` as uint8 ``(num_frames, 64, 64, 3)``.

    :raises TFRecordError: naming the missing key or a frame that is not 64 * 64 * 3 bytes.
    """
    frames = np.empty((num_frames, *IMAGE_SHAPE), dtype=np.uint8)
    size = int(np.prod(IMAGE_SHAPE))
    for i in range(num_frames):
        key = f"{i}/{camera}/encoded"
        value = features.get(key)
        if not isinstance(value, list) or len(value) != 1:
            raise TFRecordError(f"Example has no single bytes feature {key!r}")
        if len(value[0]) != size:
            raise TFRecordError(f"{key!r} holds {len(value[0])} bytes, expected {size} (64x64x3 raw uint8)")
        frames[i] = np.frombuffer(value[0], dtype=np.uint8).reshape(IMAGE_SHAPE)
    return frames


# ---------------------------------------------------------------- data set

_TRAJ = re.compile(r"^traj_(\d+)_to_(\d+)\.tfrecords$")


def bair_files(root: PathLike, split: str = "train") -> list[Path]:
    """The ``traj_<a>_to_<b>.tfrecords`` files of a split, ordered by ``a``.

    ``root`` is the folder holding ``softmotion30_44k`` or that folder itself.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = Path(root).expanduser()
    folder = root / split if root.name == "softmotion30_44k" else root / "softmotion30_44k" / split
    if not folder.is_dir():
        raise FileNotFoundError(f"BAIR folder {folder} does not exist (expected <root>/softmotion30_44k/{split})")
    files = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _TRAJ.match(p.name))]
    if not files:
        raise FileNotFoundError(f"no traj_*_to_*.tfrecords files in {folder}")
    return [p for _, p in sorted(files)]


class BAIRDataset(Dataset):
    """BAIR trajectories of one split: item ``i`` is float32 ``(num_frames, 3, 64, 64)`` in [0, 1].

    The files are indexed when the data set is built (length headers only); each item reads and, with
    ``verify``, CRC-checks its record when asked for.
    """

    def __init__(
        self,
        root: PathLike,
        split: str = "train",
        num_frames: int = 30,
        camera: str = "image_aux1",
        verify: bool = True,
    ) -> None:
        if num_frames < 1:
            raise ValueError(f"num_frames must be positive, got {num_frames}")
        self.files = bair_files(root, split)
        self.num_frames = int(num_frames)
        self.camera = camera
        self.verify = verify
        self.records = [(path, offset, length) for path in self.files for offset, length in index_tfrecord(path)]

    def __len__(self) -> int:
        return len(self.records)

    def frames(self, index: int) -> np.ndarray:
        """uint8 frames ``(num_frames, 64, 64, 3)`` of trajectory ``index``."""
        path, offset, length = self.records[index]
        with path.open("rb") as f:
            data = read_record(f, offset, length, self.verify, str(path))
        try:
            return decode_frames(parse_example(data), self.num_frames, self.camera)
        except TFRecordError as err:
            raise TFRecordError(f"{path}, record {index}: {err}") from err

    def __getitem__(self, index: int) -> torch.Tensor:
        frames = torch.from_numpy(self.frames(index)).permute(0, 3, 1, 2)
        return frames.to(torch.float32) / 255.0
