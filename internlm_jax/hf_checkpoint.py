"""HF checkpoint folders: read them tensor by tensor into sharded parameters, and write them back.

Reading never holds more than one checkpoint tensor (plus its converted copy) in host memory:
each tensor is read from disk, split into our layout by :mod:`internlm_jax.weights`, and placed
on the devices that own its shards (``jax.make_array_from_callback``); stacked layer parameters
are filled row by row in a preallocated, donated device buffer.

Safetensors are parsed here rather than through the ``safetensors`` package because its NumPy
backend cannot represent bfloat16 and its Flax backend puts whole tensors on one device. The format
is a little-endian u64 header length, a JSON header and the raw bytes, so the parser is short and
can say exactly which file is truncated or corrupt. ``.bin`` files go through the restricted
unpickler of :mod:`internlm_jax.torch_pickle`, which never executes pickled code and needs no torch.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import struct
from pathlib import Path
from typing import Callable, Iterable

import jax
import ml_dtypes
import numpy as np
from jax.experimental import multihost_utils

from . import weights
from .arrays import canonical_dtype, flat_params, get_row, row_sharding, set_row, sharding_of, stacked_buffers, to_host
from .checkpoint import CHECKPOINT_MARKERS, META_FILE, TOKENIZER_FILES
from .config import GENERATION_FILE, InternLM2Config
from .files import absolute, atomic_directory, check_destination, progress_bar


class CheckpointError(ValueError):
    """A checkpoint that cannot be read: the message names the file, the tensor and the shapes."""


SAFETENSORS_DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
_DTYPE_NAMES = {v: k for k, v in SAFETENSORS_DTYPES.items()}
FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16), np.dtype(np.float64))


class TensorRef:
    """A tensor in a file, not yet read: ``name``, ``file``, ``shape``, ``dtype`` and ``load()``."""

    def __init__(self, name: str, file: Path, shape: tuple[int, ...], dtype: np.dtype,
                 loader: Callable[[], np.ndarray]):
        self.name, self.file, self.shape, self.dtype, self._loader = name, file, shape, dtype, loader

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    def load(self) -> np.ndarray:
        return self._loader()


# --- safetensors ---------------------------------------------------------------------------------


LFS_POINTER = b"version https://git-lfs.github.com/spec/"


def refuse_lfs_pointer(path: Path) -> None:
    """A clone made without git-lfs holds small text pointers where the weights should be: say so."""
    with open(path, "rb") as f:
        if f.read(len(LFS_POINTER)) == LFS_POINTER:
            raise CheckpointError(f"{path}: a git-LFS pointer, not the weights (run git lfs pull)")


def read_safetensors_header(path: Path) -> tuple[dict, int]:
    """(header dict, byte offset of the data) after checking the header against the file size."""
    refuse_lfs_pointer(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: not a safetensors file (only {size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > 100_000_000:
            raise CheckpointError(f"{path}: corrupt or truncated safetensors header "
                                  f"(claims {n} bytes, file has {size})")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    return header, 8 + n


def open_safetensors(path: Path) -> dict[str, TensorRef]:
    header, start = read_safetensors_header(path)
    size = path.stat().st_size
    refs, spans = {}, []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype_name, shape, (begin, end) = info["dtype"], tuple(int(s) for s in info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: corrupt header entry for tensor {name!r}: {info!r}") from None
        if dtype_name not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {dtype_name!r}")
        dtype = SAFETENSORS_DTYPES[dtype_name]
        nbytes = math.prod(shape) * dtype.itemsize
        if end - begin != nbytes or begin < 0:
            raise CheckpointError(f"{path}: tensor {name!r} of shape {shape} {dtype_name} needs {nbytes} bytes "
                                  f"but its offsets span {end - begin}")
        if start + end > size:
            raise CheckpointError(f"{path}: truncated: tensor {name!r} ends at byte {start + end}, file has {size}")
        refs[name] = TensorRef(name, path, shape, dtype, _safetensors_loader(path, start + begin, shape, dtype))
        spans.append((begin, end, name))
    at = 0  # as the safetensors library requires: the tensors tile the data from its start, no gap or overlap
    for begin, end, name in sorted(spans):
        if begin != at:
            raise CheckpointError(f"{path}: corrupt header: tensor {name!r} starts at data byte {begin}, "
                                  f"{'inside the tensor before it' if begin < at else 'after a gap'} (expected {at})")
        at = end
    return refs


def _safetensors_loader(path: Path, offset: int, shape, dtype):
    def load():
        with open(path, "rb") as f:
            arr = np.fromfile(f, dtype=dtype, count=math.prod(shape), offset=offset)
        if arr.size != math.prod(shape):
            raise CheckpointError(f"{path}: truncated while reading a tensor of shape {shape}")
        return arr.reshape(shape)
    return load


def write_safetensors(path: Path, tensors: list[tuple[str, tuple[int, ...], np.dtype]],
                      produce: Callable[[str], np.ndarray], on_tensor: Callable[[int], None] | None = None) -> None:
    """Stream a safetensors file: the header is known up front, then each tensor is produced and
    written in turn, so only one tensor is in memory at a time."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape, dtype in tensors:
        nbytes = math.prod(shape) * np.dtype(dtype).itemsize
        header[name] = {"dtype": _DTYPE_NAMES[np.dtype(dtype)], "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, shape, dtype in tensors:
            arr = np.ascontiguousarray(produce(name), dtype=dtype)
            if arr.shape != tuple(shape):
                raise ValueError(f"{name}: produced shape {arr.shape}, header says {tuple(shape)}")
            f.write(memoryview(arr.reshape(-1).view(np.uint8)))
            if on_tensor:
                on_tensor(arr.nbytes)


# --- finding the tensors of a folder -------------------------------------------------------------


def open_hf_tensors(folder: str | os.PathLike) -> dict[str, TensorRef]:
    """Name -> TensorRef for every tensor of an HF checkpoint folder (headers only, nothing loaded)."""
    folder = Path(folder)
    if folder.is_file():
        raise FileNotFoundError(f"{folder} is a file: pass the checkpoint folder that holds it")
    if not folder.is_dir():
        raise FileNotFoundError(f"checkpoint folder {folder} does not exist")
    # transformers' order, so that a folder holding more than one set loads the weights it would load
    for name, opener in (("model.safetensors", open_safetensors), ("model.safetensors.index.json", open_safetensors),
                         ("pytorch_model.bin", _open_torch), ("pytorch_model.bin.index.json", _open_torch)):
        path = folder / name
        if path.is_file():
            return _open_indexed(path, opener) if name.endswith(".index.json") else opener(path)
    for pattern, opener in (("*.safetensors", open_safetensors), ("pytorch_model*.bin", _open_torch)):
        files = sorted(folder.glob(pattern))
        if files:
            return _merge([opener(f) for f in files])
    raise CheckpointError(f"{folder}: no weights found (looked for model.safetensors, "
                          "model.safetensors.index.json, pytorch_model*.bin)")


def _open_torch(path: Path) -> dict[str, TensorRef]:
    from .torch_pickle import TorchCheckpoint

    refuse_lfs_pointer(path)
    ckpt = TorchCheckpoint(path)
    return {name: TensorRef(name, path, tuple(t.shape), np.dtype(t.dtype), t.load) for name, t in ckpt.tensors.items()}


def _open_indexed(index: Path, opener) -> dict[str, TensorRef]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index}: not a valid index file ({e!r})") from None
    if isinstance(weight_map, dict):
        problem = next((f"{k!r} maps to {v!r}" for k, v in weight_map.items() if not isinstance(v, str)), None)
    else:
        problem = f"got a {type(weight_map).__name__}"
    if problem:
        raise CheckpointError(f"{index}: not a valid index file (weight_map must map tensor names to file names; "
                              f"{problem})")
    opened = {}
    for file in sorted(set(weight_map.values())):
        path = index.parent / file
        if not path.is_file():
            names = [n for n, f in weight_map.items() if f == file]
            raise CheckpointError(f"{index}: shard {file} is named by the index (for {len(names)} tensors, e.g. "
                                  f"{names[0]!r}) but is absent")
        opened[file] = opener(path)
    refs = {}
    for name, file in weight_map.items():
        if name not in opened[file]:
            raise CheckpointError(f"{index.parent / file}: tensor {name!r} is listed in {index.name} "
                                  "but not in the file")
        refs[name] = opened[file][name]
    for file, tensors in opened.items():  # tensors a shard holds beyond the index are still reported
        for name, ref in tensors.items():
            refs.setdefault(name, ref)
    return refs


def _merge(parts: Iterable[dict[str, TensorRef]]) -> dict[str, TensorRef]:
    refs: dict[str, TensorRef] = {}
    for part in parts:
        for name, ref in part.items():
            if name in refs:
                raise CheckpointError(f"tensor {name!r} appears in both {refs[name].file} and {ref.file}")
            refs[name] = ref
    return refs


def check_hf_tensors(refs: dict[str, TensorRef], cfg: InternLM2Config, where: str) -> list[weights.HFTensor]:
    """Compare the checkpoint's names, shapes and dtypes with what ``cfg`` implies; raise on the first problem."""
    expected = weights.hf_tensors(cfg)
    names = {t.name for t in expected}
    missing = [t.name for t in expected if t.name not in refs]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        hint = ("; the checkpoint has no attention biases: config.json needs \"bias\": false (a config "
                "without a 'bias' key means true, as in the reference)"
                if all(name.endswith(".bias") for name in missing) else "")
        raise CheckpointError(f"{where}: missing tensor(s) {', '.join(missing[:3])}{more} "
                              f"(config.json: {cfg.num_hidden_layers} layers, bias={cfg.bias}, "
                              f"tie_word_embeddings={cfg.tie_word_embeddings}){hint}")
    unexpected = [n for n in refs if n not in names and not weights.is_ignored(n, refs[n].shape, cfg)]
    if unexpected:
        ref = refs[unexpected[0]]
        raise CheckpointError(f"{ref.file}: unexpected tensor {ref.name!r} of shape {ref.shape} "
                              f"(not part of an InternLM2 model with this config.json)"
                              + (f"; {len(unexpected) - 1} more unexpected" if len(unexpected) > 1 else ""))
    for t in expected:
        ref = refs[t.name]
        if ref.shape != t.shape:
            raise CheckpointError(f"{ref.file}: tensor {t.name!r} has shape {ref.shape} but config.json implies "
                                  f"{t.shape} (hidden_size={cfg.hidden_size}, "
                                  f"intermediate_size={cfg.intermediate_size}, "
                                  f"heads={cfg.num_attention_heads}, kv_heads={cfg.num_key_value_heads}, "
                                  f"vocab_size={cfg.vocab_size})")
        if ref.dtype not in FLOAT_DTYPES:
            raise CheckpointError(f"{ref.file}: tensor {t.name!r} has dtype {ref.dtype}, expected a float type")
    return expected


# --- loading into a model ------------------------------------------------------------------------


def load_params(model, refs: dict[str, TensorRef], *, where: str, progress: bool | None = None) -> None:
    """Fill an abstract :class:`InternLM2` (ShapeDtypeStruct params) from HF tensors, in place."""
    cfg = model.config
    expected = check_hf_tensors(refs, cfg, where)
    params = flat_params(model)
    stacked = stacked_buffers(params)
    order = sorted(expected, key=lambda t: (str(refs[t.name].file), t.name))  # file order: fewer seeks
    bar = progress_bar(sum(refs[t.name].nbytes for t in expected), "loading", progress,
                       postfix=f"0/{len(expected)} tensors")
    with bar:
        for n, t in enumerate(order, 1):
            array = refs[t.name].load()
            for path, piece in weights.to_params(t, array, cfg).items():
                target = params[path].get_value()
                piece = np.asarray(piece).astype(target.dtype, copy=False)
                if t.layer is None:
                    params[path].set_value(jax.make_array_from_callback(
                        piece.shape, sharding_of(target), lambda idx, p=piece: p[idx]))
                else:
                    row = jax.make_array_from_callback(piece.shape, row_sharding(sharding_of(target)),
                                                       lambda idx, p=piece: p[idx])
                    stacked[path] = set_row(stacked[path], row, t.layer)
            del array
            bar.update(refs[t.name].nbytes)
            bar.set_postfix_str(f"{n}/{len(order)} tensors")
    for path, value in stacked.items():
        params[path].set_value(value)


# --- writing -------------------------------------------------------------------------------------


SIZE_UNITS = {"": 1, "B": 1, "K": 10**3, "KB": 10**3, "M": 10**6, "MB": 10**6, "G": 10**9, "GB": 10**9,
              "T": 10**12, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size: int | str) -> int:
    """``"5GB"`` / ``"5G"`` / ``"500MB"`` / ``"2GiB"`` / ``1000`` -> bytes (decimal units, as HF uses); > 0."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([a-zA-Z]*)\s*", str(size))
    unit = SIZE_UNITS.get(match[2].upper()) if match else None
    nbytes = int(float(match[1]) * unit) if unit else 0
    if nbytes <= 0:
        raise ValueError(f"shard size {size!r} is not a positive size (e.g. 5GB, 500MB, 2GiB or a number of bytes)")
    return nbytes


def plan_shards(tensors: list[weights.HFTensor], dtype: np.dtype, limit: int) -> list[list[weights.HFTensor]]:
    """Group tensors, in order, into files of at most ``limit`` bytes (a larger tensor goes alone)."""
    shards: list[list[weights.HFTensor]] = [[]]
    used = 0
    for t in tensors:
        nbytes = math.prod(t.shape) * dtype.itemsize
        if shards[-1] and used + nbytes > limit:
            shards.append([])
            used = 0
        shards[-1].append(t)
        used += nbytes
    return shards


def hf_bytes(tensors: list[weights.HFTensor], dtype: np.dtype) -> int:
    return sum(math.prod(t.shape) for t in tensors) * np.dtype(dtype).itemsize


def write_hf_folder(folder: str | os.PathLike, cfg: InternLM2Config, produce: Callable[[weights.HFTensor], np.ndarray],
                    *, dtype, shard_size: int | str = "5GB", overwrite: bool = False,
                    extra_files: Iterable[str | os.PathLike] = (), progress: bool | None = None) -> Path:
    """Write an HF InternLM2 folder whose tensors come from ``produce(tensor)``, one at a time, in
    checkpoint order. Written into a temporary sibling and renamed when complete, so an interrupted
    save leaves no folder that looks like a checkpoint. Replacing an HF folder (``overwrite``) keeps
    its other files, as transformers' ``save_pretrained`` does: saving a fine-tuned model over the folder
    it came from replaces the weights and config, not the tokenizer or the model card (the old
    tokenizer's files go as a whole when ``extra_files`` bring a tokenizer: no mix of two)."""
    folder = absolute(folder)
    dtype = np.dtype(dtype)
    tensors = weights.hf_tensors(cfg)
    total = hf_bytes(tensors, dtype)
    shards = plan_shards(tensors, dtype, parse_size(shard_size))
    by_name = {t.name: t for t in tensors}
    extra_files = [(e if isinstance(e, tuple) else (e, Path(e).name)) for e in extra_files]  # (path, name)
    tokenizer = set(TOKENIZER_FILES) - {GENERATION_FILE}
    new_tokenizer = any(name in tokenizer for _, name in extra_files)
    with atomic_directory(folder, overwrite=overwrite, needed_bytes=total, markers=CHECKPOINT_MARKERS) as tmp:
        _keep_other_files(folder, tmp, drop=tokenizer if new_tokenizer else ())
        with progress_bar(total, "writing hf", progress, postfix=f"0/{len(tensors)} tensors") as bar:
            weight_map = {}
            for k, shard in enumerate(shards, 1):
                file = "model.safetensors" if len(shards) == 1 else f"model-{k:05d}-of-{len(shards):05d}.safetensors"
                write_safetensors(tmp / file, [(t.name, t.shape, dtype) for t in shard],
                                  lambda name: produce(by_name[name]), bar.update)
                weight_map.update({t.name: file for t in shard})
                bar.set_postfix_str(f"{len(weight_map)}/{len(tensors)} tensors")
        if len(shards) > 1:
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        extra = dict(cfg.extra, torch_dtype=str(dtype))
        if "dtype" in extra:  # transformers 5's name for torch_dtype
            extra["dtype"] = str(dtype)
        cfg.replace(extra=extra).save(tmp)
        for source, name in extra_files:
            if (tmp / name).is_dir() and not (tmp / name).is_symlink():
                shutil.rmtree(tmp / name)
            (tmp / name).unlink(missing_ok=True)  # a kept file is a hard link: never write through it
            shutil.copy2(source, tmp / name)
    return folder


WEIGHT_FILE = re.compile(r".*\.(safetensors|bin|pt|pth)(\.index\.json)?$")


def _keep_other_files(old: Path, new: Path, drop: Iterable[str] = ()) -> None:
    """Hard-link (or copy) into ``new`` every entry of the HF folder ``old`` but its weights, their
    indexes and the names in ``drop`` (nothing of an Orbax checkpoint: that is another kind of folder;
    symbolic links are kept as links). Whatever is written into ``new`` afterwards replaces a kept file
    by a rename or after an unlink, so ``old`` stays intact until the swap."""
    if not old.is_dir() or (old / META_FILE).exists():
        return

    def link(src, dst):
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    drop = set(drop)
    for entry in old.iterdir():
        if WEIGHT_FILE.match(entry.name) or entry.name in drop:
            continue
        if entry.is_symlink():
            os.symlink(os.readlink(entry), new / entry.name)
        elif entry.is_dir():
            shutil.copytree(entry, new / entry.name, symlinks=True, copy_function=link)
        else:
            link(entry, new / entry.name)


def save_hf_checkpoint(model, folder: str | os.PathLike, *, dtype=None, shard_size: int | str = "5GB",
                       overwrite: bool = False, extra_files: Iterable[str | os.PathLike] = (),
                       progress: bool | None = None) -> Path:
    """Write ``model`` as an HF InternLM2 folder (safetensors, index when sharded, config.json), with
    ``extra_files`` copied in (paths, or ``(path, name)`` pairs; e.g. the tokenizer's files).

    A model whose parameters span several processes (a multi-host mesh) is saved by calling this
    from every process: each tensor is gathered with all of them (a collective), only process 0
    writes, and every process returns once the folder is in place or raises if process 0 failed.
    """
    cfg = model.config
    params = flat_params(model)
    dtype = canonical_dtype(dtype or model.param_dtype)
    tensors = weights.hf_tensors(cfg)
    produced = []

    def produce(t: weights.HFTensor) -> np.ndarray:
        parts = {}
        for path in t.targets:
            value = params[path].get_value()
            parts[path] = to_host(value if t.layer is None else get_row(value, t.layer))
        produced.append(t.name)
        return weights.from_params(t, parts, cfg)

    def write() -> Path:
        return write_hf_folder(folder, cfg, produce, dtype=dtype, shard_size=shard_size, overwrite=overwrite,
                               extra_files=extra_files, progress=progress)

    if all(getattr(p.get_value(), "is_fully_addressable", True) for p in params.values()):
        return write()

    def agree(ok: bool) -> bool:  # every process learns process 0's outcome (a collective)
        return bool(multihost_utils.broadcast_one_to_all(np.int32(ok)))

    if jax.process_index() != 0:
        if not agree(True):
            raise OSError(f"process 0 could not start writing {folder} (its error says why)")
        for t in tensors:  # the order write_hf_folder produces them in, so the gathers pair up
            produce(t)
        if not agree(True):
            raise OSError(f"process 0 failed to finish writing {folder} (its error says why)")
        return absolute(folder)
    try:
        check_destination(absolute(folder), overwrite, hf_bytes(tensors, dtype), markers=CHECKPOINT_MARKERS)
    except (OSError, ValueError):  # (a URL, a source as destination): the others must not wait
        agree(False)
        raise
    agree(True)
    try:
        out = write()
    except BaseException:
        if len(produced) == len(tensors):  # the others wait in the last agreement, not in a gather
            agree(False)
        raise
    agree(True)
    return out
