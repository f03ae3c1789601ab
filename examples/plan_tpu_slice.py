"""Will it fit? Compile the library's programs for a TPU slice before renting one.

    python examples/plan_tpu_slice.py [--model internlm2-chat-1_8b] [--topology v5e:2x4] [--context 32768]

Needs ``jax[tpu]`` (``pip install -e ".[tpu-plan]"``): XLA then compiles for the TPU slice on this CPU
host. Without it, the same programs are compiled for the local devices instead.
"""

import argparse
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # compile-only: nothing runs on an accelerator

from internlm_jax.plan import plan  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="internlm2-chat-1_8b")
    ap.add_argument("--topology", default="v5e:2x4")
    ap.add_argument("--context", type=int, default=32768)
    args = ap.parse_args()
    try:
        import libtpu  # noqa: F401
        topology = args.topology
    except ImportError:
        print("libtpu is not installed: compiling for the local devices instead of", args.topology)
        topology = None
    # prefill and one decode step on the default mesh; a mesh that fits is searched for if needed
    result = plan(args.model, topology, context=args.context, batch=1, programs=("prefill", "decode_step"),
                  progress=print)
    print(result.table())
    prefill = result.programs[0]
    if prefill.compiled and prefill.seconds:
        print(f"prefill of {args.context:,} tokens: at least {prefill.seconds:.2f} s on this slice")


if __name__ == "__main__":
    main()
