"""Temporaries and time of the scanned forward and its gradient on CPU, with and without the layer-scan
compiler options (``InternLM2.scan_compiler_options``), by weight and compute dtype.

    python bench/scan_memory.py [--layers 12] [--tokens 128]

The bench model's shape (hidden 1024, MLP 2816, 16 / 4 heads, vocab 92544), random weights, one device.
For each dtype pair: XLA's ``memory_analysis().temp_size_in_bytes`` of ``model(ids)`` and of the gradient
of its mean, and the best of three timed calls; "default" compiles without options, "ours" with the
model's (none for float32). Prints JSON.
"""

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import internlm_jax as ij


def best(fn, *args, repeats=3):
    jax.block_until_ready(fn(*args))
    out = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        out = min(out, time.perf_counter() - t)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--tokens", type=int, default=128)
    args = ap.parse_args()
    cfg = ij.InternLM2Config.preset("internlm2_5-7b-chat").replace(
        hidden_size=1024, intermediate_size=2816, num_hidden_layers=args.layers, num_attention_heads=16,
        num_key_value_heads=4)
    ids = jnp.asarray(np.random.RandomState(0).randint(0, cfg.vocab_size, (1, args.tokens)), jnp.int32)
    rows = []
    for dtype, param_dtype in (("bfloat16", "bfloat16"), ("bfloat16", "float32"), ("float32", "float32")):
        model = ij.InternLM2(cfg, seed=0, dtype=dtype, param_dtype=param_dtype)
        graphdef, state = nnx.split(model)
        forward = lambda state, ids: nnx.merge(graphdef, state)(ids)  # noqa: E731
        grad = jax.grad(lambda state, ids: jnp.mean(forward(state, ids)))
        row = {"dtype": dtype, "param_dtype": param_dtype, "options": model.scan_compiler_options()}
        outs = []
        for name, options in (("default", None), ("ours", model.scan_compiler_options() or None)):
            f = jax.jit(forward, compiler_options=options).lower(state, ids).compile()
            g = jax.jit(grad, compiler_options=options).lower(state, ids).compile()
            row[name] = {"forward_MiB": round(f.memory_analysis().temp_size_in_bytes / 2**20, 1),
                         "grad_MiB": round(g.memory_analysis().temp_size_in_bytes / 2**20, 1),
                         "forward_s": round(best(f, state, ids), 3), "grad_s": round(best(g, state, ids), 3)}
            outs.append(np.asarray(f(state, ids)))
        row["max_abs_diff"] = float(np.max(np.abs(outs[0] - outs[1])))
        rows.append(row)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
