"""MLflow tracking shared by tasks and flows, with run ids passed explicitly; and where a flow's report goes.

MLflow's active-run stack is thread-local, and Prefect runs tasks in worker threads, so nothing here uses
``mlflow.start_run`` context: every call names its run id. Writes go through one lock per process, since
concurrent writers to one SQLite file can fail with "database is locked".
Tracking URI: the argument, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///<workdir>/mlflow.db`` with artifacts
in ``<workdir>/mlartifacts``.

A diverged figure is never dropped: a NaN or infinite metric is logged as it is (MLflow stores NaN, and ±inf as
±1.8e308) and the run gets a tag ``sparsekd.diverged.<metric>`` saying what and at which step; a flow that fails
tags its runs ``sparsekd.error`` with the reason before marking them FAILED (``FlowTracking.fail``).

A flow run is one parent MLflow run with a nested run per arm (``FlowTracking``); its report (rendered by
``sparsekd_core.report``) is written beside the stages, attached to the Prefect flow run as a Markdown artifact and
logged to the parent run (``save_report``, ``FlowTracking.finish``). The model registry is ``tasks/registry.py``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from sparsekd_core.files import write_json_atomic, write_text_atomic

from .store import is_url, remote_path, upload_dir

_LOCK = threading.RLock()


def default_tracking_uri(workdir: str | os.PathLike) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(workdir).expanduser().resolve() / 'mlflow.db'}"


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


class Tracker:
    """Thin, explicit-run-id wrapper over MlflowClient."""

    def __init__(self, tracking_uri: str, experiment: str, artifact_root: str | None = None):
        from mlflow.tracking import MlflowClient

        self.tracking_uri = tracking_uri
        self.client = MlflowClient(tracking_uri=tracking_uri)
        with _LOCK:
            found = self.client.get_experiment_by_name(experiment)
            if found is not None:
                self.experiment_id = found.experiment_id
            else:
                location = None
                if artifact_root is not None:
                    location = Path(artifact_root).expanduser().resolve().as_uri()
                self.experiment_id = self.client.create_experiment(experiment, artifact_location=location)

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
        (a pointer file, plus the weights when they were logged), with ``tags``; returns the version number."""
        from mlflow.exceptions import MlflowException

        with _LOCK:
            try:
                self.client.create_registered_model(name, description="sparsekd: " + description if description
                                                    else None)
            except MlflowException as err:
                if "already exists" not in str(err).lower() and "RESOURCE_ALREADY_EXISTS" not in str(err):
                    raise
            version = self.client.create_model_version(name, source=f"runs:/{run_id}/model", run_id=run_id,
                                                       tags={k: str(v)[:5000] for k, v in tags.items()},
                                                       description=description or None)
        return int(version.version)

    def model_url(self, name: str, version: int) -> str | None:
        """The registered model version's page in the MLflow UI (a tracking server), else None."""
        if self.tracking_uri.split(":", 1)[0] in ("http", "https"):
            return f"{self.tracking_uri.rstrip('/')}/#/models/{name}/versions/{version}"
        return None

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
    ended: if the flow raises, ``fail`` tags them with the reason and marks them FAILED, so none stays RUNNING."""

    tracker: Tracker
    settings: dict  # tracking_settings(...): what the stage tasks log to
    parent_id: str
    open_runs: list[str] = field(default_factory=list)

    @classmethod
    def start(cls, settings: dict, run_name: str, parent_run_id: str | None, tags: dict[str, Any],
              params: dict[str, Any]) -> "FlowTracking":
        """Open the flow run's parent run (nested under ``parent_run_id`` when a flow runs inside another)."""
        tracker = Tracker(settings["uri"], settings["experiment"], settings["artifact_root"])
        parent = tracker.start_run(run_name, parent_run_id=parent_run_id, tags={**tags, **prefect_run_tags()},
                                   params=params)
        return cls(tracker, settings, parent, [parent])

    def start_arm(self, name: str, tags: dict[str, Any]) -> str:
        run_id = self.tracker.start_run(name, parent_run_id=self.parent_id, tags=tags)
        self.open_runs.append(run_id)
        return run_id

    def end(self, run_id: str) -> None:
        self.tracker.end_run(run_id)
        if run_id in self.open_runs:
            self.open_runs.remove(run_id)

    def fail(self, error: BaseException) -> None:
        """Tag every open run with ``sparsekd.error`` (the reason) and mark it FAILED, innermost first."""
        reason = f"{type(error).__name__}: {error}"[:5000]
        for run_id in reversed(self.open_runs):
            try:
                self.tracker.set_tags(run_id, {"sparsekd.error": reason})
                self.tracker.end_run(run_id, status="FAILED")
            except Exception:  # noqa: BLE001 - the flow's own error is the one to report
                pass
        self.open_runs.clear()

    def log_model(self, run_id: str, checkpoint: str | os.PathLike) -> None:
        """The checkpoint's files as the run's ``model`` artifacts (hundreds of MB: flows do it with `log_models`)."""
        self.tracker.log_artifact(run_id, checkpoint, "model")

    def finish(self, report_dir: Path, metrics: dict[str, float], stages_ran: int, stages_cached: int) -> None:
        """The flow's metrics, the report's place and the stage counts on the parent run, the report directory as
        its ``report`` artifacts; then the parent run ends."""
        self.tracker.log_metrics(self.parent_id, metrics)
        self.tracker.set_tags(self.parent_id, {"sparsekd.report": report_dir / "report.md",
                                               "sparsekd.stages_ran": stages_ran,
                                               "sparsekd.stages_cached": stages_cached})
        self.tracker.log_artifact(self.parent_id, report_dir, "report")
        self.end(self.parent_id)


def save_report(report_dir: Path, text: str, metrics: dict[str, float], config_json: str, flow_name: str,
                workdir: str) -> None:
    """``report.md``, ``metrics.json`` and ``config.json`` in the report directory (written atomically), the report
    as a Markdown artifact of the Prefect flow run, and under a URL storage root a copy beside the stages."""
    write_text_atomic(report_dir / "report.md", text)
    report_artifact(flow_name, text)
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


def code_version() -> str:
    """The git commit of this checkout and the tracked files changed from it, the Python version and the CPU
    count: what a report states so that a reader can tell which code made its numbers."""
    here = Path(__file__).parent
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
