"""Registered versions are MLflow pyfunc models (tasks/registry.py, tasks/mlflow_pyfunc.py): a process in which
sparsekd cannot be imported loads ``models:/NAME/1`` and generates the same greedy text as transformers on the
checkpoint, for a dense and an SVD-factored checkpoint read from the storage root and for one whose weights were
uploaded (its checkpoint directory deleted); a tracking server that proxies artifacts hands the version page its
MLmodel; ``mlflow models serve`` answers /invocations."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.parse
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import make_model, make_tokenizer
from flows.context import Run
from sparsekd_core.config import PruneConfig
from sparsekd_core.prune import prune_model, save_compressed
from tasks.tracking import FlowTracking, Tracker

PROMPTS = ["The capital of France is", "def add(a, b):"]
NEW_TOKENS = 6
PROJECT = ("sparsekd", "sparsekd_core", "tasks", "flows")

# Run with -I -S: no cwd, PYTHONPATH, user site or .pth files (the editable install of sparsekd is one), then the
# venv's site-packages by hand: mlflow, torch and transformers are there, this project is not.
WITHOUT_SPARSEKD = """
import contextlib
import importlib.util
import json
import sys

sys.path += json.loads(sys.argv[1])
project = json.loads(sys.argv[2])
assert not [name for name in project if importlib.util.find_spec(name)], "the project is importable"
import mlflow

uris, prompts, new_tokens = json.loads(sys.argv[3]), json.loads(sys.argv[4]), int(sys.argv[5])
texts = {uri: list(mlflow.pyfunc.load_model(uri).predict(prompts, params={"max_new_tokens": new_tokens}))
         for uri in uris}
assert not [name for name in sys.modules if name.partition(".")[0] in project]
print(json.dumps(texts))
"""


def greedy(directory: Path, prompts: list[str], new_tokens: int) -> list[str]:
    """The reference: transformers' own greedy generation on the checkpoint, the continuation decoded."""
    remote_code = "auto_map" in json.loads((directory / "config.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=remote_code).eval()
    texts = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False)
        texts.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    return texts


def trained_manifest(student: Path) -> dict:
    """What Run.register reads of a distill stage's manifest."""
    return {"result": {"student": str(student)}, "key": f"key-{student.name}", "stage": "distill",
            "inputs": {"student": f"fp-{student.name}", "teacher_cache": "cache-key"},
            "config": {"distill": {"max_steps": 1}, "seed": 0}}


def register(root: Path, tracker: Tracker, flow_name: str, model: str, student: Path, log_models: bool) -> dict:
    """Register ``student`` the way a flow does: Run.register, in an arm run of a parent run."""
    settings = {"uri": tracker.tracking_uri, "experiment": "sparsekd-test", "artifact_root": None}
    parent = tracker.start_run(f"{flow_name}-parent")
    run = Run(SimpleNamespace(model="tiny-llama", seed=0, log_models=log_models), flow_name,
              FlowTracking(tracker, settings, parent), str(root))
    arm = run.arm(model)
    run.register(model, trained_manifest(student), arm, {"text": 12.5})
    return run.registered[-1]


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """A registry with three versions of tiny models and the greedy text each must produce: a dense checkpoint
    and an SVD-factored one on the storage root, and a dense one whose weights were uploaded, its directory gone."""
    root = tmp_path_factory.mktemp("registry")
    tokenizer = make_tokenizer()
    dense = root / "dense" / "student"
    make_model("llama", len(tokenizer)).save_pretrained(dense)
    tokenizer.save_pretrained(dense)
    factored = root / "factored" / "student"
    model = make_model("llama", len(tokenizer), seed=1)
    prune_model(model, tokenizer, PruneConfig(target_reduction=0.5, calibration=None), log=lambda _: None)
    save_compressed(model, tokenizer, factored)
    uploaded = root / "uploaded" / "student"
    make_model("qwen3", len(tokenizer), seed=2).save_pretrained(uploaded)
    tokenizer.save_pretrained(uploaded)

    uri = f"sqlite:///{root / 'mlflow.db'}"
    tracker = Tracker(uri, "sparsekd-test", str(root / "mlartifacts"))
    rows = {"dense": register(root, tracker, "dense-kd", "dense+kd", dense, log_models=False),
            "factored": register(root, tracker, "cascade", "pruned+kd", factored, log_models=False),
            "uploaded": register(root, tracker, "wanda", "wanda+kd", uploaded, log_models=True)}
    expected = {kind: greedy(Path(row["checkpoint"]), PROMPTS, NEW_TOKENS) for kind, row in rows.items()}
    shutil.rmtree(uploaded)  # the uploaded version must load from its own artifacts
    return SimpleNamespace(root=root, uri=uri, tracker=tracker, rows=rows, expected=expected)


def clean_env(registry) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(MLFLOW_TRACKING_URI=registry.uri, HF_HUB_OFFLINE="1",
               HF_MODULES_CACHE=str(registry.root / "hf_modules"))
    return env


def test_versions_load_and_generate_where_sparsekd_cannot_be_imported(registry):
    uris = [f"models:/{row['name']}/{row['version']}" for row in registry.rows.values()]
    assert uris[0] == "models:/sparsekd-dense-kd-dense-kd/1"
    site_packages = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
    done = subprocess.run([sys.executable, "-I", "-S", "-c", WITHOUT_SPARSEKD, json.dumps(site_packages),
                           json.dumps(PROJECT), json.dumps(uris), json.dumps(PROMPTS), str(NEW_TOKENS)],
                          cwd=registry.root, env=clean_env(registry), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    texts = json.loads(done.stdout.strip().splitlines()[-1])
    for kind, uri in zip(registry.rows, uris):
        assert len(texts[uri]) == len(PROMPTS) and all(texts[uri]), (kind, texts[uri])
        assert texts[uri] == registry.expected[kind], kind


def test_versions_are_pyfunc_models_with_a_signature_and_their_lineage(registry, monkeypatch):
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", registry.uri)
    client = registry.tracker.client
    for kind, row in registry.rows.items():
        info = mlflow.models.get_model_info(f"models:/{row['name']}/{row['version']}")
        assert "python_function" in info.flavors
        signature = info.signature
        assert [spec.type.name for spec in signature.inputs.inputs] == ["string"]
        assert [spec.type.name for spec in signature.outputs.inputs] == ["string"]
        assert {p.name: p.default for p in signature.params.params} == {"max_new_tokens": 32}
        version = client.get_model_version(row["name"], str(row["version"]))
        assert version.source.endswith("/model")
        files = {a.path for a in client.list_artifacts(version.run_id, "model")}
        assert {"model/MLmodel", "model/sparsekd_checkpoint.json", "model/mlflow_pyfunc.py"} <= files
        lineage = json.loads(Path(mlflow.artifacts.download_artifacts(
            run_id=version.run_id, artifact_path="model/sparsekd_checkpoint.json",
            dst_path=str(registry.root / "lineage" / kind))).read_text())
        assert lineage["sparsekd.checkpoint_path"] == version.tags["sparsekd.checkpoint_path"] == row["checkpoint"]
        assert version.tags["sparsekd.weights_uploaded"] == str(kind == "uploaded")
        assert version.tags["sparsekd.stage_key"] == lineage["sparsekd.stage_key"]
        assert ("model/artifacts" in files) == (kind == "uploaded")  # weights only when the flow uploads them
    # The pyfunc's files went through a temporary directory: no `.registry-<run>` folder in the storage root (the
    # report directory MLflow shows as artifacts lives there).
    assert not list(registry.root.rglob(".registry-*"))


def test_a_checkpoint_path_is_read_in_place_or_downloaded_or_said_missing(tmp_path, tiny_model_dir):
    import fsspec

    from tasks.mlflow_pyfunc import local_checkpoint

    assert local_checkpoint(str(tiny_model_dir)) == str(tiny_model_dir)
    with pytest.raises(FileNotFoundError, match="weights were not uploaded.*mount it at that path"):
        local_checkpoint(str(tmp_path / "gone"))
    fs, bucket = fsspec.filesystem("memory"), f"/{tmp_path.name}"  # an object store's stand-in: same fsspec calls
    fs.put(str(tiny_model_dir), f"{bucket}/distill/key/student", recursive=True)
    try:
        downloaded = Path(local_checkpoint(f"memory:/{bucket}/distill/key/student"))
        assert sorted(p.name for p in downloaded.iterdir()) == sorted(p.name for p in tiny_model_dir.iterdir())
        with pytest.raises(RuntimeError, match="could not download.*credentials"):
            local_checkpoint(f"memory:/{bucket}/nothing/here")
    finally:
        fs.rm(bucket, recursive=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(command: list[str], ready_url: str, env: dict[str, str], cwd: Path):
    """``command`` running in its own process group (a server and the uvicorn it starts), once ``ready_url``
    answers; then stopped, group and all. Its output goes to ``cwd/<name>.log``, shown if it dies."""
    log = cwd / f"{command[1]}-{command[2]}.log"
    env = {**env, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"}  # it runs `uvicorn`
    with open(log, "wb") as out:
        process = subprocess.Popen(command, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    try:
        deadline = time.monotonic() + 150
        while True:
            try:
                urllib.request.urlopen(ready_url, timeout=2).close()
                break
            except OSError:
                assert process.poll() is None, log.read_text()[-3000:]
                assert time.monotonic() < deadline, f"{ready_url} did not answer within 150 s"
                time.sleep(1)
        yield
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:  # mlflow server can take longer to wind down than the test to run
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


MLFLOW = str(Path(sys.executable).parent / "mlflow")
needs_uvicorn = pytest.mark.skipif(importlib.util.find_spec("uvicorn") is None,
                                   reason="MLflow's servers run on uvicorn, which is not installed")


@needs_uvicorn
def test_a_tracking_server_that_proxies_artifacts_shows_the_versions_mlmodel(tmp_path, tiny_model_dir):
    """The version page asks the server for MLmodel; a runs:/ source made it answer 500 (see Tracker.register_model)."""
    url = f"http://127.0.0.1:{free_port()}"
    command = [MLFLOW, "server", "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}", "--artifacts-destination",
               str(tmp_path / "served"), "--host", "127.0.0.1", "--port", url.rsplit(":", 1)[1], "--workers", "1"]
    with serving(command, f"{url}/health", dict(os.environ), tmp_path):
        row = register(tmp_path, Tracker(url, "sparsekd-test"), "dense-kd", "dense+kd", tiny_model_dir,
                       log_models=False)
        query = urllib.parse.urlencode({"path": "MLmodel", "name": row["name"], "version": row["version"]})
        with urllib.request.urlopen(f"{url}/model-versions/get-artifact?{query}", timeout=30) as answer:
            assert answer.status == 200 and "python_function" in answer.read().decode()


@needs_uvicorn
def test_mlflow_models_serve_answers_invocations(registry):
    row, port = registry.rows["dense"], free_port()
    command = [MLFLOW, "models", "serve", "-m", f"models:/{row['name']}/{row['version']}", "--env-manager", "local",
               "-p", str(port)]
    with serving(command, f"http://127.0.0.1:{port}/ping", clean_env(registry), registry.root):
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations", headers={"Content-Type": "application/json"},
            data=json.dumps({"inputs": PROMPTS, "params": {"max_new_tokens": NEW_TOKENS}}).encode())
        with urllib.request.urlopen(request, timeout=60) as answer:
            assert json.load(answer) == {"predictions": registry.expected["dense"]}
