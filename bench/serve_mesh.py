"""Bytes the serving engine's programs move between devices on a mesh, counted in the compiled HLO.

    python bench/serve_mesh.py [--devices 8] [--mesh data=8] [--rows 32] [--slots 4096] [--layers 4]

Builds the engine on host CPU devices (``--xla_force_host_platform_device_count``), compiles its
prefill chunk (``--chunk`` tokens of one row, attending to every slot) and one decode step, and sums
the result bytes of every all-gather, all-reduce, all-to-all and collective-permute in each. Counting
needs no accelerator: the partitioned program is the same one a TPU or GPU mesh would run, only the
backend's kernels differ. Prints JSON.
"""

import argparse
import json
import math
import os
import re

BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "pred": 1, "s8": 1, "u8": 1}
COLLECTIVE = re.compile(r"= \(?(\w+)\[([\d,]*)\][^\n]*? (all-gather|all-reduce|all-to-all|collective-permute)\(")


def collective_bytes(hlo: str) -> dict:
    """Result bytes of the collectives in compiled HLO text, by kind."""
    out = {}
    for m in COLLECTIVE.finditer(hlo):
        size = math.prod(int(n) for n in m.group(2).split(",") if n) * BYTES.get(m.group(1), 4)
        out[m.group(3)] = out.get(m.group(3), 0) + size
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devices", type=int, default=8)
    ap.add_argument("--mesh", default="data=8", help="mesh axes, e.g. data=2,tensor=4")
    ap.add_argument("--rows", type=int, default=32, help="cache rows (max batch)")
    ap.add_argument("--slots", type=int, default=4096, help="slots per row (max length)")
    ap.add_argument("--chunk", type=int, default=512, help="prefill chunk tokens")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--dtype", default="bfloat16")
    args = ap.parse_args()
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={args.devices}")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import numpy as np

    import internlm_jax as ij
    from internlm_jax.engine import Engine
    from internlm_jax.generation import SamplingParams

    axes = {k: int(v) for k, v in (kv.split("=") for kv in args.mesh.split(","))}
    cfg = ij.InternLM2Config(vocab_size=1024, hidden_size=512, intermediate_size=1024, num_hidden_layers=args.layers,
                             num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=2 * args.slots)
    model = ij.InternLM2(cfg, seed=0, mesh=ij.make_mesh(**{"fsdp": 1, **axes}), dtype=args.dtype)
    engine = Engine(model, max_batch=args.rows, max_len=args.slots, prefill_chunk=args.chunk, stop_ids=(2,))
    gen, ds, c = engine.gen, engine.ds, args.chunk
    tokens, positions, last = np.zeros(c, np.int32), np.arange(c, dtype=np.int32), np.int32(args.rows - 1)
    prefill = gen.extend.lower(gen.state, gen.layers, ds.cache, tokens, positions, last, np.int32(0), np.int32(c),
                               np.int32(c), tokens, logprobs=-1, keys=args.slots).compile().as_text()
    decode = gen.chunk.lower(gen.state, gen.layers, ds, engine.base, steps=1, sampling=SamplingParams(),
                             stop_ids=(2,)).compile().as_text()
    print(json.dumps({"mesh": axes, "rows": args.rows, "slots": args.slots, "layers": args.layers,
                      "dtype": args.dtype, "cache_bytes": ds.cache.nbytes,
                      "prefill_chunk_collective_bytes": collective_bytes(prefill),
                      "decode_step_collective_bytes": collective_bytes(decode)}, indent=1))


if __name__ == "__main__":
    main()
