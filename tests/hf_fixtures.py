"""Tiny HF InternLM2 checkpoints for tests, written with torch's own writers (independent of ours)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np


def tiny_config(**overrides) -> dict:
    """An HF config.json dict for a tiny InternLM2 (GQA 3:1, dynamic NTK, max_pos 16)."""
    cfg = dict(architectures=["InternLM2ForCausalLM"], model_type="internlm2", vocab_size=96, hidden_size=48,
               intermediate_size=80, num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2,
               max_position_embeddings=16, rms_norm_eps=1e-5, rope_theta=10000.0,
               rope_scaling={"type": "dynamic", "factor": 2.0}, bias=False, tie_word_embeddings=False,
               hidden_act="silu", initializer_range=0.02, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    cfg.update(overrides)
    return cfg


def write_hf_checkpoint(folder: Path, cfg: dict, state: dict, layout: str = "safetensors",
                        dtype: str = "float32", shards: int = 1) -> Path:
    """Write ``state`` (HF names, numpy) the way HF tooling does, with torch's own writers.

    layout: "safetensors" (one file or ``shards`` files + index), "bin" (torch.save, same sharding) or
    "legacy_bin" (torch.save's legacy, non-zip format).
    """
    import safetensors.torch as st
    import torch

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    tdtype = getattr(torch, dtype)
    tensors = {k: torch.from_numpy(np.ascontiguousarray(v)).to(tdtype) for k, v in state.items()}
    names = list(tensors)
    groups = [names[i::shards] for i in range(shards)]
    ext = "safetensors" if layout == "safetensors" else "bin"
    weight_map = {}
    for k, group in enumerate(groups, 1):
        if shards == 1:
            file = "model.safetensors" if ext == "safetensors" else "pytorch_model.bin"
        else:
            stem = "model" if ext == "safetensors" else "pytorch_model"
            file = f"{stem}-{k:05d}-of-{shards:05d}.{ext}"
        part = {n: tensors[n] for n in group}
        if ext == "safetensors":
            st.save_file(part, str(folder / file), metadata={"format": "pt"})
        else:
            torch.save(part, folder / file, _use_new_zipfile_serialization=layout != "legacy_bin")
        weight_map.update({n: file for n in group})
    if shards > 1:
        index = "model.safetensors.index.json" if ext == "safetensors" else "pytorch_model.bin.index.json"
        (folder / index).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def chain_checkpoint(folder: Path, chain: list[int], tokenizer_model: Path | None = None, seed: int = 0,
                     vocab_size: int = 92544) -> Path:
    """An InternLM2 checkpoint (real vocab size) whose greedy output follows ``chain``: after token
    ``chain[i]`` it predicts ``chain[i + 1]``. The layers are switched off (wo = w2 = 0), so the final
    hidden state is the embedding of the last token; chain tokens get one-hot embeddings and the output
    matrix links each to its successor. Deterministic text for streaming, chat and CLI tests."""
    import shutil

    import reference as ref

    assert len(set(chain)) == len(chain), "chain tokens must be distinct"
    cfg = tiny_config(vocab_size=vocab_size, hidden_size=32, intermediate_size=16, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256, rope_scaling=None)
    assert len(chain) <= cfg["hidden_size"]
    state = ref.random_state(cfg, seed)
    state["model.layers.0.attention.wo.weight"][:] = 0
    state["model.layers.0.feed_forward.w2.weight"][:] = 0
    emb, out = state["model.tok_embeddings.weight"], state["output.weight"]
    for slot, token in enumerate(chain):
        emb[token] = 0
        emb[token, slot] = 1.0
        if slot + 1 < len(chain):
            out[chain[slot + 1], slot] = 10.0
    write_hf_checkpoint(folder, cfg, state)
    if tokenizer_model is not None:
        shutil.copy(tokenizer_model, Path(folder) / "tokenizer.model")
    return Path(folder)


ROOT = Path(__file__).resolve().parents[1]


def user_env() -> dict:
    """The environment a user's fresh process gets: this checkout importable, no simulated-device flags."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = str(ROOT)
    return env


def run_python(argv: list, stdin: str = "", timeout: int = 900) -> subprocess.CompletedProcess:
    """``python *argv`` in a fresh process from the repository root, as a user runs it."""
    return subprocess.run([sys.executable, *map(str, argv)], input=stdin, capture_output=True, text=True,
                          env=user_env(), timeout=timeout, cwd=ROOT)
