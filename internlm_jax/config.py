"""InternLM2Config: the HF `config.json` of InternLM2 / InternLM2.5, validated, plus presets.

The reference config class has defaults that no released checkpoint uses (vocab 103168, bias True,
eps 1e-6, theta 1e4, max_pos 2048), so values are always read from `config.json`; the quirks of the
released files are handled here and nowhere else:

* a missing ``bias`` key means True (the class default);
* ``pretraining_tp > 1`` drops the attention biases from the forward pass (``applies_attention_bias``);
* ``rope_scaling`` is null, ``{"type": "linear"|"dynamic", "factor": f}``, or (as written by
  transformers 5) a dict without a type or with ``rope_type: "default"``, which means no scaling;
* transformers 5 saves ``rope_parameters`` (``rope_type``, ``factor``, ``rope_theta``) and may drop
  ``rope_scaling`` and the top-level ``rope_theta``: it is read where those are missing or null;
* ``head_dim`` is never stored: it is ``hidden_size // num_attention_heads``.

A config read from a checkpoint folder also holds that folder's ``*.py`` files (the remote code that
its ``auto_map`` names: configuration_, modeling_, tokenization_internlm2*.py) and its
``generation_config.json``, and writes them next to every ``config.json`` it saves, so that HF and Orbax
folders written from it (conversion in both directions, ``save_pretrained``, training checkpoints) load
with ``trust_remote_code=True`` and generate as the source did (stop ids, sampling defaults).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from .files import atomic_write, check_local

ROPE_TYPES = ("linear", "dynamic")

# What the reference config class assumes for a key that config.json lacks. These are not the
# released models' values (FACTS.md), which is why presets and checkpoints always state them.
REFERENCE_DEFAULTS: dict[str, Any] = dict(
    vocab_size=103168, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
    hidden_act="silu", max_position_embeddings=2048, initializer_range=0.02, rms_norm_eps=1e-6,
    pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False, bias=True, rope_theta=10000.0)
MODEL_TYPE = "internlm2"
ARCHITECTURE = "InternLM2ForCausalLM"
GENERATION_FILE = "generation_config.json"
NOT_IN_JSON = ("extra", "folder_files", "generation_eos_token_ids")  # fields that are not keys of config.json


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Rotary scaling as the reference understands it: ``type`` is "linear" or "dynamic" (NTK)."""

    type: str
    factor: float

    def to_dict(self) -> dict[str, Any]:
        """The config.json form: ``{"type": ..., "factor": ...}``."""
        return {"type": self.type, "factor": self.factor}


@dataclasses.dataclass(frozen=True)
class InternLM2Config:
    """Architecture hyper-parameters, named as in the HF ``config.json``."""

    vocab_size: int = 92544
    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-5
    rope_theta: float = 1e6
    rope_scaling: RopeScaling | None = None
    bias: bool = False
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    initializer_range: float = 0.02
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int = 2
    # Keys of config.json that the model does not use (auto_map, torch_dtype, ...), kept so that
    # writing the config back loses nothing.
    extra: tuple[tuple[str, Any], ...] = dataclasses.field(default=(), hash=False, compare=False)
    # (file name, bytes) of the source folder's *.py files and generation_config.json, written back by
    # save() (see the module docstring).
    folder_files: tuple[tuple[str, bytes], ...] = dataclasses.field(default=(), hash=False, compare=False, repr=False)
    # ``eos_token_id`` of the folder's generation_config.json, which the reference's generate() stops on.
    generation_eos_token_ids: tuple[int, ...] = dataclasses.field(default=(), hash=False, compare=False)

    def __post_init__(self):
        if isinstance(self.rope_scaling, dict):
            object.__setattr__(self, "rope_scaling", _parse_rope_scaling(self.rope_scaling))
        if isinstance(self.extra, dict):
            object.__setattr__(self, "extra", tuple(self.extra.items()))
        self.validate()

    # ----------------------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        """Per-head size: never stored in config.json, always ``hidden_size // num_attention_heads``."""
        return self.hidden_size // self.num_attention_heads

    @property
    def applies_attention_bias(self) -> bool:
        """Whether wqkv and wo add their biases. The reference's ``pretraining_tp > 1`` path (a key kept in
        ``extra``) multiplies by weight slices only, so there the biases are loaded but never added."""
        tp = dict(self.extra).get("pretraining_tp", 1)
        return self.bias and not (isinstance(tp, int) and tp > 1)

    @property
    def num_query_groups(self) -> int:
        """Query heads per KV head (G in the packed wqkv layout)."""
        return self.num_attention_heads // self.num_key_value_heads

    def replace(self, **changes) -> "InternLM2Config":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def num_parameters(self) -> int:
        """Parameter count of the architecture (matches the released models' counts)."""
        h, i, v, n = self.hidden_size, self.intermediate_size, self.vocab_size, self.num_hidden_layers
        d, nh, nkv = self.head_dim, self.num_attention_heads, self.num_key_value_heads
        attn = h * (nh + 2 * nkv) * d + nh * d * h
        if self.bias:
            attn += (nh + 2 * nkv) * d + h
        layer = attn + 3 * h * i + 2 * h
        return v * h * (1 if self.tie_word_embeddings else 2) + n * layer + h

    def train_flops_per_token(self, seq_len: int) -> int:
        """Matmul FLOPs of one training token (forward and backward), the numerator of MFU: 6 x the
        parameters that multiply (all but the input embedding, a lookup) + causal attention's
        12 x layers x heads x head_dim x seq_len."""
        lookup = 0 if self.tie_word_embeddings else self.vocab_size * self.hidden_size
        attention = 12 * self.num_hidden_layers * self.num_attention_heads * self.head_dim * seq_len
        return 6 * (self.num_parameters() - lookup) + attention

    # ----------------------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise ValueError naming the first field whose value cannot describe an InternLM2 model."""
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "max_position_embeddings"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"config field {name!r} must be a positive integer, got {value!r}")
        listed = dict(self.extra)
        ids = [(f"config field {name!r}", listed.get(f"{name}_list", [getattr(self, name)]))
               for name in ("bos_token_id", "eos_token_id", "pad_token_id")]
        for field, values in ids + [("generation config field 'eos_token_id'", self.generation_eos_token_ids)]:
            for value in values:
                if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < self.vocab_size:
                    raise ValueError(f"{field} must be a token id (an integer below vocab_size "
                                     f"{self.vocab_size}) or a list of them, got {value!r}")
        for name in ("rms_norm_eps", "rope_theta", "initializer_range"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"config field {name!r} must be a positive number, got {value!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"config field 'hidden_size' ({self.hidden_size}) must be divisible by "
                f"'num_attention_heads' ({self.num_attention_heads})")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"config field 'num_attention_heads' ({self.num_attention_heads}) must be divisible by "
                f"'num_key_value_heads' ({self.num_key_value_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim = hidden_size // num_attention_heads = {self.head_dim} must be "
                             "even for rotary embeddings (config field 'hidden_size')")
        if self.hidden_act != "silu":
            raise ValueError(f"config field 'hidden_act' must be 'silu' for InternLM2, got {self.hidden_act!r}")
        for name in ("bias", "tie_word_embeddings"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"config field {name!r} must be true or false, got {getattr(self, name)!r}")
        rs = self.rope_scaling
        if rs is not None:
            if not isinstance(rs, RopeScaling):
                raise ValueError(f"config field 'rope_scaling' must be null or a dict, got {rs!r}")
            _check_rope_scaling(rs, "rope_scaling")

    # ----------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "config") -> "InternLM2Config":
        """Build from a parsed ``config.json``; refuses configs of other architectures."""
        if not isinstance(data, dict):
            raise ValueError(f"{source}: expected a JSON object, got {type(data).__name__}")
        model_type = data.get("model_type")
        archs = data.get("architectures") or []
        if model_type not in (None, MODEL_TYPE) or (model_type is None and ARCHITECTURE not in archs):
            raise ValueError(
                f"{source}: not an InternLM2 config (model_type={model_type!r}, architectures={archs!r}); "
                f"expected model_type {MODEL_TYPE!r}")
        if isinstance(archs, list) and archs and ARCHITECTURE not in archs:  # e.g. InternLM2ForRewardModel
            raise ValueError(f"{source}: architectures {archs!r} is not supported; internlm-jax loads "
                             f"{ARCHITECTURE} (the causal language model) checkpoints")
        fields = {f.name for f in dataclasses.fields(cls)} - set(NOT_IN_JSON)
        kwargs: dict[str, Any] = {}
        extra = {}
        for key, value in data.items():
            if key in fields:
                kwargs[key] = value
            else:
                extra[key] = value
        for key, value in REFERENCE_DEFAULTS.items():  # e.g. an absent "bias" means True
            if kwargs.get(key) is None:
                kwargs[key] = value
        if kwargs.get("num_key_value_heads") is None:  # reference: absent means MHA
            kwargs["num_key_value_heads"] = kwargs["num_attention_heads"]
        for key in ("eos_token_id", "bos_token_id", "pad_token_id"):
            if isinstance(kwargs.get(key), list):  # some configs list several ids: the first is the id, all stop
                if not kwargs[key]:
                    raise ValueError(f"{source}: config field {key!r} is an empty list")
                extra[f"{key}_list"] = kwargs[key]
                kwargs[key] = kwargs[key][0]
        rope = data.get("rope_parameters")
        if rope is not None and not isinstance(rope, dict):
            raise ValueError(f"{source}: config field 'rope_parameters' must be null or a dict, got {rope!r}")
        if data.get("rope_theta") is None and rope and rope.get("rope_theta") is not None:
            kwargs["rope_theta"] = rope["rope_theta"]
        try:
            if data.get("rope_scaling") is None and rope is not None:
                kwargs["rope_scaling"] = _parse_rope_scaling(rope, "rope_parameters")
            else:
                kwargs["rope_scaling"] = _parse_rope_scaling(data.get("rope_scaling"))
            return cls(**kwargs, extra=tuple(extra.items()))
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from None

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "InternLM2Config":
        """Read ``config.json`` from a checkpoint folder (or the file itself)."""
        check_local(path)
        path = Path(path)
        file = path / "config.json" if path.is_dir() else path
        if file.is_file() and file.suffix != ".json":  # e.g. model.safetensors given for its folder
            raise ValueError(f"{file} is not a config.json: pass the checkpoint folder ({file.parent})")
        if not file.is_file():
            hint = ""
            name = _preset_key(str(path))
            if not path.exists() and name in PRESETS:  # a released model's name, not a local folder
                hint = (f"; {str(path)!r} names a released model: download its HF folder (nothing is fetched "
                        f"from the network) or use InternLM2Config.preset({name!r}) for its shape")
            raise FileNotFoundError(f"no config.json at {file}{hint}")
        try:
            data = json.loads(file.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{file}: not valid JSON ({e})") from None
        cfg = cls.from_dict(data, source=str(file))
        if not path.is_dir():
            return cfg
        generation = path / GENERATION_FILE
        kept = sorted(path.glob("*.py")) + ([generation] if generation.is_file() else [])
        cfg = cfg.replace(folder_files=tuple((f.name, f.read_bytes()) for f in kept))
        try:
            return cfg.replace(generation_eos_token_ids=_generation_eos_ids(generation))
        except ValueError as e:
            raise ValueError(f"{generation}: {e}") from None

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """Every id ``eos_token_id`` names (config.json may list several)."""
        return tuple(dict(self.extra).get("eos_token_id_list", [self.eos_token_id]))

    def to_dict(self) -> dict[str, Any]:
        """The ``config.json`` form (including the keys the model does not use)."""
        out: dict[str, Any] = {"architectures": [ARCHITECTURE], "model_type": MODEL_TYPE}
        extra = dict(self.extra)
        for key in ("eos_token_id", "bos_token_id", "pad_token_id"):
            listed = extra.pop(f"{key}_list", None)
            if listed is not None and listed[0] == getattr(self, key):
                extra[key] = listed
        out.update({k: v for k, v in extra.items() if k not in ("architectures", "model_type")})
        for f in dataclasses.fields(self):
            if f.name in NOT_IN_JSON:
                continue
            value = getattr(self, f.name)
            if f.name in extra:
                continue
            out[f.name] = value.to_dict() if isinstance(value, RopeScaling) else value
        return out

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``config.json`` and the source folder's files (:attr:`folder_files`) into folder ``path``
        (each atomically); returns the config file written."""
        for name, data in self.folder_files:
            atomic_write(Path(path) / name, data)
        return atomic_write(Path(path) / "config.json", json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n")

    # ----------------------------------------------------------------------------------------
    @classmethod
    def preset(cls, name: str) -> "InternLM2Config":
        """The architecture of a released model, e.g. ``"internlm2_5-7b-chat"``."""
        key = _preset_key(name)
        if key not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; known: {', '.join(sorted(PRESETS))}")
        return cls(**PRESETS[key])

    @staticmethod
    def preset_names() -> list[str]:
        """The released models :meth:`preset` knows (also ``internlm-jax presets``)."""
        return sorted(PRESETS)


def _preset_key(name: str) -> str:
    """A released model's preset key from its name, e.g. "internlm/internlm2_5-7b-chat" as on the HF hub."""
    return name.split("/")[-1].lower()


def _generation_eos_ids(file: Path) -> tuple[int, ...]:
    """``eos_token_id`` of a generation_config.json as a tuple (empty where the file or key is absent)."""
    if not file.is_file():
        return ()
    try:
        data = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"not valid JSON ({e})") from None
    ids = data.get("eos_token_id") if isinstance(data, dict) else None
    if ids is None:
        return ()
    ids = ids if isinstance(ids, list) else [ids]
    if not ids:
        raise ValueError("generation config field 'eos_token_id' is an empty list")
    return tuple(ids)


def _parse_rope_scaling(value: Any, field: str = "rope_scaling") -> RopeScaling | None:
    """``value`` of config field ``field`` (rope_scaling, or transformers 5's rope_parameters)."""
    if value is None or isinstance(value, RopeScaling):
        return value
    if not isinstance(value, dict):
        raise ValueError(f"config field {field!r} must be null or a dict, got {value!r}")
    kind = value.get("type", value.get("rope_type"))
    if kind is None and value.get("factor") is not None:  # the reference reads rope_scaling["type"]: it fails too
        raise ValueError(f"config field {field!r} has a 'factor' but no 'type' (dynamic or linear): {value!r}")
    if kind in (None, "default"):
        return None
    if "factor" not in value:
        raise ValueError(f"config field {field!r} has type {kind!r} but no 'factor': {value!r}")
    factor = value["factor"]
    if isinstance(factor, int) and not isinstance(factor, bool):
        factor = float(factor)
    return _check_rope_scaling(RopeScaling(type=kind, factor=factor), field)


def _check_rope_scaling(rs: RopeScaling, field: str) -> RopeScaling:
    if rs.type not in ROPE_TYPES:
        raise ValueError(f"config field '{field}.type' must be one of {ROPE_TYPES}, got {rs.type!r}")
    if isinstance(rs.factor, bool) or not isinstance(rs.factor, (int, float)) or not rs.factor >= 1.0:
        raise ValueError(f"config field '{field}.factor' must be a number >= 1, got {rs.factor!r}")
    return rs


def _arch(h, i, layers, heads, max_pos, theta, scaling):
    return dict(hidden_size=h, intermediate_size=i, num_hidden_layers=layers, num_attention_heads=heads,
                num_key_value_heads=8, max_position_embeddings=max_pos, rope_theta=theta,
                rope_scaling=None if scaling is None else RopeScaling("dynamic", scaling),
                vocab_size=92544, rms_norm_eps=1e-5, bias=False, tie_word_embeddings=False)


# Released models (FACTS.md). Where snapshots of a model differ in rope_scaling, the preset takes
# the value of the released config.json at the time of writing; checkpoints always use their own.
PRESETS: dict[str, dict[str, Any]] = {
    "internlm2-1_8b": _arch(2048, 8192, 24, 16, 32768, 1e6, None),
    "internlm2-chat-1_8b": _arch(2048, 8192, 24, 16, 32768, 1e6, None),
    "internlm2-7b": _arch(4096, 14336, 32, 32, 32768, 1e6, None),
    "internlm2-chat-7b": _arch(4096, 14336, 32, 32, 32768, 1e6, None),
    "internlm2-20b": _arch(6144, 16384, 48, 48, 32768, 1e6, None),
    "internlm2-chat-20b": _arch(6144, 16384, 48, 48, 32768, 1e6, 3.0),
    # not in FACTS.md: the shape of internlm2-1_8b with the rope of the 2.5 chat configs (32768, 1e6, dynamic 2.0)
    "internlm2_5-1_8b": _arch(2048, 8192, 24, 16, 32768, 1e6, 2.0),
    "internlm2_5-1_8b-chat": _arch(2048, 8192, 24, 16, 32768, 1e6, 2.0),
    "internlm2_5-7b": _arch(4096, 14336, 32, 32, 262144, 5e7, 2.0),
    "internlm2_5-7b-chat": _arch(4096, 14336, 32, 32, 32768, 1e6, 2.0),
    "internlm2_5-7b-chat-1m": _arch(4096, 14336, 32, 32, 262144, 5e7, 2.5),
    "internlm2_5-20b": _arch(6144, 16384, 48, 48, 262144, 5e7, 2.0),
    "internlm2_5-20b-chat": _arch(6144, 16384, 48, 48, 32768, 5e7, 2.5),
}
