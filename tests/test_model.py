"""Model parity: our InternLM2 (loaded from an HF folder) against the float64 NumPy reference and
against HF transformers' LlamaForCausalLM fed the same weights through the InternLM2 -> Llama split."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference as ref
from hf_fixtures import tiny_config, write_hf_checkpoint

from internlm_jax import InternLM2, InternLM2Config
from internlm_jax.rope import inv_frequencies

CONFIGS = {
    # GQA 3:1, dynamic NTK (sequences of 24 cross max_position_embeddings=16)
    "gqa3_dynamic": tiny_config(),
    # GQA 4:1, no scaling
    "gqa4_plain": tiny_config(num_attention_heads=8, num_key_value_heads=2, hidden_size=64, rope_scaling=None),
    # MHA with bias, linear scaling
    "mha_bias_linear": tiny_config(num_attention_heads=4, num_key_value_heads=4, hidden_size=32, bias=True,
                                   rope_scaling={"type": "linear", "factor": 2.0}),
    # MQA, dynamic 3.0, tied embeddings
    "mqa_dynamic_tied": tiny_config(num_attention_heads=4, num_key_value_heads=1, hidden_size=32,
                                    rope_scaling={"type": "dynamic", "factor": 3.0}, tie_word_embeddings=True),
    # the remote code's pretraining_tp > 1 path: biases in the checkpoint, not added
    "tp2_bias_unused": tiny_config(bias=True, pretraining_tp=2),
}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def case(request, tmp_path_factory):
    cfg = CONFIGS[request.param]
    state = ref.random_state(cfg, seed=1)
    folder = write_hf_checkpoint(tmp_path_factory.mktemp(request.param), cfg, state)
    model = InternLM2.from_pretrained(folder)
    return request.param, cfg, state, model


def _ids(batch, seq, vocab, seed=0):
    return np.random.RandomState(seed).randint(0, vocab, (batch, seq))


@pytest.mark.parametrize("seq", [12, 24])
def test_logits_match_numpy_reference(case, seq):
    name, cfg, state, model = case
    ids = _ids(2, seq, cfg["vocab_size"])
    logits, hidden = model(ids, output_hidden_states=True)
    assert logits.dtype == jnp.float32 and logits.shape == (2, seq, cfg["vocab_size"])
    expected = ref.forward(state, cfg, ids, output_hidden_states=True)
    np.testing.assert_allclose(np.asarray(logits), expected["logits"], atol=1e-4, rtol=0)
    assert hidden.shape == (cfg["num_hidden_layers"] + 1, 2, seq, cfg["hidden_size"])
    for i, h in enumerate(expected["hidden_states"]):
        np.testing.assert_allclose(np.asarray(hidden[i]), h, atol=1e-4, rtol=0, err_msg=f"hidden state {i}")


def test_logits_match_hf_llama(case):
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from transformers import LlamaForCausalLM

    name, cfg, state, model = case
    llama = LlamaForCausalLM(ref.llama_config_from_internlm2(cfg)).eval()
    missing, unexpected = llama.load_state_dict(
        {k: torch.from_numpy(v) for k, v in ref.llama_state_from_internlm2(state, cfg).items()}, strict=False)
    assert not unexpected and all("rotary" in k for k in missing)
    ids = _ids(2, cfg["max_position_embeddings"], cfg["vocab_size"], seed=3)  # Llama's rope equals ours up to M
    with torch.no_grad():
        expected = llama(torch.from_numpy(ids)).logits.float().numpy()
    np.testing.assert_allclose(np.asarray(model(ids)), expected, atol=1e-4, rtol=0)


def test_left_padded_batch_matches_unpadded(case):
    name, cfg, state, model = case
    lengths = [10, 6]
    total = max(lengths)
    ids = _ids(2, total, cfg["vocab_size"], seed=5)
    mask = np.zeros((2, total), np.int32)
    for b, n in enumerate(lengths):
        mask[b, total - n:] = 1
        ids[b, : total - n] = 2  # pad id
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    padded = np.asarray(model(ids, positions=positions, attention_mask=mask))
    expected = ref.forward(state, cfg, ids, position_ids=np.where(mask == 1, positions, 1), attention_mask=mask)
    for b, n in enumerate(lengths):
        alone = np.asarray(model(ids[b:b + 1, total - n:]))[0]
        np.testing.assert_allclose(padded[b, total - n:], alone, atol=1e-4, rtol=0)
        np.testing.assert_allclose(padded[b, total - n:], expected["logits"][b, total - n:], atol=1e-4, rtol=0)


def test_bfloat16_top1_agreement(case, tmp_path):
    name, cfg, state, model = case
    folder = write_hf_checkpoint(tmp_path / "bf16", cfg, state, dtype="bfloat16")
    bf16 = InternLM2.from_pretrained(folder, dtype="bfloat16")
    leaves = jax.tree.leaves(bf16)
    assert all(x.dtype == jnp.bfloat16 for x in leaves if hasattr(x, "dtype") and x.ndim > 0)
    ids = _ids(2, 20, cfg["vocab_size"], seed=7)
    got = np.asarray(bf16(ids))
    assert got.dtype == np.float32
    exp = ref.forward({k: np.asarray(v, np.float32) for k, v in state.items()}, cfg, ids)["logits"]
    # compare where the reference's top-1 is not a near tie (bf16 carries ~3 significant digits)
    top2 = np.sort(exp, axis=-1)[..., -2:]
    clear = (top2[..., 1] - top2[..., 0]) > 0.02 * np.abs(exp).max()
    agree = (got.argmax(-1) == exp.argmax(-1))[clear]
    assert clear.sum() >= 10 and agree.mean() >= 0.95, (clear.sum(), agree.mean())
    np.testing.assert_allclose(got, exp, atol=0.05 * np.abs(exp).max())


def test_param_and_compute_dtypes_are_separate():
    cfg = InternLM2Config(**{k: v for k, v in tiny_config().items() if k not in ("architectures", "model_type")})
    model = InternLM2(cfg, param_dtype="float32", dtype="bfloat16", seed=0)
    assert model.layers.attention.wq.get_value().dtype == jnp.float32
    logits = model(_ids(1, 8, cfg.vocab_size))
    assert logits.dtype == jnp.float32
    f32 = InternLM2(cfg, seed=0)
    top = np.asarray(f32(_ids(1, 8, cfg.vocab_size))).argmax(-1)
    assert (np.asarray(logits).argmax(-1) == top).mean() >= 0.75
    with pytest.raises(ValueError, match="unsupported dtype"):
        InternLM2(cfg, dtype="int8")


def test_dynamic_ntk_base_for_1m_context():
    """FACTS.md: InternLM2.5-7B-Chat-1M at 1,048,576 tokens has a base of about 4.40e8."""
    cfg = InternLM2Config.preset("internlm2_5-7b-chat-1m")
    d = cfg.head_dim
    for length, base in [(262144, 5e7), (1_048_576, None)]:
        inv = np.asarray(inv_frequencies(cfg, length), np.float64)
        got_base = 1.0 / inv[1] ** (d / 2.0)  # inv[1] = base ** (-2 / D)
        if base is None:
            assert abs(got_base / 4.40e8 - 1) < 0.005, got_base
        else:
            assert abs(got_base / base - 1) < 1e-4, got_base


def test_input_validation(case):
    name, cfg, state, model = case
    with pytest.raises(ValueError, match="out of range"):
        model(np.array([[0, cfg["vocab_size"]]]))
    with pytest.raises(ValueError, match=r"\[batch, seq\]"):
        model(np.array([1, 2, 3]))
    with pytest.raises(ValueError, match="empty"):
        model(np.zeros((1, 0), np.int32))


def test_call_forms_and_bad_shapes_are_named(tmp_path):
    """Lists work in forward and embed; short dtype names are accepted; positions, masks and segment ids
    of the wrong shape, and an additive (0 / -inf) mask, are refused naming the argument."""
    cfg = tiny_config()
    state = ref.random_state(cfg, 2)
    model = InternLM2.from_pretrained(write_hf_checkpoint(tmp_path, cfg, state))
    ids = [[5, 6, 7, 8]]
    np.testing.assert_allclose(np.asarray(model.forward(ids)), ref.forward(state, cfg, np.asarray(ids))["logits"],
                               atol=1e-5)
    assert model.embed(ids).shape == (1, 4, cfg["hidden_size"])
    assert InternLM2(InternLM2Config.from_dict(cfg), dtype="bf16").dtype == jnp.bfloat16
    for kw, words in ((dict(positions=[0, 1, 2, 3]), "positions must have shape"),
                      (dict(attention_mask=[[1, 1, 1]]), "attention_mask must have shape"),
                      (dict(segment_ids=[[0, 0], [1, 1]]), "segment_ids must have shape"),
                      (dict(attention_mask=np.array([[0.0, -np.inf, 0.0, 0.0]])), "additive")):
        with pytest.raises(ValueError, match=words):
            model(ids, **kw)
