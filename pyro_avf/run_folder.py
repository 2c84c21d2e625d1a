"""The output folder of a run: its identity, an exclusive lock, atomic writes and the clean-up of stale files.

A run folder belongs to one configuration (the settings that change its results), stored in ``config.json``.
:meth:`RunFolder.open` takes an exclusive lock on ``<folder>/.lock`` for the life of the run (``fcntl.flock``:
the operating system drops it when the process ends, however it ends), removes the temporary files a killed
writer left behind, and then refuses to touch the outputs of an earlier run unless told to resume it (with
the same configuration) or to replace it. Every output goes through :func:`atomic_write`: a temporary file
in the same folder, flushed and ``fsync``-ed, then renamed over the old file, so a reader (or a resumed run)
sees the old file or the new one, never a torn one.

>>> import tempfile
>>> folder = Path(tempfile.mkdtemp()) / "run"
>>> with RunFolder.open(folder, {"lr": 0.1}, outputs=["results.csv"]) as run:
...     with atomic_write(run.path / "results.csv", "w") as f:
...         _ = f.write("epoch,loss\\n1,0.5\\n")
>>> RunFolder.open(folder, {"lr": 0.1}, outputs=["results.csv"])
Traceback (most recent call last):
...
pyro_avf.run_folder.RunFolderError: ... already holds a run (results.csv); pass --resume to continue it, ...
>>> RunFolder.open(folder, {"lr": 0.2}, resume=True, outputs=["results.csv"])
Traceback (most recent call last):
...
pyro_avf.run_folder.RunFolderError: --resume: ... was run with --lr 0.1 (now 0.2); ...
>>> config_digest({"lr": 0.1}) == config_digest({"lr": 0.1}) != config_digest({"lr": 0.2})
True
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import IO, Any, Dict, Iterator, Optional, Sequence, Union

__all__ = ["CONFIG", "LOCK", "RunFolder", "RunFolderError", "atomic_write", "config_digest", "remove_stale_files"]

PathLike = Union[str, "os.PathLike[str]"]
CONFIG = "config.json"
LOCK = ".lock"
TMP_SUFFIX = ".tmp"  # temporary files are ".<name>.<random>.tmp" next to their target


class RunFolderError(RuntimeError):
    """A run folder that cannot be used as asked (held by another run, or holding another run)."""


@contextlib.contextmanager
def atomic_write(path: PathLike, mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a temporary file next to ``path`` for writing; on success flush, ``fsync`` and rename it to ``path``.

    If the block raises, the temporary file is removed and ``path`` keeps its old content. If the process is
    killed, a ``.<name>.<random>.tmp`` file may stay behind (see :func:`remove_stale_files`), but ``path`` is
    never left half written.

    >>> import tempfile
    >>> folder = Path(tempfile.mkdtemp())
    >>> with atomic_write(folder / "a.txt", "w") as f:
    ...     _ = f.write("old")
    >>> try:
    ...     with atomic_write(folder / "a.txt", "w") as f:
    ...         _ = f.write("half of the new")
    ...         raise KeyboardInterrupt
    ... except KeyboardInterrupt:
    ...     pass
    >>> (folder / "a.txt").read_text(), [p.name for p in folder.iterdir()]
    ('old', ['a.txt'])
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    try:
        os.fchmod(fd, 0o644)  # mkstemp's 0o600 would hide results from the other users of a machine
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_folder(path.parent)


def _fsync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_stale_files(folder: PathLike) -> list[Path]:
    """Delete the temporary files (``*.tmp``) that a writer killed mid-write left in ``folder``; return them.

    Only call this while holding the folder's lock: a live writer's temporary file would go too.
    """
    stale = sorted(p for p in Path(folder).glob(f"*{TMP_SUFFIX}") if p.is_file())
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def config_digest(config: Dict[str, Any], length: int = 8) -> str:
    """The first ``length`` hex digits of the SHA-256 of ``config`` as canonical JSON (sorted keys)."""
    text = json.dumps(config, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


class RunFolder:
    """An output folder held by this process (see the module docstring); a context manager that unlocks it."""

    def __init__(self, path: Path, lock_fd: int):
        self.path = path
        self._lock_fd: Optional[int] = lock_fd

    @classmethod
    def open(
        cls,
        path: PathLike,
        config: Dict[str, Any],
        *,
        resume: bool = False,
        overwrite: bool = False,
        outputs: Sequence[str] = (),
    ) -> RunFolder:
        """Create (if needed) and lock ``path`` for a run with ``config``, and store the config in ``config.json``.

        :param config: the settings that change the run's results (JSON values).
        :param resume: continue the run in the folder; its stored configuration must equal ``config``.
        :param overwrite: delete the earlier run's ``outputs`` and start afresh.
        :param outputs: names of the files a run writes; the folder holds a run when any of them exists.
        :raises RunFolderError: when another process holds the lock, when the folder holds a run and neither
            ``resume`` nor ``overwrite`` is given, or when ``resume`` meets another configuration.
        """
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        folder = cls(path, _lock(path / LOCK))
        try:
            remove_stale_files(path)
            found = [name for name in outputs if (path / name).exists()]
            if found and overwrite:
                for name in found:
                    (path / name).unlink()
            elif found and resume:
                folder._check_config(config)
            elif found:
                raise RunFolderError(
                    f"{path} already holds a run ({', '.join(found)}); pass --resume to continue it, --overwrite "
                    "to replace it, or pick another folder with --out-dir"
                )
            with atomic_write(path / CONFIG, "w") as f:
                json.dump(config, f, indent=2, sort_keys=True)
                f.write("\n")
        except BaseException:
            folder.close()
            raise
        return folder

    def stored_config(self) -> Optional[Dict[str, Any]]:
        """The configuration in ``config.json``, or ``None`` when there is none (a folder of an older version)."""
        file = self.path / CONFIG
        if not file.is_file():
            return None
        try:
            return json.loads(file.read_text())
        except ValueError as err:
            raise RunFolderError(f"{file} is not valid JSON ({err}); pass --overwrite to start the run again") from None

    def _check_config(self, config: Dict[str, Any]) -> None:
        stored = self.stored_config()
        if stored is None:
            return
        differ = [k for k in config if k in stored and stored[k] != config[k]]
        if differ:
            settings = ", ".join(f"{_flag(k)} {stored[k]} (now {config[k]})" for k in differ)
            raise RunFolderError(
                f"--resume: {self.path} was run with {settings}; pass the same values to resume it, or --overwrite "
                "to replace it"
            )

    def close(self) -> None:
        """Release the lock (also released by the operating system when the process ends)."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> RunFolder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _lock(file: Path) -> int:
    """Open ``file`` and take an exclusive, non-blocking ``flock`` on it; write this process's id into it."""
    fd = os.open(file, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
        os.close(fd)
        if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise
        by = f" (process {holder})" if holder else ""
        raise RunFolderError(
            f"{file.parent} is in use by another run{by}; wait for it to end or pick another folder with --out-dir"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd
