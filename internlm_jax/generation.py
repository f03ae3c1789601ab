"""Generation: a jitted prefill, a jitted decode step, and fixed-size decode chunks (state donated).

The model is split once (``nnx.split``) and every compiled program is a pure function of the
parameter state. Prompts are left-padded to a length bucket (powers of two from 16) so that a new
prompt length rarely recompiles; the KV cache (:class:`internlm_jax.cache.KVCache`) is preallocated
for the prompt and the new tokens. The decode programs do not depend on ``max_new_tokens``: a chunk
of ``decode_chunk`` steps (and the power-of-two chunks of a remainder) is compiled once per cache
length and batch and reused.

Positions follow the reference's cached generation: a prompt's positions are ``cumsum(mask) - 1``
(padding gets 1), each new token's position is the previous one + 1, and dynamic NTK rope recomputes
its base from ``max(position_ids) + 1`` at every step, rotating only the new token's q/k (keys already
in the cache are never re-rotated).
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import math
import operator
import weakref
from typing import Iterable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import SingleDeviceSharding

from .arrays import back_with_huge_pages, row_sharding, to_host
from .attention import decode_weights, prefill_plan
from .cache import SLOT_AXIS, KVCache, to_slots
from .cache import sharding as cache_sharding
from .chat_format import TextStream, chat_prompt, feed_tokens
from .ring import padded_length
from .sharding import constrain, named_sharding

MIN_BUCKET = 16
LONG_BUCKET = 8192
MIN_TEMPERATURE = 1e-5  # below it sampling is greedy (the draw would be argmax anyway, bar exact ties)


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """temperature 0 (or below ``MIN_TEMPERATURE``) means greedy; top_k 0 and top_p 1.0 disable those
    filters. ``repetition_penalty`` (HF's: divides positive logits, multiplies negative ones) covers the
    prompt and the output;
    ``presence_penalty`` and ``frequency_penalty`` (OpenAI's, -2 to 2) subtract from a token's logit
    once if it was generated, and once per time it was generated (the output only, as vLLM does)."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    @property
    def counts_tokens(self) -> bool:
        """Whether sampling needs the count of each generated token."""
        return self.presence_penalty != 0 or self.frequency_penalty != 0

    def __post_init__(self):
        for f in dataclasses.fields(self):  # numpy scalars (a sweep over np.arange) as Python numbers
            value = getattr(self, f.name)
            if isinstance(value, np.integer | np.floating) or (isinstance(value, jax.Array) and value.ndim == 0):
                object.__setattr__(self, f.name, value.item())
        if isinstance(self.temperature, (int, float)) and 0 < self.temperature < MIN_TEMPERATURE:
            object.__setattr__(self, "temperature", 0.0)  # float32 logits divided by it overflow; greedy is the limit
        for name in ("presence_penalty", "frequency_penalty"):
            x = getattr(self, name)
            if not isinstance(x, (int, float)) or isinstance(x, bool) or not -2 <= x <= 2:
                raise ValueError(f"{name} must be a number from -2 to 2, got {x!r}")
        t, k, p, r = self.temperature, self.top_k, self.top_p, self.repetition_penalty
        if not isinstance(t, (int, float)) or isinstance(t, bool) or not t >= 0 or math.isinf(t):
            raise ValueError(f"temperature must be a finite number >= 0, got {t!r}")
        if not isinstance(k, int) or isinstance(k, bool) or k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 disables it), got {k!r}")
        if not isinstance(p, (int, float)) or isinstance(p, bool) or not 0 < p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {p!r}")
        if not isinstance(r, (int, float)) or isinstance(r, bool) or not r > 0 or math.isinf(r):
            raise ValueError(f"repetition_penalty must be a finite number > 0, got {r!r}")


def argmax_tokens(logits: jax.Array) -> jax.Array:
    """``jnp.argmax(logits, -1)`` as int32 (the first index of the largest value, NaN first), in two
    passes over a large vocabulary: the max of each of a few dozen blocks, then the argmax within the
    winning block. XLA:CPU's one-pass (value, index) reduction is not vectorised: over InternLM2's
    92544 tokens it took 1.5 ms at batch 8 against 0.07 ms in blocks (and 11.5 against 0.6 at 64)."""
    v = logits.shape[-1]
    blocks = next((n for n in (128, 96, 64, 32) if v % n == 0), 0) if v >= 4096 else 0
    if not blocks:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    x = logits.reshape(*logits.shape[:-1], blocks, v // blocks)
    best = jnp.argmax(jnp.max(x, axis=-1), axis=-1)
    inside = jnp.take_along_axis(x, best[..., None, None], axis=-2)[..., 0, :]
    return (best * (v // blocks) + jnp.argmax(inside, axis=-1)).astype(jnp.int32)


def categorical_tokens(key: jax.Array, logits: jax.Array) -> jax.Array:
    """A draw from ``softmax(logits)`` over the last axis: the same Gumbel-max draw, and so the same
    tokens, as ``jax.random.categorical(key, logits)``, with the argmax of :func:`argmax_tokens`."""
    return argmax_tokens(logits + jax.random.gumbel(key, logits.shape, logits.dtype))


def categorical_rows(keys: jax.Array, logits: jax.Array) -> jax.Array:
    """One draw per row ``b`` from ``softmax(logits[b])`` with key ``keys[b]``: a row's token depends on
    its key and logits only, not on the other rows of the batch."""
    noise = jax.vmap(lambda k: jax.random.gumbel(k, logits.shape[1:], logits.dtype))(keys)
    return argmax_tokens(logits + noise)


def count_penalties(logits: jax.Array, counts: jax.Array, presence, frequency) -> jax.Array:
    """OpenAI's presence and frequency penalties: ``logits - frequency * counts - presence * (counts > 0)``
    (``counts``: times each token was generated; the penalties broadcast against the logits)."""
    return logits - frequency * counts.astype(jnp.float32) - presence * (counts > 0).astype(jnp.float32)


def process_logits(logits: jax.Array, params: SamplingParams, seen: jax.Array | None,
                   counts: jax.Array | None = None) -> jax.Array:
    """Float32 logits after repetition penalty, presence/frequency penalties (with ``counts``),
    temperature, top-k and top-p (HF's order and rules, the count penalties where vLLM puts them);
    filtered tokens get -inf. With temperature 0 only the penalties apply (greedy follows)."""
    logits = logits.astype(jnp.float32)
    if params.repetition_penalty != 1.0 and seen is not None:
        r = jnp.float32(params.repetition_penalty)
        logits = jnp.where(seen, jnp.where(logits > 0, logits / r, logits * r), logits)
    if params.counts_tokens and counts is not None:
        logits = count_penalties(logits, counts, jnp.float32(params.presence_penalty),
                                 jnp.float32(params.frequency_penalty))
    if params.temperature == 0:
        return logits
    logits = logits / jnp.float32(params.temperature)
    neg = jnp.float32(-jnp.inf)
    if 0 < params.top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, params.top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, neg, logits)
    if params.top_p < 1.0:
        order = jnp.argsort(-logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass of the strictly more likely tokens
        keep_sorted = before < jnp.float32(params.top_p)  # the most likely token always stays
        keep = jax.vmap(lambda z, o, k: z.at[o].set(k))(jnp.zeros_like(keep_sorted), order, keep_sorted)
        logits = jnp.where(keep, logits, neg)
    return logits


def sample_tokens(logits: jax.Array, key: jax.Array, params: SamplingParams, seen: jax.Array | None,
                  counts: jax.Array | None = None) -> jax.Array:
    """Next tokens ``[B]`` from logits ``[B, V]`` with one key and static values: argmax when temperature
    is 0, else a categorical draw (the decode programs use :func:`sample_rows`)."""
    logits = process_logits(logits, params, seen, counts)
    if params.temperature == 0:
        return argmax_tokens(logits)
    return categorical_tokens(key, logits)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RowSampling:
    """Sampling values per row ``[B]`` (continuous batching: each request brings its own), and each
    row's PRNG key. A row's draws depend only on its key and its positions, not on the other rows."""

    temperature: jax.Array  # float32, 0 = greedy
    top_k: jax.Array  # int32, 0 = off
    top_p: jax.Array  # float32, 1 = off
    repetition_penalty: jax.Array  # float32, 1 = off
    key: jax.Array  # [B] PRNG keys
    presence_penalty: jax.Array  # float32, 0 = off
    frequency_penalty: jax.Array  # float32, 0 = off
    min_position: jax.Array  # int32: the ids in ``DecodeState.ban`` are not sampled below it (min_tokens)
    ignore_stop: jax.Array  # bool: the stop ids do not end the row (ignore_eos)

    @staticmethod
    def uniform(params: SamplingParams, keys: jax.Array, put) -> "RowSampling":
        """Every row with ``params``' values (``generate``'s batch), row ``b`` drawing with ``keys[b]``;
        ``put(array, axes)`` places each on the devices. The values are inputs of the compiled step, so
        another temperature or top-p does not compile it again."""
        b = keys.shape[0]
        full = lambda value, dtype: put(np.full(b, value, dtype), ("batch",))  # noqa: E731
        top_k = min(params.top_k, np.iinfo(np.int32).max)  # past the vocabulary it keeps every token anyway
        return RowSampling(full(params.temperature, np.float32), full(top_k, np.int32),
                           full(params.top_p, np.float32), full(params.repetition_penalty, np.float32), keys,
                           full(params.presence_penalty, np.float32), full(params.frequency_penalty, np.float32),
                           full(0, np.int32), full(False, bool))

    @staticmethod
    def features(params: Sequence[SamplingParams]) -> SamplingParams:
        """The static switches for a set of rows: which filters any of them uses (values unused)."""
        return SamplingParams(temperature=1.0 if any(p.temperature > 0 for p in params) else 0.0,
                              top_k=1 if any(p.top_k > 0 for p in params) else 0,
                              top_p=0.5 if any(p.top_p < 1 for p in params) else 1.0,
                              repetition_penalty=2.0 if any(p.repetition_penalty != 1 for p in params) else 1.0,
                              presence_penalty=1.0 if any(p.counts_tokens for p in params) else 0.0,
                              frequency_penalty=1.0 if any(p.counts_tokens for p in params) else 0.0)


def sample_rows(logits: jax.Array, rows: RowSampling, counter: jax.Array, features: SamplingParams,
                seen: jax.Array | None, counts: jax.Array | None = None) -> jax.Array:
    """Next tokens ``[B]`` with per-row sampling values (same rules and order as :func:`process_logits`);
    ``features`` (static) says which filters are compiled in; row ``b`` draws with
    ``fold_in(rows.key[b], counter[b])``."""
    logits = logits.astype(jnp.float32)
    col = lambda x: x[:, None]  # noqa: E731
    if features.repetition_penalty != 1.0 and seen is not None:
        r = col(rows.repetition_penalty)
        logits = jnp.where(seen, jnp.where(logits > 0, logits / r, logits * r), logits)
    if features.counts_tokens and counts is not None:
        logits = count_penalties(logits, counts, col(rows.presence_penalty), col(rows.frequency_penalty))
    greedy = argmax_tokens(logits)
    if features.temperature == 0:
        return greedy
    t = rows.temperature
    scaled = logits / col(jnp.where(t > 0, t, 1.0))
    neg = jnp.float32(-jnp.inf)
    if features.top_k or features.top_p < 1.0:
        order = jnp.argsort(-scaled, axis=-1)
        sorted_logits = jnp.take_along_axis(scaled, order, axis=-1)
        if features.top_k:
            k = jnp.clip(rows.top_k, 1, scaled.shape[-1])
            kth = jnp.take_along_axis(sorted_logits, col(k - 1), axis=-1)
            kth = jnp.where(col(rows.top_k > 0), kth, neg)
            sorted_logits = jnp.where(sorted_logits < kth, neg, sorted_logits)
        if features.top_p < 1.0:
            probs = jax.nn.softmax(sorted_logits, axis=-1)
            before = jnp.cumsum(probs, axis=-1) - probs
            sorted_logits = jnp.where(before < col(rows.top_p), sorted_logits, neg)
        scaled = jax.vmap(lambda z, o, x: z.at[o].set(x))(jnp.full_like(scaled, neg), order, sorted_logits)
    drawn = categorical_rows(jax.vmap(jax.random.fold_in)(rows.key, counter), scaled)
    return jnp.where(t > 0, drawn, greedy)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TokenScores:
    """Log-probabilities of one decode step's tokens under the model: float32 log-softmax of the raw
    logits, before repetition penalty, temperature and top-k/top-p (so they do not depend on how a
    token was drawn). ``logprob`` is the emitted token's, ``top_*`` the ``k`` most likely tokens'."""

    logprob: jax.Array  # [B] float32
    top_ids: jax.Array  # [B, k] int32, most likely first
    top_logprobs: jax.Array  # [B, k] float32


def token_scores(logits: jax.Array, tokens: jax.Array, k: int) -> TokenScores:
    """The :class:`TokenScores` of ``tokens`` ``[B]`` drawn from ``logits`` ``[B, V]``, with the top ``k``."""
    lp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    chosen = jnp.take_along_axis(lp, tokens[:, None], axis=-1)[:, 0]
    if k:
        top_lp, top_ids = jax.lax.top_k(lp, k)
    else:
        top_lp, top_ids = jnp.zeros((lp.shape[0], 0), jnp.float32), jnp.zeros((lp.shape[0], 0), jnp.int32)
    return TokenScores(chosen, top_ids.astype(jnp.int32), top_lp)


def bucket_length(n: int) -> int:
    """Prompt lengths are padded up to a power of two (at least 16) to bound recompilation; past
    ``LONG_BUCKET`` to a multiple of it (a 200K prompt is not padded to 256K)."""
    if n > LONG_BUCKET:
        return -(-n // LONG_BUCKET) * LONG_BUCKET
    return max(MIN_BUCKET, 1 << (n - 1).bit_length())


@dataclasses.dataclass
class PreparedBatch:
    ids: np.ndarray  # [B, S] left-padded
    mask: np.ndarray  # [B, S] 1 for real tokens
    positions: np.ndarray  # [B, S]
    lengths: list[int]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DecodeState:
    """Everything a decode step carries: the next logits, the cache, each sequence's next position,
    the tokens seen (repetition penalty), which sequences stopped, the step number, each row's sampling
    values and PRNG key, and (only when presence/frequency penalties may apply) how often each token
    was generated, and (only once a request sets ``min_tokens``) the ids each row may not sample yet."""

    logits: jax.Array  # [B, V] float32
    cache: KVCache
    positions: jax.Array  # [B] int32
    seen: jax.Array  # [B, V] bool
    done: jax.Array  # [B] bool
    step: jax.Array  # [] int32
    rows: RowSampling  # per-row sampling values and keys (generate: the same values in every row)
    counts: jax.Array | None = None  # [B, V] int32, times each token was generated; None: not tracked
    ban: jax.Array | None = None  # [B, V] bool, ids a row may not sample yet (min_tokens); None: none banned

    @staticmethod
    def abstract(config, batch: int, cache: KVCache, mesh=None, logits=None) -> "DecodeState":
        """The state as ShapeDtypeStructs (placed as :meth:`Generator.put` places it), for lowering the
        decode programs without running a prefill (the planner, benchmarks)."""
        def spec(shape, dtype, axes=("batch",)):
            return jax.ShapeDtypeStruct(shape, dtype, sharding=None if mesh is None else
                                        named_sharding(axes, shape, mesh))

        keys = jax.eval_shape(lambda: jax.random.split(jax.random.key(0), batch))
        f32, i32 = jnp.float32, jnp.int32
        rows = RowSampling(spec((batch,), f32), spec((batch,), i32), spec((batch,), f32), spec((batch,), f32),
                           spec(keys.shape, keys.dtype), spec((batch,), f32), spec((batch,), f32),
                           spec((batch,), i32), spec((batch,), bool))
        vocab = (batch, config.vocab_size)
        return DecodeState(spec(vocab, f32, ("batch", "act_vocab")) if logits is None else logits, cache,
                           spec((batch,), i32), spec(vocab, bool, ("batch", "act_vocab")), spec((batch,), bool),
                           jax.ShapeDtypeStruct((), i32), rows)


class Generator:
    """Compiled prefill / decode step / decode chunk for one model (split once).

    ``step`` (one token per sequence) and ``chunk`` (``decode_chunk`` steps in a fixed-trip-count scan)
    run the same step function: ``stream`` drives ``step`` token by token, :meth:`decode` drives
    ``chunk`` and checks the stop condition on the host between chunks. Both take the decode state
    donated, so the cache is updated in place.
    """

    def __init__(self, model):
        self.graphdef, self.state = nnx.split(model)
        self.config, self.mesh, self.dtype = model.config, model.mesh, model.dtype
        self.settings = model.settings
        self.n = model.sequence_parallel  # > 1: ring prefill, cache slots split over `sequence`
        self.prefill = jax.jit(self._prefill, static_argnames=("cache_len", "last"))
        self.extend = jax.jit(self._extend, donate_argnames=("cache",), static_argnames=("logprobs", "keys"))
        self.step = jax.jit(self._step, static_argnames=("sampling", "stop_ids", "logprobs"), donate_argnames=("ds",))
        self.chunk = jax.jit(self._chunk, static_argnames=("steps", "sampling", "stop_ids", "logprobs"),
                             donate_argnames=("ds",))
        self.sample = jax.jit(sample_tokens, static_argnames=("params",))
        self.weights_form = decode_weights(self.settings, self.mesh)
        self._layers, self._layers_of = None, None

    def _decode_weights(self, state):
        return nnx.merge(self.graphdef, state).decode_weights(packed=self.weights_form == "packed")

    @property
    def layers(self):
        """The :class:`~internlm_jax.model.DecodeWeights` the decode programs (and the prefill) read, made
        once from the stacked parameters and remade when those change (e.g. by training); None under
        ``decode_weights="sliced"``."""
        if self.weights_form == "sliced":
            return None
        ident = tuple(map(id, jax.tree.leaves(self.state)))
        if self._layers_of != ident:
            self._layers = None  # free the old copies first
            want = jax.tree.map(lambda x: x.sharding, self.abstract_layers()) if self.mesh is not None else None
            self._layers = jax.jit(self._decode_weights, out_shardings=want)(self.state)
            if self.settings.huge_pages and self.mesh is None:
                back_with_huge_pages(jax.block_until_ready(self._layers))
            self._layers_of = ident
        return self._layers

    def abstract_layers(self):
        """:attr:`layers` as ShapeDtypeStructs (on a mesh with their shardings: each a stacked parameter's
        sharding without the layer axis), for lowering without weights; None under "sliced"."""
        if self.weights_form == "sliced":
            return None
        weights = jax.eval_shape(self._decode_weights, self.state)
        if self.mesh is None:
            return weights
        rows = [jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape[1:], p.dtype, sharding=row_sharding(p.sharding)),
                             self.state["layers"]) for _ in weights.layers]
        return weights.replace(layers=tuple(rows))

    def prefill_path(self, length: int) -> str:
        """How a prompt of ``length`` (padded) tokens is prefilled (see :func:`prefill_plan`): "ring" lays
        the tokens out zigzag, "fused" right-pads each row (its tokens first), the others left-pad."""
        return prefill_plan(self.settings, length=length, mesh=self.mesh, dtype=self.dtype).path

    def blockwise(self, length: int) -> bool:
        """Whether a prompt of ``length`` tokens is prefilled by the ring layout (see :func:`prefill_plan`)."""
        return self.prefill_path(length) == "ring"

    def prompt_length(self, longest: int, bucket: int | None = None) -> int:
        """The padded prompt length for a longest prompt of ``longest`` tokens: its bucket (or the one
        given); for the ring layout a multiple of 2n (and of n x block), for one-device blockwise
        attention a multiple of the block."""
        s = bucket or bucket_length(longest)
        path = self.prefill_path(s)
        if path == "ring":
            return padded_length(s, self.n, self.settings.block)
        if path == "blockwise":
            return -(-s // self.settings.block) * self.settings.block
        return s

    # --- the compiled programs (pure functions of the parameter state) --------------------------
    def _prefill(self, state, layers, ids, mask, positions, index, cache_len: int, last: int):
        """Prompt -> (last-position logits, cache). ``index`` is each token's causal index; with a
        sequence axis the tokens arrive in zigzag order and ``last`` is where the final one sits; under
        the fused path each row is right-padded and its last real token is found from ``mask``."""
        model = nnx.merge(self.graphdef, state)
        x, keys, values = model.prefill_kv(ids, positions, mask, index, layers)
        if self.prefill_path(ids.shape[1]) == "fused":  # right-padded: each row's last token is its own
            x = jnp.take_along_axis(x, (jnp.sum(mask, axis=1) - 1)[:, None, None], axis=1)
        else:
            x = x[:, last:last + 1]
        logits = model.logits(model.norm(x), layers)[:, 0]
        ring = self.blockwise(ids.shape[1])
        cache = build_cache(keys, values, mask.astype(bool), cache_len, self.mesh, ring,
                            self.config.num_attention_heads)
        return logits, cache.constrain(self.mesh)

    def _extend(self, state, layers, cache, tokens, positions, row, start, count, seq_len, targets, logprobs: int,
                keys: int):
        """A prefill chunk of one cache row (:meth:`~internlm_jax.model.InternLM2.forward_extend`) attending to
        the row's first ``keys`` slots: returns the last real token's logits, the cache, and with
        ``logprobs >= 0`` the scores of ``targets`` (each token's next). The engine's chunked prefill and
        :meth:`start`'s long prompts run this one program."""
        model = nnx.merge(self.graphdef, state)
        logits, cache = model.forward_extend(tokens, positions, cache, row, start, count, seq_len, layers=layers,
                                             every=logprobs >= 0, keys=keys)
        if logprobs < 0:
            return logits, cache, None
        last = jax.lax.dynamic_index_in_dim(logits, count - 1, 0, keepdims=False)
        return last, cache, token_scores(logits, targets, logprobs)

    def _step(self, state, layers, ds: DecodeState, base, sampling: SamplingParams, stop_ids: tuple[int, ...],
              logprobs: int = -1):
        """Sample a token per sequence from ``ds.logits``, record it, and run it through the model.

        Returns ``(new state, tokens [B], emitted [B], scores)``: a sequence already stopped emits nothing
        (its token is the pad); ``scores`` is None, or with ``logprobs >= 0`` the tokens'
        :class:`TokenScores` with the top ``logprobs`` alternatives. Decode token ``step`` goes to slot
        ``base + step``; with a sequence axis to shard ``step % n`` at local slot ``base + step // n``
        (the shards fill evenly). The sampling values are the rows' (``ds.rows``): ``sampling`` only says
        which filters are compiled in (:meth:`RowSampling.features`), so new values do not recompile. The
        engine's rows (``base`` per row) keep their slots in order on any mesh, and a stopped row's
        position no longer advances."""
        model = nnx.merge(self.graphdef, state)
        stops = jnp.asarray(stop_ids if stop_ids else (-1,), jnp.int32)
        pad = stop_ids[0] if stop_ids else 0
        engine = base.ndim == 1  # the engine's rows each have their own slot base
        logits = ds.logits
        if ds.ban is not None:  # min_tokens: a row's stop ids are not sampled below its min_position
            logits = jnp.where(ds.ban & (ds.positions < ds.rows.min_position)[:, None], -jnp.inf, logits)
        # row b draws with its key folded with its position: its tokens do not depend on the other rows
        tok = sample_rows(logits, ds.rows, ds.positions, sampling, ds.seen, ds.counts)
        tok = jnp.where(ds.done, pad, tok)
        scores = token_scores(ds.logits, tok, logprobs) if logprobs >= 0 else None
        emitted = ~ds.done
        stopped = jnp.isin(tok, stops) & ~ds.rows.ignore_stop  # ignore_eos rows go on past the stop ids
        done = ds.done | stopped
        # per-row scatters vmapped (the batch a batching dim): local to each device where the batch is split
        seen = jax.vmap(lambda s, t: s.at[t].set(True))(ds.seen, tok)
        counts = None if ds.counts is None else jax.vmap(lambda c, t, e: c.at[t].add(e))(
            ds.counts, tok, emitted.astype(jnp.int32))
        if self.n == 1 or engine:  # the engine's rows keep their slots in order on any mesh
            owner, slot = None, base + ds.step
        else:
            owner, slot = ds.step % self.n, base + ds.step // self.n
        logits, cache = model.forward_decode(tok, ds.positions, ds.cache, slot, owner=owner, layers=layers)
        vec = lambda x, axes=("batch",): constrain(x, axes, self.mesh)  # noqa: E731 - the shardings put() gives
        positions = ds.positions + (~done).astype(jnp.int32) if engine else ds.positions + 1
        new = DecodeState(vec(logits, ("batch", "act_vocab")), cache.constrain(self.mesh), vec(positions),
                          vec(seen, ("batch", "act_vocab")), vec(done), ds.step + 1, ds.rows,
                          None if counts is None else vec(counts, ("batch", "act_vocab")), ds.ban)
        return new, tok, emitted, scores

    def _chunk(self, state, layers, ds: DecodeState, base, steps: int, sampling: SamplingParams,
               stop_ids: tuple[int, ...], logprobs: int = -1):
        """``steps`` decode steps in one program (a scan with a static trip count: no host round trip
        per token). Returns ``(state, tokens [B, steps], emitted [B, steps], scores)`` (scores as for
        :meth:`_step`, each array with the step axis second)."""
        def body(ds, _):
            ds, tok, emitted, scores = self._step(state, layers, ds, base, sampling, stop_ids, logprobs)
            return ds, (tok, emitted, scores)

        ds, (tokens, emitted, scores) = jax.lax.scan(body, ds, None, length=steps)
        return ds, tokens.T, emitted.T, jax.tree.map(lambda x: jnp.moveaxis(x, 0, 1), scores)

    # --- host-side drivers ----------------------------------------------------------------------
    def decode(self, ds: DecodeState, base, max_new_tokens: int, sampling: SamplingParams,
               stop_ids: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray, DecodeState]:
        """Run chunks until every sequence stopped or ``max_new_tokens`` were made; returns
        ``(tokens [B, max_new_tokens], number made per sequence [B], final state)``. ``sampling``'s values
        are the state's (:meth:`start` put them there); it only picks the filters compiled in."""
        k = self.settings.decode_chunk
        out, ok = [], []
        made = 0
        layers, features = self.layers, RowSampling.features([sampling])
        while made < max_new_tokens:
            # whole chunks, then the remainder in power-of-two chunks (a few programs, no wasted steps)
            steps = min(k, 1 << ((max_new_tokens - made).bit_length() - 1))
            ds, tokens, emitted, _ = self.chunk(self.state, layers, ds, base, steps=steps, sampling=features,
                                             stop_ids=stop_ids)
            out.append(tokens)
            ok.append(emitted)
            made += steps
            if made < max_new_tokens and bool(np.all(to_host(ds.done))):
                break
        tokens = np.concatenate([to_host(t) for t in out], axis=1)[:, :max_new_tokens]
        emitted = np.concatenate([to_host(e) for e in ok], axis=1)[:, :max_new_tokens]
        return tokens, emitted.sum(axis=1), ds

    def prepare(self, prompts: Sequence[Sequence[int]], bucket: int | None = None) -> PreparedBatch:
        """Token id lists as one left-padded batch (ids, mask, positions counted from each prompt's first
        token), padded to the compiled prompt length of the longest (:meth:`prompt_length`)."""
        lengths = [len(p) for p in prompts]
        s = self.prompt_length(max(lengths), bucket)
        ids = np.zeros((len(prompts), s), np.int32)
        mask = np.zeros((len(prompts), s), np.int32)
        for i, p in enumerate(prompts):
            ids[i, s - len(p):] = p
            mask[i, s - len(p):] = 1
        positions = np.where(mask == 1, np.cumsum(mask, axis=1) - 1, 1).astype(np.int32)
        return PreparedBatch(ids, mask, positions, lengths)

    def put(self, x, axes: tuple[str, ...]) -> jax.Array:
        """Host data onto the devices, committed like the compiled programs' outputs (so a decode state
        made here and one a program returned hit the same compiled program)."""
        if self.mesh is None:
            return jax.device_put(x, jax.devices()[0])
        sharding = named_sharding(axes, x.shape, self.mesh)
        if sharding.is_fully_addressable:
            return jax.device_put(x, sharding)
        host = np.asarray(x)  # a mesh over many processes: each gives its own shards of the same value
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    def row_keys(self, seed: int, rows: int) -> jax.Array:
        """``rows`` PRNG keys, row ``b``'s that of seed ``seed + b`` (an engine request's with that seed),
        made on the devices and split like the batch."""
        sharding = SingleDeviceSharding(jax.devices()[0]) if self.mesh is None else \
            named_sharding(("batch",), (rows,), self.mesh)
        return jax.jit(_seed_keys, static_argnames=("rows",), out_shardings=sharding)(np.uint32(seed % 2**32),
                                                                                      rows=rows)

    def layout(self, s: int, max_new_tokens: int):
        """For a prepared prompt of ``s`` tokens: (cache length, where the last prompt token sits, the
        slot base of decode tokens, the zigzag token order or None)."""
        if not self.blockwise(s):
            return bucket_length(s + max_new_tokens), s - 1, s, None
        from .ring import zigzag_order

        n = self.n
        order = zigzag_order(s, n)
        base = s // n
        return n * bucket_length(base + -(-max_new_tokens // n)), int(np.argmax(order == s - 1)), base, order

    def start(self, batch: PreparedBatch, max_new_tokens: int, seed: int = 0,
              sampling: SamplingParams | None = None) -> tuple[DecodeState, jax.Array]:
        """Prefill; returns the decode state (first logits, cache, next positions, tokens seen, every row
        with ``sampling``'s values, row ``b`` with seed ``seed + b``; zero counts of generated tokens
        where its penalties count them) and the slot base of decode tokens."""
        sampling = sampling or SamplingParams()
        b, s = batch.ids.shape
        cache_len, last, base, order = self.layout(s, max_new_tokens)
        if self.prefills_in_chunks(max(batch.lengths)):
            logits, cache = self._prefill_in_chunks(batch, cache_len, self.settings.long_prompt_chunk)
            return self._decode_state(batch, logits, cache, seed, sampling), self.put(np.int32(base), ())
        index = np.broadcast_to(np.arange(s, dtype=np.int32), (b, s))
        arrays = [batch.ids, batch.mask, batch.positions, index]
        if order is not None:  # permuted on the host: the devices get their chunks directly
            arrays = [a[:, order] for a in arrays]
        elif self.prefill_path(s) == "fused":  # each row's tokens first, at slots 0..n-1, padding after
            pads = s - np.asarray(batch.lengths)
            arrays = [np.stack([np.roll(row, -p) for row, p in zip(a, pads)]) for a in arrays[:3]] + [index]
        ids, mask, positions, index = (self.put(a, ("batch", "seq")) for a in arrays)
        logits, cache = self.prefill(self.state, self.layers, ids, mask, positions, index, cache_len=cache_len,
                                     last=last)
        return self._decode_state(batch, logits, cache, seed, sampling), self.put(np.int32(base), ())

    def prefills_in_chunks(self, longest: int) -> bool:
        """Whether :meth:`start` prefills a batch whose longest prompt has ``longest`` tokens in
        ``long_prompt_chunk``-token chunks (without a ``sequence`` axis, past that length)."""
        chunk = self.settings.long_prompt_chunk
        return self.n == 1 and bool(chunk) and longest > chunk

    def lower_extend(self, cache, keys: int):
        """The chunk program lowered for ``cache`` (abstract or real) and a key span, from abstract tokens:
        for the planner and benchmarks, which compile it ahead."""
        one = jax.ShapeDtypeStruct((self.settings.long_prompt_chunk,), jnp.int32)
        row = jax.ShapeDtypeStruct((), jnp.int32)
        return self.extend.lower(self.state, self.abstract_layers(), cache, one, one, row, row, row, row, one,
                                 logprobs=-1, keys=keys)

    def _prefill_in_chunks(self, batch: PreparedBatch, cache_len: int, chunk: int):
        """A long prompt batch prefilled ``chunk`` tokens at a time, row by row, into an empty cache in the
        one-pass layout (row ``i``'s tokens end at slot ``s``): each chunk attends to its row's slots so
        far, so the activations are one chunk's and the cache is the only thing that grows with the
        length. Rotary tables use the batch's longest prompt, as the one-pass prefill does. Returns the
        first logits ``[B, V]`` and the cache."""
        b, s = batch.ids.shape
        cache = KVCache.zeros(self.config, b, cache_len, self.dtype, self.mesh)
        seq_len, zeros, last = np.int32(max(batch.lengths)), np.zeros(chunk, np.int32), []
        for i, n in enumerate(batch.lengths):
            prompt = batch.ids[i, s - n:]
            for at, start, count, keys in prompt_chunks(n, s, chunk, cache_len):
                tokens = np.zeros(chunk, np.int32)
                tokens[:count] = prompt[at:at + count]
                logits, cache, _ = self.extend(self.state, self.layers, cache, tokens,
                                               np.arange(at, at + chunk, dtype=np.int32), np.int32(i),
                                               np.int32(start), np.int32(count), seq_len, zeros,
                                               logprobs=-1, keys=keys)
            last.append(logits)
        logits = jnp.stack(last)
        if self.mesh is not None:
            logits = jax.device_put(logits, named_sharding(("batch", "act_vocab"), logits.shape, self.mesh))
        return logits, cache

    def _decode_state(self, batch: PreparedBatch, logits, cache, seed: int, sampling: SamplingParams) -> DecodeState:
        """The decode state after a prefill: first logits, cache, next positions, tokens seen, the rows'
        sampling values and keys (and zero counts of generated tokens where the penalties use them)."""
        b = len(batch.lengths)
        seen = np.zeros((b, self.config.vocab_size), bool)
        for i in range(b):
            seen[i, batch.ids[i][batch.mask[i] > 0]] = True
        ds = DecodeState(logits, cache, self.put((batch.positions[:, -1] + 1).astype(np.int32), ("batch",)),
                         self.put(seen, ("batch", "act_vocab")), self.put(np.zeros(b, bool), ("batch",)),
                         self.put(np.int32(0), ()), RowSampling.uniform(sampling, self.row_keys(seed, b), self.put),
                         self.put(np.zeros((b, self.config.vocab_size), np.int32), ("batch", "act_vocab"))
                         if sampling.counts_tokens else None)
        return ds


def _seed_keys(seed, rows: int) -> jax.Array:
    """The keys of seeds ``seed .. seed + rows - 1`` (a module-level function: jit compiles it once)."""
    return jax.vmap(jax.random.key)(seed + jnp.arange(rows, dtype=jnp.uint32))


def prompt_chunks(n: int, s: int, chunk: int, cache_len: int) -> list[tuple[int, int, int, int]]:
    """How :meth:`Generator.start` prefills a row of ``n`` prompt tokens (ending at slot ``s``) in chunks of
    ``chunk``: ``(first token, first slot, real tokens, key span)`` each. The span, the slots a chunk
    attends over, is its end rounded up to a power of two (at most ``cache_len``): a few programs, each
    chunk's attention at most twice what it needs. The planner counts the same chunks."""
    out = []
    for at in range(0, n, chunk):
        start = s - n + at
        out.append((at, start, min(chunk, n - at), min(cache_len, max(chunk, 1 << (start + chunk - 1).bit_length()))))
    return out


def build_cache(keys, values, valid, cache_len: int, mesh, ring: bool, num_heads: int) -> KVCache:
    """A :class:`KVCache` of ``cache_len`` slots from a prompt's per-layer keys/values ``[L, B, S, nKV, D]``
    (each sequence-shard's chunk at the start of its slice under the ring layout)."""
    b, s = valid.shape
    if ring:
        from .ring import write_prefill

        def place(x):
            zeros = jnp.zeros((x.shape[0], x.shape[2], cache_len, x.shape[3]), x.dtype)
            zeros = jax.lax.with_sharding_constraint(zeros, cache_sharding(zeros.shape, mesh))
            return write_prefill(zeros, to_slots(x, mesh), mesh, num_heads)

        valid = write_prefill(jnp.zeros((b, cache_len), bool), valid, mesh)
    else:
        def place(x):
            x = to_slots(x, mesh)
            pad = [(0, 0)] * x.ndim
            pad[SLOT_AXIS] = (0, cache_len - s)
            return jnp.pad(x, pad)

        valid = jnp.pad(valid, ((0, 0), (0, cache_len - s)))
    n = len(keys)
    return KVCache(tuple(place(keys[i]) for i in range(n)), tuple(place(values[i]) for i in range(n)), valid)


_GENERATORS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def generator_for(model) -> Generator:
    """The cached :class:`Generator` of a model (compiled programs are kept across calls). Parameters
    changed since (e.g. by training) are picked up; changed settings (``model.configure``) change the
    graph definition and get a new Generator."""
    gen = _GENERATORS.get(model)
    graphdef, state = nnx.split(model)
    if gen is None or graphdef != gen.graphdef:
        gen = _GENERATORS[model] = Generator(model)
    else:
        gen.state = state
    return gen


# --- public API ----------------------------------------------------------------------------------


def model_limit(cfg) -> int:
    """Longest sequence allowed by default: max_position_embeddings, times the rope scaling factor (linear
    scaling stretches the trained positions by it; dynamic NTK extrapolates as far); pass ``max_length``
    to go further on purpose."""
    rs = cfg.rope_scaling
    factor = rs.factor if rs is not None else 1.0
    return int(cfg.max_position_embeddings * factor)


DEFAULT_NEW_TOKENS = 128  # generate / stream without max_new_tokens (chat: 512), capped to what fits


def _check_arguments(model, tok, stop_ids) -> tuple[int, ...]:
    """The model and tokenizer in their places (text in and out needs the tokenizer), and the stop ids as
    integers (default: :func:`default_stop_ids`): named errors for the common slips (arguments swapped, a string
    of stop ids)."""
    if not hasattr(model, "config") or not hasattr(model, "settings"):
        raise TypeError(f"the first argument must be an InternLM2 model, got {type(model).__name__}")
    if tok is None:
        raise ValueError("a tokenizer (the second argument) is needed to turn the output into text; for token "
                         "ids in and out use generate_ids")
    if not all(hasattr(tok, name) for name in ("encode", "decode", "stop_ids", "stream_decoder")):
        raise TypeError(f"the second argument must be an internlm_jax Tokenizer, got {type(tok).__name__} "
                        "(load one with ij.Tokenizer.from_pretrained(folder))")
    if stop_ids is None:
        return default_stop_ids(model.config, tok)
    return check_stop_ids(stop_ids, model.config.vocab_size)


def check_stop_ids(stop_ids, vocab_size: int) -> tuple[int, ...]:
    """``stop_ids`` as a tuple of ints, or a TypeError / ValueError naming the first that is not a token id
    of the vocabulary (a string of ids, a float, a bool)."""
    if isinstance(stop_ids, str | bytes) or not isinstance(stop_ids, Iterable):
        raise TypeError(f"stop_ids must be a list of token ids, got {stop_ids!r} (stop strings go in stop=)")
    out = _integers(stop_ids, "stop_ids must be token ids (integers), got {!r} (stop strings go in stop=)")
    bad = next((t for t in out if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise ValueError(f"stop id {bad} is outside the vocabulary (0..{vocab_size - 1})")
    return tuple(out)


def as_int(value) -> int | None:
    """``value`` as an int where it is one (Python, numpy and 0-d JAX integers alike), else None: a bool,
    float, string or array is a slip, never truncated. The one rule for every integer argument."""
    if isinstance(value, bool | np.bool_):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def _integers(values, message: str) -> list[int]:
    """``values`` as ints (:func:`as_int`); one that is not is a TypeError with ``message`` formatted with it."""
    out = []
    for t in values:
        i = as_int(t)
        if i is None:
            raise TypeError(message.format(t))
        out.append(i)
    return out


def _token_ids(p, i: int) -> list[int]:
    """Prompt ``i``'s token ids as ints."""
    if isinstance(p, np.ndarray | jax.Array) and not np.issubdtype(p.dtype, np.integer):
        raise TypeError(f"prompt {i}: token ids must be integers, got an array of {p.dtype}")
    return _integers(p, f"prompt {i}: token ids must be integers, got {{!r}}")


def _as_batch(prompts) -> tuple[list, bool]:
    """``(prompts as a list, whether one prompt was given)``: a string, a flat list of token ids or a
    1-D array is one prompt."""
    if isinstance(prompts, str):
        return [prompts], True
    if isinstance(prompts, bytes | bytearray):
        raise TypeError("prompts must be text (str) or token ids, got bytes: decode them first")
    if not isinstance(prompts, Iterable):
        raise TypeError(f"prompts must be a string, a list of token ids, or a list of those; got "
                        f"{type(prompts).__name__}")
    if isinstance(prompts, np.ndarray | jax.Array):
        return ([prompts], True) if prompts.ndim == 1 else (list(prompts), False)
    prompts = list(prompts)
    if prompts and all(as_int(t) is not None for t in prompts):
        return [prompts], True
    return prompts, False


def _encode_prompts(tok, prompts, add_bos: bool, vocab_size: int) -> list[list[int]]:
    out = []
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            if p == "":
                raise ValueError(f"prompt {i} is empty")
            if tok is None:
                raise ValueError("a tokenizer is needed for text prompts (or pass token id lists)")
            ids = tok.encode(p, add_bos=add_bos)
        elif isinstance(p, bytes | bytearray):
            raise TypeError(f"prompt {i} is bytes; pass text (decode it first) or a list of token ids")
        elif isinstance(p, int | np.integer) or np.ndim(p) == 0:
            raise ValueError(f"prompt {i} is a single integer; prompts are token id lists (for one prompt: [ids])")
        else:
            ids = _token_ids(p, i)
            bad = [t for t in ids if not 0 <= t < vocab_size]
            if bad:
                raise ValueError(f"prompt {i}: token id {bad[0]} is outside the vocabulary (0..{vocab_size - 1})")
        if not ids:
            raise ValueError(f"prompt {i} is empty")
        out.append(ids)
    return out


def _check_lengths(prompts: list[list[int]], max_new_tokens: int | None, limit: int, truncate: bool,
                   default: int = DEFAULT_NEW_TOKENS) -> tuple[list[list[int]], int]:
    """The prompts (cut from the left with ``truncate``) and the number of new tokens. Without
    ``max_new_tokens``, ``default`` tokens, or as many as fit after the longest prompt."""
    _check_flags(truncate=truncate)
    if max_new_tokens is None:
        max_new_tokens = max(1, min(default, limit - max(map(len, prompts))))
    if as_int(max_new_tokens) is None or as_int(max_new_tokens) < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    max_new_tokens = as_int(max_new_tokens)
    room = limit - max_new_tokens
    if room < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt within max_length={limit}")
    out = []
    for i, p in enumerate(prompts):
        if len(p) > room:
            if not truncate:
                raise ValueError(f"prompt {i} has {len(p)} tokens; with max_new_tokens={max_new_tokens} it exceeds "
                                 f"max_length={limit} (pass truncate=True to keep its last {room} tokens)")
            p = p[len(p) - room:]
        out.append(p)
    return out, max_new_tokens


def _check_flags(**flags) -> None:
    """Switches must be booleans: a string such as "no" would otherwise count as true."""
    for name, value in flags.items():
        if not isinstance(value, bool | np.bool_):
            raise TypeError(f"{name} must be True or False, got {value!r}")


def _max_length(model, max_length) -> int:
    if max_length is None:
        return model_limit(model.config)
    if as_int(max_length) is None or as_int(max_length) < 2:
        raise ValueError(f"max_length must be an integer of at least 2 (prompt + new tokens), got {max_length!r}")
    return as_int(max_length)


def seed_value(seed) -> int:
    """The 32-bit PRNG seed of a request's ``seed`` (any integer); ValueError for anything else. One rule
    for generate and the engine, so the same seed draws the same tokens in both."""
    if as_int(seed) is None:
        raise ValueError(f"seed must be an integer, got {seed!r}")
    return as_int(seed) % (1 << 32)


def _stop_strings(stop) -> list[str]:
    if stop is not None and not isinstance(stop, str | Iterable):
        raise ValueError(f"stop must be a string or a list of strings, got {stop!r} (token ids go in stop_ids=)")
    stop = [stop] if isinstance(stop, str) else list(stop or [])
    if not all(isinstance(s, str) for s in stop):
        raise ValueError(f"stop must be a string or a list of strings, got {stop!r}")
    return [s for s in stop if s]


IM_END_ID = 92542  # <|im_end|> in InternLM2's vocabulary (FACTS.md): chat models end a turn with it


def default_stop_ids(config, tok=None) -> tuple[int, ...]:
    """Stop ids when none are given: every id of config.json's ``eos_token_id`` and of the checkpoint's
    generation_config.json (what the reference's ``generate`` stops on), ``<|im_end|>`` in InternLM2's
    92544-token vocabulary, and the tokenizer's :attr:`~internlm_jax.Tokenizer.stop_ids` where one is
    given (a tokenizer made by ``Tokenizer.train`` has its own ``<|im_end|>``)."""
    ids = [*config.eos_token_ids, *config.generation_eos_token_ids]
    ids += [IM_END_ID] if config.vocab_size > IM_END_ID else []
    ids += list(tok.stop_ids) if tok is not None else []
    # (a tokenizer larger than the model's vocabulary: its ids past the vocabulary can never be sampled)
    return tuple(dict.fromkeys(int(i) for i in ids if 0 <= i < config.vocab_size))


def check_keywords(outer, given: Iterable[str], inner, taken: Iterable[str] = ()) -> None:
    """Keyword arguments that ``outer`` passes on to ``inner`` are checked at the door, so that a misspelt
    one is a TypeError naming what the user called (and the nearest name), not the inner function;
    ``taken``: ``inner``'s keywords that ``outer`` sets itself."""
    def keywords(f):
        return [n for n, p in inspect.signature(f).parameters.items()
                if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]

    known = sorted((set(keywords(outer)) | set(keywords(inner))) - set(taken))
    for key in given:
        if key not in known:
            near = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
            hint = f" (did you mean {near[0]!r}?)" if near else f"; it takes {', '.join(known)}"
            raise TypeError(f"{outer.__qualname__}() got an unexpected keyword argument {key!r}{hint}")


def generate_ids(model, prompts: Sequence[Sequence[int]], *, max_new_tokens: int | None = None,
                 temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0,
                 presence_penalty: float = 0.0, frequency_penalty: float = 0.0, seed: int = 0,
                 stop_ids: Sequence[int] | None = None, max_length: int | None = None,
                 truncate: bool = False) -> list[list[int]]:
    """Token id lists in, new token ids out (each list ends at and includes its stop id, if one came).
    ``stop_ids`` default: :func:`default_stop_ids` (pass the tokenizer's ``stop_ids`` for another vocabulary).

    ``max_new_tokens`` defaults to 128, or what fits after the longest prompt within ``max_length``
    (default: the model's context). Sampled row ``b`` draws with seed ``seed + b``: the same prompt
    repeated gives different samples, and a row's tokens are those of an :class:`~internlm_jax.Engine`
    request with that seed, whatever the other rows hold."""
    sampling = SamplingParams(temperature, top_k, top_p, repetition_penalty, presence_penalty, frequency_penalty)
    seed = seed_value(seed)
    stop_ids = default_stop_ids(model.config) if stop_ids is None else check_stop_ids(stop_ids,
                                                                                     model.config.vocab_size)
    if isinstance(prompts, str | bytes | bytearray):
        raise TypeError(f"generate_ids takes token id lists, got {type(prompts).__name__} (text: generate)")
    prompts = list(prompts) if isinstance(prompts, Iterable) and not isinstance(prompts, np.ndarray | jax.Array) \
        else prompts
    if len(prompts) == 0:
        return []
    prompts = _encode_prompts(None, prompts, add_bos=False, vocab_size=model.config.vocab_size)
    prompts, max_new_tokens = _check_lengths(prompts, max_new_tokens, _max_length(model, max_length), truncate)
    gen = generator_for(model)
    ds, base = gen.start(gen.prepare(prompts), max_new_tokens, seed=seed, sampling=sampling)
    tokens, num, _ = gen.decode(ds, base, max_new_tokens, sampling, stop_ids)
    return [tokens[i, : num[i]].tolist() for i in range(len(prompts))]


def _stopped(stream: TextStream, text: str) -> str:
    stream.push(text)
    return stream.text


def _strip_stop(ids: list[int], stop_ids) -> list[int]:
    return ids[:-1] if ids and ids[-1] in stop_ids else ids


def generate(model, tok, prompts: str | Sequence[str | Sequence[int]], *, max_new_tokens: int | None = None,
             add_bos: bool = True, stop_ids: Sequence[int] | None = None, stop: str | Sequence[str] | None = None,
             skip_special_tokens: bool = False, **kwargs) -> list[str] | str:
    """Generate text for one prompt or a batch (prompts of different lengths are left-padded).

    A prompt is a string or a list of token ids; one prompt gives a string, a list of them a list.
    Sampling: ``temperature`` (0 = greedy), ``top_k``, ``top_p``, ``repetition_penalty``,
    ``presence_penalty``, ``frequency_penalty`` (see :class:`SamplingParams`), ``seed``.
    Each sequence stops at its own stop id (default: :func:`default_stop_ids`: the ids of config.json's and
    generation_config.json's ``eos_token_id``, ``<|im_end|>`` and the tokenizer's)
    or after ``max_new_tokens`` (see :func:`generate_ids`); the stop token is not part of the text.
    ``stop`` strings cut the text before the first one that appears.
    """
    check_keywords(generate, kwargs, generate_ids, taken=("model", "prompts", "tok"))
    _check_flags(add_bos=add_bos, skip_special_tokens=skip_special_tokens)
    stop_ids = _check_arguments(model, tok, stop_ids)
    batch, single = _as_batch(prompts)
    stop = _stop_strings(stop)
    ids = _encode_prompts(tok, batch, add_bos, model.config.vocab_size)
    out = generate_ids(model, ids, max_new_tokens=max_new_tokens, stop_ids=stop_ids, **kwargs)
    texts = [tok.decode(_strip_stop(o, stop_ids), skip_special_tokens=skip_special_tokens) for o in out]
    if stop:  # cut before the first stop string, by the rule the streams use
        texts = [_stopped(TextStream(stop), text) for text in texts]
    return texts[0] if single else texts


def stream(model, tok, prompt: str | Sequence[int], *, max_new_tokens: int | None = None, temperature: float = 0.0,
           top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0, presence_penalty: float = 0.0,
           frequency_penalty: float = 0.0, seed: int = 0, stop_ids: Sequence[int] | None = None,
           stop: str | Sequence[str] | None = None, add_bos: bool = True, skip_special_tokens: bool = False,
           max_length: int | None = None, truncate: bool = False, default_new_tokens: int = DEFAULT_NEW_TOKENS
           ) -> Iterator[str]:
    """Yield text pieces as tokens are produced (the decode step driven one token per call); the same
    text as :func:`generate` for one prompt. Arguments are checked here, before the first piece is asked
    for. Without ``max_new_tokens``, ``default_new_tokens`` or as many as fit."""
    sampling = SamplingParams(temperature, top_k, top_p, repetition_penalty, presence_penalty, frequency_penalty)
    seed, stop = seed_value(seed), _stop_strings(stop)
    _check_flags(add_bos=add_bos, skip_special_tokens=skip_special_tokens)
    stop_ids = _check_arguments(model, tok, stop_ids)
    batch, single = _as_batch(prompt)
    if not single:
        raise ValueError("stream takes one prompt (a string or a list of token ids); use generate for a batch")
    prompts, max_new_tokens = _check_lengths(_encode_prompts(tok, batch[:1], add_bos, model.config.vocab_size),
                                             max_new_tokens, _max_length(model, max_length), truncate,
                                             default_new_tokens)
    return _stream(model, tok, prompts, max_new_tokens, sampling, seed, stop_ids, stop, skip_special_tokens)


def _stream(model, tok, prompts, max_new_tokens, sampling, seed, stop_ids, stop, skip_special_tokens):
    gen = generator_for(model)
    ds, base = gen.start(gen.prepare(prompts), max_new_tokens, seed=seed, sampling=sampling)
    decoder = tok.stream_decoder(skip_special_tokens=skip_special_tokens)
    text = TextStream(stop)  # holds back what may still become a stop string
    layers, features = gen.layers, RowSampling.features([sampling])
    for _ in range(max_new_tokens):  # the same step function as the chunks, one token per call
        ds, token, _, _ = gen.step(gen.state, layers, ds, base, sampling=features, stop_ids=stop_ids)
        t = int(to_host(token)[0])
        if t in stop_ids:
            break
        piece, _ = feed_tokens(text, decoder, [t])
        if piece:
            yield piece
        if text.stopped:
            return
    tail, _ = feed_tokens(text, decoder, [], finished=True)
    if tail:
        yield tail


def chat(model, tok, messages: list[dict], *, tools: list[dict] | None = None, tool_choice=None,
         max_new_tokens: int | None = None, stream_to=None, **kwargs) -> dict:
    """One assistant turn for ``messages`` (InternLM2 chat template); returns the assistant message.

    Special tokens are kept in the content, so tool calls (``<|action_start|><|plugin|>...<|action_end|>``)
    survive; generation stops at ``<|im_end|>`` or ``</s>``. ``stream_to`` (e.g. ``print``-like callable)
    receives text pieces as they arrive. With ``tools`` (OpenAI function definitions) the messages are
    read as the server reads them (``role: "tool"`` results included), the tools become InternLM2's
    plugin system message, and calls in the reply come back as OpenAI ``tool_calls``; ``tool_choice``
    (``"auto"``, ``"none"``, ``"required"`` or a named function) as the server takes it.
    """
    check_keywords(chat, kwargs, stream, taken=("model", "tok", "prompt", "messages", "add_bos", "default_new_tokens"))
    _check_arguments(model, tok, None)
    forced, parse = "", tools is not None
    if tools is None and tool_choice is None:
        prompt = tok.encode_chat(messages, add_generation_prompt=True)
    else:
        prompt, forced, parse = chat_prompt(tok, messages, tools, tool_choice)
    pieces = []
    for piece in stream(model, tok, prompt, max_new_tokens=max_new_tokens, add_bos=False, default_new_tokens=512,
                        **kwargs):
        pieces.append(piece)
        if stream_to is not None:
            stream_to(piece)
    if not parse:
        return {"role": "assistant", "content": "".join(pieces)}
    reply = TextStream(tools=True, forced=forced)  # the server's rule, a forced call's start included
    reply.push("".join(pieces))
    content, calls = reply.reply()
    return {"role": "assistant", "content": content or (None if calls else ""),  # None beside calls, as OpenAI
            **({"tool_calls": calls} if calls else {})}
