"""The paper's experiments as Prefect flows: composition of tasks only.

dense-kd, iterative, cascade, teacher-swap, wanda, selfdata, profile, multi-seed, paper. Each flow takes its pydantic
config (flows/configs.py) and runs its stages through a ``Run`` (flows/context.py): a parent MLflow run with a nested
run per arm/round/seed, every model evaluated on every eval set of the config, and a Markdown report with plots
(rendered by sparsekd_core/report.py) in ``<workdir>/reports/<flow>-<run>/``. Its return value is a small summary
(report path, metrics, what ran).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from prefect import flow
from pydantic.json_schema import SkipJsonSchema

from sparsekd_core import report as rep
from sparsekd_core.stats import paired_bootstrap
from tasks.stages import cache_teacher, dense_ref, instructions, run_log, self_data, sft

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
    paper_parts,
)
from .context import Run, check_held_out, start

__all__ = ["ALL_FLOWS", "FLOWS", "Round", "Run", "check_held_out", "iterative_rounds", "start"]


def _set_names(cfg: FlowConfig) -> list[str]:
    """The perplexity sets (the tables' columns); GSM8K sets have their own section."""
    return [es.name for es in cfg.eval_sets if es.kind == "perplexity"]


# ---------------------------------------------------------------------------------------------------------------- shared arms


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
    return rep.dense_kd_section(_set_names(cfg), arms["dense_ppl"], arms["kd_ppl"], arms.get("ce_ppl"),
                                arms["kd"]["result"])


# ---------------------------------------------------------------------------------------------------------------- the round loop


@dataclass
class Round:
    """One round of the iterative flow: the model it started from, its prune and distill manifests, the teacher
    cache it was distilled from, its perplexities before and after KD, and the MLflow run it logged to."""

    index: int
    target: float
    start: dict  # the ModelRef the round pruned
    pruned: dict
    trained: dict
    teacher: dict
    pre: dict[str, float]
    post: dict[str, float]
    run_id: str

    @property
    def mlp_reduction(self) -> float:
        return self.pruned["result"].get("mlp_reduction", self.target)

    def summary(self) -> dict:
        """What the report needs: {round, target, mlp_reduction, pre, post, kept}; ``kept`` is the distill run's
        (best step, steps run, validation PPL at step 0, best validation PPL): which checkpoint the round kept."""
        r = self.trained["result"]
        return {"round": self.index, "target": self.target, "mlp_reduction": self.mlp_reduction, "pre": self.pre,
                "post": self.post, "kept": (r.get("best_step"), r.get("steps"), r.get("val_ppl_start"),
                                            r.get("val_ppl_best"))}


def iterative_rounds(run: Run, dense: dict, dense_cache: dict, targets: list[float], keep_original_teacher: bool, *,
                     open_round: Callable[[int, float], str], evaluate: Callable[[dict, str, int, str], dict],
                     close_round: Callable[[Round], None] = lambda done: None) -> list[Round]:
    """The iterative flow's loop, which the study also runs: each round prunes the previous round's recovered model
    to its cumulative target, distills it from the teacher cache, and re-caches the recovered model as the next
    round's teacher (unless ``keep_original_teacher``: the dense cache every round). One loop, so the flows that
    run it reach the same stages, by the same keys.

    The caller decides what surrounds the stages: ``open_round(index, target)`` returns the MLflow run the round
    logs to; ``evaluate(manifest, run_id, index, "pre" | "post")`` evaluates the manifest's model and returns
    {set: PPL}; ``close_round(round)`` runs once the round is trained and evaluated, before the next teacher cache.
    """
    current, teacher, rounds = dense, dense_cache, []
    for index, target in enumerate(targets, 1):
        rid = open_round(index, target)
        pruned = run.prune(current, rid, f"R{index}", step=index, target_reduction=target)
        pre = evaluate(pruned, rid, index, "pre")
        trained = run.distill(pruned["model"], teacher, rid, f"R{index}")
        post = evaluate(trained, rid, index, "post")
        done = Round(index, target, current, pruned, trained, teacher, pre, post, rid)
        close_round(done)
        rounds.append(done)
        current = trained["model"]
        if not keep_original_teacher and index < len(targets):
            teacher = run.cache(current, None, f"R{index} post-KD")
    return rounds


# ---------------------------------------------------------------------------------------------------------------- flows


@flow(name="dense-kd")
def dense_kd_flow(config: DenseKDConfig, parent_run_id: SkipJsonSchema[str | None] = None) -> dict:
    with start(config, "dense-kd", parent_run_id) as run:
        arms = _dense_kd_arms(run, config.ce_control)
        text, metrics = _dense_kd_section(config, arms)
        return run.finish([text], metrics)


@flow(name="iterative")
def iterative_flow(config: IterativeConfig, parent_run_id: SkipJsonSchema[str | None] = None) -> dict:
    with start(config, "iterative", parent_run_id) as run:
        names = _set_names(config)
        dense, dense_ppl, dense_cache = _dense_and_cache(run)

        def open_round(index: int, target: float) -> str:
            return run.arm(f"round-{index}", round=index, target=target)

        def evaluate(manifest: dict, rid: str, index: int, when: str) -> dict:
            return run.evaluate(manifest["model"], rid, f"R{index} {when}-KD", prefix=f"{when}_kd_", step=index)

        twins: dict[int, dict] = {}

        def close_round(done: Round) -> None:
            run.register(f"R{done.index}-pruned-kd", done.trained, done.run_id, done.post, parent=done.start,
                         pruned=done.pruned)
            run.tracker.log_metrics(run.parent_id, {**rep.flat("pre_kd_ppl", done.pre),
                                                    **rep.flat("post_kd_ppl", done.post)}, step=done.index)
            run.end(done.run_id)
            if config.ce_control:
                twins[done.index] = _ce_twin(run, done)

        rounds = iterative_rounds(run, dense, dense_cache, config.targets, config.keep_original_teacher,
                                  open_round=open_round, evaluate=evaluate, close_round=close_round)
        summaries = [{**x.summary(), **twins.get(x.index, {})} for x in rounds]
        text, metrics = rep.iterative_section(names, dense_ppl, summaries, config.keep_original_teacher)
        plots = []
        for n in names:
            path = run.report_dir() / f"ppl_vs_reduction_{n}.png"
            rep.plot_ppl_vs_reduction(summaries, n, dense_ppl[n], path)
            plots.append(path)
        sections = [text]
        if config.profile:
            section, profile_plots = _profile_rounds(run, config, dense, rounds, metrics)
            sections.append(section)
            plots += profile_plots
        return run.finish(sections, metrics, plots)


def _ce_twin(run: Run, done: Round) -> dict:
    """A round's CE-only twin (alpha = 0) from the same pruned student, teacher cache (its tokens) and seed as the
    round's KD arm, in its own MLflow run; returns {"ce": {set: PPL}, "kd_vs_ce": {set: paired bootstrap of
    PPL(KD) - PPL(CE-only) over the windows both were scored on}} for the round's summary."""
    label = f"R{done.index} CE-only"
    rid = run.arm(f"round-{done.index}-ce-only", round=done.index, target=done.target, alpha=0.0)
    twin = run.distill(done.pruned["model"], done.teacher, rid, label, alpha=0.0)
    ce = run.evaluate(twin["model"], rid, f"{label} post", prefix="post_ce_", step=done.index)
    run.end(rid)
    kd_windows, ce_windows = run.windows[f"R{done.index} post-KD"], run.windows[f"{label} post"]
    diffs = {name: paired_bootstrap(kd_windows[name][0], ce_windows[name][0], kd_windows[name][1])["diff"]
             for name in ce if name in kd_windows and name in ce_windows}
    run.tracker.log_metrics(run.parent_id, {**rep.flat("post_ce_ppl", ce),
                                            **rep.flat("kd_minus_ce", {n: d.estimate for n, d in diffs.items()})},
                            step=done.index)
    return {"ce": ce, "kd_vs_ce": diffs}


def _profile_rounds(run: Run, config: IterativeConfig, dense: dict, rounds: list[Round],
                    metrics: dict) -> tuple[str, list[Path]]:
    """Dense vs each round's recovered model, side by side: Tables VII-VIII and speedup vs MLP reduction."""
    models = [{**dense, "label": "dense"}] + [{**x.trained["model"], "label": f"R{x.index}"} for x in rounds]
    rid = run.arm("profile")
    m = run.profile(models, rid, "dense vs rounds", config.profile_settings.model_dump())
    run.end(rid)
    text, points, speedups = rep.profile_rounds_section(m["result"]["results"], [x.mlp_reduction for x in rounds],
                                                        (Path(m["path"]) / "profile.md").read_text())
    path = run.report_dir() / "speedup_vs_reduction.png"
    rep.plot_speedup_vs_reduction(points, path)
    metrics.update(speedups)
    return text, [run.report_dir() / "speedup.png", path]


@flow(name="cascade")
def cascade_flow(config: CascadeConfig, parent_run_id: SkipJsonSchema[str | None] = None) -> dict:
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
        metrics.update({**rep.flat("ppl_pruned_pre_kd", pre), **rep.flat("ppl_pruned_kd", pkd)})
        swap = None
        if config.teacher_swap:
            rid = run.arm("pruned+kd (teacher dense)")
            trained = run.distill(p["model"], arms["dense_cache"], rid, "pruned+kd teacher dense")
            swap = run.evaluate(trained["model"], rid, "pruned+kd teacher dense")
            run.register("pruned-kd-teacher-dense", trained, rid, swap, parent=arms["kd"]["model"], pruned=p)
            run.end(rid)
            metrics.update(rep.flat("ppl_pruned_kd_teacher_dense", swap))
        reduction = p["result"].get("mlp_reduction", config.target)
        sections = [text, rep.cascade_section(names, reduction, arms["dense_ppl"], arms["kd_ppl"], pre, pkd, swap)]
        if swap is not None:
            sections.append(rep.teacher_swap_section(names, pre, swap, pkd, arms["dense_ppl"]))
        return run.finish(sections, metrics)


@flow(name="teacher-swap")
def teacher_swap_flow(config: TeacherSwapConfig, parent_run_id: SkipJsonSchema[str | None] = None) -> dict:
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
        text = rep.teacher_swap_section(names, pre, out["teacher dense"], out["teacher dense+kd"], arms["dense_ppl"],
                                        reduction=p["result"].get("mlp_reduction", config.target))
        metrics = {**rep.flat("ppl_dense", arms["dense_ppl"]), **rep.flat("ppl_pruned_pre_kd", pre),
                   **rep.flat("ppl_kd_teacher_dense", out["teacher dense"]),
                   **rep.flat("ppl_kd_teacher_dense_kd", out["teacher dense+kd"])}
        return run.finish([text], metrics)


@flow(name="wanda")
def wanda_flow(config: WandaConfig, parent_run_id: SkipJsonSchema[str | None] = None) -> dict:
    with start(config, "wanda", parent_run_id) as run:
        dense, dense_ppl, dense_cache = _dense_and_cache(run)
        arms = []
        for s in config.sparsities:
            rid = run.arm(f"wanda-{s}", sparsity=s)
            p = run.prune(dense, rid, f"wanda {s}", method="wanda", target_reduction=s)
            pre = run.evaluate(p["model"], rid, f"wanda {s} pre-KD", prefix="pre_kd_")
            trained = run.distill(p["model"], dense_cache, rid, f"wanda {s}")
            post = run.evaluate(trained["model"], rid, f"wanda {s} post-KD", prefix="post_kd_")
            run.register(f"wanda-{s}-kd", trained, rid, post, parent=dense, pruned=p)
            run.end(rid)
            # The sparsity of the models that were evaluated, counted on them (not the pruning target).
            arms.append({"sparsity": s, "pre": pre, "post": post,
                         "zeros_pre": run.counts[f"wanda {s} pre-KD"].get("mlp_zero_fraction"),
                         "zeros_post": run.counts[f"wanda {s} post-KD"].get("mlp_zero_fraction")})
        text, metrics = rep.wanda_section(_set_names(config), dense_ppl, arms)
        return run.finish([text], metrics)


@flow(name="selfdata")
def selfdata_flow(config: SelfDataFlowConfig, parent_run_id: SkipJsonSchema[str | None] = None) -> dict:
    """Dense → depth-prune (and optionally SVD) → three recoveries on the same prompts, steps and seed: SFT on the
    original responses, SFT on the dense model's rewrites (self-data distillation), logit KD from the dense model."""
    with start(config, "selfdata", parent_run_id) as run:
        dense = dense_ref(config.model)
        rid = run.arm("dense")
        dense_ppl = run.evaluate(dense, rid, "dense")
        run.end(rid)

        rid = run.arm("pruned", drop_blocks=config.drop_blocks)
        pruned = run.prune(dense, rid, f"depth {config.drop_blocks}", method="depth",
                           drop_blocks=config.drop_blocks)
        if config.svd_target is not None:
            pruned = run.prune(pruned["model"], rid, f"svd {config.svd_target}", method="svd",
                               target_reduction=config.svd_target)
        pre = run.evaluate(pruned["model"], rid, "pruned")
        run.end(rid)

        prompts = run.record(instructions(config.instructions, config.num_samples, run.workdir), "instructions")
        rewrites = run.record(self_data(dense, prompts, config.selfdata.model_dump(), run_id=None, **run.common()),
                              "selfdata")
        sft_fields = config.sft_fields()
        arms = {}
        for arm, data in (("sft original", prompts), ("sft self-data", rewrites)):
            rid = run.arm(arm)
            m = run.record(sft(pruned["model"], data, sft_fields, config.seed, run_id=rid, **run.common()), arm)
            run.curves[arm] = [(int(p[0]), float(p[1])) for p in m["result"].get("val_history", [])]
            arms[arm] = run.evaluate(m["model"], rid, arm)
            run.register(arm, m, rid, arms[arm], parent=pruned["model"], pruned=pruned)
            run.end(rid)
        rid = run.arm("logit kd")
        cache_fields = {**config.corpus.cache_fields(), "data": prompts["data_path"], "num_samples": None}
        cache = run.record(cache_teacher(dense, cache_fields, **run.common()), "cache dense (same prompts)")
        trained = run.distill(pruned["model"], cache, rid, "logit kd")
        arms["logit kd"] = run.evaluate(trained["model"], rid, "logit kd")
        run.register("logit kd", trained, rid, arms["logit kd"], parent=pruned["model"], pruned=pruned)
        run.end(rid)

        text, metrics = rep.selfdata_section(
            _set_names(config), rep.depth_label(config.drop_blocks, config.svd_target), dense_ppl, pre, arms,
            config.num_samples, config.instructions, config.distill.max_steps or "all", config.seed,
            rewrites["result"])
        return run.finish([text], metrics)


@flow(name="profile")
def profile_flow(config: ProfileFlowConfig, parent_run_id: SkipJsonSchema[str | None] = None) -> dict:
    """Several models profiled side by side (the baseline first): Tables VII-VIII and the speedup plot."""
    with start(config, "profile", parent_run_id, check_data=False) as run:
        models = [{**dense_ref(spec), "label": spec} for spec in [config.model, *config.compare]]
        rid = run.arm("profile")
        m = run.profile(models, rid, "models", config.profile.model_dump())
        run.end(rid)
        header, text, metrics = rep.profile_report(config.model, config.compare, m["result"]["results"],
                                                   (Path(m["path"]) / "profile.md").read_text())
        return run.finish([text], metrics, [run.report_dir() / "speedup.png"], header=header)


# Every flow's `parent_run_id` (the MLflow run a flow nests under when multi-seed or paper runs it) is set by the
# calling flow, never by a user: SkipJsonSchema keeps it out of the deployment's Run form.
FLOWS = {"dense-kd": dense_kd_flow, "iterative": iterative_flow, "cascade": cascade_flow,
         "teacher-swap": teacher_swap_flow, "wanda": wanda_flow, "selfdata": selfdata_flow}


@flow(name="multi-seed")
def multi_seed_flow(config: MultiSeedConfig) -> dict:
    """The inner flow once per seed, then mean ± std of every metric. ``fan_out: subflows`` runs the seeds one
    after another inside this run; ``fan_out: deployments`` submits one run of the inner flow's deployment per
    seed to the work pool (so several GPU workers share them), waits, and reads their metrics from MLflow."""
    cls = FLOW_CONFIGS[config.flow]
    base = cls(**{**config.inner_values(), "seed": config.seeds[0]})
    on_pool = config.fan_out == "deployments"
    if on_pool:
        _check_deployment(config.deployment())
    with start(base, "multi-seed") as run:
        # Nested runs must live in the parent's experiment to show under it in MLflow.
        inner = {seed: cls(**{**config.inner_values(), "seed": seed, "experiment": run.tracking["experiment"]})
                 for seed in config.seeds}
        if on_pool:
            per_seed = _seeds_on_pool(run, config, inner)
        else:
            per_seed = {seed: FLOWS[config.flow](inner[seed], parent_run_id=run.parent_id) for seed in config.seeds}
        for seed in config.seeds:
            run.stages += [{**s, "label": f"seed {seed}: {s['label']}"} for s in per_seed[seed].get("stages", [])]
        text, metrics = rep.multi_seed_section(config.flow, config.seeds, per_seed, on_pool)
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

    name = config.deployment()
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
    Every sub-flow's config was validated with the paper config (``paper_parts``), before any of them runs.
    The summary's ``parts`` holds each part's report path (what the study publishes beside its own)."""
    with start(config, "paper") as run:
        configs = paper_parts(config, experiment=run.tracking["experiment"])
        parts = {name: FLOWS[name](cfg, parent_run_id=run.parent_id) for name, cfg in configs.items()}
        metrics, sections = {}, []
        for name, res in parts.items():
            metrics.update({f"{name}.{k}": v for k, v in res["metrics"].items()})
            sections.append(rep.paper_section(name, Path(res["report"]).read_text(), res["report"]))
            run.stages += [{**s, "label": f"{name}: {s['label']}"} for s in res["stages"]]
        return {**run.finish(sections, metrics), "parts": {name: res["report"] for name, res in parts.items()}}


ALL_FLOWS = {**FLOWS, "multi-seed": multi_seed_flow, "paper": paper_flow, "profile": profile_flow}
