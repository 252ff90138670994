"""Nothing fails late: the pre-flight (flows/preflight.py) turns every bad input into one line and exit code 2 before
a server starts or a stage directory exists; an empty config is an error; two first runs at once both open a fresh
MLflow database; the runs a dead process left RUNNING are closed by the next flow start; a full disk is one line."""

from __future__ import annotations

import errno
import os
import socket
import subprocess
import sys
import threading
import urllib.request
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
import yaml

from conftest import make_flow_project
from test_flows import flow_values
from sparsekd.cli import EXIT_BAD_INPUT, EXIT_NO_SPACE, main
from sparsekd_core.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    return make_flow_project(tmp_path_factory.mktemp("preflight"))


@pytest.fixture(autouse=True)
def local_tracking(monkeypatch):
    """Runs here log to the workdir's SQLite unless a test says otherwise."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def values(project: Path, workdir: Path, **changes) -> dict:
    """A dense-kd config that passes every check (the tiny model, its corpus and a held-out eval text)."""
    return flow_values(project, workdir, **changes)


def config_file(tmp_path: Path, config: dict) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture
def flows_never_start(monkeypatch):
    """Every flow replaced by a recorder: a run that gets past the pre-flight is seen, and starts nothing."""
    import flows.registry

    started = []
    monkeypatch.setattr(flows.registry, "ALL_FLOWS", {name: lambda cfg, name=name: started.append(name)
                                                      for name in flows.registry.ALL_FLOWS})
    return started


def run_cli(capsys, argv: list[str]) -> tuple[int, list[str]]:
    capsys.readouterr()
    code = main(argv)
    return code, capsys.readouterr().err.strip().splitlines()


def _mount_tmpfs(where: Path, options: str) -> bool:
    """A tmpfs at ``where`` (root only; False where this host does not allow it)."""
    where.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        return False
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True)
    return done.returncode == 0


@contextmanager
def unwritable_dir(tmp_path: Path):
    """A directory this process cannot create files in: a read-only tmpfs as root (root ignores modes), else a
    directory without write permission."""
    where = tmp_path / "read-only"
    if _mount_tmpfs(where, "ro,size=64k"):
        try:
            yield where
        finally:
            subprocess.run(["umount", "--lazy", str(where)], check=False)  # a busy mount detaches at once
    elif os.geteuid() != 0:
        where.chmod(0o500)
        try:
            yield where
        finally:
            where.chmod(0o700)
    else:
        yield Path("/proc")  # root without mount rights: no file can be created there


# ---------------------------------------------------------------------------------------------------------------- checks

def test_a_good_config_passes_and_creates_nothing(project, tmp_path):
    from flows.configs import DenseKDConfig
    from flows.preflight import preflight

    workdir = tmp_path / "new" / "w"
    preflight(DenseKDConfig(**values(project, workdir)))
    assert not (tmp_path / "new").exists()  # checked, not made: a later failing check leaves nothing behind


def _no_cuda(monkeypatch, tmp_path):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def _no_aws_credentials(monkeypatch, tmp_path):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                 "AWS_DEFAULT_PROFILE", "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
                 "AWS_CONTAINER_CREDENTIALS_FULL_URI"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("SPARSEKD_MIRROR", str(tmp_path / "w"))


# (case, the config's changes (a function of the project and tmp_path), what the one line says, setup)
CASES = [
    ("workdir is a file", lambda p, t: {"workdir": str(p / "eval.txt")}, "is a file; give a directory", None),
    ("model is some other file", lambda p, t: {"model": str(p / "eval.txt")}, "is a file but not a model", None),
    ("model dir without config.json", lambda p, t: {"model": str(t)}, "has no config.json", None),
    ("a .gguf that is not one", lambda p, t: {"model": str(_write(t / "fake.gguf", "not gguf"))},
     "is not a GGUF file", None),
    ("tracking URI scheme", lambda p, t: {"tracking_uri": "ftp://mlflow.example"}, "does not open ftp:// URIs",
     None),
    ("tracking sqlite under a file", lambda p, t: {"tracking_uri": f"sqlite:///{p / 'eval.txt'}/mlflow.db"},
     "a file; give a directory", None),
    ("s3 without credentials", lambda p, t: {"workdir": "s3://sparsekd-preflight/runs"}, "no AWS credentials found",
     _no_aws_credentials),
    ("device cuda without a GPU", lambda p, t: {"device": "cuda"}, "no CUDA device is available", _no_cuda),
    ("top_k above the vocabulary", lambda p, t: {"corpus": {"data": str(p / "corpus.jsonl"), "num_samples": 8,
                                                            "seq_len": 32, "top_k": 500}},
     "corpus.top_k=500 is larger than the vocabulary", None),
    ("corpus too small", lambda p, t: {"corpus": {"data": str(p / "corpus.jsonl"), "num_samples": 100,
                                                  "seq_len": 32, "top_k": 8}},
     "can give at most 60 sequences of 32 tokens", None),
]


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize("case, changes, message, setup", CASES, ids=[c[0] for c in CASES])
def test_each_check_is_one_line_and_exit_2_before_anything_starts(project, tmp_path, capsys, monkeypatch,
                                                                  flows_never_start, case, changes, message, setup):
    if setup is not None:
        setup(monkeypatch, tmp_path)
    workdir = tmp_path / "w"
    cfg = {**values(project, workdir), **changes(project, tmp_path)}
    code, err = run_cli(capsys, ["run", "dense-kd", "--config", str(config_file(tmp_path, cfg))])
    assert code == EXIT_BAD_INPUT and len(err) == 1 and message in err[0], err
    assert not flows_never_start  # no flow (and so no temporary Prefect server) started
    assert not workdir.exists() or not any(workdir.iterdir())  # no stage directory, no mlflow.db


def test_an_unwritable_workdir(project, tmp_path, capsys, flows_never_start):
    with unwritable_dir(tmp_path) as where:
        cfg = values(project, where / "runs")
        code, err = run_cli(capsys, ["run", "dense-kd", "--config", str(config_file(tmp_path, cfg))])
    assert code == EXIT_BAD_INPUT and len(err) == 1 and "cannot create files in" in err[0], err
    assert not flows_never_start


def test_the_pre_flight_runs_where_every_flow_starts(project, tmp_path):
    """A deployment's run never passes through the CLI: the flow's own start checks the same way."""
    from flows.configs import DenseKDConfig
    from flows.context import start

    with pytest.raises(ConfigError, match="is a file but not a model"):
        start(DenseKDConfig(**values(project, tmp_path / "w", model=str(project / "eval.txt"))), "dense-kd")
    assert not (tmp_path / "w").exists()


# ---------------------------------------------------------------------------------------------------------------- MLflow

@pytest.mark.parametrize("from_env", [False, True])
def test_an_unreachable_mlflow_is_one_attempt_one_line(project, tmp_path, capsys, monkeypatch, flows_never_start,
                                                       from_env):
    """Nothing listens on port 9: one HTTP request with a 3 s timeout, no MLflow client (it retries for minutes)."""
    import mlflow.tracking

    attempts = []
    real_urlopen = urllib.request.urlopen

    def spy(url, *args, timeout=None, **kwargs):
        attempts.append((getattr(url, "full_url", url), timeout))
        return real_urlopen(url, *args, timeout=timeout, **kwargs)

    def no_client(*args, **kwargs):
        raise AssertionError("the MLflow client (and its retries) must not be used before the check passes")

    monkeypatch.setattr(urllib.request, "urlopen", spy)
    monkeypatch.setattr(mlflow.tracking, "MlflowClient", no_client)
    uri = "http://127.0.0.1:9"
    if from_env:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        cfg = values(project, tmp_path / "w")
    else:
        cfg = values(project, tmp_path / "w", tracking_uri=uri)
    code, err = run_cli(capsys, ["run", "dense-kd", "--config", str(config_file(tmp_path, cfg))])
    assert code == EXIT_BAD_INPUT and len(err) == 1, err
    named = "MLFLOW_TRACKING_URI" if from_env else "tracking_uri"
    assert err[0].startswith(f"sparsekd: error: {named}='{uri}': the MLflow tracking server does not answer")
    assert len(attempts) == 1 and attempts[0][0].startswith(uri) and 0 < attempts[0][1] <= 3
    assert not flows_never_start and not (tmp_path / "w").exists()


class _Answer(BaseHTTPRequestHandler):
    status = 200

    def do_GET(self):  # noqa: N802 - http.server's name
        self.send_response(self.status)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(b'{"experiments": []}')

    def log_message(self, *args):
        pass


@contextmanager
def http_server(status: int):
    handler = type("Handler", (_Answer,), {"status": status})
    server = HTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()


def test_a_tracking_server_must_answer_mlflows_api():
    from tasks.tracking import check_tracking_uri

    with http_server(200) as uri:
        assert check_tracking_uri(uri) == uri
    with http_server(401) as uri:  # one that wants credentials (MLflow's client sends them from the environment)
        assert check_tracking_uri(uri) == uri
    with http_server(404) as uri:  # something else listens there
        with pytest.raises(ConfigError, match="answers HTTP 404 to MLflow's API"):
            check_tracking_uri(uri)
    with pytest.raises(ConfigError, match=r"'postgresql://me:\*\*\*@127.0.0.1:9/db'.*does not accept a connection"):
        check_tracking_uri("postgresql://me:secret@127.0.0.1:9/db")  # the password never shows


FIRST_OPEN = """
import sys, time
from pathlib import Path
sys.path.insert(0, {root!r})
from tasks.tracking import Tracker
print("ready", flush=True)
go = Path(sys.argv[2])
while not go.exists():
    time.sleep(0.005)
tracker = Tracker(sys.argv[1], "first-runs")
tracker.end_run(tracker.start_run("first"))
print("ok", tracker.experiment_id, flush=True)
"""
POSTGRES = ("127.0.0.1", 5432)  # a local server with trust auth, where there is one


@pytest.fixture
def fresh_postgres_db():
    """A new, empty PostgreSQL database (dropped afterwards); skips without a server at POSTGRES."""
    psycopg2 = pytest.importorskip("psycopg2")
    try:
        socket.create_connection(POSTGRES, timeout=1).close()
    except OSError:
        pytest.skip(f"no PostgreSQL server at {POSTGRES[0]}:{POSTGRES[1]}")
    name = f"sparsekd_first_open_{os.getpid()}"

    def admin(sql: str) -> None:
        conn = psycopg2.connect(host=POSTGRES[0], port=POSTGRES[1], user="postgres", dbname="postgres")
        conn.autocommit = True
        try:
            conn.cursor().execute(sql)
        finally:
            conn.close()

    admin(f"DROP DATABASE IF EXISTS {name}")
    admin(f"CREATE DATABASE {name}")
    yield f"postgresql://postgres@{POSTGRES[0]}:{POSTGRES[1]}/{name}"
    admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def first_opens_at_once(tmp_path: Path, uri: str) -> None:
    """Two processes open the same new store at the same moment; both must log their run to one experiment."""
    script, go = tmp_path / "first_open.py", tmp_path / "go"
    script.write_text(FIRST_OPEN.format(root=str(ROOT)))
    procs = [subprocess.Popen([sys.executable, str(script), uri, str(go)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for p in procs:
        assert p.stdout.readline().strip() == "ready"
    go.touch()  # both imported everything: they open the store together
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outs]
    assert len({out.split()[-1] for out, _ in outs}) == 1  # one experiment
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    assert len(client.search_runs([client.get_experiment_by_name("first-runs").experiment_id])) == 2


def test_two_first_runs_at_once_both_open_a_fresh_sqlite_database(tmp_path):
    """MLflow creates and migrates the new file once, under the lock beside it (without the lock one of the two
    dies in the migration: "duplicate column name")."""
    first_opens_at_once(tmp_path, f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert (tmp_path / "mlflow.db.lock").exists()


def test_two_first_runs_at_once_both_open_a_fresh_postgres_database(tmp_path, fresh_postgres_db):
    """The same on PostgreSQL, under a server-side advisory lock (it spans hosts)."""
    first_opens_at_once(tmp_path, fresh_postgres_db)


def _dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


def test_runs_a_dead_process_left_running_are_closed_by_the_next_start(project, tmp_path):
    from flows.configs import DenseKDConfig
    from flows.context import start
    from tasks.tracking import HOST_TAG, KILLED_TAG, PID_START_TAG, PID_TAG, Tracker, process_tags

    workdir = tmp_path / "w"
    workdir.mkdir()
    tracker = Tracker(f"sqlite:///{workdir / 'mlflow.db'}", "sparsekd-dense-kd", str(workdir / "mlartifacts"))
    host, dead = socket.gethostname(), str(_dead_pid())
    stale = {
        "dead": {HOST_TAG: host, PID_TAG: dead},
        "live": process_tags(),  # this process: alive
        "other host": {HOST_TAG: "another-host.example", PID_TAG: dead},  # cannot be checked from here
        "untagged": {},  # from before the owner was recorded
    }
    if Path("/proc/self/stat").exists():  # our PID, but a process that started at another time: ours reused it
        stale["pid reused"] = {HOST_TAG: host, PID_TAG: str(os.getpid()), PID_START_TAG: "1"}
    ids = {name: tracker.start_run(name, tags=tags) for name, tags in stale.items()}

    with start(DenseKDConfig(**values(project, workdir)), "dense-kd") as run:
        status = {name: tracker.client.get_run(i).info.status for name, i in ids.items()}
        why = tracker.client.get_run(ids["dead"]).data.tags.get(KILLED_TAG, "")
        parent = tracker.client.get_run(run.parent_id).data.tags
        run.mlflow.end(run.parent_id)
    killed = {"dead", "pid reused"} & set(stale)
    assert {n for n, s in status.items() if s == "KILLED"} == killed
    assert all(status[n] == "RUNNING" for n in set(stale) - killed)
    assert f"process {dead} on {host}" in why and run.parent_id in why
    assert parent[HOST_TAG] == host and parent[PID_TAG] == str(os.getpid())  # the new run says who owns it


# ---------------------------------------------------------------------------------------------------------------- config files

@pytest.mark.parametrize("text", ["", "# only a comment\n\n"])
def test_an_empty_config_is_an_error(tmp_path, capsys, flows_never_start, text):
    path = tmp_path / "empty.yaml"
    path.write_text(text)
    for argv in (["run", "dense-kd", "--config", str(path)], ["eval", "--config", str(path)]):
        code, err = run_cli(capsys, argv)
        assert code == EXIT_BAD_INPUT and len(err) == 1 and f"'{path}' is empty" in err[0], err
    assert not flows_never_start


def test_a_directory_config_says_so(tmp_path, capsys):
    for argv in (["run", "dense-kd", "--config", str(tmp_path)], ["cache", "--config", str(tmp_path)]):
        code, err = run_cli(capsys, argv)
        assert code == EXIT_BAD_INPUT and err == [f"sparsekd: error: config: '{tmp_path}' is a directory, not a YAML "
                                                  "file"], err


# ---------------------------------------------------------------------------------------------------------------- full disk

TORCH_SHORT_WRITE = "[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"


@pytest.fixture
def full_disk(tmp_path, monkeypatch):
    """A directory on a 16 KiB tmpfs (root), so every write below runs out of space for real; where no tmpfs can be
    mounted, the writers are made to fail as they do on a full disk (torch's short write, safetensors' and
    Python's ENOSPC)."""
    where = tmp_path / "full"
    if _mount_tmpfs(where, "size=16k"):
        yield where
        subprocess.run(["umount", "--lazy", str(where)], check=False)  # a busy mount detaches at once
        return
    import safetensors.torch
    import torch
    from safetensors import SafetensorError

    def torch_save(*args, **kwargs):
        raise RuntimeError(TORCH_SHORT_WRITE)

    def save_file(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    def write_bytes(self, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", torch_save)
    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    monkeypatch.setattr(Path, "write_bytes", write_bytes)
    yield where


def test_a_full_disk_names_the_file_and_leaves_nothing_half_written(full_disk):
    import torch

    from sparsekd_core.files import DiskFullError, replace_dir, write_file_atomic, write_text_atomic

    big = torch.zeros(100_000)
    with pytest.raises(DiskFullError) as caught:
        write_file_atomic(full_disk / "state.pt", lambda tmp: torch.save({"w": big}, tmp))
    assert str(caught.value) == f"no space left on device writing {full_disk / 'state.pt'}"
    assert caught.value.errno == errno.ENOSPC
    with pytest.raises(DiskFullError, match=f"writing {full_disk / 'notes.txt'}$"):
        write_text_atomic(full_disk / "notes.txt", "x" * 200_000)

    def build(tmp: Path) -> None:
        from safetensors.torch import save_file

        save_file({"w": big}, str(tmp / "model.safetensors"))

    with pytest.raises(DiskFullError, match=f"writing {full_disk / 'student'}$"):
        replace_dir(build, full_disk / "student")
    assert list(full_disk.iterdir()) == []  # no temporary name or half a file is left


def test_a_full_disk_is_one_line_from_the_cli(full_disk, tiny_model_dir, capsys):
    """A real stage verb writing its checkpoint onto the full disk: one line, exit code 74, no traceback."""
    code, err = run_cli(capsys, ["prune", "--model", str(tiny_model_dir), "--energy", "0.9", "--calibration", "none",
                                 "--out", str(full_disk / "pruned")])
    assert code == EXIT_NO_SPACE and err[-1] == f"sparsekd: error: no space left on device writing " \
                                                f"{full_disk / 'pruned'}", err
    assert not any("Traceback" in line for line in err)


def test_out_of_space_errors_from_any_writer_are_recognised():
    from sparsekd_core.files import disk_full_message

    assert disk_full_message(RuntimeError(TORCH_SHORT_WRITE)) == "no space left on device"
    assert disk_full_message(OSError(errno.ENOSPC, "No space left on device", "/w/x.zarr/c/0")) == \
        "no space left on device writing /w/x.zarr/c/0"
    assert disk_full_message(OSError(errno.EDQUOT, "Disk quota exceeded")) == "no space left on device"
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as inner:
            raise RuntimeError("a stage failed") from inner
    except RuntimeError as outer:
        assert disk_full_message(outer) == "no space left on device"  # found in the chain
    assert disk_full_message(RuntimeError("unexpected pos in a parser")) is None
    assert disk_full_message(OSError(errno.EACCES, "Permission denied")) is None


def test_a_full_disk_is_not_retried_but_a_passing_io_error_is():
    """tasks.stages._transient: DiskFullError is an OSError, yet retrying a stage on a full disk only repeats it."""
    from sparsekd_core.files import DiskFullError
    from tasks.stages import _transient

    class State:
        def __init__(self, err):
            self.err = err

        def result(self):
            raise self.err

    assert _transient(None, None, State(DiskFullError("/tmp/x"))) is False
    assert _transient(None, None, State(ConnectionResetError("peer went away"))) is True
