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


def test_gradient_accumulation_equals_one_big_batch(tmp_path):
    """Micro-batches weigh by their trained tokens: grad_accum k steps exactly like one batch, also when
    one micro-batch trains on nothing (chat prompts) and with z-loss."""
    import optax

    model = ij.InternLM2.from_pretrained(write_hf_checkpoint(tmp_path, CFG, STATE))
    graphdef, params = nnx.split(model)
    batch = _batch(seed=3, b=4, segments=True)
    weight = np.ones((4, 16), np.float32)
    weight[:2] = 0  # micro-batch 0 of 2: no trained targets
    weight[2, :11] = 0  # the rest: 5 + 16 of them, unevenly split
    batch["weight"] = jnp.asarray(weight)
    tx = optax.sgd(1.0)  # the update is the gradient itself
    results = {}
    for k in (1, 2, 4):
        step = jax.jit(make_train_step(graphdef, tx, grad_accum=k, segments=True, z_loss=1e-3,
                                       schedule=optax.constant_schedule(1.0)))
        new, _, m = step(params, tx.init(params), batch, 0)
        results[k] = jax.device_get(m), {str(path): np.asarray(v.get_value()) for path, v in nnx.to_flat_state(new)}
    metrics, updated = results[1]
    for k in (2, 4):
        for name in ("loss", "ce", "grad_norm"):
            np.testing.assert_allclose(results[k][0][name], metrics[name], rtol=2e-6, err_msg=f"{k}: {name}")
        for path, value in updated.items():
            np.testing.assert_allclose(results[k][1][path], value, rtol=1e-5, atol=1e-7, err_msg=f"{k}: {path}")


def test_learning_rate_schedule_matches_transformers():
    torch = pytest.importorskip("torch")
    from transformers import get_cosine_with_min_lr_schedule_with_warmup

    for warmup in (0, 3):
        _, schedule = make_optimizer(OptimSection(lr=1e-2, warmup_steps=warmup, min_lr_ratio=0.1), 12)
        opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1e-2)
        hf = get_cosine_with_min_lr_schedule_with_warmup(opt, warmup, 12, min_lr_rate=0.1)
        want = []
        for _ in range(12):
            want.append(opt.param_groups[0]["lr"])
            opt.step()
            hf.step()
        np.testing.assert_allclose([float(schedule(t)) for t in range(12)], want, rtol=1e-6, atol=1e-12)
        assert (want[0] == 1e-2) == (warmup == 0)  # no warmup: the first update is at the peak lr


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
    tok = ij.Tokenizer.from_pretrained(tmp_path / "hf")  # the exported HF folder carries the run's tokenizer
    assert (tmp_path / "hf" / "tokenizer.model").read_bytes() == Path(tokenizer_path).read_bytes()
    model = ij.InternLM2.from_pretrained(tmp_path / "hf")
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
    assert (tmp_path / "hf2" / "tokenizer.model").read_bytes() == Path(tokenizer_path).read_bytes()
    ids = np.asarray([tok.encode(CORPUS[1])])
    np.testing.assert_array_equal(np.asarray(ij.InternLM2.from_pretrained(tmp_path / "hf2")(ids)),
                                  np.asarray(model(ids)))
    evals = [r["eval_ppl"] for r in records if "eval_ppl" in r]
    assert len(evals) == 2 and evals[1] < evals[0] and evals[1] < 1.5  # perplexity on the (memorised) corpus


def test_the_tokenizer_files_an_export_carries(tmp_path, small_tokenizer):
    """The configured tokenizer.model (as a file or as its folder) brings the HF tokenizer files beside
    it; without a tokenizer, those of the checkpoint the run starts from."""
    from internlm_jax.training.loop import tokenizer_files

    folder = tmp_path / "tok"
    folder.mkdir()
    (folder / "tokenizer.model").write_bytes(Path(small_tokenizer).read_bytes())
    (folder / "tokenizer_config.json").write_text("{}")
    tok = ij.Tokenizer(folder / "tokenizer.model")
    for given in (folder, folder / "tokenizer.model"):
        cfg = TrainConfig.from_dict({"model": {"preset": "internlm2-1_8b"}, "tokenizer": str(given),
                                     "data": {"train": ["x"]}})
        assert sorted(name for _, name in tokenizer_files(cfg, tok)) == ["tokenizer.model", "tokenizer_config.json"]
    cfg = TrainConfig.from_dict({"model": {"checkpoint": str(folder)}, "data": {"train": ["x"]}})
    assert sorted(name for _, name in tokenizer_files(cfg, None)) == ["tokenizer.model", "tokenizer_config.json"]


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

    def stop_after(step, sig):
        proc = subprocess.Popen(cmd(cfg), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 600
        while time.time() < deadline and proc.poll() is None:
            if (killed / "ckpt" / str(step)).is_dir() and len(_losses(killed / "metrics.jsonl")) >= step + 2:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be stopped"
        proc.send_signal(sig)
        err = proc.communicate(timeout=300)[1]
        return proc.returncode, err

    # Ctrl-C: the run stops between steps, the checkpoint being written is completed, and it says where
    code, err = stop_after(10, signal.SIGINT)
    assert code == 130, err[-3000:]
    saved = max(int(d.name) for d in (killed / "ckpt").iterdir() if d.name.isdigit())
    assert f"interrupted: checkpoints up to step {saved} are in" in err, err[-3000:]
    assert not [d.name for d in (killed / "ckpt").iterdir() if "tmp" in d.name]
    code, err = stop_after(20, signal.SIGKILL)  # kill -9: resumes from the last complete checkpoint
    done = subprocess.run(cmd(cfg), env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed from" in done.stdout
    a, b = _losses(whole / "metrics.jsonl"), _losses(killed / "metrics.jsonl")
    lines = (killed / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == list(range(1, 31))  # the redone steps logged once
    assert [b[s] for s in range(1, 31)] == [a[s] for s in range(1, 31)]  # bit-identical losses


def test_data_order_is_deterministic_resumable_and_shared(tmp_path):
    tokens = np.arange(3, 3 + 16 * 20 + 1, dtype=np.int32)
    tokens[::37] = 2  # EOS: document boundaries
    np.save(tmp_path / "t.npy", tokens)
    ds = PackedDataset([str(tmp_path / "t.npy")], None, 16, seed=5)
    again = PackedDataset([str(tmp_path / "t.npy")], None, 16, seed=5)
    for step in (0, 3, 7, 11):  # batch t depends only on (seed, t): resuming is exact
        np.testing.assert_array_equal(ds.batch(step, 4).inputs, again.batch(step, 4).inputs)
    halves = [ds.batch(2, 4, range(2 * p, 2 * p + 2)) for p in range(2)]
    np.testing.assert_array_equal(np.concatenate([h.inputs for h in halves]), ds.batch(2, 4).inputs)
    for rows in (0, 1, range(2, 6), range(0, 4, 2)):  # a process index (the old call) or rows outside the batch
        with pytest.raises(ValueError, match="rows must be a range of the batch's rows"):
            ds.batch(2, 4, rows)
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
    with pytest.raises(ValueError, match="^config: lr: unknown key$"):
        TrainConfig.from_dict({"lr": 1})
    with pytest.raises(ValueError, match="^config: optim.learning_rate: unknown key$"):
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
             "log: {every: [1]}": "log.every",
             "steps: true": "steps: expected a number (got True)",
             "optim: {lr: .inf}": "optim.lr: Input should be a finite number",
             "optim: {warmup_steps: false}": "optim.warmup_steps: expected a number",
             "log: {peak_tflops: .nan}": "log.peak_tflops: Input should be a finite number",
             "model: {overrides: {hidden_sise: 64}}": "model.overrides.hidden_sise: unknown key",
             "model: {overrides: {num_hidden_layers: two}}": "model.overrides.num_hidden_layers: Input should be "
                                                              "a valid integer",
             "model: {overrides: {vocab_size: true}}": "model.overrides.vocab_size: expected a number",
             "seed: -1": "seed: Input should be greater than or equal to 0",
             "seed: 4294967296": "seed: Input should be less than 4294967296"}
    for text, words in cases.items():
        with pytest.raises(ValueError, match=re.escape(words)):
            TrainConfig.from_dict(yaml.safe_load(text))
    cfg = TrainConfig.from_dict(yaml.safe_load("model: {preset: internlm2-1_8b, overrides: {rope_theta: 5e7, "
                                               "rope_scaling: {type: linear, factor: 2}}}\ndata: {train: [x]}"))
    arch = cfg.architecture()  # overrides are read like every other number, then checked by InternLM2Config
    assert arch.rope_theta == 5e7 and isinstance(arch.rope_theta, float) and arch.rope_scaling.type == "linear"
    from internlm_jax.training import train

    missing = str(tmp_path / "missing.txt")  # the config is refused before any data is looked at
    for model, words in [({"preset": "internlm2-1_8b", "overrides": {"num_attention_heads": 5}},
                          "model.overrides: config field 'hidden_size' (2048) must be divisible"),
                         ({"checkpoint": str(tmp_path), "overrides": {"num_hidden_layers": 1}},
                          "model.overrides: only a preset takes overrides")]:
        with pytest.raises(ValueError, match=re.escape(words)):
            train(TrainConfig.from_dict({"model": model, "data": {"train": [missing]}}))
    (tmp_path / "afile").write_text("x")
    for changes, words in [({"model": {"preset": "nope"}}, "model.preset: unknown preset 'nope'"),
                           ({"log": {"jsonl": str(tmp_path)}}, "log.jsonl: .* is a folder"),
                           ({"checkpoint": {"dir": str(tmp_path / "afile")}}, "checkpoint.dir: .*afile is a file"),
                           ({"checkpoint": {"dir": str(tmp_path / "afile" / "ckpt")}},
                            "checkpoint.dir: .*afile is a file, not a folder"),
                           ({"export_hf": str(tmp_path / "afile" / "hf")}, "export_hf: .*afile is a file")]:
        with pytest.raises(ValueError, match=words):  # named before anything is built (it was after a step)
            train(TrainConfig.from_dict({"model": {"preset": "internlm2-1_8b"}, "data": {"train": [missing]},
                                         **changes}))
    with pytest.raises(ValueError, match="tokenizer: demo .* set checkpoint.dir"):
        train(TrainConfig.from_dict({"model": {"preset": "internlm2-1_8b"}, "tokenizer": "demo",
                                     "data": {"train": [missing]}}))
    bad = tmp_path / "run.yaml"
    bad.write_text("model: {preset: internlm2-1_8b}\ndata: {train: [x.txt]}\noptim: {lr: fast}\n")
    assert main(["train", "--config", str(bad)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "optim.lr" in err and "run.yaml" in err and "Traceback" not in err
    for text, words in (("model: {preset: internlm2-1_8b, overrides: {num_attention_heads: 5}}",
                         "run.yaml: model.overrides: config field 'hidden_size'"),
                        ("model: {preset: internlm2-1_8b}\noptim: {grad_accum: 2}\ndata: {batch_size: 3}",
                         "run.yaml: optim.grad_accum (2) must divide")):  # checks across fields name the file too
        bad.write_text(text + "\ndata: {train: [x.txt]}\n" if "data:" not in text else
                       text.replace("batch_size: 3", "batch_size: 3, train: [x.txt]") + "\n")
        assert main(["train", "--config", str(bad)]) == 1
        err = capsys.readouterr().err
        assert words in err and err.count("\n") == 1, err
    # a key given twice: YAML loaders keep the last silently (here the first optim block would be lost)
    bad.write_text("model: {preset: internlm2-1_8b}\noptim: {lr: 3e-4, warmup_steps: 0}\nsteps: 2\n"
                   "optim: {weight_decay: 0.5}\ndata: {train: [x.txt], seq_len: 8, seq_len: 16}\n")
    with pytest.raises(ValueError, match=r"run.yaml: not valid YAML \(.*key 'optim' is given twice \(line 4\)"):
        TrainConfig.from_yaml(str(bad))
    bad.write_text("data: {train: [x.txt], seq_len: 8, seq_len: 16}\n")
    with pytest.raises(ValueError, match=r"key 'seq_len' is given twice \(line 1\)"):
        TrainConfig.from_yaml(str(bad))
    merged = "base: &b {lr: 1.0e-3, warmup_steps: 3}\n"  # a YAML merge key may be overridden: that is no repeat
    bad.write_text(merged + "model: {preset: internlm2-1_8b}\ndata: {train: [x.txt]}\noptim:\n  <<: *b\n  lr: 2.0e-3\n")
    with pytest.raises(ValueError, match="base: unknown key"):  # (the anchor's holder is no field: read, then named)
        TrainConfig.from_yaml(str(bad))
    bad.write_text("model: {preset: internlm2-1_8b}\ndata: {train: [x.txt]}\nexport_hf: gs://bucket/hf\n")
    with pytest.raises(ValueError, match="export_hf: gs://bucket/hf: remote paths"):  # not joined to the YAML's folder
        TrainConfig.from_yaml(str(bad))
    short = TrainConfig.from_dict({"model": {"preset": "internlm2-1_8b", "dtype": "bf16", "param_dtype": "FP32"}})
    assert (short.model.dtype, short.model.param_dtype) == ("bfloat16", "float32")  # as the CLI and Python take them
    bad.write_text("model: {preset: internlm2-1_8b}\ndata: {train: [x.txt]}\n")
    assert main(["train", "--config", str(bad), "--steps", "0"]) == 1  # the flag is checked like the field
    err = capsys.readouterr().err
    assert "--steps: must be at least 1 (got 0)" in err and err.count("\n") == 1, err


def test_the_demo_tokenizer_is_kept_for_its_text_only(tmp_path, capsys):
    """tokenizer: demo is trained once per training text: a rerun reuses it, a run on other text beside
    it (same parent folder) trains its own instead of tokenizing with the first run's."""
    from internlm_jax.training.loop import load_tokenizer

    root = Path(__file__).parents[1] / "examples" / "data" / "tiny_corpus.txt"
    other = tmp_path / "other.txt"
    other.write_text("\n".join(f"zebra {i} quokka axolotl narwhal pangolin" for i in range(300)) + "\n")

    def tokenizer(train, run):
        cfg = TrainConfig.from_dict({"model": {"preset": "internlm2-1_8b"}, "tokenizer": "demo",
                                     "data": {"train": [str(train)]}, "checkpoint": {"dir": str(tmp_path / run)}})
        tok = load_tokenizer(cfg)
        return tok, "trained a small SentencePiece model" in capsys.readouterr().err

    first, trained = tokenizer(root, "ck1")
    again, retrained = tokenizer(root, "ck1")
    assert trained and not retrained and again.model_file == first.model_file
    mine, trained = tokenizer(other, "ck2")
    assert trained and mine.model_file != first.model_file
    line = other.read_text().splitlines()[0]
    assert len(mine.encode(line)) < len(first.encode(line))  # its own text is what it tokenizes compactly


TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
        "num_key_value_heads": 1, "vocab_size": 400}


def _token_run(tmp_path, **changes):
    """A config training a tiny model on a token file (no tokenizer); ``changes``: ``section__key`` or
    ``key`` values."""
    tokens = tmp_path / "tokens.npy"
    if not tokens.exists():
        ids = np.random.RandomState(0).randint(3, 400, 4000).astype(np.int32)
        ids[::50] = 2  # </s>
        np.save(tokens, ids)
    cfg = {"model": {"preset": "internlm2_5-7b", "dtype": "float32", "param_dtype": "float32", "overrides": TINY},
           "data": {"train": [str(tokens)], "seq_len": 16, "batch_size": 4},
           "optim": {"lr": 1e-2, "warmup_steps": 1},
           "checkpoint": {"dir": str(tmp_path / "ckpt"), "every": 1, "async_save": False},
           "log": {"every": 1, "peak_tflops": 1.0}, "steps": 2}
    for key, value in changes.items():
        section, _, field = key.partition("__")
        if field:
            cfg[section] = {**cfg[section], field: value}
        else:
            cfg[section] = value
    return TrainConfig.from_dict(cfg)


def test_export_hf_onto_the_runs_own_folders_is_refused_before_the_first_step(tmp_path):
    from internlm_jax.training import train

    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.md").write_text("mine\n")
    for dst, words in ((tmp_path / "ckpt", "is the source .*ckpt"), (tmp_path, "contains the source"),
                       (tmp_path / "notes", "not a checkpoint"), (tmp_path / "ckpt" / "hf", "is inside .*ckpt"),
                       ("gs://bucket/hf", "remote paths")):
        with pytest.raises(ValueError, match=f"export_hf: .*{words}"):
            train(_token_run(tmp_path, export_hf=str(dst)))
        assert not (tmp_path / "ckpt").exists() and (tmp_path / "notes" / "keep.md").is_file()


def test_resuming_with_other_data_or_architecture_is_refused_before_anything_changes(tmp_path):
    from internlm_jax.training import train

    train(_token_run(tmp_path))
    ckpt = tmp_path / "ckpt"
    saved = {f: (ckpt / f).read_bytes() for f in ("config.json", "run_settings.json")}
    other = tmp_path / "other.npy"
    np.save(other, np.load(tmp_path / "tokens.npy")[::-1])
    refused = {"data__batch_size": (8, "data.batch_size: 4 in the checkpoints, 8 now"),
               "data__seq_len": (8, "data.seq_len: 16 in the checkpoints, 8 now"),
               "data__train": ([str(other)], "data.train: ["),
               "seed": (1, "seed: 0 in the checkpoints, 1 now"),
               "model__overrides": ({**TINY, "hidden_size": 64}, "architecture.hidden_size: 32 in the checkpoints, "
                                                                  "64 now")}
    for key, (value, words) in refused.items():
        with pytest.raises(ValueError, match=re.escape(words)):
            train(_token_run(tmp_path, steps=3, **{key: value}))
        assert {f: (ckpt / f).read_bytes() for f in saved} == saved  # nothing rewritten by a refused resume
    # longer, with another micro-batching and learning rate: allowed
    history = train(_token_run(tmp_path, steps=3, optim={"lr": 5e-3, "warmup_steps": 1, "grad_accum": 2}))
    assert [r["step"] for r in history] == [3]
    assert json.loads((ckpt / "config.json").read_text())["hidden_size"] == 32


def test_a_resumed_run_given_more_steps_goes_on_as_a_run_of_that_length(tmp_path, capsys, monkeypatch):
    """``steps`` raised on resume: the lr of each further step equals that of a run started with the new
    ``steps`` (HF Trainer's semantics), and the change is announced with both lrs; ``steps``
    below the checkpoint's step is refused by name. The logged tokens/s counts the steps of its own
    interval (a short last one included), read off a clock that ticks one second per reading."""
    from internlm_jax.training import loop, train

    ticks = iter(range(10**6))
    monkeypatch.setattr(loop, "time", type("Clock", (), {"perf_counter": staticmethod(lambda: float(next(ticks)))}))
    for run in "ab":
        (tmp_path / run).mkdir()
    train(_token_run(tmp_path / "a", steps=3, optim={"lr": 1e-2, "warmup_steps": 1}))
    capsys.readouterr()
    longer = train(_token_run(tmp_path / "a", steps=7, optim={"lr": 1e-2, "warmup_steps": 1}, log={"every": 2}))
    whole = train(_token_run(tmp_path / "b", steps=7, optim={"lr": 1e-2, "warmup_steps": 1}))
    assert [r["step"] for r in longer] == [4, 6, 7]
    by_step = {r["step"]: r for r in whole}
    for r in longer:
        assert r["lr"] == by_step[r["step"]]["lr"]  # (the weights differ: the first steps had another lr)
    assert [r["tokens_per_s"] for r in longer] == [64.0, 128.0, 64.0]  # 1, 2 and 1 steps of 4 x 16 tokens
    err = capsys.readouterr().err
    assert "steps: 3 -> 7: the learning-rate schedule is now that of a 7-step run" in err
    with pytest.raises(ValueError, match=r"steps: 5 is below step 7 of the checkpoints in"):
        train(_token_run(tmp_path / "a", steps=5, optim={"lr": 1e-2, "warmup_steps": 1}))


def test_a_restarted_run_drops_the_logged_steps_it_will_redo(tmp_path):
    from internlm_jax.training.loop import Metrics

    log = tmp_path / "metrics.jsonl"
    log.write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in range(1, 6)) + '{"step": 6, "lo')
    Metrics(_token_run(tmp_path, log={"jsonl": str(log)}), start=3)
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [1, 2, 3]


def test_eval_runs_every_eval_every_steps_whatever_the_logging(tmp_path):
    from internlm_jax.training import train

    history = train(_token_run(tmp_path, steps=4, eval_every=2, export_hf=str(tmp_path / "hf"),
                               data__eval=str(tmp_path / "tokens.npy"), data__segment_masking=False,
                               log={"every": 1000, "peak_tflops": 1.0}))
    assert [(r["step"], "loss" in r, "eval_ppl" in r) for r in history] == [(2, False, True), (4, True, True)]
    # the last perplexity, from the exported model's logits on every window of the eval file
    model = ij.InternLM2.from_pretrained(tmp_path / "hf")
    data = PackedDataset([str(tmp_path / "tokens.npy")], None, 16)
    windows = np.stack([data.window(i)[0] for i in range(data.num_windows)])
    logits = np.asarray(model(windows[:, :-1]), np.float64)
    logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    ce = logz - np.take_along_axis(logits, windows[:, 1:, None], -1)[..., 0]
    np.testing.assert_allclose(history[-1]["eval_ppl"], np.exp(ce.mean()), rtol=1e-4)


def test_token_ids_must_fit_the_model(tmp_path, small_tokenizer):
    from internlm_jax.training import train

    with pytest.raises(ValueError, match=r"small_tokenizer.model has \d+ token ids, more than the model's vocab_size "
                                         r"100"):
        train(_token_run(tmp_path, tokenizer=str(small_tokenizer), model__overrides={**TINY, "vocab_size": 100}))


def _hf_tensors(folder) -> dict[str, np.ndarray]:
    """Every tensor of an HF folder, read by the safetensors package (not by the library)."""
    from safetensors.numpy import load_file

    return {k: v for f in sorted(Path(folder).glob("*.safetensors")) for k, v in load_file(f).items()}


def test_a_sharded_training_checkpoint_converts_in_a_one_device_process(tmp_path):
    """A run on an 8-device fsdp mesh (this process) saves sharded checkpoints; ``convert train-to-hf`` in a
    fresh process with one device restores them onto host arrays, giving the weights the run exported."""
    from internlm_jax.training import train

    train(_token_run(tmp_path, export_hf=str(tmp_path / "hf")))
    done = subprocess.run([sys.executable, "-m", "internlm_jax", "convert", "train-to-hf", str(tmp_path / "ckpt"),
                           str(tmp_path / "hf2"), "--quiet"], env=user_env(), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    exported, converted = _hf_tensors(tmp_path / "hf"), _hf_tensors(tmp_path / "hf2")
    assert len(jax.devices()) == 8 and sorted(converted) == sorted(exported)
    assert all(np.array_equal(converted[n], exported[n]) for n in exported)


def _train(config, processes: int, *args: str) -> list[tuple[str, str]]:
    """``internlm_jax.training --config config`` in one process with 8 CPU devices, or in two local
    processes (gloo) with 4 each; each process's (stdout, stderr), every exit code checked."""
    import socket

    base = [sys.executable, "-m", "internlm_jax.training", "--config", str(config), *args]
    if processes == 1:
        cmds = [base + ["--devices", "8"]]
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmds = [base + ["--devices", "4", "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
                        "--process-id", str(i)] for i in range(2)]
    procs = [subprocess.Popen(cmd, env=user_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for cmd in cmds]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    return outs


@pytest.mark.parametrize("bad", ["config", "data", "mesh", "optim"])
def test_a_config_or_data_path_that_fails_on_one_process_stops_the_others_before_training(tmp_path, bad):
    """Process 1's config does not load, names a data file its host lacks, another mesh or another learning
    rate (which trained each process's shards differently, silently; another eval_every hung); process 0's is
    fine, and it stops at a start-up rendezvous naming process 1's error (or the setting that differs)
    instead of starting to train and waiting for it in the first collective."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    example = (ROOT / "examples" / "train_tiny.yaml").read_text().replace("../runs/tiny", str(tmp_path / "runs"))
    (tmp_path / "run.yaml").write_text(example.replace("data/", f"{ROOT / 'examples' / 'data'}/"))
    (tmp_path / "elsewhere.yaml").write_text(example.replace("data/tiny_corpus", str(tmp_path / "not-on-this-host"))
                                             .replace("data/", f"{ROOT / 'examples' / 'data'}/"))
    (tmp_path / "mesh.yaml").write_text(example.replace("mesh: {data: 1,", "mesh: {data: 2,")
                                        .replace("data/", f"{ROOT / 'examples' / 'data'}/"))
    (tmp_path / "optim.yaml").write_text(example.replace("lr: 3.0e-3", "lr: 3.0e-2")
                                         .replace("data/", f"{ROOT / 'examples' / 'data'}/"))
    configs = [tmp_path / "run.yaml", tmp_path / {"config": "not-on-this-host.yaml", "data": "elsewhere.yaml",
                                                  "mesh": "mesh.yaml", "optim": "optim.yaml"}[bad]]
    procs = [subprocess.Popen([sys.executable, "-m", "internlm_jax", "train", "--config", str(configs[i]),
                               "--devices", "4", "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
                               "--process-id", str(i)], cwd=tmp_path, env=user_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    errs = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [1, 1], errs
    if bad in ("mesh", "optim"):
        differ = "mesh.data is 1 on process 0, 2" if bad == "mesh" else "optim.lr is 0.003 on process 0, 0.03"
        assert all(f"different training configs: {differ} on process 1" in e for e in errs), errs
        return
    what = "training config" if bad == "config" else "training data file"
    assert f"error: {what} {tmp_path}/not-on-this-host" in errs[1], errs[1]
    assert f"error: process 1 failed: {what} {tmp_path}/not-on-this-host" in errs[0], errs[0]
    assert not (tmp_path / "runs" / "checkpoints").exists() or not any((tmp_path / "runs" / "checkpoints").iterdir())


def test_two_processes_train_like_one(tmp_path, tokenizer_path):
    """Two local processes (gloo) with 4 CPU devices each train a few steps from an HF checkpoint on
    a data x fsdp mesh spanning both, are stopped, and resume from their checkpoint (each process's
    data-loader position saved beside it); the losses and the HF export equal one process with 8 devices,
    and the two-process checkpoint converts to HF in a plain one-device process."""

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
            "checkpoint": {"dir": str(d / "ckpt") if name == "two" else None, "every": 2},
            "export_hf": str(d / "hf")})
    _train(runs["one"], 1)
    _train(runs["two"], 2, "--steps", "4")
    for i in range(2):  # each process's loader position, saved with checkpoint 4
        state = json.loads((tmp_path / "two" / "ckpt" / "4" / "data" / f"process_{i}-of-2.json").read_text())
        assert state["next_index"] == 4
    outs = _train(runs["two"], 2, "--steps", "6")
    assert "resumed from" in outs[0][0] and "not in the checkpoint" not in outs[0][1] + outs[1][1]
    a, b = _losses(tmp_path / "one" / "metrics.jsonl"), _losses(tmp_path / "two" / "metrics.jsonl")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5, 6]
    np.testing.assert_allclose([b[s] for s in a], [a[s] for s in a], rtol=1e-5)
    # export_hf: both processes gathered, process 0 wrote; the weights and logits are the one-process run's
    one, two = (_hf_tensors(tmp_path / name / "hf") for name in ("one", "two"))
    assert sorted(one) == sorted(two) == sorted(ref.random_state(cfg, 3))  # the source's tensor names
    for name in one:
        np.testing.assert_allclose(two[name], one[name], rtol=1e-4, atol=1e-6, err_msg=name)
    ids = np.random.RandomState(1).randint(0, cfg["vocab_size"], (2, 16))
    np.testing.assert_allclose(*(np.asarray(ij.InternLM2.from_pretrained(tmp_path / name / "hf")(ids))
                                 for name in ("two", "one")), rtol=1e-4, atol=1e-4)
    assert not [p.name for p in (tmp_path / "two").iterdir() if ".tmp-" in p.name]
    # the two-process checkpoint converts in a plain one-device process, to the exported weights
    done = subprocess.run([sys.executable, "-m", "internlm_jax", "convert", "train-to-hf",
                           str(tmp_path / "two" / "ckpt"), str(tmp_path / "two_hf"), "--quiet"],
                          env=user_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    converted = _hf_tensors(tmp_path / "two_hf")
    assert sorted(converted) == sorted(two) and all(np.array_equal(converted[n], two[n]) for n in two)


def test_walkthrough_example(tmp_path):
    env = user_env()
    done = subprocess.run([sys.executable, "examples/train_walkthrough.py",
                           "--steps", "20", "--out", str(tmp_path)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "loss " in done.stdout and "model :" in done.stdout
    assert (tmp_path / "hf" / "model.safetensors").exists() and (tmp_path / "checkpoints" / "20").is_dir()


def test_two_processes_train_with_only_tensor_and_sequence_across_them(tmp_path, tokenizer_path):
    """A mesh whose batch axes stay inside each process (tensor spans the two processes, sequence the
    devices of each): every process feeds the whole batch, and the losses equal one process's."""

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(CORPUS * 3) + "\n")
    mesh = {"data": 1, "fsdp": 1, "tensor": 2, "sequence": 4}
    runs = {}
    for name in ("one", "two"):
        (tmp_path / name).mkdir()
        runs[name] = _write_config(tmp_path / name, tokenizer_path, corpus, steps=3, every=1000,
                                   extra={"mesh": mesh, "checkpoint": {"dir": None}})
    _train(runs["one"], 1)
    _train(runs["two"], 2)
    a, b = _losses(tmp_path / "one" / "metrics.jsonl"), _losses(tmp_path / "two" / "metrics.jsonl")
    assert sorted(a) == sorted(b) == [1, 2, 3]
    np.testing.assert_allclose([b[s] for s in a], [a[s] for s in a], rtol=1e-5)


@pytest.fixture
def terminal_ctrl_c():
    """SIGINT handled as in a Python started from a terminal (a test runner's worker may ignore it)."""
    import signal

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_ctrl_c_saves_the_steps_run_and_in_the_last_step_stops_before_the_export(tmp_path, monkeypatch, capsys,
                                                                                 terminal_ctrl_c):
    """A Ctrl-C that lands in the last step is not dropped: the final checkpoint is completed, the run
    stops with KeyboardInterrupt and says where its checkpoints are, and nothing is exported. Between
    periodic saves, the step it stops after is saved, and the run resumes from there exactly."""
    import os
    import signal

    from internlm_jax.training import loop, train

    take = loop._global_batch
    calls = []

    def batch_then_ctrl_c(*args):
        calls.append(1)
        if len(calls) == 2:  # the last of two steps
            os.kill(os.getpid(), signal.SIGINT)
        return take(*args)

    monkeypatch.setattr(loop, "_global_batch", batch_then_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        train(_token_run(tmp_path, export_hf=str(tmp_path / "hf")))
    assert "interrupted: checkpoints up to step 2 are in" in capsys.readouterr().err
    assert not (tmp_path / "hf").exists()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    # between periodic saves: the steps run since the last one are saved too, and resuming goes on exactly
    calls.clear()
    for d in ("b", "c"):
        (tmp_path / d).mkdir()
    every5 = {"checkpoint": {"dir": str(tmp_path / "b" / "ckpt"), "every": 5, "async_save": False}, "steps": 6}

    def ctrl_c_in_step_3(*args):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return take(*args)

    monkeypatch.setattr(loop, "_global_batch", ctrl_c_in_step_3)
    with pytest.raises(KeyboardInterrupt):
        train(_token_run(tmp_path / "b", **every5))
    assert "interrupted: checkpoints up to step 3 are in" in capsys.readouterr().err
    monkeypatch.setattr(loop, "_global_batch", take)
    resumed = train(_token_run(tmp_path / "b", **every5))
    whole = train(_token_run(tmp_path / "c", **{**every5, "checkpoint": {**every5["checkpoint"],
                                                                          "dir": str(tmp_path / "c" / "ckpt")}}))
    assert [r["step"] for r in resumed] == [4, 5, 6]
    assert [r["loss"] for r in resumed] == [r["loss"] for r in whole[3:]]
