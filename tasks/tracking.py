"""MLflow tracking shared by tasks and flows, with run ids passed explicitly; and where a flow's report goes.

MLflow's active-run stack is thread-local, and Prefect runs tasks in worker threads, so nothing here uses
``mlflow.start_run`` context: every call names its run id. Writes go through one lock per process, since
concurrent writers to one SQLite file can fail with "database is locked".
Tracking URI: the argument, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///<workdir>/mlflow.db`` with artifacts
in ``<workdir>/mlartifacts``.

A diverged figure is never dropped: a NaN or infinite metric is logged as it is (MLflow stores NaN, and ±inf as
±1.8e308) and the run gets a tag ``sparsekd.diverged.<metric>`` saying what and at which step; a flow that fails
tags its runs ``sparsekd.error`` with the reason before marking them FAILED, or KILLED when a signal stopped it
(``FlowTracking.fail``); runs left RUNNING by a process that died are closed as KILLED by the next run
(``FlowTracking.close_dead_runs``).

A flow run is one parent MLflow run with a nested run per arm (``FlowTracking``); its report (rendered by
``sparsekd_core.report``) is written beside the stages, attached to the Prefect flow run as a Markdown artifact and
logged to the parent run (``save_report``, ``FlowTracking.finish``). The model registry is ``tasks/registry.py``.

Before any work the tracking URI is checked once (``check_tracking_uri``: a scheme MLflow opens; a tracking server
or database server that answers within 3 s, one attempt, where MLflow's client would retry for minutes). The first
open of a store in a process (MLflow then creates and migrates its database) happens under a lock
(``_first_open_lock``), so two first runs at once on one fresh database both succeed. Every flow run tags its runs
with the host and process that own them (``process_tags``); a flow run that starts closes the runs of its
experiment that a dead process of this host left RUNNING (``FlowTracking.close_dead_runs``).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable
from urllib.parse import urlencode, urlsplit, urlunsplit

from sparsekd_core.checks import check_workdir
from sparsekd_core.config import ConfigError
from sparsekd_core.files import write_json_atomic, write_text_atomic

from .store import is_url, remote_path, upload_dir

_LOCK = threading.RLock()


def default_tracking_uri(workdir: str | os.PathLike) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(workdir).expanduser().resolve() / 'mlflow.db'}"


# ---------------------------------------------------------------------------------------------------------------- the store

TRACKING_SCHEMES = ("http", "https", "sqlite", "postgresql", "mysql", "mssql", "file", "databricks")
DATABASE_PORTS = {"postgresql": 5432, "mysql": 3306, "mssql": 1433}
ANSWER_TIMEOUT_S = 3.0


def uri_scheme(uri: str) -> str:
    """The store kind of a tracking URI: ``postgresql+psycopg2://...`` -> ``postgresql``; a plain path -> ``file``."""
    if uri == "databricks":
        return "databricks"
    scheme = urlsplit(uri).scheme.split("+", 1)[0].lower()
    return scheme if scheme else "file"


def redact(uri: str) -> str:
    """The URI with its password (if any) replaced by ``***``: what messages show."""
    parts = urlsplit(uri)
    if not parts.password:
        return uri
    return urlunsplit(parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@", 1)))


def _sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///path`` URI (None for an in-memory one)."""
    path = uri.split(":///", 1)[1] if ":///" in uri else ""
    return None if path in ("", ":memory:") else Path(path.split("?", 1)[0])


def check_tracking_uri(uri: str, field: str = "tracking_uri", timeout: float = ANSWER_TIMEOUT_S) -> str:
    """Before any work: MLflow can open ``uri``. Its scheme is one MLflow knows; a tracking server (http/https)
    answers MLflow's REST API within ``timeout`` seconds (``_server_answers``); a database server's
    port accepts a TCP connection within it; a SQLite file or a file store can be created where it is to be. One
    attempt each, no retries. Raises ConfigError (one line, the password hidden); returns ``uri``."""
    shown = redact(uri)
    scheme = uri_scheme(uri)
    if scheme not in TRACKING_SCHEMES:
        raise ConfigError(f"{field}={shown!r}: MLflow does not open {scheme}:// URIs; allowed: http(s)://host:port "
                          "(a tracking server), sqlite:///path/mlflow.db, postgresql://..., mysql://..., "
                          "mssql://..., file:///path (or a directory), databricks")
    if scheme == "sqlite" and _sqlite_path(uri) is not None:
        db = _sqlite_path(uri)
        if db.is_dir():
            raise ConfigError(f"{field}={shown!r}: {db} is a directory, not a database file")
        check_workdir(db.parent, f"{field}'s directory")
    elif scheme == "file":
        check_workdir(Path(urlsplit(uri).path if "://" in uri or uri.startswith("file:") else uri), field)
    elif scheme in ("http", "https"):
        _server_answers(uri, field, timeout)
    elif scheme in DATABASE_PORTS and urlsplit(uri).hostname:
        host, port = urlsplit(uri).hostname, urlsplit(uri).port or DATABASE_PORTS[scheme]
        try:
            socket.create_connection((host, port), timeout=timeout).close()
        except OSError as err:
            raise ConfigError(f"{field}={shown!r}: the database server at {host}:{port} does not accept a "
                              f"connection within {timeout:g} s ({err.strerror or err})") from None
    return uri


SERVER_PROBE = "/api/2.0/mlflow/experiments/search?max_results=1"  # the REST API the client will use


def _server_answers(uri: str, field: str, timeout: float) -> None:
    """One GET of the tracking server's experiment search with a timeout (urllib: no retries, no backoff). 200 is
    a tracking server; 401/403 one that wants the credentials MLflow's client sends from the environment; any other
    status is something else at that address. The TLS settings MLflow's client takes from the environment are
    honoured, so that both agree."""
    import ssl
    import urllib.error
    import urllib.request

    context = None
    if uri.startswith("https"):
        if os.environ.get("MLFLOW_TRACKING_INSECURE_TLS", "").lower() == "true":
            context = ssl._create_unverified_context()  # noqa: S323 - the user asked MLflow for exactly this
        else:
            context = ssl.create_default_context(cafile=os.environ.get("MLFLOW_TRACKING_SERVER_CERT_PATH") or None)
    try:
        with urllib.request.urlopen(uri.rstrip("/") + SERVER_PROBE, timeout=timeout, context=context):
            return
    except urllib.error.HTTPError as err:
        if err.code in (401, 403):
            return
        raise ConfigError(f"{field}={redact(uri)!r}: the server there answers HTTP {err.code} to MLflow's API "
                          f"(GET {SERVER_PROBE.split('?')[0]}); is it an MLflow tracking server (mlflow server), "
                          "and is the URL its root?") from None
    except (urllib.error.URLError, OSError, ValueError) as err:
        reason = getattr(err, "reason", None) or err
        raise ConfigError(f"{field}={redact(uri)!r}: the MLflow tracking server does not answer within "
                          f"{timeout:g} s ({reason}); start it, or give another tracking_uri (unset: runs log to "
                          "sqlite in the workdir)") from None


_OPENED: set[str] = set()  # stores this process has opened (created and migrated): no lock needed again
_PG_LOCK_KEY = int.from_bytes(hashlib.sha256(b"sparsekd: first open of an MLflow store").digest()[:8], "big",
                              signed=True)


@contextlib.contextmanager
def _file_lock(path: Path, wait_s: float = 600.0):
    """An exclusive flock on ``path`` (made if missing), polled so that a signal is handled while waiting."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"MLflow store: {path} still locked after {wait_s:.0f} s by another run "
                                       "creating the database") from None
                time.sleep(0.1)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def _pg_advisory_lock(uri: str):
    """A session advisory lock on the PostgreSQL server: it serialises first opens from every host, and the server
    drops it when the holder's connection ends (a killed holder cannot leave it held)."""
    import sqlalchemy

    engine = sqlalchemy.create_engine(uri, poolclass=sqlalchemy.pool.NullPool)
    try:
        with engine.connect() as conn:
            conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:key)"), {"key": _PG_LOCK_KEY})
            try:
                yield
            finally:
                conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:key)"), {"key": _PG_LOCK_KEY})
    finally:
        engine.dispose()


def _first_open_lock(uri: str):
    """Held while this process opens the store at ``uri`` for the first time: MLflow creates and migrates a
    database on first open, and two processes doing it at once on a fresh one race (one dies in the migration).
    SQLite: an flock on ``<db>.lock`` beside the file (a shared volume's workers included, where flock works);
    PostgreSQL: an advisory lock on the server (every host); MySQL, SQL Server and file stores: an flock on a file
    in the temporary directory named by the URI's hash (this host only); a tracking server (http, databricks)
    migrates its own database: no lock."""
    scheme = uri_scheme(uri)
    if uri in _OPENED or scheme in ("http", "https", "databricks"):
        return contextlib.nullcontext()
    if scheme == "postgresql":
        return _pg_advisory_lock(uri)
    db = _sqlite_path(uri) if scheme == "sqlite" else None
    if db is not None:
        return _file_lock(db.with_name(db.name + ".lock"))
    digest = hashlib.sha256(uri.encode()).hexdigest()[:16]
    return _file_lock(Path(tempfile.gettempdir()) / f"sparsekd-mlflow-{digest}.lock")


# ---------------------------------------------------------------------------------------------------------------- runs and processes

HOST_TAG, PID_TAG, PID_START_TAG = "sparsekd.host", "sparsekd.pid", "sparsekd.pid_start"
KILLED_TAG = "sparsekd.killed"


def _process_state(pid: int) -> tuple[str, str] | None:
    """(state letter, start time in clock ticks after boot) of a process of this host from ``/proc`` (Linux);
    None where that cannot be read (no such process, or no /proc)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields[0], fields[19]  # fields 3 (state) and 22 (starttime) of proc(5)


def process_tags() -> dict[str, str]:
    """The host and process that own a run: ``sparsekd.host``, ``sparsekd.pid`` and, where /proc tells it,
    ``sparsekd.pid_start`` (so that a later process given the same PID is not taken for this one)."""
    tags = {HOST_TAG: socket.gethostname(), PID_TAG: str(os.getpid())}
    state = _process_state(os.getpid())
    if state is not None:
        tags[PID_START_TAG] = state[1]
    return tags


def process_alive(pid: int, started: str | None = None) -> bool:
    """Whether process ``pid`` of this host still runs: it exists, is not a zombie, and (with ``started``, its
    recorded start time) is the same process, not a newer one given the same PID."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists: another user's
    state = _process_state(pid)
    if state is None:
        return True  # no /proc: existence is all we can tell
    return state[0] != "Z" and (started is None or state[1] == started)


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """{'distill': {'lr': 2e-5}} → {'distill.lr': '2e-05'}; lists become comma-joined strings."""
    flat: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + "."))
        elif isinstance(value, (list, tuple)):
            flat[name] = ",".join(str(v) for v in value)
        else:
            flat[name] = str(value)
    return flat


# What an experiment is, for MLflow (its API and UIs that honour the tag): model training, not GenAI. The
# open-source UI of MLflow 3.17 ignores it and opens in the view the browser last chose (GenAI by default), so the
# links sparsekd writes also carry UI_VIEW (Tracker.ui_url).
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"
UI_VIEW = "workflowType=machine_learning"


def server_url(tracking_uri: str) -> str | None:
    """The tracking server's address as a browser uses it (no credentials, query or trailing slash); None for a
    local store."""
    if uri_scheme(tracking_uri) not in ("http", "https"):
        return None
    parts = urlsplit(tracking_uri)
    return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[-1], query="", fragment="")).rstrip("/")


class Tracker:
    """Thin, explicit-run-id wrapper over MlflowClient."""

    def __init__(self, tracking_uri: str, experiment: str, artifact_root: str | None = None):
        from mlflow.tracking import MlflowClient

        self.tracking_uri = tracking_uri
        # The client opens the store (creating and migrating a new database): under the first-open lock, with the
        # experiment, so that two first runs neither race on the migration nor both create the experiment.
        with _LOCK, _first_open_lock(tracking_uri):
            self.client = MlflowClient(tracking_uri=tracking_uri)
            self.experiment_id = self._experiment_id(experiment, artifact_root)
            _OPENED.add(tracking_uri)

    def _experiment_id(self, experiment: str, artifact_root: str | None) -> str:
        from mlflow.exceptions import MlflowException

        found = self.client.get_experiment_by_name(experiment)
        if found is not None:
            if EXPERIMENT_KIND_TAG not in found.tags:  # made before sparsekd set the kind
                self.client.set_experiment_tag(found.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
            return found.experiment_id
        location = None
        if artifact_root is not None:
            location = Path(artifact_root).expanduser().resolve().as_uri()
        try:
            return self.client.create_experiment(experiment, artifact_location=location,
                                                 tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
        except MlflowException as err:  # another host made it first (a tracking server: no lock spans hosts)
            found = self.client.get_experiment_by_name(experiment)
            if found is None or "RESOURCE_ALREADY_EXISTS" not in str(err.error_code):
                raise
            return found.experiment_id

    def start_run(self, name: str, parent_run_id: str | None = None, tags: dict[str, Any] | None = None,
                  params: dict[str, Any] | None = None) -> str:
        all_tags = {k: str(v) for k, v in (tags or {}).items()}
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id
        with _LOCK:
            run = self.client.create_run(self.experiment_id, run_name=name, tags=all_tags)
            if params:
                try:
                    self.log_params(run.info.run_id, params)
                except BaseException:  # the caller never gets the id: do not leave the run RUNNING
                    self.client.set_terminated(run.info.run_id, status="FAILED")
                    raise
        return run.info.run_id

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        flat = flatten(params)
        items = [Param(k, v[:6000]) for k, v in flat.items()]
        with _LOCK:
            for start in range(0, len(items), 100):
                self.client.log_batch(run_id, params=items[start : start + 100])

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric
        import time

        now = int(time.time() * 1000)
        self._log_metric_items(run_id, [Metric(k, float(v), now, step or 0) for k, v in metrics.items()
                                        if _is_number(v)])

    def log_curve(self, run_id: str, key: str, points: Iterable[tuple[int, float]]) -> None:
        from mlflow.entities import Metric
        import time

        now = int(time.time() * 1000)
        self._log_metric_items(run_id, [Metric(key, float(v), now, int(step)) for step, v in points if _is_number(v)])

    def _log_metric_items(self, run_id: str, items: list) -> None:
        """Log metric items in batches, then tag every non-finite one (its first bad step), so a diverged run shows
        as one."""
        import math

        with _LOCK:
            for start in range(0, len(items), 500):
                self.client.log_batch(run_id, metrics=items[start : start + 500])
        bad: dict[str, str] = {}
        for m in items:
            if not math.isfinite(m.value) and m.key not in bad:
                bad[m.key] = f"{m.value} at step {m.step}"
        if bad:
            self.set_tags(run_id, {f"sparsekd.diverged.{key}": text for key, text in bad.items()})

    def set_tags(self, run_id: str, tags: dict[str, Any]) -> None:
        with _LOCK:
            for k, v in tags.items():
                self.client.set_tag(run_id, k, str(v))

    def log_artifact(self, run_id: str, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        with _LOCK:
            if Path(path).is_dir():
                self.client.log_artifacts(run_id, str(path), artifact_path)
            else:
                self.client.log_artifact(run_id, str(path), artifact_path)

    def child_runs(self, parent_run_id: str) -> list:
        """Runs nested directly under ``parent_run_id`` in this experiment (with their metrics and tags)."""
        with _LOCK:
            return self.client.search_runs([self.experiment_id],
                                           filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'",
                                           max_results=1000)

    def register_model(self, name: str, run_id: str, tags: dict[str, Any], description: str = "") -> int:
        """A new version of registered model ``name`` whose source is the run's ``model`` artifact directory
        (an MLflow pyfunc model: ``tasks/registry.py`` logs it first), with ``tags``; returns the version number.
        The source is the directory's own URI, not ``runs:/<run>/model``: a tracking server that proxies artifacts
        resolves a ``runs:`` source through its database, cannot read the ``mlflow-artifacts:`` URI it gets, and
        answers the version page's request for ``MLmodel`` with a 500 (``mlflow.register_model`` resolves it too)."""
        from mlflow.exceptions import MlflowException

        with _LOCK:
            source = self.client.get_run(run_id).info.artifact_uri.rstrip("/") + "/model"
            try:
                self.client.create_registered_model(name, description="sparsekd: " + description if description
                                                    else None)
            except MlflowException as err:
                if "already exists" not in str(err).lower() and "RESOURCE_ALREADY_EXISTS" not in str(err):
                    raise
            version = self.client.create_model_version(name, source=source, run_id=run_id,
                                                       tags={k: str(v)[:5000] for k, v in tags.items()},
                                                       description=description or None)
        return int(version.version)

    def ui_url(self, route: str) -> str | None:
        """``route`` (e.g. ``/experiments/1/runs/abc``) as a page of the tracking server's UI, else None (a local
        store has no UI to link). The page opens in the "Model training" view: MLflow 3.17's UI starts in its GenAI
        view whatever the experiment's kind tag says (the tag is ignored when the workflow switch is on, as it is in
        the open-source build); only the URL's ``workflowType`` or the user's own click on the switch changes it."""
        server = server_url(self.tracking_uri)
        return f"{server}/#{route}?{UI_VIEW}" if server else None

    def run_url(self, run_id: str) -> str | None:
        """The run's page in the MLflow UI (in its experiment), else None."""
        return self.ui_url(f"/experiments/{self.experiment_id}/runs/{run_id}")

    def model_url(self, name: str, version: int) -> str | None:
        """The registered model version's page in the MLflow UI (a tracking server), else None."""
        return self.ui_url(f"/models/{name}/versions/{version}")

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        with _LOCK:
            self.client.set_terminated(run_id, status=status)


def _is_number(value: Any) -> bool:
    """A metric value: an int or float (NaN and ±inf included: they are logged, and tagged), not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# ---------------------------------------------------------------------------------------------------------------- a flow run


def tracking_settings(local_workdir: Path, tracking_uri: str | None, experiment: str) -> dict[str, str | None]:
    """{"uri", "experiment", "artifact_root"}: where a flow run and its stage tasks log (the tasks get this dict).

    A local store (SQLite in the workdir by default) keeps artifacts beside it in the workdir; a tracking server
    decides where they go (``mlflow server --artifacts-destination ...``, proxied to every client)."""
    uri = tracking_uri or default_tracking_uri(local_workdir)
    remote = uri.split(":", 1)[0] in ("http", "https", "databricks")
    return {"uri": uri, "experiment": experiment,
            "artifact_root": None if remote else str(local_workdir / "mlartifacts")}


def prefect_run_tags() -> dict[str, Any]:
    """The Prefect flow run this code runs in, as MLflow tags: its id and (with a UI URL setting) its page."""
    tags: dict[str, Any] = {}
    try:
        from prefect.runtime import flow_run

        tags["prefect_flow_run_id"] = flow_run.id
        url = getattr(flow_run, "ui_url", None)
        if isinstance(url, str) and url.startswith("http"):  # "None/flow-runs/..." without a UI URL setting
            tags["prefect_flow_run_url"] = url
    except Exception:  # noqa: BLE001 - not inside a Prefect run
        pass
    return tags


@dataclass
class FlowTracking:
    """One flow run in MLflow: its parent run and the arm runs nested under it. ``open_runs`` are the runs not yet
    ended: if the flow raises, ``fail`` tags them with the reason and marks them FAILED (KILLED for a signal), so none
    stays RUNNING."""

    tracker: Tracker
    settings: dict  # tracking_settings(...): what the stage tasks log to
    parent_id: str
    open_runs: list[str] = field(default_factory=list)

    @classmethod
    def start(cls, settings: dict, run_name: str, parent_run_id: str | None, tags: dict[str, Any],
              params: dict[str, Any]) -> "FlowTracking":
        """Open the flow run's parent run (nested under ``parent_run_id`` when a flow runs inside another)."""
        tracker = Tracker(settings["uri"], settings["experiment"], settings["artifact_root"])
        parent = tracker.start_run(run_name, parent_run_id=parent_run_id,
                                   tags={**tags, **prefect_run_tags(), **process_tags()}, params=params)
        return cls(tracker, settings, parent, [parent])

    def start_arm(self, name: str, tags: dict[str, Any]) -> str:
        run_id = self.tracker.start_run(name, parent_run_id=self.parent_id, tags={**tags, **process_tags()})
        self.open_runs.append(run_id)
        return run_id

    def close_dead_runs(self) -> list[str]:
        """Mark KILLED, with a ``sparsekd.killed`` tag saying why, the runs of this experiment left RUNNING by a
        process of this host that no longer exists (killed with -9, crashed, or the host rebooted); returns their
        ids. Same host only: a run of a live process, of another host (its process cannot be checked from here)
        or without the owner tags (from before they were recorded) is never touched."""
        host, closed = socket.gethostname(), []
        query = f"attributes.status = 'RUNNING' and tags.`{HOST_TAG}` = '{host}'"
        token = None
        while True:
            with _LOCK:
                page = self.tracker.client.search_runs([self.tracker.experiment_id], filter_string=query,
                                                       max_results=1000, page_token=token)
            for run in page:
                tags = run.data.tags
                if not tags.get(PID_TAG, "").isdigit() or process_alive(int(tags[PID_TAG]), tags.get(PID_START_TAG)):
                    continue
                why = (f"process {tags[PID_TAG]} on {host} that ran it no longer exists; closed by the run "
                       f"{self.parent_id} of this experiment at {time.strftime('%Y-%m-%d %H:%M:%S')}")
                self.tracker.set_tags(run.info.run_id, {KILLED_TAG: why})
                self.tracker.end_run(run.info.run_id, status="KILLED")
                closed.append(run.info.run_id)
                _log(f"mlflow: run {run.info.run_id} ({run.info.run_name}) left RUNNING by dead process "
                     f"{tags[PID_TAG]}: marked KILLED")
            token = page.token
            if not token:
                return closed

    def end(self, run_id: str) -> None:
        self.tracker.end_run(run_id)
        if run_id in self.open_runs:
            self.open_runs.remove(run_id)

    def fail(self, error: BaseException) -> None:
        """Tag every open run with ``sparsekd.error`` (the reason) and end it, innermost first: KILLED when a signal
        stopped the flow (SIGTERM or SIGHUP: Prefect's ``TerminationSignal`` inside a flow run, the CLI's
        ``Terminated`` outside it; Ctrl-C: ``KeyboardInterrupt``, which ``Terminated`` subclasses), also when the
        error arose while unwinding from one; else FAILED."""
        import signal

        from prefect.exceptions import TerminationSignal

        chain: list[BaseException] = []  # the error, then what it was raised from or while handling
        cause: BaseException | None = error
        while cause is not None and len(chain) < 8:
            chain.append(cause)
            cause = cause.__cause__ or cause.__context__
        stop = next((e for e in chain if isinstance(e, (TerminationSignal, KeyboardInterrupt))), None)
        if stop is None:
            status, reason = "FAILED", f"{type(error).__name__}: {error}"[:5000]
        else:
            signum = getattr(stop, "signal", None) or getattr(stop, "signum", None) or signal.SIGINT
            status, reason = "KILLED", f"stopped by {signal.Signals(signum).name}"
        for run_id in reversed(self.open_runs):
            try:
                self.tracker.set_tags(run_id, {"sparsekd.error": reason})
                self.tracker.end_run(run_id, status=status)
            except Exception:  # noqa: BLE001 - the flow's own error is the one to report
                pass
        self.open_runs.clear()

    def log_model(self, run_id: str, checkpoint: str | os.PathLike) -> None:
        """The checkpoint's files as the run's ``model`` artifacts (hundreds of MB: flows do it with `log_models`)."""
        self.tracker.log_artifact(run_id, checkpoint, "model")

    def report_file_url(self, name: str) -> str | None:
        """Where a browser loads file ``name`` of the parent run's ``report`` artifacts: the tracking server's
        ``/get-artifact`` (what MLflow's UI fetches an artifact with), without any credentials of the tracking URI;
        None for a local store (no server to name). The tracking URI must be one the reader's browser reaches too."""
        server = server_url(self.tracker.tracking_uri)
        query = urlencode({"path": f"report/{name}", "run_uuid": self.parent_id})
        return f"{server}/get-artifact?{query}" if server else None

    def finish(self, report_dir: Path, metrics: dict[str, float], stages_ran: int, stages_cached: int,
               report_text: str) -> None:
        """The flow's metrics, the report's place and the stage counts on the parent run, the report directory as
        its ``report`` artifacts with ``report_text`` as their ``report.md`` (the copy on disk links its plots by
        file name, which MLflow's preview prints as text); then the parent run ends."""
        self.tracker.log_metrics(self.parent_id, metrics)
        self.tracker.set_tags(self.parent_id, {"sparsekd.report": report_dir / "report.md",
                                               "sparsekd.stages_ran": stages_ran,
                                               "sparsekd.stages_cached": stages_cached})
        for entry in sorted(report_dir.iterdir()):
            if entry.name != "report.md":
                self.tracker.log_artifact(self.parent_id, entry, f"report/{entry.name}" if entry.is_dir() else "report")
        with _LOCK:
            self.tracker.client.log_text(self.parent_id, report_text, "report/report.md")
        self.end(self.parent_id)


def save_report(report_dir: Path, text: str, metrics: dict[str, float], config_json: str, flow_name: str,
                workdir: str, artifact_text: str) -> None:
    """``text`` as ``report.md``, ``metrics.json`` and ``config.json`` in the report directory (written atomically),
    ``artifact_text`` (the report with its plots inside: the Prefect UI has no files beside it) as a Markdown
    artifact of the Prefect flow run, and under a URL storage root a copy of the directory beside the stages."""
    write_text_atomic(report_dir / "report.md", text)
    report_artifact(flow_name, artifact_text)
    write_json_atomic(report_dir / "metrics.json", metrics)
    write_text_atomic(report_dir / "config.json", config_json)
    if is_url(workdir):  # the report lives beside the stages, for every worker and reader of the bucket
        upload_dir(report_dir, remote_path(workdir, report_dir))


def report_artifact(flow_name: str, text: str) -> None:
    """The report as a Markdown artifact of the Prefect flow run (shown on its Artifacts tab)."""
    try:
        from prefect.artifacts import create_markdown_artifact
        from prefect.runtime import flow_run

        if flow_run.id is None:
            return
        create_markdown_artifact(markdown=text, key=f"{flow_name}-report", description=f"sparsekd {flow_name} report")
    except Exception as err:  # noqa: BLE001 - the report on disk and in MLflow is the record; say it, go on
        _log(f"report: could not attach the Markdown artifact to the flow run ({err})")


def code_version(here: Path | None = None) -> str:
    """The git commit of this checkout (or of the one holding ``here``) and the tracked files changed from it, the
    Python version and the CPU count: what a report states so that a reader can tell which code made its numbers."""
    here = here or Path(__file__).parent
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
                             cwd=here).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=here).stdout  # not stripped: "XY path" columns
        changed = [line[3:] for line in dirty.splitlines() if line.strip()]
        commit = rev + (f" with these files changed from it: {', '.join(changed)}" if changed else "")
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown (not a git checkout)"
    return f"{commit}; python {sys.version.split()[0]}; {os.cpu_count()} CPU cores"


def _log(message: str) -> None:
    """The Prefect run logger inside a flow or task run, else stdout."""
    try:
        from prefect import get_run_logger

        get_run_logger().info(message)
    except Exception:  # noqa: BLE001 - outside a run
        print(message)
