"""The fused output layer + cross-entropy against a float64 NumPy reference (values and gradients)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from internlm_jax.training.loss import fused_cross_entropy


def reference(h, w, targets, a, b):
    """float64: per-token CE and log Z, and the gradients of sum(a * ce + b * logZ^2)."""
    h, w = h.astype(np.float64), w.astype(np.float64)
    logits = h @ w
    m = logits.max(1, keepdims=True)
    logz = (m + np.log(np.exp(logits - m).sum(1, keepdims=True)))[:, 0]
    ce = logz - logits[np.arange(len(targets)), targets]
    softmax = np.exp(logits - logz[:, None])
    onehot = np.eye(w.shape[1])[targets]
    d_logits = softmax * (a + 2 * b * logz)[:, None] - onehot * a[:, None]
    return ce, logz, d_logits @ w.T, h.T @ d_logits


@pytest.mark.parametrize("vocab,chunk", [(1000, 128), (1024, 256), (300, 4096), (257, 1)])
def test_fused_cross_entropy_equals_the_float64_reference(vocab, chunk):
    r = np.random.RandomState(vocab + chunk)
    n, hidden = 37, 16
    h = r.randn(n, hidden).astype(np.float32)
    w = (r.randn(hidden, vocab) * 0.5).astype(np.float32)
    targets = r.randint(0, vocab, n)
    chunk = min(chunk, vocab)
    targets[:4] = [0, vocab - 1, chunk - 1, chunk % vocab]  # the first column, the last, a chunk's edges
    a, b = r.rand(n).astype(np.float32), (0.1 * r.rand(n)).astype(np.float32)
    ce_ref, logz_ref, dh_ref, dw_ref = reference(h, w, targets, a, b)

    def objective(h, w):
        ce, logz = fused_cross_entropy(h, w, jnp.asarray(targets), chunk)
        return (a * ce + b * logz ** 2).sum(), (ce, logz)

    (_, (ce, logz)), (dh, dw) = jax.jit(jax.value_and_grad(objective, argnums=(0, 1), has_aux=True))(h, w)
    np.testing.assert_allclose(ce, ce_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(logz, logz_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dh, dh_ref, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(dw, dw_ref, rtol=1e-4, atol=1e-5)


def test_fused_cross_entropy_in_bfloat16_stays_near_float32():
    """bf16 hidden states and weights (the compute dtype of a bf16 run): float32 outputs, bf16 gradients,
    within bf16 rounding of the float64 reference."""
    r = np.random.RandomState(0)
    n, hidden, vocab = 64, 32, 500
    h = r.randn(n, hidden).astype(np.float32)
    w = (r.randn(hidden, vocab) * 0.3).astype(np.float32)
    targets = r.randint(0, vocab, n)
    ones, zeros = np.ones(n, np.float32), np.zeros(n, np.float32)
    ce_ref, _, dh_ref, dw_ref = reference(h, w, targets, ones, zeros)
    hb, wb = jnp.asarray(h, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16)
    f = jax.jit(jax.value_and_grad(lambda h, w: fused_cross_entropy(h, w, jnp.asarray(targets), 128)[0].sum(),
                                   argnums=(0, 1)))
    total, (dh, dw) = f(hb, wb)
    assert dh.dtype == jnp.bfloat16 and dw.dtype == jnp.bfloat16
    ce = fused_cross_entropy(hb, wb, jnp.asarray(targets), 128)[0]
    assert ce.dtype == jnp.float32
    np.testing.assert_allclose(ce, ce_ref, rtol=0.05, atol=0.05)
    for got, want in ((dh, dh_ref), (dw, dw_ref)):
        err = np.abs(np.asarray(got, np.float64) - want).max() / np.abs(want).max()
        assert err < 0.03, err
