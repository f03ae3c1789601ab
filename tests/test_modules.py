"""Sub-module parity (RMSNorm, rope, attention, MLP, one decoder layer) against the float64 reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference as ref
from flax import nnx
from hf_fixtures import tiny_config, write_hf_checkpoint

from internlm_jax import InternLM2, InternLM2Config
from internlm_jax.rope import rope_tables

CFG = tiny_config(bias=True, num_attention_heads=8, num_key_value_heads=2, hidden_size=64)
STATE = ref.random_state(CFG, seed=9)
RNG = np.random.RandomState(0)
X = RNG.standard_normal((2, 20, CFG["hidden_size"])).astype(np.float32)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return InternLM2.from_pretrained(write_hf_checkpoint(tmp_path_factory.mktemp("m"), CFG, STATE))


def _layer0(model):
    """Layer 0 as a standalone module: row 0 of every stacked parameter."""
    graphdef, state = nnx.split(model.layers)
    return nnx.merge(graphdef, jax.tree.map(lambda x: x[0], state))


def test_rmsnorm(model):
    got = np.asarray(model.norm(jnp.asarray(X)))
    np.testing.assert_allclose(got, ref.rms_norm(X, STATE["model.norm.weight"], CFG["rms_norm_eps"]), atol=1e-5)


@pytest.mark.parametrize("scaling", [None, {"type": "linear", "factor": 2.0}, {"type": "dynamic", "factor": 2.0}])
@pytest.mark.parametrize("length", [10, 40])  # 40 > max_position_embeddings = 16
def test_rope_tables(scaling, length):
    cfg = dict(CFG, rope_scaling=scaling)
    pos = np.tile(np.arange(length), (2, 1))
    cos, sin = rope_tables(InternLM2Config.from_dict(cfg), jnp.asarray(pos))
    want_cos, want_sin = ref.rope_cos_sin(cfg, pos)
    np.testing.assert_allclose(np.asarray(cos), want_cos, atol=2e-5)
    np.testing.assert_allclose(np.asarray(sin), want_sin, atol=2e-5)


def test_attention_mlp_and_layer(model):
    layer = _layer0(model)
    pos = np.tile(np.arange(X.shape[1]), (2, 1))
    cos, sin = rope_tables(model.config, jnp.asarray(pos))
    want_cos, want_sin = ref.rope_cos_sin(CFG, pos)
    mask = np.tril(np.ones((X.shape[1], X.shape[1]), bool))[None]
    allowed = np.broadcast_to(mask, (2, X.shape[1], X.shape[1]))
    got, _ = layer.attention(jnp.asarray(X), cos, sin, jnp.asarray(mask))
    want, _ = ref.attention_block(STATE, CFG, 0, X, want_cos, want_sin, allowed, None)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-4)
    np.testing.assert_allclose(np.asarray(layer.feed_forward(jnp.asarray(X))), ref.mlp_block(STATE, 0, X), atol=1e-5)
    h = ref.rms_norm(X, STATE["model.layers.0.attention_norm.weight"], CFG["rms_norm_eps"])
    h = X + ref.attention_block(STATE, CFG, 0, h, want_cos, want_sin, allowed, None)[0]
    h = h + ref.mlp_block(STATE, 0, ref.rms_norm(h, STATE["model.layers.0.ffn_norm.weight"], CFG["rms_norm_eps"]))
    np.testing.assert_allclose(np.asarray(layer(jnp.asarray(X), cos, sin, jnp.asarray(mask))[0]), h, atol=1e-4)


def test_forward_inside_user_jit_and_grad(model):
    """model.forward composes with the user's own jax.jit / jax.grad over the split state."""
    ids = jnp.asarray(RNG.randint(0, CFG["vocab_size"], (2, 12)))
    graphdef, state = nnx.split(model)

    @jax.jit
    def loss(state):
        logits = nnx.merge(graphdef, state)(ids)  # traced: no nested jit of its own
        return -jnp.mean(jax.nn.log_softmax(logits)[:, :-1].max(-1)), logits

    (value, logits), grads = jax.value_and_grad(loss, has_aux=True)(state)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(model(ids)), atol=1e-5)
    g = nnx.to_flat_state(grads)
    assert all(np.isfinite(np.asarray(v.get_value() if hasattr(v, "get_value") else v)).all() for _, v in g)
    assert np.abs(np.asarray(grads["layers"]["attention"]["wq"].get_value())).max() > 0
