"""Packed training sequences with a deterministic, resumable order, read through a grain pipeline.

Sources (``data.train``): folders written by ``internlm-jax data tokenize`` and plain token files
(``.npy``; ``.bin`` with ``data.bin_dtype``), both memory-mapped (see ``corpus.py``), and small raw
text files (a document per .txt line, the ``text`` field of a .jsonl line), tokenized in memory with
<s> ... </s> around each document. Documents are laid back to back and cut into windows of
``seq_len + 1`` tokens with segment ids, so attention and loss can stay inside each document.

Batch ``t`` is a pure function of ``(seed, t)``: resuming at step ``t`` continues with exactly the
data an uninterrupted run would have seen, and process ``p`` of ``P`` reads only its rows of every
global batch. The loader's iterator state is saved with the checkpoints.

Chat data for SFT (``data.format: chat``): each .jsonl line ``{"messages": [...]}`` is one document,
rendered with the InternLM2 chat template; the loss is taken only on what the model says, i.e. each
assistant message after its generation prompt ``<|im_start|>assistant\n``: its content and the
``<|im_end|>`` that ends it (a model must learn to stop). Roles: system, user, assistant, and
environment / tool (tool results).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .corpus import EOS_ID, Piece, TokenStream, check_exists, open_token_file, open_tokenized, pack_documents

LARGE_TEXT_BYTES = 256 << 20
TEXT_SUFFIXES = {"text": (".txt", ".jsonl"), "chat": (".jsonl",)}  # raw files each format is read from


@dataclass
class Batch:
    inputs: np.ndarray  # [B, S] int32
    targets: np.ndarray  # [B, S] int32
    segment_ids: np.ndarray  # [B, S] int32, the document of each input token
    loss_mask: np.ndarray  # [B, S] float32, 0 where the target is in another document
    weight: np.ndarray | None = None  # [B, S] float32, 0 on padding rows (eval) and on targets not trained
    #                                     (chat: everything but the assistant's replies); None = all ones

    def __post_init__(self):
        if self.weight is None:
            self.weight = np.ones(self.inputs.shape, np.float32)


def text_document(tokenizer, text: str) -> list[int]:
    """A pretraining document's tokens: ``<s>`` text ``</s>``."""
    return tokenizer.encode(text, add_bos=True) + [tokenizer.eos_id]


def chat_document(tokenizer, messages, where: str, tools=None) -> tuple[list[int], list[int]]:
    """A conversation's tokens and which of them are trained (1: an assistant reply or its end).
    ``tools`` (OpenAI function definitions) become the plugin system message, as the server renders them.

    The rendered text is encoded in pieces cut where each reply starts (after ``<|im_start|>assistant\n``):
    a reply's tokens are then those the model makes after its generation prompt, which is how it
    answers at inference. Encoded whole, SentencePiece would merge that ``\n`` with a reply's leading
    newline into one token that belongs to neither. Where nothing merges the pieces give the same
    tokens as the whole text."""
    from ..chat_format import FormatError, to_internlm_messages

    if tools is not None and not isinstance(tools, list):
        raise ValueError(f"{where}: 'tools' must be a list of function definitions, got {type(tools).__name__}")
    for i, m in enumerate(messages if isinstance(messages, list) else []):
        # a reply with no text and no call (a misspelt "content") would teach the model to stop at once
        if isinstance(m, dict) and m.get("role") == "assistant" and m.get("content") is None and \
                not m.get("tool_calls") and not m.get("function_call"):
            raise ValueError(f"{where}: messages[{i}] (assistant) has no 'content' and no tool calls to train on"
                             + (f" (keys: {', '.join(map(repr, m))})" if set(m) - {"role", "content"} else ""))
    try:
        msgs = to_internlm_messages(messages, tools)
        text = tokenizer.apply_chat_template(msgs, tokenize=False)
        cuts = [len(tokenizer.apply_chat_template(msgs[:k], add_generation_prompt=True, tokenize=False))
                for k, m in enumerate(msgs) if m["role"] == "assistant"]
    except (FormatError, ValueError, TypeError) as e:
        raise ValueError(f"{where}: {e}") from None
    if not cuts:
        raise ValueError(f"{where}: the conversation has no assistant message to train on")
    end = tokenizer.special_tokens["<|im_end|>"]
    tokens = tokenizer.encode(text[:cuts[0]], add_bos=False)
    trained = [0] * len(tokens)
    for start, stop in zip(cuts, cuts[1:] + [len(text)]):
        piece = tokenizer.encode(text[start:stop], add_bos=False)  # the reply, <|im_end|>, then later turns
        reply = piece.index(end) + 1
        tokens += piece
        trained += [1] * reply + [0] * (len(piece) - reply)
    return tokens, trained


def line_document(tokenizer, line: str, where: str, *, plain: bool, fmt: str = "text",
                  text_key: str = "text") -> tuple[list[int], list[int] | None] | None:
    """One line of a raw file as ``(tokens, trained or None)``; None for a blank line. ``plain``: a .txt
    line (the document itself); else a JSON object (``text_key``; chat: ``messages`` and ``tools``).
    Shared by the in-memory reader and ``internlm-jax data tokenize``, so both make the same tokens."""
    line = line.removeprefix("\ufeff")  # a byte-order mark some editors put before the first line
    if not line.strip():
        return None
    if plain:
        return _named(where, text_document, tokenizer, line.rstrip("\r\n")), None
    key = "messages" if fmt == "chat" else text_key
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON ({e.msg})") from None
    except RecursionError:
        raise ValueError(f"{where}: JSON nested too deeply to read") from None
    try:
        value = record[key]
    except (KeyError, TypeError):
        what = "a 'messages' list" if fmt == "chat" else f"a {key!r} field"
        raise ValueError(f"{where}: not a JSON object with {what}") from None
    if fmt == "chat":
        return chat_document(tokenizer, value, where, record.get("tools"))
    if not isinstance(value, str):
        raise ValueError(f"{where}: {key!r} is not a string")
    if not value.strip():  # as a blank .txt line: no document
        return None
    return _named(where, text_document, tokenizer, value), None


def _named(where: str, fn, *args):
    """``fn(*args)``, its ValueError (e.g. the tokenizer's, on text that is not valid Unicode) led by ``where``."""
    try:
        return fn(*args)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def text_lines(path: Path):
    """``(line number, text)`` of each line of a UTF-8 file; other bytes are a ValueError naming the line."""
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                yield n, raw.decode("utf-8")
            except UnicodeDecodeError:
                raise ValueError(f"{path}:{n}: not UTF-8 text") from None


def read_documents(path: str, tokenizer, text_key: str = "text", fmt: str = "text") -> Piece:
    """One raw text file (.txt, .jsonl; chat .jsonl), tokenized in memory: for small corpora (tokenize
    a large one first with ``internlm-jax data tokenize``)."""
    file = Path(path)
    check_exists(file)
    if file.suffix not in TEXT_SUFFIXES[fmt]:
        token_files = " or a .npy/.bin token file" if fmt == "text" else ""
        raise ValueError(f"{file}: {fmt} data is read from a tokenized folder{token_files} or a raw "
                         f"{' or '.join(TEXT_SUFFIXES[fmt])} file, not {file.suffix or 'a file without a suffix'}")
    if tokenizer is None:
        raise ValueError(f"{file}: {fmt} data needs a tokenizer (set 'tokenizer' in the config)")
    if file.stat().st_size > LARGE_TEXT_BYTES:
        print(f"{file}: {file.stat().st_size / 1e9:.1f} GB of text is tokenized in memory by every process at "
              f"every start; `internlm-jax data tokenize` it once instead", file=sys.stderr)
    docs, trained = [], []
    for n, line in text_lines(file):
        doc = line_document(tokenizer, line, f"{file}:{n}", plain=file.suffix != ".jsonl", fmt=fmt,
                            text_key=text_key)
        if doc is not None:
            docs.append(doc[0])
            trained.append(doc[1])
    if not docs:
        raise ValueError(f"{file}: no {'conversations' if fmt == 'chat' else 'documents'}")
    piece = pack_documents(docs, trained if fmt == "chat" else None, np.int32)
    piece.source = str(file)
    return piece


def open_source(path: str, tokenizer, text_key: str = "text", fmt: str = "text",
                bin_dtype: str | None = None) -> list[Piece]:
    """A ``data.train`` entry as pieces: a tokenized folder, a token file, or a raw text file."""
    p = Path(path)
    check_exists(p)
    if p.is_dir():
        pieces, index = open_tokenized(p)
        if fmt == "chat" and index["kind"] != "chat":
            raise ValueError(f"{p} was tokenized as text; for SFT run `internlm-jax data tokenize --format chat`")
        if tokenizer is not None and index["vocab_size"] != tokenizer.vocab_size:
            raise ValueError(f"{p} was tokenized with a {index['vocab_size']}-token vocabulary; the configured "
                             f"tokenizer has {tokenizer.vocab_size}")
        if tokenizer is not None and index.get("tokenizer_sha256") not in (None, tokenizer.sha256()):
            raise ValueError(f"{p} was tokenized with another tokenizer.model than the configured one "
                             f"({tokenizer.model_file}): its ids would mean other text; tokenize it again with "
                             "that tokenizer, or configure the one it was made with")
        return pieces
    if p.suffix in (".npy", ".bin"):
        if fmt == "chat":
            raise ValueError(f"{p}: a token file has no loss mask; chat data (SFT) is read from .jsonl or from "
                             "a folder of `internlm-jax data tokenize --format chat`")
        return [open_token_file(p, bin_dtype)]
    return [read_documents(path, tokenizer, text_key, fmt)]


def _collate(rows: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> Batch:
    toks, segs, weight = (np.stack(x) for x in zip(*rows))
    return Batch(inputs=toks[:, :-1], targets=toks[:, 1:], segment_ids=segs[:, :-1],
                 loss_mask=(segs[:, 1:] == segs[:, :-1]).astype(np.float32), weight=weight)


class PackedDataset:
    """Windows of ``seq_len + 1`` tokens over the documents of ``files``, back to back; with
    ``vocab_size`` (the model's), every window read is checked to hold only ids below it.

    Global batch ``t`` holds windows ``order[t * B : (t + 1) * B]``, where ``order`` is grain's seeded
    index shuffle, reshuffled each epoch (no permutation array is kept); a process reads only the rows
    its devices hold (``rows``: all of them when the batch is not split across processes)."""

    def __init__(self, files: list[str], tokenizer, seq_len: int, *, text_key: str = "text", seed: int = 0,
                 fmt: str = "text", bin_dtype: str | None = None, vocab_size: int | None = None):
        import grain

        pieces = [p for f in files for p in open_source(f, tokenizer, text_key, fmt, bin_dtype)]
        self.stream = TokenStream(pieces, tokenizer.eos_id if tokenizer is not None else EOS_ID, vocab_size)
        self.seq_len, self.seed = seq_len, seed
        self.num_windows = (len(self.stream) - 1) // seq_len
        if self.num_windows < 1:
            raise ValueError(f"{', '.join(map(str, files))}: {len(self.stream)} tokens are fewer than one sequence "
                             f"of seq_len + 1 = {seq_len + 1}")
        self.order = grain.MapDataset.range(self.num_windows).shuffle(seed=seed).repeat()

    def window(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Window ``i``'s tokens and document ids (``seq_len + 1`` of each)."""
        a = i * self.seq_len
        return self.stream.tokens(a, a + self.seq_len + 1), self.stream.segments(a, a + self.seq_len + 1)

    def trained_targets(self, i: int) -> np.ndarray:
        """float32 ``[seq_len]``: 1 where window ``i``'s target token is trained."""
        a = i * self.seq_len
        return self.stream.trained(a + 1, a + self.seq_len + 1)

    def window_at(self, flat: int) -> int:
        """The window at position ``flat`` of the training order (epoch ``flat // num_windows``)."""
        return int(self.order[flat])

    def example(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return (*self.window(i), self.trained_targets(i))

    def batch(self, step: int, batch_size: int, rows: range | None = None) -> Batch:
        """Rows ``rows`` (default: all) of global batch ``step``."""
        source = _ProcessRows(self, batch_size, rows, step + 1)
        return _collate([source[step * len(source.rows) + k] for k in range(len(source.rows))])

    def loader(self, batch_size: int, steps: int, rows: range | None = None, *, threads: int = 2,
               prefetch: int = 4):
        """A grain pipeline of this process's batches for steps ``0 .. steps - 1`` (element ``t`` equals
        ``batch(t, ...)``), read ahead by ``threads`` background threads. Its iterator's state
        (``get_state`` / ``set_state``, saved in the training checkpoints) is the next step."""
        import grain

        source = _ProcessRows(self, batch_size, rows, steps)
        batches = grain.MapDataset.source(source).batch(len(source.rows), batch_fn=_collate)
        return batches.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=prefetch))

    def eval_batches(self, batch_size: int):
        """Every window once, in order (for perplexity); the last batch is padded with weight-0 rows."""
        for start in range(0, self.num_windows, batch_size):
            idx = list(range(start, min(start + batch_size, self.num_windows)))
            real = len(idx)
            batch = _collate([self.example(i) for i in idx + [idx[0]] * (batch_size - real)])
            batch.weight[real:] = 0
            yield batch


class _ProcessRows:
    """grain source: element ``t * R + k`` is row ``rows[k]`` of global batch ``t`` (R = len(rows))."""

    def __init__(self, data: PackedDataset, batch_size: int, rows: range | None, steps: int):
        if rows is None:
            rows = range(batch_size)
        if not isinstance(rows, range) or not rows or not 0 <= rows.start < rows.stop <= batch_size or rows.step != 1:
            raise ValueError(f"rows must be a range of the batch's rows (0..{batch_size}), got {rows!r}")
        self.data, self.batch_size, self.rows, self.steps = data, batch_size, rows, steps

    def __len__(self) -> int:
        return self.steps * len(self.rows)

    def __getitem__(self, j: int):
        step, k = divmod(j, len(self.rows))
        return self.data.example(self.data.window_at(step * self.batch_size + self.rows[k]))
