"""Rotary position embeddings with the reference semantics (default, linear, dynamic NTK).

Angles and cos/sin are computed in float32 and cast to the activation dtype afterwards, as the
reference does. Dynamic NTK follows the reference remote code exactly: the base depends on
``L = max(position_ids) + 1`` of the *current call* over the whole batch (in cached decoding, the
total length so far), and only the new tokens are rotated with it; keys already in a cache keep
the rotation they got when they were written.

One reference behaviour is deliberately not copied: after a call with ``L > max_position_embeddings``
the PyTorch module keeps the scaled ``inv_freq`` as a buffer, so later *short* calls on the same module
object still use the scaled base. A pure function cannot carry that state, and a model's output
should not depend on what it was asked before, so here every call uses its own ``L``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .config import InternLM2Config


def inv_frequencies(cfg: InternLM2Config, seq_len: jax.Array | int | None = None) -> jax.Array:
    """``1 / base ** (arange(0, D, 2) / D)`` in float32; ``seq_len`` drives the dynamic NTK base."""
    d = cfg.head_dim
    exponents = jnp.arange(0, d, 2, dtype=jnp.float32) / jnp.float32(d)
    base = jnp.float32(cfg.rope_theta)
    rs = cfg.rope_scaling
    if rs is not None and rs.type == "dynamic" and seq_len is not None:
        length = jnp.asarray(seq_len).astype(jnp.float32)
        m = cfg.max_position_embeddings
        f = jnp.float32(rs.factor)
        scaled = base * ((f * length / jnp.float32(m)) - (f - jnp.float32(1.0))) ** jnp.float32(d / (d - 2))
        base = jnp.where(length > m, scaled, base)
    return jnp.float32(1.0) / (base ** exponents)


def rope_tables(cfg: InternLM2Config, positions: jax.Array, dtype=jnp.float32,
                seq_len: jax.Array | int | None = None) -> tuple[jax.Array, jax.Array]:
    """cos, sin of shape ``positions.shape + (D,)`` in ``dtype``.

    ``seq_len`` (the length the dynamic NTK base is computed from) defaults to
    ``max(positions) + 1`` over every sequence of the batch, as in the reference. An array of
    ``positions``' shape gives each position its own base (continuous batching: each row's base as it
    would be alone).
    """
    if seq_len is None:
        seq_len = jnp.max(positions) + 1
    seq_len = jnp.asarray(seq_len)
    if seq_len.ndim and seq_len.shape != positions.shape:
        raise ValueError(f"per-position seq_len must have the positions' shape {positions.shape}, got {seq_len.shape}")
    inv_freq = inv_frequencies(cfg, seq_len[..., None] if seq_len.ndim else seq_len)
    pos = positions.astype(jnp.float32)
    rs = cfg.rope_scaling
    if rs is not None and rs.type == "linear":
        pos = pos / jnp.float32(rs.factor)
    angles = pos[..., None] * inv_freq  # [..., D/2]
    emb = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def rotate_half(x: jax.Array) -> jax.Array:
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate ``x [B, S, N, D]`` with tables ``[B, S, D]`` (NeoX / rotate_half convention)."""
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    return x * cos + rotate_half(x) * sin
