"""OpenAI-style chat messages and tool calls <-> InternLM2's chat format (see FACTS: tool use).

* ``tools`` become a second system message ``<|im_start|>system name=<|plugin|>`` holding the JSON
  list of function definitions (name, description, parameters);
* an assistant message's ``tool_calls`` become ``<|action_start|><|plugin|>\\n{"name": ..., "parameters":
  {...}}<|action_end|>`` after its content; ``role: "tool"`` messages go back in as
  ``environment name=<|plugin|>`` messages; messages in InternLM's own agent format keep their channel
  (``system`` or ``environment`` with ``name`` ``"plugin"`` or ``"interpreter"``), so SFT data of
  code-interpreter turns renders as the reference does;
* model output is split back into content and tool calls (:func:`parse_tool_calls`; a code-interpreter
  call, ``<|action_start|><|interpreter|>``, is no OpenAI tool call and stays in the content), and
  :class:`TextStream` does it incrementally for streaming, holding back any text that may still turn
  into a marker or a stop string, so markers split over pieces are recognised.
"""

from __future__ import annotations

import difflib
import json
import uuid
from typing import Any, Iterable, Mapping, Sequence

ACTION_START, ACTION_END, PLUGIN, INTERPRETER = "<|action_start|>", "<|action_end|>", "<|plugin|>", "<|interpreter|>"
CALL_START = ACTION_START + PLUGIN
# a system/environment message's ``name`` -> the channel its header names (InternLM's agent format)
CHANNELS = {"plugin": "plugin", "interpreter": "interpreter", PLUGIN: "plugin", INTERPRETER: "interpreter"}


class FormatError(ValueError):
    """A chat request that cannot be rendered: the message names the message and field, ``param`` the
    request field at fault (``messages``, ``tools`` or ``tool_choice``)."""

    def __init__(self, message: str, param: str = "messages"):
        super().__init__(message)
        self.param = param


def tool_definitions(tools: Sequence[Mapping]) -> list[dict]:
    """OpenAI ``tools`` (``{"type": "function", "function": {...}}``) -> InternLM2 plugin definitions."""
    out = []
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, Mapping) else None
        if not isinstance(tool, Mapping) or tool.get("type", "function") != "function" or not isinstance(fn, Mapping):
            raise FormatError(f"tools[{i}] must be {{'type': 'function', 'function': {{'name': ...}}}}", "tools")
        if not isinstance(fn.get("name"), str) or not fn["name"]:
            raise FormatError(f"tools[{i}].function.name must be a non-empty string", "tools")
        out.append({k: fn[k] for k in ("name", "description", "parameters") if k in fn})
    return out


def _content(msg: Mapping, i: int, optional: bool = False) -> str:
    """A message's text; only an assistant's (``optional``: it may carry just tool calls) may be absent."""
    content = msg.get("content")
    if content is None:
        if not optional:
            raise FormatError(f"messages[{i}] ({msg.get('role')}) has no 'content'")
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
        parts = []
        for part in content:
            # an assistant's refusal (a part OpenAI's models send back) is its text, too
            kind = part.get("type") if isinstance(part, Mapping) else None
            key = "refusal" if kind == "refusal" and msg.get("role") == "assistant" else "text"
            if kind != key or not isinstance(part.get(key), str):
                raise FormatError(f"messages[{i}].content: only text parts are supported")
            parts.append(part[key])
        return "".join(parts)
    raise FormatError(f"messages[{i}].content must be a string or a list of text parts")


def _call_text(call: Mapping, i: int) -> str:
    fn = call.get("function") if isinstance(call, Mapping) else None
    if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str):
        raise FormatError(f"messages[{i}].tool_calls: each call needs function.name")
    args = fn.get("arguments")
    args = "{}" if args is None or args == "" else args  # OpenAI accepts "" for a call without arguments
    try:
        params = json.loads(args) if isinstance(args, str) else args
    except json.JSONDecodeError:
        params = None
    if not isinstance(params, Mapping):  # a JSON object (HF-style messages give it as a dict); else the
        if not isinstance(args, str):  # string as it was generated (a model's malformed call, replayed)
            raise FormatError(f"messages[{i}].tool_calls: arguments of {fn['name']!r} must be a JSON object "
                              "or a string")
        params = args
    return f"{CALL_START}\n{json.dumps({'name': fn['name'], 'parameters': params}, ensure_ascii=False)}{ACTION_END}"


def misspelt_key(keys: Iterable[str], known: Sequence[str]) -> tuple[str, str] | None:
    """The first of ``keys`` that is unknown but close to a known one, with that one (``max_token`` ->
    ``max_tokens``): a typo the server or the batch command would otherwise ignore silently."""
    for key in keys:
        near = difflib.get_close_matches(key, known, n=1, cutoff=0.85) if key not in known else []
        if near:
            return key, near[0]
    return None


def to_internlm_messages(messages: Sequence[Mapping], tools: Sequence[Mapping] | None = None) -> list[dict]:
    """OpenAI chat messages (+ tools) -> the messages :meth:`Tokenizer.apply_chat_template` renders."""
    if not isinstance(messages, Sequence) or isinstance(messages, (str, bytes)) or not messages:
        raise FormatError("messages must be a non-empty list")
    out: list[dict] = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, Mapping):
            raise FormatError(f"messages[{i}] must be an object with 'role' and 'content'")
        role = msg.get("role")
        # InternLM's own agent messages name their channel: system/environment name=plugin|interpreter
        name = msg.get("name")
        if name is not None and not isinstance(name, str):
            raise FormatError(f"messages[{i}].name must be a string, got {type(name).__name__}")
        channel = CHANNELS.get(name)
        if role in ("system", "developer"):
            out.append({"role": "system", "content": _content(msg, i), **({"name": channel} if channel else {})})
        elif role == "user":
            out.append({"role": "user", "content": _content(msg, i)})
        elif role == "assistant":  # tool_calls, or the older API's single function_call
            calls = msg.get("tool_calls") or ([{"function": msg["function_call"]}] if msg.get("function_call") else [])
            text = _content(msg, i, optional=True) + "".join(_call_text(c, i) for c in calls)
            out.append({"role": "assistant", "content": text})
        elif role in ("tool", "function", "environment"):  # a tool's or function's name is the function's
            name = channel if role == "environment" and channel else "plugin"
            out.append({"role": "environment", "content": _content(msg, i), "name": name})
        else:
            raise FormatError(f"messages[{i}].role must be system, user, assistant or tool, got {role!r}")
    if tools:
        plugin = {"role": "system", "name": "plugin",
                  "content": json.dumps(tool_definitions(tools), ensure_ascii=False)}
        first = next((k for k, m in enumerate(out) if m["role"] != "system"), len(out))
        out.insert(first, plugin)  # after the leading system prompt(s), as the InternLM2 agent format does
    return out


def forced_reply(tool_choice: Any, tools: Sequence[Mapping] | None) -> str:
    """The start of the assistant's reply that OpenAI's ``tool_choice`` forces, to be appended to the
    prompt: nothing for ``"auto"``/``"none"``/None, the call marker for ``"required"``, and for
    ``{"type": "function", "function": {"name": N}}`` the marker and the call's JSON up to its
    ``"parameters":`` (the model writes the arguments). Ends where InternLM2's tokenizer has a token
    boundary, so the model continues from a tokenization it has seen."""
    if tool_choice is None or tool_choice in ("auto", "none"):
        return ""
    names = [fn["name"] for fn in tool_definitions(tools or [])]
    if not names:
        raise FormatError(f"tool_choice {tool_choice!r} needs tools", "tool_choice")
    if tool_choice == "required":
        return CALL_START + "\n"
    fn = tool_choice.get("function") if isinstance(tool_choice, Mapping) else None
    if not isinstance(fn, Mapping) or tool_choice.get("type", "function") != "function" or \
            not isinstance(fn.get("name"), str):
        raise FormatError("tool_choice must be 'none', 'auto', 'required' or "
                          "{'type': 'function', 'function': {'name': ...}}", "tool_choice")
    if fn["name"] not in names:
        raise FormatError(f"tool_choice names {fn['name']!r}, which is not among the tools ({', '.join(names)})",
                          "tool_choice")
    return CALL_START + "\n" + '{"name": ' + json.dumps(fn["name"], ensure_ascii=False) + ', "parameters":'


def chat_prompt(tok, messages: Sequence[Mapping], tools: Sequence[Mapping] | None = None,
                tool_choice: Any = None) -> tuple[list[int], str, bool]:
    """A chat request's prompt ids, ending with the reply's start that ``tool_choice`` forces; that
    forced start; and whether tool calls are parsed from the reply (tools given and ``tool_choice`` not
    ``"none"``, which also leaves the tools out of the prompt). The server and the batch lines share it."""
    tool_definitions(tools or [])  # checked even when "none" leaves them out
    forced = forced_reply(tool_choice, tools)
    calls = bool(tools) and tool_choice != "none"
    ids = tok.encode_chat(to_internlm_messages(messages, tools if calls else None), add_generation_prompt=True)
    return ids + (tok.encode(forced, add_bos=False) if forced else []), forced, calls


def parse_tool_calls(text: str) -> tuple[str, list[dict]]:
    """Model output -> (content, OpenAI ``tool_calls``). A call whose JSON does not parse, or that has no
    string ``name`` or no object ``parameters``, stays text, unless the output ends inside it (cut by
    ``max_tokens``): then it is dropped, markers and all. With calls, the content is the text around
    them less the whitespace before each call and at the end (and at the start when the reply opens with
    a call): the rule :class:`TextStream` streams by, so streamed and whole replies agree."""
    return _split_calls(text)


def _arguments(params: Any) -> str | None:
    """A call's ``parameters`` as OpenAI's ``arguments`` string (a JSON object): JSON text that the model
    wrote as a string is passed on as it is, not encoded a second time. None when they are no object."""
    if isinstance(params, str):
        try:
            return params if isinstance(json.loads(params), dict) else None
        except json.JSONDecodeError:
            return None
    return json.dumps(params, ensure_ascii=False) if isinstance(params, Mapping) else None


def _split_calls(text: str) -> tuple[str, list[dict]]:
    """(the content, the calls) by :func:`parse_tool_calls`' rule."""
    content, calls, rest, cut = [], [], text, False
    while CALL_START in rest:
        before, _, after = rest.partition(CALL_START)
        body, found, rest = after.partition(ACTION_END)
        try:
            call = json.loads(body.strip())
            name, args = call["name"], _arguments(call.get("parameters", call.get("arguments", {})))
        except (json.JSONDecodeError, KeyError, TypeError):
            name = args = None
        if not isinstance(name, str) or not name or args is None:
            if not found:  # the reply ended inside this call (max_tokens cut it): no call, and no markup
                content.append(before.rstrip())  # shown as content either
                cut, rest = True, ""
                break
            content.append(before + CALL_START + body + found)
            continue
        content.append(before.rstrip())
        calls.append({"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                      "function": {"name": name, "arguments": args}})
    if not calls and not cut:
        return text, []
    content.append(rest)
    out = "".join(content).rstrip()
    return (out.lstrip() if not text.partition(CALL_START)[0].strip() else out), calls


class TextStream:
    """Incremental text of one response: ``push(piece)`` returns the text that is safe to send now.

    Text that may still become a stop string or (with ``tools``) a tool-call marker is held back until
    it is decided; from a tool-call start on, everything is kept for :meth:`finish`. ``stopped`` turns
    True when a stop string appeared (the text is cut before it). ``forced`` is a reply's start that
    ``tool_choice`` put in the prompt (:func:`forced_reply`): the stream begins inside that call, stop
    strings are not looked for in it, and if the call does not parse only the model's own text is
    content. With ``one_call`` (OpenAI's ``parallel_tool_calls: false``) the reply ends, ``stopped``,
    after its first well-formed call."""

    def __init__(self, stop: Sequence[str] = (), tools: bool = False, forced: str = "", one_call: bool = False):
        self.stop = [s for s in stop if s]
        self.markers = self.stop + ([CALL_START] if tools else [])
        self.forced = forced
        self.text = forced  # everything accepted so far (cut at a stop string)
        self.sent = len(forced)  # characters of text already returned (or never to be)
        self.stopped = False
        self.in_call, self.call_at = bool(forced), 0
        self.one_call, self.ends_seen = one_call, 0  # ends_seen: text before it holds no unchecked call end

    def _hold(self) -> int:
        """How many trailing characters could still be the start of a marker, with tools also the
        whitespace before them (a reply drops the whitespace before a call)."""
        hold = 0
        for m in self.markers:
            for n in range(min(len(m) - 1, len(self.text)), 0, -1):
                if self.text.endswith(m[:n]):
                    hold = max(hold, n)
                    break
        if CALL_START in self.markers:
            head = self.text[:len(self.text) - hold]
            hold += len(head) - len(head.rstrip())
        return hold

    def push(self, piece: str) -> str:
        if self.stopped:
            return ""
        self.text += piece
        if not self.in_call:
            for stop in self.stop:
                at = self.text.find(stop, max(0, self.sent - len(stop)))
                if at >= 0:
                    self.text, self.stopped = self.text[:at], True
            if CALL_START in self.markers:
                at = self.text.find(CALL_START, max(0, self.sent - len(CALL_START)))
                if at >= 0:
                    self.in_call, self.call_at = True, at
        if self.in_call and self.one_call:
            self._end_after_first_call()
        if self.in_call:  # up to the call, less the whitespace before it
            safe = len(self.text[:self.call_at].rstrip())
        else:
            safe = len(self.text) if self.stopped else len(self.text) - self._hold()
        out = self.text[self.sent:max(safe, self.sent)]
        self.sent = max(self.sent, safe)
        return out

    def _end_after_first_call(self):
        """Cut the text after the first call once that call is complete and parses (each call end is
        looked at once, as it arrives)."""
        at = self.text.find(ACTION_END, max(self.call_at, self.ends_seen))
        while at >= 0:
            head = self.text[:at + len(ACTION_END)]
            if _split_calls(head)[1]:
                self.text, self.stopped = head, True
                return
            at = self.text.find(ACTION_END, at + 1)
        self.ends_seen = max(0, len(self.text) - len(ACTION_END) + 1)  # an end still arriving is looked for again

    def finish(self) -> tuple[str, list[dict]]:
        """The rest of the content (not yet returned by push) and the tool calls, once generation ended."""
        if self.in_call:
            content, calls = _split_calls(self.text)
            if calls or not self.forced:  # the content around the calls, less what push returned (all of it
                return content[min(self.sent, self.call_at):], calls  # before the first call)
        return self.text[self.sent:], []  # a forced start was never to be sent: sent starts past it

    def reply(self) -> tuple[str, list[dict]]:
        """The whole content and the tool calls (a non-streamed reply), once generation ended."""
        content, calls = parse_tool_calls(self.text) if self.in_call else (self.text, [])
        if self.forced and not calls:
            return self.text[len(self.forced):], []
        return content, calls


def calls_finish_reason(reason: str) -> str:
    """OpenAI's finish_reason of a reply with tool calls: "tool_calls", unless max_tokens cut it ("length")."""
    return "length" if reason == "length" else "tool_calls"


def feed_tokens(text: TextStream, decoder, tokens, finished: bool = False) -> tuple[str, int]:
    """Push generated ``tokens`` through a tokenizer's stream ``decoder`` into ``text``, up to the token
    that completes a stop string (a reply ends there); with ``finished`` also the decoder's held bytes.
    Returns the text safe to send now and how many of ``tokens`` were taken."""
    out, used = [], 0
    for token in tokens:
        if text.stopped:
            break
        used += 1
        piece = decoder.push(token)
        if piece:
            out.append(text.push(piece))
    if finished and not text.stopped:
        out.append(text.push(decoder.flush()))
    return "".join(out), used


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
