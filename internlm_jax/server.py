"""An OpenAI-compatible HTTP server on the continuous-batching engine (FastAPI + uvicorn).

    internlm-jax serve --model DIR [--host 127.0.0.1] [--port 8000] [--tensor 8 ...] [--max-batch 64]

Endpoints: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions`` (``stream: true``
gives server-sent events in OpenAI's chunk format, ending with ``data: [DONE]``), ``GET /health``.
Parameters: ``max_tokens`` (or ``max_completion_tokens``), ``temperature``, ``top_p``, ``top_k``,
``repetition_penalty``, ``stop`` (strings, and token ids in ``stop_token_ids`` or in ``stop``),
``seed``, ``tools``; ``n`` must be 1. Every response carries ``usage`` (streams: in the last chunk).
Bad requests get a 4xx with OpenAI's error object naming the parameter; a full queue answers 429; a
client that disconnects frees its slot; SIGTERM stops accepting, lets running requests finish, exits.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr

from .chat_format import FormatError, TextStream, parse_tool_calls, to_internlm_messages, usage
from .engine import Engine, EngineError, QueueFull
from .multihost import finish

Number = StrictFloat  # ints are accepted, strings and booleans are not


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow")  # unknown OpenAI fields (user, logit_bias, ...) are ignored

    model: StrictStr
    max_tokens: StrictInt | None = None
    max_completion_tokens: StrictInt | None = None
    temperature: Number | None = None
    top_p: Number | None = None
    top_k: StrictInt | None = None
    repetition_penalty: Number | None = None
    stop: StrictStr | list[Union[StrictStr, StrictInt]] | None = None
    stop_token_ids: list[StrictInt] | None = None
    seed: StrictInt | None = None
    n: StrictInt = 1
    stream: StrictBool = False
    stream_options: dict | None = None


class CompletionRequest(_Request):
    prompt: StrictStr | list[StrictInt] | list[StrictStr]


class ChatRequest(_Request):
    messages: list[dict[str, Any]] = Field(min_length=1)
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None


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


def create_app(engine: Engine, tok, model_name: str):
    """The FastAPI app serving ``engine`` under ``model_name``; the engine loop runs while the app does."""
    import contextlib

    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse

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

    @app.exception_handler(APIError)
    async def api_error(_, e: APIError):
        return JSONResponse(e.body(), status_code=e.status)

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

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                            "owned_by": "internlm-jax", "max_model_len": engine.max_len}]}

    def check_model(req: _Request):
        if req.model != model_name:
            raise APIError(404, f"model {req.model!r} does not exist; this server serves {model_name!r}",
                           param="model", code="model_not_found")

    def sampling(req: _Request, prompt: list[int]) -> dict:
        if req.n != 1:
            raise APIError(400, f"n={req.n} is not supported (only n=1)", param="n")
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        if max_tokens is not None and max_tokens <= 0:
            raise APIError(400, f"max_tokens must be a positive integer, got {max_tokens}", param="max_tokens")
        room = engine.max_len - len(prompt)
        if room < 1:
            raise APIError(400, f"the prompt has {len(prompt)} tokens; the context is {engine.max_len}",
                           param="messages" if isinstance(req, ChatRequest) else "prompt",
                           code="context_length_exceeded")
        if max_tokens is not None and max_tokens > room:
            raise APIError(400, f"the prompt has {len(prompt)} tokens; with max_tokens={max_tokens} that exceeds "
                           f"the context of {engine.max_len} tokens", param="max_tokens",
                           code="context_length_exceeded")
        stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        kw = dict(max_tokens=max_tokens or room, temperature=1.0 if req.temperature is None else req.temperature,
                  top_p=1.0 if req.top_p is None else req.top_p, top_k=req.top_k or 0,
                  repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
                  seed=req.seed if req.seed is not None else int.from_bytes(uuid.uuid4().bytes[:4], "little"),
                  stop_ids=[s for s in stops if isinstance(s, int)] + list(req.stop_token_ids or []))
        return kw, [s for s in stops if isinstance(s, str)]

    async def run(prompt: list[int], kw: dict, stop: list[str], tools: bool, chat: bool, req: _Request):
        loop = asyncio.get_running_loop()
        updates: asyncio.Queue = asyncio.Queue()

        def on_update(request, new):  # engine thread -> event loop
            loop.call_soon_threadsafe(updates.put_nowait, (list(new), request.finished.is_set()))

        try:
            handle = engine.submit(prompt, on_update=on_update, **kw)
        except QueueFull as e:
            raise APIError(429, f"the server is busy: {e}", kind="rate_limit_error", code="queue_full") from None
        except EngineError as e:
            raise APIError(400, str(e)) from None
        decoder = tok.stream_decoder(skip_special_tokens=False)
        text = TextStream(stop, tools=tools)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())

        async def events():
            """(text delta, finished) as tokens arrive; cancels the request when a stop string shows."""
            try:
                while True:
                    new, finished = await updates.get()
                    delta = "".join(text.push(p) for p in map(decoder.push, new) if p)
                    if finished:
                        delta += text.push(decoder.flush())
                    if text.stopped and not handle.finished.is_set():
                        handle.cancel()
                    yield delta, finished
                    if finished:
                        return
            finally:
                handle.cancel()  # a no-op once finished; frees the slot when the client went away

        def finish_reason():
            if text.stopped or handle.finish_reason == "stop":
                return "stop"
            return "length" if handle.finish_reason == "length" else (handle.finish_reason or "stop")

        def choice(delta: dict | None = None, message: dict | None = None, reason=None, txt=None):
            if chat:
                key, value = ("delta", delta) if delta is not None else ("message", message)
                return {"index": 0, key: value, "finish_reason": reason, "logprobs": None}
            return {"index": 0, "text": txt, "finish_reason": reason, "logprobs": None}

        obj = ("chat.completion" if chat else "text_completion")
        if not req.stream:
            async for _ in events():
                pass
            if handle.finish_reason and handle.finish_reason.startswith("error"):
                raise APIError(500, f"generation failed ({handle.finish_reason})", kind="server_error")
            out = text.text
            reason = finish_reason()
            if chat:
                content, calls = parse_tool_calls(out) if tools else (out, [])
                message = {"role": "assistant", "content": content}
                if calls:
                    message["tool_calls"], reason = calls, "tool_calls"
                body_choice = choice(message=message, reason=reason)
            else:
                body_choice = choice(txt=out, reason=reason)
            return JSONResponse({"id": rid, "object": obj, "created": created, "model": model_name,
                                 "choices": [body_choice], "usage": usage(len(prompt), len(handle.tokens))})

        chunk_obj = "chat.completion.chunk" if chat else "text_completion"

        def sse(payload: dict) -> str:
            return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

        async def stream():
            try:
                async for event in stream_events():
                    yield event
            finally:
                handle.cancel()  # the client went away mid-stream: free its slot now

        async def stream_events():
            head = {"id": rid, "object": chunk_obj, "created": created, "model": model_name}
            if chat:
                yield sse({**head, "choices": [choice(delta={"role": "assistant", "content": ""})]})
            async for delta, finished in events():
                if delta:
                    yield sse({**head, "choices": [choice(delta={"content": delta}, txt=delta)]})
                if finished:
                    reason = finish_reason()
                    rest, calls = text.finish()
                    if rest:
                        yield sse({**head, "choices": [choice(delta={"content": rest}, txt=rest)]})
                    if calls:
                        reason = "tool_calls"
                        deltas = [{"index": k, **c} for k, c in enumerate(calls)]
                        yield sse({**head, "choices": [choice(delta={"tool_calls": deltas})]})
                    yield sse({**head, "choices": [choice(delta={}, reason=reason, txt="")],
                               "usage": usage(len(prompt), len(handle.tokens))})
            yield "data: [DONE]\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest):
        check_model(req)
        prompt = req.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise APIError(400, "a list of several prompts is not supported; send one request each",
                               param="prompt")
            prompt = prompt[0]
        if isinstance(prompt, str):
            if not prompt:
                raise APIError(400, "prompt is empty", param="prompt")
            ids = tok.encode(prompt)
        else:
            ids = list(prompt)
            if not ids:
                raise APIError(400, "prompt is empty", param="prompt")
            bad = [t for t in ids if not 0 <= t < engine.config.vocab_size]
            if bad:
                raise APIError(400, f"prompt token id {bad[0]} is outside the vocabulary", param="prompt")
        kw, stop = sampling(req, ids)
        return await run(ids, kw, stop, False, False, req)

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest):
        check_model(req)
        try:
            messages = to_internlm_messages(req.messages, req.tools if req.tool_choice != "none" else None)
            ids = tok.encode_chat(messages, add_generation_prompt=True)
        except (FormatError, ValueError, TypeError) as e:
            raise APIError(400, str(e), param="messages") from None
        kw, stop = sampling(req, ids)
        return await run(ids, kw, stop, bool(req.tools), True, req)

    return app


def serve(model, tok, *, model_name: str, host: str = "127.0.0.1", port: int = 8000, max_batch: int = 8,
          max_len: int = 4096, max_queue: int = 256, prefill_chunk: int = 512, log_level: str = "info") -> None:
    """Run the server until SIGINT/SIGTERM (then running requests finish, and it exits). In a multi-host
    job every process calls this; process 0 serves HTTP, the others run the same engine steps."""
    import jax
    import uvicorn

    engine = Engine(model, max_batch=max_batch, max_len=max_len, max_queue=max_queue, prefill_chunk=prefill_chunk,
                    stop_ids=tok.stop_ids)
    if jax.process_index() != 0:  # many hosts: process 0 owns the port and decides; the others follow
        engine.follow()
        finish()
        return
    app = create_app(engine, tok, model_name)
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=600)
