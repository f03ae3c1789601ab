"""Attention: the one place that decides which kernel runs, and the pure-JAX kernels themselves.

:func:`prefill_plan` and :func:`decode_plan` turn the model's :class:`~internlm_jax.settings.EngineSettings`,
the backend, dtype, length and mesh into the path taken; forward, prefill, decode and the planner all
ask them. Kernels here: dense attention with the reference numerics (scores and softmax in float32),
one fused ``jax.nn.dot_product_attention`` call over whole right-padded rows (cuDNN flash attention on
GPU), blockwise online-softmax attention on one device (linear memory, a static block schedule with no
per-block branch), and the block folds that ring attention (:mod:`internlm_jax.ring`) shares.

K and V stay at the KV head count: query head ``j`` reads KV head ``j // G``, expressed by viewing
the query heads as ``[nKV, G]`` rather than by repeating K/V to ``nH`` heads.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

MASK_VALUE = float(jnp.finfo(jnp.float32).min)
NEG = jnp.float32(-jnp.inf)


def causal_mask(q_len: int, kv_len: int, offset: int | jax.Array = 0) -> jax.Array:
    """``[q_len, kv_len]`` bool: query ``i`` (absolute index ``offset + i``) sees keys ``<=`` it."""
    q = jnp.arange(q_len)[:, None] + offset
    return q >= jnp.arange(kv_len)[None, :]


def dense_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None) -> jax.Array:
    """softmax(q k^T / sqrt(D) + mask) v.

    q: ``[B, S, nH, D]``; k, v: ``[B, T, nKV, D]``; mask: bool, broadcastable to ``[B, S, T]``
    (True = may attend). Returns ``[B, S, nH, D]`` in q's dtype. A row with no visible key gets a
    uniform distribution (finite), like the reference's additive minimum mask. Q, K and V are put
    head-major first (:func:`head_major_attention`): they are S/T-sized, the scores S x T-sized.
    """
    b, s, nh, d = q.shape
    nkv = k.shape[2]
    qh = q.reshape(b, s, nkv, nh // nkv, d).transpose(0, 2, 3, 1, 4)
    out = head_major_attention(qh, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), mask)
    return out.transpose(0, 3, 1, 2, 4).reshape(b, s, nh, d)


def head_major_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None) -> jax.Array:
    """Dense attention in the KV cache's own layout: q ``[B, nKV, G, S, D]``, k/v ``[B, nKV, T, D]``,
    mask broadcastable to ``[B, S, T]``; returns ``[B, nKV, G, S, D]`` in q's dtype. With batch and
    heads leading and T last, XLA's dots and the softmax need no transpose of the scores (with
    ``[B, S, nH, D]`` operands XLA:CPU transposed the scores twice per layer, 1.5-6x slower)."""
    b, nkv, g, s, d = q.shape
    scores = jnp.einsum("bngsd,bntd->bngst", q, k, preferred_element_type=jnp.float32)
    scores = scores / jnp.float32(math.sqrt(d))
    if mask is not None:
        mask = jnp.broadcast_to(mask, (b, s, k.shape[2]))[:, None, None]
        scores = jnp.where(mask, scores, MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bngst,bntd->bngsd", probs, v, preferred_element_type=jnp.float32)
    return out.astype(q.dtype)


def row_chunk_attention(q: jax.Array, k: jax.Array, v: jax.Array, q_slots: jax.Array, k_ok: jax.Array, *,
                        block: int | None) -> jax.Array:
    """A prefill chunk's attention over its cache row, in the cache's layout: q ``[1, nKV, G, C, D]``,
    k/v ``[1, nKV, T, D]`` (the row's first T slots), ``q_slots [C]`` the chunk's slots, ``k_ok [T]`` the
    valid slots; causal by slot. Returns ``[1, nKV, G, C, D]`` in q's dtype.

    ``block=None``: dense, [C, T] scores. Otherwise key blocks of ``block`` slots folded with an online
    softmax (float32), one block of scores at a time: a 512-token chunk late in a 256K-slot row would
    otherwise hold 16 GiB of float32 scores per layer at the 7B-1M shape (32 heads). A query that sees
    no key gets zeros here and the mean of the values in the dense form; a chunk's real tokens always
    see themselves, so only padding queries can differ, and their outputs are not used."""
    t = k.shape[2]
    if block is None or block >= t:
        return head_major_attention(q, k, v, k_ok[None, :] & (jnp.arange(t)[None, :] <= q_slots[:, None])[None])
    scale = jnp.float32(1.0 / math.sqrt(q.shape[-1]))
    n_blocks = -(-t // block)

    def fold(carry, j):
        m, l, acc = carry
        # the last block is moved back to end at T; slots an earlier block covered are masked
        start = jnp.minimum(j * block, t - block)
        slots = start + jnp.arange(block)
        kb = jax.lax.dynamic_slice_in_dim(k, start, block, axis=2)
        vb = jax.lax.dynamic_slice_in_dim(v, start, block, axis=2)
        ok = (slots >= j * block) & jax.lax.dynamic_slice_in_dim(k_ok, start, block)
        visible = ok[None, :] & (slots[None, :] <= q_slots[:, None])  # [C, block]
        s = jnp.einsum("bngcd,bntd->bngct", q, kb, preferred_element_type=jnp.float32) * scale
        m, l, p, correction = online_softmax_step(m, l, jnp.where(visible, s, NEG))
        pv = jnp.einsum("bngct,bntd->bngcd", p.astype(v.dtype), vb, preferred_element_type=jnp.float32)
        return (m, l, acc * correction[..., None] + pv), None

    stats = jnp.full(q.shape[:-1], -jnp.inf, jnp.float32)
    init = (stats, jnp.zeros_like(stats), jnp.zeros(q.shape, jnp.float32))
    (_, l, acc), _ = jax.lax.scan(fold, init, jnp.arange(n_blocks))
    return (acc / jnp.where(l == 0, 1.0, l)[..., None]).astype(q.dtype)


def visible_mask(q_idx, q_start, k_idx, k_ok, causal: bool):
    """[B, Sq, Sk]: padding masked; causal by global index; with q_start, only the query's own
    segment (packed documents are contiguous, so "same segment" is "index >= the segment start")."""
    visible = k_ok[:, None, :]
    if causal:
        visible = visible & (k_idx[:, None, :] <= q_idx[:, :, None])
    if q_start is not None:
        visible = visible & (k_idx[:, None, :] >= q_start[:, :, None])
    return visible


def block_has_work(q_idx, k_idx, k_ok, causal: bool):
    """Whether any key of a block can be visible to any query of a block (else it is skipped)."""
    if not causal:
        return jnp.any(k_ok)
    return jnp.any(k_ok) & (jnp.min(jnp.where(k_ok, k_idx, jnp.iinfo(jnp.int32).max)) <= jnp.max(q_idx))


def online_softmax_step(m, l, s):
    """A block of float32 scores ``s [..., K]`` into the running max ``m`` and sum ``l`` ``[...]`` of an
    online softmax. Returns (m, l, the block's unnormalised probabilities, the factor that rescales what
    was accumulated before); a row with nothing visible yet (all -inf) stays empty."""
    m_new = jnp.maximum(m, jnp.max(s, axis=-1))
    m_safe = jnp.where(jnp.isinf(m_new), 0.0, m_new)
    p = jnp.exp(s - m_safe[..., None])
    correction = jnp.exp(jnp.where(jnp.isinf(m), NEG, m - m_safe))
    return m_new, l * correction + jnp.sum(p, axis=-1), p, correction


def fold_block(q, k, v, q_idx, q_start, k_idx, k_ok, m, l, acc, scale, causal: bool):
    """Fold one key block into the accumulators of one query block (online softmax, float32).

    q [B, Sq, nKV, G, D]; k, v [B, Sk, nKV, D]; q_idx [B, Sq]; k_idx, k_ok [B, Sk];
    m, l [B, nKV, G, Sq]; acc [B, Sq, nKV, G, D].
    """
    visible = visible_mask(q_idx, q_start, k_idx, k_ok, causal)
    s = jnp.einsum("bqngd,bknd->bngqk", q, k, preferred_element_type=jnp.float32) * scale
    s = jnp.where(visible[:, None, None], s, NEG)
    m_new, l, p, correction = online_softmax_step(m, l, s)
    pv = jnp.einsum("bngqk,bknd->bqngd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    acc = acc * jnp.moveaxis(correction, -1, 1)[..., None] + pv
    return m_new, l, acc


def fold_block_fused(q, k, v, q_idx, q_start, k_idx, k_ok, m, l, acc, scale, causal: bool, implementation: str):
    """As :func:`fold_block`, through ``jax.nn.dot_product_attention`` (cuDNN on GPU): the block's
    normalised output and log-sum-exp are folded into the running (m, l, acc)."""
    b, sq, nkv, g, d = q.shape
    visible = visible_mask(q_idx, q_start, k_idx, k_ok, causal)
    o, lse = jax.nn.dot_product_attention(q.reshape(b, sq, nkv * g, d), k, v, mask=visible[:, None], scale=float(scale),
                                          implementation=implementation, return_residual=True)
    lse = lse.astype(jnp.float32).reshape(b, sq, nkv, g).transpose(0, 2, 3, 1)  # [B, nKV, G, Sq]
    any_visible = jnp.any(visible, axis=-1)[:, None, None, :]
    return fold_partial(m, l, acc, o.astype(jnp.float32).reshape(b, sq, nkv, g, d), lse, any_visible)



def fold_partial(m, l, acc, o, lse, any_visible=None):
    """Fold a normalised partial output ``o [B, S, nKV, G, D]`` with its log-sum-exp ``lse [B, nKV, G, S]``
    into the running online-softmax state."""
    if any_visible is not None:
        lse = jnp.where(any_visible, lse, NEG)
        o = jnp.where(jnp.moveaxis(any_visible, -1, 1)[..., None], o, 0.0)
    m_new = jnp.maximum(m, lse)
    m_safe = jnp.where(jnp.isinf(m_new), 0.0, m_new)
    c_old = jnp.exp(jnp.where(jnp.isinf(m), NEG, m - m_safe))
    c_blk = jnp.exp(jnp.where(jnp.isinf(lse), NEG, lse - m_safe))
    l = l * c_old + c_blk
    acc = acc * jnp.moveaxis(c_old, -1, 1)[..., None] + o * jnp.moveaxis(c_blk, -1, 1)[..., None]
    return m_new, l, acc


def finish_online_softmax(m, l, acc):
    """The normalised output (``acc / l``, ``[B, S, nKV, G, D]``) and log-sum-exp (``[B, nKV, G, S]``)
    of online-softmax accumulators; a query that saw no key gets zeros and -inf."""
    safe = jnp.where(l == 0, 1.0, l)
    return acc / safe.transpose(0, 3, 1, 2)[..., None], jnp.where(l == 0, NEG, m + jnp.log(safe))


def blocks_backward(q, k, v, q_idx, k_idx, k_ok, do, lse, delta, *, block: int, causal: bool = True,
                        q_start=None):
    """Flash-style gradients of blockwise attention of q over k, v, given the *final* log-sum-exp of every
    query (shared by the one-device kernel and each ring step).

    q, do [B, Sq, nKV, G, D]; k, v [B, Sk, nKV, D]; lse, delta (= rowsum(dO * O)) [B, nKV, G, Sq].
    Outer scan over key blocks (dK, dV of a block accumulate over query blocks), inner scan over query
    blocks; hidden blocks are skipped. Returns float32 (dq, dk, dv)."""
    b, sq, nkv, g, d = q.shape
    sk = k.shape[1]
    scale = 1.0 / math.sqrt(d)
    bq, bk = min(block, sq), min(block, sk)
    nq, nk = sq // bq, sk // bk
    qs = q.reshape(b, nq, bq, nkv, g, d).swapaxes(0, 1)
    dos = do.reshape(b, nq, bq, nkv, g, d).swapaxes(0, 1)
    qis = q_idx.reshape(b, nq, bq).swapaxes(0, 1)
    qss = (q_idx if q_start is None else q_start).reshape(b, nq, bq).swapaxes(0, 1)
    lses = lse.reshape(b, nkv, g, nq, bq).transpose(3, 0, 1, 2, 4)
    deltas = delta.reshape(b, nkv, g, nq, bq).transpose(3, 0, 1, 2, 4)

    def per_k_block(dq, xs):
        kb, vb, ki, ko = xs

        def per_q_block(carry, ys):
            dkb, dvb = carry
            qb, dob, qi, qs0, lb_, db = ys
            visible = visible_mask(qi, None if q_start is None else qs0, ki, ko, causal)
            any_visible = block_has_work(qi, ki, ko, causal)

            def grads(c):
                dkb, dvb = c
                s = jnp.einsum("bqngd,bknd->bngqk", qb, kb, preferred_element_type=jnp.float32) * scale
                p = jnp.where(visible[:, None, None], jnp.exp(s - jnp.where(jnp.isinf(lb_), 0.0, lb_)[..., None]), 0.0)
                dvb = dvb + jnp.einsum("bngqk,bqngd->bknd", p, dob)
                dp = jnp.einsum("bqngd,bknd->bngqk", dob, vb.astype(jnp.float32))
                ds = p * (dp - db[..., None]) * scale
                dkb = dkb + jnp.einsum("bngqk,bqngd->bknd", ds, qb.astype(jnp.float32))
                return (dkb, dvb), jnp.einsum("bngqk,bknd->bqngd", ds, kb.astype(jnp.float32))

            def skip(c):
                return c, jnp.zeros(qb.shape, jnp.float32)

            return jax.lax.cond(any_visible, grads, skip, (dkb, dvb))

        zero = jnp.zeros((b, bk, nkv, d), jnp.float32)
        (dkb, dvb), dq_blocks = jax.lax.scan(per_q_block, (zero, zero), (qs, dos, qis, qss, lses, deltas))
        return dq + dq_blocks, (dkb, dvb)

    ks = k.reshape(b, nk, bk, nkv, d).swapaxes(0, 1)
    vs = v.reshape(b, nk, bk, nkv, d).swapaxes(0, 1)
    kis = k_idx.reshape(b, nk, bk).swapaxes(0, 1)
    kos = k_ok.reshape(b, nk, bk).swapaxes(0, 1)
    dq, (dks, dvs) = jax.lax.scan(per_k_block, jnp.zeros((nq, b, bq, nkv, g, d), jnp.float32), (ks, vs, kis, kos))
    dq = dq.swapaxes(0, 1).reshape(b, sq, nkv, g, d)
    return dq, dks.swapaxes(0, 1).reshape(b, sk, nkv, d), dvs.swapaxes(0, 1).reshape(b, sk, nkv, d)


def blockwise_attention(q, k, v, valid, *, block: int, impl: str = "blockwise", q_start=None):
    """Causal attention of a whole sequence on one device, ``block`` queries x ``block`` keys at a time.

    q ``[B, S, nH, D]``, k/v ``[B, S, nKV, D]``, valid ``[B, S]`` (padding keys masked); S a multiple
    of ``block``. ``q_start`` (optional ``[B, S]``): where each token's packed document starts
    (segment masking). The lower-triangular block pairs are one static list scanned in order (row by
    row), so there is no per-block branch or host sync and no more than one block of scores exists at
    once: memory is linear in S, for the gradient too (a custom VJP recomputes each block's
    probabilities from the saved log-sum-exp, :func:`blocks_backward`, instead of keeping them).
    ``impl``: "blockwise" (pure-JAX fold) or "xla"/"cudnn" (``jax.nn.dot_product_attention`` per
    block). Rows with no visible key get zeros.
    """
    b, s, nh, d = q.shape
    if s % block:
        raise ValueError(f"blockwise attention: length {s} is not a multiple of the block {block}")
    idx = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    q_start = jnp.zeros((b, s), jnp.int32) if q_start is None else jnp.asarray(q_start, jnp.int32)  # one document
    # as in ring attention: tie the index arrays to q, so that a layer scan's backward pass does not
    # hoist every block's mask (computed from constants alone) out of the loop: stacked, that is
    # quadratic in S
    q, idx, valid, q_start = jax.lax.optimization_barrier((q, idx, jnp.asarray(valid, bool), q_start))
    return _blockwise(q, k, v, idx, valid, q_start, block, impl)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def _blockwise(q, k, v, idx, valid, q_start, block, impl):
    return _blockwise_forward(q, k, v, idx, valid, q_start, block, impl)[0]


def _blockwise_forward(q, k, v, idx, valid, q_start, block, impl):
    """(output [B, S, nH, D], log-sum-exp [B, nKV, G, S]) along the static block schedule."""
    b, s, nh, d = q.shape
    nkv = k.shape[2]
    g = nh // nkv
    n = s // block
    rows, cols = np.tril_indices(n)  # row-major: for each query block, key blocks 0..i
    scale = 1.0 / math.sqrt(d)
    qb = q.reshape(b, n, block, nkv, g, d)
    kb, vb = k.reshape(b, n, block, nkv, d), v.reshape(b, n, block, nkv, d)
    okb = valid.reshape(b, n, block)
    idxb = idx.reshape(b, n, block)
    startb = q_start.reshape(b, n, block)

    def step(carry, ij):
        out, lse, m, l, acc = carry
        i, j = ij
        fresh = j == 0  # first key block of a new query row
        m = jnp.where(fresh, NEG, m)
        l = jnp.where(fresh, 0.0, l)
        acc = jnp.where(fresh, 0.0, acc)
        args = (qb[:, i], kb[:, j], vb[:, j], idxb[:, i], startb[:, i], idxb[:, j], okb[:, j], m, l, acc, scale, True)
        m, l, acc = fold_block(*args) if impl == "blockwise" else fold_block_fused(*args, impl)
        o, row_lse = finish_online_softmax(m, l, acc)
        # written at every pair of the row; the row's last pair (j == i) leaves the final value
        out = jax.lax.dynamic_update_index_in_dim(out, o.astype(out.dtype), i, axis=1)
        lse = jax.lax.dynamic_update_index_in_dim(lse, row_lse, i, axis=0)
        return (out, lse, m, l, acc), None

    out = jnp.zeros((b, n, block, nkv, g, d), q.dtype)
    lse = jnp.full((n, b, nkv, g, block), NEG)
    m = jnp.full((b, nkv, g, block), NEG)
    l = jnp.zeros((b, nkv, g, block), jnp.float32)
    acc = jnp.zeros((b, block, nkv, g, d), jnp.float32)
    pairs = (jnp.asarray(rows, jnp.int32), jnp.asarray(cols, jnp.int32))
    (out, lse, *_), _ = jax.lax.scan(step, (out, lse, m, l, acc), pairs)
    lse = lse.transpose(1, 2, 3, 0, 4).reshape(b, nkv, g, s)
    return out.reshape(b, s, nh, d), lse


def _blockwise_fwd(q, k, v, idx, valid, q_start, block, impl):
    out, lse = _blockwise_forward(q, k, v, idx, valid, q_start, block, impl)
    return out, (q, k, v, idx, valid, q_start, out, lse)


def _blockwise_bwd(block, impl, res, d_out):
    q, k, v, idx, valid, q_start, out, lse = res
    b, s, nh, d = q.shape
    nkv = k.shape[2]
    g = nh // nkv
    do = d_out.reshape(b, s, nkv, g, d).astype(jnp.float32)
    delta = jnp.sum(do * out.reshape(b, s, nkv, g, d).astype(jnp.float32), -1).transpose(0, 2, 3, 1)
    dq, dk, dv = blocks_backward(q.reshape(b, s, nkv, g, d), k, v, idx, idx, valid, do, lse, delta, block=block,
                                 q_start=q_start)
    return (dq.reshape(q.shape).astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None, None)


_blockwise.defvjp(_blockwise_fwd, _blockwise_bwd)


def fused_attention(q, k, v, lengths, *, implementation: str):
    """Causal attention of whole right-padded sequences in one ``jax.nn.dot_product_attention`` call:
    cuDNN's flash attention on GPU (memory linear in S, no [S, S] scores, no block loop), XLA's
    dense kernel elsewhere. q ``[B, S, nH, D]``, k/v ``[B, S, nKV, D]`` (GQA as is), ``lengths [B]``
    the real tokens of each row, which come first (rows are right-padded). Padding query rows get
    zeros (cuDNN leaves them undefined; their keys and values must not carry NaN into a cache)."""
    b, s = q.shape[:2]
    lengths = jnp.asarray(lengths, jnp.int32)
    o = jax.nn.dot_product_attention(q, k, v, is_causal=True, query_seq_lengths=lengths,
                                     key_value_seq_lengths=lengths, implementation=implementation)
    real = jnp.arange(s)[None, :] < lengths[:, None]
    return jnp.where(real[:, :, None, None], o, 0).astype(q.dtype)


# --- the selector ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PrefillPlan:
    """How a forward/prefill of ``length`` tokens attends. path: "dense" ([S, S] scores, short inputs),
    "fused" (one device, one :func:`fused_attention` call over right-padded rows), "blockwise" (one
    device, :func:`blockwise_attention`), "ring" (over the mesh's sequence axis, or one shard of it,
    :func:`internlm_jax.ring.ring_attention`). kernel: the block kernel of those two, or the
    implementation of the fused call."""

    path: str
    kernel: str


def platform_of(mesh) -> str:
    """The backend programs compile for: the mesh's devices (e.g. TPU topologies on a CPU host) or JAX's."""
    return mesh.devices.flat[0].platform if mesh is not None else jax.default_backend()


def prefill_plan(settings, *, length: int, mesh, dtype, segments: bool = False,
                 key_mask: bool = False) -> PrefillPlan:
    """The one rule for prefill attention (forward, prefill, training and the planner ask here).
    ``segments``: packed documents (segment masking), which the fused call does not take;
    ``key_mask``: an arbitrary attention mask (e.g. a caller's left padding), which the fused call does
    not take (the generator right-pads its rows for it instead).

    One device: dense up to ``blockwise_from`` tokens and blockwise beyond, except that a cuDNN kernel
    (``"auto"`` on GPU in bf16/fp16) runs as one fused call beyond ``blockwise_from`` (flash attention
    needs no blocks), ``attention="cudnn"`` as one fused call at every length, and ``attention="xla"``
    as one fused call up to ``blockwise_from`` (XLA's kernel builds the [S, S] scores)."""
    platform = platform_of(mesh)
    choice = settings.attention
    kernel = choice
    if choice in ("auto", "dense"):
        half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
        kernel = "cudnn" if platform == "gpu" and half else "blockwise"
    if mesh is not None and mesh.shape["sequence"] > 1:
        return PrefillPlan("ring", kernel)
    short = length <= settings.blockwise_from
    if mesh is None and choice != "dense" and not segments and not key_mask and (
            (kernel == "cudnn" and (choice == "cudnn" or not short)) or (kernel == "xla" and short)):
        return PrefillPlan("fused", kernel)
    if choice == "dense" or length <= settings.blockwise_from:
        return PrefillPlan("dense", kernel)
    if mesh is not None:  # sharded over batch/heads: the ring code with one sequence shard
        return PrefillPlan("ring", kernel)
    return PrefillPlan("blockwise", "blockwise" if kernel == "splash" else kernel)


def decode_plan(settings, *, head_dim: int, local_cache_len: int, mesh) -> str:
    """The one rule for decode attention: "ragged" (a Pallas kernel reading only filled blocks: Mosaic on
    TPU, Triton on GPU, the TPU kernel interpreted on CPU) or "dense". ``"auto"`` picks the kernel on TPU
    only: the GPU kernel is checked in the Pallas interpreter and lowers to Triton, but has not yet been
    timed against the dense step on a GPU."""
    from .decode_kernel import supported_on

    choice = settings.decode_attention
    if choice == "dense":
        return "dense"
    platform = platform_of(mesh)
    fits = supported_on(platform, head_dim, local_cache_len)
    if choice == "ragged":
        return "ragged" if fits else "dense"
    return "ragged" if platform == "tpu" and fits else "dense"


def decode_weights(settings, mesh) -> str:
    """"packed" (per-layer arrays in the packed decode form, one device), "per_layer" (one weight array
    per layer; on CPU every slice of a stacked array is copied before its matmul) or "sliced" (static
    slices of the stacked arrays, read in place on GPU and TPU)."""
    if settings.decode_weights == "packed" and mesh is not None:
        raise ValueError("decode_weights='packed' is for a model without a mesh; use 'per_layer' or 'sliced'")
    if settings.decode_weights != "auto":
        return settings.decode_weights
    if platform_of(mesh) != "cpu":
        return "sliced"
    return "packed" if mesh is None else "per_layer"


def cached_attention(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, valid: jax.Array) -> jax.Array:
    """Decode attention of q ``[B, 1, nH, D]`` over a cache buffer (:mod:`internlm_jax.cache`:
    ``[B, nKV, T, D]``, or ``[B * nKV, T, D]`` without a mesh): the einsums read the buffer in its
    layout, batch and heads leading. valid ``[B, T]``. Scores and softmax in float32; returns
    ``[B, 1, nH, D]`` in q's dtype."""
    b, s, nh, d = q.shape
    t = k_cache.shape[-2]
    nkv = k_cache.shape[1] if k_cache.ndim == 4 else k_cache.shape[0] // b
    rows = k_cache.shape[:-2]  # (B, nKV) or (B * nKV,)
    qg = q.reshape(rows + (nh // nkv, d))
    ok = jnp.broadcast_to(valid[:, None, :], (b, nkv, t)).reshape(rows + (1, t))
    scores = jnp.einsum("...gd,...td->...gt", qg, k_cache.astype(q.dtype), preferred_element_type=jnp.float32)
    scores = jnp.where(ok, scores / jnp.float32(math.sqrt(d)), MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(v_cache.dtype)
    out = jnp.einsum("...gt,...td->...gd", probs, v_cache, preferred_element_type=jnp.float32)
    return out.astype(q.dtype).reshape(b, 1, nh, d)
