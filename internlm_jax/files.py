"""Writing outputs so that nobody ever reads half of one, and progress bars for long work.

Every writer in the library (HF folders, Orbax checkpoint folders, ``config.json``, trained
tokenizers) writes into a temporary sibling and renames it into place when it is complete: an
interrupted write leaves nothing at the destination that looks valid, and a replaced destination is
only removed after its successor is in place.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import uuid
from pathlib import Path
from typing import Iterator


def check_destination(dst: Path, overwrite: bool, needed_bytes: int = 0) -> None:
    """Refuse an existing, non-empty destination (unless ``overwrite``) and a disk without room."""
    if dst.exists() and not overwrite and not (dst.is_dir() and not any(dst.iterdir())):
        raise FileExistsError(f"{dst} already exists (use --overwrite / overwrite=True to replace it)")
    parent = dst.parent
    parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(parent).free
    needed = int(needed_bytes * 1.05) + (1 << 20)
    if needed_bytes and free < needed:
        raise OSError(f"not enough free disk space in {parent}: {free / 1e9:.2f} GB free, about "
                      f"{needed / 1e9:.2f} GB needed")


@contextlib.contextmanager
def atomic_directory(dst: str | os.PathLike, *, overwrite: bool = False, needed_bytes: int = 0) -> Iterator[Path]:
    """``with atomic_directory(dst) as tmp:`` fill ``tmp``; on success it becomes ``dst``, on any
    error (or Ctrl-C) it is removed and ``dst`` is left as it was."""
    dst = Path(dst).absolute()
    check_destination(dst, overwrite, needed_bytes)
    tmp = dst.parent / f".{dst.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        yield tmp
        replace_directory(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_directory(src: Path, dst: Path) -> None:
    """Move the complete folder ``src`` to ``dst``; an old ``dst`` is removed only once ``src`` is there."""
    if dst.exists():
        old = dst.parent / f".{dst.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(dst, old)
        os.replace(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """``with atomic_file(path) as tmp:`` write ``tmp`` (any writer: ``np.save``, ``open``); on success it
    becomes ``path``, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}{path.suffix}"
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write(path: str | os.PathLike, data: bytes | str) -> Path:
    """Write one file completely or not at all (a temporary sibling renamed over ``path``)."""
    with atomic_file(path) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    return Path(path)


def progress_bar(total: int, desc: str, enabled: bool | None = None, *, unit: str = "B", postfix: str | None = None):
    """A tqdm bar on stderr (bytes by default); shown when stderr is a terminal unless told."""
    from tqdm.auto import tqdm

    if enabled is None:
        enabled = sys.stderr.isatty()
    return tqdm(total=total, unit=unit, unit_scale=unit == "B", unit_divisor=1024, desc=desc,
                disable=not enabled, postfix=postfix)
