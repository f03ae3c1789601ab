"""Engine settings: one frozen, validated object instead of loose strings on the model.

``model.settings`` is an :class:`EngineSettings`; change it with ``model.configure(attention="splash")``
(which validates and replaces it). Being frozen and hashable it is part of the model's NNX graph
definition, so compiled programs keyed on the graph pick up a change. Which kernel each setting
resolves to on a given backend, dtype, length and mesh is decided in one place:
:mod:`internlm_jax.attention` (:func:`~internlm_jax.attention.prefill_plan`,
:func:`~internlm_jax.attention.decode_plan`).
"""

from __future__ import annotations

import dataclasses

PREFILL_ATTENTION = ("auto", "dense", "blockwise", "splash", "xla", "cudnn")
DECODE_ATTENTION = ("auto", "dense", "ragged")
DECODE_WEIGHTS = ("auto", "packed", "per_layer", "sliced")
REMAT = ("none", "full", "dots", "dots_no_batch")


@dataclasses.dataclass(frozen=True)
class EngineSettings:
    """How the model runs; none of these change its results beyond float rounding.

    attention: prefill/forward attention. ``"auto"`` = dense up to ``blockwise_from`` tokens, then
        blockwise online-softmax attention on one device (on GPU in bf16/fp16: one cuDNN flash-attention
        call over the whole sequence instead), ring attention over a ``sequence`` mesh axis;
        ``"dense"`` forces [S, S] scores on one device (short inputs only); ``"blockwise"`` / ``"xla"`` /
        ``"cudnn"`` / ``"splash"`` (Pallas TPU) pick the kernel (on one device ``"cudnn"``, and ``"xla"``
        up to ``blockwise_from``, run as one call over the whole sequence).
    decode_attention: ``"auto"`` (the ragged Pallas kernel on TPU where shapes allow, else dense),
        ``"dense"`` (reads every cache slot) or ``"ragged"`` (reads only blocks holding valid slots:
        the Mosaic kernel on TPU, the Triton kernel on GPU; dense where the shapes do not fit).
    decode_weights: how decode steps (and the generator's prefill) read each layer's weights.
        ``"per_layer"`` keeps one array per layer (made once per generator: a second copy of the layer
        weights, since on CPU any slice of the stacked arrays is copied before its matmul);
        ``"packed"`` (no mesh) does the same in the packed decode form: q/k/v fused, w1/w3 fused and
        every matrix output-major, plus an output-major copy of the output layer (XLA:CPU streams
        such weights faster in small-batch matmuls); ``"sliced"`` slices the stacked arrays statically
        in an unrolled loop (no extra memory; GPU and TPU read such slices in place); ``"auto"`` =
        packed on CPU without a mesh, per_layer on a CPU mesh, sliced elsewhere.
    decode_chunk: decode steps per compiled loop call (stop ids are checked on the host between
        chunks; a fixed trip count keeps the GPU loop free of a host round trip per token).
    huge_pages: on a Linux CPU without a mesh, back the packed decode weights with 2 MiB pages once made
        (:func:`~internlm_jax.arrays.back_with_huge_pages`; a batch-1 decode step streams them about 5%
        faster). Off: ``model.configure(huge_pages=False)``.
    long_prompt_chunk: ``generate`` prefills a prompt longer than this in chunks of this many tokens
        (without a ``sequence`` axis), each written into the KV cache and attending to what is there
        (:meth:`~internlm_jax.model.InternLM2.forward_extend`, key blocks past ``blockwise_from``). The
        activations are then one chunk's whatever the length: a 200K-token prompt needs little beyond
        the weights and its cache. 0: one pass at any length.
    remat: activation checkpointing of each layer in training.
    blockwise_from: inputs longer than this take blockwise attention. block: its block size.
    """

    attention: str = "auto"
    decode_attention: str = "auto"
    decode_weights: str = "auto"
    decode_chunk: int = 16
    huge_pages: bool = True
    long_prompt_chunk: int = 32768
    remat: str = "none"
    blockwise_from: int = 4096
    block: int = 512

    def __post_init__(self):
        for name, allowed in (("attention", PREFILL_ATTENTION), ("decode_attention", DECODE_ATTENTION),
                              ("decode_weights", DECODE_WEIGHTS), ("remat", REMAT)):
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(f"unknown {name} {value!r}; use one of {', '.join(map(repr, allowed))}")
        for name in ("decode_chunk", "blockwise_from", "block"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(self.long_prompt_chunk, int) or isinstance(self.long_prompt_chunk, bool) \
                or self.long_prompt_chunk < 0:
            raise ValueError(f"long_prompt_chunk must be 0 (off) or a positive integer, got {self.long_prompt_chunk!r}")
        if not isinstance(self.huge_pages, bool):
            raise ValueError(f"huge_pages must be True or False, got {self.huge_pages!r}")
        if self.block % 8:
            raise ValueError(f"block must be a multiple of 8, got {self.block}")

    def replace(self, **changes) -> "EngineSettings":
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ValueError(f"unknown engine setting(s) {sorted(unknown)}; "
                             f"known: {[f.name for f in dataclasses.fields(self)]}")
        return dataclasses.replace(self, **changes)


def enable_compilation_cache() -> str | None:
    """Turn on JAX's persistent compilation cache (unrolled 32- and 48-layer decode steps take seconds
    to compile on CPU and took tens of seconds on a GPU; a cache hit takes well under one).
    Directory: ``$INTERNLM_JAX_COMPILE_CACHE``, default ``~/.cache/internlm_jax/xla``; set it to
    ``0`` / ``off`` to leave JAX's setting alone.
    A cache directory already configured for JAX is kept. Returns the directory in use, or None."""
    import os

    import jax

    where = os.environ.get("INTERNLM_JAX_COMPILE_CACHE", "")
    if where.lower() in ("0", "off", "false", "no"):
        return None
    current = jax.config.jax_compilation_cache_dir
    if current:
        return current
    where = where or os.path.join(os.path.expanduser("~"), ".cache", "internlm_jax", "xla")
    try:
        os.makedirs(where, exist_ok=True)
    except OSError:  # read-only home: run without the cache rather than fail
        return None
    jax.config.update("jax_compilation_cache_dir", where)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    return where
