"""Training throughput and MFU against an HF transformers (PyTorch) training step on the same model.

A 126M-parameter InternLM2-shaped model (real vocabulary), float32 weights and compute, AdamW, one
JAX CPU device; the same weights as LlamaForCausalLM with torch.optim.AdamW. MFU is
`InternLM2Config.train_flops_per_token` (6 x the parameters that multiply, + attention) x tokens/s
over the matmul peak measured in the same run (2048^3 f32, best of 5, before and after; the
better one).

    python bench/train.py [--batch 8] [--seq 256] [--steps 5]
"""

import argparse
import time

import jax
import numpy as np
from flax import nnx

import internlm_jax as ij
from internlm_jax.training.config import OptimSection
from internlm_jax.training.loop import measure_peak_flops
from internlm_jax.training.step import make_optimizer, make_train_step

BENCH_SHAPE = dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=8, num_attention_heads=8,
                   num_key_value_heads=4)


def time_our_step(batch: int, seq: int, steps: int):
    """(tokens/s, compile seconds, the batch's token array) of our jitted train step on the bench model."""
    cfg = ij.InternLM2Config.preset("internlm2_5-7b").replace(**BENCH_SHAPE)
    model = ij.InternLM2(cfg, seed=0)
    graphdef, params = nnx.split(model)
    tx, schedule = make_optimizer(OptimSection(lr=1e-4, warmup_steps=1), 100)
    step = jax.jit(make_train_step(graphdef, tx, grad_accum=1, segments=False, z_loss=0.0, schedule=schedule),
                   donate_argnums=(0, 1))
    opt_state = jax.jit(tx.init)(params)
    r = np.random.RandomState(0)
    w = r.randint(3, 90000, (batch, seq + 1))
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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args()
    import torch

    cfg = ij.InternLM2Config.preset("internlm2_5-7b").replace(**BENCH_SHAPE)
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
