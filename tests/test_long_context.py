"""Long context: ring attention (outputs and gradients), blockwise memory, sequence-sharded decode."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference as ref
from flax import nnx
from hf_fixtures import run_python as _run
from hf_fixtures import tiny_config, write_hf_checkpoint

import internlm_jax as ij
from internlm_jax.attention import dense_attention
from internlm_jax.generation import SamplingParams, generator_for
from internlm_jax.ring import ring_attention, zigzag_order

CFG = tiny_config(num_attention_heads=4, num_key_value_heads=2, hidden_size=32, bias=True)
STATE = ref.random_state(CFG, 11, scale=0.2)


def _qkv(b=2, s=64, nh=4, nkv=2, d=16, seed=0):
    r = np.random.RandomState(seed)
    return (r.standard_normal((b, s, nh, d)).astype(np.float32), r.standard_normal((b, s, nkv, d)).astype(np.float32),
            r.standard_normal((b, s, nkv, d)).astype(np.float32))


def _rel(a, b):
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


@pytest.mark.parametrize("axes", [dict(sequence=4, tensor=2, fsdp=1), dict(sequence=8, fsdp=1),
                                  dict(sequence=2, data=2, tensor=2, fsdp=1), dict(sequence=2, tensor=4, fsdp=1)],
                         ids=["seq4xtensor2", "seq8", "seq2xdata2xtensor2", "tensor4_over_2_kv_heads"])
def test_ring_equals_dense_outputs_and_gradients(axes):
    mesh = ij.make_mesh(**axes)
    n = mesh.shape["sequence"]
    q, k, v = _qkv()
    b, s = q.shape[:2]
    valid = np.ones((b, s), bool)
    valid[1, :13] = False  # left padding in one row
    idx = np.broadcast_to(np.arange(s), (b, s))
    mask = (idx[:, None, :] <= idx[:, :, None]) & valid[:, None, :]
    order, inv = zigzag_order(s, n), np.argsort(zigzag_order(s, n))
    w = np.random.RandomState(1).standard_normal(q.shape).astype(np.float32) * valid[..., None, None]

    def dense_loss(q, k, v):
        return jnp.sum(dense_attention(q, k, v, jnp.asarray(mask)) * w)

    def ring_loss(q, k, v):  # inputs in zigzag order, as the model lays them out
        out = ring_attention(q, k, v, idx[:, order], idx[:, order], valid[:, order], mesh, block=4)
        return jnp.sum(out * w[:, order]), out

    (_, out), grads = jax.jit(jax.value_and_grad(ring_loss, argnums=(0, 1, 2), has_aux=True))(
        q[:, order], k[:, order], v[:, order])
    want = dense_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(mask))
    rows = valid  # a fully padded query row has no defined output
    assert _rel(np.asarray(out)[:, inv][rows], np.asarray(want)[rows]) < 1e-5
    for got, exp in zip(grads, jax.grad(dense_loss, argnums=(0, 1, 2))(q, k, v)):
        assert _rel(np.asarray(got)[:, inv], exp) < 1e-5


def test_more_tensor_shards_than_kv_heads_still_split_the_heads():
    """tensor=4 over 8 query / 2 KV heads: each shard attends with its own 2 query heads (and a copy of
    their KV head), instead of every shard computing all 8 heads."""
    mesh = ij.make_mesh(sequence=2, tensor=4, fsdp=1)
    q, k, v = _qkv(nh=8, nkv=2)
    b, s = q.shape[:2]
    idx = np.broadcast_to(np.arange(s), (b, s))
    ok = np.ones((b, s), bool)
    f = jax.jit(lambda q, k, v: ring_attention(q, k, v, idx, idx, ok, mesh, block=4))
    text = f.lower(q, k, v).compile().as_text()
    assert "f32[2,32,8,16]" not in text and "f32[2,32,2,16]" in text  # local q: half the tokens, 2 of 8 heads


def _intermediate_sizes(jaxpr):
    for eqn in jaxpr.eqns:
        for var in eqn.outvars:
            if hasattr(var.aval, "shape"):
                yield int(np.prod(var.aval.shape)), var.aval.shape
        for sub in _subjaxprs(eqn):
            yield from _intermediate_sizes(sub)


def _subjaxprs(eqn):
    for p in eqn.params.values():
        for x in (p if isinstance(p, (list, tuple)) else [p]):
            inner = getattr(x, "jaxpr", x)
            if hasattr(inner, "eqns"):
                yield inner


def test_ring_step_never_holds_more_than_one_block_of_scores():
    mesh = ij.make_mesh(sequence=4, fsdp=2)
    b, s, nh, nkv, d, block = 2, 256, 4, 2, 16, 16
    q, k, v = _qkv(b, s, nh, nkv, d)
    idx = np.broadcast_to(np.arange(s), (b, s))
    ok = np.ones((b, s), bool)
    jaxpr = jax.make_jaxpr(lambda q, k, v: ring_attention(q, k, v, idx, idx, ok, mesh, block=block))(q, k, v)
    local = s // 4
    biggest = max(size for size, _ in _intermediate_sizes(jaxpr.jaxpr) if size < b * s * nh * d)  # skip q-sized
    assert biggest <= b * nh * block * block * 4  # score blocks, not [local x local] (= 16x larger here)
    assert b * nh * local * local > 4 * biggest


@pytest.mark.parametrize("axes", [dict(sequence=4, tensor=2, fsdp=1), dict(sequence=8, fsdp=1)],
                         ids=["seq4xtensor2", "seq8"])
def test_sharded_forward_any_length_equals_single_device(tmp_path, axes):
    folder = write_hf_checkpoint(tmp_path, CFG, STATE)
    single = ij.InternLM2.from_pretrained(folder)
    sharded = ij.InternLM2.from_pretrained(folder, mesh=ij.make_mesh(**axes))
    ids = np.random.RandomState(0).randint(0, CFG["vocab_size"], (2, 37))  # 37: no multiple of 8 or 16
    assert _rel(sharded(ids), single(ids)) < 1e-5
    np.testing.assert_allclose(np.asarray(sharded(ids)), ref.forward(STATE, CFG, ids)["logits"], atol=1e-4)

    def loss(model, ids):
        return jnp.mean(jax.nn.logsumexp(model.forward(ids), axis=-1))

    g1 = nnx.grad(loss)(single, jnp.asarray(ids))
    g8 = nnx.jit(nnx.grad(loss))(sharded, jnp.asarray(ids))
    for (path, a), (_, b) in zip(nnx.to_flat_state(g1), nnx.to_flat_state(g8)):
        assert _rel(b.get_value(), a.get_value()) < 1e-4, path


PROMPTS = [list(range(3, 3 + 21)), list(range(40, 40 + 9)), [5, 6, 7]]  # 21, 9, 3 tokens


@pytest.mark.parametrize("axes", [dict(sequence=4, tensor=2, fsdp=1), dict(sequence=8, fsdp=1)],
                         ids=["seq4xtensor2", "seq8"])
def test_sequence_sharded_greedy_generation_equals_unsharded(tmp_path, axes):
    """Crosses max_position_embeddings=16 under dynamic NTK: every shard must use the global length."""
    folder = write_hf_checkpoint(tmp_path, CFG, STATE)
    single = ij.InternLM2.from_pretrained(folder)
    sharded = ij.InternLM2.from_pretrained(folder, mesh=ij.make_mesh(**axes))
    kw = dict(max_new_tokens=11, stop_ids=(), max_length=64)
    want = ij.generate_ids(single, PROMPTS, **kw)
    assert ij.generate_ids(sharded, PROMPTS, **kw) == want
    s = max(map(len, PROMPTS))
    ids = np.zeros((3, s), np.int64)
    mask = np.zeros((3, s), np.int64)
    for i, p in enumerate(PROMPTS):
        ids[i, s - len(p):], mask[i, s - len(p):] = p, 1
    assert want == ref.greedy_generate(STATE, CFG, ids, 11, attention_mask=mask).tolist()


def test_a_sequence_sharded_decode_step_writes_the_cache_in_place():
    """Under a ``sequence`` axis a decode step writes the new token into its owner's slice in place: the
    compiled step has no branch and copies no cache buffer (a ``cond`` around the write copied every
    buffer per step; on TPU it also changed the buffer's layout and back)."""
    model = ij.InternLM2(ij.InternLM2Config.from_dict(CFG), mesh=ij.make_mesh(sequence=2, fsdp=4), seed=0)
    gen = generator_for(model)
    ds, base = gen.start(gen.prepare([p[:6] for p in PROMPTS]), max_new_tokens=600)
    text = gen.step.lower(gen.state, gen.layers, ds, base, sampling=SamplingParams(), stop_ids=(2,)).compile().as_text()
    buffer = ds.cache.keys[0].addressable_shards[0].data
    shape = f"{buffer.dtype.name.replace('float', 'f')}[{','.join(map(str, buffer.shape))}]"
    assert " conditional(" not in text
    assert not [line for line in text.splitlines() if " copy(" in line and line.split("=")[1].strip().startswith(shape)]


def test_long_inputs_without_a_sequence_axis_go_blockwise(tmp_path):
    """On a mesh, inputs over ``blockwise_from`` tokens take the ring/blockwise path with one shard:
    same logits as the reference (1100 tokens: padded to 3 blocks of 512) and same greedy tokens."""
    folder = write_hf_checkpoint(tmp_path, CFG, STATE)
    model = ij.InternLM2.from_pretrained(folder, mesh=ij.make_mesh(tensor=2, fsdp=4))
    model.configure(blockwise_from=8)
    ids = np.random.RandomState(3).randint(0, CFG["vocab_size"], (1, 1100))
    jaxpr = jax.make_jaxpr(lambda x: model.forward(x))(jnp.asarray(ids))
    assert "shard_map" in str(jaxpr)  # the blockwise path, not dense attention
    np.testing.assert_allclose(np.asarray(model(ids)), ref.forward(STATE, CFG, ids)["logits"], atol=1e-4)
    kw = dict(max_new_tokens=11, stop_ids=(), max_length=64)
    dense = ij.InternLM2.from_pretrained(folder, mesh=ij.make_mesh(tensor=2, fsdp=4))
    assert generator_for(model).blockwise(21) and not generator_for(dense).blockwise(21)
    assert ij.generate_ids(model, PROMPTS, **kw) == ij.generate_ids(dense, PROMPTS, **kw)


def test_left_padding_rows_equal_the_reference_on_the_ring_and_blockwise_paths(tmp_path):
    """Every row of the logits, padding included, equals the reference's: its additive mask gives a query
    that sees no key a uniform distribution over the keys, which dense attention copies and the ring and
    one-device blockwise paths now give too (they gave zeros); the gradients agree with dense ones."""
    folder = write_hf_checkpoint(tmp_path, CFG, STATE)
    ids = np.random.RandomState(0).randint(3, CFG["vocab_size"], (2, 21))
    mask = np.ones((2, 21), np.int64)
    mask[1, :7] = 0
    pos = ref.positions_from_mask(mask)
    want = ref.forward(STATE, CFG, ids, position_ids=pos, attention_mask=mask)["logits"]
    ring = ij.InternLM2.from_pretrained(folder, mesh=ij.make_mesh(sequence=4, fsdp=2))
    blockwise = ij.InternLM2.from_pretrained(folder).configure(blockwise_from=8, block=8)
    dense = ij.InternLM2.from_pretrained(folder)
    for model in (ring, blockwise, dense):
        got = np.asarray(model(ids, positions=pos, attention_mask=mask))
        np.testing.assert_allclose(got, want, atol=2e-5 * np.abs(want).max())

    def loss(model, ids):
        return jnp.sum(jnp.tanh(model.forward(ids, positions=jnp.asarray(pos), attention_mask=jnp.asarray(mask))))

    grads = [nnx.grad(loss)(model, jnp.asarray(ids)) for model in (blockwise, dense)]
    for a, b in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5 * (np.abs(np.asarray(b)).max() + 1e-6))


def test_a_batch_split_over_data_only_keeps_its_cache_in_place(tmp_path):
    """Batch 2 on data=2 x fsdp=2 x sequence=2: the cache rows split over data alone (2 does not divide
    data x fsdp), and the sequence-sharded decode attention splits its batch the same way, so a decode
    step moves no cache buffer between devices (it used to all-gather every layer's keys and values);
    the tokens equal one device's."""
    import re

    folder = write_hf_checkpoint(tmp_path, CFG, STATE)
    model = ij.InternLM2.from_pretrained(folder, mesh=ij.make_mesh(data=2, fsdp=2, sequence=2))
    prompts = PROMPTS[:2]
    kw = dict(max_new_tokens=6, stop_ids=(), max_length=64)
    assert ij.generate_ids(model, prompts, **kw) == ij.generate_ids(ij.InternLM2.from_pretrained(folder), prompts, **kw)
    gen = generator_for(model)
    ds, base = gen.start(gen.prepare(prompts), max_new_tokens=6)
    local = ds.cache.keys[0].sharding.shard_shape(ds.cache.keys[0].shape)  # [1, nKV, slots / 2, D]
    assert local[0] == 1
    hlo = gen.step.lower(gen.state, gen.layers, ds, base, sampling=SamplingParams(), stop_ids=()).compile().as_text()
    shapes = [tuple(int(n) for n in m.group(1).split(",") if n) for m in re.finditer(
        r"= \(?\w+\[([\d,]*)\][^\n]*? (?:all-gather|all-to-all|collective-permute)\(", hlo)]
    assert not [shape for shape in shapes if shape[-2:] == tuple(local[-2:])], shapes


def test_decode_tokens_fill_the_shards_evenly(tmp_path):
    folder = write_hf_checkpoint(tmp_path, CFG, STATE)
    model = ij.InternLM2.from_pretrained(folder, mesh=ij.make_mesh(sequence=4, fsdp=2))
    gen = generator_for(model)
    ds, base = gen.start(gen.prepare([list(range(3, 30))]), max_new_tokens=10)
    assert ds.cache.keys[0].sharding.spec[2] == "sequence"
    per_shard = lambda v: np.asarray(v).reshape(1, 4, -1).sum(-1)[0]  # noqa: E731
    before = per_shard(ds.cache.valid)
    assert before.sum() == 27 and int(base) == 8  # each shard holds 32 / 4 prompt slots (zigzag chunks)
    for _ in range(10):
        ds, *_ = gen.step(gen.state, gen.layers, ds, base, sampling=SamplingParams(), stop_ids=())
    added = per_shard(ds.cache.valid) - before
    assert added.sum() == 10 and added.max() - added.min() <= 1


def test_needle_example_mechanics():
    done = _run(["examples/needle_in_haystack.py", "--length", "700",
                 "--sequence", "4", "--max-new-tokens", "6"])
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    n = int(out.split("haystack ")[1].split()[0])
    assert 650 <= n <= 800 and "'sequence': 4" in out and "answer:" in out and "found the needle:" in out


def test_cli_generate_takes_the_sequence_axis(tokenizer_path, tmp_path):
    from hf_fixtures import chain_checkpoint

    tok = ij.Tokenizer.from_pretrained(tokenizer_path)
    chain = [364] + tok.encode("Ring attention works.", add_bos=False) + [2]
    folder = chain_checkpoint(tmp_path / "chain", chain, tokenizer_path)
    done = _run(["-m", "internlm_jax", "generate", "--model", str(folder), "--prompt", "Hi\n", "--devices", "8",
                 "--sequence", "4", "--tensor", "2", "--quiet", "--max-new-tokens", "20"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout == "Ring attention works.\n"


def test_ring_through_dot_product_attention_equals_dense():
    """The per-block path that uses jax.nn.dot_product_attention (cuDNN on GPU; its XLA flavour here)."""
    mesh = ij.make_mesh(sequence=4, tensor=2, fsdp=1)
    q, k, v = _qkv(seed=3)
    b, s = q.shape[:2]
    valid = np.ones((b, s), bool)
    valid[0, :7] = False
    idx = np.broadcast_to(np.arange(s), (b, s))
    order, inv = zigzag_order(s, 4), np.argsort(zigzag_order(s, 4))
    out = ring_attention(q[:, order], k[:, order], v[:, order], idx[:, order], idx[:, order], valid[:, order], mesh,
                         block=4, impl="xla")
    mask = (idx[:, None, :] <= idx[:, :, None]) & valid[:, None, :]
    want = dense_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(mask))
    assert _rel(np.asarray(out)[:, inv][valid], np.asarray(want)[valid]) < 1e-5
    with pytest.raises(ValueError, match="unknown attention impl"):
        ring_attention(q, k, v, idx, idx, valid, mesh, impl="flash")


@pytest.mark.parametrize("axes,s", [(dict(sequence=2, tensor=2, fsdp=2), 512), (dict(tensor=2, fsdp=4), 256)],
                         ids=["seq2", "one-shard"])
def test_ring_through_the_splash_kernel_equals_dense(axes, s):
    """The Pallas TPU splash kernel inside ring steps, run by the Pallas interpreter on CPU: same output
    as dense attention, with left padding (a second segment id) in one row."""
    mesh = ij.make_mesh(**axes)
    n = mesh.shape["sequence"]
    q, k, v = _qkv(s=s)
    b = q.shape[0]
    valid = np.ones((b, s), bool)
    valid[1, :150] = False  # more than a chunk of padding: some chunk pairs see nothing
    idx = np.broadcast_to(np.arange(s), (b, s))
    mask = (idx[:, None, :] <= idx[:, :, None]) & valid[:, None, :]
    order, inv = zigzag_order(s, n), np.argsort(zigzag_order(s, n))
    ring = jax.jit(lambda q, k, v: ring_attention(q, k, v, idx[:, order], idx[:, order], valid[:, order], mesh,
                                                  impl="splash"))
    out = np.asarray(ring(q[:, order], k[:, order], v[:, order]))[:, inv]
    want = np.asarray(dense_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(mask)))
    assert _rel(out[valid], want[valid]) < 1e-5
    hlo = jax.jit(lambda q, k, v: ring_attention(q, k, v, idx[:, order], idx[:, order], valid[:, order], mesh,
                                                 impl="splash")).lower(q, k, v).as_text()
    assert "splash" in hlo or "pallas" in hlo.lower()  # the kernel is in the program, not the fallback


def test_generation_with_the_splash_kernel_matches_blockwise(tmp_path):
    folder = write_hf_checkpoint(tmp_path, CFG, STATE)
    model = ij.InternLM2.from_pretrained(folder, mesh=ij.make_mesh(sequence=2, tensor=2, fsdp=2))
    prompts = [list(np.random.RandomState(5).randint(3, CFG["vocab_size"], 300)), PROMPTS[0]]  # bucket 512
    kw = dict(max_new_tokens=6, stop_ids=(), max_length=1024)
    want = ij.generate_ids(model, prompts, **kw)
    model.configure(attention="splash")
    assert ij.generate_ids(model, prompts, **kw) == want
