"""The one map between HF InternLM2 checkpoint tensors and this library's parameters.

Nothing else in the library knows HF tensor names or PyTorch layouts. Our parameters are the NNX
state of :class:`internlm_jax.model.InternLM2` (dotted paths below); layers are stacked along a
leading axis, so an HF tensor of layer ``i`` is row ``i`` of our stacked parameter.

HF layout (PyTorch ``[out, in]``)                   ours (``x @ w``, heads explicit)
``model.tok_embeddings.weight   [V, H]``            ``tok_embeddings         [V, H]``
``model.layers.i.attention_norm.weight [H]``        ``layers.attention_norm.weight [L, H]``
``model.layers.i.attention.wqkv.weight``            ``layers.attention.wq [L, H, nH, D]``,
``    [(nKV * (G + 2)) * D, H]``                    ``wk, wv [L, H, nKV, D]``
``model.layers.i.attention.wqkv.bias``              ``layers.attention.bq [L, nH, D]``, ``bk, bv``
``model.layers.i.attention.wo.weight [H, nH*D]``    ``layers.attention.wo [L, nH, D, H]``
``model.layers.i.attention.wo.bias [H]``            ``layers.attention.bo [L, H]``
``model.layers.i.ffn_norm.weight [H]``              ``layers.ffn_norm.weight [L, H]``
``model.layers.i.feed_forward.w1/w3.weight [I, H]`` ``layers.feed_forward.w1/w3 [L, H, I]``
``model.layers.i.feed_forward.w2.weight [H, I]``    ``layers.feed_forward.w2 [L, I, H]``
``model.norm.weight [H]``                           ``norm.weight [H]``
``output.weight [V, H]``                            ``output [H, V]`` (absent when tied)

The packed wqkv groups its rows per KV head: ``[nKV, G + 2, D]`` where slots ``0..G-1`` are query
heads ``g*G .. g*G+G-1``, slot ``G`` is key head ``g`` and slot ``G+1`` value head ``g``. A plain
three-way split of the rows is wrong whenever ``nKV < nH``.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable

import numpy as np

from .config import InternLM2Config

# Buffers that old checkpoints carry and that hold no parameters.
IGNORED_HF_TENSORS = re.compile(r"^model\.layers\.\d+\.attention\.rotary_emb\.inv_freq$")


def is_ignored(name: str, shape: tuple[int, ...], cfg: InternLM2Config) -> bool:
    """A tensor a checkpoint may carry that holds nothing of ours: an old rotary buffer (derived from
    the config), or the output matrix of a tied model (``torch.save(state_dict())`` keeps it; it is the
    embedding, and transformers ties it back on load)."""
    tied_output = cfg.tie_word_embeddings and name == "output.weight" and shape == (cfg.vocab_size, cfg.hidden_size)
    return tied_output or bool(IGNORED_HF_TENSORS.match(name))


@dataclasses.dataclass(frozen=True)
class HFTensor:
    """One tensor of an HF checkpoint: its name, shape, layer, and the parameters it becomes."""

    name: str
    shape: tuple[int, ...]
    layer: int | None  # row of the stacked parameters, None for non-layer tensors
    kind: str  # key into _CONVERSIONS
    targets: tuple[str, ...]  # our parameter paths, dotted


def hf_tensors(cfg: InternLM2Config) -> list[HFTensor]:
    """Every tensor an HF checkpoint of ``cfg`` must contain, in checkpoint order."""
    h, i, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    nh, nkv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    qkv_rows = (nh + 2 * nkv) * d
    out = [HFTensor("model.tok_embeddings.weight", (v, h), None, "same", ("tok_embeddings",))]
    for n in range(cfg.num_hidden_layers):
        p = f"model.layers.{n}."
        out.append(HFTensor(p + "attention.wqkv.weight", (qkv_rows, h), n, "wqkv",
                            ("layers.attention.wq", "layers.attention.wk", "layers.attention.wv")))
        if cfg.bias:
            out.append(HFTensor(p + "attention.wqkv.bias", (qkv_rows,), n, "wqkv_bias",
                                ("layers.attention.bq", "layers.attention.bk", "layers.attention.bv")))
        out.append(HFTensor(p + "attention.wo.weight", (h, nh * d), n, "wo", ("layers.attention.wo",)))
        if cfg.bias:
            out.append(HFTensor(p + "attention.wo.bias", (h,), n, "same", ("layers.attention.bo",)))
        out += [
            HFTensor(p + "feed_forward.w1.weight", (i, h), n, "transpose", ("layers.feed_forward.w1",)),
            HFTensor(p + "feed_forward.w3.weight", (i, h), n, "transpose", ("layers.feed_forward.w3",)),
            HFTensor(p + "feed_forward.w2.weight", (h, i), n, "transpose", ("layers.feed_forward.w2",)),
            HFTensor(p + "attention_norm.weight", (h,), n, "same", ("layers.attention_norm.weight",)),
            HFTensor(p + "ffn_norm.weight", (h,), n, "same", ("layers.ffn_norm.weight",)),
        ]
    out.append(HFTensor("model.norm.weight", (h,), None, "same", ("norm.weight",)))
    if not cfg.tie_word_embeddings:
        out.append(HFTensor("output.weight", (v, h), None, "transpose", ("output",)))
    return out


def to_params(t: HFTensor, array: np.ndarray, cfg: InternLM2Config) -> dict[str, np.ndarray]:
    """Our parameter slices (one layer's row for stacked params) from one HF tensor."""
    if tuple(array.shape) != t.shape:
        raise ValueError(f"{t.name}: shape {tuple(array.shape)} does not match {t.shape} expected from the config")
    split, _ = _CONVERSIONS[t.kind]
    return dict(zip(t.targets, split(array, cfg)))


def from_params(t: HFTensor, arrays: dict[str, np.ndarray], cfg: InternLM2Config) -> np.ndarray:
    """The HF tensor rebuilt from our parameter slices (inverse of :func:`to_params`)."""
    _, merge = _CONVERSIONS[t.kind]
    return np.ascontiguousarray(merge([arrays[name] for name in t.targets], cfg))


# --- layout conversions: (HF -> ours, ours -> HF) -----------------------------------------------


def _split_wqkv(w: np.ndarray, cfg: InternLM2Config):
    nkv, g, d, h = cfg.num_key_value_heads, cfg.num_query_groups, cfg.head_dim, cfg.hidden_size
    grouped = w.reshape(nkv, g + 2, d, h)
    q = grouped[:, :g].reshape(nkv * g, d, h).transpose(2, 0, 1)  # [H, nH, D], head j = kv*G + slot
    k = grouped[:, g].transpose(2, 0, 1)  # [H, nKV, D]
    v = grouped[:, g + 1].transpose(2, 0, 1)
    return q, k, v


def _merge_wqkv(parts, cfg: InternLM2Config):
    q, k, v = parts
    nkv, g, d, h = cfg.num_key_value_heads, cfg.num_query_groups, cfg.head_dim, cfg.hidden_size
    q = q.transpose(1, 2, 0).reshape(nkv, g, d, h)
    kv = np.stack([k.transpose(1, 2, 0), v.transpose(1, 2, 0)], axis=1)  # [nKV, 2, D, H]
    return np.concatenate([q, kv], axis=1).reshape(nkv * (g + 2) * d, h)


def _split_wqkv_bias(b: np.ndarray, cfg: InternLM2Config):
    nkv, g, d = cfg.num_key_value_heads, cfg.num_query_groups, cfg.head_dim
    grouped = b.reshape(nkv, g + 2, d)
    return grouped[:, :g].reshape(nkv * g, d), grouped[:, g], grouped[:, g + 1]


def _merge_wqkv_bias(parts, cfg: InternLM2Config):
    q, k, v = parts
    nkv, g, d = cfg.num_key_value_heads, cfg.num_query_groups, cfg.head_dim
    return np.concatenate([q.reshape(nkv, g, d), k[:, None], v[:, None]], axis=1).reshape(-1)


def _split_wo(w: np.ndarray, cfg: InternLM2Config):
    return (w.reshape(cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim).transpose(1, 2, 0),)


def _merge_wo(parts, cfg: InternLM2Config):
    return parts[0].transpose(2, 0, 1).reshape(cfg.hidden_size, -1)


_CONVERSIONS: dict[str, tuple[Callable, Callable]] = {
    "same": (lambda a, cfg: (a,), lambda parts, cfg: parts[0]),
    "transpose": (lambda a, cfg: (a.T,), lambda parts, cfg: parts[0].T),
    "wqkv": (_split_wqkv, _merge_wqkv),
    "wqkv_bias": (_split_wqkv_bias, _merge_wqkv_bias),
    "wo": (_split_wo, _merge_wo),
}
