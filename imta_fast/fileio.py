"""Atomic file writes: the one place that writes a file so a crash leaves the old one or the new one.

Every writer of the project (checkpoints, the logits cache, ``summary.csv``, ``split.json``, metrics)
goes through :func:`atomic_write`: a hidden temp file in the same directory (``os.replace`` must not
cross filesystems), flushed and fsynced, renamed over the target, and the directory fsynced so the
rename itself is durable.
"""
from __future__ import annotations

import os
import secrets
import shutil
from typing import Any, BinaryIO, Callable, Union

__all__ = ["atomic_write", "atomic_write_bytes", "atomic_write_text", "atomic_copy", "atomic_torch_save"]

PathLike = Union[str, "os.PathLike[str]"]


def _fsync_dir(directory: str) -> None:
    """Make the rename durable (POSIX); skipped where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def temp_path_for(path: PathLike) -> str:
    """Hidden, unique, same directory; never matches a checkpoint or CSV name."""
    head, tail = os.path.split(os.fspath(path))
    return os.path.join(head, f".{tail}.tmp-{os.getpid()}-{secrets.token_hex(4)}")


def atomic_write(path: PathLike, write: Callable[[BinaryIO], Any]) -> None:
    """Call ``write(fileobj)`` on a temp file, fsync it, and ``os.replace`` it onto ``path``."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = temp_path_for(path)
    try:
        # os.open with 0o666 honours the umask (mkstemp would force 0600, unreadable by teammates).
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    _fsync_dir(os.path.dirname(path) or ".")


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_copy(src: PathLike, dst: PathLike) -> None:
    """Atomically make ``dst`` a byte copy of ``src`` (a copy, not a hardlink: damage to one in place
    must not reach the other)."""
    with open(src, "rb") as fsrc:
        atomic_write(dst, lambda f: shutil.copyfileobj(fsrc, f, 16 << 20))


def atomic_torch_save(path: PathLike, obj: Any) -> None:
    """``torch.save(obj)`` through :func:`atomic_write`."""
    import torch

    atomic_write(path, lambda f: torch.save(obj, f))
