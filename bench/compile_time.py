"""Compile time of the jitted forward against depth: scanned layers keep it flat.

Lowers and compiles the forward for abstract parameters (no weights are allocated), so real model
shapes can be used on a small machine:

    python bench/compile_time.py --preset internlm2_5-20b-chat --layers 4 48 --seq 128
"""

import argparse
import os
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

import internlm_jax as ij  # noqa: E402


def compile_seconds(cfg, mesh, batch, seq, dtype):
    model = ij.InternLM2.abstract(cfg, mesh=mesh, dtype=dtype)
    graphdef, state = nnx.split(model)
    ids = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
    t0 = time.perf_counter()
    forward = jax.jit(lambda state, ids: nnx.merge(graphdef, state).forward(ids))  # what model(ids) compiles
    lowered = forward.lower(state, ids)
    t1 = time.perf_counter()
    lowered.compile()
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="internlm2_5-20b-chat")
    p.add_argument("--layers", type=int, nargs="+", default=[4, 48])
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--tensor", type=int, default=8)
    args = p.parse_args()
    mesh = ij.make_mesh(tensor=args.tensor)
    base = ij.InternLM2Config.preset(args.preset)
    print(f"jax {jax.__version__}, {len(jax.devices())} x {jax.devices()[0].platform}, mesh {dict(mesh.shape)}")
    for n in args.layers:
        cfg = base.replace(num_hidden_layers=n)
        lower_s, compile_s = compile_seconds(cfg, mesh, args.batch, args.seq, args.dtype)
        print(f"{args.preset} with {n:3d} layers ({cfg.num_parameters() / 1e9:5.2f}B params): "
              f"lower {lower_s:.2f}s, compile {compile_s:.2f}s")


if __name__ == "__main__":
    main()
