"""Locating data files and checking them against known SHA-256 digests.

A data file is looked for, in order, in

1. an explicit ``path`` (the file itself, or a folder holding it),
2. the folder named by the environment variable ``PYRO_AVF_DATA``,
3. the user cache folder ``$XDG_CACHE_HOME/pyro_avf`` (default ``~/.cache/pyro_avf``),
4. its public ``url``, downloaded into the cache, only when the caller passes ``download=True``.

In a folder the file may sit directly or in a named sub-folder (``polyphonic/``, ``mnist/``), so that
``PYRO_AVF_DATA`` can point at a copy of the project's ``shared/data`` folder. Every file found (or
downloaded) has its SHA-256 digest compared with the known one; a mismatch raises :class:`ChecksumError`.

Downloads go through `pooch <https://www.fatiando.org/pooch>`_ (``pooch.retrieve``: a temporary file in the
cache folder, its SHA-256 checked before it is renamed into place, a progress bar; http(s), ftp, sftp and DOI
addresses), plus ``file://`` addresses of a local mirror. The lookup in the folders above stays here, since
pooch knows one cache folder only.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import urllib.request
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

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
            f"SHA-256 mismatch for data file {os.fspath(path)}: expected {expected}, got {actual}. "
            "The file is corrupt, truncated or a different version; delete it and fetch it again."
        )


class DataFileNotFoundError(FileNotFoundError):
    """A data file is in none of the places looked in (and was not downloaded).

    Its attributes: ``data_file``, the file's name (not ``filename``, which ``OSError`` would print in place
    of the message); ``places``, the paths looked at; ``url``, its public address or ``None``.
    """

    def __init__(self, filename: str, places: Sequence[Path], url: Optional[str]) -> None:
        self.data_file, self.places, self.url = filename, list(places), url
        hint = (
            f"; pass download=True to fetch it from {url}"
            if url
            else f"; put it in a folder and pass path=, or set {DATA_ENV_VAR}"
        )
        where = ", ".join(str(p) for p in self.places)
        super().__init__(f"data file {filename} not found (looked in: {where}){hint}")


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


def _copy_file_url(url: str, output_file: str, pooch: Any = None, check_only: bool = False) -> None:
    """A pooch downloader for ``file://`` addresses (a local mirror), which pooch itself does not read."""
    with urllib.request.urlopen(url) as source, open(output_file, "wb") as out:
        shutil.copyfileobj(source, out, _CHUNK)


def download_file(url: str, dest: PathLike, sha256: str, progress: bool = True) -> Path:
    """Download ``url`` to ``dest`` with ``pooch.retrieve`` (through a temporary file, with a progress bar) and
    check its SHA-256 before it takes the name ``dest``.

    Nothing is left at ``dest`` when the download fails or the digest differs (:class:`ChecksumError`). A ``dest``
    that already holds the right file is not downloaded again.
    """
    import pooch  # imported here: only downloads need it

    dest, expected = Path(dest), sha256.lower()
    digests: list[str] = []

    def fetch(url: str, output_file: str, pooch_: Any, check_only: bool = False) -> None:
        local = url.startswith("file:")
        inner: Callable[..., Any] = _copy_file_url if local else pooch.downloaders.choose_downloader(url, progress)
        inner(url, output_file, pooch_)
        digests.append(sha256_of(output_file))  # what pooch compares, for the ChecksumError below

    try:
        pooch.retrieve(url, f"sha256:{expected}", fname=dest.name, path=dest.parent, downloader=fetch)
    except ValueError:
        if digests and digests[-1] != expected:
            raise ChecksumError(url, expected, digests[-1]) from None
        raise
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
    :raises DataFileNotFoundError: (a ``FileNotFoundError``) naming every place looked in, when the file is nowhere.
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
    raise DataFileNotFoundError(filename, looked, url)
