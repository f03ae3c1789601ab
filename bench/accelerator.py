"""The library's programs run for real on one accelerator (issue 7, point 4): 7B-shaped, bf16, random weights.

    python bench/accelerator.py [--layers 32] [--prompts 8192 32768] [--impls blockwise xla cudnn]
                                [--batch 1 8 32] [--unrolls 1 all] [--new 128]

Reports, for the device it finds:
- the two ceilings measured there: a large bf16 matrix product (TFLOP/s) and a large elementwise
  pass (HBM GB/s, bytes read + written), beside the spec-sheet numbers given;
- prefill time and MFU (analytic FLOPs of the program over time, against the measured and the spec
  peak) for each attention implementation (``attention_impl``: pure-JAX blockwise, XLA and cuDNN
  fused blocks), each after a warm-up call;
- decode tokens/s of the jitted on-device decode loop (and of the per-token decode step) against the
  HBM roofline: parameter + KV-cache bytes read per step over the measured bandwidth, for each
  ``decode_unroll`` (the layer loop rolled, or unrolled), with each program's first-call (compile) time.

``--tiny`` shrinks everything to check the script on a CPU. Medians of ``--repeats`` timed calls.
"""

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import internlm_jax as ij
from internlm_jax.generation import Generator, SamplingParams
from internlm_jax.plan import program_costs


FIRST_CALL = {}  # seconds of each timed function's first call (compilation included)


def timed(fn, repeats=3, name=None):
    """Median wall time of ``fn()`` after one warm-up call (compilation stays out)."""
    t = time.perf_counter()
    jax.block_until_ready(fn())
    FIRST_CALL[name] = time.perf_counter() - t
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def ceilings(tiny: bool, repeats: int):
    """Measured bf16 matmul rate (FLOP/s) and elementwise HBM bandwidth (bytes/s) on this device."""
    n = 512 if tiny else 8192
    keys = jax.random.split(jax.random.key(1), 2)
    a, b = (jax.random.normal(k, (n, n), jnp.bfloat16) for k in keys)
    mm = jax.jit(lambda a, b: a @ b)
    t_mm = timed(lambda: mm(a, b), repeats * 3)
    x = jax.random.normal(keys[0], ((1 << 20) if tiny else (1 << 30),), jnp.bfloat16)  # 2 GiB
    add = jax.jit(lambda x: x + jnp.bfloat16(1))
    t_bw = timed(lambda: add(x), repeats * 3)
    return 2 * n ** 3 / t_mm, 2 * x.nbytes / t_bw


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--prompts", type=int, nargs="*", default=[8192, 32768])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--decode-prompt", type=int, default=2048, help="prompt length before the timed decode")
    ap.add_argument("--new", type=int, default=128, help="tokens made by the timed decode loop")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="spec-sheet dense bf16 (H100 SXM)")
    ap.add_argument("--hbm-gbps", type=float, default=3350.0, help="spec-sheet HBM bandwidth (H100 SXM)")
    ap.add_argument("--impls", nargs="*", default=["blockwise", "xla", "cudnn"])
    ap.add_argument("--unrolls", nargs="+", default=["1", "all"], help="decode_unroll values to time (all = True)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tiny", action="store_true")
    args = ap.parse_args()
    cfg = ij.InternLM2Config.preset("internlm2_5-7b-chat").replace(num_hidden_layers=args.layers)
    if args.tiny:
        cfg = cfg.replace(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
                          vocab_size=1024)
    dev = jax.devices()[0]
    import flax
    import jaxlib
    print(f"device: {dev.device_kind} ({dev.platform}); jax {jax.__version__}, jaxlib {jaxlib.__version__}, "
          f"flax {flax.__version__}")
    flops_peak, hbm = ceilings(args.tiny, args.repeats)
    print(f"measured ceilings: bf16 matmul {flops_peak / 1e12:.0f} TFLOP/s (spec {args.peak_tflops:.0f}), "
          f"elementwise HBM {hbm / 1e9:.0f} GB/s (spec {args.hbm_gbps:.0f})")
    print(f"model: {cfg.num_hidden_layers} layers, {cfg.num_parameters() / 1e9:.2f}B parameters, bf16, random weights")
    mesh = ij.make_mesh(fsdp=1, devices=[dev])
    model = ij.InternLM2(cfg, mesh=mesh, dtype="bfloat16", seed=0)
    rows = []
    for length in args.prompts:
        first = None  # the first implementation's logits: the others are compared with it (bf16)
        for impl in args.impls:
            model.attention_impl = impl
            gen = Generator(model)
            batch = gen.prepare([list(np.random.RandomState(0).randint(3, cfg.vocab_size, length))])
            s = batch.ids.shape[1]
            try:
                t = timed(lambda: gen.start(batch, 256)[0], repeats=args.repeats)
            except Exception as e:  # e.g. cuDNN on a CPU
                print(f"prefill {s} {impl}: unavailable ({type(e).__name__}: {str(e).splitlines()[0][:160]})")
                continue
            logits = np.asarray(gen.start(batch, 256)[0], np.float32)
            if first is None:
                first, agree = logits, "reference"
            else:
                agree = f"logits vs {args.impls[0]}: rel. diff {np.linalg.norm(logits - first) / np.linalg.norm(first):.1e}"
            cache_len = gen.layout(s, 256)[0]
            flops = program_costs(cfg, "prefill", batch=1, seq=s, cache_len=cache_len, blockwise=gen.blockwise(s)).flops
            rows.append(f"| prefill | {s} | {impl} | {t * 1e3:.1f} ms | {s / t:,.0f} tok/s | "
                        f"MFU {flops / t / flops_peak:.1%} of measured, {flops / t / (args.peak_tflops * 1e12):.1%} of spec; {agree} |")
            print(rows[-1], flush=True)
    model.attention_impl = "blockwise"
    greedy = SamplingParams()
    for b, unroll in [(b, u) for b in args.batch for u in args.unrolls]:
        model.decode_unroll = True if unroll == "all" else int(unroll)
        gen = Generator(model)
        gen.blockwise_from = 0  # the untimed prefill goes blockwise: dense scores of a batch-32 prompt OOM
        prompts = [list(np.random.RandomState(i).randint(3, cfg.vocab_size, args.decode_prompt)) for i in range(b)]
        prepared = gen.prepare(prompts)
        logits, ck, cv, valid, base, pos, seen = gen.start(prepared, args.new)
        cache_len = ck.shape[2]

        state = {"ck": ck, "cv": cv, "valid": valid}

        def loop():  # the cache is donated and handed back: each call rewrites the same slots
            out = gen.decode_loop(gen.state, logits, state["ck"], state["cv"], valid, base, pos, seen,
                                  jax.random.key(0), max_new_tokens=args.new, sampling=greedy, stop_ids=())
            state["ck"], state["cv"] = out[2], out[3]
            return out[0]

        t_loop = timed(loop, repeats=args.repeats, name="loop") / (args.new - 1)  # new - 1 decode steps, one sample each
        tokens = jnp.argmax(logits, -1).astype(jnp.int32)

        def step():
            out, state["ck"], state["cv"], state["valid"] = gen.decode_step(
                gen.state, tokens, pos, state["ck"], state["cv"], state["valid"], base, jnp.int32(0))
            return out

        t_step = timed(step, repeats=10, name="step")
        c = program_costs(cfg, "decode_step", batch=b, seq=1, cache_len=cache_len, blockwise=False)
        roofline = (c.weights + c.cache) / hbm
        rows.append(f"| decode | batch {b}, cache {cache_len}, unroll {unroll} | loop | {t_loop * 1e3:.2f} ms/step | "
                    f"{b / t_loop:,.1f} tok/s | roofline {roofline * 1e3:.2f} ms/step at measured BW: "
                    f"{roofline / t_loop:.0%} reached; step call {t_step * 1e3:.2f} ms ({b / t_step:,.1f} tok/s); "
                    f"first calls (compile) loop {FIRST_CALL['loop']:.1f} s, step {FIRST_CALL['step']:.1f} s |")
        print(rows[-1], flush=True)
        del ck, cv
        state.clear()  # free this batch's cache before the next prefill
    print("\n".join(["", "| program | shape | attention | time | rate | vs ceiling |", "|---|---|---|---|---|---|"] + rows))


if __name__ == "__main__":
    main()
