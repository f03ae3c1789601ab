"""Process 0 tells the other processes of a multi-host job what to run next.

Serving and batch inference decide each engine step on process 0 (which owns the HTTP port and the
output file); every process must then run the same compiled programs with the same inputs. A step
is plain data (JSON), broadcast over the job's own collectives
(``multihost_utils.broadcast_one_to_all``): first its length, then its bytes padded to a power of two
(a few compiled shapes). A broadcast that fails or does not complete within ``timeout_s`` (a process
died or hangs) ends this process with an error instead of waiting forever; an idle process 0 sends empty
steps every second, so a silent one is noticed.

Outside the collectives, processes tell each other how they fail, through the job's coordination
service: each failed process leaves its error there (the others name it), a rendezvous before the first
collective stops every process once one has failed at start-up, and a process that exits at once
(Ctrl-C) says so, which ends the others within about a second.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
import zlib

import numpy as np


def initialize(coordinator: str | None, num_processes: int, process_id: int, from_environment: bool = False,
               timeout_s: int = 300, preemption: bool = False):
    """``jax.distributed.initialize`` for the CLI (gloo collectives on CPU; GPU/TPU unaffected); every
    process must join within ``timeout_s`` seconds. JAX's preemption service catches SIGTERM and only
    records it: training (``preemption``) acts on it (Orbax saves at the agreed step, then the run
    stops); serving and batch inference would go on until the scheduler's SIGKILL, so for them it is
    off and SIGTERM ends each process as it would a single one."""
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.config.update("jax_enable_preemption_service", preemption)
    if coordinator:
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                                   process_id=process_id, initialization_timeout=timeout_s)
    elif from_environment:
        jax.distributed.initialize(initialization_timeout=timeout_s)
    if _job_size() > 1:
        threading.Thread(target=_end_when_a_process_leaves, name="internlm-jax-departures", daemon=True).start()


def check_port_free(coordinator: str) -> None:
    """Refuse a ``host:port`` whose port is taken on this host before process 0 starts JAX's coordination
    service there: it would crash the process (a segmentation fault) and leave the others waiting out
    their join timeout."""
    import socket

    host, _, port = coordinator.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--coordinator must be HOST:PORT, got {coordinator!r}")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a closed run's TIME_WAIT is no obstacle
        try:
            s.bind(("0.0.0.0", int(port)))
        except OSError as e:
            raise ValueError(f"--coordinator {coordinator}: port {port} is in use on this host (process 0 serves "
                             f"the job's coordinator there; pick a free port): {e.strerror}") from None


def check_same(values: dict[str, int | float | str | None], what: str) -> None:
    """Every process of the job must hold the same ``values`` (settings); otherwise every process raises a
    ValueError naming the first that differs, instead of the job hanging or mixing programs later. Numbers
    are named with each process's value; text (a config, a prompt) is compared by checksum."""
    import jax
    from jax.experimental import multihost_utils

    if jax.process_count() == 1:
        return

    def number(v) -> float:
        return float(zlib.crc32(v.encode())) if isinstance(v, str) else float("nan") if v is None else float(v)

    def shown(v: float):  # (gathered as float32 unless JAX runs in 64 bits: shown at that precision)
        return "none" if v != v else int(v) if v.is_integer() else str(np.float32(v))

    mine = np.asarray([number(v) for v in values.values()], np.float64)
    every = np.asarray(multihost_utils.process_allgather(mine))  # [processes, len(values)]
    for i, (name, value) in enumerate(values.items()):
        column = [repr(x) for x in every[:, i].tolist()]  # repr: nan equals nan
        if len(set(column)) == 1:
            continue
        if isinstance(value, str):
            other = next(p for p, x in enumerate(column) if x != column[0])
            raise ValueError(f"the processes were started with different {what}: {name} differs between process 0 "
                             f"and process {other}")
        raise ValueError(f"the processes were started with different {what}: {name} is "
                         f"{', '.join(f'{shown(v)} on process {p}' for p, v in enumerate(every[:, i].tolist()))}")


class PeerFailed(RuntimeError):
    """Another process of the job failed, and this one stops because of it (the message names that
    process and its error)."""


# What the processes of a job tell each other outside their collectives, in the coordination service's
# key-value store (JAX has no public API for it, nor a public barrier with a timeout):
_ERRORS = "internlm_jax/errors/"  # + process index: that process's error
_FAILED = "internlm_jax/failed"  # the first process to report an error
_LEFT = "internlm_jax/left"  # the first process to exit without waiting for the others (Ctrl-C)
_SEEN = "internlm_jax/seen/"  # + process index: that process saw _LEFT and exits
_ARRIVED = "internlm_jax/arrived/"  # + a rendezvous's name: how many processes got there
_WATCH_S = 1.0  # how often every process looks for _LEFT: one small request to the service each time


def _coordination_client():
    from jax._src import distributed

    return distributed.global_state.client


def _job_size() -> int:
    """Processes in the job (1 outside one), asked without starting a backend."""
    from jax._src import distributed

    if distributed.global_state.client is None:
        return 1
    return distributed.global_state.num_processes or 1


def _this_process() -> int:
    from jax._src import distributed

    return distributed.global_state.process_id or 0


def _get(client, key: str) -> str | None:
    """The value under ``key``, or None where there is none (other errors are raised)."""
    try:
        return client.key_value_try_get(key)
    except Exception as e:
        if "NOT_FOUND" in str(e):
            return None
        raise


def report_error(message: str, leaving: bool = False) -> None:
    """Leave this process's error where the other processes look for it. Without it, process 0 would only
    see a collective fail (or time out) when a follower failed, and name no cause. ``leaving``: this
    process exits at once (the others then end too, see :func:`leave_now`)."""
    client, me = _coordination_client(), str(_this_process())
    if client is None:
        return
    for key, value in ((_ERRORS + me, message), (_FAILED, me), *([(_LEFT, me)] if leaving else [])):
        try:
            client.key_value_set(key, value)
        except Exception:  # set already (by this process, or another was first), or the service is gone
            pass


def peer_errors() -> dict[int, str]:
    """The errors other processes of the job have reported, by process index."""
    try:
        found = _coordination_client().key_value_dir_get(_ERRORS)
    except Exception:
        return {}
    errors = {int(key.rsplit("/", 1)[1]): message for key, message in found}
    errors.pop(_this_process(), None)
    return dict(sorted(errors.items()))


def _peers_failed() -> PeerFailed:
    return PeerFailed("; ".join(f"process {p} failed: {m}" for p, m in peer_errors().items()))


def rendezvous(name: str, timeout_s: float = 300.0) -> None:
    """Wait until every process of the job reaches this point, and raise :class:`PeerFailed` as soon as
    one reports an error instead. Called before the first collective (the model's load), it ends the job in
    a second when a path or flag is bad on one host, instead of at gloo's or the step channel's timeout.
    A process that gives up waiting closes the count, so that a late one does not go on alone."""
    n = _job_size()
    if n == 1:
        return
    client, counter = _coordination_client(), _ARRIVED + name
    arrived = client.key_value_increment(counter, 1)
    deadline = time.monotonic() + timeout_s
    while True:  # arrivals first: a peer that got past here may fail on its own before this process looks
        if arrived == n:
            return
        if arrived > n:
            raise PeerFailed(f"other processes gave up waiting for every process at the {name}")
        if _get(client, _FAILED) is not None:
            raise _peers_failed()
        if time.monotonic() > deadline:
            client.key_value_increment(counter, n + 1)
            raise TimeoutError(f"{n - arrived} of {n} processes did not reach the {name} within {timeout_s:.0f} s")
        time.sleep(0.25)
        arrived = int(_get(client, counter))


def leave_now(reason: str, exit_code: int) -> None:
    """Exit this process of a multi-host job at once (Ctrl-C), telling the others, which end too. Process 0
    first waits (a few seconds at most) until they have seen it: its exit takes down the coordination
    service, and JAX would abort them with a C++ stack trace instead."""
    report_error(reason, leaving=True)
    try:
        if _this_process() == 0:
            _wait_until_seen(_coordination_client())
    except BaseException:  # a second Ctrl-C, or the service is gone: at once
        pass
    os._exit(exit_code)


def _wait_until_seen(client, timeout_s: float = 3 * _WATCH_S) -> None:
    """Process 0: wait until every process but the one that left has seen it leave."""
    deadline = time.monotonic() + timeout_s
    while len(client.key_value_dir_get(_SEEN)) < _job_size() - 1 and time.monotonic() < deadline:
        time.sleep(0.05)


def _acknowledge_departure(client) -> None:
    """Tell process 0 this process saw another leave and exits too; process 0 waits for the others first."""
    try:
        client.key_value_set(_SEEN + str(_this_process()), "1")
    except Exception:  # said already (the watcher and the error exit may both get here)
        pass
    if _this_process() == 0:  # the others must see it before the service goes
        _wait_until_seen(client)


def _departed(client) -> int | None:
    """The process that left the job (another than this one), if any."""
    left = _get(client, _LEFT)
    return None if left is None or int(left) == _this_process() else int(left)


def _end_when_a_process_leaves() -> None:
    """A thread of every process of a job: once another process has left (Ctrl-C), no collective can
    complete, and this process could otherwise wait in one for minutes (gloo's and the step channel's
    timeouts); it ends with that process's reason instead (exit code 1). The thread stops when the job
    is left normally, or when the coordination service cannot be asked."""
    while True:
        time.sleep(_WATCH_S)
        try:
            client = _coordination_client()
            if client is None:  # the job was left normally
                return
            left = _departed(client)
            if left is None:
                continue
            _acknowledge_departure(client)
        except Exception:
            return
        reason = peer_errors().get(left, "it left")
        print(f"internlm-jax: process {left} failed: {reason}; exiting", file=sys.stderr, flush=True)
        os._exit(1)


def finish() -> None:
    """Leave the job together: every process calls this once it is done (process 0 after telling the
    others to stop), so none exits while another still talks to it."""
    import jax

    if jax.process_count() > 1:
        jax.distributed.shutdown()


def leave_after_error(error: str | None, prefix: str, wait_s: float = 30.0) -> None:
    """End this process of a multi-host job after an error (exit code 1), its message already printed.

    ``error`` (None for :class:`PeerFailed`) is reported to the others, and the errors they reported are
    printed after it as ``{prefix}: process N failed: ...``: a follower's error would otherwise show on
    process 0 only as a collective that failed.

    Process 0 hosts the coordination service: once it exits, every other process still in the job is
    aborted with a page of C++ stack trace. A bad setting fails the same way everywhere, so each process
    first waits (at most ``wait_s``) for the others to fail too; then they leave the job together and each
    ends with its own message. A process whose peers go on exits when the wait runs out."""
    import jax

    try:
        client = _coordination_client()
        if client is None:
            return
        if error is not None:
            report_error(error)
        left_together = False
        if _departed(client) is not None:  # it will never reach the barrier
            _acknowledge_departure(client)
        else:
            try:
                client.wait_at_barrier("internlm_jax_error_exit", int(wait_s * 1000))
                left_together = True
            except Exception:  # a peer went on or died
                pass
        if error is not None:  # after the wait: by then every failed peer has reported
            for process, theirs in peer_errors().items():
                if theirs != error:
                    print(f"{prefix}: process {process} failed: {theirs}", file=sys.stderr, flush=True)
        if left_together:
            jax.distributed.shutdown()
    except BaseException:  # this JAX lacks the client, or Ctrl-C: leave alone
        pass
    finally:
        os._exit(1)


def abort(message: str) -> None:
    """End this process of a multi-host job at once with one line on stderr (exit code 3): once a
    process died or the processes disagree, no collective can complete, and waiting (or
    ``jax.distributed.shutdown``) would only hang."""
    print(f"internlm-jax: {message}; exiting", file=sys.stderr, flush=True)
    found: dict[int, str] = {}
    asking = threading.Thread(target=lambda: found.update(peer_errors()), daemon=True)
    asking.start()
    asking.join(2.0)  # the service may be unreachable with the process that died: not worth a longer wait
    for process, error in dict(found).items():
        print(f"internlm-jax: process {process} failed: {error}", file=sys.stderr, flush=True)
    os._exit(3)


class StepChannel:
    """``send`` on process 0, ``receive`` everywhere else, in the same order."""

    def __init__(self, timeout_s: float = 600.0):
        self.timeout_s = timeout_s

    def _broadcast(self, array: np.ndarray, what: str, timed: bool = True) -> np.ndarray:
        from jax.experimental import multihost_utils

        def give_up():
            abort(f"no {what} from the other processes in {self.timeout_s:.0f} s; a process died or hangs")

        timer = threading.Timer(self.timeout_s, give_up)
        timer.daemon = True
        if timed:
            timer.start()
        try:
            return np.asarray(multihost_utils.broadcast_one_to_all(array))
        except Exception as e:  # a peer went away: the collective failed instead of hanging
            abort(f"the {what} could not be exchanged with the other processes ({str(e).splitlines()[0][:200]}); "
                  "a process died")
        finally:
            timer.cancel()

    def send(self, step: dict) -> None:
        raw = json.dumps(step, separators=(",", ":")).encode()
        self._broadcast(np.asarray([len(raw)], np.int32), "step length")
        buf = np.zeros(max(1024, 1 << (len(raw) - 1).bit_length()), np.uint8)
        buf[:len(raw)] = np.frombuffer(raw, np.uint8)
        self._broadcast(buf, "step")

    def receive(self, timed: bool = True) -> dict:
        """The next step. ``timed=False`` for the first one: process 0 may read and check a large input
        first (a dead process 0 is still noticed, by the job's coordination service)."""
        n = int(self._broadcast(np.zeros(1, np.int32), "step length", timed)[0])
        buf = self._broadcast(np.zeros(max(1024, 1 << (n - 1).bit_length()), np.uint8), "step")
        return json.loads(buf[:n].tobytes())
