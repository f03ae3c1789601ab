# %% [markdown]
# # Continued pretraining, step by step
#
# The `internlm-jax train --config run.yaml` command runs exactly this; here each piece is visible.
# Defaults train a tiny random InternLM2 on `examples/data/tiny_corpus.txt` on simulated CPU devices:
#
#     python examples/train_walkthrough.py --steps 60
#
# For a real run, start from a checkpoint (`--checkpoint path/to/internlm2_5-7b`), raise `--seq-len`
# and the mesh sizes, and point `--data` at your text, jsonl or pre-tokenized .npy files.

# %%
import argparse
import os
import sys
import tempfile
from pathlib import Path

here = Path(__file__).resolve().parent
parser = argparse.ArgumentParser()
parser.add_argument("--checkpoint", help="HF or Orbax folder to continue from (default: a tiny random model)")
parser.add_argument("--tokenizer", default="demo",
                    help="tokenizer.model or folder; default 'demo': a small SentencePiece model trained on --data "
                         "(offline; a real checkpoint brings its own tokenizer.model)")
parser.add_argument("--data", nargs="+", default=[str(here / "data" / "tiny_corpus.txt")])
parser.add_argument("--steps", type=int, default=60)
parser.add_argument("--seq-len", type=int, default=32)
parser.add_argument("--out", default=None, help="run folder (default: a temporary one)")
args = parser.parse_args(sys.argv[1:] if __name__ == "__main__" else [])
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import internlm_jax as ij  # noqa: E402
from internlm_jax.training import TrainConfig, train  # noqa: E402
from internlm_jax.training.loop import load_tokenizer  # noqa: E402

out = Path(args.out or tempfile.mkdtemp())

# %% [markdown]
# ## The configuration (the same keys as a YAML file; see examples/train_tiny.yaml)

# %%
model = ({"checkpoint": args.checkpoint} if args.checkpoint else
         {"preset": "internlm2_5-7b", "overrides": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                                                    "num_attention_heads": 4, "num_key_value_heads": 2,
                                                    "vocab_size": 400}})  # the demo tokenizer's size
cfg = TrainConfig.from_dict({
    "model": {**model, "dtype": "float32", "param_dtype": "float32"},
    "tokenizer": args.tokenizer,
    "data": {"train": args.data, "seq_len": args.seq_len, "batch_size": 8, "segment_masking": True},
    "optim": {"lr": 3e-3, "warmup_steps": 10, "weight_decay": 0.0, "clip_norm": 1.0},
    "mesh": {"data": 2, "fsdp": 4},
    "checkpoint": {"dir": str(out / "checkpoints"), "every": 20, "keep": 2},
    "log": {"every": 10, "jsonl": str(out / "metrics.jsonl")},
    "steps": args.steps,
    "export_hf": str(out / "hf"),
})

# %% [markdown]
# ## Train: packed documents, AdamW with warmup + cosine, Orbax checkpoints every 20 steps.
# Running this cell again resumes from the last checkpoint instead of starting over.

# %%
history = train(cfg)
print(f"loss {history[0]['loss']:.3f} -> {history[-1]['loss']:.3f}")

# %% [markdown]
# ## The exported HF folder loads like any checkpoint; generate from the start of a training line

# %%
tok = load_tokenizer(cfg)  # the configured one (the demo model was kept beside the checkpoints)
trained = ij.InternLM2.from_pretrained(out / "hf")
first_line = Path(args.data[0]).read_text().splitlines()[0]
prompt = tok.encode(first_line)[:6]
print("prompt:", repr(tok.decode(prompt, skip_special_tokens=True)))
print("model :", repr(ij.generate(trained, tok, [prompt], max_new_tokens=12, add_bos=False)[0]))
