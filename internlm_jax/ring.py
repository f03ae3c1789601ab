"""Ring attention over the ``sequence`` mesh axis, and decode attention over a sequence-sharded cache.

Prefill: every device holds a slice of the queries and of the keys/values (at the GQA head count);
K/V blocks travel around the ring with ``ppermute`` while each device folds them into float32
online-softmax accumulators. Inside a ring step the local attention is blockwise (a ``block`` of
queries against a ``block`` of keys at a time), so no more than one block of scores exists at once,
and blocks that the causal mask hides entirely are skipped. Causality comes from the *global* index
of every token, so any token layout works; :func:`zigzag_order` gives the balanced one (device ``i``
holds chunks ``i`` and ``2n-1-i``), under which every device does the same amount of causal work.

Decode: each device attends to the cache slots it holds and returns its partial output with its
log-sum-exp; the partials merge exactly across the axis.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from .attention import (
    NEG,
    block_has_work,
    blocks_backward,
    finish_online_softmax,
    fold_block,
    fold_block_fused,
    fold_partial,
)
from .sharding import logical_to_spec

BLOCK = 512  # queries/keys per block of the local blockwise attention


def pallas_interpret(platform: str, impl: str) -> bool:
    """Pallas TPU kernels compile with Mosaic on TPU and run in the Pallas interpreter on CPU (numerics
    checks); on any other platform asking for one is an error."""
    if platform not in ("tpu", "cpu"):
        raise ValueError(f"attention impl {impl!r} is a Pallas TPU kernel; it cannot run on {platform}")
    return platform == "cpu"


def padded_length(length: int, n: int, block: int = BLOCK) -> int:
    """Smallest length >= ``length`` that the ring layout takes: a multiple of 2n, and of n x block
    once a device's chunk is longer than one block."""
    padded = -(-length // (2 * n)) * (2 * n)
    if padded // n > block:
        padded = -(-length // (n * block)) * (n * block)
    return padded


def zigzag_order(length: int, n: int) -> np.ndarray:
    """Permutation of ``range(length)`` (length a multiple of 2n) that gives device ``i`` chunks
    ``i`` and ``2n-1-i`` of ``2n`` equal chunks: the causal work per device is then equal."""
    if length % (2 * n):
        raise ValueError(f"zigzag layout needs a length divisible by 2 x {n}, got {length}")
    chunks = np.arange(length).reshape(2 * n, -1)
    return np.concatenate([np.concatenate([chunks[i], chunks[2 * n - 1 - i]]) for i in range(n)])


def local_attention(q, k, v, q_idx, k_idx, k_ok, m, l, acc, *, block: int, causal: bool = True,
                    impl: str = "blockwise", q_start=None):
    """Blockwise attention of local queries over one K/V chunk, updating (m, l, acc).

    ``impl``: "blockwise" (pure JAX online softmax, the default), or "xla" / "cudnn" to compute each
    block with ``jax.nn.dot_product_attention`` of that implementation (cuDNN wants bf16/fp16 on GPU)."""
    b, sq, nkv, g, d = q.shape
    sk = k.shape[1]
    scale = 1.0 / math.sqrt(d)
    bq, bk = min(block, sq), min(block, sk)
    if impl not in ("blockwise", "xla", "cudnn", "splash"):
        raise ValueError(f"unknown attention impl {impl!r}; use 'blockwise', 'splash', 'xla' or 'cudnn'")
    impl = "blockwise" if impl == "splash" else impl  # splash falls back here for shapes it does not take
    if sq % bq or sk % bk:
        raise ValueError(f"local lengths {sq}, {sk} must be multiples of the block size {block}")
    nq, nk = sq // bq, sk // bk

    def per_q_block(args):
        qb, qi, qs0, mb, lb, ab = args
        qs0 = None if q_start is None else qs0

        def per_k_block(carry, xs):
            kb, vb, ki, ko = xs
            visible = block_has_work(qi, ki, ko, causal)
            if impl == "blockwise":
                fold = lambda c: fold_block(qb, kb, vb, qi, qs0, ki, ko, *c, scale, causal)  # noqa: E731
            else:
                fold = lambda c: fold_block_fused(qb, kb, vb, qi, qs0, ki, ko, *c, scale, causal, impl)  # noqa: E731
            return jax.lax.cond(visible, fold, lambda c: c, carry), None

        ks = k.reshape(b, nk, bk, nkv, d).swapaxes(0, 1)
        vs = v.reshape(b, nk, bk, nkv, d).swapaxes(0, 1)
        kis = k_idx.reshape(b, nk, bk).swapaxes(0, 1)
        kos = k_ok.reshape(b, nk, bk).swapaxes(0, 1)
        (mb, lb, ab), _ = jax.lax.scan(per_k_block, (mb, lb, ab), (ks, vs, kis, kos))
        return mb, lb, ab

    qs = q.reshape(b, nq, bq, nkv, g, d).swapaxes(0, 1)
    qis = q_idx.reshape(b, nq, bq).swapaxes(0, 1)
    qss = (q_idx if q_start is None else q_start).reshape(b, nq, bq).swapaxes(0, 1)
    ms = m.reshape(b, nkv, g, nq, bq).transpose(3, 0, 1, 2, 4)
    ls = l.reshape(b, nkv, g, nq, bq).transpose(3, 0, 1, 2, 4)
    accs = acc.reshape(b, nq, bq, nkv, g, d).swapaxes(0, 1)
    ms, ls, accs = jax.lax.map(per_q_block, (qs, qis, qss, ms, ls, accs))
    m = ms.transpose(1, 2, 3, 0, 4).reshape(b, nkv, g, sq)
    l = ls.transpose(1, 2, 3, 0, 4).reshape(b, nkv, g, sq)
    acc = accs.swapaxes(0, 1).reshape(b, sq, nkv, g, d)
    return m, l, acc


@functools.lru_cache(maxsize=None)
def _splash_kernels(c: int, g: int, interpret: bool):
    """Pallas TPU splash-attention kernels (one KV head, ``g`` query heads, ``c x c``) for the two mask
    shapes a zigzag chunk pair can have: all visible, and causal (the same chunk)."""
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    b = min(512, c)
    sizes = sa.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b)
    with jax.ensure_compile_time_eval():  # concrete mask tables, safe to cache across traces
        return tuple(sa.make_splash_mqa_single_device(sa.MultiHeadMask([mask] * g), block_sizes=sizes,
                                                      save_residuals=True, interpret=interpret)
                     for mask in (sa.FullMask((c, c)), sa.CausalMask((c, c))))


def splash_local_attention(q, k, v, q_idx, q_ok, k_idx, k_ok, m, l, acc, *, interpret: bool, block: int = BLOCK):
    """As :func:`local_attention` (causal, no segments), through the Pallas TPU splash-attention kernel.

    The local queries and keys are each two contiguous chunks (the zigzag layout), so every (query
    chunk, key chunk) pair is either hidden (skipped), all visible (a full-mask kernel) or the same chunk
    (a causal kernel); padding is a second segment id. A pair of any other shape falls back to the
    pure-JAX blockwise fold. ``interpret`` runs the kernel in the Pallas interpreter (CPU checks)."""
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    b, sq, nkv, g, d = q.shape
    c = sq // 2
    full, causal = _splash_kernels(c, g, interpret)
    scale = 1.0 / math.sqrt(d)
    qs = (q.astype(jnp.float32) * scale).astype(q.dtype)
    q_seg, k_seg = (~q_ok).astype(jnp.int32), (~k_ok).astype(jnp.int32)

    def run(kernel, qh, kh, vh, qseg, kseg):
        def one(qh, kh, vh, qseg, kseg):  # qh [G, c, D], kh/vh [c, D]
            out, (lse,) = kernel(qh, kh, vh, segment_ids=sa.SegmentIds(qseg, kseg))
            return out, lse
        per_head = jax.vmap(one, in_axes=(0, 0, 0, None, None))  # over KV heads
        out, lse = jax.vmap(per_head)(qh.transpose(0, 2, 3, 1, 4), kh.transpose(0, 2, 1, 3), vh.transpose(0, 2, 1, 3),
                                      qseg, kseg)  # out [B, nKV, G, c, D], lse [B, nKV, G, c]
        return out.transpose(0, 3, 1, 2, 4).astype(jnp.float32), lse.astype(jnp.float32)

    halves = (slice(0, c), slice(c, sq))
    ms, ls, accs = [], [], []
    for qa in halves:
        mq, lq, aq = m[..., qa], l[..., qa], acc[:, qa]
        q_first, q_last = q_idx[0, qa.start], q_idx[0, qa.stop - 1]
        for kb in halves:
            k_first, k_last = k_idx[0, kb.start], k_idx[0, kb.stop - 1]
            args = (qs[:, qa], k[:, kb], v[:, kb], q_seg[:, qa], k_seg[:, kb])

            def with_kernel(kernel, state, args=args):
                return fold_partial(*state, *run(kernel, *args))

            def general(state, qa=qa, kb=kb):
                return local_attention(q[:, qa], k[:, kb], v[:, kb], q_idx[:, qa], k_idx[:, kb], k_ok[:, kb], *state,
                                       block=block)

            contiguous = (q_last - q_first == c - 1) & (k_last - k_first == c - 1)
            case = jnp.where(k_first > q_last, 0, jnp.where(~contiguous, 3, jnp.where(
                k_last < q_first, 1, jnp.where(k_first == q_first, 2, 3))))
            mq, lq, aq = jax.lax.switch(case, [lambda s: s, functools.partial(with_kernel, full),
                                               functools.partial(with_kernel, causal), general], (mq, lq, aq))
        ms.append(mq), ls.append(lq), accs.append(aq)
    return jnp.concatenate(ms, -1), jnp.concatenate(ls, -1), jnp.concatenate(accs, 1)


def _specs(mesh: Mesh, batch: int, nh: int, nkv: int):
    """shard_map specs: the batch split as the sharding rules split it everywhere else (each of data,
    fsdp that divides; so the cache and activations need no regathering), heads over tensor when both
    counts divide."""
    spec = logical_to_spec(("batch",), (batch,), mesh)
    t = mesh.shape["tensor"]
    heads = "tensor" if t > 1 and nh % t == 0 and nkv % t == 0 else None
    return (spec[0] if len(spec) else None), heads


def ring_attention(q, k, v, q_idx, kv_idx, kv_ok, mesh: Mesh, *, block: int = BLOCK, causal: bool = True,
                   impl: str = "blockwise", q_start=None):
    """Attention of q ``[B, S, nH, D]`` over k, v ``[B, S, nKV, D]``, the sequence split over ``mesh``'s
    ``sequence`` axis. q_idx/kv_idx ``[B, S]`` are global token indices (causality), kv_ok masks padding.
    q_start (optional, ``[B, S]``): index where each query's packed document starts (segment masking).
    Returns ``[B, S, nH, D]`` in q's dtype, sharded like q."""
    b, s, nh, d = q.shape
    nkv = k.shape[2]
    n = mesh.shape["sequence"]
    if s % n:
        raise ValueError(f"sequence length {s} must be a multiple of the sequence axis size {n}")
    bspec, heads = _specs(mesh, b, nh, nkv)
    t = mesh.shape["tensor"]
    if heads is None and t > 1 and nh % t == 0 and t % nkv == 0:
        # more tensor shards than KV heads: each shard gets a copy of the one KV head its query heads
        # read (GQA's grouping is kept), so the heads still split instead of every shard doing them all
        k, v = (jnp.repeat(x, t // nkv, axis=2) for x in (k, v))
        nkv, heads = t, "tensor"
    tok = P(bspec, "sequence")
    qkv = P(bspec, "sequence", heads, None)

    def forward(q, k, v, q_idx, kv_idx, kv_ok, q_start):
        """Per device: (output [lb, ls, lh, d] in q's dtype, log-sum-exp [lb, lkv, G, ls] float32)."""
        lb, ls, lh, _ = q.shape
        lkv = k.shape[2]
        qg = q.reshape(lb, ls, lkv, lh // lkv, d)
        m = jnp.full((lb, lkv, lh // lkv, ls), NEG)
        l = jnp.zeros((lb, lkv, lh // lkv, ls), jnp.float32)
        acc = jnp.zeros((lb, ls, lkv, lh // lkv, d), jnp.float32)
        q_ok = kv_ok  # before any rotation each device holds its own tokens' keys

        def step(carry, _):
            m, l, acc, k, v, kv_idx, kv_ok = carry
            if use_splash:
                m, l, acc = splash_local_attention(qg, k, v, q_idx, q_ok, kv_idx, kv_ok, m, l, acc,
                                                   interpret=interpret, block=block)
            else:
                m, l, acc = local_attention(qg, k, v, q_idx, kv_idx, kv_ok, m, l, acc, block=block, causal=causal,
                                            impl=impl, q_start=q_start if segmented else None)
            k, v, kv_idx, kv_ok = (jax.lax.ppermute(x, "sequence", perm) for x in (k, v, kv_idx, kv_ok))
            return (m, l, acc, k, v, kv_idx, kv_ok), None

        (m, l, acc, *_), _ = jax.lax.scan(step, (m, l, acc, k, v, kv_idx, kv_ok), None, length=n)
        out, lse = finish_online_softmax(m, l, acc)
        return out.reshape(lb, ls, lh, d).astype(q.dtype), lse

    def backward(q, k, v, q_idx, kv_idx, kv_ok, q_start, out, lse, d_out):
        """Per device, flash-style: the ring runs again, each block's probabilities are recomputed from q,
        k and the saved log-sum-exp, and dK/dV travel with their K/V back to their owner; nothing of
        size [queries x keys] is kept between blocks."""
        lb, ls, lh, _ = q.shape
        lkv = k.shape[2]
        g = lh // lkv
        qg = q.reshape(lb, ls, lkv, g, d)
        do = d_out.reshape(lb, ls, lkv, g, d).astype(jnp.float32)
        delta = jnp.sum(do * out.reshape(lb, ls, lkv, g, d).astype(jnp.float32), -1).transpose(0, 2, 3, 1)
        starts = q_start if segmented else None

        def step(carry, _):
            dq, k, v, kv_idx, kv_ok, dk, dv = carry
            dq_s, dk_s, dv_s = blocks_backward(qg, k, v, q_idx, kv_idx, kv_ok, do, lse, delta, block=block,
                                                   causal=causal, q_start=starts)
            dq, dk, dv = dq + dq_s, dk + dk_s, dv + dv_s
            k, v, kv_idx, kv_ok, dk, dv = (jax.lax.ppermute(x, "sequence", perm) for x in (k, v, kv_idx, kv_ok, dk, dv))
            return (dq, k, v, kv_idx, kv_ok, dk, dv), None

        zeros = (jnp.zeros(qg.shape, jnp.float32), jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
        (dq, _, _, _, _, dk, dv), _ = jax.lax.scan(step, (zeros[0], k, v, kv_idx, kv_ok, zeros[1], zeros[2]), None,
                                                   length=n)
        return dq.reshape(q.shape).astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)

    perm = [(i, (i + 1) % n) for i in range(n)]
    lse_spec = P(bspec, heads, None, "sequence")
    inputs = (qkv, qkv, qkv, tok, tok, tok, tok)
    forward_sm = jax.shard_map(forward, mesh=mesh, in_specs=inputs, out_specs=(qkv, lse_spec), check_vma=False)
    backward_sm = jax.shard_map(backward, mesh=mesh, in_specs=inputs + (qkv, lse_spec, qkv),
                                out_specs=(qkv, qkv, qkv), check_vma=False)

    # the custom VJP sits outside the shard_maps (inside one, scans of layers lost it)
    @jax.custom_vjp
    def run(q, k, v, q_idx, kv_idx, kv_ok, q_start):
        return forward_sm(q, k, v, q_idx, kv_idx, kv_ok, q_start)[0]

    def run_fwd(q, k, v, q_idx, kv_idx, kv_ok, q_start):
        out, lse = forward_sm(q, k, v, q_idx, kv_idx, kv_ok, q_start)
        return out, (q, k, v, q_idx, kv_idx, kv_ok, q_start, out, lse)

    def run_bwd(res, d_out):
        return backward_sm(*res, d_out) + (None, None, None, None)

    run.defvjp(run_fwd, run_bwd)

    segmented = q_start is not None
    use_splash = impl == "splash"
    if use_splash:
        interpret = pallas_interpret(mesh.devices.flat[0].platform, impl)
        chunk = s // n // 2
        if segmented or not causal or chunk % 128:
            use_splash = False  # packed segments, non-causal or odd chunks: the pure-JAX path
    q_start = jnp.asarray(q_idx if q_start is None else q_start, jnp.int32)
    # The indices are often constants (arange, all-valid masks). Inside a scan over layers, JAX's
    # partial evaluation would hoist everything computed from loop-invariant values out of the loop
    # for the backward pass: every block's visibility mask, stacked, [blocks x blocks x bq x bk].
    # Tying them to q in one barrier makes them per-layer values, so nothing quadratic is hoisted.
    q, q_idx, kv_idx, kv_ok, q_start = jax.lax.optimization_barrier(
        (q, jnp.asarray(q_idx, jnp.int32), jnp.asarray(kv_idx, jnp.int32), jnp.asarray(kv_ok, bool), q_start))
    return run(q, k, v, q_idx, kv_idx, kv_ok, q_start)


def sharded_decode_attention(q, k_cache, v_cache, valid, mesh: Mesh, impl: str = "dense"):
    """Decode attention of q ``[B, 1, nH, D]`` over cache buffers ``[B, nKV, T, D]`` (layout of
    :mod:`internlm_jax.cache`) whose slots may be split over ``sequence``: each device attends to its
    slots and the partial outputs merge through their log-sum-exp. valid ``[B, T]``: the slots the new
    token may see. ``impl="ragged"`` computes each device's part with the Pallas kernel of
    :mod:`internlm_jax.decode_kernel`, which reads only the blocks holding valid slots.
    Returns ``[B, 1, nH, D]``."""
    b, s, nh, d = q.shape
    nkv = k_cache.shape[1]
    bspec, heads = _specs(mesh, b, nh, nkv)
    qspec = P(bspec, None, heads, None)
    cspec = P(bspec, heads, "sequence", None)
    if impl not in ("dense", "ragged"):
        raise ValueError(f"unknown decode attention impl {impl!r}; use 'dense' or 'ragged'")
    platform = mesh.devices.flat[0].platform

    @functools.partial(jax.shard_map, mesh=mesh, in_specs=(qspec, cspec, cspec, P(bspec, "sequence")),
                       out_specs=qspec, check_vma=False)
    def run(q, k, v, ok):
        lb, ls, lh, _ = q.shape
        lkv = k.shape[1]
        if impl == "ragged":
            from .decode_kernel import ragged_decode

            o, lse = ragged_decode(q, k, v, ok, platform=platform)  # [lb, 1, lh, d], [lb, lkv, G]
            m = jax.lax.pmax(lse, "sequence")
            w = jnp.exp(lse - jnp.where(jnp.isinf(m), 0.0, m))  # this shard's share, 0 where it saw nothing
            l = jax.lax.psum(w, "sequence")
            o = jax.lax.psum(o * w.reshape(lb, 1, lh, 1), "sequence") / jnp.where(l == 0, 1.0, l).reshape(lb, 1, lh, 1)
            return o.astype(q.dtype)
        qg = q.reshape(lb, lkv, lh // lkv, d)
        sc = jnp.einsum("bngd,bntd->bngt", qg, k.astype(q.dtype), preferred_element_type=jnp.float32)
        sc = jnp.where(ok[:, None, None, :], sc / jnp.float32(math.sqrt(d)), NEG)
        m = jax.lax.pmax(jnp.max(sc, axis=-1), "sequence")
        m_safe = jnp.where(jnp.isinf(m), 0.0, m)
        p = jnp.exp(sc - m_safe[..., None])
        l = jax.lax.psum(jnp.sum(p, axis=-1), "sequence")
        o = jnp.einsum("bngt,bntd->bngd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
        o = jax.lax.psum(o, "sequence") / jnp.where(l == 0, 1.0, l)[..., None]
        return o.reshape(lb, 1, lh, d).astype(q.dtype)

    return run(q, k_cache, v_cache, valid)


def _cache_spec(mesh: Mesh, x, nh: int | None):
    """shard_map spec of a cache buffer ``[B, nKV, T, D]`` (slots over ``sequence``) or of ``valid [B, T]``."""
    if x.ndim == 4:
        bspec, heads = _specs(mesh, x.shape[0], nh or 1, x.shape[1])
        return P(bspec, heads, "sequence", None), 2
    bspec, _ = _specs(mesh, x.shape[0], 1, 1)
    return P(bspec, "sequence"), 1


def write_prefill(cache, new, mesh: Mesh, nh: int | None = None):
    """Each device writes its own chunk of ``new`` (split over ``sequence`` along the slot axis: ``[B, nKV,
    S, D]`` for a cache buffer, ``[B, S]`` for valid) at the start of its own slice of ``cache``: the
    cache never moves between devices."""
    spec, axis = _cache_spec(mesh, cache, nh)

    @functools.partial(jax.shard_map, mesh=mesh, in_specs=(spec, spec), out_specs=spec, check_vma=False)
    def run(c, x):
        return jax.lax.dynamic_update_slice_in_dim(c, x.astype(c.dtype), 0, axis=axis)

    return run(cache, new)


def write_decode(cache, new, owner, local_slot, mesh: Mesh, nh: int | None = None):
    """Write ``new`` (one slot: ``[B, nKV, 1, D]`` or ``[B, 1]``, the same on every sequence shard) at
    ``local_slot`` of the slice held by sequence shard ``owner``; the other shards keep theirs untouched.

    The other shards aim the same scatter past their slice, where it writes nothing: one in-place update
    with no branch (a ``cond`` around the update made XLA copy, and on TPU relayout, the whole buffer
    per step)."""
    spec, axis = _cache_spec(mesh, cache, nh)
    nspec = P(*[None if i == axis else s for i, s in enumerate(spec)]) if len(spec) > axis else spec

    @functools.partial(jax.shard_map, mesh=mesh, in_specs=(spec, nspec, P(), P()), out_specs=spec, check_vma=False)
    def run(c, x, owner, slot):
        at = jnp.where(jax.lax.axis_index("sequence") == owner, slot, c.shape[axis])
        return c.at[(slice(None),) * axis + (at,)].set(jnp.squeeze(x, axis).astype(c.dtype), mode="drop")

    return run(cache, new, jnp.asarray(owner, jnp.int32), jnp.asarray(local_slot, jnp.int32))
