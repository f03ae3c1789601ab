"""The training run's configuration: a YAML file checked against typed pydantic models.

Every key has a type and, where it matters, a range; unknown keys are errors. Numbers written the way
people write them (``lr: 3e-4``, which PyYAML reads as a string) are parsed as numbers; anything that
is not a number there (true/false included), is not finite, or is out of range, is a one-line error
naming the field path (``optim.lr: ...``, ``optim.foo: unknown key``). ``model.overrides`` is checked
the same way against the fields of :class:`~internlm_jax.config.InternLM2Config`. The CLI
(``internlm-jax train --config``) and the Python API (:meth:`TrainConfig.from_dict`) share these models.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import json
import typing
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    create_model,
    field_validator,
)

from ..arrays import SHORT_DTYPE_NAMES
from ..config import NOT_IN_JSON, InternLM2Config
from ..files import check_local, file_in_the_way
from .loss import LOSS_CHUNK

# the dtype names, and their short forms (bf16, fp32, ...) as everywhere else in the library
Dtype = Annotated[Literal["float32", "bfloat16", "float16"],
                  BeforeValidator(lambda v: SHORT_DTYPE_NAMES.get(v.lower(), v) if isinstance(v, str) else v)]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def numbers_are_not_booleans(cls, value, info: ValidationInfo):
        """pydantic reads ``true`` as 1 for a number; in a config that is always a mistake."""
        annotation = cls.model_fields[info.field_name].annotation
        if isinstance(value, bool) and {int, float} & {annotation, *typing.get_args(annotation)}:
            raise ValueError("expected a number")
        return value


def _override_fields() -> dict[str, tuple]:
    """Each config.json field of InternLM2Config, optional, typed as in the dataclass (rope_scaling as
    the dict config.json holds): what ``model.overrides`` may change on a preset."""
    hints = typing.get_type_hints(InternLM2Config)
    return {f.name: (dict | None if f.name == "rope_scaling" else hints[f.name], None)
            for f in dataclasses.fields(InternLM2Config) if f.name not in NOT_IN_JSON}


Overrides = create_model("Overrides", __base__=Section, **_override_fields())


class ModelSection(Section):
    preset: str | None = None  # a released architecture, randomly initialised
    checkpoint: str | None = None  # an HF or Orbax folder to continue from
    overrides: Overrides = Field(default_factory=Overrides)  # config changes for a preset (e.g. layers)
    dtype: Dtype = "bfloat16"  # compute
    param_dtype: Dtype = "float32"  # master weights and optimizer state
    remat: Literal["none", "full", "dots", "dots_no_batch"] = "none"
    # vocabulary columns per chunk of the fused output layer + loss; 0 builds the logits whole
    loss_chunk: int = Field(LOSS_CHUNK, ge=0)


class DataSection(Section):
    # tokenized folders (`internlm-jax data tokenize`), .npy / .bin token files (memory-mapped),
    # or small raw files: .txt (a document per line), .jsonl (text_key; chat: messages)
    train: list[str] = Field(default_factory=list)
    eval: str | None = None
    seq_len: int = Field(512, ge=1)
    batch_size: int = Field(8, ge=1)  # global, in sequences
    segment_masking: bool = True  # attention and loss stay inside each packed document
    text_key: str = "text"
    format: Literal["text", "chat"] = "text"  # chat: .jsonl {"messages": [...]}, loss on assistant replies only
    bin_dtype: Literal["uint16", "uint32", "int32"] | None = None  # the ids' type in .bin token files
    loader_threads: int = Field(2, ge=1)  # background threads reading batches ahead of the step
    prefetch: int = Field(4, ge=1)  # batches read ahead

    @field_validator("train", mode="before")
    @classmethod
    def one_file_is_a_list(cls, v):
        return [v] if isinstance(v, str) else v


class OptimSection(Section):
    lr: float = Field(3e-4, gt=0)
    warmup_steps: int = Field(100, ge=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    weight_decay: float = Field(0.1, ge=0)
    decay_embeddings_and_norms: bool = False
    b1: float = Field(0.9, ge=0, lt=1)
    b2: float = Field(0.95, ge=0, lt=1)
    eps: float = Field(1e-8, gt=0)
    clip_norm: float = Field(1.0, ge=0)  # 0: no clipping
    grad_accum: int = Field(1, ge=1)
    z_loss: float = Field(0.0, ge=0)


class MeshSection(Section):
    data: int = Field(1, ge=-1)
    fsdp: int = Field(-1, ge=-1)
    tensor: int = Field(1, ge=-1)
    sequence: int = Field(1, ge=-1)

    @field_validator("data", "fsdp", "tensor", "sequence")
    @classmethod
    def positive_or_rest(cls, v):
        if v == 0:
            raise ValueError("must be >= 1, or -1 for the remaining devices")
        return v


class CheckpointSection(Section):
    dir: str | None = None
    every: int = Field(100, ge=1)
    keep: int = Field(3, ge=1)
    async_save: bool = True


class LogSection(Section):
    every: int = Field(1, ge=1)
    jsonl: str | None = None
    tensorboard: str | None = None
    peak_tflops: float | None = Field(None, gt=0)  # per device, for MFU; measured with a matmul when absent


class TrainConfig(Section):
    model: ModelSection = Field(default_factory=ModelSection)
    tokenizer: str | None = None  # a tokenizer.model (or folder), or "demo": see loop.load_tokenizer
    data: DataSection = Field(default_factory=DataSection)
    optim: OptimSection = Field(default_factory=OptimSection)
    mesh: MeshSection = Field(default_factory=MeshSection)
    checkpoint: CheckpointSection = Field(default_factory=CheckpointSection)
    log: LogSection = Field(default_factory=LogSection)
    steps: int = Field(1000, ge=1)
    eval_every: int = Field(0, ge=0)
    seed: int = Field(0, ge=0, lt=1 << 32)  # the data order's (grain's range) and the initialisation's
    export_hf: str | None = None  # write the trained weights as an HF folder at the end
    _source: str | None = PrivateAttr(default=None)  # the YAML file it came from: errors name it first

    # what each process of a job may set for itself: paths (hosts may mount things apart; only whether one is
    # given must agree) and its loader's threads
    HOST_PATHS: ClassVar[frozenset] = frozenset({"tokenizer", "export_hf", "model.checkpoint", "data.train",
                                                 "data.eval", "checkpoint.dir", "log.jsonl", "log.tensorboard"})
    HOST_LOADER: ClassVar[frozenset] = frozenset({"data.loader_threads", "data.prefetch"})

    def shared_settings(self) -> dict[str, int | float | str | None]:
        """Every setting the processes of a job must agree on, by its field path (a list or dict as JSON
        text): all but :attr:`HOST_LOADER`, and of :attr:`HOST_PATHS` whether each is set (or ``demo``)."""
        out = {}

        def walk(section: BaseModel, prefix: str):
            for name in type(section).model_fields:
                value, path = getattr(section, name), prefix + name
                if isinstance(value, BaseModel):
                    walk(value, path + ".")
                elif path in self.HOST_PATHS:
                    out[path + " (given or not)"] = value if value == "demo" else bool(value)
                elif path not in self.HOST_LOADER:
                    out[path] = json.dumps(value, sort_keys=True) if isinstance(value, list | dict) else value
        walk(self, "")
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "config") -> "TrainConfig":
        """Check ``data`` (the YAML's mapping); ValueError names the first wrong field, e.g.
        ``run.yaml: optim.lr: Input should be a valid number (got 'fast')``."""
        if not isinstance(data, dict) and data is not None:
            raise ValueError(f"{where}: expected a mapping of sections, got {type(data).__name__}")
        try:
            cfg = cls.model_validate(data or {})
        except ValidationError as e:
            raise ValueError(f"{where}: {describe(e)}") from None
        cfg._source = None if where == "config" else where
        return cfg

    @classmethod
    def from_yaml(cls, path: str) -> "TrainConfig":
        """Read and check a YAML file (see :meth:`from_dict`); a key given twice in one mapping is an error
        (YAML loaders keep the last silently: a repeated ``optim:`` block would drop the first)."""
        import yaml

        file = Path(path)
        if file.is_dir():
            raise IsADirectoryError(f"training config {file} is a folder; give the YAML file's path")
        if not file.is_file():
            raise FileNotFoundError(f"training config {file} does not exist")
        try:
            data = yaml.load(file.read_text(encoding="utf-8"), Loader=_unique_keys_loader())
        except UnicodeDecodeError:
            raise ValueError(f"{file}: not UTF-8 text") from None
        except yaml.YAMLError as e:
            raise ValueError(f"{file}: not valid YAML ({e})") from None
        cfg = cls.from_dict(data, str(file))
        base = file.parent
        cfg.resolve_paths(base)
        return cfg

    def resolve_paths(self, base: Path) -> None:
        """Relative paths in a YAML file are relative to that file; a URL is refused by field (joined to
        the folder it would have become a local ``gs:`` folder)."""
        def rel(p, field):
            if p is None:
                return p
            try:
                check_local(p)
            except ValueError as e:
                raise ValueError(f"{field}: {e}") from None
            return p if Path(p).is_absolute() else str(base / p)

        self.tokenizer = self.tokenizer if self.tokenizer == "demo" else rel(self.tokenizer, "tokenizer")
        self.model.checkpoint = rel(self.model.checkpoint, "model.checkpoint")
        self.data.train = [rel(p, "data.train") for p in self.data.train]
        self.data.eval = rel(self.data.eval, "data.eval")
        self.checkpoint.dir = rel(self.checkpoint.dir, "checkpoint.dir")
        self.log.jsonl, self.log.tensorboard = rel(self.log.jsonl, "log.jsonl"), rel(self.log.tensorboard,
                                                                                     "log.tensorboard")
        self.export_hf = rel(self.export_hf, "export_hf")

    def architecture(self) -> InternLM2Config:
        """The model's architecture: the preset with its overrides, or the checkpoint's config.json."""
        m = self.model
        if m.checkpoint:
            return InternLM2Config.from_pretrained(m.checkpoint)
        try:
            preset = InternLM2Config.preset(m.preset)
        except ValueError as e:
            raise ValueError(self._named(f"model.preset: {e}")) from None
        try:
            return preset.replace(**m.overrides.model_dump(exclude_unset=True))
        except ValueError as e:
            raise ValueError(self._named(f"model.overrides: {e}")) from None

    def _named(self, message: str) -> str:
        prefix = f"{self._source}: "
        return message if self._source is None or message.startswith(prefix) else prefix + message

    def validate(self) -> None:
        """Checks across fields, before anything is loaded (the architecture included); an error names
        the YAML file first, as the field checks do."""
        try:
            self._validate()
        except ValueError as e:
            raise ValueError(self._named(str(e))) from None

    def _validate(self) -> None:
        if (self.model.preset is None) == (self.model.checkpoint is None):
            raise ValueError("model: give exactly one of 'preset' (random init) or 'checkpoint' (HF or Orbax folder)")
        if self.model.checkpoint and self.model.overrides.model_fields_set:
            raise ValueError("model.overrides: only a preset takes overrides (a checkpoint brings its config.json)")
        if self.eval_every and not self.data.eval:
            raise ValueError("eval_every: set data.eval (the held-out file to evaluate on)")
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
        # what the run writes, named now rather than after its first steps
        for field, path, folder in (("log.jsonl", self.log.jsonl, False), ("checkpoint.dir", self.checkpoint.dir, True),
                                    ("export_hf", self.export_hf, True)):
            if path:
                _check_writable(field, Path(path), folder)
        self.architecture()


def _check_writable(field: str, path: Path, folder: bool) -> None:
    """A path the run can create: a folder (``folder``) or a file, not the other kind, under folders."""
    if folder and path.exists() and not path.is_dir():
        raise ValueError(f"{field}: {path} is a file, not a folder")
    if not folder and path.is_dir():
        raise ValueError(f"{field}: {path} is a folder; give the file's path")
    blocked = file_in_the_way(path)
    if blocked is not None:
        raise ValueError(f"{field}: {blocked} is a file, not a folder")


def describe(error: ValidationError) -> str:
    """The first problem of a validation error as one line: ``field.path: message (got value)``."""
    first = error.errors()[0]
    path = ".".join(str(x) for x in first["loc"]) or "config"
    more = f"; {error.error_count() - 1} more problem(s)" if error.error_count() > 1 else ""
    if first["type"] == "extra_forbidden":
        return f"{path}: unknown key{more}"
    got = first.get("input")
    shown = "" if first["type"] == "missing" or isinstance(got, (dict, list)) else f" (got {got!r})"
    message = first["msg"].removeprefix("Value error, ")
    return f"{path}: {message}{shown}{more}"


def _unique_keys_loader():
    """PyYAML's safe loader, refusing a key repeated within one mapping (naming it and its line)."""
    import yaml

    class UniqueKeys(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen = set()
            for key_node, _ in node.value:
                if key_node.tag in ("tag:yaml.org,2002:merge", "tag:yaml.org,2002:value"):  # `<<: *base`, `=`
                    continue
                key = self.construct_object(key_node, deep=deep)
                if not isinstance(key, collections.abc.Hashable):
                    continue  # the safe loader names that error itself
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {key!r} is given twice (line {key_node.start_mark.line + 1})",
                        key_node.start_mark)
                seen.add(key)
            return super().construct_mapping(node, deep)

    return UniqueKeys
