"""Ctrl-C held until a safe point.

A loop that must not stop in the middle of an iteration (an engine step that other processes run with
this one, a training step followed by a checkpoint write) arms a :class:`HeldInterrupt` and calls
:meth:`~HeldInterrupt.check` where stopping is safe. A KeyboardInterrupt raised wherever the signal
happens to land can also be lost: inside a garbage-collector callback or a library's background wait,
Python prints it and goes on.
"""

from __future__ import annotations

import os
import signal
import sys
import threading


class HeldInterrupt:
    """The first Ctrl-C prints ``what`` happens next and is raised at the next :meth:`check`; a second
    ends the process at once (exit code 130), through ``leave(130)`` where given (a multi-host job tells
    the other processes). Signals reach the main thread only: armed elsewhere (a server's engine
    thread), and where Ctrl-C is ignored or handled from C, it does nothing."""

    def __init__(self, what: str, leave=None):
        self.what = what
        self.leave = leave or os._exit
        self.pressed = False
        self.previous = None

    def arm(self) -> None:
        if self.previous is not None or threading.current_thread() is not threading.main_thread():
            return
        previous = signal.getsignal(signal.SIGINT)
        if previous in (None, signal.SIG_IGN):
            return
        self.previous = previous
        signal.signal(signal.SIGINT, self._pressed)

    def _pressed(self, signum, frame):
        if self.pressed:
            print("internlm-jax: interrupted again; exiting", file=sys.stderr, flush=True)
            self.leave(130)
        self.pressed = True
        print(f"internlm-jax: interrupted; {self.what} (Ctrl-C again to exit at once)", file=sys.stderr, flush=True)

    def check(self) -> None:
        """Raise the held KeyboardInterrupt, if there is one (and restore the previous handler)."""
        if self.pressed:
            self.pressed = False
            self.disarm()
            raise KeyboardInterrupt

    def disarm(self) -> None:
        if self.previous is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, self.previous)
            self.previous = None


class CaughtInterrupt:
    """Ctrl-C raises at once, as Python's own handler does, and is raised again at the next :meth:`check`
    when it was lost: a KeyboardInterrupt raised inside a garbage-collector callback is printed and
    dropped, and the loop would run on (``generate --prompt`` to its last token). A context manager; off
    the main thread it does nothing."""

    def __init__(self):
        self.pressed = False
        self.previous = None

    def __enter__(self) -> "CaughtInterrupt":
        if threading.current_thread() is threading.main_thread() and \
                signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            self.previous = signal.signal(signal.SIGINT, self._pressed)
        return self

    def _pressed(self, signum, frame):
        self.pressed = True
        raise KeyboardInterrupt

    def check(self) -> None:
        if self.pressed:
            raise KeyboardInterrupt

    def __exit__(self, *exc) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
            self.previous = None
