# %% [markdown]
# # Needle in a haystack, sequence-parallel
#
# Builds a haystack of filler sentences of a chosen length (in tokens), hides a "needle" sentence at
# a chosen depth, and asks the model for it in a chat turn. The prompt is prefilled with ring
# attention over the `sequence` mesh axis and decoded over the sequence-sharded KV cache.
#
# With real weights (for example InternLM2.5-7B-Chat-1M on 8 GPUs) this is a meaningful retrieval test:
#
#     python examples/needle_in_haystack.py /path/to/internlm2_5-7b-chat-1m --length 200000 --sequence 8 \
#         --dtype bfloat16
#
# Without a checkpoint it builds a tiny random model (the answer is then gibberish, but every step
# runs: haystack, template, sharded prefill and decode), on simulated CPU devices; with no checkpoint and
# no `--tokenizer` it trains a small SentencePiece model on the filler text (offline; a real checkpoint
# brings its own tokenizer.model).

# %%
import argparse
import os
import sys
import tempfile
from pathlib import Path

parser = argparse.ArgumentParser()
parser.add_argument("checkpoint", nargs="?")
parser.add_argument("--tokenizer")
parser.add_argument("--length", type=int, default=2000, help="haystack length in tokens")
parser.add_argument("--depth", type=float, default=0.5, help="where the needle goes (0 = start, 1 = end)")
parser.add_argument("--sequence", type=int, default=4)
parser.add_argument("--dtype", default=None)
parser.add_argument("--max-new-tokens", type=int, default=24)
args = parser.parse_args(sys.argv[1:] if __name__ == "__main__" else [])
if args.checkpoint is None:
    os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import internlm_jax as ij  # noqa: E402

NEEDLE = "The secret passphrase for the vault is 'blue-harbor-42'."
QUESTION = "What is the secret passphrase for the vault? Answer with the passphrase only."
FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ")

# %%
if args.tokenizer or args.checkpoint:
    tok = ij.Tokenizer.from_pretrained(args.tokenizer or args.checkpoint)
else:
    tok = ij.Tokenizer.train([FILLER, NEEDLE, QUESTION], Path(tempfile.mkdtemp()) / "tokenizer.model")
mesh = ij.make_mesh(sequence=args.sequence)
if args.checkpoint is None:
    cfg = ij.InternLM2Config.preset("internlm2_5-7b-chat-1m").replace(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=tok.vocab_size)
    args.checkpoint = os.path.join(tempfile.mkdtemp(), "tiny")
    ij.InternLM2(cfg, seed=0).save_pretrained(args.checkpoint)
model = ij.InternLM2.from_pretrained(args.checkpoint, mesh=mesh, dtype=args.dtype)

# %% [markdown]
# ## The haystack: filler up to the length, the needle at the depth

# %%
filler_ids = tok.encode(FILLER, add_bos=False)
needle_ids = tok.encode(" " + NEEDLE + " ", add_bos=False)
reps = max(1, (args.length - len(needle_ids)) // len(filler_ids))
hay = filler_ids * reps
at = int(len(hay) * args.depth)
haystack = tok.decode(hay[:at] + needle_ids + hay[at:])
messages = [{"role": "user", "content": haystack + "\n\n" + QUESTION}]
prompt = tok.encode_chat(messages)
print(f"haystack {len(prompt)} tokens, needle at depth {args.depth:.0%}, mesh {dict(mesh.shape)}")

# %%
reply = ij.chat(model, tok, messages, max_new_tokens=args.max_new_tokens,
                max_length=len(prompt) + args.max_new_tokens)
print("answer:", repr(reply["content"]))
print("found the needle:", "blue-harbor-42" in reply["content"])
