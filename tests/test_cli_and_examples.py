"""The offline demo and the examples run end to end (in fresh processes, as a user runs them)."""

import re

import pytest
from hf_fixtures import run_python as _run


def test_demo_runs_offline_and_sharded_matches_single_device():
    done = _run(["-m", "internlm_jax", "demo", "--devices", "8", "--tensor", "4"])
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert "mesh {'data': 1, 'fsdp': 2, 'tensor': 4, 'sequence': 1}" in out
    diff = float(out.split("logit difference: ")[1].split()[0])
    assert diff < 1e-4


def test_demo_with_real_tokenizer(tokenizer_path):
    done = _run(["-m", "internlm_jax", "demo", "--tokenizer", str(tokenizer_path), "--prompt", "Hello world"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert "'Hello world' -> 3 tokens" in done.stdout  # BOS + [9843, 2028]


def test_cli_errors_are_one_line():
    done = _run(["-m", "internlm_jax", "demo", "--tensor", "3"])
    assert done.returncode == 1
    assert done.stderr.strip().count("\n") == 0 and "cannot be split" in done.stderr
    assert "Traceback" not in done.stderr


def test_misused_flags_are_named_before_any_work(tmp_path, capsys):
    """A demo prompt with no tokenizer to encode it, and generate given both a prompt and an input file,
    are refused with one line each (the demo used to drop the prompt and run random ids)."""
    from internlm_jax.cli import main

    requests = tmp_path / "in.jsonl"
    requests.write_text('{"id": 1, "prompt": "x"}\n')
    for argv, words in ((["demo", "--devices", "0", "--prompt", "hello"], "--prompt needs --tokenizer"),
                        (["generate", "--model", str(tmp_path), "--prompt", "x", "--input", str(requests),
                          "--output", str(tmp_path / "out.jsonl")], "not both")):
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert words in err and err.strip().count("\n") == 0, err


def test_job_flags_that_cannot_make_a_job_are_named_before_it_starts(tmp_path, capsys):
    """--num-processes / --process-id without --coordinator (each process ran the whole job alone: every
    output line written twice), a process id outside the job, and a coordinator port that is taken on
    process 0's host (JAX's coordination service crashed the process) are one-line errors."""
    import socket

    from internlm_jax.cli import main

    requests = tmp_path / "in.jsonl"
    requests.write_text('{"id": 1, "prompt": "x"}\n')
    job = ["generate", "--model", str(tmp_path), "--input", str(requests), "--output", str(tmp_path / "out.jsonl")]
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for flags, words in ((["--num-processes", "2", "--process-id", "1"], "go with --coordinator"),
                             (["--coordinator", "127.0.0.1:1234", "--num-processes", "2", "--process-id", "2"],
                              "--process-id must be from 0 to 1"),
                             (["--coordinator", f"127.0.0.1:{port}", "--num-processes", "2"],
                              f"port {port} is in use on this host")):
            assert main(job + flags) == 1, flags
            err = capsys.readouterr().err
            assert words in err and err.strip().count("\n") == 0, err
    assert not (tmp_path / "out.jsonl").exists()


def test_files_and_flags_are_named_before_the_model_loads(tmp_path, capsys):
    """generate --input's files and line syntax, the engine sizes, serve's port, --devices: each one line
    naming the flag or file:line, before the model (here: a folder that does not exist) is looked at."""
    import os
    import socket

    from internlm_jax.cli import main

    good = tmp_path / "in.jsonl"
    good.write_text('{"id": 1, "prompt": "x"}\n')
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": 1, "prompt": "x"}\n{"id": 2, "prompt": \n')
    os.mkfifo(tmp_path / "pipe")
    (tmp_path / "afile").write_text("x")
    model = ["--model", str(tmp_path / "nowhere")]
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = str(busy.getsockname()[1])
        cases = [
            (["generate", *model, "--input", str(tmp_path / "missing.jsonl"), "--output", "o"],
             "--input .*does not exist"),
            (["generate", *model, "--input", str(tmp_path), "--output", "o"], "--input .* is a folder"),
            (["generate", *model, "--input", str(bad), "--output", "o"], r"bad.jsonl:2: not valid JSON"),
            (["generate", *model, "--input", str(good), "--output", str(tmp_path / "pipe")], "not a regular file"),
            (["generate", *model, "--input", str(good), "--output", str(tmp_path / "afile" / "o.jsonl")],
             "afile is a file, not a folder"),
            (["generate", *model, "--input", str(good), "--output", str(good)], "is the input file"),
            (["generate", *model, "--input", str(good), "--output", "o", "--max-len", "0"],
             "--max-len must be a positive integer, got 0"),
            (["generate", *model, "--prompt", "x", "--output", "o.jsonl"], "--output goes with --input"),
            (["generate", *model, "--prompt", "x", "--max-batch", "4"], "--max-batch goes with --input"),
            (["serve", *model, "--port", "99999"], "--port must be from 0 to 65535"),
            (["serve", *model, "--port", port], f"--port {port}: cannot listen there"),
            (["serve", *model, "--max-queue", "0"], "--max-queue must be a positive integer"),
            (["generate", *model, "--prompt", "x", "--devices", "-1"], "--devices must be 0"),
            (["data", "tokenize", "--tokenizer", "t", "--input", "i", "--output", "o", "--chunk-mb", "nan"],
             "--chunk-mb must be a positive number, got nan"),
            (["train", "--config", str(tmp_path)], "training config .* is a folder"),
            (["plan", "--model", "internlm2-1_8b", "--programs", "prefill,bogus"],
             "--programs: unknown program 'bogus'"),
            (["plan", "--model", "internlm2-1_8b", "--dtype", "fp8"], "--dtype must be float32, bfloat16 or float16"),
            (["plan", "--model", "internlm2-1_8b", "--max-new-tokens", "-20"], "--max-new-tokens must be a positive"),
        ]
        for argv, words in cases:
            assert main(argv) == 1, argv
            err = capsys.readouterr().err
            assert re.search(words, err) and err.strip().count("\n") == 0, (argv, err)
    assert not (tmp_path / "o").exists()
    # the checks start no JAX: simulated devices (and a multi-host job) can still be set up after them
    done = _run(["-m", "internlm_jax", "generate", *model, "--input", str(good), "--output", str(tmp_path / "o"),
                 "--devices", "4"])
    assert done.returncode == 1 and "--model: no config.json" in done.stderr, done.stderr[-2000:]


def test_a_batch_output_must_be_this_commands_output(tmp_path):
    """A rerun skips the ids already in the output, so a file that is not this command's output (a copy
    of the input) is refused, not taken as all done."""
    from internlm_jax.batch import BatchInputError, finished_ids

    out = tmp_path / "out.jsonl"
    out.write_text('{"id": 1, "prompt": "x"}\n')
    with pytest.raises(BatchInputError, match="out.jsonl:1: not an output line of this command"):
        finished_ids(out)
    out.write_text('{"id": 1, "text": "y", "prompt_tokens": 2, "completion_tokens": 1, "finish_reason": "stop"}\n'
                   '{"id": 2, "te')
    assert finished_ids(out) == {1} and out.read_text().endswith("}\n")  # the torn line is cut off


def test_chat_goes_on_after_a_turn_that_cannot_run(tmp_path, capsys, monkeypatch):
    """A turn that does not fit the context is named and dropped; the session goes on with the next."""
    import io
    import sys

    import internlm_jax as ij
    from internlm_jax.cli import main

    texts = ["the river runs past the mesh", "sharded arrays sleep under quiet stars"] * 20
    tok = ij.Tokenizer.train(texts, tmp_path / "tokenizer.model", vocab_size=300)
    cfg = ij.InternLM2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                             num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    ij.InternLM2(cfg, seed=0).save_pretrained(tmp_path / "m", extra_files=[(tmp_path / "tokenizer.model",
                                                                           "tokenizer.model")])
    monkeypatch.setattr(sys, "stdin", io.StringIO("the river " * 40 + "\nhi\n"))
    assert main(["chat", "--model", str(tmp_path / "m"), "--max-new-tokens", "3", "--quiet"]) == 0
    out, err = capsys.readouterr()
    assert "exceeds max_length=64" in err and "start a new session, or pass --truncate" in err
    assert out.strip(), out  # the second turn was answered


def test_first_hour_slips_are_named(tmp_path, capsys):
    """A preset name, a weights file or a folder without a tokenizer as --model; bf16 for --dtype; text
    where ids go; a name where a config goes; one string given to Tokenizer.train."""
    import jax.numpy as jnp

    import internlm_jax as ij
    from internlm_jax.cli import main

    texts = ["the river runs past the mesh", "sharded arrays sleep under quiet stars"] * 20
    tok = ij.Tokenizer.train(texts, tmp_path / "tok" / "tokenizer.model", vocab_size=300)
    cfg = ij.InternLM2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                             num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    model = ij.InternLM2(cfg, seed=0)
    model.save_pretrained(tmp_path / "m")
    for model_arg, words in (("internlm2_5-7b-chat", "--model: no config.json at internlm2_5-7b-chat; "
                                                     "'internlm2_5-7b-chat' names a released model"),
                             (str(tmp_path / "m" / "model.safetensors"), "--model: .*is not a config.json"),
                             (str(tmp_path / "m"), "--model: tokenizer model not found.*or pass --tokenizer")):
        assert main(["generate", "--model", model_arg, "--prompt", "hi"]) == 1
        err = capsys.readouterr().err
        assert re.search(words, err) and err.strip().count("\n") == 0, err
    assert main(["convert", "hf-to-orbax", str(tmp_path / "m"), str(tmp_path / "ox"), "--dtype", "bf16",
                 "--quiet"]) == 0
    assert ij.InternLM2.from_pretrained(tmp_path / "ox").param_dtype == jnp.bfloat16
    with pytest.raises(TypeError, match="not text: encode it first"):
        model("Hello")
    with pytest.raises(TypeError, match="takes an InternLM2Config, got str"):
        ij.InternLM2("internlm2_5-7b")
    with pytest.raises(TypeError, match="a list of texts, not one string"):
        ij.Tokenizer.train("examples/data/tiny_corpus.txt", tmp_path / "t.model")


def test_debug_shows_the_traceback_before_or_after_the_subcommand(tmp_path, capsys):
    from internlm_jax.cli import main

    bad = tmp_path / "run.yaml"
    bad.write_text("optim: {lr: fast}\n")
    for argv in (["--debug", "train", "--config", str(bad)], ["train", "--config", str(bad), "--debug"]):
        with pytest.raises(ValueError, match="optim.lr"):
            main(argv)
    assert main(["train", "--config", str(bad)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "optim.lr" in err


def test_example_load_and_inspect():
    done = _run(["examples/load_and_inspect.py"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert "logits (1, 5, 92544) float32" in done.stdout
    assert "hidden state 2: mean norm" in done.stdout


def test_example_serve_and_query():
    done = _run(["examples/serve_and_query.py"])
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert "models: ['tiny-chat']" in out and "'completion_tokens': 24" in out
    assert "6 concurrent requests: " in out and "server stopped" in out
