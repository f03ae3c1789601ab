"""Continuous batching (internlm_jax.engine): requests join and leave a running batch.

The reference for every token is ``ij.generate_ids`` of the same prompt alone (itself checked against
the official implementation in test_generation / test_reference)."""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import internlm_jax as ij
from internlm_jax.cache import KVCache
from internlm_jax.engine import Engine, EngineError, QueueFull
from internlm_jax.generation import SamplingParams

CFG = ij.InternLM2Config(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
STOP = (2,)


@pytest.fixture(scope="module")
def model():
    return ij.InternLM2(CFG, seed=0)


def prompts_and_lengths(seed=0):
    rng = np.random.RandomState(seed)
    lengths = (5, 40, 300, 17, 3, 90, 130)
    return [list(rng.randint(3, 128, n)) for n in lengths], [20, 7, 12, 30, 1, 25, 9]


def alone(model, prompt, max_tokens, stop=STOP):
    out = ij.generate_ids(model, [prompt], max_new_tokens=max_tokens, stop_ids=stop)[0]
    return out[:-1] if out and out[-1] in stop else out


def test_batched_greedy_equals_each_prompt_alone(model):
    prompts, budgets = prompts_and_lengths()
    engine = Engine(model, max_batch=3, max_len=400, prefill_chunk=64, stop_ids=STOP)  # 7 requests, 3 rows
    requests = [engine.submit(p, max_tokens=m) for p, m in zip(prompts, budgets)]
    engine.run_until_done()
    for r, p, m in zip(requests, prompts, budgets):
        want = alone(model, p, m)
        assert r.tokens == want, (len(p), r.tokens, want)
        assert r.finish_reason == ("length" if len(want) == m else "stop")
    assert engine.stats["prefill_tokens"] == sum(map(len, prompts))


def test_a_request_gets_the_same_tokens_alone_and_among_others(model):
    prompts, _ = prompts_and_lengths(1)
    target, kw = prompts[3], dict(max_tokens=24, temperature=0.9, top_k=20, top_p=0.9, repetition_penalty=1.2,
                                  seed=7)
    solo = Engine(model, max_batch=4, max_len=400, prefill_chunk=32, stop_ids=STOP)
    a = solo.submit(target, **kw)
    solo.run_until_done()
    crowd = Engine(model, max_batch=4, max_len=400, prefill_chunk=32, stop_ids=STOP)
    others = [crowd.submit(p, max_tokens=n, temperature=t, seed=s)
              for p, n, t, s in zip(prompts[:3], (5, 30, 11), (0.0, 1.0, 0.5), (1, 2, 3))]
    b = crowd.submit(target, **kw)  # joins while the others run, in whatever row is free
    crowd.run_until_done()
    assert a.tokens == b.tokens and len(a.tokens) > 0
    assert all(o.finished.is_set() for o in others)
    # greedy: also equal to generate alone
    g = Engine(model, max_batch=4, max_len=400, prefill_chunk=32, stop_ids=STOP)
    reqs = [g.submit(p, max_tokens=15) for p in prompts[:4]]
    g.run_until_done()
    assert [r.tokens for r in reqs] == [alone(model, p, 15) for p in prompts[:4]]


def test_a_long_prefill_does_not_stall_running_decodes(model):
    prompts, _ = prompts_and_lengths(2)
    engine = Engine(model, max_batch=2, max_len=400, prefill_chunk=32, stop_ids=())
    running = engine.submit(prompts[0], max_tokens=250)
    while not running.tokens:
        engine.step()
    long = engine.submit(prompts[2], max_tokens=4)  # 300 tokens: ten chunks of 32
    progress = []
    while not long.tokens:
        before = len(running.tokens)
        engine.step()
        progress.append(len(running.tokens) - before)
    assert len(progress) >= 300 // 32  # the long prompt took several steps ...
    assert all(n > 0 for n in progress)  # ... and the running request got tokens at every one of them
    engine.run_until_done()
    assert long.tokens == alone(model, prompts[2], 4, stop=())
    assert running.tokens == alone(model, prompts[0], 250, stop=())


def test_finished_requests_free_their_row_at_once(model):
    prompts, _ = prompts_and_lengths(3)
    engine = Engine(model, max_batch=1, max_len=400, prefill_chunk=64, stop_ids=())
    first = engine.submit(prompts[0], max_tokens=3)
    second = engine.submit(prompts[1], max_tokens=3)
    engine.step()  # prefill + one chunk: the first is done, its row free
    assert first.finished.is_set() and engine.rows[0] is None
    engine.step()
    assert second.finished.is_set()
    assert second.tokens == alone(model, prompts[1], 3, stop=())


def test_a_cancelled_request_frees_its_row(model):
    prompts, _ = prompts_and_lengths(4)
    engine = Engine(model, max_batch=1, max_len=400, stop_ids=())
    a = engine.submit(prompts[0], max_tokens=300)
    b = engine.submit(prompts[1], max_tokens=5)
    engine.step()
    a.cancel()
    engine.run_until_done()
    assert a.finish_reason == "cancelled" and 0 < len(a.tokens) < 300
    assert b.tokens == alone(model, prompts[1], 5, stop=())


def test_a_callback_that_raises_ends_only_its_own_request(model):
    """Stepped by hand and on the engine's thread: the others' tokens are complete and the engine serves on."""
    prompts, _ = prompts_and_lengths(5)

    def boom(request, new):
        if new:
            raise RuntimeError("user callback bug")

    engine = Engine(model, max_batch=2, max_len=400, stop_ids=())
    bad, good = engine.submit(prompts[0], max_tokens=30, on_update=boom), engine.submit(prompts[1], max_tokens=30)
    engine.run_until_done()
    assert bad.finish_reason == "error:RuntimeError" and engine.stats["callback_errors"] == 1
    assert good.tokens == alone(model, prompts[1], 30, stop=()) and good.finish_reason == "length"
    engine.start()
    try:
        bad, good = engine.submit(prompts[2], max_tokens=9, on_update=boom), engine.submit(prompts[3], max_tokens=9)
        assert good.wait(120) == alone(model, prompts[3], 9, stop=())
        bad.wait(120)
        assert bad.finish_reason == "error:RuntimeError"
        later = engine.submit(prompts[4], max_tokens=4)
        assert later.wait(120) == alone(model, prompts[4], 4, stop=())
    finally:
        engine.stop()


def test_a_stop_that_times_out_is_not_followed_by_a_second_loop(model):
    prompts, _ = prompts_and_lengths(6)
    engine = Engine(model, max_batch=1, max_len=400, stop_ids=()).start()
    first = engine.submit(prompts[0], max_tokens=200)
    engine.stop(timeout=0.01)  # 200 tokens take longer: the loop is still draining
    with pytest.raises(EngineError, match="still stopping"):
        engine.start()
    engine.stop()
    assert first.finish_reason == "length" and first.tokens == alone(model, prompts[0], 200, stop=())
    engine.start()
    try:
        assert engine.submit(prompts[1], max_tokens=3).wait(120) == alone(model, prompts[1], 3, stop=())
    finally:
        engine.stop()


def test_request_stop_ids_and_bad_requests(model):
    prompts, _ = prompts_and_lengths(5)
    engine = Engine(model, max_batch=2, max_len=64, max_queue=2, stop_ids=STOP)
    free = alone(model, prompts[0], 10)
    r = engine.submit(prompts[0], max_tokens=10, stop_ids=[free[3]])
    engine.run_until_done()
    assert r.tokens == free[:free.index(free[3])] and r.finish_reason == "stop"
    with pytest.raises(EngineError, match="max_tokens"):
        engine.submit([5, 6], max_tokens=0)
    with pytest.raises(EngineError, match="exceeds the context of 64"):
        engine.submit(list(range(3, 63)), max_tokens=5)
    with pytest.raises(EngineError, match="empty"):
        engine.submit([], max_tokens=5)
    with pytest.raises(EngineError, match="outside the vocabulary"):
        engine.submit([5, 500], max_tokens=5)
    for bad in (-1, 128, 2.0):
        with pytest.raises(EngineError, match=f"stop token id {bad!r} is not a token id"):
            engine.submit([5], max_tokens=5, stop_ids=[bad])
    with pytest.raises(EngineError, match="top_p"):
        engine.submit([5], max_tokens=5, top_p=0)
    engine.submit([5], max_tokens=2)
    engine.submit([6], max_tokens=2)
    with pytest.raises(QueueFull):
        engine.submit([7], max_tokens=2)


def reference_logprobs(model, prompt, tokens):
    """float32 log-softmax of the plain forward's logits at each generated token's position."""
    logits = np.asarray(model(np.asarray([list(prompt) + list(tokens)], np.int32)), np.float64)[0]
    logits = logits[len(prompt) - 1:len(prompt) - 1 + len(tokens)]
    return logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(
        -1, keepdims=True)


def test_logprobs_are_the_models_and_do_not_change_the_tokens(model):
    prompts, _ = prompts_and_lengths(7)
    engine = Engine(model, max_batch=3, max_len=400, prefill_chunk=64, stop_ids=STOP)
    plain = engine.submit(prompts[1], max_tokens=12)
    greedy = engine.submit(prompts[1], max_tokens=12, logprobs=3)
    drawn = engine.submit(prompts[3], max_tokens=12, temperature=1.5, top_k=10, seed=4, logprobs=0)
    engine.run_until_done()
    assert greedy.tokens == plain.tokens == alone(model, prompts[1], 12) and plain.token_logprobs == []
    for r, prompt in ((greedy, prompts[1]), (drawn, prompts[3])):
        want = reference_logprobs(model, prompt, r.tokens)
        assert len(r.token_logprobs) == len(r.top_logprobs) == len(r.tokens) > 0
        got = np.asarray(r.token_logprobs)
        np.testing.assert_allclose(got, want[np.arange(len(r.tokens)), r.tokens], atol=2e-5, rtol=1e-5)
        for row, top in zip(want, r.top_logprobs):  # the k most likely, most likely first, raw logits
            assert len(top) == r.logprobs
            assert [t for t, _ in top] == list(np.argsort(-row)[:r.logprobs])
            np.testing.assert_allclose([lp for _, lp in top], np.sort(row)[::-1][:r.logprobs], atol=2e-5, rtol=1e-5)
    assert [top[0][0] for top in greedy.top_logprobs] == greedy.tokens  # greedy picks the most likely
    # prompt logprobs, filled in over several prefill chunks (64 tokens each)
    long = engine.submit(prompts[2], max_tokens=2, prompt_logprobs=2)
    engine.run_until_done()
    want = reference_logprobs(model, prompts[2][:1], prompts[2][1:])
    assert len(long.prompt_token_logprobs) == len(prompts[2]) - 1 > 128 and long.token_logprobs == []
    np.testing.assert_allclose(long.prompt_token_logprobs, want[np.arange(len(want)), prompts[2][1:]], atol=2e-5,
                               rtol=1e-5)
    assert [[t for t, _ in top] for top in long.prompt_top_logprobs] == [list(np.argsort(-r)[:2]) for r in want]
    assert long.tokens == alone(model, prompts[2], 2)
    with pytest.raises(EngineError, match="logprobs must be an integer from 0 to 20"):
        engine.submit([5], max_tokens=2, logprobs=21)


def test_on_a_tensor_parallel_mesh(model):
    prompts, budgets = prompts_and_lengths(6)
    sharded = ij.InternLM2(CFG, seed=0, mesh=ij.make_mesh(tensor=2, fsdp=2))
    engine = Engine(sharded, max_batch=2, max_len=400, prefill_chunk=64, stop_ids=STOP)
    requests = [engine.submit(p, max_tokens=m) for p, m in zip(prompts[:4], budgets[:4])]
    engine.run_until_done()
    assert [r.tokens for r in requests] == [alone(model, p, m) for p, m in zip(prompts[:4], budgets[:4])]
    # logprobs on the mesh (the vocabulary split over `tensor`) equal one device's
    scored = [Engine(m, max_batch=2, max_len=400, prefill_chunk=64, stop_ids=STOP) for m in (model, sharded)]
    got = [e.submit(prompts[5], max_tokens=6, temperature=0.8, seed=3, logprobs=3, prompt_logprobs=2)
           for e in scored]
    for e in scored:
        e.run_until_done()
    a, b = got
    assert a.tokens == b.tokens and [[t for t, _ in x] for x in a.top_logprobs] == [[t for t, _ in x]
                                                                                 for x in b.top_logprobs]
    np.testing.assert_allclose(b.token_logprobs, a.token_logprobs, atol=1e-5)
    np.testing.assert_allclose(b.prompt_token_logprobs, a.prompt_token_logprobs, atol=1e-5)
    # the rows split over fsdp: a prefill chunk moves at most one row of the cache, not every row
    wide = Engine(sharded, max_batch=4, max_len=512, prefill_chunk=64, stop_ids=STOP)
    row = CFG.num_key_value_heads // 2 * 512 * CFG.head_dim  # one row's slots on one device
    assert wide.ds.cache.keys[0].sharding.shard_shape(wide.ds.cache.keys[0].shape)[0] == 2
    sizes = [math.prod(shape) for shape in collective_shapes(extend_text(wide))]
    assert sizes and max(sizes) <= row, sizes


def test_data_parallel_rows_stay_on_their_devices(model):
    """Rows split over ``data``: the same greedy tokens as alone; a decode chunk needs no collective at all
    (each device writes and reads its own rows) and a prefill chunk all-reduces one row of the cache."""
    prompts, budgets = prompts_and_lengths(6)
    engine = Engine(ij.InternLM2(CFG, seed=0, mesh=ij.make_mesh(data=4, fsdp=1, devices=jax.devices()[:4])),
                    max_batch=4, max_len=512, prefill_chunk=64, stop_ids=STOP)
    requests = [engine.submit(p, max_tokens=m) for p, m in zip(prompts, budgets)]
    engine.run_until_done()
    assert [r.tokens for r in requests] == [alone(model, p, m) for p, m in zip(prompts, budgets)]
    gen, ds = engine.gen, engine.ds
    decode = gen.chunk.lower(gen.state, gen.layers, ds, engine.base, steps=4, sampling=SamplingParams(),
                             stop_ids=tuple(STOP)).compile().as_text()
    assert collective_shapes(decode) == []
    row = CFG.num_key_value_heads * 512 * CFG.head_dim
    assert max(math.prod(shape) for shape in collective_shapes(extend_text(engine))) <= row


def collective_shapes(hlo: str) -> list[tuple[int, ...]]:
    """The result shapes of the gathers, all-reduces and permutes in compiled HLO text."""
    ops = re.finditer(r"= \(?\w+\[([\d,]*)\][^\n]*? (?:all-gather|all-reduce|all-to-all|collective-permute)\(", hlo)
    return [tuple(int(n) for n in m.group(1).split(",") if n) for m in ops]


def extend_text(engine: Engine, size: int = 64) -> str:
    """The compiled HLO of the engine's prefill chunk of ``size`` tokens (row 0, attending to every slot)."""
    gen, ds = engine.gen, engine.ds
    return gen.extend.lower(gen.state, gen.layers, ds.cache, np.zeros(size, np.int32),
                            np.arange(size, dtype=np.int32), np.int32(0), np.int32(0), np.int32(10), np.int32(10),
                            np.zeros(size, np.int32), logprobs=-1, keys=engine.max_len).compile().as_text()


def test_on_a_mesh_with_a_sequence_axis(model):
    """The cache slots split over ``sequence`` (with tensor and fsdp): the same greedy tokens as a request
    alone on one device; and where the batch is not sharded, the compiled prefill chunk and decode chunk
    move no buffer holding more than a device's own slots (the cache stays split)."""
    prompts, budgets = prompts_and_lengths(6)
    sharded = ij.InternLM2(CFG, seed=0, mesh=ij.make_mesh(sequence=2, tensor=2, fsdp=2))
    engine = Engine(sharded, max_batch=2, max_len=400, prefill_chunk=64, stop_ids=STOP)
    requests = [engine.submit(p, max_tokens=m) for p, m in zip(prompts[:4], budgets[:4])]
    engine.run_until_done()
    assert [r.tokens for r in requests] == [alone(model, p, m) for p, m in zip(prompts[:4], budgets[:4])]

    split = Engine(ij.InternLM2(CFG, seed=0, mesh=ij.make_mesh(sequence=4, tensor=2)), max_batch=2, max_len=512,
                   prefill_chunk=64, stop_ids=STOP)
    gen, ds = split.gen, split.ds
    assert ds.cache.keys[0].sharding.shard_shape(ds.cache.keys[0].shape)[2] == 128
    texts = [extend_text(split), gen.chunk.lower(gen.state, gen.layers, ds, split.base, steps=4,
                                                 sampling=SamplingParams(), stop_ids=tuple(STOP)).compile().as_text()]
    moved = [shape for text in texts for shape in collective_shapes(text)]
    assert moved and not [shape for shape in moved if any(n > 128 for n in shape)], moved


def reference_greedy(model, prompt, n, stop=STOP, *, presence=0.0, frequency=0.0, banned=(), until=0):
    """Greedy tokens, one plain forward of the whole sequence per token, in float64: OpenAI's presence and
    frequency penalties over the generated tokens, and the ``banned`` ids' logits at -inf while fewer than
    ``until`` tokens were made (vLLM's min_tokens); stops before a ``stop`` id."""
    ids, out, counts = list(prompt), [], np.zeros(CFG.vocab_size)
    width = len(prompt) + n  # right-padded to one shape (one compile); causal: the padding is not seen
    for _ in range(n):
        logits = np.asarray(model(np.asarray([ids + [0] * (width - len(ids))], np.int32))[0, len(ids) - 1],
                            np.float64)
        logits = logits - frequency * counts - presence * (counts > 0)
        if len(out) < until:
            logits[list(banned)] = -np.inf
        t = int(np.argmax(logits))
        if t in stop:
            break
        out.append(t)
        counts[t] += 1
        ids.append(t)
    return out


def test_min_tokens_and_ignore_eos(model):
    """min_tokens keeps the stop ids (the engine's and the request's) from being sampled for that many
    tokens; ignore_eos lets the engine's stop ids through as ordinary tokens. Rows with and without
    them share the batch; each equals a step-by-step reference."""
    prompts, _ = prompts_and_lengths(2)
    free = [reference_greedy(model, p, 24, stop=()) for p in prompts[:4]]
    # a stop id each unrestricted reply meets early (its 3rd token), so that both settings change the tokens
    early = [f[2] for f in free]
    engine = Engine(model, max_batch=3, max_len=400, prefill_chunk=64, stop_ids=(early[0],))
    cases = [(0, dict(min_tokens=10),
              reference_greedy(model, prompts[0], 24, (early[0],), banned=(early[0],), until=10)),
             (1, dict(min_tokens=6, stop_ids=[early[1]]),
              reference_greedy(model, prompts[1], 24, (early[0], early[1]), banned=(early[0], early[1]), until=6)),
             (0, dict(ignore_eos=True), free[0]),
             (2, dict(ignore_eos=True, stop_ids=[early[2]]), reference_greedy(model, prompts[2], 24, (early[2],))),
             (3, {}, reference_greedy(model, prompts[3], 24, (early[0],)))]
    assert all(want != free[i] for i, _, want in cases[:2]) and len(cases[0][2]) > 10
    requests = [engine.submit(prompts[i], max_tokens=24, **kw) for i, kw, _ in cases]
    engine.run_until_done()
    assert [r.tokens for r in requests] == [want for _, _, want in cases]
    assert [r.finish_reason for r in requests] == ["length" if len(w) == 24 else "stop" for _, _, w in cases]
    with pytest.raises(EngineError, match="min_tokens must be an integer from 0 to max_tokens"):
        engine.submit(prompts[0], max_tokens=4, min_tokens=5)
    with pytest.raises(EngineError, match="ignore_eos"):
        engine.submit(prompts[0], max_tokens=4, ignore_eos="yes")


def test_presence_and_frequency_penalties_follow_the_reference(model):
    """generate (a left-padded batch) and the engine (rows of mixed settings, reused after a penalized
    request) equal a step-by-step reference; the penalties change the tokens, so the check can fail."""
    prompts, _ = prompts_and_lengths(3)
    settings = [(0.0, 1.5), (1.0, 0.0), (0.5, 0.7), (0.0, 0.0), (-0.5, 0.3), (0.0, 1.5)]
    want = [reference_greedy(model, p, 16, presence=pr, frequency=fr) for p, (pr, fr) in zip(prompts, settings)]
    assert any(w != alone(model, p, 16) for w, p in zip(want, prompts))
    for (pr, fr), group in ((settings[0], [0, 5]), (settings[2], [2])):  # one setting per generate call
        got = ij.generate_ids(model, [prompts[i] for i in group], max_new_tokens=16, presence_penalty=pr,
                              frequency_penalty=fr, stop_ids=STOP)
        assert [g[:-1] if g and g[-1] in STOP else g for g in got] == [want[i] for i in group]
    engine = Engine(model, max_batch=2, max_len=400, prefill_chunk=64, stop_ids=STOP)  # rows are reused
    order = [3, 0, 1, 2, 4, 5]  # a plain request first: the counts start while it runs
    requests = {i: engine.submit(prompts[i], max_tokens=16, presence_penalty=settings[i][0],
                                 frequency_penalty=settings[i][1]) for i in order}
    engine.run_until_done()
    assert [requests[i].tokens for i in range(len(settings))] == want
    with pytest.raises(EngineError, match="frequency_penalty"):
        engine.submit(prompts[0], max_tokens=4, frequency_penalty=2.5)
    with pytest.raises(ValueError, match="presence_penalty"):
        ij.generate_ids(model, [prompts[0]], max_new_tokens=4, presence_penalty="high")


def test_a_chunk_attends_over_long_rows_in_key_blocks(model):
    """Past ``blockwise_from`` slots a prefill chunk folds key blocks (one block of scores at a time; the
    last block not a divisor of the row): its prompt scores equal the dense [C, span] form's, and the
    greedy tokens equal generate's; the compiled chunk's scratch no longer grows with C x span."""
    rng = np.random.RandomState(3)
    prompt, runs = list(rng.randint(3, 128, 300)), {}
    for name, settings in (("dense", {}), ("blocks", {"blockwise_from": 32, "block": 24})):
        m = ij.InternLM2(CFG, seed=0).configure(**settings)
        engine = Engine(m, max_batch=2, max_len=400, prefill_chunk=64, stop_ids=STOP)
        request = engine.submit(prompt, max_tokens=12, prompt_logprobs=0)
        engine.run_until_done([request])
        runs[name] = (np.asarray(request.prompt_token_logprobs), request.tokens)
    got, want = runs["blocks"][0], runs["dense"][0]
    assert np.max(np.abs(got - want)) <= 1e-5 * np.max(np.abs(want))
    assert runs["blocks"][1] == runs["dense"][1] == alone(model, prompt, 12)

    def scratch(settings):  # a 512-token chunk at the end of an 8192-slot row
        graphdef, state = nnx.split(ij.InternLM2(CFG, seed=0).configure(**settings))
        chunk = jax.jit(lambda state, cache, tokens, positions: nnx.merge(graphdef, state).forward_extend(
            tokens, positions, cache, 0, 7680, 512, 8192, keys=8192))
        ids = jax.ShapeDtypeStruct((512,), jnp.int32)
        compiled = chunk.lower(state, KVCache.abstract(CFG, 1, 8192, jnp.float32), ids, ids).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    scores = 4 * 512 * 8192 * 4  # one [C, span] float32 score matrix per head
    assert scratch({"attention": "dense"}) >= scores > 4 * scratch({})  # default: blocks past 4096 slots


def test_a_request_past_the_context_does_not_change_the_rope_of_others():
    """Dynamic NTK: each row's decode base follows its own position, as it would alone (the reference
    computes it per call, and a request alone is its own call), not the longest row's: a short request's
    scores are the same beside one decoding past max_position_embeddings as alone."""
    cfg = CFG.replace(max_position_embeddings=150, rope_scaling={"type": "dynamic", "factor": 2.0})
    m = ij.InternLM2(cfg, seed=0)
    rng = np.random.RandomState(4)
    short, long = list(rng.randint(3, 128, 37)), list(rng.randint(3, 128, 300))
    runs = []
    for prompts in ([(short, 80)], [(long, 16), (short, 80)]):
        engine = Engine(m, max_batch=2, max_len=400, prefill_chunk=64, stop_ids=())
        requests = [engine.submit(p, max_tokens=n, logprobs=0) for p, n in prompts]
        engine.run_until_done(requests)
        runs.append(requests)
    (alone_short,), (beside_long, beside_short) = runs
    assert beside_short.tokens == alone_short.tokens
    np.testing.assert_allclose(beside_short.token_logprobs, alone_short.token_logprobs, rtol=0, atol=1e-5)
    assert [beside_long.tokens, alone_short.tokens] == [
        ij.generate_ids(m, [p], max_new_tokens=n, stop_ids=(), max_length=400)[0] for p, n in ((long, 16), (short, 80))]
