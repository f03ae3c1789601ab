"""The library's programs run for real on one accelerator (issue 7, point 4): 7B-shaped, bf16, random weights.

    python bench/accelerator.py [--layers 32] [--prompt 8192] [--batch 1 8] [--peak-tflops 989] [--hbm-gbps 3350]

Reports, for the device it finds: prefill time and MFU (against --peak-tflops, dense bf16), decode
tokens/s of the jitted decode step against the HBM roofline (parameter + KV-cache bytes per step over
--hbm-gbps), and the prefill with the attention blocks through cuDNN against the XLA path
(``attention_impl``), each after a warm-up call. Defaults are the H100 SXM spec sheet. ``--tiny``
shrinks everything to check the script on a CPU.
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

import internlm_jax as ij
from internlm_jax.generation import Generator
from internlm_jax.plan import program_costs


def timed(fn, repeats=3):
    out = fn()
    jax.block_until_ready(out)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - t)
    return best


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=8192)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--peak-tflops", type=float, default=989.0)
    ap.add_argument("--hbm-gbps", type=float, default=3350.0)
    ap.add_argument("--impls", nargs="+", default=["blockwise", "xla", "cudnn"])
    ap.add_argument("--tiny", action="store_true")
    args = ap.parse_args()
    cfg = ij.InternLM2Config.preset("internlm2_5-7b-chat").replace(num_hidden_layers=args.layers)
    if args.tiny:
        cfg = cfg.replace(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
                          vocab_size=1024)
    dev = jax.devices()[0]
    print(f"device: {dev.device_kind} ({dev.platform}), jax {jax.__version__}; {cfg.num_hidden_layers} layers, "
          f"{cfg.num_parameters() / 1e9:.2f}B parameters, bf16")
    mesh = ij.make_mesh(fsdp=1, devices=[dev])
    model = ij.InternLM2(cfg, mesh=mesh, dtype="bfloat16", seed=0)
    for impl in args.impls:
        model.attention_impl = impl
        gen = Generator(model)
        batch = gen.prepare([list(np.random.RandomState(0).randint(3, cfg.vocab_size, args.prompt))])
        s = batch.ids.shape[1]
        try:
            t = timed(lambda: gen.start(batch, 256)[0], repeats=2)
        except Exception as e:  # e.g. cuDNN on a CPU
            print(f"prefill {impl}: unavailable ({type(e).__name__}: {str(e).splitlines()[0][:120]})")
            continue
        cache_len = gen.layout(s, 256)[0]
        flops = program_costs(cfg, "prefill", batch=1, seq=s, cache_len=cache_len, blockwise=gen.blockwise(s)).flops
        print(f"prefill {s} tokens, attention {impl}: {t * 1e3:.1f} ms, {s / t:,.0f} tokens/s, "
              f"MFU {flops / t / (args.peak_tflops * 1e12):.1%}")
    model.attention_impl = "blockwise"
    gen = Generator(model)
    for b in args.batch:
        prompts = [list(np.random.RandomState(i).randint(3, cfg.vocab_size, args.prompt)) for i in range(b)]
        prepared = gen.prepare(prompts)
        logits, ck, cv, valid, base, pos, _ = gen.start(prepared, 256)
        tokens = jnp.argmax(logits, -1).astype(jnp.int32)
        state = {"ck": ck, "cv": cv, "valid": valid, "step": 0}

        def step():
            out, state["ck"], state["cv"], state["valid"] = gen.decode_step(
                gen.state, tokens, pos, state["ck"], state["cv"], state["valid"], base, jnp.int32(state["step"]))
            state["step"] += 1
            return out

        t = timed(step, repeats=10)
        cache_len = ck.shape[2]
        c = program_costs(cfg, "decode_step", batch=b, seq=1, cache_len=cache_len, blockwise=False)
        roofline = (c.weights + c.cache) / (args.hbm_gbps * 1e9)
        print(f"decode batch {b}, cache {cache_len}: {t * 1e3:.2f} ms/step, {b / t:,.1f} tokens/s; HBM roofline "
              f"{roofline * 1e3:.2f} ms/step ({roofline / t:.0%} of it reached)")


if __name__ == "__main__":
    main()
