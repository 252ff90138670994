"""The MLflow Model Registry: every final model of a flow run becomes a version of ``sparsekd-<flow>-<model>``.

A version's tags are its lineage: the parent checkpoint, the teacher cache, the pruning that made the student, the
training config, the eval results and the checkpoint's path on the storage root. Its source is the arm run's
``model/`` artifacts: an MLflow pyfunc model (``tasks/mlflow_pyfunc.py``: prompts in, greedy text out) that
``mlflow.pyfunc.load_model`` and ``mlflow models serve`` load without sparsekd, the lineage file
``sparsekd_checkpoint.json`` beside its ``MLmodel``, and the weights as the model's ``checkpoint`` artifact when the
flow uploads them (``log_models: true``); else the model loads the checkpoint from its path on the storage root.
"""

from __future__ import annotations

import json
import re
import tempfile
from importlib.metadata import version
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


PYFUNC_CODE = Path(__file__).with_name("mlflow_pyfunc.py")  # MLflow copies this file into every model


def pyfunc_signature():
    """Prompts (strings) in, the generated text of each out, ``max_new_tokens`` a param: the contract
    ``tasks/mlflow_pyfunc.py`` keeps. The input column is unnamed so that a plain list of strings is accepted."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(Schema([ColSpec("string")]), Schema([ColSpec("string")]),
                          ParamSchema([ParamSpec("max_new_tokens", "long", 32)]))


def pyfunc_requirements(checkpoint_path: str) -> list[str]:
    """What the model's own environment needs (``mlflow models serve --env-manager virtualenv``): this process's
    mlflow, torch and transformers, and for a URL the fsspec implementation that downloads it. Given, not inferred:
    MLflow would load the model to infer them."""
    packages = ["mlflow", "torch", "transformers"]
    if "://" in checkpoint_path and not checkpoint_path.startswith("file://"):
        import fsspec

        packages.append(fsspec.get_filesystem_class(checkpoint_path.split("://", 1)[0]).__module__.split(".")[0])
    return [f"{name}=={version(name).split('+')[0]}" for name in packages]  # 2.13.0+cpu: pip knows 2.13.0


def save_pyfunc(out: Path, checkpoint: str, lineage: dict[str, Any]) -> Path:
    """The checkpoint as an MLflow pyfunc model in ``out``, with ``sparsekd_checkpoint.json`` (the lineage) beside
    its MLmodel: the weights inside it when ``lineage`` says they are uploaded, else only their storage path."""
    import mlflow

    uploaded = lineage["sparsekd.weights_uploaded"]
    mlflow.pyfunc.save_model(
        out, python_model=str(PYFUNC_CODE), signature=pyfunc_signature(),
        model_config={"sparsekd.checkpoint_path": lineage["sparsekd.checkpoint_path"]},
        artifacts={"checkpoint": str(checkpoint)} if uploaded else None,
        pip_requirements=pyfunc_requirements("" if uploaded else lineage["sparsekd.checkpoint_path"]))
    write_json_atomic(out / "sparsekd_checkpoint.json", lineage)
    return out


def register_model(tracker: Tracker, run_id: str, flow_name: str, model: str, checkpoint: str,
                   lineage: dict[str, Any]) -> dict:
    """Log ``checkpoint`` as an MLflow pyfunc model (``save_pyfunc``, written in a temporary directory) as the run's
    ``model`` artifacts and register a new version of ``registered_name(flow_name, model)`` from it. Returns
    {name, version, model, url, checkpoint}: the row of the report's "Registered models" section."""
    with tempfile.TemporaryDirectory(prefix="sparsekd-register-") as scratch:
        tracker.log_artifact(run_id, save_pyfunc(Path(scratch) / "model", checkpoint, lineage), "model")
    name = registered_name(flow_name, model)
    version_number = tracker.register_model(name, run_id, lineage, description=f"{model} of a {flow_name} run")
    return {"name": name, "version": version_number, "model": model, "url": tracker.model_url(name, version_number),
            "checkpoint": checkpoint}
