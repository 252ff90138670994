"""Markdown tables and PNG plots of experiment results (the paper's Tables III–V and its figures).

A leaf: plain data in, text/PNG out. Rows are dicts; every perplexity printed here was measured by
``sparsekd_core.eval`` — nothing is estimated or filled in. Missing values print as "—".
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any, Iterable

from .files import write_file_atomic


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
