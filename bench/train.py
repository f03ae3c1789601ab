"""Training throughput and MFU against an HF transformers (PyTorch) training step on the same model.

A 126M-parameter InternLM2-shaped model (real vocabulary), float32 weights and compute, AdamW, one
JAX CPU device; the same weights as LlamaForCausalLM with torch.optim.AdamW. MFU is
`InternLM2Config.train_flops_per_token` (6 x the parameters that multiply, + attention) x tokens/s
over the matmul peak measured in the same run (2048^3 f32, best of 5, before and after; the
better one).

    python bench/train.py [--batch 8] [--seq 256] [--steps 5]

On an accelerator, a released shape without the HF side (bf16 compute, f32 master weights; each remat
policy, the best reported as JSON), e.g. on one GPU:

    python bench/train.py --preset internlm2-1_8b --batch 8 --seq 4096 --steps 5
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import internlm_jax as ij
from internlm_jax.training.step import make_optimizer, make_train_step, measure_peak_flops

try:
    from internlm_jax.training.config import OptimSection

    OPTIM = OptimSection(lr=1e-4, warmup_steps=1)
except ImportError:  # no pydantic (the GPU machine's image): the same AdamW settings, stated here
    from types import SimpleNamespace

    OPTIM = SimpleNamespace(lr=1e-4, warmup_steps=1, min_lr_ratio=0.1, weight_decay=0.1,
                            decay_embeddings_and_norms=False, b1=0.9, b2=0.95, eps=1e-8, clip_norm=1.0)

BENCH_SHAPE = dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=8, num_attention_heads=8,
                   num_key_value_heads=4)


def bench_config(preset: str | None = None, layers: int | None = None) -> ij.InternLM2Config:
    """The 126M CPU bench model, or a released shape (optionally with fewer layers)."""
    cfg = ij.InternLM2Config.preset(preset or "internlm2_5-7b")
    cfg = cfg if preset else cfg.replace(**BENCH_SHAPE)
    return cfg.replace(num_hidden_layers=layers) if layers else cfg


def time_our_step(batch: int, seq: int, steps: int, cfg: ij.InternLM2Config | None = None,
                  dtype: str = "float32", remat: str = "none"):
    """(tokens/s, compile seconds, the batch's token array) of our jitted train step: ``dtype`` compute,
    float32 master weights and AdamW state, ``remat`` per layer."""
    cfg = cfg or bench_config()
    model = ij.InternLM2(cfg, dtype=dtype, param_dtype="float32", seed=0).configure(remat=remat)
    graphdef, params = nnx.split(model)
    tx, schedule = make_optimizer(OPTIM, 100)
    step = jax.jit(make_train_step(graphdef, tx, grad_accum=1, segments=False, z_loss=0.0, schedule=schedule),
                   donate_argnums=(0, 1))
    opt_state = jax.jit(tx.init)(params)
    r = np.random.RandomState(0)
    w = r.randint(3, min(cfg.vocab_size, 90000), (batch, seq + 1))
    data = {"inputs": w[:, :-1], "targets": w[:, 1:], "segment_ids": np.zeros_like(w[:, :-1]),
            "loss_mask": np.ones(w[:, :-1].shape, np.float32), "weight": np.ones(w[:, :-1].shape, np.float32)}
    t = time.perf_counter()
    params, opt_state, m = step(params, opt_state, data, 0)
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t
    t = time.perf_counter()
    for i in range(steps):
        params, opt_state, m = step(params, opt_state, data, i + 1)
    jax.block_until_ready(m)
    return batch * seq * steps / (time.perf_counter() - t), compile_s, w


def accelerator_run(args):
    """A released shape on the default device (a GPU when lent): each remat policy, one JSON line."""
    import json

    cfg = bench_config(args.preset, args.layers)
    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
    peak = measure_peak_flops(8192 if jax.default_backend() != "cpu" else 2048, dtype=dtype)
    per_token = cfg.train_flops_per_token(args.seq)
    runs = {}
    for remat in args.remat.split(","):
        try:
            tps, compile_s, _ = time_our_step(args.batch, args.seq, args.steps, cfg, args.dtype, remat)
            runs[remat] = {"tokens_per_s": tps, "mfu": tps * per_token / peak, "compile_s": compile_s}
        except Exception as e:  # e.g. out of memory without remat: report it, try the next policy
            runs[remat] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        print(json.dumps({"remat": remat, **runs[remat]}), flush=True)
    best = max((r for r in runs if "mfu" in runs[r]), key=lambda r: runs[r]["mfu"], default=None)
    print(json.dumps({"preset": args.preset, "layers": cfg.num_hidden_layers, "params": cfg.num_parameters(),
                      "batch": args.batch, "seq": args.seq, "dtype": args.dtype, "device": jax.devices()[0].device_kind,
                      "jax": jax.__version__, "peak_flops": peak, "runs": runs, "best": best}))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--preset", help="a released shape (e.g. internlm2-1_8b) on the default device, without HF")
    ap.add_argument("--layers", type=int, help="with --preset: fewer layers")
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"], help="with --preset: compute")
    ap.add_argument("--remat", default="none,dots_no_batch,full", help="with --preset: policies to try")
    args = ap.parse_args()
    if args.preset:
        return accelerator_run(args)
    import torch

    cfg = bench_config()
    n = cfg.num_parameters()
    flops_per_token = cfg.train_flops_per_token(args.seq)
    peak = measure_peak_flops(2048)
    print(f"jax {jax.__version__}, torch {torch.__version__} ({torch.get_num_threads()} threads); "
          f"{n / 1e6:.0f}M params, "
          f"batch {args.batch} x {args.seq} tokens, f32; measured matmul peak {peak / 1e9:.1f} GFLOP/s")
    ours, compile_s, w = time_our_step(args.batch, args.seq, args.steps)
    peak = max(peak, measure_peak_flops(2048))  # a slow moment in the first probe would inflate MFU
    print(f"ours: first step (compile) {compile_s:.1f}s; {ours:.0f} tokens/s, MFU {ours * flops_per_token / peak:.1%}"
          f" (peak {peak / 1e9:.1f} GFLOP/s)")

    import os
    import sys

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from generate import hf_llama  # the InternLM2 -> Llama split of the same weights

    llama = hf_llama(ij.InternLM2(cfg, seed=0)).train()  # the same weights (ours were donated to the step)
    opt = torch.optim.AdamW(llama.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
    inputs, targets = torch.from_numpy(w[:, :-1].astype(np.int64)), torch.from_numpy(w[:, 1:].astype(np.int64))

    def hf_step():
        logits = llama(inputs).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(llama.parameters(), 1.0)
        opt.step()
        opt.zero_grad()

    hf_step()  # warm-up
    t = time.perf_counter()
    for _ in range(args.steps):
        hf_step()
    theirs = args.batch * args.seq * args.steps / (time.perf_counter() - t)
    print(f"HF transformers: {theirs:.0f} tokens/s, MFU {theirs * flops_per_token / peak:.1%}; "
          f"ours/HF {ours / theirs:.2f}x")


if __name__ == "__main__":
    main()
