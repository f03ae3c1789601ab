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

GPUs get the same contract from :func:`ragged_decode_attention_gpu`, written for Pallas' Triton backend:
blocks of 16-64 slots, the query heads of a KV head padded to a 16-row tile, and the slots of each
(sequence, KV head) cut into split-K slices so that a batch-1 step still fills the GPU. It is checked
here in the Pallas interpreter and by lowering it to Triton for CUDA; it has not been timed on a GPU.
:func:`ragged_decode` picks the kernel by platform.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as plgpu

BLOCK = 512  # cache slots per grid step
_LANES = 128
_FLOOR = -1e30  # finite "minus infinity" for the running max (keeps exp() free of inf - inf)


def supported(head_dim: int, cache_len: int, block: int = BLOCK) -> bool:
    """Shapes the kernel takes: lane-aligned heads and a cache length that splits into lane-aligned blocks."""
    bt = min(block, cache_len)
    return head_dim % _LANES == 0 and cache_len % bt == 0 and bt % _LANES == 0


def valid_range(ok):
    """Each sequence's first and last valid slot of ``ok [B, T]`` (int32 ``[B]``; T and -1 where none is)."""
    t = ok.shape[1]
    has_any = jnp.any(ok, axis=1)
    first = jnp.where(has_any, jnp.argmax(ok, axis=1), t)
    last = jnp.where(has_any, t - 1 - jnp.argmax(ok[:, ::-1], axis=1), -1)
    return first.astype(jnp.int32), last.astype(jnp.int32)


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
    first, last = valid_range(ok)
    first, last = first // bt, last // bt  # nothing valid: nt and -1, so no block is folded

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


def ragged_decode(q, k_cache, v_cache, kv_ok, *, platform: str, block: int = BLOCK):
    """The ragged kernel for ``platform`` ("tpu": Mosaic; "gpu": :func:`ragged_decode_attention_gpu`;
    "cpu": the TPU kernel in the Pallas interpreter, for numerics checks) on model-shaped q
    ``[B, 1, nH, D]``: returns the float32 output ``[B, 1, nH, D]`` and the log-sum-exp ``[B, nKV, G]``."""
    b, s, nh, d = q.shape
    nkv = k_cache.shape[1]
    if s != 1:
        raise ValueError(f"ragged decode attention takes one new token per sequence, got {s}")
    if platform not in ("tpu", "gpu", "cpu"):
        raise ValueError(f"no ragged decode kernel for platform {platform!r}; use decode_attention='dense'")
    k_cache, v_cache = (c if c.dtype == q.dtype else c.astype(q.dtype) for c in (k_cache, v_cache))
    qg = q.reshape(b, nkv, nh // nkv, d)
    if platform == "gpu":
        out, lse = ragged_decode_attention_gpu(qg, k_cache, v_cache, kv_ok)
    else:
        out, lse = ragged_decode_attention(qg, k_cache, v_cache, kv_ok, block=block, interpret=platform == "cpu")
    return out.reshape(b, 1, nh, d), lse


def supported_on(platform: str, head_dim: int, cache_len: int) -> bool:
    """Whether ``platform``'s ragged kernel takes these shapes (else decode attention stays dense)."""
    if platform == "gpu":
        return gpu_block(head_dim, cache_len) is not None
    return platform in ("tpu", "cpu") and supported(head_dim, cache_len)


# --- GPU: the same contract through Pallas' Triton backend ----------------------------------------------

_GPU_ROWS = 16  # Triton's dot wants at least 16 rows: the G query heads of a KV head are padded to them


def gpu_block(head_dim: int, cache_len: int) -> int | None:
    """The slot block of :func:`ragged_decode_attention_gpu` for these shapes, or None where it does not
    apply (Triton blocks are powers of two: head_dim one of 16..256, cache length a multiple of 16)."""
    if head_dim not in (16, 32, 64, 128, 256):
        return None
    return next((bk for bk in (64, 32, 16) if cache_len % bk == 0), None)


def _gpu_kernel(first_ref, last_ref, q_ref, k_ref, v_ref, ok_ref, acc_ref, m_ref, l_ref, *, scale: float,
                block: int, exact: bool):
    """One (sequence, KV head, split): fold the split's blocks that hold valid slots into an unnormalised
    float32 accumulator with its running max and sum (merged across splits by the caller)."""
    span = k_ref.shape[0]
    base = pl.program_id(0) * span
    lo = jnp.clip(first_ref[()] - base, 0, span) // block
    hi = (jnp.clip(last_ref[()] + 1 - base, 0, span) + block - 1) // block
    q = q_ref[...]

    def fold(i, carry):
        acc, m, l = carry
        at = pl.ds(pl.multiple_of(i * block, block), block)
        k, v = k_ref[at, :], v_ref[at, :]
        ok = ok_ref[at] != 0
        s = plgpu.dot(q, k, trans_b=True, allow_tf32=not exact) * scale  # [rows, block] float32
        s = jnp.where(ok[None, :], s, _FLOOR)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        p = jnp.where(ok[None, :], jnp.exp(s - m_new[:, None]), 0.0)
        corr = jnp.exp(m - m_new)
        pv = plgpu.dot(p.astype(v.dtype), v, allow_tf32=not exact)
        return acc * corr[:, None] + pv, m_new, corr * l + jnp.sum(p, axis=1)

    rows, d = q.shape
    init = (jnp.zeros((rows, d), jnp.float32), jnp.full((rows,), _FLOOR, jnp.float32), jnp.zeros((rows,), jnp.float32))
    acc, m, l = jax.lax.fori_loop(lo, hi, fold, init)
    acc_ref[...], m_ref[...], l_ref[...] = acc, m, l


@functools.partial(jax.jit, static_argnames=("splits", "interpret"))
def ragged_decode_attention_gpu(q, k_cache, v_cache, kv_ok, *, splits: int = 0, interpret: bool = False):
    """:func:`ragged_decode_attention` (same arguments and results) as a Pallas Triton kernel for GPUs.

    The cache is read in place, ``[B, nKV, T, D]``. Each (sequence, KV head) is cut into ``splits``
    equal slices of slots (split-K: a batch-1 step still fills the GPU; 0 picks enough for ~256
    programs); a program walks only the blocks of its slice between the sequence's first and last
    valid slot, masking the slots inside that range that are not valid (a right-padded prompt's
    padding), and the slices merge through their running max and sum."""
    b, nkv, g, d = q.shape
    t = k_cache.shape[2]
    if k_cache.shape != (b, nkv, t, d) or v_cache.shape != k_cache.shape or kv_ok.shape != (b, t):
        raise ValueError(f"ragged decode attention: q {q.shape}, caches {k_cache.shape}/{v_cache.shape} and kv_ok "
                         f"{kv_ok.shape} disagree (want [B, nKV, G, D], [B, nKV, T, D] and [B, T])")
    block = gpu_block(d, t)
    if block is None:
        raise ValueError(f"the GPU ragged decode kernel needs head_dim in 16..256 (a power of two) and a cache "
                         f"length that is a multiple of 16; got head_dim {d}, cache length {t}")
    r = max(_GPU_ROWS, 1 << (g - 1).bit_length())  # rows of the query tile
    blocks = t // block
    want = splits or max(1, 256 // (b * nkv))
    splits = 1
    while splits * 2 <= min(want, blocks) and blocks % (splits * 2) == 0:
        splits *= 2
    ok = kv_ok.astype(bool)
    first, last = valid_range(ok)
    rows = jnp.zeros((b, nkv, r, d), q.dtype).at[:, :, :g].set(q)
    span = t // splits
    call = pl.pallas_call(
        functools.partial(_gpu_kernel, scale=1.0 / math.sqrt(d), block=block, exact=q.dtype == jnp.float32),
        grid=(splits,),
        in_specs=[pl.BlockSpec((), lambda j: ()), pl.BlockSpec((), lambda j: ()),
                  pl.BlockSpec((r, d), lambda j: (0, 0)),
                  pl.BlockSpec((span, d), lambda j: (j, 0)), pl.BlockSpec((span, d), lambda j: (j, 0)),
                  pl.BlockSpec((span,), lambda j: (j,))],
        out_specs=[pl.BlockSpec((None, r, d), lambda j: (j, 0, 0)),
                   pl.BlockSpec((None, r), lambda j: (j, 0)), pl.BlockSpec((None, r), lambda j: (j, 0))],
        out_shape=[jax.ShapeDtypeStruct((splits, r, d), jnp.float32),
                   jax.ShapeDtypeStruct((splits, r), jnp.float32),
                   jax.ShapeDtypeStruct((splits, r), jnp.float32)],
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2),  # Triton (not Mosaic GPU)
        interpret=interpret,
        name="ragged_decode_attention_gpu",
    )
    per_head = jax.vmap(call, in_axes=(None, None, 0, 0, 0, None))  # over KV heads (validity is per sequence)
    acc, m, l = jax.vmap(per_head)(first, last, rows, k_cache, v_cache, ok.astype(jnp.int32))
    # acc [B, nKV, splits, R, D]; m, l [B, nKV, splits, R]: merge the splits
    top = jnp.max(m, axis=2, keepdims=True)
    w = jnp.exp(m - top) * (l > 0)
    total = jnp.sum(w * l, axis=2)
    out = jnp.sum(w[..., None] * acc, axis=2) / jnp.where(total == 0, 1.0, total)[..., None]
    lse = jnp.where(total == 0, -jnp.inf, top[:, :, 0] + jnp.log(jnp.where(total == 0, 1.0, total)))
    return out[:, :, :g], lse[:, :, :g]
