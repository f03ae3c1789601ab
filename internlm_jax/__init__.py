"""internlm_jax: InternLM2 / InternLM2.5 in JAX and Flax NNX.

The public surface is small; everything else lives in submodules::

    import internlm_jax as ij
    mesh = ij.make_mesh(tensor=4, fsdp=2)
    model = ij.InternLM2.from_pretrained("path/to/internlm2_5-7b-chat", mesh=mesh, dtype="bfloat16")
    tok = ij.Tokenizer.from_pretrained("path/to/internlm2_5-7b-chat")
    logits = model(jnp.asarray([tok.encode("The quick brown fox")]))
"""

from .config import InternLM2Config, RopeScaling
from .hf_checkpoint import CheckpointError
from .model import InternLM2
from .sharding import LOGICAL_RULES, explain_sharding, make_mesh

__version__ = "0.1.0"


def __getattr__(name):  # the tokenizer imports sentencepiece: only when asked for
    if name in ("Tokenizer", "StreamDecoder"):
        from . import tokenizer

        return getattr(tokenizer, name)
    raise AttributeError(f"module 'internlm_jax' has no attribute {name!r}")


__all__ = ["InternLM2", "InternLM2Config", "RopeScaling", "Tokenizer", "StreamDecoder", "CheckpointError",
           "make_mesh", "explain_sharding", "LOGICAL_RULES", "__version__"]
