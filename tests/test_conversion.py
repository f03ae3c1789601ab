"""Conversion HF <-> Orbax: bit-exact round trips, restore onto any mesh, atomicity, bad input."""

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import reference as ref
from hf_fixtures import tiny_config, write_hf_checkpoint

from internlm_jax import InternLM2, make_mesh
from internlm_jax.checkpoint import META_FILE
from internlm_jax.cli import main

ROOT = Path(__file__).resolve().parents[1]
CFG = tiny_config(bias=True)
STATE = ref.random_state(CFG, seed=6)
IDS = np.random.RandomState(2).randint(0, CFG["vocab_size"], (2, 20))


def _tree_digest(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _convert(*args) -> int:
    return main(["convert", *map(str, args), "--quiet"])


@pytest.fixture(scope="module")
def hf_bf16(tmp_path_factory):
    folder = write_hf_checkpoint(tmp_path_factory.mktemp("src") / "hf", CFG, STATE, dtype="bfloat16", shards=2)
    (folder / "tokenizer.model").write_bytes(b"tokenizer bytes")
    (folder / "tokenizer_config.json").write_text("{}")
    return folder


@pytest.mark.parametrize("layout,dtype", [("safetensors", "bfloat16"), ("bin", "float32"), ("safetensors", "float16")])
def test_round_trip_is_bit_exact(tmp_path, layout, dtype):
    import safetensors.torch as st
    import torch

    src = write_hf_checkpoint(tmp_path / "hf", CFG, STATE, layout=layout, dtype=dtype, shards=2)
    before = _tree_digest(src)
    assert _convert("hf-to-orbax", src, tmp_path / "ox") == 0
    assert _convert("orbax-to-hf", tmp_path / "ox", tmp_path / "back", "--shard-size", "30KB") == 0
    assert _tree_digest(src) == before  # the source is never modified
    index = json.loads((tmp_path / "back" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(STATE)
    tdtype = getattr(torch, dtype)
    for name, array in STATE.items():
        got = st.load_file(tmp_path / "back" / index["weight_map"][name])[name]
        want = torch.from_numpy(array).to(tdtype)
        assert got.dtype == tdtype and got.shape == want.shape
        assert torch.equal(got.view(torch.uint8), want.view(torch.uint8)), name  # same bytes
    meta = json.loads((tmp_path / "ox" / META_FILE).read_text())
    assert meta["dtype"] == dtype and meta["source"]["dtype"] == dtype and meta["source"]["layout"] == layout
    assert len(meta["sha256"]) == sum(1 for _ in meta["sha256"]) > 0


def test_dtype_conversion_recorded(tmp_path):
    import safetensors.torch as st
    import torch

    src = write_hf_checkpoint(tmp_path / "hf", CFG, STATE, dtype="float32")
    assert _convert("hf-to-orbax", src, tmp_path / "ox", "--dtype", "bfloat16") == 0
    meta = json.loads((tmp_path / "ox" / META_FILE).read_text())
    assert (meta["dtype"], meta["source"]["dtype"]) == ("bfloat16", "float32")
    assert _convert("orbax-to-hf", tmp_path / "ox", tmp_path / "back") == 0
    back = st.load_file(tmp_path / "back" / "model.safetensors")
    for name, array in STATE.items():  # rounded exactly as torch rounds float32 -> bfloat16
        assert torch.equal(back[name].view(torch.int16), torch.from_numpy(array).bfloat16().view(torch.int16))
    assert json.loads((tmp_path / "back" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert _convert("orbax-to-hf", tmp_path / "ox", tmp_path / "back32", "--dtype", "float32") == 0


def test_dtype_conversion_updates_transformers5_dtype_key(tmp_path):
    src = write_hf_checkpoint(tmp_path / "hf", dict(CFG, dtype="bfloat16"), STATE, dtype="bfloat16")
    assert _convert("hf-to-orbax", src, tmp_path / "ox") == 0
    assert _convert("orbax-to-hf", tmp_path / "ox", tmp_path / "back", "--dtype", "float32") == 0
    written = json.loads((tmp_path / "back" / "config.json").read_text())
    assert written["dtype"] == written["torch_dtype"] == "float32"
    import safetensors.numpy

    assert {a.dtype for a in safetensors.numpy.load_file(tmp_path / "back" / "model.safetensors").values()} == {
        np.dtype(np.float32)}


# A stand-in for the official configuration_internlm2.py: enough for transformers to resolve auto_map.
REMOTE_CONFIG_CODE = """from transformers import PretrainedConfig


class InternLM2Config(PretrainedConfig):
    model_type = "internlm2"

    def __init__(self, hidden_size=4096, **kwargs):
        self.hidden_size = hidden_size
        super().__init__(**kwargs)
"""
AUTO_MAP = {"AutoConfig": "configuration_internlm2.InternLM2Config",
            "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM"}


def _remote_config_classes(tmp_path, *folders) -> list[str]:
    """What transformers' AutoConfig(trust_remote_code=True) makes of each folder (a fresh process, so its
    dynamic-module cache stays under tmp_path)."""
    code = ("import sys; from transformers import AutoConfig\n"
            "for f in sys.argv[1:]:\n"
            "    c = AutoConfig.from_pretrained(f, trust_remote_code=True)\n"
            "    print(type(c).__module__.split('.')[-1], c.hidden_size)")
    env = dict(os.environ, HF_MODULES_CACHE=str(tmp_path / "hf_modules"), HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, "-c", code, *map(str, folders)], capture_output=True, text=True, env=env,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout.splitlines()


def test_saving_over_the_source_folder_keeps_its_other_files(tmp_path):
    """``save_pretrained(folder, overwrite=True)`` over the HF folder the model came from (fine-tuning's
    usual pattern) replaces the weights, their index and config.json, and keeps the rest (tokenizer,
    generation config, model card, a subfolder), as transformers' save_pretrained does; an extra file
    given replaces a kept one."""
    from internlm_jax.generation import default_stop_ids

    src = write_hf_checkpoint(tmp_path / "hf", CFG, STATE, shards=3)
    kept = {"tokenizer.model": b"tokenizer bytes", "tokenizer_config.json": b"{}", "README.md": b"# card\n",
            "generation_config.json": json.dumps({"eos_token_id": [2, 7], "temperature": 0.8}).encode(),
            "chat_templates/default.jinja": b"{{ x }}", ".gitattributes": b"*.bin lfs\n"}
    for name, data in kept.items():
        (src / name).parent.mkdir(exist_ok=True)
        (src / name).write_bytes(data)
    model = InternLM2.from_pretrained(src)
    logits = np.asarray(model(IDS))
    new_card = tmp_path / "card.md"
    new_card.write_bytes(b"# fine-tuned\n")
    model.save_pretrained(src, overwrite=True, extra_files=[(new_card, "README.md")])
    assert not list(src.glob("model-*.safetensors")) and not (src / "model.safetensors.index.json").exists()
    assert (src / "model.safetensors").is_file()
    for name, data in kept.items():
        assert (src / name).read_bytes() == (b"# fine-tuned\n" if name == "README.md" else data), name
    again = InternLM2.from_pretrained(src)
    np.testing.assert_array_equal(np.asarray(again(IDS)), logits)
    assert default_stop_ids(again.config) == default_stop_ids(model.config) == (2, 7)
    # a save that brings a tokenizer replaces the old one whole (no mix of two); links stay links
    os.symlink("README.md", src / "MODEL_CARD.md")
    new_tok = tmp_path / "tok.model"
    new_tok.write_bytes(b"another tokenizer")
    again.save_pretrained(src, overwrite=True, extra_files=[(new_tok, "tokenizer.model")])
    assert (src / "tokenizer.model").read_bytes() == b"another tokenizer"
    assert not (src / "tokenizer_config.json").exists() and (src / "generation_config.json").exists()
    assert os.readlink(src / "MODEL_CARD.md") == "README.md"
    assert (src / "MODEL_CARD.md").read_bytes() == b"# fine-tuned\n"
    # into a new folder, the generation config travels with the config (stop ids and sampling defaults)
    model.save_pretrained(tmp_path / "new")
    assert (tmp_path / "new" / "generation_config.json").read_bytes() == kept["generation_config.json"]
    assert not (tmp_path / "new" / "tokenizer.model").exists()  # the tokenizer's files are extra_files
    # an Orbax checkpoint replaced by an HF folder leaves nothing of itself
    assert _convert("hf-to-orbax", src, tmp_path / "ox") == 0
    model.save_pretrained(tmp_path / "ox", overwrite=True)
    assert not (tmp_path / "ox" / META_FILE).exists() and not (tmp_path / "ox" / "orbax").exists()


def test_remote_code_travels_with_the_config(tmp_path):
    src = write_hf_checkpoint(tmp_path / "hf", dict(CFG, auto_map=AUTO_MAP), STATE)
    code = {"configuration_internlm2.py": REMOTE_CONFIG_CODE.encode(), "modeling_internlm2.py": b"# modeling\n",
            "tokenization_internlm2_fast.py": b"# tokenizer\n"}
    for name, data in code.items():
        (src / name).write_bytes(data)
    template = b"{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    (src / "chat_template.jinja").write_bytes(template)  # where transformers 5 saves a tokenizer's template
    assert _convert("hf-to-orbax", src, tmp_path / "ox") == 0
    assert _convert("orbax-to-hf", tmp_path / "ox", tmp_path / "back") == 0
    InternLM2.from_pretrained(src).save_pretrained(tmp_path / "saved")
    for folder in ("ox", "back", "saved"):
        assert {p.name: p.read_bytes() for p in (tmp_path / folder).glob("*.py")} == code, folder
    for folder in ("ox", "back"):  # the conversions carry the tokenizer's files, its chat template included
        assert (tmp_path / folder / "chat_template.jinja").read_bytes() == template, folder
        assert json.loads((tmp_path / folder / "config.json").read_text())["auto_map"] == AUTO_MAP
    folders = (src, tmp_path / "back", tmp_path / "saved")
    assert _remote_config_classes(tmp_path, *folders) == [f"configuration_internlm2 {CFG['hidden_size']}"] * 3
    # a folder without remote code gets none, and no auto_map is invented
    plain = write_hf_checkpoint(tmp_path / "plain", CFG, STATE)
    assert _convert("hf-to-orbax", plain, tmp_path / "plain_ox") == 0
    assert _convert("orbax-to-hf", tmp_path / "plain_ox", tmp_path / "plain_back") == 0
    assert not list((tmp_path / "plain_back").glob("*.py"))
    assert "auto_map" not in json.loads((tmp_path / "plain_back" / "config.json").read_text())


@pytest.mark.parametrize("axes", [dict(devices=1), dict(tensor=2, fsdp=4), dict(data=2, tensor=4, fsdp=1)],
                         ids=["1dev", "tensor2xfsdp4", "data2xtensor4"])
def test_orbax_restore_equals_hf_loading(tmp_path_factory, hf_bf16, axes):
    ox = tmp_path_factory.getbasetemp() / "ox_restore"
    if not ox.exists():
        assert _convert("hf-to-orbax", hf_bf16, ox) == 0
    import jax

    mesh = make_mesh(devices=jax.devices()[:1]) if "devices" in axes else make_mesh(**axes)
    direct = InternLM2.from_pretrained(hf_bf16, mesh=mesh, dtype="float32")
    restored = InternLM2.from_pretrained(ox, mesh=mesh, dtype="float32")
    np.testing.assert_array_equal(np.asarray(restored(IDS)), np.asarray(direct(IDS)))
    assert restored.layers.attention.wq.get_value().sharding == direct.layers.attention.wq.get_value().sharding
    native = InternLM2.from_pretrained(ox, mesh=mesh)  # default: the saved dtype
    assert native.param_dtype == np.dtype("bfloat16")


def test_save_from_python_on_one_mesh_restore_on_another(tmp_path):
    from internlm_jax import InternLM2Config

    cfg = InternLM2Config.from_dict(CFG)
    model = InternLM2(cfg, mesh=make_mesh(tensor=4, fsdp=2), seed=1)
    model.save(tmp_path / "ck")
    again = InternLM2.from_pretrained(tmp_path / "ck", mesh=make_mesh(data=2, tensor=2, fsdp=2))
    from flax import nnx

    for (path, a), (_, b) in zip(nnx.to_flat_state(nnx.state(again, nnx.Param)),
                                 nnx.to_flat_state(nnx.state(model, nnx.Param))):
        np.testing.assert_array_equal(np.asarray(a.get_value()), np.asarray(b.get_value()), err_msg=str(path))
    want = np.asarray(model(IDS))  # another mesh sums in another order: equal to rounding
    assert np.abs(np.asarray(again(IDS)) - want).max() <= 1e-5 * np.abs(want).max()
    with pytest.raises(FileExistsError, match="already exists"):
        model.save(tmp_path / "ck")


def _interrupt_conversion(tmp_path: Path, sig: signal.Signals) -> tuple[Path, subprocess.Popen, bytes]:
    """Convert a 40-layer model to tmp_path/out in a subprocess and send ``sig`` while layers are written."""
    cfg = tiny_config(num_hidden_layers=40)
    src = write_hf_checkpoint(tmp_path / "hf", cfg, ref.random_state(cfg, seed=0))
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "conversion", "hf-to-orbax", str(src), str(tmp_path / "out"),
                             "--quiet"], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline:  # wait until layer items are being written
        partial = list(tmp_path.glob(".out.tmp-*/orbax/layer_0000*"))
        if partial or proc.poll() is not None:
            break
        time.sleep(0.005)
    assert partial, "the conversion ended before it could be interrupted"
    proc.send_signal(sig)
    return src, proc, proc.communicate(timeout=120)[1]


def test_killed_conversion_leaves_nothing_that_loads(tmp_path):
    src, _, _ = _interrupt_conversion(tmp_path, signal.SIGKILL)
    dst = tmp_path / "out"
    assert not dst.exists()
    with pytest.raises((FileNotFoundError, ValueError)):
        InternLM2.from_pretrained(dst)
    assert _convert("hf-to-orbax", src, dst) == 0  # a rerun is not blocked by the leftover temporary
    assert InternLM2.from_pretrained(dst).config.num_hidden_layers == 40


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_interrupted_conversion_cleans_up(tmp_path, sig):
    """SIGTERM (a job scheduler's kill) removes the temporary output as Ctrl-C does."""
    _, proc, err = _interrupt_conversion(tmp_path, sig)
    assert (proc.returncode, sig == signal.SIGTERM) in ((130, False), (143, True)), (proc.returncode, err)
    assert (b"terminated" if sig == signal.SIGTERM else b"interrupted") in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def _one_line_error(capsys, *args) -> str:
    assert _convert(*args) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err, err
    return err


def test_bad_inputs_give_one_line_errors(tmp_path, capsys, hf_bf16):
    # missing source
    assert "config.json" in _one_line_error(capsys, "hf-to-orbax", tmp_path / "nope", tmp_path / "o1")
    # truncated safetensors
    bad = write_hf_checkpoint(tmp_path / "trunc", CFG, STATE)
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[:-64])
    assert "truncated" in _one_line_error(capsys, "hf-to-orbax", bad, tmp_path / "o2")
    # corrupt header
    (bad / "model.safetensors").write_bytes(data[:8] + b"\xff" * 16 + data[24:])
    assert "corrupt" in _one_line_error(capsys, "hf-to-orbax", bad, tmp_path / "o3")
    # shard named by the index that is absent
    sharded = write_hf_checkpoint(tmp_path / "sh", CFG, STATE, shards=2)
    (sharded / "model-00001-of-00002.safetensors").unlink()
    assert "absent" in _one_line_error(capsys, "hf-to-orbax", sharded, tmp_path / "o4")
    # shapes that disagree with the config
    wrong = write_hf_checkpoint(tmp_path / "shape", dict(CFG, intermediate_size=64), STATE)
    assert "implies" in _one_line_error(capsys, "hf-to-orbax", wrong, tmp_path / "o5")
    # missing and unexpected tensors
    state = dict(STATE)
    state.pop("output.weight")
    assert "missing tensor" in _one_line_error(capsys, "hf-to-orbax",
                                               write_hf_checkpoint(tmp_path / "m", CFG, state), tmp_path / "o6")
    state = dict(STATE, extra=np.zeros(3, np.float32))
    assert "unexpected tensor" in _one_line_error(capsys, "hf-to-orbax",
                                                  write_hf_checkpoint(tmp_path / "u", CFG, state), tmp_path / "o7")
    # not InternLM2
    llama = write_hf_checkpoint(tmp_path / "llama", dict(CFG, model_type="llama", architectures=["LlamaForCausalLM"]),
                                STATE)
    assert "not an InternLM2 config" in _one_line_error(capsys, "hf-to-orbax", llama, tmp_path / "o8")
    # unsupported dtype: argparse refuses it (exit 2) before anything is read
    with pytest.raises(SystemExit) as e:
        main(["convert", "hf-to-orbax", str(hf_bf16), str(tmp_path / "o9"), "--dtype", "int8"])
    assert e.value.code == 2
    assert "invalid choice: 'int8'" in capsys.readouterr().err
    # an Orbax checkpoint with a missing item, and one with a corrupted array
    ox = tmp_path / "ox"
    assert _convert("hf-to-orbax", hf_bf16, ox) == 0
    meta = json.loads((ox / META_FILE).read_text())
    key = next(k for k in meta["sha256"] if k.startswith("layer_00001/"))
    meta["sha256"][key] = "0" * 64
    (ox / META_FILE).write_text(json.dumps(meta))
    assert "checksum mismatch" in _one_line_error(capsys, "orbax-to-hf", ox, tmp_path / "o10")
    assert not (tmp_path / "o10").exists() and not list(tmp_path.glob(".o10*"))
    import shutil

    shutil.rmtree(ox / "orbax" / "layer_00001")
    assert "missing" in _one_line_error(capsys, "orbax-to-hf", ox, tmp_path / "o11")
    assert not any(p.name.startswith(".o") for p in tmp_path.iterdir())  # no temporaries left behind
    for name in ("o1", "o2", "o3", "o4", "o5", "o6", "o7", "o8"):
        assert not (tmp_path / name).exists()
    # --debug shows the traceback instead
    with pytest.raises(Exception):
        main(["convert", "hf-to-orbax", str(tmp_path / "nope"), str(tmp_path / "o12"), "--debug"])


def test_existing_destination_needs_overwrite_and_disk_space_is_checked(tmp_path, capsys, hf_bf16, monkeypatch):
    dst = tmp_path / "ox"
    dst.mkdir()
    (dst / "keep.txt").write_text("user data")
    assert "already exists" in _one_line_error(capsys, "hf-to-orbax", hf_bf16, dst)
    assert (dst / "keep.txt").read_text() == "user data"
    (dst / "model.safetensors").write_bytes(b"")  # an old checkpoint: --overwrite replaces it
    assert _convert("hf-to-orbax", hf_bf16, dst, "--overwrite") == 0
    assert (dst / META_FILE).exists() and not (dst / "keep.txt").exists()
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**12, 10**12 - 1000, 1000))
    assert "not enough free disk space" in _one_line_error(capsys, "orbax-to-hf", dst, tmp_path / "hf_out")


def test_progress_bar_and_quiet_mode(tmp_path, capsys, hf_bf16):
    assert main(["convert", "hf-to-orbax", str(hf_bf16), str(tmp_path / "a")]) == 0
    out = capsys.readouterr()
    assert "writing orbax" in out.err and "100%" in out.err and "wrote" in out.out
    assert _convert("hf-to-orbax", hf_bf16, tmp_path / "b") == 0
    out = capsys.readouterr()
    assert out.err == "" and out.out == ""
    assert (tmp_path / "a" / "tokenizer.model").read_bytes() == b"tokenizer bytes"


def test_relative_paths(tmp_path, monkeypatch):
    """Orbax wants absolute paths; relative ones from the CLI and from_pretrained are made absolute."""
    write_hf_checkpoint(tmp_path / "hf", CFG, STATE)
    monkeypatch.chdir(tmp_path)
    assert _convert("hf-to-orbax", "hf", "ox") == 0
    assert _convert("orbax-to-hf", "ox", "back") == 0
    want = np.asarray(InternLM2.from_pretrained(tmp_path / "hf")(IDS))
    InternLM2.from_pretrained("back").save("saved")
    for folder in ("ox", "back", "saved"):
        np.testing.assert_array_equal(np.asarray(InternLM2.from_pretrained(folder)(IDS)), want)


def test_destination_that_would_delete_the_source_is_refused(tmp_path, capsys, hf_bf16):
    import shutil

    src = tmp_path / "models" / "hf"
    shutil.copytree(hf_bf16, src)
    before = _tree_digest(tmp_path)
    for direction in ("hf-to-orbax", "orbax-to-hf", "train-to-hf"):
        for dst, relation in ((src, "is"), (src.parent, "contains"), (src / "model-00001-of-00002.safetensors",
                                                                     "is inside")):
            err = _one_line_error(capsys, direction, src, dst, "--overwrite")
            assert f"destination {dst} {relation} the source {src}" in err, err
    assert _tree_digest(tmp_path) == before
    assert _convert("hf-to-orbax", src, tmp_path / "ox") == 0
    assert "is the source" in _one_line_error(capsys, "orbax-to-hf", tmp_path / "ox", tmp_path / "ox", "--overwrite")
    assert (tmp_path / "ox" / META_FILE).is_file()


def test_overwrite_replaces_only_checkpoint_folders(tmp_path, capsys, hf_bf16, monkeypatch):
    """--overwrite of a user's folder (``--overwrite .`` in a home folder) is refused; an empty one is fine."""
    home = tmp_path / "home"
    (home / "notes").mkdir(parents=True)
    (home / "notes" / "todo.txt").write_text("user data")
    monkeypatch.chdir(home)
    err = _one_line_error(capsys, "hf-to-orbax", hf_bf16, ".", "--overwrite")
    assert f"{home} is a non-empty folder that is not a checkpoint" in err
    assert (home / "notes" / "todo.txt").read_text() == "user data"
    assert "not a checkpoint" in _one_line_error(capsys, "hf-to-orbax", hf_bf16, home / "notes", "--overwrite")
    (home / "project" / ".git").mkdir(parents=True)  # a config.json alone does not make a checkpoint
    (home / "project" / "config.json").write_text("{}")
    assert "not a checkpoint" in _one_line_error(capsys, "hf-to-orbax", hf_bf16, home / "project", "--overwrite")
    assert (home / "project" / ".git").is_dir()
    (home / "empty").mkdir()
    assert _convert("hf-to-orbax", hf_bf16, home / "empty", "--overwrite") == 0
    assert _convert("orbax-to-hf", home / "empty", home / "empty", "--overwrite") == 1  # still the source
    assert _convert("orbax-to-hf", home / "empty", home / "hf", "--overwrite") == 0
    assert _convert("hf-to-orbax", hf_bf16, home / "hf", "--overwrite") == 0  # an HF folder is a checkpoint
    assert (home / "hf" / META_FILE).is_file()


def test_a_weights_file_or_a_url_for_a_folder_is_named(tmp_path, capsys, hf_bf16):
    weights = next(hf_bf16.glob("*.safetensors"))
    assert f"{weights} is not a config.json: pass the checkpoint folder ({hf_bf16})" in \
        _one_line_error(capsys, "hf-to-orbax", weights, tmp_path / "ox")
    err = _one_line_error(capsys, "hf-to-orbax", hf_bf16, "gs://bucket/ckpt")
    assert "gs://bucket/ckpt: remote paths are not read or written directly" in err
    assert not (tmp_path / "gs:").exists() and not Path("gs:").exists()
    with pytest.raises(ValueError, match="remote paths"):
        InternLM2.from_pretrained("gs://bucket/ckpt")


def test_overwrite_refuses_a_file_and_replaces_a_link_leaving_nothing_behind(tmp_path, capsys, hf_bf16):
    (tmp_path / "file").write_text("x")
    target = tmp_path / "target"
    target.mkdir()
    (target / "user.txt").write_text("user data")
    (tmp_path / "link").symlink_to(target)
    assert "is a file, not a checkpoint folder" in _one_line_error(capsys, "hf-to-orbax", hf_bf16, tmp_path / "file",
                                                                   "--overwrite")
    assert (tmp_path / "file").read_text() == "x"
    assert _convert("hf-to-orbax", hf_bf16, tmp_path / "link", "--overwrite") == 0
    assert (tmp_path / "link" / META_FILE).is_file() and not (tmp_path / "link").is_symlink()
    assert (target / "user.txt").read_text() == "user data"  # the link is replaced, its target kept
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "link", "target"]


def test_destination_under_a_file_and_home_relative_paths(tmp_path, capsys, hf_bf16, monkeypatch):
    from conversion.convert import hf_to_orbax

    (tmp_path / "afile").write_text("x")
    err = _one_line_error(capsys, "hf-to-orbax", hf_bf16, tmp_path / "afile" / "sub" / "ox")
    assert f"cannot create {tmp_path / 'afile' / 'sub' / 'ox'}: {tmp_path / 'afile'} is a file, not a folder" in err
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(hf_bf16)
    import shutil

    shutil.copytree(hf_bf16, tmp_path / "hf")
    assert hf_to_orbax("~/hf", "~/ox", progress=False) == tmp_path / "ox"
    assert _convert("orbax-to-hf", "~/ox", "~/back") == 0
    assert (tmp_path / "back" / "model.safetensors").is_file() and not (hf_bf16 / "~").exists()


def test_mixed_or_float64_source_needs_dtype(tmp_path, capsys):
    import safetensors.torch as st
    import torch

    src = tmp_path / "mixed"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(CFG))
    tensors = {k: torch.from_numpy(v).to(torch.float32 if "norm" in k else torch.bfloat16) for k, v in STATE.items()}
    st.save_file(tensors, str(src / "model.safetensors"))
    err = _one_line_error(capsys, "hf-to-orbax", src, tmp_path / "ox")
    assert "mixes dtypes ('model.tok_embeddings.weight' is bfloat16, 'model.layers.0.attention_norm.weight' is " \
           "float32); pass --dtype" in err
    assert not (tmp_path / "ox").exists()
    assert _convert("hf-to-orbax", src, tmp_path / "ox", "--dtype", "float32") == 0
    assert _convert("orbax-to-hf", tmp_path / "ox", tmp_path / "back") == 0
    back = st.load_file(tmp_path / "back" / "model.safetensors")
    assert all(torch.equal(back[k], t.float()) for k, t in tensors.items())  # bfloat16 -> float32 is exact
    f64 = write_hf_checkpoint(tmp_path / "f64", CFG, STATE, dtype="float64")
    err = _one_line_error(capsys, "hf-to-orbax", f64, tmp_path / "ox64")
    assert "the source weights are float64; pass --dtype float32|bfloat16|float16" in err


def _broken_orbax(tmp_path, hf_bf16) -> Path:
    import shutil

    ox = tmp_path / "ox"
    assert _convert("hf-to-orbax", hf_bf16, ox) == 0
    shutil.rmtree(ox / "orbax" / "layer_00001" / "ocdbt.process_0")
    return ox


def test_cli_errors_are_one_line_on_stderr_whatever_the_libraries_print(tmp_path, hf_bf16):
    """Orbax (absl logs) and tensorstore (coroutines reporting at exit) write around our error: the CLI
    keeps stderr to its one line."""
    ox = _broken_orbax(tmp_path, hf_bf16)
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    for args in (["orbax-to-hf", ox, tmp_path / "out"], ["train-to-hf", hf_bf16, tmp_path / "out"]):
        done = subprocess.run([sys.executable, "-m", "internlm_jax", "convert", *map(str, args), "--quiet"],
                              capture_output=True, text=True, env=env, timeout=300)
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        assert done.returncode == 1 and len(lines) == 1, done.stderr
        assert lines[0].startswith(f"internlm-jax convert {args[0]}: error: ")
    assert not (tmp_path / "out").exists()


def test_a_damaged_or_wrong_folder_is_named_in_one_short_line_from_python(tmp_path, hf_bf16, capsys):
    """From Python too (no CLI to shorten it), a damaged Orbax item is one line naming the item, not
    TensorStore's multi-line spec; an HF folder given as an Orbax checkpoint is named as such."""
    from internlm_jax.checkpoint import OrbaxCheckpointError, read_metadata

    ox = _broken_orbax(tmp_path, hf_bf16)
    with pytest.raises(OrbaxCheckpointError) as e:
        InternLM2.from_pretrained(ox)
    message = str(e.value)
    assert "\n" not in message and len(message) < 600, message
    assert message.startswith(f"{ox / 'orbax' / 'layer_00001'}: cannot restore"), message
    with pytest.raises(OrbaxCheckpointError, match="not an internlm-jax-orbax checkpoint .*it holds HF weights"):
        read_metadata(hf_bf16)
    err = _one_line_error(capsys, "orbax-to-hf", hf_bf16, tmp_path / "o3")
    assert "not an internlm-jax-orbax checkpoint" in err, err


def test_orbax_items_are_checked_against_the_config(tmp_path, capsys, hf_bf16):
    ox = tmp_path / "ox"
    assert _convert("hf-to-orbax", hf_bf16, ox) == 0
    cfg = json.loads((ox / "config.json").read_text())
    (ox / "config.json").write_text(json.dumps(dict(cfg, num_attention_heads=3, num_key_value_heads=1)))
    err = _one_line_error(capsys, "orbax-to-hf", ox, tmp_path / "o1")
    assert re.search(r"array 'attention\.(bk|bq|bv|wk|wq|wv|wo)' of item orbax/layer_00000 has shape \(.*\) but "
                     r"config\.json implies", err), err
    (ox / "config.json").write_text(json.dumps(dict(cfg, tie_word_embeddings=True)))
    err = _one_line_error(capsys, "orbax-to-hf", ox, tmp_path / "o2")
    assert "item orbax/final holds ['norm.weight', 'output'] but config.json implies ['norm.weight'] " \
           "(unexpected: ['output'], missing: none)" in err
    assert not any(p.name.startswith(("o1", "o2", ".o")) for p in tmp_path.iterdir())


def test_from_pretrained_can_verify_checksums(tmp_path, hf_bf16):
    from internlm_jax.checkpoint import OrbaxCheckpointError

    ox = tmp_path / "ox"
    assert _convert("hf-to-orbax", hf_bf16, ox) == 0
    meta = json.loads((ox / META_FILE).read_text())
    meta["sha256"]["final/norm.weight"] = "0" * 64
    (ox / META_FILE).write_text(json.dumps(meta))
    InternLM2.from_pretrained(ox)  # not checked by default: it needs a host copy of every array
    with pytest.raises(OrbaxCheckpointError, match="checksum mismatch for final/norm.weight"):
        InternLM2.from_pretrained(ox, verify=True)


def test_shard_size_accepts_units_and_refuses_the_rest(tmp_path, capsys, hf_bf16):
    from internlm_jax.hf_checkpoint import parse_size

    assert [parse_size(s) for s in ("5G", "5GB", "1.5GB", "10KB", "2GiB", "500m", 7)] == [
        5 * 10**9, 5 * 10**9, 15 * 10**8, 10**4, 2 * 2**30, 5 * 10**8, 7]
    for bad in ("abc", "0", "-1", "5XB", ""):
        with pytest.raises(SystemExit) as e:
            main(["convert", "orbax-to-hf", str(tmp_path / "nowhere"), str(tmp_path / "o"), "--shard-size", bad])
        assert e.value.code == 2
        assert "argument --shard-size: shard size" in capsys.readouterr().err
    assert _convert("hf-to-orbax", hf_bf16, tmp_path / "ox") == 0
    assert _convert("orbax-to-hf", tmp_path / "ox", tmp_path / "hf", "--shard-size", "20K") == 0
    assert len(list((tmp_path / "hf").glob("model-*.safetensors"))) > 1


def test_a_rerun_removes_the_unfinished_output_of_killed_runs(tmp_path, hf_bf16):
    """A killed conversion leaves its hidden temporary folder (model-sized) behind; the next run into the
    same destination removes those whose writer is gone (their lock is free), and keeps a live writer's
    and anything not named as ours."""
    import fcntl

    for name in (".ox.tmp-dead0000", ".ox.tmp-beef0000", ".ox.tmp-notours"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "part").write_bytes(b"x" * 100)
        (tmp_path / (name + ".lock")).write_text("")
    with open(tmp_path / ".ox.tmp-beef0000.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # a writer that is still running
        assert _convert("hf-to-orbax", hf_bf16, tmp_path / "ox") == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [".ox.tmp-beef0000", ".ox.tmp-beef0000.lock",
                                                          ".ox.tmp-notours", ".ox.tmp-notours.lock", "ox"]
    assert (tmp_path / "ox" / META_FILE).is_file()
