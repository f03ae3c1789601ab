"""Generation: a jitted prefill, a jitted decode step (cache donated), and an on-device decode loop.

The model is split once (``nnx.split``) and every compiled program is a pure function of the
parameter state. Prompts are left-padded to a length bucket (powers of two from 16) so that a new
prompt length rarely recompiles; the KV cache is preallocated at ``[L, B, T, nKV, D]`` (KV heads,
never repeated to the query head count), sharded over ``tensor`` (KV heads), ``data``/``fsdp``
(batch) and, through the ``cache_seq`` axis, over ``sequence``.

Positions follow the reference's cached generation: a prompt's positions are ``cumsum(mask) - 1``
(padding gets 1), each new token's position is the previous one + 1, and dynamic NTK rope recomputes
its base from ``max(position_ids) + 1`` at every step, rotating only the new token's q/k (keys already
in the cache are never re-rotated).
"""

from __future__ import annotations

import dataclasses
import math
import weakref
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .model import blockwise_attention
from .ring import padded_length
from .rope import rope_tables
from .sharding import named_sharding

CACHE_AXES = ("layers", "batch", "cache_seq", "act_kv_heads", "head_dim")
MIN_BUCKET = 16
LONG_BUCKET = 8192


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """temperature 0 means greedy; top_k 0 and top_p 1.0 disable those filters."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0

    def __post_init__(self):
        t, k, p, r = self.temperature, self.top_k, self.top_p, self.repetition_penalty
        if not isinstance(t, (int, float)) or isinstance(t, bool) or not t >= 0 or math.isinf(t):
            raise ValueError(f"temperature must be a finite number >= 0, got {t!r}")
        if not isinstance(k, int) or isinstance(k, bool) or k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 disables it), got {k!r}")
        if not isinstance(p, (int, float)) or isinstance(p, bool) or not 0 < p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {p!r}")
        if not isinstance(r, (int, float)) or isinstance(r, bool) or not r > 0 or math.isinf(r):
            raise ValueError(f"repetition_penalty must be a finite number > 0, got {r!r}")


def process_logits(logits: jax.Array, params: SamplingParams, seen: jax.Array | None) -> jax.Array:
    """Float32 logits after repetition penalty, temperature, top-k and top-p (HF's order and rules);
    filtered tokens get -inf. With temperature 0 only the penalty applies (greedy follows)."""
    logits = logits.astype(jnp.float32)
    if params.repetition_penalty != 1.0 and seen is not None:
        r = jnp.float32(params.repetition_penalty)
        logits = jnp.where(seen, jnp.where(logits > 0, logits / r, logits * r), logits)
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
        keep = jnp.zeros_like(keep_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
        logits = jnp.where(keep, logits, neg)
    return logits


def sample_tokens(logits: jax.Array, key: jax.Array, params: SamplingParams, seen: jax.Array | None) -> jax.Array:
    """Next tokens ``[B]`` from logits ``[B, V]``: argmax when temperature is 0, else a categorical draw."""
    logits = process_logits(logits, params, seen)
    if params.temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


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


class Generator:
    """Compiled prefill / decode-step / decode-loop programs for one model (split once)."""

    def __init__(self, model):
        self.graphdef, self.state = nnx.split(model)
        self.config, self.mesh, self.dtype = model.config, model.mesh, model.dtype
        self.n = model.sequence_parallel  # > 1: ring prefill, cache slots split over `sequence`
        self.blockwise_from = model.blockwise_from
        self.prefill = jax.jit(self._prefill, static_argnames=("cache_len", "last"))
        self.decode_step = jax.jit(self._decode_step, donate_argnames=("cache_k", "cache_v"))
        # the loop takes the cache donated and hands it back, so XLA updates it in place (without the
        # donation the loop works on a copy: twice the cache in HBM)
        self.decode_loop = jax.jit(self._decode_loop, static_argnames=("max_new_tokens", "sampling", "stop_ids"),
                                   donate_argnames=("cache_k", "cache_v"))
        self.sample = jax.jit(sample_tokens, static_argnames=("params",))

    def blockwise(self, length: int) -> bool:
        """Whether a prompt of ``length`` tokens is prefilled by the ring/blockwise path (see
        :meth:`InternLM2.uses_blockwise`)."""
        return blockwise_attention(self.mesh, length, self.blockwise_from)

    def prompt_length(self, longest: int, bucket: int | None = None) -> int:
        """The padded prompt length for a longest prompt of ``longest`` tokens: its bucket (or the one
        given), and for the ring layout a multiple of 2n (and of n x block)."""
        s = bucket or bucket_length(longest)
        return padded_length(s, self.n) if self.blockwise(s) else s

    # --- the compiled programs (pure functions of the parameter state) --------------------------
    def _cache_constraint(self, x):
        if self.mesh is None:
            return x
        return jax.lax.with_sharding_constraint(x, named_sharding(CACHE_AXES, x.shape, self.mesh))

    def _prefill(self, state, ids, mask, positions, index, cache_len: int, last: int):
        """Prompt -> (last-position logits, cache, kv_valid). ``index`` is each token's causal index; with
        a sequence axis the tokens arrive in zigzag order and ``last`` is where the final one sits."""
        model = nnx.merge(self.graphdef, state)
        cfg = self.config
        b = ids.shape[0]
        shape = (cfg.num_hidden_layers, b, cache_len, cfg.num_key_value_heads, cfg.head_dim)
        cache_k = self._cache_constraint(jnp.zeros(shape, self.dtype))
        cache_v = self._cache_constraint(jnp.zeros(shape, self.dtype))
        kv_valid = jnp.zeros((b, cache_len), bool)
        if not self.blockwise(ids.shape[1]):
            logits, cache_k, cache_v, kv_valid = model.forward_cached(ids, positions, mask, cache_k, cache_v, kv_valid, 0)
            return logits, self._cache_constraint(cache_k), self._cache_constraint(cache_v), kv_valid
        from .ring import ring_attention, write_prefill

        mesh, nh, ok = self.mesh, cfg.num_attention_heads, mask.astype(bool)
        kv_valid = write_prefill(kv_valid, ok, mesh)

        def attend(q, k, v, row):
            o = ring_attention(q, k, v, index, index, ok, mesh, impl=model.attention_impl)
            return o, (write_prefill(row[0], k, mesh, nh), write_prefill(row[1], v, mesh, nh))

        cos, sin = rope_tables(cfg, positions, self.dtype)  # max(positions) + 1 over all shards: global
        x, (cache_k, cache_v), _ = model.run_layers(model.embed(ids), cos, sin, attend, (cache_k, cache_v))
        logits = model.logits(model.norm(x[:, last:last + 1]))[:, 0]
        return logits, self._cache_constraint(cache_k), self._cache_constraint(cache_v), kv_valid

    def _decode_step(self, state, tokens, positions, cache_k, cache_v, kv_valid, base, step):
        """Token number ``step`` of every sequence: logits ``[B, V]`` and the updated cache (donated).

        Without a sequence axis it goes to slot ``base + step``. With one, decode tokens go round-robin
        to the sequence shards (shard ``step % n``, local slot ``base + step // n``), so the shards fill
        evenly; each shard attends to its own slots and the partials merge by log-sum-exp.
        """
        model = nnx.merge(self.graphdef, state)
        b = tokens.shape[0]
        if self.n == 1:
            logits, cache_k, cache_v, kv_valid = model.forward_cached(
                tokens[:, None], positions[:, None], jnp.ones((b, 1), bool), cache_k, cache_v, kv_valid, base + step)
            return logits, self._cache_constraint(cache_k), self._cache_constraint(cache_v), kv_valid
        from .ring import sharded_decode_attention, write_decode

        mesh, nh = self.mesh, self.config.num_attention_heads
        impl = "ragged" if model.uses_ragged_decode(cache_k.shape[2]) else "dense"
        owner, slot = step % self.n, base + step // self.n
        kv_valid = write_decode(kv_valid, jnp.ones((b, 1), bool), owner, slot, mesh)

        def attend(q, k, v, row):
            ck = write_decode(row[0], k, owner, slot, mesh, nh)
            cv = write_decode(row[1], v, owner, slot, mesh, nh)
            return sharded_decode_attention(q, ck, cv, kv_valid[:, None, :], mesh, impl=impl), (ck, cv)

        cos, sin = rope_tables(self.config, positions[:, None], self.dtype)
        x, (cache_k, cache_v), _ = model.run_layers(model.embed(tokens[:, None]), cos, sin, attend, (cache_k, cache_v),
                                                    unroll=model.decode_unroll)
        logits = model.logits(model.norm(x))[:, 0]
        return logits, self._cache_constraint(cache_k), self._cache_constraint(cache_v), kv_valid

    def _decode_loop(self, state, logits, cache_k, cache_v, kv_valid, index, positions, seen, key,
                     max_new_tokens: int, sampling: SamplingParams, stop_ids: tuple[int, ...]):
        """Sample, record, decode, until every sequence stopped or ``max_new_tokens`` were made.

        Returns ``(tokens [B, max_new_tokens], number made per sequence [B], cache_k, cache_v, kv_valid)``;
        the cache (donated) comes back holding every token but the last one sampled."""
        b = logits.shape[0]
        stops = jnp.asarray(stop_ids if stop_ids else (-1,), jnp.int32)
        pad = stop_ids[0] if stop_ids else 0
        tokens = jnp.full((b, max_new_tokens), pad, jnp.int32)
        done = jnp.zeros((b,), bool)
        num = jnp.zeros((b,), jnp.int32)

        def cond(c):
            step, done = c[0], c[2]
            return (step < max_new_tokens) & ~jnp.all(done)

        def body(c):
            step, tokens, done, num, logits, ck, cv, valid, pos, seen = c
            tok = self.sample(logits, jax.random.fold_in(key, step), sampling, seen)
            tok = jnp.where(done, pad, tok)
            tokens = tokens.at[:, step].set(tok)
            num = num + (~done).astype(jnp.int32)
            done = done | jnp.isin(tok, stops)
            seen = seen.at[jnp.arange(b), tok].set(True)

            def advance(args):
                ck, cv, valid = args
                out = self._decode_step(state, tok, pos, ck, cv, valid, index, step)
                return out

            more = (step + 1 < max_new_tokens) & ~jnp.all(done)
            logits, ck, cv, valid = jax.lax.cond(more, advance, lambda a: (logits,) + a, (ck, cv, valid))
            return step + 1, tokens, done, num, logits, ck, cv, valid, pos + 1, seen

        init = (jnp.int32(0), tokens, done, num, logits, cache_k, cache_v, kv_valid, positions, seen)
        out = jax.lax.while_loop(cond, body, init)
        return out[1], out[3], out[5], out[6], out[7]

    # --- host-side preparation ----------------------------------------------------------------
    def prepare(self, prompts: Sequence[Sequence[int]], bucket: int | None = None) -> PreparedBatch:
        lengths = [len(p) for p in prompts]
        s = self.prompt_length(max(lengths), bucket)
        ids = np.zeros((len(prompts), s), np.int32)
        mask = np.zeros((len(prompts), s), np.int32)
        for i, p in enumerate(prompts):
            ids[i, s - len(p):] = p
            mask[i, s - len(p):] = 1
        positions = np.where(mask == 1, np.cumsum(mask, axis=1) - 1, 1).astype(np.int32)
        return PreparedBatch(ids, mask, positions, lengths)

    def put(self, x: np.ndarray, axes: tuple[str, ...]) -> jax.Array:
        if self.mesh is None:
            return jnp.asarray(x)
        return jax.device_put(x, named_sharding(axes, x.shape, self.mesh))

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

    def start(self, batch: PreparedBatch, max_new_tokens: int):
        """Prefill; returns first logits, cache, kv_valid, the slot base of decode tokens, the next
        positions and the repetition-penalty mask of tokens seen."""
        b, s = batch.ids.shape
        index = np.broadcast_to(np.arange(s, dtype=np.int32), (b, s))
        arrays = [batch.ids, batch.mask, batch.positions, index]
        cache_len, last, base, order = self.layout(s, max_new_tokens)
        if order is not None:  # permuted on the host: the devices get their chunks directly
            arrays = [a[:, order] for a in arrays]
        ids, mask, positions, index = (self.put(a, ("batch", "seq")) for a in arrays)
        logits, ck, cv, valid = self.prefill(self.state, ids, mask, positions, index, cache_len=cache_len, last=last)
        next_pos = jnp.asarray(batch.positions[:, -1] + 1, jnp.int32)
        seen = jnp.zeros((b, self.config.vocab_size), bool)
        seen = seen.at[jnp.arange(b)[:, None], jnp.asarray(batch.ids)].max(jnp.asarray(batch.mask) > 0)
        return logits, ck, cv, valid, jnp.int32(base), next_pos, seen


_GENERATORS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def generator_for(model) -> Generator:
    """The cached :class:`Generator` of a model (compiled programs are kept across calls). Parameters
    changed since (e.g. by training) are picked up; a changed setting (``attention_impl``,
    ``decode_impl``, ...) changes the graph definition and gets a new Generator."""
    gen = _GENERATORS.get(model)
    graphdef, state = nnx.split(model)
    if gen is None or graphdef != gen.graphdef:
        gen = _GENERATORS[model] = Generator(model)
    else:
        gen.state = state
    return gen


# --- public API ----------------------------------------------------------------------------------


def _model_limit(cfg) -> int:
    """Longest sequence allowed by default: max_position_embeddings, times the factor under dynamic NTK
    (the reference extrapolates there); pass ``max_length`` to go further on purpose."""
    rs = cfg.rope_scaling
    factor = rs.factor if rs is not None and rs.type == "dynamic" else 1.0
    return int(cfg.max_position_embeddings * factor)


def _encode_prompts(tok, prompts, add_bos: bool) -> list[list[int]]:
    out = []
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            if p == "":
                raise ValueError(f"prompt {i} is empty")
            if tok is None:
                raise ValueError("a tokenizer is needed for text prompts (or pass token id lists)")
            ids = tok.encode(p, add_bos=add_bos)
        else:
            ids = [int(t) for t in p]
        if not ids:
            raise ValueError(f"prompt {i} is empty")
        out.append(ids)
    return out


def _check_lengths(prompts: list[list[int]], max_new_tokens: int, limit: int, truncate: bool) -> list[list[int]]:
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
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
    return out


def generate_ids(model, prompts: Sequence[Sequence[int]], *, max_new_tokens: int = 128, temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0, seed: int = 0,
                 stop_ids: Sequence[int] = (2, 92542), max_length: int | None = None,
                 truncate: bool = False) -> list[list[int]]:
    """Token ids in, new token ids out (each list ends at and includes its stop id, if one came)."""
    sampling = SamplingParams(temperature, top_k, top_p, repetition_penalty)
    prompts = _encode_prompts(None, prompts, add_bos=False)
    prompts = _check_lengths(prompts, max_new_tokens, max_length or _model_limit(model.config), truncate)
    gen = generator_for(model)
    batch = gen.prepare(prompts)
    logits, ck, cv, valid, index, pos, seen = gen.start(batch, max_new_tokens)
    tokens, num, *_ = gen.decode_loop(gen.state, logits, ck, cv, valid, index, pos, seen, jax.random.key(seed),
                                      max_new_tokens=max_new_tokens, sampling=sampling,
                                      stop_ids=tuple(int(s) for s in stop_ids))
    tokens, num = np.asarray(tokens), np.asarray(num)
    return [tokens[i, : num[i]].tolist() for i in range(len(prompts))]


def _strip_stop(ids: list[int], stop_ids) -> list[int]:
    return ids[:-1] if ids and ids[-1] in stop_ids else ids


def generate(model, tok, prompts: str | Sequence[str | Sequence[int]], *, max_new_tokens: int = 128,
             add_bos: bool = True, stop_ids: Sequence[int] | None = None, skip_special_tokens: bool = False,
             **kwargs) -> list[str] | str:
    """Generate text for one prompt or a batch (prompts of different lengths are left-padded).

    Sampling: ``temperature`` (0 = greedy), ``top_k``, ``top_p``, ``repetition_penalty``, ``seed``.
    Each sequence stops at its own stop id (default: the tokenizer's, ``</s>`` and ``<|im_end|>``)
    or after ``max_new_tokens``; the stop token is not part of the text.
    """
    single = isinstance(prompts, str)
    batch = [prompts] if single else list(prompts)
    stop_ids = tuple(stop_ids if stop_ids is not None else (tok.stop_ids if tok is not None else (2, 92542)))
    ids = _encode_prompts(tok, batch, add_bos)
    out = generate_ids(model, ids, max_new_tokens=max_new_tokens, stop_ids=stop_ids, **kwargs)
    texts = [tok.decode(_strip_stop(o, stop_ids), skip_special_tokens=skip_special_tokens) for o in out]
    return texts[0] if single else texts


def stream(model, tok, prompt: str | Sequence[int], *, max_new_tokens: int = 128, temperature: float = 0.0,
           top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0, seed: int = 0,
           stop_ids: Sequence[int] | None = None, add_bos: bool = True, skip_special_tokens: bool = False,
           max_length: int | None = None, truncate: bool = False) -> Iterator[str]:
    """Yield text pieces as tokens are produced (one compiled decode step per token)."""
    sampling = SamplingParams(temperature, top_k, top_p, repetition_penalty)
    stop_ids = tuple(stop_ids if stop_ids is not None else tok.stop_ids)
    prompts = _check_lengths(_encode_prompts(tok, [prompt], add_bos), max_new_tokens,
                             max_length or _model_limit(model.config), truncate)
    gen = generator_for(model)
    logits, ck, cv, valid, index, pos, seen = gen.start(gen.prepare(prompts), max_new_tokens)
    decoder = tok.stream_decoder(skip_special_tokens=skip_special_tokens)
    key = jax.random.key(seed)
    for step in range(max_new_tokens):
        token = gen.sample(logits, jax.random.fold_in(key, step), sampling, seen)
        t = int(token[0])
        if t in stop_ids:
            break
        piece = decoder.push(t)
        if piece:
            yield piece
        if step + 1 < max_new_tokens:
            seen = seen.at[0, t].set(True)
            logits, ck, cv, valid = gen.decode_step(gen.state, token, pos, ck, cv, valid, index, step)
            pos = pos + 1
    tail = decoder.flush()
    if tail:
        yield tail


def chat(model, tok, messages: list[dict], *, max_new_tokens: int = 512, stream_to=None, **kwargs) -> dict:
    """One assistant turn for ``messages`` (InternLM2 chat template); returns the assistant message.

    Special tokens are kept in the content, so tool calls (``<|action_start|><|plugin|>...<|action_end|>``)
    survive; generation stops at ``<|im_end|>`` or ``</s>``. ``stream_to`` (e.g. ``print``-like callable)
    receives text pieces as they arrive.
    """
    prompt = tok.encode_chat(messages, add_generation_prompt=True)
    pieces = []
    for piece in stream(model, tok, prompt, max_new_tokens=max_new_tokens, add_bos=False, **kwargs):
        pieces.append(piece)
        if stream_to is not None:
            stream_to(piece)
    return {"role": "assistant", "content": "".join(pieces)}
