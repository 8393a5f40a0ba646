"""Atomic file writes, shared by checkpoints and data shards.

A file is written to a temporary name beside its final one, fsynced, renamed over the final name,
and the directory is fsynced, so a reader sees the old file or the new one, never half of one. A
writer killed mid-write leaves only its temporary file, which the next writer removes.
"""

from __future__ import annotations

import os
import re
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

_TEMP_NAME = re.compile(r"^\..+\.tmp\d+$")


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside `path` to write the file at (by any writer that opens a path itself);
    on a clean exit it is fsynced and renamed to `path` in one step, on an error removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    # the rename must reach the disk too, or after a crash the directory may list the old file
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None]) -> None:
    """Call write(file) on a temporary file, then put it in place at path in one rename."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        write(f)


def remove_stale_temp_files(directory: str | Path) -> None:
    """Delete the temporary files that killed writers left in directory (checkpoints leave ~1.5 GB each)."""
    directory = Path(directory)
    if directory.is_dir():
        for p in directory.iterdir():
            if _TEMP_NAME.match(p.name):
                p.unlink(missing_ok=True)
