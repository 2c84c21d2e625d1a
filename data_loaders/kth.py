"""KTH Actions (Schüldt, Laptev & Caputo, ICPR 2004) read from the folder a user downloads.

Layout: ``<root>/<action>/personXX_<action>_dY_uncomp.avi`` for the six actions (boxing, handclapping,
handwaving, jogging, running, walking), persons 01-25 and scenarios d1-d4 (160x120 grey video at 25 fps).
The standard split is by person (:data:`SPLITS`). Frames become grey ``frame_size`` squares (luma
``0.299 R + 0.587 G + 0.114 B``, the centre square cropped, antialiased bilinear resize, rounded to
uint8), and each video is cut into clips of ``clip_length`` consecutive frames.

Decoding needs the optional packages ``imageio`` and ``imageio-ffmpeg`` (whose wheels ship an ffmpeg
binary): ``pip install imageio imageio-ffmpeg``.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from data_loaders.files import PathLike
from pyro_avf.run_folder import atomic_write

__all__ = ["ACTIONS", "SPLITS", "KTHDataset", "KTHVideo", "list_videos", "preprocess_frames", "read_video"]

ACTIONS = ("boxing", "handclapping", "handwaving", "jogging", "running", "walking")
SPLITS = {
    "train": (11, 12, 13, 14, 15, 16, 17, 18),
    "valid": (19, 20, 21, 23, 24, 25, 1, 4),
    "test": (22, 2, 3, 5, 6, 7, 8, 9, 10),
}
log = logging.getLogger(__name__)
_NAME = re.compile(r"^person(\d{2})_([a-z]+)_d([1-4])_uncomp\.avi$")
_INSTALL_HINT = "reading KTH .avi files needs the optional packages imageio and imageio-ffmpeg: " + (
    "pip install imageio imageio-ffmpeg"
)


@dataclass(frozen=True)
class KTHVideo:
    """One KTH file and what its name says: ``person{person:02d}_{action}_d{scenario}_uncomp.avi``."""

    path: Path
    person: int
    action: str
    scenario: int


def list_videos(root: PathLike, split: str | None = None, actions: tuple[str, ...] = ACTIONS) -> list[KTHVideo]:
    """The KTH videos under ``root`` (sorted by action, person, scenario), optionally of one split.

    :raises FileNotFoundError: when ``root`` is missing or holds no video of the requested split.
    :raises ValueError: for an unknown split or action, or an ``.avi`` whose name breaks the pattern.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"KTH folder {root} does not exist")
    if split is not None and split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
    unknown = set(actions) - set(ACTIONS)
    if unknown:
        raise ValueError(f"unknown KTH actions {sorted(unknown)}; the actions are {ACTIONS}")
    persons = set(SPLITS[split]) if split is not None else set(range(1, 26))
    videos = []
    for action in actions:
        for path in sorted((root / action).glob("*.avi")):
            match = _NAME.match(path.name)
            if match is None or match.group(2) != action:
                raise ValueError(f"{path}: not a KTH file name personXX_{action}_dY_uncomp.avi for folder '{action}'")
            person = int(match.group(1))
            if not 1 <= person <= 25:
                raise ValueError(f"{path}: KTH persons are 01-25, got {person:02d}")
            if person in persons:
                videos.append(KTHVideo(path, person, action, int(match.group(3))))
    if not videos:
        raise FileNotFoundError(
            f"no KTH videos for split {split!r} under {root} (expected <root>/<action>/personXX_<action>_dY_uncomp.avi)"
        )
    return sorted(videos, key=lambda v: (v.action, v.person, v.scenario))


def preprocess_frames(frames: np.ndarray, frame_size: int = 64, center_crop: bool = True) -> np.ndarray:
    """RGB or grey uint8 frames ``(N, H, W[, 3])`` to grey uint8 ``(N, frame_size, frame_size)``.

    Grey is the luma ``0.299 R + 0.587 G + 0.114 B``; with ``center_crop`` the centre ``min(H, W)`` square
    is kept (no distortion), otherwise the frame is squashed to a square.
    """
    if frames.ndim == 4 and frames.shape[-1] == 3:
        grey = frames.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    elif frames.ndim == 3:
        grey = frames.astype(np.float32)
    else:
        raise ValueError(f"frames must have shape (N, H, W) or (N, H, W, 3), got {frames.shape}")
    if center_crop:
        h, w = grey.shape[1:]
        side = min(h, w)
        top, left = (h - side) // 2, (w - side) // 2
        grey = grey[:, top : top + side, left : left + side]
    x = torch.from_numpy(np.ascontiguousarray(grey)).unsqueeze(1)
    x = F.interpolate(x, size=(frame_size, frame_size), mode="bilinear", antialias=True, align_corners=False)
    return x.squeeze(1).round().clamp(0, 255).to(torch.uint8).numpy()


def read_video(path: PathLike, frame_size: int = 64, center_crop: bool = True) -> np.ndarray:
    """Decode an AVI file into grey uint8 frames ``(N, frame_size, frame_size)`` (see :func:`preprocess_frames`).

    :raises ImportError: naming ``imageio`` and ``imageio-ffmpeg`` when they are not installed.
    :raises ValueError: when the file cannot be decoded or has no frames.
    """
    try:
        import imageio.v2 as iio
        import imageio_ffmpeg  # noqa: F401  (the FFMPEG plugin needs it)
    except ImportError as err:
        raise ImportError(_INSTALL_HINT) from err
    path = Path(path)
    try:
        with iio.get_reader(path, format="FFMPEG") as reader:
            frames = [np.asarray(frame) for frame in reader]
    except (OSError, RuntimeError, ValueError, IndexError) as err:
        raise ValueError(f"{path}: cannot decode video ({err})") from err
    if not frames:
        raise ValueError(f"{path}: the video has no frames")
    return preprocess_frames(np.stack(frames), frame_size, center_crop)


class KTHDataset(Dataset):
    """Clips of ``clip_length`` grey frames from the KTH videos of one split.

    Item ``i`` is a float32 tensor ``(clip_length, 1, frame_size, frame_size)`` in [0, 1]. Clips start every
    ``stride`` frames (default: ``clip_length``, non-overlapping); a video of ``N`` frames gives
    ``floor((N - clip_length) / stride) + 1`` clips (none when shorter than a clip). All videos of the
    split are decoded once, when the data set is built; with ``cache_dir`` the decoded frames are saved as
    ``.npy`` files and reused (loaded with ``allow_pickle=False``). A cache file is written atomically
    (:func:`pyro_avf.run_folder.atomic_write`); one that cannot be read (e.g. truncated) is decoded and written
    again, with a warning naming it.
    """

    def __init__(
        self,
        root: PathLike,
        split: str = "train",
        clip_length: int = 20,
        stride: int | None = None,
        frame_size: int = 64,
        actions: tuple[str, ...] = ACTIONS,
        center_crop: bool = True,
        cache_dir: PathLike | None = None,
    ) -> None:
        if clip_length < 1:
            raise ValueError(f"clip_length must be positive, got {clip_length}")
        self.clip_length = int(clip_length)
        self.stride = int(stride) if stride is not None else self.clip_length
        if self.stride < 1:
            raise ValueError(f"stride must be positive, got {stride}")
        self.videos = list_videos(root, split, actions)
        self.frames = [self._load(v, frame_size, center_crop, cache_dir) for v in self.videos]
        self.clips = [
            (k, start)
            for k, frames in enumerate(self.frames)
            for start in range(0, len(frames) - self.clip_length + 1, self.stride)
        ]

    @staticmethod
    def _load(video: KTHVideo, frame_size: int, center_crop: bool, cache_dir: PathLike | None) -> np.ndarray:
        if cache_dir is None:
            return read_video(video.path, frame_size, center_crop)
        crop = "crop" if center_crop else "squash"
        cached = Path(cache_dir) / f"{video.path.stem}_{frame_size}_{crop}.npy"
        if cached.is_file():
            try:
                frames = np.load(cached, allow_pickle=False)
            except (ValueError, EOFError, OSError) as err:  # truncated (a kill while caching, before atomic writes)
                log.warning("%s: unreadable cache file (%s); decoding %s again", cached, err, video.path)
            else:
                if frames.dtype == np.uint8 and frames.ndim == 3 and frames.shape[1:] == (frame_size, frame_size):
                    return frames
        frames = read_video(video.path, frame_size, center_crop)
        cached.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(cached) as f:  # a kill while caching leaves the old file or none, never half of one
            np.save(f, frames, allow_pickle=False)
        return frames

    def __len__(self) -> int:
        return len(self.clips)

    def clip_info(self, index: int) -> tuple[KTHVideo, int]:
        """The video a clip comes from and its first frame."""
        k, start = self.clips[index]
        return self.videos[k], start

    def __getitem__(self, index: int) -> torch.Tensor:
        k, start = self.clips[index]
        clip = self.frames[k][start : start + self.clip_length]
        return torch.from_numpy(clip).unsqueeze(1).to(torch.float32) / 255.0
