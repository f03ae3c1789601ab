"""Tokenizer.train: the offline tokenizer of the examples (no released tokenizer.model needed)."""

import pytest

from internlm_jax.tokenizer import CHAT_SPECIAL_TOKENS, Tokenizer

TEXTS = ["The grass is green. The sky is blue.", "JAX compiles programs for accelerators.", "Über 3 Äpfel, 42 Birnen."]


def test_trained_tokenizer_has_the_internlm2_layout_and_round_trips(tmp_path):
    path = tmp_path / "sub" / "tokenizer.model"
    tok = Tokenizer.train(TEXTS, path, vocab_size=300)
    assert path.is_file() and [p.name for p in path.parent.iterdir()] == ["tokenizer.model"]  # no temp left
    assert (tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2) and len(tok) <= 300
    assert set(CHAT_SPECIAL_TOKENS) <= set(tok.special_tokens)
    im_end = tok.special_tokens["<|im_end|>"]
    assert im_end in tok.stop_ids and tok.encode("hi<|im_end|>", add_bos=False)[-1] == im_end
    for text in TEXTS + ["never seen: 漢字 ✓"]:  # byte fallback covers text outside the corpus
        ids = tok.encode(text)
        assert ids[0] == tok.bos_id and tok.decode(ids, skip_special_tokens=True) == text
    assert Tokenizer.from_pretrained(path.parent).encode(TEXTS[0]) == tok.encode(TEXTS[0])


def test_training_on_nothing_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="at least one non-empty text"):
        Tokenizer.train(["", "  "], tmp_path / "t.model")
    assert not (tmp_path / "t.model").exists()


def test_a_chat_message_with_an_unknown_role_is_named(tmp_path):
    """The template's roles are InternLM2's; OpenAI's 'tool' gets a pointer to 'environment'."""
    tok = Tokenizer.train(TEXTS, tmp_path / "t.model")
    with pytest.raises(ValueError, match=r"message 1 has invalid role 'robot'"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "robot", "content": "x"}], tokenize=False)
    with pytest.raises(ValueError, match=r"invalid role 'tool'.*'environment' messages"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


def test_a_lone_surrogate_is_a_named_value_error(tmp_path):
    """SentencePiece raises a bare TypeError ('List elements must be str or bytes') on such text."""
    tok = Tokenizer.train(TEXTS, tmp_path / "t.model")
    for text in ("ab\ud800c", "<|im_start|>ab\ud800c"):
        with pytest.raises(ValueError, match=r"lone UTF-16 surrogate '\\ud800' at character "):
            tok.encode(text)
