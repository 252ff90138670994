"""Distillation loop: fixed point, KD falls, exact resume after a kill, NaN guard, CLI JSON, tokenizer check."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from conftest import TRAIN_TEXT, make_tokenizer
from sparsekd.cli import main
from sparsekd_core.cache import tokenizer_digest, write_cache
from sparsekd_core.config import CacheConfig, ConfigError, DistillConfig
from sparsekd_core.distill import DistillError, distill
from sparsekd_core.kd_loss import KDLoss
from sparsekd_core.models import weights_digest

DISTILL_JSON = {"steps", "kd_loss_first", "kd_loss_last", "ce_loss_first", "ce_loss_last", "val_ppl_best",
                "tokens_per_s", "resumed_from_step"}


@pytest.fixture
def val_file(tmp_path):
    path = tmp_path / "valid.txt"
    path.write_text(" ".join(TRAIN_TEXT) * 3)
    return str(path)


def make_cache(tmp_path, teacher, tokenizer, name: str, sequences: int) -> str:
    """A cache of `teacher` over random token sequences (16 tokens each, top-8)."""
    vocab = teacher.config.vocab_size
    ids = torch.randint(0, vocab, (sequences, 16), generator=torch.Generator().manual_seed(0))
    cfg = CacheConfig(out=str(tmp_path / name), data=str(tmp_path), top_k=8, chunk_size=4, seq_len=16)
    fp = {"model": name, "weights_digest": weights_digest(teacher), "tokenizer_digest": tokenizer_digest(tokenizer),
          "vocab_size": vocab, "data": "random", "data_digest": "x", "num_samples": sequences, "seed": 0,
          "dtype": "float32"}
    write_cache(teacher, ids, cfg, fp, vocab)
    return cfg.out


@pytest.fixture
def teacher_cache(tmp_path, tiny_llama, tiny_tokenizer):
    return make_cache(tmp_path, tiny_llama, tiny_tokenizer, "teacher.zarr", 12)


def distill_config(tmp_path, name, cache, val_file, **overrides) -> DistillConfig:
    values = dict(cache=cache, out=str(tmp_path / name), val_data=val_file, val_tokens=64, val_ctx=32, lr=1e-3,
                  checkpoint_every=2, eval_every=3, patience=10)
    return DistillConfig(**(values | overrides))


def run(tmp_path, name, cache, val_file, model, tokenizer, on_step=None, **overrides):
    """Distill with small test settings; returns the result and the (step, kd, ce) of every step."""
    losses = []
    res = distill(distill_config(tmp_path, name, cache, val_file, **overrides), model, tokenizer, student_spec="tiny",
                  log=lambda m: None, progress=lambda step, total, p: losses.append((step, p["kd"], p["ce"])),
                  on_step=on_step)
    return res, losses


def test_dense_student_on_own_cache_starts_at_zero(tmp_path, teacher_cache, val_file, tiny_llama, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    student = copy.deepcopy(tiny_llama)
    res, _ = run(tmp_path, "dense", teacher_cache, val_file, student, tiny_tokenizer, max_steps=3)
    assert res.self_referential and res.steps == 3
    assert abs(res.kd_loss_first) < 1e-4  # zero up to the fp16 storage of the teacher log-probs
    assert set(res.as_dict()) >= DISTILL_JSON
    reloaded = AutoModelForCausalLM.from_pretrained(res.out)  # the output directory is an HF model
    assert reloaded.config.vocab_size == tiny_llama.config.vocab_size


def test_kd_falls_for_a_student_that_differs(tmp_path, val_file, tiny_llama, tiny_tokenizer):
    # A sharper teacher (scaled tied embeddings) than the student, so the KD term starts well above zero.
    teacher = copy.deepcopy(tiny_llama)
    with torch.no_grad():
        teacher.get_input_embeddings().weight.mul_(20.0)
    cache = make_cache(tmp_path, teacher, tiny_tokenizer, "sharp.zarr", 8)
    res, _ = run(tmp_path, "student", cache, val_file, copy.deepcopy(tiny_llama), tiny_tokenizer, alpha=1.0,
                 lr=1e-2, epochs=2, batch_size=2, eval_every=0)
    assert not res.self_referential
    assert res.kd_loss_first > 0.1
    assert res.kd_loss_last < 0.8 * res.kd_loss_first


def test_resume_after_kill_gives_the_same_losses(tmp_path, teacher_cache, val_file, tiny_llama, tiny_tokenizer):
    kw = dict(max_steps=7, alpha=0.5, seed=3)
    _, full = run(tmp_path, "full", teacher_cache, val_file, copy.deepcopy(tiny_llama), tiny_tokenizer, **kw)

    class Killed(Exception):
        pass

    def kill_at_5(step):
        if step == 5:
            raise Killed

    cfg = distill_config(tmp_path, "killed", teacher_cache, val_file, **kw)
    first = []
    with pytest.raises(Killed):
        distill(cfg, copy.deepcopy(tiny_llama), tiny_tokenizer, "tiny", log=lambda m: None,
                progress=lambda s, t, p: first.append((s, p["kd"], p["ce"])), on_step=kill_at_5)
    assert first == full[:5]  # same seed + same data = same loss curve
    res, second = run(tmp_path, "killed", teacher_cache, val_file, copy.deepcopy(tiny_llama), tiny_tokenizer, **kw)
    assert res.resumed_from_step == 4  # the last checkpoint before the kill
    assert second == full[4:]


def test_nan_guard_skips_and_aborts(tmp_path, teacher_cache, val_file, tiny_llama, tiny_tokenizer, monkeypatch):
    real = KDLoss.forward
    calls = []

    def sometimes_nan(self, *a):
        calls.append(1)
        out = real(self, *a)
        if len(calls) == 2:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(KDLoss, "forward", sometimes_nan)
    res, _ = run(tmp_path, "one-nan", teacher_cache, val_file, copy.deepcopy(tiny_llama), tiny_tokenizer, max_steps=4)
    assert res.bad_steps == 1 and res.steps == 4

    def always_nan(self, *a):
        out = real(self, *a)
        out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(KDLoss, "forward", always_nan)
    with pytest.raises(DistillError, match=r"3 steps in a row \(steps 1\.\.3\)"):
        run(tmp_path, "all-nan", teacher_cache, val_file, copy.deepcopy(tiny_llama), tiny_tokenizer, max_steps=6,
            max_bad_steps=3)


def test_cache_from_another_tokenizer_is_refused(tmp_path, teacher_cache, val_file, tiny_llama):
    other = make_tokenizer(vocab_size=280)
    with pytest.raises(ConfigError, match="tokenizer"):
        run(tmp_path, "swap", teacher_cache, val_file, copy.deepcopy(tiny_llama), other, max_steps=1)


def test_validation_on_test_split_is_refused():
    with pytest.raises(ValueError, match="evaluation set"):
        DistillConfig(cache="c", out="o", val_data="wikitext2:test")


def test_cli_distill_json(tmp_path, tiny_model_dir, val_file, capsys):
    text = tmp_path / "corpus.txt"
    text.write_text("\n\n".join(f"Document {i}. {t}" for i in range(3) for t in TRAIN_TEXT))
    cache = tmp_path / "c.zarr"
    assert main(["cache", "--model", str(tiny_model_dir), "--data", str(text), "--out", str(cache), "--seq-len", "16",
                 "--top-k", "4", "--chunk-size", "4", "--batch-size", "4", "--json"]) == 0
    capsys.readouterr()
    argv = ["distill", "--student", str(tiny_model_dir), "--cache", str(cache), "--out", str(tmp_path / "student"),
            "--max-steps", "2", "--val-data", val_file, "--val-tokens", "64", "--val-ctx", "32", "--json"]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(result) >= DISTILL_JSON and result["steps"] == 2 and result["resumed_from_step"] == 0
    assert abs(result["kd_loss_first"]) < 1e-4
    assert main(argv[:-1] + ["--tail", "nope"]) == 2
    assert "tail" in capsys.readouterr().err
