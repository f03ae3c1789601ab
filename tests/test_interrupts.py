"""Ctrl-C held to a safe point (internlm_jax.interrupts), in a child process that signals itself."""

import subprocess
import sys

from hf_fixtures import ROOT, user_env

PROGRAM = """
import os, signal, sys
from internlm_jax.interrupts import HeldInterrupt

if sys.argv[1] == "ignored":
    signal.signal(signal.SIGINT, signal.SIG_IGN)
held = HeldInterrupt("stopping after this step")
held.arm()
os.kill(os.getpid(), signal.SIGINT)
print("still running", flush=True)
if sys.argv[1] == "twice":
    os.kill(os.getpid(), signal.SIGINT)
    print("not reached", flush=True)
try:
    held.check()
    print("not raised", flush=True)
except KeyboardInterrupt:
    print("raised at check;", "handler restored:", signal.getsignal(signal.SIGINT) is signal.default_int_handler,
          flush=True)
"""


def run(mode):
    return subprocess.run([sys.executable, "-c", PROGRAM, mode], cwd=ROOT, env=user_env(), capture_output=True,
                          text=True, timeout=120)


def test_a_held_ctrl_c_is_raised_at_the_next_check_and_a_second_exits_at_once():
    once = run("once")
    assert once.returncode == 0, once.stderr
    assert once.stdout.splitlines() == ["still running", "raised at check; handler restored: True"]
    assert "interrupted; stopping after this step (Ctrl-C again to exit at once)" in once.stderr
    twice = run("twice")
    assert twice.returncode == 130 and twice.stdout.splitlines() == ["still running"], twice
    assert "interrupted again; exiting" in twice.stderr


def test_an_ignored_ctrl_c_stays_ignored():
    ignored = run("ignored")
    assert ignored.returncode == 0, ignored.stderr
    assert ignored.stdout.splitlines() == ["still running", "not raised"] and "interrupted" not in ignored.stderr
