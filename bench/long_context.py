"""Per-device memory of the compiled prefill against sequence length and sequence-axis size, and
the longest prompt actually prefilled here.

The prefill is the one generation runs (`Generator.prefill`: ring attention when the mesh has a
`sequence` axis, dense attention on one device), lowered from abstract sharded parameters, so no
weights are allocated for the memory table. Simulated CPU devices:

    python bench/long_context.py --lengths 8192 32768 131072 --run 16384 32768

``--train 4096 8192 16384`` adds the one-device training gradient (packed documents, segment ids) of the
same model: its temporaries under ``attention="auto"`` (blockwise beyond ``blockwise_from``) and ``"dense"``.
"""

import argparse
import os
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import internlm_jax as ij  # noqa: E402
from internlm_jax.generation import Generator, bucket_length  # noqa: E402


def bench_config(layers):
    return ij.InternLM2Config.preset("internlm2_5-7b-chat-1m").replace(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=layers, num_attention_heads=16,
        num_key_value_heads=8)


def prefill_memory(cfg, length, n, dtype="bfloat16"):
    devices = jax.devices()[:n]
    mesh = ij.make_mesh(sequence=n, fsdp=1, devices=devices)
    model = ij.InternLM2.abstract(cfg, mesh=mesh, dtype=dtype)
    gen = Generator(model)
    sds = lambda dt: jax.ShapeDtypeStruct((1, length), dt)  # noqa: E731
    cache_len = bucket_length(length + 16) if n == 1 else n * bucket_length(length // n + 16)
    t = time.perf_counter()
    compiled = gen.prefill.lower(gen.state, gen.abstract_layers(), sds(jnp.int32), sds(jnp.int32), sds(jnp.int32),
                                 sds(jnp.int32),
                                 cache_len=cache_len, last=0).compile()
    secs = time.perf_counter() - t
    m = compiled.memory_analysis()
    return dict(args=m.argument_size_in_bytes, out=m.output_size_in_bytes, temp=m.temp_size_in_bytes, compile_s=secs)


def train_memory(cfg, length, attention, dtype="bfloat16"):
    """Temporaries of the compiled loss gradient of one packed row of ``length`` tokens on one device."""
    from flax import nnx

    model = ij.InternLM2.abstract(cfg, dtype=dtype).configure(attention=attention)
    graphdef, state = nnx.split(model)
    tokens = jax.ShapeDtypeStruct((1, length), jnp.int32)

    def loss(st, ids, seg):
        return jnp.mean(nnx.merge(graphdef, st).final_hidden(ids, segment_ids=seg).astype(jnp.float32))

    compiled = jax.jit(jax.grad(loss)).lower(state, tokens, tokens).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def run_prefill(cfg, length, n):
    mesh = ij.make_mesh(sequence=n, fsdp=1)
    model = ij.InternLM2(cfg, mesh=mesh, dtype="bfloat16", seed=0)
    gen = Generator(model)
    prompt = list(np.random.RandomState(0).randint(3, 90000, length - 1))
    batch = gen.prepare([prompt])
    t = time.perf_counter()
    out = gen.start(batch, max_new_tokens=16)
    jax.block_until_ready(out)
    first = time.perf_counter() - t
    t = time.perf_counter()
    jax.block_until_ready(gen.start(batch, max_new_tokens=16))
    return first, time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", type=int, nargs="*", default=[8192, 32768, 131072])
    ap.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--run", type=int, nargs="*", default=[], help="lengths to really prefill on 8 devices")
    ap.add_argument("--train", type=int, nargs="*", default=[], help="lengths of one-device packed gradients")
    args = ap.parse_args()
    cfg = bench_config(args.layers)
    if args.train:
        print("| tokens | one-device gradient temporaries: auto (blockwise) | dense |")
        print("|---|---|---|")
        for length in args.train:
            auto, dense = (train_memory(cfg, length, a) / 2**30 for a in ("auto", "dense"))
            print(f"| {length} | {auto:.2f} GiB | {dense:.2f} GiB |", flush=True)
    if args.lengths:
        print(f"jax {jax.__version__}; model {cfg.num_parameters() / 1e6:.0f}M params (bf16), "
          f"{cfg.num_hidden_layers} layers, "
          f"{cfg.num_attention_heads}/{cfg.num_key_value_heads} heads; batch 1")
        print("| tokens | devices (sequence axis) | attention | per-device args | per-device temp | "
              "per-device output | compile |")
        print("|---|---|---|---|---|---|---|")
    for length in args.lengths:
        for n in args.devices:
            r = prefill_memory(cfg, length, n)
            gib = lambda b: f"{b / 2**30:.2f} GiB"  # noqa: E731
            print(f"| {length} | {n} | {'dense' if n == 1 else 'ring'} | {gib(r['args'])} | {gib(r['temp'])} | "
                  f"{gib(r['out'])} | {r['compile_s']:.1f} s |", flush=True)
    if args.run and args.lengths:  # real runs in a fresh process, apart from the abstract lowerings above
        import subprocess
        import sys

        subprocess.run([sys.executable, __file__, "--lengths", "--run", *map(str, args.run)], check=True)
        return
    for length in args.run:
        first, again = run_prefill(cfg.replace(num_hidden_layers=2), length, 8)
        print(f"prefilled {length} tokens on 8 simulated devices (2 layers): first call {first:.1f}s "
              f"(with compile), then {again:.1f}s = {length / again:.0f} tok/s", flush=True)


if __name__ == "__main__":
    main()
