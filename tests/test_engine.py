"""The engine: settings, the attention selector, one-device blockwise prefill, the KV cache type and
the decode drivers (chunk and step)."""

import dataclasses
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import internlm_jax as ij
from internlm_jax.attention import PrefillPlan, blockwise_attention, dense_attention, prefill_plan
from internlm_jax.cache import KVCache, heads_view
from internlm_jax.generation import SamplingParams, default_stop_ids, generator_for
from internlm_jax.model import FEW_ROWS
from internlm_jax.settings import EngineSettings

CFG = ij.InternLM2Config(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_settings_are_frozen_and_validated():
    s = EngineSettings()
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.attention = "dense"
    for field, bad in (("attention", "flash"), ("decode_attention", "paged"), ("decode_weights", "copied"),
                       ("remat", "some")):
        with pytest.raises(ValueError, match=f"unknown {field} {bad!r}"):
            EngineSettings(**{field: bad})
    with pytest.raises(ValueError, match="decode_chunk must be a positive integer"):
        EngineSettings(decode_chunk=0)
    with pytest.raises(ValueError, match=r"unknown engine setting\(s\) \['attention_impl'\]"):
        s.replace(attention_impl="splash")
    model = ij.InternLM2(CFG)
    gen = generator_for(model)
    model.configure(decode_chunk=4)
    assert generator_for(model) is not gen and generator_for(model).settings.decode_chunk == 4


def test_the_selector_picks_by_length_mesh_backend_and_dtype():
    s = EngineSettings(blockwise_from=1024)
    assert prefill_plan(s, length=1024, mesh=None, dtype=jnp.float32).path == "dense"
    assert prefill_plan(s, length=1025, mesh=None, dtype=jnp.float32) == prefill_plan(
        s.replace(attention="splash"), length=1025, mesh=None, dtype=jnp.float32)  # splash needs a mesh
    assert prefill_plan(s, length=1025, mesh=None, dtype=jnp.float32).path == "blockwise"
    assert prefill_plan(s, length=1025, mesh=None, dtype=jnp.float32, segments=True).path == "blockwise"
    assert prefill_plan(s.replace(attention="dense"), length=10**6, mesh=None, dtype=jnp.float32).path == "dense"
    mesh = ij.make_mesh(fsdp=4, tensor=2)
    assert prefill_plan(s, length=1025, mesh=mesh, dtype=jnp.float32).path == "ring"
    seq = ij.make_mesh(sequence=2, fsdp=4)
    plan = prefill_plan(s, length=16, mesh=seq, dtype=jnp.bfloat16)
    assert (plan.path, plan.kernel) == ("ring", "blockwise")  # CPU: no cuDNN
    # one fused kernel call: cuDNN at any length, XLA's kernel while its [S, S] scores are small;
    # never over a caller's key mask or packed segments
    cudnn, xla = s.replace(attention="cudnn"), s.replace(attention="xla")
    assert prefill_plan(cudnn, length=10**6, mesh=None, dtype=jnp.bfloat16) == PrefillPlan("fused", "cudnn")
    assert prefill_plan(cudnn, length=16, mesh=None, dtype=jnp.bfloat16) == PrefillPlan("fused", "cudnn")
    assert prefill_plan(xla, length=1024, mesh=None, dtype=jnp.float32) == PrefillPlan("fused", "xla")
    assert prefill_plan(xla, length=1025, mesh=None, dtype=jnp.float32) == PrefillPlan("blockwise", "xla")
    assert prefill_plan(cudnn, length=10**6, mesh=None, dtype=jnp.bfloat16, key_mask=True).path == "blockwise"
    assert prefill_plan(cudnn, length=16, mesh=None, dtype=jnp.bfloat16, segments=True).path == "dense"
    assert prefill_plan(cudnn, length=10**6, mesh=mesh, dtype=jnp.bfloat16).path == "ring"


def test_the_fused_call_equals_dense_attention_on_right_padded_rows():
    """One jax.nn.dot_product_attention call (XLA's kernel here, cuDNN's on a GPU) over right-padded
    rows with GQA, against dense attention with the same keys masked; padding rows come back zero."""
    from internlm_jax.attention import fused_attention

    r = np.random.default_rng(0)
    b, s, nh, nkv, d = 3, 40, 4, 2, 16
    q, k, v = (jnp.asarray(r.standard_normal((b, s, h, d)), jnp.float32) for h in (nh, nkv, nkv))
    lengths = np.array([40, 23, 1])
    valid = np.arange(s)[None] < lengths[:, None]
    mask = np.tril(np.ones((s, s), bool))[None] & valid[:, None, :]
    want = np.asarray(dense_attention(q, k, v, jnp.asarray(mask)))
    got = np.asarray(fused_attention(q, k, v, jnp.asarray(lengths), implementation="xla"))
    assert _rel(got[valid], want[valid]) < 1e-6
    assert not got[~valid].any()


def test_a_fused_prefill_right_pads_each_prompt_and_matches_the_dense_path():
    """Under the fused path the generator puts each prompt's tokens at slots 0..n-1 (padding after,
    invalid); the first logits (f32, 1e-5) and greedy tokens of a batch of different lengths equal the
    dense path's, whose prompts are left-padded. The plain forward takes the fused call too, but not
    over a caller's attention mask."""
    fused = ij.InternLM2(CFG, seed=3).configure(attention="xla")
    dense = ij.InternLM2(CFG, seed=3).configure(attention="dense")
    r = np.random.RandomState(2)
    prompts = [list(r.randint(3, CFG.vocab_size, 30)), list(r.randint(3, CFG.vocab_size, 7)), [5]]
    first = {}
    for name, model in (("fused", fused), ("dense", dense)):
        gen = generator_for(model)
        ds, base = gen.start(gen.prepare(prompts), max_new_tokens=5)
        first[name] = np.asarray(ds.logits)
        valid = np.asarray(ds.cache.valid)[:, :32]
        if name == "fused":
            assert gen.prefill_path(32) == "fused"
            assert valid.tolist() == [[j < n for j in range(32)] for n in (30, 7, 1)]
        else:
            assert valid.tolist() == [[j >= 32 - n for j in range(32)] for n in (30, 7, 1)]
    assert _rel(first["fused"], first["dense"]) < 1e-5
    kw = dict(max_new_tokens=8, stop_ids=())
    assert ij.generate_ids(fused, prompts, **kw) == ij.generate_ids(dense, prompts, **kw)
    ids = r.randint(0, CFG.vocab_size, (2, 50))
    assert fused.prefill_plan(50).path == "fused"
    assert _rel(fused(ids), dense(ids)) < 1e-5
    mask = np.ones((2, 50), np.int32)
    mask[1, :20] = 0
    assert fused.prefill_plan(50, key_mask=True).path == "dense"
    assert _rel(np.asarray(fused(ids, attention_mask=mask))[mask == 1],
                np.asarray(dense(ids, attention_mask=mask))[mask == 1]) < 1e-5


def test_blockwise_attention_equals_dense_attention():
    """The one-device block schedule against dense attention, with left padding, GQA and a padded row."""
    r = np.random.default_rng(0)
    b, s, nh, nkv, d = 2, 96, 4, 2, 16
    q, k, v = (jnp.asarray(r.standard_normal((b, s, h, d)), jnp.float32) for h in (nh, nkv, nkv))
    valid = np.ones((b, s), bool)
    valid[1, :37] = False
    mask = np.tril(np.ones((s, s), bool))[None] & valid[:, None, :]
    want = np.asarray(dense_attention(q, k, v, jnp.asarray(mask)))
    got = np.asarray(blockwise_attention(q, k, v, jnp.asarray(valid), block=32))
    real = valid[:, :, None, None] & np.ones_like(want, bool)  # rows of padding queries are don't-care
    assert _rel(got[real], want[real]) < 1e-6
    with pytest.raises(ValueError, match="not a multiple of the block 64"):
        blockwise_attention(q, k, v, jnp.asarray(valid), block=64)


def _segment_starts(seg):
    """Where each token's packed document starts, from segment ids (as the model derives it)."""
    b, s = seg.shape
    idx = np.broadcast_to(np.arange(s), (b, s))
    boundary = np.concatenate([np.ones((b, 1), bool), seg[:, 1:] != seg[:, :-1]], axis=1)
    return np.maximum.accumulate(np.where(boundary, idx, 0), axis=1)


def test_blockwise_attention_takes_segments_and_its_gradient_equals_dense():
    """Packed documents, left padding and GQA through the one-device block schedule: the output and the
    gradients of q, k and v (its flash backward) equal dense attention's (float32, 1e-5 relative)."""
    from internlm_jax.attention import visible_mask

    r = np.random.default_rng(0)
    b, s, nh, nkv, d = 2, 128, 4, 2, 16
    q, k, v = (jnp.asarray(r.standard_normal((b, s, h, d)), jnp.float32) for h in (nh, nkv, nkv))
    valid = np.ones((b, s), bool)
    valid[1, :37] = False
    seg = np.zeros((b, s), np.int32)
    seg[0, 50:], seg[0, 90:], seg[1, 70:] = 1, 2, 1  # boundaries inside blocks and across them
    start = _segment_starts(seg)
    idx = np.broadcast_to(np.arange(s), (b, s))
    mask = visible_mask(jnp.asarray(idx), jnp.asarray(start), jnp.asarray(idx), jnp.asarray(valid), True)
    cot = jnp.asarray(r.standard_normal((b, s, nh, d)), jnp.float32)
    real = jnp.asarray(valid)[:, :, None, None]  # rows of padding queries are don't-care

    def dense(q, k, v):
        return jnp.sum(jnp.where(real, dense_attention(q, k, v, mask), 0) * cot)

    def blocks(q, k, v):
        out = blockwise_attention(q, k, v, jnp.asarray(valid), block=32, q_start=jnp.asarray(start))
        return jnp.sum(jnp.where(real, out, 0) * cot)

    want = np.asarray(dense_attention(q, k, v, mask))
    got = np.asarray(blockwise_attention(q, k, v, jnp.asarray(valid), block=32, q_start=jnp.asarray(start)))
    keep = np.broadcast_to(valid[:, :, None, None], want.shape)
    assert _rel(got[keep], want[keep]) < 1e-5
    for g_blocks, g_dense in zip(jax.grad(blocks, (0, 1, 2))(q, k, v), jax.grad(dense, (0, 1, 2))(q, k, v)):
        assert _rel(g_blocks, g_dense) < 1e-5


def test_one_device_training_over_blockwise_from_is_blockwise_and_exact():
    """Packed training sequences longer than ``blockwise_from`` on one device: the loss gradient through
    the blockwise path equals the dense model's (float32, 1e-5), and the compiled gradient's temporaries
    grow linearly with the length (dense attention kept [S, S] scores: 1.5 GiB at 8K tokens, 6 GiB at 16K
    for this 2-head layer)."""
    from flax import nnx

    r = np.random.RandomState(4)
    s = 300
    ids = jnp.asarray(r.randint(0, CFG.vocab_size, (2, s)))
    seg = np.zeros((2, s), np.int32)
    seg[0, 100:], seg[0, 230:], seg[1, 64:] = 1, 2, 1
    grads = {}
    for name, settings in (("blocks", dict(blockwise_from=64, block=64)), ("dense", dict(attention="dense"))):
        model = ij.InternLM2(CFG, seed=3).configure(**settings)
        graphdef, state = nnx.split(model)

        def loss(st, graphdef=graphdef):
            h = nnx.merge(graphdef, st).final_hidden(ids, segment_ids=jnp.asarray(seg))
            return jnp.mean(jnp.sin(h))

        grads[name] = jax.tree.leaves(jax.grad(loss)(state))
        assert model.prefill_plan(s, segments=True).path == ("blockwise" if name == "blocks" else "dense")
    for a, b in zip(grads["blocks"], grads["dense"]):
        assert _rel(a, b) < 1e-5 if np.any(b) else not np.any(a)  # the unused output layer: zeros

    cfg = CFG.replace(num_attention_heads=2, num_key_value_heads=1, hidden_size=32, num_hidden_layers=1,
                      max_position_embeddings=16384)
    graphdef, state = nnx.split(ij.InternLM2(cfg, seed=0))
    temp = {}
    for n in (8192, 16384):
        tokens = jnp.zeros((1, n), jnp.int32)
        segments = jnp.asarray(np.arange(n) >= n // 3, jnp.int32)[None]
        grad = jax.jit(jax.grad(lambda st, x, sg: jnp.mean(nnx.merge(graphdef, st).final_hidden(x, segment_ids=sg))))
        temp[n] = grad.lower(state, tokens, segments).compile().memory_analysis().temp_size_in_bytes
    assert temp[16384] < 2.5 * temp[8192] and temp[16384] < 256 << 20, temp


def test_one_device_long_prefill_equals_the_dense_result():
    """A prompt longer than ``blockwise_from`` on one device (no mesh) takes the blockwise path and gives
    the dense logits (float32, 1e-5 relative), left-padded batch included; greedy tokens agree too."""
    long = ij.InternLM2(CFG, seed=3).configure(blockwise_from=64, block=64)
    dense = ij.InternLM2(CFG, seed=3).configure(attention="dense")
    assert long.prefill_plan(300).path == "blockwise" and dense.prefill_plan(300).path == "dense"
    r = np.random.RandomState(1)
    ids = r.randint(0, CFG.vocab_size, (2, 300))
    mask = np.ones((2, 300), np.int32)
    mask[1, :123] = 0
    pos = np.where(mask == 1, np.cumsum(mask, 1) - 1, 1)
    jaxpr = str(jax.make_jaxpr(lambda x: long.forward(x, positions=pos, attention_mask=mask))(jnp.asarray(ids)))
    assert "300,300" not in jaxpr and "320,320" not in jaxpr  # no [S, S] scores anywhere
    got = long(ids, positions=pos, attention_mask=mask)
    want = dense(ids, positions=pos, attention_mask=mask)
    keep = mask.astype(bool)
    assert _rel(np.asarray(got)[keep], np.asarray(want)[keep]) < 1e-5
    prompts = [list(r.randint(3, CFG.vocab_size, 150)), list(r.randint(3, CFG.vocab_size, 40))]
    kw = dict(max_new_tokens=5, stop_ids=())
    assert generator_for(long).prompt_length(150) % 64 == 0
    assert ij.generate_ids(long, prompts, **kw) == ij.generate_ids(dense, prompts, **kw)


def test_a_long_prompt_batch_prefilled_in_chunks_equals_one_pass():
    """Past ``long_prompt_chunk`` tokens, ``generate`` prefills each row chunk by chunk into the cache (the
    one-pass prefill program is not run): the first logits equal the one-pass ones (float32, 1e-5
    relative) for a left-padded batch whose longest prompt runs past max_position_embeddings under
    dynamic NTK (the base is the longest prompt's, as in one pass), with dense and key-blocked chunks;
    the greedy tokens are the same."""
    cfg = CFG.replace(max_position_embeddings=128, rope_scaling={"type": "dynamic", "factor": 4.0})
    rng = np.random.RandomState(0)
    prompts = [list(rng.randint(3, 128, n)) for n in (300, 37, 130)]

    def run(**settings):
        m = ij.InternLM2(cfg, seed=1).configure(**settings)
        gen = generator_for(m)
        batch = gen.prepare(prompts)
        if settings.get("long_prompt_chunk"):
            gen.prefill = None  # the chunked path must not need it
        ds, _ = gen.start(batch, max_new_tokens=8)
        return np.asarray(ds.logits), ij.generate_ids(m, prompts, max_new_tokens=10, stop_ids=(), max_length=512)

    for blocks in ({}, {"blockwise_from": 64, "block": 32}):
        want, want_tokens = run(long_prompt_chunk=0, **blocks)
        for chunk in (64, 100):
            got, tokens = run(long_prompt_chunk=chunk, **blocks)
            assert _rel(got, want) < 1e-5, (blocks, chunk)
            assert tokens == want_tokens, (blocks, chunk)


def test_a_long_prompt_chunk_needs_the_memory_of_one_chunk():
    """The chunk program's scratch stays that of one chunk however long the row (key blocks past
    ``blockwise_from``), where a one-pass prefill's grows with the prompt: at 8192 tokens the one pass
    needs more than 4x a 512-token chunk at the end of the row (a model whose MLP activations, not the
    4-head scores, dominate, as in the real shapes)."""
    model = ij.InternLM2(CFG.replace(hidden_size=256, intermediate_size=1024, max_position_embeddings=8192), seed=0)
    gen = generator_for(model)
    ids = jax.ShapeDtypeStruct((512,), jnp.int32)

    def chunk_scratch(keys):
        cache = KVCache.abstract(model.config, 1, 8192, jnp.float32)
        return gen.extend.lower(gen.state, gen.layers, cache, ids, ids, 0, keys - 512, 512, keys, ids,
                                logprobs=-1, keys=keys).compile().memory_analysis().temp_size_in_bytes

    s = gen.prompt_length(8192)
    one = jax.ShapeDtypeStruct((1, s), jnp.int32)
    one_pass = gen.prefill.lower(gen.state, gen.layers, one, one, one, one, cache_len=8192 + 512,
                                 last=s - 1).compile().memory_analysis().temp_size_in_bytes
    assert chunk_scratch(8192) < 1.25 * chunk_scratch(4096 + 512)
    assert one_pass > 4 * chunk_scratch(8192)


def test_a_64k_prompt_on_one_cpu_device_runs_in_little_memory():
    """65,536 tokens through a one-device forward with no mesh: the compiled program's temporaries stay
    well under a GB (dense scores would need 4 heads x 64K x 64K x 4 bytes = 64 GiB per layer), and it runs."""
    cfg = CFG.replace(num_attention_heads=2, num_key_value_heads=1, hidden_size=32, max_position_embeddings=65536,
                      num_hidden_layers=1)  # one layer shows the memory; more only repeat it
    model = ij.InternLM2(cfg, seed=0)
    s = 65536
    ids = jnp.asarray(np.random.RandomState(0).randint(0, cfg.vocab_size, (1, s)), jnp.int32)
    from flax import nnx

    graphdef, state = nnx.split(model)
    last = jax.jit(lambda st, x: nnx.merge(graphdef, st).forward(x)[:, -1])
    compiled = last.lower(state, ids).compile()
    mem = compiled.memory_analysis()
    assert mem.temp_size_in_bytes < 1 << 30, mem.temp_size_in_bytes
    out = np.asarray(compiled(state, ids))
    assert out.shape == (1, cfg.vocab_size) and np.isfinite(out).all()


def test_the_cache_is_one_buffer_per_layer_in_the_declared_layout():
    model = ij.InternLM2(CFG, seed=0)
    gen = generator_for(model)
    ds, base = gen.start(gen.prepare([[3, 4, 5], [6] * 9]), max_new_tokens=5)
    cache = ds.cache
    like = KVCache.abstract(CFG, 2, cache.length, jnp.float32)
    assert jax.tree.structure(cache) == jax.tree.structure(like)
    assert all(a.shape == b.shape for a, b in zip(jax.tree.leaves(cache), jax.tree.leaves(like)))
    assert cache.nbytes == 2 * CFG.num_hidden_layers * 2 * CFG.num_key_value_heads * cache.length * CFG.head_dim * 4
    # the prompt's keys sit at slots 0..15 (left-padded to the 16 bucket), nothing after
    assert np.asarray(cache.valid)[0].tolist() == [False] * 13 + [True] * 3 + [False] * (cache.length - 16)
    assert cache.keys[0].shape == (2 * CFG.num_key_value_heads, cache.length, CFG.head_dim)  # one device: merged
    keys = np.asarray(heads_view(cache.keys[0], CFG.num_key_value_heads))
    assert not keys[:, :, 16:].any() and keys[0, :, 13:16].any()


@pytest.mark.parametrize("batch", [1, 3])
def test_a_decode_step_moves_the_weights_and_the_cache_once(batch):
    """XLA's own count of the bytes a compiled decode step touches, at two cache lengths: growing the
    cache by X bytes costs at most 1.3 X (it is read once where it lies, the new slot written in place:
    no per-layer copy or transpose of a buffer), and the rest stays within 1.3 x the weights. The
    program text holds no copy of a whole cache buffer."""
    from internlm_jax.generation import DecodeState

    cfg = CFG.replace(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
                      num_hidden_layers=3)
    model = ij.InternLM2.abstract(cfg)
    gen = generator_for(model)
    spec = jax.ShapeDtypeStruct
    out = []
    for t in (512, 4096):
        cache = KVCache.abstract(cfg, batch, t, jnp.float32)
        ds = DecodeState.abstract(cfg, batch, cache)
        compiled = gen.step.lower(gen.state, gen.abstract_layers(), ds, spec((), jnp.int32),
                                  sampling=SamplingParams(), stop_ids=()).compile()
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        buffer = ",".join(map(str, cache.keys[0].shape))
        copies = [line for line in compiled.as_text().splitlines() if f"[{buffer}]" in line and " copy(" in line]
        assert not copies, copies[:3]
        out.append((cost["bytes accessed"], cache.nbytes))
    (b0, c0), (b1, c1) = out
    weights = 4 * model.num_parameters()
    assert (b1 - b0) / (c1 - c0) <= 1.3
    assert b0 - (b1 - b0) / (c1 - c0) * c0 <= 1.3 * weights


def test_decode_chunks_and_single_steps_make_the_same_tokens_and_stop_alike():
    """max_new_tokens that is not a multiple of the chunk, a stop id reached mid-chunk, sampling: the
    chunked driver (generate_ids) and the single-step driver agree token for token."""
    model = ij.InternLM2(CFG, seed=2).configure(decode_chunk=4)
    prompts = [[3, 4, 5, 6], [7] * 11]
    full = ij.generate_ids(model, prompts, max_new_tokens=10, stop_ids=())
    assert [len(x) for x in full] == [10, 10]
    stop = full[1][5]
    stopped = ij.generate_ids(model, prompts, max_new_tokens=10, stop_ids=(stop,))
    for seq, whole in zip(stopped, full):
        assert seq == whole[:whole.index(stop) + 1] if stop in whole else seq == whole
    gen = generator_for(model)
    sampling = SamplingParams(temperature=0.9, top_k=20)
    want = ij.generate_ids(model, prompts, max_new_tokens=7, temperature=0.9, top_k=20, seed=5, stop_ids=())
    ds, base = gen.start(gen.prepare(prompts), 7, seed=5, sampling=sampling)
    steps = []
    for _ in range(7):
        ds, tok, _, _ = gen.step(gen.state, gen.layers, ds, base, sampling=sampling, stop_ids=())
        steps.append(np.asarray(tok))
    assert np.stack(steps, 1).tolist() == want


@pytest.mark.parametrize("bias,tied", [(False, False), (True, True)])
def test_every_decode_weight_form_gives_the_same_logits(bias, tied):
    """Packed (q/k/v and w1/w3 fused, output-major, the output layer transposed or the tied embedding
    read as is), per-layer and sliced weights: the same prefill and decode logits (f32) and tokens.
    The biases are random so that their packing is checked too."""
    from internlm_jax.arrays import flat_params

    model = ij.InternLM2(CFG.replace(bias=bias, tie_word_embeddings=tied), seed=4)
    rng = np.random.RandomState(0)
    for name, param in flat_params(model).items():
        if name.split(".")[-1] in ("bq", "bk", "bv", "bo"):
            param.set_value(jnp.asarray(rng.normal(0, 0.5, param.get_value().shape), jnp.float32))
    prompts = [[3, 4, 5, 6, 9, 10], [7] * 3]
    logits, tokens = {}, {}
    for form in ("packed", "per_layer", "sliced"):
        gen = generator_for(model.configure(decode_weights=form))
        assert (gen.layers is None) == (form == "sliced")
        if form == "packed":
            assert gen.layers.packed and (gen.layers.head is None) == tied
        ds, base = gen.start(gen.prepare(prompts), max_new_tokens=4)
        seen = [np.asarray(ds.logits)]
        for _ in range(3):
            ds, *_ = gen.step(gen.state, gen.layers, ds, base, sampling=SamplingParams(), stop_ids=())
            seen.append(np.asarray(ds.logits))
        logits[form] = np.stack(seen)
        tokens[form] = ij.generate_ids(model, prompts, max_new_tokens=6, stop_ids=())
    for form in ("packed", "per_layer"):
        assert _rel(logits[form], logits["sliced"]) < 1e-5, form
        assert tokens[form] == tokens["sliced"], form


@pytest.mark.parametrize("prompts", [[[3, 4, 5, 6, 9]], [[3, 4, 5, 6, 9], [7, 8], [11] * 4]])
def test_packed_decode_in_bfloat16_matches_the_dot_form(prompts):
    """Few rows with bfloat16 weights take the packed form's float32 multiply-and-sum instead of a dot:
    the decode logits stay within bfloat16 rounding of the per-layer (dot) form's, over several steps."""
    model = ij.InternLM2(CFG, seed=5, dtype="bfloat16", param_dtype="bfloat16")
    logits = {}
    for form in ("packed", "per_layer"):
        gen = generator_for(model.configure(decode_weights=form))
        ds, base = gen.start(gen.prepare(prompts), max_new_tokens=5)
        seen = []
        for _ in range(4):
            ds, *_ = gen.step(gen.state, gen.layers, ds, base, sampling=SamplingParams(), stop_ids=())
            assert ds.logits.dtype == jnp.float32
            seen.append(np.asarray(ds.logits))
        logits[form] = np.stack(seen)
    assert _rel(logits["packed"], logits["per_layer"]) < 1e-2  # bfloat16 activations: eps 7.8e-3


def test_packed_prefill_in_bfloat16_matches_the_dot_form():
    """Past FEW_ROWS rows the packed form multiplies float32 copies of 16-bit weights that it makes
    itself (tied to the layer's input so that XLA:CPU cannot make them all at the start): the prefill
    of a prompt longer than that, and the engine's prefill chunks, give the per-layer (dot) form's
    logits within bfloat16 rounding."""
    model = ij.InternLM2(CFG, seed=7, dtype="bfloat16", param_dtype="bfloat16")
    prompt = [int(t) for t in np.random.RandomState(7).randint(0, CFG.vocab_size, 150)]
    assert len(prompt) > FEW_ROWS
    first = {}
    for form in ("packed", "per_layer"):
        gen = generator_for(model.configure(decode_weights=form))
        ds, _ = gen.start(gen.prepare([prompt]), max_new_tokens=2)
        first[form] = np.asarray(ds.logits)
    assert _rel(first["packed"], first["per_layer"]) < 1e-2  # bfloat16 activations: eps 7.8e-3
    engine = ij.Engine(model.configure(decode_weights="packed"), max_batch=1, max_len=256, prefill_chunk=128)
    request = engine.submit(prompt, max_tokens=1, logprobs=0)
    engine.run_until_done([request])
    ref = first["per_layer"][0].astype(np.float64)
    ref = ref - ref.max() - np.log(np.exp(ref - ref.max()).sum())  # log-softmax of the dot form's logits
    assert abs(request.token_logprobs[0] - ref[request.tokens[0]]) < 0.05
    assert ref.max() - ref[request.tokens[0]] < 0.05  # greedy: the best token, up to bfloat16 rounding


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_inference_embedding_gather_equals_the_differentiable_one(dtype):
    """The inference paths gather a 16-bit table as integers: the same rows bit for bit, NaN past the
    vocabulary as the float gather gives."""
    model = ij.InternLM2(CFG, seed=6, dtype=dtype, param_dtype=dtype)
    ids = jnp.asarray([[0, 5, CFG.vocab_size - 1, CFG.vocab_size + 3]])
    plain, bits = model.embed(ids), model.embed(ids, differentiable=False)
    assert plain.dtype == bits.dtype == jnp.dtype(dtype)
    np.testing.assert_array_equal(np.asarray(plain, np.float32), np.asarray(bits, np.float32))
    assert np.isnan(np.asarray(bits[0, 3], np.float32)).all() and np.isfinite(np.asarray(bits[0, :3], np.float32)).all()


def test_packed_decode_weights_need_a_model_without_a_mesh():
    mesh = ij.make_mesh(fsdp=2, devices=jax.devices()[:2])
    model = ij.InternLM2(CFG, mesh=mesh, seed=0).configure(decode_weights="packed")
    with pytest.raises(ValueError, match="decode_weights='packed' is for a model without a mesh"):
        ij.generate_ids(model, [[3, 4, 5]], max_new_tokens=2)
    assert generator_for(model.configure(decode_weights="auto")).weights_form == "per_layer"


def test_engine_defaults_and_misuse():
    """max_len defaults to what the model allows (4096 at most, as the server); array prompts and numpy
    counts are taken; a stopped engine refuses requests, and run_until_done refuses requests it never got, instead of
    waiting forever."""
    model = ij.InternLM2(CFG, seed=0)
    engine = ij.Engine(model, stop_ids=())
    assert engine.max_len == min(4096, CFG.max_position_embeddings)
    request = engine.submit(jnp.asarray([3, 4, 5]), max_tokens=np.int64(3))
    engine.run_until_done([request])
    assert request.tokens == ij.generate_ids(model, [[3, 4, 5]], max_new_tokens=3, stop_ids=())[0]
    engine.start()
    engine.stop()
    with pytest.raises(ij.EngineError, match="stopped"):
        engine.submit([3, 4], max_tokens=2)
    stranger = ij.Engine(model, stop_ids=()).check([3, 4], max_tokens=2)
    with pytest.raises(ij.EngineError, match="never submitted"):
        ij.Engine(model, stop_ids=()).run_until_done([stranger])
    # started: run_until_done waits for the background loop instead of stepping the same state beside it,
    # and step() from another thread is refused
    looping = ij.Engine(model, max_batch=2, max_len=32, stop_ids=()).start()
    try:
        requests = [looping.submit([5, 6, 7, 8], max_tokens=12) for _ in range(5)]
        looping.run_until_done(requests)
        want = ij.generate_ids(model, [[5, 6, 7, 8]], max_new_tokens=12, stop_ids=())[0]
        assert [(r.tokens, r.finish_reason) for r in requests] == [(want, "length")] * 5
        assert looping.stats["errors"] == 0
        with pytest.raises(ij.EngineError, match="runs its own loop"):
            looping.step()
        with pytest.raises(ij.EngineError, match="never submitted"):
            looping.run_until_done([stranger])
    finally:
        looping.stop()
    # numpy scalars (a sweep over np.arange) are the numbers they hold; a vanishing temperature is greedy
    engine = ij.Engine(model, stop_ids=())
    swept = engine.submit([3, 4, 5], max_tokens=6, temperature=np.float32(0.5), top_k=np.int64(5), seed=3)
    engine.run_until_done([swept])
    assert swept.tokens == ij.generate_ids(model, [[3, 4, 5]], max_new_tokens=6, stop_ids=(), temperature=0.5,
                                           top_k=5, seed=3)[0]
    greedy = ij.generate_ids(model, [[3, 4, 5]], max_new_tokens=6, stop_ids=())[0]
    assert ij.generate_ids(model, [[3, 4, 5]], max_new_tokens=6, stop_ids=(), temperature=1e-39, seed=1)[0] == greedy
    # without stop_ids: the config's eos and, only in InternLM2's vocabulary, <|im_end|>
    assert ij.Engine(model).stop_ids == (CFG.eos_token_id,)
    assert default_stop_ids(CFG.replace(vocab_size=92544, eos_token_id=5)) == (5, 92542)
    # a tokenizer larger than the model (a small model with the released tokenizer): its <|im_end|>
    # can never be sampled, and the engine takes the stop ids as they are
    released = types.SimpleNamespace(stop_ids=[2, 92542])
    assert default_stop_ids(CFG, released) == (CFG.eos_token_id,)
    assert ij.Engine(model, stop_ids=default_stop_ids(CFG, released)).stop_ids == (CFG.eos_token_id,)


def _huge_kb(address: int) -> int:
    """AnonHugePages (kB) of the mapping holding ``address``, as the kernel accounts it."""
    lines = open("/proc/self/smaps").read().splitlines()
    for i, line in enumerate(lines):
        head = line.split()[0]
        if "-" in head and all(c in "0123456789abcdef-" for c in head):
            lo, hi = (int(v, 16) for v in head.split("-"))
            if lo <= address < hi:
                for field in lines[i + 1:]:
                    if field.startswith("AnonHugePages:"):
                        return int(field.split()[1])
    raise AssertionError(f"no mapping holds {address:#x}")


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="huge pages are a Linux feature")
def test_decode_weights_are_backed_by_huge_pages_on_linux(monkeypatch):
    from internlm_jax import generation
    from internlm_jax.arrays import back_with_huge_pages

    thp = open("/sys/kernel/mm/transparent_hugepage/enabled").read()
    if "[always]" in thp or "[never]" in thp:
        pytest.skip(f"THP is {thp.strip()!r}: nothing to ask for (always) or nothing given (never)")
    probe = jnp.ones((3 << 20,), jnp.float32) + 0  # 12 MiB: holds an aligned 2 MiB range whatever its start
    if back_with_huge_pages(probe) == 0:
        pytest.skip("this kernel refuses MADV_COLLAPSE (Linux < 6.1)")
    cfg = CFG.replace(vocab_size=8192, hidden_size=256, intermediate_size=512)  # output layer: 8 MiB in f32
    on, off = ij.InternLM2(cfg, seed=1), ij.InternLM2(cfg, seed=1)
    off.configure(huge_pages=False)
    asked = []  # (a freed buffer's huge pages may be reused: whether a setting asked is seen here, not in smaps)
    monkeypatch.setattr(generation, "back_with_huge_pages", lambda x: asked.append(x) or back_with_huge_pages(x))
    heads = {}
    for name, m in (("off", off), ("on", on)):
        heads[name] = max(jax.tree.leaves(generator_for(m).layers), key=lambda x: x.nbytes)
        assert len(asked) == (name == "on"), name
    assert heads["on"].nbytes >= 8 << 20
    assert _huge_kb(heads["on"].unsafe_buffer_pointer() + heads["on"].nbytes // 2) >= 2048  # and the kernel gave them
    prompts = [[5, 9, 30, 7], [11, 3]]
    assert ij.generate_ids(on, prompts, max_new_tokens=6) == ij.generate_ids(off, prompts, max_new_tokens=6)
    with pytest.raises(ValueError, match="huge_pages must be True or False"):
        EngineSettings(huge_pages="yes")


def test_a_bf16_layer_scan_on_cpu_converts_one_layer_at_a_time():
    """XLA:CPU multiplies bf16 as float32; left to its loop-invariant code motion, the layer scan made a
    float32 copy of every stacked weight at once (jax 0.10's XLA does; 0.11's no longer hoists it).
    ``model(ids)`` and the training steps compile with ``scan_compiler_options()``: the temporaries stay
    below one float32 copy of the layers, with the same values."""
    from flax import nnx

    cfg = CFG.replace(vocab_size=512, hidden_size=256, intermediate_size=1024, num_hidden_layers=6)
    model = ij.InternLM2(cfg, seed=0, dtype="bfloat16")
    graphdef, state = nnx.split(model)
    ids = jnp.asarray(np.random.RandomState(0).randint(0, 512, (1, 64)), jnp.int32)
    forward = lambda state, ids: nnx.merge(graphdef, state)(ids)  # noqa: E731
    options = model.scan_compiler_options()
    temp = {k: jax.jit(forward, compiler_options=o or None).lower(state, ids).compile().memory_analysis()
            .temp_size_in_bytes for k, o in (("default", {}), ("ours", options))}
    layers_f32 = 4 * sum(x.size for x in jax.tree.leaves(nnx.state(model.layers)))
    assert layers_f32 > 2 * temp["ours"] and temp["ours"] <= temp["default"]
    np.testing.assert_array_equal(np.asarray(model(ids)), np.asarray(jax.jit(forward)(state, ids)))
    assert ij.InternLM2(cfg, seed=0).scan_compiler_options() == {}  # float32 weights and compute: none


def test_a_failed_engine_step_is_logged_with_its_traceback(caplog):
    """The background loop fails the running requests of a step that raised and keeps serving; the
    exception itself goes to the log (it was only counted)."""
    import logging

    model = ij.InternLM2(CFG, seed=0)
    engine = ij.Engine(model, max_batch=1, max_len=32, stop_ids=())
    execute = engine._execute

    def broken(plan):
        raise RuntimeError("the device fell over")

    engine._execute = broken
    engine.start()
    try:
        with caplog.at_level(logging.ERROR, logger="internlm_jax.engine"):
            failed = engine.submit([3, 4], max_tokens=2)
            failed.finished.wait(60)
        assert failed.finish_reason == "error:RuntimeError"
        record = next(r for r in caplog.records if "engine step failed" in r.getMessage())
        assert "the device fell over" in str(record.exc_info[1])
        engine._execute = execute
        ok = engine.submit([3, 4], max_tokens=2)
        engine.run_until_done([ok])
        assert ok.tokens == ij.generate_ids(model, [[3, 4]], max_new_tokens=2, stop_ids=())[0]
    finally:
        engine.stop()
