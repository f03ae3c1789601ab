"""Tokenized, packed training sequences with a deterministic, resumable order.

Documents (a line of a .txt file, the ``text`` field of a .jsonl line, or a pre-tokenized .npy
stream) are tokenized with BOS and closed with EOS, concatenated, and cut into windows of
``seq_len + 1`` tokens. The window order is a seeded permutation per epoch, so batch ``t`` is a pure
function of ``(seed, t)``: resuming at step ``t`` continues with exactly the data an uninterrupted
run would have seen, and process ``p`` of ``P`` reads only rows ``p::P`` of every global batch.

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
    weight: np.ndarray | None = None  # [B, S] float32, 0 on padding rows (eval); None = all ones

    def __post_init__(self):
        if self.weight is None:
            self.weight = np.ones(self.inputs.shape, np.float32)


def read_documents(path: str, tokenizer, text_key: str = "text") -> tuple[np.ndarray, np.ndarray]:
    """(tokens, document ids) of one file."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"training data file {file} does not exist")
    if file.suffix == ".npy":
        tokens = np.load(file, mmap_mode="r").reshape(-1).astype(np.int32)
        docs = np.cumsum(np.concatenate([[0], tokens[:-1] == 2])).astype(np.int32)  # EOS ends a document
        return tokens, docs
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
    return np.concatenate(ids), np.concatenate(docs)


class PackedDataset:
    """Windows of ``seq_len + 1`` tokens over the concatenated documents of ``files``."""

    def __init__(self, files: list[str], tokenizer, seq_len: int, *, text_key: str = "text", seed: int = 0):
        streams, doc_streams, offset = [], [], 0
        for path in files:
            tokens, docs = read_documents(path, tokenizer, text_key)
            streams.append(tokens)
            doc_streams.append(docs + offset)
            offset = int(doc_streams[-1][-1]) + 1
        self.tokens = np.concatenate(streams)
        self.docs = np.concatenate(doc_streams)
        self.seq_len, self.seed = seq_len, seed
        self.num_windows = (len(self.tokens) - 1) // seq_len
        if self.num_windows < 1:
            raise ValueError(f"{len(self.tokens)} tokens are fewer than one sequence of {seq_len + 1}")

    def window(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        a = i * self.seq_len
        return self.tokens[a:a + self.seq_len + 1], self.docs[a:a + self.seq_len + 1]

    def order(self, epoch: int) -> np.ndarray:
        if getattr(self, "_order_epoch", None) != epoch:
            self._order = np.random.default_rng([self.seed, epoch]).permutation(self.num_windows)
            self._order_epoch = epoch
        return self._order

    def batch(self, step: int, batch_size: int, process: int = 0, num_processes: int = 1) -> Batch:
        """Rows ``process::num_processes`` of global batch ``step``."""
        rows = range(process * batch_size // num_processes, (process + 1) * batch_size // num_processes)
        toks, segs = [], []
        for r in rows:
            flat = step * batch_size + r
            epoch, k = divmod(flat, self.num_windows)
            t, d = self.window(int(self.order(epoch)[k]))
            toks.append(t)
            segs.append(d)
        toks, segs = np.stack(toks), np.stack(segs)
        segs = segs - segs[:, :1]
        return Batch(inputs=toks[:, :-1], targets=toks[:, 1:], segment_ids=segs[:, :-1],
                     loss_mask=(segs[:, 1:] == segs[:, :-1]).astype(np.float32))

    def eval_batches(self, batch_size: int):
        """Every window once, in order (for perplexity); the last batch is padded with weight-0 rows."""
        for start in range(0, self.num_windows, batch_size):
            idx = list(range(start, min(start + batch_size, self.num_windows)))
            real = len(idx)
            idx += [idx[0]] * (batch_size - real)
            t, d = zip(*(self.window(i) for i in idx))
            toks, segs = np.stack(t), np.stack(d)
            segs = segs - segs[:, :1]
            weight = np.zeros(toks[:, :-1].shape, np.float32)
            weight[:real] = 1
            yield Batch(toks[:, :-1], toks[:, 1:], segs[:, :-1], (segs[:, 1:] == segs[:, :-1]).astype(np.float32),
                        weight)
