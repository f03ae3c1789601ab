"""InternLM2Config: released config.json files and their quirks, presets, validation, write-back."""

import json

import pytest

from internlm_jax import InternLM2Config, RopeScaling

# config.json as released (values from FACTS.md), in the form the hub files have them.
BASE = {"architectures": ["InternLM2ForCausalLM"], "auto_map": {
    "AutoConfig": "configuration_internlm2.InternLM2Config",
    "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM"},
    "model_type": "internlm2", "vocab_size": 92544, "num_key_value_heads": 8, "rms_norm_eps": 1e-05,
    "bias": False, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2, "hidden_act": "silu",
    "initializer_range": 0.02, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True,
    "attn_implementation": "eager", "transformers_version": "4.41.0"}

RELEASED = {
    "internlm2-1_8b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=16,
                           max_position_embeddings=32768, rope_theta=1000000, rope_scaling=None),
    "internlm2-chat-7b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                              max_position_embeddings=32768, rope_theta=1000000,
                              rope_scaling={"type": "dynamic", "factor": 1.0}),
    "internlm2-chat-20b": dict(hidden_size=6144, intermediate_size=16384, num_hidden_layers=48, num_attention_heads=48,
                               max_position_embeddings=32768, rope_theta=1000000,
                               rope_scaling={"type": "dynamic", "factor": 3.0}),
    "internlm2_5-7b-chat-1m": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                   num_attention_heads=32, max_position_embeddings=262144, rope_theta=50000000,
                                   rope_scaling={"type": "dynamic", "factor": 2.5}),
    "internlm2_5-20b-chat": dict(hidden_size=6144, intermediate_size=16384, num_hidden_layers=48,
                                 num_attention_heads=48, max_position_embeddings=32768, rope_theta=50000000,
                                 rope_scaling={"type": "dynamic", "factor": 2.5}),
}
PARAM_COUNTS = {"internlm2-1_8b": 1_889_110_016, "internlm2-chat-7b": 7_737_708_544,
                "internlm2-chat-20b": 19_861_149_696, "internlm2_5-7b-chat-1m": 7_737_708_544,
                "internlm2_5-20b-chat": 19_861_149_696}


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_released_configs_parse(tmp_path, name):
    data = dict(BASE, **RELEASED[name])
    (tmp_path / "config.json").write_text(json.dumps(data))
    cfg = InternLM2Config.from_pretrained(tmp_path)
    assert cfg.head_dim == 128
    assert cfg.num_key_value_heads == 8 and cfg.bias is False
    assert cfg.num_parameters() == PARAM_COUNTS[name]
    rs = RELEASED[name]["rope_scaling"]
    assert cfg.rope_scaling == (None if rs is None else RopeScaling(rs["type"], rs["factor"]))
    # written back, it reads the same and keeps the keys the model does not use
    out = cfg.save(tmp_path / "back")
    written = json.loads(out.read_text())
    assert written["auto_map"] == BASE["auto_map"] and written["torch_dtype"] == "bfloat16"
    assert InternLM2Config.from_pretrained(tmp_path / "back") == cfg
    for key, value in data.items():
        assert written[key] == value, key


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_presets_match_released(name):
    data = dict(BASE, **RELEASED[name])
    from_json = InternLM2Config.from_dict(data)
    preset = InternLM2Config.preset(name)
    for field in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "max_position_embeddings", "rope_theta", "vocab_size"):
        assert getattr(preset, field) == getattr(from_json, field), field
    assert preset.num_parameters() == PARAM_COUNTS[name]


def test_the_internlm2_5_1_8b_presets_have_the_1_8b_shape():
    """InternLM2.5-1.8B keeps InternLM2-1.8B's shape (1.89B parameters) with the 2.5 chat rope."""
    for name in ("internlm2_5-1_8b", "internlm/internlm2_5-1_8b-chat"):
        cfg = InternLM2Config.preset(name)
        assert cfg.num_parameters() == PARAM_COUNTS["internlm2-1_8b"]
        assert cfg.rope_scaling == RopeScaling("dynamic", 2.0) and cfg.max_position_embeddings == 32768


def test_missing_bias_means_true():
    data = dict(BASE, **RELEASED["internlm2-1_8b"])
    del data["bias"]
    assert InternLM2Config.from_dict(data).bias is True


def test_missing_keys_take_the_reference_class_defaults():
    data = dict(BASE, **RELEASED["internlm2-1_8b"])
    for key in ("rope_theta", "rms_norm_eps", "num_key_value_heads", "max_position_embeddings", "vocab_size"):
        del data[key]
    cfg = InternLM2Config.from_dict(data)
    assert (cfg.rope_theta, cfg.rms_norm_eps, cfg.max_position_embeddings,
            cfg.vocab_size) == (10000.0, 1e-6, 2048, 103168)
    assert cfg.num_key_value_heads == cfg.num_attention_heads == 16  # absent KV heads: MHA


@pytest.mark.parametrize("rope", [None, {}, {"rope_type": "default", "rope_theta": 1e6}, {"factor": None}])
def test_rope_scaling_without_type_is_null(rope):
    data = dict(BASE, **RELEASED["internlm2-1_8b"], )
    data["rope_scaling"] = rope
    assert InternLM2Config.from_dict(data).rope_scaling is None


def test_rope_scaling_linear_and_transformers5_key():
    data = dict(BASE, **RELEASED["internlm2-1_8b"])
    data["rope_scaling"] = {"type": "linear", "factor": 4}
    assert InternLM2Config.from_dict(data).rope_scaling == RopeScaling("linear", 4.0)
    data["rope_scaling"] = {"rope_type": "dynamic", "factor": 2.0}
    assert InternLM2Config.from_dict(data).rope_scaling == RopeScaling("dynamic", 2.0)


# How transformers 5.25's PretrainedConfig.save_pretrained writes a config whose class sets rope_theta and
# rope_scaling (as the official configuration_internlm2.py does): no rope_scaling key, "dtype" instead
# of "torch_dtype", rope_parameters carrying the type, factor and theta. Classes that leave rope_theta to
# the base class (e.g. LlamaConfig) drop the top-level rope_theta too.
def _transformers5(rope_type: str, factor: float | None, theta: float, top_level_theta: bool) -> dict:
    data = {k: v for k, v in dict(BASE, **RELEASED["internlm2_5-7b-chat-1m"]).items()
            if k not in ("rope_scaling", "rope_theta", "torch_dtype")}
    params = {"rope_theta": theta, "rope_type": rope_type}
    if factor is not None:
        params.update(factor=factor, type=rope_type)
    data.update(dtype="bfloat16", rope_parameters=params, transformers_version="5.25.0")
    if top_level_theta:
        data["rope_theta"] = theta
    return data


@pytest.mark.parametrize("top_level_theta", [True, False])
@pytest.mark.parametrize("rope_type,factor", [("dynamic", 2.5), ("linear", 3.0), ("default", None)])
def test_transformers5_rope_parameters(tmp_path, rope_type, factor, top_level_theta):
    data = _transformers5(rope_type, factor, 5e7, top_level_theta)
    (tmp_path / "config.json").write_text(json.dumps(data))
    cfg = InternLM2Config.from_pretrained(tmp_path)
    assert cfg.rope_theta == data["rope_parameters"]["rope_theta"]
    assert cfg.rope_scaling == (None if factor is None else RopeScaling(rope_type, factor))
    assert InternLM2Config.from_pretrained(cfg.save(tmp_path / "back")) == cfg


def test_top_level_rope_keys_win_over_rope_parameters():
    data = dict(_transformers5("dynamic", 2.5, 5e7, False), rope_theta=1e6,
                rope_scaling={"type": "linear", "factor": 4.0})
    cfg = InternLM2Config.from_dict(data)
    assert (cfg.rope_theta, cfg.rope_scaling) == (1e6, RopeScaling("linear", 4.0))


@pytest.mark.parametrize("params,match", [({"rope_type": "yarn", "factor": 2.0}, "'rope_parameters.type'"),
                                          ({"rope_type": "dynamic"}, "'rope_parameters' has type 'dynamic'"),
                                          ("dynamic", "'rope_parameters' must be null or a dict"),
                                          ({"factor": 2.5}, "has a 'factor' but no 'type'")])
def test_bad_rope_parameters_name_the_field(params, match):
    data = dict(_transformers5("default", None, 5e7, True), rope_parameters=params)
    with pytest.raises(ValueError, match=match):
        InternLM2Config.from_dict(data)


def test_tie_word_embeddings_honoured():
    data = dict(BASE, **RELEASED["internlm2-1_8b"], )
    data["tie_word_embeddings"] = True
    cfg = InternLM2Config.from_dict(data)
    assert cfg.tie_word_embeddings
    assert cfg.num_parameters() == PARAM_COUNTS["internlm2-1_8b"] - 92544 * 2048


@pytest.mark.parametrize("field,value", [
    ("hidden_size", 0), ("num_attention_heads", -1), ("num_key_value_heads", 3), ("rms_norm_eps", 0),
    ("rope_theta", "big"), ("hidden_act", "gelu"), ("vocab_size", 1.5), ("bias", "yes"),
    ("rope_scaling", {"type": "yarn", "factor": 2.0}), ("rope_scaling", {"type": "dynamic", "factor": -1}),
    ("rope_scaling", {"type": "linear", "factor": 0.5}),
    ("rope_scaling", {"type": "linear"}), ("rope_scaling", "dynamic"), ("bos_token_id", "1"), ("eos_token_id", -2),
    ("pad_token_id", 10**6),
])
def test_invalid_values_name_the_field(field, value):
    data = dict(BASE, **RELEASED["internlm2-1_8b"])
    data[field] = value
    with pytest.raises(ValueError, match=field.split(".")[0]):
        InternLM2Config.from_dict(data)


def test_head_dim_must_divide():
    with pytest.raises(ValueError, match="hidden_size"):
        InternLM2Config(hidden_size=100, num_attention_heads=8, num_key_value_heads=8)


def test_not_internlm2(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"],
                                                      "hidden_size": 64}))
    with pytest.raises(ValueError, match="not an InternLM2 config"):
        InternLM2Config.from_pretrained(tmp_path)
    # InternLM2's reward model: the same model_type, another head (v_head, no output layer)
    (tmp_path / "config.json").write_text(json.dumps({**BASE, **RELEASED["internlm2-1_8b"],
                                                      "architectures": ["InternLM2ForRewardModel"]}))
    with pytest.raises(ValueError, match=r"config.json: architectures \['InternLM2ForRewardModel'\] is not supported"):
        InternLM2Config.from_pretrained(tmp_path)


def test_missing_and_broken_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        InternLM2Config.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json"):
        InternLM2Config.from_pretrained(tmp_path)


def test_a_released_name_is_not_fetched(tmp_path, monkeypatch):
    """A hub name where a folder is expected says so and points to the preset, instead of a bare 'no file'."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"names a released model.*preset\('internlm2_5-7b-chat-1m'\)"):
        InternLM2Config.from_pretrained("internlm/internlm2_5-7b-chat-1m")
    with pytest.raises(FileNotFoundError) as missing:
        InternLM2Config.from_pretrained("no-such-model")
    assert "released" not in str(missing.value)


def test_replace_and_preset_errors():
    cfg = InternLM2Config.preset("internlm2_5-20b-chat")
    small = cfg.replace(num_hidden_layers=2)
    assert small.num_hidden_layers == 2 and small.hidden_size == 6144
    with pytest.raises(ValueError, match="num_hidden_layers"):
        cfg.replace(num_hidden_layers=0)
    with pytest.raises(ValueError, match="unknown preset"):
        InternLM2Config.preset("internlm3-8b")
    assert InternLM2Config.preset("internlm/internlm2_5-7b-chat").max_position_embeddings == 32768


def test_every_eos_id_of_config_and_generation_config_stops_generation(tmp_path):
    """config.json may list several eos ids and generation_config.json (what transformers' generate stops
    on) others: all of them stop generation by default; a bad list names its file and field."""
    from transformers import GenerationConfig

    from internlm_jax.generation import default_stop_ids

    folder = tmp_path / "m"
    folder.mkdir()
    data = {**BASE, **RELEASED["internlm2-1_8b"], "eos_token_id": [92540, 2]}
    (folder / "config.json").write_text(json.dumps(data))
    cfg = InternLM2Config.from_pretrained(folder)
    assert cfg.eos_token_id == 92540 and cfg.eos_token_ids == (92540, 2)
    assert cfg.to_dict()["eos_token_id"] == [92540, 2]  # written back as read
    assert set(default_stop_ids(cfg)) == {92540, 2, 92542}
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": [2, 92541]}))
    cfg = InternLM2Config.from_pretrained(folder)
    assert set(GenerationConfig.from_pretrained(folder).eos_token_id) <= set(default_stop_ids(cfg))
    assert set(default_stop_ids(cfg)) == {92540, 2, 92541, 92542}
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": 7}))
    assert 7 in default_stop_ids(InternLM2Config.from_pretrained(folder))
    for generation, match in (("{", "generation_config.json: not valid JSON"),
                              ('{"eos_token_id": []}', "generation_config.json: .*'eos_token_id' is an empty list"),
                              ('{"eos_token_id": [2, "x"]}', "generation_config.json: .*'eos_token_id' must be"),
                              ('{"eos_token_id": 92544}', "generation_config.json: .*below vocab_size 92544")):
        (folder / "generation_config.json").write_text(generation)
        with pytest.raises(ValueError, match=match):
            InternLM2Config.from_pretrained(folder)
    (folder / "generation_config.json").unlink()
    for ids, match in (([], "'eos_token_id' is an empty list"), ([2, "x"], "'eos_token_id' must be a token id"),
                       ([2, 10**6], "'eos_token_id' must be a token id")):
        (folder / "config.json").write_text(json.dumps({**data, "eos_token_id": ids}))
        with pytest.raises(ValueError, match=f"config.json: .*{match}"):
            InternLM2Config.from_pretrained(folder)
