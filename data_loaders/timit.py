"""TIMIT speech read from a user's copy of the corpus (licensed by the LDC; not downloadable).

Layout (names case-insensitive)::

    <root>/TRAIN|TEST/<dialect DR1..DR8>/<speaker>/<utterance>.WAV

Each ``.WAV`` is either NIST SPHERE (the LDC original: a 1024-byte ASCII header starting ``NIST_1A``, then
16-bit PCM) or RIFF WAV (converted copies); a speaker folder holding both ``SA1.WAV`` and ``SA1.WAV.wav``
counts the utterance once. Audio must be mono 16 kHz 16-bit PCM; shorten-compressed SPHERE files are refused
(decompress them with ``sph2pipe`` or ``sox`` first).

Framing follows the AVF paper (after Chung et al., 2015): a step is 200 consecutive samples
(``x_t = s[200 t : 200 (t + 1)]``); training sequences are non-overlapping 0.5 s clips (40 steps, 8,000
samples) cut from each training utterance, the remainder dropped; test sequences are whole utterances
(trailing samples short of a full step dropped), batched with padding and a mask. Samples are normalised
as ``(s - mean) / std`` with the mean and standard deviation of all samples in the training clips
(:class:`TimitStats`), computed once on the training split and reused unchanged for the test split.
"""

from __future__ import annotations

import json
import re
import struct
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Union

import numpy as np
import scipy.io.wavfile
import torch
from torch.utils.data import Dataset

from data_loaders.files import PathLike
from data_loaders.polyphonic import SequenceDataset

SAMPLE_RATE = 16_000
STEP_SAMPLES = 200
CLIP_STEPS = 40
SPLITS = ("train", "test")
_DIALECT = re.compile(r"^dr\d$", re.IGNORECASE)
_COMPRESSED = ("shorten", "shortpack", "wavpack")

HeaderValue = Union[int, float, str]


# ---------------------------------------------------------------------------------------------------------
# Reading audio


def parse_sphere_header(data: bytes, where: str = "SPHERE file") -> tuple[dict[str, HeaderValue], int]:
    """Parse a NIST SPHERE header; return its fields and its size in bytes.

    Format: ``"NIST_1A\\n"``, the header size as a decimal line (``"   1024\\n"``), then lines
    ``name -i <int>`` / ``name -r <real>`` / ``name -s<N> <N characters>`` up to ``end_head``.

    :raises ValueError: naming ``where`` and the problem, for any malformed header.
    """
    if not data.startswith(b"NIST_1A"):
        raise ValueError(f"{where}: not a NIST SPHERE file (no NIST_1A magic)")
    lines = data[:2048].split(b"\n")
    try:
        size = int(lines[1].strip())
    except (IndexError, ValueError):
        raise ValueError(f"{where}: corrupt SPHERE header: bad header-size line") from None
    if size < 16 or size > len(data):
        raise ValueError(f"{where}: corrupt SPHERE header: header size {size} for a {len(data)}-byte file")
    try:
        text = data[:size].decode("ascii")
    except UnicodeDecodeError:
        raise ValueError(f"{where}: corrupt SPHERE header: non-ASCII bytes") from None
    fields: dict[str, HeaderValue] = {}
    for line in text.split("\n")[2:]:
        line = line.rstrip("\r")
        if line.strip() == "end_head":
            return fields, size
        if not line.strip() or line.startswith(";"):
            continue
        parts = line.split(" ", 2)
        if len(parts) != 3 or not parts[1].startswith("-"):
            raise ValueError(f"{where}: corrupt SPHERE header line {line!r}")
        name, kind, value = parts
        try:
            if kind == "-i":
                fields[name] = int(value)
            elif kind == "-r":
                fields[name] = float(value)
            elif kind.startswith("-s"):
                fields[name] = value[: int(kind[2:])]
            else:
                raise ValueError(kind)
        except ValueError:
            raise ValueError(f"{where}: corrupt SPHERE header line {line!r}") from None
    raise ValueError(f"{where}: corrupt SPHERE header: no end_head within {size} bytes")


def read_sphere(path: PathLike) -> tuple[np.ndarray, int]:
    """Samples (int16, mono) and sample rate of an uncompressed 16-bit PCM NIST SPHERE file.

    ``sample_byte_format`` ``"01"`` is little-endian, ``"10"`` big-endian.
    """
    data = Path(path).read_bytes()
    fields, size = parse_sphere_header(data, str(path))
    coding = str(fields.get("sample_coding", "pcm")).lower()
    byte_format = str(fields.get("sample_byte_format", "")).lower()
    if any(c in coding or c in byte_format for c in _COMPRESSED):
        raise ValueError(
            f"{path}: SPHERE audio is compressed ({coding}, {byte_format}); decompress it first, "
            "e.g. `sph2pipe -f wav in.WAV out.wav` or `sox in.WAV out.wav`"
        )
    for key in ("sample_count", "sample_rate", "sample_n_bytes"):
        if not isinstance(fields.get(key), int):
            raise ValueError(f"{path}: corrupt SPHERE header: integer field {key} missing")
    if coding != "pcm":
        raise ValueError(f"{path}: SPHERE sample_coding {coding!r} is not supported (only 16-bit pcm)")
    if fields["sample_n_bytes"] != 2:
        raise ValueError(f"{path}: SPHERE sample_n_bytes is {fields['sample_n_bytes']}, expected 2 (16-bit)")
    if fields.get("channel_count", 1) != 1:
        raise ValueError(f"{path}: SPHERE channel_count is {fields['channel_count']}, expected 1 (mono)")
    if byte_format not in ("01", "10"):
        raise ValueError(f"{path}: SPHERE sample_byte_format {byte_format!r}, expected '01' or '10'")
    count = int(fields["sample_count"])
    if len(data) - size < 2 * count:
        raise ValueError(
            f"{path}: SPHERE header announces {count} samples but only {(len(data) - size) // 2} follow; "
            "the file is truncated"
        )
    dtype = "<i2" if byte_format == "01" else ">i2"
    samples = np.frombuffer(data, dtype=dtype, count=count, offset=size).astype(np.int16)
    return samples, int(fields["sample_rate"])


def read_wav(path: PathLike) -> tuple[np.ndarray, int]:
    """Samples (int16, mono) and sample rate of a 16-bit PCM RIFF WAV file (``scipy.io.wavfile``).

    :raises ValueError: naming the file, when it is unreadable or shorter than its header says (scipy only
        warns, without the file's name, and returns the samples that are there).
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", scipy.io.wavfile.WavFileWarning)
        try:
            rate, samples = scipy.io.wavfile.read(path)
        except (ValueError, EOFError, struct.error) as err:
            raise ValueError(f"{path}: unreadable WAV file ({err})") from err
    for warning in caught:
        if "EOF" in str(warning.message):
            raise ValueError(f"{path}: truncated WAV file ({warning.message})")
        warnings.warn(f"{path}: {warning.message}", warning.category, stacklevel=2)
    if samples.dtype != np.int16 or samples.ndim != 1:
        raise ValueError(f"{path}: WAV holds {samples.dtype} audio of shape {samples.shape}; expected mono int16")
    return samples, int(rate)


def read_audio(path: PathLike, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Samples of a SPHERE or RIFF WAV file (told apart by their first bytes), checked to be at ``sample_rate``."""
    with open(path, "rb") as f:
        magic = f.read(7)
    if magic == b"NIST_1A":
        samples, rate = read_sphere(path)
    elif magic[:4] == b"RIFF":
        samples, rate = read_wav(path)
    else:
        raise ValueError(f"{path}: neither NIST SPHERE (NIST_1A) nor RIFF WAV; first bytes {magic!r}")
    if rate != sample_rate:
        raise ValueError(f"{path}: sample rate {rate} Hz, expected {sample_rate} Hz")
    return samples


# ---------------------------------------------------------------------------------------------------------
# Corpus layout


def _child(folder: Path, name: str) -> Optional[Path]:
    for entry in sorted(folder.iterdir()):
        if entry.is_dir() and entry.name.lower() == name.lower():
            return entry
    return None


def list_utterances(root: PathLike, split: str) -> list[Path]:
    """The utterance files of one split, sorted by dialect, speaker and utterance, one per utterance.

    :raises FileNotFoundError: when ``root`` or its ``TRAIN``/``TEST`` folder is missing, or holds no ``.WAV``.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown TIMIT split {split!r}; expected one of {SPLITS}")
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"TIMIT root folder {root} does not exist")
    split_dir = _child(root, split)
    if split_dir is None:
        raise FileNotFoundError(f"TIMIT root {root} has no {split.upper()} folder")
    found: dict[tuple[str, str, str], Path] = {}
    for dialect in sorted(d for d in split_dir.iterdir() if d.is_dir() and _DIALECT.match(d.name)):
        for speaker in sorted(s for s in dialect.iterdir() if s.is_dir()):
            for file in sorted(speaker.iterdir()):
                if file.is_file() and file.suffix.lower() == ".wav":
                    key = (dialect.name.upper(), speaker.name.upper(), file.name.split(".")[0].upper())
                    found.setdefault(key, file)
    if not found:
        raise FileNotFoundError(f"no <DR?>/<speaker>/*.WAV utterances under {split_dir}")
    return [found[k] for k in sorted(found)]


# ---------------------------------------------------------------------------------------------------------
# Framing and normalisation


def frame_signal(samples: np.ndarray, step_samples: int = STEP_SAMPLES) -> np.ndarray:
    """``(T, step_samples)`` frames ``x_t = s[t * step : (t + 1) * step]``, ``T = len(s) // step``."""
    steps = len(samples) // step_samples
    return samples[: steps * step_samples].reshape(steps, step_samples)


def cut_clips(samples: np.ndarray, clip_steps: int = CLIP_STEPS, step_samples: int = STEP_SAMPLES) -> np.ndarray:
    """Non-overlapping clips ``(len(s) // (clip_steps * step), clip_steps, step_samples)``; remainder dropped."""
    clip = clip_steps * step_samples
    count = len(samples) // clip
    return samples[: count * clip].reshape(count, clip_steps, step_samples)


@dataclass(frozen=True)
class TimitStats:
    """Training-set sample mean and (population) standard deviation, in raw 16-bit units."""

    mean: float
    std: float

    @classmethod
    def from_samples(cls, samples: np.ndarray) -> TimitStats:
        """``mean = sum(s) / n``, ``std = sqrt(sum(s^2) / n - mean^2)``, from exact int64 sums."""
        flat = np.asarray(samples).ravel()
        if flat.size == 0:
            raise ValueError("no training samples to compute normalisation statistics from")
        n, total, squares = flat.size, 0, 0
        for start in range(0, n, 1 << 22):  # chunks keep the int64 copy small
            chunk = flat[start : start + (1 << 22)].astype(np.int64)
            total += int(chunk.sum())
            squares += int((chunk * chunk).sum())
        mean = total / n
        std = float(np.sqrt(max(squares / n - mean * mean, 0.0)))
        if std == 0.0:
            raise ValueError("training audio is constant (standard deviation 0); cannot normalise")
        return cls(mean, std)

    def normalize(self, samples: Union[np.ndarray, torch.Tensor]) -> torch.Tensor:
        """``(s - mean) / std`` as a float32 tensor."""
        x = torch.as_tensor(np.asarray(samples), dtype=torch.float64)
        return ((x - self.mean) / self.std).to(torch.float32)

    def save(self, path: PathLike) -> None:
        """Write the statistics as JSON."""
        Path(path).write_text(json.dumps(asdict(self)))

    @classmethod
    def load(cls, path: PathLike) -> TimitStats:
        """Read statistics written by :meth:`save`."""
        fields = json.loads(Path(path).read_text())
        return cls(float(fields["mean"]), float(fields["std"]))


def timit_train_clips(root: PathLike, clip_steps: int = CLIP_STEPS, step_samples: int = STEP_SAMPLES) -> np.ndarray:
    """All raw int16 training clips ``(N, clip_steps, step_samples)`` of the corpus at ``root``."""
    clips = [cut_clips(read_audio(f), clip_steps, step_samples) for f in list_utterances(root, "train")]
    return np.concatenate(clips, axis=0)


def timit_test_utterances(root: PathLike, step_samples: int = STEP_SAMPLES) -> list[np.ndarray]:
    """All raw int16 test utterances, framed ``(T_i, step_samples)``."""
    return [frame_signal(read_audio(f), step_samples) for f in list_utterances(root, "test")]


class TimitClipDataset(Dataset):
    """Training clips, normalised on access: item ``i`` is ``(x (40, 200) float32, mask (40,) all True)``."""

    def __init__(self, clips: np.ndarray, stats: TimitStats) -> None:
        self.clips = torch.from_numpy(np.ascontiguousarray(clips))
        self.stats = stats

    def __len__(self) -> int:
        return self.clips.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.stats.normalize(self.clips[index])
        return x, torch.ones(x.shape[0], dtype=torch.bool)


def load_timit(
    root: PathLike,
    split: str,
    stats: Optional[TimitStats] = None,
    clip_steps: int = CLIP_STEPS,
    step_samples: int = STEP_SAMPLES,
) -> tuple[Dataset, TimitStats]:
    """A TIMIT split as a dataset of ``(x, mask)`` items, and the training statistics it is normalised with.

    ``"train"``: :class:`TimitClipDataset` of 0.5 s clips; ``stats`` default to those of these clips.
    ``"test"``: whole utterances (:class:`~data_loaders.polyphonic.SequenceDataset`; batch them with
    :func:`~data_loaders.polyphonic.collate_sequences`); ``stats`` should be the training statistics
    (pass those returned for ``"train"``, or :meth:`TimitStats.load` them); when omitted they are computed
    from the training split at ``root``, never from the test data.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown TIMIT split {split!r}; expected one of {SPLITS}")
    if split == "train":
        clips = timit_train_clips(root, clip_steps, step_samples)
        stats = stats or TimitStats.from_samples(clips)
        return TimitClipDataset(clips, stats), stats
    if stats is None:
        stats = TimitStats.from_samples(timit_train_clips(root, clip_steps, step_samples))
    utterances = [stats.normalize(u) for u in timit_test_utterances(root, step_samples)]
    return SequenceDataset(utterances), stats
