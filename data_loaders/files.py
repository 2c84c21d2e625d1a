"""Locating data files and checking them against known SHA-256 digests.

A data file is looked for, in order, in

1. an explicit ``path`` (the file itself, or a folder holding it),
2. the folder named by the environment variable ``PYRO_AVF_DATA``,
3. the user cache folder ``$XDG_CACHE_HOME/pyro_avf`` (default ``~/.cache/pyro_avf``),
4. its public ``url``, downloaded into the cache, only when the caller passes ``download=True``.

In a folder the file may sit directly or in a named sub-folder (``polyphonic/``, ``mnist/``), so that
``PYRO_AVF_DATA`` can point at a copy of the project's ``shared/data`` folder. Every file found (or
downloaded) has its SHA-256 digest compared with the known one; a mismatch raises :class:`ChecksumError`.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import urllib.request
from pathlib import Path
from typing import Optional, Sequence, Union

from tqdm.auto import tqdm

PathLike = Union[str, "os.PathLike[str]"]

DATA_ENV_VAR = "PYRO_AVF_DATA"
_CHUNK = 1 << 20


class ChecksumError(ValueError):
    """A data file's SHA-256 digest differs from the known one."""

    def __init__(self, path: PathLike, expected: str, actual: str) -> None:
        self.path = Path(path)
        self.expected = expected
        self.actual = actual
        super().__init__(
            f"SHA-256 mismatch for data file {self.path}: expected {expected}, got {actual}. "
            "The file is corrupt, truncated or a different version; delete it and fetch it again."
        )


def sha256_of(path: PathLike) -> str:
    """Hex SHA-256 digest of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_sha256(path: PathLike, sha256: str) -> Path:
    """Return ``path`` if its digest equals ``sha256`` (hex, any case), else raise :class:`ChecksumError`."""
    actual = sha256_of(path)
    if actual != sha256.lower():
        raise ChecksumError(path, sha256.lower(), actual)
    return Path(path)


def repo_root() -> Path:
    """The project's root folder (the parent of the ``data_loaders`` package)."""
    return Path(__file__).resolve().parent.parent


def default_data_dir() -> Optional[Path]:
    """The data folder for tests and examples: ``$PYRO_AVF_DATA`` if set, else ``<repo>/../shared/data``.

    Returns ``None`` when neither folder exists.
    """
    env = os.environ.get(DATA_ENV_VAR)
    if env and Path(env).expanduser().is_dir():
        return Path(env).expanduser()
    shared = repo_root().parent / "shared" / "data"
    return shared if shared.is_dir() else None


def cache_dir() -> Path:
    """The user cache folder ``$XDG_CACHE_HOME/pyro_avf`` (``~/.cache/pyro_avf`` by default); not created."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
    return Path(base).expanduser() / "pyro_avf"


def _candidates(folder: Path, names: Sequence[str], subdir: Optional[str]) -> list[Path]:
    found = [folder / name for name in names]
    if subdir:
        found += [folder / subdir / name for name in names]
    return found


def download_file(url: str, dest: PathLike, sha256: str, progress: bool = True) -> Path:
    """Download ``url`` to ``dest`` through a temporary file, with a progress bar; check the digest first.

    Nothing is left at ``dest`` when the download fails or the digest differs (:class:`ChecksumError`).
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=dest.name + ".", suffix=".part", dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as response:
            total = response.headers.get("Content-Length")
            with tqdm(
                total=int(total) if total else None,
                unit="B",
                unit_scale=True,
                desc=dest.name,
                disable=not progress,
            ) as bar:
                for chunk in iter(lambda: response.read(_CHUNK), b""):
                    out.write(chunk)
                    bar.update(len(chunk))
        actual = sha256_of(tmp)
        if actual != sha256.lower():
            raise ChecksumError(url, sha256.lower(), actual)
        shutil.move(str(tmp), str(dest))
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def find_data_file(
    filename: str,
    sha256: str,
    url: Optional[str] = None,
    path: Optional[PathLike] = None,
    download: bool = False,
    subdir: Optional[str] = None,
    progress: bool = True,
    aliases: Sequence[str] = (),
) -> Path:
    """Find ``filename`` (see the module docstring for the search order) and check its SHA-256.

    :param filename: the file's name, e.g. ``"jsb_chorales.pickle"``.
    :param sha256: its known hex digest.
    :param url: public address to download from when not found locally.
    :param path: a file, or a folder holding the file (directly or in ``subdir``). A ``path`` that does not
        exist is an error; an existing folder without the file falls through to the next places.
    :param download: allow fetching ``url`` into the cache folder.
    :param subdir: sub-folder name the file may sit in inside a data folder (e.g. ``"polyphonic"``).
    :param progress: show a progress bar while downloading.
    :param aliases: other names the same file may have in a user's folder (e.g. its name at the source).
    :raises FileNotFoundError: naming every place looked in, when the file is nowhere.
    :raises ChecksumError: when the first file found has another digest.
    """
    names = [filename, *aliases]
    looked: list[Path] = []
    if path is not None:
        path = Path(path).expanduser()
        if path.is_file():
            return verify_sha256(path, sha256)
        if not path.exists():
            raise FileNotFoundError(f"data path {path} does not exist (looking for {filename})")
        looked += _candidates(path, names, subdir)
    env = os.environ.get(DATA_ENV_VAR)
    if env:
        looked += _candidates(Path(env).expanduser(), names, subdir)
    cached = cache_dir() / (subdir or "") / filename
    looked.append(cached)
    for candidate in looked:
        if candidate.is_file():
            return verify_sha256(candidate, sha256)
    if url is not None and download:
        return download_file(url, cached, sha256, progress=progress)
    places = ", ".join(str(p) for p in looked)
    hint = (
        f"; pass download=True to fetch it from {url}"
        if url
        else f"; put it in a folder and pass path=, or set {DATA_ENV_VAR}"
    )
    raise FileNotFoundError(f"data file {filename} not found (looked in: {places}){hint}")
