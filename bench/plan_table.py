"""The fit table of BENCHMARKS.md: models x TPU slices x context lengths, compiled for TPU on this host.

    python bench/plan_table.py [--models ...] [--topologies ...] [--contexts ...] [--jsonl out.jsonl]

Each cell is ``internlm_jax.plan.plan`` for prefill and the decode step at batch 1: the default mesh
first (tensor over the KV heads, the rest fsdp), then, when that does not fit, the candidate meshes
whose parameters and cache fit the chip, until one compiles within HBM. Needs ``jax[tpu]``.
"""

import argparse
import json
import sys
import time

from internlm_jax.plan import GiB, fmt_mesh, plan


def cell(p):
    chosen = p if p.fits or p.suggestion is None else p.suggestion
    pre = {x.name: x for x in chosen.programs}
    fits = chosen.fits
    peak = max((x.peak for x in chosen.programs if x.compiled), default=0)
    dec = pre.get("decode_step")
    return {"fits": fits, "mesh": fmt_mesh(chosen.mesh), "peak_gib": round(peak / GiB, 2),
            "prefill_s": round(pre["prefill"].seconds, 3) if pre["prefill"].compiled else None,
            "decode_tok_s": round(p.batch / dec.seconds, 1) if dec and dec.compiled and dec.seconds else None,
            "errors": [f"{x.name}: {x.error}" for x in chosen.programs if not x.compiled]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+",
                    default=["internlm2-chat-1_8b", "internlm2_5-7b-chat-1m", "internlm2_5-20b-chat"])
    ap.add_argument("--topologies", nargs="+", default=["v5e-8", "v5e-16", "v5p-8", "v6e-8"])
    ap.add_argument("--contexts", nargs="+", type=int, default=[32768, 200000, 1000000])
    ap.add_argument("--max-tries", type=int, default=4)
    ap.add_argument("--jsonl", default=None)
    args = ap.parse_args()
    out = open(args.jsonl, "a") if args.jsonl else None
    for model in args.models:
        for topo in args.topologies:
            for ctx in args.contexts:
                t = time.time()
                p = plan(model, topo, context=ctx, batch=1, programs=("prefill", "decode_step"),
                         max_tries=args.max_tries)
                row = {"model": model, "topology": topo, "context": ctx, **cell(p),
                       "asked_mesh": fmt_mesh(p.mesh), "seconds_to_plan": round(time.time() - t, 1)}
                print(json.dumps(row), flush=True)
                if out:
                    out.write(json.dumps(row) + "\n")
                    out.flush()


if __name__ == "__main__":
    sys.exit(main())
