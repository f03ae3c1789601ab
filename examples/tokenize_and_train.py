"""A corpus larger than memory: tokenize once, train from disk.

    python examples/tokenize_and_train.py [--tokenizer TOKENIZER --input 'corpus/*.jsonl'] [--workers 2]

The same two steps as the commands

    internlm-jax data tokenize --tokenizer TOKENIZER --input 'corpus/*.jsonl' --output data/tok --workers 8
    internlm-jax train --config run.yaml        # data.train: [data/tok]

Offline defaults: two JSONL files made from `examples/data/tiny_corpus.txt`, a small SentencePiece
model trained on it (a real checkpoint brings its own `tokenizer.model`), a tiny random InternLM2.
The work is in main(): tokenize's worker processes are spawned and import this file.
"""

import argparse
import json
import tempfile
from pathlib import Path

import internlm_jax as ij
from internlm_jax.training import TrainConfig, train
from internlm_jax.training.data import PackedDataset
from internlm_jax.training.tokenize import tokenize_corpus

HERE = Path(__file__).resolve().parent


def demo_corpus(out: Path) -> list[str]:
    """Two JSONL files of 2,000 short documents each, standing in for 'corpus/*.jsonl'."""
    lines = (HERE / "data" / "tiny_corpus.txt").read_text().splitlines()
    for part in range(2):
        with open(out / f"part-{part}.jsonl", "w") as f:
            for i in range(2000):
                f.write(json.dumps({"text": f"{lines[(i + part) % len(lines)]} ({part}-{i})"}) + "\n")
    return [str(out / "part-*.jsonl")]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokenizer", help="a tokenizer.model or a checkpoint folder (default: train a small one)")
    parser.add_argument("--input", nargs="+", help="text / jsonl files or glob patterns (default: a demo corpus)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", help="working folder (default: a temporary one)")
    args = parser.parse_args()
    out = Path(args.out or tempfile.mkdtemp())
    out.mkdir(parents=True, exist_ok=True)
    inputs = args.input or demo_corpus(out)
    tokenizer = args.tokenizer or ij.Tokenizer.train(
        (HERE / "data" / "tiny_corpus.txt").read_text().splitlines(), out / "tokenizer.model").model_file

    # 1. Tokenize: byte ranges of each file go to worker processes, shards come out in input order. The
    #    work happens in .tok.partial, renamed to tok when complete; rerun after an interruption to resume.
    index = tokenize_corpus(str(tokenizer), inputs, out / "tok", workers=args.workers, chunk_bytes=64 << 10,
                            overwrite=True)
    print(f"{index['tokens']:,} tokens, {index['documents']:,} documents in {len(index['shards'])} shards")

    # 2. What training reads: windows of seq_len + 1 tokens with document ids, memory-mapped.
    tok = ij.Tokenizer.from_pretrained(tokenizer)
    data = PackedDataset([str(out / "tok")], tok, 32, seed=0)
    batch = data.batch(0, 4)
    print(f"{data.num_windows:,} windows; batch 0, row 0: {tok.decode(batch.inputs[0].tolist())!r}")
    print("  segment ids:", batch.segment_ids[0].tolist())

    # 3. Train on it; the grain loader's position is saved with each checkpoint.
    cfg = TrainConfig.from_dict({
        "model": {"preset": "internlm2_5-7b", "dtype": "float32", "param_dtype": "float32",
                  "overrides": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                                "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": tok.vocab_size}},
        "data": {"train": [str(out / "tok")], "seq_len": 32, "batch_size": 8},
        "optim": {"lr": 3e-3, "warmup_steps": 5},
        "checkpoint": {"dir": str(out / "run"), "every": 10},
        "log": {"every": 5, "peak_tflops": 1.0}, "steps": args.steps})
    history = train(cfg)
    print(f"loss {history[0]['loss']:.2f} -> {history[-1]['loss']:.2f}; checkpoints in {out / 'run'}")


if __name__ == "__main__":
    main()
