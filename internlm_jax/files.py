"""Writing outputs so that nobody ever reads half of one, and progress bars for long work.

Every writer in the library (HF folders, Orbax checkpoint folders, ``config.json``, trained
tokenizers) writes into a temporary sibling and renames it into place when it is complete: an
interrupted write leaves nothing at the destination that looks valid, and a replaced destination is
only removed after its successor is in place.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import os
import re
import shutil
import signal
import sys
import threading
import uuid
from pathlib import Path
from typing import Iterable, Iterator


def absolute(path: str | os.PathLike) -> Path:
    """``~`` expanded, made absolute and ``..`` folded, so that ``dst.parent`` and ``dst.name`` are real
    (a URL is refused first: see :func:`check_local`)."""
    check_local(path)
    return Path(os.path.abspath(os.path.expanduser(path)))


def file_in_the_way(path: str | os.PathLike) -> Path | None:
    """The nearest existing folder-to-be above ``path`` when it is a file (nothing can be created under
    it), else None."""
    parent = Path(path).parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    return parent if parent.exists() and not parent.is_dir() else None


def check_local(path) -> None:
    """Refuse a URL (``gs://``, ``s3://``, ``hf://``): checkpoints are read and written on a local or
    mounted file system; copied as a path, ``gs://b/x`` would become the local folder ``gs:/b/x``."""
    if re.match(r"[A-Za-z][A-Za-z0-9+.-]+:/", str(path)):  # Path("gs://b/x") reads "gs:/b/x"
        raise ValueError(f"{path}: remote paths are not read or written directly; copy the checkpoint to a local "
                         "or mounted folder (e.g. `gcloud storage cp -r`, a gcsfuse mount) and pass that")


def check_destination(dst: Path, overwrite: bool, needed_bytes: int = 0, *, sources: Iterable[Path] = (),
                      markers: Iterable[str] = (), kind: str = "checkpoint") -> None:
    """Refuse a destination whose writing would lose data, and a disk without room.

    Refused: an existing, non-empty ``dst`` unless ``overwrite``; a ``dst`` that is, or contains, one of
    the ``sources`` being read, or an existing path inside one (replacing it would delete input); with
    ``markers`` (file names that every folder of the kind written holds), a plain file or a non-empty
    folder holding none of them, even with ``overwrite``, so that ``--overwrite .`` cannot wipe a home
    folder (``kind`` names what such a folder is, for the message).
    """
    where = dst.parent.resolve() / dst.name  # a symlink at dst is replaced, not followed
    exists = dst.exists() or dst.is_symlink()
    for src in sources:
        src_at = src.resolve()
        if where == src_at or where in src_at.parents or (exists and src_at in where.parents):
            relation = "is" if where == src_at else "contains" if where in src_at.parents else "is inside"
            raise ValueError(f"destination {dst} {relation} the source {src}: writing it would delete source "
                             "files; choose another destination")
    real_dir = dst.is_dir() and not dst.is_symlink()
    if any(dst.iterdir()) if real_dir else exists:
        if not overwrite:
            raise FileExistsError(f"{dst} already exists (use --overwrite / overwrite=True to replace it)")
        markers = list(markers)
        if markers and not dst.is_dir():
            raise FileExistsError(f"{dst} is a file, not a {kind} folder; refusing to replace it, even with "
                                  "--overwrite")
        if real_dir and markers and not any((dst / name).exists() for name in markers):
            raise FileExistsError(f"{dst} is a non-empty folder that is not a {kind} (it has no "
                                  f"{' or '.join(markers)}); refusing to replace it, even with --overwrite")
    parent = next(p for p in dst.parents if p.exists() or p.is_symlink())  # the nearest that exists
    if not parent.is_dir():
        raise NotADirectoryError(f"cannot create {dst}: {parent} is a file, not a folder")
    free = shutil.disk_usage(parent).free
    needed = int(needed_bytes * 1.05) + (1 << 20)
    if needed_bytes and free < needed:
        raise OSError(f"not enough free disk space in {parent}: {free / 1e9:.2f} GB free, about "
                      f"{needed / 1e9:.2f} GB needed")


@contextlib.contextmanager
def atomic_directory(dst: str | os.PathLike, *, overwrite: bool = False, needed_bytes: int = 0,
                     markers: Iterable[str] = ()) -> Iterator[Path]:
    """``with atomic_directory(dst) as tmp:`` fill ``tmp``; on success it becomes ``dst``, on any
    error (or Ctrl-C) it is removed and ``dst`` is left as it was (see :func:`check_destination`)."""
    dst = absolute(dst)
    check_destination(dst, overwrite, needed_bytes, markers=markers)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.parent / f".{dst.name}.tmp-{uuid.uuid4().hex[:8]}"
    with _writer_lock(tmp) as locked:
        if locked:  # without locks (a file system without flock) no folder can be told dead
            remove_dead_temporaries(dst, own=tmp)
        tmp.mkdir()
        try:
            yield tmp
            replace_directory(tmp, dst)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


@contextlib.contextmanager
def _writer_lock(tmp: Path) -> Iterator[bool]:
    """Hold ``tmp.lock`` (an flock, released by the kernel when the process dies, ``kill -9`` included)
    while ``tmp`` is written: a later run can tell a dead writer's folder from a live one's. Yields
    whether the lock is held (False where the file system has no flock)."""
    lock_path = tmp.with_name(tmp.name + ".lock")
    with open(lock_path, "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            # a cleaner may have unlinked the file between its creation and the lock: then it is not ours
            locked = os.fstat(lock.fileno()).st_ino == os.stat(lock_path).st_ino
        except OSError:
            locked = False
        try:
            yield locked
        finally:
            lock_path.unlink(missing_ok=True)


TEMPORARY = re.compile(r"\.tmp-[0-9a-f]{8}\.lock$")


def remove_dead_temporaries(dst: Path, own: Path | None = None) -> int:
    """Remove the temporary folders of ``dst`` that killed runs left (their lock is free); returns how
    many. A killed conversion would otherwise leave a model-sized hidden folder behind on each try.
    ``own``: the caller's temporary folder, never touched (on NFS a process's own flock does not
    exclude itself)."""
    removed = 0
    for lock_path in dst.parent.glob(f".{glob.escape(dst.name)}.tmp-*.lock"):
        folder = lock_path.with_name(lock_path.name[:-len(".lock")])
        if not TEMPORARY.search(lock_path.name) or folder == own:
            continue
        try:
            fd = os.open(lock_path, os.O_RDWR)  # never created here: a missing file is no writer's lock
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # its writer is alive (or no flock here: then nothing is removed)
            os.close(fd)
            continue
        try:
            if folder.is_dir():
                shutil.rmtree(folder, ignore_errors=True)
                print(f"removed {folder}, the unfinished output of a run that was killed", file=sys.stderr)
                removed += 1
            lock_path.unlink(missing_ok=True)
        finally:
            os.close(fd)
    return removed


@contextlib.contextmanager
def deferred_interrupts() -> Iterator[None]:
    """Hold Ctrl-C and SIGTERM until the block ends, then deliver them. For writers whose background
    threads (Orbax, tensorstore) keep writing after the caller is interrupted: files that appear
    after the cleanup removed the temporary output would be left behind."""
    if threading.current_thread() is not threading.main_thread():  # only it can set handlers
        yield
        return
    received: list[int] = []
    previous = {s: signal.signal(s, lambda signum, frame: received.append(signum))
                for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, signal.SIG_DFL if handler is None else handler)  # None: set outside Python
        if received:
            signal.raise_signal(received[0])  # to the handler restored: KeyboardInterrupt for Ctrl-C


def replace_directory(src: Path, dst: Path) -> None:
    """Move the complete folder ``src`` to ``dst``; an old ``dst`` is removed only once ``src`` is there."""
    if dst.exists() or dst.is_symlink():
        old = dst.parent / f".{dst.name}.old-{uuid.uuid4().hex[:8]}"
        with deferred_interrupts():  # not interrupted with no dst at all, nor before the old copy is gone
            os.replace(dst, old)
            os.replace(src, dst)
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old, ignore_errors=True)
            else:  # a file, or a symlink (whose target is not ours to delete)
                old.unlink()
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
