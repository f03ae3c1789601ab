"""Continued pretraining: ``internlm-jax train --config run.yaml`` or ``python -m internlm_jax.training``.

Names are imported lazily, so ``python -m internlm_jax.training --devices N`` can still set up
simulated devices before JAX starts.
"""

import importlib

_EXPORTS = {"TrainConfig": "config", "PackedDataset": "data", "build_model": "loop", "train": "loop",
            "loss_fn": "step", "make_optimizer": "step", "make_train_step": "step"}


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'internlm_jax.training' has no attribute {name!r}")


__all__ = list(_EXPORTS)
