"""The OpenAI-compatible server, as clients see it: a real `internlm-jax serve` process on 127.0.0.1,
the real `openai` client, and plain HTTP for the malformed requests.

The model is a tiny random InternLM2 with a tokenizer trained offline on the example corpus, so
nothing here needs ../shared; the reference for every greedy text is ``ij.generate`` in this process
on the same folder. Tool calls use a model whose greedy output is a known tool call."""

import json
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from hf_fixtures import ROOT, chain_checkpoint, user_env

import internlm_jax as ij

openai = pytest.importorskip("openai")

CALL = '{"name":"get_weather","parameters":{"days":3}}'
REPLY = "One moment."
DAYS = {"type": "object", "properties": {"days": {"type": "integer"}}}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "the forecast", "parameters": DAYS}}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, folder: Path, *args: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(folder.parent / f"server-{self.port}.log", "w+")
        self.proc = subprocess.Popen([sys.executable, "-m", "internlm_jax", "serve", "--model", str(folder),
                                      "--port", str(self.port), "--quiet", *args], cwd=ROOT, env=user_env(),
                                     stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 300
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("server exited:\n" + self.output())
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.3)
        raise RuntimeError("server did not start:\n" + self.output())

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read()[-4000:]

    def client(self):
        return openai.OpenAI(base_url=self.url + "/v1", api_key="none", max_retries=0, timeout=120)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    base = tmp_path_factory.mktemp("serve")
    folder = base / "tiny-chat"
    texts = (ROOT / "examples" / "data" / "tiny_corpus.txt").read_text().splitlines()
    tok = ij.Tokenizer.train(texts, base / "tokenizer.model", vocab_size=400)
    cfg = ij.InternLM2Config(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    ij.InternLM2(cfg, seed=0).save_pretrained(folder, extra_files=[tok.model_file])
    model = ij.InternLM2.from_pretrained(folder)
    server = Server(folder, "--max-batch", "4", "--max-len", "256", "--max-queue", "8")
    yield server, model, ij.Tokenizer.from_pretrained(folder)
    server.stop()


def greedy(model, tok, prompt, n, **kw):
    """ij.generate of one prompt (text, or token ids) alone."""
    return ij.generate(model, tok, [prompt], max_new_tokens=n, **kw)[0]


def test_models_and_health(tiny):
    server, _, _ = tiny
    assert [m.id for m in server.client().models.list().data] == ["tiny-chat"]
    assert httpx.get(server.url + "/health").json()["status"] == "ok"


def test_completion_equals_generate_alone(tiny):
    server, model, tok = tiny
    out = server.client().completions.create(model="tiny-chat", prompt="The river", max_tokens=12, temperature=0)
    assert out.choices[0].text == greedy(model, tok, "The river", 12)
    assert out.usage.prompt_tokens == len(tok.encode("The river"))
    assert out.usage.completion_tokens == 12 and out.usage.total_tokens == out.usage.prompt_tokens + 12
    assert out.choices[0].finish_reason == "length"
    ids = tok.encode("The river")
    by_ids = server.client().completions.create(model="tiny-chat", prompt=ids, max_tokens=12, temperature=0)
    assert by_ids.choices[0].text == out.choices[0].text


def test_chat_streamed_and_not_equal_generate(tiny):
    server, model, tok = tiny
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me about rivers"}]
    want = greedy(model, tok, tok.encode_chat(messages), 20, add_bos=False)
    client = server.client()
    full = client.chat.completions.create(model="tiny-chat", messages=messages, max_tokens=20, temperature=0)
    assert full.choices[0].message.content == want and full.choices[0].message.role == "assistant"
    assert full.usage.prompt_tokens == len(tok.encode_chat(messages))
    chunks = list(client.chat.completions.create(model="tiny-chat", messages=messages, max_tokens=20,
                                                 temperature=0, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    assert chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_sampling_parameters_seed_and_stop(tiny):
    server, model, tok = tiny
    client = server.client()
    kw = dict(model="tiny-chat", prompt="The river", max_tokens=16, temperature=1.0, top_p=0.9, seed=11,
              extra_body={"top_k": 50, "repetition_penalty": 1.1})
    a, b = client.completions.create(**kw), client.completions.create(**kw)
    assert a.choices[0].text == b.choices[0].text
    others = {client.completions.create(**{**kw, "seed": s}).choices[0].text for s in range(12, 16)}
    assert len(others | {a.choices[0].text}) > 1
    text = greedy(model, tok, "The river", 16)
    stop = text[5:8]
    cut = client.completions.create(model="tiny-chat", prompt="The river", max_tokens=16, temperature=0, stop=[stop])
    assert cut.choices[0].text == text[:text.index(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model="tiny-chat", prompt="The river", max_tokens=16, temperature=0,
                                         stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == text[:text.index(stop)]
    # the reply ends with the token that completes the stop string: usage and logprobs count no further
    greedy_ids = ij.generate_ids(model, [tok.encode("The river")], max_new_tokens=16)[0]
    upto = next(k for k in range(1, 17) if stop in tok.decode(greedy_ids[:k]))
    scored = client.completions.create(model="tiny-chat", prompt="The river", max_tokens=16, temperature=0,
                                       stop=[stop], logprobs=1)
    assert scored.usage.completion_tokens == upto and len(scored.choices[0].logprobs.tokens) == upto
    streamed = list(client.completions.create(model="tiny-chat", prompt="The river", max_tokens=16, temperature=0,
                                              stop=stop, logprobs=1, stream=True,
                                              stream_options={"include_usage": True}))
    assert streamed[-1].usage.completion_tokens == upto
    assert sum(len(c.choices[0].logprobs.tokens) for c in streamed if c.choices and c.choices[0].logprobs) == upto
    ids = ij.generate_ids(model, [tok.encode("The river")], max_new_tokens=8)[0]
    by_id = client.completions.create(model="tiny-chat", prompt="The river", max_tokens=8, temperature=0,
                                      extra_body={"stop_token_ids": [ids[4]]})
    assert by_id.usage.completion_tokens == ids.index(ids[4]) and by_id.choices[0].finish_reason == "stop"
    held = client.completions.create(model="tiny-chat", prompt="The river", max_tokens=8, temperature=0,
                                     extra_body={"stop_token_ids": [ids[4]], "min_tokens": 8})  # vLLM's extension
    assert held.usage.completion_tokens == 8 and held.choices[0].finish_reason == "length"


def model_logprobs(model, prompt, tokens):
    """float32 log-softmax of the plain forward's logits at each generated token's position."""
    logits = np.asarray(model(np.asarray([prompt + tokens], np.int32)), np.float64)[0, len(prompt) - 1:-1]
    top = logits.max(-1, keepdims=True)
    return logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))


def test_logprobs_are_the_models_in_chat_and_completions_streamed_or_not(tiny):
    server, model, tok = tiny
    client = server.client()
    messages = [{"role": "user", "content": "Tell me about rivers"}]
    prompt = tok.encode_chat(messages)
    ids = strip_stop(ij.generate_ids(model, [prompt], max_new_tokens=10, stop_ids=tok.stop_ids)[0], tok)
    want = model_logprobs(model, prompt, ids)
    full = client.chat.completions.create(model="tiny-chat", messages=messages, max_tokens=10, temperature=0,
                                          logprobs=True, top_logprobs=3)
    content = full.choices[0].logprobs.content
    assert [bytes(e.bytes) for e in content] == [tok.token_bytes(t) for t in ids]
    np.testing.assert_allclose([e.logprob for e in content], want[np.arange(len(ids)), ids], atol=1e-4)
    for e, row in zip(content, want):  # the 3 most likely, most likely first; greedy took the first
        assert [bytes(a.bytes) for a in e.top_logprobs] == [tok.token_bytes(int(t)) for t in np.argsort(-row)[:3]]
        assert e.top_logprobs[0].logprob == e.logprob
    streamed = client.chat.completions.create(model="tiny-chat", messages=messages, max_tokens=10, temperature=0,
                                              logprobs=True, top_logprobs=3, stream=True)
    parts = [e for c in streamed if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [(e.token, e.logprob) for e in parts] == [(e.token, e.logprob) for e in content]
    plain = client.chat.completions.create(model="tiny-chat", messages=messages, max_tokens=10, temperature=0)
    assert plain.choices[0].logprobs is None and plain.choices[0].message.content == full.choices[0].message.content

    ids = strip_stop(ij.generate_ids(model, [tok.encode("The river")], max_new_tokens=8, stop_ids=tok.stop_ids)[0],
                     tok)
    want = model_logprobs(model, tok.encode("The river"), ids)
    out = client.completions.create(model="tiny-chat", prompt="The river", max_tokens=8, temperature=0, logprobs=2)
    lp = out.choices[0].logprobs
    np.testing.assert_allclose(lp.token_logprobs, want[np.arange(len(ids)), ids], atol=1e-4)
    assert lp.tokens == [shown(tok.token_bytes(t)) for t in ids]
    assert lp.text_offset == offsets(tok, ids)
    for chosen, logprob, top, row in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, want):
        assert top[chosen] == logprob and 2 <= len(top) <= 3  # the 2 most likely, and the chosen one
        assert sorted(top.values(), reverse=True)[:2] == pytest.approx(np.sort(row)[::-1][:2], abs=1e-4)


def test_echo_returns_the_prompt_and_its_logprobs_as_lm_eval_asks(tiny):
    """lm-eval-harness scores a continuation with echo=True, logprobs=1 on token ids: every prompt token
    after the first gets the model's logprob of it, then the completion's tokens follow."""
    server, model, tok = tiny
    client = server.client()
    ids = tok.encode("The long river runs to the sea")
    kw = dict(model="tiny-chat", prompt=ids, max_tokens=3, temperature=0, echo=True, logprobs=1)
    out = client.completions.create(**kw)
    gen = strip_stop(ij.generate_ids(model, [ids], max_new_tokens=3, stop_ids=tok.stop_ids)[0], tok)
    assert out.choices[0].text == tok.decode(ids) + tok.decode(gen)
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(ids) + len(gen) and out.usage.completion_tokens == len(gen)
    assert lp.tokens == [shown(tok.token_bytes(t)) for t in ids + gen]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    want = model_logprobs(model, ids[:1], ids[1:] + gen)  # each token after the first, given what precedes it
    np.testing.assert_allclose(lp.token_logprobs[1:], want[np.arange(len(want)), ids[1:] + gen], atol=1e-4)
    for top, row in zip(lp.top_logprobs[1:], want):
        best = int(np.argmax(row))
        assert top[shown(tok.token_bytes(best))] == pytest.approx(row[best], abs=1e-4)
    assert lp.text_offset == offsets(tok, ids + gen)
    chunks = list(client.completions.create(stream=True, **kw))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == out.choices[0].text
    streamed = [x for c in chunks if c.choices and c.choices[0].logprobs for x in c.choices[0].logprobs.token_logprobs]
    assert streamed == lp.token_logprobs
    scored = client.completions.create(**{**kw, "max_tokens": 0})  # the prompt's scores only
    assert scored.choices[0].text == tok.decode(ids) and scored.usage.completion_tokens == 0
    assert scored.choices[0].logprobs.token_logprobs == lp.token_logprobs[:len(ids)]
    assert scored.choices[0].finish_reason == "length"
    plain = client.completions.create(model="tiny-chat", prompt="The river", max_tokens=3, temperature=0, echo=True)
    assert plain.choices[0].text == "The river" + greedy(model, tok, "The river", 3)
    assert plain.choices[0].logprobs is None
    # a text prompt: its tokens spell the echoed text (the <s> put before it is not shown), offsets index it
    text = client.completions.create(model="tiny-chat", prompt="The river", max_tokens=3, temperature=0, echo=True,
                                     logprobs=1).choices[0]
    ids = tok.encode("The river")
    assert text.text == plain.choices[0].text and "".join(text.logprobs.tokens[:len(ids) - 1]) == "The river"
    gen = strip_stop(ij.generate_ids(model, [ids], max_new_tokens=3, stop_ids=tok.stop_ids)[0], tok)
    assert text.logprobs.text_offset == offsets(tok, ids[1:] + gen)
    # characters made of byte tokens (shown as "bytes:\\xNN"): offsets still index the text, each byte token
    # at the character it is part of
    wide = client.completions.create(model="tiny-chat", prompt="café 🌊 river", max_tokens=3, temperature=0,
                                     echo=True, logprobs=0).choices[0]
    lp = wide.logprobs
    assert any(t.startswith("bytes:") for t in lp.tokens) and lp.text_offset == sorted(lp.text_offset)
    for token, at in zip(lp.tokens, lp.text_offset):
        assert token.startswith("bytes:") or wide.text[at:at + len(token)] == token, (token, at, wide.text)
    assert lp.text_offset[-1] < len(wide.text)
    want = model_logprobs(model, ids[:1], ids[1:])
    np.testing.assert_allclose(text.logprobs.token_logprobs[:len(ids) - 1], want[np.arange(len(ids) - 1), ids[1:]],
                               atol=1e-4)


def offsets(tok, ids) -> list[int]:
    """OpenAI's text_offset: where each token starts in the decoded text; a token that is part of a character
    starts where that character does (the text before it, less an unfinished character's U+FFFD)."""
    return [len(tok.decode(ids[:i]).rstrip("\ufffd")) for i in range(len(ids))]


def shown(raw: bytes) -> str:
    """A token's text in logprobs: its characters, or "bytes:\\xNN" for part of a character."""
    try:
        return raw.decode()
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


def test_presence_and_frequency_penalties_reach_the_engine(tiny):
    """OpenAI's penalties through the client equal generate's (checked against a step-by-step reference
    in test_batching), and change the tokens of this prompt."""
    server, model, tok = tiny
    client = server.client()
    ids = tok.encode("The river")
    kw = dict(model="tiny-chat", prompt="The river", max_tokens=24, temperature=0)
    out = client.completions.create(**kw, presence_penalty=0.4, frequency_penalty=1.2)
    want = strip_stop(ij.generate_ids(model, [ids], max_new_tokens=24, presence_penalty=0.4, frequency_penalty=1.2,
                                      stop_ids=tok.stop_ids)[0], tok)
    assert out.choices[0].text == tok.decode(want)
    assert out.choices[0].text != client.completions.create(**kw).choices[0].text
    plain = client.completions.create(**kw, extra_body={"response_format": {"type": "text"}}, presence_penalty=0,
                                      frequency_penalty=0)
    assert plain.choices[0].text == greedy(model, tok, "The river", 24)


def strip_stop(ids, tok):
    return ids[:-1] if ids and ids[-1] in tok.stop_ids else ids


def test_n_choices_are_requests_with_consecutive_seeds(tiny):
    server, _, _ = tiny
    client = server.client()
    kw = dict(model="tiny-chat", prompt="The river", max_tokens=10, temperature=1.0, seed=21)
    singles = [client.completions.create(**{**kw, "seed": 21 + i}) for i in range(3)]
    out = client.completions.create(n=3, **kw)
    assert [c.index for c in out.choices] == [0, 1, 2]
    assert [c.text for c in out.choices] == [s.choices[0].text for s in singles]
    assert len({c.text for c in out.choices}) > 1
    assert out.usage.completion_tokens == sum(s.usage.completion_tokens for s in singles)
    assert out.usage.prompt_tokens == singles[0].usage.prompt_tokens
    texts, reasons, usages = ["", "", ""], {}, []
    for chunk in client.completions.create(n=3, stream=True, stream_options={"include_usage": True}, **kw):
        if chunk.usage:
            usages.append(chunk.usage)
            assert chunk.choices == []  # include_usage: a last chunk of its own, as OpenAI sends
        for c in chunk.choices:
            texts[c.index] += c.text
            reasons[c.index] = c.finish_reason or reasons.get(c.index)
    assert texts == [c.text for c in out.choices] and reasons == {c.index: c.finish_reason for c in out.choices}
    assert [u.completion_tokens for u in usages] == [out.usage.completion_tokens]
    # a batch of prompts (text or token ids): choice p * n + j is prompt p's j-th, as if sent alone
    other = {**kw, "prompt": "A cold"}
    batch = client.completions.create(n=2, **{**kw, "prompt": ["The river", "A cold"]})
    alone = [client.completions.create(n=2, **kw), client.completions.create(n=2, **other)]
    assert [c.text for c in batch.choices] == [c.text for a in alone for c in a.choices]
    assert [c.index for c in batch.choices] == [0, 1, 2, 3]
    assert batch.usage.prompt_tokens == sum(a.usage.prompt_tokens for a in alone)
    _, _, tok = tiny
    by_ids = client.completions.create(n=2, **{**kw, "prompt": [tok.encode("The river"), tok.encode("A cold")]})
    assert [c.text for c in by_ids.choices] == [c.text for c in batch.choices]
    messages = [{"role": "user", "content": "Tell me about rivers"}]
    chat = client.chat.completions.create(model="tiny-chat", messages=messages, max_tokens=6, n=2, temperature=0)
    assert [c.index for c in chat.choices] == [0, 1]
    assert chat.choices[0].message.content == chat.choices[1].message.content  # greedy: the same twice


def post(server, path, body, raw=False):
    content = body if raw else json.dumps(body)
    return httpx.post(server.url + path, content=content, headers={"content-type": "application/json"}, timeout=60)


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(tiny):
    server, _, _ = tiny
    ok = {"model": "tiny-chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    cases = [
        ("{not json", True, 400, None, "not valid JSON"),
        ({"model": "tiny-chat"}, False, 400, "messages", "messages"),
        ({**ok, "max_tokens": "many"}, False, 400, "max_tokens", "integer"),
        ({**ok, "temperature": "hot"}, False, 400, "temperature", "temperature"),
        ({**ok, "max_tokens": 0}, False, 400, "max_tokens", "positive"),
        ({**ok, "max_tokens": -3}, False, 400, "max_tokens", "positive"),
        ({**ok, "model": "gpt-4"}, False, 404, "model", "gpt-4"),
        ({**ok, "n": 0}, False, 400, "n", "n must be from 1"),
        ({**ok, "top_logprobs": 2}, False, 400, "top_logprobs", "needs logprobs"),
        ({**ok, "logprobs": True, "top_logprobs": 21}, False, 400, "top_logprobs", "from 0 to 20"),
        ({**ok, "logit_bias": {"5": 10}}, False, 400, "logit_bias", "not supported"),
        ({**ok, "response_format": {"type": "json_object"}}, False, 400, "response_format", "not supported"),
        ({**ok, "frequency_penalty": 3}, False, 400, "frequency_penalty", "from -2 to 2"),
        ({**ok, "messages": [{"role": "wizard", "content": "x"}]}, False, 400, "messages", "wizard"),
        ({**ok, "messages": [{"role": "user", "content": "word " * 400}]}, False, 400, None, "context"),
        ({**ok, "top_p": -0.5}, False, 400, None, "top_p"),
        ({**ok, "max_completion_tokens": 0}, False, 400, "max_completion_tokens", "max_completion_tokens must be"),
        ({"model": "tiny-chat", "messages": ok["messages"], "max_completion_tokens": 1000}, False, 400,
         "max_completion_tokens", "with max_completion_tokens=1000"),
        ({**ok, "modalities": ["text", "audio"]}, False, 400, "modalities", "not supported"),
        ({**ok, "min_tokens": 5}, False, 400, "min_tokens", "from 0 to max_tokens"),
        ({"model": "tiny-chat", "messages": ok["messages"], "min_tokens": 1000}, False, 400, "min_tokens",
         "left in the context"),
        ({**ok, "ignore_eos": "yes"}, False, 400, "ignore_eos", "boolean"),
        ({**ok, "messages": [{"role": "user"}]}, False, 400, "messages", "messages[0] (user) has no 'content'"),
        ({**ok, "functions": [{"name": "f", "parameters": {}}]}, False, 400, "functions", "send them as tools"),
        ({**ok, "max_token": 3}, False, 400, "max_token", "did you mean 'max_tokens'"),
        ('{"model": "tiny-chat", "messages": [{"role": "user", "content": "a\\ud800b"}]}', True, 400, "messages",
         "lone UTF-16 surrogate"),
    ]
    for body, raw, status, param, words in cases:
        r = post(server, "/v1/chat/completions", body, raw)
        assert r.status_code == status, (body, r.text)
        err = r.json()["error"]
        assert words in err["message"] and err["type"], err
        if param:
            assert err["param"] == param, err
    r = post(server, "/v1/completions", {"model": "tiny-chat", "prompt": [5, 100000], "max_tokens": 2})
    assert r.status_code == 400 and "vocabulary" in r.json()["error"]["message"]
    r = post(server, "/v1/completions", {"model": "tiny-chat", "prompt": [[5, 6], []], "max_tokens": 2})
    assert r.status_code == 400 and "prompt 1 is empty" in r.json()["error"]["message"]
    r = post(server, "/v1/completions", {"model": "tiny-chat", "prompt": ["a"] * 5, "n": 2, "max_tokens": 2})
    assert r.status_code == 400 and "max_queue" in r.json()["error"]["message"]
    r = post(server, "/v1/completions", {"model": "tiny-chat", "prompt": "x", "max_tokens": 2, "suffix": "y"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "suffix"
    r = post(server, "/v1/completions", '{"model": "tiny-chat", "prompt": "a\\ud800b", "max_tokens": 2}', True)
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt", r.text
    assert "prompt: text holds a lone UTF-16 surrogate" in r.json()["error"]["message"]
    r = post(server, "/v1/chat/completions", {**ok, "top_k": -1, "temperature": 0})  # vLLM's "no top_k"
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == \
        post(server, "/v1/chat/completions", {**ok, "temperature": 0}).json()["choices"][0]["message"]["content"]
    with pytest.raises(openai.BadRequestError):
        server.client().completions.create(model="tiny-chat", prompt="x", max_tokens=1000)
    assert post(server, "/v1/chat/completions", ok).status_code == 200


def test_64_concurrent_streams_are_all_answered_correctly(tiny):
    server, model, tok = tiny
    prompts = [f"The {w} river" for w in ("long", "cold", "old", "wide")]
    want = {p: greedy(model, tok, p, 10 + 3 * i) for i, p in enumerate(prompts)}
    budget = {p: 10 + 3 * i for i, p in enumerate(prompts)}

    def one(i):
        p = prompts[i % 4]
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=8, timeout=300)
        stream = client.completions.create(model="tiny-chat", prompt=p, max_tokens=budget[p], temperature=0,
                                           stream=True)
        return p, "".join(c.choices[0].text for c in stream if c.choices)

    with ThreadPoolExecutor(64) as pool:
        results = list(pool.map(one, range(64)))
    assert len(results) == 64
    for p, text in results:
        assert text == want[p]


@pytest.fixture(scope="module")
def slow(tiny, tmp_path_factory):
    """A server with one row and one waiting place whose model allows 32768 positions, so a 30000-token
    request keeps its row busy for many seconds even with the tiny model."""
    server, _, _ = tiny
    folder = tmp_path_factory.mktemp("slow") / "tiny-chat"
    shutil.copytree(server.proc.args[server.proc.args.index("--model") + 1], folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 32768}))
    slow = Server(folder, "--max-batch", "1", "--max-len", "32768", "--max-queue", "1")
    yield slow
    slow.stop()


def wait_idle(server, deadline_s=60):
    deadline = time.time() + deadline_s
    while time.time() < deadline:
        health = httpx.get(server.url + "/health").json()
        if not health["running"] and not health["waiting"]:
            return health
        time.sleep(0.1)
    raise AssertionError(f"server still busy after {deadline_s} s: {health}")


LONG = {"model": "tiny-chat", "prompt": "The river", "max_tokens": 30000, "temperature": 0, "stream": True}


def test_a_full_queue_answers_429(slow):
    """One long request runs, a second waits (max_queue=1): a third is refused with 429 naming the queue,
    and once both streams are dropped the server takes requests again."""
    with httpx.stream("POST", slow.url + "/v1/completions", json=LONG, timeout=60) as running:
        events = running.iter_lines()  # kept: a dropped iterator closes the connection, which cancels
        next(events)
        with httpx.stream("POST", slow.url + "/v1/completions", json=LONG, timeout=60) as waiting:
            assert waiting.status_code == 200
            deadline = time.time() + 30
            while httpx.get(slow.url + "/health").json()["waiting"] != 1 and time.time() < deadline:
                time.sleep(0.05)
            r = post(slow, "/v1/completions", {**LONG, "stream": False, "max_tokens": 2})
            assert r.status_code == 429 and "max_queue" in r.json()["error"]["message"]
    wait_idle(slow)
    r = post(slow, "/v1/completions", {**LONG, "stream": False, "max_tokens": 2})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2


def test_a_client_that_disconnects_frees_its_slot(slow):
    """A long stream (30000 tokens: many seconds of work even for the tiny model) read for three
    events, then dropped: the engine cancels it, frees the row, and never finishes it by length."""
    before = wait_idle(slow)["counts"]
    with httpx.stream("POST", slow.url + "/v1/completions", json=LONG, timeout=60) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(3)]
        assert any(line.startswith("data: ") for line in got)
    counts = wait_idle(slow)["counts"]
    assert counts.get("finished_cancelled", 0) == before.get("finished_cancelled", 0) + 1
    assert counts.get("finished_length", 0) == before.get("finished_length", 0)
    assert counts["generated_tokens"] - before.get("generated_tokens", 0) < 30000


def test_a_client_that_leaves_a_whole_reply_frees_its_slot(slow):
    """The same without streaming: the client gives up (a timeout) while its reply is made; the engine
    cancels it rather than decoding on to max_tokens."""
    before = wait_idle(slow)["counts"]
    with pytest.raises(httpx.TimeoutException):
        httpx.post(slow.url + "/v1/completions", json={**LONG, "stream": False}, timeout=2)
    counts = wait_idle(slow)["counts"]
    assert counts.get("finished_cancelled", 0) == before.get("finished_cancelled", 0) + 1
    assert counts.get("finished_length", 0) == before.get("finished_length", 0)


def test_sigterm_lets_running_requests_finish_then_exits(tmp_path, tiny):
    server, model, tok = tiny
    folder = Path(server.proc.args[server.proc.args.index("--model") + 1])
    second = Server(folder, "--max-batch", "2", "--max-len", "256")
    try:
        result = {}

        def ask():
            result["r"] = post(second, "/v1/completions", {"model": "tiny-chat", "prompt": "The river",
                                                           "max_tokens": 120, "temperature": 0})

        t = threading.Thread(target=ask)
        t.start()
        deadline = time.time() + 60
        while httpx.get(second.url + "/health").json()["running"] == 0 and time.time() < deadline:
            time.sleep(0.05)
        second.proc.send_signal(signal.SIGTERM)
        t.join(120)
        # uvicorn drains, then raises SIGTERM again; after the drain that ends serve() cleanly
        assert second.proc.wait(120) == 0, second.output()
        assert "Traceback" not in second.output()
        assert result["r"].status_code == 200
        assert result["r"].json()["choices"][0]["text"] == greedy(model, tok, "The river", 120)
    finally:
        second.stop()


def test_openai_defaults_nulls_and_other_paths(tiny):
    """What OpenAI's API does where a request leaves things out: completions default to 16 tokens, null
    means the default, an unknown path or method gets an error object, a model can be retrieved; a
    top_k past the vocabulary keeps every token (and does not break the engine)."""
    server, model, tok = tiny
    client = server.client()
    out = client.completions.create(model="tiny-chat", prompt="The river", temperature=0)
    assert out.choices[0].text == greedy(model, tok, "The river", 16) and out.usage.completion_tokens <= 16
    chat = {"model": "tiny-chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "temperature": 0}
    nulls = post(server, "/v1/chat/completions", {**chat, "n": None, "stream": None, "logprobs": None,
                                                   "top_logprobs": None, "stop": None, "seed": None})
    assert nulls.status_code == 200 and nulls.json()["object"] == "chat.completion"
    assert nulls.json()["choices"][0]["message"]["content"] == post(server, "/v1/chat/completions",
                                                                    chat).json()["choices"][0]["message"]["content"]
    r = post(server, "/v1/completions", {"model": "tiny-chat", "prompt": "x", "max_tokens": 2, "echo": None,
                                         "logprobs": None, "n": None})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
    for headers in ({"content-type": "application/x-www-form-urlencoded"}, {}):  # curl -d '{...}', no type
        r = httpx.post(server.url + "/v1/chat/completions", content=json.dumps(chat), headers=headers, timeout=60)
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == \
            nulls.json()["choices"][0]["message"]["content"], r.text
    for method, path, status in (("GET", "/v1/nothing", 404), ("GET", "/v1/chat/completions", 405),
                                 ("POST", "/v1/models", 405)):
        r = httpx.request(method, server.url + path)
        assert r.status_code == status and path in r.json()["error"]["message"], r.text
    assert client.models.retrieve("tiny-chat").id == "tiny-chat"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")
    sampled = dict(model="tiny-chat", prompt="The river", max_tokens=8, temperature=1.0, seed=3)
    # top_p 0 (OpenAI's range is 0 to 1) keeps only the most likely token: the greedy text
    assert client.completions.create(**sampled, top_p=0).choices[0].text == greedy(model, tok, "The river", 8)
    everything = client.completions.create(**sampled, extra_body={"top_k": 2**31})
    assert everything.choices[0].text == client.completions.create(**sampled).choices[0].text
    for field, value in (("temperature", -1), ("top_k", -2), ("repetition_penalty", 0), ("seed", 1.5)):
        r = post(server, "/v1/chat/completions", {**chat, field: value})
        assert r.status_code == 400 and r.json()["error"]["param"] == field, r.text


@pytest.fixture(scope="module")
def tool_server(tmp_path_factory):
    """A model whose greedy answer to any chat prompt is ``REPLY`` then the tool call ``CALL``."""
    base = tmp_path_factory.mktemp("tools")
    texts = (ROOT / "examples" / "data" / "tiny_corpus.txt").read_text().splitlines() + [CALL] * 300 + [REPLY] * 100
    tok = ij.Tokenizer.train(texts, base / "tokenizer.model", vocab_size=400)
    answer = tok.encode(REPLY + "<|action_start|><|plugin|>" + CALL + "<|action_end|><|im_end|>", add_bos=False)
    chain = [tok.encode("\n", add_bos=False)[-1]] + answer  # the generation prompt ends with "\n"
    folder = chain_checkpoint(base / "tool-model", chain, base / "tokenizer.model", vocab_size=tok.vocab_size)
    server = Server(folder, "--max-batch", "2", "--max-len", "200")
    yield server, tok
    server.stop()


def test_tool_calls_come_back_as_openai_tool_calls(tool_server):
    server, tok = tool_server
    client = server.client()
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    out = client.chat.completions.create(model="tool-model", messages=messages, tools=TOOLS, max_tokens=40,
                                         temperature=0)
    msg = out.choices[0].message
    assert out.choices[0].finish_reason == "tool_calls"
    assert msg.content == REPLY
    assert len(msg.tool_calls) == 1 and msg.tool_calls[0].function.name == "get_weather"
    assert json.loads(msg.tool_calls[0].function.arguments) == {"days": 3}
    # streamed: the markers arrive as separate chunks; no marker text leaks into the content
    chunks = list(client.chat.completions.create(model="tool-model", messages=messages, tools=TOOLS, max_tokens=40,
                                                 temperature=0, stream=True))
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    calls = [tc for c in chunks if c.choices and c.choices[0].delta.tool_calls for tc in c.choices[0].delta.tool_calls]
    assert content == REPLY and "<|" not in content
    assert [(tc.function.name, json.loads(tc.function.arguments)) for tc in calls] == [("get_weather", {"days": 3})]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    # without tools (or with tool_choice "none") the same output is plain text, markers included
    plain = client.chat.completions.create(model="tool-model", messages=messages, max_tokens=40, temperature=0)
    assert plain.choices[0].message.content == REPLY + "<|action_start|><|plugin|>" + CALL + "<|action_end|>"
    none = client.chat.completions.create(model="tool-model", messages=messages, tools=TOOLS, tool_choice="none",
                                          max_tokens=40, temperature=0)
    assert none.choices[0].message.content == plain.choices[0].message.content
    assert not none.choices[0].message.tool_calls


def test_a_tool_call_cut_by_max_tokens_is_length_and_leaks_no_markup(tool_server):
    """max_tokens that ends the reply inside its call: finish_reason "length", the content before the
    call, no tool call and no marker text, streamed or not."""
    server, tok = tool_server
    client = server.client()
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    cut = len(tok.encode(REPLY + "<|action_start|><|plugin|>", add_bos=False)) + 3  # three tokens of the JSON
    out = client.chat.completions.create(model="tool-model", messages=messages, tools=TOOLS, max_tokens=cut,
                                         temperature=0)
    assert (out.choices[0].finish_reason, out.choices[0].message.content) == ("length", REPLY)
    assert not out.choices[0].message.tool_calls
    chunks = list(client.chat.completions.create(model="tool-model", messages=messages, tools=TOOLS,
                                                 max_tokens=cut, temperature=0, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == REPLY
    assert not [c for c in chunks if c.choices and c.choices[0].delta.tool_calls]
    assert chunks[-1].choices[0].finish_reason == "length"


def test_python_chat_with_tools_answers_as_the_server_does(tool_server):
    server, tok = tool_server
    model = ij.InternLM2.from_pretrained(Path(server.proc.args[server.proc.args.index("--model") + 1]))
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    reply = ij.chat(model, tok, messages, tools=TOOLS, max_new_tokens=40)
    assert reply["content"] == REPLY and [(c["function"]["name"], json.loads(c["function"]["arguments"]))
                                          for c in reply["tool_calls"]] == [("get_weather", {"days": 3})]
    assert ij.chat(model, tok, messages, max_new_tokens=40)["content"] == \
        REPLY + "<|action_start|><|plugin|>" + CALL + "<|action_end|>"  # without tools: text, markers kept


CITY = ' {"city":"Oslo"}}'  # the arguments the forced-call model writes after '"parameters":'


@pytest.fixture(scope="module")
def forced_server(tool_server, tmp_path_factory):
    """A model that, after the start of a named call that tool_choice forces (ending '"parameters":'),
    writes ``CITY``, ends the call and the turn."""
    from internlm_jax.chat_format import forced_reply

    _, tok = tool_server
    base = tmp_path_factory.mktemp("forced")
    forced = tok.encode(forced_reply({"type": "function", "function": {"name": "get_weather"}}, TOOLS), add_bos=False)
    whole = tok.encode(tok.decode(forced) + CITY + "<|action_end|><|im_end|>", add_bos=False)
    assert whole[:len(forced)] == forced  # the forced start is a token prefix of the whole call
    shutil.copy(tok.model_file, base / "tokenizer.model")
    folder = chain_checkpoint(base / "tool-model", whole[len(forced) - 1:], base / "tokenizer.model",
                              vocab_size=tok.vocab_size)
    server = Server(folder, "--max-batch", "2", "--max-len", "200")
    yield server, tok, ij.InternLM2.from_pretrained(folder)
    server.stop()


def test_tool_choice_forces_a_call(forced_server):
    """A named tool_choice puts the call's start after the prompt: the model writes only the arguments,
    and the reply is that call (streamed or not); "required" forces the call marker; "none" leaves
    the tools out of the prompt; a bad tool_choice is a 400 naming it."""
    from internlm_jax.chat_format import forced_reply, to_internlm_messages

    server, tok, model = forced_server
    client = server.client()
    messages = [{"role": "user", "content": "Weather in Oslo?"}]
    named = {"type": "function", "function": {"name": "get_weather"}}
    prompt = tok.encode_chat(to_internlm_messages(messages, TOOLS))
    out = client.chat.completions.create(model="tool-model", messages=messages, tools=TOOLS, tool_choice=named,
                                         max_tokens=40, temperature=0)
    calls = out.choices[0].message.tool_calls
    assert out.choices[0].finish_reason == "tool_calls" and out.choices[0].message.content is None  # as OpenAI's
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [("get_weather", {"city": "Oslo"})]
    forced = tok.encode(forced_reply(named, TOOLS), add_bos=False)
    assert out.usage.prompt_tokens == len(prompt) + len(forced)
    chunks = list(client.chat.completions.create(model="tool-model", messages=messages, tools=TOOLS, max_tokens=40,
                                                 tool_choice=named, temperature=0, stream=True))
    assert not "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    streamed = [tc for c in chunks if c.choices and c.choices[0].delta.tool_calls
                for tc in c.choices[0].delta.tool_calls]
    assert [(c.function.name, json.loads(c.function.arguments)) for c in streamed] == \
        [("get_weather", {"city": "Oslo"})]
    local = ij.chat(model, tok, messages, tools=TOOLS, tool_choice=named, max_new_tokens=40)  # the Python API
    assert local["content"] is None and [(c["function"]["name"], json.loads(c["function"]["arguments"]))
                                         for c in local["tool_calls"]] == [("get_weather", {"city": "Oslo"})]
    # stop strings are not looked for inside the call (the forced start has quotes and a newline)
    stopped = client.chat.completions.create(model="tool-model", messages=messages, tools=TOOLS, tool_choice=named,
                                             max_tokens=40, temperature=0, stop=['"', "\n"])
    assert [c.function.name for c in stopped.choices[0].message.tool_calls] == ["get_weather"]
    # "required": the marker ends the prompt; what follows is generate's continuation of that prompt
    required = client.chat.completions.create(model="tool-model", messages=messages, tools=TOOLS,
                                              tool_choice="required", max_tokens=6, temperature=0)
    marker = tok.encode(forced_reply("required", TOOLS), add_bos=False)
    assert required.usage.prompt_tokens == len(prompt) + len(marker)
    tokens = ij.generate_ids(model, [prompt + marker], max_new_tokens=6, stop_ids=tok.stop_ids)[0]
    shown = next((i for i, t in enumerate(tokens) if t in tok.stop_ids), len(tokens))  # the stop is not counted
    assert required.usage.completion_tokens == shown
    # the continuation is not a call: the content is the model's own text, without the forced marker
    assert required.choices[0].message.content == tok.decode(tokens[:shown], skip_special_tokens=False)
    assert not required.choices[0].message.tool_calls
    chunks = list(client.chat.completions.create(model="tool-model", messages=messages, tools=TOOLS, stream=True,
                                                 tool_choice="required", max_tokens=6, temperature=0))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == \
        required.choices[0].message.content
    # "none": as if no tools were given
    none = client.chat.completions.create(model="tool-model", messages=messages, tools=TOOLS, tool_choice="none",
                                          max_tokens=2, temperature=0)
    assert none.usage.prompt_tokens == len(tok.encode_chat(to_internlm_messages(messages)))
    for bad, words in (({"type": "function", "function": {"name": "nope"}}, "nope"), ("sometimes", "tool_choice"),
                       ({"type": "function"}, "tool_choice")):
        r = post(server, "/v1/chat/completions", {"model": "tool-model", "messages": messages, "tools": TOOLS,
                                                  "tool_choice": bad})
        err = r.json()["error"]
        assert r.status_code == 400 and err["param"] == "tool_choice" and words in err["message"]
    r = post(server, "/v1/chat/completions", {"model": "tool-model", "messages": messages, "tool_choice": "required"})
    assert r.status_code == 400 and "needs tools" in r.json()["error"]["message"]
    r = post(server, "/v1/chat/completions", {"model": "tool-model", "messages": messages, "tools": [{"type": "x"}],
                                              "tool_choice": named})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tools"


def test_offline_batch_lines_take_tool_choice(forced_server, tmp_path):
    from internlm_jax.batch import BatchInputError, run_batch

    _, tok, model = forced_server
    messages = [{"role": "user", "content": "Weather in Oslo?"}]
    named = {"type": "function", "function": {"name": "get_weather"}}
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text(json.dumps({"id": "call", "messages": messages, "tools": TOOLS, "tool_choice": named}) + "\n")
    engine = ij.Engine(model, max_batch=2, max_len=200, stop_ids=tok.stop_ids)
    run_batch(engine, tok, src, out, defaults={"max_tokens": 40}, progress=False)
    line = json.loads(out.read_text())
    assert line["finish_reason"] == "tool_calls" and line["text"] == ""
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in line["tool_calls"]] == \
        [("get_weather", {"city": "Oslo"})]
    # parallel_tool_calls false ends the reply at the call's <|action_end|>, even where <|im_end|> would not
    for name, one_call in (("free", None), ("one", False)):
        src.write_text(json.dumps({"id": name, "messages": messages, "tools": TOOLS, "tool_choice": named,
                                   "ignore_eos": True, "parallel_tool_calls": one_call}) + "\n")
        run_batch(engine, tok, src, tmp_path / f"{name}.jsonl", defaults={"max_tokens": 40}, progress=False)
    free, one = (json.loads((tmp_path / f"{name}.jsonl").read_text()) for name in ("free", "one"))
    assert (free["finish_reason"], free["completion_tokens"]) == ("length", 40)
    assert (one["finish_reason"], one["completion_tokens"]) == ("tool_calls", line["completion_tokens"])
    assert one["tool_calls"][0]["function"] == line["tool_calls"][0]["function"]
    src.write_text(json.dumps({"id": "x", "messages": messages, "parallel_tool_calls": "no"}) + "\n")
    with pytest.raises(BatchInputError, match="in.jsonl:1: 'parallel_tool_calls'"):
        run_batch(engine, tok, src, tmp_path / "other.jsonl", progress=False)
    src.write_text(json.dumps({"id": "x", "messages": messages, "tools": TOOLS, "tool_choice": "maybe"}) + "\n")
    with pytest.raises(BatchInputError, match="in.jsonl:1: tool_choice"):
        run_batch(engine, tok, src, tmp_path / "other.jsonl", progress=False)


def test_tools_and_tool_results_are_rendered_in_the_plugin_format(tool_server):
    from internlm_jax.chat_format import to_internlm_messages

    _, tok = tool_server
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"days": 3}'}}
    messages = [{"role": "system", "content": "You are helpful."}, {"role": "user", "content": "Weather?"},
                {"role": "assistant", "content": "One moment.", "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    text = tok.apply_chat_template(to_internlm_messages(messages, TOOLS), add_generation_prompt=True, tokenize=False)
    tools_json = json.dumps([TOOLS[0]["function"]], ensure_ascii=False)
    assert text == ("<s><|im_start|>system\nYou are helpful.<|im_end|>\n"
                    f"<|im_start|>system name=<|plugin|>\n{tools_json}<|im_end|>\n"
                    "<|im_start|>user\nWeather?<|im_end|>\n"
                    '<|im_start|>assistant\nOne moment.<|action_start|><|plugin|>\n'
                    '{"name": "get_weather", "parameters": {"days": 3}}<|action_end|><|im_end|>\n'
                    "<|im_start|>environment name=<|plugin|>\nsunny<|im_end|>\n"
                    "<|im_start|>assistant\n")
    # the older API's function_call is the same call; empty arguments are no arguments
    legacy = [*messages[:2], {"role": "assistant", "content": "One moment.", "function_call": call["function"]},
              {"role": "function", "name": "get_weather", "content": "sunny"}]
    assert tok.apply_chat_template(to_internlm_messages(legacy, TOOLS), add_generation_prompt=True,
                                   tokenize=False) == text
    bare = {"role": "assistant", "content": None,
            "tool_calls": [{**call, "function": {"name": "now", "arguments": ""}}]}
    assert to_internlm_messages([bare])[0]["content"] == \
        '<|action_start|><|plugin|>\n{"name": "now", "parameters": {}}<|action_end|>'


def test_the_incremental_text_stream_handles_markers_split_anywhere():
    from internlm_jax.chat_format import TextStream

    text = "One moment." + "<|action_start|><|plugin|>\n" + CALL + "<|action_end|>"
    for size in (1, 2, 5, 13):
        stream = TextStream(stop=["never"], tools=True)
        sent = "".join(stream.push(text[i:i + size]) for i in range(0, len(text), size))
        rest, calls = stream.finish()
        assert sent + rest == REPLY and len(calls) == 1
        assert json.loads(calls[0]["function"]["arguments"]) == {"days": 3}
    # text after a call is content too, streamed or not; parameters written as a JSON string pass as they are
    after = "Sure" + "<|action_start|><|plugin|>\n" + '{"name": "f", "parameters": "{\\"x\\": 1}"}<|action_end|> then'
    for size in (1, 3, 7):
        stream = TextStream(tools=True)
        sent = "".join(stream.push(after[i:i + size]) for i in range(0, len(after), size))
        rest, calls = stream.finish()
        assert sent + rest == stream.reply()[0] == "Sure then"
        assert [c["function"]["arguments"] for c in calls] == ['{"x": 1}']
    stream = TextStream(stop=["moment"])
    assert "".join(stream.push(c) for c in "One moment.") == "One " and stream.stopped
    # a forced call start: no stop string is looked for in it, and nothing of it is content
    forced = "<|action_start|><|plugin|>\n" + '{"name": "get_weather", "parameters":'
    for body, want in ((' {"days": 3}}<|action_end|>', ("", [{"days": 3}])), (" oops", (" oops", []))):
        stream = TextStream(stop=['"', "\n"], tools=True, forced=forced)
        sent = "".join(stream.push(c) for c in body)
        rest, calls = stream.finish()
        assert (sent + rest, [json.loads(c["function"]["arguments"]) for c in calls]) == want
        content, calls = stream.reply()
        assert (content, [json.loads(c["function"]["arguments"]) for c in calls]) == want


def test_streamed_and_whole_replies_agree_on_the_content_around_calls():
    """Whitespace before a call (and at the end) is not content, streamed or not; a reply that opens with
    a call has no leading whitespace; a call without a string name or object parameters stays text."""
    from internlm_jax.chat_format import TextStream, parse_tool_calls

    call = "<|action_start|><|plugin|>\n" + '{"name": "f", "parameters": {"x": 1}}' + "<|action_end|>"
    cases = {"Sure.\n\n" + call: "Sure.", "  lead " + call: "  lead", call + " then": "then",
             "\n" + call + "\n": "", "a" + call + "\n\n" + call + " b": "a b",
             "Sure.\n\n" + call + "\nDone.": "Sure.\nDone."}
    for text, want in cases.items():
        assert parse_tool_calls(text)[0] == want
        for size in (1, 2, 5):
            stream = TextStream(tools=True)
            sent = "".join(stream.push(text[i:i + size]) for i in range(0, len(text), size))
            rest, calls = stream.finish()
            assert (sent + rest, stream.reply()[0]) == (want, want), (text, size)
            assert calls and all(json.loads(c["function"]["arguments"]) == {"x": 1} for c in calls)
    # without a call, trailing whitespace held back for a possible call is still sent in the end
    stream = TextStream(tools=True)
    assert stream.push("Hi \n") == "Hi" and stream.finish() == (" \n", [])
    for body in ('{"name": 7, "parameters": {}}', '{"name": "f", "parameters": [1, 2]}',
                 '{"name": "f", "parameters": "[1, 2]"}', '{"name": "", "parameters": {}}', '[1]'):
        text = "x" + "<|action_start|><|plugin|>\n" + body + "<|action_end|>"
        assert parse_tool_calls(text) == (text, []), body


def test_a_reply_that_ends_inside_a_call_drops_it_streamed_or_not():
    from internlm_jax.chat_format import TextStream, parse_tool_calls

    call = "<|action_start|><|plugin|>\n" + '{"name": "f", "parameters": {"x": 1}}' + "<|action_end|>"
    partial = "<|action_start|><|plugin|>\n" + '{"name": "f", "para'
    cases = {"One moment. " + partial: ("One moment.", 0), partial: ("", 0), "a" + call + " b " + partial: ("a b", 1),
             "<|action_start|><|plugin|>": ("", 0)}
    for text, (want, calls) in cases.items():
        assert (parse_tool_calls(text)[0], len(parse_tool_calls(text)[1])) == (want, calls), text
        for size in (1, 4):
            stream = TextStream(tools=True)
            sent = "".join(stream.push(text[i:i + size]) for i in range(0, len(text), size))
            rest, got = stream.finish()
            assert (sent + rest, stream.reply()[0], len(got)) == (want, want, calls), (text, size)
    # a call that the model ended (with <|action_end|>) but whose JSON is bad stays text, as before
    bad = "x<|action_start|><|plugin|>\n{oops}<|action_end|>"
    assert parse_tool_calls(bad) == (bad, [])


def test_parallel_tool_calls_false_ends_the_reply_after_its_first_call():
    """OpenAI's ``parallel_tool_calls: false``: at most one call. The stream stops (as at a stop string)
    once the first call is complete and parses; a malformed call before it stays text and does not count."""
    from internlm_jax.chat_format import TextStream

    def call(x):
        return "<|action_start|><|plugin|>\n" + '{"name": "f", "parameters": {"x": %d}}' % x + "<|action_end|>"

    bad = "<|action_start|><|plugin|>\n{oops}<|action_end|>"
    cases = {"Sure. " + call(1) + " and " + call(2) + " done": ("Sure.", [1]),
             "a" + bad + " b " + call(3) + call(4): ("a" + bad + " b", [3])}
    for text, (want, xs) in cases.items():
        for size in (1, 3, 8):
            for one_call, n in ((True, len(xs)), (False, 2)):
                stream = TextStream(tools=True, one_call=one_call)
                sent = "".join(stream.push(text[i:i + size]) for i in range(0, len(text), size))
                rest, calls = stream.finish()
                assert stream.stopped is one_call and len(calls) == n, (text, size, one_call)
                if one_call:
                    assert (sent + rest, stream.reply()[0]) == (want, want)
                    assert [json.loads(c["function"]["arguments"])["x"] for c in calls] == xs
    stream = TextStream(tools=True, one_call=True)  # an unfinished call does not end it
    stream.push("a" + call(1)[:-3])
    assert not stream.stopped


def test_parallel_tool_calls_false_stops_at_the_call_through_the_server(tool_server):
    """The server passes parallel_tool_calls on: with ignore_eos (the model's <|im_end|> ends nothing) the
    reply runs to max_tokens, unless parallel_tool_calls is false: then it ends at the call's
    <|action_end|>, streamed or not."""
    server, tok = tool_server
    client = server.client()
    ask = dict(model="tool-model", messages=[{"role": "user", "content": "Weather in Paris?"}], tools=TOOLS,
               max_tokens=40, temperature=0)
    usual = client.chat.completions.create(**ask)
    free = client.chat.completions.create(**ask, extra_body={"ignore_eos": True})
    one = client.chat.completions.create(**ask, parallel_tool_calls=False, extra_body={"ignore_eos": True})
    assert (free.choices[0].finish_reason, free.usage.completion_tokens) == ("length", 40)
    assert (one.choices[0].finish_reason, one.choices[0].message.content) == ("tool_calls", REPLY)
    assert one.usage.completion_tokens == usual.usage.completion_tokens
    assert [json.loads(c.function.arguments) for c in one.choices[0].message.tool_calls] == [{"days": 3}]
    chunks = list(client.chat.completions.create(**ask, parallel_tool_calls=False, stream=True,
                                                 stream_options={"include_usage": True},
                                                 extra_body={"ignore_eos": True}))
    assert chunks[-1].usage.completion_tokens == one.usage.completion_tokens
    assert [c for c in chunks if c.choices][-1].choices[0].finish_reason == "tool_calls"
    r = post(server, "/v1/chat/completions", {**ask, "parallel_tool_calls": "no"})
    assert r.status_code == 400 and "parallel_tool_calls" in r.text, r.text


def test_replayed_history_may_hold_a_malformed_call_and_a_refusal():
    """What a client sends back is what it got: a call whose arguments are not a JSON object (a model's
    slip) is rendered as the string it was, and an assistant's refusal part is its text."""
    from internlm_jax.chat_format import FormatError, to_internlm_messages

    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "[1"}}
    got = to_internlm_messages([{"role": "assistant", "content": None, "tool_calls": [call]},
                                {"role": "assistant", "content": [{"type": "refusal", "refusal": "No."}]}])
    assert got[0]["content"] == '<|action_start|><|plugin|>\n{"name": "f", "parameters": "[1"}<|action_end|>'
    assert got[1]["content"] == "No."
    with pytest.raises(FormatError, match=r"messages\[0\]\.content: only text parts"):
        to_internlm_messages([{"role": "user", "content": [{"type": "refusal", "refusal": "No."}]}])


def test_interpreter_and_plugin_channels_keep_their_names():
    """InternLM's agent format (FACTS: tool use): system and environment messages name their channel;
    ``tool``/``function`` results are plugin results."""
    from internlm_jax.chat_format import FormatError, to_internlm_messages

    messages = [{"role": "system", "content": "Be brief."},
                {"role": "system", "name": "interpreter", "content": "You can run Python."},
                {"role": "user", "content": "2**10?"},
                {"role": "assistant", "content": "<|action_start|><|interpreter|>\nprint(2**10)<|action_end|>"},
                {"role": "environment", "name": "interpreter", "content": "1024"},
                {"role": "environment", "name": "<|plugin|>", "content": "ok"},
                {"role": "tool", "name": "interpreter", "content": "sunny"}]
    got = [(m["role"], m.get("name")) for m in to_internlm_messages(messages)]
    assert got == [("system", None), ("system", "interpreter"), ("user", None), ("assistant", None),
                   ("environment", "interpreter"), ("environment", "plugin"), ("environment", "plugin")]
    with pytest.raises(FormatError, match=r"messages\[0\]\.name must be a string"):
        to_internlm_messages([{"role": "user", "name": ["x"], "content": "hi"}])
    call = {"function": {"name": "f", "arguments": 5}}
    with pytest.raises(FormatError, match="arguments of 'f' must be a JSON object"):
        to_internlm_messages([{"role": "assistant", "content": "", "tool_calls": [call]}])


def test_offline_batch_lines_end_at_a_stop_string_and_take_generates_names(tiny, tmp_path):
    """A line cut by a stop string counts (and scores) its tokens up to the one that completed it, as the
    server does; ``max_new_tokens`` is generate()'s name for ``max_tokens``; no max_tokens: what fits."""
    from internlm_jax.batch import run_batch

    _, model, tok = tiny
    ids = tok.encode("The river")
    greedy_ids = strip_stop(ij.generate_ids(model, [ids], max_new_tokens=16, stop_ids=tok.stop_ids)[0], tok)
    text = tok.decode(greedy_ids)
    stop = text[5:8]
    upto = next(k for k in range(1, len(greedy_ids) + 1) if stop in tok.decode(greedy_ids[:k]))
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text(json.dumps({"id": "cut", "prompt": "The river", "max_tokens": 16, "stop": stop, "logprobs": 0})
                   + "\n" + json.dumps({"id": "alias", "prompt": "The river", "max_new_tokens": 5}) + "\n"
                   + json.dumps({"id": "fits", "prompt_ids": [5] * 250}) + "\n")
    engine = ij.Engine(model, max_batch=2, max_len=256, stop_ids=tok.stop_ids)
    run_batch(engine, tok, src, out, progress=False)
    by_id = {x["id"]: x for x in map(json.loads, out.read_text().splitlines())}
    cut = by_id["cut"]
    assert cut["text"] == text[:text.index(stop)] and cut["finish_reason"] == "stop"
    assert cut["completion_tokens"] == upto and cut["token_ids"] == greedy_ids[:upto]
    assert len(cut["token_logprobs"]) == upto
    assert by_id["alias"]["text"] == greedy(model, tok, "The river", 5)
    assert by_id["fits"]["completion_tokens"] <= 6 and by_id["fits"]["prompt_tokens"] == 250


def test_offline_batch_command_is_resumable(tiny, tmp_path):
    server, model, tok = tiny
    folder = Path(server.proc.args[server.proc.args.index("--model") + 1])
    prompts = {f"r{i}": f"The {w} river" for i, w in enumerate(("long", "cold", "old", "wide", "deep"))}
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"id": k, "prompt": p, "max_tokens": 9}) + "\n" for k, p in prompts.items())
                   + json.dumps({"id": "chat", "messages": [{"role": "user", "content": "hi"}]}) + "\n"
                   + json.dumps({"id": "lp", "prompt": "The river", "max_tokens": 5, "logprobs": 2}) + "\n")
    out = tmp_path / "out.jsonl"
    first = next(iter(prompts))
    out.write_text(json.dumps({"id": first, "text": "kept", "prompt_tokens": 1, "completion_tokens": 1,
                               "finish_reason": "length"}) + "\n" + '{"id": "r1", "te')  # a torn line
    def command(src, out):
        return [sys.executable, "-m", "internlm_jax", "generate", "--model", str(folder), "--input", str(src),
                "--output", str(out), "--max-new-tokens", "6", "--max-len", "128", "--quiet"]

    cmd = command(src, out)
    done = subprocess.run(cmd, cwd=ROOT, env=user_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [x["id"] for x in lines].count(first) == 1 and lines[0]["text"] == "kept"
    by_id = {x["id"]: x for x in lines}
    assert set(by_id) == set(prompts) | {"chat", "lp"}
    ids = tok.encode("The river")
    lp = by_id["lp"]
    assert lp["token_ids"] == strip_stop(ij.generate_ids(model, [ids], max_new_tokens=5, stop_ids=tok.stop_ids)[0],
                                         tok)
    want = model_logprobs(model, ids, lp["token_ids"])
    np.testing.assert_allclose(lp["token_logprobs"], want[np.arange(len(lp["token_ids"])), lp["token_ids"]],
                               atol=1e-4)
    assert [[t for t, _ in top] for top in lp["top_logprobs"]] == [list(np.argsort(-row)[:2]) for row in want]
    for k, p in prompts.items():
        if k != first:
            assert by_id[k]["text"] == greedy(model, tok, p, 9)
            assert by_id[k]["completion_tokens"] <= 9 and by_id[k]["prompt_tokens"] == len(tok.encode(p))
    assert by_id["chat"]["completion_tokens"] <= 6
    again = subprocess.run(cmd, cwd=ROOT, env=user_env(), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and out.read_text().count("\n") == len(lines)  # nothing run twice
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": 1, "prompt": "x"}\n{"id": 1, "prompt": "y"}\n')
    worse = tmp_path / "worse.jsonl"
    worse.write_text('{"id": 1, "prompt": "x", "logprobs": 30}\n')
    failed = subprocess.run(command(worse, tmp_path / "o2.jsonl"), cwd=ROOT, env=user_env(), capture_output=True,
                            text=True, timeout=600)
    assert failed.returncode == 1 and "worse.jsonl:1" in failed.stderr and "logprobs" in failed.stderr
    failed = subprocess.run(command(bad, tmp_path / "o2.jsonl"), cwd=ROOT, env=user_env(), capture_output=True,
                            text=True, timeout=600)
    assert failed.returncode == 1 and "bad.jsonl:2" in failed.stderr and "already used" in failed.stderr
    assert not (tmp_path / "o2.jsonl").exists() or (tmp_path / "o2.jsonl").read_text() == ""


def test_batch_lines_and_paths_that_cannot_run_are_named(tiny, tmp_path):
    """In-process: each of these once ran wrong (a key ignored, an input damaged) or failed unnamed."""
    from internlm_jax.batch import BatchInputError, read_requests, run_batch

    _, model, tok = tiny
    engine = ij.Engine(model, max_batch=2, max_len=64, stop_ids=tok.stop_ids)
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    for text, words in (('{"id": 1, "prompt": "x", "n": 2}\n', r"in.jsonl:1: 'n' is not supported"),
                        ('{"id": 1, "prompt": "x", "max_new_token": 2}\n',
                         r"in.jsonl:1: unknown key 'max_new_token'; did you mean 'max_new_tokens'\?"),
                        (b'{"id": 1, "prompt": "x"}\n{"id": 2, "prompt": "caf\xe9"}\n', r"in.jsonl:2: not UTF-8 text"),
                        ('{"id": 1, "prompt": "' + "word " * 80 + '"}\n',
                         r"in.jsonl:1: the prompt has \d+ tokens; the context \(--max-len\) is 64")):
        src.write_bytes(text if isinstance(text, bytes) else text.encode())
        with pytest.raises(BatchInputError, match=words):
            read_requests(src, tok, engine, {})
    ids = tok.encode("The river")
    gen = ij.generate_ids(model, [ids], max_new_tokens=8, stop_ids=())[0]
    cut = next(i for i in range(1, 8) if gen[i] not in gen[:i] and gen[i] not in tok.stop_ids)
    # a byte-order mark, a null option (the default) and an eval set's own keys are fine; stop_token_ids stop
    src.write_text('\ufeff' + json.dumps({"id": "a", "prompt": "The river", "max_tokens": 8, "temperature": None,
                                          "stop_token_ids": [gen[cut]], "label": "its own", "prompt_id": "p7",
                                          "n": 1, "stream": False, "stop": None}) + "\n")
    run_batch(engine, tok, src, out, defaults={"stop": ["zzz"]}, progress=False)
    line = json.loads(out.read_text())
    assert (line["finish_reason"], line["completion_tokens"]) == ("stop", cut), (line, gen)
    assert read_requests(src, tok, engine, {"stop": ["zzz"]})[0]["stop"] == ["zzz"]  # null: the command's --stop
    with pytest.raises(BatchInputError, match="is the input file"):
        run_batch(engine, tok, src, src, progress=False)
    with pytest.raises(BatchInputError, match="is a folder"):
        run_batch(engine, tok, src, tmp_path, progress=False)
    foreign = tmp_path / "notes.txt"
    foreign.write_text("my notes\nno newline at the end")
    with pytest.raises(BatchInputError, match="notes.txt:1: not an output line"):
        run_batch(engine, tok, src, foreign, progress=False)
    assert foreign.read_text() == "my notes\nno newline at the end"  # checked before the torn-line cut


def test_a_killed_batch_run_loses_no_finished_line_and_resumes(tiny, tmp_path):
    server, model, tok = tiny
    folder = Path(server.proc.args[server.proc.args.index("--model") + 1])
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    ids = [f"k{i}" for i in range(24)]
    src.write_text("".join(json.dumps({"id": k, "prompt": f"The river {i}", "max_tokens": 5 + 4 * (i % 6)}) + "\n"
                           for i, k in enumerate(ids)))
    cmd = [sys.executable, "-m", "internlm_jax", "generate", "--model", str(folder), "--input", str(src),
           "--output", str(out), "--max-batch", "2", "--max-len", "128", "--quiet"]
    run = subprocess.Popen(cmd, cwd=ROOT, env=user_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while (not out.exists() or out.read_text().count("\n") < 3) and time.time() < deadline and run.poll() is None:
        time.sleep(0.05)
    run.kill()  # SIGKILL: no cleanup runs
    run.wait()
    before = [json.loads(x) for x in out.read_text().splitlines()]  # every line complete, or this fails
    assert 3 <= len(before) < len(ids)
    done = subprocess.run(cmd, cwd=ROOT, env=user_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    after = [json.loads(x) for x in out.read_text().splitlines()]
    assert after[:len(before)] == before  # finished lines kept as they were
    assert sorted(x["id"] for x in after) == sorted(ids)  # each request exactly once
    for i, k in enumerate(ids):
        line = next(x for x in after if x["id"] == k)
        assert line["text"] == greedy(model, tok, f"The river {i}", 5 + 4 * (i % 6))


def test_an_unexpected_error_is_a_500_in_openais_shape_and_the_server_keeps_serving(tiny):
    """A bug of ours inside a handler (here: a tokenizer whose encode fails) answers 500 with OpenAI's
    error JSON, not a plain-text traceback; the next request is served."""
    from fastapi.testclient import TestClient

    from internlm_jax.server import create_app

    _, model, tok = tiny

    import copy

    def encode(text, *args, **kw):
        if text == "break":
            raise RuntimeError("the tokenizer broke")
        return tok.encode(text, *args, **kw)

    broken = copy.copy(tok)
    broken.encode = encode
    app = create_app(ij.Engine(model, max_batch=1, max_len=64), broken, "tiny")
    with TestClient(app, raise_server_exceptions=False) as client:
        r = client.post("/v1/completions", json={"model": "tiny", "prompt": "break", "max_tokens": 2})
        assert r.status_code == 500, r.text
        err = r.json()["error"]
        assert err["type"] == "server_error" and "RuntimeError: the tokenizer broke" in err["message"]
        r = client.post("/v1/completions", json={"model": "tiny", "prompt": "The river", "max_tokens": 3,
                                                      "temperature": 0})
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == greedy(model, tok, "The river", 3)


def test_a_failed_engine_step_ends_a_stream_with_an_error_event_the_openai_client_raises(tiny):
    """A generation that fails mid-stream does not end like a normal reply (no made-up finish_reason):
    the stream sends OpenAI's error event, which the openai client raises; a whole reply is a 500."""
    from fastapi.testclient import TestClient

    from internlm_jax.server import create_app

    _, model, tok = tiny
    engine = ij.Engine(model, max_batch=1, max_len=64)
    execute = engine._execute

    def broken(plan):
        raise RuntimeError("the device fell over")

    app = create_app(engine, tok, "tiny")
    body = {"model": "tiny", "prompt": "The river", "max_tokens": 3, "temperature": 0}
    with TestClient(app, raise_server_exceptions=False) as client:
        engine._execute = broken
        r = client.post("/v1/completions", json={**body, "stream": True})
        events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
        assert events[-1]["error"]["type"] == "server_error", r.text
        assert "generation failed (error:RuntimeError)" in events[-1]["error"]["message"]
        assert "[DONE]" not in r.text and not [e for e in events if "choices" in e and e["choices"]
                                               and e["choices"][0]["finish_reason"]]
        r = client.post("/v1/completions", json=body)
        assert r.status_code == 500 and "generation failed" in r.json()["error"]["message"]
        engine._execute = execute
        r = client.post("/v1/completions", json=body)
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == greedy(model, tok, "The river", 3)
    # the openai client turns the event into an exception (its parser, fed the server's bytes)
    stream = openai.Stream(cast_to=object, response=httpx.Response(
        200, content=f"data: {json.dumps(events[-1])}\n\n".encode(), request=httpx.Request("POST", "http://x")),
        client=openai.OpenAI(api_key="x", base_url="http://x"))
    with pytest.raises(openai.APIError, match="generation failed"):
        list(stream)
