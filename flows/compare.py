"""The compare flow: every pruning method at the same share of ALL parameters removed, each recovered by KD and
by its CE-only twin (same tokens and seed), evaluated on every eval set and profiled beside the dense model.

It composes the same stage tasks as the other flows (flows/context.py ``Run``) with the same fields, so a student
another flow pruned is the same stage here. The table, the computed best/fastest lines and the Pareto plot are
sparsekd_core/report.py's (``compare_section``, ``plot_compare_pareto``). It lives in a module of its own, as the
study does, and joins the others in flows/registry.py.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow
from pydantic.json_schema import SkipJsonSchema

from sparsekd_core import report as rep

from .configs import CompareConfig, DepthSection, PruneSection
from .context import Run, start
from .experiments import _dense_and_cache, _set_names

__all__ = ["compare_flow"]


def _compare_prune_fields(run: Run, dense: dict, dense_counts: dict, budget: float,
                          method: str) -> tuple[dict, str]:
    """The prune stage's fields for ``method`` at ``budget`` of all parameters, and how the table names its size.
    Each has the shape the flow that owns the method gives it (iterative: the whole PruneSection; wanda: its
    calibration; selfdata: DepthSection), so a student pruned by another flow is the same stage here."""
    calibration = run.cfg.prune.model_dump()
    total, mlp = dense_counts["total_params"], dense_counts["mlp_params"]
    mlp_target = rep.mlp_target_for_budget(budget, total, mlp)
    if method in ("svd", "width", "wanda") and not 0 < mlp_target < 1:
        raise ValueError(f"budgets: {budget} of all parameters is {mlp_target:.2f} of the MLP parameters "
                         f"({mlp:,} of {total:,}); {method} can remove less than all of them")
    if method == "svd":
        return ({**PruneSection(**calibration).model_dump(), "target_reduction": mlp_target},
                f"MLP −{rep.pct(mlp_target)} (whitened, tiered)")
    if method == "width":
        return ({**PruneSection(**calibration).model_dump(), "method": "width", "target_reduction": mlp_target},
                f"MLP −{rep.pct(mlp_target)} (uniform)")
    if method == "wanda":
        return {"method": "wanda", "target_reduction": mlp_target}, f"MLP zeros {rep.pct(mlp_target)}"
    if method == "wanda-2:4":
        return {"method": "wanda", "pattern": "2:4", "target_reduction": 0.5}, "2:4 (50% of MLP weights zero)"
    # depth: one block's parameters, measured by pruning one block (a cached stage, reused when one is nearest)
    depth = DepthSection(**calibration).model_dump()
    probe = run.prune(dense, None, "depth 1 (block size)", **depth, method="depth", drop_blocks=1)["result"]
    layers = probe["num_layers_before"]
    blocks = rep.blocks_for_budget(budget, total, probe["total_params_before"] - probe["total_params_after"], layers)
    return {**depth, "method": "depth", "drop_blocks": blocks}, f"{blocks} of {layers} blocks"


def _weights_bytes(spec: str) -> int | None:
    """The checkpoint's weights files (*.safetensors) in bytes; None for a hub id or a .gguf file."""
    directory = Path(spec)
    if not directory.is_dir():
        return None
    return sum(f.stat().st_size for f in directory.glob("*.safetensors")) or None


def _compare_arm(run: Run, dense: dict, dense_cache: dict, dense_counts: dict, budget: float, method: str) -> dict:
    """One method at one budget: prune, evaluate, KD and its CE-only twin (same tokens and seed), evaluate both."""
    fields, setting = _compare_prune_fields(run, dense, dense_counts, budget, method)
    tag = f"{method} {100 * budget:g}%"
    rid = run.arm(f"{method}-{100 * budget:g}", budget=budget, method=method)
    pruned = run.prune(dense, rid, tag, **fields)
    pre = run.evaluate(pruned["model"], rid, f"{tag} pre-KD", prefix="pre_kd_")
    kd = run.distill(pruned["model"], dense_cache, rid, f"{tag} KD")
    kd_ppl = run.evaluate(kd["model"], rid, f"{tag} KD", prefix="kd_")
    ce = run.distill(pruned["model"], dense_cache, rid, f"{tag} CE-only", alpha=0.0)
    ce_ppl = run.evaluate(ce["model"], rid, f"{tag} CE-only", prefix="ce_only_")
    run.register(f"{method}-{100 * budget:g}-kd", kd, rid, kd_ppl, parent=dense, pruned=pruned)
    run.end(rid)
    achieved = rep.achieved_total_reduction(run.counts[f"{tag} KD"], dense_counts["total_params"])
    note = ""
    if method.startswith("wanda"):
        note = "zeros counted; the weights file does not shrink"
    if method == "wanda-2:4":  # the profile stage runs every model's dense kernels, on a GPU too (for now)
        note += "; timed with dense kernels, not 2:4 sparse ones: accounted, not accelerated"
    if abs(achieved - budget) > 0.005:
        note = (note + "; " if note else "") + f"{rep.pct(achieved)} removed vs the {rep.pct(budget)} budget"
    return {"method": method, "setting": setting, "label": f"{100 * budget:g}% {method}",
            "total_reduction": achieved, "weights_bytes": _weights_bytes(pruned["model"]["spec"]),
            "pre": pre, "kd": kd_ppl, "ce": ce_ppl, "model": kd["model"], "note": note}


@flow(name="compare")
def compare_flow(config: CompareConfig, parent_run_id: SkipJsonSchema[str | None] = None) -> dict:
    """Every method at each budget of total parameters removed, recovered by KD and by its CE-only twin, profiled
    beside the dense model: one table per budget, a Pareto plot, and the computed best and fastest per budget."""
    with start(config, "compare", parent_run_id) as run:
        names = _set_names(config)
        dense, dense_ppl, dense_cache = _dense_and_cache(run)
        dense_counts = run.counts["dense"]
        budgets = {b: [_compare_arm(run, dense, dense_cache, dense_counts, b, m) for m in config.methods]
                   for b in config.budgets}
        rows = [r for arms in budgets.values() for r in arms]
        rid = run.arm("profile")
        models = [{**dense, "label": "dense"}, *[{**r["model"], "label": r["label"]} for r in rows]]
        profiled = run.profile(models, rid, "dense vs every method", config.profile_settings.model_dump())
        run.end(rid)
        speeds = rep.compare_speeds(profiled["result"]["results"])
        for r in rows:
            r["speed"] = speeds.get(r["label"], {})
        batch_sizes = config.profile_settings.batch_sizes
        dense_row = {"ppl": dense_ppl, "weights_bytes": _weights_bytes(dense["spec"]), "speed": speeds.get("dense", {})}
        text, metrics = rep.compare_section(names, dense_row, budgets, batch_sizes)
        batch = min(batch_sizes)
        points = [{"label": "dense", "method": "dense", "total_reduction": 0.0, "ppl": dense_ppl[names[0]],
                   "decode": dense_row["speed"].get(batch, {}).get("decode")}]
        points += [{"label": r["label"], "method": r["method"], "total_reduction": r["total_reduction"],
                    "ppl": r["kd"][names[0]], "decode": r["speed"].get(batch, {}).get("decode")} for r in rows]
        path = run.report_dir() / "compare_pareto.png"
        rep.plot_compare_pareto(points, names[0], batch, path)
        return run.finish([text], metrics, [path, run.report_dir() / "speedup.png"])
