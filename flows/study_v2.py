"""The second study: does self-referential KD beat fine-tuning on the same data? Matched arms, paired intervals.

    python -m flows.study_v2 --config flows/configs_yaml/study-v2-smollm2.yaml --out docs/results/study-v2/smollm2

1. The dense model is evaluated and cached on a KD corpus that excludes WikiText (``mix:no-wikitext-offline``), so
   WikiText-2 is *out of corpus* and held-out C4, code and GSM8K are *held-out documents* of corpus sources (the
   config labels each eval set: ``relations``).
2. ``dense`` / ``r1``: the dense student and the first-round pruned student (``r1_target``), each trained on the
   same corpus, with KD at every ``alphas`` and the CE-only twin (α = 0), at every seed of ``seeds``: matched arms.
3. ``tails``: the bucket tail and the sampled-cache tail (``sampled_classes`` classes a position) at each seed of
   ``tail_seeds`` (default: the first seed; ``tail_kinds`` picks the tails), each against the CE-only twin of its seed.
4. ``budget``: R1 with KD (``alphas[0]``) and CE-only at each ``budgets`` token count (distinct tokens of the same
   corpus, first seed).
5. Every model is evaluated on every set with its per-window NLL and, with ``kl``, KL(dense ‖ model) on the same
   windows; ``sparsekd_core.study_report`` turns them into paired KD-vs-CE and KD-vs-start verdicts with 95%
   bootstrap intervals, the budget table and plot. In MLflow each arm is a nested run named by its label.

Parts can run in separate invocations (``parts``): the arms published in ``--out`` are joined with this
invocation's when they were made with the same setup (model, corpus, protocol, eval sets, training settings) and
stage code, and an arm published there is not made again (so a stopped study resumes on another machine from its
study.json alone; the teacher cache is written only when an arm still has to train). Every stage is also reused
from the storage root by its key.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Callable

from prefect import flow
from pydantic.json_schema import SkipJsonSchema

from sparsekd_core import study_report as sr
from sparsekd_core.config import MODEL_ALIASES
from sparsekd_core.identity import code_digest
from tasks.stages import dense_ref, eval_results, evaluate
from tasks.tracking import code_version

from .configs import StudyV2Config, StudyV2Index
from .context import Run, start

SETUP_FIELDS = {"model", "dtype", "corpus", "distill", "eval", "eval_sets", "prune", "r1_target", "train_tokens",
                "sampled_classes", "kl"}


def setup_digest(config: StudyV2Config) -> str:
    """What makes arms of two invocations comparable (parts, seeds, alphas and budgets may differ)."""
    return hashlib.sha256(config.model_dump_json(include=SETUP_FIELDS).encode()).hexdigest()[:16]


def stage_code() -> dict[str, str]:
    """The code digests of the stages an arm runs (the same digests the stage keys hold): arms made by other code
    are not joined."""
    return {stage: code_digest(stage) for stage in ("cache", "distill", "eval", "prune")}


def previous(config: StudyV2Config, out: Path) -> tuple[dict, list[dict]]:
    """Arms and stage records published in ``out`` by an earlier invocation of the same setup and stage code (a file
    without code digests, written before they were recorded, is joined on the setup alone)."""
    path = out / "study.json"
    if not out.name or not path.is_file():
        return {}, []
    saved = json.loads(path.read_text(encoding="utf-8"))
    if saved.get("setup") != setup_digest(config) or saved.get("code", stage_code()) != stage_code():
        return {}, []
    return saved.get("arms", {}), [{**st, "earlier": True} for st in saved.get("stages", [])]


def save_arms(out: Path, setup: str, arms: dict, stages: list[dict], metrics: dict | None = None) -> None:
    """study.json: every arm with its windows, the stage records and code digests (what the next invocation
    joins), written atomically after every arm, so a stopped invocation loses at most the arm it was on."""
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "study.json.tmp"
    stages = [{k: v for k, v in st.items() if k != "earlier"} for st in stages]  # previous() tags them on load
    tmp.write_text(json.dumps({"setup": setup, "code": stage_code(), "metrics": metrics or {}, "arms": arms,
                               "stages": stages}, default=str, ensure_ascii=False), encoding="utf-8")
    tmp.replace(out / "study.json")


def arm_order(item: tuple[str, dict]) -> tuple:
    """Table order: dense then R1; base, CE-only, KD by α, the tails; by seed; the budget arms last."""
    _, arm = item
    kind = ["base", "ce", "kd", "bucket", "sampled"].index(arm["kind"])
    return (arm["student"] != "dense", arm.get("tokens") or 0, kind, arm.get("alpha") or 0, arm.get("seed") or 0)


@flow(name="study-v2")
def study_v2_flow(config: StudyV2Config, out: str = "", command: SkipJsonSchema[str | None] = None) -> dict:
    """The matched arms of ``config.parts``, evaluated with per-window NLL and KL; the report (with the arms already
    published in ``out``) and, with ``out``, the report, plots and study.json copied there.

    Args:
        config: The study's settings.
        out: Publish the report, its plots and study.json (every arm with its windows) to this directory on the
            worker, and join the arms an earlier invocation of the same setup published there (e.g.
            docs/results/study-v2/smollm2); empty: the report stays in the storage root and MLflow only.
        command: How the study was started, quoted in the report (set by `python -m flows.study_v2`).
    """
    out = str(out).strip()
    t0 = time.time()
    arms, earlier_stages = previous(config, Path(out)) if out else ({}, [])
    published = set(arms)  # made by an earlier invocation with this setup and stage code: not made again
    sets = [es.name for es in config.eval_sets if es.kind == "perplexity"]
    with start(config, "study-v2", check_data=True) as run:
        dense = dense_ref(config.model)

        def all_stages() -> list[dict]:
            """This invocation's stages, then those of earlier invocations (published with their arms) not reached
            again: each distinct stage once."""
            seen = {st["key"] for st in run.stages}
            return run.stages + [st for st in earlier_stages if st["key"] not in seen]

        def arm_run(label: str, student: str, kind: str, **tags) -> str:
            """The arm's own nested MLflow run (named by its label): its training figures, validation curve and eval
            metrics are logged there, not mixed with the other arms' under one key."""
            return run.arm(label, student=student, kind=kind, **{k: v for k, v in tags.items() if v is not None})

        def ev(label: str, ref: dict, student: str, kind: str, arm_id: str, **fields) -> None:
            """Evaluate an arm not yet published, logging to its run (``arm_run``; the caller ends it)."""
            teacher = dense if config.kl and ref["fingerprint"] != dense["fingerprint"] else None
            m = evaluate(ref, [es.model_dump() for es in config.eval_sets], config.eval_config().model_dump(),
                         run_id=arm_id, teacher=teacher, **run.common())
            run.record(m, f"eval {label}")
            results = {n: r for n, r in eval_results(m).items() if r.get("kind") == "perplexity"}
            arms[label] = {"student": student, "kind": kind, "sets": results, **fields}
            if out:
                save_arms(Path(out), setup_digest(config), arms, all_stages())

        if "dense" not in published:
            dense_id = arm_run("dense", "dense", "base")
            ev("dense", dense, "dense", "base", dense_id)
            run.end(dense_id)
        caches: dict[str, dict] = {}

        def lazy_cache(on: Run, label: str) -> Callable[[], dict]:
            """A teacher cache, written (or read from its stage) when the first arm that needs it trains."""
            def get() -> dict:
                if label not in caches:
                    caches[label] = on.cache(dense, None, label)
                return caches[label]
            return get

        dense_cache = lazy_cache(run, "dense")

        def train(start_ref: dict, student: str, kind: str, seed: int, alpha: float, tokens: int | None = None,
                  tail: str | None = None, teacher_cache: Callable[[], dict] = dense_cache, on: Run = run) -> None:
            tokens = tokens or config.train_tokens
            label = sr.arm_label(student, kind, alpha if kind == "kd" else None, seed,
                                 tokens if tokens != config.train_tokens else None)
            if label in published:
                return
            overrides = {"alpha": alpha, "max_steps": config.steps(tokens)}
            if tail:
                overrides["tail"] = tail
            seeded = dataclasses.replace(on, cfg=on.cfg.model_copy(update={"seed": seed}))
            arm_id = arm_run(label, student, kind, alpha=alpha, seed=seed, tokens=tokens, tail=tail)
            m = seeded.distill(start_ref, teacher_cache(), arm_id, label, **overrides)
            result = m["result"]
            kept = {k: result.get(k) for k in ("best_step", "steps", "val_ppl_start", "val_ppl_best", "val_history")}
            start_label = "dense" if student == "dense" else sr.arm_label(student, "base")
            if result.get("best_step") == 0 and start_label in arms:
                # The kept model is the start model (no validation beat step 0): the same weights, so the start
                # arm's windows are this arm's, not an eval of a copy (minutes per arm, Gemma's dense arms).
                sets = json.loads(json.dumps(arms[start_label]["sets"]))
                if student == "dense":  # the kept model is the teacher itself
                    for r in sets.values():
                        r["kl"] = 0.0
                arms[label] = {"student": student, "kind": kind, "sets": sets, "eval_of": start_label, "alpha": alpha,
                               "seed": seed, "tokens": tokens, "kept": kept}
                # Its run shows the same figures as any arm's, and says whose windows they are.
                run.tracker.set_tags(arm_id, {"eval_of": start_label})
                run.tracker.log_metrics(arm_id, {f"{key}_{name}": r[key] for name, r in sets.items()
                                                 for key in ("ppl", "kl") if key in r})
                run.end(arm_id)
                if out:
                    save_arms(Path(out), setup_digest(config), arms, all_stages())
                return
            ev(label, m["model"], student, kind, arm_id, alpha=alpha, seed=seed, tokens=tokens, kept=kept)
            run.end(arm_id)

        students = {"dense": dense}
        if {"r1", "tails", "budget"} & set(config.parts):
            base_label = sr.arm_label("R1", "base")
            base_id = arm_run(base_label, "R1", "base") if base_label not in published else None
            pruned = run.prune(dense, base_id, "R1", target_reduction=config.r1_target)
            students["R1"] = pruned["model"]
            if base_id:
                ev(base_label, pruned["model"], "R1", "base", base_id,
                   mlp_reduction=pruned["result"].get("mlp_reduction"))
                run.end(base_id)
        for part, student in (("dense", "dense"), ("r1", "R1")):
            if part not in config.parts:
                continue
            for seed in config.seeds:  # seed-major: a stopped run has whole matched sets of the first seeds
                train(students[student], student, "ce", seed, 0.0)
                for alpha in config.alphas:
                    train(students[student], student, "kd", seed, alpha)
        if "tails" in config.parts:
            sampled_cfg = config.model_copy(update={"corpus": config.corpus.model_copy(update={
                "teacher_sample": config.sampled_classes, "sample_temperature": config.distill.temperature})})
            sampled_run = dataclasses.replace(run, cfg=sampled_cfg)
            sampled_cache = lazy_cache(sampled_run, "dense, sampled classes")
            for seed in config.tail_seeds or config.seeds[:1]:  # seed-major, as the matched arms
                for student in ("dense", "R1"):
                    if "bucket" in config.tail_kinds:
                        train(students[student], student, "bucket", seed, config.alphas[0], tail="bucket")
                    if "sampled" in config.tail_kinds:
                        train(students[student], student, "sampled", seed, config.alphas[0], tail="sampled",
                              teacher_cache=sampled_cache, on=sampled_run)
        if "budget" in config.parts:
            for tokens in config.budgets:
                train(students["R1"], "R1", "ce", config.seeds[0], 0.0, tokens)
                train(students["R1"], "R1", "kd", config.seeds[0], config.alphas[0], tokens)

        arms = dict(sorted(arms.items(), key=arm_order))
        stages = all_stages()
        sections, metrics, plots = sr.report_sections(
            config.model, MODEL_ALIASES.get(config.model), config.model_dump(), config.relation_of(), arms, sets,
            run.disjoint, run.report_dir(), stages, config.parts, time.time() - t0,
            command or "python -m flows.study_v2 --config CONFIG --out DIR", code_version())
        result = run.finish(sections, metrics, plots, header=sr.header(config.model))
    result.update(arms=arms, setup=setup_digest(config), all_stages=stages)
    if out:
        publish(result, Path(out))
    return result


def publish(result: dict, out: Path) -> None:
    """The report, its plots and study.json (every arm with its windows: what the next invocation joins)."""
    report = Path(result["report"])
    shutil.copy(report, out / "report.md")
    plots = {png.name: png for png in report.parent.glob("*.png")}
    for stale in out.glob("*.png"):  # a plot an earlier report had and this one has not (e.g. budget.png)
        if stale.name not in plots:
            stale.unlink()
    for name, png in plots.items():
        shutil.copy(png, out / name)
    save_arms(out, result["setup"], result["arms"], result["all_stages"], result["metrics"])


def combine(index: StudyV2Index, out: Path, command: str) -> Path:
    """``out/report.md``: the second study over every family of ``index``, from the arms each published in
    ``out/<dir>/study.json`` (made with the setup of its config: refused otherwise; a family with none yet is
    listed with the command that runs it). No stage runs."""
    import yaml

    families = []
    for fam in index.families:
        config = StudyV2Config(**yaml.safe_load(Path(fam.config).read_text()))
        published = out / fam.dir / "study.json"
        run = f"python -m flows.study_v2 --config {fam.config} --out {out / fam.dir}"
        saved = json.loads(published.read_text(encoding="utf-8")) if published.is_file() else {"setup": setup_digest(config),
                                                                                 "arms": None}
        if saved.get("setup") != setup_digest(config):
            raise ValueError(f"{published} was made with another setup than {fam.config} (model, corpus, eval or "
                             "training settings changed): rerun that family's study")
        families.append({"dir": fam.dir, "model": config.model, "what": MODEL_ALIASES.get(config.model),
                         "config": config.model_dump(), "relations": config.relation_of(),
                         "sets": [es.name for es in config.eval_sets if es.kind == "perplexity"],
                         "arms": saved["arms"], "budget_plot": (out / fam.dir / "budget.png").is_file(),
                         "command": run})
    report = out / "report.md"
    report.write_text(sr.combined_report(families, command, code_version()))
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.study_v2", description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="the study's YAML config")
    parser.add_argument("--out", default="", help="publish the report, plots and study.json here, and join the arms "
                                                  "published there before (e.g. docs/results/study-v2/smollm2)")
    parser.add_argument("--parts", default="", help="comma-separated parts to run now (dense,r1,tails,budget); "
                                                    "default: the config's")
    parser.add_argument("--combine", action="store_true", help="--config is a study-v2 index (the families): write "
                                                                   "--out/report.md from each family's published "
                                                                   "arms in --out/<dir>; no stage runs")
    args = parser.parse_args(argv)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    import yaml

    values = yaml.safe_load(Path(args.config).read_text())
    if args.combine:
        if not args.out:
            parser.error("--combine needs --out (the directory that holds the families' published arms)")
        command = "python -m flows.study_v2 " + " ".join(argv if argv is not None else sys.argv[1:])
        print(f"report: {combine(StudyV2Index(**values), Path(args.out), command)}")
        return 0
    if args.parts:
        values["parts"] = [p.strip() for p in args.parts.split(",") if p.strip()]
    config = StudyV2Config(**values)
    command = "python -m flows.study_v2 " + " ".join(argv if argv is not None else sys.argv[1:])
    result = study_v2_flow(config, out=args.out, command=command)
    print(f"report: {result['report']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
