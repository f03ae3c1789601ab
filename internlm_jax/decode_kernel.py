"""Ragged decode attention: a Pallas TPU kernel that reads only the cache blocks holding real tokens.

The KV cache is preallocated at its final length and prompts are left-padded, so at decode step
``i`` sequence ``b`` has real keys only in slots ``[first_b, last_b]``: the padding before its prompt
and the slots not yet written are dead weight. The pure-JAX decode reads all ``T`` slots every step;
this kernel walks the cache in blocks of ``block`` slots and, per sequence, fetches only the blocks
between its first and last valid slot (the block index map is clamped to that range, so Pallas issues
no new copy for the steps outside it, and their compute is skipped). Early in a long generation, or
in a batch of very different prompt lengths, that is most of the bytes a decode step moves.

Layout: the cache buffers of :mod:`internlm_jax.cache`, ``[B, nKV, T, D]``, are read in place: one grid
step's block is ``[block, D]`` of one KV head, lane-aligned for ``D = 128``. The ``G`` query heads that
share the KV head are computed together (``[G, D] x [D, block]``). Scores, softmax and accumulation are
float32; the output is the normalised float32 attention and its log-sum-exp, so results from several
cache shards merge exactly (:func:`internlm_jax.ring.sharded_decode_attention`).

On TPU it compiles with Mosaic; on CPU it runs in the Pallas interpreter (for numerics checks).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

BLOCK = 512  # cache slots per grid step
_LANES = 128
_FLOOR = -1e30  # finite "minus infinity" for the running max (keeps exp() free of inf - inf)


def supported(head_dim: int, cache_len: int, block: int = BLOCK) -> bool:
    """Shapes the kernel takes: lane-aligned heads and a cache length that splits into lane-aligned blocks."""
    bt = min(block, cache_len)
    return head_dim % _LANES == 0 and cache_len % bt == 0 and bt % _LANES == 0


def _kernel(first_ref, last_ref, q_ref, k_ref, v_ref, ok_ref, o_ref, lse_ref, m_sc, l_sc, acc_sc, *, scale: float):
    b, t = pl.program_id(0), pl.program_id(2)

    @pl.when(t == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, _FLOOR, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    @pl.when((t >= first_ref[b]) & (t <= last_ref[b]))
    def _fold():
        q, k = q_ref[...], k_ref[...]  # [G, D], [block, D]
        s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32) * scale
        ok = ok_ref[...] != 0  # [1, block]
        s = jnp.where(ok, s, _FLOOR)
        m_prev = m_sc[...]  # [G, LANES], every lane the same
        m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
        p = jnp.where(ok, jnp.exp(s - m_new[:, :1]), 0.0)
        corr = jnp.exp(m_prev - m_new)
        l_sc[...] = corr * l_sc[...] + jnp.sum(p, axis=1, keepdims=True)
        m_sc[...] = m_new
        v = v_ref[...]
        pv = jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)  # [G, D]
        acc_sc[...] = acc_sc[...] * corr[:, :1] + pv

    @pl.when(t == pl.num_programs(2) - 1)
    def _finish():
        l = l_sc[...]
        o_ref[...] = acc_sc[...] / jnp.where(l[:, :1] == 0, 1.0, l[:, :1])
        lse_ref[...] = jnp.where(l == 0, -jnp.inf, m_sc[...] + jnp.log(jnp.where(l == 0, 1.0, l)))


@functools.partial(jax.jit, static_argnames=("block", "interpret"))
def ragged_decode_attention(q, k_cache, v_cache, kv_ok, *, block: int = BLOCK, interpret: bool = False):
    """Attention of one new token per sequence over the valid slots of a cache.

    q ``[B, nKV, G, D]`` (query heads grouped by their KV head); k_cache, v_cache ``[B, nKV, T, D]``;
    kv_ok ``[B, T]`` bool, the slots this token may see. Returns ``(out [B, nKV, G, D] float32,
    lse [B, nKV, G] float32)``; a sequence with no visible slot gets zeros and ``lse = -inf``.
    """
    b, nkv, g, d = q.shape
    t = k_cache.shape[2]
    if k_cache.shape != (b, nkv, t, d) or v_cache.shape != k_cache.shape or kv_ok.shape != (b, t):
        raise ValueError(f"ragged decode attention: q {q.shape}, caches {k_cache.shape}/{v_cache.shape} and kv_ok "
                         f"{kv_ok.shape} disagree (want [B, nKV, G, D], [B, nKV, T, D] and [B, T])")
    if not supported(d, t, block):
        raise ValueError(f"ragged decode attention needs head_dim % 128 == 0 and a cache length {t} that splits "
                         f"into blocks of min({block}, T), a multiple of 128")
    bt = min(block, t)
    nt = t // bt
    ok = kv_ok.astype(bool)
    has_any = jnp.any(ok, axis=1)
    first = jnp.argmax(ok, axis=1) // bt
    last = (t - 1 - jnp.argmax(ok[:, ::-1], axis=1)) // bt
    first = jnp.where(has_any, first, nt).astype(jnp.int32)  # nothing valid: no block is folded
    last = jnp.where(has_any, last, -1).astype(jnp.int32)

    def block_of(i, first_ref, last_ref, bi):  # clamp to the valid range: repeated indices are not re-fetched
        return jnp.maximum(jnp.minimum(i, last_ref[bi]), jnp.minimum(first_ref[bi], nt - 1))

    kv_spec = pl.BlockSpec((None, None, bt, d), lambda bi, h, i, f, la: (bi, h, block_of(i, f, la, bi), 0))
    ok_spec = pl.BlockSpec((None, 1, bt), lambda bi, h, i, f, la: (bi, 0, block_of(i, f, la, bi)))
    head_spec = pl.BlockSpec((None, None, g, d), lambda bi, h, i, f, la: (bi, h, 0, 0))
    lse_spec = pl.BlockSpec((None, None, g, _LANES), lambda bi, h, i, f, la: (bi, h, 0, 0))
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2, grid=(b, nkv, nt),
        in_specs=[head_spec, kv_spec, kv_spec, ok_spec],
        out_specs=[head_spec, lse_spec],
        scratch_shapes=[pltpu.VMEM((g, _LANES), jnp.float32), pltpu.VMEM((g, _LANES), jnp.float32),
                        pltpu.VMEM((g, d), jnp.float32)])
    out, lse = pl.pallas_call(
        functools.partial(_kernel, scale=1.0 / math.sqrt(d)),
        grid_spec=grid_spec,
        out_shape=[jax.ShapeDtypeStruct((b, nkv, g, d), jnp.float32),
                   jax.ShapeDtypeStruct((b, nkv, g, _LANES), jnp.float32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=interpret,
        name="ragged_decode_attention",
    )(first, last, q, k_cache, v_cache, ok.astype(jnp.int32).reshape(b, 1, t))
    return out, lse[..., 0]


def ragged_decode(q, k_cache, v_cache, kv_ok, *, interpret: bool, block: int = BLOCK):
    """:func:`ragged_decode_attention` for model-shaped q ``[B, 1, nH, D]``: returns the float32 output
    ``[B, 1, nH, D]`` and the log-sum-exp ``[B, nKV, G]``."""
    b, s, nh, d = q.shape
    nkv = k_cache.shape[1]
    if s != 1:
        raise ValueError(f"ragged decode attention takes one new token per sequence, got {s}")
    k_cache, v_cache = (c if c.dtype == q.dtype else c.astype(q.dtype) for c in (k_cache, v_cache))
    out, lse = ragged_decode_attention(q.reshape(b, nkv, nh // nkv, d), k_cache, v_cache, kv_ok, block=block,
                                       interpret=interpret)
    return out.reshape(b, 1, nh, d), lse
