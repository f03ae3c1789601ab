"""CPU side by side: ours, HF transformers (PyTorch) and optionally EasyDeL, on the same weights.

The issue's checkpoint: a 325M-parameter float32 InternLM2-shaped model (hidden 1024, 12 layers, 16 heads /
4 KV heads, MLP 2816, vocab 92544), random weights. Figures: prefill tok/s (512 tokens, all logits), TTFT
(128-token prompt to first token), decode tok/s at batch 1 and 8 (128-token prompts, N new tokens) as
``B*(N-1)/(t(N)-t(1))`` so prefill cancels; batch-1 decode against the read-bandwidth roofline (bytes of
weights + filled cache per token over the read bandwidth measured in the same run) and against XLA's own
matrix-vector chain over the same weights (:func:`matvec_chain`); XLA's bytes per decode
step at two cache lengths (slope against the cache bytes, intercept against the weight bytes).

    taskset -c 0,1 python bench/generate.py [--new 64] [--easydel /work/easydel-venv/bin/python] [--json out.json]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

import internlm_jax as ij
from internlm_jax.arrays import flat_params
from internlm_jax.generation import SamplingParams, generator_for


def config():
    return ij.InternLM2Config.preset("internlm2_5-7b-chat").replace(
        hidden_size=1024, intermediate_size=2816, num_hidden_layers=12, num_attention_heads=16, num_key_value_heads=4)


def bench_model():
    """(threads, config, model): torch given this process's CPUs, the issue's model with random weights."""
    import torch

    threads = len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    cfg = config()
    return threads, cfg, ij.InternLM2(cfg, seed=0)


def best(fn, repeats=3):
    fn()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return min(ts)


def read_bandwidth(nbytes=1 << 30) -> float:
    """Bytes read per second from a large array, the best of eight probes on this host: a jitted XLA
    sum, a jitted matrix-vector product (the access pattern of a decode step), numpy's sum (one
    thread) and torch's sum (on torch's threads, set to this process's CPUs: both cores stream), each
    on 4 KiB pages and on an array backed with 2 MiB pages as the decode weights are
    (``back_with_huge_pages``; it streams faster, so the roofline must use it too)."""
    import torch

    from internlm_jax.arrays import back_with_huge_pages

    def probes(huge):
        x = jnp.ones((nbytes // 4 // 8192, 8192), jnp.float32) + 0
        if huge:
            back_with_huge_pages(x)
        v = jnp.ones((8192,), jnp.float32)
        total = jax.jit(lambda a: jnp.sum(a, axis=0))
        matvec = jax.jit(lambda a, v: a @ v)
        y = np.asarray(x).reshape(-1)  # the same buffer: no copy on the CPU backend
        t = torch.from_numpy(y)
        return [best(lambda: total(x).block_until_ready(), 5), best(lambda: matvec(x, v).block_until_ready(), 5),
                best(lambda: y.sum(), 5), best(lambda: t.sum(), 5)]

    times = probes(False) + probes(True)
    return nbytes / min(times)


def matvec_chain(model) -> tuple[float, int]:
    """XLA's own batch-1 ceiling on this host: one row through every matrix a decode step reads (the packed
    per-layer weights and the output layer, as the step holds them), each product feeding the next as in a
    step, with no attention, norms or sampling. Returns (seconds, bytes of those matrices). Our step over
    this time says how much of the gap to the read roofline is XLA's matrix-vector product itself."""
    layers = generator_for(model).layers
    mats = [w for w in jax.tree.leaves(layers) if w.ndim == 2]  # packed form: each [N, K], output-major

    def fit(x, k):  # the previous product's row, cut or repeated to the next matrix's K
        return jnp.tile(x, (1, -(-k // x.shape[1])))[:, :k]

    @jax.jit
    def chain(x, mats):
        for w in mats:
            x = jax.lax.dot_general(fit(x, w.shape[1]), w, (((1,), (1,)), ((), ()))) * 1e-3
        return x.sum()

    x = jnp.ones((1, model.config.hidden_size), jnp.float32)
    return best(lambda: chain(x, mats).block_until_ready(), 5), sum(w.nbytes for w in mats)


def time_ours(model, batch, prompt_len, new_tokens):
    gen = generator_for(model)
    rng = np.random.RandomState(0)
    prompts = [list(rng.randint(3, 90000, prompt_len)) for _ in range(batch)]
    sampling = SamplingParams()

    def run(n):
        return ij.generate_ids(model, prompts, max_new_tokens=n, stop_ids=(), max_length=prompt_len + 2 * new_tokens)

    t = time.perf_counter()
    run(1)
    compile_first = time.perf_counter() - t
    t = time.perf_counter()
    run(new_tokens)
    compile_n = time.perf_counter() - t
    t1 = best(lambda: run(1))
    tn = best(lambda: run(new_tokens))
    prepared = gen.prepare(prompts)
    ttft = best(lambda: int(gen.sample(gen.start(prepared, new_tokens)[0].logits, jax.random.key(0),
                                       sampling, None)[0]))
    return dict(compile_s=compile_first + compile_n, ttft_s=ttft, t1_s=t1, tn_s=tn,
                decode_tok_s=batch * (new_tokens - 1) / (tn - t1),
                cache_len=gen.layout(prepared.ids.shape[1], new_tokens)[0])


def step_bytes(model, cache_lens=(256, 2048), batch=1):
    """XLA's bytes accessed by one decode step (the unrolled layers: each counted) at two cache lengths."""
    from internlm_jax.cache import KVCache
    from internlm_jax.generation import DecodeState

    gen = generator_for(model)
    cfg = model.config
    out = []
    for t in cache_lens:
        ds = DecodeState.abstract(cfg, batch, KVCache.abstract(cfg, batch, t, model.dtype))
        t0 = time.perf_counter()
        c = gen.step.lower(gen.state, gen.abstract_layers(), ds, jax.ShapeDtypeStruct((), jnp.int32),
                           sampling=SamplingParams(), stop_ids=()).compile()
        ca = c.cost_analysis()
        ca = ca[0] if isinstance(ca, list) else ca
        out.append(dict(cache_len=t, bytes=float(ca["bytes accessed"]),
                        cache_bytes=KVCache.abstract(cfg, batch, t, model.dtype).nbytes,
                        compile_s=time.perf_counter() - t0))
    return out


def hf_llama(model):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = model.config
    h, nh, nkv, d = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    lcfg = LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=h, intermediate_size=cfg.intermediate_size,
                       num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=nh, num_key_value_heads=nkv,
                       max_position_embeddings=cfg.max_position_embeddings, rms_norm_eps=cfg.rms_norm_eps,
                       rope_theta=cfg.rope_theta, tie_word_embeddings=False, attention_bias=False)
    p = {k: np.asarray(v.get_value(), np.float32) for k, v in flat_params(model).items()}
    sd = {"model.embed_tokens.weight": p["tok_embeddings"], "model.norm.weight": p["norm.weight"],
          "lm_head.weight": p["output"].T}
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


def time_hf_decode(llama, batch, prompt_len, new_tokens):
    import torch

    ids = torch.from_numpy(np.random.RandomState(0).randint(3, 90000, (batch, prompt_len)))

    def run(n):
        with torch.no_grad():
            llama.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)

    t1, tn = best(lambda: run(1)), best(lambda: run(new_tokens))
    return dict(ttft_s=t1 if batch == 1 else None, decode_tok_s=batch * (new_tokens - 1) / (tn - t1))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--easydel", default=None, help="python of a venv with easydel==0.3.0 (bench/peer_easydel.py)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    import torch

    threads, cfg, model = bench_model()
    n = model.num_parameters()
    bw = read_bandwidth()
    res = dict(jax=jax.__version__, torch=torch.__version__, threads=threads, params=n, read_bw=bw)
    print(f"jax {jax.__version__}, torch {torch.__version__}, {threads} threads; model {n / 1e6:.0f}M params f32; "
          f"read bandwidth {bw / 1e9:.1f} GB/s", flush=True)
    ids = np.random.RandomState(1).randint(3, 90000, (1, args.prefill))
    jax.block_until_ready(model(ids))
    t = best(lambda: np.asarray(model(ids)))
    res["ours"] = {"prefill_tok_s": args.prefill / t}
    for b in (1, 8):
        res["ours"][f"b{b}"] = time_ours(model, b, args.prompt, args.new)
    # bytes a batch-1 step must read: every weight but the embedding table (one row), and the filled cache
    weights = 4 * (n - cfg.vocab_size * cfg.hidden_size + cfg.hidden_size)
    filled = args.prompt + args.new / 2
    need = weights + 2 * cfg.num_hidden_layers * filled * cfg.num_key_value_heads * cfg.head_dim * 4
    step_s = 1 / res["ours"]["b1"]["decode_tok_s"]
    chain_s, chain_bytes = matvec_chain(model)
    bw = res["read_bw"] = max(bw, read_bandwidth())  # probed again after the decode timings: the faster counts
    res["ours"]["b1_roofline"] = need / step_s / bw
    res["ours"]["xla_matvec_chain_roofline"] = chain_bytes / chain_s / bw
    res["ours"]["b1_over_xla_matvec_chain"] = chain_s / step_s
    sb = step_bytes(model)
    slope = (sb[1]["bytes"] - sb[0]["bytes"]) / (sb[1]["cache_bytes"] - sb[0]["cache_bytes"])
    intercept = sb[0]["bytes"] - slope * sb[0]["cache_bytes"]
    res["ours"]["step_bytes"] = dict(points=sb, slope=slope, intercept_over_weights=intercept / (4 * n))
    print(json.dumps(res["ours"], indent=1), flush=True)
    if not args.no_hf:
        llama = hf_llama(model)
        x = torch.from_numpy(ids)
        with torch.no_grad():
            t = best(lambda: llama(x))
        res["hf"] = {"prefill_tok_s": args.prefill / t}
        for b in (1, 8):
            res["hf"][f"b{b}"] = time_hf_decode(llama, b, args.prompt, args.new)
        del llama
        print(json.dumps(res["hf"], indent=1), flush=True)
    if args.easydel:
        with tempfile.TemporaryDirectory() as d:
            model.save_pretrained(os.path.join(d, "hf"))
            del model
            out = os.path.join(d, "easydel.json")
            subprocess.run([args.easydel, os.path.join(os.path.dirname(__file__), "peer_easydel.py"), "--hf-dir",
                            os.path.join(d, "hf"), "--prompt", str(args.prompt), "--new", str(args.new), "--prefill",
                            str(args.prefill), "--threads", str(threads), "--json", out], check=True,
                           stdout=sys.stderr)
            res["easydel"] = json.load(open(out))
    if args.json:
        json.dump(res, open(args.json, "w"), indent=1)


if __name__ == "__main__":
    main()
