"""Token corpora on disk, read without loading them: the folders ``internlm-jax data tokenize`` writes,
and plain token files (``.npy``, or ``.bin`` of a stated dtype).

A tokenized folder holds shards of NumPy arrays and an ``index.json`` that lists them::

    shard-00000.tokens.npy    uint16 or uint32: the shard's documents back to back, each <s> ... </s>
    shard-00000.starts.npy    int64: where each document starts in the shard
    shard-00000.trained.npy   uint8, chat data only: 1 on the tokens the loss predicts
    shard-00000.json          the shard's counts, written last: the shard is complete

Memory-mapped arrays, not ArrayRecord: a training window is a contiguous slice of the token stream,
found by arithmetic and read through the OS page cache with no decoding or copy of the rest; ArrayRecord
serves whole records (documents), and cutting documents into fixed windows would need a packing pass
with state of its own.

Host memory does not grow with the corpus: after each read the mapped pages around it are handed
back to the page cache (``MADV_DONTNEED``; the kernel maps page-cache folios of up to a few MB per
fault, so without this a process's RSS climbs towards the corpus size as training touches it).
"""

from __future__ import annotations

import itertools
import json
import math
import mmap
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..files import atomic_file, atomic_write

FORMAT = "internlm-jax tokens"
VERSION = 1
INDEX = "index.json"
EOS_ID = 2  # </s> ends a document in a plain token file
BIN_DTYPES = ("uint16", "uint32", "int32")


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned type that holds every id."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def shard_files(folder: Path, name: str) -> dict[str, Path]:
    return {part: folder / f"{name}.{part}.npy" for part in ("tokens", "starts", "trained")} | {
        "meta": folder / f"{name}.json"}


def write_shard(folder: Path, name: str, tokens: np.ndarray, starts: np.ndarray,
                trained: np.ndarray | None = None) -> dict:
    """Write one shard, each file atomically and the counts last (their presence = complete)."""
    files = shard_files(folder, name)
    arrays = {"tokens": tokens, "starts": starts.astype(np.int64)}
    if trained is not None:
        arrays["trained"] = trained.astype(np.uint8)
    for part, array in arrays.items():
        with atomic_file(files[part]) as tmp:
            np.save(tmp, array)
    meta = {"name": name, "tokens": int(len(tokens)), "documents": int(len(starts))}
    atomic_write(files["meta"], json.dumps(meta))
    return meta


def staging_folder(folder: Path) -> Path:
    """Where ``data tokenize`` builds ``folder`` (renamed to it when complete)."""
    return folder.parent / f".{folder.name}.partial"


def check_exists(path: Path) -> None:
    """A missing training input, named (with a hint when an unfinished tokenize run is building it)."""
    if path.exists():
        return
    if staging_folder(path.absolute()).is_dir():
        raise FileNotFoundError(f"{path} does not exist yet: an unfinished `internlm-jax data tokenize` is "
                                f"building it in {staging_folder(path)}; run that command again to finish")
    raise FileNotFoundError(f"training data file {path} does not exist")


def pack_documents(docs: list[list[int]], trained: list[list[int]] | None, dtype) -> Piece:
    """Token lists (and their trained masks) back to back, as arrays with the documents' starts."""
    tokens = np.fromiter(itertools.chain.from_iterable(docs), dtype, count=sum(map(len, docs)))
    starts = np.cumsum([0] + [len(d) for d in docs[:-1]], dtype=np.int64) if docs else np.zeros(0, np.int64)
    if trained is None:
        return Piece(tokens, starts)
    return Piece(tokens, starts, np.fromiter(itertools.chain.from_iterable(trained), np.uint8, count=len(tokens)))


def write_index(folder: Path, kind: str, tokenizer_info: dict, shards: list[dict], **extra) -> dict:
    """``index.json``, written last: the folder is a complete corpus from then on. ``tokenizer_info``:
    ``vocab_size``, ``bos_id``, ``eos_id``."""
    index = {"format": FORMAT, "version": VERSION, "kind": kind,
             "dtype": str(token_dtype(tokenizer_info["vocab_size"])), **tokenizer_info, **extra,
             "tokens": sum(s["tokens"] for s in shards), "documents": sum(s["documents"] for s in shards),
             "shards": shards}
    atomic_write(folder / INDEX, json.dumps(index, indent=1))
    return index


def read_shard_meta(folder: Path, name: str) -> dict | None:
    """A shard's counts if it is complete, else None."""
    try:
        return json.loads(shard_files(folder, name)["meta"].read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


class MappedArray:
    """A read-only, memory-mapped 1-D array in a file (``.npy``, or raw ids at ``offset``). Slicing
    returns a copy of just that range and releases the mapped pages around it; nothing else of the
    file is read."""

    RELEASE = 4 << 20  # bytes: the aligned span released around a read (covers large page-cache folios)

    def __init__(self, path: str | Path, dtype=None, offset: int = 0):
        self.path = Path(path)
        with open(self.path, "rb") as f:
            shape = None
            if dtype is None:  # a .npy file: its header gives dtype and shape
                try:
                    major, _ = np.lib.format.read_magic(f)
                    read_header = (np.lib.format.read_array_header_1_0 if major == 1
                                   else np.lib.format.read_array_header_2_0)
                    shape, fortran, dtype = read_header(f)
                except ValueError as e:
                    raise ValueError(f"{self.path}: not a readable .npy file ({e})") from None
                if fortran and len(shape) > 1:
                    raise ValueError(f"{self.path}: a Fortran-ordered array; save the token ids as a 1-D array")
                if np.dtype(dtype).hasobject:  # pickled Python objects: nothing to map (and never unpickled)
                    raise ValueError(f"{self.path}: an array of Python objects; save the token ids as integers")
                offset = f.tell()
            self.dtype = np.dtype(dtype)
            size = self.path.stat().st_size
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size > offset else None
        count = (size - offset) // self.dtype.itemsize
        if shape is not None:
            declared = math.prod(shape)
            if count < declared:
                raise ValueError(f"{self.path}: its header declares {declared} ids but the file holds {count} "
                                 "(truncated: an interrupted save or copy?)")
            count = declared
        self.array = np.frombuffer(self._map, self.dtype, count, offset) if count else np.zeros(0, self.dtype)
        self.offset = offset

    def __len__(self) -> int:
        return len(self.array)

    def __getitem__(self, index: slice) -> np.ndarray:
        lo, hi, _ = index.indices(len(self.array))
        out = self.array[index].copy()
        if hi > lo:
            self._release(self.offset + lo * self.dtype.itemsize, self.offset + hi * self.dtype.itemsize)
        return out

    def searchsorted(self, value, side: str = "left"):
        out = self.array.searchsorted(value, side=side)
        self._release(0, len(self._map) if self._map is not None else 0)
        return out

    def _release(self, start: int, end: int) -> None:
        if self._map is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        start = start // self.RELEASE * self.RELEASE
        end = min(len(self._map), -(-end // self.RELEASE) * self.RELEASE)
        self._map.madvise(mmap.MADV_DONTNEED, start, end - start)


@dataclass
class Piece:
    """A contiguous run of whole documents: ``starts`` marks where each begins (None: a ``</s>`` ends
    one), ``trained`` which tokens the loss predicts (None: all), ``source`` the file it came from."""

    tokens: np.ndarray
    starts: np.ndarray | None = None
    trained: np.ndarray | None = None
    source: str = ""


def open_tokenized(folder: str | Path) -> tuple[list[Piece], dict]:
    """The shards of a tokenized folder, memory-mapped (only their headers are read now)."""
    folder = Path(folder)
    index_file = folder / INDEX
    if not index_file.is_file():
        raise FileNotFoundError(f"{folder} has no {INDEX}: not a folder written by `internlm-jax data tokenize`")
    index = json.loads(index_file.read_text())
    if index.get("format") != FORMAT or index.get("version") != VERSION:
        raise ValueError(f"{index_file}: not a version-{VERSION} '{FORMAT}' index")
    pieces = []
    for shard in index["shards"]:
        if not shard["tokens"]:
            continue
        files = shard_files(folder, shard["name"])
        try:
            tokens = MappedArray(files["tokens"])
            starts = MappedArray(files["starts"])
            trained = MappedArray(files["trained"]) if index["kind"] == "chat" else None
        except (FileNotFoundError, ValueError) as e:
            raise ValueError(f"{folder}: shard {shard['name']} is missing or damaged ({e})") from None
        if len(tokens) != shard["tokens"] or len(starts) != shard["documents"]:
            raise ValueError(f"{files['tokens']}: {len(tokens)} tokens / {len(starts)} documents, the index says "
                             f"{shard['tokens']} / {shard['documents']}")
        pieces.append(Piece(tokens, starts, trained, str(files["tokens"])))
    return pieces, index


def open_token_file(path: str | Path, bin_dtype: str | None = None) -> Piece:
    """A flat file of token ids, memory-mapped; a ``</s>`` (id 2) ends each document."""
    path = Path(path)
    if path.suffix == ".npy":
        tokens = MappedArray(path)
    elif bin_dtype not in BIN_DTYPES:
        raise ValueError(f"{path}: a .bin token file needs data.bin_dtype, one of {', '.join(BIN_DTYPES)}")
    elif path.stat().st_size % np.dtype(bin_dtype).itemsize:
        raise ValueError(f"{path}: {path.stat().st_size} bytes is not a whole number of {bin_dtype} ids")
    else:
        tokens = MappedArray(path, bin_dtype)
    if tokens.dtype.kind not in "iu":
        raise ValueError(f"{path}: token ids must be integers, got {tokens.dtype}")
    return Piece(tokens, source=str(path))


class TokenStream:
    """Pieces back to back, read by range: ``tokens(a, b)``, their document ids, their trained mask.
    A piece always starts a new document. With ``vocab_size``, every range of ids read is checked
    against it (a min and max of what is read anyway: nothing else of the corpus is scanned)."""

    def __init__(self, pieces: list[Piece], eos_id: int = EOS_ID, vocab_size: int | None = None):
        self.pieces = [p for p in pieces if len(p.tokens)]
        self.eos_id, self.vocab_size = eos_id, vocab_size
        self.bounds = np.cumsum([0] + [len(p.tokens) for p in self.pieces])
        self.has_trained = any(p.trained is not None for p in self.pieces)

    def __len__(self) -> int:
        return int(self.bounds[-1])

    def _parts(self, a: int, b: int):
        k = int(np.searchsorted(self.bounds, a, side="right")) - 1
        while a < b:
            lo, hi = a - int(self.bounds[k]), min(b, int(self.bounds[k + 1])) - int(self.bounds[k])
            yield self.pieces[k], lo, hi
            a += hi - lo
            k += 1

    def tokens(self, a: int, b: int) -> np.ndarray:
        parts = []
        for p, lo, hi in self._parts(a, b):
            ids = p.tokens[lo:hi]
            if self.vocab_size is not None and (ids.min() < 0 or ids.max() >= self.vocab_size):
                at = int(np.flatnonzero((ids < 0) | (ids >= self.vocab_size))[0])
                raise ValueError(f"{p.source or 'training data'}: token {lo + at} is id {ids[at]}, outside the "
                                 f"model's vocabulary (vocab_size {self.vocab_size})")
            parts.append(ids)
        return np.concatenate(parts).astype(np.int32)

    def segments(self, a: int, b: int) -> np.ndarray:
        """int32 document ids of positions ``a..b-1``, counted from 0 at ``a``."""
        out, first = [], 0
        for p, lo, hi in self._parts(a, b):
            new = np.zeros(hi - lo, np.int32)  # 1 where a document starts (after position lo)
            if p.starts is not None:
                i, j = p.starts.searchsorted([lo, hi - 1], side="right")  # the starts in (lo, hi)
                inner = p.starts[i:j]
                new[inner - lo] = 1
            else:
                new[1:] = p.tokens[lo:hi - 1] == self.eos_id
            ids = np.cumsum(new, dtype=np.int32) + first
            out.append(ids)
            first = int(ids[-1]) + 1
        return np.concatenate(out)

    def trained(self, a: int, b: int) -> np.ndarray:
        """float32 1 where the token is trained (everything but chat prompts)."""
        return np.concatenate([np.ones(hi - lo, np.float32) if p.trained is None else
                               np.asarray(p.trained[lo:hi], np.float32) for p, lo, hi in self._parts(a, b)])
