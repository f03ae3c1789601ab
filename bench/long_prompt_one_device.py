"""A long prompt prefilled and decoded on ONE CPU device with no mesh: wall time and peak host memory.

    python bench/long_prompt_one_device.py [--length 65536] [--hidden 512] [--layers 2] [--new 8]
                                           [--long-prompt-chunk N]

The model is the 1M-context preset shrunk to ``--hidden`` / ``--layers`` (heads of 64, a quarter as many
KV heads), random float32 weights. ``generate_ids`` prefills the prompt (in ``long_prompt_chunk``-token
chunks past that length, else in one blockwise pass; never ``[S, S]`` scores) and decodes ``--new``
tokens. Peak RSS is the process's high-water mark (``ru_maxrss``) after the call, beside what the
weights and the KV cache alone take. Prints JSON.
"""

import argparse
import json
import resource
import time

import jax
import numpy as np
from flax import nnx

import internlm_jax as ij
from internlm_jax.generation import generate_ids


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--length", type=int, default=65536)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--new", type=int, default=8)
    ap.add_argument("--long-prompt-chunk", type=int, default=None,
                    help="the model's long_prompt_chunk setting (default: the library's; 0: one pass)")
    args = ap.parse_args()
    heads = args.hidden // 64
    cfg = ij.InternLM2Config.preset("internlm2_5-7b-chat-1m").replace(
        hidden_size=args.hidden, intermediate_size=4 * args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=heads, num_key_value_heads=max(1, heads // 4))
    model = ij.InternLM2(cfg, seed=0)
    if args.long_prompt_chunk is not None:
        model.configure(long_prompt_chunk=args.long_prompt_chunk)
    prompt = np.random.RandomState(0).randint(3, cfg.vocab_size, args.length).tolist()
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    t = time.perf_counter()
    out = generate_ids(model, [prompt], max_new_tokens=args.new, stop_ids=())
    wall = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    weights = sum(x.nbytes for x in jax.tree.leaves(nnx.state(model)))
    cache = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * (args.length + args.new) * 4
    print(json.dumps({
        "device": str(jax.devices()[0]), "jax": jax.__version__, "length": args.length, "hidden": args.hidden,
        "layers": args.layers, "long_prompt_chunk": model.settings.long_prompt_chunk, "new_tokens": len(out[0]),
        "wall_s (compile included)": round(wall, 1),
        "peak_rss_gib": round(peak, 2), "rss_before_gib": round(rss_before, 2),
        "weights_gib": round(weights / 2**30, 3), "kv_cache_gib": round(cache / 2**30, 3),
        "dense_scores_one_layer_gib": round(heads * args.length**2 * 4 / 2**30, 1)}, indent=1))


if __name__ == "__main__":
    main()
