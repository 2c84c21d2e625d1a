"""Polyphonic music as binary piano rolls (Boulanger-Lewandowski et al., ICML 2012).

A song is a float tensor of shape ``(T, 88)``: ``x[t, k] = 1`` when MIDI note ``21 + k`` sounds at step ``t``
(the 88 piano keys, notes 21..108).

Two sources:

* ``jsb_chorales.pickle``: the quarter-note JSB Chorales the AVF paper used, a dict with ``'train'`` (229
  songs), ``'valid'`` (76) and ``'test'`` (77); a song is a list of steps, a step a tuple of MIDI note numbers
  stored as numpy int64 scalars. It is read with :class:`RestrictedUnpickler`, which admits only the two
  numpy globals the file uses (``numpy.core.multiarray.scalar`` and ``numpy.dtype``, found with
  ``pickletools``) and only for integer dtypes.
* ``<name>.npz`` (SRNN preprocessing of Fraccaro et al., NIPS 2016) for ``jsb_chorales`` (at twice the
  time resolution), ``nottingham``, ``piano_midi`` and ``muse_data``: ``x_train``/``x_valid`` are
  ``(N, 100, 88)`` pieces of songs, used as given; ``x_test``/``mask_test`` hold whole padded test songs.

Training uses random crops of songs (:class:`RandomCropDataset`, 25 steps in the AVF paper), evaluation
whole songs (:class:`SequenceDataset`); :func:`collate_sequences` pads a batch to ``(B, T, D)`` with a
``(B, T)`` bool mask.
"""

from __future__ import annotations

import io
import pickle
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import Dataset

from data_loaders.files import PathLike, find_data_file

MIN_NOTE = 21
MAX_NOTE = 108
NUM_KEYS = MAX_NOTE - MIN_NOTE + 1  # 88
SPLITS = ("train", "valid", "test")

JSB_PICKLE_FILE = "jsb_chorales.pickle"
JSB_PICKLE_SHA256 = "69dc4c3e52800959ac0ab3b82aa3e5f55285ce64f1705acb3e3a8ef77a5c051c"
JSB_PICKLE_URL = "https://raw.githubusercontent.com/pyro-ppl/datasets/master/polyphonic/jsb_chorales.pickle"

NPZ_SHA256 = {
    "jsb_chorales": "a30de36f8ca1c9525287af0c414a6ff1a4ebbb4df284173140f07ad355b33f24",
    "nottingham": "5c0ec4a70089667d1406456c2efbb94c59bb9745df4659588a185170b051b323",
    "piano_midi": "8122fc1aa7302780ede23abf22dd4567d4bbffc790172b3f4259228fe764c7de",
    "muse_data": "9c4c9baaf4da38ae308d2cbcf7fe3dbaa0ce05f902ba645f59f8ccca19945c26",
}
NPZ_URL = "https://raw.githubusercontent.com/marcofraccaro/srnn/master/data/{name}_raw_batchsize16_seqlen100.npz"
NPZ_KEYS = ("x_train", "u_train", "x_valid", "u_valid", "x_test", "u_test", "mask_test")


@dataclass(frozen=True)
class PolyphonicInfo:
    """Registry entry: a data set's name, the sources it has, and the source to compare with the paper."""

    name: str
    sources: tuple[str, ...]
    default_source: str


POLYPHONIC_DATASETS: dict[str, PolyphonicInfo] = {
    "jsb_chorales": PolyphonicInfo("jsb_chorales", ("pickle", "npz"), "pickle"),
    "nottingham": PolyphonicInfo("nottingham", ("npz",), "npz"),
    "piano_midi": PolyphonicInfo("piano_midi", ("npz",), "npz"),
    "muse_data": PolyphonicInfo("muse_data", ("npz",), "npz"),
}


# ---------------------------------------------------------------------------------------------------------
# Safe reading of the JSB pickle


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle asked for a global (class or function) outside the allowed set, or misused an allowed one."""


_INT_DTYPES = frozenset({"i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8"})


def _safe_dtype(spec: object, align: object = False, copy: object = False) -> np.dtype:
    """Stand-in for ``numpy.dtype(spec, align, copy)`` admitting only integer type codes like ``'i8'``."""
    if not isinstance(spec, str) or spec not in _INT_DTYPES:
        raise UnsafePickleError(f"pickle asks for numpy.dtype({spec!r}); only integer dtypes are allowed")
    # a copy, never numpy's shared descriptor: the pickle's BUILD opcode calls __setstate__ on the result
    return np.dtype(spec, copy=True)


def _safe_scalar(dtype: object, data: object) -> int:
    """Stand-in for ``numpy.core.multiarray.scalar(dtype, data)``: one integer from its raw bytes.

    Python 2 pickles carry ``data`` as a str, decoded here as latin-1 (byte-for-byte).
    """
    if not isinstance(dtype, np.dtype) or dtype.kind not in "iu":
        raise UnsafePickleError(f"pickle asks for a numpy scalar of dtype {dtype!r}; only integers are allowed")
    if isinstance(data, str):
        data = data.encode("latin-1")
    if not isinstance(data, bytes) or len(data) != dtype.itemsize:
        raise UnsafePickleError(f"bad numpy scalar payload {data!r} for dtype {dtype}")
    return int(np.frombuffer(data, dtype=dtype)[0])


_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "scalar"): _safe_scalar,
    ("numpy._core.multiarray", "scalar"): _safe_scalar,
    ("numpy", "dtype"): _safe_dtype,
}


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the numpy scalar/dtype constructors a pickle of integer lists needs.

    Any other global (``os.system``, ``builtins.eval``, ...) raises :class:`UnsafePickleError` at the
    opcode that names it, before any call is made. Plain containers (dict, list, tuple, str, int) need no
    global and load as usual.
    """

    def find_class(self, module: str, name: str) -> object:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"pickle refers to the global {module}.{name}, which is not allowed "
                f"(allowed: {', '.join(sorted(f'{m}.{n}' for m, n in _ALLOWED_GLOBALS))})"
            ) from None

    def persistent_load(self, pid: object) -> object:
        raise UnsafePickleError(f"pickle uses a persistent id {pid!r}, which is not allowed")


def restricted_loads(data: bytes) -> object:
    """Unpickle ``data`` with :class:`RestrictedUnpickler` (Python 2 strings decoded as latin-1)."""
    return RestrictedUnpickler(io.BytesIO(data), encoding="latin-1").load()


def notes_to_pianoroll(song: Sequence[Sequence[int]], where: str = "song") -> torch.Tensor:
    """A song as a list of steps of MIDI notes -> binary ``(T, 88)`` tensor, ``x[t, n - 21] = 1``.

    :raises ValueError: naming ``where``, the step and the note, for a note outside 21..108.
    """
    roll = np.zeros((len(song), NUM_KEYS), dtype=np.float32)
    for t, step in enumerate(song):
        for note in step:
            if not MIN_NOTE <= int(note) <= MAX_NOTE:
                raise ValueError(f"{where}, step {t}: MIDI note {note} is outside the piano range 21..108")
            roll[t, int(note) - MIN_NOTE] = 1.0
    return torch.from_numpy(roll)


def parse_jsb_pickle(data: bytes) -> dict[str, list[torch.Tensor]]:
    """Parse the bytes of ``jsb_chorales.pickle`` into ``{split: [song (T, 88), ...]}`` safely."""
    raw = restricted_loads(data)
    if not isinstance(raw, dict) or set(raw) != set(SPLITS):
        found = sorted(raw) if isinstance(raw, dict) else type(raw).__name__
        raise ValueError(f"JSB pickle should be a dict with keys {list(SPLITS)}, found {found}")
    out: dict[str, list[torch.Tensor]] = {}
    for split in SPLITS:
        songs = raw[split]
        if not isinstance(songs, list) or not all(isinstance(s, (list, tuple)) for s in songs):
            raise ValueError(f"JSB pickle split {split!r} should be a list of songs (lists of steps)")
        out[split] = [notes_to_pianoroll(song, f"JSB {split} song {i}") for i, song in enumerate(songs)]
    return out


def load_jsb_pickle(path: Optional[PathLike] = None, download: bool = False) -> dict[str, list[torch.Tensor]]:
    """Find, verify and parse the quarter-note JSB Chorales pickle (229/76/77 songs)."""
    file = find_data_file(
        JSB_PICKLE_FILE, JSB_PICKLE_SHA256, JSB_PICKLE_URL, path, download=download, subdir="polyphonic"
    )
    return parse_jsb_pickle(file.read_bytes())


# ---------------------------------------------------------------------------------------------------------
# The SRNN .npz files


def check_npz_arrays(arrays: dict[str, np.ndarray], where: str = "npz") -> None:
    """Check the keys and shapes of an SRNN music file; raise ``ValueError`` naming the problem.

    Expected: ``x_*``/``u_*`` float arrays ``(N, T, 88)`` with ``u`` shaped like ``x``; ``x_train`` and
    ``x_valid`` of length 100; ``mask_test`` ``(N, T)`` of 0/1 marking a prefix of each song.
    """
    missing = [k for k in NPZ_KEYS if k not in arrays]
    if missing:
        raise ValueError(f"{where}: missing arrays {missing} (found {sorted(arrays)})")
    for split in SPLITS:
        x, u = arrays[f"x_{split}"], arrays[f"u_{split}"]
        if x.ndim != 3 or x.shape[-1] != NUM_KEYS:
            raise ValueError(f"{where}: x_{split} should have shape (N, T, {NUM_KEYS}), found {x.shape}")
        if u.shape != x.shape:
            raise ValueError(f"{where}: u_{split} has shape {u.shape}, x_{split} has {x.shape}")
        if split != "test" and x.shape[1] != 100:
            raise ValueError(f"{where}: x_{split} should hold 100-step pieces, found {x.shape}")
    mask = arrays["mask_test"]
    if mask.shape != arrays["x_test"].shape[:2]:
        raise ValueError(f"{where}: mask_test has shape {mask.shape}, x_test has {arrays['x_test'].shape}")
    lengths = mask.sum(1).astype(np.int64)
    prefix = np.arange(mask.shape[1]) < lengths[:, None]
    if not np.array_equal(mask != 0, prefix):
        raise ValueError(f"{where}: mask_test is not a 0/1 mask over a prefix of each test song")


def load_npz(name: str, path: Optional[PathLike] = None, download: bool = False) -> dict[str, np.ndarray]:
    """Find, verify and read ``<name>.npz`` (``allow_pickle=False``); return its checked arrays."""
    if name not in NPZ_SHA256:
        raise KeyError(f"unknown polyphonic data set {name!r}; known: {sorted(NPZ_SHA256)}")
    url = NPZ_URL.format(name=name)
    file = find_data_file(
        f"{name}.npz",
        NPZ_SHA256[name],
        url,
        path,
        download=download,
        subdir="polyphonic",
        aliases=[url.rsplit("/", 1)[1]],
    )
    with np.load(file, allow_pickle=False) as f:
        arrays = {k: f[k] for k in f.files}
    check_npz_arrays(arrays, str(file))
    return arrays


def npz_songs(arrays: dict[str, np.ndarray], split: str) -> list[torch.Tensor]:
    """Songs of one split of an SRNN file: the 100-step pieces for train/valid, whole songs for test."""
    x = torch.from_numpy(np.ascontiguousarray(arrays[f"x_{split}"], dtype=np.float32))
    if split != "test":
        return list(x.unbind(0))
    lengths = arrays["mask_test"].sum(1).astype(np.int64)
    return [x[i, : int(n)] for i, n in enumerate(lengths)]


# ---------------------------------------------------------------------------------------------------------
# Entry point


def load_polyphonic(
    name: str,
    split: str,
    source: Optional[str] = None,
    path: Optional[PathLike] = None,
    download: bool = False,
) -> list[torch.Tensor]:
    """Songs of one split of a polyphonic data set, each a binary float tensor ``(T, 88)``.

    :param name: one of :data:`POLYPHONIC_DATASETS` (``jsb_chorales``, ``nottingham``, ``piano_midi``,
        ``muse_data``).
    :param split: ``"train"``, ``"valid"`` or ``"test"``.
    :param source: ``"pickle"`` (JSB only, quarter notes, whole songs) or ``"npz"`` (SRNN files;
        train/valid are 100-step pieces). Default: the source the AVF paper's numbers refer to
        (the pickle for JSB, the npz otherwise).
    :param path: a file or folder to look in first (see :func:`data_loaders.files.find_data_file`).
    :param download: allow fetching the public copy into the cache folder.
    """
    if name not in POLYPHONIC_DATASETS:
        raise KeyError(f"unknown polyphonic data set {name!r}; known: {sorted(POLYPHONIC_DATASETS)}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    info = POLYPHONIC_DATASETS[name]
    source = source or info.default_source
    if source not in info.sources:
        raise ValueError(f"data set {name!r} has no {source!r} source; available: {info.sources}")
    if source == "pickle":
        return load_jsb_pickle(path, download)[split]
    return npz_songs(load_npz(name, path, download), split)


# ---------------------------------------------------------------------------------------------------------
# Datasets and batching (generic over the feature size, shared with the speech loader)


class SequenceDataset(Dataset):
    """Whole sequences: item ``i`` is ``(x_i (T_i, D), mask_i (T_i,) all True)``."""

    def __init__(self, sequences: Sequence[torch.Tensor]) -> None:
        self.sequences = list(sequences)

    def __len__(self) -> int:
        return len(self.sequences)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.sequences[index]
        return x, torch.ones(x.shape[0], dtype=torch.bool)


class RandomCropDataset(Dataset):
    """Random crops of ``length`` steps: item ``i`` is a window of sequence ``i`` and its mask.

    The start is uniform on ``0 .. T_i - length``. A sequence shorter than ``length`` is returned whole,
    padded with zeros to ``length``, with ``mask = False`` on the padding. Crops are drawn from
    ``generator`` (or a new one seeded with ``seed``), so a seed and an access order fix them. With
    ``DataLoader(num_workers > 0)`` pass neither: the global torch RNG, which the loader seeds per worker
    from ``torch.manual_seed``, is used instead.
    """

    def __init__(
        self,
        sequences: Sequence[torch.Tensor],
        length: int = 25,
        generator: Optional[torch.Generator] = None,
        seed: Optional[int] = None,
    ) -> None:
        if length < 1:
            raise ValueError(f"crop length must be positive, got {length}")
        if generator is not None and seed is not None:
            raise ValueError("pass either generator or seed, not both")
        self.sequences = list(sequences)
        self.length = length
        self.generator = generator if seed is None else torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return len(self.sequences)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.sequences[index]
        steps = x.shape[0]
        if steps >= self.length:
            start = int(torch.randint(steps - self.length + 1, (), generator=self.generator))
            return x[start : start + self.length], torch.ones(self.length, dtype=torch.bool)
        crop = x.new_zeros((self.length,) + tuple(x.shape[1:]))
        crop[:steps] = x
        mask = torch.arange(self.length) < steps
        return crop, mask


def collate_sequences(
    batch: Sequence[tuple[torch.Tensor, torch.Tensor]],
) -> tuple[torch.Tensor, torch.Tensor]:
    """``[(x_i (T_i, D), mask_i (T_i,)), ...]`` -> zero-padded ``x (B, T_max, D)`` and bool ``mask (B, T_max)``."""
    xs, masks = zip(*batch)
    x = pad_sequence(list(xs), batch_first=True)
    mask = pad_sequence([m.bool() for m in masks], batch_first=True, padding_value=False)
    return x, mask
