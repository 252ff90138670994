"""Teacher cache: round trip, fingerprint mismatch, resume after kill -9 gives identical arrays, CLI JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from conftest import TRAIN_TEXT
from sparsekd.cli import main
from sparsekd_core.cache import CacheMismatchError, TeacherCache, teacher_topk, write_cache
from sparsekd_core.config import CacheConfig

ROOT = Path(__file__).resolve().parents[1]
FP = {"model": "tiny", "weights_digest": "w", "tokenizer_digest": "t", "vocab_size": 0, "data": "d",
      "data_digest": "x", "num_samples": None, "seed": 0, "dtype": "float32"}


def corpus(vocab: int, n: int = 10, seq_len: int = 12) -> torch.Tensor:
    return torch.randint(0, vocab, (n, seq_len), generator=torch.Generator().manual_seed(0))


def test_round_trip(tmp_path, tiny_llama):
    vocab = tiny_llama.config.vocab_size
    ids = corpus(vocab)
    cfg = CacheConfig(out=str(tmp_path / "c.zarr"), data=str(tmp_path), top_k=5, chunk_size=4, batch_size=2, seq_len=12)
    res = write_cache(tiny_llama, ids, cfg, FP, vocab)
    assert (res.sequences, res.tokens, res.resumed_chunks, res.computed_chunks) == (10, 120, 0, 3)
    cache = TeacherCache(cfg.out)
    got = cache[[7, 1]]
    top, lp, tail = teacher_topk(tiny_llama, ids[[7, 1]], 5)
    assert torch.equal(got["input_ids"], ids[[7, 1]])
    assert torch.equal(got["topk_ids"], top)
    assert torch.allclose(got["topk_logprobs"].float(), lp, atol=1e-2, rtol=1e-3)
    # top-k mass + tail mass = 1
    total = got["topk_logprobs"].float().exp().sum(-1) + got["tail_logmass"].float().exp()
    assert torch.allclose(total, torch.ones_like(total), atol=5e-3)
    assert cache.fingerprint["top_k"] == 5 and cache.fingerprint["weights_digest"] == "w"


def test_fingerprint_mismatch_is_an_error(tmp_path, tiny_llama):
    vocab = tiny_llama.config.vocab_size
    cfg = CacheConfig(out=str(tmp_path / "c.zarr"), data=str(tmp_path), top_k=5, chunk_size=4, seq_len=12)
    write_cache(tiny_llama, corpus(vocab), cfg, FP, vocab)
    with pytest.raises(CacheMismatchError, match="weights_digest"):
        write_cache(tiny_llama, corpus(vocab), cfg, dict(FP, weights_digest="other"), vocab)
    with pytest.raises(CacheMismatchError, match="top_k"):
        write_cache(tiny_llama, corpus(vocab), cfg.model_copy(update={"top_k": 6}), FP, vocab)
    again = write_cache(tiny_llama, corpus(vocab), cfg, FP, vocab)  # same everything: reused, nothing recomputed
    assert again.resumed_chunks == 3 and again.computed_chunks == 0


KILLER = textwrap.dedent("""
    import os, signal, sys, torch
    sys.path.insert(0, {tests!r})
    from conftest import make_model, make_tokenizer
    from sparsekd_core.cache import write_cache
    from sparsekd_core.config import CacheConfig
    import sparsekd_core.cache as cache_mod
    model = make_model("llama", len(make_tokenizer()))
    ids = torch.randint(0, model.config.vocab_size, (10, 12), generator=torch.Generator().manual_seed(0))
    cfg = CacheConfig(out={out!r}, data={tests!r}, top_k=5, chunk_size=4, seq_len=12)
    calls = []
    real = cache_mod.teacher_topk
    def dying(model, x, k):  # die mid-chunk: after chunk 0 is marked done, inside chunk 1
        calls.append(1)
        if len(calls) == 6:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(model, x, k)
    cache_mod.teacher_topk = dying
    write_cache(model, ids, cfg, {fp!r}, model.config.vocab_size)
""")


def test_resume_after_kill_gives_identical_arrays(tmp_path, tiny_llama):
    vocab = tiny_llama.config.vocab_size
    killed = tmp_path / "killed.zarr"
    script = KILLER.format(tests=str(ROOT / "tests"), out=str(killed), fp=FP)
    proc = subprocess.run([sys.executable, "-c", script], env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=120)
    assert proc.returncode == -9
    cfg = CacheConfig(out=str(killed), data=str(tmp_path), top_k=5, chunk_size=4, seq_len=12)
    res = write_cache(tiny_llama, corpus(vocab), cfg, FP, vocab)
    assert res.resumed_chunks == 1 and res.computed_chunks == 2
    clean = cfg.model_copy(update={"out": str(tmp_path / "clean.zarr")})
    write_cache(tiny_llama, corpus(vocab), clean, FP, vocab)
    for name in ("input_ids", "topk_ids", "topk_logprobs", "tail_logmass"):
        a = sorted(p.relative_to(killed) for p in (killed / name).rglob("*") if p.is_file())
        b = sorted(p.relative_to(clean.out) for p in (Path(clean.out) / name).rglob("*") if p.is_file())
        assert a == b
        for rel in a:  # the same bytes in every chunk file
            assert (killed / rel).read_bytes() == (Path(clean.out) / rel).read_bytes()


def test_cli_cache_json(tmp_path, tiny_model_dir, capsys):
    text = tmp_path / "corpus.txt"
    text.write_text("\n\n".join(f"Document {i}. {t}" for i in range(3) for t in TRAIN_TEXT))
    out = tmp_path / "cli.zarr"
    argv = ["cache", "--model", str(tiny_model_dir), "--data", str(text), "--out", str(out), "--seq-len", "16",
            "--top-k", "4", "--chunk-size", "2", "--batch-size", "2", "--json"]
    assert main(argv) == 0
    first = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert first["top_k"] == 4 and first["resumed_chunks"] == 0 and first["sequences"] > 2
    assert first["documents"] >= first["sequences"]  # every sample starts at its own document
    assert 0 < first["bytes_per_token"] and first["tokens_per_s"] > 0
    assert main(argv) == 0
    second = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert second["resumed_chunks"] == -(-first["sequences"] // 2)
    assert main([a if a != "4" else "5" for a in argv]) == 2  # another k on the same store: one-line error
    assert "top_k" in capsys.readouterr().err


def test_fsspec_url_store(tiny_llama, tmp_path):
    """Any fsspec URL works (memory:// here; s3:// the same way with s3fs installed), resume included."""
    vocab = tiny_llama.config.vocab_size
    cfg = CacheConfig(out="memory://sparsekd-test/c.zarr", data=str(tmp_path), top_k=4, chunk_size=2, seq_len=12)
    first = write_cache(tiny_llama, corpus(vocab, n=4), cfg, FP, vocab)
    again = write_cache(tiny_llama, corpus(vocab, n=4), cfg, FP, vocab)
    assert first.bytes > 0 and (first.computed_chunks, again.resumed_chunks) == (2, 2)
    assert TeacherCache(cfg.out)[[3]]["topk_ids"].shape == (1, 12, 4)


def test_tail_logmass_is_accurate_for_confident_positions(tiny_llama):
    """Sharp distributions (tail mass down to ~1e-8) still get the tail right to ~1e-3 of its mass."""
    import copy

    sharp = copy.deepcopy(tiny_llama)
    with torch.no_grad():
        sharp.get_input_embeddings().weight.mul_(40.0)
        ids = corpus(sharp.config.vocab_size, n=2, seq_len=16)
        z = sharp(input_ids=ids).logits.double()
    top, _, tail = teacher_topk(sharp, ids, 8)
    exact = z.scatter(-1, top, float("-inf")).logsumexp(-1) - z.logsumexp(-1)
    assert exact.min() < -12  # the test covers the exact-fallback path
    assert ((tail.double() - exact).exp() - 1).abs().max() < 1e-3
