"""Two local processes (jax.distributed over gloo) restore one checkpoint onto a mesh spanning both."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import reference as ref
from hf_fixtures import tiny_config, write_hf_checkpoint

from internlm_jax import InternLM2
from internlm_jax.cli import main

HERE = Path(__file__).resolve().parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("kind", ["orbax", "hf"])
def test_two_processes_restore_and_match_single_process(tmp_path, kind):
    cfg = tiny_config(num_attention_heads=8, num_key_value_heads=2, hidden_size=64, vocab_size=128)
    hf = write_hf_checkpoint(tmp_path / "hf", cfg, ref.random_state(cfg, seed=8), dtype="bfloat16")
    ckpt = hf
    if kind == "orbax":
        ckpt = tmp_path / "ox"
        assert main(["convert", "hf-to-orbax", str(hf), str(ckpt), "--quiet"]) == 0
    ids = np.random.RandomState(0).randint(0, cfg["vocab_size"], (4, 16))
    np.save(tmp_path / "ids.npy", ids)
    port = str(_free_port())
    env = dict(os.environ, PYTHONPATH=str(HERE.parent))
    env.pop("XLA_FLAGS", None)
    procs = [subprocess.Popen([sys.executable, str(HERE / "multihost_worker.py"), str(i), port, str(ckpt),
                               str(tmp_path / "ids.npy"), str(tmp_path / "out.npy")],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=300))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("the two-process run timed out")
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    single = np.asarray(InternLM2.from_pretrained(ckpt, dtype="float32")(ids))
    got = np.load(tmp_path / "out.npy")
    assert got.shape == single.shape
    assert np.abs(got - single).max() <= 1e-5 * np.abs(single).max()


# One process joins a job of one and uses the coordination service the way a failing or departing
# process of a real job does: JAX offers these calls only through jax._src, so a JAX upgrade that renames
# or changes them fails here rather than on a user's cluster.
COORDINATION_CHECK = """
import sys
import jax
from internlm_jax import multihost
multihost.initialize("127.0.0.1:" + sys.argv[1], 1, 0)
client = multihost._coordination_client()
assert multihost._job_size() == 1 and multihost._this_process() == 0
assert multihost._get(client, "internlm_jax/failed") is None and multihost.peer_errors() == {}
multihost.report_error("mine", leaving=True)
assert multihost.peer_errors() == {} and multihost._departed(client) is None  # this process's own
client.key_value_set("internlm_jax/errors/1", "bad path")  # as a second process would
client.key_value_delete("internlm_jax/left")
client.key_value_set("internlm_jax/left", "1")
assert multihost.peer_errors() == {1: "bad path"} and multihost._departed(client) == 1
assert multihost._get(client, "internlm_jax/failed") == "0" and str(multihost._peers_failed()) == (
    "process 1 failed: bad path")
assert client.key_value_increment("internlm_jax/arrived/x", 1) == 1
assert multihost._get(client, "internlm_jax/arrived/x") == "1"
client.wait_at_barrier("internlm_jax_error_exit", 1000)
multihost.rendezvous("x")  # a job of one: nothing to wait for
multihost.finish()
print("ok")
"""


def test_the_coordination_service_calls_the_cli_relies_on():
    env = dict(os.environ, PYTHONPATH=str(HERE.parent), JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    r = subprocess.run([sys.executable, "-c", COORDINATION_CHECK, str(_free_port())], env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-3000:]
