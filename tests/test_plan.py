"""`internlm-jax plan`: the compiled programs' memory as the library really compiles them, the
analytic FLOPs against XLA's count where XLA's count is exact, and TPU topologies (jax[tpu])."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference as ref
from hf_fixtures import run_python, tiny_config, write_hf_checkpoint

import internlm_jax as ij
from internlm_jax.generation import DecodeState, Generator, RowSampling, SamplingParams
from internlm_jax.plan import CHIPS, parse_topology, plan
from internlm_jax.settings import EngineSettings
from internlm_jax.sharding import named_sharding

CFG = ij.InternLM2Config.from_dict(tiny_config(num_attention_heads=4, num_key_value_heads=2, hidden_size=32))


def _have_libtpu() -> bool:
    try:
        import libtpu  # noqa: F401
        return True
    except ImportError:
        return False


needs_tpu_compiler = pytest.mark.skipif(not _have_libtpu(), reason="libtpu is not installed "
                                                                   "(pip install \"jax[tpu]\"): "
                                                                   "cannot compile for TPU topologies")


def _shard_bytes(arrays) -> int:
    return sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(arrays))


@pytest.mark.parametrize("axes", [dict(tensor=2, fsdp=4), dict(sequence=2, tensor=2, fsdp=2)],
                         ids=["tensor2xfsdp4", "seq2"])
def test_plan_memory_is_the_memory_of_the_programs_the_library_runs(axes):
    """Abstract lowering must give the very program a real model compiles: same memory analysis, and
    the plan's parameter and cache bytes equal the real per-device shards."""
    mesh = ij.make_mesh(**axes)
    b, context, new = 2, 40, 8
    p = plan(CFG, None, context=context, batch=b, mesh=axes, max_new_tokens=new, dtype="float32",
             programs=("prefill", "decode_step", "train_step"), remat="none")
    got = {x.name: x for x in p.programs}
    assert all(x.compiled for x in p.programs) and p.fits  # no chip: fits = compiled

    model = ij.InternLM2(CFG, mesh=mesh, seed=0)
    gen = Generator(model)
    batch = gen.prepare([list(range(3, 3 + context)), list(range(5, 25))])
    cache_len, last, base, order = gen.layout(batch.ids.shape[1], new)
    arrays = [batch.ids, batch.mask, batch.positions, np.broadcast_to(np.arange(batch.ids.shape[1]), batch.ids.shape)]
    if order is not None:
        arrays = [a[:, order] for a in arrays]
    ids, mask, pos, index = (gen.put(np.asarray(a, np.int32), ("batch", "seq")) for a in arrays)
    compiled = gen.prefill.lower(gen.state, gen.layers, ids, mask, pos, index, cache_len=cache_len, last=last).compile()
    m = compiled.memory_analysis()
    pre = got["prefill"]
    assert (pre.arguments, pre.outputs, pre.temporaries) == (m.argument_size_in_bytes, m.output_size_in_bytes,
                                                             m.temp_size_in_bytes)
    assert pre.parameters == _shard_bytes(gen.state)
    cache_sharding = compiled.output_shardings[1].keys[0]
    cshape = (b, CFG.num_key_value_heads, cache_len, CFG.head_dim)
    assert pre.cache == 2 * CFG.num_hidden_layers * math.prod(cache_sharding.shard_shape(cshape)) * 4

    logits, cache = gen.prefill(gen.state, gen.layers, ids, mask, pos, index, cache_len=cache_len, last=last)
    ds = DecodeState(logits, cache, gen.put(np.zeros(b, np.int32), ("batch",)),
                     gen.put(np.zeros((b, CFG.vocab_size), bool), ("batch", "act_vocab")),
                     gen.put(np.zeros(b, bool), ("batch",)), jnp.int32(0),
                     RowSampling.uniform(SamplingParams(), gen.row_keys(0, b), gen.put))
    m = gen.step.lower(gen.state, gen.layers, ds, jnp.int32(base), sampling=SamplingParams(),
                       stop_ids=(2,)).compile().memory_analysis()
    dec = got["decode_step"]
    assert (dec.arguments, dec.outputs, dec.aliased, dec.temporaries) == (
        m.argument_size_in_bytes, m.output_size_in_bytes, m.alias_size_in_bytes, m.temp_size_in_bytes)
    assert dec.aliased > 0 and dec.peak == dec.arguments + dec.outputs - dec.aliased + dec.temporaries + dec.code

    train = got["train_step"]  # f32 parameters + AdamW mu and nu (+ two step counters), per device
    assert 0 <= train.parameters - 3 * _shard_bytes(nnx_params(model)) <= 64


def nnx_params(model):
    from flax import nnx

    return nnx.state(model, nnx.Param)


BIG1 = ij.InternLM2Config.from_dict(tiny_config(num_hidden_layers=1, hidden_size=256, intermediate_size=1024,
                                        num_attention_heads=8, num_key_value_heads=2, vocab_size=512))


@pytest.mark.parametrize("program", ["prefill", "decode_step", "train_step"])
def test_analytic_flops_agree_with_xla_where_xla_counts_exactly(program):
    """XLA's cost analysis counts a loop body once; with one layer, one micro-batch and dense attention
    there is nothing to miss, so its FLOPs must match the analytic count the roofline uses."""
    p = plan(BIG1, None, context=256, batch=2, mesh=dict(fsdp=1), max_new_tokens=64, dtype="float32",
             programs=(program,), remat="none", suggest=False)
    (x,) = p.programs
    assert x.compiled and x.xla_flops > 0
    assert abs(x.flops - x.xla_flops) / x.xla_flops < 0.1, (x.flops, x.xla_flops)


def test_a_prompt_past_long_prompt_chunk_is_planned_by_its_chunk_program():
    """Past ``long_prompt_chunk`` tokens (and no sequence axis) generate prefills in chunks, so the plan
    compiles the chunk program: the cache is its (donated) argument, where the one-pass prefill makes it
    as its output, and the plan says so."""
    chunk = EngineSettings().long_prompt_chunk
    kw = dict(batch=1, mesh=dict(fsdp=1), max_new_tokens=8, dtype="float32", programs=("prefill",), suggest=False)
    one = plan(BIG1, None, context=chunk // 2, **kw)
    long = plan(BIG1, None, context=chunk + 512, **kw)
    (a,), (b,) = one.programs, long.programs
    assert a.compiled and b.compiled
    assert a.outputs >= a.cache > 0 and b.arguments >= b.parameters + b.cache and b.aliased >= b.cache
    assert any("chunks of" in n for n in long.notes) and not any("chunks of" in n for n in one.notes)


def test_parse_topology_names():
    assert parse_topology("v5e:4x4") == ("v5e", "4x4")
    assert parse_topology("v5e-16") == ("v5e", "4x4")
    assert parse_topology("v5litepod-8") == ("v5e", "2x4")
    assert parse_topology("v5p-8") == ("v5p", "2x2x1")  # v5p slices count TensorCores: 4 chips
    assert parse_topology("v5p-32") == ("v5p", "2x2x4")
    assert parse_topology("v4-8") == ("v4", "2x2x1")
    assert parse_topology("v6e-8") == ("v6e", "2x4")
    for bad in ("v5e-6", "v7-8", "v5e:2x2x2", "v5p:2x2", "tpu"):
        with pytest.raises(ValueError, match="topology"):
            parse_topology(bad)


@needs_tpu_compiler
@pytest.mark.parametrize("topology,hosts", [("v5e:2x2", 1), ("v5p:2x2x4", 4), ("v4-8", 1), ("v6e-8", 2)])
def test_all_programs_compile_for_tpu_topologies(topology, hosts):
    p = plan(CFG, topology, context=64, batch=2, mesh=dict(tensor=2), max_new_tokens=16, suggest=False)
    assert f"{hosts} host(s)" in p.target
    assert [x.name for x in p.programs] == ["prefill", "decode_step", "decode_loop", "train_step"]
    for x in p.programs:
        assert x.compiled and x.fits, x.error
        assert 0 < x.peak < CHIPS[parse_topology(topology)[0]].hbm_bytes and x.seconds > 0
    assert "fits: yes" in p.table()


@needs_tpu_compiler
def test_the_tpu_decode_loop_keeps_one_copy_of_the_cache():
    """The loop takes the cache donated: on TPU its compiled program aliases the cache to its outputs and
    needs far less than a cache's worth of temporaries (without the donation it held a second copy)."""
    cfg = CFG.replace(hidden_size=512, num_attention_heads=4, num_key_value_heads=2)  # head_dim 128: TPU tiles
    p = plan(cfg, "v5e:2x2", context=4000, batch=4, mesh=dict(tensor=2), max_new_tokens=64, programs=["decode_loop"],
             suggest=False)
    loop = p.programs[0]
    assert loop.compiled and loop.cache > 0
    assert loop.aliased >= loop.cache and loop.temporaries < loop.cache / 4


@needs_tpu_compiler
def test_too_big_is_reported_with_the_compilers_numbers_and_a_mesh_that_fits_is_found():
    """A 4-layer cut of 1.8B at 1.2M tokens with fsdp=4: a batch of 1 cannot split the 18 GiB cache over
    fsdp, so it does not fit a 16 GiB v5e; tensor=4 splits the 8 KV heads and does. (The full 24 layers
    at 200K tell the same story, with a decode step that takes six times longer to compile.)"""
    cfg = ij.InternLM2Config.preset("internlm2-chat-1_8b").replace(num_hidden_layers=4)
    p = plan(cfg, "v5e:2x2", context=1_200_000, batch=1, mesh=dict(fsdp=4), programs=("decode_step",), max_tries=3)
    assert not p.fits
    assert any("does not fit" in x.error or (x.compiled and x.peak > CHIPS["v5e"].hbm_bytes) for x in p.programs)
    assert p.suggestion is not None and p.suggestion.fits
    assert p.suggestion.mesh["tensor"] * p.suggestion.mesh["sequence"] >= 4
    assert "a mesh that fits:" in p.table()


def test_cli_plan_on_local_devices_as_json(tmp_path):
    folder = write_hf_checkpoint(tmp_path, tiny_config(), ref.random_state(tiny_config(), 0))
    r = run_python(["-m", "internlm_jax", "plan", "--model", str(folder), "--context", "48", "--devices", "8",
                    "--tensor", "2", "--programs", "prefill,decode_step", "--json"])
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["mesh"]["tensor"] == 2 and out["mesh"]["fsdp"] == 4
    assert [p["name"] for p in out["programs"]] == ["prefill", "decode_step"] and out["fits"]
    r = run_python(["-m", "internlm_jax", "plan", "--model", "no-such-model", "--context", "48"])
    assert r.returncode == 1 and "unknown preset 'no-such-model'" in r.stderr


@needs_tpu_compiler
def test_splash_kernel_compiles_into_the_tpu_prefill():
    """With attention_impl="splash" the TPU program of a ring prefill contains the Mosaic kernel, and its
    memory stays that of the blockwise path (the kernel replaces score blocks, not the cache)."""
    from internlm_jax.plan import tpu_devices
    from internlm_jax.ring import ring_attention

    devices, _ = tpu_devices("v5e:2x2")
    mesh = ij.make_mesh(sequence=2, tensor=2, fsdp=1, devices=devices)
    b, s, nh, nkv, d = 1, 1024, 4, 2, 128

    def spec(shape, dtype, axes):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=named_sharding(axes, shape, mesh))

    q = spec((b, s, nh, d), jnp.bfloat16, ("batch", "seq", "act_heads", None))
    kv = spec((b, s, nkv, d), jnp.bfloat16, ("batch", "seq", "act_kv_heads", None))
    idx = spec((b, s), jnp.int32, ("batch", "seq"))
    ok = spec((b, s), jnp.bool_, ("batch", "seq"))
    texts = {}
    for impl in ("splash", "blockwise"):
        f = jax.jit(lambda q, k, v, i, o: ring_attention(q, k, v, i, i, o, mesh, impl=impl))
        texts[impl] = f.lower(q, kv, kv, idx, ok).compile().as_text()
    assert "tpu_custom_call" in texts["splash"] and "tpu_custom_call" not in texts["blockwise"]
    p = plan("internlm2-chat-1_8b", "v5e:2x2", context=8192, mesh=dict(tensor=2, sequence=2), programs=("prefill",),
             attention_impl="splash", suggest=False)
    assert p.fits


@needs_tpu_compiler
def test_plan_example_runs():
    r = run_python(["examples/plan_tpu_slice.py", "--context", "4096"])
    assert r.returncode == 0, r.stderr
    assert "internlm2-chat-1_8b on v5e:2x4 (8 x TPU v5 lite" in r.stdout and "fits: yes" in r.stdout


def test_plan_defaults_to_the_models_context_and_names_bad_targets():
    p = plan(CFG, None, mesh=dict(fsdp=1), programs=["prefill"], max_new_tokens=4, dtype="float32", suggest=False)
    assert p.context == CFG.max_position_embeddings and p.programs[0].name == "prefill"
    with pytest.raises(ValueError, match="topology is empty"):
        plan(CFG, "  ", context=16)
    with pytest.raises(FileNotFoundError, match="no such checkpoint folder"):
        plan("/no/such/folder", None, context=16)
