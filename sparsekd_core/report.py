"""Every experiment report: Markdown sections, metric names, the study's verdicts and the PNG plots.

The one home of report rendering (the flows compose stages and hand their results here): plain data in, text,
metrics and PNGs out, no Prefect and no MLflow. Every perplexity printed here was measured by
``sparsekd_core.eval`` — nothing is estimated or filled in. Missing values print as "—".

Contents, top to bottom: formatting helpers (``table``, ``vs``, ``flat``); the sections every flow report shares
(header, GSM8K accuracy, registered models, plots and stages); one section per flow (dense-kd, iterative and its
profile, cascade, teacher swap, WANDA, selfdata, profile, multi-seed, paper); the study's verdicts and report; plots.
"""

from __future__ import annotations

import base64
import math
import re
import statistics
from pathlib import Path
from typing import Any, Callable, Iterable

from .files import write_file_atomic
from .relations import relations_of

# The study's verdict thresholds (their defaults; the study config's `verdict_*` fields decide them in a run):
# how much lower post-KD perplexity must be than pre-KD to count as "≪" (the paper's §IX-B wording), and how close
# a pruned model's post-KD perplexity must be to the dense model's to count as "comparable".
DEFAULT_MUCH_LOWER = 0.8
DEFAULT_COMPARABLE = 1.05


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    if isinstance(value, float):
        return f"{value:,.{digits}f}" if abs(value) < 1e5 else f"{value:.3g}"
    return str(value)


def table(headers: list[str], rows: Iterable[list[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def vs(value: float | None, reference: float | None) -> str:
    """Relative change in percent, e.g. '-12.3%' (negative = better perplexity)."""
    if value is None or reference is None or reference == 0:
        return "—"
    return f"{100.0 * (value - reference) / reference:+.1f}%"


def mean_std(values: list[float]) -> tuple[float, float]:
    clean = [v for v in values if v is not None and math.isfinite(v)]
    if not clean:
        return float("nan"), float("nan")
    return statistics.fmean(clean), (statistics.stdev(clean) if len(clean) > 1 else 0.0)


def flat(prefix: str, ppl: dict[str, float]) -> dict[str, float]:
    """One metric per eval set: ``flat("ppl_dense", {"wikitext2": 30.1})`` → ``{"ppl_dense_wikitext2": 30.1}``."""
    return {f"{prefix}_{name}": v for name, v in ppl.items()}


def metric_name(label: str) -> str:
    """A model label as part of a metric name: "pruned+kd teacher dense" → "pruned_kd_teacher_dense"."""
    return re.sub(r"[^A-Za-z0-9]+", "_", label).strip("_")


def metric_key(row: str, eval_set: str) -> str:
    """The study's metric name for a model row and an eval set (MLflow allows only some characters)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{row}.{eval_set}")


def pct(fraction: float | None) -> str:
    return "—" if fraction is None else f"{100 * fraction:.2f}%"


def _ppl_columns(names: list[str], ppl: dict[str, float], reference: dict[str, float] | None) -> list:
    """A row's perplexity cells, then (with a reference) the relative change to it per set."""
    return [*[ppl[n] for n in names], *([vs(ppl[n], reference[n]) for n in names] if reference is not None else [])]


# ---------------------------------------------------------------------------------------------------------------- every flow's report


def disjoint_line(checked: dict) -> str:
    """What the held-out check compared (``checks.check_held_out``'s result), one sentence; "" if not checked."""
    if not checked:
        return ""
    return (f"Eval sets and the validation text are disjoint from the KD corpus: {checked['eval_documents']:,} of "
            f"their documents checked against {checked['corpus_documents']:,} corpus documents (hashes of the "
            f"whitespace-normalised documents and paragraphs), {checked['shared']} shared.\n\n")


def flow_header(flow_name: str, model: str, seed: int, eval_cfg: dict, eval_sets: list[dict], corpus: dict,
                checked: dict) -> str:
    """The report's title and what every number below was measured on: protocol, eval sets, KD corpus."""
    from .config import MODEL_ALIASES, AccuracyConfig  # an unset max_problems is the accuracy stage's default

    sets = ", ".join(f"`{es['name']}` = {es['data']}" + (f" (first {es['max_tokens']} tokens)" if es.get("max_tokens")
                                                          else "")
                     + (f" (GSM8K accuracy, first {es.get('max_problems') or AccuracyConfig().max_problems} problems)"
                        if es.get("kind") == "gsm8k" else "")
                     for es in eval_sets)
    what = f"Model: `{model}` = {MODEL_ALIASES[model]}.\n\n" if model in MODEL_ALIASES else ""
    return (f"# {flow_name}: {model} (seed {seed})\n\n{what}"
            f"Perplexity: {eval_cfg['protocol']} protocol, ctx {eval_cfg['ctx']}, stride {eval_cfg['stride']}; "
            f"eval sets: {sets}. KD corpus: {corpus['data']}, {corpus['num_samples']}×{corpus['seq_len']} tokens, "
            f"top-{corpus['top_k']}.\n\n" + disjoint_line(checked))


def accuracy_section(accuracy: dict[str, dict[str, dict]]) -> tuple[str, dict[str, float]]:
    """GSM8K accuracy of every evaluated model ({model label: {set name: accuracy result}}), its retention
    (accuracy / the dense model's) and the reference solutions' log-likelihood; the section and its metrics."""
    if not accuracy:
        return "", {}
    from .downstream import retention

    dense = accuracy.get("dense", {})
    rows, metrics = [], {}
    for label, sets in accuracy.items():
        for name, r in sets.items():
            kept = retention(r["accuracy"], dense.get(name, {}).get("accuracy"))
            rows.append([label, name, r["accuracy"], f"{r['correct']}/{r['problems']}",
                         "—" if kept is None else f"{100 * kept:.0f}%", r["reference_loglik"]])
            metrics[f"acc_{metric_name(label)}_{name}"] = r["accuracy"]
            metrics[f"ref_loglik_{metric_name(label)}_{name}"] = r["reference_loglik"]
    return ("## Downstream accuracy (GSM8K)\n\nGreedy answers through the chat template, exact match on the "
            "final number; retention = accuracy / the dense model's (undefined when the dense model scores 0); "
            "reference log-likelihood = mean log-probability per token of the reference solution (nats; "
            "higher is better, it moves where accuracy cannot).\n\n"
            + table(["model", "set", "accuracy", "correct", "retention", "ref. log-lik"], rows)), metrics


def registry_section(registered: list[dict]) -> str:
    """The model versions a run registered ({name, version, url, checkpoint} each); "" if none."""
    if not registered:
        return ""
    rows = [[r["name"], r["version"], f"[open]({r['url']})" if r["url"] else "—", r["checkpoint"]]
            for r in registered]
    return ("## Registered models\n\nIn the MLflow Model Registry, with their lineage as tags (parent "
            "checkpoint, teacher cache, pruning, training config, eval results, checkpoint path).\n\n"
            + table(["registered model", "version", "MLflow", "checkpoint"], rows))


def flow_report(header: str, sections: list[str], plots: list[Path], stages: list[dict],
                plot_src: Callable[[Path], str] | None = None) -> str:
    """The whole report: header, sections, the plots and every stage with whether it ran or was reused.

    ``plot_src`` says where a reader's viewer loads each plot from. By default a plot is linked by its file name,
    for the copy that lies beside the PNGs (the report directory, a published folder); a copy read elsewhere (a
    Prefect artifact, MLflow's preview) needs an absolute source: ``png_data_uri`` or a server's URL."""
    src = plot_src or (lambda path: path.name)
    ran = sum(not s["cached"] for s in stages)
    stage_table = table(["stage", "cached", "seconds"], [[s["label"], s["cached"], s["seconds"]] for s in stages])
    head = header + "\n".join(sections) + "\n## Plots\n\n" + "".join(f"![{p.stem}]({src(p)})\n\n" for p in plots)
    if not stages:
        return head + "## Stages\n\nThis invocation reached no stage: it was built from results already published.\n"
    return head + f"## Stages ({ran} ran, {len(stages) - ran} reused from cache)\n\n" + stage_table


def png_data_uri(path: str | Path) -> str:
    """A PNG file inside the text: ``data:image/png;base64,...`` (about 4/3 of the file's size). Prefect's UIs show
    it as an image; MLflow's Markdown preview does not (it drops every image source but http(s))."""
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


# ---------------------------------------------------------------------------------------------------------------- one section per flow


def dense_kd_section(names: list[str], dense: dict[str, float], dense_kd: dict[str, float],
                     ce_only: dict[str, float] | None, kd_result: dict) -> tuple[str, dict[str, float]]:
    """Dense, Dense+KD and (when it ran) its CE-only twin per eval set; ``kd_result``: the Dense+KD distill result."""
    rows = [["Dense", *_ppl_columns(names, dense, None), *["—"] * len(names)],
            ["Dense+KD", *_ppl_columns(names, dense_kd, dense)]]
    if ce_only is not None:
        rows.append(["CE-only (α=0)", *_ppl_columns(names, ce_only, dense)])
    text = ("## Dense+KD vs its CE-only twin\n\nSame corpus, steps and seed; α=0 separates KD from domain "
            "adaptation.\n\n" + table(["model", *[f"PPL {n}" for n in names], *[f"vs dense {n}" for n in names]], rows)
            + f"\nKD term first → last: {_fmt(kd_result.get('kd_loss_first'), 4)} → "
            f"{_fmt(kd_result.get('kd_loss_last'), 4)}; steps: {kd_result.get('steps')}.\n")
    metrics = {**flat("ppl_dense", dense), **flat("ppl_dense_kd", dense_kd)}
    if ce_only is not None:
        metrics.update(flat("ppl_ce_only", ce_only))
    return text, metrics


# The paper's Table III (Qwen3-0.6B, WikiText-2, lm-eval protocol): round -> (sparsity, pre-KD PPL, post-KD PPL);
# dense 35.87. Another model and protocol: its ratios to dense are the pattern to compare, not its values.
PAPER_TABLE_III = {1: (0.15, 682.0, 21.06), 4: (0.35, 39.97, 24.92), 6: (0.51, None, 29.99), 8: (0.65, 47.34, 29.07)}
PAPER_TABLE_III_DENSE = 35.87


def beside_paper_table_iii(name: str, dense: float, rounds: list[dict]) -> str:
    """This run's rounds beside the paper's Table III rows of the same round and sparsity (when they match): each
    post-KD PPL as a ratio to its own dense model, since the paper's model (Qwen3-0.6B) is not this one."""
    rows = []
    for x in rounds:
        paper = PAPER_TABLE_III.get(x["round"])
        if paper is None or abs(paper[0] - x["mlp_reduction"]) > 0.02:
            continue
        sparsity, pre, post = paper
        rows.append([f"R{x['round']}", f"{100 * sparsity:.0f}%", x["pre"][name], x["post"][name],
                     f"{x['post'][name] / dense:.2f}×", "—" if pre is None else pre, post,
                     f"{post / PAPER_TABLE_III_DENSE:.2f}×"])
    if not rows:
        return ""
    return (f"\n### Beside the paper's Table III ({name})\n\nThe paper's rows are Qwen3-0.6B (dense 35.87, lm-eval "
            "protocol); compare the ratios to each model's own dense perplexity, not the values.\n\n"
            + table(["round", "MLP reduction", "pre-KD here", "post-KD here", "post / dense here", "paper pre-KD",
                     "paper post-KD", "paper post / dense"], rows))


def _kept_step(kept: tuple | None) -> str:
    """``best/steps`` (with the validation PPL at step 0 and at the kept step) or "—" when the round has no record."""
    if not kept or kept[0] is None:
        return "—"
    best, steps, start, best_ppl = kept
    text = f"{best}/{steps}"
    if start is not None and best_ppl is not None:
        text += f" (val {start:.1f} → {best_ppl:.1f})"
    return text


def iterative_section(names: list[str], dense: dict[str, float], rounds: list[dict],
                      keep_original_teacher: bool) -> tuple[str, dict[str, float]]:
    """Table III: per round ({round, mlp_reduction, pre, post} and, when known, ``kept``: the distill run's (best
    step, steps, validation PPL at step 0, best validation PPL)) the pre-KD and post-KD perplexities and which
    checkpoint the round kept; a round that kept step 0 is named, since its post-KD model is its pruned model."""
    headers = ["round", "MLP reduction", "kept step", *[f"pre-KD {n}" for n in names],
               *[f"post-KD {n}" for n in names], *[f"post vs dense {n}" for n in names]]
    rows = [[f"R{x['round']}", f"{100 * x['mlp_reduction']:.1f}%", _kept_step(x.get("kept")),
             *[x["pre"][n] for n in names], *_ppl_columns(names, x["post"], dense)] for x in rounds]
    teacher = "the dense model's cache every round" if keep_original_teacher else \
        "the previous round's recovered model (re-cached each round, as the paper does)"
    text = ("## Iterative pruning (Table III)\n\nDense: " + ", ".join(f"{n} {dense[n]:.2f}" for n in names)
            + f". Teacher: {teacher}. Each round keeps its best checkpoint on the validation text; `kept step` says "
            "which (0 = no step improved on the pruned weights).\n\n" + table(headers, rows))
    twinned = [x for x in rounds if x.get("ce")]
    if twinned:
        text += _ce_twin_table(names, twinned)
    never = [x for x in rounds if (x.get("kept") or (None,))[0] == 0]
    if never:
        text += ("\n**Rounds whose training never improved the validation perplexity** (their post-KD model is their "
                 "pruned model, so post-KD = pre-KD): "
                 + ", ".join(f"R{x['round']} (validation {x['kept'][2]:.1f} at step 0)" if x["kept"][2] is not None
                             else f"R{x['round']}" for x in never) + ".\n")
    if names:
        text += beside_paper_table_iii(names[0], dense[names[0]], rounds)
    metrics = flat("ppl_dense", dense)
    for x in rounds:
        metrics.update(flat(f"R{x['round']}_pre_kd", x["pre"]))
        metrics.update(flat(f"R{x['round']}_post_kd", x["post"]))
        if x.get("ce"):
            metrics.update(flat(f"R{x['round']}_ce_only", x["ce"]))
            metrics.update(flat(f"R{x['round']}_kd_minus_ce", {n: d.estimate for n, d in x["kd_vs_ce"].items()}))
    return text, metrics


def _ce_twin_table(names: list[str], rounds: list[dict]) -> str:
    """Per round, KD against its CE-only twin (same pruned student, tokens, seed; scored on the same windows): the
    KD effect, as opposed to the training effect (post-KD against pre-KD), with a paired 95% interval."""
    rows, lines = [], []
    for x in rounds:
        cells = []
        for n in names:
            d = x["kd_vs_ce"].get(n)
            cells.append("—" if d is None else d.text() + ("" if d.excludes_zero() else " nr"))
        rows.append([f"R{x['round']}", *[x["post"][n] for n in names], *[x["ce"][n] for n in names], *cells])
    for n in names:
        ds = [(x["round"], x["kd_vs_ce"][n]) for x in rounds if n in x["kd_vs_ce"]]
        lower = [f"R{r}" for r, d in ds if d.high < 0]
        higher = [f"R{r}" for r, d in ds if d.low > 0]
        tied = [f"R{r}" for r, d in ds if not d.excludes_zero()]
        lines.append(f"- {n}: KD lower than its CE-only twin in {', '.join(lower) or 'no round'}; higher in "
                     f"{', '.join(higher) or 'no round'}; not resolved (interval spans 0) in "
                     f"{', '.join(tied) or 'no round'}.")
    return ("\n### KD against its CE-only twin, per round\n\nEach round's CE-only twin (α = 0) trains the same pruned "
            "student on the same teacher-cache tokens with the same seed and steps; the next round starts from the "
            "KD model. KD − CE-only: PPL difference with a 95% paired bootstrap interval over the eval windows (both "
            "models scored on the same windows; one seed: the interval is over windows, not seeds); `nr` = not "
            "resolved.\n\n"
            + table(["round", *[f"KD {n}" for n in names], *[f"CE-only {n}" for n in names],
                     *[f"KD − CE-only {n}" for n in names]], rows) + "\n" + "\n".join(lines) + "\n")


def profile_rounds_section(results: list[dict], reductions: list[float],
                           profile_md: str) -> tuple[str, list[dict], dict[str, float]]:
    """Dense (model 0) vs each round's model (model i has MLP reduction ``reductions[i - 1]``): the section, the
    points of the speedup-vs-reduction plot and the prefill speedup metrics."""
    reduction = {0: 0.0, **dict(enumerate(reductions, 1))}
    points = [{**r, "mlp_reduction": reduction[r["model_index"]]} for r in results]
    metrics = {f"{r['model']}_b{r['batch_size']}_s{r['seq_len']}_prefill_speedup": r["speedup"] for r in results
               if r["model_index"]}
    device = results[0]["device"] if results else "?"
    text = (f"## Inference profile (Tables VII-VIII): dense vs each round, on {device}\n\n"
            "Prefill (TTFT) and per-token decode (TPOT) latency, time by module, FLOP ratio and the Amdahl bound "
            "(speedup if only the FFN shrinks). Timings are measurements of this machine at this moment: on a "
            "shared CPU they are noisy.\n\n" + profile_md)
    return text, points, metrics


def cascade_section(names: list[str], reduction: float, dense: dict[str, float], dense_kd: dict[str, float],
                    pruned: dict[str, float], pruned_kd: dict[str, float],
                    pruned_kd_dense_teacher: dict[str, float] | None = None) -> str:
    """Dense → Dense+KD → the pruned Dense+KD model before and after KD from the Dense+KD teacher (and, when the
    swap ran, from the dense teacher)."""
    rows = [["Dense", *_ppl_columns(names, dense, None)], ["Dense+KD", *_ppl_columns(names, dense_kd, None)],
            [f"Pruned ({100 * reduction:.1f}% MLP), pre-KD", *_ppl_columns(names, pruned, None)],
            ["Pruned+KD (teacher Dense+KD)", *_ppl_columns(names, pruned_kd, None)]]
    if pruned_kd_dense_teacher is not None:
        rows.append(["Pruned+KD (teacher Dense)", *_ppl_columns(names, pruned_kd_dense_teacher, None)])
    return "## Cascade: Dense → Dense+KD → Pruned+KD\n\n" + table(["model", *[f"PPL {n}" for n in names]], rows)


def teacher_swap_section(names: list[str], pruned: dict[str, float], from_dense: dict[str, float],
                         from_dense_kd: dict[str, float], dense: dict[str, float],
                         reduction: float | None = None) -> str:
    """Table IV: one pruned student, distilled from the original and from the KD-improved teacher."""
    rows = [["pruned, pre-KD", *_ppl_columns(names, pruned, dense)],
            ["KD from original (dense) teacher", *_ppl_columns(names, from_dense, dense)],
            ["KD from KD-improved (Dense+KD) teacher", *_ppl_columns(names, from_dense_kd, dense)]]
    heading = "## Teacher swap (Table IV)" if reduction is None else \
        f"## Teacher swap (Table IV): one student pruned to {100 * reduction:.1f}% MLP reduction"
    return heading + "\n\n" + table(["student", *[f"PPL {n}" for n in names], *[f"vs dense {n}" for n in names]], rows)


def wanda_section(names: list[str], dense: dict[str, float], arms: list[dict]) -> tuple[str, dict[str, float]]:
    """Table V: per sparsity ({sparsity, pre, post, zeros_pre, zeros_post}: the MLP zero fractions counted on the
    evaluated models) the perplexities before and after KD."""
    rows, metrics = [], flat("ppl_dense", dense)
    for a in arms:
        s = a["sparsity"]
        rows.append([f"{100 * s:.0f}%", pct(a["zeros_pre"]), pct(a["zeros_post"]), *[a["pre"][n] for n in names],
                     *_ppl_columns(names, a["post"], dense)])
        metrics.update({**flat(f"wanda{s}_pre_kd", a["pre"]), **flat(f"wanda{s}_post_kd", a["post"]),
                        f"wanda{s}_pre_kd_mlp_zero_fraction": a["zeros_pre"],
                        f"wanda{s}_post_kd_mlp_zero_fraction": a["zeros_post"]})
    text = ("## WANDA + KD (Table V)\n\nUnstructured: zeros are stored densely, so no speed or size gain without "
            "sparse kernels. MLP zeros are counted on each evaluated model; the mask is held through "
            "distillation.\n\n"
            + table(["target", "MLP zeros pre-KD", "MLP zeros post-KD", *[f"pre-KD {n}" for n in names],
                     *[f"post-KD {n}" for n in names], *[f"post vs dense {n}" for n in names]], rows))
    return text, metrics


def depth_label(drop_blocks: int, svd_target: float | None) -> str:
    return f"depth −{drop_blocks} blocks" + (f" + SVD {100 * svd_target:.0f}% MLP" if svd_target is not None else "")


def selfdata_section(names: list[str], pruned_label: str, dense: dict[str, float], pruned: dict[str, float],
                     arms: dict[str, dict[str, float]], num_samples: int, instructions: str, steps: int | str,
                     seed: int, rewrites: dict) -> tuple[str, dict[str, float]]:
    """Three recoveries of one pruned model on the same ``num_samples`` prompts of ``instructions``;
    ``rewrites``: the selfdata stage's {kept, records, dropped}."""
    rows = [["Dense", *_ppl_columns(names, dense, None), *["—"] * len(names)],
            [f"Pruned ({pruned_label}), no recovery", *_ppl_columns(names, pruned, dense)]]
    rows += [[arm, *_ppl_columns(names, ppl, dense)] for arm, ppl in arms.items()]
    text = (f"## Recovery of a depth-pruned model: SFT vs self-data SFT vs logit KD\n\n"
            f"Same {num_samples} prompts of {instructions}, same steps ({steps}) and seed ({seed}) for every arm. "
            f"Self-data: the dense model's rewrites, {rewrites['kept']} of {rewrites['records']} kept "
            f"({rewrites['dropped']} dropped by the answer filter); the self-data arm trains on the kept ones only.\n\n"
            + table(["model", *[f"PPL {n}" for n in names], *[f"vs dense {n}" for n in names]], rows))
    metrics = {**flat("ppl_dense", dense), **flat("ppl_pruned", pruned),
               "selfdata_kept": rewrites["kept"], "selfdata_dropped": rewrites["dropped"]}
    for arm, ppl in arms.items():
        metrics.update(flat("ppl_" + metric_name(arm), ppl))
    return text, metrics


def profile_report(model: str, compare: list[str], results: list[dict],
                   profile_md: str) -> tuple[str, str, dict[str, float]]:
    """The profile flow's header, its section and metrics (TTFT, TPOT, speedup per model, batch size, length)."""
    metrics = {f"m{r['model_index']}_b{r['batch_size']}_s{r['seq_len']}_{k}": r[k] for r in results
               for k in ("ttft_ms", "tpot_ms", "speedup")}
    header = (f"# profile: {model} vs {', '.join(compare) or 'nothing else'}\n\n"
              f"Baseline: {model}. Timings are measurements of this machine at this moment "
              f"({results[0]['device'] if results else '?'}); run it alone on an idle machine.\n\n")
    return header, "## Inference profile (Tables VII-VIII)\n\n" + profile_md, metrics


def multi_seed_section(flow_name: str, seeds: list[int], per_seed: dict[int, dict],
                       on_pool: bool) -> tuple[str, dict[str, float]]:
    """Mean ± std over seeds of every metric of the inner flow (``per_seed``: {seed: {metrics, report, and
    flow_run_id when ``on_pool``}})."""
    keys = sorted(set().union(*(r["metrics"] for r in per_seed.values())))
    rows, metrics = [], {}
    for k in keys:
        values = [per_seed[s]["metrics"].get(k) for s in seeds]
        mean, std = mean_std(values)
        metrics[f"{k}_mean"], metrics[f"{k}_std"] = mean, std
        rows.append([k, *values, f"{mean:.2f} ± {std:.2f}"])
    where = ("one deployment run per seed on the work pool: "
             + ", ".join(f"seed {s} = flow run {per_seed[s]['flow_run_id']}" for s in seeds)
             if on_pool else "subflows of this run")
    text = (f"## {flow_name} over seeds {seeds} (mean ± std)\n\nSeeds ran as {where}.\n\n"
            + table(["metric", *[f"seed {s}" for s in seeds], "mean ± std"], rows)
            + "\nPer-seed reports: " + ", ".join(f"[{s}]({per_seed[s]['report']})" for s in seeds) + "\n")
    return text, metrics


def paper_section(name: str, report_text: str, report_path: str) -> str:
    """A part of the paper flow: its report's sections (without its title, plots and stages) and a link to it."""
    body = report_text.split("\n## Plots")[0].split("\n", 2)[-1]
    return f"# {name}\n\n{body}\n(full report: {report_path})\n"


# ---------------------------------------------------------------------------------------------------------------- the study


def _two(x: float) -> str:
    """A verdict's number: always two decimals (the evidence quotes perplexities as measured)."""
    return f"{x:.2f}"


def verdicts(ppl: dict[str, dict[str, float]], primary: str, others: list[str],
             seeds: dict[str, list[float]] | None = None, much_lower: float = DEFAULT_MUCH_LOWER,
             comparable: float = DEFAULT_COMPARABLE, relations: dict[str, str] | None = None,
             wanda: dict[float, dict[str, dict[str, float]]] | None = None) -> list[dict]:
    """The paper's §IX-B criteria (for the SVD rounds and, with ``wanda``, for WANDA) and "KD beats CE-only", judged
    from perplexities.

    ``ppl``: {row: {eval set: PPL}} with rows ``dense``, ``dense+kd``, ``ce-only``, ``R<i> pre``/``R<i> post``
    (rounds in order), optionally ``R1 ce-only``, ``oneshot kd`` and ``oneshot ce-only``. ``primary``: the set the
    paper's criteria are judged on (WikiText-2). ``seeds``: {eval set: the R1 Pruned+KD perplexity of every seed,
    the CE-only twin's seed first}: KD is compared with CE-only at that seed only (the other seeds are quoted, never
    averaged against the one CE-only run). ``relations``: {eval set: its relation to the KD corpus}
    (``sparsekd_core.relations``), the words every KD-vs-CE line uses. ``wanda``: {sparsity: {"pre": {set: PPL},
    "post": {set: PPL}}}. Thresholds: post-KD ≪ pre-KD means post ≤ ``much_lower`` × pre; "comparable to dense"
    means ≤ ``comparable`` × dense. Returns one {criterion, holds, evidence} per criterion; ``holds`` is True, False,
    or None where the rows are missing."""
    sets = [primary, *others]
    relations = relations or {}
    rounds = sorted({int(k[1:].split()[0]) for k in ppl if k.startswith("R") and k.endswith(" post")})
    out = []

    def add(criterion: str, holds: bool | None, evidence: str) -> None:
        out.append({"criterion": criterion, "holds": holds, "evidence": evidence})

    pairs = [(ppl[f"R{r} pre"][primary], ppl[f"R{r} post"][primary]) for r in rounds]
    add(f"post-KD ≪ post-prune (every round's post-KD {primary} PPL at most {much_lower:.0%} of its pre-KD PPL)",
        all(post <= much_lower * pre for pre, post in pairs) if pairs else None,
        "; ".join(f"R{r}: {_two(pre)} → {_two(post)} ({post / pre:.0%})" for r, (pre, post) in zip(rounds, pairs)))
    if rounds:
        dense, first = ppl["dense"][primary], ppl[f"R{rounds[0]} post"][primary]
        add(f"low-sparsity post-KD comparable to or better than dense (R{rounds[0]} post-KD ≤ {comparable:.2f}× dense "
            f"on {primary})", first <= comparable * dense,
            f"R{rounds[0]} post-KD {_two(first)} vs dense {_two(dense)} ({first / dense:.2f}×)")
        for s in sets:
            posts = [ppl[f"R{r} post"][s] for r in rounds]
            add(f"monotonic degradation with sparsity ({s}: post-KD PPL rises round by round)",
                all(b >= a for a, b in zip(posts, posts[1:])),
                " → ".join(f"R{r} {_two(p)}" for r, p in zip(rounds, posts)))
    if wanda:
        order = sorted(wanda)
        rows = [(s, wanda[s]["pre"][primary], wanda[s]["post"][primary]) for s in order]
        add(f"WANDA: post-KD ≪ post-prune (every sparsity's post-KD {primary} PPL at most {much_lower:.0%} of its "
            "pre-KD PPL)", all(post <= much_lower * pre for _, pre, post in rows),
            "; ".join(f"{s:.0%}: {_two(pre)} → {_two(post)} ({post / pre:.0%})" for s, pre, post in rows))
        low, post = order[0], wanda[order[0]]["post"][primary]
        dense = ppl["dense"][primary]
        add(f"WANDA: low-sparsity post-KD comparable to or better than dense ({low:.0%} post-KD ≤ {comparable:.2f}× "
            f"dense on {primary})", post <= comparable * dense,
            f"WANDA {low:.0%} post-KD {_two(post)} vs dense {_two(dense)} ({post / dense:.2f}×)")
    for s in sets:
        d, kd = ppl["dense"][s], ppl["dense+kd"][s]
        add(f"Dense+KD better than dense ({s})", kd < d, f"Dense+KD {_two(kd)} vs dense {_two(d)} ({kd / d - 1:+.1%})")
    for kd_row, ce_row, what in (("dense+kd", "ce-only", "dense"), ("R1 post", "R1 ce-only", "R1 pruned"),
                                 ("oneshot kd", "oneshot ce-only", "one-shot pruned")):
        if kd_row not in ppl or ce_row not in ppl:
            continue
        for s in sets:
            kd, ce = ppl[kd_row][s], ppl[ce_row][s]
            criterion = f"KD beats CE-only, {what}, {relations.get(s, 'relation to the corpus not stated')} ({s})"
            evidence = f"KD {_two(kd)} vs CE-only {_two(ce)} at the same seed ({kd / ce - 1:+.1%})"
            runs = (seeds or {}).get(s) if what == "R1 pruned" else None
            if runs and len(runs) > 1:  # quoted beside, never averaged against the one CE-only run
                evidence += (f"; KD at the other {len(runs) - 1} seeds: {', '.join(_two(x) for x in runs[1:])} (no "
                             "CE-only twin at those seeds: not compared)")
            add(criterion, kd < ce, evidence)
    return out


def verdict_lines(found: list[dict]) -> str:
    label = {True: "**holds**", False: "**does not hold**", None: "not measured"}
    return "".join(f"- {v['criterion']}: {label[v['holds']]} — {v['evidence']}\n" for v in found)


REJUDGED = "Judged again by"


def rejudged_report(text: str, eval_sets: str, found: list[dict], note: str) -> str:
    """A published study report with its verdict lines replaced by ``found`` and its "Eval sets" line by
    ``eval_sets``, followed by one "Judged again by <note>" line (an earlier one is dropped); the rest as it was."""
    lines = [eval_sets if line.startswith("- **Eval sets**: ") else line
             for line in text.split("\n") if not line.startswith(REJUDGED)]
    if "## Verdicts" not in lines:
        raise ValueError("the report has no '## Verdicts' section to replace")
    first = lines.index("## Verdicts") + 1
    while first < len(lines) and not lines[first].startswith("- "):
        first += 1
    last = first
    while last < len(lines) and lines[last].startswith("- "):
        last += 1
    while last < len(lines) and not lines[last].strip():  # the blank lines after them (and after an earlier note)
        last += 1
    lines[first:last] = [*verdict_lines(found).rstrip("\n").split("\n"), "", f"{REJUDGED} {note}", ""]
    return "\n".join(lines)


def training_budget(distill: Any, corpus: Any) -> str:
    """What one trained arm may spend: steps × batch × sequence length, or (no ``max_steps``) epochs over the
    corpus. ``distill``/``corpus``: the flow config's sections (early stopping may end an arm sooner)."""
    if distill.max_steps is not None:
        tokens = distill.max_steps * distill.batch_size * corpus.seq_len
        return f"{distill.max_steps} steps × batch {distill.batch_size} × {corpus.seq_len} tokens = {tokens:,} tokens"
    tokens = distill.epochs * corpus.num_samples * corpus.seq_len
    return (f"{distill.epochs} epoch(s) over the {corpus.num_samples}×{corpus.seq_len}-token corpus, batch "
            f"{distill.batch_size} = {tokens:,} tokens")


def study_header(model: str) -> str:
    return f"# Study: {model}\n\n"


def eval_sets_line(config: Any) -> str:
    """The study report's "Eval sets" line: each set's data and size, the protocol, the set the paper's criteria are
    judged on, and each set's relation to the KD corpus (``sparsekd_core.relations``)."""
    names = [es.name for es in config.eval_sets if es.kind == "perplexity"]
    relations = relations_of(config.corpus.data, config.eval_sets)
    return (
        "- **Eval sets**: " + ", ".join(f"`{es.name}` = {es.data}" + (f" (first {es.max_tokens} tokens)"
                                                                      if es.max_tokens else "")
                                        for es in config.eval_sets)
        + f"; {config.eval.protocol} protocol (ctx {config.eval.ctx}, stride {config.eval.stride}). The paper's "
          f"criteria are judged on `{names[0]}`. Relation to the KD corpus: "
        + ", ".join(f"`{n}` {r}" for n, r in relations.items())
        + " (held-out documents: other documents of a source the corpus draws from, so not out of domain; checked: "
          "no document or paragraph shared with the corpus).")


def study_report(config: Any, ppl: dict[str, dict[str, float]], found: list[dict], rounds: list[dict],
                 seed_rows: dict[int, dict[str, float]], standard: float | None, paper_metrics: dict[str, float],
                 stages: list[dict], kept: dict[str, tuple], environment: str, t_paper: float, t_extra: float,
                 command: str = "python -m flows.study --config CONFIG --out DIR") -> str:
    """The study's self-judging report (without its title).

    ``config``: the study's config (its sections are read for the settings the report states); ``ppl``: {model
    row: {eval set: PPL}}; ``found``: ``verdicts``; ``rounds``: {round, mlp_reduction} per iterative round;
    ``seed_rows``: {seed: R1 Pruned+KD PPL per set}; ``standard``: the dense model's standard-protocol PPL or None;
    ``paper_metrics``: the paper flow's metrics; ``stages``: every stage the paper flow and the study reached (the
    paper flow's first); ``kept``: {row: (best step, steps, val PPL at start, best val PPL)} of the trained arms;
    ``environment``: code version, Python, CPU cores; ``t_paper``/``t_extra``: wall seconds of the two parts."""
    names = [es.name for es in config.eval_sets if es.kind == "perplexity"]
    d = config.distill
    dense = ppl["dense"]
    lines = [
        "Generated by `flows/study.py` (not written by hand): the `paper` flow at the committed config, the arms it "
        "lacks, and verdicts computed from the numbers below. Regenerate (a rerun reuses every finished stage):\n",
        f"    {command}\n",
        f"- **Budget per trained arm**: {training_budget(d, config.corpus)} "
        f"(lr {d.lr:g}, T {d.temperature:g}, α {d.alpha:g}, tail {d.tail}); KD corpus "
        f"{config.corpus.data}, {config.corpus.num_samples}×{config.corpus.seq_len} tokens, top-{config.corpus.top_k}.",
        eval_sets_line(config),
        f"- **Code version**: {environment}; dtype {config.dtype}, device {config.device}.",
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

    rows = [[label, kept_step(label), *[sets[n] for n in names], *[vs(sets[n], dense[n]) for n in names]]
            for label, sets in ppl.items()]
    lines.append(table(["model", "kept step", *[f"PPL {n}" for n in names], *[f"vs dense {n}" for n in names]], rows))
    never = [label for label, k in kept.items() if k[0] == 0]
    if never:
        lines.append("\n**Arms whose training never improved the validation perplexity** (their model is their "
                     "starting model, and their row repeats it): " + ", ".join(f"`{x}`" for x in never) + ".\n")
    tails = [(d.tail, "dense+kd")] + [(t, f"dense+kd tail={t}") for t in config.tails
                                      if t != d.tail and f"dense+kd tail={t}" in ppl]
    lines.append("\n## Dense+KD per KD tail, beside the CE-only twin (α = 0: the same for every tail)\n")
    lines.append(table(["arm", *[f"PPL {n}" for n in names], *[f"vs CE-only {n}" for n in names]],
                       [[f"Dense+KD tail={t}", *[ppl[row][n] for n in names],
                         *[vs(ppl[row][n], ppl["ce-only"][n]) for n in names]] for t, row in tails]
                       + [["CE-only", *[ppl["ce-only"][n] for n in names], *["—"] * len(names)],
                          ["Dense", *[dense[n] for n in names], *[vs(dense[n], ppl["ce-only"][n]) for n in names]]]))
    lines.append("\n## Iterative rounds (teacher: the previous round's recovered model, re-cached)\n")
    lines.append(table(["round", "MLP reduction", *[f"pre-KD {n}" for n in names], *[f"post-KD {n}" for n in names]],
                       [[f"R{x['round']}", f"{100 * x['mlp_reduction']:.1f}%",
                         *[ppl[f"R{x['round']} pre"][n] for n in names],
                         *[ppl[f"R{x['round']} post"][n] for n in names]] for x in rounds]))
    last = f"R{rounds[-1]['round']}"
    if f"{last} post, dense teacher" in ppl:
        lines.append(f"\n## Teacher swap at the last round: {last}'s pruned student from each teacher\n")
        lines.append(table(["teacher", *[f"PPL {n}" for n in names]],
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
        lines.append(table(["student", "arm", *[f"PPL {n}" for n in names], *[f"KD vs CE-only {n}" for n in names]],
                           [row for a, b, what in pairs for row in (
                               [what, "KD", *[ppl[a][n] for n in names], *[vs(ppl[a][n], ppl[b][n]) for n in names]],
                               [what, "CE-only", *[ppl[b][n] for n in names], *["—"] * len(names)])]))
    if len(seed_rows) > 1:
        lines.append(f"\n## Seeds: R1 Pruned+KD, seeds {', '.join(map(str, seed_rows))}\n")
        lines.append(table(["eval set", "mean", "std", *[f"seed {s}" for s in seed_rows]],
                           [[n, statistics.mean(v[n] for v in seed_rows.values()),
                             statistics.stdev(v[n] for v in seed_rows.values()),
                             *[v[n] for v in seed_rows.values()]] for n in names]))
    probes = [lr for lr in config.lr_probe if f"R1 post lr={lr:g}" in ppl]
    if probes:
        others = ", ".join(f"{x:g}" for x in probes)
        lines.append(f"\n## Learning rate: R1 Pruned+KD at lr {d.lr:g} (the config's) and {others}\n")
        lines.append(table(["lr", *[f"PPL {n}" for n in names]],
                           [[f"{d.lr:g}", *[ppl["R1 post"][n] for n in names]]]
                           + [[f"{lr:g}", *[ppl[f"R1 post lr={lr:g}"][n] for n in names]] for lr in probes]))
    wanda = {k: v for k, v in paper_metrics.items() if k.startswith("wanda.") and "zero_fraction" in k}
    if wanda:
        lines.append("\n## WANDA: MLP zeros counted on the evaluated models (after KD the mask must hold)\n")
        lines.append(table(["metric", "value"], [[k, f"{100 * v:.2f}%"] for k, v in sorted(wanda.items())]))
    lines.append("\n## The paper flow's own report\n\nIts sections (Dense+KD vs CE-only, Table III, cascade, teacher "
                 "swap, WANDA with sparsity after KD, the profile of dense vs each round) are in "
                 "[paper-report.md](paper-report.md).\n")
    lines.append(stage_seconds_section(stages))
    return "\n".join(lines)


def stage_seconds_section(stages: list[dict]) -> str:
    """Seconds per stage kind, each distinct stage (by key) once, with the seconds it took when it ran."""
    by_kind: dict[str, list[float]] = {}
    seen, ran, earlier = set(), 0, 0
    for s in stages:
        ran += not s["cached"] and not s.get("earlier")
        earlier += bool(s.get("earlier")) and s["key"] not in seen
        if s["key"] in seen:  # a stage reached twice (e.g. the paper flow's, reached again by the study)
            continue
        seen.add(s["key"])
        by_kind.setdefault(s["label"].split(": ")[-1].split()[0], []).append(float(s["seconds"] or 0))
    total = sum(sum(v) for v in by_kind.values())
    return (f"\n## Seconds per stage kind\n\nEach distinct stage once, with the seconds it took when it ran "
            f"(a stage's manifest keeps them): {total / 60:.1f} min of stage compute in all. This invocation ran "
            f"{ran} stage(s) and reused the others from their manifests"
            + (f" ({earlier} were made by earlier invocations and published with their results)" if earlier else "")
            + ".\n\n"
            + table(["stage", "runs", "seconds", "mean"],
                    [[k, len(v), f"{sum(v):.0f}", f"{sum(v) / len(v):.1f}"] for k, v in sorted(by_kind.items())]))


# ---------------------------------------------------------------------------------------------------------------- compare


def mlp_target_for_budget(budget: float, total_params: int, mlp_params: int) -> float:
    """The MLP-relative reduction that removes ``budget`` of ALL parameters when only MLP parameters are cut:
    budget · total / MLP (e.g. 10% of SmolLM2-135M's 134.5M parameters is 22.6% of its 79.6M MLP parameters)."""
    return budget * total_params / mlp_params


def blocks_for_budget(budget: float, total_params: int, block_params: int, num_layers: int) -> int:
    """The decoder-block count whose parameters are nearest ``budget`` of all parameters (at least 1, and at least
    one block kept)."""
    return max(1, min(num_layers - 1, round(budget * total_params / block_params)))


def achieved_total_reduction(counts: dict, dense_total: int) -> float:
    """Fraction of the dense model's parameters gone, counted on the evaluated model (``measured_compression``):
    by nonzero entries for an unstructured (WANDA) model, whose zeros are still stored, by parameters otherwise."""
    kept = counts["total_nonzero"] if counts.get("counted") == "nonzero entries" else counts["total_params"]
    return 1 - kept / dense_total


def compare_speeds(results: list[dict]) -> dict[str, dict[int, dict[str, float]]]:
    """{model label: {batch size: {"prefill", "decode"} tokens/s}} from the profile stage's rows, at its first
    prompt length (prefill = batch·prompt / TTFT; decode = batch / TPOT; medians of the repeats)."""
    first_len = results[0]["seq_len"] if results else None
    out: dict[str, dict[int, dict[str, float]]] = {}
    for r in results:
        if r["seq_len"] == first_len:
            out.setdefault(r["model"], {})[r["batch_size"]] = {"prefill": r["tokens_per_s"],
                                                               "decode": r["decode_tokens_per_s"]}
    return out


def compare_verdicts(rows: list[dict], eval_name: str, batch_sizes: list[int]) -> dict[str, dict | None]:
    """From one budget's rows (``compare_section``): ``best`` = lowest post-KD perplexity on ``eval_name``;
    ``fastest`` = highest decode tokens/s at the smallest batch (the one-user latency case); None without numbers."""
    def finite(v: Any) -> bool:
        return isinstance(v, (int, float)) and math.isfinite(v)

    scored = [r for r in rows if finite(r["kd"].get(eval_name))]
    batch = min(batch_sizes)
    timed = [r for r in rows if finite(r["speed"].get(batch, {}).get("decode"))]
    return {"best": min(scored, key=lambda r: r["kd"][eval_name]) if scored else None,
            "fastest": max(timed, key=lambda r: r["speed"][batch]["decode"]) if timed else None}


def _mib(n: int | None) -> str:
    if n is None:
        return "—"
    return f"{n / 2**20:,.1f} MiB" if n >= 2**20 else f"{n / 2**10:,.1f} KiB"


def compare_section(names: list[str], dense: dict, budgets: dict[float, list[dict]],
                    batch_sizes: list[int]) -> tuple[str, dict[str, float]]:
    """One table per budget and its two computed lines. ``dense``: {"ppl", "weights_bytes", "speed"}; each row:
    {"method", "setting", "total_reduction", "weights_bytes", "pre", "kd", "ce" ({set: PPL}), "speed" ({batch:
    {"prefill", "decode"}}), "note"}. The best/fastest lines are computed from the same rows (``compare_verdicts``)."""
    def speed_cells(speed: dict) -> list:
        return [x for b in batch_sizes for x in (speed.get(b, {}).get("prefill"), speed.get(b, {}).get("decode"))]

    headers = ["method", "size", "total removed", "weights file", *[f"pre-KD {n}" for n in names],
               *[f"KD {n}" for n in names], *[f"CE-only {n}" for n in names],
               *[h for b in batch_sizes for h in (f"prefill tok/s b{b}", f"decode tok/s b{b}")], "note"]
    blank = ["—"] * len(names)
    first = names[0]
    parts = ["## Compare: every method at the same size, recovered by KD and by CE-only\n\n"
             "Budgets are fractions of ALL the dense model's parameters. SVD, width and WANDA are sized from the MLP "
             "share of the model; depth removes the whole-block count nearest the budget; WANDA 2:4 is fixed at half "
             "of the MLP weights. `total removed` is counted on the evaluated model (zeros for WANDA, whose weights "
             "file keeps them: no size gain, and on CPU no speed gain, without sparse kernels). KD and CE-only train "
             "on the same tokens with the same seed. Tokens/s are medians of the profile stage on this machine.\n\n"]
    metrics = flat("ppl_dense", dense["ppl"])
    for budget, rows in budgets.items():
        table_rows = [["dense", "—", pct(0.0), _mib(dense.get("weights_bytes")), *[dense["ppl"][n] for n in names],
                       *blank, *blank, *speed_cells(dense["speed"]), ""]]
        for r in rows:
            table_rows.append([r["method"], r["setting"], pct(r["total_reduction"]), _mib(r["weights_bytes"]),
                               *[r["pre"][n] for n in names], *[r["kd"][n] for n in names],
                               *[r["ce"][n] for n in names], *speed_cells(r["speed"]), r.get("note", "")])
            key = metric_name(f"b{100 * budget:g} {r['method']}")
            metrics.update({**flat(f"{key}_pre_kd", r["pre"]), **flat(f"{key}_kd", r["kd"]),
                            **flat(f"{key}_ce_only", r["ce"]), f"{key}_total_reduction": r["total_reduction"]})
        found = compare_verdicts(rows, first, batch_sizes)
        best, fastest, b = found["best"], found["fastest"], min(batch_sizes)
        lines = [f"**Best after recovery ({pct(budget)} budget):** "
                 + (f"{best['method']}: KD PPL {first} {_fmt(best['kd'][first])} (CE-only {_fmt(best['ce'][first])}, "
                    f"pre-KD {_fmt(best['pre'][first])}), {pct(best['total_reduction'])} of all parameters removed."
                    if best else "no perplexity."),
                 f"**Fastest ({pct(budget)} budget):** "
                 + (f"{fastest['method']}: decode {_fmt(fastest['speed'][b]['decode'], 1)} tok/s at batch {b} "
                    f"(dense {_fmt(dense['speed'].get(b, {}).get('decode'), 1)}), prefill "
                    f"{_fmt(fastest['speed'][b]['prefill'], 1)} tok/s, {pct(fastest['total_reduction'])} removed."
                    if fastest else "not measured.")]
        parts.append(f"### Budget: {pct(budget)} of all parameters\n\n" + table(headers, table_rows) + "\n"
                     + "\n\n".join(lines) + "\n\n")
    return "".join(parts), metrics


def pareto_front(points: list[tuple[float, float]], higher_x_is_better: bool) -> list[tuple[float, float]]:
    """The points no other point beats on both axes (lower y is better), sorted by x."""
    sign = 1 if higher_x_is_better else -1
    front = [p for p in points if not any(sign * q[0] >= sign * p[0] and q[1] <= p[1] and q != p for q in points)]
    return sorted(front)


def plot_compare_pareto(points: list[dict], eval_name: str, batch: int, path: str | Path) -> None:
    """Post-KD perplexity against parameters removed and against measured decode tokens/s at ``batch``, one
    marker per method, its Pareto front dashed. ``points``: {"label", "method", "total_reduction", "ppl",
    "decode"} (dense included as total_reduction 0)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, x_key, xlabel, higher in ((axes[0], "total_reduction", "parameters removed (% of total)", True),
                                      (axes[1], "decode", f"decode tokens/s (batch {batch})", True)):
        usable = [p for p in points if p.get(x_key) is not None and p.get("ppl") is not None]
        scale = 100 if x_key == "total_reduction" else 1
        for method in dict.fromkeys(p["method"] for p in usable):
            mine = [p for p in usable if p["method"] == method]
            ax.plot([scale * p[x_key] for p in mine], [p["ppl"] for p in mine], "o", label=method)
        front = pareto_front([(scale * p[x_key], p["ppl"]) for p in usable], higher)
        if len(front) > 1:
            ax.plot([x for x, _ in front], [y for _, y in front], "--", color="grey", lw=0.8, label="Pareto front")
        for p in usable:
            ax.annotate(p["label"], (scale * p[x_key], p["ppl"]), fontsize=6, xytext=(3, 3),
                        textcoords="offset points")
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"perplexity after KD ({eval_name}; dense as is)")
    if axes[0].get_legend_handles_labels()[0]:
        axes[0].legend(fontsize=7)
    _save(fig, path)


# ---------------------------------------------------------------------------------------------------------------- plots


def plot_ppl_vs_reduction(rounds: list[dict], eval_name: str, dense_ppl: float | None, path: str | Path) -> None:
    """Pre-KD and post-KD perplexity vs MLP reduction, log scale, dense as a horizontal line."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [100 * r["mlp_reduction"] for r in rounds]
    ax.plot(xs, [r["pre"].get(eval_name) for r in rounds], "o--", label="pre-KD")
    ax.plot(xs, [r["post"].get(eval_name) for r in rounds], "o-", label="post-KD")
    if dense_ppl is not None:
        ax.axhline(dense_ppl, color="grey", lw=0.8, label="dense")
    ax.set_yscale("log")
    ax.set_xlabel("MLP parameter reduction (%)")
    ax.set_ylabel(f"perplexity ({eval_name})")
    ax.legend()
    _save(fig, path)


def plot_recovery(curves: dict[str, list[tuple[int, float]]], path: str | Path) -> None:
    """Validation perplexity over KD steps, one line per arm/round."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, points in curves.items():
        if points:
            ax.plot([p[0] for p in points], [p[1] for p in points], "o-", ms=3, label=name)
    ax.set_yscale("log")
    ax.set_xlabel("distillation step")
    ax.set_ylabel("validation perplexity")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    _save(fig, path)


def plot_speedup_vs_reduction(points: list[dict], path: str | Path) -> None:
    """Prefill speedup vs MLP reduction, one line per batch size, beside its Amdahl bound (dashed).
    ``points``: {"mlp_reduction", "batch_size", "speedup", "amdahl_bound"} per model and batch size."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for batch in sorted({p["batch_size"] for p in points}):
        cells = sorted((p for p in points if p["batch_size"] == batch), key=lambda p: p["mlp_reduction"])
        xs = [100 * p["mlp_reduction"] for p in cells]
        line, = ax.plot(xs, [p["speedup"] for p in cells], "o-", label=f"batch {batch} measured")
        ax.plot(xs, [p["amdahl_bound"] for p in cells], "--", color=line.get_color(), label=f"batch {batch} bound")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xlabel("MLP parameter reduction (%)")
    ax.set_ylabel("prefill speedup vs dense")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    _save(fig, path)


def _save(fig, path: str | Path) -> None:
    fig.tight_layout()
    write_file_atomic(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    _pyplot().close(fig)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
