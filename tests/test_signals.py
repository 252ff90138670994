"""How `sparsekd run` stops (sparsekd/cli/_signals.py): SIGTERM ends a run in seconds with exit code 143 and its
MLflow runs KILLED, and the temporary Prefect server it started dies with it, on SIGTERM and on kill -9.

The end-to-end tests run `sparsekd run dense-kd` on the tiny flow project as a subprocess with its own Prefect
home (a temporary server of its own), send the signal once a stage runs, and poll (up to 10 s) for the server to go.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

from conftest import make_flow_project
from test_flows import flow_values

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal: Linux only")


def start_run(tmp_path: Path) -> tuple[subprocess.Popen, Path, Path]:
    """`sparsekd run dense-kd` on the tiny project whose distillation would run for hours (so it is running when
    the signal comes); returns the process, its stderr file and its workdir."""
    root = make_flow_project(tmp_path / "project")
    workdir = tmp_path / "work"
    values = flow_values(root, workdir, ce_control=False)
    values["distill"].update(epochs=100_000, max_steps=100_000, eval_every=100_000, checkpoint_every=100_000)
    config = tmp_path / "dense-kd.yaml"
    config.write_text(yaml.safe_dump(values))
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}  # the temporary server, not a harness
    env.update(PREFECT_HOME=str(tmp_path / "prefect-home"), PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    stderr = tmp_path / "stderr.txt"
    with open(stderr, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "sparsekd", "run", "dense-kd", "--config", str(config)],
                                stdout=subprocess.DEVNULL, stderr=err, env=env, cwd=tmp_path)
    return proc, stderr, workdir


def wait_for(stderr: Path, text: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while text not in stderr.read_text():
        assert proc.poll() is None, f"the run ended (rc {proc.returncode}) before {text!r}:\n{stderr.read_text()}"
        assert time.monotonic() < deadline, f"no {text!r} after {timeout:g} s:\n{stderr.read_text()}"
        time.sleep(0.1)


def prefect_server_of(proc: subprocess.Popen) -> list[psutil.Process]:
    children = psutil.Process(proc.pid).children(recursive=True)
    assert any("uvicorn" in " ".join(c.cmdline()) for c in children), children  # the temporary Prefect server
    return children


def alive(processes: list[psutil.Process], within: float = 10.0) -> list[psutil.Process]:
    """The processes still running (zombies count as gone) after waiting up to ``within`` seconds for all to end."""
    deadline = time.monotonic() + within
    while True:
        running = [p for p in processes if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        if not running or time.monotonic() > deadline:
            return running
        time.sleep(0.1)


def test_sigterm_stops_the_run_marks_its_mlflow_runs_killed_and_ends_its_prefect_server(tmp_path):
    proc, stderr, workdir = start_run(tmp_path)
    try:
        wait_for(stderr, "distill: step", proc)  # the dense+kd arm's distillation runs
        children = prefect_server_of(proc)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 143, stderr.read_text()
        assert alive(children) == []
    finally:
        proc.kill()
    assert "sparsekd: stopped by SIGTERM" in stderr.read_text()
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("sparsekd-dense-kd").experiment_id])
    status = {r.data.tags.get("arm", "parent"): r.info.status for r in runs}
    assert status == {"parent": "KILLED", "dense": "FINISHED", "dense+kd": "KILLED"}
    reasons = {r.data.tags.get("arm", "parent"): r.data.tags.get("sparsekd.error") for r in runs}
    assert reasons == {"parent": "stopped by SIGTERM", "dense": None, "dense+kd": "stopped by SIGTERM"}


def test_kill_9_of_the_run_ends_its_prefect_server(tmp_path):
    proc, stderr, _ = start_run(tmp_path)
    try:
        wait_for(stderr, "distill: step", proc)
        children = prefect_server_of(proc)
        proc.kill()
        assert proc.wait(timeout=60) == -signal.SIGKILL
        assert alive(children) == []  # the kernel's parent-death signal reached it
    finally:
        proc.kill()


HANGING_CLEANUP = """
import time
from sparsekd.cli._signals import Terminated, _Stopping, stop_on_signals

with stop_on_signals(_Stopping(grace_s=1.0)):
    try:
        print("ready", flush=True)
        time.sleep(60)
    except Terminated as stop:
        print(f"unwinding: {stop}", flush=True)
        time.sleep(60)  # a cleanup that hangs (later signals do not interrupt it): the deadline ends the process
"""


def test_a_hanging_cleanup_still_ends_at_the_deadline_with_128_plus_the_signal():
    # Under nohup (a CI runner may use it) SIGHUP arrives ignored, and an ignored signal stays ignored by design:
    # the child starts with SIGHUP's default disposition, as in a terminal.
    proc = subprocess.Popen([sys.executable, "-c", HANGING_CLEANUP], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
                            preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_DFL))
    try:
        assert proc.stdout.readline().strip() == "ready"
        proc.send_signal(signal.SIGHUP)
        assert proc.stdout.readline().strip() == "unwinding: stopped by SIGHUP"
        proc.send_signal(signal.SIGTERM)  # ignored: the first signal's cleanup runs until the deadline
        assert proc.wait(timeout=30) == 128 + signal.SIGHUP
        assert "still running 1 s after SIGHUP; exiting now" in proc.stderr.read()
    finally:
        proc.kill()


def test_a_signal_marks_the_open_mlflow_runs_killed_any_other_error_failed(tmp_path):
    from mlflow.tracking import MlflowClient
    from prefect.exceptions import TerminationSignal

    from sparsekd.cli._signals import Terminated
    from tasks.tracking import FlowTracking, tracking_settings

    settings = tracking_settings(tmp_path, None, "signals")
    errors = {"sigterm-in-flow": TerminationSignal(signal.SIGTERM), "sighup": Terminated(signal.SIGHUP),
              "ctrl-c": KeyboardInterrupt(), "error": RuntimeError("boom")}
    for name, error in errors.items():
        tracking = FlowTracking.start(settings, name, None, tags={}, params={})
        tracking.start_arm(f"{name}-arm", {})
        tracking.fail(error)
    client = MlflowClient(settings["uri"])
    runs = client.search_runs([client.get_experiment_by_name("signals").experiment_id])
    got = {r.info.run_name: (r.info.status, r.data.tags["sparsekd.error"]) for r in runs}
    assert got["sigterm-in-flow"] == got["sigterm-in-flow-arm"] == ("KILLED", "stopped by SIGTERM")
    assert got["sighup"] == got["sighup-arm"] == ("KILLED", "stopped by SIGHUP")
    assert got["ctrl-c"] == ("KILLED", "stopped by SIGINT")
    assert got["error"] == got["error-arm"] == ("FAILED", "RuntimeError: boom")


def test_the_temporary_server_runs_prefects_own_command(monkeypatch):
    """`_signals.py` starts Prefect 3.8.8's server command with a parent-death signal added: the same arguments and
    environment as Prefect's own ``_run_uvicorn_command`` (a Prefect upgrade that changes it fails here)."""
    from prefect.server.api.server import SubprocessASGIServer

    from sparsekd.cli._signals import _server_class

    calls = []
    monkeypatch.setattr(subprocess, "Popen", lambda **kwargs: calls.append(kwargs))
    prefects = object.__new__(SubprocessASGIServer)  # not registered as a server: nothing starts
    ours = object.__new__(_server_class(SubprocessASGIServer))
    for server in (prefects, ours):
        server.port = 8765
        server._run_uvicorn_command()
    prefect_call, our_call = calls
    assert callable(our_call.pop("preexec_fn")) and our_call.pop("start_new_session") is True
    assert our_call == prefect_call
