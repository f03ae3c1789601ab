"""The ragged decode kernels (Pallas TPU, and Pallas Triton for GPUs): numerics in the Pallas interpreter
against dense attention, the library's decode steps through them, the Mosaic compilation for TPU
topologies and the lowering of the GPU kernel to Triton."""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_plan import needs_tpu_compiler

import internlm_jax as ij
from internlm_jax.attention import dense_attention
from internlm_jax.decode_kernel import ragged_decode_attention, ragged_decode_attention_gpu, supported, supported_on
from internlm_jax.generation import Generator, SamplingParams
from internlm_jax.ring import pallas_interpret

# head_dim 128 (what the kernel takes), GQA 2:1
CFG = ij.InternLM2Config(vocab_size=128, hidden_size=512, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)


def _case(b, t, nkv, g, seed, block=512):
    """Random q/k/v, a ragged valid-slot mask (left padding, a hole, an unwritten tail), and the cache
    poisoned with NaN in every block the kernel must not read, with huge finite values in the masked
    slots of blocks it does read."""
    r = np.random.default_rng(seed)
    q = r.standard_normal((b, nkv, g, 128)).astype(np.float32)
    k = r.standard_normal((b, t, nkv, 128)).astype(np.float32)
    v = r.standard_normal((b, t, nkv, 128)).astype(np.float32)
    ok = np.zeros((b, t), bool)
    for i in range(b):
        lo = int(r.integers(0, t - 1))
        hi = int(r.integers(lo + 1, t + 1))
        ok[i, lo:hi] = True
    if t > 40:
        ok[0, 5:40] = False  # a hole (a sequence shard's slots are not contiguous)
        ok[0, 40] = True
    bt = min(block, t)
    for i in range(b):
        idx = np.nonzero(ok[i])[0]
        read = np.zeros(t, bool)
        read[idx[0] // bt * bt:(idx[-1] // bt + 1) * bt] = True
        k[i, ~read], v[i, ~read] = np.nan, np.nan
        k[i, read & ~ok[i]], v[i, read & ~ok[i]] = 3e4, -3e4
    return q, k, v, ok


def _slots(x):
    """[B, T, nKV, D] test arrays in the cache layout [B, nKV, T, D]."""
    return jnp.asarray(np.ascontiguousarray(np.swapaxes(x, 1, 2)))


def _dense(q, k, v, ok):
    b, nkv, g, d = q.shape
    clean = lambda x: np.where(ok[..., None, None], x, 0.0)  # noqa: E731
    out = dense_attention(jnp.asarray(q.reshape(b, 1, nkv * g, d)), jnp.asarray(clean(k)), jnp.asarray(clean(v)),
                          jnp.asarray(ok)[:, None, :])
    scores = np.einsum("bngd,btnd->bngt", q.astype(np.float64), clean(k).astype(np.float64)) / math.sqrt(d)
    scores = np.where(ok[:, None, None], scores, -np.inf)
    m = scores.max(-1, keepdims=True)
    lse = (m + np.log(np.exp(scores - m).sum(-1, keepdims=True)))[..., 0]
    return np.asarray(out).reshape(b, nkv, g, d), lse


def _rel(a, b):
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


@pytest.mark.parametrize("b,t,nkv,g", [(3, 1024, 2, 3), (2, 128, 1, 1), (1, 2048, 2, 8)])
def test_kernel_equals_dense_attention_in_float32(b, t, nkv, g):
    q, k, v, ok = _case(b, t, nkv, g, seed=t + g)
    out, lse = ragged_decode_attention(jnp.asarray(q), _slots(k), _slots(v), jnp.asarray(ok), interpret=True)
    want, want_lse = _dense(q, k, v, ok)
    assert np.isfinite(np.asarray(out)).all()  # no NaN block was read
    assert _rel(out, want) < 1e-5
    assert np.abs(np.asarray(lse) - want_lse).max() < 1e-4


def test_kernel_in_bfloat16_is_close_to_the_float32_reference():
    q, k, v, ok = _case(2, 1024, 2, 4, seed=3)
    bf = lambda x: jnp.asarray(x, jnp.bfloat16)  # noqa: E731
    out, _ = ragged_decode_attention(bf(q), _slots(k).astype(jnp.bfloat16), _slots(v).astype(jnp.bfloat16),
                                     jnp.asarray(ok), interpret=True)
    rounded = [np.asarray(bf(x), np.float32) for x in (q, k, v)]
    want, _ = _dense(*rounded, ok)
    assert out.dtype == jnp.float32 and _rel(out, want) < 1e-2


def test_a_sequence_with_no_valid_slot_gets_zeros_and_minus_infinity():
    q, k, v, ok = _case(2, 256, 1, 2, seed=1)
    ok[1] = False
    k[1], v[1] = np.nan, np.nan
    out, lse = ragged_decode_attention(jnp.asarray(q), _slots(k), _slots(v), jnp.asarray(ok), interpret=True)
    assert (np.asarray(out)[1] == 0).all() and np.isneginf(np.asarray(lse)[1]).all()
    assert np.isfinite(np.asarray(out)[0]).all()


def test_bad_shapes_and_platforms_are_refused_by_name():
    q = jnp.zeros((1, 2, 2, 128))
    with pytest.raises(ValueError, match="disagree"):
        ragged_decode_attention(q, jnp.zeros((1, 1, 256, 128)), jnp.zeros((1, 1, 256, 128)), jnp.ones((1, 256), bool))
    with pytest.raises(ValueError, match="head_dim % 128"):
        ragged_decode_attention(jnp.zeros((1, 1, 1, 64)), jnp.zeros((1, 1, 256, 64)), jnp.zeros((1, 1, 256, 64)),
                                jnp.ones((1, 256), bool))
    assert supported(128, 4096) and not supported(64, 4096) and not supported(128, 96)
    with pytest.raises(ValueError, match="Pallas TPU kernel; it cannot run on gpu"):
        pallas_interpret("gpu", "ragged")
    model = ij.InternLM2(CFG)
    with pytest.raises(ValueError, match="unknown decode_attention 'paged'"):
        model.configure(decode_attention="paged")


@pytest.mark.parametrize("b,t,nkv,g,splits", [(3, 1024, 2, 3, 4), (2, 128, 1, 1, 0), (1, 512, 1, 20, 8)])
def test_gpu_kernel_equals_dense_attention_in_float32(b, t, nkv, g, splits):
    """The Triton kernel in the Pallas interpreter: left padding, a hole, an unwritten tail, split-K, more
    query heads per KV head than one 16-row tile; blocks outside each sequence's valid range hold NaN."""
    q, k, v, ok = _case(b, t, nkv, g, seed=t + g, block=64)
    out, lse = ragged_decode_attention_gpu(jnp.asarray(q), _slots(k), _slots(v), jnp.asarray(ok), splits=splits,
                                           interpret=True)
    want, want_lse = _dense(q, k, v, ok)
    assert np.isfinite(np.asarray(out)).all()
    assert _rel(out, want) < 1e-5
    assert np.abs(np.asarray(lse) - want_lse).max() < 1e-4


def test_gpu_kernel_edge_cases_bfloat16_and_an_empty_sequence():
    q, k, v, ok = _case(2, 256, 2, 4, seed=5, block=64)
    ok[1] = False
    k[1], v[1] = np.nan, np.nan
    out, lse = ragged_decode_attention_gpu(jnp.asarray(q), _slots(k), _slots(v), jnp.asarray(ok), interpret=True)
    assert (np.asarray(out)[1] == 0).all() and np.isneginf(np.asarray(lse)[1]).all()
    bf = lambda x: jnp.asarray(np.nan_to_num(x), jnp.bfloat16)  # noqa: E731
    out16, _ = ragged_decode_attention_gpu(bf(q), _slots(bf(k)), _slots(bf(v)), jnp.asarray(ok), interpret=True)
    want, _ = _dense(*[np.asarray(bf(x), np.float32) for x in (q, k, v)], ok)
    assert out16.dtype == jnp.float32 and _rel(np.asarray(out16)[0], want[0]) < 1e-2
    with pytest.raises(ValueError, match="head_dim in 16..256"):
        ragged_decode_attention_gpu(jnp.zeros((1, 1, 1, 96)), jnp.zeros((1, 1, 64, 96)), jnp.zeros((1, 1, 64, 96)),
                                    jnp.ones((1, 64), bool), interpret=True)


def test_gpu_kernel_lowers_to_triton_and_reads_the_cache_in_place():
    """Lowered for CUDA from this CPU host (Pallas emits the Triton module here; compiling it needs a
    GPU): one Triton call, and the cache buffers reach it without a transpose or copy."""
    # jax 0.11 lowers Pallas for a GPU only inside a mesh that names one (0.10 needs none and accepts it)
    h100 = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="gpu")
    gpu_mesh = jax.sharding.AbstractMesh((1,), ("x",), axis_types=(jax.sharding.AxisType.Auto,), abstract_device=h100)
    for dtype in (jnp.bfloat16, jnp.float32):
        q = jax.ShapeDtypeStruct((2, 8, 4, 128), dtype)
        cache = jax.ShapeDtypeStruct((2, 8, 4096, 128), dtype)
        ok = jax.ShapeDtypeStruct((2, 4096), jnp.bool_)
        with jax.sharding.use_abstract_mesh(gpu_mesh):
            lowered = jax.jit(ragged_decode_attention_gpu).trace(q, cache, cache, ok).lower(
                lowering_platforms=("cuda",))
        text = lowered.as_text()
        assert text.count("__gpu$xla.gpu.triton") == 1
        assert re.search(r"xla\.gpu\.triton\([^)]*%arg1, %arg2", text)  # the cache arguments themselves


def test_the_selector_takes_the_gpu_kernel_only_when_asked(monkeypatch):
    """On a GPU, ``decode_attention="ragged"`` picks the Triton kernel where its shapes fit; ``"auto"``
    stays dense there until the kernel is timed on a GPU; TPU's rule is unchanged."""
    from internlm_jax import attention
    from internlm_jax.settings import EngineSettings

    assert supported_on("gpu", 128, 4096) and supported_on("gpu", 64, 48) and not supported_on("gpu", 96, 4096)
    assert not supported_on("gpu", 128, 100) and not supported_on("rocm", 128, 4096)
    for platform, choice, head_dim, want in (("gpu", "ragged", 128, "ragged"), ("gpu", "auto", 128, "dense"),
                                             ("gpu", "ragged", 96, "dense"), ("tpu", "auto", 128, "ragged"),
                                             ("cpu", "auto", 128, "dense")):
        monkeypatch.setattr(attention, "platform_of", lambda mesh, p=platform: p)
        got = attention.decode_plan(EngineSettings(decode_attention=choice), head_dim=head_dim, local_cache_len=4096,
                                    mesh=None)
        assert got == want, (platform, choice, head_dim)


def _decode_logits(model, prompts, steps=3):
    """Logits of a few decode steps after a prefill (float32, [steps, B, V])."""
    gen = Generator(model)
    ds, base = gen.start(gen.prepare(prompts), 8)
    out = []
    for _ in range(steps):
        ds, *_ = gen.step(gen.state, gen.layers, ds, base, sampling=SamplingParams(), stop_ids=())
        out.append(np.asarray(ds.logits))
    return np.stack(out)


@pytest.mark.parametrize("axes", [None, dict(tensor=2, fsdp=4), dict(sequence=2, tensor=2, fsdp=2)],
                         ids=["no-mesh", "tensor2xfsdp4", "sequence2xtensor2xfsdp2"])
def test_decode_steps_through_the_kernel_equal_the_dense_path(axes):
    """The library's decode step with ``decode_attention="ragged"`` (Pallas interpreter): the same float32 logits
    as the dense path, for prompts of very different lengths (one mostly padding), on and off a mesh,
    with the cache slots split over ``sequence``."""
    mesh = None if axes is None else ij.make_mesh(**axes)
    model = ij.InternLM2(CFG, mesh=mesh, seed=1)
    prompts = [list(np.random.RandomState(5).randint(3, 128, 600)), list(np.random.RandomState(6).randint(3, 128, 20))]
    want = _decode_logits(model, prompts)
    want_ids = ij.generate_ids(model, prompts, max_new_tokens=4, stop_ids=())
    model.configure(decode_attention="ragged")
    gen = Generator(model)
    assert model.decode_attention(gen.layout(gen.prompt_length(600), 8)[0]) == "ragged"
    assert _rel(_decode_logits(model, prompts), want) < 1e-5
    assert ij.generate_ids(model, prompts, max_new_tokens=4, stop_ids=()) == want_ids  # the on-device loop too


@needs_tpu_compiler
@pytest.mark.parametrize("topology,axes", [("v5e:2x2", dict(tensor=2, fsdp=2)), ("v6e:2x2", dict(sequence=2, tensor=2)),
                                           ("v4:2x2x1", dict(tensor=2, fsdp=2)), ("v5p:2x2x1", dict(fsdp=4))])
def test_the_decode_step_compiles_with_the_mosaic_kernel_for_tpu(topology, axes):
    """The library's decode step, lowered from abstract sharded inputs for a TPU topology: with
    ``decode_attention="ragged"`` the program holds the Mosaic kernel, with "dense" it does not."""
    from internlm_jax.cache import KVCache
    from internlm_jax.generation import DecodeState
    from internlm_jax.plan import tpu_devices

    devices, _ = tpu_devices(topology)
    mesh = ij.make_mesh(devices=devices, **{"fsdp": 1, **axes})
    b, t = 2, 2048
    cache = KVCache.abstract(CFG, b, t, jnp.bfloat16, mesh)
    scalar = jax.ShapeDtypeStruct((), jnp.int32)
    ds = DecodeState.abstract(CFG, b, cache, mesh)
    texts = {}
    for impl in ("ragged", "dense"):
        model = ij.InternLM2.abstract(CFG, mesh=mesh, dtype="bfloat16").configure(decode_attention=impl)
        gen = Generator(model)
        texts[impl] = gen.step.lower(gen.state, None, ds, scalar, sampling=SamplingParams(),
                                     stop_ids=()).compile().as_text()
    assert "tpu_custom_call" in texts["ragged"] and "tpu_custom_call" not in texts["dense"]
