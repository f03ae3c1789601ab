"""Offline batch inference through the continuous-batching engine, resumable.

    internlm-jax generate --model DIR --input prompts.jsonl --output out.jsonl

Each input line is a JSON object with an ``id`` and one of ``prompt`` (text), ``messages`` (chat, as for
the server; ``tools``, ``tool_choice`` and ``parallel_tool_calls`` allowed) or ``prompt_ids``; optional
``max_tokens`` (or ``max_new_tokens``), ``temperature``, ``top_p``, ``top_k``, ``repetition_penalty``,
``presence_penalty``, ``frequency_penalty``, ``seed``, ``stop``, ``stop_token_ids``, ``logprobs``
(alternatives per token, 0 to 20), ``min_tokens``, ``ignore_eos`` (``null`` = the default). Other keys
(an eval set's labels) are allowed and not read, nor copied to the output (join on ``id``), except
OpenAI parameters this command cannot honour (``n`` > 1, ``best_of``, ``logit_bias``, ...) and
near-misspellings of an option (``temprature``), which are errors.
Each output line carries the ``id``, ``text`` (chat: also
``tool_calls``), ``prompt_tokens``, ``completion_tokens`` (up to the token that completed a stop string)
and ``finish_reason`` (with ``logprobs``: also ``token_ids``, ``token_logprobs`` and ``top_logprobs``,
``[id, logprob]`` pairs), written in the order requests finish. Every input line is checked before
anything runs.

A rerun skips the ids already in the output. Lines are appended whole, one ``write`` each, as their
requests finish, so a killed run loses no finished line; a torn last line (a kill mid-write) is cut
off on the next run before anything is appended.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

from .chat_format import FormatError, TextStream, calls_finish_reason, chat_prompt, feed_tokens, misspelt_key
from .files import file_in_the_way, progress_bar

OPTIONS = ("max_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "presence_penalty",
           "frequency_penalty", "seed", "logprobs", "min_tokens", "ignore_eos")
TUNED = OPTIONS + ("max_new_tokens", "stop_token_ids")  # what a line may set; the rest of a line is its content
UNSUPPORTED = ("n", "best_of", "logit_bias", "response_format", "suffix", "echo", "stream", "functions",
               "function_call")


if TYPE_CHECKING:  # no JAX at import: the CLI checks --input and --output before JAX starts
    from .engine import Engine


class BatchInputError(ValueError):
    """An input line that cannot run (the message names the file, line and field)."""


def input_lines(path: str | os.PathLike):
    """``(where, line object)`` for each non-blank line of an input file, with what needs no model
    checked: UTF-8 JSON objects, each with a unique string or integer ``id``, no unsupported or misspelt
    key (``null`` values dropped: they mean the default). The CLI runs it before the model loads."""
    path = Path(path)
    if path.is_dir():
        raise BatchInputError(f"--input {path} is a folder; give the JSONL file's path")
    if not path.is_file():
        raise BatchInputError(f"--input {path} does not exist")
    seen = {}
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            where = f"{path}:{n}"
            try:
                line = raw.decode("utf-8").removeprefix("\ufeff")  # a byte-order mark before line 1
            except UnicodeDecodeError:
                raise BatchInputError(f"{where}: not UTF-8 text") from None
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as e:
                raise BatchInputError(f"{where}: not valid JSON ({e.msg})") from None
            if not isinstance(item, dict) or "id" not in item:
                raise BatchInputError(f"{where}: each line must be an object with an 'id'")
            for key, value in item.items():
                if key in UNSUPPORTED and value not in (None, False) and not (key == "n" and value == 1):
                    raise BatchInputError(f"{where}: {key!r} is not supported by the batch command")
            typo = misspelt_key(item, TUNED)  # a misspelt option would silently change nothing
            if typo:
                raise BatchInputError(f"{where}: unknown key {typo[0]!r}; did you mean {typo[1]!r}?")
            item = {k: v for k, v in item.items() if not (k in TUNED and v is None)}  # null: the default
            rid = item["id"]
            if not isinstance(rid, (str, int)) or isinstance(rid, bool):
                raise BatchInputError(f"{where}: 'id' must be a string or an integer")
            if rid in seen:
                raise BatchInputError(f"{where}: id {rid!r} already used on line {seen[rid]}")
            seen[rid] = n
            yield where, item


def read_requests(path: str | os.PathLike, tok, engine: Engine, defaults: dict) -> list[dict]:
    """Parse and check every line: ``[{"id", "ids", "kw", "stop", "chat", "tools", "forced", "one_call"}]`` (``forced``:
    the reply's start that ``tool_choice`` puts at the end of the prompt)."""
    from .engine import EngineError
    from .generation import DEFAULT_NEW_TOKENS

    out = []
    for where, item in input_lines(path):
        rid = item["id"]
        given = [k for k in ("prompt", "messages", "prompt_ids") if k in item]
        if len(given) != 1:
            raise BatchInputError(f"{where}: give exactly one of 'prompt', 'messages' or 'prompt_ids'")
        forced, tools = "", False
        one_call = item.get("parallel_tool_calls")
        if one_call is not None and not isinstance(one_call, bool):
            raise BatchInputError(f"{where}: 'parallel_tool_calls' must be true or false")
        try:
            if "prompt" in item:
                if not isinstance(item["prompt"], str) or not item["prompt"]:
                    raise BatchInputError(f"{where}: 'prompt' must be a non-empty string")
                ids = tok.encode(item["prompt"])
            elif "messages" in item:
                ids, forced, tools = chat_prompt(tok, item["messages"], item.get("tools"), item.get("tool_choice"))
            else:
                ids = item["prompt_ids"]
                if not isinstance(ids, list) or not all(isinstance(t, int) for t in ids):
                    raise BatchInputError(f"{where}: 'prompt_ids' must be a list of integers")
        except (FormatError, ValueError, TypeError) as e:
            if isinstance(e, BatchInputError):
                raise
            raise BatchInputError(f"{where}: {e}") from None
        kw = {k: v for k, v in defaults.items() if k != "stop"}
        if "max_new_tokens" in item and "max_tokens" not in item:  # the CLI's and generate()'s name
            item["max_tokens"] = item["max_new_tokens"]
        kw.update({k: item[k] for k in OPTIONS if k in item})
        if kw.get("max_tokens") is None:  # as generate(): the default, or what fits in the context
            if len(ids) >= engine.max_len:
                raise BatchInputError(f"{where}: the prompt has {len(ids)} tokens; the context (--max-len) "
                                      f"is {engine.max_len}")
            kw["max_tokens"] = min(DEFAULT_NEW_TOKENS, engine.max_len - len(ids))
        stop = item.get("stop")
        stop = defaults.get("stop") if stop is None else stop  # absent or null: the command's --stop
        stop = stop or []
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or not all(isinstance(s, (str, int)) for s in stop):
            raise BatchInputError(f"{where}: 'stop' must be a string or a list of strings / token ids")
        stop_token_ids = item.get("stop_token_ids") or []
        if not isinstance(stop_token_ids, list) or not all(isinstance(s, int) for s in stop_token_ids):
            raise BatchInputError(f"{where}: 'stop_token_ids' must be a list of token ids")
        kw["stop_ids"] = [s for s in stop if isinstance(s, int)] + stop_token_ids
        try:
            engine.check(ids, **kw)
        except EngineError as e:
            raise BatchInputError(f"{where}: {e}") from None
        out.append({"id": rid, "ids": ids, "kw": kw, "stop": [s for s in stop if isinstance(s, str)],
                    "chat": "messages" in item, "forced": forced, "tools": tools, "one_call": one_call is False,
                    "shown": 0})
    return out


OUTPUT_KEYS = frozenset({"id", "finish_reason", "completion_tokens"})  # in every line this command writes


def check_output(path: Path, input_path: str | os.PathLike) -> None:
    """An --output the command can append to and read back on a rerun: a regular file (or none yet) in
    a folder, not a pipe, terminal or folder, and not the input file."""
    if path.exists() and Path(input_path).exists() and path.samefile(input_path):
        raise BatchInputError(f"--output {path} is the input file; results go to a file of their own")
    if path.is_dir():
        raise BatchInputError(f"--output {path} is a folder; give the output file's path")
    if path.exists() and not path.is_file():
        raise BatchInputError(f"--output {path} is not a regular file (a pipe or device: a rerun reads the "
                              "output back to skip finished ids); give a file path")
    blocked = file_in_the_way(path)
    if blocked is not None:
        raise BatchInputError(f"--output {path}: {blocked} is a file, not a folder")


def finished_ids(path: Path) -> set:
    """Ids already in the output (checked by :func:`check_output`); a torn last line is cut off first (it
    never finished writing)."""
    if not path.exists():
        return set()
    raw = path.read_bytes()
    end = raw.rfind(b"\n") + 1
    done = set()
    for n, line in enumerate(raw[:end].splitlines(), 1):  # checked before anything is cut
        if line.strip():
            try:
                record = json.loads(line)
                if not OUTPUT_KEYS <= record.keys():  # e.g. a copy of the input: its ids are not done
                    raise KeyError
                done.add(record["id"])
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
                raise BatchInputError(f"{path}:{n}: not an output line of this command (it has no "
                                      f"{', '.join(sorted(OUTPUT_KEYS))}); refusing to append") from None
    if end != len(raw):
        with open(path, "r+b") as f:
            f.truncate(end)
    return done


def run_batch(engine: Engine, tok, input_path, output_path, *, defaults: dict | None = None,
              progress: bool | None = None) -> dict:
    """Run every request of ``input_path`` not yet in ``output_path``; returns counts and tokens/s."""
    from .engine import QueueFull

    output_path = Path(output_path)
    check_output(output_path, input_path)
    requests = read_requests(input_path, tok, engine, defaults or {})
    done = finished_ids(output_path)
    todo = [r for r in requests if r["id"] not in done]
    output_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(output_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    start, tokens, pending = time.perf_counter(), 0, list(reversed(todo))
    running: dict = {}
    try:
        with progress_bar(len(todo), "generating", progress, unit="req") as bar:
            while pending or running:
                while pending:  # keep the engine's queue full, never over
                    item = pending[-1]
                    text = TextStream(item["stop"], tools=item["tools"], forced=item["forced"],
                                      one_call=item["one_call"])
                    decoder = tok.stream_decoder(skip_special_tokens=False)

                    def follow(request, new, item=item, text=text, decoder=decoder):  # as the server does
                        item["shown"] += feed_tokens(text, decoder, new, request.finished.is_set())[1]

                    try:
                        handle = engine.submit(item["ids"], on_update=follow, **item["kw"])
                    except QueueFull:
                        break
                    running[handle] = (item, text)
                    pending.pop()
                engine.step()
                for handle in [h for h, (_, text) in running.items() if h.finished.is_set() or text.stopped]:
                    item, text = running.pop(handle)
                    if not handle.finished.is_set():
                        handle.cancel()
                    os.write(fd, (json.dumps(_result(handle, item, text), ensure_ascii=False) + "\n").encode())
                    tokens += item["shown"]
                    bar.update(1)
                    bar.set_postfix_str(f"{tokens / max(time.perf_counter() - start, 1e-9):.1f} tok/s")
        os.fsync(fd)
    finally:
        os.close(fd)
        for handle in running:
            handle.cancel()
    seconds = time.perf_counter() - start
    return {"requests": len(todo), "skipped": len(requests) - len(todo), "tokens": tokens,
            "seconds": seconds, "tokens_per_s": tokens / seconds if seconds else 0.0}


def _result(handle, item, stream: TextStream) -> dict:
    text, calls = stream.reply()
    reason = "stop" if stream.stopped else handle.finish_reason
    n = item["shown"]  # up to the token that completed a stop string
    out = {"id": item["id"], "text": text, "prompt_tokens": len(item["ids"]),
           "completion_tokens": n, "finish_reason": reason}
    if handle.logprobs is not None:  # the model's log-probabilities of every generated token
        out.update(token_ids=handle.tokens[:n], token_logprobs=handle.token_logprobs[:n],
                   top_logprobs=[[list(pair) for pair in top] for top in handle.top_logprobs[:n]])
    if calls:
        out["tool_calls"], out["finish_reason"] = calls, calls_finish_reason(reason)
    return out
