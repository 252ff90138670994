"""What a pruning round did: per-matrix rows, exact parameter counts, and the round's entry in the config record."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from torch import nn

from .lowrank import COMPRESSION_KEY, FORMAT_VERSION, compression_record, count_params


@dataclass
class LayerReport:
    """One MLP matrix. ``rank_*`` None = dense. ``energy``: fraction of the (whitened, if whitened) spectral energy
    kept (svd) or of the |W|·‖X‖ score mass kept (wanda); 1.0 when untouched."""

    name: str
    layer: int
    proj: str
    shape: tuple[int, int]  # (out, in)
    rank_before: int | None
    rank_after: int | None
    params_before: int  # nonzero for wanda
    params_after: int
    energy: float

    def as_dict(self) -> dict:
        d = asdict(self)
        d["shape"] = list(self.shape)
        return d


@dataclass
class PruneReport:
    method: str  # svd, svd-whitened, wanda, depth
    round: int
    counts_before: dict[str, int]
    counts_after: dict[str, int]
    mlp_params_dense: int  # the round-0 (dense) model's MLP parameters: reductions are relative to this
    layers: list[LayerReport]
    seconds: float = 0.0  # calibration + decomposition (the pruning itself; excludes load and save)
    calibration_seconds: float = 0.0
    settings: dict = field(default_factory=dict)

    @property
    def unstructured(self) -> bool:
        return self.method == "wanda"

    def summary(self) -> dict:
        """The DESIGN.md JSON fields (for wanda, parameter counts are nonzero entries) plus details."""
        key = "_nonzero" if self.unstructured else ""
        mlp_before = self.counts_before["mlp" + key]
        mlp_after = self.counts_after["mlp" + key]
        return {
            "mlp_params_before": mlp_before,
            "mlp_params_after": mlp_after,
            "mlp_reduction": 1 - mlp_after / self.mlp_params_dense,
            "total_params_before": self.counts_before["total" + key],
            "total_params_after": self.counts_after["total" + key],
            "seconds": self.seconds,
            "calibration_seconds": self.calibration_seconds,
            "mlp_reduction_this_round": 1 - mlp_after / mlp_before,
            "mlp_params_dense": self.mlp_params_dense,
            "method": self.method,
            "round": self.round,
            "params_counted": "nonzero entries (dense storage)" if self.unstructured else "parameters()",
            **self.settings,
            "layers": [row.as_dict() for row in self.layers],
        }


def dense_mlp_params(model: nn.Module, counts: dict[str, int] | None = None) -> int:
    """The round-0 model's MLP parameters: from the record, or, for a model never pruned, its own MLP parameters
    (``counts``: ``count_params(model)`` if already taken)."""
    record = compression_record(model)
    return record["mlp_params_dense"] if record else (counts if counts is not None else count_params(model))["mlp"]


def record_round(model: nn.Module, report: PruneReport, parent: str | None, ranks: dict[str, int]) -> None:
    """Write the round into ``model.config.sparsekd_compression`` (method, round, parent, current ranks, history).

    ``ranks``: {module name: rank} of every factored MLP matrix of the model after the round."""
    previous = compression_record(model) or {}
    summary = report.summary()
    entry = {k: summary[k] for k in ("method", "round", "mlp_reduction", "mlp_params_after", "total_params_after")}
    entry.update(parent=parent, **report.settings)
    setattr(model.config, COMPRESSION_KEY, {
        "format": FORMAT_VERSION,
        "method": report.method,
        "round": report.round,
        "parent": parent,
        "mlp_params_dense": report.mlp_params_dense,
        "mlp_reduction": summary["mlp_reduction"],
        "ranks": ranks,
        "history": previous.get("history", []) + [entry],
    })


def next_round(model: nn.Module) -> int:
    return (compression_record(model) or {}).get("round", 0) + 1
