"""The study: the `paper` flow at one committed config, the arms it lacks, and a report that judges itself.

    python -m flows.study --config flows/configs_yaml/study-smollm2.yaml --out docs/results/study-smollm2

1. The paper flow runs (dense-kd with its CE-only twin, iterative with the re-cached teacher and the profile,
   cascade, teacher swap, WANDA), exactly as `sparsekd run paper` would.
2. The study adds what the paper flow lacks: Dense+KD with each other KD tail; CE-only twins of pruned students
   (the first round's and the one-shot teacher-swap student's); the teacher swap at the last iterative round (its
   student distilled from the dense cache instead of the previous round's); more seeds of the first round's
   Pruned+KD; the standard-protocol perplexity of the dense model. Every model the paper flow made is reached
   again through the same stage keys, so nothing is computed twice: a stage that ran is read from its manifest.
3. `verdicts` judges the paper's §IX-B criteria and "KD beats CE-only" from the numbers, and the report states
   each as holds / does not hold with the numbers that decide it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from prefect import flow

from sparsekd_core import report as rep
from tasks.stages import dense_ref, eval_results, evaluate

from .configs import StudyConfig, paper_part
from .experiments import Run, paper_flow, start

# How much lower post-KD perplexity must be than pre-KD to count as "≪" (the paper's §IX-B wording), and how close
# a pruned model's post-KD perplexity must be to the dense model's to count as "comparable".
MUCH_LOWER = 0.8
COMPARABLE = 1.05


def metric_key(row: str, eval_set: str) -> str:
    """The study's metric name for a model row and an eval set (MLflow allows only some characters)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{row}.{eval_set}")


def _git_version() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
                             cwd=Path(__file__).parent).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=Path(__file__).parent).stdout  # not stripped: "XY path" columns
        changed = [line[3:] for line in dirty.splitlines() if line.strip()]
        return rev + (f" with these files changed from it: {', '.join(changed)}" if changed else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"


# ------------------------------------------------------------------------------------------------------- verdicts


def _fmt(x: float) -> str:
    return f"{x:.2f}"


def verdicts(ppl: dict[str, dict[str, float]], in_domain: str, out_of_domain: list[str],
             seeds: dict[str, list[float]] | None = None) -> list[dict]:
    """The paper's §IX-B criteria and "KD beats CE-only", judged from perplexities.

    ``ppl``: {row: {eval set: PPL}} with rows ``dense``, ``dense+kd``, ``ce-only``, ``R<i> pre``/``R<i> post``
    (rounds in order), optionally ``R1 ce-only``, ``oneshot kd`` and ``oneshot ce-only``. Returns one
    {criterion, holds, evidence} per criterion; ``holds`` is True, False, or None where the rows are missing."""
    sets = [in_domain, *out_of_domain]
    rounds = sorted({int(k[1:].split()[0]) for k in ppl if k.startswith("R") and k.endswith(" post")})
    out = []

    def add(criterion: str, holds: bool | None, evidence: str) -> None:
        out.append({"criterion": criterion, "holds": holds, "evidence": evidence})

    pairs = [(ppl[f"R{r} pre"][in_domain], ppl[f"R{r} post"][in_domain]) for r in rounds]
    add(f"post-KD ≪ post-prune (every round's post-KD {in_domain} PPL at most {MUCH_LOWER:.0%} of its pre-KD PPL)",
        all(post <= MUCH_LOWER * pre for pre, post in pairs) if pairs else None,
        "; ".join(f"R{r}: {_fmt(pre)} → {_fmt(post)} ({post / pre:.0%})" for r, (pre, post) in zip(rounds, pairs)))
    if rounds:
        dense, first = ppl["dense"][in_domain], ppl[f"R{rounds[0]} post"][in_domain]
        add(f"low-sparsity post-KD comparable to or better than dense (R{rounds[0]} post-KD ≤ {COMPARABLE:.2f}× dense "
            f"on {in_domain})", first <= COMPARABLE * dense,
            f"R{rounds[0]} post-KD {_fmt(first)} vs dense {_fmt(dense)} ({first / dense:.2f}×)")
        for s in sets:
            posts = [ppl[f"R{r} post"][s] for r in rounds]
            add(f"monotonic degradation with sparsity ({s}: post-KD PPL rises round by round)",
                all(b >= a for a, b in zip(posts, posts[1:])),
                " → ".join(f"R{r} {_fmt(p)}" for r, p in zip(rounds, posts)))
    for s in sets:
        d, kd = ppl["dense"][s], ppl["dense+kd"][s]
        add(f"Dense+KD better than dense ({s})", kd < d, f"Dense+KD {_fmt(kd)} vs dense {_fmt(d)} ({kd / d - 1:+.1%})")
    for kd_row, ce_row, what in (("dense+kd", "ce-only", "dense"), ("R1 post", "R1 ce-only", "R1 pruned"),
                                 ("oneshot kd", "oneshot ce-only", "one-shot pruned")):
        if kd_row not in ppl or ce_row not in ppl:
            continue
        for s in sets:
            kd, ce = ppl[kd_row][s], ppl[ce_row][s]
            where = "in domain" if s == in_domain else "out of domain"
            runs = (seeds or {}).get(s) if what == "R1 pruned" else None
            if runs and len(runs) > 1:  # judge the seed mean; the seed spread says whether the gap is noise
                kd, noise = statistics.mean(runs), statistics.stdev(runs)
                add(f"KD beats CE-only, {what}, {where} ({s})", kd < ce,
                    f"KD {_fmt(kd)} ± {_fmt(noise)} (mean ± std of {len(runs)} seeds) vs CE-only {_fmt(ce)} (one "
                    f"seed) ({kd / ce - 1:+.1%}): the gap is " + ("beyond" if abs(ce - kd) > 2 * noise else "within")
                    + " 2 std")
                continue
            add(f"KD beats CE-only, {what}, {where} ({s})", kd < ce,
                f"KD {_fmt(kd)} vs CE-only {_fmt(ce)} ({kd / ce - 1:+.1%})")
    return out


def verdict_lines(found: list[dict]) -> str:
    label = {True: "**holds**", False: "**does not hold**", None: "not measured"}
    return "".join(f"- {v['criterion']}: {label[v['holds']]} — {v['evidence']}\n" for v in found)


# ------------------------------------------------------------------------------------------------------- the flow


@flow(name="study")
def study_flow(config: StudyConfig, out: str | None = None, command: str | None = None) -> dict:
    """The paper flow, the extra arms, and the self-judging report (copied with its plots to ``out``)."""
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
        # The iterative rounds (the paper flow's keys): each round's teacher is the previous round's recovered model.
        current, teacher, rounds = dense, dense_cache, []
        for r, target in enumerate(config.targets, 1):
            p = run.prune(current, rid, f"R{r}", step=r, target_reduction=target)
            ev(f"R{r} pre", p)
            d = run.distill(p["model"], teacher, rid, f"R{r}")
            ev(f"R{r} post", d)
            rounds.append({"round": r, "target": target, "mlp_reduction": p["result"].get("mlp_reduction", target),
                           "pruned": p, "trained": d, "teacher": teacher})
            current = d["model"]
            if r < len(config.targets) and not config.keep_original_teacher:
                teacher = run.cache(current, None, f"R{r} post-KD")
        first, last = rounds[0], rounds[-1]
        if config.pruned_ce_control:
            ev("R1 ce-only", run.distill(first["pruned"]["model"], dense_cache, rid, "R1 ce-only", alpha=0.0))
        if config.last_round_swap and len(rounds) > 1 and not config.keep_original_teacher:
            ev(f"R{last['round']} post, dense teacher",
               run.distill(last["pruned"]["model"], dense_cache, rid, f"R{last['round']} dense teacher"))
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
            seed_rows[s] = ev(f"R1 post seed={s}", other.distill(first["pruned"]["model"], dense_cache, rid,
                                                                 f"R1 seed={s}"))
        for lr in config.lr_probe:
            ev(f"R1 post lr={lr:g}", run.distill(first["pruned"]["model"], dense_cache, rid, f"R1 lr={lr:g}", lr=lr))
        std = {n: statistics.stdev([v[n] for v in seed_rows.values()]) for n in names} if len(seed_rows) > 1 else {}
        standard = None
        if config.standard_protocol_set:
            es = next(e for e in config.eval_sets if e.name == config.standard_protocol_set)
            m = evaluate(dense, [es.model_dump()], {**config.eval.model_dump(), "protocol": "standard"},
                         run_id=rid, metric_prefix="standard_", **run.common())
            run._record(m, "eval dense (standard protocol)")
            standard = eval_results(m)[es.name]["ppl"]
        run.end(rid)

        found = verdicts(ppl, names[0], names[1:], {n: [v[n] for v in seed_rows.values()] for n in names})
        text = study_report(config, ppl, found, rounds, seed_rows, std, standard, paper, run, t_paper, kept,
                            time.time() - t0 - t_paper, command or "python -m flows.study --config CONFIG --out DIR")
        metrics = {metric_key(row, n): v for row, sets in ppl.items() for n, v in sets.items()}
        metrics.update({f"verdict.{i}": float(bool(v["holds"])) for i, v in enumerate(found)})
        result = run.finish([text], metrics, header=f"# Study: {config.model}\n\n")
    result.update(verdicts=found, models=models, ppl=ppl, paper_report=paper["report"])
    if out:
        publish(result, paper, Path(out))
    return result


def study_report(config, ppl, found, rounds, seed_rows, std, standard, paper, run: Run, t_paper: float, kept: dict,
                 t_extra: float, command: str = "python -m flows.study --config CONFIG --out DIR") -> str:
    names = [es.name for es in config.eval_sets if es.kind == "perplexity"]
    d = config.distill
    tokens = d.max_steps * d.batch_size * config.corpus.seq_len
    dense = ppl["dense"]
    lines = [
        "Generated by `flows/study.py` (not written by hand): the `paper` flow at the committed config, the arms it "
        "lacks, and verdicts computed from the numbers below. Regenerate (a rerun reuses every finished stage):\n",
        f"    {command}\n",
        f"- **Budget per trained arm**: {d.max_steps} steps × batch {d.batch_size} × {config.corpus.seq_len} tokens "
        f"= {tokens:,} tokens (lr {d.lr:g}, T {d.temperature:g}, α {d.alpha:g}, tail {d.tail}); KD corpus "
        f"{config.corpus.data}, {config.corpus.num_samples}×{config.corpus.seq_len} tokens, top-{config.corpus.top_k}.",
        "- **Eval sets**: " + ", ".join(f"`{es.name}` = {es.data}" + (f" (first {es.max_tokens} tokens)"
                                                                      if es.max_tokens else "")
                                        for es in config.eval_sets)
        + f"; {config.eval.protocol} protocol (ctx {config.eval.ctx}, stride {config.eval.stride}). "
          f"`{names[0]}` is judged as the in-domain set"
        + (" (WikiText-2 train is in the KD corpus)" if config.corpus.data.startswith("mix:paper") else "")
        + "; the others as out of domain (checked: no document or paragraph shared with the corpus).",
        f"- **Code version**: {_git_version()}; python {sys.version.split()[0]}; "
        f"{os.cpu_count()} CPU cores; dtype {config.dtype}, device {config.device}.",
        f"- **Wall time of this invocation**: paper flow {t_paper / 60:.1f} min, the study's extra arms "
        f"{t_extra / 60:.1f} min (stage compute below).\n",
        "## Verdicts\n", verdict_lines(found),
    ]
    if standard is not None:
        lines.append(f"\nStandard protocol, dense, `{config.standard_protocol_set}`: PPL {standard:.2f} (paper "
                     f"protocol: {dense[config.standard_protocol_set]:.2f}).\n")
    lines.append("\n## Every model\n\nA trained arm keeps its best checkpoint on the validation text "
                 f"({d.val_data}, first {d.val_tokens} tokens); `kept step` says which (0 = no step improved on the "
                 "starting weights, so the arm's model *is* its starting model).\n")

    def kept_step(label: str) -> str:
        if label not in kept:
            return "—"
        best, steps, start, best_ppl = kept[label]
        return f"{best}/{steps}" + (f" (val {start:.1f}, never improved)" if best == 0 else "")

    rows = [[label, kept_step(label), *[sets[n] for n in names], *[rep.vs(sets[n], dense[n]) for n in names]]
            for label, sets in ppl.items()]
    lines.append(rep.table(["model", "kept step", *[f"PPL {n}" for n in names], *[f"vs dense {n}" for n in names]],
                           rows))
    never = [label for label, k in kept.items() if k[0] == 0]
    if never:
        lines.append("\n**Arms whose training never improved the validation perplexity** (their model is their "
                     "starting model, and their row repeats it): " + ", ".join(f"`{x}`" for x in never) + ".\n")
    tails = [(config.distill.tail, "dense+kd")] + [(t, f"dense+kd tail={t}") for t in config.tails
                                                   if t != config.distill.tail and f"dense+kd tail={t}" in ppl]
    lines.append("\n## Dense+KD per KD tail, beside the CE-only twin (α = 0: the same for every tail)\n")
    lines.append(rep.table(["arm", *[f"PPL {n}" for n in names], *[f"vs CE-only {n}" for n in names]],
                           [[f"Dense+KD tail={t}", *[ppl[row][n] for n in names],
                             *[rep.vs(ppl[row][n], ppl["ce-only"][n]) for n in names]] for t, row in tails]
                           + [["CE-only", *[ppl["ce-only"][n] for n in names], *["—"] * len(names)],
                              ["Dense", *[dense[n] for n in names],
                               *[rep.vs(dense[n], ppl["ce-only"][n]) for n in names]]]))
    lines.append("\n## Iterative rounds (teacher: the previous round's recovered model, re-cached)\n")
    lines.append(rep.table(["round", "MLP reduction", *[f"pre-KD {n}" for n in names],
                            *[f"post-KD {n}" for n in names]],
                           [[f"R{x['round']}", f"{100 * x['mlp_reduction']:.1f}%",
                             *[ppl[f"R{x['round']} pre"][n] for n in names],
                             *[ppl[f"R{x['round']} post"][n] for n in names]] for x in rounds]))
    last = f"R{rounds[-1]['round']}"
    if f"{last} post, dense teacher" in ppl:
        lines.append(f"\n## Teacher swap at the last round: {last}'s pruned student from each teacher\n")
        lines.append(rep.table(["teacher", *[f"PPL {n}" for n in names]],
                               [[f"R{rounds[-1]['round'] - 1} post-KD, re-cached (the iterative flow's)",
                                 *[ppl[f"{last} post"][n] for n in names]],
                                ["the dense model's cache", *[ppl[f"{last} post, dense teacher"][n] for n in names]],
                                [f"(pre-KD {last})", *[ppl[f"{last} pre"][n] for n in names]]]))
    pairs = [(a, b, what) for a, b, what in (("R1 post", "R1 ce-only", "R1 (first round) pruned"),
                                             ("oneshot kd", "oneshot ce-only",
                                              f"one-shot {100 * config.swap_target:.0f}% pruned"))
             if a in ppl and b in ppl]
    if pairs:
        lines.append("\n## KD vs CE-only on pruned students (same student, corpus, steps, seed)\n")
        lines.append(rep.table(["student", "arm", *[f"PPL {n}" for n in names], *[f"KD vs CE-only {n}" for n in names]],
                               [row for a, b, what in pairs for row in (
                                   [what, "KD", *[ppl[a][n] for n in names],
                                    *[rep.vs(ppl[a][n], ppl[b][n]) for n in names]],
                                   [what, "CE-only", *[ppl[b][n] for n in names], *["—"] * len(names)])]))
    if len(seed_rows) > 1:
        lines.append(f"\n## Seeds: R1 Pruned+KD, seeds {', '.join(map(str, seed_rows))}\n")
        lines.append(rep.table(["eval set", "mean", "std", *[f"seed {s}" for s in seed_rows]],
                               [[n, statistics.mean(v[n] for v in seed_rows.values()), std[n],
                                 *[v[n] for v in seed_rows.values()]] for n in names]))
    probes = [lr for lr in config.lr_probe if f"R1 post lr={lr:g}" in ppl]
    if probes:
        others = ", ".join(f"{x:g}" for x in probes)
        lines.append(f"\n## Learning rate: R1 Pruned+KD at lr {d.lr:g} (the config's) and {others}\n")
        lines.append(rep.table(["lr", *[f"PPL {n}" for n in names]],
                               [[f"{d.lr:g}", *[ppl["R1 post"][n] for n in names]]]
                               + [[f"{lr:g}", *[ppl[f"R1 post lr={lr:g}"][n] for n in names]] for lr in probes]))
    wanda = {k: v for k, v in paper["metrics"].items() if k.startswith("wanda.") and "zero_fraction" in k}
    if wanda:
        lines.append("\n## WANDA: MLP zeros counted on the evaluated models (after KD the mask must hold)\n")
        lines.append(rep.table(["metric", "value"], [[k, f"{100 * v:.2f}%"] for k, v in sorted(wanda.items())]))
    lines.append("\n## The paper flow's own report\n\nIts sections (Dense+KD vs CE-only, Table III, cascade, teacher "
                 "swap, WANDA with sparsity after KD, the profile of dense vs each round) are in "
                 "[paper-report.md](paper-report.md).\n")
    by_kind: dict[str, list[float]] = {}
    seen, ran = set(), 0
    for s in [*paper["stages"], *run.stages]:
        ran += not s["cached"]
        if s["key"] in seen:  # a stage the paper flow made and the study reached again
            continue
        seen.add(s["key"])
        by_kind.setdefault(s["label"].split(": ")[-1].split()[0], []).append(float(s["seconds"] or 0))
    total = sum(sum(v) for v in by_kind.values())
    lines.append(f"\n## Seconds per stage kind\n\nEach distinct stage once, with the seconds it took when it ran "
                 f"(a stage's manifest keeps them): {total / 60:.1f} min of stage compute in all. This invocation ran "
                 f"{ran} stage(s) and reused the others from their manifests.\n")
    lines.append(rep.table(["stage", "runs", "seconds", "mean"],
                           [[k, len(v), f"{sum(v):.0f}", f"{sum(v) / len(v):.1f}"]
                            for k, v in sorted(by_kind.items())]))
    return "\n".join(lines)


def publish(result: dict, paper: dict, out: Path) -> None:
    """Copy the study report, the paper flow's report and every plot they reference to ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(result["report"], out / "report.md")
    shutil.copy(paper["report"], out / "paper-report.md")
    for report in (result["report"], paper["report"]):
        for png in Path(report).parent.glob("*.png"):
            shutil.copy(png, out / png.name)
    reports = Path(paper["report"]).parent.parent
    for png in reports.glob("iterative-*/*.png"):  # the rounds' plots and the profile
        shutil.copy(png, out / f"iterative-{png.name}")
    for md in reports.glob("iterative-*/profile.md"):
        shutil.copy(md, out / "profile.md")
    summary = {k: result[k] for k in ("verdicts", "models", "metrics", "ppl")}
    (out / "study.json").write_text(json.dumps(summary, indent=1, sort_keys=True, default=str))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.study", description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="the study's YAML config")
    parser.add_argument("--out", help="copy the report, plots and study.json here (e.g. docs/results/study-smollm2)")
    args = parser.parse_args(argv)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    import yaml

    config = StudyConfig(**yaml.safe_load(Path(args.config).read_text()))
    command = "python -m flows.study " + " ".join(argv if argv is not None else sys.argv[1:])
    result = study_flow(config, out=args.out, command=command)
    print(verdict_lines(result["verdicts"]))
    print(f"report: {result['report']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
