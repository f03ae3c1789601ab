"""Loading HF folders in every layout, writing them back, and the errors bad checkpoints give."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import reference as ref
from hf_fixtures import tiny_config, write_hf_checkpoint

from internlm_jax import CheckpointError, InternLM2, make_mesh
from internlm_jax.hf_checkpoint import open_hf_tensors

CFG = tiny_config(bias=True)
STATE = ref.random_state(CFG, seed=4)
IDS = np.random.RandomState(0).randint(0, CFG["vocab_size"], (2, 20))
EXPECTED = ref.forward(STATE, CFG, IDS)["logits"]


@pytest.mark.parametrize("layout,shards", [("safetensors", 1), ("safetensors", 3), ("bin", 1), ("bin", 2),
                                           ("legacy_bin", 2)])
def test_layouts_load_to_the_same_model(tmp_path, layout, shards):
    folder = write_hf_checkpoint(tmp_path / "ckpt", CFG, STATE, layout=layout, shards=shards)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    model = InternLM2.from_pretrained(folder, mesh=make_mesh(tensor=2, fsdp=4))
    np.testing.assert_allclose(np.asarray(model(IDS)), EXPECTED, atol=1e-4)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # source untouched


# (set a, set b, the one transformers loads): its order is model.safetensors, model.safetensors.index.json,
# pytorch_model.bin, pytorch_model.bin.index.json (transformers.modeling_utils, 4.x and 5.x)
@pytest.mark.parametrize("a,b,loaded", [
    (("safetensors", 1), ("bin", 2), "a"), (("bin", 2), ("safetensors", 1), "b"),
    (("safetensors", 3), ("bin", 1), "a"), (("bin", 1), ("safetensors", 3), "b"),
    (("safetensors", 3), ("safetensors", 1), "b"), (("bin", 1), ("bin", 2), "a")])
def test_a_folder_with_two_weight_sets_loads_the_one_transformers_loads(tmp_path, a, b, loaded):
    """Repos that ship safetensors and .bin (or a stale index beside a single file) load the set that
    transformers' from_pretrained picks, whatever the other holds."""
    states = {"a": STATE, "b": ref.random_state(CFG, seed=9)}
    folder = write_hf_checkpoint(tmp_path / "a", CFG, states["a"], layout=a[0], shards=a[1])
    for f in write_hf_checkpoint(tmp_path / "b", CFG, states["b"], layout=b[0], shards=b[1]).iterdir():
        if f.name != "config.json":
            (folder / f.name).write_bytes(f.read_bytes())
    expected = ref.forward(states[loaded], CFG, IDS)["logits"]
    np.testing.assert_allclose(np.asarray(InternLM2.from_pretrained(folder)(IDS)), expected, atol=1e-4)


def test_old_checkpoints_with_rotary_buffers_load(tmp_path):
    state = dict(STATE)
    for i in range(CFG["num_hidden_layers"]):
        state[f"model.layers.{i}.attention.rotary_emb.inv_freq"] = np.ones(4, np.float32)
    folder = write_hf_checkpoint(tmp_path / "ckpt", CFG, state, layout="bin")
    np.testing.assert_allclose(np.asarray(InternLM2.from_pretrained(folder)(IDS)), EXPECTED, atol=1e-4)


def test_save_pretrained_round_trip_is_bit_exact(tmp_path):
    import safetensors.torch as st
    import torch

    folder = write_hf_checkpoint(tmp_path / "src", CFG, STATE, dtype="bfloat16")
    model = InternLM2.from_pretrained(folder, dtype="bfloat16", mesh=make_mesh(tensor=2, fsdp=4))
    out = model.save_pretrained(tmp_path / "out", shard_size=30_000)
    files = sorted(p.name for p in out.iterdir())
    assert "model.safetensors.index.json" in files and "config.json" in files
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(STATE)
    original = st.load_file(folder / "model.safetensors")
    for name, file in index["weight_map"].items():
        written = st.load_file(out / file)[name]  # read back with the safetensors library itself
        assert written.dtype == torch.bfloat16
        assert torch.equal(written.view(torch.int16), original[name].view(torch.int16)), name
    cfg_back = json.loads((out / "config.json").read_text())
    assert cfg_back["torch_dtype"] == "bfloat16" and cfg_back["num_attention_heads"] == CFG["num_attention_heads"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind
    with pytest.raises(FileExistsError, match="overwrite"):
        model.save_pretrained(out)
    model.save_pretrained(out, overwrite=True)  # single file this time
    assert (out / "model.safetensors").exists() and not (out / "model.safetensors.index.json").exists()


def _corrupt(tmp_path, mutate_state=None, mutate_cfg=None, layout="safetensors", shards=1):
    state, cfg = dict(STATE), dict(CFG)
    if mutate_state:
        mutate_state(state)
    if mutate_cfg:
        mutate_cfg(cfg)
    return write_hf_checkpoint(tmp_path / "bad", cfg, state, layout=layout, shards=shards)


def test_missing_tensor(tmp_path):
    folder = _corrupt(tmp_path, lambda s: s.pop("model.layers.1.feed_forward.w2.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensor\(s\) model\.layers\.1\.feed_forward\.w2\.weight"):
        InternLM2.from_pretrained(folder)


def test_a_config_without_bias_key_over_a_biasless_checkpoint_says_what_to_set(tmp_path):
    """CFG has bias: true; a checkpoint without the bias tensors and a config without the key is the slip."""
    folder = _corrupt(tmp_path, lambda s: [s.pop(k) for k in list(s) if k.endswith(".bias")],
                      lambda c: c.pop("bias"))
    with pytest.raises(CheckpointError, match=r"missing tensor\(s\) .*\.bias.*config\.json needs \"bias\": false"):
        InternLM2.from_pretrained(folder)


def test_unexpected_tensor_names_file_and_shape(tmp_path):
    folder = _corrupt(tmp_path,
                      lambda s: s.update({"model.layers.0.attention.q_proj.weight": np.zeros((3, 4), np.float32)}))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: unexpected tensor "
                                              r"'model\.layers\.0\.attention\.q_proj\.weight' of shape \(3, 4\)"):
        InternLM2.from_pretrained(folder)


def test_wrong_shape_names_both_shapes(tmp_path):
    folder = _corrupt(tmp_path, mutate_cfg=lambda c: c.update(intermediate_size=96))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor "
                                              r"'model\.layers\.0\.feed_forward\.w1\.weight' has shape \(80, 48\) "
                                              r"but config\.json implies \(96, 48\)"):
        InternLM2.from_pretrained(folder)


def test_not_internlm2_config(tmp_path):
    folder = _corrupt(tmp_path, mutate_cfg=lambda c: c.update(model_type="llama", architectures=["LlamaForCausalLM"]))
    with pytest.raises(ValueError, match=r"config\.json: not an InternLM2 config"):
        InternLM2.from_pretrained(folder)


def test_truncated_and_corrupt_safetensors(tmp_path):
    folder = write_hf_checkpoint(tmp_path / "t", CFG, STATE)
    file = folder / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: truncated"):
        InternLM2.from_pretrained(folder)
    file.write_bytes(data[:8] + b"{garbage" + data[16:])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: corrupt safetensors header"):
        InternLM2.from_pretrained(folder)
    file.write_bytes(b"\x01\x02")
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        InternLM2.from_pretrained(folder)


def test_safetensors_offsets_that_overlap_or_leave_a_gap_are_refused_as_safetensors_refuses_them(tmp_path):
    """A header may point two tensors at the same bytes (or skip bytes): the safetensors library refuses such
    a file, and so must the loader, instead of loading one tensor's values as another's."""
    import struct

    from safetensors.numpy import load_file

    folder = write_hf_checkpoint(tmp_path / "o", CFG, STATE)
    file = folder / "model.safetensors"
    data = file.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    names = [k for k in header if k != "__metadata__"]
    size = {k: header[k]["data_offsets"][1] - header[k]["data_offsets"][0] for k in names}
    a, b = next((a, b) for a in names for b in names if a < b and size[a] == size[b]
                and header[a]["dtype"] == header[b]["dtype"])

    def rewrite(h):
        raw = json.dumps(h, separators=(",", ":")).encode()
        assert len(raw) <= n
        file.write_bytes(struct.pack("<Q", n) + raw + b" " * (n - len(raw)) + data[8 + n:])

    overlap = json.loads(json.dumps(header))
    overlap[b]["data_offsets"] = header[a]["data_offsets"]
    rewrite(overlap)
    with pytest.raises(Exception):
        load_file(file)
    with pytest.raises(CheckpointError, match=r"safetensors: corrupt header: tensor .* inside the tensor before"):
        InternLM2.from_pretrained(folder)
    last = max(names, key=lambda k: header[k]["data_offsets"][0])
    gap = json.loads(json.dumps(header))
    gap.pop(last)  # the file keeps the bytes; a tensor in the middle is missing instead
    first = min(names, key=lambda k: header[k]["data_offsets"][0])
    gap.pop(first)
    rewrite(gap)
    with pytest.raises(Exception):
        load_file(file)
    with pytest.raises(CheckpointError, match=r"corrupt header: tensor .* after a gap \(expected 0\)"):
        InternLM2.from_pretrained(folder)


def test_index_naming_an_absent_shard(tmp_path):
    folder = write_hf_checkpoint(tmp_path / "s", CFG, STATE, shards=3)
    (folder / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"shard model-00002-of-00003\.safetensors is named by the index .* "
                                              r"but is absent"):
        InternLM2.from_pretrained(folder)


def test_no_weights_and_no_folder(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(CFG))
    with pytest.raises(CheckpointError, match="no weights found"):
        InternLM2.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError):
        InternLM2.from_pretrained(tmp_path / "nowhere")


def test_malicious_bin_is_refused_without_running_it(tmp_path):
    import pickle
    import zipfile

    folder = tmp_path / "evil"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(CFG))
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    with zipfile.ZipFile(folder / "pytorch_model.bin", "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps({"x": Payload()}, protocol=2))
        z.writestr("archive/version", "3\n")
    with pytest.raises(ValueError, match="system"):
        InternLM2.from_pretrained(folder)
    assert not marker.exists()


def test_safetensors_load_without_torch(tmp_path):
    """A user without torch installed can load safetensors checkpoints (torch is blocked here)."""
    folder = write_hf_checkpoint(tmp_path / "ckpt", CFG, STATE)
    np.save(tmp_path / "ids.npy", IDS)
    np.save(tmp_path / "expected.npy", EXPECTED)
    script = textwrap.dedent(f"""
        import sys, importlib.abc
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "torch" or name.startswith("torch."):
                    raise ImportError("torch is blocked in this test")
        sys.meta_path.insert(0, Block())
        import numpy as np
        from internlm_jax import InternLM2
        m = InternLM2.from_pretrained({str(folder)!r})
        got = np.asarray(m(np.load({str(tmp_path / 'ids.npy')!r})))
        np.testing.assert_allclose(got, np.load({str(tmp_path / 'expected.npy')!r}), atol=1e-4)
        assert "torch" not in sys.modules
        print("ok")
    """)
    env = dict(os.environ, XLA_FLAGS="", PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-2000:]


def test_open_hf_tensors_reads_headers_only(tmp_path):
    folder = write_hf_checkpoint(tmp_path / "c", CFG, STATE, dtype="float16", shards=2)
    refs = open_hf_tensors(folder)
    assert set(refs) == set(STATE)
    ref_w = refs["model.layers.0.attention.wqkv.weight"]
    assert ref_w.shape == STATE["model.layers.0.attention.wqkv.weight"].shape and ref_w.dtype == np.float16
    np.testing.assert_array_equal(ref_w.load(), STATE["model.layers.0.attention.wqkv.weight"].astype(np.float16))


def test_index_whose_weight_map_is_not_a_dict_of_file_names(tmp_path):
    folder = write_hf_checkpoint(tmp_path / "s", CFG, STATE, shards=2)
    for weight_map, problem in ((["model-00001-of-00002.safetensors"], "got a list"),
                                ({"model.norm.weight": 3}, "'model.norm.weight' maps to 3")):
        (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
        with pytest.raises(CheckpointError) as e:
            InternLM2.from_pretrained(folder)
        assert str(e.value) == (f"{folder / 'model.safetensors.index.json'}: not a valid index file (weight_map "
                                f"must map tensor names to file names; {problem})")


def test_tied_checkpoint_that_also_stores_the_output_matrix_loads(tmp_path):
    """torch.save(model.state_dict()) of a tied model keeps output.weight (the embedding): transformers
    loads it, and so do we; an output matrix of another shape is still refused."""
    cfg = dict(CFG, tie_word_embeddings=True)
    state = {k: v for k, v in STATE.items() if k != "output.weight"}
    want = ref.forward(state, cfg, IDS)["logits"]
    copy = dict(state, **{"output.weight": state["model.tok_embeddings.weight"]})
    folder = write_hf_checkpoint(tmp_path / "tied", cfg, copy, layout="bin")
    np.testing.assert_allclose(np.asarray(InternLM2.from_pretrained(folder)(IDS)), want, atol=1e-4)
    bad = dict(state, **{"output.weight": np.zeros((3, cfg["hidden_size"]), np.float32)})
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'output\.weight' of shape \(3, 48\)"):
        InternLM2.from_pretrained(write_hf_checkpoint(tmp_path / "bad", cfg, bad))


@pytest.mark.parametrize("file", ["model.safetensors", "pytorch_model.bin"])
def test_git_lfs_pointer_instead_of_weights(tmp_path, file):
    folder = tmp_path / "clone"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(CFG))
    (folder / file).write_text("version https://git-lfs.github.com/spec/v1\noid sha256:4d7a2146\nsize 12345\n")
    with pytest.raises(CheckpointError, match=rf"{file}: a git-LFS pointer, not the weights \(run git lfs pull\)"):
        InternLM2.from_pretrained(folder)
