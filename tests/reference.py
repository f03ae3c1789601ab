"""Plain float64 NumPy reference of the InternLM2 / InternLM2.5 transformer.

Written directly from shared/internlm2/FACTS.md (the behaviour of the official HuggingFace
remote code ``modeling_internlm2.py``), favouring obviousness over speed. It reads the HF
checkpoint layout directly (packed ``wqkv``), so comparing a port against it also checks the
port's weight splitting.

Conventions
-----------
* Every weight is cast to float64 at the point of use; all arithmetic is float64 (the remote code
  computes RMSNorm statistics, rotary angles/cos/sin and softmax in float32; here everything is
  float64, so this is the "exact math" the float32 code approximates).
* ``past`` is a list (one entry per layer) of ``(k, v)`` arrays of shape ``[B, nKV, T, D]``. Keys in
  it are already rotated; they are never re-rotated. This is the cached-generation behaviour of the
  remote code, including for dynamic NTK scaling, where each call rotates only its own new q/k
  with the base for ``L = max(position_ids) + 1`` of that call.
* Not reproduced (a pure function cannot): after a call with ``L > max_position_embeddings`` the
  remote dynamic-NTK module keeps the scaled ``inv_freq`` buffer, so a *later* call with a short
  ``L`` would still use the scaled base there. Here every call is independent. Within one
  generation run this never matters, because ``L`` only grows.

Only numpy is needed at import time; transformers is imported lazily by
``llama_config_from_internlm2``.
"""

from __future__ import annotations

import numpy as np

# A finite, very negative score for masked keys. Masked scores are *replaced* by it (not added),
# so a query row whose keys are all masked gets equal scores everywhere -> a uniform softmax, the
# same thing an additive finfo.min mask gives, and never NaN.
MASKED_SCORE = -1.0e30


# --------------------------------------------------------------------------------------------
# config helpers
# --------------------------------------------------------------------------------------------


def head_dim(config: dict) -> int:
    # No head_dim key in InternLM2 configs: D = hidden_size // num_attention_heads.
    return config["hidden_size"] // config["num_attention_heads"]


def has_bias(config: dict) -> bool:
    # The InternLM2 config class defaults bias to True, so a missing key means True.
    return bool(config.get("bias", True))


def adds_bias(config: dict) -> bool:
    # With pretraining_tp > 1 the remote code computes wqkv and wo from F.linear over weight slices
    # only: the biases exist in the checkpoint but are not added.
    return has_bias(config) and config.get("pretraining_tp", 1) <= 1


def is_tied(config: dict) -> bool:
    return bool(config.get("tie_word_embeddings", False))


def rope_scaling_of(config: dict):
    """Return ``None`` or ``(type, factor)`` with type in {"linear", "dynamic"}.

    A dict without a type (transformers 5 may turn ``null`` into a dict such as
    ``{"rope_type": "default", "rope_theta": ...}``) counts as null.
    """
    rs = config.get("rope_scaling")
    if not rs:
        return None
    kind = rs.get("type", rs.get("rope_type"))
    if kind is None or kind == "default":
        return None
    if kind not in ("linear", "dynamic"):
        raise ValueError(f"unsupported rope_scaling type {kind!r}")
    if rs.get("factor") is None:
        raise ValueError(f"rope_scaling of type {kind!r} needs a factor: {rs!r}")
    return kind, float(rs["factor"])


def f64(a) -> np.ndarray:
    return np.asarray(a, dtype=np.float64)


# --------------------------------------------------------------------------------------------
# weights
# --------------------------------------------------------------------------------------------


def split_wqkv(wqkv, num_heads: int, num_kv_heads: int, dim: int):
    """Split a packed wqkv weight ``[(nH + 2 nKV) D, H]`` (or bias ``[(nH + 2 nKV) D]``).

    The rows are grouped per KV head: group g holds G = nH // nKV query heads
    (heads g*G .. g*G+G-1, in slots 0..G-1), then key head g (slot G), then value head g
    (slot G+1); each slot is D rows. Returns (wq [nH*D, ...], wk [nKV*D, ...], wv [nKV*D, ...]).
    """
    wqkv = np.asarray(wqkv)
    G = num_heads // num_kv_heads
    slots = G + 2
    assert wqkv.shape[0] == num_kv_heads * slots * dim, (wqkv.shape, num_heads, num_kv_heads, dim)

    def rows_of(group: int, slot: int):
        start = (group * slots + slot) * dim
        return wqkv[start : start + dim]

    q_parts = []
    for j in range(num_heads):  # query head j lives in group j // G, slot j % G
        q_parts.append(rows_of(j // G, j % G))
    k_parts = []
    v_parts = []
    for g in range(num_kv_heads):
        k_parts.append(rows_of(g, G))
        v_parts.append(rows_of(g, G + 1))
    return np.concatenate(q_parts, 0), np.concatenate(k_parts, 0), np.concatenate(v_parts, 0)


def random_state(config: dict, seed: int, scale: float = 0.02) -> dict:
    """A random float32 state dict in the HF InternLM2 layout, exactly the keys of FACTS.md."""
    rng = np.random.default_rng(seed)
    H = config["hidden_size"]
    I = config["intermediate_size"]
    V = config["vocab_size"]
    nH = config["num_attention_heads"]
    nKV = config["num_key_value_heads"]
    D = head_dim(config)

    def w(*shape):
        return (scale * rng.standard_normal(shape)).astype(np.float32)

    def norm_w():
        return (1.0 + 0.1 * rng.standard_normal(H)).astype(np.float32)

    state = {"model.tok_embeddings.weight": w(V, H)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        state[p + "attention_norm.weight"] = norm_w()
        state[p + "attention.wqkv.weight"] = w((nH + 2 * nKV) * D, H)
        state[p + "attention.wo.weight"] = w(H, nH * D)
        if has_bias(config):
            state[p + "attention.wqkv.bias"] = w((nH + 2 * nKV) * D)
            state[p + "attention.wo.bias"] = w(H)
        state[p + "ffn_norm.weight"] = norm_w()
        state[p + "feed_forward.w1.weight"] = w(I, H)
        state[p + "feed_forward.w3.weight"] = w(I, H)
        state[p + "feed_forward.w2.weight"] = w(H, I)
    state["model.norm.weight"] = norm_w()
    if not is_tied(config):
        state["output.weight"] = w(V, H)
    return state


# --------------------------------------------------------------------------------------------
# building blocks
# --------------------------------------------------------------------------------------------


def linear(x, weight, bias=None):
    """PyTorch nn.Linear: weight is [out, in]."""
    y = f64(x) @ f64(weight).T
    if bias is not None:
        y = y + f64(bias)
    return y


def rms_norm(x, weight, eps: float):
    x = f64(x)
    mean_square = np.mean(x * x, axis=-1, keepdims=True)
    return x * (1.0 / np.sqrt(mean_square + eps)) * f64(weight)


def silu(x):
    return x / (1.0 + np.exp(-x))


def rotate_half(x):
    half = x.shape[-1] // 2
    return np.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def rope_base(config: dict, position_ids) -> float:
    """The rotary base used by one forward call (dynamic NTK recomputes it from this call's L)."""
    theta = float(config["rope_theta"])
    scaling = rope_scaling_of(config)
    if scaling is None or scaling[0] != "dynamic":
        return theta
    factor = scaling[1]
    D = head_dim(config)
    M = config["max_position_embeddings"]
    L = int(np.max(position_ids)) + 1  # over the whole batch of this call
    if L > M:
        return theta * ((factor * L / M) - (factor - 1)) ** (D / (D - 2))
    return theta


def rope_cos_sin(config: dict, position_ids):
    """cos, sin of shape [B, S, D] for integer positions [B, S]."""
    D = head_dim(config)
    base = rope_base(config, position_ids)
    inv_freq = 1.0 / base ** (np.arange(0, D, 2, dtype=np.float64) / D)  # [D/2]
    positions = f64(position_ids)
    scaling = rope_scaling_of(config)
    if scaling is not None and scaling[0] == "linear":
        positions = positions / scaling[1]
    angles = positions[..., None] * inv_freq  # [B, S, D/2]
    emb = np.concatenate([angles, angles], axis=-1)  # [B, S, D]
    return np.cos(emb), np.sin(emb)


def apply_rope(x, cos, sin):
    """x: [B, heads, S, D]; cos/sin: [B, S, D]."""
    cos = cos[:, None, :, :]
    sin = sin[:, None, :, :]
    return x * cos + rotate_half(x) * sin


def softmax(scores):
    scores = scores - np.max(scores, axis=-1, keepdims=True)
    e = np.exp(scores)
    return e / np.sum(e, axis=-1, keepdims=True)


# --------------------------------------------------------------------------------------------
# the model
# --------------------------------------------------------------------------------------------


def attention_block(state, config, layer, x, cos, sin, allowed, layer_past):
    """One attention sub-layer. x: [B, S, H] (already attention_norm'ed).

    allowed: bool [B, S, T_total] (True = key may be attended). Returns (out [B,S,H], (k, v)).
    """
    p = f"model.layers.{layer}.attention."
    B, S, _ = x.shape
    nH = config["num_attention_heads"]
    nKV = config["num_key_value_heads"]
    D = head_dim(config)
    G = nH // nKV

    wq, wk, wv = split_wqkv(state[p + "wqkv.weight"], nH, nKV, D)
    bq = bk = bv = None
    if adds_bias(config):
        bq, bk, bv = split_wqkv(state[p + "wqkv.bias"], nH, nKV, D)

    q = linear(x, wq, bq).reshape(B, S, nH, D).transpose(0, 2, 1, 3)  # [B, nH, S, D]
    k = linear(x, wk, bk).reshape(B, S, nKV, D).transpose(0, 2, 1, 3)  # [B, nKV, S, D]
    v = linear(x, wv, bv).reshape(B, S, nKV, D).transpose(0, 2, 1, 3)

    q = apply_rope(q, cos, sin)
    k = apply_rope(k, cos, sin)  # rotated before it enters the cache

    if layer_past is not None:
        k = np.concatenate([f64(layer_past[0]), k], axis=2)
        v = np.concatenate([f64(layer_past[1]), v], axis=2)

    heads_out = np.zeros((B, nH, S, D))
    for j in range(nH):
        g = j // G  # query head j reads KV head j // G
        scores = q[:, j] @ k[:, g].transpose(0, 2, 1) / np.sqrt(D)  # [B, S, T]
        scores = np.where(allowed, scores, MASKED_SCORE)
        probs = softmax(scores)
        heads_out[:, j] = probs @ v[:, g]

    attn = heads_out.transpose(0, 2, 1, 3).reshape(B, S, nH * D)
    bo = state[p + "wo.bias"] if adds_bias(config) else None
    out = linear(attn, state[p + "wo.weight"], bo)
    return out, (k, v)


def mlp_block(state, layer, x):
    p = f"model.layers.{layer}.feed_forward."
    gate = silu(linear(x, state[p + "w1.weight"]))
    up = linear(x, state[p + "w3.weight"])
    return linear(gate * up, state[p + "w2.weight"])


def forward(
    state,
    config,
    input_ids,
    position_ids=None,
    attention_mask=None,
    past=None,
    output_hidden_states=False,
):
    """Full-model forward. Returns {"logits" [B,S,V] f64, "past", and "hidden_states" if asked}."""
    input_ids = np.asarray(input_ids)
    B, S = input_ids.shape
    L_layers = config["num_hidden_layers"]
    eps = float(config["rms_norm_eps"])

    past_len = 0 if past is None else int(np.asarray(past[0][0]).shape[2])
    total = past_len + S

    if position_ids is None:
        position_ids = np.broadcast_to(np.arange(past_len, total), (B, S))
    position_ids = np.asarray(position_ids).reshape(B, S)

    # allowed[b, i, t]: query i (absolute index past_len + i) may look at key t.
    query_index = np.arange(past_len, total)[:, None]
    key_index = np.arange(total)[None, :]
    causal = key_index <= query_index  # [S, T]
    allowed = np.broadcast_to(causal, (B, S, total))
    if attention_mask is not None:
        mask = np.asarray(attention_mask).reshape(B, total).astype(bool)
        allowed = allowed & mask[:, None, :]

    cos, sin = rope_cos_sin(config, position_ids)

    h = f64(state["model.tok_embeddings.weight"])[input_ids]  # [B, S, H]
    hidden_states = [h]
    new_past = []
    for i in range(L_layers):
        p = f"model.layers.{i}."
        layer_past = None if past is None else past[i]
        a, kv = attention_block(
            state, config, i, rms_norm(h, state[p + "attention_norm.weight"], eps), cos, sin, allowed, layer_past
        )
        h = h + a
        h = h + mlp_block(state, i, rms_norm(h, state[p + "ffn_norm.weight"], eps))
        new_past.append(kv)
        hidden_states.append(h)

    h = rms_norm(h, state["model.norm.weight"], eps)
    hidden_states[-1] = h  # HF convention: the last entry is the final-norm output
    out_w = state["model.tok_embeddings.weight"] if is_tied(config) else state["output.weight"]
    logits = linear(h, out_w)

    result = {"logits": logits, "past": new_past}
    if output_hidden_states:
        result["hidden_states"] = hidden_states
    return result


def positions_from_mask(attention_mask):
    """HF generation's position ids: cumsum(mask) - 1, padded positions set to 1."""
    mask = np.asarray(attention_mask).astype(np.int64)
    pos = np.cumsum(mask, axis=-1) - 1
    return np.where(mask == 0, 1, pos)


def greedy_generate(state, config, input_ids, max_new_tokens, attention_mask=None):
    """Cached greedy decoding. Returns the new token ids [B, max_new_tokens]."""
    input_ids = np.asarray(input_ids)
    B, S = input_ids.shape
    if attention_mask is None:
        position_ids = np.broadcast_to(np.arange(S), (B, S))
        mask = None
    else:
        mask = np.asarray(attention_mask).astype(np.int64).reshape(B, S)
        position_ids = positions_from_mask(mask)

    out = forward(state, config, input_ids, position_ids=position_ids, attention_mask=mask)
    past = out["past"]
    next_tok = np.argmax(out["logits"][:, -1, :], axis=-1)
    last_pos = np.asarray(position_ids)[:, -1]
    generated = [next_tok]
    for _ in range(max_new_tokens - 1):
        last_pos = last_pos + 1
        if mask is not None:
            mask = np.concatenate([mask, np.ones((B, 1), dtype=mask.dtype)], axis=1)
        out = forward(
            state,
            config,
            next_tok[:, None],
            position_ids=last_pos[:, None],
            attention_mask=mask,
            past=past,
        )
        past = out["past"]
        next_tok = np.argmax(out["logits"][:, -1, :], axis=-1)
        generated.append(next_tok)
    return np.stack(generated, axis=1)[:, :max_new_tokens]


# --------------------------------------------------------------------------------------------
# conversion to HF transformers Llama (for cross-checking against LlamaForCausalLM)
# --------------------------------------------------------------------------------------------


def llama_state_from_internlm2(state: dict, config: dict) -> dict:
    """HF InternLM2 keys -> HF transformers Llama keys (un-packing wqkv per KV group)."""
    nH = config["num_attention_heads"]
    nKV = config["num_key_value_heads"]
    D = head_dim(config)
    out = {"model.embed_tokens.weight": state["model.tok_embeddings.weight"]}
    for i in range(config["num_hidden_layers"]):
        s = f"model.layers.{i}."
        wq, wk, wv = split_wqkv(state[s + "attention.wqkv.weight"], nH, nKV, D)
        out[s + "self_attn.q_proj.weight"] = wq
        out[s + "self_attn.k_proj.weight"] = wk
        out[s + "self_attn.v_proj.weight"] = wv
        out[s + "self_attn.o_proj.weight"] = state[s + "attention.wo.weight"]
        if adds_bias(config):
            bq, bk, bv = split_wqkv(state[s + "attention.wqkv.bias"], nH, nKV, D)
            out[s + "self_attn.q_proj.bias"] = bq
            out[s + "self_attn.k_proj.bias"] = bk
            out[s + "self_attn.v_proj.bias"] = bv
            out[s + "self_attn.o_proj.bias"] = state[s + "attention.wo.bias"]
        out[s + "mlp.gate_proj.weight"] = state[s + "feed_forward.w1.weight"]
        out[s + "mlp.up_proj.weight"] = state[s + "feed_forward.w3.weight"]
        out[s + "mlp.down_proj.weight"] = state[s + "feed_forward.w2.weight"]
        out[s + "input_layernorm.weight"] = state[s + "attention_norm.weight"]
        out[s + "post_attention_layernorm.weight"] = state[s + "ffn_norm.weight"]
    out["model.norm.weight"] = state["model.norm.weight"]
    out["lm_head.weight"] = state["model.tok_embeddings.weight"] if is_tied(config) else state["output.weight"]
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


def llama_config_from_internlm2(config: dict):
    """A transformers.LlamaConfig with the same math.

    transformers 5 takes rope settings as ``rope_parameters={"rope_type": ..., "rope_theta": ...,
    "factor": ...}`` (the old ``rope_theta=`` / ``rope_scaling=`` kwargs are folded into it).
    """
    from transformers import LlamaConfig

    rope_parameters = {"rope_type": "default", "rope_theta": float(config["rope_theta"])}
    scaling = rope_scaling_of(config)
    if scaling is not None:
        rope_parameters = {"rope_type": scaling[0], "rope_theta": float(config["rope_theta"]), "factor": scaling[1]}
    return LlamaConfig(
        vocab_size=config["vocab_size"],
        hidden_size=config["hidden_size"],
        intermediate_size=config["intermediate_size"],
        num_hidden_layers=config["num_hidden_layers"],
        num_attention_heads=config["num_attention_heads"],
        num_key_value_heads=config["num_key_value_heads"],
        head_dim=head_dim(config),
        hidden_act="silu",
        max_position_embeddings=config["max_position_embeddings"],
        rms_norm_eps=float(config["rms_norm_eps"]),
        rope_parameters=rope_parameters,
        attention_bias=adds_bias(config),
        mlp_bias=False,
        tie_word_embeddings=is_tied(config),
        bos_token_id=config.get("bos_token_id", 1),
        eos_token_id=config.get("eos_token_id", 2),
        pad_token_id=config.get("pad_token_id"),
    )
