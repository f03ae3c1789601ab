"""Generation speed against HF transformers (PyTorch) on the same weights, and against the roofline.

A ~380M-parameter InternLM2-shaped model (real vocabulary) with random weights; one JAX device.
Reports compile times, time to first token, prefill tokens/s, decode tokens/s at batch 1 and 8 (the
on-device decode loop), the same for LlamaForCausalLM (the InternLM2 -> Llama split of the same
weights) in the same process, and decode bytes/s as a fraction of the memory bandwidth measured on
the spot (a large numpy copy).

    python bench/generate.py [--dtype float32] [--prompt 128] [--new 32]
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import internlm_jax as ij
from internlm_jax.generation import SamplingParams, generator_for


def config():
    return ij.InternLM2Config.preset("internlm2_5-7b-chat").replace(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=12, num_attention_heads=16, num_key_value_heads=8)


def memory_bandwidth(nbytes=1 << 30, repeats=5) -> float:
    """Bytes moved per second by a large copy (read + write), best of a few."""
    src = np.ones(nbytes // 4, np.float32)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t)
    return 2 * nbytes / best


def time_ours(model, batch, prompt_len, new_tokens):
    gen = generator_for(model)
    rng = np.random.RandomState(0)
    prompts = [list(rng.randint(3, 90000, prompt_len)) for _ in range(batch)]
    prepared = gen.prepare(prompts)
    sampling = SamplingParams()
    t = time.perf_counter()
    out = gen.start(prepared, new_tokens)
    jax.block_until_ready(out)
    first_compile = time.perf_counter() - t
    t = time.perf_counter()
    logits, ck, cv, valid, index, pos, seen = gen.start(prepared, new_tokens)
    first = gen.sample(logits, jax.random.key(0), sampling, seen)
    first.block_until_ready()
    ttft = time.perf_counter() - t
    args = (gen.state, logits, ck, cv, valid, index, pos, seen, jax.random.key(0))
    kw = dict(max_new_tokens=new_tokens, sampling=sampling, stop_ids=())
    t = time.perf_counter()
    jax.block_until_ready(gen.decode_loop(*args, **kw))
    loop_compile = time.perf_counter() - t
    logits, ck, cv, valid, index, pos, seen = gen.start(prepared, new_tokens)
    t = time.perf_counter()
    jax.block_until_ready(gen.decode_loop(gen.state, logits, ck, cv, valid, index, pos, seen, jax.random.key(0), **kw))
    decode = time.perf_counter() - t
    cache_bytes = ck.size * ck.dtype.itemsize * 2
    return dict(prefill_compile_s=first_compile, loop_compile_s=loop_compile, ttft_s=ttft,
                prefill_tok_s=batch * prompt_len / ttft, decode_tok_s=batch * new_tokens / decode,
                decode_step_s=decode / new_tokens, cache_bytes=cache_bytes, padded_prompt=prepared.ids.shape[1])


def hf_llama(model):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = model.config
    h, nh, nkv, d = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    lcfg = LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=h, intermediate_size=cfg.intermediate_size,
                       num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=nh, num_key_value_heads=nkv,
                       max_position_embeddings=cfg.max_position_embeddings, rms_norm_eps=cfg.rms_norm_eps,
                       rope_theta=cfg.rope_theta, tie_word_embeddings=False, attention_bias=False)
    p = {".".join(map(str, k)): np.asarray(v.get_value(), np.float32) for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    sd = {"model.embed_tokens.weight": p["tok_embeddings"], "model.norm.weight": p["norm.weight"], "lm_head.weight": p["output"].T}
    for i in range(cfg.num_hidden_layers):
        q = f"model.layers.{i}."
        sd[q + "self_attn.q_proj.weight"] = p["layers.attention.wq"][i].reshape(h, nh * d).T
        sd[q + "self_attn.k_proj.weight"] = p["layers.attention.wk"][i].reshape(h, nkv * d).T
        sd[q + "self_attn.v_proj.weight"] = p["layers.attention.wv"][i].reshape(h, nkv * d).T
        sd[q + "self_attn.o_proj.weight"] = p["layers.attention.wo"][i].reshape(nh * d, h).T
        sd[q + "mlp.gate_proj.weight"] = p["layers.feed_forward.w1"][i].T
        sd[q + "mlp.up_proj.weight"] = p["layers.feed_forward.w3"][i].T
        sd[q + "mlp.down_proj.weight"] = p["layers.feed_forward.w2"][i].T
        sd[q + "input_layernorm.weight"] = p["layers.attention_norm.weight"][i]
        sd[q + "post_attention_layernorm.weight"] = p["layers.ffn_norm.weight"][i]
    llama = LlamaForCausalLM(lcfg).eval()
    llama.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()}, strict=False)
    return llama


def time_hf(llama, batch, prompt_len, new_tokens):
    import torch

    ids = torch.from_numpy(np.random.RandomState(0).randint(3, 90000, (batch, prompt_len)))
    with torch.no_grad():
        llama(ids[:, :8])  # warm up
        t = time.perf_counter()
        llama(ids)
        prefill = time.perf_counter() - t
        t = time.perf_counter()
        llama.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        total = time.perf_counter() - t
    return dict(ttft_s=prefill, prefill_tok_s=batch * prompt_len / prefill,
                decode_tok_s=batch * new_tokens / max(total - prefill, 1e-9))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--no-hf", action="store_true")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(len(__import__("os").sched_getaffinity(0)))
    model = ij.InternLM2(config(), dtype=args.dtype, seed=0)
    n = model.num_parameters()
    param_bytes = n * jnp.dtype(args.dtype).itemsize
    bw = memory_bandwidth()
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind} ({jax.devices()[0].platform}); torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; model {n / 1e6:.0f}M params, {args.dtype}; "
          f"measured copy bandwidth {bw / 1e9:.1f} GB/s")
    llama = None if args.no_hf else hf_llama(model)
    for batch in (1, 8):
        r = time_ours(model, batch, args.prompt, args.new)
        step_bytes = param_bytes + r["cache_bytes"]  # every step reads all weights and the whole cache
        frac = step_bytes / r["decode_step_s"] / bw
        print(f"ours  batch {batch}: prompt {args.prompt} (bucket {r['padded_prompt']}), compile prefill "
              f"{r['prefill_compile_s']:.1f}s + loop {r['loop_compile_s']:.1f}s; TTFT {r['ttft_s'] * 1e3:.0f} ms; "
              f"prefill {r['prefill_tok_s']:.0f} tok/s; decode {r['decode_tok_s']:.1f} tok/s "
              f"({step_bytes / r['decode_step_s'] / 1e9:.2f} GB/s = {frac:.0%} of measured bandwidth)")
        if llama is not None:
            h = time_hf(llama, batch, args.prompt, args.new)
            print(f"HF    batch {batch}: TTFT {h['ttft_s'] * 1e3:.0f} ms; prefill {h['prefill_tok_s']:.0f} tok/s; "
                  f"decode {h['decode_tok_s']:.1f} tok/s  -> ours/HF decode {r['decode_tok_s'] / h['decode_tok_s']:.2f}x, "
                  f"prefill {r['prefill_tok_s'] / h['prefill_tok_s']:.2f}x")


if __name__ == "__main__":
    main()
