"""One pruning round, the same for every method (``prune_model``):

1. **census before**: find the MLP matrices (``find_mlp_matrices``) and count parameters (total, MLP, nonzero);
2. **calibrate**: collect only what the method asks for (``Method.calibration``: token ids, per-matrix input
   second moments, or their diagonals; nothing for plain SVD);
3. **transform**: the method changes the model in place, given a ``PruneInput`` (model, the matrices of step 1,
   cfg, the dense MLP size, calibration data), and returns a ``MethodResult`` (recorded name, per-matrix rows,
   settings);
4. **census after**, then the ``PruneReport`` and the round's entry in ``config.sparsekd_compression``.

The matrices are found once per state of the model: before the transform (what the method works on) and after it
(what is counted and recorded; a method may replace modules or remove whole blocks, so the "before" list cannot
describe the result). A method never finds matrices, counts parameters or touches the record itself.

Adding a method (as width pruning, ``width.py``, was):

* a new file ``prune/<name>.py`` with ``prune_<name>(job: PruneInput) -> MethodResult`` (change ``job.model`` in
  place; one ``LayerReport`` per matrix it touched; its settings) and ``<NAME> = Method(transform=prune_<name>,
  calibration=lambda cfg: ...)`` (the calibration kinds are in ``method.py``);
* one entry in ``METHODS`` below;
* the name in ``PruneConfig.method`` (``sparsekd_core/config.py``), with the fields it takes, so the CLI, the tasks
  and the flows accept it. Saving, loading and the training mask follow from the model's modules and the record.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from ..config import ConfigError, PruneConfig
from .calibration import calibration_ids, input_statistics
from .depth import DEPTH
from .lowrank import MlpMatrix, count_params, factored_ranks, find_mlp_matrices
from .method import Calibration, Method, PruneInput
from .report import PruneReport, dense_mlp_params, next_round, record_round
from .svd import SVD
from .wanda import WANDA
from .width import WIDTH

METHODS: dict[str, Method] = {"svd": SVD, "wanda": WANDA, "depth": DEPTH, "width": WIDTH}


@dataclass(frozen=True)
class Census:
    """The model's MLP matrices (block order) and its exact parameter counts (see ``count_params``), taken together."""

    matrices: list[MlpMatrix]
    counts: dict[str, int]


def census(model: nn.Module) -> Census:
    matrices = find_mlp_matrices(model)
    return Census(matrices, count_params(model, matrices))


def calibrate(model: nn.Module, tokenizer, cfg: PruneConfig, need: Calibration | None, matrices: list[MlpMatrix],
              log=print) -> tuple[torch.Tensor | None, dict[str, torch.Tensor] | None]:
    """What ``need`` asks for: (calibration token ids [N, L] or None, {matrix name: input statistic} or None)."""
    if need is None:
        return None, None
    ids = calibration_ids(tokenizer, cfg.calibration, cfg.calibration_samples, cfg.calibration_seq_len)
    log(f"prune: calibration on {ids.numel()} tokens of {cfg.calibration!r} ({ids.shape[0]}×{ids.shape[1]})")
    if need == "tokens":
        return ids, None
    stats, _ = input_statistics(model, matrices, ids, diagonal_only=need == "input_sq_norm")
    return ids, stats


def prune_model(model: nn.Module, tokenizer, cfg: PruneConfig, parent: str | None = None, log=print,
                progress=None) -> PruneReport:
    """One pruning round of ``model`` in place by ``cfg.method`` (see the module docstring); returns its report.

    ``parent``: what the model was (recorded in the round's history). ``progress(n)``: n more units done (matrices
    for svd/wanda, calibration sequences for depth). ``report.seconds`` covers the whole round, calibration included;
    ``report.calibration_seconds`` is the calibration pass alone (for depth, loading the tokens: its forward pass is
    the measurement itself).
    """
    if cfg.method not in METHODS:
        raise ConfigError(f"prune.method={cfg.method!r}: no such pruning method; allowed: {', '.join(METHODS)}")
    method = METHODS[cfg.method]
    t0 = time.perf_counter()
    before = census(model)
    mlp_dense = dense_mlp_params(model, before.counts)

    t_calibration = time.perf_counter()
    ids, input_stats = calibrate(model, tokenizer, cfg, method.calibration(cfg), before.matrices, log)
    calibration_seconds = time.perf_counter() - t_calibration

    result = method.transform(PruneInput(model=model, matrices=before.matrices, cfg=cfg, mlp_params_dense=mlp_dense,
                                         calibration_ids=ids, input_stats=input_stats, log=log, progress=progress))

    after = census(model)
    report = PruneReport(method=result.method, round=next_round(model), counts_before=before.counts,
                         counts_after=after.counts, mlp_params_dense=mlp_dense, layers=result.layers,
                         calibration_seconds=calibration_seconds, settings=result.settings)
    record_round(model, report, parent, factored_ranks(after.matrices))
    report.seconds = time.perf_counter() - t0
    return report
