"""MLflow tracking shared by tasks and flows, with run ids passed explicitly.

MLflow's active-run stack is thread-local, and Prefect runs tasks in worker threads, so nothing here uses
``mlflow.start_run`` context: every call names its run id. Writes go through one lock per process, since
concurrent writers to one SQLite file can fail with "database is locked".
Tracking URI: the argument, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///<workdir>/mlflow.db`` with artifacts
in ``<workdir>/mlartifacts``.

A diverged figure is never dropped: a NaN or infinite metric is logged as it is (MLflow stores NaN, and ±inf as
±1.8e308) and the run gets a tag ``sparsekd.diverged.<metric>`` saying what and at which step; a flow that fails
tags its runs ``sparsekd.error`` with the reason before marking them FAILED (flows/experiments.py).
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any, Iterable

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
