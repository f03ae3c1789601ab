"""Next-token cross-entropy from the final hidden states, without a logits-sized gradient.

The output layer of InternLM2 is the largest matmul of a training step (92544 columns), and its
float32 logits ``[tokens, V]`` are the largest array. Written plainly (logits, ``logsumexp``,
``take_along_axis``) autodiff makes several more logits-sized arrays in the backward pass (the softmax,
a scatter for the target's one-hot, a transpose of the gradient for the weight's matmul), and each
one is a full pass over memory. :func:`fused_cross_entropy` walks the vocabulary in column chunks
instead: the forward keeps a running max and sum per token (online log-sum-exp) and saves the logits
once; the backward turns each saved chunk into its gradient while it is in cache and feeds it straight
to the two matmuls. Same values as the plain form to float32 rounding.

It is used when neither the vocabulary nor the sequence is split over a mesh axis (a chunk of a
split vocabulary would live on one device; flattening a split sequence would move activations);
:func:`token_losses` makes that choice.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from ..sharding import logical_to_spec

LOSS_CHUNK = 2048  # vocabulary columns per chunk of the fused loss (fastest of 512..4096 on CPU)


def token_losses(model, hidden: jax.Array, targets: jax.Array, chunk: int) -> tuple[jax.Array, jax.Array]:
    """``(cross-entropy, log Z)`` per token, float32 ``[B, S]``, from final (normed) hidden states.

    ``chunk`` vocabulary columns at a time through :func:`fused_cross_entropy`; ``chunk == 0``, or a
    vocabulary or sequence split over the mesh, takes the plain form through ``model.logits``."""
    w = model.head_weight()
    vocab_split = model.mesh is not None and len(logical_to_spec(("vocab",), w.shape[1:], model.mesh)) > 0
    if chunk == 0 or vocab_split or model.sequence_parallel > 1:
        logits = model.logits(hidden)
        logz = jax.nn.logsumexp(logits, axis=-1)
        target = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
        return logz - target, logz
    b, s, h = hidden.shape
    ce, logz = fused_cross_entropy(hidden.reshape(b * s, h), w.astype(hidden.dtype), targets.reshape(b * s),
                                   min(chunk, w.shape[1]))
    return ce.reshape(b, s), logz.reshape(b, s)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def fused_cross_entropy(h: jax.Array, w: jax.Array, targets: jax.Array, chunk: int):
    """``(logZ - logit[target], logZ)`` per row of ``h [N, H]`` against ``w [H, V]`` (float32 ``[N]``),
    ``chunk`` columns of ``w`` at a time."""
    return _forward(h, w, targets, chunk)[0]


def _forward(h, w, targets, chunk):
    n, vocab = h.shape[0], w.shape[1]
    full = vocab // chunk

    def step(carry, start, width):
        m, s, t = carry
        w_cols = jax.lax.dynamic_slice_in_dim(w, start, width, axis=1)
        logits = jnp.dot(h, w_cols, preferred_element_type=jnp.float32)  # [N, width]
        m_new = jnp.maximum(m, logits.max(axis=1))
        s = s * jnp.exp(m - m_new) + jnp.exp(logits - m_new[:, None]).sum(axis=1)
        local = targets - start
        inside = (local >= 0) & (local < width)
        picked = jnp.take_along_axis(logits, jnp.clip(local, 0, width - 1)[:, None], axis=1)[:, 0]
        return (m_new, s, t + jnp.where(inside, picked, 0.0)), logits

    carry = (jnp.full((n,), -jnp.inf, jnp.float32), jnp.zeros((n,), jnp.float32), jnp.zeros((n,), jnp.float32))
    saved = []
    if full:
        carry, stacked = jax.lax.scan(lambda c, i: step(c, i * chunk, chunk), carry, jnp.arange(full))
        saved.append(stacked)  # [full, N, chunk]
    if vocab % chunk:
        carry, tail = step(carry, full * chunk, vocab - full * chunk)
        saved.append(tail)  # [N, rest]
    m, s, t = carry
    logz = m + jnp.log(s)
    return (logz - t, logz), (h, w, targets, logz, tuple(saved))


def _backward(chunk, residuals, cotangents):
    h, w, targets, logz, saved = residuals
    g_ce, g_logz = cotangents
    vocab = w.shape[1]
    full = vocab // chunk
    # d(logZ)/d(logit) is the softmax; d(logit[target])/d(logit) the one-hot
    g_softmax = (g_ce + g_logz)[:, None]
    h_t = jax.lax.optimization_barrier(h.T)  # [H, N] once, so each weight-gradient matmul is a plain one

    def grads(logits, start, width):
        p = jnp.exp(logits - logz[:, None])
        hot = (jnp.arange(width)[None, :] + start) == targets[:, None]
        d_logits = (p * g_softmax - jnp.where(hot, g_ce[:, None], 0.0)).astype(h.dtype)
        w_cols = jax.lax.dynamic_slice_in_dim(w, start, width, axis=1)
        dh = jnp.dot(d_logits, w_cols.T, preferred_element_type=jnp.float32)
        dw = jnp.dot(h_t, d_logits, preferred_element_type=jnp.float32).astype(w.dtype)
        return dh, dw

    dh = jnp.zeros(h.shape, jnp.float32)
    dw = jnp.zeros(w.shape, w.dtype)
    if full:
        def step(carry, xs):
            dh, dw = carry
            i, logits = xs
            dh_i, dw_i = grads(logits, i * chunk, chunk)
            return (dh + dh_i, jax.lax.dynamic_update_slice_in_dim(dw, dw_i, i * chunk, axis=1)), None

        (dh, dw), _ = jax.lax.scan(step, (dh, dw), (jnp.arange(full), saved[0]))
    if vocab % chunk:
        dh_i, dw_i = grads(saved[-1], full * chunk, vocab - full * chunk)
        dh, dw = dh + dh_i, jax.lax.dynamic_update_slice_in_dim(dw, dw_i, full * chunk, axis=1)
    return dh.astype(h.dtype), dw, None


fused_cross_entropy.defvjp(_forward, _backward)
