"""Self-checks of tests/reference.py (the float64 NumPy InternLM2 reference).

The main check runs HF transformers' own LlamaForCausalLM on the un-packed weights. In
transformers 5.23 that model is not fully float64 even after ``model.double()``: RMSNorm casts
to float32, softmax runs with ``dtype=torch.float32``, and rotary ``inv_freq``/angles/cos/sin are
computed in float32. To compare at 1e-9 those few float32 casts are switched to float64 through
``monkeypatch`` (same formulas, only the dtype changes; HF's own module structure, masking, GQA
``repeat_kv``, ``rotate_half``, caching and dynamic-rope update logic stay in the loop). A second
comparison against the *unpatched* HF model (float32 internals) at a float32-sized tolerance
makes sure the patches did not change HF's math.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import reference as ref  # noqa: E402

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from transformers.models.llama import modeling_llama  # noqa: E402

torch.set_num_threads(min(4, os.cpu_count() or 1))

EXACT = 1e-9  # float64 agreement
LOOSE = 1e-5  # float64 reference vs HF with its float32 internals (relative to max |logit|; seen <1e-6)


def make_config(
    hidden_size,
    heads,
    kv_heads,
    *,
    layers=2,
    intermediate=40,
    vocab=61,
    bias=False,
    rope_scaling=None,
    theta=10000.0,
    max_pos=16,
    tie=False,
):
    return {
        "architectures": ["InternLM2ForCausalLM"],
        "hidden_size": hidden_size,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "rms_norm_eps": 1e-5,
        "rope_theta": theta,
        "rope_scaling": rope_scaling,
        "max_position_embeddings": max_pos,
        "vocab_size": vocab,
        "bias": bias,
        "tie_word_embeddings": tie,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 2,
    }


CONFIGS = {
    # GQA 3:1, plain rope
    "gqa3_default": make_config(48, 6, 2),
    # GQA 4:1, linear scaling, head_dim 4
    "gqa4_linear": make_config(32, 8, 2, layers=3, rope_scaling={"type": "linear", "factor": 2.0}),
    # MHA with biases on wqkv/wo, dynamic NTK
    "mha_bias_dynamic": make_config(32, 4, 4, bias=True, rope_scaling={"type": "dynamic", "factor": 2.0}),
    # MQA, tied embeddings, dynamic NTK with a large base
    "mqa_tied_dynamic": make_config(
        24, 3, 1, tie=True, theta=1e6, rope_scaling={"type": "dynamic", "factor": 3.0}
    ),
    # GQA 2:1 with bias and linear scaling
    "gqa2_bias_linear": make_config(32, 4, 2, bias=True, rope_scaling={"type": "linear", "factor": 3.0}),
}

SCALE = 0.3  # large enough that attention is far from uniform and every weight matters


def state_for(name, seed=0):
    return ref.random_state(CONFIGS[name], seed=seed, scale=SCALE)


def tokens(rng, config, shape):
    return rng.integers(0, config["vocab_size"], size=shape)


# ------------------------------------------------------------------------------------------------
# HF Llama in true float64
# ------------------------------------------------------------------------------------------------


def _rms_norm_fp64(self, hidden_states):
    # LlamaRMSNorm.forward with the float32 cast replaced by float64
    variance = hidden_states.to(torch.float64).pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden_states.to(torch.float64) * torch.rsqrt(variance + self.variance_epsilon))


def _eager_attention_fp64(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    # modeling_llama.eager_attention_forward with softmax in float64 instead of float32
    key_states = modeling_llama.repeat_kv(key, module.num_key_value_groups)
    value_states = modeling_llama.repeat_kv(value, module.num_key_value_groups)
    attn_weights = torch.matmul(query, key_states.transpose(2, 3)) * scaling
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask
    attn_weights = torch.nn.functional.softmax(attn_weights, dim=-1, dtype=torch.float64).to(query.dtype)
    attn_output = torch.matmul(attn_weights, value_states).transpose(1, 2).contiguous()
    return attn_output, attn_weights


def _inv_freq_fp64(config, base):
    dim = config.head_dim
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))


def _default_rope_fp64(config, device=None, seq_len=None, layer_type=None):
    return _inv_freq_fp64(config, config.rope_parameters["rope_theta"]), 1.0


def _linear_rope_fp64(config, device=None, seq_len=None, layer_type=None):
    # HF: default inv_freq divided by factor
    return _inv_freq_fp64(config, config.rope_parameters["rope_theta"]) / config.rope_parameters["factor"], 1.0


def _dynamic_rope_fp64(config, device=None, seq_len=None, layer_type=None):
    # HF _compute_dynamic_ntk_parameters, in float64
    params = config.rope_parameters
    M = config.max_position_embeddings
    seq_len = M if seq_len is None else max(int(seq_len), M)
    factor = params["factor"]
    dim = config.head_dim
    base = params["rope_theta"] * ((factor * seq_len / M) - (factor - 1)) ** (dim / (dim - 2))
    return _inv_freq_fp64(config, base), 1.0


def _rotary_body_fp64(self, x, position_ids):
    # LlamaRotaryEmbedding.forward body with float64 angles/cos/sin
    freqs = position_ids[..., None].to(torch.float64) * self.inv_freq.to(torch.float64)
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * self.attention_scaling).to(x.dtype), (emb.sin() * self.attention_scaling).to(x.dtype)


@pytest.fixture
def exact_hf(monkeypatch):
    """Patch the float32 casts of HF Llama to float64 (for the duration of one test)."""
    monkeypatch.setattr(modeling_llama.LlamaRMSNorm, "forward", _rms_norm_fp64)
    monkeypatch.setattr(modeling_llama, "eager_attention_forward", _eager_attention_fp64)
    monkeypatch.setattr(
        modeling_llama.LlamaRotaryEmbedding, "compute_default_rope_parameters", staticmethod(_default_rope_fp64)
    )
    monkeypatch.setitem(modeling_llama.ROPE_INIT_FUNCTIONS, "linear", _linear_rope_fp64)
    monkeypatch.setitem(modeling_llama.ROPE_INIT_FUNCTIONS, "dynamic", _dynamic_rope_fp64)
    monkeypatch.setattr(
        modeling_llama.LlamaRotaryEmbedding,
        "forward",
        torch.no_grad()(modeling_llama.dynamic_rope_update(_rotary_body_fp64)),
    )
    return True


def build_hf(config, state):
    cfg = ref.llama_config_from_internlm2(config)
    cfg._attn_implementation = "eager"
    model = modeling_llama.LlamaForCausalLM(cfg).double().eval()
    sd = {k: torch.from_numpy(np.asarray(v, dtype=np.float64))
          for k, v in ref.llama_state_from_internlm2(state, config).items()}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not unexpected, unexpected
    assert not missing, missing
    if config.get("tie_word_embeddings"):
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    return model


def hf_forward(model, input_ids, **kwargs):
    with torch.no_grad():
        out = model(input_ids=torch.as_tensor(np.asarray(input_ids)), use_cache=False, **kwargs)
    return out


def maxrel(a, b):
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(a - b)) / max(1.0, float(np.max(np.abs(b)))))


# ------------------------------------------------------------------------------------------------
# (d) the wqkv unpacking, by hand
# ------------------------------------------------------------------------------------------------


def test_split_wqkv_by_hand():
    nH, nKV, D, H = 4, 2, 2, 3  # G = 2 query heads per KV head, 4 slots per group
    rows = (nH + 2 * nKV) * D  # 16
    w = np.repeat(np.arange(rows, dtype=np.float64)[:, None], H, axis=1)  # row r is filled with r
    wq, wk, wv = ref.split_wqkv(w, nH, nKV, D)
    # group 0 = rows 0..7:  q0 [0,1]  q1 [2,3]    k0 [4,5]   v0 [6,7]
    # group 1 = rows 8..15: q2 [8,9]  q3 [10,11]  k1 [12,13] v1 [14,15]
    assert wq[:, 0].tolist() == [0, 1, 2, 3, 8, 9, 10, 11]
    assert wk[:, 0].tolist() == [4, 5, 12, 13]
    assert wv[:, 0].tolist() == [6, 7, 14, 15]
    assert wq.shape == (nH * D, H) and wk.shape == (nKV * D, H) and wv.shape == (nKV * D, H)
    # the same holds for a bias vector
    bq, bk, bv = ref.split_wqkv(np.arange(rows), nH, nKV, D)
    assert bq.tolist() == [0, 1, 2, 3, 8, 9, 10, 11] and bk.tolist() == [4, 5, 12, 13] and bv.tolist() == [6, 7, 14, 15]
    # rule: query head j <- group j // G slot j % G; key g <- slot G; value g <- slot G + 1
    G = nH // nKV
    for j in range(nH):
        start = ((j // G) * (G + 2) + (j % G)) * D
        assert wq[j * D : (j + 1) * D, 0].tolist() == list(range(start, start + D))
    for g in range(nKV):
        assert wk[g * D : (g + 1) * D, 0].tolist() == list(range((g * (G + 2) + G) * D, (g * (G + 2) + G + 1) * D))
        assert wv[g * D : (g + 1) * D, 0].tolist() == list(range((g * (G + 2) + G + 1) * D, (g * (G + 2) + G + 2) * D))
    # MHA (G = 1): per head [q_h, k_h, v_h]; a naive 3-way split would be wrong here too
    wq1, wk1, wv1 = ref.split_wqkv(np.arange(3 * 2 * 2), 2, 2, 2)
    assert wq1.tolist() == [0, 1, 6, 7] and wk1.tolist() == [2, 3, 8, 9] and wv1.tolist() == [4, 5, 10, 11]
    # MQA (nKV = 1): all queries first, then k, then v
    wq2, wk2, wv2 = ref.split_wqkv(np.arange(5 * 2), 3, 1, 2)
    assert wq2.tolist() == [0, 1, 2, 3, 4, 5] and wk2.tolist() == [6, 7] and wv2.tolist() == [8, 9]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_llama_state_unpacking_by_reshape(name):
    """A second, reshape-based formulation of the unpacking agrees with llama_state_from_internlm2."""
    cfg = CONFIGS[name]
    state = state_for(name)
    nH, nKV, H = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["hidden_size"]
    D, G = H // nH, nH // nKV
    llama = ref.llama_state_from_internlm2(state, cfg)
    for i in range(cfg["num_hidden_layers"]):
        grouped = state[f"model.layers.{i}.attention.wqkv.weight"].reshape(nKV, G + 2, D, H)
        a = f"model.layers.{i}.self_attn."
        np.testing.assert_array_equal(llama[a + "q_proj.weight"], grouped[:, :G].reshape(nH * D, H))
        np.testing.assert_array_equal(llama[a + "k_proj.weight"], grouped[:, G].reshape(nKV * D, H))
        np.testing.assert_array_equal(llama[a + "v_proj.weight"], grouped[:, G + 1].reshape(nKV * D, H))
        if cfg["bias"]:
            gb = state[f"model.layers.{i}.attention.wqkv.bias"].reshape(nKV, G + 2, D)
            np.testing.assert_array_equal(llama[a + "q_proj.bias"], gb[:, :G].reshape(-1))
            np.testing.assert_array_equal(llama[a + "k_proj.bias"], gb[:, G].reshape(-1))
            np.testing.assert_array_equal(llama[a + "v_proj.bias"], gb[:, G + 1].reshape(-1))
        else:
            assert a + "q_proj.bias" not in llama
    out = state["model.tok_embeddings.weight"] if cfg["tie_word_embeddings"] else state["output.weight"]
    np.testing.assert_array_equal(llama["lm_head.weight"], out)


def test_random_state_keys():
    for name, cfg in CONFIGS.items():
        st = ref.random_state(cfg, seed=1)
        L = cfg["num_hidden_layers"]
        expected = {"model.tok_embeddings.weight", "model.norm.weight"}
        if not cfg["tie_word_embeddings"]:
            expected.add("output.weight")
        for i in range(L):
            p = f"model.layers.{i}."
            expected |= {
                p + "attention_norm.weight",
                p + "attention.wqkv.weight",
                p + "attention.wo.weight",
                p + "ffn_norm.weight",
                p + "feed_forward.w1.weight",
                p + "feed_forward.w2.weight",
                p + "feed_forward.w3.weight",
            }
            if cfg["bias"]:
                expected |= {p + "attention.wqkv.bias", p + "attention.wo.bias"}
        assert set(st) == expected, name
        assert all(v.dtype == np.float32 for v in st.values())
        H, nH, nKV = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
        D = H // nH
        assert st["model.layers.0.attention.wqkv.weight"].shape == ((nH + 2 * nKV) * D, H)
        assert st["model.layers.0.attention.wo.weight"].shape == (H, nH * D)
        assert st["model.layers.0.feed_forward.w2.weight"].shape == (H, cfg["intermediate_size"])


def test_config_quirks():
    base = make_config(16, 2, 1)
    assert ref.rope_scaling_of(base) is None
    assert ref.rope_scaling_of({**base, "rope_scaling": {"rope_type": "default", "rope_theta": 1.0}}) is None
    assert ref.rope_scaling_of({**base, "rope_scaling": {}}) is None
    assert ref.rope_scaling_of({**base, "rope_scaling": {"type": "dynamic", "factor": 2}}) == ("dynamic", 2.0)
    no_bias_key = dict(base)
    del no_bias_key["bias"]
    assert ref.has_bias(no_bias_key) is True
    # dynamic NTK base: theta below/at M, the NTK formula above it (here D = 8)
    cfg = make_config(16, 2, 1, rope_scaling={"type": "dynamic", "factor": 2.0}, max_pos=16)
    assert ref.rope_base(cfg, np.array([[15]])) == 10000.0
    L = 20
    assert ref.rope_base(cfg, np.array([[0, 3], [19, 2]])) == pytest.approx(
        10000.0 * (2.0 * L / 16 - 1.0) ** (8 / 6), rel=1e-15
    )


def test_transformers_rope_parameters():
    """How transformers 5.23 takes rope settings for Llama: a ``rope_parameters`` dict."""
    cfg = ref.llama_config_from_internlm2(CONFIGS["mha_bias_dynamic"])
    assert cfg.rope_parameters["rope_type"] == "dynamic"
    assert cfg.rope_parameters["factor"] == 2.0
    assert cfg.rope_parameters["rope_theta"] == 10000.0
    assert cfg.head_dim == 8 and cfg.attention_bias and not cfg.mlp_bias
    lin = ref.llama_config_from_internlm2(CONFIGS["gqa4_linear"])
    assert lin.rope_parameters["rope_type"] == "linear" and lin.rope_parameters["factor"] == 2.0
    plain = ref.llama_config_from_internlm2(CONFIGS["gqa3_default"])
    assert plain.rope_parameters["rope_type"] == "default" and plain.rope_parameters["rope_theta"] == 10000.0
    assert not plain.attention_bias and plain.num_key_value_heads == 2
    assert ref.llama_config_from_internlm2(CONFIGS["mqa_tied_dynamic"]).tie_word_embeddings
    # the legacy kwargs are folded into rope_parameters
    legacy = transformers.LlamaConfig(rope_theta=5e7, rope_scaling={"type": "linear", "factor": 2.0})
    assert legacy.rope_parameters["rope_theta"] == 5e7 and legacy.rope_parameters["rope_type"] == "linear"


# ------------------------------------------------------------------------------------------------
# (a) reference == HF Llama on the un-packed weights
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CONFIGS))
def test_matches_hf_llama_float64(name, exact_hf):
    cfg = CONFIGS[name]
    state = state_for(name)
    model = build_hf(cfg, state)
    rng = np.random.default_rng(7)
    M = cfg["max_position_embeddings"]
    for B, S in [(1, 1), (2, 5), (3, M)]:
        ids = tokens(rng, cfg, (B, S))
        ours = ref.forward(state, cfg, ids, output_hidden_states=True)
        theirs = hf_forward(model, ids, output_hidden_states=True)
        assert ours["logits"].dtype == np.float64 and ours["logits"].shape == (B, S, cfg["vocab_size"])
        np.testing.assert_allclose(ours["logits"], theirs.logits.numpy(), rtol=0, atol=EXACT)
        assert len(ours["hidden_states"]) == cfg["num_hidden_layers"] + 1 == len(theirs.hidden_states)
        for a, b in zip(ours["hidden_states"], theirs.hidden_states):
            np.testing.assert_allclose(a, b.numpy(), rtol=0, atol=EXACT)
    # logits are far from trivial (so the agreement means something)
    assert np.std(ours["logits"]) > 0.1


@pytest.mark.parametrize("name", ["gqa3_default", "gqa4_linear", "mha_bias_dynamic"])
def test_matches_hf_llama_explicit_positions_and_padding(name, exact_hf):
    """Arbitrary position ids and a padding mask, through HF's own masking."""
    cfg = CONFIGS[name]
    state = state_for(name, seed=3)
    model = build_hf(cfg, state)
    rng = np.random.default_rng(11)
    S = 9
    ids = tokens(rng, cfg, (2, S))
    pos = np.stack([np.arange(S) + 4, np.arange(S) * 0 + np.arange(S)[::-1] % 3 + 2])
    ours = ref.forward(state, cfg, ids, position_ids=pos)
    # An explicit all-ones mask: without one, transformers 5 treats position ids that do not step
    # by exactly 1 as *packed sequences* (masking_utils.find_packed_sequence_indices) and blocks
    # attention across each jump; the InternLM2 remote code has no such heuristic.
    ones = torch.ones(ids.shape, dtype=torch.long)
    theirs = hf_forward(model, ids, position_ids=torch.as_tensor(pos), attention_mask=ones)
    np.testing.assert_allclose(ours["logits"], theirs.logits.numpy(), rtol=0, atol=EXACT)
    # left padding, positions from the mask: compare the real tokens
    mask = np.ones((2, S), dtype=np.int64)
    mask[1, :4] = 0
    pos = ref.positions_from_mask(mask)
    ours = ref.forward(state, cfg, ids, position_ids=pos, attention_mask=mask)
    theirs = hf_forward(model, ids, position_ids=torch.as_tensor(pos), attention_mask=torch.as_tensor(mask))
    real = mask.astype(bool)
    assert np.all(np.isfinite(ours["logits"]))
    np.testing.assert_allclose(ours["logits"][real], theirs.logits.numpy()[real], rtol=0, atol=EXACT)


@pytest.mark.parametrize("name", ["mha_bias_dynamic", "mqa_tied_dynamic"])
def test_dynamic_ntk_beyond_max_pos_single_call(name, exact_hf):
    """One full forward past M on a fresh model: HF Llama's NTK formula equals InternLM2's."""
    cfg = CONFIGS[name]
    state = state_for(name, seed=5)
    model = build_hf(cfg, state)
    ids = tokens(np.random.default_rng(2), cfg, (2, cfg["max_position_embeddings"] + 7))
    ours = ref.forward(state, cfg, ids)
    theirs = hf_forward(model, ids)
    np.testing.assert_allclose(ours["logits"], theirs.logits.numpy(), rtol=0, atol=EXACT)
    # and the scaling really changed something compared to plain rope
    plain = ref.forward(state, {**cfg, "rope_scaling": None}, ids)
    assert np.max(np.abs(plain["logits"] - ours["logits"])) > 1e-3


@pytest.mark.parametrize("name", list(CONFIGS))
def test_matches_unpatched_hf_llama(name):
    """Against HF with its float32 internals (no patches): agreement to float32 accuracy."""
    cfg = CONFIGS[name]
    state = state_for(name, seed=2)
    model = build_hf(cfg, state)
    M = cfg["max_position_embeddings"]
    ids = tokens(np.random.default_rng(4), cfg, (2, M))
    assert maxrel(ref.forward(state, cfg, ids)["logits"], hf_forward(model, ids).logits.numpy()) < LOOSE
    if ref.rope_scaling_of(cfg) and ref.rope_scaling_of(cfg)[0] == "dynamic":
        model = build_hf(cfg, state)  # fresh rotary state
        ids = tokens(np.random.default_rng(5), cfg, (1, M + 9))
        assert maxrel(ref.forward(state, cfg, ids)["logits"], hf_forward(model, ids).logits.numpy()) < LOOSE


def test_hf_generate_matches_greedy(exact_hf):
    cfg = CONFIGS["gqa3_default"]
    state = state_for("gqa3_default", seed=9)
    model = build_hf(cfg, state)
    rng = np.random.default_rng(3)
    ids = tokens(rng, cfg, (2, 6))
    mask = np.ones_like(ids)
    mask[0, :2] = 0
    ids[0, :2] = 2
    ours = ref.greedy_generate(state, cfg, ids, 8, attention_mask=mask)
    with torch.no_grad():
        out = model.generate(
            input_ids=torch.as_tensor(ids),
            attention_mask=torch.as_tensor(mask),
            max_new_tokens=8,
            min_new_tokens=8,
            do_sample=False,
            pad_token_id=2,
            eos_token_id=None,
        )
    np.testing.assert_array_equal(ours, out[:, 6:].numpy())


# ------------------------------------------------------------------------------------------------
# (b) cached step-by-step == full forward
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CONFIGS))
def test_cache_matches_full_forward(name):
    cfg = CONFIGS[name]
    state = state_for(name, seed=4)
    rng = np.random.default_rng(8)
    M = cfg["max_position_embeddings"]  # stay within M: no dynamic rescaling
    ids = tokens(rng, cfg, (2, M))
    full = ref.forward(state, cfg, ids)["logits"]

    # prompt of 5, then one token at a time
    out = ref.forward(state, cfg, ids[:, :5])
    got = [out["logits"]]
    past = out["past"]
    for t in range(5, M):
        out = ref.forward(state, cfg, ids[:, t : t + 1], past=past)
        past = out["past"]
        got.append(out["logits"])
    np.testing.assert_allclose(np.concatenate(got, axis=1), full, rtol=0, atol=1e-10)
    assert len(past) == cfg["num_hidden_layers"]
    D = cfg["hidden_size"] // cfg["num_attention_heads"]
    assert past[0][0].shape == (2, cfg["num_key_value_heads"], M, D)

    # chunks of uneven size, with an all-ones mask passed explicitly
    past = None
    got = []
    for a, b in [(0, 3), (3, 4), (4, 11), (11, M)]:
        mask = np.ones((2, b), dtype=np.int64)
        out = ref.forward(state, cfg, ids[:, a:b], attention_mask=mask, past=past)
        past = out["past"]
        got.append(out["logits"])
    np.testing.assert_allclose(np.concatenate(got, axis=1), full, rtol=0, atol=1e-10)


def test_dynamic_cache_semantics_past_max_pos():
    """Past M with dynamic NTK: each cached step rotates only its own k with base(L=pos+1)."""
    cfg = make_config(32, 4, 2, rope_scaling={"type": "dynamic", "factor": 2.0}, max_pos=8)
    state = ref.random_state(cfg, seed=6, scale=SCALE)
    ids = tokens(np.random.default_rng(1), cfg, (1, 13))
    out = ref.forward(state, cfg, ids[:, :6])
    past = out["past"]
    steps = []
    for t in range(6, 13):
        out = ref.forward(state, cfg, ids[:, t : t + 1], past=past)
        past = out["past"]
        steps.append(out["logits"][:, -1])
        # the key just appended is what a full forward over ids[:, :t+1] computes at position t
        full = ref.forward(state, cfg, ids[:, : t + 1])
        # (layer 0: its input does not depend on attention, so the k is identical)
        np.testing.assert_allclose(past[0][0][:, :, t], full["past"][0][0][:, :, t], rtol=0, atol=1e-12)
        if t + 1 <= 8:  # no rescaling yet: identical to the full forward
            np.testing.assert_allclose(steps[-1], full["logits"][:, -1], rtol=0, atol=1e-10)
        else:  # rescaled: the full forward re-rotates every key, the cache does not
            assert np.max(np.abs(steps[-1] - full["logits"][:, -1])) > 1e-6
    # keys already in the cache are never re-rotated
    np.testing.assert_array_equal(past[0][0][:, :, :6], ref.forward(state, cfg, ids[:, :6])["past"][0][0])


# ------------------------------------------------------------------------------------------------
# (c) left padding == each sequence alone
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["gqa3_default", "mha_bias_dynamic", "gqa4_linear"])
def test_left_padding_matches_alone(name):
    cfg = CONFIGS[name]
    state = state_for(name, seed=10)
    rng = np.random.default_rng(12)
    lengths = [9, 5, 2]
    S = max(lengths)
    ids = np.full((len(lengths), S), 2, dtype=np.int64)
    mask = np.zeros((len(lengths), S), dtype=np.int64)
    alone = []
    for b, n in enumerate(lengths):
        seq = tokens(rng, cfg, (1, n))
        ids[b, S - n :] = seq[0]
        mask[b, S - n :] = 1
        alone.append(seq)
    pos = ref.positions_from_mask(mask)
    assert pos[1].tolist() == [1, 1, 1, 1, 0, 1, 2, 3, 4]
    batch = ref.forward(state, cfg, ids, position_ids=pos, attention_mask=mask)["logits"]
    assert np.all(np.isfinite(batch))
    for b, n in enumerate(lengths):
        single = ref.forward(state, cfg, alone[b])["logits"]
        np.testing.assert_allclose(batch[b, S - n :], single[0], rtol=0, atol=1e-10)

    # cached greedy generation on the padded batch == each sequence alone
    gen = ref.greedy_generate(state, cfg, ids, 5, attention_mask=mask)
    assert gen.shape == (len(lengths), 5)
    for b in range(len(lengths)):
        np.testing.assert_array_equal(gen[b], ref.greedy_generate(state, cfg, alone[b], 5)[0])


def test_greedy_generate_matches_uncached_argmax():
    cfg = CONFIGS["gqa4_linear"]
    state = state_for("gqa4_linear", seed=13)
    ids = tokens(np.random.default_rng(0), cfg, (2, 4))
    gen = ref.greedy_generate(state, cfg, ids, 6)
    seq = ids
    for _ in range(6):
        nxt = np.argmax(ref.forward(state, cfg, seq)["logits"][:, -1], axis=-1)
        seq = np.concatenate([seq, nxt[:, None]], axis=1)
    np.testing.assert_array_equal(gen, seq[:, 4:])


def test_fully_masked_query_rows_are_finite():
    cfg = CONFIGS["gqa3_default"]
    state = state_for("gqa3_default")
    ids = tokens(np.random.default_rng(0), cfg, (1, 4))
    mask = np.array([[0, 0, 1, 1]])
    out = ref.forward(state, cfg, ids, attention_mask=mask, output_hidden_states=True)
    assert np.all(np.isfinite(out["logits"]))
    assert all(np.all(np.isfinite(h)) for h in out["hidden_states"])
