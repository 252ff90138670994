"""Pruning stage: structured low-rank SVD (``svd.py``) and unstructured WANDA (``wanda.py``) of MLP projections,
depth pruning of whole decoder blocks (``depth.py``),
with calibration statistics (``calibration.py``), low-rank layers and compressed checkpoints (``lowrank.py``) and
the per-round report (``report.py``). ``prune_model`` is the one call a CLI verb or a task makes."""

from __future__ import annotations

import time

from torch import nn

from ..config import PruneConfig
from .calibration import calibration_ids, input_statistics
from .depth import angular_distances, decoder_layers, drop_blocks, prune_depth
from .lowrank import (LowRankLinear, count_params, find_mlp_matrices, is_compressed_dir, load_compressed,
                      save_compressed, save_dense)
from .report import PruneReport
from .svd import prune_svd
from .wanda import prune_wanda

__all__ = ["LowRankLinear", "PruneReport", "angular_distances", "count_params", "decoder_layers", "drop_blocks",
           "find_mlp_matrices", "is_compressed_dir", "load_compressed", "prune_model", "save_compressed", "save_dense"]


def prune_model(model: nn.Module, tokenizer, cfg: PruneConfig, parent: str | None = None, log=print,
                progress=None) -> PruneReport:
    """One pruning round in place: collect calibration statistics if the method needs them, then prune.

    ``report.seconds`` includes the calibration pass; ``report.calibration_seconds`` is that pass alone.
    """
    t0 = time.perf_counter()
    stats = None
    needs_calibration = cfg.method in ("wanda", "depth") or cfg.use_whitening
    if needs_calibration:
        ids = calibration_ids(tokenizer, cfg.calibration, cfg.calibration_samples, cfg.calibration_seq_len)
        log(f"prune: calibration on {ids.numel()} tokens of {cfg.calibration!r} "
            f"({ids.shape[0]}×{ids.shape[1]})")
        if cfg.method != "depth":
            stats, _ = input_statistics(model, find_mlp_matrices(model), ids, diagonal_only=cfg.method == "wanda")
    calibration_seconds = time.perf_counter() - t0
    if cfg.method == "depth":  # its calibration pass is the distance measurement itself
        report = prune_depth(model, cfg, ids, parent=parent, log=log, progress=progress)
    elif cfg.method == "wanda":
        report = prune_wanda(model, cfg, stats, parent=parent, log=log, progress=progress)
    else:
        report = prune_svd(model, cfg, stats, parent=parent, log=log, progress=progress)
    report.calibration_seconds = calibration_seconds
    report.seconds = time.perf_counter() - t0
    return report
