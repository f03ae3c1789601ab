"""Compile times of the decode step, a decode chunk and the prefill for released model shapes.

The programs are lowered from abstract parameters (no weights are made) and compiled for this host's
backend; the persistent compilation cache is bypassed so that every figure is a real compile.

    python bench/compile_times.py [--models internlm2_5-7b-chat internlm2_5-20b-chat] [--cache 4096]
"""

import argparse
import json
import os
import time

os.environ.setdefault("INTERNLM_JAX_COMPILE_CACHE", "0")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import internlm_jax as ij  # noqa: E402
from internlm_jax.cache import KVCache  # noqa: E402
from internlm_jax.generation import DecodeState, SamplingParams, generator_for  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["internlm2_5-7b-chat", "internlm2_5-20b-chat"])
    ap.add_argument("--cache", type=int, default=4096)
    ap.add_argument("--prompt", type=int, default=2048)
    ap.add_argument("--dtype", default="bfloat16")
    args = ap.parse_args()
    spec = jax.ShapeDtypeStruct
    out = {"jax": jax.__version__, "backend": jax.default_backend()}
    for name in args.models:
        cfg = ij.InternLM2Config.preset(name)
        model = ij.InternLM2.abstract(cfg, dtype=args.dtype)
        gen = generator_for(model)
        b, t = 1, args.cache
        ds = DecodeState.abstract(cfg, b, KVCache.abstract(cfg, b, t, args.dtype))
        kw = dict(sampling=SamplingParams(), stop_ids=(2,))
        scalar = spec((), jnp.int32)
        row = {"layers": cfg.num_hidden_layers}
        for what, lower in (
                ("decode_step", lambda: gen.step.lower(gen.state, gen.abstract_layers(), ds, scalar, **kw)),
                ("decode_chunk16", lambda: gen.chunk.lower(gen.state, gen.abstract_layers(), ds, scalar, steps=16,
                                                           **kw)),
                ("prefill", lambda: gen.prefill.lower(gen.state, gen.abstract_layers(),
                                                      *(spec((b, args.prompt), jnp.int32),) * 4,
                                                      cache_len=t, last=args.prompt - 1))):
            t0 = time.perf_counter()
            lowered = lower()
            t1 = time.perf_counter()
            lowered.compile()
            row[what] = {"lower_s": round(t1 - t0, 2), "compile_s": round(time.perf_counter() - t1, 2)}
            print(name, what, row[what], flush=True)
        out[name] = row
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
