"""How `sparsekd run` and `sparsekd demo` stop: on SIGTERM or SIGHUP within seconds, in any phase, and never leaving
the temporary Prefect server behind.

- ``stop_on_signals``: SIGTERM (what `timeout`, systemd and a cancelling worker send) and SIGHUP (a closed terminal)
  become ``Terminated`` in the main thread. It is a ``KeyboardInterrupt``, so ``except Exception`` (retry loops,
  best-effort cleanup) lets it through while ``finally`` and ``with`` blocks still run: a flow's failure path marks
  its MLflow runs KILLED (``FlowTracking.fail``) and Prefect marks the flow run Crashed. Inside a flow run Prefect's
  own SIGTERM bridge raises ``prefect.exceptions.TerminationSignal`` instead (Prefect marks it Crashed, the flow
  marks its MLflow runs KILLED the same way), then re-sends the signal to the handler it replaced: ours.
- A deadline: Python runs a signal handler only between bytecodes of the main thread, so a long C call, a stuck
  MLflow retry or a hang in cleanup could hold it. The C-level handler also writes the signal number to a pipe
  (``signal.set_wakeup_fd``); a watcher thread reading it ends the process with ``os._exit`` ``GRACE_S`` seconds
  after the first stop signal if it is still alive.
- ``start_temporary_prefect_server``: without ``PREFECT_API_URL`` Prefect starts a local API server as a child
  process and stops it at exit (``atexit``); a process killed by a signal runs no ``atexit``, so that server stayed
  behind under PID 1. We start it first, with a parent-death signal (Linux ``prctl(PR_SET_PDEATHSIG)``): the kernel
  sends it SIGTERM when this process dies, however it dies, kill -9 included.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from typing import Callable, Iterator

STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)
GRACE_S = 8.0  # cleanup time after a stop signal before the process exits regardless (the promise is 10 s)


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised in the main thread: unwinds like Ctrl-C; the exit code is 128 + the signal."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def until_stopped(run: Callable[[], int]) -> int:
    """``run()`` under ``stop_on_signals``; a stop signal ends it with one line on stderr and exit code 128 + signal
    (143 for SIGTERM), whatever exception the unwinding surfaced as (a library that calls back into Python may wrap
    ``Terminated`` in its own error, e.g. pydantic-core's ``PydanticSerializationError``)."""
    stopping = _Stopping()
    try:
        with stop_on_signals(stopping):
            return run()
    except BaseException:
        if stopping.signum is None:
            raise
        stop = Terminated(stopping.signum)
        print(f"sparsekd: {stop}", file=sys.stderr, flush=True)
        return stop.exit_code


@contextlib.contextmanager
def stop_on_signals(stopping: "_Stopping | None" = None) -> Iterator[None]:
    """SIGTERM and SIGHUP raise ``Terminated`` in the main thread (once: later ones only wait for the deadline), and
    the process exits ``GRACE_S`` seconds after the first one regardless; ``stopping.signum`` records the first.
    A signal the parent set to ignore (SIGHUP under ``nohup``) stays ignored. Outside the main thread this does
    nothing (Python allows signal handlers only there)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    stopping = stopping or _Stopping()
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)  # the C handler must never block on a full pipe
    previous_fd = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    previous = {s: signal.signal(s, stopping.handler) for s in STOP_SIGNALS if signal.getsignal(s) != signal.SIG_IGN}
    threading.Thread(target=stopping.watch, args=(read_fd,), name="sparsekd-stop-deadline", daemon=True).start()
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        signal.set_wakeup_fd(previous_fd)
        os.close(write_fd)  # the watcher reads end-of-file and stops, unless its deadline already runs


class _Stopping:
    """The handler (main thread) and the deadline watcher (its own thread) of one ``stop_on_signals`` block."""

    def __init__(self, grace_s: float = GRACE_S):
        self.grace_s = grace_s
        self.signum: int | None = None  # the first stop signal, seen by either
        self.raised = False

    def handler(self, signum: int, frame) -> None:
        if self.raised:  # already unwinding: let cleanup finish; the deadline bounds it
            return
        self.raised = True
        self.signum = self.signum or signum
        raise Terminated(signum)

    def watch(self, read_fd: int) -> None:
        """Wait for a stop signal's byte on the wakeup pipe (written by the C handler, even while the main thread
        is inside a long C call), then give the main thread ``grace_s`` seconds to unwind before ending the
        process."""
        signum = None
        while signum is None:
            received = os.read(read_fd, 64)
            if not received:  # the block ended without a stop signal
                os.close(read_fd)
                return
            signum = next((s for s in received if s in STOP_SIGNALS), None)
        self.signum = self.signum or signum  # also when Prefect's handler, not ours, took it
        # read_fd stays open: later signals (Prefect re-sends SIGTERM to our handler) still write to the pipe
        time.sleep(self.grace_s)
        name = signal.Signals(signum).name
        os.write(2, f"sparsekd: still running {self.grace_s:g} s after {name}; exiting now without cleanup "
                    f"(runs still open in MLflow are closed by the flow's next run)\n".encode())
        os._exit(128 + signum)


# ----------------------------------------------------------------------------------------------------------- the server


def start_temporary_prefect_server() -> None:
    """Without ``PREFECT_API_URL``, start Prefect's temporary local server now, in this (the main) thread, as a
    process the kernel sends SIGTERM when this one dies; Prefect then uses it for the whole run and stops it at
    exit as usual. With an API URL (a real server, the test harness) or once a temporary server runs, nothing.

    Why this way: Prefect 3.8.8 keeps one ``SubprocessASGIServer`` per port and uses the one under ``None`` when no
    API URL is set (``get_client``, the events and log workers); registering ours there is what Prefect's own test
    harness does (``prefect.testing.utilities.prefect_test_harness``). Prefect keeps its client type, logs and UI
    settings exactly as with its own temporary server; only the child gets a parent-death signal. A parent-death
    signal fires when the *thread* that started the child ends, hence the main thread. Not Linux: Prefect's server
    as it is (stopped at a normal exit only)."""
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value() or not sys.platform.startswith("linux"):
        return
    current = SubprocessASGIServer._instances.get(None)
    if current is not None and current.running:
        return
    SubprocessASGIServer._instances.pop(None, None)  # an unstarted default: ours replaces it
    server = _server_class(SubprocessASGIServer)()  # port None: registers itself as the default; Prefect picks a port
    server.start()


def _server_class(base: type) -> type:
    class DiesWithParent(base):
        """Prefect's temporary server whose process gets SIGTERM when this process dies."""

        def _run_uvicorn_command(self):
            # Prefect 3.8.8's SubprocessASGIServer._run_uvicorn_command (prefect/server/api/server.py), the same
            # command and environment (tests/test_signals.py checks that they still match), plus: the parent-death
            # signal, and a session of its own, so that a signal to our whole process group (`timeout`, systemd,
            # Ctrl-C in a terminal) does not stop the server while the flow still reports its end to it.
            import subprocess

            import prefect
            from prefect.settings import get_current_settings

            server_env = {"PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
            return subprocess.Popen(
                args=[sys.executable, "-m", "uvicorn", "--app-dir", str(prefect.__module_path__.parent), "--factory",
                      "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(self.port),
                      "--log-level", "error", "--lifespan", "on"],
                env={**os.environ, **server_env, **get_current_settings().to_environment_variables(exclude_unset=True)},
                preexec_fn=_parent_death_signal(signal.SIGTERM),
                start_new_session=True,
            )

    return DiesWithParent


def _parent_death_signal(signum: int) -> Callable[[], None]:
    """A ``preexec_fn``: the child asks the kernel for ``signum`` when its parent dies (``prctl(PR_SET_PDEATHSIG)``),
    and exits at once if the parent already died between fork and prctl. libc is loaded here, in the parent, so the
    child (between fork and exec) only makes the call."""
    import ctypes

    prctl = ctypes.CDLL("libc.so.6", use_errno=True).prctl
    pr_set_pdeathsig = 1
    parent = os.getpid()

    def set_in_child() -> None:
        prctl(pr_set_pdeathsig, signum, 0, 0, 0)
        if os.getppid() != parent:
            os._exit(1)

    return set_in_child
