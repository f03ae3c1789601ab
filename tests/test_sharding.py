"""Sharded forward == single-device forward on the 8 simulated CPU devices, and the sharding rules."""

import jax
import numpy as np
import pytest
import reference as ref
from hf_fixtures import tiny_config, write_hf_checkpoint
from jax.sharding import PartitionSpec as P

from internlm_jax import InternLM2, InternLM2Config, explain_sharding, make_mesh
from internlm_jax.sharding import logical_to_spec

# 8 query heads, 2 KV heads: tensor=8 exceeds the KV head count.
CFG8 = tiny_config(num_attention_heads=8, num_key_value_heads=2, hidden_size=64, intermediate_size=128,
                   vocab_size=128, bias=True)
# Sizes that 8-way or 4-way splits do not divide: vocab 100, 6 heads, 3 KV heads, intermediate 36.
ODD = tiny_config(num_attention_heads=6, num_key_value_heads=3, hidden_size=36, intermediate_size=36,
                  vocab_size=100, rope_scaling={"type": "linear", "factor": 2.0})


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    out = {}
    for name, cfg in (("cfg8", CFG8), ("odd", ODD)):
        out[name] = (cfg, write_hf_checkpoint(tmp_path_factory.mktemp(name), cfg, ref.random_state(cfg, seed=2)))
    return out


def _close(got, want):
    got, want = np.asarray(got), np.asarray(want)
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max(), np.abs(got - want).max()


MESHES = [dict(tensor=8, fsdp=1), dict(tensor=2, fsdp=4), dict(data=2, tensor=4, fsdp=1),
          dict(data=2, fsdp=2, tensor=2), dict(sequence=2, tensor=4, fsdp=1)]


@pytest.mark.parametrize("axes", MESHES, ids=lambda a: "x".join(f"{k}{v}" for k, v in a.items()))
def test_sharded_forward_equals_single_device(folders, axes):
    cfg, folder = folders["cfg8"]
    ids = np.random.RandomState(0).randint(0, cfg["vocab_size"], (4, 24))
    single = InternLM2.from_pretrained(folder, mesh=make_mesh(devices=jax.devices()[:1]))
    mesh = make_mesh(**axes)
    sharded = InternLM2.from_pretrained(folder, mesh=mesh)
    got = sharded(ids)
    assert len(got.sharding.device_set) == 8
    _close(got, single(ids))
    # parameters really are split over the mesh
    wq = sharded.layers.attention.wq.get_value()
    shard = wq.addressable_shards[0].data.shape
    assert shard[2] == CFG8["num_attention_heads"] // mesh.shape["tensor"]
    w1 = sharded.layers.feed_forward.w1.get_value()
    assert w1.addressable_shards[0].data.shape[2] == CFG8["intermediate_size"] // mesh.shape["tensor"]
    assert w1.sharding.spec[1] == ("fsdp" if mesh.shape["fsdp"] > 1 else None)


def test_kv_heads_replicated_when_tensor_exceeds_them(folders):
    cfg, folder = folders["cfg8"]
    model = InternLM2.from_pretrained(folder, mesh=make_mesh(tensor=8, fsdp=1))
    wk = model.layers.attention.wk.get_value()
    assert wk.sharding.spec == P()  # 2 KV heads cannot split 8 ways: every device holds both
    assert wk.addressable_shards[0].data.shape == wk.shape
    notes = explain_sharding(model)["layers.attention.wk"]
    assert "kv_heads" in notes and "replicated" in notes


def test_random_init_is_sharded_and_mesh_independent():
    cfg = InternLM2Config.from_dict(CFG8)
    one = InternLM2(cfg, seed=3)
    many = InternLM2(cfg, mesh=make_mesh(tensor=4, fsdp=2), seed=3)
    emb = many.tok_embeddings.get_value()
    assert emb.sharding.spec == P("tensor", "fsdp")
    np.testing.assert_array_equal(np.asarray(emb), np.asarray(one.tok_embeddings.get_value()))
    ids = np.arange(16).reshape(2, 8)
    _close(many(ids), one(ids))


@pytest.mark.parametrize("axes", [dict(tensor=8, fsdp=1), dict(tensor=4, fsdp=2), dict(data=8, fsdp=1)],
                         ids=["tensor8", "tensor4xfsdp2", "data8"])
def test_indivisible_sizes_fall_back_to_replication(folders, axes):
    cfg, folder = folders["odd"]
    ids = np.random.RandomState(1).randint(0, cfg["vocab_size"], (3, 20))  # batch 3 on data=8, too
    single = InternLM2.from_pretrained(folder, mesh=make_mesh(devices=jax.devices()[:1]))
    sharded = InternLM2.from_pretrained(folder, mesh=make_mesh(**axes))
    _close(sharded(ids), single(ids))
    notes = explain_sharding(sharded)
    if axes.get("tensor", 1) == 8:
        assert "not divisible" in notes["tok_embeddings"]  # vocab 100
    if axes.get("tensor", 1) > 1:
        assert "'q_heads' of size 6 is not divisible" in notes["layers.attention.wq"]
    expected = ref.forward(ref.random_state(cfg, seed=2), cfg, ids)["logits"]
    np.testing.assert_allclose(np.asarray(sharded(ids)), expected, atol=1e-4)


def test_logical_to_spec_rules():
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    assert logical_to_spec(("batch", "seq", "act_embed"), (4, 8, 16), mesh) == P(("data", "fsdp"))
    assert logical_to_spec(("batch", "seq", "act_embed"), (2, 8, 16), mesh) == P("data")
    assert logical_to_spec(("vocab", "embed"), (10, 16), mesh) == P("tensor", "fsdp")
    assert logical_to_spec(("vocab", "embed"), (9, 16), mesh) == P(None, "fsdp")
    with pytest.raises(ValueError, match="no rule"):
        logical_to_spec(("nonsense",), (4,), mesh)
    with pytest.raises(ValueError, match="logical axes"):
        logical_to_spec(("vocab",), (4, 4), mesh)


def test_make_mesh_errors_and_defaults():
    assert make_mesh().shape == {"data": 1, "fsdp": 8, "tensor": 1, "sequence": 1}
    assert make_mesh(tensor=4, fsdp=2).shape["tensor"] == 4
    assert make_mesh(tensor=2, fsdp=1).devices.size == 2  # an explicitly smaller mesh
    with pytest.raises(ValueError, match="needs 16 devices"):
        make_mesh(tensor=16, fsdp=1)
    with pytest.raises(ValueError, match="cannot be split"):
        make_mesh(tensor=3)
    with pytest.raises(ValueError, match="only one mesh axis"):
        make_mesh(tensor=-1, fsdp=-1)
    with pytest.raises(ValueError, match="positive integer"):
        make_mesh(tensor=0)
