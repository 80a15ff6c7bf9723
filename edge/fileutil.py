"""Writing files so that a crash or power cut leaves either the old file or the new one, never half.

The one atomic writer of the project: configs, cards, model files, engine caches, reports all go
through :func:`atomic_write` (temp file in the same folder, fsync, rename, fsync of the folder).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path

TEMP_SUFFIX = ".tmp"


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a directory be fsynced
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(path: Path, chunks: bytes | Iterable[bytes],
                 before_replace: Callable[[Path], None] | None = None, *, mode: int = 0o644) -> None:
    """Write ``chunks`` under ``path`` so readers see the old file or the new one, never a mix.

    ``mode``: the final permissions (a private temp file's 0600 would hide shipped files from a service
    user). ``before_replace`` runs between the fsync and the rename (crash tests kill the process there).
    Temp files are named ``.NAME.PID.RANDOM.tmp`` beside the target, so a sweep can find stale ones."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}{TEMP_SUFFIX}")
    try:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as out:
            for chunk in [chunks] if isinstance(chunks, bytes | bytearray | memoryview) else chunks:
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        if before_replace is not None:
            before_replace(temp)
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_bytes(path: Path, data: bytes, mode: int = 0o644) -> None:
    atomic_write(path, data, mode=mode)


def atomic_write_text(path: Path, text: str, mode: int = 0o644) -> None:
    atomic_write(path, text.encode("utf-8"), mode=mode)


def atomic_write_json(path: Path, obj: object, indent: int = 2) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent, sort_keys=False) + "\n")
