"""SFT on chat data (data.format: chat): the loss covers exactly the assistant replies, and a tiny
model trained on a few conversations reproduces them. Runs offline (a tokenizer trained here)."""

import json

import numpy as np
import pytest
from hf_fixtures import ROOT

import internlm_jax as ij
from internlm_jax.chat_format import to_internlm_messages
from internlm_jax.training import TrainConfig, train
from internlm_jax.training.data import PackedDataset
from internlm_jax.training.tokenize import tokenize_corpus

CONVERSATIONS = [
    [{"role": "system", "content": "You answer briefly."}, {"role": "user", "content": "What is JAX?"},
     {"role": "assistant", "content": "A library for array programs."}],
    [{"role": "user", "content": "Name a river."}, {"role": "assistant", "content": "The Danube."},
     {"role": "user", "content": "Another one?"}, {"role": "assistant", "content": "The Rhine."}],
    [{"role": "user", "content": "Weather in Paris?"}, {"role": "assistant", "content": "Let me look.",
     "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "weather", "arguments": "{}"}}]},
     {"role": "tool", "content": "sunny"}, {"role": "assistant", "content": "It is sunny."}],
]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    base = tmp_path_factory.mktemp("sft")
    texts = (ROOT / "examples" / "data" / "tiny_corpus.txt").read_text().splitlines()
    texts += [m["content"] for c in CONVERSATIONS for m in c]
    tok = ij.Tokenizer.train(texts, base / "tokenizer.model")
    path = base / "chat.jsonl"
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in CONVERSATIONS))
    return base, tok, path


def spans(flags):
    """(start, end) of each run of ones."""
    out, start = [], None
    for i, f in enumerate(list(flags) + [0]):
        if f and start is None:
            start = i
        elif not f and start is not None:
            out.append((start, i))
            start = None
    return out


def test_the_loss_mask_is_exactly_the_assistant_replies(data):
    _, tok, path = data
    ds = PackedDataset([str(path)], tok, seq_len=64, fmt="chat")
    n = len(ds.stream)
    docs = ds.stream.segments(0, n)
    for d, conv in enumerate(CONVERSATIONS):
        tokens, trained = ds.stream.tokens(0, n)[docs == d], ds.stream.trained(0, n)[docs == d]
        replies = [m for m in conv if m["role"] == "assistant"]
        got = [tok.decode(tokens[a:b].tolist()) for a, b in spans(trained)]
        want = [m["content"] + ("<|action_start|><|plugin|>\n" + json.dumps({"name": "weather", "parameters": {}})
                                + "<|action_end|>" if m.get("tool_calls") else "") + "<|im_end|>" for m in replies]
        assert got == want
        # the document is the conversation as the chat template renders it; the rest is what the model reads
        assert tok.decode(tokens.tolist()) == tok.apply_chat_template(to_internlm_messages(conv),
                                                                      add_generation_prompt=False, tokenize=False)
        prompt_text = tok.decode(tokens[trained == 0].tolist())
        assert all(m["content"] in prompt_text for m in conv if m["role"] != "assistant")
    b = ds.batch(0, 2)
    np.testing.assert_array_equal(b.weight[0], ds.trained_targets(ds.window_at(0)))
    assert 0 < b.weight.mean() < 1


def test_tools_are_rendered_as_the_plugin_system_message_and_never_trained(data, tmp_path):
    _, tok, _ = data
    tools = [{"type": "function", "function": {"name": "weather", "description": "Weather of a city",
                                               "parameters": {"type": "object", "properties": {"city": {}}}}}]
    conv = CONVERSATIONS[2]
    path = tmp_path / "tools.jsonl"
    path.write_text(json.dumps({"messages": conv, "tools": tools}) + "\n")
    ds = PackedDataset([str(path)], tok, seq_len=16, fmt="chat")
    n = len(ds.stream)
    tokens, trained = ds.stream.tokens(0, n), ds.stream.trained(0, n)
    text = tok.decode(tokens.tolist())
    # FACTS.md: the tools as a second system message, a JSON list of name, description, parameters
    plugin = ("<|im_start|>system name=<|plugin|>\n" + json.dumps([tools[0]["function"]]) + "<|im_end|>\n"
              "<|im_start|>user\nWeather in Paris?")
    assert plugin in text
    want = ["Let me look.<|action_start|><|plugin|>\n" + json.dumps({"name": "weather", "parameters": {}})
            + "<|action_end|><|im_end|>", "It is sunny.<|im_end|>"]
    assert [tok.decode(tokens[a:b].tolist()) for a, b in spans(trained)] == want
    tokenize_corpus(tok.model_file, [str(path)], tmp_path / "tok", fmt="chat", progress=False)
    folder = PackedDataset([str(tmp_path / "tok")], tok, seq_len=16, fmt="chat").stream  # the same, tokenized once
    np.testing.assert_array_equal(folder.tokens(0, n), tokens)
    np.testing.assert_array_equal(folder.trained(0, n), trained)


def test_bad_chat_lines_are_named(data, tmp_path):
    _, tok, _ = data
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:1: .*no assistant message"):
        PackedDataset([str(bad)], tok, 16, fmt="chat")
    bad.write_text('{"text": "x"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: not a JSON object with a 'messages' list"):
        PackedDataset([str(bad)], tok, 16, fmt="chat")
    # a reply whose text is missing (misspelt, or null without calls) is refused: it would train an empty reply
    for reply in ({"role": "assistant", "contnet": "hello"}, {"role": "assistant", "content": None}):
        bad.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}, reply]}) + "\n")
        with pytest.raises(ValueError, match=r"bad.jsonl:1: messages\[1\] \(assistant\) has no 'content' and no tool"):
            PackedDataset([str(bad)], tok, 16, fmt="chat")


def test_replies_starting_with_a_newline_are_trained_as_the_model_makes_them(tokenizer_path, tmp_path):
    """The real tokenizer merges the generation prompt's ``\n`` with a reply's leading newline when the
    text is encoded whole. Each reply is encoded after its prompt instead: the tokens before it are
    the generation prompt (what the model reads at inference), the trained span decodes to the
    reply and ``<|im_end|>``, and the conversation still decodes to the template's text. (A later
    turn's history holds the earlier reply as the model made it, not as the whole text re-encodes it.)"""
    tok = ij.Tokenizer(tokenizer_path)
    conv = [{"role": "user", "content": "Code?"}, {"role": "assistant", "content": "\n```python\nx = 1\n```"},
            {"role": "user", "content": "List?"}, {"role": "assistant", "content": "\n\n1. a\n2. b"}]
    path = tmp_path / "nl.jsonl"
    path.write_text(json.dumps({"messages": conv}) + "\n" + json.dumps({"messages": conv, "tools": 5}) + "\n")
    with pytest.raises(ValueError, match=r"nl.jsonl:2: 'tools' must be a list"):
        PackedDataset([str(path)], tok, seq_len=16, fmt="chat")
    path.write_text(json.dumps({"messages": conv}) + "\n")
    stream = PackedDataset([str(path)], tok, seq_len=16, fmt="chat").stream
    n = len(stream)
    tokens, trained = stream.tokens(0, n).tolist(), stream.trained(0, n)
    runs = spans(trained)
    assert [tok.decode(tokens[a:b]) for a, b in runs] == [m["content"] + "<|im_end|>" for m in conv[1::2]]
    assert tokens[:runs[0][0]] == tok.encode_chat(conv[:1], add_generation_prompt=True)
    header = tok.encode("<|im_start|>assistant\n", add_bos=False)
    assert all(tokens[a - len(header):a] == header for a, _ in runs)  # each reply follows its own prompt's end
    assert tok.decode(tokens) == tok.apply_chat_template(conv, tokenize=False)


def test_a_tiny_model_trained_on_chats_reproduces_the_replies(data, tmp_path):
    base, tok, path = data
    cfg = TrainConfig.from_dict({
        "model": {"preset": "internlm2_5-7b", "dtype": "float32", "param_dtype": "float32",
                  "overrides": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                                "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": tok.vocab_size}},
        "tokenizer": tok.model_file,
        "data": {"train": [str(path)], "format": "chat", "seq_len": 64, "batch_size": 8},
        "optim": {"lr": 3e-3, "warmup_steps": 5, "weight_decay": 0.0},
        "checkpoint": {"dir": str(tmp_path / "ckpt"), "every": 1000},
        "log": {"every": 1000, "peak_tflops": 1.0}, "steps": 150, "export_hf": str(tmp_path / "hf")})
    history = train(cfg)
    assert history[-1]["loss"] < 0.05
    model = ij.InternLM2.from_pretrained(tmp_path / "hf")
    for conv in CONVERSATIONS[:2]:
        last = max(i for i, m in enumerate(conv) if m["role"] == "assistant")
        reply = ij.chat(model, tok, conv[:last], max_new_tokens=20)
        assert reply["content"] == conv[last]["content"]
