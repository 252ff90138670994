"""The MLflow model of a registered sparsekd checkpoint: greedy text generation as a pyfunc, saved as MLflow's
"models from code" (``tasks/registry.py`` passes this file's path), so MLflow copies this file into the model and
never pickles a sparsekd class.

Self-contained on purpose: it imports only mlflow, transformers, torch (and fsspec for a URL), so
``mlflow.pyfunc.load_model("models:/NAME/V")`` and ``mlflow models serve`` work where sparsekd is not installed.
Where the weights are: the model's ``checkpoint`` artifact when the flow uploaded them (``log_models: true``),
else the checkpoint's path on the storage root in the model config (``sparsekd.checkpoint_path``: a shared volume
path, or a URL downloaded through fsspec into a temporary directory with the credentials of the environment).
"""

from __future__ import annotations

import atexit
import json
import shutil
import tempfile
from pathlib import Path

import mlflow
import torch
from mlflow.pyfunc import PythonModel
from transformers import AutoModelForCausalLM, AutoTokenizer

CHECKPOINT_ARTIFACT = "checkpoint"
CHECKPOINT_PATH = "sparsekd.checkpoint_path"


def local_checkpoint(path: str) -> str:
    """A local directory holding the checkpoint at ``path``: the path itself, or a URL's files downloaded into a
    temporary directory (removed when the process exits)."""
    local = path.removeprefix("file://")
    if "://" in local:
        import fsspec

        fs, remote = fsspec.url_to_fs(path)
        local = tempfile.mkdtemp(prefix="sparsekd-checkpoint-")
        atexit.register(shutil.rmtree, local, ignore_errors=True)
        try:
            fs.get(remote.rstrip("/") + "/", local, recursive=True)
        except Exception as err:
            raise RuntimeError(f"{CHECKPOINT_PATH}={path!r}: could not download the checkpoint "
                               f"({type(err).__name__}: {err}); give this process the storage's credentials in "
                               "its environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, ...)"
                               ) from err
    if not (Path(local) / "config.json").is_file():
        raise FileNotFoundError(f"{CHECKPOINT_PATH}={path!r}: no checkpoint there (no config.json); this model's "
                                "weights were not uploaded, so it loads them from the storage root: mount it at that "
                                "path here (or register the model with log_models: true)")
    return local


class SparsekdGenerator(PythonModel):
    """Prompts (a list of strings, or a DataFrame with a string column ``prompt``) -> the greedy continuation of
    each (without the prompt), at most ``max_new_tokens`` tokens (a param; its default is in the signature, which
    MLflow applies before ``predict``)."""

    def load_context(self, context) -> None:
        directory = context.artifacts.get(CHECKPOINT_ARTIFACT) or local_checkpoint(
            (context.model_config or {})[CHECKPOINT_PATH])
        # A factored (SVD) checkpoint ships its modeling code and names it in auto_map; others are stock.
        remote_code = "auto_map" in json.loads((Path(directory) / "config.json").read_text())
        self.tokenizer = AutoTokenizer.from_pretrained(directory, trust_remote_code=remote_code)
        self.model = AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=remote_code).eval()

    def predict(self, context, model_input, params=None) -> list[str]:
        if hasattr(model_input, "columns"):  # a DataFrame: its `prompt` column, else its first
            prompts = model_input["prompt" if "prompt" in model_input.columns else model_input.columns[0]].tolist()
        else:
            prompts = list(model_input)
        max_new_tokens = int(params["max_new_tokens"])
        texts = []
        for prompt in prompts:  # one at a time: no padding, so each is exactly its own greedy generation
            inputs = self.tokenizer(str(prompt), return_tensors="pt")
            with torch.no_grad():
                out = self.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
            texts.append(self.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
        return texts


mlflow.models.set_model(SparsekdGenerator())
