"""Serving and batch inference over two local processes (jax.distributed over gloo): process 0 owns
the HTTP port and the output file, process 1 runs the same engine steps; the mesh spans both."""

import json
import shutil
import socket
import subprocess
import sys
import time

import httpx
import pytest
from hf_fixtures import ROOT, user_env

import internlm_jax as ij

# gloo's C++ threads print "[Gloo] Rank 0 is connected to 1 peer ranks. Expected number of connected peer ranks
# is : 1" to stdout, two of them interleaved character by character at times
GLOO_CHARS = set("[Gloo] Rank 0123456789 is connected to peer ranks. Expected number of connected peer ranks is :\n")


def printed_with_gloo(log: str, text: str) -> bool:
    """Whether ``log`` is ``text`` (in order, whole) with only characters of gloo's lines around and
    between its characters."""
    rest, i = [], 0
    for c in log:
        if i < len(text) and c == text[i]:
            i += 1
        else:
            rest.append(c)
    return i == len(text) and set(rest) <= GLOO_CHARS


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    base = tmp_path_factory.mktemp("mh")
    texts = (ROOT / "examples" / "data" / "tiny_corpus.txt").read_text().splitlines()
    tok = ij.Tokenizer.train(texts, base / "tokenizer.model", vocab_size=400)
    cfg = ij.InternLM2Config(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    ij.InternLM2(cfg, seed=1).save_pretrained(base / "m", extra_files=[tok.model_file])
    return base / "m"


def launch(args, port):
    """The same command on both 'hosts' (4 simulated CPU devices each; mesh tensor=2 x fsdp=4)."""
    env = user_env()
    return [subprocess.Popen([sys.executable, "-m", "internlm_jax", *args, "--devices", "4", "--tensor", "2",
                              "--fsdp", "4", "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
                              "--process-id", str(i), "--quiet"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True) for i in range(2)]


def finish(procs, timeout=300):
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=timeout)[0])
        except subprocess.TimeoutExpired:
            p.kill()
            outs.append(p.communicate()[0])
    return outs


def test_batch_command_on_two_processes_writes_each_line_once(folder, tmp_path):
    model, tok = ij.InternLM2.from_pretrained(folder), ij.Tokenizer.from_pretrained(folder)
    prompts = {f"q{i}": f"The {w} river" for i, w in enumerate(("long", "cold", "old", "wide", "deep", "slow"))}
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("".join(json.dumps({"id": k, "prompt": p, "max_tokens": 7 + i}) + "\n"
                           for i, (k, p) in enumerate(prompts.items())))
    procs = launch(["generate", "--model", str(folder), "--input", str(src), "--output", str(out),
                    "--max-batch", "4", "--max-len", "128"], free_port())
    logs = finish(procs)
    assert [p.returncode for p in procs] == [0, 0], "\n".join(x[-3000:] for x in logs)
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert sorted(x["id"] for x in lines) == sorted(prompts)  # each once
    for i, (k, p) in enumerate(prompts.items()):
        line = next(x for x in lines if x["id"] == k)
        assert line["text"] == ij.generate(model, tok, [p], max_new_tokens=7 + i)[0]


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_a_signal_stops_the_batch_job_on_both_processes(folder, tmp_path, sig):
    """SIGINT (a terminal's Ctrl-C) to both processes in the middle of a batch run: process 0 finishes the
    engine step the others are running, tells them, and both exit at once instead of waiting on each other.
    SIGTERM (a scheduler's) ends both at once (JAX's preemption service, which would swallow it, is off).
    Every line written so far is whole."""
    import signal

    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("".join(json.dumps({"id": f"q{i}", "prompt": f"The {i} river", "max_tokens": 60}) + "\n"
                           for i in range(400)))
    procs = launch(["generate", "--model", str(folder), "--input", str(src), "--output", str(out),
                    "--max-batch", "4", "--max-len", "128"], free_port())
    deadline = time.time() + 240
    while not (out.exists() and out.read_text().count("\n") >= 2) and time.time() < deadline:
        time.sleep(0.1)
    for p in procs:
        p.send_signal(getattr(signal, sig))
    logs = finish(procs, timeout=60)
    if sig == "SIGINT":
        assert [p.returncode for p in procs] == [130, 1], logs
        assert "process 0 failed: interrupted (Ctrl-C)" in logs[1], logs[1]
    else:
        assert [p.returncode for p in procs] == [-signal.SIGTERM] * 2, logs
    lines = out.read_text().splitlines()
    assert 2 <= len(lines) < 400 and all(json.loads(x)["finish_reason"] for x in lines)


@pytest.mark.parametrize("target", [0, 2])
def test_ctrl_c_to_one_process_of_generate_prompt_ends_the_others_naming_it(folder, target):
    """Outside the engine (``generate --prompt``, three processes) a Ctrl-C ends that process at once
    (130); the others were left in a collective (gloo's 30 s, then the exit barrier's 30 s) or, when
    process 0 left, aborted by JAX with a C++ stack trace. Now they end too (1), saying which process was
    interrupted; process 0, whose exit takes down the coordination service, leaves only after the others
    have seen it."""
    import signal
    import threading

    port = free_port()
    procs = [subprocess.Popen([sys.executable, "-m", "internlm_jax", "generate", "--model", str(folder), "--prompt",
                               "The river", "--max-new-tokens", "1000", "--devices", "2", "--tensor", "2", "--fsdp",
                               "3", "--coordinator", f"127.0.0.1:{port}", "--num-processes", "3", "--process-id",
                               str(i), "--quiet"], cwd=ROOT, env=user_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(3)]
    printed = []
    reader = threading.Thread(target=lambda: printed.extend(iter(lambda: procs[0].stdout.read(1), "")), daemon=True)
    reader.start()
    deadline = time.time() + 240
    while sum(c not in GLOO_CHARS for c in printed) < 5 and procs[0].poll() is None and time.time() < deadline:
        time.sleep(0.05)  # process 0 is streaming the reply: both are inside the decode loop
    procs[target].send_signal(signal.SIGINT)
    codes = []
    for p in procs:
        try:
            codes.append(p.wait(timeout=25))
        except subprocess.TimeoutExpired:
            p.kill()
            codes.append(None)
    reader.join(10)
    logs = ["".join(printed)] + [p.stdout.read() for p in procs[1:]]
    assert codes == [130 if i == target else 1 for i in range(3)], logs
    for i in set(range(3)) - {target}:
        assert f"process {target} failed: interrupted (Ctrl-C)" in logs[i], logs[i][-2000:]
        assert "Check failure stack trace" not in logs[i], logs[i][-2000:]


def test_generate_prompt_on_two_processes_prints_the_single_process_text_once(folder):
    """``generate --prompt`` on a mesh spanning two processes (its PRNG key made on the devices, tokens
    gathered from both): process 0 prints what one process prints, process 1 prints nothing."""
    model, tok = ij.InternLM2.from_pretrained(folder), ij.Tokenizer.from_pretrained(folder)
    want = ij.generate(model, tok, "The river", max_new_tokens=8, temperature=0.8, seed=4)
    for extra in ([], ["--no-stream"]):
        procs = launch(["generate", "--model", str(folder), "--prompt", "The river", "--max-new-tokens", "8",
                        "--temperature", "0.8", "--seed", "4", *extra], free_port())
        logs = finish(procs)
        assert [p.returncode for p in procs] == [0, 0], "\n".join(x[-3000:] for x in logs)
        assert set(want) - GLOO_CHARS  # so that printing it again, or on process 1, shows
        assert printed_with_gloo(logs[0], want.strip()) and printed_with_gloo(logs[1], ""), logs


def launch_each(args_of, port):
    """Process i runs ``args_of(i)`` (launch's mesh and job flags added)."""
    return [subprocess.Popen([sys.executable, "-m", "internlm_jax", *args_of(i), "--devices", "4", "--tensor", "2",
                              "--fsdp", "4", "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
                              "--process-id", str(i), "--quiet"], cwd=ROOT, env=user_env(), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True) for i in range(2)]


def test_a_failure_on_process_0_or_different_flags_fail_every_process(folder, tmp_path):
    """Only process 0 reads --input (process 1's path need not exist); its error ends process 1 with
    exit 1 too (it used to exit 0). Flags that would make the processes run different programs are named."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": 1, "prompt": "x"}\n{"id": 2, "prompt": "y", "temprature": 0.5}\n')
    procs = launch_each(lambda i: ["generate", "--model", str(folder), "--output", str(tmp_path / "out.jsonl"),
                                   "--input", str(bad if i == 0 else tmp_path / "not-on-this-host.jsonl")],
                        free_port())
    logs = finish(procs)
    assert [p.returncode for p in procs] == [1, 1], logs
    assert "bad.jsonl:2: unknown key 'temprature'" in logs[0], logs[0]
    assert "process 0 failed: BatchInputError: " in logs[1] and "bad.jsonl:2" in logs[1], logs[1]
    procs = launch_each(lambda i: ["generate", "--model", str(folder), "--input", str(bad), "--output",
                                   str(tmp_path / "out.jsonl"), "--max-batch", str(4 - 2 * i)], free_port())
    logs = finish(procs)
    assert [p.returncode for p in procs] == [1, 1], logs
    assert all("different engine settings: --max-batch is 4 on process 0, 2 on process 1" in log for log in logs)


def test_a_start_up_error_on_one_process_ends_every_process_naming_it(folder, tmp_path):
    """A path that is bad on one host only: the others stop before the model's load (they used to wait
    for gloo's 30 s timeout and then print only that), and say which process failed and why. When each
    fails for its own reason, each prints both."""
    missing = tmp_path / "weights-missing"
    missing.mkdir()
    (missing / "config.json").write_text((folder / "config.json").read_text())
    (missing / "tokenizer.model").write_bytes((folder / "tokenizer.model").read_bytes())
    for i in range(2):  # the bad folder on process 1, then on process 0
        procs = launch_each(lambda j: ["generate", "--model", str(tmp_path / "nowhere" if j == 1 - i else folder),
                                       "--prompt", "x"], free_port())
        logs = finish(procs, timeout=120)
        assert [p.returncode for p in procs] == [1, 1], logs
        assert "error: --model: no config.json at" in logs[1 - i], logs
        assert f"error: process {1 - i} failed: --model: no config.json at" in logs[i], logs
    truncated = tmp_path / "truncated"
    shutil.copytree(folder, truncated)
    with open(truncated / "model.safetensors", "r+b") as f:
        f.truncate(f.seek(0, 2) - 100)
    procs = launch_each(lambda j: ["generate", "--model", str(missing if j == 0 else truncated), "--prompt", "x"],
                        free_port())
    logs = [log.replace(f"{tmp_path}/", "") for log in finish(procs, timeout=120)]
    assert [p.returncode for p in procs] == [1, 1], logs
    no_weights, cut = "weights-missing: no weights found", "truncated/model.safetensors: truncated: tensor"
    assert f"error: {no_weights}" in logs[0] and f"process 1 failed: {cut}" in logs[0], logs
    assert f"error: {cut}" in logs[1] and f"process 0 failed: {no_weights}" in logs[1], logs


@pytest.mark.parametrize("flags,named", [
    ((["--tensor", "2", "--fsdp", "4"], ["--tensor", "4", "--fsdp", "2"]), "--fsdp is 4 on process 0, 2 on process 1"),
    ((["--max-new-tokens", "5"], ["--max-new-tokens", "9"]), "--max-new-tokens is 5 on process 0, 9 on process 1"),
    ((["--prompt", "y"], []), "--prompt differs between process 0 and process 1")])
def test_different_flags_are_named_before_the_model_loads(folder, flags, named):
    """Processes given different meshes, prompts or sampling flags would run different programs and wait on
    each other in gloo (30 s, then a message naming none of it); they are compared first."""
    port = free_port()
    procs = [subprocess.Popen([sys.executable, "-m", "internlm_jax", "generate", "--model", str(folder), "--prompt",
                               "x", "--devices", "4", "--tensor", "2", "--fsdp", "4", *flags[i], "--coordinator",
                               f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i), "--quiet"],
                              cwd=ROOT, env=user_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    logs = finish(procs, timeout=120)
    assert [p.returncode for p in procs] == [1, 1], logs
    assert all(f"error: the processes were started with different flags: {named}" in log for log in logs), logs


# the CLI with process 1 reaching the mesh check `delay` seconds after process 0 (as on a loaded machine)
LATE_PROCESS_1 = """
import os, sys, time
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
import internlm_jax
from internlm_jax import cli
make_mesh = internlm_jax.make_mesh
def late_make_mesh(*args, **kw):
    time.sleep(float(sys.argv[1]) if sys.argv[sys.argv.index("--process-id") + 1] == "1" else 0)
    return make_mesh(*args, **kw)
internlm_jax.make_mesh = late_make_mesh
sys.exit(cli.main(sys.argv[2:]))
"""


@pytest.mark.parametrize("delay", [0, 5])
def test_a_mesh_that_leaves_a_process_out_is_refused_on_every_process(folder, delay):
    """Each process reports the error itself: process 0 (the coordination service) waits for the late one
    instead of exiting first, which would abort it with a C++ stack trace."""
    env = user_env()
    port = free_port()
    procs = [subprocess.Popen([sys.executable, "-c", LATE_PROCESS_1, str(delay), "generate", "--model", str(folder),
                               "--prompt", "x", "--tensor", "2", "--fsdp", "1", "--coordinator", f"127.0.0.1:{port}",
                               "--num-processes", "2", "--process-id", str(i), "--quiet"],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    logs = finish(procs)
    assert [p.returncode for p in procs] == [1, 1], logs
    assert all("leaving out processes [1]" in log and "must span all 8 devices" in log for log in logs), logs


def test_serve_on_two_processes_answers_like_one(folder):
    model, tok = ij.InternLM2.from_pretrained(folder), ij.Tokenizer.from_pretrained(folder)
    port = free_port()
    procs = launch(["serve", "--model", str(folder), "--port", str(port), "--max-batch", "4", "--max-len", "128"],
                   free_port())
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 300
        while True:
            assert all(p.poll() is None for p in procs), "\n".join(finish(procs, 5))
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                assert time.time() < deadline
                time.sleep(0.5)
        for prompt, n in (("The river", 12), ("A cold morning", 9)):
            r = httpx.post(url + "/v1/completions", json={"model": "m", "prompt": prompt, "max_tokens": n,
                                                          "temperature": 0}, timeout=120)
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["text"] == ij.generate(model, tok, [prompt], max_new_tokens=n)[0]
    finally:
        procs[1].terminate()  # a job's SIGTERM reaches every process: process 1 follows on until told to stop,
        procs[0].terminate()  # process 0 drains and tells it to; both exit cleanly
        logs = finish(procs, 120)
    assert [p.returncode for p in procs] == [0, 0], "\n".join(x[-3000:] for x in logs)
