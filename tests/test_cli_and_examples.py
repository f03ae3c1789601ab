"""The offline demo and the examples run end to end (in fresh processes, as a user runs them)."""

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
