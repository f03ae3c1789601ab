# %% [markdown]
# # Generate, stream and chat with InternLM2
#
# Notebook-style (cells marked `# %%`). With a real chat checkpoint (HF or converted Orbax folder):
#
#     python examples/generate_and_chat.py /path/to/internlm2_5-7b-chat --tensor 8 --dtype bfloat16
#
# Without a checkpoint it builds a tiny random model sized to the tokenizer's vocabulary, so the
# mechanics run anywhere (the text is then gibberish). Its tokenizer is the checkpoint's
# `tokenizer.model`, `--tokenizer`, or, with neither, a small SentencePiece model trained here on
# examples/data/tiny_corpus.txt (offline; a real checkpoint brings its own tokenizer.model).

# %%
import argparse
import os
import sys
import tempfile
from pathlib import Path

parser = argparse.ArgumentParser()
parser.add_argument("checkpoint", nargs="?")
parser.add_argument("--tokenizer")
parser.add_argument("--tensor", type=int, default=2)
parser.add_argument("--dtype", default=None)
parser.add_argument("--max-new-tokens", type=int, default=32)
args = parser.parse_args(sys.argv[1:] if __name__ == "__main__" else [])
if args.checkpoint is None:
    os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import internlm_jax as ij  # noqa: E402

# %%
if args.tokenizer or args.checkpoint:
    tok = ij.Tokenizer.from_pretrained(args.tokenizer or args.checkpoint)
else:
    corpus = (Path(__file__).resolve().parent / "data" / "tiny_corpus.txt").read_text().splitlines()
    tok = ij.Tokenizer.train(corpus, Path(tempfile.mkdtemp()) / "tokenizer.model")
mesh = ij.make_mesh(tensor=args.tensor)
if args.checkpoint is None:
    cfg = ij.InternLM2Config.preset("internlm2_5-7b-chat").replace(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=tok.vocab_size)
    args.checkpoint = os.path.join(tempfile.mkdtemp(), "tiny")
    ij.InternLM2(cfg, seed=0).save_pretrained(args.checkpoint)
model = ij.InternLM2.from_pretrained(args.checkpoint, mesh=mesh, dtype=args.dtype)

# %% [markdown]
# ## A batch of prompts (different lengths are left-padded; each stops on its own)

# %%
outs = ij.generate(model, tok, ["Hello", "Write a poem about JAX"], max_new_tokens=args.max_new_tokens,
                   temperature=0.7, top_p=0.8, seed=0)
for text in outs:
    print(repr(text))

# %% [markdown]
# ## Streaming: pieces arrive as tokens are produced

# %%
for piece in ij.stream(model, tok, "Tell me a story", max_new_tokens=args.max_new_tokens):
    print(piece, end="", flush=True)
print()

# %% [markdown]
# ## Chat: the InternLM2 template, the assistant message back

# %%
messages = [{"role": "user", "content": "你好"}]
reply = ij.chat(model, tok, messages, max_new_tokens=args.max_new_tokens)
print(reply["role"], ":", repr(reply["content"]))
messages.append(reply)
