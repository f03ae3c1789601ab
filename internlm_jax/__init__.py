"""internlm_jax: InternLM2 / InternLM2.5 in JAX and Flax NNX.

A small public namespace over the submodules::

    import internlm_jax as ij
    mesh = ij.make_mesh(tensor=4, fsdp=2)
    model = ij.InternLM2.from_pretrained("path/to/internlm2_5-7b-chat", mesh=mesh, dtype="bfloat16")
    tok = ij.Tokenizer.from_pretrained("path/to/internlm2_5-7b-chat")
    logits = model(jnp.asarray([tok.encode("The quick brown fox")]))

Names are imported lazily, so ``import internlm_jax`` does not start JAX (a script may still set
``XLA_FLAGS`` afterwards, before first use).
"""

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "InternLM2": "model",
    "InternLM2Config": "config",
    "RopeScaling": "config",
    "Tokenizer": "tokenizer",
    "StreamDecoder": "tokenizer",
    "CheckpointError": "hf_checkpoint",
    "make_mesh": "sharding",
    "explain_sharding": "sharding",
    "LOGICAL_RULES": "sharding",
    "generate": "generation",
    "generate_ids": "generation",
    "stream": "generation",
    "chat": "generation",
    "SamplingParams": "generation",
    "Generator": "generation",
    "Engine": "engine",
    "EngineError": "engine",
    "QueueFull": "engine",
}


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'internlm_jax' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_EXPORTS))


__all__ = list(_EXPORTS) + ["__version__"]
