"""Generation: greedy fidelity to the reference's cached generation, bucketing, stops, sampling, errors."""

import logging
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference as ref
from hf_fixtures import tiny_config, write_hf_checkpoint

import internlm_jax as ij
from internlm_jax.generation import (
    SamplingParams,
    argmax_tokens,
    categorical_tokens,
    generator_for,
    process_logits,
    sample_tokens,
)

# dynamic NTK with max_position_embeddings=16: prompts + 12 new tokens cross it
CFG = tiny_config(bias=True)
STATE = ref.random_state(CFG, 0, scale=0.2)  # larger weights: clear argmax margins
PROMPTS = [[5, 7, 9, 11, 13, 3, 4, 8, 9, 10], [20, 21, 22, 23], [40, 41, 42, 43, 44, 45, 46]]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = write_hf_checkpoint(tmp_path_factory.mktemp("gen"), CFG, STATE)
    return ij.InternLM2.from_pretrained(folder, mesh=ij.make_mesh(tensor=2, fsdp=4))


def _reference(state, cfg, prompts, n):
    s = max(map(len, prompts))
    ids = np.zeros((len(prompts), s), np.int64)
    mask = np.zeros((len(prompts), s), np.int64)
    for i, p in enumerate(prompts):
        ids[i, s - len(p):] = p
        mask[i, s - len(p):] = 1
    return ref.greedy_generate(state, cfg, ids, n, attention_mask=mask).tolist()


def test_greedy_matches_reference_across_max_position_embeddings(model):
    out = ij.generate_ids(model, PROMPTS, max_new_tokens=12, stop_ids=())
    assert out == _reference(STATE, CFG, PROMPTS, 12)  # left-padded batch, crossing max_pos=16
    for p in PROMPTS:  # and each prompt alone gives the same tokens
        assert ij.generate_ids(model, [p], max_new_tokens=12, stop_ids=()) == _reference(STATE, CFG, [p], 12)


@pytest.mark.parametrize("overrides", [dict(num_attention_heads=4, num_key_value_heads=1, hidden_size=32,
                                            rope_scaling={"type": "dynamic", "factor": 3.0}),
                                       dict(num_attention_heads=8, num_key_value_heads=2, hidden_size=64,
                                            rope_scaling={"type": "linear", "factor": 2.0})],
                         ids=["mqa_dynamic3", "gqa4_linear"])
def test_greedy_matches_reference_other_configs(tmp_path, overrides):
    cfg = tiny_config(**overrides)
    state = ref.random_state(cfg, 3, scale=0.2)
    m = ij.InternLM2.from_pretrained(write_hf_checkpoint(tmp_path, cfg, state), mesh=ij.make_mesh(tensor=2, fsdp=4))
    assert ij.generate_ids(m, PROMPTS[:2], max_new_tokens=14, stop_ids=(), max_length=64) == \
        _reference(state, cfg, PROMPTS[:2], 14)


def test_greedy_matches_hf_llama_generate(tmp_path):
    torch = pytest.importorskip("torch")
    from transformers import LlamaForCausalLM

    cfg = tiny_config(max_position_embeddings=32, rope_scaling=None)
    state = ref.random_state(cfg, 5, scale=0.2)
    m = ij.InternLM2.from_pretrained(write_hf_checkpoint(tmp_path, cfg, state))
    llama = LlamaForCausalLM(ref.llama_config_from_internlm2(cfg)).eval()
    llama.load_state_dict({k: torch.from_numpy(v) for k, v in ref.llama_state_from_internlm2(state, cfg).items()},
                          strict=False)
    s = max(map(len, PROMPTS))
    ids = torch.zeros((len(PROMPTS), s), dtype=torch.long)
    mask = torch.zeros((len(PROMPTS), s), dtype=torch.long)
    for i, p in enumerate(PROMPTS):
        ids[i, s - len(p):] = torch.tensor(p)
        mask[i, s - len(p):] = 1
    with torch.no_grad():
        hf = llama.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0,
                            eos_token_id=None, min_new_tokens=12)[:, s:].tolist()
    assert ij.generate_ids(m, PROMPTS, max_new_tokens=12, stop_ids=()) == hf


def test_prompt_lengths_share_compiled_programs(model, caplog):
    """Prompt lengths within a bucket and any max_new_tokens reuse the compiled programs (counted from
    JAX's own compile log); a new bucket compiles a new prefill."""
    import logging

    gen = generator_for(model)
    ij.generate_ids(model, [[3, 4, 5]], max_new_tokens=7, stop_ids=())  # chunks of 4, 2 and 1 steps
    prefill = gen.prefill._cache_size()
    with jax.log_compiles(True), caplog.at_level(logging.WARNING):
        for n, new in ((5, 4), (9, 2), (13, 3), (16, 1)):  # all in the 16-token bucket; max_new_tokens varies
            ij.generate_ids(model, [list(range(3, 3 + n))], max_new_tokens=new, stop_ids=())
    compiled = [r.getMessage()[:40] for r in caplog.records if r.getMessage().startswith("Compiling")]
    assert not compiled, compiled
    ij.generate_ids(model, [list(range(3, 23))], max_new_tokens=4, stop_ids=())  # 20 tokens: the 32 bucket
    assert gen.prefill._cache_size() == prefill + 1
    # sampling values are inputs of the decode programs: a sweep compiles the filters it switches on once
    sweep = dict(max_new_tokens=4, stop_ids=(), top_k=5, top_p=0.9, repetition_penalty=1.1)
    ij.generate_ids(model, [[3, 4, 5]], temperature=0.7, **sweep)
    caplog.clear()
    with jax.log_compiles(True), caplog.at_level(logging.WARNING):
        for t, k, p in ((0.71, 5, 0.9), (0.9, 7, 0.8), (1.3, 40, 0.95)):
            ij.generate_ids(model, [[3, 4, 5]], **{**sweep, "temperature": t, "top_k": k, "top_p": p}, seed=2)
    compiled = [r.getMessage()[:40] for r in caplog.records if r.getMessage().startswith("Compiling")]
    assert not compiled, compiled


def test_the_decode_chunk_updates_the_donated_cache_in_place(model):
    """A decode chunk takes the state donated and hands it back (the compiled program aliases the whole
    cache, so XLA keeps no second copy), and the state it returns, fed to single steps (the stream
    driver), continues the greedy sequence."""
    gen = generator_for(model)
    prompts = [list(range(3, 20)), [5, 6]]
    ds, base = gen.start(gen.prepare(prompts), 64)
    kw = dict(sampling=SamplingParams(), stop_ids=())
    k = model.settings.decode_chunk
    mem = gen.chunk.lower(gen.state, gen.layers, ds, base, steps=k, **kw).compile().memory_analysis()
    per_device = sum(x.addressable_shards[0].data.nbytes for x in ds.cache.keys + ds.cache.values)
    assert mem.alias_size_in_bytes >= per_device
    old = ds.cache.keys[0]
    ds, tokens, emitted, _ = gen.chunk(gen.state, gen.layers, ds, base, steps=k, **kw)
    assert old.is_deleted()  # donated
    more = []
    for _ in range(3):
        ds, tok, _, _ = gen.step(gen.state, gen.layers, ds, base, **kw)
        more.append(np.asarray(tok))
    want = ij.generate_ids(model, prompts, max_new_tokens=k + 3, stop_ids=(), max_length=128)
    got = np.concatenate([np.asarray(tokens), np.stack(more, 1)], axis=1)
    assert got.tolist() == want and np.asarray(emitted).all()


def test_each_sequence_stops_at_its_own_stop_id(model):
    full = ij.generate_ids(model, PROMPTS, max_new_tokens=12, stop_ids=())
    stop = full[0][3]  # sequence 0 makes this token at step 3
    out = ij.generate_ids(model, PROMPTS, max_new_tokens=12, stop_ids=(stop,))
    for seq, whole in zip(out, full):
        n = whole.index(stop) + 1 if stop in whole else len(whole)
        assert seq == whole[:n]
    assert len(out[0]) == 4 and out[0][-1] == stop


def test_kv_cache_is_preallocated_and_sharded(model):
    gen = generator_for(model)
    batch = gen.prepare([[1, 2, 3]] * 4)
    ds, index = gen.start(batch, max_new_tokens=20)
    cfg, cache = model.config, ds.cache
    assert len(cache.keys) == len(cache.values) == cfg.num_hidden_layers  # one buffer per layer
    for buf in cache.keys + cache.values:  # [B, nKV, T, D] at the GQA head count
        assert buf.shape == (4, cfg.num_key_value_heads, 64, cfg.head_dim)
        assert buf.sharding.spec[0] == "fsdp" and buf.sharding.spec[1] == "tensor"  # batch and KV heads
    valid = cache.valid
    assert ds.logits.dtype == jnp.float32 and int(index) == 16 and valid[:, 13:16].all() and not valid[:, :13].any()


def test_sampling_reproducible_and_greedy_limits(model):
    kw = dict(max_new_tokens=10, stop_ids=())
    a = ij.generate_ids(model, PROMPTS, temperature=1.0, seed=1, **kw)
    assert a == ij.generate_ids(model, PROMPTS, temperature=1.0, seed=1, **kw)
    assert a != ij.generate_ids(model, PROMPTS, temperature=1.0, seed=2, **kw)
    greedy = ij.generate_ids(model, PROMPTS, **kw)
    assert ij.generate_ids(model, PROMPTS, temperature=0.7, top_k=1, seed=3, **kw) == greedy
    assert ij.generate_ids(model, PROMPTS, temperature=0.7, top_p=1e-6, seed=3, **kw) == greedy


def test_each_sampled_row_draws_with_its_own_seed_like_an_engine_request(model):
    """Row b draws with seed + b: a prompt repeated in a batch gives different samples, a row's tokens
    do not depend on what the other rows hold, and equal an engine request with that seed."""
    kw = dict(max_new_tokens=8, stop_ids=(), temperature=1.0, top_p=0.95, seed=5)
    alone = {s: ij.generate_ids(model, [PROMPTS[1]], **{**kw, "seed": s})[0] for s in (5, 6)}
    assert alone[5] != alone[6]
    assert ij.generate_ids(model, [PROMPTS[1], PROMPTS[1]], **kw) == [alone[5], alone[6]]
    assert ij.generate_ids(model, [PROMPTS[0], PROMPTS[1]], **kw)[1] == alone[6]
    assert ij.generate_ids(model, [PROMPTS[2], PROMPTS[1]], **kw)[1] == alone[6]
    engine = ij.Engine(model, max_batch=2, max_len=32, stop_ids=())
    requests = [engine.submit(PROMPTS[1], max_tokens=8, temperature=1.0, top_p=0.95, seed=s) for s in (5, 6)]
    engine.run_until_done(requests)
    assert [r.tokens for r in requests] == [alone[5], alone[6]]


def test_defaults_fit_the_context_and_ids_are_checked(model):
    # the context is 32 (16 positions x dynamic factor 2): without max_new_tokens, what fits
    out = ij.generate_ids(model, [PROMPTS[0]], stop_ids=())[0]
    assert out == ij.generate_ids(model, [PROMPTS[0]], max_new_tokens=32 - len(PROMPTS[0]), stop_ids=())[0]
    assert ij.generate_ids(model, []) == []
    for bad, words in (([[5, -1]], "token id -1 is outside"), ([[5, 96]], "token id 96 is outside"),
                       ([5, 6], "single integer")):
        with pytest.raises(ValueError, match=words):
            ij.generate_ids(model, bad, max_new_tokens=2)
    for seed in (None, 1.5, True):
        with pytest.raises(ValueError, match="seed must be an integer"):
            ij.generate_ids(model, PROMPTS, max_new_tokens=2, seed=seed)
    for max_length in (0, True, 2.5):
        with pytest.raises(ValueError, match="max_length must be an integer"):
            ij.generate_ids(model, PROMPTS, max_new_tokens=2, max_length=max_length)


def test_logit_processing_matches_hf_warpers():
    torch = pytest.importorskip("torch")
    from transformers import (
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    rng = np.random.RandomState(0)
    logits = rng.standard_normal((3, 50)).astype(np.float32) * 3
    history = rng.randint(0, 50, (3, 7))
    seen = np.zeros((3, 50), bool)
    seen[np.arange(3)[:, None], history] = True
    for t, k, p, r in [(0.7, 0, 1.0, 1.3), (1.0, 5, 1.0, 1.0), (0.9, 0, 0.8, 1.0), (1.3, 10, 0.5, 0.8)]:
        x = torch.from_numpy(logits.copy())
        ids = torch.from_numpy(history)
        if r != 1.0:
            x = RepetitionPenaltyLogitsProcessor(r)(ids, x)
        x = TemperatureLogitsWarper(t)(ids, x)
        if k:
            x = TopKLogitsWarper(k)(ids, x)
        if p < 1.0:
            x = TopPLogitsWarper(p)(ids, x)
        got = np.asarray(process_logits(jnp.asarray(logits), SamplingParams(t, k, p, r), jnp.asarray(seen)))
        want = x.numpy()
        np.testing.assert_array_equal(np.isinf(got), np.isinf(want))
        np.testing.assert_allclose(got[~np.isinf(got)], want[~np.isinf(want)], rtol=1e-6)


def test_top_k_and_top_p_never_sample_outside_their_sets():
    logits = jnp.asarray(np.log(np.array([[0.5, 0.3, 0.15, 0.05]], np.float32)))
    keys = jax.random.split(jax.random.key(0), 400)
    topk = np.asarray(jax.vmap(lambda k: sample_tokens(logits, k, SamplingParams(1.0, 2), None))(keys))
    assert set(topk.ravel()) == {0, 1}
    topp = np.asarray(jax.vmap(lambda k: sample_tokens(logits, k, SamplingParams(1.0, 0, 0.85), None))(keys))
    assert set(topp.ravel()) == {0, 1, 2}
    free = np.bincount(np.asarray(jax.vmap(lambda k: sample_tokens(logits, k, SamplingParams(1.0), None))(keys))
                       .ravel(), minlength=4)
    assert abs(free[0] / 400 - 0.5) < 0.1 and free[3] > 0


@pytest.mark.parametrize("kw,match", [(dict(temperature=-1.0), "temperature"), (dict(top_p=0.0), "top_p"),
                                      (dict(top_p=1.5), "top_p"), (dict(top_k=-1), "top_k"),
                                      (dict(repetition_penalty=0.0), "repetition_penalty"),
                                      (dict(max_new_tokens=0), "max_new_tokens")])
def test_invalid_sampling_values(model, kw, match):
    with pytest.raises(ValueError, match=match):
        ij.generate_ids(model, PROMPTS, **{"max_new_tokens": 4, **kw})


def test_common_argument_slips_are_named(model, tmp_path):
    """Model and tokenizer swapped, no tokenizer for text out, a number as prompts, a string as stop ids:
    each a named error before any work, not an AttributeError from inside."""
    from hf_fixtures import ROOT

    texts = (ROOT / "examples" / "data" / "tiny_corpus.txt").read_text().splitlines()
    tok = ij.Tokenizer.train(texts, tmp_path / "t.model")
    cases = [((tok, model, "hi"), {}, TypeError, "first argument must be an InternLM2 model, got Tokenizer"),
             ((model, None, [[3, 4]]), {}, ValueError, "a tokenizer .* is needed to turn the output into text"),
             ((model, model, "hi"), {}, TypeError, "second argument must be an internlm_jax Tokenizer, got InternLM2"),
             ((model, SimpleNamespace(encode=tok.encode, decode=tok.decode), "hi"), {}, TypeError,
              "must be an internlm_jax Tokenizer, got SimpleNamespace"),  # e.g. an HF tokenizer: no stop_ids
             ((model, tok, "hi"), {"stop": 5}, ValueError, "stop must be a string or a list of strings, got 5"),
             ((model, tok, "hi"), {"skip_special_tokens": "no"}, TypeError, "skip_special_tokens must be True or"),
             ((model, tok, "hi"), {"add_bos": 0}, TypeError, "add_bos must be True or False, got 0"),
             ((model, tok, [[3, 4]]), {"truncate": "no"}, TypeError, "truncate must be True or False"),
             ((model, tok, 5), {}, TypeError, "prompts must be a string, a list of token ids"),
             ((model, tok, [[3, 4]]), {"stop_ids": "x"}, TypeError, "stop_ids must be a list of token ids"),
             ((model, tok, [[3, 4]]), {"stop_ids": [2, "x"]}, TypeError, r"stop_ids must be token ids \(integers\)"),
             ((model, tok, [[3, 4]]), {"stop_ids": [True]}, TypeError, r"stop_ids must be token ids \(integers\)")]
    for args, kw, error, words in cases:
        with pytest.raises(error, match=words):
            ij.generate(*args, max_new_tokens=2, **kw)
    for stop_ids in (jnp.asarray([2, 5]), [jnp.int32(2), np.int64(5)], range(2, 3)):  # integers of any kind
        ij.generate(model, tok, [[3, 4]], max_new_tokens=2, stop_ids=stop_ids)
    # the same checks for token ids in (generate_ids) and the engine: no silent int() of a slip
    ids_cases = [(([[5.0, 6.0, 7.5]],), {}, TypeError, "prompt 0: token ids must be integers, got 5.0"),
                 (([[True, False]],), {}, TypeError, "prompt 0: token ids must be integers, got True"),
                 ((np.array([[5.0, 6.0]]),), {}, TypeError, "prompt 0: token ids must be integers, got an array"),
                 ((jnp.array([5, 6, 7]),), {}, ValueError, "prompt 0 is a single integer"),
                 (("hi",), {}, TypeError, "generate_ids takes token id lists, got str"),
                 (([b"hi"],), {}, TypeError, "prompt 0 is bytes"),
                 (([[3, 4]],), {"stop_ids": "23"}, TypeError, "stop_ids must be a list of token ids"),
                 (([[3, 4]],), {"stop_ids": [2.5]}, TypeError, r"stop_ids must be token ids \(integers\)"),
                 (([[3, 4]],), {"stop_ids": [-5]}, ValueError, "stop id -5 is outside the vocabulary")]
    for args, kw, error, words in ids_cases:
        with pytest.raises(error, match=words):
            ij.generate_ids(model, *args, max_new_tokens=2, **kw)
    with pytest.raises(TypeError, match="got bytes: decode them first"):
        ij.generate(model, tok, b"hi", max_new_tokens=2)
    assert ij.generate_ids(model, np.array([[3, 4]], np.int64), max_new_tokens=2, stop_ids=()) == \
        ij.generate_ids(model, [[3, 4]], max_new_tokens=2, stop_ids=())
    for stop_ids, words in (("2", "stop_ids must be a list"), ([-5, 1000], "stop id -5 is outside")):
        with pytest.raises(ij.EngineError, match=words):
            ij.Engine(model, stop_ids=stop_ids)
    assert ij.Engine(model, max_len=np.int64(32), max_batch=np.int32(2)).max_len == 32
    with pytest.raises(ij.EngineError, match="max_len must be an integer of at least 2"):
        ij.Engine(model, max_len=1)
    # 0-d JAX integers and floats count as the Python numbers they hold, everywhere (one rule)
    as_jax = dict(seed=jnp.int32(3), max_new_tokens=jnp.int32(3), max_length=jnp.int32(20),
                  temperature=jnp.float32(0.7), top_k=jnp.int32(5))
    plain = {k: v.item() for k, v in as_jax.items()}
    assert ij.generate_ids(model, [[3, 4]], stop_ids=(), **as_jax) == ij.generate_ids(model, [[3, 4]], stop_ids=(),
                                                                                        **plain)
    assert ij.generate(model, tok, list(jnp.asarray([3, 4])), max_new_tokens=2) == \
        ij.generate(model, tok, [3, 4], max_new_tokens=2)  # a flat list of JAX integers is one prompt
    eng = ij.Engine(model, max_batch=1, max_len=32, max_queue=np.int64(4))
    assert eng.check(list(jnp.asarray([3, 4])), max_tokens=jnp.int32(2), min_tokens=jnp.int32(1),
                     stop_ids=[jnp.int32(2)], logprobs=jnp.int32(1)).prompt == [3, 4]
    with pytest.raises(ij.EngineError, match="stop_ids must be a list of token ids, got 5"):
        eng.check([3, 4], max_tokens=2, stop_ids=5)
    with pytest.raises(ij.EngineError, match="stop token id 'x' is not a token id"):
        eng.check([3, 4], max_tokens=2, stop_ids=(s for s in [2, "x"]))  # a generator is checked too
    with pytest.raises(ij.EngineError, match="max_tokens must be a positive integer, got True"):
        eng.check([3, 4], max_tokens=True)
    assert eng.check([3, 4], max_tokens=2, ignore_eos=np.bool_(True)).ignore_eos is True  # as generate's switches
    # a top_k past int32 keeps every token, as one past the vocabulary does (generate and the engine alike)
    wide = dict(max_new_tokens=4, temperature=1.0, seed=1, stop_ids=())
    assert ij.generate_ids(model, [[3, 4]], top_k=2**31, **wide) == ij.generate_ids(model, [[3, 4]], **wide)
    with pytest.raises(TypeError, match="first argument must be an InternLM2 model"):
        ij.stream(tok, model, "hi")
    with pytest.raises(TypeError, match="second argument must be an internlm_jax Tokenizer"):
        ij.chat(model, model, [{"role": "user", "content": "hi"}])
    # a misspelt keyword is named against the function the user called, with the name meant
    engine = ij.Engine(model, max_batch=1, max_len=32)
    for call, words in [(lambda: ij.generate(model, tok, "hi", max_new_token=2), r"generate\(\) .* 'max_new_token' "
                         r"\(did you mean 'max_new_tokens'\?\)"),
                        (lambda: ij.generate(model, tok, "hi", temprature=0.5), "did you mean 'temperature'"),
                        (lambda: ij.chat(model, tok, [{"role": "user", "content": "hi"}], topk=3),
                         r"chat\(\) .* 'topk' \(did you mean 'top_k'\?\)"),
                        (lambda: ij.chat(model, tok, [{"role": "user", "content": "hi"}], add_bos=False),
                         r"chat\(\) got an unexpected keyword argument 'add_bos'; it takes frequency_penalty"),
                        (lambda: engine.submit([3, 4], max_token=2),
                         r"Engine.submit\(\) .* 'max_token' \(did you mean 'max_tokens'\?\)")]:
        with pytest.raises(TypeError, match=words):
            call()


def test_a_generation_compiles_its_decode_chunk_once(caplog):
    """Every input of the decode programs is committed to the device (the key included), so the second
    chunk reuses the first one's program instead of compiling it again for committed inputs."""
    m = ij.InternLM2(ij.InternLM2Config.from_dict(CFG), seed=5)
    with caplog.at_level(logging.WARNING), jax.log_compiles(True):
        ij.generate_ids(m, [[3, 4, 5]], max_new_tokens=48, stop_ids=(), max_length=64)  # three chunks of 16
    assert sum("Compiling jit(_chunk)" in r.getMessage() for r in caplog.records) == 1


def test_prompt_too_long_empty_and_truncation(model):
    long = list(range(3, 40))
    with pytest.raises(ValueError, match=r"prompt 0 has 37 tokens.*max_length=32.*truncate=True"):
        ij.generate_ids(model, [long], max_new_tokens=8)  # limit: 16 positions x dynamic factor 2
    kept = ij.generate_ids(model, [long], max_new_tokens=8, truncate=True, stop_ids=())
    assert kept == ij.generate_ids(model, [long[-24:]], max_new_tokens=8, stop_ids=())
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        ij.generate_ids(model, [[1, 2], []], max_new_tokens=4)
    with pytest.raises(ValueError, match="leaves no room"):
        ij.generate_ids(model, [[1, 2]], max_new_tokens=40)


@pytest.mark.parametrize("rope_scaling,limit", [(None, 16), ({"type": "linear", "factor": 3.0}, 48),
                                                ({"type": "dynamic", "factor": 2.0}, 32)])
def test_default_length_limit_follows_the_rope_scaling(rope_scaling, limit):
    """Linear scaling stretches the 16 trained positions threefold; dynamic NTK extrapolates as far."""
    m = ij.InternLM2(ij.InternLM2Config.from_dict({**CFG, "rope_scaling": rope_scaling}), seed=0)
    with pytest.raises(ValueError, match=rf"prompt 0 has {limit + 1} tokens.*max_length={limit}\b"):
        ij.generate_ids(m, [list(range(3, limit + 4))], max_new_tokens=2)


def test_cache_sharded_over_sequence_axis_gives_same_tokens(tmp_path):
    folder = write_hf_checkpoint(tmp_path, CFG, STATE)
    m = ij.InternLM2.from_pretrained(folder, mesh=ij.make_mesh(sequence=2, tensor=2, fsdp=2))
    gen = generator_for(m)
    ds, _ = gen.start(gen.prepare(PROMPTS), max_new_tokens=12)
    assert ds.cache.keys[0].sharding.spec[2] == "sequence"  # cache slots split over the sequence axis
    assert ij.generate_ids(m, PROMPTS, max_new_tokens=12, stop_ids=()) == _reference(STATE, CFG, PROMPTS, 12)


def test_the_blocked_argmax_and_draw_equal_jax_argmax_and_categorical():
    """Greedy and sampled tokens come from argmax_tokens / categorical_tokens (two-pass over a large
    vocabulary); they must pick exactly what jnp.argmax / jax.random.categorical pick, ties included."""
    rng = np.random.RandomState(0)
    for shape in [(3, 92544), (2, 4096 * 3), (4, 128)]:
        x = jnp.asarray(rng.randn(*shape).astype(np.float32))
        np.testing.assert_array_equal(argmax_tokens(x), jnp.argmax(x, -1))
        tied = x.at[:, 7].set(50.0).at[:, -2].set(50.0)
        np.testing.assert_array_equal(argmax_tokens(tied), np.full(shape[0], 7))
        for seed in range(4):
            key = jax.random.key(seed)
            np.testing.assert_array_equal(categorical_tokens(key, x * 3), jax.random.categorical(key, x * 3))


def test_generation_config_eos_ids_stop_generate_and_the_engine(tmp_path):
    """A checkpoint whose generation_config.json names an extra eos id stops there by default, in
    generate_ids and in the engine, as transformers' generate would; stop_ids=() still runs on."""
    import json

    from hf_fixtures import chain_checkpoint

    chain = [5, 9, 11, 13, 17, 19]
    folder = chain_checkpoint(tmp_path / "chain", chain)
    model = ij.InternLM2.from_pretrained(folder)
    assert ij.generate_ids(model, [[5]], max_new_tokens=5)[0] == chain[1:]
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 13]}))
    model = ij.InternLM2.from_pretrained(folder)
    assert ij.generate_ids(model, [[5]], max_new_tokens=5)[0] == [9, 11, 13]
    assert ij.generate_ids(model, [[5]], max_new_tokens=5, stop_ids=())[0] == chain[1:]
    engine = ij.Engine(model, max_len=32)
    request = engine.submit([5], max_tokens=5)
    engine.run_until_done([request])
    assert (request.tokens, request.finish_reason) == ([9, 11], "stop")  # (the stop id is not in tokens)
