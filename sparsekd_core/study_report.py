"""The second study's report: paired KD-vs-CE verdicts with intervals, the KL column, the budget curve.

Input is one dict per evaluated model (an *arm*), keyed by label::

    {"student": "dense" | "R1", "kind": "base" | "kd" | "ce" | "bucket" | "sampled", "alpha": float,
     "seed": int | None, "tokens": int | None, "sets": {set: eval result with window_nll/window_tokens[/kl]},
     "kept": {"best_step", "steps", "val_ppl_start", "val_ppl_best"} | None}

Every comparison is paired: the two models of a pair were scored on the same windows of the same text
(``stats.paired_bootstrap`` refuses otherwise) and, where both are trained, with the same seed. A comparison over
several seeds pairs seed i with seed i and reports the mean paired difference; a seed that only one arm has is
left out and the line says how many pairs it used. No line compares a mean over seeds with a single seed.
"""

from __future__ import annotations

import math
from pathlib import Path

from .stats import bootstrap_ppl, gap_change, paired_bootstrap, signed

KINDS = {"kd": "KD", "ce": "CE-only", "bucket": "KD, bucket tail", "sampled": "KD, sampled-cache tail"}


def arm_label(student: str, kind: str, alpha: float | None = None, seed: int | None = None,
              tokens: int | None = None) -> str:
    """The one spelling of an arm's label (report rows, study.json keys, MLflow arms)."""
    parts = [student, "base" if kind == "base" else KINDS.get(kind, kind)]
    if kind == "kd" and alpha is not None:
        parts[-1] += f" α={alpha:g}"
    if seed is not None:
        parts.append(f"seed {seed}")
    if tokens is not None:
        parts.append(f"{tokens // 1024}k tokens" if tokens % 1024 == 0 else f"{tokens} tokens")
    return " · ".join(parts)


def _unmoved(arm: dict) -> bool:
    """True when the arm's model is its start model: a base model, or a trained arm whose kept (best on
    validation) checkpoint is step 0."""
    return arm.get("kind") == "base" or (arm.get("kept") or {}).get("best_step") == 0


def _pairs(arms: dict, a: dict, b: dict, set_name: str) -> tuple[list, list, list, list[int], list[int]]:
    """Window NLLs of the arms matching ``a`` and ``b`` (field filters), paired by seed (``b`` may be a seedless
    base model, then it pairs with every seed of ``a``); the last item lists the seeds at which both arms are
    their start model (no arm moved: the two sides are the same weights)."""
    def match(arm: dict, want: dict) -> bool:
        return all(arm.get(k) == v for k, v in want.items()) and set_name in arm["sets"]

    left = {arm.get("seed"): arm for arm in arms.values() if match(arm, a)}
    right = {arm.get("seed"): arm for arm in arms.values() if match(arm, b)}
    if list(right) == [None]:
        seeds = sorted(s for s in left if s is not None)
        right = {s: right[None] for s in seeds}
    else:
        seeds = sorted(s for s in left if s in right and s is not None)
    xa = [left[s]["sets"][set_name]["window_nll"] for s in seeds]
    xb = [right[s]["sets"][set_name]["window_nll"] for s in seeds]
    tokens = left[seeds[0]]["sets"][set_name]["window_tokens"] if seeds else []
    unmoved = [s for s in seeds if _unmoved(left[s]) and _unmoved(right[s])]
    return xa, xb, tokens, seeds, unmoved


def compare(arms: dict, a: dict, b: dict, set_name: str, n_boot: int = 2000) -> dict | None:
    """The paired comparison of arms ``a`` − ``b`` on one set, or None when no pair exists."""
    xa, xb, tokens, seeds, unmoved = _pairs(arms, a, b, set_name)
    if not seeds:
        return None
    out = paired_bootstrap(xa, xb, tokens, n_boot=n_boot, seed=0)
    out["pair_seeds"], out["unmoved_seeds"] = seeds, unmoved
    return out


NO_ARM_MOVED = "no arm moved"


def _lower(result: dict, name_a: str, name_b: str) -> str:
    """Which arm is lower: only when the 95% interval of the paired difference excludes 0; "no arm moved" when at
    every paired seed both arms are their start model (the difference is 0 by construction and tests nothing)."""
    if result["pair_seeds"] and result.get("unmoved_seeds") == result["pair_seeds"]:
        return NO_ARM_MOVED
    d = result["diff"]
    return name_a if d.high < 0 else name_b if d.low > 0 else "not resolved"


def verdict_text(result: dict, name_a: str, name_b: str) -> str:
    """'lower' / 'higher' only when the 95% interval of the mean paired difference excludes 0; says so when the
    two sides are the same start model (every trained arm kept step 0), at all seeds or at some."""
    d = result["diff"]
    lower = _lower(result, name_a, name_b)
    seeds, unmoved = result["pair_seeds"], result.get("unmoved_seeds") or []
    if lower == NO_ARM_MOVED:
        word = (f"**{NO_ARM_MOVED}**: every trained arm here kept its start model (best on validation at step 0), so "
                "both sides are the same weights and this line tests nothing")
    elif lower == "not resolved":
        word = "**not resolved** (the interval includes 0)"
    else:
        word = f"**{lower} lower**"
    if unmoved and lower != NO_ARM_MOVED:
        word += f"; at seed{'s' if len(unmoved) > 1 else ''} {', '.join(map(str, unmoved))} no arm moved (both sides " \
                "are the start model)"
    per = ", ".join(signed(x) for x in result["per_seed"])
    pairs = f"{len(seeds)} paired seed{'s' if len(seeds) > 1 else ''} ({', '.join(map(str, seeds))}): {per}"
    return (f"PPL({name_a}) − PPL({name_b}) = {d.text()} (95% paired bootstrap over {result['windows']} windows; "
            f"{pairs}) → {word}")


def _fmt(x: float | None, digits: int = 2) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def models_table(arms: dict, sets: list[str], n_boot: int) -> str:
    head = "| model | kept step / steps | " + " | ".join(f"{s} PPL [95%] | {s} KL" for s in sets) + " |"
    rows = [head, "|" + "---|" * (2 + 2 * len(sets))]
    for label, arm in arms.items():
        kept = arm.get("kept") or {}
        step = f"{kept['best_step']} / {kept['steps']}" if kept.get("steps") else "–"
        cells = []
        for s in sets:
            r = arm["sets"].get(s)
            if r is None:
                cells += ["–", "–"]
                continue
            ci = bootstrap_ppl(r["window_nll"], r["window_tokens"], n_boot=n_boot)
            cells += [f"{r['ppl']:.2f} [{ci.low:.2f}, {ci.high:.2f}]", _fmt(r.get("kl"), 4)]
        rows.append(f"| {label} | {step} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def verdict_lines(arms: dict, sets: list[str], relations: dict[str, str], alphas: list[float], train_tokens: int,
                  n_boot: int) -> tuple[list[str], dict]:
    """The training effect (vs the student's starting point) and the KD effect (vs the CE-only twin, paired by
    seed) for each student, α and set; the tails against CE-only at the seeds they ran. Returns (lines, metrics)."""
    lines, metrics = [], {}
    for student in ("dense", "R1"):
        if not any(a["student"] == student for a in arms.values()):
            continue
        lines.append(f"\n### {student} student\n")
        for s in sets:
            rel = relations.get(s, "?")
            for alpha in alphas:
                kd = {"student": student, "kind": "kd", "alpha": alpha, "tokens": train_tokens}
                ce = {"student": student, "kind": "ce", "tokens": train_tokens}
                base = {"student": student, "kind": "base"}
                for what, b, nb in (("KD effect", ce, "CE-only"), ("training effect", base, "start")):
                    r = compare(arms, kd, b, s, n_boot)
                    if r is None:
                        continue
                    lines.append(f"- {what}, {s} ({rel}), KD α={alpha:g} vs {nb}: "
                                 + verdict_text(r, f"KD α={alpha:g}", nb))
                    key = f"{student}.{s}.kd{alpha:g}_minus_{'ce' if b is ce else 'start'}"
                    metrics.update({key: r["diff"].estimate, key + ".low": r["diff"].low,
                                    key + ".high": r["diff"].high})
            r = compare(arms, {"student": student, "kind": "ce", "tokens": train_tokens},
                        {"student": student, "kind": "base"},
                        s, n_boot)
            if r is not None:
                lines.append(f"- training effect, {s} ({rel}), CE-only vs start: " + verdict_text(r, "CE-only", "start"))
            for tail in ("bucket", "sampled"):
                r = compare(arms, {"student": student, "kind": tail},
                            {"student": student, "kind": "ce", "tokens": train_tokens}, s, n_boot)
                if r is not None:
                    lines.append(f"- KD effect, {s} ({rel}), {KINDS[tail]} vs CE-only: "
                                 + verdict_text(r, KINDS[tail], "CE-only"))
    return lines, metrics


def budget_section(arms: dict, sets: list[str], dense: dict, alpha: float, budgets: list[int], seed: int,
                   n_boot: int, plot: Path | None = None) -> tuple[str, dict]:
    """R1's KD and CE-only at each training budget (at ``seed``): the table, the paired gap at each budget, the
    trend, and where (if anywhere) the KD curve would reach 1.05× dense."""
    def at(kind: str, tokens: int) -> dict | None:
        want = {"student": "R1", "kind": kind, "tokens": tokens, "seed": seed}
        if kind == "kd":
            want["alpha"] = alpha
        found = [a for a in arms.values() if all(a.get(k) == v for k, v in want.items())]
        return found[0] if found else None

    done = [t for t in budgets if at("kd", t) and at("ce", t)]
    if len(done) < 2:  # one budget is the matched arms, already in the verdicts: no curve, no trend, no plot
        return "", {}
    rows = ["| training tokens | " + " | ".join(f"{s} KD | {s} CE-only | {s} KD − CE [95%]" for s in sets) + " |",
            "|" + "---|" * (1 + 3 * len(sets))]
    metrics, gaps = {}, {s: [] for s in sets}
    for t in done:
        kd, ce = at("kd", t), at("ce", t)
        cells = []
        for s in sets:
            r = None
            if s in kd["sets"] and s in ce["sets"]:
                r = paired_bootstrap(kd["sets"][s]["window_nll"], ce["sets"][s]["window_nll"],
                                     kd["sets"][s]["window_tokens"], n_boot=n_boot)
            cells += [f"{kd['sets'][s]['ppl']:.2f}", f"{ce['sets'][s]['ppl']:.2f}",
                      r["diff"].text() if r else "–"]
            if r:
                gaps[s].append((t, r["diff"]))
                metrics[f"budget.{t}.{s}.kd_minus_ce"] = r["diff"].estimate
        rows.append(f"| {t:,} | " + " | ".join(cells) + " |")
    lines = ["\n".join(rows), ""]
    for s in sets:
        g = gaps[s]
        if len(g) < 2:
            lines.append(f"- {s}: one budget only; no trend can be told.")
            continue
        (t0, first), (t1, last) = g[0], g[-1]
        # The trend is the change of the paired gap itself, with its own interval (all four models on the same
        # windows), not a comparison of two estimates.
        ends = [at(kind, t)["sets"][s]["window_nll"] for t in (t0, t1) for kind in ("kd", "ce")]
        change = gap_change(*ends, at("kd", t0)["sets"][s]["window_tokens"], n_boot=n_boot)
        metrics[f"budget.{s}.gap_change"] = change.estimate
        if not change.excludes_zero():
            trend = "cannot be told apart from no change"
        else:
            trend = "says KD gains on CE-only with tokens" if change.estimate < 0 else \
                "says KD loses ground to CE-only with tokens"
        flip = ""
        if first.excludes_zero() and last.excludes_zero() and (first.estimate > 0) != (last.estimate > 0):
            lower = {True: "CE-only", False: "KD"}
            flip = (f"; the verdict reverses: {lower[first.estimate > 0]} lower at {t0:,}, "
                    f"{lower[last.estimate > 0]} lower at {t1:,}")
        lines.append(f"- {s}: KD − CE-only goes from {first.text()} at {t0:,} tokens to {last.text()} at {t1:,}; "
                     f"the change, {change.text()} (paired bootstrap, same windows), {trend}{flip}.")
        if s in dense:
            lines.append("  " + reach_statement([(t, at('kd', t)['sets'][s]['ppl']) for t in done], dense[s], s))
    if plot is not None:
        plot_budget(done, {s: ([at("kd", t)["sets"][s]["ppl"] for t in done],
                               [at("ce", t)["sets"][s]["ppl"] for t in done]) for s in sets},
                    dense, alpha, plot)
    return "\n".join(lines), metrics


def reach_statement(points: list[tuple[int, float]], dense_ppl: float, set_name: str, goal: float = 1.05) -> str:
    """Where a log-linear fit of log(PPL/dense) against log(tokens) reaches ``goal``× dense, or why it cannot be
    told. Two or three budgets make a weak extrapolation, and the line says so."""
    ratios = [(t, p / dense_ppl) for t, p in points]
    last_t, last_r = ratios[-1]
    if last_r <= goal:
        return f"KD is within {goal:.2f}× dense on {set_name} at {last_t:,} tokens ({last_r:.3f}×)."
    xs = [math.log(t) for t, _ in ratios]
    ys = [math.log(r) for _, r in ratios]
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else 0.0
    if slope >= 0:
        return (f"KD is {last_r:.3f}× dense on {set_name} at {last_t:,} tokens and not improving with tokens: "
                f"when it would reach {goal:.2f}× dense cannot be told.")
    target = mx + (math.log(goal) - my) / slope
    return (f"KD is {last_r:.3f}× dense on {set_name} at {last_t:,} tokens; a log-linear fit through the {n} budgets "
            f"reaches {goal:.2f}× dense at about {math.exp(target):,.0f} tokens (an extrapolation from {n} points, "
            "not a measurement).")


def plot_budget(tokens: list[int], curves: dict[str, tuple[list[float], list[float]]], dense: dict, alpha: float,
                path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(4.2 * len(curves), 3.4), squeeze=False)
    for ax, (s, (kd, ce)) in zip(axes[0], curves.items()):
        ax.plot(tokens, kd, "o-", label=f"KD α={alpha:g}")
        ax.plot(tokens, ce, "s--", label="CE-only")
        if s in dense:
            ax.axhline(dense[s], color="grey", lw=1, label="dense")
            ax.axhline(1.05 * dense[s], color="grey", lw=1, ls=":", label="1.05× dense")
        ax.set_xscale("log")
        ax.set_xlabel("training tokens")
        ax.set_ylabel("PPL")
        ax.set_title(s)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def prune_line(prune: dict, target: float, eval_sets: list[dict], relations: dict[str, str]) -> str:
    """How R1 was made (the prune policy's own reading of the section: its schedule, whether it whitens), and what
    its calibration means for a set labelled out of corpus that comes from the calibration's source: out of the KD
    corpus, not out of the prune's calibration."""
    from .config import PruneConfig

    cfg = PruneConfig(**prune, target_reduction=target)
    how = f"`{cfg.method}`" + (f" ({cfg.resolved_schedule})" if cfg.resolved_schedule else "")
    line = f"R1 student: {how}, MLP −{target:.0%}"
    if cfg.calibration is None:
        return line + ", without calibration data.\n\n"
    line += (f", {'whitened' if cfg.use_whitening else 'calibrated'} on {cfg.calibration_samples} × "
             f"{cfg.calibration_seq_len} tokens of `{cfg.calibration}`.")
    source = cfg.calibration.split(":")[0]
    same = [es["name"] for es in eval_sets if es.get("kind", "perplexity") == "perplexity"
            and es["data"].split(":")[0] == source and relations.get(es["name"]) == "out of corpus"]
    if same:
        line += (f" {', '.join(same)} come(s) from the calibration's source: for R1, *out of corpus* means out of "
                 "the KD corpus only (the pruned start model was fitted to that source's activations). Every R1 arm "
                 "starts from the same pruned model, so R1's paired KD − CE-only lines are unaffected.")
    return line + "\n\n"


def setup_section(model: str, what: str | None, corpus: dict, eval_cfg: dict, eval_sets: list[dict],
                  relations: dict[str, str], distill: dict, train_tokens: int, checked: dict,
                  r1: str = "") -> str:
    """What every number was measured on: the model (what it is), the corpus, each set's relation to it; ``r1``:
    how the pruned student was made (``prune_line``), when the study has one."""
    rows = ["| eval set | data | tokens | relation to the KD corpus |", "|---|---|---|---|"]
    for es in eval_sets:
        if es.get("kind", "perplexity") == "perplexity":
            size = f"first {es['max_tokens']:,}" if es.get("max_tokens") else "all"
            rows.append(f"| {es['name']} | `{es['data']}` | {size} | "
                        f"{relations.get(es['name'], '?')} |")
    steps = train_tokens // (distill["batch_size"] * distill["grad_accum"] * corpus["seq_len"])
    disjoint = ""
    if checked:
        disjoint = ("Checked before any work: no eval set or validation text shares a document with the corpus "
                    "(normalised-text hashes).\n\n")
    return (f"Model: `{model}`" + (f" = {what}" if what else "") + ".\n\n"
            f"KD corpus: `{corpus['data']}`, {corpus['num_samples']} × {corpus['seq_len']} tokens, teacher top-"
            f"{corpus['top_k']} cached once from the dense model. A matched arm trains {train_tokens:,} tokens "
            f"({steps} steps × {distill['batch_size']} × {corpus['seq_len']}), lr {distill['lr']:g}, temperature "
            f"{distill['temperature']:g}, tail `{distill['tail']}`.\n\n"
            f"Perplexity: {eval_cfg['protocol']} protocol, ctx {eval_cfg['ctx']}, stride {eval_cfg['stride']}"
            + (" (disjoint windows: the bootstrap's draws)" if eval_cfg["stride"] == eval_cfg["ctx"] else "")
            + ".\n\n" + r1 + disjoint + "\n".join(rows))


def provenance_section(command: str, environment: str, wall: float, parts: list[str]) -> str:
    return ("## How this was made\n\n"
            f"Generated by `flows/study_v2.py`, not written by hand. Regenerate (finished stages are reused, and the "
            f"arms already published in the output directory are joined):\n\n```\n{command}\n```\n\n"
            f"- Parts run by this invocation: {', '.join(parts)}; its wall time: {wall / 60:.1f} min.\n"
            f"- Code: {environment}\n")


def teacher_line(arms: dict, val_data: str) -> str:
    """The teacher's (the dense model's) perplexity on the validation slice: a dense-student arm's step-0 value."""
    start = [a["kept"]["val_ppl_start"] for a in arms.values()
             if a["student"] == "dense" and (a.get("kept") or {}).get("val_ppl_start")]
    if not start:
        return ""
    return (f"The teacher (the dense model) has PPL {start[0]:.2f} on the validation slice `{val_data}` (held-out "
            "documents of a corpus source; the dense-student arms' step-0 validation).\n\n")


def header(model: str) -> str:
    return f"# Study, second edition: {model}\n\n"


def report_sections(model: str, what: str | None, config: dict, relations: dict[str, str], arms: dict,
                    sets: list[str], checked: dict, plot_dir: Path, stages: list[dict], parts: list[str],
                    wall: float, command: str, environment: str) -> tuple[list[str], dict, list[Path]]:
    """The report's sections (setup, verdicts, every model, budget, provenance, stage seconds), its metrics and
    plots (written to ``plot_dir``: the budget curve, the learning curves per student), from the arms and the
    study's config (``config``: its model_dump)."""
    from .report import plot_recovery

    from .report import stage_seconds_section

    alphas, n_boot, seed0 = config["alphas"], config["n_boot"], config["seeds"][0]
    lines, metrics = verdict_lines(arms, sets, relations, alphas, config["train_tokens"], n_boot)
    budget, budget_metrics = budget_section(arms, sets, {s: arms["dense"]["sets"][s]["ppl"] for s in sets},
                                            alphas[0], config["budgets"], seed0, n_boot, plot_dir / "budget.png")
    metrics.update(budget_metrics)
    distill = config["distill"]
    sections = [setup_section(model, what, config["corpus"], config["eval"], config["eval_sets"], relations, distill,
                              config["train_tokens"], checked,
                              prune_line(config["prune"], config["r1_target"], config["eval_sets"], relations)
                              if any(a["student"] == "R1" for a in arms.values()) else ""),
                "## Verdicts\n\nEach line is a paired comparison: both models scored on the same windows, trained "
                "arms paired seed with seed. *KD effect* = KD against its CE-only twin; *training effect* = a "
                "trained arm against the model it started from.\n" + "\n".join(lines),
                "## Every model\n\n" + teacher_line(arms, distill["val_data"])
                + "PPL with a 95% bootstrap interval over windows; KL = KL(dense ‖ model) in "
                "nats per token on the same windows (the distance to the teacher's next-token distribution). "
                "Kept step: the step whose validation perplexity was best (validation on "
                f"`{distill['val_data']}`, every {distill['eval_every']} steps).\n\n"
                + models_table(arms, sets, n_boot)]
    plots = []
    if budget:
        sections.append(f"## Token budget (R1, seed {seed0})\n\n{budget}")
        plots.append(plot_dir / "budget.png")
    for student in ("dense", "R1"):  # validation PPL over steps of every arm that logged it (the kept step's curve)
        curves = {label: [tuple(p) for p in a["kept"]["val_history"]] for label, a in arms.items()
                  if a["student"] == student and (a.get("kept") or {}).get("val_history")}
        if curves:
            plot_recovery(curves, plot_dir / f"learning-{student}.png")
            plots.append(plot_dir / f"learning-{student}.png")
    sections += [provenance_section(command, environment, wall, parts), stage_seconds_section(stages)]
    return [x.rstrip("\n") + "\n\n" for x in sections], metrics, plots


def _family_name(fam: dict, families: list[dict]) -> str:
    """The family's model, or the model and its directory when another family runs the same model (e.g. at
    another learning rate)."""
    same = sum(f["model"] == fam["model"] for f in families) > 1
    return f"{fam['model']} ({fam['dir']}/)" if same else fam["model"]


def kd_effect_table(families: list[dict]) -> str:
    """One row per family, student, set and α: PPL(KD) − PPL(CE-only), the mean paired difference over the seeds
    both ran, with its 95% interval and which is lower (only when the interval excludes 0)."""
    rows = ["| model | student | eval set (relation to the corpus) | KD α | PPL(KD) − PPL(CE-only) [95%] | "
            "paired seeds | lower |", "|---|---|---|---|---|---|---|"]
    for fam in families:
        cfg, arms = fam["config"], fam["arms"] or {}
        name = _family_name(fam, families)
        for student in ("dense", "R1"):
            for s in fam["sets"]:
                for alpha in cfg["alphas"]:
                    r = compare(arms, {"student": student, "kind": "kd", "alpha": alpha,
                                       "tokens": cfg["train_tokens"]},
                                {"student": student, "kind": "ce", "tokens": cfg["train_tokens"]}, s, cfg["n_boot"])
                    if r is None:
                        continue
                    rows.append(f"| {name} | {student} | {s} ({fam['relations'].get(s, '?')}) | {alpha:g} | "
                                f"{r['diff'].text()} | {len(r['pair_seeds'])} "
                                f"({', '.join(map(str, r['pair_seeds']))}) | {_lower(r, 'KD', 'CE-only')} |")
    return "\n".join(rows)


def combined_report(families: list[dict], command: str, environment: str) -> str:
    """The second study over model families, from each family's published arms (``study.json``): the KD-effect
    table across families, then per family what the model is, its verdict lines, every model with its PPL interval
    and KL, and its budget plot; the family reports (``<dir>/report.md``) hold the rest.

    ``families``: one {"dir", "model", "what", "config" (the StudyV2Config's model_dump), "relations", "sets",
    "arms" (None: not run yet), "budget_plot" (bool), "command" (what runs the family)} each."""
    parts = ["# Study, second edition: every model family\n",
             "Does self-referential KD beat fine-tuning (CE-only) on the same corpus, and does fine-tuning help at "
             "all? Each comparison is paired: both models scored on the same windows, trained arms paired seed with "
             "seed; an interval that holds 0 is *not resolved*, and a line whose trained arms all kept their start model "
             "(step 0 best on validation) says *no arm moved*: it compares a model with itself. Built from each family's published arms (no stage "
             "runs); each family's own report holds the learning curves, the tails and the stage times.\n",
             "## KD effect, all families\n", kd_effect_table(families) + "\n"]
    for fam in families:
        cfg = fam["config"]
        model = f"Model: `{fam['model']}`" + (f" = {fam['what']}" if fam.get("what") else "")
        heading = f"## {_family_name(fam, families)}\n"
        if fam["arms"] is None:
            parts += [heading, f"{model}. No arms published yet; run:\n\n```\n{fam['command']}\n```\n"]
            continue
        lines, _ = verdict_lines(fam["arms"], fam["sets"], fam["relations"], cfg["alphas"], cfg["train_tokens"],
                                 cfg["n_boot"])
        parts += [heading,
                  f"{model}. Full report: "
                  f"[{fam['dir']}/report.md]({fam['dir']}/report.md). KD corpus `{cfg['corpus']['data']}`; a matched "
                  f"arm trains {cfg['train_tokens']:,} tokens at peak lr {cfg['distill']['lr']:g}.\n",
                  "### Verdicts\n" + "\n".join(lines).replace("\n### ", "\n#### ") + "\n",
                  "### Every model\n\nPPL with a 95% bootstrap interval over windows; KL = KL(dense ‖ model), nats "
                  "per token.\n\n" + models_table(fam["arms"], fam["sets"], cfg["n_boot"]) + "\n"]
        if set(cfg["parts"]) <= {"dense", "report"}:
            parts.append("### Token budget (R1)\n\nNot part of this family: it trains the dense student only.\n")
        elif fam.get("budget_plot"):
            parts.append(f"### Token budget (R1)\n\n![budget]({fam['dir']}/budget.png)\n\nThe trend and the "
                         f"extrapolation are in [the family report]({fam['dir']}/report.md).\n")
        else:
            parts.append("### Token budget (R1)\n\nNot run for this family yet.\n")
    parts.append("## How this was made\n\nGenerated by `flows/study_v2.py`, not written by hand. Regenerate:\n\n"
                 f"```\n{command}\n```\n\n- Code: {environment}\n")
    return "\n".join(parts)


def gpu_budget_report(doc: dict, study: dict | None, plot: Path | None, command: str, n_boot: int = 2000) -> str:
    """The report of ``benchmarks/study_budget_gpu.py``: R1's KD and CE-only arms trained on a GPU at each budget
    (``doc``, budget_gpu.json), judged pair by pair like the study's verdicts, with the budget curve; and, where the
    CPU study (``study``, its study.json) has an arm of the same label (same seed, budget and settings), the GPU
    arm minus the CPU arm on the same windows: how far the hardware and its training precision move a result."""
    arms, setup, m = doc["arms"], doc["setup"], doc.get("machine", {})
    sets = [es["name"] for es in setup["eval_sets"] if es.get("kind", "perplexity") == "perplexity"]
    relations = {r["set"]: r["relation"] for r in setup.get("relations", [])}
    alpha = setup["alphas"][0]
    corpus_tokens = doc.get("corpus_tokens") or setup["corpus"]["num_samples"] * setup["corpus"]["seq_len"]
    trained = [a for a in arms.values() if a.get("kind") in ("kd", "ce")]
    budgets = sorted({a["tokens"] for a in trained})
    seeds = sorted({a["seed"] for a in trained})
    gpu = m.get("gpu") or m.get("device", "?")
    out = ["# Study, second edition: R1's budget curve on a GPU\n",
           f"Model: {doc.get('model_label', setup['model'])}.\n",
           f"Generated by `benchmarks/study_budget_gpu.py`, not written by hand:\n\n```\n{command}\n```\n",
           *([f"The arms were made by:\n\n```\n{doc['command']}\n```\n"] if doc.get("command") else []),
           f"- Machine: {gpu}; torch {m.get('torch', '?')}, transformers {m.get('transformers', '?')}, Python "
           f"{m.get('python', '?')} (`python:stdlib` / `python:heldout` read from {doc.get('stdlib', '?')} standard "
           "library).",
           f"- Protocol and settings: the family's study-v2 config (corpus {setup['corpus']['data']}, "
           f"{corpus_tokens:,} tokens; R1 = {setup['prune'].get('method', 'svd')} at {setup['r1_target']:.0%} MLP; "
           f"KD α={alpha:g} and its CE-only twin (α = 0); kept model = best on validation). Teacher cache in fp32; "
           "training in fp32 master weights with the precision policy's bf16 autocast on CUDA; every eval here in "
           "fp32 weights.",
           "- Sets and their relation to the corpus: "
           + ", ".join(f"{s} ({relations.get(s, '?')})" for s in sets) + ".",
           f"- Arms: {len(trained)} trained (budgets {', '.join(f'{t:,}' for t in budgets)}; seed"
           f"{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))})"
           + (f"; the run stopped early: {doc['stopped']}" if doc.get("stopped") else "") + ". "
           + (f"Wall time {doc['wall_seconds'] / 60:.1f} min.\n" if "wall_seconds" in doc else
              "No wall time was recorded (the process was stopped from outside before its end); its stages below "
              f"took {sum(doc.get('seconds', {}).values()) / 60:.1f} min.\n")]
    dense = {s: arms["dense"]["sets"][s]["ppl"] for s in sets if "dense" in arms and s in arms["dense"]["sets"]}
    out.append("## KD − CE-only at each budget (paired: same seed, same windows)\n")
    for t in budgets:
        for s in sets:
            r = compare(arms, {"student": "R1", "kind": "kd", "alpha": alpha, "tokens": t},
                        {"student": "R1", "kind": "ce", "tokens": t}, s, n_boot=n_boot)
            if r:
                out.append(f"- {t:,} tokens, {s} ({relations.get(s, '?')}): "
                           + verdict_text(r, f"KD α={alpha:g}", "CE-only"))
    out.append("")
    if seeds:
        section, _ = budget_section(arms, sets, dense, alpha, budgets, seeds[0], n_boot, plot)
        if section:
            out += [f"## Budget curve (seed {seeds[0]})\n", section, ""]
            if plot is not None and plot.is_file():
                out += [f"![budget curve on the GPU]({plot.name})", ""]
    out.append("## Every model\n")
    out += [models_table(arms, sets, n_boot), ""]
    if study:
        rows = []
        for label, arm in arms.items():
            twin = study.get("arms", {}).get(label)
            if twin is None:
                continue
            for s in sets:
                if s in arm["sets"] and s in twin["sets"]:
                    r = paired_bootstrap(arm["sets"][s]["window_nll"], twin["sets"][s]["window_nll"],
                                         arm["sets"][s]["window_tokens"], n_boot=n_boot)
                    kept = (arm.get("kept") or {}).get("best_step"), (twin.get("kept") or {}).get("best_step")
                    rows.append(f"| {label} | {s} | {arm['sets'][s]['ppl']:.2f} | {twin['sets'][s]['ppl']:.2f} | "
                                f"{r['diff'].text()} | {_fmt_kept(kept)} |")
        if rows:
            out += ["## The same arms on the CPU (study.json): GPU − CPU, paired over the same windows\n",
                    "The CPU arms trained in fp32 without autocast; a difference here is what the GPU's bf16 autocast "
                    "(and its kernels) does to one arm, beside the KD − CE-only differences above.\n",
                    "| arm | set | PPL on GPU | PPL on CPU | GPU − CPU [95%] | kept step GPU / CPU |",
                    "|---|---|---|---|---|---|", *rows, ""]
    seconds = doc.get("seconds", {})
    if seconds:
        def per_step(stage: str) -> str:
            steps = (arms.get(stage.removeprefix("distill "), {}).get("kept") or {}).get("steps")
            return f"{seconds[stage] / steps:.3f}" if stage.startswith("distill ") and steps else "–"

        out += ["## Stage seconds\n", "A distill stage's seconds include loading the student and its validation "
                "passes; seconds per optimizer step are over the whole stage.\n",
                "| stage | seconds | seconds per step |", "|---|---|---|",
                *[f"| {k} | {v:.1f} | {per_step(k)} |" for k, v in seconds.items()], ""]
    return "\n".join(out)


def _fmt_kept(kept: tuple) -> str:
    return " / ".join("–" if k is None else str(k) for k in kept)
