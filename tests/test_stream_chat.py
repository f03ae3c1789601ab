"""Streaming and chat with the real tokenizer, on a model whose greedy output is a known token chain."""

import pytest
from hf_fixtures import chain_checkpoint
from hf_fixtures import run_python as _run

import internlm_jax as ij

TEXT = "My name is InternLM 龘!"  # 龘 is written with byte-fallback pieces


@pytest.fixture(scope="module")
def setup(tokenizer_path, tmp_path_factory):
    tok = ij.Tokenizer.from_pretrained(tokenizer_path)
    body = tok.encode(TEXT, add_bos=False)
    assert any(3 <= t <= 258 for t in body)  # the test really crosses multi-byte characters
    markers = [tok.special_tokens[s] for s in ("<|action_start|>", "<|plugin|>", "<|action_end|>", "<|im_end|>")]
    chain = [364] + body + markers  # after "\n": the text, then a tool-call marker sequence, then <|im_end|>
    folder = chain_checkpoint(tmp_path_factory.mktemp("chain"), chain, tokenizer_path)
    model = ij.InternLM2.from_pretrained(folder, mesh=ij.make_mesh(tensor=2, fsdp=4))
    return tok, model, folder


EXPECTED = TEXT + "<|action_start|><|plugin|><|action_end|>"


def test_stream_pieces_arrive_one_by_one_and_join_exactly(setup):
    tok, model, _ = setup
    pieces = list(ij.stream(model, tok, "Hi\n", max_new_tokens=40))
    assert "".join(pieces) == EXPECTED
    assert len(pieces) > 5 and not any("\ufffd" in p for p in pieces)
    assert " name" in pieces or any(p.startswith(" ") for p in pieces)  # spaces travel with their pieces


def test_generate_text_batch_and_stop(setup):
    tok, model, _ = setup
    texts = ij.generate(model, tok, ["Hi\n", "Hello there\n"], max_new_tokens=40)
    assert texts == [EXPECTED, EXPECTED]
    short = ij.generate(model, tok, "Hi\n", max_new_tokens=3)
    assert short == tok.decode(tok.encode(TEXT, add_bos=False)[:3])
    assert ij.generate(model, tok, "Hi\n", max_new_tokens=40, skip_special_tokens=True) == TEXT


def test_chat_returns_assistant_message_with_tool_markers(setup):
    tok, model, _ = setup
    seen = []
    reply = ij.chat(model, tok, [{"role": "system", "content": "be brief"}, {"role": "user", "content": "你好"}],
                    max_new_tokens=40, stream_to=seen.append)
    assert reply == {"role": "assistant", "content": EXPECTED}
    assert "".join(seen) == EXPECTED
    with pytest.raises(ValueError, match="role"):
        ij.chat(model, tok, [{"role": "robot", "content": "x"}])


def test_empty_prompt_errors(setup):
    tok, model, _ = setup
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        ij.generate(model, tok, "")
    with pytest.raises(ValueError, match="empty"):
        list(ij.stream(model, tok, ""))


def test_stop_strings_prompt_forms_defaults_and_eager_checks(setup):
    """``stop`` cuts generate, stream and chat alike; a flat id list or 1-D array is one prompt; without
    max_new_tokens the reply gets what fits in the context (chat's default 512 is past this model's 256);
    stream checks its arguments when called, not at the first piece."""
    import numpy as np

    tok, model, _ = setup
    assert ij.generate(model, tok, "Hi\n", max_new_tokens=40, stop="InternLM") == "My name is "
    assert ij.generate(model, tok, ["Hi\n"], max_new_tokens=40, stop=["zzz", "name"]) == ["My "]
    assert "".join(ij.stream(model, tok, "Hi\n", max_new_tokens=40, stop=["InternLM"])) == "My name is "
    messages = [{"role": "user", "content": "你好"}]
    assert ij.chat(model, tok, messages, stop="InternLM")["content"] == "My name is "
    assert ij.chat(model, tok, messages)["content"] == EXPECTED  # no max_new_tokens: what fits
    ids = tok.encode("Hi\n")  # with its BOS, as the text prompt gets one
    assert ij.generate(model, tok, ids, max_new_tokens=40) == EXPECTED
    assert ij.generate(model, tok, np.asarray(ids), max_new_tokens=40) == EXPECTED
    assert ij.generate(model, tok, [ids, "Hi\n"], max_new_tokens=40) == [EXPECTED, EXPECTED]
    assert ij.generate(model, tok, [], max_new_tokens=4) == []
    with pytest.raises(ValueError, match="max_new_tokens"):
        ij.stream(model, tok, "Hi\n", max_new_tokens=0)
    with pytest.raises(ValueError, match="seed"):
        ij.stream(model, tok, "Hi\n", seed=1.5)
    with pytest.raises(ValueError, match="one prompt"):
        ij.stream(model, tok, ["Hi\n", "Hello\n"])
    with pytest.raises(ValueError, match="token id 100000 is outside the vocabulary"):
        ij.generate(model, tok, [[1, 100000]], max_new_tokens=2)


def _cli(args, stdin=""):
    return _run(["-m", "internlm_jax", *args], stdin)


def test_cli_generate_and_chat(setup):
    tok, model, folder = setup
    done = _cli(["generate", "--model", str(folder), "--prompt", "Hi\n", "--max-new-tokens", "40", "--devices", "4",
                 "--tensor", "2", "--quiet"])
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout == EXPECTED + "\n"
    done = _cli(["chat", "--model", str(folder), "--quiet", "--max-new-tokens", "40"], stdin="你好\nagain\n")
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout == EXPECTED + "\n" + EXPECTED + "\n"
    done = _cli(["generate", "--model", str(folder), "--prompt", "Hi\n", "--stop", "InternLM", "--quiet"])
    assert done.returncode == 0 and done.stdout == "My name is \n", done.stderr[-2000:]  # no --max-new-tokens
    done = _cli(["generate", "--model", str(folder), "--prompt", "x", "--top-p", "2", "--quiet"])
    assert done.returncode == 1 and "top_p must be in (0, 1]" in done.stderr and "Traceback" not in done.stderr


def test_example_generate_and_chat():
    done = _run(["examples/generate_and_chat.py", "--max-new-tokens", "8"])
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    assert lines[-1].startswith("assistant : ") and len(lines) >= 4

