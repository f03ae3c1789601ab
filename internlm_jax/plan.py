"""Fit before you rent: compile the library's own programs for a TPU topology and read the result.

``plan(...)`` builds the model abstractly (``ShapeDtypeStruct`` parameters carrying their shardings,
no weights), lowers the very programs the library runs (the :class:`~internlm_jax.generation.Generator`
prefill, decode step and decode loop, and the training step of :mod:`internlm_jax.training`) from
abstract sharded inputs, and compiles them for the target devices. TPU devices come from
``jax.experimental.topologies`` (``pip install "jax[tpu]"``: XLA compiles for a TPU slice on a CPU
host, multi-host slices included), or the local devices are used.

Per device, from each compiled executable: arguments, outputs, aliased (donated) bytes, temporaries
and code (``memory_analysis``), and whether the compiler accepted the program in the chip's HBM (the
TPU compiler refuses programs whose temporaries do not fit; we report its numbers).

Time is a roofline, ``max(FLOPs / peak, bytes / HBM bandwidth)``, a lower bound. XLA's own
``cost_analysis`` counts the body of each loop once (the layer scan, the ring steps, the attention
blocks), so its totals are reported raw and the roofline uses the model's FLOPs and bytes counted
analytically (:func:`program_costs`); the tests check that count against XLA on loop-free programs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
import os
import re
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from .config import InternLM2Config
from .ring import padded_length
from .settings import EngineSettings

GiB = 1 << 30


@dataclasses.dataclass(frozen=True)
class Chip:
    """One TPU chip (one JAX device in megacore mode), from the Cloud TPU spec sheets."""

    name: str
    hbm_bytes: int
    peak_flops: float  # dense bf16, per chip
    hbm_bandwidth: float  # bytes/s, per chip


# Cloud TPU documentation (docs.cloud.google.com/tpu/docs/{v4,v5e,v5p,v6e}).
CHIPS = {
    "v4": Chip("TPU v4", 32 * GiB, 275e12, 1.2e12),
    "v5e": Chip("TPU v5e", 16 * GiB, 197e12, 819e9),
    "v5p": Chip("TPU v5p", 95 * GiB, 459e12, 2.765e12),
    "v6e": Chip("TPU v6e", 32 * GiB, 918e12, 1.64e12),
}
TWO_CORE = ("v4", "v5p")  # slice names count TensorCores (v5p-8 = 4 chips); one device per chip
PROGRAMS = ("prefill", "decode_step", "decode_loop", "train_step")


def parse_topology(name: str) -> tuple[str, str]:
    """``"v5e:4x4"`` or a slice name ``"v5e-16"`` / ``"v5p-8"`` -> (generation, ``"AxB[xC]"``)."""
    m = re.fullmatch(r"(v4|v5e|v5p|v6e|v5litepod):(\d+(?:x\d+){1,2})", name.strip())
    if m:
        gen = "v5e" if m.group(1) == "v5litepod" else m.group(1)
        dims = [int(x) for x in m.group(2).split("x")]
        if len(dims) != (3 if gen in TWO_CORE else 2):
            raise ValueError(f"topology {name!r}: {gen} slices are {'3' if gen in TWO_CORE else '2'}-d (e.g. "
                             f"{'v5p:2x2x1' if gen in TWO_CORE else 'v5e:2x4'})")
        return gen, m.group(2)
    m = re.fullmatch(r"(v4|v5e|v5p|v6e|v5litepod)-(\d+)", name.strip())
    if not m:
        raise ValueError(f"unknown topology {name!r}: use e.g. v5e:4x4, v5p:2x2x4, v6e:2x4, or v5e-16, v5p-8")
    gen = "v5e" if m.group(1) == "v5litepod" else m.group(1)
    count = int(m.group(2))
    chips = count // 2 if gen in TWO_CORE else count
    if chips < 1 or chips & (chips - 1) or (gen in TWO_CORE and count % 2):
        raise ValueError(f"topology {name!r}: the chip count must be a power of two")
    if gen in TWO_CORE:  # 3-d: 2x2x1, 2x2x2, 2x2x4, 2x4x4, 4x4x4, 4x4x8 ...
        dims = [1, 1, 1]
        for i in range(int(math.log2(chips))):
            dims[(0, 1, 2)[i] if i < 3 else (2, 1, 0)[(i - 3) % 3]] *= 2
    else:
        e = int(math.log2(chips))
        dims = [1 << (e // 2), 1 << (e - e // 2)]
    return gen, "x".join(map(str, dims))


def tpu_devices(topology: str) -> tuple[list, Chip]:
    """Compile-only devices of a TPU slice (needs ``libtpu``: ``pip install "jax[tpu]"``)."""
    gen, shape = parse_topology(topology)
    try:
        import libtpu  # noqa: F401
    except ImportError as e:
        raise RuntimeError("compiling for a TPU topology needs libtpu: pip install \"jax[tpu]\" "
                           "(the same version as jax)") from e
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # compile-only: several planners may run at once
    if not any(os.path.exists(p) for p in ("/dev/accel0", "/dev/vfio/0")):
        # no TPU attached: keep libtpu from probing the GCE metadata server for a slice it is not on
        for k, v in (("TPU_SKIP_MDS_QUERY", "1"), ("TPU_ACCELERATOR_TYPE", "v5litepod-4"),
                     ("TPU_WORKER_HOSTNAMES", "localhost")):
            os.environ.setdefault(k, v)
    from jax.experimental import topologies

    kw = {"chip_config_name": "megacore"} if gen == "v4" else {}
    desc = topologies.get_topology_desc(platform="tpu", topology_name=f"{gen}:{shape}", **kw)
    return list(desc.devices), CHIPS[gen]


# --- analytic FLOPs and bytes -------------------------------------------------------------------


def _matmul_params_per_layer(cfg: InternLM2Config) -> int:
    h, d = cfg.hidden_size, cfg.head_dim
    return h * (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * d + cfg.num_attention_heads * d * h \
        + 3 * h * cfg.intermediate_size


@dataclasses.dataclass
class Costs:
    """Work of one program over the whole mesh: FLOPs, and HBM bytes by what they are."""

    flops: float
    weights: float  # parameter bytes read by the matmuls (whole model, per pass)
    update: float  # optimizer traffic: params, gradients and AdamW moments (training only)
    cache: float  # KV cache bytes read (decode) or written (prefill)
    activations: float  # each layer's matmul inputs and outputs

    def per_device(self, split: dict) -> tuple[float, float]:
        """(FLOPs, bytes) of one device. ``split``: how many ways the work, the gathered weights (tensor),
        the stored parameters (tensor x fsdp) and the cache are divided."""
        return self.flops / split["work"], (self.weights / split["weights"] + self.update / split["params"]
                                            + self.cache / split["cache"] + self.activations / split["work"])


def program_costs(cfg: InternLM2Config, program: str, *, batch: int, seq: int, cache_len: int, blockwise: bool,
                  block: int = 512, remat: str = "none", dtype_bytes: int = 2, param_bytes: int = 2,
                  decode_slots: int | None = None, chunks: Sequence[tuple[int, int]] | None = None) -> Costs:
    """FLOPs and HBM bytes of one program over the whole mesh, counted from the shapes it computes.

    Matmuls count 2 FLOPs per multiply-add (the embedding is a gather; the prefill's logits are only
    the last position's). Attention counts the score and value products the implementation performs:
    dense attention covers every (query, key) pair (a dense prefill's keys are the prompt's, a decode
    step's the cache slots), the blockwise path the causal half plus the diagonal blocks. Bytes:
    weights read once per pass, the KV cache read (decode) or written (prefill), each layer's matmul
    inputs and outputs, and for training the AdamW update.
    ``decode_slots``: cache slots a decode step reads (default all ``cache_len``; the ragged kernel
    reads only the filled ones). ``chunks``: a prefill run in chunks, ``(tokens, key span)`` each (see
    :func:`~internlm_jax.generation.prompt_chunks`): each chunk attends densely over its span and reads
    the weights again."""
    L, h, v = cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size
    nh, nkv, d, inter = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.intermediate_size
    matmul = L * _matmul_params_per_layer(cfg)
    params = matmul + v * h * (1 if cfg.tie_word_embeddings else 2) + (2 * L + 1) * h
    cache = 2 * L * batch * cache_len * nkv * d * dtype_bytes
    act_per_token = dtype_bytes * (8 * h + 2 * (nh + 2 * nkv) * d + 4 * inter) * L

    def attention(q_len, kv_len, causal_blocks):
        pairs = (q_len * (q_len + block) / 2) if causal_blocks else q_len * kv_len
        return 4 * nh * d * pairs * L * batch

    if program == "prefill" and chunks:
        t = batch * sum(c for c, _ in chunks)
        return Costs(2 * t * matmul + len(chunks) * 2 * batch * h * v + sum(attention(c, k, False) for c, k in chunks),
                     len(chunks) * (matmul + h * v) * param_bytes, 0.0, cache * seq / cache_len, t * act_per_token)
    if program == "prefill":
        t = batch * seq
        return Costs(2 * t * matmul + 2 * batch * h * v + attention(seq, seq, blockwise),
                     (matmul + h * v) * param_bytes, 0.0, cache * seq / cache_len, t * act_per_token)
    if program in ("decode_step", "decode_loop"):
        slots = cache_len if decode_slots is None else min(decode_slots, cache_len)
        return Costs(2 * batch * (matmul + h * v) + attention(1, slots, False), (matmul + h * v) * param_bytes,
                     0.0, cache * slots / cache_len, batch * act_per_token)
    if program == "train_step":
        t = batch * seq
        forward = 2 * t * (matmul + h * v) + attention(seq, seq, blockwise)
        passes = 4 if remat == "full" else 3  # forward, backward (2x), and the recomputed forward
        # weights read by forward, backward and recompute; AdamW reads params, grads, mu, nu, writes 3
        return Costs(passes * forward, (passes - 1) * (matmul + h * v) * dtype_bytes, 7 * params * param_bytes,
                     0.0, (passes + 1) * t * act_per_token)
    raise ValueError(f"unknown program {program!r}; use one of {PROGRAMS}")


# --- compiling the library's programs -------------------------------------------------------------


@dataclasses.dataclass
class ProgramPlan:
    """One compiled program: per-device bytes, whether it fits, and its cost."""

    name: str
    compiled: bool
    arguments: int = 0
    outputs: int = 0
    aliased: int = 0
    temporaries: int = 0
    code: int = 0
    parameters: int = 0  # of the arguments: the model (and for training the optimizer state)
    cache: int = 0  # the KV cache (prefill output, decode argument)
    flops: float = 0.0  # per device, analytic (see program_costs)
    hbm_bytes: float = 0.0
    xla_flops: float = 0.0  # XLA cost_analysis as reported (each loop body once)
    xla_bytes: float = 0.0
    seconds: float = 0.0  # roofline lower bound
    error: str = ""
    hbm_limit: int | None = None

    @property
    def peak(self) -> int:
        """Live bytes per device: arguments and outputs (a donated buffer counted once), temporaries, code."""
        return self.arguments + self.outputs - self.aliased + self.temporaries + self.code

    @property
    def fits(self) -> bool:
        return self.compiled and (self.hbm_limit is None or self.peak <= self.hbm_limit)


@dataclasses.dataclass
class Plan:
    model: str
    target: str
    mesh: dict
    context: int
    batch: int
    programs: list[ProgramPlan]
    chip: Chip | None
    notes: list[str] = dataclasses.field(default_factory=list)
    suggestion: "Plan | None" = None

    @property
    def fits(self) -> bool:
        return all(p.fits for p in self.programs)

    def to_dict(self) -> dict:
        out = {"model": self.model, "target": self.target, "mesh": self.mesh, "context": self.context,
               "batch": self.batch, "fits": self.fits, "chip": dataclasses.asdict(self.chip) if self.chip else None,
               "programs": [dict(dataclasses.asdict(p), peak=p.peak, fits=p.fits) for p in self.programs],
               "notes": self.notes}
        if self.suggestion is not None:
            out["suggestion"] = self.suggestion.to_dict()
        return out

    def table(self) -> str:
        def gib(x):
            return f"{x / GiB:7.2f}"

        head = (f"{self.model} on {self.target}, mesh {fmt_mesh(self.mesh)}, context {self.context:,}, "
                f"batch {self.batch}")
        if self.chip:
            head += f"\nchip {self.chip.name}: {self.chip.hbm_bytes / GiB:.0f} GiB HBM, " \
                    f"{self.chip.peak_flops / 1e12:.0f} TFLOP/s bf16, {self.chip.hbm_bandwidth / 1e9:.0f} GB/s"
        rows = [f"{'program':<12} {'fits':>4} {'peak GiB':>8} {'params':>7} {'cache':>7} {'temps':>7} "
                f"{'TFLOP':>9} {'GB':>8} {'roofline':>10}  XLA TFLOP/GB (loop bodies once)"]
        for p in self.programs:
            if not p.compiled:
                rows.append(f"{p.name:<12} {'no':>4}  {p.error}")
                continue
            rows.append(f"{p.name:<12} {'yes' if p.fits else 'no':>4} {gib(p.peak):>8} {gib(p.parameters)} "
                        f"{gib(p.cache)} {gib(p.temporaries)} {p.flops / 1e12:9.4g} {p.hbm_bytes / 1e9:8.4g} "
                        f"{fmt_seconds(p.seconds):>10}  {p.xla_flops / 1e12:.4g} / {p.xla_bytes / 1e9:.4g}")
        out = [head, *rows]
        dec = next((p for p in self.programs if p.name == "decode_step" and p.compiled), None)
        if dec and dec.seconds:
            out.append(f"decode: {self.batch / dec.seconds:,.0f} tokens/s at the roofline "
                       f"({dec.seconds * 1e3:.2f} ms per step)")
        out += [f"note: {n}" for n in self.notes]
        if any(p.name == "decode_loop" for p in self.programs):
            out.append("note: decode_loop's TFLOP, GB and roofline are per step of its loop; peak and temps are "
                       "the whole loop's")
        failing = [p.name for p in self.programs if not p.fits]
        out.append("fits: " + ("yes" if self.fits else f"NO ({', '.join(failing)} does not; `--programs` "
                                                       f"picks the programs to plan)"))
        if self.suggestion is not None:
            out += ["", "a mesh that fits:" if self.suggestion.fits else "best mesh tried (does not fit either):",
                    self.suggestion.table()]
        return "\n".join(out)


def fmt_mesh(mesh: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in mesh.items() if v > 1) or "1 device"


def fmt_seconds(s: float) -> str:
    return f"{s * 1e3:.2f} ms" if s < 1 else f"{s:.2f} s"


def _shard_bytes(tree) -> int:
    """Bytes one device holds of a pytree of sharded abstract arrays (the largest shard)."""
    total = 0
    for x in jax.tree.leaves(tree):
        shape = x.sharding.shard_shape(x.shape) if getattr(x, "sharding", None) is not None else x.shape
        total += math.prod(shape) * np.dtype(x.dtype).itemsize
    return total


def _memory(compiled) -> dict:
    m = compiled.memory_analysis()
    return dict(arguments=int(m.argument_size_in_bytes), outputs=int(m.output_size_in_bytes),
                aliased=int(m.alias_size_in_bytes), temporaries=int(m.temp_size_in_bytes),
                code=int(m.generated_code_size_in_bytes))


def _xla_cost(compiled) -> tuple[float, float]:
    c = compiled.cost_analysis()
    c = c[0] if isinstance(c, (list, tuple)) else c
    return float(c.get("flops", 0.0)), float(c.get("bytes accessed", 0.0))


def _short_error(e: Exception) -> str:
    text = str(e)
    m = re.search(r"total memory required for HLO temporaries \(([\d.]+\w?)\) "
                  r"exceeds available HBM \(([\d.]+\w?)\)", text)
    if m:
        return f"does not fit: temporaries need {m.group(1)}, HBM available {m.group(2)} (TPU compiler)"
    m = re.search(r"Ran out of memory[^\n]*", text)
    if m:
        return "does not fit: " + m.group(0)[:200]
    return f"{type(e).__name__}: {text.splitlines()[0][:200] if text else ''}"


def _abstract(shape, dtype, axes, mesh):
    from .sharding import named_sharding

    return jax.ShapeDtypeStruct(shape, dtype, sharding=named_sharding(axes, shape, mesh))


def _spec_like(x, sharding):
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)


@contextlib.contextmanager
def _no_persistent_cache():
    """Compile-only TPU topologies cannot load executables back from JAX's persistent cache (reading
    them warns and recompiles), so the planner's compiles neither read nor fill it."""
    from jax.experimental.compilation_cache import compilation_cache

    before = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    compilation_cache.reset_cache()  # JAX decides once whether the cache is used: make it decide again
    try:
        yield
    finally:
        jax.config.update("jax_enable_compilation_cache", before)
        compilation_cache.reset_cache()


def compile_programs(cfg: InternLM2Config, mesh, **kwargs) -> list[ProgramPlan]:
    """Lower and compile the library's programs on ``mesh`` (see :func:`_compile_programs`)."""
    with _no_persistent_cache():
        return _compile_programs(cfg, mesh, **kwargs)


def _compile_programs(cfg: InternLM2Config, mesh, *, context: int, batch: int, max_new_tokens: int = 256,
                     dtype="bfloat16", programs: Sequence[str] = PROGRAMS, remat: str = "full",
                     attention_impl: str | None = None, decode_impl: str | None = None, chip: Chip | None = None,
                     train_param_dtype="float32") -> list[ProgramPlan]:
    """Lower and compile the library's programs on ``mesh`` for a prompt of ``context`` tokens
    (``attention_impl`` / ``decode_impl``: the model settings of those names, if given)."""
    from .cache import KVCache
    from .generation import DecodeState, Generator, SamplingParams, prompt_chunks
    from .model import InternLM2

    limit = chip.hbm_bytes if chip else None
    split = _splits(cfg, mesh, batch)
    dtype_bytes = jnp.dtype(dtype).itemsize
    out: list[ProgramPlan] = []
    unknown = [p for p in programs if p not in PROGRAMS]
    if unknown:
        raise ValueError(f"unknown program(s) {unknown}; choose from {PROGRAMS}")

    def finish(plan: ProgramPlan, compiled, costs):
        plan.__dict__.update(_memory(compiled))
        plan.xla_flops, plan.xla_bytes = _xla_cost(compiled)
        plan.flops, plan.hbm_bytes = costs.per_device(split)
        if chip:
            plan.seconds = max(plan.flops / chip.peak_flops, plan.hbm_bytes / chip.hbm_bandwidth)

    infer = [p for p in programs if p != "train_step"]
    if infer:
        model = InternLM2.abstract(cfg, mesh=mesh, dtype=dtype)
        model.configure(**_settings(attention_impl, decode_impl))
        gen = Generator(model)
        s = gen.prompt_length(context)
        blockwise = gen.blockwise(s)
        cache_len, last, base, _ = gen.layout(s, max_new_tokens)
        tok = _abstract((batch, s), jnp.int32, ("batch", "seq"), mesh)
        param_bytes = _shard_bytes(gen.state)
        pre = ProgramPlan("prefill", False, hbm_limit=limit, parameters=param_bytes)
        declared = KVCache.abstract(cfg, batch, cache_len, dtype, mesh)  # the cache as the library lays it out
        chunked = gen.prefills_in_chunks(context)  # generate's prefill in chunks: plan its largest one
        try:
            if chunked:
                lowered = gen.lower_extend(declared, keys=cache_len)
            else:
                lowered = gen.prefill.lower(gen.state, gen.abstract_layers(), tok, tok, tok, tok,
                                            cache_len=cache_len, last=last)
            compiled = lowered.compile()
        except Exception as e:  # noqa: BLE001 - the compiler's verdict is the answer
            pre.error = _short_error(e)
            compiled = None
        if compiled is not None and chunked:
            pre.compiled = True
            cache = declared
            logits = _abstract((batch, cfg.vocab_size), jnp.float32, ("batch", "act_vocab"), mesh)
            pre.cache = _shard_bytes((cache.keys, cache.values))
        elif compiled is not None:
            pre.compiled = True
            logits_s, cache_s = compiled.output_shardings
            logits = jax.ShapeDtypeStruct((batch, cfg.vocab_size), jnp.float32, sharding=logits_s)
            cache = jax.tree.map(lambda x, sh: _spec_like(x, sh), declared, cache_s)
            pre.cache = _shard_bytes((cache.keys, cache.values))
        else:  # the decode programs still compile: place the cache as the library declares it
            cache = declared
            logits = _abstract((batch, cfg.vocab_size), jnp.float32, ("batch", "act_vocab"), mesh)
        costs = dict(batch=batch, cache_len=cache_len, blockwise=blockwise, dtype_bytes=dtype_bytes,
                     param_bytes=dtype_bytes)
        if "prefill" in programs:
            if compiled is not None:
                chunk = model.settings.long_prompt_chunk
                spans = [(chunk, keys) for _, _, _, keys in prompt_chunks(context, s, chunk, cache_len)] \
                    if chunked else None
                finish(pre, compiled, program_costs(cfg, "prefill", seq=s, chunks=spans, **costs))
            out.append(pre)
        scalar = jax.ShapeDtypeStruct((), jnp.int32)
        ds = DecodeState.abstract(cfg, batch, cache, mesh, logits=logits)
        layers = gen.abstract_layers()  # the per-layer weight arrays the decode programs read, if any
        for name in ("decode_step", "decode_loop"):
            if name not in programs:
                continue
            plan = ProgramPlan(name, False, hbm_limit=limit, parameters=param_bytes,
                               cache=_shard_bytes((cache.keys, cache.values)))
            try:
                kw = dict(sampling=SamplingParams(), stop_ids=(2,))
                if name == "decode_step":
                    lowered = gen.step.lower(gen.state, layers, ds, scalar, **kw)
                else:  # one chunk of the on-device decode loop
                    lowered = gen.chunk.lower(gen.state, layers, ds, scalar, steps=gen.settings.decode_chunk, **kw)
                compiled = lowered.compile()
            except Exception as e:  # noqa: BLE001
                plan.error = _short_error(e)
                out.append(plan)
                continue
            plan.compiled = True
            # the ragged kernel reads the filled slots only: at most the context and the new tokens
            filled = context + max_new_tokens if model.decode_attention(cache_len) == "ragged" else None
            finish(plan, compiled, program_costs(cfg, name, seq=1, decode_slots=filled, **costs))
            out.append(plan)
        del model, gen
    if "train_step" in programs:
        out.append(_compile_train(cfg, mesh, context, batch, dtype, train_param_dtype, remat, attention_impl,
                                  limit, finish))
    order = {n: i for i, n in enumerate(PROGRAMS)}
    return sorted(out, key=lambda p: order[p.name])


def _settings(attention_impl: str | None, decode_impl: str | None) -> dict:
    """The planner's ``attention_impl`` / ``decode_impl`` as engine settings."""
    out = {}
    if attention_impl:
        out["attention"] = attention_impl
    if decode_impl:
        out["decode_attention"] = decode_impl
    return out


def _compile_train(cfg, mesh, context, batch, dtype, param_dtype, remat, attention_impl, limit, finish) -> ProgramPlan:
    from flax import nnx

    from .model import InternLM2
    from .training.config import OptimSection
    from .training.step import make_optimizer, make_train_step, optimizer_shardings

    model = InternLM2.abstract(cfg, mesh=mesh, dtype=dtype, param_dtype=param_dtype)
    model.configure(remat=remat, **_settings(attention_impl, None))
    graphdef, params = nnx.split(model)
    tx, schedule = make_optimizer(OptimSection(), 1000)
    plan = ProgramPlan("train_step", False, hbm_limit=limit)
    blockwise = model.uses_blockwise(context)
    try:
        opt_state = jax.tree.map(_spec_like, jax.eval_shape(tx.init, params), optimizer_shardings(tx, params, mesh))
        plan.parameters = _shard_bytes(params) + _shard_bytes(opt_state)
        tok = _abstract((batch, context), jnp.int32, ("batch", "seq"), mesh)
        flt = _abstract((batch, context), jnp.float32, ("batch", "seq"), mesh)
        batch_in = {"inputs": tok, "targets": tok, "segment_ids": tok, "loss_mask": flt, "weight": flt}
        step = jax.jit(make_train_step(graphdef, tx, grad_accum=1, segments=True, z_loss=0.0, schedule=schedule),
                       donate_argnums=(0, 1))
        compiled = step.lower(params, opt_state, batch_in, jax.ShapeDtypeStruct((), jnp.int32)).compile()
    except Exception as e:  # noqa: BLE001
        plan.error = _short_error(e)
        return plan
    plan.compiled = True
    seq = padded_length(context, model.sequence_parallel) if blockwise else context
    finish(plan, compiled, program_costs(cfg, "train_step", batch=batch, seq=seq, cache_len=seq, blockwise=blockwise,
                                         remat=remat, dtype_bytes=jnp.dtype(dtype).itemsize,
                                         param_bytes=jnp.dtype(param_dtype).itemsize))
    return plan


def _splits(cfg: InternLM2Config, mesh, batch: int) -> dict:
    """How many ways a program's parts divide on ``mesh`` (a non-dividing axis replicates its part)."""
    shape = dict(mesh.shape)
    rows = shape["data"] * shape["fsdp"]
    b = math.gcd(batch, rows)
    t = shape["tensor"] if cfg.num_attention_heads % shape["tensor"] == 0 else 1
    kv = shape["tensor"] if cfg.num_key_value_heads % shape["tensor"] == 0 else 1
    return {"work": b * t * shape["sequence"], "weights": t, "params": t * shape["fsdp"],
            "cache": b * kv * shape["sequence"]}


# --- the plan ----------------------------------------------------------------------------------


def _model_config(model: str | InternLM2Config) -> tuple[str, InternLM2Config]:
    if isinstance(model, InternLM2Config):
        return "custom", model
    if os.path.isdir(model):
        return os.path.basename(os.path.normpath(model)), InternLM2Config.from_pretrained(model)
    if os.sep in model and not model.startswith("internlm/"):  # meant as a folder, not a preset name
        raise FileNotFoundError(f"{model}: no such checkpoint folder")
    return model, InternLM2Config.preset(model)


def plan(model: str | InternLM2Config, topology: str | None = None, *, context: int | None = None, batch: int = 1,
         mesh: dict | None = None, max_new_tokens: int = 256, dtype="bfloat16",
         programs: Sequence[str] = PROGRAMS, remat: str = "full", attention_impl: str | None = None,
         decode_impl: str | None = None, suggest: bool = True, max_tries: int = 6, progress=None) -> Plan:
    """Compile ``programs`` for ``model`` (a preset name, a checkpoint folder or a config) on a TPU
    ``topology`` (``"v5e:4x4"``, ``"v5p-8"``; None = the local devices) and report per-device memory,
    fit and roofline time. ``context`` defaults to the model's ``max_position_embeddings``. ``mesh``:
    axis sizes (data/fsdp/tensor/sequence; default: a guess). When it does not fit and ``suggest``,
    candidate meshes are compiled (at most ``max_tries``) until one fits."""
    from .sharding import make_mesh

    name, cfg = _model_config(model)
    context = cfg.max_position_embeddings if context is None else context
    if context < 1 or batch < 1:
        raise ValueError(f"context and batch must be positive, got context={context}, batch={batch}")
    if topology is not None and not topology.strip():
        raise ValueError("topology is empty; give a TPU slice such as v5e:2x4, or leave it out for the local devices")
    if topology:
        devices, chip = tpu_devices(topology)
        target = f"{topology} ({len(devices)} x {devices[0].device_kind}, " \
                 f"{len({d.process_index for d in devices})} host(s))"
    else:
        devices, chip = jax.devices(), None
        target = f"{len(devices)} x {devices[0].device_kind}"
    sizes = dict(mesh) if mesh else default_mesh(cfg, len(devices), context)
    m = make_mesh(devices=devices, **{k: sizes.get(k, 1) if k != "fsdp" else sizes.get(k, -1)
                                      for k in ("data", "fsdp", "tensor", "sequence")})
    sizes = dict(m.shape)
    kw = dict(context=context, batch=batch, max_new_tokens=max_new_tokens, dtype=dtype, programs=programs,
              remat=remat, attention_impl=attention_impl, decode_impl=decode_impl, chip=chip)
    if progress:
        progress(f"compiling {', '.join(programs)} on mesh {fmt_mesh(sizes)}")
    result = Plan(name, target, sizes, context, batch, compile_programs(cfg, m, **kw), chip)
    if decode_impl == "ragged" and any(p.startswith("decode") for p in programs):
        result.notes.append(f"decode: the ragged Pallas kernel; its roofline counts the filled cache slots "
                            f"(at most {context + max_new_tokens:,} per sequence), not the whole cache")
    t = sizes["tensor"]
    if t > 1 and cfg.num_attention_heads % t:
        result.notes.append(f"tensor={t} does not divide the {cfg.num_attention_heads} attention heads: attention "
                            f"runs whole on every tensor shard (its work is not split)")
    chunk = EngineSettings().long_prompt_chunk
    if "prefill" in programs and sizes["sequence"] == 1 and context > chunk:
        result.notes.append(f"prefill: generate runs it in chunks of {chunk:,} tokens (long_prompt_chunk); its "
                            f"memory is the last chunk's program, its FLOPs and bytes those of all the chunks")
    if "train_step" in programs:
        result.notes.append(f"train step: batch {batch} x {context:,} tokens, remat={remat}, f32 master weights "
                            f"and AdamW state, {dtype} compute")
    if result.fits or not suggest or chip is None:
        return result
    best, compiled_meshes = None, 0
    for cand in candidate_meshes(cfg, len(devices), batch):
        if cand == sizes:
            continue
        if compiled_meshes >= max_tries:
            break
        cm = make_mesh(devices=devices, **cand)
        floor = resident_bytes(cfg, cm, context=context, batch=batch, max_new_tokens=max_new_tokens, dtype=dtype,
                               training="train_step" in programs)
        if floor > chip.hbm_bytes:  # parameters and cache alone overflow: no need to compile
            continue
        compiled_meshes += 1
        if progress:
            progress(f"trying mesh {fmt_mesh(cand)}")
        p = Plan(name, target, cand, context, batch, compile_programs(cfg, cm, **kw), chip)
        if p.fits:
            best = p
            break
        if best is None or _badness(p) < _badness(best):
            best = p
    # a mesh that fits, or one that misses by less than the one asked for (never a worse one)
    result.suggestion = best if best is not None and (best.fits or _badness(best) < _badness(result)) else None
    return result


def resident_bytes(cfg: InternLM2Config, mesh, *, context: int, batch: int, max_new_tokens: int, dtype,
                   training: bool) -> int:
    """Bytes per device that must stay resident whatever the compiler does: the parameters and the
    KV cache (inference), or the f32 parameters and AdamW moments (training)."""
    from .cache import shard_bytes
    from .generation import Generator
    from .model import InternLM2

    model = InternLM2.abstract(cfg, mesh=mesh, dtype=dtype)
    gen = Generator(model)
    cache_len = gen.layout(gen.prompt_length(context), max_new_tokens)[0]
    cache = shard_bytes(cfg, batch, cache_len, dtype, mesh)
    params = _shard_bytes(gen.state)
    inference = params + cache
    if not training:
        return inference
    return max(inference, params * 3 * 4 // jnp.dtype(dtype).itemsize)


def _badness(p: Plan) -> tuple:
    return (sum(not x.fits for x in p.programs), max((x.peak for x in p.programs if x.compiled), default=0))


def default_mesh(cfg: InternLM2Config, n: int, context: int) -> dict:
    """A first guess: tensor over the KV heads (at most 8 and the device count), the rest fsdp."""
    t = 1
    while t * 2 <= min(8, n, cfg.num_key_value_heads) and n % (t * 2) == 0:
        t *= 2
    return {"data": 1, "fsdp": n // t, "tensor": t, "sequence": 1}


def candidate_meshes(cfg: InternLM2Config, n: int, batch: int) -> list[dict]:
    """Meshes over ``n`` devices in the order worth trying: least sequence splitting first (ring steps
    cost collectives), tensor near the KV head count, the rest fsdp (shards params and optimizer)."""
    out = []
    powers = [1 << i for i in range(int(math.log2(n)) + 1)] if n & (n - 1) == 0 else \
        [d for d in range(1, n + 1) if n % d == 0]
    for seq, ten in itertools.product(powers, powers):
        if n % (seq * ten) or ten > cfg.num_attention_heads:
            continue
        out.append({"data": 1, "fsdp": n // (seq * ten), "tensor": ten, "sequence": seq})
    ideal = min(cfg.num_key_value_heads, 8)
    return sorted(out, key=lambda m: (m["sequence"], abs(math.log2(m["tensor"] / ideal)), -m["tensor"]))
