"""One flow run's context (``Run``): its config, where its stages and report go, its MLflow runs, and what every
stage did. The flows (experiments.py, study.py) call stage tasks through it so that every stage is recorded for the
report, logged to the right MLflow run and placed in the same storage root.

The work is elsewhere: stages in ``tasks/stages.py`` (over ``sparsekd_core``), MLflow in ``tasks/tracking.py``, the
model registry in ``tasks/registry.py``, the report's text and plots in ``sparsekd_core/report.py``, the held-out
check in ``sparsekd_core/checks.py``.
"""

from __future__ import annotations

import hashlib
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sparsekd_core import checks
from sparsekd_core import report as rep
from tasks.registry import lineage_tags, register_model
from tasks.stages import (MODEL_COUNTS, cache_teacher, cache_teacher_shard, distill, eval_results, evaluate, profile,
                          prune, run_log)
from tasks.store import is_url, local_root, remote_path
from tasks.tracking import FlowTracking, Tracker, save_report, tracking_settings

from .configs import FlowConfig
from .preflight import preflight


@dataclass
class Run:
    """One flow run: use as ``with start(...) as run:`` so that a flow that raises marks its MLflow runs FAILED."""

    cfg: FlowConfig
    flow_name: str
    mlflow: FlowTracking
    workdir: str
    disjoint: dict = field(default_factory=dict)  # what the held-out check compared (for the report)
    stages: list[dict] = field(default_factory=list)
    curves: dict[str, list] = field(default_factory=dict)  # arm label -> validation curve [(step, ppl)]
    counts: dict[str, dict] = field(default_factory=dict)  # eval label -> counts of the model evaluated
    accuracy: dict[str, dict] = field(default_factory=dict)  # eval label -> {gsm8k set name: accuracy result}
    windows: dict[str, dict] = field(default_factory=dict)  # eval label -> {set: (window_nll, window_tokens)}
    registered: list[dict] = field(default_factory=list)  # model versions this run registered (for the report)

    @property
    def parent_id(self) -> str:
        return self.mlflow.parent_id

    @property
    def tracker(self) -> Tracker:
        return self.mlflow.tracker

    @property
    def tracking(self) -> dict:
        """Where stage tasks log: {"uri", "experiment", "artifact_root"}."""
        return self.mlflow.settings

    def __enter__(self) -> "Run":
        return self

    def __exit__(self, kind, error, tb) -> None:
        if error is not None:
            self.mlflow.fail(error)

    # -- stages, recorded -----------------------------------------------------------------------------------------
    def record(self, manifest: dict, label: str) -> dict:
        self.stages.append({"stage": manifest["stage"], "label": label, "cached": manifest["cached"],
                            "seconds": manifest["seconds"], "key": manifest["key"]})
        return manifest

    def common(self) -> dict:
        """The arguments every stage task takes from the flow run."""
        return dict(workdir=self.workdir, dtype=self.cfg.dtype, device=self.cfg.device, tracking=self.tracking)

    def evaluate(self, model: dict, run_id: str, label: str, prefix: str = "", step: int | None = None) -> dict:
        """``model`` on every eval set of the config; returns {set: PPL} (GSM8K sets go to the report's accuracy
        section)."""
        m = evaluate(model, [es.model_dump() for es in self.cfg.eval_sets], self.cfg.eval_config().model_dump(),
                     run_id=run_id, metric_prefix=prefix, step=step, **self.common())
        self.record(m, f"eval {label}")
        self.counts[label] = m["result"].get(MODEL_COUNTS, {})
        results = eval_results(m)
        accuracy = {name: r for name, r in results.items() if r.get("kind") == "gsm8k"}
        if accuracy:
            self.accuracy[label] = accuracy
        self.windows[label] = {name: (r["window_nll"], r["window_tokens"]) for name, r in results.items()
                               if name not in accuracy and r.get("window_nll")}
        return {name: r["ppl"] for name, r in results.items() if name not in accuracy}

    def cache(self, teacher: dict, run_id: str | None, label: str) -> dict:
        fields = self.cfg.corpus.cache_fields()
        shards = self.cfg.corpus.shards
        if shards > 1:  # fan out: one task run per disjoint chunk range of the same store, then check and record
            place = dict(workdir=self.workdir, dtype=self.cfg.dtype, device=self.cfg.device)
            futures = [cache_teacher_shard.submit(teacher, fields, shard_index=i, num_shards=shards, **place)
                       for i in range(shards)]
            for future in futures:
                future.result()
        return self.record(cache_teacher(teacher, fields, run_id=run_id, **self.common()), f"cache {label}")

    def distill(self, student: dict, cache: dict, run_id: str, label: str, **overrides: Any) -> dict:
        m = distill(student, cache, {**self.cfg.distill.model_dump(), **overrides}, self.cfg.seed, run_id=run_id,
                    **self.common())
        self.record(m, f"distill {label}")
        self.log_model(m, run_id)
        curve = m["result"].get("val_history")
        if isinstance(curve, list):
            self.curves[label] = [(int(p[0]), float(p[1])) for p in curve]
        return m

    def prune(self, model: dict, run_id: str, label: str, step: int | None = None, **fields: Any) -> dict:
        section = getattr(self.cfg, "prune", None)
        prune_fields = {**(section.model_dump() if section is not None else {}), **fields}
        m = self.record(prune(model, prune_fields, run_id=run_id, step=step, **self.common()), f"prune {label}")
        self.log_model(m, run_id)
        return m

    def profile(self, models: list[dict], run_id: str | None, label: str, settings: dict) -> dict:
        """Profile ``models`` side by side (the first is the baseline); the table and plot join the report."""
        m = self.record(profile(models, settings, run_id=run_id, **self.common()), f"profile {label}")
        for name in ("profile.md", "speedup.png"):
            shutil.copy(Path(m["path"]) / name, self.report_dir() / name)
        return m

    # -- MLflow ---------------------------------------------------------------------------------------------------
    def arm(self, name: str, **tags: Any) -> str:
        """A nested MLflow run for one arm (round, seed, ...) of the flow."""
        return self.mlflow.start_arm(name, {"flow": self.flow_name, "model": self.cfg.model, "seed": self.cfg.seed,
                                            "arm": name, **tags})

    def end(self, run_id: str) -> None:
        self.mlflow.end(run_id)

    def log_model(self, manifest: dict, run_id: str) -> None:
        """With `log_models: true`, the checkpoint goes to MLflow as artifacts (off by default: hundreds of MB)."""
        if self.cfg.log_models and run_id:
            self.mlflow.log_model(run_id, manifest["model"]["spec"])

    def register(self, model: str, trained: dict, run_id: str, evals: dict[str, float], parent: dict | None = None,
                 pruned: dict | None = None) -> None:
        """A final model into the MLflow Model Registry with its lineage (tasks/registry.py). Its files are written in
        a temporary directory, not the report's, which MLflow shows as the run's report artifacts."""
        lineage = lineage_tags(self.flow_name, self.cfg.model, trained, self.workdir, evals, self.cfg.log_models,
                               parent=parent, pruned=pruned)
        self.registered.append(register_model(self.tracker, run_id, self.flow_name, model, trained["result"]["student"],
                                              lineage))

    # -- report ---------------------------------------------------------------------------------------------------
    def report_dir(self) -> Path:
        """The report's directory on this worker (under a URL root: its mirror; ``finish`` uploads it)."""
        d = local_root(self.workdir) / "reports" / f"{self.flow_name}-{self.parent_id[:8]}"
        d.mkdir(parents=True, exist_ok=True)
        return d

    def finish(self, sections: list[str], metrics: dict[str, float], plots: list[Path] = (),
               header: str | None = None) -> dict:
        """Render the report (sparsekd_core/report.py), save and log it, end the parent run; returns the flow's
        summary: report path, metrics, stages, registered models, MLflow run."""
        d = self.report_dir()
        accuracy, accuracy_metrics = rep.accuracy_section(self.accuracy)
        metrics.update(accuracy_metrics)
        sections = [*sections, *(x for x in (accuracy, rep.registry_section(self.registered)) if x)]
        if self.curves:
            rep.plot_recovery(self.curves, d / "recovery.png")
            plots = [*plots, d / "recovery.png"]
        header = header or rep.flow_header(self.flow_name, self.cfg.model, self.cfg.seed,
                                           self.cfg.eval_config().model_dump(),
                                           [es.model_dump() for es in self.cfg.eval_sets],
                                           self.cfg.corpus.model_dump(), self.disjoint)
        # One report, its plots linked for where it is read. On disk (and where the study publishes it) they lie
        # beside it: by file name. The Prefect UI shows data: images. MLflow's preview shows only http(s) images:
        # the tracking server's URL of each plot; a local store has no server, so data: images (MLflow's preview
        # cannot show them, but the text then stands on its own wherever it is downloaded to).
        plots = list(plots)
        text = rep.flow_report(header, sections, plots, self.stages)
        embedded = rep.flow_report(header, sections, plots, self.stages, plot_src=rep.png_data_uri)
        served = rep.flow_report(header, sections, plots, self.stages,
                                 plot_src=lambda p: self.mlflow.report_file_url(p.name) or rep.png_data_uri(p))
        save_report(d, text, metrics, self.cfg.model_dump_json(indent=1), self.flow_name, self.workdir,
                    artifact_text=embedded)
        ran = sum(not s["cached"] for s in self.stages)
        self.mlflow.finish(d, metrics, ran, len(self.stages) - ran, report_text=served)
        return {"flow": self.flow_name, "report": str(d / "report.md"), "metrics": metrics, "stages": self.stages,
                "report_url": remote_path(self.workdir, d / "report.md"),
                "registered": self.registered,
                "mlflow_run_id": self.parent_id, "mlflow_run_url": self.tracker.run_url(self.parent_id),
                "tracking_uri": self.tracking["uri"]}


def check_held_out(cfg: FlowConfig) -> dict:
    """Every eval set and the distillation's validation text must be disjoint from the KD corpus: an overlap is a
    one-line error before any work (sparsekd_core/checks.py)."""
    return checks.check_held_out({es.name: es.data for es in cfg.eval_sets}, cfg.distill.val_data,
                                 cfg.corpus.cache_config())


def config_digest(cfg: FlowConfig) -> str:
    """The flow config's SHA-256 (first 16 hex digits): two runs with the same digest ran the same settings."""
    return hashlib.sha256(cfg.model_dump_json().encode()).hexdigest()[:16]


def start(cfg: FlowConfig, flow_name: str, parent_run_id: str | None = None, check_data: bool = True) -> Run:
    """Check the inputs and the data, open the flow's MLflow parent run (closing the runs a dead process of this
    host left RUNNING in its experiment); use as ``with start(...) as run:``."""
    preflight(cfg)  # every check before any work (flows/preflight.py): a deployment's run gets it too
    checked = check_held_out(cfg) if check_data else {}
    workdir = cfg.workdir if is_url(cfg.workdir) else str(local_root(cfg.workdir))
    local = local_root(workdir)  # under a URL root: this worker's mirror (the SQLite default stays per worker)
    local.mkdir(parents=True, exist_ok=True)
    settings = tracking_settings(local, cfg.tracking_uri, cfg.experiment or f"sparsekd-{flow_name}")
    digest = config_digest(cfg)
    mlflow = FlowTracking.start(settings, f"{flow_name}-seed{cfg.seed}-{time.strftime('%Y%m%d-%H%M%S')}",
                                parent_run_id, tags={"flow": flow_name, "model": cfg.model, "seed": cfg.seed,
                                                     "sparsekd.config_digest": digest},
                                params=cfg.model_dump())
    if parent_run_id is None:  # the experiment says what its latest top-level run was (MLflow's experiment list)
        tracker = mlflow.tracker
        for key, value in {"sparsekd.flow": flow_name, "sparsekd.model": cfg.model,
                           "sparsekd.config_digest": digest}.items():
            tracker.client.set_experiment_tag(tracker.experiment_id, key, value)
    mlflow.close_dead_runs()
    url = mlflow.tracker.run_url(mlflow.parent_id)
    if url:
        run_log()(f"MLflow run: {url}")
    return Run(cfg, flow_name, mlflow, workdir, disjoint=checked)
