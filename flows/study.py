"""The study: the `paper` flow at one committed config, the arms it lacks, and a report that judges itself.

    python -m flows.study --config flows/configs_yaml/study-smollm2.yaml --out docs/results/study-smollm2

1. The paper flow runs (dense-kd with its CE-only twin, iterative with the re-cached teacher and the profile,
   cascade, teacher swap, WANDA), exactly as `sparsekd run paper` would.
2. The study adds what the paper flow lacks: Dense+KD with each other KD tail; CE-only twins of pruned students
   (the first round's and the one-shot teacher-swap student's); the teacher swap at the last iterative round (its
   student distilled from the dense cache instead of the previous round's); more seeds of the first round's
   Pruned+KD; the standard-protocol perplexity of the dense model. Every model the paper flow made is reached
   again through the same stage keys, so nothing is computed twice: a stage that ran is read from its manifest.
   The iterative rounds are the iterative flow's own loop (``experiments.iterative_rounds``), so the keys match by
   construction.
3. ``sparsekd_core.report.verdicts`` judges the paper's §IX-B criteria and "KD beats CE-only" from the numbers, at
   the thresholds of the study config (``verdict_much_lower``, ``verdict_comparable``), and the report states each
   as holds / does not hold with the numbers that decide it (``sparsekd_core.report.study_report``).
4. ``publish`` copies this run's reports, plots and ``study.json`` to ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

from prefect import flow
from pydantic.json_schema import SkipJsonSchema

from sparsekd_core import report as rep
from sparsekd_core.relations import relations_of
from sparsekd_core.report import metric_key, verdict_lines, verdicts
from tasks.stages import dense_ref, eval_results, evaluate
from tasks.tracking import code_version

from .configs import StudyConfig, paper_part
from .experiments import Round, iterative_rounds, paper_flow, start

__all__ = ["StudyConfig", "metric_key", "publish", "study_flow", "verdict_lines", "verdicts"]


@flow(name="study")
def study_flow(config: StudyConfig, out: str = "", command: SkipJsonSchema[str | None] = None) -> dict:
    """The paper flow, the extra arms, and the self-judging report (copied with its plots to ``out``).

    Args:
        config: The study's settings.
        out: Also publish the report, its plots and a README to this directory on the worker (e.g.
            docs/results/study-smollm2); empty: the report stays in the storage root and MLflow only.
        command: How the study was started, quoted in the report (set by `python -m flows.study`).
    """
    t0 = time.time()
    paper = paper_flow(paper_part(config))
    t_paper = time.time() - t0
    names = [es.name for es in config.eval_sets if es.kind == "perplexity"]
    with start(config, "study", check_data=True) as run:
        ppl: dict[str, dict[str, float]] = {}
        models: dict[str, str] = {}
        kept: dict[str, tuple] = {}
        rid = run.arm("study")  # every stage below is reached through its key; the paper flow's ones are reused

        def ev(label: str, manifest_or_ref: dict) -> dict:
            ref = manifest_or_ref.get("model", manifest_or_ref)
            result = manifest_or_ref.get("result", {})
            if "best_step" in result:  # a trained arm: the checkpoint kept is the best on validation
                kept[label] = (result["best_step"], result.get("steps"), result.get("val_ppl_start"),
                               result.get("val_ppl_best"))
            ppl[label] = run.evaluate(ref, rid, label)
            models[label] = ref["spec"]
            return ppl[label]

        dense = dense_ref(config.model)
        ev("dense", dense)
        dense_cache = run.cache(dense, None, "dense")
        kd = run.distill(dense, dense_cache, rid, "dense+kd")
        ev("dense+kd", kd)
        ev("ce-only", run.distill(dense, dense_cache, rid, "ce-only", alpha=0.0))
        for tail in config.tails:
            if tail != config.distill.tail:
                ev(f"dense+kd tail={tail}", run.distill(dense, dense_cache, rid, f"dense+kd tail={tail}", tail=tail))
        # The iterative flow's rounds, through its own loop (the same stages, so the same keys): each round's teacher
        # is the previous round's recovered model.
        rounds: list[Round] = iterative_rounds(
            run, dense, dense_cache, config.targets, config.keep_original_teacher,
            open_round=lambda index, target: rid,
            evaluate=lambda manifest, run_id, index, when: ev(f"R{index} {when}", manifest))
        first, last = rounds[0], rounds[-1]
        if config.pruned_ce_control:
            ev("R1 ce-only", run.distill(first.pruned["model"], dense_cache, rid, "R1 ce-only", alpha=0.0))
        if config.last_round_swap and len(rounds) > 1 and not config.keep_original_teacher:
            ev(f"R{last.index} post, dense teacher",
               run.distill(last.pruned["model"], dense_cache, rid, f"R{last.index} dense teacher"))
        # The one-shot student of the teacher-swap part (pruned straight from dense) and its CE-only twin.
        oneshot = run.prune(dense, rid, "one-shot", target_reduction=config.swap_target)
        ev("oneshot pre", oneshot)
        ev("oneshot kd", run.distill(oneshot["model"], dense_cache, rid, "one-shot kd"))
        if config.pruned_ce_control:
            ev("oneshot ce-only", run.distill(oneshot["model"], dense_cache, rid, "one-shot ce-only", alpha=0.0))
        # More seeds of R1 Pruned+KD.
        seed_rows = {config.seed: ppl["R1 post"]}
        for s in config.seeds:
            other = dataclasses.replace(run, cfg=config.model_copy(update={"seed": s}))
            seed_rows[s] = ev(f"R1 post seed={s}", other.distill(first.pruned["model"], dense_cache, rid,
                                                                 f"R1 seed={s}"))
        for lr in config.lr_probe:
            ev(f"R1 post lr={lr:g}", run.distill(first.pruned["model"], dense_cache, rid, f"R1 lr={lr:g}", lr=lr))
        standard = None
        if config.standard_protocol_set:
            es = next(e for e in config.eval_sets if e.name == config.standard_protocol_set)
            m = evaluate(dense, [es.model_dump()], {**config.eval.model_dump(), "protocol": "standard"},
                         run_id=rid, metric_prefix="standard_", **run.common())
            run.record(m, "eval dense (standard protocol)")
            standard = eval_results(m)[es.name]["ppl"]
        run.end(rid)

        judged = {"seeds": {n: [v[n] for v in seed_rows.values()] for n in names},
                  "relations": relations_of(config.corpus.data, config.eval_sets),
                  "wanda": wanda_rows(paper["metrics"], names)}
        found = judge(config, ppl, judged)
        text = rep.study_report(config, ppl, found, [x.summary() for x in rounds], seed_rows, standard,
                                paper["metrics"], [*paper["stages"], *run.stages], kept, code_version(), t_paper,
                                time.time() - t0 - t_paper,
                                command or "python -m flows.study --config CONFIG --out DIR")
        metrics = {metric_key(row, n): v for row, sets in ppl.items() for n, v in sets.items()}
        metrics.update({f"verdict.{i}": float(bool(v["holds"])) for i, v in enumerate(found)})
        result = run.finish([text], metrics, header=rep.study_header(config.model))
    result.update(verdicts=found, models=models, ppl=ppl, judged=judged, paper_report=paper["report"])
    if out:
        publish(result, paper, Path(out))
    return result


def wanda_rows(metrics: dict[str, float], names: list[str]) -> dict[float, dict[str, dict[str, float]]]:
    """{sparsity: {"pre": {set: PPL}, "post": {set: PPL}}} from the paper flow's WANDA metrics
    (``wanda.wanda<s>_<pre|post>_kd_<set>``); empty when the paper flow ran no WANDA part."""
    rows: dict[float, dict[str, dict[str, float]]] = {}
    for key, value in metrics.items():
        for name in names:
            m = re.fullmatch(rf"wanda\.wanda([0-9.]+)_(pre|post)_kd_{re.escape(name)}", key)
            if m:
                rows.setdefault(float(m[1]), {"pre": {}, "post": {}})[m[2]][name] = value
    return {s: r for s, r in rows.items() if set(r["pre"]) == set(r["post"]) == set(names)}


def judge(config: StudyConfig, ppl: dict[str, dict[str, float]], judged: dict) -> list[dict]:
    """The verdicts at the config's thresholds from the study's perplexities and ``judged`` (the R1 seeds, the eval
    sets' relations to the corpus, the WANDA rows): what a run and ``--rejudge`` both compute."""
    names = [es.name for es in config.eval_sets if es.kind == "perplexity"]
    wanda = {float(s): r for s, r in (judged.get("wanda") or {}).items()}  # JSON keys are strings
    return verdicts(ppl, names[0], names[1:], judged.get("seeds"), much_lower=config.verdict_much_lower,
                    comparable=config.verdict_comparable, relations=judged.get("relations"), wanda=wanda)


def rejudge(config: StudyConfig, out: Path, command: str) -> list[dict]:
    """Judge a published study again with this code's verdicts, from its ``study.json`` (no stage runs): the
    verdicts section and the eval-sets line of ``report.md`` and the verdicts in ``study.json`` are replaced, and
    the report says so. A study.json written before the judged inputs were kept gets the R1 seeds from its rows,
    the relations from the config, and no WANDA rows (those criteria say "not measured")."""
    summary = json.loads((out / "study.json").read_text())
    ppl = summary["ppl"]
    names = [es.name for es in config.eval_sets if es.kind == "perplexity"]
    judged = summary.get("judged") or {
        "seeds": {n: [ppl["R1 post"][n], *(ppl[k][n] for k in sorted(ppl) if k.startswith("R1 post seed="))]
                  for n in names} if "R1 post" in ppl else None,
        "relations": relations_of(config.corpus.data, config.eval_sets),
        "wanda": None}  # not kept: unknown, unlike {} (the paper flow ran no WANDA part)
    found = judge(config, ppl, judged)
    if judged.get("wanda") is None:
        found += [{"criterion": f"WANDA: {c}", "holds": None, "evidence": "the WANDA perplexities are not in this "
                   "study.json (written before they were kept); a rerun of the study judges them"}
                  for c in ("post-KD ≪ post-prune", "low-sparsity post-KD comparable to or better than dense")]
    note = (f"`{command}` at {code_version()}, from study.json (no stage reran): the verdicts above and the eval "
            "sets' relations are this code's; the numbers are the run's.")
    report = out / "report.md"
    report.write_text(rep.rejudged_report(report.read_text(), rep.eval_sets_line(config), found, note))
    summary.update(verdicts=found, judged=judged)
    (out / "study.json").write_text(json.dumps(summary, indent=1, sort_keys=True, default=str))
    return found


def publish(result: dict, paper: dict, out: Path) -> None:
    """Copy this run's outputs to ``out``: the study report, the paper flow's report, the plots beside them, the
    iterative part's plots (prefixed ``iterative-``) and profile table, and ``study.json``. Only the report
    directories of this run (``paper["parts"]``) are read, never another run's reports in the same workdir."""
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(result["report"], out / "report.md")
    shutil.copy(paper["report"], out / "paper-report.md")
    for report in (result["report"], paper["report"]):
        for png in Path(report).parent.glob("*.png"):
            shutil.copy(png, out / png.name)
    iterative = Path(paper["parts"]["iterative"]).parent  # the rounds' plots and the profile
    for png in iterative.glob("*.png"):
        shutil.copy(png, out / f"iterative-{png.name}")
    if (iterative / "profile.md").is_file():
        shutil.copy(iterative / "profile.md", out / "profile.md")
    summary = {k: result[k] for k in ("verdicts", "models", "metrics", "ppl", "judged")}
    (out / "study.json").write_text(json.dumps(summary, indent=1, sort_keys=True, default=str))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.study", description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="the study's YAML config")
    parser.add_argument("--out", default="", help="copy the report, plots and study.json here (e.g. "
                                                  "docs/results/study-smollm2)")
    parser.add_argument("--rejudge", action="store_true", help="judge the study published in --out again with "
                                                                   "this code's verdicts (reads its study.json; no "
                                                                   "stage runs)")
    args = parser.parse_args(argv)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    import yaml

    config = StudyConfig(**yaml.safe_load(Path(args.config).read_text()))
    command = "python -m flows.study " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.rejudge:
        if not args.out or not (Path(args.out) / "study.json").is_file():
            parser.error("--rejudge needs --out DIR holding a published study.json")
        print(verdict_lines(rejudge(config, Path(args.out), command)))
        return 0
    result = study_flow(config, out=args.out, command=command)
    print(verdict_lines(result["verdicts"]))
    print(f"report: {result['report']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
