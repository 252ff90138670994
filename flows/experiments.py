"""The paper's experiments as Prefect flows: composition of tasks only (the work is in tasks/ and sparsekd_core).

dense-kd, iterative, cascade, teacher-swap, wanda, multi-seed, paper. Each flow takes its pydantic config
(flows/configs.py), opens a parent MLflow run with a nested run per arm/round/seed, evaluates every model it
makes on every eval set of its config, and writes a Markdown report with plots into
``<workdir>/reports/<flow>-<run>/``. Its return value is a small summary (report path, metrics, what ran).
"""

from __future__ import annotations

import json
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefect import flow

from sparsekd_core import report as rep
from sparsekd_core.downstream import retention
from sparsekd_core.files import write_json_atomic, write_text_atomic
from tasks.stages import (MODEL_COUNTS, cache_teacher, cache_teacher_shard, dense_ref, distill, eval_results, evaluate,
                          instructions, profile, prune, run_log, self_data, sft)
from tasks.store import is_url, local_root, remote_path, upload_dir
from tasks.tracking import Tracker, default_tracking_uri

from .configs import (
    FLOW_CONFIGS,
    CascadeConfig,
    DenseKDConfig,
    FlowConfig,
    IterativeConfig,
    MultiSeedConfig,
    PaperConfig,
    ProfileFlowConfig,
    SelfDataFlowConfig,
    TeacherSwapConfig,
    WandaConfig,
    cache_config_fields,
    paper_parts,
)


@dataclass
class Run:
    """One flow run's context: where things go, the MLflow parent run, and what every stage did."""

    cfg: FlowConfig
    flow_name: str
    tracker: Tracker
    tracking: dict
    parent_id: str
    workdir: str
    disjoint: dict = field(default_factory=dict)  # what check_disjoint compared (for the report)
    stages: list[dict] = field(default_factory=list)
    curves: dict[str, list] = field(default_factory=dict)
    counts: dict[str, dict] = field(default_factory=dict)  # eval label -> counts of the model evaluated
    accuracy: dict[str, dict] = field(default_factory=dict)  # eval label -> {gsm8k set name: accuracy result}
    open_runs: list[str] = field(default_factory=list)  # MLflow runs to mark FAILED if the flow raises
    registered: list[dict] = field(default_factory=list)  # model versions this run registered (for the report)

    # -- the flow run's life: a flow that raises leaves no MLflow run RUNNING -------------------------------------
    def __enter__(self) -> "Run":
        return self

    def __exit__(self, kind, error, tb) -> None:
        if error is None:
            return
        reason = f"{type(error).__name__}: {error}"[:5000]
        for run_id in reversed(self.open_runs):
            try:
                self.tracker.set_tags(run_id, {"sparsekd.error": reason})
                self.tracker.end_run(run_id, status="FAILED")
            except Exception:  # noqa: BLE001 - the flow's own error is the one to report
                pass
        self.open_runs.clear()

    # -- stages, recorded -----------------------------------------------------------------------------------------
    def _record(self, manifest: dict, label: str) -> dict:
        self.stages.append({"stage": manifest["stage"], "label": label, "cached": manifest["cached"],
                            "seconds": manifest["seconds"], "key": manifest["key"]})
        return manifest

    def arm(self, name: str, **tags: Any) -> str:
        run_id = self.tracker.start_run(name, parent_run_id=self.parent_id,
                                        tags={"flow": self.flow_name, "model": self.cfg.model, "seed": self.cfg.seed,
                                              "arm": name, **tags})
        self.open_runs.append(run_id)
        return run_id

    def common(self) -> dict:
        return dict(workdir=self.workdir, dtype=self.cfg.dtype, device=self.cfg.device, tracking=self.tracking)

    def evaluate(self, model: dict, run_id: str, label: str, prefix: str = "", step: int | None = None) -> dict:
        m = evaluate(model, [es.model_dump() for es in self.cfg.eval_sets], self.cfg.eval_config().model_dump(),
                     run_id=run_id, metric_prefix=prefix, step=step, **self.common())
        self._record(m, f"eval {label}")
        self.counts[label] = m["result"].get(MODEL_COUNTS, {})
        results = eval_results(m)
        accuracy = {name: r for name, r in results.items() if r.get("kind") == "gsm8k"}
        if accuracy:  # reported in their own section (finish), beside every flow's perplexity tables
            self.accuracy[label] = accuracy
        return {name: r["ppl"] for name, r in results.items() if name not in accuracy}

    def cache(self, teacher: dict, run_id: str | None, label: str) -> dict:
        fields = self.cfg.corpus.model_dump()
        shards = fields.pop("shards", 1)
        if shards > 1:  # fan out: one task run per disjoint chunk range of the same store, then check and record
            place = dict(workdir=self.workdir, dtype=self.cfg.dtype, device=self.cfg.device)
            futures = [cache_teacher_shard.submit(teacher, fields, shard_index=i, num_shards=shards, **place)
                       for i in range(shards)]
            for future in futures:
                future.result()
        return self._record(cache_teacher(teacher, fields, run_id=run_id, **self.common()), f"cache {label}")

    def distill(self, student: dict, cache: dict, run_id: str, label: str, **overrides: Any) -> dict:
        m = distill(student, cache, {**self.cfg.distill.model_dump(), **overrides}, self.cfg.seed, run_id=run_id,
                    **self.common())
        self._record(m, f"distill {label}")
        self._log_model(m, run_id)
        curve = m["result"].get("val_history")
        if isinstance(curve, list):
            self.curves[label] = [(int(p[0]), float(p[1])) for p in curve]
        return m

    def prune(self, model: dict, run_id: str, label: str, step: int | None = None, **fields: Any) -> dict:
        section = getattr(self.cfg, "prune", None)
        prune_fields = {**(section.model_dump() if section is not None else {}), **fields}
        m = self._record(prune(model, prune_fields, run_id=run_id, step=step, **self.common()), f"prune {label}")
        self._log_model(m, run_id)
        return m

    def _log_model(self, manifest: dict, run_id: str) -> None:
        """With `log_models: true`, the checkpoint goes to MLflow as artifacts (off by default: hundreds of MB)."""
        if self.cfg.log_models and run_id:
            self.tracker.log_artifact(run_id, manifest["model"]["spec"], "model")

    def register(self, model: str, trained: dict, run_id: str, evals: dict[str, float], parent: dict | None = None,
                 pruned: dict | None = None) -> None:
        """Register a final model in the MLflow Model Registry (``sparsekd-<flow>-<model>``, a version per run) with
        its lineage as tags: the parent checkpoint, the teacher cache, the pruning that made the student, the
        training config, the eval results and the checkpoint's path on the storage root. The version's source is the
        arm run's ``model/`` artifacts: a pointer file (always) and the weights (with `log_models`)."""
        result = trained["result"]
        lineage = {
            "sparsekd.flow": self.flow_name,
            "sparsekd.checkpoint_path": remote_path(self.workdir, Path(result["student"])),
            "sparsekd.stage_key": trained["key"],
            "sparsekd.parent_checkpoint": (parent or {}).get("spec", trained["inputs"].get("student")),
            "sparsekd.parent_fingerprint": trained["inputs"].get("student"),
            "sparsekd.teacher_cache_key": trained["inputs"].get("teacher_cache", "none (SFT)"),
            "sparsekd.training": trained["stage"],
            "sparsekd.training_config": json.dumps(trained["config"].get(trained["stage"], {}), sort_keys=True),
            "sparsekd.seed": trained["config"].get("seed"),
            "sparsekd.weights_uploaded": bool(self.cfg.log_models),
            "sparsekd.model": self.cfg.model,
            **{f"sparsekd.eval.{name}": value for name, value in evals.items()},
        }
        if pruned is not None:
            lineage.update({"sparsekd.pruning_method": pruned["result"].get("method"),
                            "sparsekd.mlp_reduction": pruned["result"].get("mlp_reduction"),
                            "sparsekd.pruning_key": pruned["key"]})
        pointer = Path(self.report_dir()) / f".registry-{run_id}" / "sparsekd_checkpoint.json"
        write_json_atomic(pointer, lineage)
        self.tracker.log_artifact(run_id, pointer, "model")
        name = "sparsekd-" + re.sub(r"[^A-Za-z0-9_-]+", "-", f"{self.flow_name}-{model}").strip("-")
        version = self.tracker.register_model(name, run_id, lineage, description=f"{model} of a {self.flow_name} run")
        self.registered.append({"name": name, "version": version, "model": model,
                                "url": self.tracker.model_url(name, version), "checkpoint": result["student"]})

    def end(self, run_id: str) -> None:
        self.tracker.end_run(run_id)
        if run_id in self.open_runs:
            self.open_runs.remove(run_id)

    # -- report ---------------------------------------------------------------------------------------------------
    def report_dir(self) -> Path:
        """The report's directory on this worker (under a URL root: its mirror; ``finish`` uploads it)."""
        d = local_root(self.workdir) / "reports" / f"{self.flow_name}-{self.parent_id[:8]}"
        d.mkdir(parents=True, exist_ok=True)
        return d

    def accuracy_section(self, metrics: dict[str, float]) -> str:
        """GSM8K accuracy of every evaluated model, its retention (accuracy / the dense model's) and the reference
        solutions' log-likelihood; adds the figures to ``metrics``."""
        if not self.accuracy:
            return ""
        dense = self.accuracy.get("dense", {})
        rows = []
        for label, sets in self.accuracy.items():
            for name, r in sets.items():
                kept = retention(r["accuracy"], dense.get(name, {}).get("accuracy"))
                rows.append([label, name, r["accuracy"], f"{r['correct']}/{r['problems']}",
                             "—" if kept is None else f"{100 * kept:.0f}%", r["reference_loglik"]])
                key = re.sub(r"[^A-Za-z0-9]+", "_", label).strip("_")  # "pruned+kd teacher dense" -> pruned_kd_...
                metrics[f"acc_{key}_{name}"] = r["accuracy"]
                metrics[f"ref_loglik_{key}_{name}"] = r["reference_loglik"]
        return ("## Downstream accuracy (GSM8K)\n\nGreedy answers through the chat template, exact match on the "
                "final number; retention = accuracy / the dense model's (undefined when the dense model scores 0); "
                "reference log-likelihood = mean log-probability per token of the reference solution (nats; "
                "higher is better, it moves where accuracy cannot).\n\n"
                + rep.table(["model", "set", "accuracy", "correct", "retention", "ref. log-lik"], rows))

    def registry_section(self) -> str:
        if not self.registered:
            return ""
        rows = [[r["name"], r["version"], f"[open]({r['url']})" if r["url"] else "—", r["checkpoint"]]
                for r in self.registered]
        return ("## Registered models\n\nIn the MLflow Model Registry, with their lineage as tags (parent "
                "checkpoint, teacher cache, pruning, training config, eval results, checkpoint path).\n\n"
                + rep.table(["registered model", "version", "MLflow", "checkpoint"], rows))

    def profile(self, models: list[dict], run_id: str | None, label: str, settings: dict) -> dict:
        """Profile ``models`` side by side (the first is the baseline); the table and plots join the report."""
        m = self._record(profile(models, settings, run_id=run_id, **self.common()), f"profile {label}")
        for name in ("profile.md", "speedup.png"):
            shutil.copy(Path(m["path"]) / name, self.report_dir() / name)
        return m

    def finish(self, sections: list[str], metrics: dict[str, float], plots: list[Path] = (),
               header: str | None = None) -> dict:
        d = self.report_dir()
        sections = [*sections, *(x for x in (self.accuracy_section(metrics), self.registry_section()) if x)]
        if self.curves:
            rep.plot_recovery(self.curves, d / "recovery.png")
            plots = [*plots, d / "recovery.png"]
        ran = sum(not s["cached"] for s in self.stages)
        header = header or (f"# {self.flow_name}: {self.cfg.model} (seed {self.cfg.seed})\n\n"
                  f"Perplexity: {self.cfg.eval_config().protocol} protocol, ctx {self.cfg.eval_config().ctx}, "
                  f"stride {self.cfg.eval_config().stride}; eval sets: "
                  + ", ".join(f"`{es.name}` = {es.data}" + (f" (first {es.max_tokens} tokens)" if es.max_tokens else "")
                              + (f" (GSM8K accuracy, first {es.max_problems or 100} problems)"
                                 if es.kind == "gsm8k" else "")
                              for es in self.cfg.eval_sets)
                  + f". KD corpus: {self.cfg.corpus.data}, {self.cfg.corpus.num_samples}×{self.cfg.corpus.seq_len} "
                  f"tokens, top-{self.cfg.corpus.top_k}.\n\n" + disjoint_line(self.disjoint))
        stages = rep.table(["stage", "cached", "seconds"], [[s["label"], s["cached"], s["seconds"]] for s in self.stages])
        text = header + "\n".join(sections) + "\n## Plots\n\n" + "".join(f"![{p.stem}]({p.name})\n\n" for p in plots) \
            + f"## Stages ({ran} ran, {len(self.stages) - ran} reused from cache)\n\n" + stages
        write_text_atomic(d / "report.md", text)
        markdown_artifact(self.flow_name, text)
        write_json_atomic(d / "metrics.json", metrics)
        write_text_atomic(d / "config.json", self.cfg.model_dump_json(indent=1))
        self.tracker.log_metrics(self.parent_id, metrics)
        self.tracker.set_tags(self.parent_id, {"sparsekd.report": d / "report.md", "sparsekd.stages_ran": ran,
                                               "sparsekd.stages_cached": len(self.stages) - ran})
        self.tracker.log_artifact(self.parent_id, d, "report")
        if is_url(self.workdir):  # the report lives beside the stages, for every worker and reader of the bucket
            upload_dir(d, remote_path(self.workdir, d))
        self.end(self.parent_id)
        return {"flow": self.flow_name, "report": str(d / "report.md"), "metrics": metrics, "stages": self.stages,
                "report_url": remote_path(self.workdir, d / "report.md"),
                "registered": self.registered,
                "mlflow_run_id": self.parent_id, "tracking_uri": self.tracking["uri"]}


def markdown_artifact(flow_name: str, text: str) -> None:
    """The report as a Markdown artifact of the Prefect flow run (shown on its Artifacts tab)."""
    try:
        from prefect.artifacts import create_markdown_artifact
        from prefect.runtime import flow_run

        if flow_run.id is None:
            return
        create_markdown_artifact(markdown=text, key=f"{flow_name}-report", description=f"sparsekd {flow_name} report")
    except Exception as err:  # noqa: BLE001 - the report on disk and in MLflow is the record; say it, go on
        run_log()(f"report: could not attach the Markdown artifact to the flow run ({err})")


def disjoint_line(checked: dict) -> str:
    if not checked:
        return ""
    return (f"Eval sets and the validation text are disjoint from the KD corpus: {checked['eval_documents']:,} of "
            f"their documents checked against {checked['corpus_documents']:,} corpus documents (hashes of the "
            f"whitespace-normalised documents and paragraphs), {checked['shared']} shared.\n\n")


def check_held_out(cfg: FlowConfig) -> dict:
    """Every eval set (and the distillation's validation text) must be disjoint from the KD corpus: an overlap is
    a one-line error before any work (sparsekd_core.data.check_disjoint)."""
    from sparsekd_core.cache import corpus_reads
    from sparsekd_core.config import CacheConfig
    from sparsekd_core.data import check_disjoint

    held_out = {es.name: es.data for es in cfg.eval_sets}
    held_out["distill.val_data"] = cfg.distill.val_data
    return check_disjoint(held_out, corpus_reads(CacheConfig(**cache_config_fields(cfg.corpus), out="unused")))


def start(cfg: FlowConfig, flow_name: str, parent_run_id: str | None = None, check_data: bool = True) -> Run:
    """Check the data, open the flow's MLflow parent run; use as ``with start(...) as run:`` so that a flow that
    raises marks its parent and open arm runs FAILED."""
    checked = check_held_out(cfg) if check_data else {}
    workdir = cfg.workdir if is_url(cfg.workdir) else str(local_root(cfg.workdir))
    local = local_root(workdir)  # under a URL root: this worker's mirror (the SQLite default stays per worker)
    local.mkdir(parents=True, exist_ok=True)
    uri = cfg.tracking_uri or default_tracking_uri(local)
    # A local store keeps artifacts beside it in the workdir; a tracking server decides where they go
    # (`mlflow server --artifacts-destination ...`, proxied to every client).
    remote = uri.split(":", 1)[0] in ("http", "https", "databricks")
    tracking = {"uri": uri, "experiment": cfg.experiment or f"sparsekd-{flow_name}",
                "artifact_root": None if remote else str(local / "mlartifacts")}
    tracker = Tracker(tracking["uri"], tracking["experiment"], tracking["artifact_root"])
    tags = {"flow": flow_name, "model": cfg.model, "seed": cfg.seed}
    try:
        from prefect.runtime import flow_run

        tags["prefect_flow_run_id"] = flow_run.id
        url = getattr(flow_run, "ui_url", None)
        if isinstance(url, str) and url.startswith("http"):  # "None/flow-runs/..." without a UI URL setting
            tags["prefect_flow_run_url"] = url
    except Exception:  # noqa: BLE001 - not inside a Prefect run
        pass
    parent = tracker.start_run(f"{flow_name}-seed{cfg.seed}-{time.strftime('%Y%m%d-%H%M%S')}",
                               parent_run_id=parent_run_id, tags=tags, params=cfg.model_dump())
    return Run(cfg, flow_name, tracker, tracking, parent, workdir, disjoint=checked, open_runs=[parent])


def _flat(prefix: str, ppl: dict[str, float]) -> dict[str, float]:
    return {f"{prefix}_{name}": v for name, v in ppl.items()}


def _pct(fraction: float | None) -> str:
    return "—" if fraction is None else f"{100 * fraction:.2f}%"


def _set_names(cfg: FlowConfig) -> list[str]:
    """The perplexity sets (the tables' columns); GSM8K sets have their own section."""
    return [es.name for es in cfg.eval_sets if es.kind == "perplexity"]


# ---------------------------------------------------------------------------------------------------------------- flows


def _dense_and_cache(run: Run) -> tuple[dict, dict, dict]:
    """The dense model's reference, its perplexities (an MLflow arm of its own) and its teacher cache."""
    dense = dense_ref(run.cfg.model)
    rid = run.arm("dense")
    dense_ppl = run.evaluate(dense, rid, "dense")
    run.end(rid)
    return dense, dense_ppl, run.cache(dense, None, "dense")


def _dense_kd_arms(run: Run, ce_control: bool) -> dict:
    """Dense eval, dense cache, Dense+KD and (optionally) its CE-only twin: shared by several flows."""
    dense, dense_ppl, dense_cache = _dense_and_cache(run)
    rid = run.arm("dense+kd")
    kd = run.distill(dense, dense_cache, rid, "dense+kd")
    kd_ppl = run.evaluate(kd["model"], rid, "dense+kd")
    run.register("dense-kd", kd, rid, kd_ppl, parent=dense)
    run.end(rid)
    out = {"dense": dense, "dense_ppl": dense_ppl, "dense_cache": dense_cache, "kd": kd, "kd_ppl": kd_ppl}
    if ce_control:
        rid = run.arm("ce-only")
        ce = run.distill(dense, dense_cache, rid, "ce-only", alpha=0.0)
        out.update(ce=ce, ce_ppl=run.evaluate(ce["model"], rid, "ce-only"))
        run.end(rid)
    return out


def _dense_kd_section(cfg: FlowConfig, arms: dict) -> tuple[str, dict]:
    names = _set_names(cfg)
    rows = [["Dense", *[arms["dense_ppl"][n] for n in names], *["—"] * len(names)],
            ["Dense+KD", *[arms["kd_ppl"][n] for n in names], *[rep.vs(arms["kd_ppl"][n], arms["dense_ppl"][n]) for n in names]]]
    if "ce_ppl" in arms:
        rows.append(["CE-only (α=0)", *[arms["ce_ppl"][n] for n in names],
                     *[rep.vs(arms["ce_ppl"][n], arms["dense_ppl"][n]) for n in names]])
    kd_res = arms["kd"]["result"]
    text = ("## Dense+KD vs its CE-only twin\n\nSame corpus, steps and seed; α=0 separates KD from domain "
            "adaptation.\n\n" + rep.table(["model", *[f"PPL {n}" for n in names], *[f"vs dense {n}" for n in names]], rows)
            + f"\nKD term first → last: {rep._fmt(kd_res.get('kd_loss_first'), 4)} → {rep._fmt(kd_res.get('kd_loss_last'), 4)}; "
            f"steps: {kd_res.get('steps')}.\n")
    metrics = {**_flat("ppl_dense", arms["dense_ppl"]), **_flat("ppl_dense_kd", arms["kd_ppl"])}
    if "ce_ppl" in arms:
        metrics.update(_flat("ppl_ce_only", arms["ce_ppl"]))
    return text, metrics


@flow(name="dense-kd")
def dense_kd_flow(config: DenseKDConfig, parent_run_id: str | None = None) -> dict:
    with start(config, "dense-kd", parent_run_id) as run:
        arms = _dense_kd_arms(run, config.ce_control)
        text, metrics = _dense_kd_section(config, arms)
        return run.finish([text], metrics)


@flow(name="iterative")
def iterative_flow(config: IterativeConfig, parent_run_id: str | None = None) -> dict:
    with start(config, "iterative", parent_run_id) as run:
        names = _set_names(config)
        dense, dense_ppl, teacher_cache = _dense_and_cache(run)
        current, rounds = dense, []
        for r, target in enumerate(config.targets, 1):
            rid = run.arm(f"round-{r}", round=r, target=target)
            p = run.prune(current, rid, f"R{r}", step=r, target_reduction=target)
            pre = run.evaluate(p["model"], rid, f"R{r} pre-KD", prefix="pre_kd_", step=r)
            d = run.distill(p["model"], teacher_cache, rid, f"R{r}")
            post = run.evaluate(d["model"], rid, f"R{r} post-KD", prefix="post_kd_", step=r)
            run.register(f"R{r}-pruned-kd", d, rid, post, parent=current, pruned=p)
            run.tracker.log_metrics(run.parent_id, {**_flat("pre_kd_ppl", pre), **_flat("post_kd_ppl", post)}, step=r)
            run.end(rid)
            rounds.append({"round": r, "target": target, "mlp_reduction": p["result"].get("mlp_reduction", target),
                           "pre": pre, "post": post, "model": d["model"]})
            current = d["model"]
            if not config.keep_original_teacher and r < len(config.targets):
                teacher_cache = run.cache(current, None, f"R{r} post-KD")
        headers = ["round", "MLP reduction", *[f"pre-KD {n}" for n in names], *[f"post-KD {n}" for n in names],
                   *[f"post vs dense {n}" for n in names]]
        rows = [[f"R{x['round']}", f"{100 * x['mlp_reduction']:.1f}%", *[x["pre"][n] for n in names],
                 *[x["post"][n] for n in names], *[rep.vs(x["post"][n], dense_ppl[n]) for n in names]] for x in rounds]
        teacher = "the dense model's cache every round" if config.keep_original_teacher else \
            "the previous round's recovered model (re-cached each round, as the paper does)"
        text = (f"## Iterative pruning (Table III)\n\nDense: " + ", ".join(f"{n} {dense_ppl[n]:.2f}" for n in names)
                + f". Teacher: {teacher}.\n\n" + rep.table(headers, rows))
        plots = []
        for n in names:
            path = run.report_dir() / f"ppl_vs_reduction_{n}.png"
            rep.plot_ppl_vs_reduction(rounds, n, dense_ppl[n], path)
            plots.append(path)
        metrics = _flat("ppl_dense", dense_ppl)
        for x in rounds:
            metrics.update(_flat(f"R{x['round']}_pre_kd", x["pre"]))
            metrics.update(_flat(f"R{x['round']}_post_kd", x["post"]))
        sections = [text]
        if config.profile:
            section, profile_plots = _profile_rounds(run, config, dense, rounds, metrics)
            sections.append(section)
            plots += profile_plots
        return run.finish(sections, metrics, plots)


def _profile_rounds(run: Run, config: IterativeConfig, dense: dict, rounds: list[dict],
                    metrics: dict) -> tuple[str, list[Path]]:
    """Dense vs each round's recovered model, side by side: Tables VII-VIII and speedup vs MLP reduction."""
    models = [{**dense, "label": "dense"}] + [{**x["model"], "label": f"R{x['round']}"} for x in rounds]
    rid = run.arm("profile")
    m = run.profile(models, rid, "dense vs rounds", config.profile_settings.model_dump())
    run.end(rid)
    results = m["result"]["results"]
    reduction = {0: 0.0, **{i: x["mlp_reduction"] for i, x in enumerate(rounds, 1)}}
    points = [{**r, "mlp_reduction": reduction[r["model_index"]]} for r in results]
    path = run.report_dir() / "speedup_vs_reduction.png"
    rep.plot_speedup_vs_reduction(points, path)
    for r in results:
        if r["model_index"]:
            metrics[f"{r['model']}_b{r['batch_size']}_s{r['seq_len']}_prefill_speedup"] = r["speedup"]
    device = results[0]["device"] if results else "?"
    text = (f"## Inference profile (Tables VII-VIII): dense vs each round, on {device}\n\n"
            "Prefill (TTFT) and per-token decode (TPOT) latency, time by module, FLOP ratio and the Amdahl bound "
            "(speedup if only the FFN shrinks). Timings are measurements of this machine at this moment: on a "
            "shared CPU they are noisy.\n\n" + (Path(m["path"]) / "profile.md").read_text())
    return text, [run.report_dir() / "speedup.png", path]


def _swap_rows(names, student_pre, from_dense, from_kd, dense_ppl):
    return [["pruned, pre-KD", *[student_pre[n] for n in names], *[rep.vs(student_pre[n], dense_ppl[n]) for n in names]],
            ["KD from original (dense) teacher", *[from_dense[n] for n in names],
             *[rep.vs(from_dense[n], dense_ppl[n]) for n in names]],
            ["KD from KD-improved (Dense+KD) teacher", *[from_kd[n] for n in names],
             *[rep.vs(from_kd[n], dense_ppl[n]) for n in names]]]


@flow(name="cascade")
def cascade_flow(config: CascadeConfig, parent_run_id: str | None = None) -> dict:
    """Dense → Dense+KD (+ CE-only twin) → prune the Dense+KD model → Pruned+KD from the Dense+KD cache;
    teacher swap: the same pruned student distilled from the original dense cache."""
    with start(config, "cascade", parent_run_id) as run:
        names = _set_names(config)
        arms = _dense_kd_arms(run, config.ce_control)
        text, metrics = _dense_kd_section(config, arms)
        kd_cache = run.cache(arms["kd"]["model"], None, "dense+kd")
        rid = run.arm("pruned", target=config.target)
        p = run.prune(arms["kd"]["model"], rid, "dense+kd", target_reduction=config.target)
        pre = run.evaluate(p["model"], rid, "pruned pre-KD")
        run.end(rid)
        rid = run.arm("pruned+kd (teacher dense+kd)")
        trained = run.distill(p["model"], kd_cache, rid, "pruned+kd")
        pkd = run.evaluate(trained["model"], rid, "pruned+kd")
        run.register("pruned-kd", trained, rid, pkd, parent=arms["kd"]["model"], pruned=p)
        run.end(rid)
        metrics.update({**_flat("ppl_pruned_pre_kd", pre), **_flat("ppl_pruned_kd", pkd)})
        sections = [text]
        red = p["result"].get("mlp_reduction", config.target)
        rows = [["Dense", *[arms["dense_ppl"][n] for n in names]], ["Dense+KD", *[arms["kd_ppl"][n] for n in names]],
                [f"Pruned ({100 * red:.1f}% MLP), pre-KD", *[pre[n] for n in names]],
                ["Pruned+KD (teacher Dense+KD)", *[pkd[n] for n in names]]]
        if config.teacher_swap:
            rid = run.arm("pruned+kd (teacher dense)")
            trained = run.distill(p["model"], arms["dense_cache"], rid, "pruned+kd teacher dense")
            swap = run.evaluate(trained["model"], rid, "pruned+kd teacher dense")
            run.register("pruned-kd-teacher-dense", trained, rid, swap, parent=arms["kd"]["model"], pruned=p)
            run.end(rid)
            rows.append(["Pruned+KD (teacher Dense)", *[swap[n] for n in names]])
            metrics.update(_flat("ppl_pruned_kd_teacher_dense", swap))
            sections.append("## Teacher swap (Table IV)\n\n" + rep.table(
                ["student", *[f"PPL {n}" for n in names], *[f"vs dense {n}" for n in names]],
                _swap_rows(names, pre, swap, pkd, arms["dense_ppl"])))
        sections.insert(1, "## Cascade: Dense → Dense+KD → Pruned+KD\n\n" + rep.table(["model", *[f"PPL {n}" for n in names]], rows))
        return run.finish(sections, metrics)


@flow(name="teacher-swap")
def teacher_swap_flow(config: TeacherSwapConfig, parent_run_id: str | None = None) -> dict:
    with start(config, "teacher-swap", parent_run_id) as run:
        names = _set_names(config)
        arms = _dense_kd_arms(run, ce_control=False)
        kd_cache = run.cache(arms["kd"]["model"], None, "dense+kd")
        rid = run.arm("pruned", target=config.target)
        p = run.prune(arms["dense"], rid, "dense", target_reduction=config.target)
        pre = run.evaluate(p["model"], rid, "pruned pre-KD")
        run.end(rid)
        out = {}
        for label, cache in (("teacher dense", arms["dense_cache"]), ("teacher dense+kd", kd_cache)):
            rid = run.arm(f"pruned+kd ({label})")
            trained = run.distill(p["model"], cache, rid, f"pruned+kd {label}")
            out[label] = run.evaluate(trained["model"], rid, label)
            run.register(f"pruned-kd-{label}", trained, rid, out[label], parent=arms["dense"], pruned=p)
            run.end(rid)
        text = (f"## Teacher swap (Table IV): one student pruned to {100 * p['result'].get('mlp_reduction', config.target):.1f}% "
                "MLP reduction\n\n" + rep.table(["student", *[f"PPL {n}" for n in names], *[f"vs dense {n}" for n in names]],
                                                 _swap_rows(names, pre, out["teacher dense"], out["teacher dense+kd"],
                                                            arms["dense_ppl"])))
        metrics = {**_flat("ppl_dense", arms["dense_ppl"]), **_flat("ppl_pruned_pre_kd", pre),
                   **_flat("ppl_kd_teacher_dense", out["teacher dense"]),
                   **_flat("ppl_kd_teacher_dense_kd", out["teacher dense+kd"])}
        return run.finish([text], metrics)


@flow(name="wanda")
def wanda_flow(config: WandaConfig, parent_run_id: str | None = None) -> dict:
    with start(config, "wanda", parent_run_id) as run:
        names = _set_names(config)
        dense, dense_ppl, dense_cache = _dense_and_cache(run)
        rows, metrics = [], _flat("ppl_dense", dense_ppl)
        for s in config.sparsities:
            rid = run.arm(f"wanda-{s}", sparsity=s)
            p = run.prune(dense, rid, f"wanda {s}", method="wanda", target_reduction=s)
            pre = run.evaluate(p["model"], rid, f"wanda {s} pre-KD", prefix="pre_kd_")
            trained = run.distill(p["model"], dense_cache, rid, f"wanda {s}")
            post = run.evaluate(trained["model"], rid, f"wanda {s} post-KD", prefix="post_kd_")
            run.register(f"wanda-{s}-kd", trained, rid, post, parent=dense, pruned=p)
            run.end(rid)
            # The sparsity of the models that were evaluated, counted on them (not the pruning target).
            zeros_pre = run.counts[f"wanda {s} pre-KD"].get("mlp_zero_fraction")
            zeros_post = run.counts[f"wanda {s} post-KD"].get("mlp_zero_fraction")
            rows.append([f"{100 * s:.0f}%", _pct(zeros_pre), _pct(zeros_post), *[pre[n] for n in names],
                         *[post[n] for n in names], *[rep.vs(post[n], dense_ppl[n]) for n in names]])
            metrics.update({**_flat(f"wanda{s}_pre_kd", pre), **_flat(f"wanda{s}_post_kd", post),
                            f"wanda{s}_pre_kd_mlp_zero_fraction": zeros_pre,
                            f"wanda{s}_post_kd_mlp_zero_fraction": zeros_post})
        text = ("## WANDA + KD (Table V)\n\nUnstructured: zeros are stored densely, so no speed or size gain without "
                "sparse kernels. MLP zeros are counted on each evaluated model; the mask is held through "
                "distillation.\n\n"
                + rep.table(["target", "MLP zeros pre-KD", "MLP zeros post-KD", *[f"pre-KD {n}" for n in names],
                             *[f"post-KD {n}" for n in names], *[f"post vs dense {n}" for n in names]], rows))
        return run.finish([text], metrics)


@flow(name="selfdata")
def selfdata_flow(config: SelfDataFlowConfig, parent_run_id: str | None = None) -> dict:
    """Dense → depth-prune (and optionally SVD) → three recoveries on the same prompts, steps and seed: SFT on the
    original responses, SFT on the dense model's rewrites (self-data distillation), logit KD from the dense model."""
    with start(config, "selfdata", parent_run_id) as run:
        names = _set_names(config)
        dense = dense_ref(config.model)
        rid = run.arm("dense")
        dense_ppl = run.evaluate(dense, rid, "dense")
        run.end(rid)

        rid = run.arm("pruned", drop_blocks=config.drop_blocks)
        pruned = run.prune(dense, rid, f"depth {config.drop_blocks}", method="depth",
                           drop_blocks=config.drop_blocks)
        label = f"depth −{config.drop_blocks} blocks"
        if config.svd_target is not None:
            pruned = run.prune(pruned["model"], rid, f"svd {config.svd_target}", method="svd",
                               target_reduction=config.svd_target)
            label += f" + SVD {100 * config.svd_target:.0f}% MLP"
        pre = run.evaluate(pruned["model"], rid, "pruned")
        run.end(rid)

        prompts = run._record(instructions(config.instructions, config.num_samples, run.workdir), "instructions")
        rewrites = run._record(self_data(dense, prompts, config.selfdata.model_dump(), run_id=None, **run.common()),
                               "selfdata")
        sft_fields = config.sft_fields()
        arms = {}
        for arm, data in (("sft original", prompts), ("sft self-data", rewrites)):
            rid = run.arm(arm)
            m = sft(pruned["model"], data, sft_fields, config.seed, run_id=rid, **run.common())
            run._record(m, arm)
            run.curves[arm] = [(int(p[0]), float(p[1])) for p in m["result"].get("val_history", [])]
            arms[arm] = run.evaluate(m["model"], rid, arm)
            run.register(arm, m, rid, arms[arm], parent=pruned["model"], pruned=pruned)
            run.end(rid)
        rid = run.arm("logit kd")
        cache_fields = {**config.corpus.model_dump(), "data": prompts["data_path"], "num_samples": None}
        cache = run._record(cache_teacher(dense, cache_fields, **run.common()), "cache dense (same prompts)")
        trained = run.distill(pruned["model"], cache, rid, "logit kd")
        arms["logit kd"] = run.evaluate(trained["model"], rid, "logit kd")
        run.register("logit kd", trained, rid, arms["logit kd"], parent=pruned["model"], pruned=pruned)
        run.end(rid)

        kept = rewrites["result"]
        rows = [["Dense", *[dense_ppl[n] for n in names], *["—"] * len(names)],
                [f"Pruned ({label}), no recovery", *[pre[n] for n in names],
                 *[rep.vs(pre[n], dense_ppl[n]) for n in names]]]
        rows += [[arm, *[ppl[n] for n in names], *[rep.vs(ppl[n], dense_ppl[n]) for n in names]]
                 for arm, ppl in arms.items()]
        steps = config.distill.max_steps or "all"
        text = (f"## Recovery of a depth-pruned model: SFT vs self-data SFT vs logit KD\n\n"
                f"Same {config.num_samples} prompts of {config.instructions}, same steps ({steps}) and seed "
                f"({config.seed}) for every arm. Self-data: the dense model's rewrites, {kept['kept']} of "
                f"{kept['records']} kept ({kept['dropped']} dropped by the answer filter); the self-data arm trains "
                "on the kept ones only.\n\n"
                + rep.table(["model", *[f"PPL {n}" for n in names], *[f"vs dense {n}" for n in names]], rows))
        metrics = {**_flat("ppl_dense", dense_ppl), **_flat("ppl_pruned", pre),
                   "selfdata_kept": kept["kept"], "selfdata_dropped": kept["dropped"]}
        for arm, ppl in arms.items():
            metrics.update(_flat("ppl_" + re.sub(r"[^A-Za-z0-9]+", "_", arm), ppl))
        return run.finish([text], metrics)


@flow(name="profile")
def profile_flow(config: ProfileFlowConfig, parent_run_id: str | None = None) -> dict:
    """Several models profiled side by side (the baseline first): Tables VII-VIII and the speedup plot."""
    with start(config, "profile", parent_run_id, check_data=False) as run:
        models = [{**dense_ref(spec), "label": spec} for spec in [config.model, *config.compare]]
        rid = run.arm("profile")
        m = run.profile(models, rid, "models", config.profile.model_dump())
        run.end(rid)
        results = m["result"]["results"]
        metrics = {f"m{r['model_index']}_b{r['batch_size']}_s{r['seq_len']}_{k}": r[k] for r in results
                   for k in ("ttft_ms", "tpot_ms", "speedup")}
        header = (f"# profile: {config.model} vs {', '.join(config.compare) or 'nothing else'}\n\n"
                  f"Baseline: {config.model}. Timings are measurements of this machine at this moment "
                  f"({results[0]['device'] if results else '?'}); run it alone on an idle machine.\n\n")
        text = "## Inference profile (Tables VII-VIII)\n\n" + (Path(m["path"]) / "profile.md").read_text()
        return run.finish([text], metrics, [run.report_dir() / "speedup.png"], header=header)


FLOWS = {"dense-kd": dense_kd_flow, "iterative": iterative_flow, "cascade": cascade_flow,
         "teacher-swap": teacher_swap_flow, "wanda": wanda_flow, "selfdata": selfdata_flow}


@flow(name="multi-seed")
def multi_seed_flow(config: MultiSeedConfig) -> dict:
    """The inner flow once per seed, then mean ± std of every metric. ``fan_out: subflows`` runs the seeds one
    after another inside this run; ``fan_out: deployments`` submits one run of the inner flow's deployment per
    seed to the work pool (so several GPU workers share them), waits, and reads their metrics from MLflow."""
    cls = FLOW_CONFIGS[config.flow]
    base = cls(**{**config.inner_values(), "seed": config.seeds[0]})
    if config.fan_out == "deployments":
        _check_deployment(f"{config.flow}/{config.deployment}")
    with start(base, "multi-seed") as run:
        # Nested runs must live in the parent's experiment to show under it in MLflow.
        inner = {seed: cls(**{**config.inner_values(), "seed": seed, "experiment": run.tracking["experiment"]})
                 for seed in config.seeds}
        if config.fan_out == "deployments":
            per_seed = _seeds_on_pool(run, config, inner)
        else:
            per_seed = {seed: FLOWS[config.flow](inner[seed], parent_run_id=run.parent_id) for seed in config.seeds}
        for seed in config.seeds:
            run.stages += [{**s, "label": f"seed {seed}: {s['label']}"} for s in per_seed[seed].get("stages", [])]
        keys = sorted(set().union(*(r["metrics"] for r in per_seed.values())))
        rows, metrics = [], {}
        for k in keys:
            values = [per_seed[s]["metrics"].get(k) for s in config.seeds]
            mean, std = rep.mean_std(values)
            metrics[f"{k}_mean"], metrics[f"{k}_std"] = mean, std
            rows.append([k, *values, f"{mean:.2f} ± {std:.2f}"])
        where = ("one deployment run per seed on the work pool: "
                 + ", ".join(f"seed {s} = flow run {per_seed[s]['flow_run_id']}" for s in config.seeds)
                 if config.fan_out == "deployments" else "subflows of this run")
        text = (f"## {config.flow} over seeds {config.seeds} (mean ± std)\n\nSeeds ran as {where}.\n\n"
                + rep.table(["metric", *[f"seed {s}" for s in config.seeds], "mean ± std"], rows)
                + "\nPer-seed reports: " + ", ".join(f"[{s}]({per_seed[s]['report']})" for s in config.seeds) + "\n")
        return run.finish([text], metrics)


def _check_deployment(name: str) -> None:
    """Fail before any work when the seeds' deployment is not on the server (e.g. under `sparsekd run`'s
    temporary local server, which has no deployments and no workers)."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_deployment_by_name(name)
        except ObjectNotFound:
            raise ValueError(f"multi-seed: fan_out=deployments needs the deployment {name!r} on the Prefect server "
                             f"at {client.api_url}; apply them with `python -m deployments.setup` and start a worker, "
                             f"or use fan_out: subflows") from None


def _seeds_on_pool(run: Run, config: MultiSeedConfig, inner: dict[int, FlowConfig]) -> dict[int, dict]:
    """Submit one deployment run per seed (as the UI's Run button does), wait for all, collect from MLflow.

    The idempotency key ties each seed's run to this flow run, so a retried or resumed multi-seed run does not
    submit its seeds twice."""
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.runtime import flow_run as this_run

    name = f"{config.flow}/{config.deployment}"
    submitted = {}
    for seed, cfg in inner.items():
        fr = run_deployment(name, parameters={"config": cfg.model_dump(mode="json"), "parent_run_id": run.parent_id},
                            timeout=0, flow_run_name=f"{config.flow}-seed{seed}",
                            idempotency_key=f"{this_run.id}-seed{seed}", tags=["multi-seed", f"seed-{seed}"])
        submitted[seed] = fr.id
        run_log()(f"seed {seed}: submitted {name} as flow run {fr.id}")
    deadline = time.monotonic() + config.wait_timeout_s
    final: dict[int, Any] = {}
    with get_client(sync_client=True) as client:
        while len(final) < len(submitted):
            for seed, fid in submitted.items():
                if seed not in final:
                    state = client.read_flow_run(fid).state
                    if state is not None and state.is_final():
                        final[seed] = state
                        run_log()(f"seed {seed}: flow run {fid} {state.type.value}")
            if len(final) < len(submitted):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"multi-seed: seeds {sorted(set(submitted) - set(final))} still running after "
                                       f"{config.wait_timeout_s:.0f} s; their runs keep going on the pool")
                time.sleep(5)
    failed = {s: st.type.value for s, st in final.items() if not st.is_completed()}
    if failed:
        raise RuntimeError(f"multi-seed: the runs of seeds {failed} did not complete (see their flow runs: "
                           + ", ".join(str(submitted[s]) for s in failed) + ")")
    children = run.tracker.child_runs(run.parent_id)
    out = {}
    for seed in inner:
        found = [c for c in children if c.data.tags.get("seed") == str(seed)
                 and c.data.tags.get("prefect_flow_run_id") == str(submitted[seed])]
        if not found:
            raise RuntimeError(f"multi-seed: no MLflow run of seed {seed} (flow run {submitted[seed]}) under "
                               f"{run.parent_id}: does the worker log to the same tracking URI ({run.tracking['uri']})?")
        c = found[0]
        out[seed] = {"metrics": dict(c.data.metrics), "report": c.data.tags.get("sparsekd.report", "?"),
                     "flow_run_id": str(submitted[seed])}
    return out


@flow(name="paper")
def paper_flow(config: PaperConfig) -> dict:
    """Everything at one scale; shared stages (dense eval, caches, Dense+KD) are computed once and reused.
    Every sub-flow's config was validated with the paper config (``paper_parts``), before any of them runs."""
    with start(config, "paper") as run:
        configs = paper_parts(config, experiment=run.tracking["experiment"])
        parts = {name: FLOWS[name](cfg, parent_run_id=run.parent_id) for name, cfg in configs.items()}
        metrics, sections = {}, []
        for name, res in parts.items():
            metrics.update({f"{name}.{k}": v for k, v in res["metrics"].items()})
            body = Path(res["report"]).read_text().split("\n## Plots")[0].split("\n", 2)[-1]
            sections.append(f"# {name}\n\n{body}\n(full report: {res['report']})\n")
            run.stages += [{**s, "label": f"{name}: {s['label']}"} for s in res["stages"]]
        return run.finish(sections, metrics)


ALL_FLOWS = {**FLOWS, "multi-seed": multi_seed_flow, "paper": paper_flow, "profile": profile_flow}
