"""Distillation loop: fixed point, KD falls, exact resume after a kill, NaN guard, CLI JSON, tokenizer check."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from conftest import TRAIN_TEXT, make_model, make_tokenizer
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


def make_cache(tmp_path, teacher, tokenizer, name: str, sequences: int, **fields) -> str:
    """A cache of `teacher` over random token sequences (16 tokens each, top-8; ``fields``: other CacheConfig)."""
    vocab = teacher.config.vocab_size
    ids = torch.randint(0, vocab, (sequences, 16), generator=torch.Generator().manual_seed(0))
    cfg = CacheConfig(out=str(tmp_path / name), data=str(tmp_path), top_k=8, chunk_size=4, seq_len=16, **fields)
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
    # What "self-referential" means here: no autocast on CPU, an fp32 teacher -> the loss starts at ~0.
    assert result["self_referential"] and "starts at ~0" in result["self_referential_meaning"]
    assert main(argv[:-1] + ["--tail", "nope"]) == 2
    assert "tail" in capsys.readouterr().err


def wanda_student(tmp_path, model, tokenizer, sparsity=0.5, pattern="unstructured"):
    """A WANDA-pruned copy of `model` saved as sparsekd saves it, and loaded back as a stage would."""
    from sparsekd_core.config import ModelConfig, PruneConfig
    from sparsekd_core.models import load_model
    from sparsekd_core.prune import prune_model, save_compressed

    pruned = copy.deepcopy(model)
    tmp_path.mkdir(parents=True, exist_ok=True)
    calib = tmp_path / "calib.txt"
    calib.write_text(" ".join(TRAIN_TEXT) * 4)
    cfg = PruneConfig(method="wanda", target_reduction=sparsity, pattern=pattern, calibration=str(calib),
                      calibration_samples=2, calibration_seq_len=16)
    prune_model(pruned, tokenizer, cfg, log=lambda m: None)
    save_compressed(pruned, tokenizer, tmp_path / "wanda")
    return load_model(ModelConfig(model=str(tmp_path / "wanda")), log=lambda m: None).model


def mlp_zero_masks(model) -> dict:
    from sparsekd_core.prune import find_mlp_matrices

    return {m.name: (m.module.weight == 0).clone() for m in find_mlp_matrices(model)}


def test_wanda_zeros_survive_distillation_checkpoint_and_resume(tmp_path, teacher_cache, val_file, tiny_llama,
                                                                tiny_tokenizer):
    """Table V's post-KD rows must describe a sparse model: exactly the pruned entries are zero after distill,
    through a kill and a resume, with weight decay on; every other entry moved."""
    from safetensors.torch import load_file

    student = wanda_student(tmp_path, tiny_llama, tiny_tokenizer)
    pruned = mlp_zero_masks(student)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    kw = dict(max_steps=6, lr=1e-2, weight_decay=0.1, alpha=0.5)

    class Killed(Exception):
        pass

    def kill_at_3(step):
        if step == 3:
            raise Killed

    with pytest.raises(Killed):
        run(tmp_path, "wanda-kd", teacher_cache, val_file, student, tiny_tokenizer, on_step=kill_at_3, **kw)
    resumed_student = wanda_student(tmp_path / "again", tiny_llama, tiny_tokenizer)
    res, _ = run(tmp_path, "wanda-kd", teacher_cache, val_file, resumed_student, tiny_tokenizer, **kw)
    assert res.resumed_from_step == 2 and res.steps == 6
    saved = load_file(f"{res.out}/model.safetensors")  # the best-validation student
    trained = resumed_student.state_dict()  # the weights after the last step
    for name, mask in pruned.items():
        assert mask.float().mean() == 0.5
        for weight in (saved[f"{name}.weight"], trained[f"{name}.weight"]):
            assert torch.equal(weight == 0, mask), name  # zero exactly where pruned, nowhere else
        moved = (trained[f"{name}.weight"] != before[f"{name}.weight"])[~mask]
        assert moved.float().mean() > 0.9, name
    assert res.masked_entries == sum(int(m.sum()) for m in pruned.values())
    assert res.mlp_zero_fraction == pytest.approx(0.5) and res.mlp_reduction == pytest.approx(0.5)


def test_a_2_4_pattern_holds_through_distillation(tmp_path, teacher_cache, val_file, tiny_llama, tiny_tokenizer):
    """WANDA 2:4: after KD every group of 4 consecutive inputs still holds exactly its 2 zeros (the same ones),
    and the kept weights moved."""
    student = wanda_student(tmp_path, tiny_llama, tiny_tokenizer, pattern="2:4")
    pruned = mlp_zero_masks(student)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    run(tmp_path, "wanda-2-4", teacher_cache, val_file, student, tiny_tokenizer, max_steps=4, lr=1e-2,
        weight_decay=0.1)
    trained = student.state_dict()
    for name, mask in pruned.items():
        weight = trained[f"{name}.weight"]
        assert torch.equal(weight == 0, mask), name
        assert ((weight == 0).reshape(weight.shape[0], -1, 4).sum(-1) == 2).all(), name
        assert (weight != before[f"{name}.weight"])[~mask].float().mean() > 0.9, name


def test_cli_distill_of_a_wanda_checkpoint_reports_its_zeros(tmp_path, tiny_model_dir, val_file, capsys):
    """The issue's check: prune --method wanda --target-reduction 0.5, then distill a few steps: every MLP matrix
    of the student is exactly half zero, and the JSON says so."""
    from safetensors.torch import load_file

    text = tmp_path / "corpus.txt"
    text.write_text("\n\n".join(f"Document {i}. {t}" for i in range(3) for t in TRAIN_TEXT))
    calib = tmp_path / "calib.txt"
    calib.write_text(" ".join(TRAIN_TEXT) * 4)
    pruned = tmp_path / "pruned"
    assert main(["prune", "--model", str(tiny_model_dir), "--method", "wanda", "--target-reduction", "0.5",
                 "--calibration", str(calib), "--calibration-samples", "2", "--calibration-seq-len", "16",
                 "--out", str(pruned), "--json"]) == 0
    cache = tmp_path / "c.zarr"
    assert main(["cache", "--model", str(tiny_model_dir), "--data", str(text), "--out", str(cache), "--seq-len", "16",
                 "--top-k", "4", "--chunk-size", "4", "--batch-size", "4"]) == 0
    capsys.readouterr()
    assert main(["distill", "--student", str(pruned), "--cache", str(cache), "--out", str(tmp_path / "student"),
                 "--max-steps", "3", "--lr", "1e-2", "--val-data", val_file, "--val-tokens", "64", "--val-ctx", "32",
                 "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["mlp_zero_fraction"] == 0.5 and result["mlp_nonzero"] * 2 == result["mlp_params"]
    saved = load_file(str(tmp_path / "student" / "model.safetensors"))
    mlp = [v for k, v in saved.items() if ".mlp." in k]
    assert mlp and all(float((w == 0).float().mean()) == 0.5 for w in mlp)
    assert main(["eval", "--model", str(tmp_path / "student"), "--data", val_file, "--ctx", "32", "--stride", "32",
                 "--json"]) == 0
    evaluated = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert evaluated["mlp_zero_fraction"] == 0.5  # the evaluated model is counted, not the pruning target


KILL_SCRIPT = r"""
import os, signal, sys
sys.path.insert(0, {tests!r})
from conftest import make_model, make_tokenizer
import sparsekd_core.files as files
from sparsekd_core.config import DistillConfig
from sparsekd_core.distill import distill

kill_at, calls, real = int(sys.argv[1]), [0], files._fsync_dir

def counting(directory):  # called once after every commit point of a file or directory write
    real(directory)
    calls[0] += 1
    if calls[0] == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)

files._fsync_dir = counting
tok = make_tokenizer()
distill(DistillConfig(**{config!r}, out=sys.argv[2]), make_model("llama", len(tok)), tok, "tiny", log=lambda m: None)
"""


def test_sigkill_anywhere_then_rerun_gives_the_same_weights(tmp_path, teacher_cache, val_file, monkeypatch):
    """A real SIGKILL of a distill process right after a commit point of its writes (of a checkpoint, of the best
    model, of each file of the final model, of distill.json), then the same command: the final weights equal an
    uninterrupted run's, and no work directory is left behind. The states between the renames of a directory swap
    are covered by test_store.py::test_recover_dir_leaves_exactly_one_complete_directory."""
    import subprocess
    import sys
    from pathlib import Path

    from safetensors.torch import load_file

    import sparsekd_core.files as files

    config = dict(cache=teacher_cache, val_data=val_file, val_tokens=64, val_ctx=32, lr=1e-3, checkpoint_every=2,
                  eval_every=2, patience=10, max_steps=5, seed=1)
    script = tmp_path / "kill_distill.py"
    script.write_text(KILL_SCRIPT.format(tests=str(Path(__file__).parent), config=config))

    def fresh_run(out: Path):
        tok = make_tokenizer()
        return distill(DistillConfig(**config, out=str(out)), make_model("llama", len(tok)), tok, "tiny",
                       log=lambda m: None)

    commits, real = [0], files._fsync_dir
    monkeypatch.setattr(files, "_fsync_dir", lambda d: (real(d), commits.__setitem__(0, commits[0] + 1)))
    fresh_run(tmp_path / "reference")
    monkeypatch.setattr(files, "_fsync_dir", real)
    total = commits[0]
    assert total >= 12  # checkpoints, best models, the final files, distill.json
    expected = load_file(tmp_path / "reference" / "model.safetensors")
    expected_json = json.loads((tmp_path / "reference" / "distill.json").read_text())
    # Early (the first best model), a checkpoint in the middle, and every commit of the end of the run.
    for point in sorted({1, total // 2, *range(total - 7, total + 1)}):
        out = tmp_path / f"killed-{point}"
        killed = subprocess.run([sys.executable, str(script), str(point), str(out)], capture_output=True, text=True,
                                timeout=300)
        assert killed.returncode == -9, (point, killed.stderr[-2000:])
        fresh_run(out)  # the same command again, to the end
        got = load_file(out / "model.safetensors")
        assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in expected), point
        done = json.loads((out / "distill.json").read_text())
        assert done["val_history"] == expected_json["val_history"] and done["steps"] == expected_json["steps"]
        leftovers = [p.name for p in out.iterdir() if p.name in ("checkpoint", "best") or ".tmp-" in p.name
                     or p.name.endswith((".new", ".old"))]
        assert not leftovers, (point, leftovers)


def test_sampled_cache_distills_and_checks_its_temperature(tmp_path, val_file, tiny_llama, tiny_tokenizer):
    """A student that differs from the teacher learns from a sampled-class cache (tail=sampled); the tail and the
    temperature must fit the cache."""
    teacher = copy.deepcopy(tiny_llama)  # sharper than the student, as in test_kd_falls_for_a_student_that_differs
    with torch.no_grad():
        teacher.get_input_embeddings().weight.mul_(20.0)
    cache = make_cache(tmp_path, teacher, tiny_tokenizer, "sampled.zarr", 8, teacher_sample=12)
    student = copy.deepcopy(tiny_llama)
    ids = torch.randint(0, tiny_llama.config.vocab_size, (8, 16), generator=torch.Generator().manual_seed(0))

    def full_kd(model) -> float:  # the full-vocabulary T²·KL to the teacher on the cached sequences (T = 2)
        with torch.no_grad():
            p = torch.log_softmax(teacher(input_ids=ids).logits / 2, -1)
            q = torch.log_softmax(model(input_ids=ids).logits / 2, -1)
        return float(4 * (p.exp() * (p - q)).sum(-1).mean())

    before = full_kd(student)
    res, losses = run(tmp_path, "s", cache, val_file, student, tiny_tokenizer, tail="sampled", alpha=1.0, lr=2e-2,
                      epochs=6, batch_size=2, eval_every=0)
    assert res.steps == 24 and len(losses) == 24
    assert full_kd(student) < 0.7 * before  # the student moved toward the teacher's full distribution
    with pytest.raises(ConfigError, match="needs tail=sampled"):
        run(tmp_path, "t", cache, val_file, student, tiny_tokenizer, max_steps=1)
    top = make_cache(tmp_path, teacher, tiny_tokenizer, "top.zarr", 8)
    with pytest.raises(ConfigError, match="needs such a cache"):
        run(tmp_path, "v", top, val_file, student, tiny_tokenizer, tail="sampled", max_steps=1)
    with pytest.raises(ConfigError, match="differs from the temperature"):
        run(tmp_path, "u", cache, val_file, student, tiny_tokenizer, tail="sampled", temperature=1.0, max_steps=1)
