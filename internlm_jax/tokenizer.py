"""SentencePiece tokenizer for InternLM2 / InternLM2.5, with chat special tokens.

The released ``tokenizer.model`` is a plain SentencePiece BPE model (92544 pieces, byte
fallback at ids 3..258, ``add_dummy_prefix`` off). It does *not* know the chat markers:
the ids the chat models use for ``<|im_start|>``, ``<|im_end|>``, ``<|action_start|>``,
``<|action_end|>``, ``<|interpreter|>`` and ``<|plugin|>`` (92543 .. 92538) are ordinary
pieces named ``[UNUSED_TOKEN_146]`` .. ``[UNUSED_TOKEN_141]`` in the model file. Handing
``"<|im_end|>"`` to SentencePiece therefore yields six ordinary pieces
(``<``, ``|``, ``im``, ``_end``, ``|``, ``>``), which the model has never seen as a stop marker.

So :meth:`Tokenizer.encode` first splits the text on the special-token strings (the chat
markers plus ``<s>``, ``</s>`` and ``<unk>``), encodes each plain stretch between them with
SentencePiece on its own, and inserts the special ids in between. This is what the
reference HuggingFace tokenizer does with its "added tokens". Because the model has no dummy
prefix, a stretch that starts with a space keeps it (``" Hello"`` -> ``▁Hello``), and
SentencePiece's decoder does not strip that space either, so decoding the stretches
separately and concatenating them gives the original text back.

:meth:`Tokenizer.decode` mirrors this: runs of ordinary ids are decoded by SentencePiece,
special ids are rendered as their strings (or dropped). :class:`StreamDecoder` produces the
same text incrementally for token-by-token generation.

Known, inherent limits of the model file (not of this wrapper):

* A literal ``"▁"`` (U+2581) in the input is SentencePiece's whitespace marker; it is
  encoded like a space and decodes as ``" "``.
* The raw piece names ``[UNUSED_TOKEN_141]`` .. ``[UNUSED_TOKEN_146]`` are themselves in
  the vocabulary, so SentencePiece turns that literal text into the chat-marker ids (as the
  reference tokenizer does); they decode as ``<|plugin|>`` .. ``<|im_start|>``.
"""

from __future__ import annotations

import hashlib
import operator
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import sentencepiece as spm

from .files import atomic_write

__all__ = ["Tokenizer", "StreamDecoder", "CHAT_ROLES", "CHAT_SPECIAL_TOKENS"]

#: Chat markers of InternLM2 and the raw SentencePiece pieces that carry them.
CHAT_SPECIAL_TOKENS: dict[str, str] = {
    "<|plugin|>": "[UNUSED_TOKEN_141]",
    "<|interpreter|>": "[UNUSED_TOKEN_142]",
    "<|action_end|>": "[UNUSED_TOKEN_143]",
    "<|action_start|>": "[UNUSED_TOKEN_144]",
    "<|im_end|>": "[UNUSED_TOKEN_145]",
    "<|im_start|>": "[UNUSED_TOKEN_146]",
}

#: Roles the InternLM2 chat format knows.
CHAT_ROLES: tuple[str, ...] = ("system", "user", "assistant", "environment")

_MODEL_FILENAME = "tokenizer.model"


def _utf8_pending_start(byte_values: Sequence[int]) -> int:
    """Index in ``byte_values`` where a possibly incomplete UTF-8 character starts.

    Returns ``len(byte_values)`` when the tail cannot be the beginning of a longer
    character. Deliberately permissive (any lead byte 0xC0..0xF7 followed by fewer
    continuation bytes than it announces counts): holding a little too much back only
    delays streamed text, while cutting inside a character would corrupt it.
    """
    n = len(byte_values)
    for k in range(min(3, n), 0, -1):  # earliest candidate start first
        start = n - k
        lead = byte_values[start]
        if 0xC0 <= lead <= 0xDF:
            need = 2
        elif 0xE0 <= lead <= 0xEF:
            need = 3
        elif 0xF0 <= lead <= 0xF7:
            need = 4
        else:
            continue
        if k < need and all(0x80 <= b <= 0xBF for b in byte_values[start + 1 :]):
            return start
    return n


class Tokenizer:
    """InternLM2 tokenizer: SentencePiece plus the chat special tokens.

    Use :meth:`from_pretrained` to load from a checkpoint folder. Ids (BOS, EOS, UNK and
    the chat markers) are read from the model file rather than hard-coded, so a checkpoint
    with a different vocabulary layout is handled or rejected, never silently mis-mapped.
    """

    def __init__(self, model_file: str | os.PathLike):
        path = Path(model_file)
        if not path.exists():
            raise FileNotFoundError(f"tokenizer model not found: {path}")
        if path.is_dir():
            raise IsADirectoryError(
                f"{path} is a directory; pass the tokenizer.model file or use Tokenizer.from_pretrained"
            )
        proto = path.read_bytes()
        try:
            sp = _processor(proto)
        except Exception as exc:  # sentencepiece raises RuntimeError/OSError on bad protos
            raise ValueError(f"{path} is not a valid sentencepiece model: {exc}") from exc
        if sp.get_piece_size() <= 0:
            raise ValueError(f"{path} is not a valid sentencepiece model (no pieces)")
        self._init(sp, proto, str(path))

    def _init(self, sp: spm.SentencePieceProcessor, proto: bytes, model_file: str) -> None:
        self._sp = sp
        self._proto = proto
        self.model_file = model_file
        self._vocab_size = sp.get_piece_size()

        special: dict[str, int] = {}
        for name, idx in (("<unk>", sp.unk_id()), ("<s>", sp.bos_id()), ("</s>", sp.eos_id())):
            if 0 <= idx < self._vocab_size:
                special[name] = idx
        for name, raw in CHAT_SPECIAL_TOKENS.items():
            idx = self._lookup_piece(name)
            if idx is None:
                idx = self._lookup_piece(raw)
            if idx is not None:
                special[name] = idx
        self._special_tokens = special
        self._special_by_id = {idx: name for name, idx in special.items()}
        # Longest first so that no special string is shadowed by a shorter one.
        names = sorted(special, key=len, reverse=True)
        self._split_re = re.compile("(" + "|".join(re.escape(n) for n in names) + ")") if names else None

    def _lookup_piece(self, piece: str) -> int | None:
        idx = self._sp.piece_to_id(piece)
        if idx == self._sp.unk_id() and piece != self._sp.id_to_piece(idx):
            return None
        return idx

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "Tokenizer":
        """Load from a ``tokenizer.model`` file or a (HF checkpoint) folder containing one."""
        p = Path(path)
        if not p.exists():
            raise FileNotFoundError(f"tokenizer model not found: {p} does not exist (nothing is fetched from the "
                                    f"network: download the model's HF folder, which holds {_MODEL_FILENAME}, "
                                    f"and pass its path)")
        if p.is_dir():
            p = p / _MODEL_FILENAME
        if not p.is_file():
            raise FileNotFoundError(f"tokenizer model not found: {p}")
        return cls(p)

    @classmethod
    def train(cls, texts: Iterable[str], model_file: str | os.PathLike, vocab_size: int = 400) -> "Tokenizer":
        """Train a small SentencePiece BPE model on ``texts`` with InternLM2's layout of special tokens
        (``<unk>``/``<s>``/``</s>`` at 0/1/2, byte fallback, no dummy prefix, the chat markers as
        pieces) and write it to ``model_file``; for examples and tests that must run offline with no
        released tokenizer. A real checkpoint brings its own ``tokenizer.model``: use that."""
        import io

        if isinstance(texts, (str, bytes)):  # iterating it would train on its characters
            raise TypeError("Tokenizer.train takes a list of texts, not one string (a file's lines: "
                            "Path(f).read_text().splitlines())")
        if Path(model_file).is_dir():
            raise IsADirectoryError(f"{model_file} is a folder; give the path of the tokenizer.model file to write")
        texts = [t for t in texts if t.strip()]
        if not texts:
            raise ValueError("Tokenizer.train needs at least one non-empty text")
        buf = io.BytesIO()
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(texts), model_writer=buf, vocab_size=vocab_size, model_type="bpe",
            byte_fallback=True, hard_vocab_limit=False, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
            add_dummy_prefix=False, remove_extra_whitespaces=False, normalization_rule_name="identity",
            user_defined_symbols=list(CHAT_SPECIAL_TOKENS), split_digits=True, minloglevel=2)
        return cls(atomic_write(model_file, buf.getvalue()))  # complete or absent, never half-written

    # Pickling: SentencePiece processors are C++ objects; rebuild from the model bytes.
    def __getstate__(self):
        return {"proto": self._proto, "model_file": self.model_file}

    def __setstate__(self, state):
        self._init(_processor(state["proto"]), state["proto"], state["model_file"])

    def sha256(self) -> str:
        """Hex SHA-256 of the tokenizer.model bytes: which tokenizer made a tokenized corpus."""
        return hashlib.sha256(self._proto).hexdigest()

    def __repr__(self) -> str:
        return f"Tokenizer(model_file={self.model_file!r}, vocab_size={self._vocab_size})"

    def __len__(self) -> int:
        return self._vocab_size

    # ------------------------------------------------------------------ ids
    @property
    def sp_model(self) -> spm.SentencePieceProcessor:
        """The underlying SentencePiece processor (knows nothing about chat markers)."""
        return self._sp

    @property
    def vocab_size(self) -> int:
        """Number of pieces (92544 for InternLM2; equals the embedding rows)."""
        return self._vocab_size

    @property
    def bos_id(self) -> int:
        """Beginning-of-sequence id, prepended by :meth:`encode` by default."""
        return self._sp.bos_id()

    @property
    def eos_id(self) -> int:
        """End-of-sequence id (never appended by :meth:`encode`)."""
        return self._sp.eos_id()

    @property
    def unk_id(self) -> int:
        """Unknown-piece id (unused in practice: byte fallback covers every input)."""
        return self._sp.unk_id()

    @property
    def pad_id(self) -> int:
        """Padding id: the model's own if it defines one, else EOS (as the HF configs do)."""
        pad = self._sp.pad_id()
        return pad if pad >= 0 else self.eos_id

    # HF's names for the same ids
    bos_token_id = property(lambda self: self.bos_id, doc="HF's name for :attr:`bos_id`.")
    eos_token_id = property(lambda self: self.eos_id, doc="HF's name for :attr:`eos_id`.")
    pad_token_id = property(lambda self: self.pad_id, doc="HF's name for :attr:`pad_id`.")

    @property
    def special_tokens(self) -> dict[str, int]:
        """Special-token string -> id; these strings are split out before SentencePiece."""
        return dict(self._special_tokens)

    @property
    def special_ids(self) -> frozenset[int]:
        """Ids of :attr:`special_tokens`; they decode to their strings, never via SentencePiece."""
        return frozenset(self._special_by_id)

    @property
    def stop_ids(self) -> list[int]:
        """Ids that end a chat turn: EOS and ``<|im_end|>`` (chat models emit the latter)."""
        stops = [self.eos_id]
        im_end = self._special_tokens.get("<|im_end|>")
        if im_end is not None and im_end not in stops:
            stops.append(im_end)
        return stops

    def id_to_piece(self, token_id: int) -> str:
        """Piece string of an id; special ids give their special string (``<|im_end|>``)."""
        token_id = self._check_id(token_id)
        name = self._special_by_id.get(token_id)
        return name if name is not None else self._sp.id_to_piece(token_id)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for, as in OpenAI's logprobs: a piece's text with its leading
        "▁" as a space, a byte-fallback piece (``<0xE4>``) its single byte, a special id its string."""
        token_id = self._check_id(token_id)
        name = self._special_by_id.get(token_id)
        if name is not None:
            return name.encode()
        if self._sp.is_byte(token_id):
            return bytes([int(self._sp.id_to_piece(token_id)[3:5], 16)])
        return self._sp.id_to_piece(token_id).replace("\u2581", " ").encode()

    def piece_to_id(self, piece: str) -> int:
        """Id of a piece; accepts special strings too. Unknown pieces give :attr:`unk_id`."""
        idx = self._special_tokens.get(piece)
        return idx if idx is not None else self._sp.piece_to_id(piece)

    def _check_id(self, token_id) -> int:
        try:
            idx = operator.index(token_id)
        except TypeError:
            raise TypeError(f"token ids must be integers, got {token_id!r} ({type(token_id).__name__})") from None
        if not 0 <= idx < self._vocab_size:
            raise ValueError(f"token id {idx} is out of range [0, {self._vocab_size})")
        return idx

    # ------------------------------------------------------------------ encode
    def encode(self, text: str, add_bos: bool = True, *, add_special_tokens: bool | None = None) -> list[int]:
        """Encode text, turning special-token strings into their ids.

        With ``add_bos`` a BOS is prepended unless the text already starts with ``<s>``,
        so chat prompts rendered with a leading ``<s>`` never get two. EOS is never added.
        ``add_special_tokens`` is HF's name for ``add_bos`` (it wins when given).
        """
        if add_special_tokens is not None:
            add_bos = add_special_tokens
        if not isinstance(text, str):
            raise TypeError(f"encode expects str, got {type(text).__name__}")
        try:
            ids = self._encode_plain_and_special(text)
        except TypeError:  # SentencePiece's answer to a str that is not valid Unicode
            bad = next((i for i, c in enumerate(text) if "\ud800" <= c <= "\udfff"), None)
            if bad is None:
                raise
            raise ValueError(f"text holds a lone UTF-16 surrogate {text[bad]!r} at character {bad}: not valid "
                             "Unicode, so it cannot be tokenized (a string cut inside a surrogate pair?)") from None
        if add_bos and (not ids or ids[0] != self.bos_id):
            ids.insert(0, self.bos_id)
        return ids

    def _encode_plain_and_special(self, text: str) -> list[int]:
        if self._split_re is None:
            return list(self._sp.encode(text)) if text else []
        parts = self._split_re.split(text)
        # re.split with one capture group alternates plain, special, plain, ...
        plain = [p for p in parts[0::2] if p]
        encoded = iter(self._sp.encode(plain)) if plain else iter(())
        ids: list[int] = []
        for i, part in enumerate(parts):
            if i % 2:
                ids.append(self._special_tokens[part])
            elif part:
                ids.extend(next(encoded))
        return ids

    def encode_batch(self, texts: Iterable[str], add_bos: bool = True) -> list[list[int]]:
        """Encode several texts (see :meth:`encode`); returns ragged lists, no padding."""
        if isinstance(texts, (str, bytes)):
            raise TypeError("encode_batch expects an iterable of str, not a single string")
        return [self.encode(t, add_bos=add_bos) for t in texts]

    # ------------------------------------------------------------------ decode
    def _decode_run(self, ids: list[int]) -> str:
        """Decode ordinary (non-special) ids with SentencePiece."""
        return self._sp.decode(ids) if ids else ""

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Decode ids to text; ``decode(encode(t, add_bos=False)) == t``.

        Special ids become their strings (``<|im_end|>``, ``<s>`` ...) so tool calls and
        turn markers survive, or are dropped with ``skip_special_tokens`` (the result is
        then the decode of the remaining ids). Out-of-range ids raise ``ValueError``.
        """
        out: list[str] = []
        run: list[int] = []
        special = self._special_by_id
        if not isinstance(ids, Iterable):  # one id, as HF's decode takes it
            ids = [operator.index(ids)]
        for raw in ids:
            idx = self._check_id(raw)
            name = special.get(idx)
            if name is None:
                run.append(idx)
            elif not skip_special_tokens:
                out.append(self._decode_run(run))
                run = []
                out.append(name)
        out.append(self._decode_run(run))
        return "".join(out)

    def decode_batch(self, batch: Iterable[Iterable[int]], skip_special_tokens: bool = False) -> list[str]:
        """Decode several id sequences (see :meth:`decode`)."""
        return [self.decode(ids, skip_special_tokens=skip_special_tokens) for ids in batch]

    def stream_decoder(self, skip_special_tokens: bool = False) -> "StreamDecoder":
        """A fresh incremental detokenizer for one generated sequence."""
        return StreamDecoder(self, skip_special_tokens=skip_special_tokens)

    # ------------------------------------------------------------------ chat
    def apply_chat_template(self, messages: Sequence[Mapping], add_generation_prompt: bool = False, *,
                            tokenize: bool = True) -> str | list[int]:
        """Messages in the InternLM2 chat format: their ids, or with ``tokenize=False`` the text. The
        defaults are HF's (ids, no generation prompt); :meth:`encode_chat` defaults to the prompt.

        ``<s>`` then ``<|im_start|>{role}\\n{content}<|im_end|>\\n`` per message, and
        ``<|im_start|>assistant\\n`` when ``add_generation_prompt`` (to make the model answer).
        A message's optional ``name`` goes into the header (``environment name=<|plugin|>``
        for tool results); ``plugin``/``interpreter`` become their special tokens.
        """
        if tokenize:
            return self.encode_chat(messages, add_generation_prompt)
        if isinstance(messages, Mapping) or isinstance(messages, (str, bytes)):
            raise TypeError("messages must be a sequence of {'role': ..., 'content': ...} mappings")
        pieces = ["<s>"]
        for i, msg in enumerate(messages):
            if not isinstance(msg, Mapping):
                raise ValueError(f"message {i} must be a mapping with 'role' and 'content', got {type(msg).__name__}")
            if "role" not in msg:
                raise ValueError(f"message {i} has no 'role'")
            if "content" not in msg:
                raise ValueError(f"message {i} has no 'content'")
            role = msg["role"]
            if role not in CHAT_ROLES:
                hint = (" (InternLM2's tool results are 'environment' messages; ij.chat(..., tools=...), the "
                        "server and SFT data convert OpenAI's 'tool')") if role == "tool" else ""
                raise ValueError(f"message {i} has invalid role {role!r}; expected one of {CHAT_ROLES}{hint}")
            content = msg["content"]
            if not isinstance(content, str):
                raise ValueError(f"message {i} content must be str, got {type(content).__name__}")
            header = role
            name = msg.get("name")
            if name is not None:
                if name == "plugin":
                    header = f"{role} name=<|plugin|>"
                elif name == "interpreter":
                    header = f"{role} name=<|interpreter|>"
                else:
                    header = f"{role} name={name}"
            pieces.append(f"<|im_start|>{header}\n{content}<|im_end|>\n")
        if add_generation_prompt:
            pieces.append("<|im_start|>assistant\n")
        return "".join(pieces)

    def encode_chat(self, messages: Sequence[Mapping], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of :meth:`apply_chat_template` (exactly one BOS, from its ``<s>``)."""
        return self.encode(self.apply_chat_template(messages, add_generation_prompt, tokenize=False), add_bos=False)


class StreamDecoder:
    """Incremental detokenizer: ``"".join(push(t) for t in ids) + flush() == decode(ids)``.

    Decoding each token on its own is wrong in two ways: tokenizers that strip a leading
    space from the first piece lose spaces ("MynameisInternLM"), and byte-fallback pieces
    (``<0xE4>`` ...) are fragments of a UTF-8 character that decode to U+FFFD alone. So the
    decoder keeps a small window: ``prefix`` (already emitted, kept as context) and the
    tokens after it. It decodes ``window`` and ``window[:read]``, and emits the difference,
    holding back the trailing byte pieces while they may still be the start of a multi-byte
    character. Per push the work is O(window), not O(sequence).

    Special ids end the current run (as in :meth:`Tokenizer.decode`) and are emitted as
    their strings, or ignored with ``skip_special_tokens``. :meth:`flush` ends the sequence
    (emits anything held back) and resets the decoder for reuse.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False):
        self._tok = tokenizer
        self.skip_special_tokens = skip_special_tokens
        sp = tokenizer.sp_model
        self._is_byte = sp.is_byte
        self._sp = sp
        self._reset()

    def _reset(self) -> None:
        self._window: list[int] = []  # ordinary ids of the current run still needed
        self._read = 0  # window[:read] has been emitted (and is kept as context)

    def _byte_value(self, idx: int) -> int:
        # Byte pieces are named "<0xAB>".
        return int(self._sp.id_to_piece(idx)[3:5], 16)

    def _emit_until(self, cut: int) -> str:
        """Emit the text of window[read:cut]; window[:read] stays as decoding context."""
        if cut <= self._read:
            return ""
        dec = self._tok._decode_run
        prefix_text = dec(self._window[: self._read])
        text = dec(self._window[:cut])
        # Both decodes share the context window[:read], so the difference is exactly the
        # new text, including a leading space that a lone decode of the new ids could drop.
        out = text[len(prefix_text) :]
        # The chunk just emitted becomes the context; older ids are no longer needed.
        self._window = self._window[self._read :]
        self._read = cut - self._read
        return out

    def push(self, token_id: int) -> str:
        """Add one generated id; return the text it completes (possibly "")."""
        idx = self._tok._check_id(token_id)
        name = self._tok._special_by_id.get(idx)
        if name is not None:
            if self.skip_special_tokens:
                return ""  # dropped; the run continues as in decode(skip_special_tokens=True)
            out = self._emit_until(len(self._window))
            self._reset()
            return out + name
        self._window.append(idx)
        # Hold back a trailing byte run that may be an incomplete UTF-8 character.
        w = self._window
        j = len(w)
        while j > self._read and j > len(w) - 3 and self._is_byte(w[j - 1]):
            j -= 1
        tail = w[j:]
        cut = j + _utf8_pending_start([self._byte_value(t) for t in tail]) if tail else len(w)
        return self._emit_until(cut)

    def flush(self) -> str:
        """End of sequence: return whatever is still held back, and reset."""
        out = self._emit_until(len(self._window))
        self._reset()
        return out


def _processor(proto: bytes) -> spm.SentencePieceProcessor:
    """A processor for the model bytes ``proto``. InternLM2's model has a "\\0" byte piece, and
    sentencepiece warns on every load that it treats it as unused (the reference loads the same file and
    does the same); warnings are held back during the load."""
    sp = spm.SentencePieceProcessor()
    spm.set_min_log_level(2)
    try:
        sp.LoadFromSerializedProto(proto)
    finally:
        spm.set_min_log_level(0)  # sentencepiece's default
    return sp
