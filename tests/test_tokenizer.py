"""Tests of internlm_jax.tokenizer against the real InternLM2 tokenizer.model.

Expected ids come from shared/internlm2/FACTS.md; raw sentencepiece (which knows nothing
about the chat markers) serves as an independent reference for the plain-text parts.
"""

from __future__ import annotations

import os
import pickle
import random
from pathlib import Path

import numpy as np
import pytest

_DEFAULT_MODEL = Path(__file__).resolve().parents[2] / "shared" / "internlm2" / "tokenizer.model"
MODEL_PATH = Path(os.environ.get("INTERNLM2_TOKENIZER") or _DEFAULT_MODEL)
if not MODEL_PATH.is_file():
    pytest.skip(f"InternLM2 tokenizer not found at {MODEL_PATH}", allow_module_level=True)

import sentencepiece as spm  # noqa: E402

from internlm_jax.tokenizer import StreamDecoder, Tokenizer  # noqa: E402

CHAT_IDS = {
    "<|plugin|>": 92538,
    "<|interpreter|>": 92539,
    "<|action_end|>": 92540,
    "<|action_start|>": 92541,
    "<|im_end|>": 92542,
    "<|im_start|>": 92543,
}
SPECIAL_IDS = {0, 1, 2, *CHAT_IDS.values()}
CHAT_VECTOR_TEXT = "<s><|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n"
CHAT_VECTOR_IDS = [1, 92543, 1008, 364, 77230, 92542, 364, 92543, 525, 11353, 364]
FOX = "The quick brown fox jumps over the lazy dog."
FOX_IDS = [918, 4131, 14018, 38648, 34256, 1053, 410, 15810, 5718, 281]

ROUND_TRIP_TEXTS = [
    "",
    "Hello world",
    FOX,
    "你好，世界！今天天气怎么样？",
    "书山有路勤为径，学海无涯苦作舟。",
    "emoji 😀🦀🎉 and flags 🇯🇵🇨🇳, family 👨‍👩‍👧‍👦, skin tone 👍🏽, keycap 1️⃣",
    "rare CJK: 𪚥 𠮷 龘 齉 鱻 麤",
    "def f(x):\n    if x:\n\treturn x  # tab + spaces\n\n\n    return None\n",
    "    leading spaces",
    "trailing spaces    ",
    "   ",
    " ",
    "\n",
    "\n\n\n\n",
    "a  b   c    d\t\te\r\nf",
    " \t \n \t",
    "a <|im_end|> b",
    "<|im_start|>  two spaces after a special",
    "x <s> y </s> z <unk> w",
    "<|action_start|><|plugin|>\n{\"name\": 1}<|action_end|>",
    "<|action_start|><|interpreter|>\n```python\nprint('hi')\n```<|action_end|>\n",
    "<|im_end|><|im_end|>  <|im_start|>",
    "<|im_end",  # an incomplete marker is plain text
    "mixed 中文 and English, 123456789 digits, ünïcödé, Ωμέγα, русский, عربى",
    "control chars \x00 \x01 \x7f and zero width \u200b\u200d",
    "\ufffd is a real replacement character",
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_pretrained(MODEL_PATH)


@pytest.fixture(scope="module")
def sp() -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_file=str(MODEL_PATH))


def stream(tok: Tokenizer, ids, skip_special_tokens: bool = False) -> list[str]:
    dec = tok.stream_decoder(skip_special_tokens=skip_special_tokens)
    assert isinstance(dec, StreamDecoder)
    return [dec.push(i) for i in ids] + [dec.flush()]


# ---------------------------------------------------------------- loading / ids


def test_from_pretrained_accepts_file_and_folder(tok):
    by_folder = Tokenizer.from_pretrained(MODEL_PATH.parent)
    by_file = Tokenizer(MODEL_PATH)
    assert by_folder.encode(FOX) == by_file.encode(FOX) == tok.encode(FOX)


def test_basic_ids(tok, sp):
    assert tok.vocab_size == 92544 == sp.get_piece_size()
    assert (tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2, 2)
    assert tok.stop_ids == [2, 92542]


def test_special_tokens_and_raw_pieces(tok, sp):
    assert tok.special_tokens == {"<unk>": 0, "<s>": 1, "</s>": 2, **CHAT_IDS}
    assert tok.special_ids == SPECIAL_IDS
    # In the raw model the chat markers are renamed [UNUSED_TOKEN_141..146] pieces.
    for k, name in enumerate(["<|plugin|>", "<|interpreter|>", "<|action_end|>",
                              "<|action_start|>", "<|im_end|>", "<|im_start|>"]):
        assert sp.id_to_piece(CHAT_IDS[name]) == f"[UNUSED_TOKEN_{141 + k}]"
        assert tok.id_to_piece(CHAT_IDS[name]) == name
        assert tok.piece_to_id(name) == CHAT_IDS[name]
        # ... and the raw model does not know the marker strings.
        assert len(sp.encode(name)) > 1
    assert (sp.id_to_piece(0), sp.id_to_piece(1), sp.id_to_piece(2)) == ("<unk>", "<s>", "</s>")
    # byte fallback pieces occupy 3..258
    assert all(sp.is_byte(i) for i in range(3, 259))
    assert not sp.is_byte(2) and not sp.is_byte(259)
    assert tok.id_to_piece(3) == "<0x00>" and tok.id_to_piece(258) == "<0xFF>"
    assert tok.piece_to_id("▁Hello") == 22190


# ---------------------------------------------------------------- encode


def test_facts_vectors(tok):
    assert tok.encode("Hello world", add_bos=False) == [9843, 2028]
    assert tok.encode(" Hello", add_bos=False) == [22190]
    assert tok.encode(FOX, add_bos=False) == FOX_IDS
    assert tok.encode("Hello world") == [1, 9843, 2028]
    assert tok.encode(FOX, add_bos=True) == [1] + FOX_IDS


def test_chat_vector_single_bos(tok):
    assert tok.encode(CHAT_VECTOR_TEXT, add_bos=False) == CHAT_VECTOR_IDS
    assert tok.encode(CHAT_VECTOR_TEXT, add_bos=True) == CHAT_VECTOR_IDS
    # without the leading <s>, add_bos supplies it
    assert tok.encode(CHAT_VECTOR_TEXT[3:], add_bos=True) == CHAT_VECTOR_IDS
    assert tok.encode(CHAT_VECTOR_TEXT[3:], add_bos=False) == CHAT_VECTOR_IDS[1:]


def test_bos_and_eos_rules(tok):
    assert tok.encode("") == [1]
    assert tok.encode("", add_bos=False) == []
    assert tok.encode("<s>") == [1]
    assert tok.encode("hi</s>") == [1, *tok.encode("hi", add_bos=False), 2]
    assert tok.encode("hi")[-1] != tok.eos_id  # never appends EOS
    # a BOS later in the text does not suppress the leading one
    assert tok.encode("x<s>")[:1] == [1] and tok.encode("x<s>").count(1) == 2


def test_plain_text_matches_sentencepiece(tok, sp):
    for text in ROUND_TRIP_TEXTS:
        if any(s in text for s in tok.special_tokens):
            continue
        assert tok.encode(text, add_bos=False) == sp.encode(text), text


def test_special_strings_are_split_out(tok, sp):
    assert tok.encode("a <|im_end|> b", add_bos=False) == sp.encode("a ") + [92542] + sp.encode(" b")
    ids = tok.encode("<|action_start|><|plugin|>\n{\"name\": 1}<|action_end|>", add_bos=False)
    assert ids == [92541, 92538] + sp.encode("\n{\"name\": 1}") + [92540]
    assert tok.encode("<unk></s>", add_bos=False) == [0, 2]
    # the spaces on either side of a marker stay with the plain text
    assert sp.id_to_piece(tok.encode("<|im_end|> b", add_bos=False)[1]) == "▁b"


def test_encode_batch(tok):
    texts = ["Hello world", FOX, CHAT_VECTOR_TEXT]
    assert tok.encode_batch(texts, add_bos=False) == [[9843, 2028], FOX_IDS, CHAT_VECTOR_IDS]
    assert tok.encode_batch(texts) == [[1, 9843, 2028], [1] + FOX_IDS, CHAT_VECTOR_IDS]
    assert tok.encode_batch([]) == []


def test_documented_model_quirks(tok):
    # U+2581 is sentencepiece's whitespace marker: it cannot survive a round trip.
    assert tok.encode("\u2581x", add_bos=False) == tok.encode(" x", add_bos=False)
    assert tok.decode(tok.encode("\u2581x", add_bos=False)) == " x"
    # The raw piece names are in the vocabulary, so that literal text hits the marker ids.
    assert tok.encode("[UNUSED_TOKEN_145]", add_bos=False) == [92542]


# ---------------------------------------------------------------- decode


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_round_trip(tok, text):
    ids = tok.encode(text, add_bos=False)
    assert tok.decode(ids) == text
    # with BOS the only difference is the rendered "<s>"
    assert tok.decode(tok.encode(text)) == ("" if text.startswith("<s>") else "<s>") + text


def test_round_trip_uses_byte_fallback(tok):
    text = "𪚥 龘 🦀"
    ids = tok.encode(text, add_bos=False)
    assert any(3 <= i <= 258 for i in ids)
    assert tok.decode(ids) == text


def test_leading_spaces_after_special_token(tok, sp):
    # add_dummy_prefix is off: sentencepiece keeps a run's leading space when decoding.
    assert sp.decode([22190]) == " Hello"
    assert tok.decode([92542, 22190]) == "<|im_end|> Hello"
    assert tok.decode([1, 22190]) == "<s> Hello"
    assert tok.decode([22190, 22190]) == " Hello Hello"


def test_decode_ordinary_ids_matches_sentencepiece(tok, sp):
    rng = random.Random(1)
    for _ in range(50):
        ids = [rng.randrange(3, 92538) for _ in range(rng.randrange(1, 40))]
        assert tok.decode(ids) == sp.decode(ids)


def test_decode_renders_special_tokens(tok):
    assert tok.decode(CHAT_VECTOR_IDS) == CHAT_VECTOR_TEXT
    assert tok.decode([0, 1, 2]) == "<unk><s></s>"
    assert tok.decode([9843, 92542, 2]) == "Hello<|im_end|></s>"


def test_decode_skip_special_tokens(tok):
    assert tok.decode(CHAT_VECTOR_IDS, skip_special_tokens=True) == "user\n你好\nassistant\n"
    for text in ROUND_TRIP_TEXTS:
        ids = tok.encode(text)
        expected = text
        for s in tok.special_tokens:
            expected = expected.replace(s, "")
        got = tok.decode(ids, skip_special_tokens=True)
        assert got == expected
        assert got == tok.decode([i for i in ids if i not in SPECIAL_IDS])


def test_decode_accepts_numpy_and_iterables(tok):
    ids = tok.encode(FOX, add_bos=False)
    assert tok.decode(np.asarray(ids, dtype=np.int32)) == FOX
    assert tok.decode(np.asarray(ids, dtype=np.int64)) == FOX
    assert tok.decode(tuple(ids)) == FOX
    assert tok.decode(i for i in ids) == FOX
    assert tok.decode([]) == ""


# ---------------------------------------------------------------- streaming


STREAM_TEXTS = ROUND_TRIP_TEXTS + [
    "My name is InternLM",
    CHAT_VECTOR_TEXT + "我是书生·浦语，一个AI助手。😀<|im_end|>",
    "a" * 50 + " " * 17 + "b",
]


@pytest.mark.parametrize("text", STREAM_TEXTS)
@pytest.mark.parametrize("skip", [False, True])
def test_stream_matches_decode(tok, text, skip):
    ids = tok.encode(text)
    pieces = stream(tok, ids, skip_special_tokens=skip)
    assert "".join(pieces) == tok.decode(ids, skip_special_tokens=skip)
    if "\ufffd" not in text:
        assert not any("\ufffd" in p for p in pieces)


def test_stream_keeps_spaces(tok):
    ids = tok.encode("My name is InternLM", add_bos=False)
    pieces = stream(tok, ids)
    assert "".join(pieces) == "My name is InternLM"
    assert pieces[1] == " name" and pieces[2] == " is"


def test_stream_byte_fallback(tok):
    text = "你好𪚥!🦀龘"
    ids = tok.encode(text, add_bos=False)
    byte_ids = [i for i in ids if 3 <= i <= 258]
    assert len(byte_ids) >= 8, ids  # the case really exercises byte pieces
    pieces = stream(tok, ids)
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)
    assert "" in pieces[:-1]  # text was held back while a character was incomplete
    # every emitted piece is whole characters: each 4-byte char arrives in one piece
    assert "𪚥" in pieces and "🦀" in pieces


def test_stream_flush_emits_incomplete_tail(tok):
    # model output may stop in the middle of a character
    ids = tok.encode("ab𪚥", add_bos=False)[:-1]
    dec = tok.stream_decoder()
    pushed = "".join(dec.push(i) for i in ids)
    assert pushed == "ab"
    assert pushed + dec.flush() == tok.decode(ids)
    # after flush the decoder is fresh
    assert "".join(stream(tok, [9843, 2028])) == "Hello world"


def test_stream_random_ids_match_decode(tok):
    """Arbitrary model output, including invalid byte sequences and stray specials."""
    rng = random.Random(0)
    lead_bytes = [0xC3, 0xE4, 0xE6, 0xED, 0xF0, 0xF4, 0xF8]
    cont_bytes = [0x80, 0x8F, 0x9F, 0xA0, 0xB8, 0xBF]
    special = sorted(SPECIAL_IDS)
    for _ in range(300):
        ids = []
        for _ in range(rng.randrange(0, 40)):
            r = rng.random()
            if r < 0.25:
                ids.append(3 + rng.choice(lead_bytes))
            elif r < 0.55:
                ids.append(3 + rng.choice(cont_bytes))
            elif r < 0.62:
                ids.append(rng.choice(special))
            elif r < 0.7:
                ids.append(rng.randrange(3, 259))
            else:
                ids.append(rng.randrange(259, 92538))
        for skip in (False, True):
            assert "".join(stream(tok, ids, skip)) == tok.decode(ids, skip_special_tokens=skip), ids


def test_stream_work_per_push_is_bounded(tok, monkeypatch):
    seen = []
    orig = tok._decode_run

    def spy(ids):
        seen.append(len(ids))
        return orig(ids)

    monkeypatch.setattr(tok, "_decode_run", spy)
    ids = tok.encode(("一段很长的文字 with words 𪚥 and 🦀 " * 60), add_bos=False)
    assert len(ids) > 900
    out = "".join(stream(tok, ids))
    monkeypatch.undo()
    assert out == tok.decode(ids)
    assert max(seen) <= 8  # a small window, not the history


def test_stream_with_dummy_prefix_model(tmp_path):
    """A model that strips a run's leading space shows the naive per-token bug."""
    pb = pytest.importorskip("sentencepiece.sentencepiece_model_pb2")
    proto = pb.ModelProto()
    proto.ParseFromString(MODEL_PATH.read_bytes())
    proto.normalizer_spec.add_dummy_prefix = True
    path = tmp_path / "dummy_prefix.model"
    path.write_bytes(proto.SerializeToString())
    tok = Tokenizer(path)
    ids = [5211, 963, 505, 4576, 11146]  # My ▁name ▁is ▁Intern LM
    naive = "".join(tok.sp_model.decode([i]) for i in ids)
    assert naive == "MynameisInternLM"
    assert "".join(stream(tok, ids)) == tok.decode(ids) == "My name is InternLM"


# ---------------------------------------------------------------- chat template


def test_chat_template_system_user(tok, sp):
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Hi"},
    ]
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == (
        "<s><|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    ids = tok.encode_chat(messages)
    assert ids == (
        [1, 92543] + sp.encode("system\nYou are a helpful assistant.") + [92542, 364]
        + [92543] + sp.encode("user\nHi") + [92542, 364]
        + [92543, 525, 11353, 364]
    )
    assert ids.count(1) == 1
    assert tok.decode(ids) == text


def test_chat_template_matches_facts_vector(tok):
    messages = [{"role": "user", "content": "你好"}]
    assert tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == CHAT_VECTOR_TEXT
    assert tok.encode_chat(messages) == CHAT_VECTOR_IDS
    no_prompt = tok.apply_chat_template(messages, add_generation_prompt=False, tokenize=False)
    assert no_prompt == "<s><|im_start|>user\n你好<|im_end|>\n"
    assert tok.encode_chat(messages, add_generation_prompt=False) == CHAT_VECTOR_IDS[:7]


def test_chat_template_tool_call_and_environment(tok, sp):
    call = '<|action_start|><|plugin|>\n{"name": "search", "parameters": {"q": "x"}}<|action_end|>\n'
    messages = [
        {"role": "user", "content": "find x"},
        {"role": "assistant", "content": "Searching." + call},
        {"role": "environment", "name": "plugin", "content": '{"result": 42}'},
        {"role": "environment", "name": "interpreter", "content": "42"},
        {"role": "user", "name": "alice", "content": "thanks"},
    ]
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert '<|im_start|>environment name=<|plugin|>\n{"result": 42}<|im_end|>\n' in text
    assert "<|im_start|>environment name=<|interpreter|>\n42<|im_end|>\n" in text
    assert "<|im_start|>user name=alice\nthanks<|im_end|>\n" in text
    assert text.endswith("<|im_start|>assistant\n")
    ids = tok.encode_chat(messages)
    env_header = [92543] + sp.encode("environment name=") + [92538] + sp.encode('\n{"result": 42}') + [92542]
    n = len(env_header)
    assert any(ids[i:i + n] == env_header for i in range(len(ids) - n + 1))
    assert 92541 in ids and 92540 in ids and 92539 in ids
    assert tok.decode(ids) == text


@pytest.mark.parametrize(
    "messages, match",
    [
        ([{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}], r"(?s)(1.*'bot'|'bot'.*1)"),
        ([{"role": "tool", "content": "b"}], r"(?s)(0.*'tool'|'tool'.*0)"),
        ([{"role": "user", "content": "a"}, {"role": "user"}], r"message 1"),
        ([{"content": "a"}], r"message 0"),
    ],
)
def test_chat_template_errors(tok, messages, match):
    with pytest.raises(ValueError, match=match):
        tok.apply_chat_template(messages, tokenize=False)
    with pytest.raises(ValueError, match=match):
        tok.encode_chat(messages)


# ---------------------------------------------------------------- errors / misc


def test_missing_file(tmp_path):
    missing = tmp_path / "nope.model"
    with pytest.raises(FileNotFoundError, match="nope.model"):
        Tokenizer(missing)
    with pytest.raises(FileNotFoundError, match="nope.model"):
        Tokenizer.from_pretrained(missing)
    with pytest.raises(FileNotFoundError, match="tokenizer.model"):
        Tokenizer.from_pretrained(tmp_path)  # folder without tokenizer.model


def test_not_a_sentencepiece_model(tmp_path):
    bad = tmp_path / "garbage.model"
    bad.write_bytes(b"this is not a protobuf \xff\xfe" * 10)
    with pytest.raises(ValueError, match="garbage.model"):
        Tokenizer(bad)


def test_non_str_input(tok):
    for bad in (b"bytes", None, 3, ["a"]):
        with pytest.raises(TypeError):
            tok.encode(bad)
    with pytest.raises(TypeError):
        tok.encode_batch("not a list")
    with pytest.raises(TypeError):
        tok.encode_batch(["ok", b"bad"])


def test_out_of_range_ids(tok):
    with pytest.raises(ValueError, match="92544"):
        tok.decode([9843, 92544])
    with pytest.raises(ValueError, match="-1"):
        tok.decode([-1])
    with pytest.raises(ValueError, match="100000"):
        tok.stream_decoder().push(100000)
    with pytest.raises(ValueError, match="92544"):
        tok.id_to_piece(92544)


def test_pickle(tok):
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.encode(CHAT_VECTOR_TEXT) == CHAT_VECTOR_IDS
    assert clone.special_tokens == tok.special_tokens


def test_hf_spellings_of_the_same_calls(tok, sp):
    """HF's names and call forms give what the native ones give."""
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 2)
    assert tok.encode(FOX, add_special_tokens=False) == FOX_IDS == tok.encode(FOX, add_bos=False)
    assert tok.decode(FOX_IDS[0]) == sp.decode([FOX_IDS[0]]) and tok.decode(np.int64(FOX_IDS[0])) == tok.decode(
        FOX_IDS[:1])
    messages = [{"role": "user", "content": "你好"}]
    # HF's defaults: ids, without the generation prompt
    assert tok.apply_chat_template(messages) == CHAT_VECTOR_IDS[:7]
    assert tok.apply_chat_template(messages, add_generation_prompt=True) == CHAT_VECTOR_IDS
    assert tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == CHAT_VECTOR_TEXT
