# %% [markdown]
# # Load an InternLM2 checkpoint, run it sharded, look inside
#
# A notebook-style script (cells marked `# %%`). With a real checkpoint folder:
#
#     python examples/load_and_inspect.py /path/to/internlm2_5-7b-chat --tensor 8
#
# Without arguments it builds a tiny random InternLM2, saves it as an HF folder and uses that, so it
# runs anywhere (8 simulated CPU devices when no accelerator is present).

# %%
import argparse
import os
import sys
import tempfile

parser = argparse.ArgumentParser()
parser.add_argument("checkpoint", nargs="?", help="HF InternLM2 folder (default: a tiny random model)")
parser.add_argument("--tokenizer", help="tokenizer.model or folder (default: the checkpoint folder)")
parser.add_argument("--tensor", type=int, default=2)
parser.add_argument("--dtype", default="float32")
args = parser.parse_args(sys.argv[1:] if __name__ == "__main__" else [])

if args.checkpoint is None:  # simulate devices before JAX starts
    os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import internlm_jax as ij  # noqa: E402

# %% [markdown]
# ## A mesh and a model
# `make_mesh` names four axes: data, fsdp, tensor, sequence. Any factorisation of the devices works.

# %%
mesh = ij.make_mesh(tensor=args.tensor)  # fsdp takes the remaining devices
print("mesh:", dict(mesh.shape))

if args.checkpoint is None:
    cfg = ij.InternLM2Config.preset("internlm2_5-7b-chat").replace(
        hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2)
    folder = os.path.join(tempfile.mkdtemp(), "tiny-internlm2")
    ij.InternLM2(cfg, seed=0).save_pretrained(folder)
    args.checkpoint = folder

model = ij.InternLM2.from_pretrained(args.checkpoint, mesh=mesh, dtype=args.dtype)
print(f"{model.num_parameters():,} parameters; config: {model.config.num_hidden_layers} layers")

# %% [markdown]
# ## Tokens in, float32 logits out

# %%
tok_path = args.tokenizer or args.checkpoint
if os.path.exists(os.path.join(tok_path, "tokenizer.model")) or tok_path.endswith(".model"):
    tok = ij.Tokenizer.from_pretrained(tok_path)
    ids = jnp.asarray([tok.encode("The quick brown fox")])
else:
    tok = None
    ids = jnp.asarray([[1, 918, 4131, 14018, 38648]])  # "<s>The quick brown fox" in the InternLM2 vocab
logits, hidden = model(ids, output_hidden_states=True)
print("logits", logits.shape, logits.dtype, "sharded as", logits.sharding.spec)
next_id = int(logits[0, -1].argmax())
print("next token:", next_id, repr(tok.decode([next_id])) if tok else "")

# %% [markdown]
# ## Hidden states of every layer (HF convention: embeddings, layer outputs, final norm)

# %%
norms = jnp.linalg.norm(hidden.astype(jnp.float32), axis=-1).mean(axis=(1, 2))
for i, n in enumerate(np.asarray(norms)):
    print(f"hidden state {i}: mean norm {n:.3f}")

# %% [markdown]
# ## Where each parameter lives

# %%
for name, spec in ij.explain_sharding(model).items():
    print(f"{name:30s} {spec}")
