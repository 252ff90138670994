"""The Prefect stage tasks called directly (``task.fn``): the precision policy a flow's distill really gets, and
stage keys that change exactly when something that can change the output changes."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch

from conftest import make_model, make_tokenizer

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture
def project(tmp_path):
    """A saved tiny model, a sharper teacher of it (scaled tied embeddings), a corpus and a validation text."""
    tmp_path = tmp_path / "project"
    tok = make_tokenizer()
    dense = make_model("llama", len(tok))
    dense.save_pretrained(tmp_path / "dense")
    tok.save_pretrained(tmp_path / "dense")
    teacher = copy.deepcopy(dense)
    with torch.no_grad():
        teacher.get_input_embeddings().weight.mul_(8.0)
    teacher.save_pretrained(tmp_path / "teacher")
    tok.save_pretrained(tmp_path / "teacher")
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    docs = [" ".join(words[(i * 5 + j * 3) % 12] + str((i + j) % 11) for j in range(30)) for i in range(20)]
    (tmp_path / "corpus.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[:16]))
    (tmp_path / "valid.txt").write_text("\n\n".join(docs[16:]))
    return tmp_path


def _mlp_weights(state: dict) -> dict:
    return {k: v for k, v in state.items() if ".mlp." in k and k.endswith(".weight")}


def test_flow_distill_with_bf16_dtype_trains_fp32_master_weights(project, tmp_path):
    """The flow's distill task on dtype bf16 (what `auto` means on a GPU worker), with bf16 autocast as on CUDA:
    the student is trained and saved in fp32 and nearly every MLP weight moves at lr 2e-5. With bf16 weights
    an update of ~lr is below half a bf16 ulp for all but the smallest weights and is rounded away."""
    from safetensors.torch import load_file

    from tasks.stages import cache_teacher, dense_ref, distill

    work = str(tmp_path / "w")
    cache = cache_teacher.fn(dense_ref(str(project / "teacher")), {"data": str(project / "corpus.jsonl"),
                             "num_samples": 4, "seq_len": 24, "top_k": 8, "chunk_size": 4}, work, dtype="bf16",
                             device="cpu")
    fields = {"max_steps": 4, "epochs": 4, "batch_size": 4, "lr": 2e-5, "eval_every": 0, "alpha": 1.0,
              "val_data": str(project / "valid.txt"), "val_tokens": 64, "val_ctx": 32, "autocast": "bf16"}
    m = distill.fn(dense_ref(str(project / "dense")), cache, fields, 0, work, dtype="bf16", device="cpu")
    result = m["result"]
    assert result["precision"] == "fp32 weights + bf16 autocast"
    assert result["kd_loss_last"] < result["kd_loss_first"]  # the same batch every step: comparable losses
    before = _mlp_weights(load_file(project / "dense" / "model.safetensors"))
    after = _mlp_weights(load_file(f"{result['student']}/model.safetensors"))
    assert after and all(t.dtype == torch.float32 for t in after.values())  # saved in fp32
    moved = sum(int((after[k] != before[k]).sum()) for k in before) / sum(t.numel() for t in before.values())
    assert moved > 0.95, f"only {moved:.1%} of the MLP weights moved"
    # What bf16 weights would have allowed: Adam's first steps move a weight by ~lr, which is below half a bf16 ulp
    # for most of these weights, so the test above could not pass with bf16 masters.
    w = torch.cat([t.flatten() for t in before.values()])
    half_ulp = (w.abs().to(torch.bfloat16).float() * 2.0 ** -8)
    assert float((half_ulp > 2e-5).float().mean()) > 0.5


def _eval(project, work, model_spec, eval_file, dtype="auto"):
    from tasks.stages import dense_ref, evaluate

    return evaluate.fn(dense_ref(model_spec), [{"name": "text", "data": str(eval_file), "max_tokens": 64}],
                       {"ctx": 32, "stride": 16}, work, dtype=dtype, device="cpu")


def test_stage_keys_change_with_every_input_and_only_then(project, tmp_path, monkeypatch):
    from sparsekd_core import identity, provenance

    work = str(tmp_path / "w")
    model, text = str(project / "dense"), project / "valid.txt"
    first = _eval(project, work, model, text)
    assert not first["cached"]
    assert _eval(project, work, model, text)["cached"]  # nothing changed: reused
    assert _eval(project, work, model, text, dtype="fp32")["key"] == first["key"]  # auto = fp32 on a CPU
    assert not _eval(project, work, model, text, dtype="bf16")["cached"]  # another resolved dtype

    copied = tmp_path / "elsewhere" / "dense"
    shutil.copytree(project / "dense", copied)
    assert _eval(project, work, str(copied), text)["key"] == first["key"]  # the same model by content
    config = json.loads((copied / "config.json").read_text())
    config["rms_norm_eps"] = 1e-5  # a change of the model directory's content
    (copied / "config.json").write_text(json.dumps(config))
    assert not _eval(project, work, str(copied), text)["cached"]

    edited = tmp_path / "valid.txt"
    edited.write_text(text.read_text().replace("alpha", "omega"))
    other = _eval(project, work, model, edited)
    assert not other["cached"]
    same_text_elsewhere = tmp_path / "again.txt"
    same_text_elsewhere.write_text(text.read_text())
    assert _eval(project, work, model, same_text_elsewhere)["config"]["sets"][0]["digest"] == \
        first["config"]["sets"][0]["digest"]

    real = identity.module_source
    monkeypatch.setattr(identity, "module_source",
                        lambda name: real(name) + ("\nEDITED = 1\n" if name == "sparsekd_core.eval" else ""))
    identity.forget_code()
    assert not _eval(project, work, model, text)["cached"]  # the code the eval stage runs is in the key
    monkeypatch.setattr(identity, "module_source", real)
    identity.forget_code()
    assert _eval(project, work, model, text)["cached"]
    monkeypatch.setattr(provenance, "environment", lambda: {"torch": "0.0", "transformers": "0.0", "zarr": "0.0"})
    assert not _eval(project, work, model, text)["cached"]  # library versions are in the key
    assert first["config"]["runtime"] == {"dtype": "float32", "device": "cpu"}


def test_a_hub_model_is_fingerprinted_by_the_commit_its_revision_resolves_to(tmp_path, monkeypatch):
    """Offline, the commit comes from the local Hugging Face cache (refs/<revision> -> snapshots/<commit>); the
    model ref pins it, so the stage loads what its key names."""
    from huggingface_hub import constants

    from sparsekd_core.models import ModelLoadError, model_fingerprint
    from tasks.stages import dense_ref

    repo = tmp_path / "hub" / "models--org--name"
    for ref, commit in (("main", "a" * 40), ("v2", "b" * 40)):
        (repo / "snapshots" / commit).mkdir(parents=True)
        (repo / "snapshots" / commit / "config.json").write_text("{}")
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert model_fingerprint("org/name") == {"hub": "org/name", "commit": "a" * 40}
    assert model_fingerprint("org/name", "v2") == {"hub": "org/name", "commit": "b" * 40}
    assert dense_ref("org/name")["revision"] == "a" * 40
    with pytest.raises(ModelLoadError, match="not in the local Hugging Face cache"):
        model_fingerprint("org/missing")


def test_data_content_is_in_the_cache_and_distill_keys(project, tmp_path):
    """The corpus sources' content and the validation text's exact bytes are in the keys of the cache and distill
    stages; a copy of the corpus at another path is the same corpus."""
    from tasks.stages import cache_teacher, dense_ref, distill

    work = str(tmp_path / "w")
    teacher = dense_ref(str(project / "dense"))
    fields = {"data": str(project / "corpus.jsonl"), "num_samples": 4, "seq_len": 24, "top_k": 8, "chunk_size": 4}
    first = cache_teacher.fn(teacher, fields, work, device="cpu")
    edited = tmp_path / "corpus.jsonl"
    edited.write_text((project / "corpus.jsonl").read_text().replace("alpha", "omega"))
    assert not cache_teacher.fn(teacher, {**fields, "data": str(edited)}, work, device="cpu")["cached"]
    assert cache_teacher.fn(teacher, fields, work, device="cpu")["cached"]

    val = tmp_path / "val.txt"
    val.write_text((project / "valid.txt").read_text())
    run = dict(max_steps=1, batch_size=2, eval_every=0, val_tokens=32, val_ctx=16, val_data=str(val))
    assert not distill.fn(teacher, first, run, 0, work, device="cpu")["cached"]
    assert distill.fn(teacher, first, run, 0, work, device="cpu")["cached"]
    val.write_text(val.read_text() + "\n\n")  # only blank lines differ: the validation text is not the same
    assert not distill.fn(teacher, first, run, 0, work, device="cpu")["cached"]


def test_self_referential_when_the_cache_ran_in_bf16_and_the_student_trains_in_fp32(project, tmp_path):
    from tasks.stages import cache_teacher, dense_ref, distill

    work = str(tmp_path / "w")
    dense = dense_ref(str(project / "dense"))
    fields = {"data": str(project / "corpus.jsonl"), "num_samples": 4, "seq_len": 24, "top_k": 8, "chunk_size": 4}
    run = dict(max_steps=1, batch_size=2, eval_every=0, val_tokens=32, val_ctx=16, val_data=str(project / "valid.txt"))
    for dtype in ("bf16", "fp32"):
        cache = cache_teacher.fn(dense, fields, work, dtype=dtype, device="cpu")
        assert distill.fn(dense, cache, run, 0, work, dtype=dtype, device="cpu")["result"]["self_referential"]
    other = cache_teacher.fn(dense_ref(str(project / "teacher")), fields, work, dtype="bf16", device="cpu")
    assert not distill.fn(dense, other, run, 0, work, dtype="bf16", device="cpu")["result"]["self_referential"]


def test_long_stages_log_progress_at_a_steady_rate(project, tmp_path, monkeypatch, capsys):
    """In a flow there is no progress bar: distill and cache log step, loss terms, rate and ETA as they go."""
    from tasks.stages import cache_teacher, dense_ref, distill

    monkeypatch.setenv("SPARSEKD_PROGRESS_SECONDS", "0")
    work = str(tmp_path / "w")
    dense = dense_ref(str(project / "dense"))
    cache = cache_teacher.fn(dense, {"data": str(project / "corpus.jsonl"), "num_samples": 4, "seq_len": 24,
                                     "top_k": 8, "chunk_size": 2, "batch_size": 2}, work, device="cpu")
    distill.fn(dense, cache, dict(max_steps=3, batch_size=1, eval_every=0, val_tokens=32, val_ctx=16,
                                  val_data=str(project / "valid.txt")), 0, work, device="cpu")
    out = capsys.readouterr().out
    assert "cache: sequences 2/4 (50%)" in out and "cache: sequences 4/4 (100%)" in out
    assert "distill: step 1/3 (33%), loss" in out and " kd " in out and " ce " in out and "ETA" in out
    assert "distill: step 3/3 (100%)" in out
