"""InternLM2 as a Flax NNX module tree with scanned (stacked) decoder layers.

Module tree and parameter shapes (``L`` layers stacked on a leading axis, so one compiled layer body
serves every depth):

    InternLM2
      tok_embeddings            [V, H]
      layers: DecoderLayer      (every parameter has a leading [L] axis)
        attention_norm.weight   [L, H]
        attention.wq/wk/wv      [L, H, nH|nKV, D]   (+ bq/bk/bv [L, nH|nKV, D] when config.bias)
        attention.wo            [L, nH, D, H]       (+ bo [L, H])
        ffn_norm.weight         [L, H]
        feed_forward.w1/w3      [L, H, I];  w2 [L, I, H]
      norm.weight               [H]
      output                    [H, V]   (absent when tie_word_embeddings)

Decode on one device without a mesh reads a second, *packed* form of each layer (:meth:`InternLM2.decode_weights`,
made once per generator): q/k/v as one matrix, w1/w3 as one, every matrix output-major ``[out, in]``
(torch's layout), because XLA:CPU streams ``[N, K]`` weights faster than ``[K, N]`` in the small-batch
matmuls of a decode step (BENCHMARKS.md). The stacked form stays the one checkpoints and training see.

Every parameter carries ``logical_axes`` metadata; :mod:`internlm_jax.sharding` maps those to the
mesh. Parameters are created directly in their target sharding (or as abstract shapes for restore),
never materialised whole on one device first.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from . import checkpoint, hf_checkpoint
from .arrays import canonical_dtype, flat_params
from .attention import (
    blockwise_attention,
    cached_attention,
    decode_plan,
    dense_attention,
    fused_attention,
    platform_of,
    prefill_plan,
    row_chunk_attention,
    visible_mask,
)
from .cache import SLOT_AXIS, KVCache, heads_view, read_row, read_row_valid, to_slots
from .config import InternLM2Config
from .ring import sharded_decode_attention, write_decode
from .rope import apply_rope, rope_tables
from .settings import EngineSettings, enable_compilation_cache
from .sharding import constrain, named_sharding

enable_compilation_cache()

DTypeLike = Any


class ParamFactory:
    """Creates parameters: random and already sharded, or abstract (shape, dtype, sharding only)."""

    def __init__(self, cfg: InternLM2Config, mesh: Mesh | None, dtype, rngs: nnx.Rngs | None):
        self.cfg, self.mesh, self.dtype, self.rngs = cfg, mesh, dtype, rngs

    def __call__(self, shape: tuple[int, ...], axes: tuple[str, ...], init: str = "normal") -> nnx.Param:
        sharding = named_sharding(axes, shape, self.mesh) if self.mesh is not None else None
        if self.rngs is None:  # abstract: the description that restore and loading fill in
            return nnx.Param(jax.ShapeDtypeStruct(shape, self.dtype, sharding=sharding), logical_axes=axes)
        std, dtype = self.cfg.initializer_range, self.dtype

        def make(key):
            if init == "ones":
                return jnp.ones(shape, dtype)
            if init == "zeros":
                return jnp.zeros(shape, dtype)
            return (jax.random.normal(key, shape, jnp.float32) * std).astype(dtype)

        return nnx.Param(jax.jit(make, out_shardings=sharding)(self.rngs.params()), logical_axes=axes)


def _cast(p: nnx.Param, dtype) -> jax.Array:
    return p[...].astype(dtype)


def _float32_when_used(w: jax.Array, x: jax.Array) -> jax.Array:
    """A 16-bit weight as float32, computed only once the activation ``x`` it multiplies exists.

    XLA:CPU has no 16-bit dot: it multiplies float32 copies. Left to itself, in the unrolled prefill it
    made every layer's copies at the start of the program, so all of them were live at once: twice the
    model's bytes in temporaries (517 MiB for a 128-token prefill of the 650 MB bf16 bench model, 26 MiB
    with this; BENCHMARKS.md). Adding a zero that XLA cannot prove is zero (made from ``x``; barriers are
    gone by the time XLA schedules) ties each copy to its layer, and it is freed after the matmul. The
    values are unchanged."""
    x0 = jax.lax.stop_gradient(x.reshape(-1)[0]).astype(jnp.float32)
    zero = jnp.where(jnp.isfinite(x0), x0, 0.0) * 0.0
    return w.astype(jnp.float32) + zero


def _project(x: jax.Array, w: jax.Array, mesh: Mesh | None, out_dtype=None) -> jax.Array:
    """``x [B, S, K] @ w [K, ...]``, as one plain 2-D matmul over the flattened tokens (with the batch
    and sequence dims kept apart XLA:CPU transposed activations for the weight gradients), unless the
    sequence is split over the mesh: then flattening would move activations between devices."""
    b, s, k = x.shape
    if mesh is not None and mesh.shape["sequence"] > 1:
        return jnp.tensordot(x, w, axes=1, preferred_element_type=out_dtype)
    out = jnp.dot(x.reshape(b * s, k), w.reshape(k, -1), preferred_element_type=out_dtype)
    return out.reshape(b, s, *w.shape[1:])


# Up to this many rows, packed matmuls run as ``w_t @ rows.T`` (see _project_t).
FEW_ROWS = 64


def _project_t(x: jax.Array, w_t: jax.Array, out_dtype=None) -> jax.Array:
    """``x [B, S, K]`` times an output-major weight ``w_t [N, K]`` -> ``[B, S, N]`` (the packed decode form).

    For 2..FEW_ROWS rows (batched decode) the weight is the left operand and the small ``[N, rows]``
    result is transposed after: XLA:CPU's GEMM then streams the weight 1.5-1.8x faster than with the
    rows on the left (BENCHMARKS.md, "Engine on CPU"). The barrier keeps XLA from folding the transpose
    back into the dot, which would restore the slow form.

    Up to FEW_ROWS rows with 16-bit weights are a float32 multiply-and-sum over the weight as stored:
    XLA:CPU has no 16-bit dot, and for one it hoisted a float32 copy of every weight out of the decode
    loop (twice the model's bytes in temporaries, and twice the bytes streamed per step). The barrier
    keeps the conversion inside the step's fusion. More rows (prefill) with 16-bit weights multiply
    copies made by :func:`_float32_when_used`."""
    b, s, k = x.shape
    rows = x.reshape(b * s, k)
    contract = (((1,), (1,)), ((), ()))
    if b * s <= FEW_ROWS and jnp.dtype(w_t.dtype).itemsize < 4:
        w_t, rows = jax.lax.optimization_barrier((w_t, rows))
        if b * s == 1:
            out = jnp.sum(w_t.astype(jnp.float32) * rows.astype(jnp.float32), axis=-1)[None]
        else:  # [N, rows, K] -> [N, rows]: each weight row is read once, for all the rows
            out = jnp.sum(w_t.astype(jnp.float32)[:, None, :] * rows.astype(jnp.float32)[None], axis=-1).T
        out = out.astype(out_dtype or jnp.result_type(x.dtype, w_t.dtype))
    elif 1 < b * s <= FEW_ROWS:
        out = jax.lax.optimization_barrier(jax.lax.dot_general(w_t, rows, contract, preferred_element_type=out_dtype)).T
    elif jnp.dtype(w_t.dtype).itemsize == 2 and platform_of(None) == "cpu":  # packed: one device, no mesh
        out = jax.lax.dot_general(rows.astype(jnp.float32), _float32_when_used(w_t, rows), contract)
        out = out.astype(out_dtype or jnp.result_type(x.dtype, w_t.dtype))
    else:
        out = jax.lax.dot_general(rows, w_t, contract, preferred_element_type=out_dtype)
    return out.reshape(b, s, -1)


class RMSNorm(nnx.Module):
    """``weight * (x / sqrt(mean(x^2) + eps))`` with the statistics in float32, as the reference."""

    def __init__(self, dim: int, eps: float, make: ParamFactory, stack: tuple[int, ...] = ()):
        self.eps = eps
        self.weight = make(stack + (dim,), ("layers",) * len(stack) + ("vector",), init="ones")

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + jnp.float32(self.eps))
        return _cast(self.weight, x.dtype) * y.astype(x.dtype)


class Attention(nnx.Module):
    """GQA self-attention: projections per head, rope on q and k, dense attention, output projection."""

    def __init__(self, cfg: InternLM2Config, make: ParamFactory, stack: tuple[int, ...] = (), packed: bool = False):
        h, nh, nkv, d = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.heads, self.packed, self.use_bias = (nh, nkv, d), packed, cfg.applies_attention_bias
        if packed:  # the decode form (see InternLM2.decode_weights): one device, no stack, no mesh
            self.wqkv = make(((nh + 2 * nkv) * d, h), (None, "embed"))  # the fused q|k|v rows are never split
            self.wo = make((h, nh * d), ("embed", "q_heads"))
            if cfg.bias:
                self.bqkv = make(((nh + 2 * nkv) * d,), (None,), init="zeros")
                self.bo = make((h,), ("vector",), init="zeros")
            return
        lay = ("layers",) * len(stack)
        self.wq = make(stack + (h, nh, d), lay + ("embed", "q_heads", "head_dim"))
        self.wk = make(stack + (h, nkv, d), lay + ("embed", "kv_heads", "head_dim"))
        self.wv = make(stack + (h, nkv, d), lay + ("embed", "kv_heads", "head_dim"))
        self.wo = make(stack + (nh, d, h), lay + ("q_heads", "head_dim", "embed"))
        if cfg.bias:
            self.bq = make(stack + (nh, d), lay + ("q_heads", "head_dim"), init="zeros")
            self.bk = make(stack + (nkv, d), lay + ("kv_heads", "head_dim"), init="zeros")
            self.bv = make(stack + (nkv, d), lay + ("kv_heads", "head_dim"), init="zeros")
            self.bo = make(stack + (h,), lay + ("vector",), init="zeros")

    def project_qkv(self, x, cos, sin, mesh):
        """q, k, v ``[B, S, heads, D]`` with rope applied to q and k (k is what a cache stores)."""
        dt = x.dtype
        if self.packed:
            nh, nkv, d = self.heads
            qkv = _project_t(x, _cast(self.wqkv, dt))
            if self.use_bias:
                qkv = qkv + _cast(self.bqkv, dt)
            qkv = qkv.reshape(*x.shape[:2], nh + 2 * nkv, d)
            q, k, v = qkv[:, :, :nh], qkv[:, :, nh:nh + nkv], qkv[:, :, nh + nkv:]
        else:
            q, k, v = (_project(x, _cast(w, dt), mesh) for w in (self.wq, self.wk, self.wv))
            if self.use_bias:
                q, k, v = q + _cast(self.bq, dt), k + _cast(self.bk, dt), v + _cast(self.bv, dt)
        q = constrain(apply_rope(q, cos, sin), ("batch", "seq", "act_heads", "head_dim"), mesh)
        k = constrain(apply_rope(k, cos, sin), ("batch", "seq", "act_kv_heads", "head_dim"), mesh)
        v = constrain(v, ("batch", "seq", "act_kv_heads", "head_dim"), mesh)
        return q, k, v

    def project_out(self, o, mesh):
        # one [nH * D, H] matmul: contracting (n, d) of [nH, D, H] as written made XLA:CPU transpose wo
        b, s, nh, d = o.shape
        if self.packed:
            y = _project_t(o.reshape(b, s, nh * d), _cast(self.wo, o.dtype))
        else:
            y = _project(o.reshape(b, s, nh * d), _cast(self.wo, o.dtype).reshape(nh * d, -1), mesh)
        if self.use_bias:
            y = y + _cast(self.bo, o.dtype)
        return constrain(y, ("batch", "seq", "act_embed"), mesh)

    def __call__(self, x, cos, sin, attend, mesh=None):
        """Returns ``(out, aux)``. ``attend(q, k, v) -> (o, aux)`` is the attention strategy (dense,
        cached, ring, sharded decode); a bool mask ``[B, S, S]`` instead means dense attention."""
        q, k, v = self.project_qkv(x, cos, sin, mesh)
        if not callable(attend):
            o, aux = dense_attention(q, k, v, attend), None
        else:
            o, aux = attend(q, k, v)
        return self.project_out(o, mesh), aux


class MLP(nnx.Module):
    """``w2(silu(w1 x) * w3 x)``, never biased."""

    def __init__(self, cfg: InternLM2Config, make: ParamFactory, stack: tuple[int, ...] = (), packed: bool = False):
        h, i = cfg.hidden_size, cfg.intermediate_size
        self.packed = packed
        if packed:  # the decode form: [w1; w3] output-major, w2 output-major
            self.w13 = make((2 * i, h), ("mlp", "embed"))
            self.w2 = make((h, i), ("embed", "mlp"))
            return
        lay = ("layers",) * len(stack)
        self.w1 = make(stack + (h, i), lay + ("embed", "mlp"))
        self.w3 = make(stack + (h, i), lay + ("embed", "mlp"))
        self.w2 = make(stack + (i, h), lay + ("mlp", "embed"))

    def __call__(self, x, mesh=None):
        dt = x.dtype
        if self.packed:
            gate, up = jnp.split(_project_t(x, _cast(self.w13, dt)), 2, axis=-1)
            return _project_t(jax.nn.silu(gate) * up, _cast(self.w2, dt))
        gate, up = _project(x, _cast(self.w1, dt), mesh), _project(x, _cast(self.w3, dt), mesh)
        hidden = constrain(jax.nn.silu(gate) * up, ("batch", "seq", "act_mlp"), mesh)
        return constrain(_project(hidden, _cast(self.w2, dt), mesh), ("batch", "seq", "act_embed"), mesh)


class DecoderLayer(nnx.Module):
    """Pre-norm block: ``h + attn(norm(h))`` then ``h + mlp(norm(h))``."""

    def __init__(self, cfg: InternLM2Config, make: ParamFactory, stack: tuple[int, ...] = (), packed: bool = False):
        self.attention_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, make, stack)
        self.attention = Attention(cfg, make, stack, packed)
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, make, stack)
        self.feed_forward = MLP(cfg, make, stack, packed)

    def __call__(self, x, cos, sin, attend, mesh=None):
        """Returns ``(x, aux)``; ``attend`` as in :meth:`Attention.__call__`."""
        with jax.named_scope("attention"):
            attn, aux = self.attention(self.attention_norm(x), cos, sin, attend, mesh)
            x = x + attn
        with jax.named_scope("mlp"):
            x = x + self.feed_forward(self.ffn_norm(x), mesh)
        return x, aux


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DecodeWeights:
    """Each decoder layer's weights as arrays of its own, for the unrolled decode and prefill programs
    (made once per generator by :meth:`InternLM2.decode_weights`; on CPU any slice of the stacked
    arrays is copied before its matmul, so reading these instead saves a copy of every weight per step).

    ``packed``: the layers are in the packed decode form (module docstring) and ``head`` is the output
    layer as ``[V, H]`` (None when tied: the embedding table already is); otherwise each layer is a
    plain row of the stacked parameters, in its sharding, and ``head`` is None."""

    layers: tuple
    head: jax.Array | None
    packed: bool = dataclasses.field(default=False, metadata=dict(static=True))

    def replace(self, **changes) -> "DecodeWeights":
        return dataclasses.replace(self, **changes)


class InternLM2(nnx.Module):
    """The InternLM2 / InternLM2.5 causal LM.

    ``InternLM2(config, mesh=mesh, seed=0)`` initialises randomly, each parameter created directly
    in its sharding over ``mesh``; :meth:`from_pretrained` loads a checkpoint. ``dtype`` is the
    compute dtype, ``param_dtype`` the storage dtype (default: ``dtype``, itself default float32).
    Calling the model runs a jit-compiled forward and returns float32 logits ``[B, S, V]``.
    """

    def __init__(self, config: InternLM2Config, *, mesh: Mesh | None = None, dtype: DTypeLike = None,
                 param_dtype: DTypeLike = None, seed: int = 0, rngs: nnx.Rngs | None = None,
                 abstract: bool = False):
        if not isinstance(config, InternLM2Config):
            raise TypeError(f"InternLM2 takes an InternLM2Config, got {type(config).__name__} {config!r:.60}: use "
                            "InternLM2Config.preset(name) for a released shape, or InternLM2.from_pretrained(folder)")
        if mesh is not None and not isinstance(mesh, Mesh):
            raise TypeError(f"mesh must be a jax.sharding.Mesh (ij.make_mesh(tensor=2, ...)), got "
                            f"{type(mesh).__name__}")
        self.config = config
        self.mesh = mesh
        self.dtype = canonical_dtype(dtype or jnp.float32)
        self.param_dtype = canonical_dtype(param_dtype or self.dtype)
        # how it runs (attention kernels, decode weights, remat, ...): a frozen, validated object;
        # change it with model.configure(...)
        self.settings = EngineSettings()
        if abstract:
            rngs = None
        elif rngs is None:
            rngs = nnx.Rngs(seed)
        make = ParamFactory(config, mesh, self.param_dtype, rngs)
        cfg = config
        self.tok_embeddings = make((cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"))
        self.layers = DecoderLayer(cfg, make, stack=(cfg.num_hidden_layers,))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, make)
        if not cfg.tie_word_embeddings:
            self.output = make((cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"))

    # --- loading --------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, mesh: Mesh | None = None, dtype: DTypeLike = None,
                        param_dtype: DTypeLike = None, progress: bool | None = None,
                        verify: bool = False) -> "InternLM2":
        """Load a checkpoint folder into the shardings of ``mesh``.

        An HF folder (``model.safetensors``, sharded safetensors with an index, or
        ``pytorch_model*.bin``, read without executing pickled code) is read tensor by tensor;
        ``dtype`` defaults to float32. An Orbax folder written by :meth:`save` or the converter is
        restored with each process reading only its shards; ``dtype`` defaults to the saved one, and
        ``verify`` re-checks each array against its recorded sha256 (a host copy of each: slower).
        """
        config = InternLM2Config.from_pretrained(path)
        if checkpoint.is_orbax_checkpoint(path):
            saved = checkpoint.saved_dtype(path)
            model = cls.abstract(config, mesh=mesh, dtype=dtype or saved, param_dtype=param_dtype or dtype or saved)
            checkpoint.restore_params(model, path, progress=progress, verify=verify)
        else:
            refs = hf_checkpoint.open_hf_tensors(path)
            model = cls.abstract(config, mesh=mesh, dtype=dtype, param_dtype=param_dtype)
            hf_checkpoint.load_params(model, refs, where=str(path), progress=progress)
        return model

    @classmethod
    def abstract(cls, config: InternLM2Config, *, mesh: Mesh | None = None, dtype: DTypeLike = None,
                 param_dtype: DTypeLike = None) -> "InternLM2":
        """A model whose parameters are ``ShapeDtypeStruct`` s carrying their target shardings."""
        return cls(config, mesh=mesh, dtype=dtype, param_dtype=param_dtype, abstract=True)

    def configure(self, **changes) -> "InternLM2":
        """Change engine settings (see :class:`~internlm_jax.settings.EngineSettings`), validated; e.g.
        ``model.configure(attention="splash", decode_attention="ragged")``. Returns the model."""
        self.settings = self.settings.replace(**changes)
        return self

    def save(self, folder: str | os.PathLike, **kwargs) -> "os.PathLike":
        """Write an Orbax checkpoint folder (see :mod:`internlm_jax.checkpoint`); restore with from_pretrained."""
        return checkpoint.save_checkpoint(self, folder, **kwargs)

    def save_pretrained(self, folder: str | os.PathLike, **kwargs) -> "os.PathLike":
        """Write an HF InternLM2 folder (see :func:`internlm_jax.hf_checkpoint.save_hf_checkpoint`). On a mesh
        spanning several hosts call it from every process: all gather, process 0 alone writes."""
        return hf_checkpoint.save_hf_checkpoint(self, folder, **kwargs)

    def num_parameters(self) -> int:
        """How many parameters the model holds (the released 7B: 7,737,708,544)."""
        return sum(int(np.prod(p.get_value().shape)) for p in flat_params(self).values())

    # --- forward --------------------------------------------------------------------------
    def __call__(self, input_ids, *, positions=None, attention_mask=None, segment_ids=None,
                 output_hidden_states: bool = False):
        """Logits ``[B, S, V]`` (float32) for token ids ``[B, S]``.

        positions: ``[B, S]`` int, default ``arange(S)`` per row (as the reference forward; pass
        ``cumsum(mask) - 1`` for left-padded batches). attention_mask: ``[B, S]`` 1 = token, 0 = padding
        key. With ``output_hidden_states`` returns ``(logits, hidden_states)`` where hidden_states is
        ``[L + 1, B, S, H]`` following HF: the embeddings, the outputs of layers 1..L-1, and the
        final-norm output of the last layer.
        """
        if not _is_traced(input_ids):
            input_ids = _check_ids(input_ids, self.config.vocab_size)
            positions = _check_per_token("positions", positions, input_ids.shape)
            attention_mask = _check_per_token("attention_mask", attention_mask, input_ids.shape)
            segment_ids = _check_per_token("segment_ids", segment_ids, input_ids.shape)
            graphdef, state = nnx.split(self)
            program = _forward_program(tuple(self.scan_compiler_options().items()))
            return program(graphdef, state, input_ids, positions, attention_mask, output_hidden_states, segment_ids)
        return self.forward(input_ids, positions=positions, attention_mask=attention_mask, segment_ids=segment_ids,
                            output_hidden_states=output_hidden_states)

    def embed(self, input_ids: jax.Array, differentiable: bool = True) -> jax.Array:
        """Embedding rows for ``input_ids``. The inference paths pass ``differentiable=False``: on CPU a
        16-bit table is then gathered as integers, because for a float gather XLA:CPU converts the whole
        table to float32 first (a vocab x hidden float32 temporary on every call)."""
        table, input_ids = self.tok_embeddings[...], jnp.asarray(input_ids)
        if differentiable or jnp.dtype(table.dtype).itemsize != 2 or platform_of(self.mesh) != "cpu":
            x = jnp.take(table, input_ids, axis=0)
        else:  # out-of-range ids read 0xFFFF, a NaN, as the float gather's fill; the barrier (with the
            # ids, which change every step) keeps XLA from hoisting an integer copy of the table out of a loop
            table, input_ids = jax.lax.optimization_barrier((table, input_ids))
            bits = jnp.take(jax.lax.bitcast_convert_type(table, jnp.uint16), input_ids, axis=0)
            x = jax.lax.bitcast_convert_type(bits, table.dtype)
        return constrain(x.astype(self.dtype), ("batch", "seq", "act_embed"), self.mesh)

    def head_weight(self) -> jax.Array:
        """The output layer's weight ``[H, V]`` (the embedding's transpose when tied), as stored."""
        return self.tok_embeddings[...].T if self.config.tie_word_embeddings else self.output[...]

    def logits(self, h: jax.Array, weights: DecodeWeights | None = None) -> jax.Array:
        """float32 logits from final hidden states (already normed); with packed ``weights`` the
        output layer is read output-major (their ``head``, or the tied embedding table)."""
        if weights is not None and weights.packed:
            head_t = self.tok_embeddings[...] if weights.head is None else weights.head
            return _project_t(h, head_t.astype(h.dtype), jnp.float32)
        out = _project(h, self.head_weight().astype(h.dtype), self.mesh, jnp.float32)
        return constrain(out, ("batch", "seq", "act_vocab"), self.mesh)

    def decode_weights(self, packed: bool) -> DecodeWeights:
        """Every layer's weights as arrays of their own (traceable: jit it once, keep the result).
        ``packed`` (one device, no mesh): in the packed decode form, with the output layer ``[V, H]``."""
        cfg, n = self.config, self.config.num_hidden_layers
        stacked = nnx.state(self.layers)
        rows = [jax.tree.map(lambda p, i=i: p[i], stacked) for i in range(n)]
        if not packed:
            return DecodeWeights(tuple(rows), None, False)
        h = cfg.hidden_size
        out = []
        for row in rows:
            p = nnx.to_pure_dict(row)
            a, f = p["attention"], p["feed_forward"]
            attention = {"wqkv": jnp.concatenate([a[w].reshape(h, -1) for w in ("wq", "wk", "wv")], axis=1).T,
                         "wo": a["wo"].reshape(-1, h).T}
            if cfg.bias:
                attention["bqkv"] = jnp.concatenate([a[b].reshape(-1) for b in ("bq", "bk", "bv")])
                attention["bo"] = a["bo"]
            state = nnx.state(self._packed_layer())
            nnx.replace_by_pure_dict(state, {
                "attention_norm": p["attention_norm"], "ffn_norm": p["ffn_norm"], "attention": attention,
                "feed_forward": {"w13": jnp.concatenate([f["w1"], f["w3"]], axis=1).T, "w2": f["w2"].T}})
            out.append(state)
        head = None if cfg.tie_word_embeddings else self.output[...].T
        return DecodeWeights(tuple(out), head, True)

    def _packed_layer(self) -> DecoderLayer:
        """An abstract decoder layer in the packed decode form (its graph definition and state template)."""
        return DecoderLayer(self.config, ParamFactory(self.config, None, self.param_dtype, None), packed=True)

    def unrolled_layers(self, weights: DecodeWeights | None) -> list[DecoderLayer]:
        """The decoder layers as one module per layer, for unrolled programs: over ``weights``' own
        arrays, or static slices of the stacked parameters when None."""
        if weights is None:
            weights = DecodeWeights(tuple(jax.tree.map(lambda p, i=i: p[i], nnx.state(self.layers))
                                          for i in range(self.config.num_hidden_layers)), None)
        layer_def = nnx.graphdef(self._packed_layer() if weights.packed else self.layers)
        return [nnx.merge(layer_def, state) for state in weights.layers]

    def scan_compiler_options(self) -> dict:
        """Compiler options for a program that scans this model's stacked layers (``model(ids)``, the
        training and eval steps). XLA:CPU multiplies 16-bit values as float32, and its while-loop
        invariant code motion hoists each stacked weight's conversion out of the layer scan: a float32
        copy of every layer, all live at once (a bf16 forward of the 325M bench model at 128 tokens:
        548 MiB of temporaries, 33 MiB without the pass; BENCHMARKS.md). On CPU with 16-bit weights or
        compute such programs compile without that pass; elsewhere there are no options."""
        half = any(jnp.dtype(d).itemsize == 2 for d in (self.dtype, self.param_dtype))
        if platform_of(self.mesh) == "cpu" and half:
            return {"xla_disable_hlo_passes": "while-loop-invariant-code-motion"}
        return {}

    def run_layers(self, x, cos, sin, attend, collect: bool = False):
        """Scan the stacked decoder layers over ``x`` (one compiled layer body for every depth).

        ``attend(q, k, v) -> (o, aux)`` is the attention strategy; each layer's ``aux`` is stacked on
        a leading layer axis (e.g. the keys/values a prefill puts in the cache). Returns
        ``(x, per-layer outputs or None, stacked aux)``.
        """
        layer_def, layer_state = nnx.split(self.layers)
        mesh = self.mesh

        def body(h, state):
            layer = nnx.merge(layer_def, state)
            h, aux = layer(h, cos, sin, attend, mesh)
            h = constrain(h, ("batch", "seq", "act_embed"), mesh)
            return h, (h if collect else None, aux)

        remat = self.settings.remat
        if remat != "none":
            policies = {"full": None, "dots": jax.checkpoint_policies.checkpoint_dots,
                        "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}
            body = jax.checkpoint(body, policy=policies[remat], prevent_cse=False)
        x, (per_layer, aux) = jax.lax.scan(body, x, layer_state)
        return x, per_layer, aux

    @property
    def sequence_parallel(self) -> int:
        """Size of the mesh's ``sequence`` axis (1 = attention is not split over the sequence)."""
        return 1 if self.mesh is None else self.mesh.shape["sequence"]

    def prefill_plan(self, length: int, segments: bool = False, key_mask: bool = False):
        """Which attention a forward/prefill of ``length`` tokens takes
        (:func:`internlm_jax.attention.prefill_plan`)."""
        return prefill_plan(self.settings, length=length, mesh=self.mesh, dtype=self.dtype, segments=segments,
                            key_mask=key_mask)

    def uses_blockwise(self, length: int) -> bool:
        """Whether ``length`` tokens take the ring layout (a sequence axis, or a long input on a mesh)."""
        return self.prefill_plan(length).path == "ring"

    def decode_attention(self, cache_len: int) -> str:
        """"ragged" or "dense": how decode steps over a cache of ``cache_len`` slots attend."""
        return decode_plan(self.settings, head_dim=self.config.head_dim,
                           local_cache_len=cache_len // self.sequence_parallel, mesh=self.mesh)

    def attention_for(self, plan, index, ok, q_start=None, length=None):
        """``attend(q, k, v) -> o`` along ``plan`` for a laid-out sequence: ``index [B, S]`` each token's
        causal index, ``ok [B, S]`` the real tokens, ``q_start`` where each token's packed document starts;
        ``length`` (the sequence before any padding the layout adds): queries that see no key get the
        reference's output for them (see :func:`_blind_rows_as_reference`)."""
        mesh, block = self.mesh, self.settings.block
        if plan.path in ("ring", "blockwise"):
            if plan.path == "ring":
                from .ring import ring_attention

                def attend(q, k, v):
                    return ring_attention(q, k, v, index, index, ok, mesh, impl=plan.kernel, q_start=q_start,
                                          block=block)
            else:
                def attend(q, k, v):
                    return blockwise_attention(q, k, v, ok, block=block, impl=plan.kernel, q_start=q_start)
            if length is None or q_start is not None:
                return attend
            return _blind_rows_as_reference(attend, index, ok, length)
        if plan.path == "fused":  # right-padded rows: each row's real tokens come first
            lengths = jnp.sum(ok, axis=1, dtype=jnp.int32)
            return lambda q, k, v: fused_attention(q, k, v, lengths, implementation=plan.kernel)  # noqa: E731
        mask = visible_mask(index, q_start, index, ok, causal=True)
        return lambda q, k, v: dense_attention(q, k, v, mask)  # noqa: E731

    def forward(self, input_ids, *, positions=None, attention_mask=None, segment_ids=None,
                output_hidden_states=False):
        """The traceable forward (no jit of its own): use inside your own jitted functions.

        ``segment_ids [B, S]`` (packed training sequences): tokens attend only within their own
        contiguous segment, and positions restart at 0 in each segment unless given.
        With a ``sequence`` mesh axis larger than 1 (or, on a mesh, more than ``blockwise_from`` tokens),
        attention is blockwise ring attention: the tokens are padded (:func:`ring.padded_length`) and
        laid out zigzag, and the results are put back in order.
        """
        x, emb, per_layer = self._trunk(jnp.asarray(input_ids), positions, attention_mask, segment_ids,
                                        output_hidden_states)
        logits = self.logits(x)
        if not output_hidden_states:
            return logits
        hidden = jnp.concatenate([emb[None], per_layer[:-1], x[None]], axis=0)
        return logits, hidden

    def final_hidden(self, input_ids, *, positions=None, attention_mask=None, segment_ids=None):
        """The final-norm output ``[B, S, H]`` that :meth:`logits` turns into logits (arguments as
        :meth:`forward`); the training loss takes it from here without building the logits whole."""
        return self._trunk(input_ids, positions, attention_mask, segment_ids, False)[0]

    def _trunk(self, input_ids, positions, attention_mask, segment_ids, collect):
        """(final-norm output, embeddings, per-layer outputs or None), in token order."""
        b, s = input_ids.shape
        idx = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
        start = None
        if segment_ids is not None:
            seg = jnp.asarray(segment_ids)
            boundary = jnp.concatenate([jnp.ones((b, 1), bool), seg[:, 1:] != seg[:, :-1]], axis=1)
            start = jax.lax.cummax(jnp.where(boundary, idx, 0), axis=1)
            if positions is None:
                positions = idx - start
        if positions is None:
            positions = idx
        positions = jnp.asarray(positions, jnp.int32)
        valid = jnp.ones((b, s), bool) if attention_mask is None else jnp.asarray(attention_mask).astype(bool)
        seq_len = jnp.max(positions) + 1  # dynamic NTK: the global length, before any padding
        n = self.sequence_parallel
        plan = self.prefill_plan(s, segments=start is not None, key_mask=attention_mask is not None)
        index, ids_p, pos_p, ok_p, start_p = idx, input_ids, positions, valid, start
        order = None
        if plan.path in ("ring", "blockwise"):  # pad (the ring: and lay out zigzag); put back below
            from .ring import padded_length, zigzag_order

            block = self.settings.block
            padded = padded_length(s, n, block) if plan.path == "ring" else -(-s // block) * block
            order = zigzag_order(padded, n) if plan.path == "ring" and n > 1 else None
            pad = ((0, 0), (0, padded - s))
            index = jnp.broadcast_to(jnp.arange(padded, dtype=jnp.int32), (b, padded))
            ids_p, pos_p, ok_p = jnp.pad(input_ids, pad), jnp.pad(positions, pad), jnp.pad(valid, pad)
            start_p = None if start is None else jnp.pad(start, pad)
            if order is not None:
                index, ids_p, pos_p, ok_p = index[:, order], ids_p[:, order], pos_p[:, order], ok_p[:, order]
                start_p = None if start_p is None else start_p[:, order]
        attention = self.attention_for(plan, index, ok_p, start_p, length=s)

        def attend(q, k, v):
            return attention(q, k, v), None

        cos, sin = rope_tables(self.config, pos_p, self.dtype, seq_len=seq_len)
        emb = self.embed(ids_p)
        x, per_layer, _ = self.run_layers(emb, cos, sin, attend, collect=collect)
        x = self.norm(x)
        if plan.path in ("ring", "blockwise"):  # back to token order, padding dropped
            back = slice(0, s) if order is None else np.argsort(order)[:s]
            x = constrain(x[:, back], ("batch", "seq", "act_embed"), self.mesh)
            if collect:
                emb, per_layer = emb[:, back], per_layer[:, :, back]
        return x, emb, per_layer

    def prefill_kv(self, input_ids, positions, mask, index, layers=None):
        """A prompt laid out for its attention path (``index`` [B, S]: each token's causal index; zigzag
        order under the ring path; rows right-padded under the fused path): returns the final hidden
        states ``[B, S, H]`` (before the final norm) and every layer's keys and values
        (``[L, B, S, nKV, D]``, or per layer when ``layers``, a :class:`DecodeWeights`, is given: the
        layers then run unrolled and read those in place)."""
        ok = jnp.asarray(mask).astype(bool)
        attention = self.attention_for(self.prefill_plan(input_ids.shape[1]), index, ok)

        def attend(q, k, v):
            return attention(q, k, v), (k, v)

        cos, sin = rope_tables(self.config, positions, self.dtype)  # max(positions) + 1 over all shards
        x = self.embed(input_ids, differentiable=False)
        if layers is None:
            x, _, (keys, values) = self.run_layers(x, cos, sin, attend)
            return x, keys, values
        keys, values = [], []
        for i, layer in enumerate(self.unrolled_layers(layers)):
            with jax.named_scope(f"layer_{i}"):
                x, (k, v) = layer(x, cos, sin, attend, self.mesh)
            keys.append(k)
            values.append(v)
        return x, keys, values

    def forward_decode(self, tokens, positions, cache: KVCache, slot, *, owner=None, layers=None):
        """One new token per sequence (``tokens``, ``positions`` [B]) against ``cache``: its keys and
        values are written at ``slot`` (with a ``sequence`` axis: local slot ``slot`` of shard ``owner``),
        in place when the cache is donated, and attention reads each layer's buffer where it lies.
        ``slot`` is one slot for every sequence, or ``[B]`` slots (continuous batching: each sequence
        writes its own next slot; a slot past the cache writes nothing, which is how idle rows stay put).
        Layers run unrolled: ``layers`` (:class:`DecodeWeights`) or static slices of the stacked ones.
        Returns float32 logits ``[B, V]`` and the updated cache."""
        b = tokens.shape[0]
        mesh, nh = self.mesh, self.config.num_attention_heads
        ones = jnp.ones((b, 1), bool)
        per_row = owner is None and jnp.ndim(slot) == 1
        # per-row writes are vmapped scatters: the batch is a batching dim of the scatter, which a mesh
        # that splits the batch applies locally (an index array over the batch gathered every row's update)
        if per_row:
            valid = jax.vmap(lambda v, s: v.at[s].set(True, mode="drop"))(cache.valid, slot)
        elif owner is None:
            valid = jax.lax.dynamic_update_slice_in_dim(cache.valid, ones, slot, axis=1)
        else:
            valid = write_decode(cache.valid, ones, owner, slot, mesh)
        kind = self.decode_attention(cache.length)

        def write(buf, new):
            new = to_slots(new, mesh).astype(buf.dtype)  # one slot, in the buffer's layout
            if per_row:
                rows = new.shape[0] if buf.ndim == 3 else b
                cols = jnp.repeat(slot, rows // b)
                if buf.ndim == 3:
                    return buf.at[jnp.arange(rows), cols].set(new[:, 0], mode="drop")
                return jax.vmap(lambda r, n, s: r.at[:, s].set(n[:, 0], mode="drop"))(buf, new, slot)
            if owner is None:
                return jax.lax.dynamic_update_slice_in_dim(buf, new, slot, axis=buf.ndim + SLOT_AXIS)
            return write_decode(buf, new, owner, slot, mesh, nh)

        def attention(q, kc, vc):
            if mesh is not None and (owner is not None or kind == "ragged"):
                return sharded_decode_attention(q, kc, vc, valid, mesh, impl=kind)
            if kind == "ragged":
                from .decode_kernel import ragged_decode

                nkv = self.config.num_key_value_heads
                return ragged_decode(q, heads_view(kc, nkv), heads_view(vc, nkv), valid,
                                     platform=jax.default_backend())[0].astype(q.dtype)
            return cached_attention(q, kc, vc, valid)

        x = self.embed(tokens[:, None], differentiable=False)
        # per-row slots are independent requests: under dynamic NTK each row's base follows its own
        # position, as the request alone would have it; a static batch shares the longest row's
        cos, sin = rope_tables(self.config, positions[:, None], self.dtype,
                               seq_len=positions[:, None] + 1 if per_row else None)
        keys, values = list(cache.keys), list(cache.values)
        for i, layer in enumerate(self.unrolled_layers(layers)):
            def attend(q, k, v, i=i):
                kc, vc = write(keys[i], k), write(values[i], v)
                return attention(q, kc, vc), (kc, vc)

            with jax.named_scope(f"layer_{i}"):
                x, (keys[i], values[i]) = layer(x, cos, sin, attend, mesh)
        logits = self.logits(self.norm(x), layers)[:, 0]
        return logits, KVCache(tuple(keys), tuple(values), valid)


    def forward_extend(self, tokens, positions, cache: KVCache, row, start, count, seq_len, *, layers=None,
                       every: bool = False, keys: int | None = None):
        """Chunked prefill: ``C`` prompt tokens of one cache row (``tokens``, ``positions`` ``[C]``; the
        first ``count`` are real) are written at slots ``start .. start + C`` of row ``row`` and attend
        to that row's valid slots and to each other causally. ``seq_len`` is the whole prompt's length
        (the dynamic NTK base, as a one-shot prefill would compute it). Returns the float32 logits of
        the last real token ``[V]`` (with ``every``: of all ``C`` tokens, ``[C, V]``, for prompt
        logprobs) and the updated cache. Unrolled over layers like decode. ``keys`` (static, at least
        ``start + C``) limits attention to the row's first ``keys`` slots, the only ones these tokens can
        see: a chunk's cost then follows the prompt so far, not the row's length."""
        c = tokens.shape[0]
        mesh, nkv = self.mesh, self.config.num_key_value_heads
        real = jnp.arange(c) < count
        cols = start + jnp.arange(c)
        t = cache.length
        row_valid = read_row_valid(cache.valid, row)
        row_valid = jnp.where(start == 0, False, row_valid)  # a new sequence: the row's old slots are gone
        row_valid = row_valid.at[cols].set(real, mode="drop")
        valid = jax.lax.dynamic_update_index_in_dim(cache.valid, row_valid, row, 0)
        span = t if keys is None else min(keys, t)

        def write_and_read(buf, new):
            """Write [C, nKV, D] into the row's slots; return (buffer, the row's first ``span`` slots
            as [1, nKV, span, D])."""
            new = new.astype(buf.dtype)
            if buf.ndim == 3:  # [B * nKV, T, D]
                rows = row * nkv + jnp.arange(nkv)
                buf = buf.at[rows[:, None], cols[None, :]].set(new.transpose(1, 0, 2), mode="drop")
                mine = jax.lax.dynamic_slice_in_dim(buf, row * nkv, nkv, axis=0)[:, :span]  # [nKV, span, D]
            else:  # [B, nKV, T, D]
                buf = buf.at[row, :, cols].set(new, mode="drop")  # local to the row's device
                mine = read_row(buf, row, span, mesh)
            return buf, mine[None]

        x = self.embed(tokens[None], differentiable=False)
        cos, sin = rope_tables(self.config, positions[None], self.dtype, seq_len=seq_len)
        keys, values = list(cache.keys), list(cache.values)
        # the selector's rule: [C, span] scores while span is short, key blocks beyond
        dense = self.prefill_plan(span, key_mask=True).path == "dense"
        for i, layer in enumerate(self.unrolled_layers(layers)):
            def attend(q, k, v, i=i):
                kc, k_row = write_and_read(keys[i], k[0])
                vc, v_row = write_and_read(values[i], v[0])
                b, _, nh, d = q.shape  # the row is read where it lies: head-major, no transpose
                qh = q.reshape(b, c, nkv, nh // nkv, d).transpose(0, 2, 3, 1, 4)
                o = row_chunk_attention(qh, k_row.astype(q.dtype), v_row.astype(q.dtype), cols, row_valid[:span],
                                        block=None if dense else self.settings.block)
                return o.transpose(0, 3, 1, 2, 4).reshape(b, c, nh, d), (kc, vc)

            with jax.named_scope(f"layer_{i}"):
                x, (keys[i], values[i]) = layer(x, cos, sin, attend, mesh)
        if every:
            logits = self.logits(self.norm(x), layers)[0]
        else:
            last = jax.lax.dynamic_index_in_dim(x[0], count - 1, 0, keepdims=True)
            logits = self.logits(self.norm(last[None]), layers)[0, 0]
        return logits, KVCache(tuple(keys), tuple(values), valid)


def _blind_rows_as_reference(attend, index, ok, length: int):
    """``attend`` with the reference's output for queries that see no key (those before a row's first
    real token: left padding). The reference's additive mask gives them a uniform distribution over all
    ``length`` keys, so their output is the mean of those values, as dense attention computes it; the
    online softmax alone would give zeros. Padding the layout added (``index >= length``) is left out."""
    first = jnp.min(jnp.where(ok, index, jnp.iinfo(jnp.int32).max), axis=1, keepdims=True)
    blind = index < first  # [B, S]
    weights = (index < length).astype(jnp.float32) / length  # [B, S]

    def with_reference_rows(q, k, v):
        out = attend(q, k, v)
        mean = jnp.einsum("bs,bsnd->bnd", weights, v.astype(jnp.float32))  # [B, nKV, D]
        mean = jnp.repeat(mean, q.shape[2] // v.shape[2], axis=1)[:, None].astype(out.dtype)  # [B, 1, nH, D]
        return jnp.where(blind[:, :, None, None], mean, out)

    return with_reference_rows


def _forward(graphdef, state, input_ids, positions, attention_mask, output_hidden_states, segment_ids=None):
    model = nnx.merge(graphdef, state)
    return model.forward(input_ids, positions=positions, attention_mask=attention_mask, segment_ids=segment_ids,
                         output_hidden_states=output_hidden_states)


@functools.cache
def _forward_program(options: tuple):
    """``model(ids)``'s jitted forward, one per set of compiler options (see scan_compiler_options)."""
    return jax.jit(_forward, static_argnames=("graphdef", "output_hidden_states"),
                   compiler_options=dict(options) or None)


def _is_traced(x) -> bool:
    """True inside jit/grad/vmap tracing (then the caller's transformation compiles the forward)."""
    try:
        from jax.core import Tracer
    except ImportError:  # moved in some JAX versions
        from jax._src.core import Tracer
    return isinstance(x, Tracer)


def _check_per_token(name: str, value, shape: tuple[int, int]):
    """``positions`` / ``attention_mask`` / ``segment_ids``: ``[B, S]`` (positions also ``[1, S]``);
    an attention mask holds 1 for tokens and 0 for padding (an additive mask of 0 / -inf is refused: read
    as booleans it would be the opposite)."""
    if value is None or _is_traced(value):
        return value
    arr = np.asarray(value)
    rows = (1, shape[0]) if name == "positions" else (shape[0],)
    if arr.ndim != 2 or arr.shape[1] != shape[1] or arr.shape[0] not in rows:
        allowed = f" (or [1, {shape[1]}])" if name == "positions" else ""
        raise ValueError(f"{name} must have shape {list(shape)}{allowed} like input_ids, got {list(arr.shape)}")
    if name == "attention_mask" and arr.dtype != bool and not np.isin(arr, (0, 1)).all():
        raise ValueError("attention_mask must hold 1 for tokens and 0 for padding; got other values (an "
                         "additive mask of 0 / -inf? pass (mask == 0) instead)")
    return value if isinstance(value, jax.Array) else jnp.asarray(arr)


def _check_ids(input_ids, vocab_size: int) -> jax.Array:
    if isinstance(input_ids, str) or (isinstance(input_ids, (list, tuple)) and input_ids
                                      and isinstance(input_ids[0], str)):
        raise TypeError("input_ids must be token ids [batch, seq], not text: encode it first, "
                        "e.g. model(jnp.asarray([tok.encode(text)])), or use ij.generate(model, tok, text)")
    arr = np.asarray(input_ids)
    if arr.ndim != 2:
        raise ValueError(f"input_ids must be [batch, seq], got shape {arr.shape}")
    if arr.shape[1] == 0:
        raise ValueError("input_ids is empty (sequence length 0)")
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"input_ids must be integers, got dtype {arr.dtype}")
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 0 or hi >= vocab_size:
        bad = lo if lo < 0 else hi
        raise ValueError(f"token id {bad} is out of range for vocab_size {vocab_size}")
    return input_ids if isinstance(input_ids, jax.Array) else jnp.asarray(arr, jnp.int32)
