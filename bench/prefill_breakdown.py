"""Where a 512-token prefill of bench/generate.py's 325M model spends its time, against HF (CPU).

``model(ids)`` (all logits, float32) is split into the layer trunk (to the final norm) and the output
layer, each timed against the same part of HF transformers' Llama on the same weights in this process.
The trunk is also timed unrolled over per-layer weight arrays (plain rows and the packed decode form),
since the layer scan copies each stacked weight before its matmul on CPU; and the model's matmul shapes
are timed alone, as XLA dots under the CPU dot-library options that the compiler accepts per program,
and as torch matmuls. Prints one JSON object (seconds, GFLOP/s).

    taskset -c 0,1 python bench/prefill_breakdown.py [--tokens 512] [--json out.json]
"""

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from generate import bench_model, best, hf_llama  # bench/ is on sys.path when this script runs

from internlm_jax.rope import rope_tables

# XLA:CPU options a program may be compiled with (compiler_options), picking the library for its dots
DOT = "LIBRARY_FUSION_TYPE_DOT"
DOT_OPTIONS = {"default": {}, "onednn": {"xla_cpu_experimental_onednn_fusion_type": DOT},
               "xnnpack": {"xla_cpu_use_xnnpack": True, "xla_cpu_experimental_xnn_fusion_type": DOT},
               "no_ynnpack": {"xla_cpu_experimental_ynn_fusion_type": ""}}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    import torch

    threads, cfg, model = bench_model()
    s = args.tokens
    ids_np = np.random.RandomState(1).randint(3, 90000, (1, s))
    ids = jnp.asarray(ids_np)
    graph, state = nnx.split(model)
    trunk = jax.jit(lambda st, ids: nnx.merge(graph, st).final_hidden(ids))

    def unrolled(st, ids, weights):
        m = nnx.merge(graph, st)
        index = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (1, s))
        attention = m.attention_for(m.prefill_plan(s), index, jnp.ones((1, s), bool), None, length=s)
        cos, sin = rope_tables(cfg, index, m.dtype, seq_len=jnp.int32(s))
        x = m.embed(ids)
        for layer in m.unrolled_layers(weights):
            x, _ = layer(x, cos, sin, lambda q, k, v: (attention(q, k, v), None), None)
        return m.norm(x)

    unrolled = jax.jit(unrolled)
    rows = jax.jit(lambda st: nnx.merge(graph, st).decode_weights(False))(state)
    packed = jax.jit(lambda st: nnx.merge(graph, st).decode_weights(True))(state)
    llama = hf_llama(model)
    x = torch.from_numpy(ids_np)
    res = dict(jax=jax.__version__, torch=torch.__version__, threads=threads, tokens=s)
    with torch.no_grad():
        res["ours_model_call_s"] = best(lambda: jax.block_until_ready(model(ids)))
        res["hf_model_call_s"] = best(lambda: llama(x))
        res["ours_trunk_scan_s"] = best(lambda: jax.block_until_ready(trunk(state, ids)))
        res["ours_trunk_unrolled_rows_s"] = best(lambda: jax.block_until_ready(unrolled(state, ids, rows)))
        res["ours_trunk_unrolled_packed_s"] = best(lambda: jax.block_until_ready(unrolled(state, ids, packed)))
        res["hf_trunk_s"] = best(lambda: llama.model(x))
    h, i, nh, nkv, d = cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads, cfg.num_key_value_heads, \
        cfg.head_dim
    shapes = {"wqkv": (h, (nh + 2 * nkv) * d), "wo": (nh * d, h), "w1": (h, i), "w2": (i, h),
              "head": (h, cfg.vocab_size)}
    res["matmul_gflops"] = {}
    for name, (k, n) in shapes.items():
        a = jnp.asarray(np.random.rand(s, k).astype(np.float32))
        b = jnp.asarray(np.random.rand(k, n).astype(np.float32))
        row = {}
        for option, flags in DOT_OPTIONS.items():
            compiled = jax.jit(jnp.matmul).lower(a, b).compile(compiler_options=flags)
            row[option] = 2 * s * k * n / best(lambda: jax.block_until_ready(compiled(a, b)), 5) / 1e9
        ta, tb = torch.from_numpy(np.asarray(a)), torch.from_numpy(np.asarray(b))
        row["torch"] = 2 * s * k * n / best(lambda: ta @ tb, 5) / 1e9
        res["matmul_gflops"][name] = row
    print(json.dumps(res, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
