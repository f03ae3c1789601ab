"""An OpenAI-compatible HTTP server on the continuous-batching engine (FastAPI + uvicorn).

    internlm-jax serve --model DIR [--host 127.0.0.1] [--port 8000] [--tensor 8 ...] [--max-batch 64]

Endpoints: ``GET /v1/models``, ``POST /v1/completions`` (one prompt or a batch: text or token ids),
``POST /v1/chat/completions`` (``stream: true`` gives server-sent events in OpenAI's chunk format,
ending with ``data: [DONE]``), ``GET /v1/models/{id}``, ``GET /health``. Parameters, with OpenAI's
defaults (``null`` means the default): ``max_tokens`` (or ``max_completion_tokens``; without it a chat
reply may fill the context and a completion gets 16 tokens), ``temperature``, ``top_p``, ``top_k``,
``repetition_penalty``, ``presence_penalty``, ``frequency_penalty``, ``stop`` (strings, and token ids in
``stop_token_ids`` or in ``stop``), ``seed``, ``min_tokens`` and ``ignore_eos`` (vLLM's: no stop id
before ``min_tokens`` tokens; the end-of-text ids as ordinary tokens), ``tools`` (with ``tool_choice``
and ``parallel_tool_calls``), ``n`` (that many independent continuations, seeds ``seed``, ``seed + 1``,
...), ``logprobs`` (chat: with ``top_logprobs``; completions: the number of alternatives), ``echo``
(completions: the prompt's text first, and with ``logprobs`` its tokens' logprobs). Every response
carries ``usage`` (streams: in the last chunk, or with ``stream_options.include_usage`` in a final chunk
of its own, as OpenAI does).

A reply ends with the token that completes a stop string: ``usage`` and logprobs count no further. Bad
requests (and unknown paths) get a 4xx with OpenAI's error object naming the parameter; a full queue
answers 429; a client that disconnects frees its slot; SIGTERM stops accepting, lets running requests
finish, exits.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any, Union

from fastapi import Request  # here, not in create_app: FastAPI resolves the endpoints' annotations from module globals
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, field_validator

from .chat_format import FormatError, TextStream, calls_finish_reason, chat_prompt, feed_tokens, misspelt_key, usage
from .engine import MAX_LOGPROBS, Engine, EngineError, QueueFull, serving_length
from .generation import default_stop_ids
from .multihost import PeerFailed, finish

Number = StrictFloat  # ints are accepted, strings and booleans are not


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow")  # unknown OpenAI fields (user, ...) are ignored

    model: StrictStr
    max_tokens: StrictInt | None = None
    max_completion_tokens: StrictInt | None = None
    temperature: Number | None = None
    top_p: Number | None = None
    top_k: StrictInt | None = None
    repetition_penalty: Number | None = None
    presence_penalty: Number | None = None
    frequency_penalty: Number | None = None
    stop: StrictStr | list[Union[StrictStr, StrictInt]] | None = None
    stop_token_ids: list[StrictInt] | None = None
    seed: StrictInt | None = None
    min_tokens: StrictInt = 0  # vLLM's extensions: no stop id before that many tokens
    ignore_eos: StrictBool = False  # </s> and <|im_end|> do not end the reply
    n: StrictInt = 1
    stream: StrictBool = False
    stream_options: dict | None = None

    @field_validator("n", "stream", "min_tokens", "ignore_eos", "logprobs", "echo", mode="before", check_fields=False)
    @classmethod
    def _null_is_default(cls, value, info):
        """``null`` means the default, as in OpenAI's API (clients send ``"n": null`` for an unset n)."""
        return cls.model_fields[info.field_name].default if value is None else value


class CompletionRequest(_Request):
    prompt: StrictStr | list[StrictInt] | list[StrictStr] | list[list[StrictInt]]  # one, or a batch
    logprobs: StrictInt | None = None  # alternatives per token (the legacy API's form)
    echo: StrictBool = False
    suffix: StrictStr | None = None
    best_of: StrictInt | None = None


class ChatRequest(_Request):
    messages: list[dict[str, Any]] = Field(min_length=1)
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    parallel_tool_calls: StrictBool | None = None  # false: the reply ends after its first call
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = None


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def _type_step(x) -> bool:
    return isinstance(x, str) and (x in ("str", "int", "float", "bool", "dict", "list") or "[" in x
                                   or x.startswith("function-"))


def token_text(tok, token: int) -> tuple[str, list[int]]:
    """A token as OpenAI's logprobs show it: its text (``bytes:\\xNN`` for part of a character)
    and its bytes."""
    raw = tok.token_bytes(token)
    try:
        return raw.decode(), list(raw)
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw), list(raw)


def _clamp(logprob: float) -> float:
    return max(logprob, -9999.0)  # JSON has no -inf


class Choice:
    """One of a request's ``n`` continuations: its engine request and its incremental text. ``echo``
    (completions) is the prompt's text and how many leading prompt tokens it leaves out, sent before the
    completion (with its logprobs when asked).
    ``forced`` is the start of the reply that ``tool_choice`` put at the end of the prompt: it is
    parsed with the generated text (a tool call), never sent as content."""

    def __init__(self, tok, index: int, handle, stop: list[str], tools: bool, echo: tuple[str, int] | None = None,
                 keep: int | None = None, forced: str = "", one_call: bool = False):
        self.tok, self.index, self.handle, self.echo, self.keep = tok, index, handle, echo, keep
        self.shown = 0  # generated tokens shown (all of them, or at most ``keep``)
        self.decoder = tok.stream_decoder(skip_special_tokens=False)
        self.text = TextStream(stop, tools=tools, forced=forced, one_call=one_call)
        self.scored = 0  # tokens whose logprobs were sent
        self.offset = 0  # characters of text so far (completions' text_offset)
        self.spelled = tok.stream_decoder(skip_special_tokens=False)  # the characters each token adds

    def echoed(self) -> tuple[str, dict | None]:
        """The prompt's text and (with logprobs) its legacy logprobs object, whose tokens spell that text
        (``text_offset`` indexes it): the ``<s>`` put before a text prompt is left out, being no part of it.
        A prompt's first token has no logprob, as in OpenAI's echo."""
        text, skip = self.echo
        r = self.handle
        if r.logprobs is None:
            return text, None
        return text, self._legacy(r.prompt[skip:], [None, *r.prompt_token_logprobs][skip:],
                                  [None, *r.prompt_top_logprobs][skip:])

    def _legacy(self, ids, logprobs, tops) -> dict:
        """The completions API's logprobs object for tokens ``ids`` (offsets continue from the last)."""
        texts = [token_text(self.tok, t)[0] for t in ids]
        offsets = []
        for t in ids:  # where each token starts in the text (a byte token: at the character it is part of)
            offsets.append(self.offset)
            self.offset += len(self.spelled.push(t))
        shown = []
        for text, lp, top in zip(texts, logprobs, tops):
            if top is None:
                shown.append(None)
                continue
            top = {token_text(self.tok, a)[0]: _clamp(b) for a, b in top}
            top.setdefault(text, _clamp(lp))  # the sampled token is always listed
            shown.append(top)
        return {"tokens": texts, "token_logprobs": [None if lp is None else _clamp(lp) for lp in logprobs],
                "top_logprobs": shown, "text_offset": offsets}

    def finish_reason(self) -> str:
        """OpenAI's reason: "stop" or "length" ("tool_calls" is the caller's, which sees the calls)."""
        reason = "length" if self.keep is not None and self.shown >= self.keep else self.handle.finish_reason
        return "length" if reason == "length" and not self.text.stopped else "stop"

    def failure(self) -> APIError | None:
        """The error to answer with when the engine ended this choice without a reply: a failed step, or
        a cancellation that no stop string asked for (the server is stopping)."""
        reason = self.handle.finish_reason or ""
        if reason.startswith("error"):
            return APIError(500, f"generation failed ({reason})", kind="server_error")
        if reason == "cancelled" and not self.text.stopped:
            return APIError(503, "the request was cancelled: the server is stopping", kind="server_error")
        return None

    def logprobs(self, count: int, chat: bool) -> dict | None:
        """OpenAI's logprobs object for this choice's next ``count`` tokens (None without logprobs)."""
        r = self.handle
        if r.logprobs is None:
            return None
        span = slice(self.scored, self.scored + count)
        self.scored += count
        if not chat:
            return self._legacy(r.tokens[span], r.token_logprobs[span], r.top_logprobs[span])

        def entry(t, lp):
            text, raw = token_text(self.tok, t)
            return {"token": text, "logprob": _clamp(lp), "bytes": raw}
        return {"content": [{**entry(t, lp), "top_logprobs": [entry(a, b) for a, b in top]}
                            for t, lp, top in zip(r.tokens[span], r.token_logprobs[span], r.top_logprobs[span])],
                "refusal": None}


class JSONBodies:
    """ASGI middleware: a POST body is read as JSON whatever its content type. ``curl -d '{...}'`` sends
    ``application/x-www-form-urlencoded``; FastAPI would refuse that body as not an object. (Plain ASGI,
    not Starlette's BaseHTTPMiddleware, so streams and disconnects pass through untouched.)"""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] == "POST":
            kind = dict(scope["headers"]).get(b"content-type", b"").split(b";")[0].strip().lower()
            if kind != b"application/json":
                headers = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
                scope = dict(scope, headers=headers + [(b"content-type", b"application/json")])
        await self.app(scope, receive, send)


def create_app(engine: Engine, tok, model_name: str):
    """The FastAPI app serving ``engine`` under ``model_name``; the engine loop runs while the app does."""
    import contextlib

    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    @contextlib.asynccontextmanager
    async def lifespan(app):
        engine.start()
        try:
            yield
        finally:
            await asyncio.to_thread(engine.stop, True)  # drain: running requests finish
            if engine.multihost:
                finish()  # the followers were told to stop: leave the job with them

    app = FastAPI(title="internlm-jax", lifespan=lifespan)
    app.add_middleware(JSONBodies)

    @app.exception_handler(APIError)
    async def api_error(_, e: APIError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, e: StarletteHTTPException):
        if e.status_code == 404:
            message = f"{request.method} {request.url.path} is not an endpoint of this server"
        elif e.status_code == 405:
            message = f"{request.url.path} does not take {request.method}"
        else:
            message = str(e.detail)
        return JSONResponse(APIError(e.status_code, message).body(), status_code=e.status_code,
                            headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def unexpected(_, e: Exception):  # a bug of ours: still OpenAI's error shape (and logged by uvicorn)
        err = APIError(500, f"internal server error: {type(e).__name__}: {e}", kind="server_error")
        return JSONResponse(err.body(), status_code=500)

    @app.exception_handler(RequestValidationError)
    async def invalid(_, e: RequestValidationError):
        first = e.errors()[0]
        # the field path, without pydantic's union-member steps ("str", "list[int]", ...)
        loc = [str(x) for x in first.get("loc", ()) if x != "body" and not _type_step(x)]
        if first.get("type") == "json_invalid":
            err = APIError(400, f"the request body is not valid JSON ({first.get('msg')})")
        else:
            where = ".".join(loc) or "body"
            err = APIError(400, f"{where}: {first.get('msg')}", param=".".join(loc) or None)
        return JSONResponse(err.body(), status_code=400)

    @app.get("/health")
    async def health():
        running = sum(r is not None for r in engine.rows)
        return {"status": "ok", "running": running, "waiting": len(engine.waiting), "max_batch": engine.max_batch,
                "counts": dict(engine.stats)}  # requests finished (by reason), tokens, steps since start

    card = {"id": model_name, "object": "model", "created": 0, "owned_by": "internlm-jax",
            "max_model_len": engine.max_len}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [card]}

    @app.get("/v1/models/{name:path}")
    async def model_card(name: str):
        if name != model_name:
            raise APIError(404, f"model {name!r} does not exist; this server serves {model_name!r}", param="model",
                           code="model_not_found")
        return card

    def check_model(req: _Request):
        if req.model != model_name:
            raise APIError(404, f"model {req.model!r} does not exist; this server serves {model_name!r}",
                           param="model", code="model_not_found")

    def sampling(req: _Request, prompts: list[list[int]]) -> tuple[dict, list[str]]:
        if req.n < 1 or req.n > engine.max_queue:
            raise APIError(400, f"n must be from 1 to {engine.max_queue} (the server's max_queue), got {req.n}",
                           param="n")
        extra = req.model_extra or {}
        typo = misspelt_key(extra, list(type(req).model_fields))
        if typo:
            raise APIError(400, f"unknown parameter {typo[0]!r}; did you mean {typo[1]!r}?", param=typo[0])
        fmt = extra.get("response_format")
        plain_text = fmt is None or (isinstance(fmt, dict) and fmt.get("type") == "text")  # all we can promise
        unsupported = [("logit_bias", bool(extra.get("logit_bias"))), ("response_format", not plain_text),
                       ("audio", extra.get("audio") is not None), ("modalities", extra.get("modalities") not in
                                                                   (None, ["text"])),
                       ("web_search_options", extra.get("web_search_options") is not None)]
        if isinstance(req, ChatRequest):  # the legacy function-calling fields: tools replaced them
            unsupported += [(name, extra.get(name) is not None) for name in ("functions", "function_call")]
        if isinstance(req, CompletionRequest):
            unsupported += [("suffix", req.suffix is not None),
                            ("best_of", req.best_of is not None and req.best_of != req.n)]
        for name, used in unsupported:
            if used:
                hint = "; send them as tools (and tool_choice)" if name.startswith("function") else ""
                raise APIError(400, f"{name} is not supported by this server{hint}", param=name)
        named = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        max_tokens = getattr(req, named)
        if max_tokens is not None and max_tokens <= 0 and not scores_only(req):
            raise APIError(400, f"{named} must be a positive integer (0 only with echo), got {max_tokens}",
                           param=named)
        for i, prompt in enumerate(prompts):
            which = "the prompt" if len(prompts) == 1 else f"prompt {i}"
            room = engine.max_len - len(prompt)
            if room < 1:
                raise APIError(400, f"{which} has {len(prompt)} tokens; the context is {engine.max_len}",
                               param="messages" if isinstance(req, ChatRequest) else "prompt",
                               code="context_length_exceeded")
            if max_tokens is not None and max_tokens > room:
                raise APIError(400, f"{which} has {len(prompt)} tokens; with {named}={max_tokens} that exceeds "
                               f"the context of {engine.max_len} tokens", param=named,
                               code="context_length_exceeded")
            if req.min_tokens > room:  # without max_tokens the reply may fill the context, not more
                raise APIError(400, f"{which} has {len(prompt)} tokens; min_tokens={req.min_tokens} exceeds the "
                               f"{room} left in the context of {engine.max_len} tokens", param="min_tokens")
        if req.min_tokens < 0 or (max_tokens is not None and req.min_tokens > max_tokens):
            raise APIError(400, f"min_tokens must be from 0 to {named}, got {req.min_tokens}", param="min_tokens")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(req, name)
            if value is not None and not -2 <= value <= 2:
                raise APIError(400, f"{name} must be from -2 to 2, got {value}", param=name)
        stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        kw = dict(max_tokens=1 if scores_only(req) else max_tokens,
                  temperature=1.0 if req.temperature is None else req.temperature,
                  # top_p 0 (OpenAI accepts it) keeps the most likely token only: top_k 1
                  top_p=1.0 if req.top_p in (None, 0) else req.top_p,
                  top_k=1 if req.top_p == 0 else 0 if req.top_k in (None, -1) else req.top_k,  # -1: vLLM's "off"
                  repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
                  presence_penalty=req.presence_penalty or 0.0, frequency_penalty=req.frequency_penalty or 0.0,
                  seed=req.seed if req.seed is not None else int.from_bytes(uuid.uuid4().bytes[:4], "little"),
                  stop_ids=[s for s in stops if isinstance(s, int)] + list(req.stop_token_ids or []),
                  logprobs=logprobs_wanted(req), min_tokens=req.min_tokens, ignore_eos=req.ignore_eos)
        if isinstance(req, CompletionRequest) and req.echo:
            kw["prompt_logprobs"] = kw["logprobs"]  # echo with logprobs scores the prompt too
        return kw, [s for s in stops if isinstance(s, str)]

    def scores_only(req: _Request) -> bool:
        """echo with max_tokens 0: the prompt and its logprobs only (the engine still makes one token,
        which is not shown)."""
        return isinstance(req, CompletionRequest) and req.echo and req.max_tokens == 0

    def logprobs_wanted(req: _Request) -> int | None:
        """Alternatives per token the request asks for (None: no logprobs)."""
        if isinstance(req, ChatRequest):
            if req.top_logprobs is not None and not req.logprobs:
                raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
            k, name = (req.top_logprobs or 0) if req.logprobs else None, "top_logprobs"
        else:
            k, name = req.logprobs, "logprobs"
        if k is not None and not 0 <= k <= MAX_LOGPROBS:
            raise APIError(400, f"{name} must be from 0 to {MAX_LOGPROBS}, got {k}", param=name)
        return k

    async def run(prompts: list[list[int]], kw: dict, stop: list[str], tools: bool, chat: bool, req: _Request,
                  http: Request, echo: list[tuple[str, int]] | None = None, forced: str = ""):
        """Answer ``n`` continuations of each prompt; choice ``p * n + j`` is prompt ``p``'s ``j``-th, an
        engine request of its own with seed ``seed + j`` (so a prompt in a batch gets what it gets alone).
        ``echo``: each prompt's (text, tokens left out of it), sent before its completions; ``forced``: the
        reply's forced start."""
        loop = asyncio.get_running_loop()
        updates: asyncio.Queue = asyncio.Queue()
        choices: list[Choice] = []

        def on_update(index):
            def update(request, new):  # engine thread -> event loop
                loop.call_soon_threadsafe(updates.put_nowait, (index, list(new), request.finished.is_set()))
            return update

        try:
            for p, prompt in enumerate(prompts):
                for j in range(req.n):
                    i = len(choices)
                    room = engine.max_len - len(prompt)  # without max_tokens: chat to the context's end,
                    # completions 16 tokens (the defaults of OpenAI's two APIs)
                    params = {**kw, "seed": kw["seed"] + j,
                              "max_tokens": kw["max_tokens"] or (room if chat else min(16, room))}
                    handle = engine.submit(prompt, on_update=on_update(i), **params)
                    choices.append(Choice(tok, i, handle, stop, tools, echo[p] if echo else None,
                                          0 if scores_only(req) else None, forced,
                                          getattr(req, "parallel_tool_calls", None) is False))
        except (QueueFull, EngineError) as e:
            for c in choices:
                c.handle.cancel()
            if isinstance(e, QueueFull):
                raise APIError(429, f"the server is busy: {e}", kind="rate_limit_error", code="queue_full") from None
            raise APIError(400, str(e), param=getattr(e, "param", None)) from None
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())

        async def events():
            """(choice, text delta, new token count, finished) as tokens arrive, until every choice is
            finished; cancels a choice when a stop string shows."""
            running = len(choices)
            try:
                while running:
                    index, new, finished = await updates.get()
                    c = choices[index]
                    if c.keep is not None:
                        new = new[:max(0, c.keep - c.shown)]
                    delta, used = feed_tokens(c.text, c.decoder, new, finished)
                    c.shown += used
                    if finished:
                        running -= 1
                    if c.text.stopped and not c.handle.finished.is_set():
                        c.handle.cancel()
                    yield c, delta, used, finished
            finally:
                for c in choices:
                    c.handle.cancel()  # a no-op once finished; frees the slots when the client went away

        def choice(c: Choice, delta: dict | None = None, message: dict | None = None, reason=None, txt=None,
                   logprobs=None):
            if chat:
                key, value = ("delta", delta) if delta is not None else ("message", message)
                return {"index": c.index, key: value, "finish_reason": reason, "logprobs": logprobs}
            return {"index": c.index, "text": txt, "finish_reason": reason, "logprobs": logprobs}

        def total_usage() -> dict:
            return usage(sum(map(len, prompts)), sum(c.shown for c in choices))

        async def cancel_on_disconnect():
            """A whole (not streamed) reply: the client may leave while it is made; free its slots then.
            (A stream notices by itself: sending to a gone client fails.)"""
            while (await http.receive())["type"] != "http.disconnect":
                pass
            for c in choices:
                c.handle.cancel()

        obj = ("chat.completion" if chat else "text_completion")
        if not req.stream:
            watcher = asyncio.ensure_future(cancel_on_disconnect())
            try:
                async for _ in events():
                    pass
            finally:
                watcher.cancel()
            failed = next((e for e in map(Choice.failure, choices) if e is not None), None)
            if failed is not None:
                raise failed
            body = []
            for c in choices:
                echoed, echo_logprobs = c.echoed() if c.echo is not None else ("", None)  # offsets start here
                out, reason = c.text.text, c.finish_reason()
                logprobs = c.logprobs(c.shown, chat)
                if chat:
                    content, calls = c.text.reply()
                    message = {"role": "assistant", "content": content or (None if calls else "")}
                    if calls:  # (a reply cut by max_tokens stays "length", as OpenAI's)
                        message["tool_calls"], reason = calls, calls_finish_reason(reason)
                    body.append(choice(c, message=message, reason=reason, logprobs=logprobs))
                else:
                    if echo_logprobs is not None:  # the prompt's tokens first, then the completion's
                        logprobs = {k: echo_logprobs[k] + logprobs[k] for k in logprobs}
                    body.append(choice(c, txt=echoed + out, reason=reason, logprobs=logprobs))
            return JSONResponse({"id": rid, "object": obj, "created": created, "model": model_name,
                                 "choices": body, "usage": total_usage()})

        chunk_obj = "chat.completion.chunk" if chat else "text_completion"
        usage_chunk = bool((req.stream_options or {}).get("include_usage"))

        def sse(payload: dict) -> str:
            return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

        async def stream():
            try:
                async for event in stream_events():
                    yield event
            finally:
                for c in choices:
                    c.handle.cancel()  # the client went away mid-stream: free its slots now

        async def stream_events():
            head = {"id": rid, "object": chunk_obj, "created": created, "model": model_name}
            if chat:
                for c in choices:
                    yield sse({**head, "choices": [choice(c, delta={"role": "assistant", "content": ""})]})
            left = len(choices)
            echoing = {c.index for c in choices if c.echo is not None}
            async for c, delta, count, finished in events():
                if c.index in echoing:  # its prompt was prefilled (and scored) before this first event
                    echoing.discard(c.index)
                    text, scored = c.echoed()
                    yield sse({**head, "choices": [choice(c, txt=text, logprobs=scored)]})
                logprobs = c.logprobs(count, chat) if count else None
                if delta or logprobs:
                    yield sse({**head, "choices": [choice(c, delta={"content": delta}, txt=delta, logprobs=logprobs)]})
                if finished:
                    left -= 1
                    failed = c.failure()
                    if failed is not None:  # OpenAI's error event (its client raises it), and no more
                        yield sse(failed.body())
                        return
                    reason = c.finish_reason()
                    rest, calls = c.text.finish()
                    if rest:
                        yield sse({**head, "choices": [choice(c, delta={"content": rest}, txt=rest)]})
                    if calls:
                        reason = calls_finish_reason(reason)
                        deltas = [{"index": k, **call} for k, call in enumerate(calls)]
                        yield sse({**head, "choices": [choice(c, delta={"tool_calls": deltas})]})
                    last = {**head, "choices": [choice(c, delta={}, reason=reason, txt="")]}
                    if not left and not usage_chunk:
                        last["usage"] = total_usage()
                    yield sse(last)
            if usage_chunk:
                yield sse({**head, "choices": [], "usage": total_usage()})
            yield "data: [DONE]\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, http: Request):
        check_model(req)
        single = isinstance(req.prompt, str) or (req.prompt and isinstance(req.prompt[0], int))
        prompts = [req.prompt] if single else req.prompt
        if not prompts:
            raise APIError(400, "prompt is empty", param="prompt")
        ids = []
        for i, prompt in enumerate(prompts):
            which = "prompt" if single else f"prompt {i}"
            if not prompt:
                raise APIError(400, f"{which} is empty", param="prompt")
            if isinstance(prompt, str):
                try:
                    ids.append(tok.encode(prompt))
                except ValueError as e:  # text that is not valid Unicode
                    raise APIError(400, f"{which}: {e}", param="prompt") from None
                continue
            bad = [t for t in prompt if not 0 <= t < engine.config.vocab_size]
            if bad:
                raise APIError(400, f"{which} token id {bad[0]} is outside the vocabulary", param="prompt")
            ids.append(list(prompt))
        if len(ids) * req.n > engine.max_queue:
            raise APIError(400, f"{len(ids)} prompts x n={req.n} exceeds the server's max_queue ({engine.max_queue})",
                           param="prompt")
        kw, stop = sampling(req, ids)
        # a text prompt is echoed as sent, without the <s> that encode put before it
        echo = [(p, len(i) - len(tok.encode(p, add_bos=False))) if isinstance(p, str) else (tok.decode(p), 0)
                for p, i in zip(prompts, ids)] if req.echo else None
        return await run(ids, kw, stop, False, False, req, http, echo)

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest, http: Request):
        check_model(req)
        try:
            ids, forced, tools = chat_prompt(tok, req.messages, req.tools, req.tool_choice)
        except FormatError as e:
            raise APIError(400, str(e), param=e.param) from None
        except (ValueError, TypeError) as e:
            raise APIError(400, str(e), param="messages") from None
        kw, stop = sampling(req, [ids])
        return await run([ids], kw, stop, tools, True, req, http, forced=forced)

    return app


def serve(model, tok, *, model_name: str, host: str = "127.0.0.1", port: int = 8000, max_batch: int = 8,
          max_len: int | None = None, max_queue: int = 256, prefill_chunk: int = 512, log_level: str = "info") -> None:
    """Run the server until SIGINT/SIGTERM (then running requests finish, and it exits). In a multi-host
    job every process calls this; process 0 serves HTTP, the others run the same engine steps.
    ``max_len`` defaults to :func:`~internlm_jax.engine.serving_length`."""
    import jax
    import uvicorn

    engine = Engine(model, max_batch=max_batch, max_len=max_len or serving_length(model), max_queue=max_queue,
                    prefill_chunk=prefill_chunk, stop_ids=default_stop_ids(model.config, tok))
    if jax.process_index() != 0:  # many hosts: process 0 owns the port and decides; the others follow
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():  # a job's SIGTERM reaches every process:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)  # process 0 drains, then tells this one to stop
        failed = engine.follow()
        finish()
        if failed:
            raise PeerFailed(f"process 0 failed: {failed}")
        return
    import signal
    import threading

    server = uvicorn.Server(uvicorn.Config(create_app(engine, tok, model_name), host=host, port=port,
                                           log_level=log_level, timeout_graceful_shutdown=600))
    # uvicorn drains on SIGTERM, restores the handler it found and raises the signal again: the default
    # handler would then kill the process after a clean drain (status 143). Its own handler instead also
    # covers a SIGTERM that comes while it starts, and a repeat after the drain only asks it to stop again.
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, server.handle_exit) if main else None
    try:
        server.run()
    finally:
        if main:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
