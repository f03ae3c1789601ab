"""Tokenized, packed training sequences with a deterministic, resumable order.

Documents (a line of a .txt file, the ``text`` field of a .jsonl line, or a pre-tokenized .npy
stream) are tokenized with BOS and closed with EOS, concatenated, and cut into windows of
``seq_len + 1`` tokens. The window order is a seeded permutation per epoch, so batch ``t`` is a pure
function of ``(seed, t)``: resuming at step ``t`` continues with exactly the data an uninterrupted
run would have seen, and process ``p`` of ``P`` reads only rows ``p::P`` of every global batch.

Chat data for SFT (``data.format: chat``): each .jsonl line ``{"messages": [...]}`` is one document,
rendered with the InternLM2 chat template; the loss is taken only on what the model says, i.e. each
assistant message after its generation prompt ``<|im_start|>assistant\n``: its content and the
``<|im_end|>`` that ends it (a model must learn to stop). Roles: system, user, assistant, and
environment / tool (tool results).

A small index-based loader is used rather than grain: everything it needs is a permutation of
window indices, and that keeps resume and multi-host sharding exact and easy to test.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np


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


def chat_document(tokenizer, messages, where: str) -> tuple[list[int], list[int]]:
    """A conversation's tokens and which of them are trained (1: an assistant reply or its end)."""
    from ..chat_format import FormatError, to_internlm_messages

    try:
        msgs = to_internlm_messages(messages)
        tokens = tokenizer.encode_chat(msgs, add_generation_prompt=False)
        trained = [0] * len(tokens)
        end = tokenizer.special_tokens["<|im_end|>"]
        for k, m in enumerate(msgs):
            if m["role"] != "assistant":
                continue
            prompt = tokenizer.encode_chat(msgs[:k], add_generation_prompt=True)
            if tokens[:len(prompt)] != prompt:
                raise ValueError("the generation prompt does not tokenize as a prefix of the conversation")
            stop = tokens.index(end, len(prompt))
            trained[len(prompt):stop + 1] = [1] * (stop + 1 - len(prompt))
    except (FormatError, ValueError, TypeError) as e:
        raise ValueError(f"{where}: {e}") from None
    if not any(trained):
        raise ValueError(f"{where}: the conversation has no assistant message to train on")
    return tokens, trained


def read_documents(path: str, tokenizer, text_key: str = "text", fmt: str = "text"):
    """(tokens, document ids, trained or None) of one file; ``trained`` marks the tokens the loss
    predicts (chat data), None for plain text where every token is trained."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"training data file {file} does not exist")
    if fmt == "chat":
        if tokenizer is None:
            raise ValueError(f"{file}: chat data needs a tokenizer (set 'tokenizer' in the config)")
        ids, docs, trained = [], [], []
        with open(file, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    messages = json.loads(line)["messages"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise ValueError(f"{file}:{n}: not a JSON object with a 'messages' list") from None
                t, m = chat_document(tokenizer, messages, f"{file}:{n}")
                ids.append(np.asarray(t, np.int32))
                docs.append(np.full(len(t), len(docs), np.int32))
                trained.append(np.asarray(m, np.uint8))
        if not ids:
            raise ValueError(f"{file}: no conversations")
        return np.concatenate(ids), np.concatenate(docs), np.concatenate(trained)
    if file.suffix == ".npy":
        tokens = np.load(file, mmap_mode="r").reshape(-1).astype(np.int32)
        docs = np.cumsum(np.concatenate([[0], tokens[:-1] == 2])).astype(np.int32)  # EOS ends a document
        return tokens, docs, None
    if tokenizer is None:
        raise ValueError(f"{file}: text data needs a tokenizer (set 'tokenizer' in the config)")
    texts = []
    with open(file, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if file.suffix == ".jsonl":
                if not line.strip():
                    continue
                try:
                    texts.append(json.loads(line)[text_key])
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise ValueError(f"{file}:{n}: not a JSON object with a {text_key!r} field") from None
            elif line.strip():
                texts.append(line.rstrip("\n"))
    ids, docs = [], []
    for d, text in enumerate(texts):
        t = tokenizer.encode(text, add_bos=True) + [tokenizer.eos_id]
        ids.append(np.asarray(t, np.int32))
        docs.append(np.full(len(t), d, np.int32))
    if not ids:
        raise ValueError(f"{file}: no documents")
    return np.concatenate(ids), np.concatenate(docs), None


class PackedDataset:
    """Windows of ``seq_len + 1`` tokens over the concatenated documents of ``files``."""

    def __init__(self, files: list[str], tokenizer, seq_len: int, *, text_key: str = "text", seed: int = 0,
                 fmt: str = "text"):
        streams, doc_streams, trained, offset = [], [], [], 0
        for path in files:
            tokens, docs, mask = read_documents(path, tokenizer, text_key, fmt)
            streams.append(tokens)
            doc_streams.append(docs + offset)
            trained.append(mask)
            offset = int(doc_streams[-1][-1]) + 1
        self.tokens = np.concatenate(streams)
        self.docs = np.concatenate(doc_streams)
        self.trained = None if all(m is None for m in trained) else np.concatenate(
            [np.ones(len(t), np.uint8) if m is None else m for t, m in zip(streams, trained)])
        self.seq_len, self.seed = seq_len, seed
        self.num_windows = (len(self.tokens) - 1) // seq_len
        if self.num_windows < 1:
            raise ValueError(f"{len(self.tokens)} tokens are fewer than one sequence of {seq_len + 1}")

    def window(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        a = i * self.seq_len
        return self.tokens[a:a + self.seq_len + 1], self.docs[a:a + self.seq_len + 1]

    def trained_targets(self, i: int) -> np.ndarray:
        """float32 ``[seq_len]``: 1 where window ``i``'s target token is trained."""
        if self.trained is None:
            return np.ones(self.seq_len, np.float32)
        a = i * self.seq_len
        return self.trained[a + 1:a + self.seq_len + 1].astype(np.float32)

    def order(self, epoch: int) -> np.ndarray:
        if getattr(self, "_order_epoch", None) != epoch:
            self._order = np.random.default_rng([self.seed, epoch]).permutation(self.num_windows)
            self._order_epoch = epoch
        return self._order

    def batch(self, step: int, batch_size: int, process: int = 0, num_processes: int = 1) -> Batch:
        """Rows ``process::num_processes`` of global batch ``step``."""
        rows = range(process * batch_size // num_processes, (process + 1) * batch_size // num_processes)
        toks, segs, weight = [], [], []
        for r in rows:
            flat = step * batch_size + r
            epoch, k = divmod(flat, self.num_windows)
            i = int(self.order(epoch)[k])
            t, d = self.window(i)
            toks.append(t)
            segs.append(d)
            weight.append(self.trained_targets(i))
        toks, segs = np.stack(toks), np.stack(segs)
        segs = segs - segs[:, :1]
        return Batch(inputs=toks[:, :-1], targets=toks[:, 1:], segment_ids=segs[:, :-1],
                     loss_mask=(segs[:, 1:] == segs[:, :-1]).astype(np.float32), weight=np.stack(weight))

    def eval_batches(self, batch_size: int):
        """Every window once, in order (for perplexity); the last batch is padded with weight-0 rows."""
        for start in range(0, self.num_windows, batch_size):
            idx = list(range(start, min(start + batch_size, self.num_windows)))
            real = len(idx)
            idx += [idx[0]] * (batch_size - real)
            t, d = zip(*(self.window(i) for i in idx))
            toks, segs = np.stack(t), np.stack(d)
            segs = segs - segs[:, :1]
            weight = np.stack([self.trained_targets(i) for i in idx])
            weight[real:] = 0
            yield Batch(toks[:, :-1], toks[:, 1:], segs[:, :-1], (segs[:, 1:] == segs[:, :-1]).astype(np.float32),
                        weight)
