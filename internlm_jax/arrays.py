"""Small helpers on parameter arrays shared by the loaders and writers: dtype names, flat parameter
paths, shardings, single layer rows of stacked parameters, host copies of global arrays, and huge-page
backing of host buffers."""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util
from jax.sharding import NamedSharding, PartitionSpec, SingleDeviceSharding

PARAM_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


SHORT_DTYPE_NAMES = {"bf16": "bfloat16", "fp16": "float16", "f16": "float16", "fp32": "float32", "f32": "float32"}


def canonical_dtype(dtype: Any) -> jnp.dtype:
    """``"bfloat16"`` / ``"bf16"`` / ``jnp.bfloat16`` / ``np.float32`` ... -> a numpy dtype; ValueError otherwise."""
    if isinstance(dtype, str):
        dtype = SHORT_DTYPE_NAMES.get(dtype.lower(), dtype)
    try:
        dt = jnp.dtype(dtype)
    except TypeError:
        dt = None
    if dt is None or dt not in PARAM_DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; use float32, bfloat16 or float16")
    return dt


def flat_params(model) -> dict[str, nnx.Param]:
    """The model's parameters by dotted path (``layers.attention.wq``), in state order."""
    return {".".join(map(str, path)): var for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def param_bytes(model) -> int:
    return sum(int(np.prod(v.get_value().shape)) * v.get_value().dtype.itemsize for v in flat_params(model).values())


def nest(flat: dict[str, Any]) -> dict:
    """``{"a.b": x}`` -> ``{"a": {"b": x}}``."""
    return traverse_util.unflatten_dict(flat, sep=".")


def flatten(tree: dict) -> dict[str, Any]:
    """``{"a": {"b": x}}`` -> ``{"a.b": x}``."""
    return traverse_util.flatten_dict(tree, sep=".")


def sharding_of(value) -> jax.sharding.Sharding:
    """The sharding an array (or a ShapeDtypeStruct) carries; the first device when it carries none."""
    sharding = getattr(value, "sharding", None)
    return sharding if sharding is not None else SingleDeviceSharding(jax.devices()[0])


def row_sharding(stacked: jax.sharding.Sharding) -> jax.sharding.Sharding:
    """The sharding of one row of a stacked array (its leading layer axis dropped)."""
    if isinstance(stacked, NamedSharding):
        return NamedSharding(stacked.mesh, PartitionSpec(*tuple(stacked.spec)[1:]))
    return stacked


@jax.jit
def get_row(stacked: jax.Array, i) -> jax.Array:
    """Row ``i`` (a layer) of a stacked parameter."""
    return jax.lax.dynamic_index_in_dim(stacked, i, 0, keepdims=False)


set_row = jax.jit(lambda stacked, row, i: jax.lax.dynamic_update_index_in_dim(stacked, row, i, 0),
                  donate_argnums=0)
set_row.__doc__ = "Write ``row`` as row ``i`` of ``stacked``, in place (the stacked buffer is donated)."


def stacked_buffers(params: dict[str, nnx.Param]) -> dict[str, jax.Array]:
    """Zeroed device buffers, in their target shardings, for every stacked (``layers.*``) parameter;
    loaders write one layer row at a time into them (:data:`set_row`)."""
    out = {}
    for name, param in params.items():
        if name.startswith("layers."):
            t = param.get_value()
            out[name] = jax.jit(lambda t=t: jnp.zeros(t.shape, t.dtype), out_shardings=sharding_of(t))()
    return out


def to_host(x: jax.Array) -> np.ndarray:
    """A NumPy copy of a whole array, gathered from all processes when it spans several."""
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


HUGE_PAGE = 2 << 20
MADV_COLLAPSE = 25  # Linux >= 6.1: back a populated range with huge pages now, keeping its contents


def back_with_huge_pages(arrays) -> int:
    """Ask Linux to back the 2 MiB-aligned interior of each CPU array's buffer with 2 MiB pages; returns
    the bytes it accepted (0 off Linux, on other backends, or on kernels without ``MADV_COLLAPSE``).

    Why: a decode step streams every weight once. With 4 KiB pages the CPU's prefetchers stop at each
    page boundary and every 4 KiB costs a TLB entry; with THP set to ``madvise`` (the common default)
    XLA's buffers never get huge pages on their own. The contents are unchanged; a refused range
    (no memory to compact, THP disabled) is skipped silently, since only speed depends on it."""
    if not sys.platform.startswith("linux") or _kernel_version() < (6, 1):
        return 0
    madvise = _madvise()
    ranges = []
    for x in jax.tree.leaves(arrays):
        if not isinstance(x, jax.Array) or len(x.devices()) != 1 or next(iter(x.devices())).platform != "cpu":
            continue
        start = x.unsafe_buffer_pointer()
        lo = -(-start // HUGE_PAGE) * HUGE_PAGE
        hi = (start + x.nbytes) // HUGE_PAGE * HUGE_PAGE
        ranges += [(lo, hi)] if hi > lo else []
    done = 0
    for attempt in range(4):
        # refusals pass: pages just written by another core are not yet on the kernel's LRU lists (EINVAL),
        # no free huge page just now (EAGAIN); a short wait lets both settle
        if attempt:
            time.sleep(0.05)
        failed = []
        for lo, hi in ranges:
            if madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), MADV_COLLAPSE) == 0:
                done += hi - lo
            elif ctypes.get_errno() in (errno.EINVAL, errno.EAGAIN):
                failed.append((lo, hi))
        ranges = failed
        if not ranges:
            break
    return done


def _kernel_version() -> tuple[int, ...]:
    """Linux's release as numbers: ``6.18.44-fc`` -> (6, 18)."""
    parts = os.uname().release.split(".")[:2]
    return tuple(int("".join(c for c in p if c.isdigit()) or 0) for p in parts)


@functools.cache
def _madvise():
    return ctypes.CDLL(None, use_errno=True).madvise  # the process's own C library
