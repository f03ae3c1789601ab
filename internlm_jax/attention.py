"""Dense attention with the reference numerics (scores and softmax in float32), GQA-aware.

K and V stay at the KV head count: query head ``j`` reads KV head ``j // G``, expressed by viewing
the query heads as ``[nKV, G]`` rather than by repeating K/V to ``nH`` heads.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

MASK_VALUE = float(jnp.finfo(jnp.float32).min)


def causal_mask(q_len: int, kv_len: int, offset: int | jax.Array = 0) -> jax.Array:
    """``[q_len, kv_len]`` bool: query ``i`` (absolute index ``offset + i``) sees keys ``<=`` it."""
    q = jnp.arange(q_len)[:, None] + offset
    return q >= jnp.arange(kv_len)[None, :]


def dense_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None) -> jax.Array:
    """softmax(q k^T / sqrt(D) + mask) v.

    q: ``[B, S, nH, D]``; k, v: ``[B, T, nKV, D]``; mask: bool, broadcastable to ``[B, S, T]``
    (True = may attend). Returns ``[B, S, nH, D]`` in q's dtype. A row with no visible key gets a
    uniform distribution (finite), like the reference's additive minimum mask.
    """
    b, s, nh, d = q.shape
    nkv = k.shape[2]
    qg = q.reshape(b, s, nkv, nh // nkv, d)
    scores = jnp.einsum("bsngd,btnd->bngst", qg, k, preferred_element_type=jnp.float32)
    scores = scores / jnp.float32(math.sqrt(d))
    if mask is not None:
        mask = jnp.broadcast_to(mask, (b, s, k.shape[1]))[:, None, None]
        scores = jnp.where(mask, scores, MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bngst,btnd->bsngd", probs, v, preferred_element_type=jnp.float32)
    return out.astype(q.dtype).reshape(b, s, nh, d)
