"""Distributed training under torchrun (2 gloo ranks on CPU): the same losses and weights as one process at the same
global batch, each rank on its own contiguous slice, resume on another number of ranks, FSDP2, the batch rule.

The launched command is `sparsekd distill` itself: LAUNCH (written next to the test data) runs sparsekd.cli.main
after installing a spy that records which sequences each rank reads, and an optional SIGKILL or NaN on rank 1.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import TRAIN_TEXT, make_model, make_tokenizer
from sparsekd.cli import main
from sparsekd_core.distill import batch_indices

ROOT = Path(__file__).resolve().parents[1]
SEQUENCES, BATCH, ACCUM, STEPS = 16, 4, 2, 10  # 16 sequences, global micro-batch 4: 2 steps an epoch, 5 epochs

LAUNCH = r"""
import json, os, signal, sys

import sparsekd_core.distill as distill_module
from sparsekd.cli import main
from sparsekd_core.cache import TeacherCache
from sparsekd_core.kd_loss import KDLoss

rank, seen = int(os.environ.get("RANK", "0")), []
real_getitem, real_distill, real_loss = TeacherCache.__getitem__, distill_module.distill, KDLoss.forward


def spy(self, indices):  # the sequences this rank trains on, in order
    seen.append([int(i) for i in indices])
    return real_getitem(self, indices)


def kill(step):
    if step == int(os.environ.get("KILL_AT_STEP", "0")):
        os.kill(os.getpid(), signal.SIGKILL)


calls = [0]


def nan_on_rank_1(self, *args):
    out = real_loss(self, *args)
    calls[0] += 1
    if rank == 1 and calls[0] == int(os.environ.get("NAN_AT_CALL", "0")):
        out.loss = out.loss * float("nan")
    return out


TeacherCache.__getitem__ = spy
KDLoss.forward = nan_on_rank_1
distill_module.distill = lambda *a, **kw: real_distill(*a, on_step=kill, **kw)
code = main(sys.argv[1:])
with open(os.path.join(os.environ["SPY_DIR"], f"rank{rank}.json"), "w") as f:
    json.dump(seen, f)
sys.exit(code)
"""


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A tiny WANDA-pruned student, a teacher cache (of the dense model, over the validation text, so that
    validation improves and the best model is the last), and the validation text."""
    from sparsekd_core.cache import tokenizer_digest, write_cache
    from sparsekd_core.config import CacheConfig, PruneConfig
    from sparsekd_core.models import weights_digest
    from sparsekd_core.prune import prune_model, save_compressed

    root = tmp_path_factory.mktemp("ddp")
    tok = make_tokenizer()
    dense = make_model("llama", len(tok))
    text = " ".join(TRAIN_TEXT) * 3
    (root / "valid.txt").write_text(text)
    (root / "calib.txt").write_text(" ".join(TRAIN_TEXT) * 4)
    pruned = make_model("llama", len(tok))
    prune_model(pruned, tok, PruneConfig(method="wanda", target_reduction=0.5, calibration=str(root / "calib.txt"),
                                         calibration_samples=2, calibration_seq_len=16), log=lambda m: None)
    save_compressed(pruned, tok, root / "wanda")
    ids = torch.tensor(tok(text)["input_ids"])
    starts = torch.randint(0, ids.numel() - 16, (SEQUENCES,), generator=torch.Generator().manual_seed(0))
    cfg = CacheConfig(out=str(root / "cache.zarr"), data=str(root), top_k=8, chunk_size=4, seq_len=16)
    fingerprint = {"model": "dense", "weights_digest": weights_digest(dense), "tokenizer_digest": tokenizer_digest(tok),
                   "vocab_size": dense.config.vocab_size, "data": "valid", "data_digest": "x",
                   "num_samples": SEQUENCES, "seed": 0, "dtype": "float32"}
    write_cache(dense, torch.stack([ids[s : s + 16] for s in starts]), cfg, fingerprint, dense.config.vocab_size)
    (root / "launch.py").write_text(LAUNCH)
    return root


def distill_argv(project: Path, out: Path, *extra: str) -> list[str]:
    # grad_clip 0.05 is below every step's gradient norm here: the losses match only if the clip sees the global norm.
    return ["distill", "--student", str(project / "wanda"), "--cache", str(project / "cache.zarr"), "--out", str(out),
            "--val-data", str(project / "valid.txt"), "--val-tokens", "64", "--val-ctx", "32", "--lr", "1e-2",
            "--batch-size", str(BATCH), "--grad-accum", str(ACCUM), "--epochs", "5", "--eval-every", "3",
            "--checkpoint-every", "2", "--patience", "10", "--grad-clip", "0.05", "--weight-decay", "0.1", "--json",
            *extra]


def launch(project: Path, argv: list[str], nproc: int = 2, **env: str) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc-per-node N launch.py ARGV` (launch.py = sparsekd's CLI plus the spies)."""
    spy_dir = Path(argv[argv.index("--out") + 1] + "-spy")
    spy_dir.mkdir(parents=True, exist_ok=True)
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
                        "SPY_DIR": str(spy_dir), "OMP_NUM_THREADS": "1", **env}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                           str(nproc), str(project / "launch.py"), *argv], capture_output=True, text=True, env=env,
                          timeout=300, check=False)


def run_here(argv: list[str], monkeypatch=None, kill_at: int | None = None) -> int:
    """The same command in this process (one rank); ``kill_at``: stop it after that step, as a kill would."""
    import sparsekd_core.distill as distill_module

    class Killed(Exception):
        pass

    if kill_at is not None:
        real = distill_module.distill

        def killed_at(step):
            if step == kill_at:
                raise Killed

        monkeypatch.setattr(distill_module, "distill", lambda *a, **kw: real(*a, on_step=killed_at, **kw))
        with pytest.raises(Killed):
            main(argv)
        monkeypatch.setattr(distill_module, "distill", real)
        return 0
    return main(argv)


def finished(out: Path) -> tuple[dict, dict]:
    from safetensors.torch import load_file

    return json.loads((out / "distill.json").read_text()), load_file(out / "model.safetensors")


def assert_same_run(got: Path, expected: Path) -> None:
    """Per-step losses within float rounding, the same validation curve and best step, and the same weights."""
    (run, weights), (ref, ref_weights) = finished(got), finished(expected)
    assert run["best_step"] == ref["best_step"] == STEPS  # the published student is the trained one
    assert [h[0] for h in run["loss_history"]] == list(range(1, STEPS + 1)) == [h[0] for h in ref["loss_history"]]
    got_terms = torch.tensor([h[1:] for h in run["loss_history"]], dtype=torch.float64)
    ref_terms = torch.tensor([h[1:] for h in ref["loss_history"]], dtype=torch.float64)
    torch.testing.assert_close(got_terms, ref_terms, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(torch.tensor(run["val_history"]), torch.tensor(ref["val_history"]), rtol=1e-4, atol=0)
    assert weights.keys() == ref_weights.keys()
    for name in ref_weights:
        torch.testing.assert_close(weights[name], ref_weights[name], rtol=0, atol=1e-5, msg=name)


def assert_pruned_zeros_hold(project: Path, out: Path) -> None:
    from safetensors.torch import load_file

    pruned, trained = load_file(project / "wanda" / "model.safetensors"), load_file(out / "model.safetensors")
    mlp = [name for name in pruned if ".mlp." in name]
    assert mlp and all(torch.equal(trained[name] == 0, pruned[name] == 0) for name in mlp)
    assert all(float((pruned[name] == 0).float().mean()) == 0.5 for name in mlp)


@pytest.fixture(scope="module")
def one_process(project):
    """The reference: the same command in one process."""
    out = project / "one-process"
    assert main(distill_argv(project, out)) == 0
    return out


def test_two_ranks_match_one_process_each_on_its_half_of_every_batch(project, one_process):
    out = project / "ddp"
    done = launch(project, distill_argv(project, out))
    assert done.returncode == 0, done.stderr[-3000:]
    printed = [line for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(printed) == 1 and json.loads(printed[0])["steps"] == STEPS  # rank 0 alone prints the JSON
    assert_same_run(out, one_process)
    assert_pruned_zeros_hold(project, out)  # the WANDA mask holds under DDP
    # Each rank read B/N sequences per micro-step: its contiguous half of the one global batch, every micro-step.
    per_rank = BATCH // 2
    for rank in (0, 1):
        seen = json.loads((project / "ddp-spy" / f"rank{rank}.json").read_text())
        expected = [batch_indices(m, SEQUENCES, BATCH, 0)[rank * per_rank : (rank + 1) * per_rank]
                    for m in range(STEPS * ACCUM)]
        assert seen == expected


def test_resume_on_another_number_of_ranks(project, one_process, monkeypatch):
    """Killed on 2 ranks, finished in 1 process; killed in 1 process, finished on 2 ranks: both end where an
    uninterrupted run ends (the checkpoint counts global batches and holds full, unsharded state)."""
    two_then_one = project / "two-then-one"
    killed = launch(project, distill_argv(project, two_then_one), KILL_AT_STEP="5")
    assert killed.returncode != 0 and (two_then_one / "checkpoint" / "state.pt").is_file()
    assert not (two_then_one / "distill.json").exists()
    assert run_here(distill_argv(project, two_then_one)) == 0
    assert finished(two_then_one)[0]["resumed_from_step"] == 4
    assert_same_run(two_then_one, one_process)

    one_then_two = project / "one-then-two"
    run_here(distill_argv(project, one_then_two), monkeypatch, kill_at=5)
    resumed = launch(project, distill_argv(project, one_then_two))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert finished(one_then_two)[0]["resumed_from_step"] == 4
    assert_same_run(one_then_two, one_process)


def test_fsdp_matches_one_process_through_a_kill(project, one_process, monkeypatch):
    """FSDP2 on 2 gloo ranks, killed after step 5 and resumed: the one-process losses and weights; its checkpoint
    has the one-process format (full weights, optimizer state keyed by parameter index); the WANDA mask holds."""
    out = project / "fsdp"
    killed = launch(project, distill_argv(project, out, "--parallel", "fsdp"), KILL_AT_STEP="5")
    assert killed.returncode != 0 and (out / "checkpoint" / "state.pt").is_file()
    reference = project / "fsdp-reference"  # one process, stopped at the same point
    run_here(distill_argv(project, reference), monkeypatch, kill_at=5)
    from safetensors.torch import load_file

    got, expected = (load_file(d / "checkpoint" / "model.safetensors") for d in (out, reference))
    assert got.keys() == expected.keys()
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    got, expected = (torch.load(d / "checkpoint" / "optimizer.pt", weights_only=True) for d in (out, reference))
    assert got["param_groups"] == expected["param_groups"]
    torch.testing.assert_close(got["state"], expected["state"], rtol=1e-4, atol=1e-7)
    got, expected = (torch.load(d / "checkpoint" / "state.pt", weights_only=True) for d in (out, reference))
    assert {k: got[k] for k in ("step", "micro_index", "tokens", "best_step")} == \
        {k: expected[k] for k in ("step", "micro_index", "tokens", "best_step")} == \
        {"step": 4, "micro_index": 4 * ACCUM, "tokens": 4 * ACCUM * BATCH * 16, "best_step": 3}

    resumed = launch(project, distill_argv(project, out, "--parallel", "fsdp"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert finished(out)[0]["resumed_from_step"] == 4
    assert_same_run(out, one_process)
    assert_pruned_zeros_hold(project, out)


def test_a_nan_on_one_rank_skips_the_step_on_every_rank(project):
    out = project / "nan"
    done = launch(project, distill_argv(project, out), NAN_AT_CALL="4")  # rank 1, the last micro-step of step 2
    assert done.returncode == 0, done.stderr[-3000:]
    run, _ = finished(out)
    assert run["bad_steps"] == 1 and run["steps"] == STEPS
    assert [h[0] for h in run["loss_history"]] == [s for s in range(1, STEPS + 1) if s != 2]


def test_batch_not_divisible_by_the_ranks_is_refused(project, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    argv = distill_argv(project, project / "odd")
    argv[argv.index("--batch-size") + 1] = "3"
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "batch_size=3" in err and "2 processes" in err and "multiple of 2" in err
    assert not (project / "odd").exists()  # refused before anything was written


def test_sft_on_two_ranks_weights_each_rank_by_its_response_tokens(project, tmp_path):
    """SFT's loss is a mean over response tokens, whose number differs between ranks: the 2-rank run must still
    follow the one-process curve (each rank's mean weighted by its token count, dist.Ranks.mean_terms)."""
    pairs = tmp_path / "pairs.jsonl"
    records = [{"prompt": f"Question {i}: what is {i} plus {i}?", "response": f"{i} + {i} = {2 * i}. " * (1 + i % 4)}
               for i in range(8)]
    pairs.write_text("".join(json.dumps(r) + "\n" for r in records))

    def argv(out: Path) -> list[str]:
        return ["sft", "--student", str(project / "wanda"), "--data", str(pairs), "--out", str(out), "--max-len", "48",
                "--lr", "1e-2", "--batch-size", "4", "--epochs", "3", "--eval-every", "0", "--val-data",
                str(project / "valid.txt"), "--val-tokens", "64", "--val-ctx", "32", "--json"]

    assert main(argv(tmp_path / "one")) == 0
    done = launch(project, argv(tmp_path / "two"))
    assert done.returncode == 0, done.stderr[-3000:]
    one, two = (json.loads((tmp_path / d / "sft.json").read_text())["loss_history"] for d in ("one", "two"))
    assert len(one) == len(two) == 6
    torch.testing.assert_close(torch.tensor([h[3] for h in two]), torch.tensor([h[3] for h in one]), rtol=1e-4, atol=0)
