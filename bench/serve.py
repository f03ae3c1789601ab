"""Continuous batching through the server against static batches of ``generate``, on the same mix.

    python bench/serve.py [--requests 64] [--max-batch 8] [--hidden 256 --layers 4] [--outputs loguniform]

A random InternLM2-shaped model is written to a temporary HF folder; ``internlm-jax serve`` runs it in a
subprocess and 64 requests (prompt and output lengths drawn with a fixed seed) are sent at once as
streaming completions (prompt token ids, greedy, ``ignore_eos``: each makes exactly its tokens, as the
static batches do). The same prompts then go through
``ij.generate_ids`` in static batches of ``--max-batch`` in arrival order: every batch waits for its
longest request. Printed as JSON: requests/s, output tokens/s (tokens each request asked for), TTFT and
inter-token latency p50/p99 for both (server: the gap between stream chunks, each carrying up to one
decode chunk of tokens; static: decode time per step, its tokens arrive when the batch ends), and the
ratio the mix allows at most (decode steps of static batches over those of perfect packing).

The two are timed ``--repeats`` times, interleaved (server pass, static pass, server pass, ...; the idle
server uses no CPU while the static pass runs), so a slow stretch of a shared machine hits both; the
ratio is taken between the best pass of each, and the ratio of every pair is printed too.

``--engine`` skips HTTP: the engine runs in this process on random weights of ``--preset`` (or the
``--hidden``/``--layers`` shape) in ``--dtype``, against the same static batches, and also reports the
share of the read roofline that decode reaches under load (the bytes each decode chunk must read, the
weights and the running rows' filled cache, over its device time, against a large reduction timed in
the same run). On a lent GPU:

    python bench/serve.py --engine --preset internlm2_5-7b --dtype bfloat16 --max-batch 64
"""

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "internlm2" / "tokenizer.model"


def percentile(xs, q):
    return float(np.percentile(np.asarray(xs), q)) if xs else float("nan")


def summary(wall, requests, tokens, ttft, itl) -> dict:
    return {"wall_s": wall, "requests_per_s": requests / wall, "output_tokens": tokens,
            "output_tokens_per_s": tokens / wall, "ttft_p50_s": percentile(ttft, 50),
            "ttft_p99_s": percentile(ttft, 99), "itl_p50_s": percentile(itl, 50), "itl_p99_s": percentile(itl, 99)}


def make_model(folder: Path, args):
    import internlm_jax as ij

    if args.tokenizer:
        tok_file = Path(args.tokenizer)
    else:
        texts = (ROOT / "examples" / "data" / "tiny_corpus.txt").read_text().splitlines()
        tok_file = folder.parent / "tokenizer.model"
        ij.Tokenizer.train(texts, tok_file, vocab_size=400)
    tok = ij.Tokenizer(tok_file)
    cfg = ij.InternLM2Config(vocab_size=tok.vocab_size, hidden_size=args.hidden,
                             intermediate_size=args.hidden * 11 // 4, num_hidden_layers=args.layers or 4,
                             num_attention_heads=args.hidden // 64,
                             num_key_value_heads=max(1, args.hidden // 256), max_position_embeddings=4096)
    ij.InternLM2(cfg, seed=0).save_pretrained(folder, extra_files=[tok_file])
    return cfg


def workload(args, vocab):
    rng = np.random.default_rng(args.seed)
    prompts = [rng.integers(3, vocab, int(n)).tolist() for n in rng.integers(16, args.max_prompt + 1, args.requests)]
    if args.outputs == "uniform":
        outputs = [int(n) for n in rng.integers(16, args.max_output + 1, args.requests)]
    else:  # log-uniform: most answers short, a few long (chat-like)
        outputs = [int(round(n)) for n in np.exp(rng.uniform(np.log(16), np.log(args.max_output), args.requests))]
    return prompts, outputs


async def through_server(url, prompts, outputs):
    import httpx

    async def one(client, prompt, n):
        t0 = time.perf_counter()
        stamps, tokens = [], 0
        body = {"model": "bench", "prompt": prompt, "max_tokens": n, "temperature": 0, "stream": True,
                "ignore_eos": True}  # every request makes exactly n tokens, as in the static batches
        async with client.stream("POST", url + "/v1/completions", json=body) as r:
            assert r.status_code == 200, await r.aread()
            async for line in r.aiter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    chunk = json.loads(line[6:])
                    if chunk.get("usage"):
                        tokens = chunk["usage"]["completion_tokens"]
                    if chunk["choices"] and chunk["choices"][0]["text"]:
                        stamps.append(time.perf_counter())
        return t0, stamps, tokens

    limits = httpx.Limits(max_connections=len(prompts) + 8)
    async with httpx.AsyncClient(timeout=3600, limits=limits) as client:
        start = time.perf_counter()
        results = await asyncio.gather(*(one(client, p, n) for p, n in zip(prompts, outputs)))
        wall = time.perf_counter() - start
    ttft = [s[0] - t0 for t0, s, _ in results if s]
    itl = [b - a for _, s, _ in results for a, b in zip(s, s[1:])]
    tokens = sum(t for *_, t in results)
    return summary(wall, len(prompts), tokens, ttft, itl)


class DecodeMeter:
    """Wraps a generator's decode chunk: its device time, and the bytes its steps must read at least (the
    weights but the embedding table, plus each running row's filled cache slots), for the share of the
    read roofline that decode reaches under load."""

    def __init__(self, gen, cfg, itemsize: int):
        self.gen, self.chunk = gen, gen.chunk
        self.weight_bytes = (cfg.num_parameters() - cfg.vocab_size * cfg.hidden_size) * itemsize
        self.slot_bytes = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * itemsize
        self.seconds, self.bytes, self.steps = 0.0, 0, 0

    def __call__(self, state, layers, ds, base, *, steps, **kw):
        import jax

        filled = np.asarray(ds.positions)[~np.asarray(ds.done)].astype(np.int64)  # running rows' slots so far
        t = time.perf_counter()
        out = jax.block_until_ready(self.chunk(state, layers, ds, base, steps=steps, **kw))
        self.seconds += time.perf_counter() - t
        self.steps += steps
        self.bytes += steps * self.weight_bytes + self.slot_bytes * int(steps * filled.sum()
                                                                         + len(filled) * steps * (steps - 1) // 2)
        return out

    def __enter__(self):
        self.gen.chunk = self
        return self

    def __exit__(self, *exc):
        self.gen.chunk = self.chunk


def through_engine(engine, prompts, outputs):
    """The same requests straight into the engine (no HTTP), all submitted at once."""
    stamps = {}

    def seen(request, new):
        if new:
            stamps.setdefault(request.id, []).append(time.perf_counter())

    start = time.perf_counter()
    requests = [engine.submit(p, max_tokens=n, ignore_eos=True, on_update=seen) for p, n in zip(prompts, outputs)]
    engine.run_until_done()
    wall = time.perf_counter() - start
    times = [stamps.get(r.id, []) for r in requests]
    itl = [b - a for s in times for a, b in zip(s, s[1:])]
    return summary(wall, len(prompts), sum(len(r.tokens) for r in requests), [s[0] - start for s in times if s], itl)


def read_bandwidth() -> float:
    """Bytes/s of a large reduction on the default device (1 GiB on an accelerator, 256 MiB on a CPU)."""
    import jax
    import jax.numpy as jnp

    n = (1 << 28) if jax.default_backend() == "cpu" else (1 << 30)
    x = jnp.ones((n // 4,), jnp.float32)
    total = jax.jit(jnp.sum)
    total(x).block_until_ready()
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        total(x).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return x.nbytes / best


def engine_main(args, prompts, outputs, cfg):
    """``--engine``: the engine in this process on random weights (e.g. a released shape on a lent GPU)."""
    import jax

    import internlm_jax as ij
    from internlm_jax.engine import Engine

    model = ij.InternLM2(cfg, seed=0, dtype=args.dtype)
    engine = Engine(model, max_batch=args.max_batch, max_len=args.max_prompt + args.max_output,
                    max_queue=args.requests, prefill_chunk=args.prefill_chunk)
    through_engine(engine, prompts[:args.max_batch], [16] * args.max_batch)  # compiles
    ij.generate_ids(model, prompts[:args.max_batch], max_new_tokens=16, stop_ids=())
    bandwidth = read_bandwidth()
    passes, meters = [], []
    for _ in range(args.repeats):
        with DecodeMeter(engine.gen, cfg, np.dtype(model.dtype).itemsize) as meter:
            served = through_engine(engine, prompts, outputs)
        meters.append(meter)
        passes.append((served, static_batches(model, prompts, outputs, args.max_batch)))
    served = min((p[0] for p in passes), key=lambda r: r["wall_s"])
    static = min((p[1] for p in passes), key=lambda r: r["wall_s"])
    meter = min(meters, key=lambda m: m.seconds)
    print(json.dumps({"jax": jax.__version__, "backend": jax.default_backend(), "device": str(jax.devices()[0]),
                      "params": cfg.num_parameters(), "dtype": args.dtype, "requests": args.requests,
                      "max_batch": args.max_batch, "outputs": args.outputs, "prefill_chunk": args.prefill_chunk,
                      "prompt_tokens": sum(map(len, prompts)), "asked_output_tokens": sum(outputs),
                      "continuous_engine": served, "static": static,
                      "throughput_ratio": served["output_tokens_per_s"] / static["output_tokens_per_s"],
                      "walls_s": [[s["wall_s"], t["wall_s"]] for s, t in passes],
                      "ratio_bound_from_steps": step_bound(outputs, args.max_batch),
                      "decode_under_load": {"steps": meter.steps, "seconds": meter.seconds,
                                            "bytes_needed": meter.bytes, "read_bandwidth_Bps": bandwidth,
                                            "roofline_share": meter.bytes / meter.seconds / bandwidth}}, indent=1))


def static_batches(model, prompts, outputs, batch):
    import internlm_jax as ij

    start = time.perf_counter()
    ttft, itl, tokens = [], [], 0
    for i in range(0, len(prompts), batch):
        t0 = time.perf_counter()
        steps = max(outputs[i:i + batch])
        ij.generate_ids(model, prompts[i:i + batch], max_new_tokens=steps, stop_ids=())
        done = time.perf_counter()
        tokens += sum(outputs[i:i + batch])  # the tokens the requests asked for
        ttft += [done - start] * len(prompts[i:i + batch])
        itl.append((done - t0) / steps)
    wall = time.perf_counter() - start
    return summary(wall, len(prompts), tokens, ttft, itl)


def step_bound(outputs, batch) -> float:
    """Decode steps of static batches over those of perfect continuous packing (no prefill, no chunk
    waste): what this mix allows continuous batching to gain at most."""
    import heapq

    static = sum(max(outputs[i:i + batch]) for i in range(0, len(outputs), batch))
    rows = [0] * batch
    for n in outputs:
        heapq.heappush(rows, heapq.heappop(rows) + n)
    return static / max(rows)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--max-prompt", type=int, default=512)
    ap.add_argument("--max-output", type=int, default=512)
    ap.add_argument("--outputs", choices=["uniform", "loguniform"], default="loguniform",
                    help="output length distribution between 16 and --max-output")
    ap.add_argument("--prefill-chunk", type=int, default=512)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, help="default 4; with --preset: fewer layers than the released shape")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=2, help="interleaved server/static passes; the best of each")
    ap.add_argument("--tokenizer", default=str(SHARED) if SHARED.is_file() else None)
    ap.add_argument("--engine", action="store_true",
                    help="the engine in this process, no server: e.g. --preset internlm2_5-7b on a lent GPU")
    ap.add_argument("--preset", help="with --engine: a released shape (random weights) instead of --hidden/--layers")
    ap.add_argument("--dtype", default="float32", help="with --engine: parameter and cache dtype")
    args = ap.parse_args()
    if args.engine:
        import internlm_jax as ij

        cfg = ij.InternLM2Config.preset(args.preset) if args.preset else ij.InternLM2Config(
            vocab_size=92544, hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4,
            num_hidden_layers=args.layers or 4, num_attention_heads=args.hidden // 64,
            num_key_value_heads=max(1, args.hidden // 256), max_position_embeddings=4096)
        cfg = cfg.replace(num_hidden_layers=args.layers) if args.preset and args.layers else cfg
        prompts, outputs = workload(args, cfg.vocab_size)
        return engine_main(args, prompts, outputs, cfg)
    work = Path(tempfile.mkdtemp())
    folder = work / "bench"
    cfg = make_model(folder, args)
    prompts, outputs = workload(args, cfg.vocab_size)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    server = subprocess.Popen([sys.executable, "-m", "internlm_jax", "serve", "--model", str(folder), "--port",
                               str(port), "--max-batch", str(args.max_batch), "--max-len",
                               str(args.max_prompt + args.max_output), "--max-queue", str(args.requests),
                               "--prefill-chunk", str(args.prefill_chunk), "--quiet"],
                              env=env, cwd=ROOT)
    import httpx

    url = f"http://127.0.0.1:{port}"
    try:
        while True:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        warm = asyncio.run(through_server(url, prompts[:args.max_batch], [16] * args.max_batch))  # compiles
        del warm
        import internlm_jax as ij

        model = ij.InternLM2.from_pretrained(folder)
        ij.generate_ids(model, prompts[:args.max_batch], max_new_tokens=16, stop_ids=())  # compile outside the clock
        passes = []
        for _ in range(args.repeats):
            passes.append((asyncio.run(through_server(url, prompts, outputs)),
                           static_batches(model, prompts, outputs, args.max_batch)))
    finally:
        server.terminate()
        server.wait()
    served = min((p[0] for p in passes), key=lambda r: r["wall_s"])
    static = min((p[1] for p in passes), key=lambda r: r["wall_s"])
    import jax

    print(json.dumps({"jax": jax.__version__, "backend": jax.default_backend(), "devices": len(jax.devices()),
                      "params": cfg.num_parameters(), "requests": args.requests, "max_batch": args.max_batch,
                      "outputs": args.outputs, "prefill_chunk": args.prefill_chunk,
                      "prompt_tokens": sum(map(len, prompts)), "asked_output_tokens": sum(outputs),
                      "continuous": served, "static": static,
                      "throughput_ratio": served["output_tokens_per_s"] / static["output_tokens_per_s"],
                      "pair_ratios": [s["output_tokens_per_s"] / t["output_tokens_per_s"] for s, t in passes],
                      "walls_s": [[s["wall_s"], t["wall_s"]] for s, t in passes],
                      "ratio_bound_from_steps": step_bound(outputs, args.max_batch)}, indent=1))


if __name__ == "__main__":
    main()
