"""Prefill temporaries and time on CPU, by parameter dtype and depth (the generator's unrolled prefill).

    python bench/prefill_memory.py [--layers 4 12] [--lengths 128 512]

The bench model's shape (hidden 1024, MLP 2816, 16 / 4 heads, vocab 92544), random weights, one device.
For each dtype, depth and prompt length: the compiled prefill's temporaries (``memory_analysis``) and
the best of five timed calls. Temporaries that grow with the depth are per-layer copies that are live at
the same time (XLA:CPU multiplies 16-bit weights as float32 copies). Prints JSON.
"""

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

import internlm_jax as ij
from internlm_jax.generation import generator_for


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, nargs="+", default=[4, 12])
    ap.add_argument("--lengths", type=int, nargs="+", default=[128, 512])
    ap.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"])
    args = ap.parse_args()
    out = {"jax": jax.__version__, "rows": []}
    for dtype in args.dtypes:
        for layers in args.layers:
            cfg = ij.InternLM2Config.preset("internlm2_5-7b-chat").replace(
                hidden_size=1024, intermediate_size=2816, num_hidden_layers=layers, num_attention_heads=16,
                num_key_value_heads=4)
            gen = generator_for(ij.InternLM2(cfg, seed=0, dtype=dtype))
            for length in args.lengths:
                ids = jnp.asarray(np.random.RandomState(0).randint(0, cfg.vocab_size, (1, length)), jnp.int32)
                mask, pos = jnp.ones((1, length), jnp.int32), jnp.arange(length, dtype=jnp.int32)[None]
                call = (gen.state, gen.layers, ids, mask, pos, pos)
                kw = dict(cache_len=length + 64, last=length - 1)
                temp = gen.prefill.lower(*call, **kw).compile().memory_analysis().temp_size_in_bytes
                jax.block_until_ready(gen.prefill(*call, **kw))
                times = []
                for _ in range(5):
                    t = time.perf_counter()
                    jax.block_until_ready(gen.prefill(*call, **kw))
                    times.append(time.perf_counter() - t)
                row = {"dtype": dtype, "layers": layers, "tokens": length, "temp_mib": round(temp / 2**20, 1),
                       "best_s": round(min(times), 4)}
                print(json.dumps(row), flush=True)
                out["rows"].append(row)
            del gen
    print(json.dumps(out))


if __name__ == "__main__":
    main()
