"""HF checkpoint folders <-> internlm-jax Orbax checkpoints, streaming in both directions.

Both directions hold one decoder layer at a time (HF -> Orbax) or one item plus one tensor
(Orbax -> HF), so peak host memory stays near the largest tensor whatever the model size. The tensor
names and layouts come from :mod:`internlm_jax.weights`, the library's one HF name map.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Iterator

import numpy as np

from internlm_jax import weights
from internlm_jax.arrays import canonical_dtype
from internlm_jax.checkpoint import (
    CHECKPOINT_MARKERS,
    TOKENIZER_FILES,
    OrbaxCheckpointError,
    check_item,
    check_items,
    item_name,
    item_shapes,
    iter_items,
    read_metadata,
    sha256,
    write_checkpoint,
)
from internlm_jax.config import InternLM2Config
from internlm_jax.files import absolute, check_destination
from internlm_jax.hf_checkpoint import CheckpointError, TensorRef, check_hf_tensors, open_hf_tensors, write_hf_folder


def _tokenizer_files(folder: Path) -> list[Path]:
    return [folder / name for name in TOKENIZER_FILES if (folder / name).is_file()]


def _paths(src, dst, overwrite: bool) -> tuple[Path, Path]:
    """``src`` and ``dst`` with ``~`` expanded; refuses, before any work, a ``dst`` whose replacement would
    delete ``src`` or a folder that is not a checkpoint (the rule every direction shares)."""
    src, dst = absolute(src), absolute(dst)
    check_destination(dst, overwrite, sources=[src], markers=CHECKPOINT_MARKERS)
    return src, dst


def _source_dtype(src: Path, refs: dict[str, TensorRef], expected: list[weights.HFTensor]) -> np.dtype:
    """The one dtype the source's tensors share: keeping it is what keeps their bytes, so a source of
    several dtypes (or float64, which checkpoints do not hold) needs an explicit --dtype."""
    example: dict[np.dtype, str] = {}
    for t in expected:
        example.setdefault(refs[t.name].dtype, t.name)
    if len(example) > 1:
        found = ", ".join(f"{name!r} is {dt}" for dt, name in example.items())
        raise CheckpointError(f"{src}: the source mixes dtypes ({found}); pass --dtype float32|bfloat16|float16 "
                              "to convert them all to one")
    (dt,) = example
    if dt == np.float64:
        raise CheckpointError(f"{src}: the source weights are float64; pass --dtype float32|bfloat16|float16")
    return dt


def hf_to_orbax(src: str | os.PathLike, dst: str | os.PathLike, *, dtype=None, overwrite: bool = False,
                progress: bool | None = None) -> Path:
    """Convert an HF InternLM2 folder into an Orbax checkpoint folder (config, tokenizer and the *.py remote
    code copied; the remote code travels with the config, see :mod:`internlm_jax.config`).

    ``dtype`` (float32, bfloat16, float16) defaults to the source's, when all its tensors share one.
    """
    src, dst = _paths(src, dst, overwrite)
    cfg = InternLM2Config.from_pretrained(src)
    refs = open_hf_tensors(src)
    expected = check_hf_tensors(refs, cfg, str(src))
    target = np.dtype(canonical_dtype(dtype if dtype is not None else _source_dtype(src, refs, expected)))
    groups: dict[str, list[weights.HFTensor]] = {}
    for t in expected:
        groups.setdefault(item_name(t.layer, t.targets[0]), []).append(t)

    def items() -> Iterator[tuple[str, dict[str, np.ndarray]]]:
        for name, tensors in groups.items():
            arrays = {}
            for t in tensors:
                for path, piece in weights.to_params(t, refs[t.name].load(), cfg).items():
                    key = path[len("layers."):] if t.layer is not None else path
                    arrays[key] = np.ascontiguousarray(piece.astype(target, copy=False))
            yield name, arrays

    total = sum(math.prod(t.shape) for t in expected) * target.itemsize
    layout = "bin" if str(refs[expected[0].name].file).endswith(".bin") else "safetensors"
    source_dtypes = ",".join(sorted({str(refs[t.name].dtype) for t in expected}))
    source = {"kind": "hf", "path": str(src), "layout": layout, "dtype": source_dtypes}
    return write_checkpoint(dst, cfg, items(), dtype=target, source=source, total_bytes=total, overwrite=overwrite,
                            extra_files=_tokenizer_files(src), progress=progress)


def orbax_to_hf(src: str | os.PathLike, dst: str | os.PathLike, *, dtype=None, shard_size: int | str = "5GB",
                overwrite: bool = False, progress: bool | None = None) -> Path:
    """Convert an Orbax checkpoint folder back to an HF folder that the official remote code loads.

    Every restored item is checked against config.json (its arrays and their shapes) and every array
    against the sha256 recorded when it was written.
    """
    src, dst = _paths(src, dst, overwrite)
    meta = read_metadata(src)
    cfg = InternLM2Config.from_pretrained(src)
    check_items(src, meta, cfg)
    target = np.dtype(canonical_dtype(dtype if dtype is not None else meta["dtype"]))
    shapes = item_shapes(cfg)
    stream = iter_items(src)
    current: dict = {"name": None, "arrays": {}}

    def produce(t: weights.HFTensor) -> np.ndarray:
        want = item_name(t.layer, t.targets[0])
        while current["name"] != want:  # items come in checkpoint order, as HF tensors do
            try:
                name, arrays = next(stream)
            except StopIteration:
                raise OrbaxCheckpointError(f"{src}: item {want} not found") from None
            check_item(src, name, arrays, shapes[name])
            for key, a in arrays.items():
                if sha256(np.asarray(a)) != meta["sha256"].get(f"{name}/{key}"):
                    raise OrbaxCheckpointError(f"{src}: checksum mismatch for orbax/{name} array {key!r} (corrupt?)")
            current.update(name=name, arrays=arrays)
        parts = {p: np.asarray(current["arrays"][p[len("layers."):] if t.layer is not None else p]) for p in t.targets}
        return weights.from_params(t, parts, cfg).astype(target, copy=False)

    try:
        return write_hf_folder(dst, cfg, produce, dtype=target, shard_size=shard_size, overwrite=overwrite,
                               extra_files=_tokenizer_files(src), progress=progress)
    finally:
        stream.close()  # closes the Orbax checkpointer


def train_to_hf(src: str | os.PathLike, dst: str | os.PathLike, *, step: int | None = None, dtype=None,
                shard_size: int | str = "5GB", overwrite: bool = False, progress: bool | None = None) -> Path:
    """Export a training run's checkpoint (an Orbax CheckpointManager folder written by
    ``internlm-jax train``; the latest step unless ``step``) as an HF folder.

    Unlike the two streaming directions above, this restores the whole parameter tree on the host
    first (training checkpoints hold stacked parameters), so it needs memory for the model. The
    targets are whole arrays on this process's CPU device, not the shardings the run saved, so a
    checkpoint from any mesh or number of processes converts in one plain process."""
    import jax
    import orbax.checkpoint as ocp
    from flax import nnx
    from jax.sharding import SingleDeviceSharding

    from internlm_jax.model import InternLM2

    src, dst = _paths(src, dst, overwrite)
    cfg = InternLM2Config.from_pretrained(src)
    with ocp.CheckpointManager(src, options=ocp.CheckpointManagerOptions(read_only=True),
                               item_handlers={"params": ocp.StandardCheckpointHandler()}) as mgr:
        steps = mgr.all_steps()
        if not steps:
            raise OrbaxCheckpointError(f"{src}: no training checkpoint steps found")
        step = max(steps) if step is None else step
        if step not in steps:
            raise OrbaxCheckpointError(f"{src}: no step {step} (have {sorted(steps)})")
        host = SingleDeviceSharding(jax.local_devices(backend="cpu")[0])
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=host),
                              mgr.item_metadata(step)["params"])
        restored = mgr.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(target)))["params"]
    saved = restored["tok_embeddings"].dtype
    model = InternLM2.abstract(cfg, param_dtype=saved)
    state = nnx.state(model)
    nnx.replace_by_pure_dict(state, restored)
    nnx.update(model, state)
    return model.save_pretrained(dst, dtype=dtype or saved, shard_size=shard_size, overwrite=overwrite,
                                 extra_files=_tokenizer_files(src), progress=progress)

