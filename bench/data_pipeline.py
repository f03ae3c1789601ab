"""The training input pipeline alone: host memory against corpus size, and tokens/s against the step.

Writes synthetic tokenized folders (the format `internlm-jax data tokenize` writes: uint32 ids, random
document lengths) of each asked size, once, under --dir. For each, a fresh process opens it as
`train` does (PackedDataset + the grain loader, 2 threads), reads --batches batches and reports peak
RSS (ru_maxrss) and loader tokens/s. Then it times our train step on bench/train.py's model at the
same batch shape, so the two rates come from one run.

    python bench/data_pipeline.py [--tokens 100e6,1e9] [--batch 8] [--seq 256] [--batches 300]
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

SHARD_TOKENS = 50_000_000


def make_corpus(folder: Path, tokens: int) -> None:
    from internlm_jax.training.corpus import INDEX, write_index, write_shard

    if (folder / INDEX).is_file():
        return
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    shards, k = [], 0
    for start in range(0, tokens, SHARD_TOKENS):
        n = min(SHARD_TOKENS, tokens - start)
        ids = rng.integers(3, 92_000, n, dtype=np.uint32)
        lengths = rng.geometric(1 / 800, n // 200 + 10)
        starts = np.concatenate([[0], np.cumsum(lengths)])
        starts = starts[starts < n]
        ids[np.concatenate([starts[1:] - 1, [n - 1]])] = 2  # </s> ends each document
        ids[starts] = 1
        shards.append(write_shard(folder, f"shard-{k:05d}", ids, starts))
        k += 1
    write_index(folder, "text", {"vocab_size": 92544, "bos_id": 1, "eos_id": 2}, shards)


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def read(folder: str, batch: int, seq: int, batches: int) -> dict:
    """In a fresh process: open the corpus as training does and read ``batches`` batches."""
    import grain  # noqa: F401 - counted in the baseline, as in a training process

    from internlm_jax.training.data import PackedDataset

    base = rss_mb()
    t = time.perf_counter()
    ds = PackedDataset([folder], None, seq, seed=0)
    loader = iter(ds.loader(batch, batches, threads=2, prefetch=4))
    opened = time.perf_counter() - t
    next(loader)
    t = time.perf_counter()
    for _ in range(batches - 1):
        next(loader)
    rate = batch * seq * (batches - 1) / (time.perf_counter() - t)
    return {"tokens": len(ds.stream), "open_s": round(opened, 3), "baseline_rss_mb": round(base, 1),
            "peak_rss_mb": round(rss_mb(), 1), "loader_tokens_per_s": round(rate)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", default="100e6,1e9")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batches", type=int, default=300)
    ap.add_argument("--dir", default="/tmp/internlm-jax-bench-data")
    ap.add_argument("--read", help=argparse.SUPPRESS)  # internal: the child process
    args = ap.parse_args()
    if args.read:
        print(json.dumps(read(args.read, args.batch, args.seq, args.batches)))
        return
    rows = []
    for size in (int(float(x)) for x in args.tokens.split(",")):
        folder = Path(args.dir) / f"tokens-{size}"
        t = time.perf_counter()
        make_corpus(folder, size)
        made = time.perf_counter() - t
        out = subprocess.run([sys.executable, __file__, "--read", str(folder), "--batch", str(args.batch),
                              "--seq", str(args.seq), "--batches", str(args.batches)],
                             capture_output=True, text=True, check=True)
        row = json.loads(out.stdout.strip().splitlines()[-1])
        row["disk_gb"] = round(sum(f.stat().st_size for f in folder.iterdir()) / 1e9, 2)
        row["written_s"] = round(made, 1)
        rows.append(row)
        print(json.dumps(row), flush=True)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from train import time_our_step

    step_rate, _, _ = time_our_step(args.batch, args.seq, 3)
    print(json.dumps({"train_step_tokens_per_s": round(step_rate),
                      "loader_over_step": [round(r["loader_tokens_per_s"] / step_rate, 1) for r in rows],
                      "peak_rss_largest_over_smallest": round(rows[-1]["peak_rss_mb"] / rows[0]["peak_rss_mb"], 3)}))


if __name__ == "__main__":
    main()
