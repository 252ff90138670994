"""The prune stage body: rounds of pruning, then the compressed (and dense) checkpoint."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ..config import PruneConfig
from ._common import run_with_progress


@dataclass
class PruneRun:
    """What ``prune_and_save`` did: the rounds' reports, their summary and what was written."""

    reports: list  # prune.PruneReport, one per round
    summary: dict  # the last round's summary; with several rounds, totals and seconds span them all (+ "rounds")
    out: Path
    save_seconds: float  # writing the compressed (and the dense) checkpoint
    weights_bytes: int  # the compressed checkpoint's weights file
    saved_total_params: int  # parameters() of the model as saved


def prune_and_save(loaded, configs: Sequence[PruneConfig], out: str | Path, *, parent: str,
                   dense_out: str | Path | None = None, log=print, progress_factory=None) -> PruneRun:
    """Prune ``loaded.model`` in place, one round per config (successive cumulative targets), then write the
    compressed checkpoint to ``out`` (and the merged dense one to ``dense_out``).

    ``parent`` names the model the first round started from (recorded in the checkpoint); later rounds record
    "round N of this run". ``progress_factory`` counts MLP matrices (svd, wanda) or calibration sequences (depth).
    """
    from .. import prune
    from ..prune.lowrank import WEIGHTS_FILE

    reports = []
    for cfg in configs:
        total = cfg.calibration_samples if cfg.method == "depth" else len(prune.find_mlp_matrices(loaded.model))
        reports.append(run_with_progress(progress_factory, total, lambda update: prune.prune_model(
            loaded.model, loaded.tokenizer, cfg, parent=parent, log=log, progress=update)))
        parent = f"round {reports[-1].round} of this run"
    t0 = time.perf_counter()
    out = Path(out).expanduser()
    prune.save_compressed(loaded.model, loaded.tokenizer, out)
    if dense_out is not None:
        prune.save_dense(loaded.model, loaded.tokenizer, Path(dense_out).expanduser())
    save_seconds = time.perf_counter() - t0

    summary = reports[-1].summary()
    if len(reports) > 1:  # several rounds in one call: totals span all of them
        first = reports[0].summary()
        for key in ("mlp_params_before", "total_params_before"):
            summary[key] = first[key]
        summary["seconds"] = sum(r.seconds for r in reports)
        summary["rounds"] = [{k: v for k, v in r.summary().items() if k != "layers"} for r in reports]
    return PruneRun(reports=reports, summary=summary, out=out, save_seconds=save_seconds,
                    weights_bytes=(out / WEIGHTS_FILE).stat().st_size,
                    saved_total_params=prune.count_params(loaded.model)["total"])
