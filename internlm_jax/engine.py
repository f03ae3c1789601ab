"""Continuous batching on the generator's decode step: requests join and leave a running batch.

The engine holds a fixed number of cache rows (``max_batch``) of ``max_len`` slots each, on the
devices, in the one :class:`~internlm_jax.cache.KVCache` layout (on a mesh with a ``sequence`` axis
each row's slots are split over it, in order). Between decode chunks it

1. admits waiting requests into free rows;
2. prefills them **in chunks** (at most ``prefill_chunk`` prompt tokens between two decode chunks,
   :meth:`InternLM2.forward_extend`), so a long prompt never stalls the running decodes for its whole
   length;
3. runs one decode chunk for every row with :meth:`Generator.chunk` (the same compiled step as
   :func:`~internlm_jax.generation.generate`), each row writing its own next slot and sampling with
   its own values and key;
4. hands each request its new tokens, and frees the row of a finished one at once.

A request's tokens do not depend on what else runs: its prefill sees only its row, its row's slots
start at 0 whatever the other rows hold, a row's draws use its own key and positions, and under
dynamic NTK rope its decode base follows its own position (a static batch of ``generate``, like the
reference's batched decoding, shares the longest sequence's).

Drive it with :meth:`Engine.step` from one thread (scripts, the offline batch command) or
:meth:`Engine.start` a background thread (the server); :meth:`Engine.submit` is thread-safe.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import itertools
import json
import logging
import threading
import time
from typing import Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from .arrays import to_host
from .cache import KVCache
from .generation import (
    DecodeState,
    RowSampling,
    SamplingParams,
    as_int,
    bucket_length,
    check_keywords,
    check_stop_ids,
    default_stop_ids,
    generator_for,
    model_limit,
    seed_value,
)
from .interrupts import HeldInterrupt
from .multihost import StepChannel, abort, check_same, leave_now
from .sharding import named_sharding

logger = logging.getLogger(__name__)

MAX_LOGPROBS = 20  # alternatives per token a request may ask for (OpenAI's top_logprobs limit)
TOP_COMPUTED = (0, 1, 2, 5, 10, MAX_LOGPROBS)  # alternatives a program computes: a few compiled variants


def _computed(k: int) -> int:
    """The alternatives to compute for a request of ``k`` (-1: none); requests take their first ``k``."""
    return -1 if k < 0 else next(c for c in TOP_COMPUTED if c >= k)
IDLE = 1 << 30  # the slot base of a row without a decoding request: its writes fall off the cache
HEARTBEAT_S = 1.0  # an idle multi-host leader sends an empty step this often


class EngineError(ValueError):
    """A request the engine cannot take; the message names the parameter, ``param`` is its name."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class QueueFull(RuntimeError):
    """More requests are waiting than ``max_queue``: try again later (HTTP 429)."""


@dataclasses.dataclass(eq=False)
class Request:
    """One generation request and its progress. ``tokens`` grows as the engine produces them;
    ``finish_reason`` is ``"stop"`` (a stop id came; it is not in ``tokens``), ``"length"``
    (``max_tokens``), ``"cancelled"`` or ``"error:<exception>"`` (a failed step, or its own ``on_update``
    raised); ``finished`` is set once it is final.

    ``min_tokens``: no stop id (the engine's or the request's) is sampled before that many tokens.
    ``ignore_eos``: the engine's stop ids (``</s>``, ``<|im_end|>``) come out as ordinary tokens (the
    request's own still stop it). With ``logprobs`` (``k >= 0``) each token also gets its
    log-probability in ``token_logprobs`` and the ``k`` most likely ``(id, logprob)`` pairs in
    ``top_logprobs`` (see :class:`~internlm_jax.generation.TokenScores`); these lists grow with
    ``tokens``. With ``prompt_logprobs`` the same is filled in during prefill for prompt tokens 1.. in
    ``prompt_token_logprobs`` / ``prompt_top_logprobs`` (the first token has none)."""

    prompt: list[int]
    max_tokens: int
    sampling: SamplingParams = SamplingParams()
    seed: int = 0
    stop_ids: frozenset[int] = frozenset()
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    min_tokens: int = 0
    ignore_eos: bool = False
    id: int = dataclasses.field(default_factory=itertools.count().__next__)
    tokens: list[int] = dataclasses.field(default_factory=list)
    token_logprobs: list[float] = dataclasses.field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = dataclasses.field(default_factory=list)
    prompt_token_logprobs: list[float] = dataclasses.field(default_factory=list)
    prompt_top_logprobs: list[list[tuple[int, float]]] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None
    finished: threading.Event = dataclasses.field(default_factory=threading.Event)
    on_update: Callable[["Request", list[int]], None] | None = None  # called from the engine thread
    submitted: float = dataclasses.field(default_factory=time.perf_counter)
    first_token: float | None = None
    cancelled: bool = False

    def cancel(self) -> None:
        """Stop generating (a disconnected client): the engine frees the row at its next step."""
        self.cancelled = True

    def wait(self, timeout: float | None = None) -> list[int]:
        if not self.finished.wait(timeout):
            raise TimeoutError(f"request {self.id} not finished after {timeout} s")
        return self.tokens


@dataclasses.dataclass(eq=False)
class _Row:
    request: Request
    prefilled: int = 0  # prompt tokens written so far
    decoding: bool = False


def serving_length(model) -> int:
    """The row length (``max_len``) the server and the batch command default to: the model's context, at
    most 4096 slots (each row holds that many slots of cache, whatever its request needs)."""
    return min(model_limit(model.config), 4096)


class Engine:
    """Continuous batching for one model (see the module docstring).

    ``max_batch`` cache rows of ``max_len`` slots (default :func:`serving_length`, as the server's; a
    longer one, past the context, is taken on purpose as ``generate``'s ``max_length`` is): a request
    needs ``len(prompt) + max_tokens <= max_len``. ``prefill_chunk`` bounds the prompt tokens
    processed between two decode chunks of ``decode_chunk`` steps (shorter than generate's: a finished
    request's row waits at most that long);
    ``max_queue`` bounds the waiting requests (:class:`QueueFull` beyond). ``stop_ids`` end every
    request (default: :func:`~internlm_jax.generation.default_stop_ids` of the model's config; pass
    ``default_stop_ids(model.config, tok)`` for another tokenizer); a request may add its own.
    """

    def __init__(self, model, *, max_batch: int = 8, max_len: int | None = None, prefill_chunk: int = 512,
                 max_queue: int = 256, decode_chunk: int = 8, stop_ids: Sequence[int] | None = None,
                 step_timeout_s: float = 600.0):
        max_len = serving_length(model) if max_len is None else max_len
        sizes = {}
        for name, value in (("max_batch", max_batch), ("max_len", max_len), ("prefill_chunk", prefill_chunk),
                            ("max_queue", max_queue), ("decode_chunk", decode_chunk)):
            least = 2 if name == "max_len" else 1  # a prompt token and a new one
            if as_int(value) is None or as_int(value) < least:
                what = "an integer of at least 2 (prompt + new tokens)" if least == 2 else "a positive integer"
                raise EngineError(f"{name} must be {what}, got {value!r}", name)
            sizes[name] = as_int(value)
        max_batch, max_len, prefill_chunk, max_queue, decode_chunk = sizes.values()
        self.gen = generator_for(model)
        self.config = model.config
        self.max_batch, self.max_len, self.max_queue = max_batch, max_len, max_queue
        self.prefill_chunk = 1 << (prefill_chunk.bit_length() - 1)  # a power of two
        self.decode_chunk = decode_chunk
        try:
            self.stop_ids = default_stop_ids(model.config) if stop_ids is None else \
                check_stop_ids(stop_ids, model.config.vocab_size)
        except (TypeError, ValueError) as e:
            raise EngineError(str(e), "stop_ids") from None
        self.waiting: collections.deque[Request] = collections.deque()
        self.rows: list[_Row | None] = [None] * max_batch
        self.lock = threading.Lock()
        self.wake = threading.Condition(self.lock)
        self.steps = 0  # decode steps run (the device state's step counter)
        self.stats = collections.Counter()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._release_next: list[int] = []  # rows freed by the last step, released on the devices next
        self.multihost = jax.process_count() > 1
        self.channel = StepChannel(timeout_s=step_timeout_s) if self.multihost else None
        # process 0 of a multi-host job: Ctrl-C stops between steps (the others run each step with it)
        # a second Ctrl-C leaves at once; in a multi-host job, telling the other processes
        self._leave = functools.partial(leave_now, "interrupted (Ctrl-C) twice") if self.multihost else None
        self.interrupts = HeldInterrupt("stopping the job before the next engine step", self._leave)
        if self.multihost:  # every process must run the same programs: settings and model named if not
            config = json.dumps({f.name: getattr(self.config, f.name) for f in dataclasses.fields(self.config)
                                 if f.compare}, default=str, sort_keys=True)  # the model's shape
            check_same({"--max-batch": max_batch, "--max-len": max_len, "--prefill-chunk": self.prefill_chunk,
                        "decode_chunk": decode_chunk, "the model's config": config, "--dtype": str(model.dtype),
                        "the stop ids": json.dumps(self.stop_ids)}, "engine settings")
        self._activate = jax.jit(_activate, donate_argnames=("ds", "base"))
        self._release = jax.jit(_release, donate_argnames=("ds", "base"))
        self.ds, self.base = self._empty_state()

    # --- requests -------------------------------------------------------------------------------
    def submit(self, prompt: Sequence[int], *, on_update=None, **params) -> Request:
        """Queue a request (token ids; ``params`` as for :meth:`check`); returns it at once. Raises
        :class:`EngineError` for a request that can never run and :class:`QueueFull` when
        ``max_queue`` requests already wait. ``on_update(request, new_tokens)`` is called from the
        engine's thread as tokens arrive and once more when the request is finished."""
        check_keywords(type(self).submit, params, type(self).check, taken=("self", "prompt"))
        request = self.check(prompt, **params)
        request.on_update = on_update
        with self.lock:
            if self._stopping:
                raise EngineError("the engine is stopped; start() it again to take requests")
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are already waiting (max_queue={self.max_queue})")
            self.waiting.append(request)
            self.wake.notify()
        return request

    def check(self, prompt: Sequence[int], *, max_tokens: int, temperature: float = 0.0, top_k: int = 0,
              top_p: float = 1.0, repetition_penalty: float = 1.0, presence_penalty: float = 0.0,
              frequency_penalty: float = 0.0, seed: int = 0, stop_ids: Sequence[int] = (),
              logprobs: int | None = None, prompt_logprobs: int | None = None, min_tokens: int = 0,
              ignore_eos: bool = False) -> Request:
        """The :class:`Request` these parameters make, not queued; :class:`EngineError` names the
        parameter that is wrong."""
        if isinstance(prompt, jax.Array | np.ndarray):  # a 1-D array of ids
            prompt = np.asarray(prompt).tolist() if np.asarray(prompt).ndim == 1 else None
        ids = None if prompt is None or isinstance(prompt, str | bytes) else [as_int(t) for t in prompt]
        if ids is None or None in ids:
            raise EngineError("the prompt must be a list of token ids", "prompt")
        prompt = ids
        if not prompt:
            raise EngineError("the prompt is empty", "prompt")
        bad = [t for t in prompt if not 0 <= t < self.config.vocab_size]
        if bad:
            raise EngineError(f"prompt token id {bad[0]} is outside the vocabulary (0..{self.config.vocab_size - 1})",
                              "prompt")
        if as_int(max_tokens) is None or as_int(max_tokens) < 1:
            raise EngineError(f"max_tokens must be a positive integer, got {max_tokens!r}", "max_tokens")
        max_tokens = as_int(max_tokens)
        if len(prompt) + max_tokens > self.max_len:
            raise EngineError(f"the prompt has {len(prompt)} tokens; with max_tokens={max_tokens} that exceeds the "
                              f"context of {self.max_len} tokens (the engine's max_len)", "max_tokens")
        try:
            sampling = SamplingParams(temperature, top_k, top_p, repetition_penalty, presence_penalty,
                                      frequency_penalty)
        except ValueError as e:  # its message starts with the parameter's name
            raise EngineError(str(e), str(e).split()[0]) from None
        if sampling.top_k > self.config.vocab_size:  # keeps every token, as top_k = vocab does (and fits int32)
            sampling = dataclasses.replace(sampling, top_k=self.config.vocab_size)
        try:
            seed = seed_value(seed)
        except ValueError as e:
            raise EngineError(str(e), "seed") from None
        for name, k in (("logprobs", logprobs), ("prompt_logprobs", prompt_logprobs)):
            if k is not None and (as_int(k) is None or not 0 <= as_int(k) <= MAX_LOGPROBS):
                raise EngineError(f"{name} must be an integer from 0 to {MAX_LOGPROBS}, got {k!r}", name)
        logprobs, prompt_logprobs = (None if k is None else as_int(k) for k in (logprobs, prompt_logprobs))
        if as_int(min_tokens) is None or not 0 <= as_int(min_tokens) <= max_tokens:
            raise EngineError(f"min_tokens must be an integer from 0 to max_tokens ({max_tokens}), got {min_tokens!r}",
                              "min_tokens")
        if not isinstance(ignore_eos, bool | np.bool_):
            raise EngineError(f"ignore_eos must be true or false, got {ignore_eos!r}", "ignore_eos")
        ignore_eos = bool(ignore_eos)
        if isinstance(stop_ids, str | bytes) or not isinstance(stop_ids, Iterable):
            raise EngineError(f"stop_ids must be a list of token ids, got {stop_ids!r}", "stop_token_ids")
        stop_ids = list(stop_ids)  # (a generator is read once)
        stops = [as_int(s) for s in stop_ids]
        bad = [s for s, i in zip(stop_ids, stops) if i is None or not 0 <= i < self.config.vocab_size]
        if bad:
            raise EngineError(f"stop token id {bad[0]!r} is not a token id (0..{self.config.vocab_size - 1})",
                              "stop_token_ids")
        return Request(prompt, max_tokens, sampling, seed, frozenset(stops), logprobs, prompt_logprobs,
                       as_int(min_tokens), ignore_eos)

    @property
    def busy(self) -> bool:
        """Whether any request is waiting or running (``step()`` has work to do)."""
        return bool(self.waiting) or any(r is not None for r in self.rows)

    # --- one scheduling step --------------------------------------------------------------------
    def step(self) -> bool:
        """Admit, prefill up to ``prefill_chunk`` tokens, run one decode chunk; False when idle.

        The step is decided on the host (:meth:`_plan`), sent to the other processes of a multi-host
        job (which run :meth:`follow`), run on the devices by every process (:meth:`_execute`), and its
        tokens handed to the requests (:meth:`_collect`)."""
        if self._looping():
            raise EngineError("the engine runs its own loop (start() was called): submit requests and wait "
                              "for them (run_until_done, or request.finished), or stop() it first")
        if self.multihost:  # the other processes run each step too: Ctrl-C only between steps
            self.interrupts.arm()
            self.interrupts.check()
        plan = self._plan()
        if self.multihost:
            self.channel.send(plan)
        out = self._execute(plan)
        self._collect(plan, out)
        return bool(plan["prefill"] or plan["decode"])

    def follow(self) -> str | None:
        """A multi-host follower: run the steps process 0 sends until it stops; returns process 0's error
        when it stopped because of one (None after a clean end)."""
        first = True
        # a first Ctrl-C is held and never raised here: the job ends when process 0 stops it
        ignored = HeldInterrupt(f"process {jax.process_index()} goes on until process 0 stops the job "
                                "(interrupt process 0)", self._leave)
        ignored.arm()
        try:
            while True:
                plan = self.channel.receive(timed=not first)
                first = False
                if plan.get("stop"):
                    return plan.get("error")
                self._execute(plan)
        finally:
            ignored.disarm()

    def _looping(self) -> bool:
        """Whether the background loop (:meth:`start`) runs the steps, and this is another thread."""
        thread = self._thread
        return thread is not None and thread.is_alive() and threading.current_thread() is not thread

    def run_until_done(self, requests: Sequence[Request] = ()) -> None:
        """Drive :meth:`step` on this thread (or, after :meth:`start`, wait for the background loop) until
        nothing is waiting or running and ``requests``, which must have been submitted here, are finished."""
        while self.busy or any(not r.finished.is_set() for r in requests):
            if self._looping():
                pending = next((r for r in requests if not r.finished.is_set()), None)
                if pending is None:
                    time.sleep(0.005)
                elif not pending.finished.wait(0.05) and not self.busy and not pending.finished.wait(0.5):
                    raise EngineError("run_until_done was given requests that were never submitted to this engine")
                continue
            if not self.busy:
                raise EngineError("run_until_done was given requests that were never submitted to this engine")
            self.step()

    def close(self, error: str | None = None) -> None:
        """Tell multi-host followers to return from :meth:`follow` (no-op on one process), with the
        error that ended process 0's work, if one did, so that they fail too."""
        if self.multihost:
            self.interrupts.disarm()
            self.channel.send({"stop": True, **({"error": error} if error else {})})

    def start(self) -> "Engine":
        """Run the scheduling loop on a background thread (it sleeps while idle)."""
        if self._thread is not None and not self._thread.is_alive():  # a stop() that timed out, since done
            self._thread = None
        if self._thread is not None and self._stopping:
            raise EngineError("the engine is still stopping (an earlier stop() timed out); stop() it again "
                              "without a timeout before start()")
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name="internlm-jax-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop the loop; with ``drain`` the running and waiting requests finish first."""
        if self._thread is None:
            return
        with self.lock:
            if not drain:
                for r in list(self.waiting) + [row.request for row in self.rows if row is not None]:
                    r.cancel()
            self._stopping = True
            self.wake.notify()
        self._thread.join(timeout)
        if not self._thread.is_alive():  # else it is still finishing: start() must not run a second loop
            self._thread = None

    def _loop(self) -> None:
        while True:
            with self.lock:
                while not self.busy and not self._stopping:
                    self.wake.wait(HEARTBEAT_S if self.multihost else None)
                    if self.multihost and not self.busy and not self._stopping:
                        break  # an empty step: followers learn that process 0 is alive
                if self._stopping and not self.busy:
                    self.close()
                    return
            try:
                self.step()
            except Exception as e:  # never leave clients hanging: fail what is running, keep serving
                logger.exception("engine step failed; its running requests end with error:%s", type(e).__name__)
                if self.multihost:  # the processes may disagree now: stop (the followers time out)
                    abort(f"engine step failed on process 0 ({type(e).__name__}: {str(e).splitlines()[0][:200]})")
                self.stats["errors"] += 1
                for row in self.rows:
                    if row is not None:
                        self._finish(row.request, "error:" + type(e).__name__)
                self.rows = [None] * self.max_batch
                self._release_next = []
                self.ds, self.base = self._empty_state()

    # --- internals ------------------------------------------------------------------------------
    def _empty_state(self):
        b, t, cfg, gen = self.max_batch, self.max_len, self.config, self.gen
        cache = KVCache.zeros(cfg, b, t, gen.dtype, gen.mesh)
        vec = lambda x: gen.put(x, ("batch",))  # noqa: E731
        row_keys = jax.jit(  # made on the devices (host keys cannot span processes)
            lambda: jax.random.split(jax.random.key(0), b),
            out_shardings=None if gen.mesh is None else named_sharding(("batch",), (b,), gen.mesh))()
        rows = RowSampling(vec(np.zeros(b, np.float32)), vec(np.zeros(b, np.int32)), vec(np.ones(b, np.float32)),
                           vec(np.ones(b, np.float32)), row_keys, vec(np.zeros(b, np.float32)),
                           vec(np.zeros(b, np.float32)), vec(np.zeros(b, np.int32)), vec(np.zeros(b, bool)))
        ds = DecodeState(gen.put(np.zeros((b, cfg.vocab_size), np.float32), ("batch", "act_vocab")), cache,
                         vec(np.zeros(b, np.int32)),
                         gen.put(np.zeros((b, cfg.vocab_size), bool), ("batch", "act_vocab")),
                         vec(np.ones(b, bool)), gen.put(np.int32(self.steps), ()), rows)
        return ds, vec(np.full(b, IDLE, np.int32))

    def _plan(self) -> dict:
        """This step's work, as plain data: rows to release, prompt chunks to prefill (oldest request
        first, ``prefill_chunk`` tokens in all), rows that start decoding, and the decode chunk."""
        release, self._release_next = self._release_next, []
        with self.lock:
            for r in [r for r in self.waiting if r.cancelled]:
                self.waiting.remove(r)
                self._finish(r, "cancelled")
            for i, row in enumerate(self.rows):
                if row is not None and row.request.cancelled:
                    self._finish(row.request, "cancelled")
                    self.rows[i] = None
                    release.append(i)
            for i in range(self.max_batch):
                if self.rows[i] is None and self.waiting:
                    self.rows[i] = _Row(self.waiting.popleft())
        prefill, activate, budget = [], [], self.prefill_chunk
        pending = sorted((r.request.submitted, i) for i, r in enumerate(self.rows) if r is not None and not r.decoding)
        for _, i in pending:
            row = self.rows[i]
            prompt = row.request.prompt
            while budget > 0 and row.prefilled < len(prompt):
                left = len(prompt) - row.prefilled
                size = min(self.prefill_chunk, bucket_length(min(left, budget)))
                take = min(left, size, budget)
                # the slots this chunk can see, rounded up to a power of two, at least prefill_chunk (a
                # few programs per chunk size; a chunk's cost follows the prompt so far, not max_len)
                keys = min(self.max_len, max(self.prefill_chunk, 1 << (row.prefilled + size - 1).bit_length()))
                op = {"row": i, "tokens": prompt[row.prefilled:row.prefilled + take], "start": row.prefilled,
                      "size": size, "seq_len": len(prompt), "logprobs": -1, "keys": keys}
                if row.request.prompt_logprobs is not None:  # score each token's next prompt token
                    op.update(logprobs=_computed(row.request.prompt_logprobs),
                              targets=prompt[row.prefilled + 1:row.prefilled + take + 1])
                prefill.append(op)
                row.prefilled += take
                budget -= take
            if row.prefilled == len(prompt):
                request = row.request
                banned = {*self.stop_ids, *request.stop_ids} if request.min_tokens else set()
                activate.append({"row": i, "prompt": prompt, "seed": request.seed,
                                 "sampling": list(dataclasses.astuple(request.sampling)),  # field order
                                 "base": len(prompt) - self.steps, "ignore_eos": request.ignore_eos,
                                 "min_position": len(prompt) + request.min_tokens,  # stop ids banned below
                                 "ban": sorted(t for t in banned if 0 <= t < self.config.vocab_size)})
                row.decoding = True
            if budget <= 0:
                break
        decode = None
        active = [i for i, r in enumerate(self.rows) if r is not None and r.decoding]
        if active:
            # at most the steps the furthest request still needs, rounded up to a power of two (a
            # handful of programs; tokens past a request's end are dropped)
            need = max(self.rows[i].request.max_tokens - len(self.rows[i].request.tokens) for i in active)
            f = RowSampling.features([self.rows[i].request.sampling for i in active])
            wanted = [self.rows[i].request.logprobs for i in active if self.rows[i].request.logprobs is not None]
            decode = {"rows": active, "steps": min(self.decode_chunk, 1 << (max(need, 1) - 1).bit_length()),
                      "features": list(dataclasses.astuple(f)),
                      "logprobs": _computed(max(wanted, default=-1))}  # -1: no row asked, none computed
        return {"release": release, "prefill": prefill, "activate": activate, "decode": decode}

    def _execute(self, plan: dict):
        """Run a plan on the devices (every process of a job runs the same plans in the same order);
        returns the decode chunk's ``(tokens, emitted, scores)`` on the host (or None) and the prompt
        scores of the prefill chunks that asked, ``[(row, scores)]``."""
        if plan["release"]:
            mask = np.zeros(self.max_batch, bool)
            mask[plan["release"]] = True
            self.ds, self.base = self._release(self.ds, self.base, mask)
        last, prompt_scores = {}, []
        for op in plan["prefill"]:
            tokens, targets = np.zeros(op["size"], np.int32), np.zeros(op["size"], np.int32)
            tokens[:len(op["tokens"])] = op["tokens"]
            targets[:len(op.get("targets", ()))] = op.get("targets", ())
            positions = np.arange(op["start"], op["start"] + op["size"], dtype=np.int32)
            last[op["row"]], cache, scores = self.gen.extend(
                self.gen.state, self.gen.layers, self.ds.cache, tokens, positions, np.int32(op["row"]),
                np.int32(op["start"]), np.int32(len(op["tokens"])), np.int32(op["seq_len"]), targets,
                logprobs=op["logprobs"], keys=op["keys"])
            if scores is not None:
                prompt_scores.append((op["row"], jax.tree.map(lambda x, n=len(op["targets"]): to_host(x)[:n], scores)))
            self.ds = dataclasses.replace(self.ds, cache=cache)
            self.stats["prefill_tokens"] += len(op["tokens"])
        for op in plan["activate"]:
            seen = np.zeros(self.config.vocab_size, bool)
            seen[op["prompt"]] = True
            t, k, p, r, presence, frequency = op["sampling"]
            if (presence or frequency) and self.ds.counts is None:  # counted from the first request that asks
                counts = np.zeros((self.max_batch, self.config.vocab_size), np.int32)
                self.ds = dataclasses.replace(self.ds, counts=self.gen.put(counts, ("batch", "act_vocab")))
            if op["ban"] and self.ds.ban is None:  # likewise the banned ids, from the first min_tokens
                ban = np.zeros((self.max_batch, self.config.vocab_size), bool)
                self.ds = dataclasses.replace(self.ds, ban=self.gen.put(ban, ("batch", "act_vocab")))
            banned = np.zeros(self.config.vocab_size, bool)
            banned[op["ban"]] = True
            # the row's next slot is len(prompt): slot = base + (global step)
            self.ds, self.base = self._activate(self.ds, self.base, np.int32(op["row"]), last[op["row"]],
                                                np.int32(len(op["prompt"])), seen, np.float32(t), np.int32(k),
                                                np.float32(p), np.float32(r), np.float32(presence),
                                                np.float32(frequency), np.uint32(op["seed"]), np.int32(op["base"]),
                                                np.int32(op["min_position"]), np.bool_(op["ignore_eos"]), banned)
        decode = plan["decode"]
        if decode is None:
            return None, prompt_scores
        features = SamplingParams(*decode["features"])
        self.ds, tokens, emitted, scores = self.gen.chunk(self.gen.state, self.gen.layers, self.ds, self.base,
                                                          steps=decode["steps"], sampling=features,
                                                          stop_ids=self.stop_ids, logprobs=decode["logprobs"])
        self.steps += decode["steps"]
        self.stats["decode_steps"] += decode["steps"]
        return (to_host(tokens), to_host(emitted), jax.tree.map(to_host, scores)), prompt_scores

    def _collect(self, plan: dict, out) -> None:
        """Hand the prefill chunks' prompt scores and the decode chunk's tokens (and scores) to their
        requests; finished rows are free at once (their device rows are released at the start of the
        next step)."""
        out, prompt_scores = out
        for i, scores in prompt_scores:
            request = self.rows[i].request
            request.prompt_token_logprobs.extend(scores.logprob.tolist())
            request.prompt_top_logprobs.extend(_pairs(scores, j, request.prompt_logprobs)
                                               for j in range(len(scores.logprob)))
        if out is None:
            return
        tokens, emitted, scores = out
        now = time.perf_counter()
        for i in plan["decode"]["rows"]:
            request = self.rows[i].request
            new, reason = [], None
            for j, (t, ok) in enumerate(zip(tokens[i], emitted[i])):
                if not ok:
                    reason = reason or "stop"
                    break
                t = int(t)
                if (t in self.stop_ids and not request.ignore_eos) or t in request.stop_ids:
                    reason = "stop"
                    break
                new.append(t)
                if request.logprobs is not None:  # scores are always there when a running row asked
                    request.token_logprobs.append(float(scores.logprob[i, j]))
                    request.top_logprobs.append(_pairs(scores, (i, j), request.logprobs))
                if len(request.tokens) + len(new) >= request.max_tokens:
                    reason = "length"
                    break
            if new:
                request.first_token = request.first_token or now
                request.tokens.extend(new)
                self.stats["generated_tokens"] += len(new)
                self._notify(request, new)
            if reason is not None:
                self._finish(request, reason)
                self.rows[i] = None
                self._release_next.append(i)

    def _finish(self, request: Request, reason: str) -> None:
        if request.finished.is_set():
            return
        request.finish_reason = reason
        request.finished.set()
        self.stats["finished"] += 1
        self.stats["finished_" + reason.split(":")[0]] += 1  # finished_stop, _length, _cancelled, _error
        self._notify(request, [])

    def _notify(self, request: Request, new: list[int]) -> None:
        """Call the request's ``on_update``. One that raises ends its own request (``error:<exception>``,
        its row freed at the next step, the callback not called again) and nothing else: the other
        requests and the engine go on."""
        if request.on_update is None:
            return
        try:
            request.on_update(request, new)
        except Exception as e:
            logger.exception("on_update of request %d raised; the request is ended", request.id)
            self.stats["callback_errors"] += 1
            request.on_update = None
            request.cancel()
            self._finish(request, "error:" + type(e).__name__)


def _pairs(scores, at, k: int) -> list[tuple[int, float]]:
    """The ``k`` most likely ``(id, logprob)`` of one position of host-side scores."""
    return [(int(a), float(b)) for a, b in zip(scores.top_ids[at][:k], scores.top_logprobs[at][:k])]


def _activate(ds: DecodeState, base, row, logits, position, seen, temperature, top_k, top_p, penalty, presence,
              frequency, seed, row_base, min_position, ignore_stop, banned):
    """Row ``row`` starts decoding: its first logits, position, tokens seen (none generated yet),
    sampling values, key, and the ids it may not sample below ``min_position``."""
    r = ds.rows
    key = jax.random.key(seed)
    set_ = lambda x, v: x.at[row].set(v)  # noqa: E731
    rows = RowSampling(set_(r.temperature, temperature), set_(r.top_k, top_k), set_(r.top_p, top_p),
                       set_(r.repetition_penalty, penalty), set_(r.key, key), set_(r.presence_penalty, presence),
                       set_(r.frequency_penalty, frequency), set_(r.min_position, min_position),
                       set_(r.ignore_stop, ignore_stop))
    return (dataclasses.replace(ds, logits=set_(ds.logits, logits), positions=set_(ds.positions, position),
                                seen=set_(ds.seen, seen), done=set_(ds.done, False), rows=rows,
                                counts=None if ds.counts is None else set_(ds.counts, 0),
                                ban=None if ds.ban is None else set_(ds.ban, banned)),
            set_(base, row_base))


def _release(ds: DecodeState, base, mask):
    """Rows in ``mask`` stop: done, position 0, and a slot base past the cache (their writes drop)."""
    return (dataclasses.replace(ds, done=ds.done | mask, positions=jnp.where(mask, 0, ds.positions)),
            jnp.where(mask, IDLE, base))
