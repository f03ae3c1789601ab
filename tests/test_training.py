"""Continued pretraining: parity with HF transformers, sharded steps, overfitting, exact resume, data."""

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference as ref
from flax import nnx
from hf_fixtures import ROOT, tiny_config, user_env, write_hf_checkpoint

import internlm_jax as ij
from internlm_jax import weights
from internlm_jax.training import PackedDataset, TrainConfig, make_optimizer, make_train_step
from internlm_jax.training.config import OptimSection
from internlm_jax.training.step import loss_fn

CFG = tiny_config(bias=True, rope_scaling=None, max_position_embeddings=64)
STATE = ref.random_state(CFG, 21)


def _batch(seed=0, b=4, s=16, vocab=CFG["vocab_size"], segments=False):
    r = np.random.RandomState(seed)
    w = r.randint(3, vocab, (b, s + 1))
    seg = np.zeros((b, s), np.int32)
    if segments:
        seg[:, s // 2:] = 1
    return {"inputs": jnp.asarray(w[:, :-1]), "targets": jnp.asarray(w[:, 1:]), "segment_ids": jnp.asarray(seg),
            "loss_mask": jnp.ones((b, s), jnp.float32), "weight": jnp.ones((b, s), jnp.float32)}


def _hf_layout(model_cfg, flat_params):
    """Our parameter (or gradient) arrays -> the HF InternLM2 state layout, through the one name map."""
    out = {}
    for t in weights.hf_tensors(model_cfg):
        parts = {p: np.asarray(flat_params[p] if t.layer is None else flat_params[p][t.layer], np.float64)
                 for p in t.targets}
        out[t.name] = weights.from_params(t, parts, model_cfg)
    return out


def test_loss_and_gradients_match_hf_transformers(tmp_path):
    torch = pytest.importorskip("torch")
    from transformers import LlamaForCausalLM

    model = ij.InternLM2.from_pretrained(write_hf_checkpoint(tmp_path, CFG, STATE))
    graphdef, params = nnx.split(model)
    batch = _batch()
    (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, graphdef, batch, segments=False, z_loss=0.0)

    llama = LlamaForCausalLM(ref.llama_config_from_internlm2(CFG))
    llama.load_state_dict({k: torch.from_numpy(v) for k, v in ref.llama_state_from_internlm2(STATE, CFG).items()},
                          strict=False)
    logits = llama(torch.from_numpy(np.array(batch["inputs"], np.int64))).logits
    hf_loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                torch.from_numpy(np.array(batch["targets"], np.int64)).reshape(-1))
    hf_loss.backward()
    assert abs(float(loss) - hf_loss.item()) < 1e-5
    flat = {".".join(map(str, k)): v.get_value() for k, v in nnx.to_flat_state(grads)}
    ours = ref.llama_state_from_internlm2(_hf_layout(model.config, flat), CFG)
    hf_grads = {n: p.grad.numpy() for n, p in llama.named_parameters()}
    for name, g in ours.items():
        scale = max(np.abs(hf_grads[name]).max(), 1e-8)
        assert np.abs(g - hf_grads[name]).max() / scale < 1e-4, name


@pytest.mark.parametrize("axes", [dict(data=2, fsdp=2, tensor=2), dict(sequence=2, tensor=2, fsdp=2), dict(fsdp=8)],
                         ids=["data2xfsdp2xtensor2", "seq2xtensor2xfsdp2", "fsdp8"])
def test_sharded_step_equals_single_device(tmp_path, axes):
    folder = write_hf_checkpoint(tmp_path, CFG, STATE)
    results = []
    for mesh in (ij.make_mesh(devices=jax.devices()[:1]), ij.make_mesh(**axes)):
        model = ij.InternLM2.from_pretrained(folder, mesh=mesh)
        graphdef, params = nnx.split(model)
        tx, schedule = make_optimizer(OptimSection(lr=1e-2, warmup_steps=1, grad_accum=2), 10)
        step = jax.jit(make_train_step(graphdef, tx, grad_accum=2, segments=True, z_loss=1e-4, schedule=schedule))
        opt_state = jax.jit(tx.init)(params)
        losses = []
        for i in range(2):
            params, opt_state, m = step(params, opt_state, _batch(seed=i, segments=True), i)
            losses.append(float(m["loss"]))
        results.append((losses, params))
    (l1, p1), (l8, p8) = results
    np.testing.assert_allclose(l8, l1, rtol=1e-5)
    for (path, a), (_, b) in zip(nnx.to_flat_state(p1), nnx.to_flat_state(p8)):
        np.testing.assert_allclose(np.asarray(b.get_value()), np.asarray(a.get_value()), atol=1e-5, err_msg=str(path))


def _write_config(tmp_path, tokenizer, corpus, steps=40, every=10, extra=None):
    overrides = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                 "num_key_value_heads": 2}
    if Path(tokenizer).name == "small_tokenizer.model":  # a model sized to that tokenizer's vocabulary
        overrides["vocab_size"] = ij.Tokenizer(tokenizer).vocab_size
    cfg = {
        "model": {"preset": "internlm2_5-7b", "dtype": "float32", "param_dtype": "float32",
                  "overrides": overrides},
        "tokenizer": str(tokenizer), "data": {"train": [str(corpus)], "seq_len": 16, "batch_size": 8},
        "optim": {"lr": 3e-3, "warmup_steps": 5, "weight_decay": 0.0},
        "checkpoint": {"dir": str(tmp_path / "ckpt"), "every": every, "keep": 2},
        "log": {"every": 1, "jsonl": str(tmp_path / "metrics.jsonl"), "peak_tflops": 1.0},
        "steps": steps, "seed": 0}
    for k, v in (extra or {}).items():
        cfg[k] = v
    import yaml

    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


CORPUS = ["The quick brown fox jumps over the lazy dog.", "Sharded arrays live on a mesh of devices."]


@pytest.fixture
def small_tokenizer(tmp_path):
    """A SentencePiece model with InternLM2's special tokens trained on the example corpus (offline,
    ~400 pieces): the long training tests then run a model with a small output layer, and need no
    ../shared."""
    texts = (ROOT / "examples" / "data" / "tiny_corpus.txt").read_text().splitlines() + CORPUS
    return ij.Tokenizer.train(texts, tmp_path / "small_tokenizer.model").model_file


def test_training_reproduces_a_tiny_corpus(tmp_path, small_tokenizer):
    tokenizer_path = small_tokenizer
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(CORPUS * 8) + "\n")  # enough windows that every token is seen in context
    cfg = TrainConfig.from_yaml(_write_config(tmp_path, tokenizer_path, corpus, steps=120, every=1000, extra={
        "export_hf": str(tmp_path / "hf"), "eval_every": 60,
        "data": {"train": [str(corpus)], "eval": str(corpus), "seq_len": 16, "batch_size": 8}}))
    from internlm_jax.training import train

    history = train(cfg)
    assert history[-1]["loss"] < 0.3 < history[0]["loss"]
    tok = ij.Tokenizer.from_pretrained(tokenizer_path)
    model = ij.InternLM2.from_pretrained(tmp_path / "hf")  # the exported HF folder
    for line in CORPUS:
        ids = tok.encode(line, add_bos=True)
        out = ij.generate_ids(model, [ids[:4]], max_new_tokens=len(ids) - 4, stop_ids=())[0]
        assert out == ids[4:], (tok.decode(out), line)
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert {"step", "loss", "lr", "grad_norm", "tokens_per_s", "mfu"} <= set(records[0])
    assert [r["step"] for r in records] == list(range(1, 121))
    # the run's checkpoint exports through the conversion tool to the same weights as export_hf
    from internlm_jax.cli import main

    assert main(["convert", "train-to-hf", str(tmp_path / "ckpt"), str(tmp_path / "hf2"), "--quiet"]) == 0
    ids = np.asarray([tok.encode(CORPUS[1])])
    np.testing.assert_array_equal(np.asarray(ij.InternLM2.from_pretrained(tmp_path / "hf2")(ids)),
                                  np.asarray(model(ids)))
    evals = [r["eval_ppl"] for r in records if "eval_ppl" in r]
    assert len(evals) == 2 and evals[1] < evals[0] and evals[1] < 1.5  # perplexity on the (memorised) corpus


def _losses(path):
    out = {}
    for line in Path(path).read_text().splitlines():
        r = json.loads(line)
        out[r["step"]] = r["loss"]
    return out


def test_killed_run_resumes_exactly(tmp_path, small_tokenizer):
    tokenizer_path = small_tokenizer
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(CORPUS * 3) + "\n")
    env = user_env()
    cmd = lambda cfg: [sys.executable, "-m", "internlm_jax.training", "--config", str(cfg), "--devices", "4"]  # noqa: E731
    whole = tmp_path / "whole"
    whole.mkdir()
    done = subprocess.run(cmd(_write_config(whole, tokenizer_path, corpus, steps=30)), env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    killed = tmp_path / "killed"
    killed.mkdir()
    cfg = _write_config(killed, tokenizer_path, corpus, steps=30)
    proc = subprocess.Popen(cmd(cfg), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if (killed / "ckpt" / "20").is_dir() and len(_losses(killed / "metrics.jsonl")) >= 22:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = subprocess.run(cmd(cfg), env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed from" in done.stdout
    a, b = _losses(whole / "metrics.jsonl"), _losses(killed / "metrics.jsonl")
    assert sorted(b) == list(range(1, 31))
    assert [b[s] for s in range(1, 31)] == [a[s] for s in range(1, 31)]  # bit-identical losses


def test_data_order_is_deterministic_resumable_and_shared(tmp_path):
    tokens = np.arange(3, 3 + 16 * 20 + 1, dtype=np.int32)
    tokens[::37] = 2  # EOS: document boundaries
    np.save(tmp_path / "t.npy", tokens)
    ds = PackedDataset([str(tmp_path / "t.npy")], None, 16, seed=5)
    again = PackedDataset([str(tmp_path / "t.npy")], None, 16, seed=5)
    for step in (0, 3, 7, 11):  # batch t depends only on (seed, t): resuming is exact
        np.testing.assert_array_equal(ds.batch(step, 4).inputs, again.batch(step, 4).inputs)
    halves = [ds.batch(2, 4, p, 2) for p in range(2)]
    np.testing.assert_array_equal(np.concatenate([h.inputs for h in halves]), ds.batch(2, 4).inputs)
    b = ds.batch(0, 4)
    np.testing.assert_array_equal(b.targets[:, :-1], b.inputs[:, 1:])
    window, docs = ds.window(ds.window_at(0))  # row 0 of batch 0
    np.testing.assert_array_equal(b.inputs[0], window[:-1])
    np.testing.assert_array_equal(b.loss_mask[0], (docs[1:] == docs[:-1]).astype(np.float32))
    assert 0 < b.loss_mask.mean() < 1 and b.segment_ids[0, 0] == 0
    seen = np.concatenate([ds.batch(s, 4).inputs[:, 0] for s in range(5)])  # 20 windows = one epoch
    assert len(set(seen.tolist())) == 20
    with pytest.raises(FileNotFoundError):
        PackedDataset([str(tmp_path / "missing.txt")], None, 16)
    (tmp_path / "bad.jsonl").write_text('{"txt": 1}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1"):
        PackedDataset([str(tmp_path / "bad.jsonl")], object(), 16)


def test_config_errors():
    with pytest.raises(ValueError, match="unknown key 'lr'"):
        TrainConfig.from_dict({"lr": 1})
    with pytest.raises(ValueError, match="optim: unknown key 'learning_rate'"):
        TrainConfig.from_dict({"optim": {"learning_rate": 1}})
    cfg = TrainConfig.from_dict({"model": {"preset": "internlm2-1_8b", "checkpoint": "x"}, "data": {"train": ["a"]}})
    with pytest.raises(ValueError, match="exactly one"):
        cfg.validate()


def test_typed_config_reads_numbers_as_written_and_names_wrong_fields(tmp_path, capsys):
    import yaml

    from internlm_jax.cli import main

    example = TrainConfig.from_yaml(str(Path(__file__).parents[1] / "examples" / "train_tiny.yaml"))
    assert example.optim.lr == 3e-3 and example.data.seq_len == 32  # every current key still works
    cfg = TrainConfig.from_dict(yaml.safe_load("optim: {lr: 3e-4, weight_decay: 1e-1}\nsteps: 5\n"))
    assert isinstance(cfg.optim.lr, float) and cfg.optim.lr == 3e-4 and cfg.optim.weight_decay == 0.1
    cases = {"steps: many": "steps: Input should be a valid integer",
             "optim: {lr: fast}": "optim.lr: Input should be a valid number",
             "optim: {lr: -1e-3}": "optim.lr: Input should be greater than 0",
             "optim: {b2: 1.5}": "optim.b2: Input should be less than 1",
             "data: {seq_len: 0}": "data.seq_len: Input should be greater than or equal to 1",
             "model: {dtype: fp8}": "model.dtype: Input should be 'float32', 'bfloat16' or 'float16'",
             "mesh: {tensor: 0}": "mesh.tensor",
             "log: {every: [1]}": "log.every"}
    for text, words in cases.items():
        with pytest.raises(ValueError, match=re.escape(words)):
            TrainConfig.from_dict(yaml.safe_load(text))
    bad = tmp_path / "run.yaml"
    bad.write_text("model: {preset: internlm2-1_8b}\ndata: {train: [x.txt]}\noptim: {lr: fast}\n")
    assert main(["train", "--config", str(bad)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "optim.lr" in err and "run.yaml" in err and "Traceback" not in err


def test_two_processes_train_like_one(tmp_path, tokenizer_path):
    """Two local processes (gloo) with 4 CPU devices each train a few steps from an HF checkpoint on
    a data x fsdp mesh spanning both, are stopped, and resume from their checkpoint (each process's
    data-loader position saved beside it); the losses equal one process with 8 devices."""
    import socket

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(CORPUS * 3) + "\n")
    cfg = tiny_config(vocab_size=92544, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                      num_key_value_heads=2, rope_scaling=None, max_position_embeddings=64)
    ckpt = write_hf_checkpoint(tmp_path / "hf", cfg, ref.random_state(cfg, 3))
    runs = {}
    for name in ("one", "two"):
        d = tmp_path / name
        d.mkdir()
        runs[name] = _write_config(d, tokenizer_path, corpus, steps=6, every=1000, extra={
            "model": {"checkpoint": str(ckpt), "dtype": "float32", "param_dtype": "float32"},
            "optim": {"lr": 3e-3, "warmup_steps": 2, "weight_decay": 0.0, "min_lr_ratio": 1.0},  # lr: not of steps
            "mesh": {"data": 2, "fsdp": 4, "tensor": 1, "sequence": 1},
            "checkpoint": {"dir": str(d / "ckpt") if name == "two" else None, "every": 2}})
    env = user_env()
    base = [sys.executable, "-m", "internlm_jax.training", "--config"]
    one = subprocess.run(base + [str(runs["one"]), "--devices", "8"], env=env, capture_output=True, text=True,
                         timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    def two_processes(steps):
        procs = [subprocess.Popen(base + [str(runs["two"]), "--devices", "4", "--coordinator", f"127.0.0.1:{port}",
                                          "--num-processes", "2", "--process-id", str(i), "--steps", str(steps)],
                                  env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for i in range(2)]
        outs = [p.communicate(timeout=600) for p in procs]
        for p, (_, err) in zip(procs, outs):
            assert p.returncode == 0, err[-3000:]
        return outs

    two_processes(4)
    for i in range(2):  # each process's loader position, saved with checkpoint 4
        state = json.loads((tmp_path / "two" / "ckpt" / "4" / "data" / f"process_{i}-of-2.json").read_text())
        assert state["next_index"] == 4
    outs = two_processes(6)
    assert "resumed from" in outs[0][0] and "not in the checkpoint" not in outs[0][1] + outs[1][1]
    a, b = _losses(tmp_path / "one" / "metrics.jsonl"), _losses(tmp_path / "two" / "metrics.jsonl")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5, 6]
    np.testing.assert_allclose([b[s] for s in a], [a[s] for s in a], rtol=1e-5)


def test_walkthrough_example(tmp_path):
    env = user_env()
    done = subprocess.run([sys.executable, "examples/train_walkthrough.py",
                           "--steps", "20", "--out", str(tmp_path)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "loss " in done.stdout and "model :" in done.stdout
    assert (tmp_path / "hf" / "model.safetensors").exists() and (tmp_path / "checkpoints" / "20").is_dir()
