"""Which operand order XLA streams an output-major weight fastest in, by row count (CPU).

The packed decode form stores every matrix output-major, ``w_t [N, K]``. A step with ``M`` rows can
compute ``rows @ w_t.T`` (rows on the left, the form ``_project_t`` used before) or ``w_t @ rows.T``
and transpose the small ``[N, M]`` result (the weight on the left; an optimization barrier keeps XLA
from folding the transpose back into the dot). This times both on the matrices of bench/generate.py's
325M-parameter model and prints the weight bytes streamed per second (GB/s) and the ratio.

    python bench/matmul_orientation.py [--rows 1 2 8 16 32 64 128 512] [--json out.json]
"""

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np
from generate import best  # bench/ is on sys.path when this script runs

CONTRACT = (((1,), (1,)), ((), ()))
# name -> (N, K) of the packed decode form at hidden 1024, 16/4 heads of 64, MLP 2816, vocab 92544
MATRICES = {"wqkv": (1536, 1024), "wo": (1024, 1024), "w13": (5632, 1024), "w2": (1024, 2816),
            "head": (92544, 1024)}


def rows_left(rows, w_t):
    return jax.lax.dot_general(rows, w_t, CONTRACT)


def weight_left(rows, w_t):
    return jax.lax.optimization_barrier(jax.lax.dot_general(w_t, rows, CONTRACT)).T


def best_seconds(fn, *args, repeats=7):
    return best(lambda: fn(*args).block_until_ready(), repeats)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 2, 8, 16, 32, 64, 128, 512])
    ap.add_argument("--json")
    args = ap.parse_args()
    rng = np.random.RandomState(0)
    results = []
    for name, (n, k) in MATRICES.items():
        w_t = jnp.asarray(rng.standard_normal((n, k)), jnp.float32)
        for m in args.rows:
            rows = jnp.asarray(rng.standard_normal((m, k)), jnp.float32)
            a, b = jax.jit(rows_left), jax.jit(weight_left)
            np.testing.assert_allclose(np.asarray(a(rows, w_t)), np.asarray(b(rows, w_t)), rtol=1e-4, atol=1e-3)
            # alternate the two forms so that a slow moment of the machine hits both
            t_left = t_weight = float("inf")
            for _ in range(3):
                t_left = min(t_left, best_seconds(a, rows, w_t))
                t_weight = min(t_weight, best_seconds(b, rows, w_t))
            gbs = lambda t: w_t.nbytes / t / 1e9  # noqa: E731
            row = {"matrix": name, "N": n, "K": k, "rows": m, "rows_left_GBps": round(gbs(t_left), 1),
                   "weight_left_GBps": round(gbs(t_weight), 1), "weight_left_speedup": round(t_left / t_weight, 2)}
            results.append(row)
            print(json.dumps(row), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"jax": jax.__version__, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
