"""The KV cache: one type, one layout, owned here.

One buffer per layer for keys and one for values, each ``[B, nKV, T, D]`` (KV heads, never repeated to
the query head count), plus ``valid [B, T]``: which slots hold real tokens (left padding and slots not
yet written do not). Slot order is causal order.

Without a mesh the same bytes are held as ``[B * nKV, T, D]`` (rows batch-major, then head: the
contiguous merge of the two leading dims); on a mesh the 4-d form, whose dims shard separately.
:func:`heads_view` gives the 4-d view of either.

Why this layout (measured on CPU, see BENCHMARKS.md): with heads before slots, the decode einsums
read the cache where it lies (batch and head dims lead, as the matmul wants); ``[B, T, nKV, D]`` made
XLA transpose the whole cache for every layer and step. Separate per-layer buffers let a decode step
write just the new token into each (the cache is donated), where a stacked ``[L, ...]`` cache carried
through a layer scan was sliced and written back whole. The merged single-device form exists because
XLA:CPU, when the batch dim of a 4-d buffer is 1 (the common notebook case), duplicated each
buffer's in-place update into the reshape that drops that dim and copied the whole buffer, twice, per
layer and step; a buffer with no unit leading dim is updated in place.

Shardings: batch over ``data``/``fsdp``, KV heads over ``tensor``, slots over ``sequence``
(:data:`AXES`, mapped by :mod:`internlm_jax.sharding`).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from .sharding import named_sharding

AXES = ("batch", "act_kv_heads", "cache_seq", "head_dim")
VALID_AXES = ("batch", "cache_seq")
SLOT_AXIS = -2  # the slot (time) axis of a layer buffer, in either form


def layer_shape(cfg, batch: int, length: int, mesh=None) -> tuple[int, ...]:
    """``[B * nKV, T, D]`` without a mesh, ``[B, nKV, T, D]`` on one."""
    nkv, d = cfg.num_key_value_heads, cfg.head_dim
    return (batch * nkv, length, d) if mesh is None else (batch, nkv, length, d)


def to_slots(x: jax.Array, mesh=None) -> jax.Array:
    """Keys/values as a layer computes them, ``[B, S, nKV, D]``, in the cache layout of :func:`layer_shape`."""
    b, s, nkv, d = x.shape
    x = x.transpose(0, 2, 1, 3)
    return x.reshape(b * nkv, s, d) if mesh is None else x


def heads_view(buf: jax.Array, num_kv_heads: int) -> jax.Array:
    """A layer buffer as ``[B, nKV, T, D]`` (free: a reshape of the merged form)."""
    return buf if buf.ndim == 4 else buf.reshape(-1, num_kv_heads, *buf.shape[1:])


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """Per-layer key/value buffers and the slot validity; a pytree (jit, donate, shard it whole)."""

    keys: tuple[jax.Array, ...]
    values: tuple[jax.Array, ...]
    valid: jax.Array

    @property
    def num_layers(self) -> int:
        return len(self.keys)

    @property
    def batch(self) -> int:
        return self.valid.shape[0]

    @property
    def length(self) -> int:
        return self.valid.shape[1]

    @property
    def nbytes(self) -> int:
        """Bytes of the key/value buffers (global, all shards)."""
        return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in self.keys + self.values)

    def replace(self, **changes) -> "KVCache":
        return dataclasses.replace(self, **changes)

    @classmethod
    def abstract(cls, cfg, batch: int, length: int, dtype, mesh=None) -> "KVCache":
        """ShapeDtypeStructs (with their shardings on ``mesh``): the planner's and restore's input."""
        shape = layer_shape(cfg, batch, length, mesh)
        buf = jax.ShapeDtypeStruct(shape, jnp.dtype(dtype), sharding=sharding(shape, mesh))
        valid = jax.ShapeDtypeStruct((batch, length), jnp.bool_,
                                     sharding=None if mesh is None else named_sharding(VALID_AXES, (batch, length),
                                                                                       mesh))
        n = cfg.num_hidden_layers
        return cls((buf,) * n, (buf,) * n, valid)

    @classmethod
    def zeros(cls, cfg, batch: int, length: int, dtype, mesh=None) -> "KVCache":
        """An empty cache (every slot invalid), made on the devices in its sharding (a mesh may span
        processes, where host arrays cannot be put); without a mesh committed to the first device, as the
        programs' other inputs are (an uncommitted one compiles each program twice)."""
        like = cls.abstract(cfg, batch, length, dtype, mesh)
        shardings = jax.sharding.SingleDeviceSharding(jax.devices()[0]) if mesh is None else \
            jax.tree.map(lambda x: x.sharding, like)
        return jax.jit(lambda: jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), like), out_shardings=shardings)()

    def constrain(self, mesh) -> "KVCache":
        """Pin every buffer to the cache sharding (inside jit; no-op without a mesh)."""
        if mesh is None:
            return self
        pin = lambda x: jax.lax.with_sharding_constraint(x, sharding(x.shape, mesh))  # noqa: E731
        return KVCache(tuple(map(pin, self.keys)), tuple(map(pin, self.values)),
                       jax.lax.with_sharding_constraint(self.valid, named_sharding(VALID_AXES, self.valid.shape, mesh)))


def read_row(buf: jax.Array, row, span: int, mesh=None) -> jax.Array:
    """Row ``row``'s first ``span`` slots of a 4-d layer buffer, ``[nKV, span, D]``.

    Where the mesh splits the batch dim over ``n`` shards, a dynamic index of one row is what XLA's
    partitioner turns into an all-gather of every row. Instead the batch dim is viewed as ``[n, B/n]``
    (a free reshape: the shards are the leading part), each shard takes its candidate row by a local
    index, and a masked sum over the ``n`` shards all-reduces one row. (Exact: the other shards' rows
    are selected away, not multiplied by zero.)"""
    buf = buf[:, :, :span]
    spec = () if mesh is None else sharding(buf.shape, mesh).spec
    batch_axes = (spec[0] if spec else None) or ()  # the mesh axes splitting the batch dim
    shards = math.prod(mesh.shape[a] for a in ((batch_axes,) if isinstance(batch_axes, str) else batch_axes))
    if shards == 1:
        return jax.lax.dynamic_index_in_dim(buf, row, 0, keepdims=False)
    local = buf.shape[0] // shards
    candidates = jax.lax.dynamic_index_in_dim(buf.reshape(shards, local, *buf.shape[1:]), row % local, 1,
                                              keepdims=False)  # [n, nKV, span, D], one row per shard
    mine = (jnp.arange(shards) == row // local).reshape(-1, 1, 1, 1)
    return jnp.where(mine, candidates, jnp.zeros((), buf.dtype)).sum(0, dtype=buf.dtype)


def read_row_valid(valid: jax.Array, row) -> jax.Array:
    """Row ``row`` of ``valid [B, T]`` (any of the selected row: no all-gather of the batch either)."""
    return jnp.any((jnp.arange(valid.shape[0]) == row)[:, None] & valid, axis=0)


def sharding(shape, mesh):
    """The NamedSharding of one layer buffer on ``mesh`` (None without a mesh)."""
    return None if mesh is None else named_sharding(AXES, shape, mesh)


def shard_bytes(cfg, batch: int, length: int, dtype, mesh) -> int:
    """Bytes of keys + values held by one device."""
    shape = layer_shape(cfg, batch, length, mesh)
    local = shape if mesh is None else sharding(shape, mesh).shard_shape(shape)
    return 2 * cfg.num_hidden_layers * math.prod(local) * jnp.dtype(dtype).itemsize
