"""Continued pretraining: ``internlm-jax train --config run.yaml`` or ``python -m internlm_jax.training``."""

from .config import TrainConfig
from .data import PackedDataset
from .loop import build_model, train
from .step import loss_fn, make_optimizer, make_train_step

__all__ = ["TrainConfig", "PackedDataset", "build_model", "train", "loss_fn", "make_optimizer", "make_train_step"]
