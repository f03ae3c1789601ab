"""The KV cache: one type, one layout, owned here.

One buffer per layer for keys and one for values, each ``[B, nKV, T, D]`` (KV heads, never repeated to
the query head count), plus ``valid [B, T]``: which slots hold real tokens (left padding and slots not
yet written do not). Slot order is causal order.

Why this layout (measured on CPU, see BENCHMARKS.md): with heads before slots, the decode einsums
``bngd,bntd->bngt`` and ``bngt,bntd->bngd`` read the cache where it lies (batch and head dims lead, as
the matmul wants); ``[B, T, nKV, D]`` made XLA transpose the whole cache for every layer and step.
Separate per-layer buffers let a decode step write just the new token into each (the cache is donated)
where a stacked ``[L, ...]`` cache carried through a layer scan was sliced and written back whole.

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
SLOT_AXIS = 2  # the slot (time) axis of a layer buffer


def layer_shape(cfg, batch: int, length: int) -> tuple[int, int, int, int]:
    return batch, cfg.num_key_value_heads, length, cfg.head_dim


def to_slots(x: jax.Array) -> jax.Array:
    """Keys/values as a layer computes them, ``[B, S, nKV, D]``, in cache layout ``[B, nKV, S, D]``."""
    return x.transpose(0, 2, 1, 3)


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
        shape = layer_shape(cfg, batch, length)
        buf = jax.ShapeDtypeStruct(shape, jnp.dtype(dtype), sharding=sharding(shape, mesh))
        valid = jax.ShapeDtypeStruct((batch, length), jnp.bool_,
                                     sharding=None if mesh is None else named_sharding(VALID_AXES, (batch, length),
                                                                                       mesh))
        n = cfg.num_hidden_layers
        return cls((buf,) * n, (buf,) * n, valid)

    def constrain(self, mesh) -> "KVCache":
        """Pin every buffer to the cache sharding (inside jit; no-op without a mesh)."""
        if mesh is None:
            return self
        pin = lambda x: jax.lax.with_sharding_constraint(x, sharding(x.shape, mesh))  # noqa: E731
        return KVCache(tuple(map(pin, self.keys)), tuple(map(pin, self.values)),
                       jax.lax.with_sharding_constraint(self.valid, named_sharding(VALID_AXES, self.valid.shape, mesh)))


def sharding(shape, mesh):
    """The NamedSharding of one layer buffer on ``mesh`` (None without a mesh)."""
    return None if mesh is None else named_sharding(AXES, shape, mesh)


def shard_bytes(cfg, batch: int, length: int, dtype, mesh) -> int:
    """Bytes of keys + values held by one device."""
    shape = layer_shape(cfg, batch, length)
    local = shape if mesh is None else sharding(shape, mesh).shard_shape(shape)
    return 2 * cfg.num_hidden_layers * math.prod(local) * jnp.dtype(dtype).itemsize
