"""Peak host memory while loading an HF checkpoint: it should stay near the largest tensor.

Writes a synthetic checkpoint of a real architecture (random, incompressible bf16 values, sharded safetensors with an
index, as released checkpoints are), then loads it in a fresh process and reports peak RSS. On CPU
the "devices" live in host memory too, so the loaded model itself is part of RSS: the figure that
matters is the overhead above baseline + model bytes, compared with the largest single tensor.

    python bench/load_memory.py --preset internlm2-1_8b --dir /tmp/ckpt-1_8b
"""

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path


def write_checkpoint(folder: Path, preset: str, shard_gb: float) -> None:
    from internlm_jax import InternLM2Config
    from internlm_jax.files import atomic_directory

    cfg = InternLM2Config.preset(preset)
    with atomic_directory(folder) as tmp:
        write_random_shards(tmp, cfg, shard_gb)


def write_random_shards(tmp: Path, cfg, shard_gb: float) -> None:
    import ml_dtypes
    import numpy as np

    from internlm_jax import weights
    from internlm_jax.hf_checkpoint import plan_shards, write_safetensors

    cfg.save(tmp)
    rng = np.random.default_rng(0)

    def random_bf16(shape):  # random sign and mantissa, exponent fixed: incompressible, finite, |x| ~ 0.01
        bits = rng.integers(0, 1 << 16, size=shape, dtype=np.uint16)
        return ((bits & 0x807F) | 0x3C00).view(ml_dtypes.bfloat16)
    tensors = weights.hf_tensors(cfg)
    shards = plan_shards(tensors, np.dtype(ml_dtypes.bfloat16), int(shard_gb * 1e9))
    weight_map = {}
    for k, shard in enumerate(shards, 1):
        file = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(tmp / file, [(t.name, t.shape, np.dtype(ml_dtypes.bfloat16)) for t in shard],
                          lambda name, s={t.name: t.shape for t in shard}: random_bf16(s[name]))
        weight_map.update({t.name: file for t in shard})
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def child(folder: str, devices: int, dtype: str) -> None:
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    import jax

    import internlm_jax as ij
    from internlm_jax import weights

    mesh = ij.make_mesh(tensor=2 if devices % 2 == 0 else 1)
    cfg = ij.InternLM2Config.from_pretrained(folder)
    largest = max(math.prod(t.shape) for t in weights.hf_tensors(cfg)) * 2
    jax.numpy.zeros(1).block_until_ready()
    base = rss_mb()
    t = time.perf_counter()
    model = ij.InternLM2.from_pretrained(folder, mesh=mesh, dtype=dtype, progress=False)
    jax.block_until_ready(jax.tree.leaves(model))
    secs = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    model_mb = model.num_parameters() * jax.numpy.dtype(dtype).itemsize / 2**20
    size = sum(p.stat().st_size for p in Path(folder).glob("*.safetensors"))
    print(json.dumps(dict(devices=devices, mesh=dict(mesh.shape), dtype=dtype, baseline_mb=round(base),
                          peak_rss_mb=round(peak), model_mb=round(model_mb), largest_tensor_mb=round(largest / 2**20),
                          overhead_mb=round(peak - base - model_mb), seconds=round(secs, 1),
                          gb_per_s=round(size / secs / 1e9, 2), checkpoint_gb=round(size / 1e9, 2))))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="internlm2-1_8b")
    p.add_argument("--dir", default="/tmp/internlm-jax-bench/ckpt")
    p.add_argument("--devices", type=int, default=8)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--shard-gb", type=float, default=2.0)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args.dir, args.devices, args.dtype)
    folder = Path(args.dir)
    if not folder.exists():
        t = time.perf_counter()
        write_checkpoint(folder, args.preset, args.shard_gb)
        print(f"wrote {folder} in {time.perf_counter() - t:.1f}s")
    out = subprocess.run([sys.executable, __file__, "--child", "--dir", str(folder), "--devices", str(args.devices),
                          "--dtype", args.dtype], capture_output=True, text=True)
    if out.returncode:
        sys.exit(out.stderr)
    print(out.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
