"""The training run's configuration: a YAML file mapped onto dataclasses (unknown keys are errors)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any


@dataclasses.dataclass
class ModelSection:
    preset: str | None = None  # a released architecture, randomly initialised
    checkpoint: str | None = None  # an HF or Orbax folder to continue from
    overrides: dict = dataclasses.field(default_factory=dict)  # config changes for a preset (e.g. layers)
    dtype: str = "bfloat16"  # compute
    param_dtype: str = "float32"  # master weights and optimizer state
    remat: str = "none"  # none | full | dots | dots_no_batch


@dataclasses.dataclass
class DataSection:
    train: list = dataclasses.field(default_factory=list)  # .txt (a document per line), .jsonl, .npy (token ids)
    eval: str | None = None
    seq_len: int = 512
    batch_size: int = 8  # global, in sequences
    segment_masking: bool = True  # attention and loss stay inside each packed document
    text_key: str = "text"


@dataclasses.dataclass
class OptimSection:
    lr: float = 3e-4
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    decay_embeddings_and_norms: bool = False
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    clip_norm: float = 1.0
    grad_accum: int = 1
    z_loss: float = 0.0


@dataclasses.dataclass
class MeshSection:
    data: int = 1
    fsdp: int = -1
    tensor: int = 1
    sequence: int = 1


@dataclasses.dataclass
class CheckpointSection:
    dir: str | None = None
    every: int = 100
    keep: int = 3
    async_save: bool = True


@dataclasses.dataclass
class LogSection:
    every: int = 1
    jsonl: str | None = None
    tensorboard: str | None = None
    peak_tflops: float | None = None  # per device, for MFU; measured with a matmul when absent


@dataclasses.dataclass
class TrainConfig:
    model: ModelSection = dataclasses.field(default_factory=ModelSection)
    tokenizer: str | None = None  # a tokenizer.model (or folder), or "demo": see loop.load_tokenizer
    data: DataSection = dataclasses.field(default_factory=DataSection)
    optim: OptimSection = dataclasses.field(default_factory=OptimSection)
    mesh: MeshSection = dataclasses.field(default_factory=MeshSection)
    checkpoint: CheckpointSection = dataclasses.field(default_factory=CheckpointSection)
    log: LogSection = dataclasses.field(default_factory=LogSection)
    steps: int = 1000
    eval_every: int = 0
    seed: int = 0
    export_hf: str | None = None  # write the trained weights as an HF folder at the end

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "config") -> "TrainConfig":
        return _build(cls, data or {}, where)

    @classmethod
    def from_yaml(cls, path: str) -> "TrainConfig":
        import yaml

        file = Path(path)
        if not file.is_file():
            raise FileNotFoundError(f"training config {file} does not exist")
        try:
            data = yaml.safe_load(file.read_text())
        except yaml.YAMLError as e:
            raise ValueError(f"{file}: not valid YAML ({e})") from None
        cfg = cls.from_dict(data, str(file))
        base = file.parent
        cfg.resolve_paths(base)
        return cfg

    def resolve_paths(self, base: Path) -> None:
        """Relative paths in a YAML file are relative to that file."""
        rel = lambda p: p if p is None or Path(p).is_absolute() else str(base / p)  # noqa: E731
        self.tokenizer = self.tokenizer if self.tokenizer == "demo" else rel(self.tokenizer)
        self.model.checkpoint = rel(self.model.checkpoint)
        self.data.train = [rel(p) for p in self.data.train]
        self.data.eval = rel(self.data.eval)
        self.checkpoint.dir = rel(self.checkpoint.dir)
        self.log.jsonl, self.log.tensorboard = rel(self.log.jsonl), rel(self.log.tensorboard)
        self.export_hf = rel(self.export_hf)

    def validate(self) -> None:
        if (self.model.preset is None) == (self.model.checkpoint is None):
            raise ValueError("model: give exactly one of 'preset' (random init) or 'checkpoint' (HF or Orbax folder)")
        if not self.data.train:
            raise ValueError("data.train: no training files given")
        for name in ("seq_len", "batch_size"):
            if getattr(self.data, name) < 1:
                raise ValueError(f"data.{name} must be >= 1")
        if self.optim.grad_accum < 1 or self.data.batch_size % self.optim.grad_accum:
            raise ValueError(f"optim.grad_accum ({self.optim.grad_accum}) must divide "
                             f"data.batch_size ({self.data.batch_size})")
        if self.steps < 1:
            raise ValueError("steps must be >= 1")


def _build(cls, data, where):
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            raise ValueError(f"{where}: unknown key {key!r} (known: {', '.join(fields)})")
        sub = fields[key].default_factory if fields[key].default_factory is not dataclasses.MISSING else None
        if sub is not None and dataclasses.is_dataclass(sub):
            kwargs[key] = _build(sub, value, f"{where}: {key}")
        else:
            kwargs[key] = value
    return cls(**kwargs)
