"""Orbax checkpoints of InternLM2 parameters, written one layer at a time, restorable onto any mesh.

Layout of a checkpoint folder::

    config.json                     the HF config (so the folder describes its model)
    internlm_jax_checkpoint.json    format, layout version, dtype, source, per-array sha256
    orbax/embed/                    an Orbax (StandardCheckpointer) item: {"tok_embeddings"}
    orbax/layer_00000/ ...          one item per decoder layer: that layer's row of every stacked param
    orbax/final/                    {"norm": {"weight"}, "output"}
    tokenizer files, when given, and the *.py remote code of the source folder (InternLM2Config.save)

One item per layer is what makes conversion stream: a layer is produced, saved and dropped before
the next, so neither direction ever holds the model (a 20B model does not fit a 24 GB host).
Restoring gives Orbax abstract targets that carry the target shardings, so each process reads only
the shards its devices own, and a checkpoint written anywhere restores on any mesh; layer rows are
written into the stacked, donated device buffers as they arrive.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Callable, Iterable, Iterator

import jax
import numpy as np

from . import weights
from .arrays import (
    flat_params,
    flatten,
    get_row,
    nest,
    param_bytes,
    row_sharding,
    set_row,
    sharding_of,
    stacked_buffers,
    to_host,
)
from .config import InternLM2Config
from .files import absolute, atomic_directory, deferred_interrupts, progress_bar

FORMAT = "internlm-jax-orbax"
LAYOUT_VERSION = 1
META_FILE = "internlm_jax_checkpoint.json"
TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.json",
                   "generation_config.json", "added_tokens.json", "chat_template.jinja", "chat_template.json")
# Files only a checkpoint folder holds (our Orbax metadata, or HF weights): --overwrite replaces only a
# folder with one of them. Not config.json: many other projects' folders have one.
CHECKPOINT_MARKERS = (META_FILE, "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                      "pytorch_model.bin.index.json")


class OrbaxCheckpointError(ValueError):
    """An Orbax checkpoint folder that is incomplete, of another format, or corrupt."""


def item_name(layer: int | None, path: str) -> str:
    if layer is not None:
        return f"layer_{layer:05d}"
    return "embed" if path == "tok_embeddings" else "final"


def sha256(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).reshape(-1).view(np.uint8)).hexdigest()


def is_orbax_checkpoint(path: str | os.PathLike) -> bool:
    return (Path(path) / META_FILE).is_file()


def read_metadata(path: str | os.PathLike) -> dict:
    file = Path(path) / META_FILE
    if Path(path).is_dir() and not file.exists():
        hf = any((Path(path) / name).exists() for name in CHECKPOINT_MARKERS)
        raise OrbaxCheckpointError(f"{path}: not an {FORMAT} checkpoint (no {META_FILE})"
                                   + ("; it holds HF weights: load it as an HF folder" if hf else ""))
    try:
        meta = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise OrbaxCheckpointError(f"{file}: unreadable checkpoint metadata ({e})") from None
    if meta.get("format") != FORMAT:
        raise OrbaxCheckpointError(f"{file}: not an {FORMAT} checkpoint (format={meta.get('format')!r})")
    if meta.get("layout_version") != LAYOUT_VERSION:
        raise OrbaxCheckpointError(f"{file}: layout version {meta.get('layout_version')!r} is not supported "
                                   f"(this library reads version {LAYOUT_VERSION})")
    return meta


# --- writing -------------------------------------------------------------------------------------


def write_checkpoint(dst: str | os.PathLike, cfg: InternLM2Config, items: Iterable[tuple[str, dict[str, np.ndarray]]],
                     *, dtype: np.dtype, source: dict, total_bytes: int, overwrite: bool = False,
                     extra_files: Iterable[str | os.PathLike] = (), progress: bool | None = None) -> Path:
    """Write items ``(name, {param path: array})`` one at a time into a new checkpoint at ``dst``.

    Everything goes to a temporary sibling that is renamed to ``dst`` only when complete, so an
    interrupted write leaves nothing at ``dst`` that loads as a checkpoint.
    """
    import orbax.checkpoint as ocp

    checksums: dict[str, str] = {}
    names: list[str] = []
    with atomic_directory(dst, overwrite=overwrite, needed_bytes=total_bytes,
                          markers=CHECKPOINT_MARKERS) as tmp:  # absolute, as Orbax needs
        (tmp / "orbax").mkdir()
        with ocp.StandardCheckpointer() as ckptr, progress_bar(total_bytes, "writing orbax", progress) as bar:
            for name, arrays in items:
                host = {path: np.asarray(a) for path, a in arrays.items()}
                checksums.update({f"{name}/{path}": sha256(a) for path, a in host.items()})
                with deferred_interrupts():  # interrupted, Orbax's threads would write on into a removed folder
                    ckptr.save(tmp / "orbax" / name, nest(host))
                    ckptr.wait_until_finished()  # one item in flight: memory stays at one layer
                names.append(name)
                bar.update(sum(a.nbytes for a in host.values()))
                bar.set_postfix_str(f"{len(checksums)} tensors, {len(names)} items")
        cfg.save(tmp)
        for extra in extra_files:
            shutil.copy2(extra, tmp / Path(extra).name)
        meta = {"format": FORMAT, "layout_version": LAYOUT_VERSION, "dtype": str(np.dtype(dtype)),
                "source": source, "items": names, "num_hidden_layers": cfg.num_hidden_layers, "sha256": checksums}
        (tmp / META_FILE).write_text(json.dumps(meta, indent=1) + "\n")
    return absolute(dst)


def model_items(model) -> Iterator[tuple[str, dict[str, np.ndarray]]]:
    """The checkpoint items of a model in memory (layer rows gathered to the host one at a time)."""
    params = {p: v.get_value() for p, v in flat_params(model).items()}
    yield "embed", {"tok_embeddings": to_host(params["tok_embeddings"])}
    for i in range(model.config.num_hidden_layers):
        yield item_name(i, ""), {p[len("layers."):]: to_host(get_row(v, i)) for p, v in params.items()
                                 if p.startswith("layers.")}
    yield "final", {p: to_host(v) for p, v in params.items() if p in ("norm.weight", "output")}


def save_checkpoint(model, dst: str | os.PathLike, *, overwrite: bool = False, source: dict | None = None,
                    extra_files: Iterable[str | os.PathLike] = (), progress: bool | None = None) -> Path:
    """Save a model's parameters as an Orbax checkpoint folder (see the module docstring)."""
    nbytes = param_bytes(model)
    if jax.process_count() > 1:
        raise NotImplementedError("save_checkpoint writes from one process; gather or use process 0")
    return write_checkpoint(dst, model.config, model_items(model), dtype=model.param_dtype,
                            source=source or {"kind": "python", "param_dtype": str(model.param_dtype)},
                            total_bytes=nbytes, overwrite=overwrite, extra_files=extra_files, progress=progress)


# --- reading -------------------------------------------------------------------------------------


def check_items(path: Path, meta: dict, cfg: InternLM2Config) -> None:
    expected = ["embed"] + [item_name(i, "") for i in range(cfg.num_hidden_layers)] + ["final"]
    if meta.get("items") != expected:
        raise OrbaxCheckpointError(f"{path}: checkpoint items {meta.get('items')!r} do not match config.json "
                                   f"({cfg.num_hidden_layers} layers)")
    for name in expected:
        if not (path / "orbax" / name).is_dir():
            raise OrbaxCheckpointError(f"{path}: item orbax/{name} is missing")


def item_shapes(cfg: InternLM2Config) -> dict[str, dict[str, tuple[int, ...]]]:
    """``{item: {array key: shape}}`` that config.json implies (a layer item holds one row of each
    stacked parameter), derived from the HF map of :mod:`internlm_jax.weights` without allocating."""
    shapes: dict[str, dict[str, tuple[int, ...]]] = {}
    for t in weights.hf_tensors(cfg):
        parts = jax.eval_shape(lambda a, t=t: weights.to_params(t, a, cfg), jax.ShapeDtypeStruct(t.shape, np.float32))
        for p, part in parts.items():
            shapes.setdefault(item_name(t.layer, p), {})[p[len("layers."):] if t.layer is not None else p] = part.shape
    return shapes


def check_item(path: Path, name: str, arrays: dict, want: dict[str, tuple[int, ...]]) -> None:
    """Raise unless a restored item holds exactly the arrays, of the shapes, that config.json implies."""
    extra, missing = sorted(set(arrays) - set(want)), sorted(set(want) - set(arrays))
    if extra or missing:
        raise OrbaxCheckpointError(f"{path}: item orbax/{name} holds {sorted(arrays)} but config.json implies "
                                   f"{sorted(want)} (unexpected: {extra or 'none'}, missing: {missing or 'none'})")
    for key, shape in want.items():
        if tuple(arrays[key].shape) != shape:
            raise OrbaxCheckpointError(f"{path}: array {key!r} of item orbax/{name} has shape "
                                       f"{tuple(arrays[key].shape)} but config.json implies {shape}")


def iter_items(path: str | os.PathLike, targets: Callable[[str], dict] | None = None) -> Iterator[tuple[str, dict]]:
    """Restore the items in order: numpy on the host, or into ``targets(name)`` (abstract, sharded)."""
    import orbax.checkpoint as ocp

    path = Path(path).absolute()  # Orbax refuses relative paths
    meta = read_metadata(path)
    with ocp.StandardCheckpointer() as ckptr:  # closed however the iteration ends
        for name in meta["items"]:
            item = path / "orbax" / name
            try:
                restored = ckptr.restore(item, nest(targets(name))) if targets else ckptr.restore(item)
            except Exception as e:  # orbax raises many types; say which item, in a line (not TensorStore's spec)
                why = str(e).strip().splitlines()[0] if str(e).strip() else ""
                why = why if len(why) <= 300 else why[:300] + " ..."
                raise OrbaxCheckpointError(f"{item}: cannot restore, the checkpoint is damaged or incomplete "
                                           f"({type(e).__name__}: {why})") from None
            yield name, flatten(restored)


def saved_dtype(path: str | os.PathLike) -> np.dtype:
    """The dtype a checkpoint's parameters were written in."""
    return np.dtype(read_metadata(path)["dtype"])


def restore_params(model, path: str | os.PathLike, *, progress: bool | None = None, verify: bool = False) -> None:
    """Fill an abstract model (ShapeDtypeStruct parameters carrying their target shardings) from an
    Orbax checkpoint folder, in place; each process reads only the shards its devices own.

    Arrays are read in the dtype they were saved in and cast to the model's parameter dtype.
    ``verify`` re-checks every array's sha256 (host copy). :meth:`InternLM2.from_pretrained` calls this.
    """
    path = Path(path)
    meta = read_metadata(path)
    check_items(path, meta, model.config)
    saved = np.dtype(meta["dtype"])
    params = flat_params(model)
    stacked = stacked_buffers(params)

    def targets(name: str) -> dict:
        out = {}
        for p, v in params.items():
            target = v.get_value()
            if name.startswith("layer_") and p.startswith("layers."):
                out[p[len("layers."):]] = jax.ShapeDtypeStruct(target.shape[1:], saved,
                                                               sharding=row_sharding(sharding_of(target)))
            elif not name.startswith("layer_") and item_name(None, p) == name and not p.startswith("layers."):
                out[p] = jax.ShapeDtypeStruct(target.shape, saved, sharding=sharding_of(target))
        return out

    with progress_bar(len(meta["items"]), "restoring", progress, unit="item") as bar:
        for name, arrays in iter_items(path, targets):
            if verify:
                for p, a in arrays.items():
                    if sha256(to_host(a)) != meta["sha256"].get(f"{name}/{p}"):
                        raise OrbaxCheckpointError(f"{path}: checksum mismatch for {name}/{p}")
            for p, a in arrays.items():
                if name.startswith("layer_"):
                    full = "layers." + p
                    stacked[full] = set_row(stacked[full], a.astype(stacked[full].dtype), int(name[6:]))
                else:
                    params[p].set_value(a.astype(params[p].get_value().dtype))
            bar.update(1)
    for p, v in stacked.items():
        params[p].set_value(v)
