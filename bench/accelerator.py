"""The library's programs run for real on one accelerator, no mesh: 7B-shaped, bf16, random weights.

    python bench/accelerator.py [--layers 32] [--prompts 8192 32768] [--impls blockwise xla cudnn]
                                [--batch 1 8 32] [--weights sliced packed] [--new 128] [--long 200000]

Reports, for the device it finds:
- the two ceilings measured there: a large bf16 matrix product (TFLOP/s) and a large elementwise
  pass (HBM GB/s, bytes read + written), beside the spec-sheet numbers given;
- prefill time and MFU (analytic FLOPs of the program over time, against the measured and the spec
  peak) for each attention implementation (``attention``: pure-JAX blockwise, XLA's kernel per block,
  and cuDNN flash attention in one call over the whole sequence), each after a warm-up call;
- decode tokens/s of a decode chunk (``decode_chunk`` steps in one program) and of the single step
  against the HBM roofline: parameter + KV-cache bytes read per step over the measured bandwidth, for
  each ``decode_weights`` (static slices of the stacked weights, or per-layer copies in the packed
  decode form), with each
  program's first-call (compile) time;
- with ``--long N``: a prompt of N tokens of the internlm2_5-7b-chat-1m shape prefilled and decoded on
  this one device (times and the device's peak memory).

``--tiny`` shrinks everything to check the script on a CPU. Medians of ``--repeats`` timed calls.
"""

import argparse
import gc
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import internlm_jax as ij
from internlm_jax.cache import KVCache
from internlm_jax.generation import Generator, SamplingParams, generator_for, prompt_chunks
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


def decode_row(model, cfg, b, weights, dec, args, hbm, greedy, first_tokens) -> str:
    """One decode row: a chunk of ``decode_chunk`` steps (and unless ``--no-step`` a single step) timed at
    batch ``b`` after an untimed prefill of ``--decode-prompt`` tokens, against the HBM roofline."""
    # the untimed prefill goes blockwise or fused (dense scores of a batch-32 prompt run out of memory)
    gen = Generator(model.configure(attention="auto", decode_weights=weights, decode_attention=dec,
                                    blockwise_from=1))
    k = model.settings.decode_chunk
    prompts = [list(np.random.RandomState(i).randint(3, cfg.vocab_size, args.decode_prompt)) for i in range(b)]
    ds, base = gen.start(gen.prepare(prompts), args.new)
    cache_len = ds.cache.length
    state = {"ds": ds}
    del ds

    def chunk():  # the state is donated and handed back; (repeats + 1) x k steps fit in the cache
        state["ds"], tokens, _, _ = gen.chunk(gen.state, gen.layers, state["ds"], base, steps=k, sampling=greedy,
                                           stop_ids=())
        state.setdefault("first", tokens)
        return tokens

    def step():
        state["ds"], tokens, _, _ = gen.step(gen.state, gen.layers, state["ds"], base, sampling=greedy, stop_ids=())
        return tokens

    t_loop = timed(chunk, repeats=args.repeats, name="loop") / k
    step_text = ""
    if not args.no_step:
        t_step = timed(step, repeats=min(10, args.new - (args.repeats + 1) * k - 1), name="step")
        step_text = (f"step call {t_step * 1e3:.2f} ms ({b / t_step:,.1f} tok/s), first call "
                     f"{FIRST_CALL['step']:.1f} s; ")
    c = program_costs(cfg, "decode_step", batch=b, seq=1, cache_len=cache_len, blockwise=False)
    roofline = (c.weights + c.cache) / hbm
    tokens = np.asarray(state["first"])
    ref = first_tokens.setdefault((b, weights), tokens)
    agree = f"greedy tokens of chunk 1 vs {args.decode_attention[0]}: {np.mean(tokens == ref):.0%} equal"
    state.clear()  # free this batch's cache before the next prefill
    return (f"| decode | batch {b}, cache {cache_len}, weights {weights} | {model.decode_attention(cache_len)} "
            f"attention, chunk of {k} | {t_loop * 1e3:.2f} ms/step | {b / t_loop:,.1f} tok/s | roofline "
            f"{roofline * 1e3:.2f} ms/step at measured BW: {roofline / t_loop:.0%} reached; {step_text}"
            f"first chunk call (compile) {FIRST_CALL['loop']:.1f} s; {agree} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--prompts", type=int, nargs="*", default=[8192, 32768])
    ap.add_argument("--batch", type=int, nargs="*", default=[1, 8, 32], help="decode batches (none: no decode rows)")
    ap.add_argument("--decode-prompt", type=int, default=2048, help="prompt length before the timed decode")
    ap.add_argument("--new", type=int, default=128, help="tokens made by the timed decode loop")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="spec-sheet dense bf16 (H100 SXM)")
    ap.add_argument("--hbm-gbps", type=float, default=3350.0, help="spec-sheet HBM bandwidth (H100 SXM)")
    ap.add_argument("--impls", nargs="*", default=["blockwise", "xla", "cudnn"])
    ap.add_argument("--weights", nargs="+", default=["sliced", "packed"], help="decode_weights values to time")
    ap.add_argument("--decode-attention", nargs="+", default=["dense", "ragged"],
                    help="decode_attention values to time (ragged: the Pallas Triton kernel on a GPU)")
    ap.add_argument("--long", type=int, default=0, help="also prefill + decode one prompt this long (1m shape)")
    ap.add_argument("--long-prompt-chunk", type=int, default=None, help="the long model's long_prompt_chunk")
    ap.add_argument("--no-step", action="store_true", help="time the decode chunk only (skip the single-step call)")
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
          f"flax {flax.__version__}", flush=True)
    flops_peak, hbm = ceilings(args.tiny, args.repeats)
    print(f"measured ceilings: bf16 matmul {flops_peak / 1e12:.0f} TFLOP/s (spec {args.peak_tflops:.0f}), "
          f"elementwise HBM {hbm / 1e9:.0f} GB/s (spec {args.hbm_gbps:.0f})", flush=True)
    print(f"model: {cfg.num_hidden_layers} layers, {cfg.num_parameters() / 1e9:.2f}B parameters, bf16, random weights",
          flush=True)
    model = ij.InternLM2(cfg, dtype="bfloat16", seed=0)  # one device, no mesh
    rows = []
    for length in args.prompts:
        first = None  # the first implementation's logits: the others are compared with it (bf16)
        for impl in args.impls:
            gen = Generator(model.configure(attention=impl))
            batch = gen.prepare([list(np.random.RandomState(0).randint(3, cfg.vocab_size, length))])
            s = batch.ids.shape[1]
            try:
                t = timed(lambda: gen.start(batch, 256)[0].logits, repeats=args.repeats)
            except Exception as e:  # e.g. cuDNN on a CPU
                print(f"prefill {s} {impl}: unavailable ({type(e).__name__}: {str(e).splitlines()[0][:160]})")
                continue
            logits = np.asarray(gen.start(batch, 256)[0].logits, np.float32)
            if first is None:
                first, agree = logits, "reference"
            else:
                agree = (f"logits vs {args.impls[0]}: rel. diff "
                         f"{np.linalg.norm(logits - first) / np.linalg.norm(first):.1e}")
            cache_len = gen.layout(s, 256)[0]
            # blockwise, ring and fused paths skip the causally masked half of the scores: count that work
            flops = program_costs(cfg, "prefill", batch=1, seq=s, cache_len=cache_len,
                                  blockwise=gen.prefill_path(s) != "dense").flops
            rows.append(f"| prefill | {s} | {impl} | {t * 1e3:.1f} ms | {s / t:,.0f} tok/s | "
                        f"MFU {flops / t / flops_peak:.1%} of measured, "
                        f"{flops / t / (args.peak_tflops * 1e12):.1%} of spec; {agree} |")
            print(rows[-1], flush=True)
    greedy = SamplingParams()
    first_tokens = {}  # (batch, weights) -> the first decode attention's tokens of its first chunk
    for b, weights, dec in [(b, w, d) for b in args.batch for w in args.weights for d in args.decode_attention]:
        try:
            rows.append(decode_row(model, cfg, b, weights, dec, args, hbm, greedy, first_tokens))
        except Exception as e:  # one failing kernel or an out-of-memory row must not cost the others
            rows.append(f"| decode | batch {b}, weights {weights} | {dec} | failed: {type(e).__name__}: "
                        f"{str(e).splitlines()[0][:200]} | | |")
        print(rows[-1], flush=True)
        gc.collect()  # a Generator's jitted methods keep it in a reference cycle: free its copies now
    if args.long:
        long_cfg = ij.InternLM2Config.preset("internlm2_5-7b-chat-1m")
        if args.tiny:
            long_cfg = long_cfg.replace(hidden_size=256, intermediate_size=512, num_attention_heads=4,
                                        num_key_value_heads=2, vocab_size=1024, num_hidden_layers=2)
        del model
        gc.collect()
        model = ij.InternLM2(long_cfg, dtype="bfloat16", seed=0)
        if args.long_prompt_chunk is not None:
            model.configure(long_prompt_chunk=args.long_prompt_chunk)
        gen = generator_for(model)
        prompt = list(np.random.RandomState(0).randint(3, long_cfg.vocab_size, args.long))
        batch = gen.prepare([prompt])
        chunk = model.settings.long_prompt_chunk
        s = batch.ids.shape[1]
        how = f"chunks of {chunk}" if gen.prefills_in_chunks(args.long) else gen.prefill_path(s)
        t_compile = 0.0
        if gen.prefills_in_chunks(args.long):  # compile the chunk programs ahead (into the persistent cache)
            cache_len = gen.layout(s, 16 + 64)[0]
            like = KVCache.abstract(long_cfg, 1, cache_len, model.dtype)
            t = time.perf_counter()
            for keys in sorted({k for *_, k in prompt_chunks(args.long, s, chunk, cache_len)}):
                gen.lower_extend(like, keys).compile()
            t_compile = time.perf_counter() - t
        t = time.perf_counter()  # one prefill only (it is long); chunk programs come from the cache
        ds, base = gen.start(batch, 16 + 64)
        jax.block_until_ready(ds.logits)
        t_prefill = time.perf_counter() - t
        t = time.perf_counter()
        _, _, ds = gen.decode(ds, base, 16, SamplingParams(), ())  # compiles the decode chunk
        first_decode = time.perf_counter() - t
        t = time.perf_counter()
        tokens, made, ds = gen.decode(ds, base, 64, SamplingParams(), ())
        t_decode = time.perf_counter() - t
        stats = dev.memory_stats() or {}
        peak = stats.get("peak_bytes_in_use")
        rows.append(f"| long prompt | {args.long} tokens, 1m shape, one device | prefill in {how} | "
                    f"prefill {t_prefill:.1f} s (compiled ahead in {t_compile:.1f} s) | "
                    f"{args.long / t_prefill:,.0f} tok/s | "
                    f"decode {t_decode / 64 * 1e3:.1f} ms/token over 64 tokens after 16 (first 16 with compiling "
                    f"{first_decode:.1f} s); peak device memory "
                    f"{'n/a' if peak is None else f'{peak / 2**30:.1f} GiB'}; {int(made[0])} tokens |")
        print(rows[-1], flush=True)
    print("\n".join(["", "| program | shape | attention | time | rate | vs ceiling |",
                     "|---|---|---|---|---|---|"] + rows))


if __name__ == "__main__":
    main()
