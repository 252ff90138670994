"""Pruning stage. ``prune_model`` (``pipeline.py``) is the one call a CLI verb or a task makes: it finds the MLP
matrices and counts parameters, collects calibration data, hands them to one method of ``METHODS``, counts again
and records the round. The methods only transform the model: structured low-rank SVD (``svd.py``), unstructured
WANDA (``wanda.py``), removal of whole decoder blocks (``depth.py``) or of MLP neurons (``width.py``); what they
receive and return is in ``method.py``, how to add one in ``pipeline.py``. Around them: calibration statistics
(``calibration.py``), low-rank layers, parameter counts and compressed checkpoints (``lowrank.py``), the per-round
report and config record (``report.py``), and the invariants later stages keep (``masks.py``)."""

from __future__ import annotations

from .calibration import calibration_ids, input_statistics
from .depth import angular_distances, decoder_layers, drop_blocks
from .lowrank import (LowRankLinear, count_params, find_mlp_matrices, is_compressed_dir, load_compressed,
                      save_compressed, save_dense)
from .method import Method, MethodResult, PruneInput
from .pipeline import METHODS, census, prune_model
from .report import PruneReport

__all__ = ["LowRankLinear", "METHODS", "Method", "MethodResult", "PruneInput", "PruneReport", "angular_distances",
           "calibration_ids", "census", "count_params", "decoder_layers", "drop_blocks", "find_mlp_matrices",
           "input_statistics", "is_compressed_dir", "load_compressed", "prune_model", "save_compressed", "save_dense"]
