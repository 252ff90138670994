"""The MLflow Model Registry: every final model of a flow run becomes a version of ``sparsekd-<flow>-<model>``.

A version's tags are its lineage: the parent checkpoint, the teacher cache, the pruning that made the student, the
training config, the eval results and the checkpoint's path on the storage root. Its source is the arm run's
``model/`` artifacts: a pointer file ``sparsekd_checkpoint.json`` holding the same lineage (always) and the weights
(when the flow logs models).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from sparsekd_core.files import write_json_atomic

from .store import remote_path
from .tracking import Tracker


def registered_name(flow_name: str, model: str) -> str:
    """``sparsekd-<flow>-<model>`` with every character MLflow would refuse replaced by '-'."""
    return "sparsekd-" + re.sub(r"[^A-Za-z0-9_-]+", "-", f"{flow_name}-{model}").strip("-")


def lineage_tags(flow_name: str, base_model: str, trained: dict, workdir: str, evals: dict[str, float],
                 weights_uploaded: bool, parent: dict | None = None, pruned: dict | None = None) -> dict[str, Any]:
    """The tags of a registered version. ``trained``: the training stage's manifest (distill or SFT); ``parent``:
    the ModelRef it started from; ``pruned``: the prune manifest that made the student, if any; ``base_model``: the
    flow's dense model spec."""
    result = trained["result"]
    tags = {
        "sparsekd.flow": flow_name,
        "sparsekd.checkpoint_path": remote_path(workdir, Path(result["student"])),
        "sparsekd.stage_key": trained["key"],
        "sparsekd.parent_checkpoint": (parent or {}).get("spec", trained["inputs"].get("student")),
        "sparsekd.parent_fingerprint": trained["inputs"].get("student"),
        "sparsekd.teacher_cache_key": trained["inputs"].get("teacher_cache", "none (SFT)"),
        "sparsekd.training": trained["stage"],
        "sparsekd.training_config": json.dumps(trained["config"].get(trained["stage"], {}), sort_keys=True),
        "sparsekd.seed": trained["config"].get("seed"),
        "sparsekd.weights_uploaded": bool(weights_uploaded),
        "sparsekd.model": base_model,
        **{f"sparsekd.eval.{name}": value for name, value in evals.items()},
    }
    if pruned is not None:
        tags.update({"sparsekd.pruning_method": pruned["result"].get("method"),
                     "sparsekd.mlp_reduction": pruned["result"].get("mlp_reduction"),
                     "sparsekd.pruning_key": pruned["key"]})
    return tags


def register_model(tracker: Tracker, run_id: str, flow_name: str, model: str, checkpoint: str,
                   lineage: dict[str, Any], pointer_dir: Path) -> dict:
    """Log the pointer file (written in ``pointer_dir``) as the run's ``model`` artifact and register a new
    version of ``registered_name(flow_name, model)`` from it. Returns {name, version, model, url, checkpoint}: the
    row of the report's "Registered models" section."""
    pointer = pointer_dir / "sparsekd_checkpoint.json"
    write_json_atomic(pointer, lineage)
    tracker.log_artifact(run_id, pointer, "model")
    name = registered_name(flow_name, model)
    version = tracker.register_model(name, run_id, lineage, description=f"{model} of a {flow_name} run")
    return {"name": name, "version": version, "model": model, "url": tracker.model_url(name, version),
            "checkpoint": checkpoint}
