"""Peer benchmark: the same HF InternLM2 folder run through EasyDeL (float32, one device).

Standalone: run it with the EasyDeL venv's python, not the project's (it does not import internlm_jax).

    python -m venv /work/easydel-venv
    /work/easydel-venv/bin/pip install easydel==0.3.0 torch==2.13.0 pillow
    /work/easydel-venv/bin/python bench/peer_easydel.py --hf-dir DIR [--prompt 128] [--new 64] \
        [--batches 1 8] [--prefill 512] [--threads 2] [--json OUT]

(easydel 0.3.0 imports PIL but does not declare pillow as a dependency; install it by hand.)

Loading. ``easydel.AutoEasyDeLModelForCausalLM.from_pretrained(dir, dtype=float32, param_dtype=float32,
torch_load_mode="streaming", config_kwargs={attn_mechanism: "vanilla", attn_dtype/kvdtype/
attn_softmax_dtype: float32})``. EasyDeL has its own InternLM2 module (``easydel.modules.internlm2``,
fused ``wqkv`` split per KV head exactly like the HF layout); it never runs the folder's
modeling_internlm2.py. Two things stand between it and a plain HF InternLM2 folder:
  * transformers 5.x has no ``internlm2`` config class, and EasyDeL's loader calls
    ``transformers.AutoConfig.from_pretrained``. Unless ``--trust-remote-code`` is given (then the
    folder's configuration_internlm2.py and ``auto_map`` are used), this script registers EasyDeL's own
    ``InternLM2Config`` with ``AutoConfig`` under ``internlm2``, so no remote code runs at all.
  * the default ``torch_load_mode="full"`` builds the torch model through ``AutoModelForCausalLM``,
    which needs the remote modeling code; ``"streaming"`` reads the safetensors directly (and uses
    less memory), so that is what is used.
EasyDeL's defaults are ``attn_dtype=bfloat16`` and ``kvdtype=attn_dtype``; they are set to float32 here.
``--precision`` (default ``default``) is the matmul precision EasyDeL passes to its linears
(EasyDeL's own default is ``fastest``, which is the same thing as ``DEFAULT``).

Generation path. ``model.generate(input_ids, attention_mask, generation_config=GenerationConfig(
do_sample=False, max_new_tokens=N))`` -> EasyDeL's ``_greedy_search`` (a prefill step, then a
``lax.while_loop`` of one-token decode steps over a dense KV cache of length prompt+N), wrapped as a
whole in ``jax.jit`` with the model split into (graphdef, params, other) and merged inside the jitted
function -- the same thing EasyDeL's own trainers do for generation (``BaseTrainer``'s ``ejit``-ed
``generate``). That is the fastest single-device greedy path EasyDeL 0.3.0 offers for token ids:
eSurge, the serving engine (paged KV cache, continuous batching), only takes text prompts through a
tokenizer and ZMQ tokenizer/detokenizer workers plus a background scheduler, so it cannot run the
random-token-id prompts used here without reaching into private methods. ``--eager`` times the
un-jitted ``model.generate`` call instead (what EasyDeL's README shows): its prefill runs op by op and
the while_loop is retraced on every call.
EOS stopping is disabled (``eos_token_id=None``) so that every run generates exactly N tokens.

Figures.
  * prefill: one forward over [1, P] token ids returning all P logits (jitted), tok/s = P / best of 3,
    after a warm-up (compile) call.
  * ttft: best of 3 of a batch-1 ``generate`` with 1 new token on a --prompt-token prompt
    (prefill + first greedy token), after warm-up.
  * decode at batch B: B * (N - 1) / (t(N) - t(1)), t(k) the best of 3 wall times of ``generate`` with k
    new tokens on B prompts of --prompt tokens (prefill cancels out; the KV cache is prompt+k long, so
    t(N)'s prefill attends over a slightly longer masked cache than t(1)'s), after warm-up compiles of
    both.
Token ids are ``np.random.RandomState(0).randint(3, 90000, ...)``.

Threads. Before jax is imported the process is pinned to --threads CPUs with
``os.sched_setaffinity`` (XLA:CPU sizes its thread pool from the affinity mask, like ``taskset``),
``OMP_NUM_THREADS``/``MKL_NUM_THREADS`` and torch's thread count are set to N, and for N == 1
``--xla_cpu_multi_thread_eigen=false`` is added to XLA_FLAGS. JAX_PLATFORMS defaults to cpu.
"""

import argparse
import json
import os
import sys
import time


def _limit_threads(n: int) -> dict:
    info = {"threads": n}
    try:
        cpus = sorted(os.sched_getaffinity(0))
        if n < len(cpus):
            os.sched_setaffinity(0, cpus[:n])
        info["cpus"] = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError) as e:  # not Linux
        info["affinity_error"] = repr(e)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(n)
    flags = os.environ.get("XLA_FLAGS", "")
    if n == 1 and "xla_cpu_multi_thread_eigen" not in flags:
        flags = f"{flags} --xla_cpu_multi_thread_eigen=false".strip()
    os.environ["XLA_FLAGS"] = flags
    info["XLA_FLAGS"] = flags
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    return info


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hf-dir", required=True, help="HF InternLM2 folder (config.json + safetensors)")
    p.add_argument("--prompt", type=int, default=128, help="prompt length for ttft and decode")
    p.add_argument("--new", type=int, default=64, help="new tokens N for decode")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--prefill", type=int, default=512, help="P, tokens of the prefill forward")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3, help="timed runs per figure (best is kept)")
    p.add_argument("--json", default=None, help="also write the JSON here")
    p.add_argument("--attn", default="vanilla", help="EasyDeL attn_mechanism")
    p.add_argument("--decode-attn", default=None, help="EasyDeL decode_attn_mechanism (default: --attn)")
    p.add_argument("--precision", default="default", choices=["default", "high", "highest"])
    p.add_argument("--max-len", type=int, default=None,
                   help="freq/mask_max_position_embeddings (RoPE table length); default: max(prefill, prompt+new), "
                        "rounded up to 1024")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="use the folder's configuration_internlm2.py instead of EasyDeL's InternLM2Config")
    p.add_argument("--eager", action="store_true", help="time un-jitted model.generate (README style)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    thread_info = _limit_threads(args.threads)

    import easydel as ed
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx
    from transformers import AutoConfig
    from transformers.generation.configuration_utils import GenerationConfig

    try:
        import torch

        torch.set_num_threads(args.threads)
    except ImportError:
        torch = None

    if not args.trust_remote_code:
        from easydel.modules.internlm2 import InternLM2Config

        try:
            AutoConfig.register("internlm2", InternLM2Config)
        except ValueError:  # already registered (a newer transformers, or a second call)
            pass

    max_len = args.max_len or -(-max(args.prefill, args.prompt + args.new) // 1024) * 1024
    config_kwargs = ed.EasyDeLBaseConfigDict(
        attn_mechanism=args.attn,
        decode_attn_mechanism=args.decode_attn,
        attn_dtype=jnp.float32,
        kvdtype=jnp.float32,
        attn_softmax_dtype=jnp.float32,
        freq_max_position_embeddings=max_len,
        mask_max_position_embeddings=max_len,
    )
    precision = {"default": jax.lax.Precision.DEFAULT, "high": jax.lax.Precision.HIGH,
                 "highest": jax.lax.Precision.HIGHEST}[args.precision]

    t = time.perf_counter()
    model = ed.AutoEasyDeLModelForCausalLM.from_pretrained(
        args.hf_dir,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        precision=precision,
        sharding_axis_dims=(1, 1, 1, 1, 1),  # one device
        config_kwargs=config_kwargs,
        torch_load_mode="streaming",
        trust_remote_code=args.trust_remote_code,
        from_torch=True,
        verbose=False,
    )
    load_s = time.perf_counter() - t
    cfg = model.config
    pad_id = cfg.pad_token_id if cfg.pad_token_id is not None else 0
    # Greedy, no EOS stop: every call generates exactly max_new_tokens.
    model.generation_config = GenerationConfig(do_sample=False, num_beams=1, pad_token_id=pad_id,
                                               eos_token_id=None, bos_token_id=cfg.bos_token_id)
    _ = model.frequencies  # materialise the RoPE table as module state, so it is not rebuilt per call
    graphdef, gstate, gother = model.split_module()
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(gstate))
    param_dtypes = sorted({str(x.dtype) for x in jax.tree_util.tree_leaves(gstate)})
    mesh = model.mesh

    def gen_config(k):
        return GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=k, pad_token_id=pad_id,
                                eos_token_id=None, bos_token_id=cfg.bos_token_id)

    def merged(gs, go):
        return nnx.merge(graphdef, gs, go)

    @jax.jit
    def forward(gs, go, ids):
        return merged(gs, go)(input_ids=ids, attention_mask=jnp.ones_like(ids, jnp.bool_)).logits

    gen_jit = {}

    def generate(ids, k):
        mask = jnp.ones_like(ids, jnp.bool_)
        if args.eager:
            return model.generate(input_ids=ids, attention_mask=mask, generation_config=gen_config(k)).sequences
        if k not in gen_jit:
            def fn(gs, go, ids, mask, k=k):
                return merged(gs, go).generate(input_ids=ids, attention_mask=mask,
                                               generation_config=gen_config(k)).sequences
            gen_jit[k] = jax.jit(fn)
        return gen_jit[k](gstate, gother, ids, mask)

    def timed(fn, repeats):
        t = time.perf_counter()
        out = jax.block_until_ready(fn())
        first = time.perf_counter() - t
        best = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            out = jax.block_until_ready(fn())
            best = min(best, time.perf_counter() - t)
        return first, best, out

    result = {
        "library": "easydel",
        "easydel": ed.__version__,
        "jax": jax.__version__,
        "jaxlib": __import__("jaxlib").__version__,
        "torch": getattr(torch, "__version__", None),
        "python": sys.version.split()[0],
        "device": str(jax.devices()[0]),
        "platform": jax.default_backend(),
        **thread_info,
        "hf_dir": os.path.abspath(args.hf_dir),
        "model": {"params": n_params, "param_dtypes": param_dtypes, "hidden_size": cfg.hidden_size,
                  "num_hidden_layers": cfg.num_hidden_layers, "num_attention_heads": cfg.num_attention_heads,
                  "num_key_value_heads": cfg.num_key_value_heads, "vocab_size": cfg.vocab_size,
                  "rope_scaling": getattr(cfg, "rope_scaling", None)},
        "settings": {"dtype": "float32", "param_dtype": "float32", "attn_mechanism": str(cfg.attn_mechanism),
                     "decode_attn_mechanism": str(cfg.decode_attn_mechanism), "attn_dtype": str(cfg.attn_dtype),
                     "kvdtype": str(cfg.kvdtype), "attn_softmax_dtype": str(cfg.attn_softmax_dtype),
                     "precision": args.precision, "freq_max_position_embeddings": max_len,
                     "trust_remote_code": args.trust_remote_code, "torch_load_mode": "streaming",
                     "generation_path": "model.generate (greedy _greedy_search, lax.while_loop), "
                                        + ("eager" if args.eager else "whole call under jax.jit"),
                     "repeats": args.repeats},
        "load_s": round(load_s, 3),
    }

    with mesh:
        # Prefill: [1, P] forward, all logits.
        rng = np.random.RandomState(0)
        ids = jnp.asarray(rng.randint(3, 90000, (1, args.prefill)), jnp.int32)
        first, best, logits = timed(lambda: forward(gstate, gother, ids), args.repeats)
        assert logits.shape == (1, args.prefill, cfg.vocab_size), logits.shape
        result["prefill"] = {"tokens": args.prefill, "tok_s": round(args.prefill / best, 2),
                             "best_s": round(best, 5), "first_call_s": round(first, 3),
                             "logits_dtype": str(logits.dtype),
                             "logits_finite": bool(np.isfinite(np.asarray(logits)).all())}

        decode = {}
        for b in args.batches:
            rng = np.random.RandomState(0)
            ids = jnp.asarray(rng.randint(3, 90000, (b, args.prompt)), jnp.int32)
            first1, t1, _ = timed(lambda: generate(ids, 1), args.repeats)
            firstn, tn, seqs = timed(lambda: generate(ids, args.new), args.repeats)
            seqs = np.asarray(seqs)
            assert seqs.shape == (b, args.prompt + args.new), seqs.shape
            decode[str(b)] = {"tok_s": round(b * (args.new - 1) / (tn - t1), 2) if tn > t1 else None,
                              "t1_s": round(t1, 5), "tN_s": round(tn, 5),
                              "first_call_t1_s": round(first1, 3), "first_call_tN_s": round(firstn, 3)}
            if b == args.batches[0]:
                result["greedy_tokens_row0"] = seqs[0, args.prompt:].tolist()
            if b == 1:
                result["ttft_s"] = round(t1, 5)
        if "ttft_s" not in result:  # batch 1 not among --batches: measure it anyway
            rng = np.random.RandomState(0)
            ids = jnp.asarray(rng.randint(3, 90000, (1, args.prompt)), jnp.int32)
            _, t1, _ = timed(lambda: generate(ids, 1), args.repeats)
            result["ttft_s"] = round(t1, 5)
        result["decode"] = {"prompt": args.prompt, "new": args.new, "by_batch": decode}

    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    return result


if __name__ == "__main__":
    main()
