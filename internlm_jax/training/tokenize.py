"""``internlm-jax data tokenize``: text or chat JSONL files of any size -> a tokenized folder (corpus.py).

Each input file is cut into byte ranges of about ``chunk_bytes`` at line starts. A range is one unit
of work: a worker process reads just those lines, tokenizes them and writes one shard, so memory is a
range per worker whatever the corpus size, and the shards (hence the token stream) come out in input
order whatever the number of workers.

The work happens in ``.OUT.partial`` beside the output: its ``plan.json`` fixes the inputs (with sizes
and modification times), the tokenizer and the ranges, and each finished shard stays there. Running the
same command again after an interruption skips the finished shards; a changed input starts over. When
every shard is done, ``index.json`` is written and the folder is renamed to ``OUT``: a folder by that
name is always complete.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import json
import multiprocessing
import os
import shutil
import sys
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from pathlib import Path

from ..files import absolute, atomic_write, check_destination, progress_bar, replace_directory
from .corpus import INDEX, pack_documents, read_shard_meta, staging_folder, token_dtype, write_index, write_shard
from .data import TEXT_SUFFIXES, line_document


def expand_inputs(patterns: list[str], fmt: str) -> list[Path]:
    """Glob patterns (or paths) -> the files, sorted, each once."""
    files: list[Path] = []
    for pattern in patterns:
        found = sorted(glob.glob(pattern, recursive=True)) if glob.has_magic(pattern) else [pattern]
        found = [Path(f) for f in found if Path(f).is_file()]
        if not found and Path(pattern).is_dir():
            raise FileNotFoundError(f"--input {pattern!r} is a folder; give its files or a pattern such as "
                                    f"'{Path(pattern) / ('**/*' + TEXT_SUFFIXES[fmt][-1])}'")
        if not found:
            raise FileNotFoundError(f"--input {pattern!r} matches no file")
        for f in found:
            if f.suffix not in TEXT_SUFFIXES[fmt]:
                raise ValueError(f"{f}: {fmt} data is read from {' or '.join(TEXT_SUFFIXES[fmt])} files")
            if f.absolute() not in [g.absolute() for g in files]:
                files.append(f)
    return files


def split_ranges(size: int, chunk_bytes: int) -> list[tuple[int, int]]:
    """``[start, end)`` byte ranges covering a file; a line belongs to the range its first byte is in."""
    return [(a, min(a + chunk_bytes, size)) for a in range(0, size, chunk_bytes)] or [(0, 0)]


def _lines(path: Path, start: int, end: int):
    """(byte offset, line bytes) of the lines that begin in ``[start, end)``."""
    with open(path, "rb") as f:
        if start:
            f.seek(start - 1)
            f.readline()  # the rest of a line that began before ``start`` (just b"\n" if one ended there)
        pos = f.tell()
        while pos < end:
            line = f.readline()
            if not line:
                return
            yield pos, line
            pos += len(line)


def _line_number(path: Path, offset: int) -> int:
    """The 1-based number of the line that starts at byte ``offset`` (read through once, for an error)."""
    count, done = 1, 0
    with open(path, "rb") as f:
        while done < offset:
            block = f.read(min(1 << 20, offset - done))
            if not block:
                break
            count += block.count(b"\n")
            done += len(block)
    return count


def tokenize_range(tokenizer, path: str, start: int, end: int, fmt: str, text_key: str, folder: str,
                   name: str) -> dict:
    """One unit of work: tokenize the lines of ``path`` that begin in ``[start, end)`` into shard ``name``."""
    path = Path(path)
    docs, trained = [], []
    for at, raw in _lines(path, start, end):
        try:
            line = raw.decode("utf-8")
            doc = line_document(tokenizer, line, "", plain=path.suffix == ".txt", fmt=fmt, text_key=text_key)
        except UnicodeDecodeError:
            raise ValueError(f"{path}:{_line_number(path, at)}: not UTF-8 text") from None
        except ValueError as e:  # named as the in-memory reader names it: file:line (counted only now)
            message = str(e) if str(e).startswith(": ") else f": {e}"
            raise ValueError(f"{path}:{_line_number(path, at)}{message}") from None
        if doc is not None:
            docs.append(doc[0])
            trained.append(doc[1])
    piece = pack_documents(docs, trained if fmt == "chat" else None, token_dtype(tokenizer.vocab_size))
    return write_shard(Path(folder), name, piece.tokens, piece.starts, piece.trained)


@contextlib.contextmanager
def _only_run(out: Path):
    """Hold ``.OUT.tokenize.lock`` beside the output while a run writes it (an flock: released when the
    process dies, ``kill -9`` included); a second run into the same output is refused, not interleaved."""
    lock_path = out.parent / f".{out.name}.tokenize.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RuntimeError(f"another `data tokenize` is writing {out} (it holds {lock_path}); wait for it "
                               "to finish or stop it") from None
        except OSError:  # a file system without flock: run unguarded
            pass
        try:
            yield
        finally:
            lock_path.unlink(missing_ok=True)


def _exit_with(parent: int) -> None:
    """A worker's initializer: end when the run that started it ends, even by ``kill -9`` (its task pipe
    stays open in the other workers, so it would otherwise wait, and write, on its own)."""
    import ctypes
    import signal
    import threading
    import time

    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: killed with the parent

    def watch():
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()  # elsewhere, and if the parent died before prctl


def tokenize_corpus(tokenizer: str, inputs: list[str], output: str, *, fmt: str = "text", text_key: str = "text",
                    workers: int = 1, chunk_bytes: int = 32 << 20, overwrite: bool = False,
                    progress: bool | None = None) -> dict:
    """Tokenize ``inputs`` (paths or glob patterns) into the folder ``output``; returns its index.

    ``tokenizer``: a ``tokenizer.model`` or a folder holding one. ``fmt``: ``text`` (.txt: a document
    per line; .jsonl: the ``text_key`` field) or ``chat`` (.jsonl ``{"messages": [...]}``, with the loss
    mask of SFT). ``workers`` processes tokenize ranges of ``chunk_bytes`` in parallel."""
    from ..tokenizer import Tokenizer

    if fmt not in TEXT_SUFFIXES:
        raise ValueError(f"--format must be text or chat, got {fmt!r}")
    if workers < 1 or chunk_bytes < 1:
        raise ValueError("--workers and --chunk-mb must be positive")
    tok = Tokenizer.from_pretrained(tokenizer)
    files = expand_inputs(inputs, fmt)
    out = absolute(output)  # (a URL refused)
    if (out / INDEX).is_file() and not overwrite:
        raise FileExistsError(f"{out} is already a tokenized corpus (use --overwrite to replace it)")
    check_destination(out, overwrite, sources=files, markers=[INDEX], kind="tokenized corpus")
    staging = staging_folder(out)
    with _only_run(out):  # a second run into the same output would remove the first's files
        ranges = [(f, a, b) for f in files for a, b in split_ranges(f.stat().st_size, chunk_bytes)]
        units = [{"file": str(f.absolute()), "start": a, "end": b, "name": f"shard-{i:05d}"}
                 for i, (f, a, b) in enumerate(ranges)]
        plan = {"format": fmt, "text_key": text_key, "chunk_bytes": chunk_bytes,
                "rules": 2,  # what makes a document (2: empty texts and a byte-order mark make none)
                "tokenizer_sha256": tok.sha256(),
                "inputs": [{"path": str(f.absolute()), "bytes": f.stat().st_size, "mtime_ns": f.stat().st_mtime_ns}
                           for f in files], "units": units}
        if staging.is_dir():
            try:
                same = json.loads((staging / "plan.json").read_text()) == plan
            except (FileNotFoundError, json.JSONDecodeError):
                same = False
            if not same:
                print(f"{staging}: an unfinished run with other inputs or options; starting over", file=sys.stderr)
                shutil.rmtree(staging)
        staging.mkdir(parents=True, exist_ok=True)
        for stale in staging.glob(".*.tmp-*"):  # a shard being written when a run was killed
            stale.unlink(missing_ok=True)
        atomic_write(staging / "plan.json", json.dumps(plan, indent=1))

        metas = {u["name"]: read_shard_meta(staging, u["name"]) for u in units}
        todo = [u for u in units if metas[u["name"]] is None]
        total = sum(u["end"] - u["start"] for u in units)
        with progress_bar(total, f"tokenize {len(files)} file(s)", progress) as bar:
            bar.update(total - sum(u["end"] - u["start"] for u in todo))
            args = lambda u: (tok, u["file"], u["start"], u["end"], fmt, text_key, str(staging), u["name"])  # noqa: E731
            if workers == 1 or len(todo) <= 1:
                for u in todo:
                    metas[u["name"]] = tokenize_range(*args(u))
                    bar.update(u["end"] - u["start"])
            else:
                with ProcessPoolExecutor(min(workers, len(todo)), mp_context=multiprocessing.get_context("spawn"),
                                         initializer=_exit_with, initargs=(os.getpid(),)) as pool:
                    running = {pool.submit(tokenize_range, *args(u)): u for u in todo}
                    try:
                        while running:
                            finished, _ = wait(running, return_when=FIRST_EXCEPTION)
                            for future in finished:
                                u = running.pop(future)
                                metas[u["name"]] = future.result()  # a worker's error is raised here
                                bar.update(u["end"] - u["start"])
                    except BaseException:
                        pool.shutdown(wait=True, cancel_futures=True)
                        raise
        shards = [metas[u["name"]] for u in units]
        if not sum(s["documents"] for s in shards):
            raise ValueError(f"no documents in {', '.join(map(str, files))}")
        index = write_index(staging, fmt, {"vocab_size": tok.vocab_size, "bos_id": tok.bos_id, "eos_id": tok.eos_id},
                            shards, tokenizer_sha256=plan["tokenizer_sha256"], inputs=plan["inputs"])
        (staging / "plan.json").unlink()
        replace_directory(staging, out)
        return index
