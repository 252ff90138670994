"""Teacher cache: round trip, fingerprint mismatch, resume after kill -9 gives identical arrays, CLI JSON, shards."""

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
from sparsekd_core.cache import (CacheIncompleteError, CacheMismatchError, TeacherCache, shard_chunks, teacher_topk,
                                 write_cache)
from sparsekd_core.config import CacheConfig

ROOT = Path(__file__).resolve().parents[1]
FP = {"model": "tiny", "weights_digest": "w", "tokenizer_digest": "t", "vocab_size": 0, "data": "d",
      "data_digest": "x", "num_samples": None, "seed": 0, "dtype": "float32"}


def corpus(vocab: int, n: int = 10, seq_len: int = 12) -> torch.Tensor:
    return torch.randint(0, vocab, (n, seq_len), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("fmt", [1, 2])
def test_round_trip(tmp_path, tiny_llama, fmt):
    vocab = tiny_llama.config.vocab_size
    ids = corpus(vocab)
    cfg = CacheConfig(out=str(tmp_path / "c.zarr"), data=str(tmp_path), top_k=5, chunk_size=4, batch_size=2, seq_len=12,
                      format=fmt)
    res = write_cache(tiny_llama, ids, cfg, FP, vocab)
    assert (res.sequences, res.tokens, res.resumed_chunks, res.computed_chunks) == (10, 120, 0, 3)
    cache = TeacherCache(cfg.out)
    got = cache[[7, 1]]
    top, lp, tail = teacher_topk(tiny_llama, ids[[7, 1]], 5)
    assert torch.equal(got["input_ids"], ids[[7, 1]])
    assert torch.equal(got["topk_ids"], top)
    if fmt == 1:
        assert torch.allclose(got["topk_logprobs"].float(), lp, atol=1e-2, rtol=1e-3)
    else:  # at most half a step off, plus the top-1's fp16 rounding; never above the top-1
        error = (got["topk_logprobs"].float() - lp).abs()
        assert error.max() <= cfg.logprob_step / 2 + lp.abs().max() * 2 ** -11
        assert (got["topk_logprobs"][..., 1:] <= got["topk_logprobs"][..., :1]).all()
    # top-k mass + tail mass = 1
    total = got["topk_logprobs"].float().exp().sum(-1) + got["tail_logmass"].float().exp()
    assert torch.allclose(total, torch.ones_like(total), atol=5e-3 if fmt == 1 else cfg.logprob_step)
    assert cache.fingerprint["top_k"] == 5 and cache.fingerprint["weights_digest"] == "w"
    assert cache.fingerprint["format"] == fmt and cache.format == fmt


def test_format2_store_with_the_earlier_codes_layout_resumes_and_reads_the_same(tmp_path, tiny_llama):
    """Format-2 codes are stored rank-major and bit-shuffled now. A store begun before (codes position-major,
    byte-shuffled) and killed must still be finished by a rerun, in its own layout, and read like a fresh store."""
    import zarr
    from zarr.codecs import BloscCodec

    def first_codec(array) -> str:
        return array.metadata.codecs[0].to_dict()["name"]

    vocab = tiny_llama.config.vocab_size
    ids = corpus(vocab)
    cfg = CacheConfig(out=str(tmp_path / "old.zarr"), data=str(tmp_path), top_k=5, chunk_size=4, batch_size=2,
                      seq_len=12)
    fresh = cfg.model_copy(update={"out": str(tmp_path / "fresh.zarr")})
    write_cache(tiny_llama, ids, fresh, FP, vocab)
    assert first_codec(zarr.open_group(fresh.out, mode="r")["topk_codes"]) == "transpose"
    # The old layout, with chunk 1 of every array lost (as a kill -9 before its chunk_done would leave it).
    write_cache(tiny_llama, ids, cfg, FP, vocab)
    group = zarr.open_group(cfg.out, mode="a", zarr_format=3)
    values = group["topk_codes"][:]
    old = group.create_array("topk_codes", shape=values.shape, dtype=values.dtype, chunks=(4,) + values.shape[1:],
                             fill_value=0, compressors=BloscCodec(cname="zstd", clevel=5, shuffle="shuffle"),
                             overwrite=True)
    old[:] = values
    for name in ("topk_ids", "topk_top", "topk_codes", "tail_logmass"):
        group[name][4:8] = 0
    group["chunk_done"][1] = 0
    res = write_cache(tiny_llama, ids, cfg, FP, vocab)
    assert (res.resumed_chunks, res.computed_chunks) == (2, 1)
    assert first_codec(zarr.open_group(cfg.out, mode="r")["topk_codes"]) != "transpose"
    got, want = TeacherCache(cfg.out)[list(range(10))], TeacherCache(fresh.out)[list(range(10))]
    assert all(torch.equal(got[name], want[name]) for name in want)


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
    cfg = CacheConfig(out={out!r}, data={tests!r}, top_k=5, chunk_size=4, seq_len=12, **{shard!r})
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
    script = KILLER.format(tests=str(ROOT / "tests"), out=str(killed), fp=FP, shard={})
    proc = subprocess.run([sys.executable, "-c", script], env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=120)
    assert proc.returncode == -9
    cfg = CacheConfig(out=str(killed), data=str(tmp_path), top_k=5, chunk_size=4, seq_len=12)
    res = write_cache(tiny_llama, corpus(vocab), cfg, FP, vocab)
    assert res.resumed_chunks == 1 and res.computed_chunks == 2
    clean = cfg.model_copy(update={"out": str(tmp_path / "clean.zarr")})
    write_cache(tiny_llama, corpus(vocab), clean, FP, vocab)
    for name in [p.name for p in killed.iterdir() if p.is_dir()]:
        a = sorted(p.relative_to(killed) for p in (killed / name).rglob("*") if p.is_file())
        b = sorted(p.relative_to(clean.out) for p in (Path(clean.out) / name).rglob("*") if p.is_file())
        assert a == b
        for rel in a:  # the same bytes in every chunk file
            assert (killed / rel).read_bytes() == (Path(clean.out) / rel).read_bytes()


def same_arrays(a: Path, b: Path) -> None:
    """Two stores hold the same chunk files with the same bytes, array for array (chunk_done included)."""
    names = sorted(p.name for p in a.iterdir() if p.is_dir())
    assert names == sorted(p.name for p in b.iterdir() if p.is_dir()) and "chunk_done" in names
    for name in names:
        files_a = sorted(p.relative_to(a) for p in (a / name).rglob("*") if p.is_file())
        files_b = sorted(p.relative_to(b) for p in (b / name).rglob("*") if p.is_file())
        assert files_a == files_b and files_a, name
        for rel in files_a:
            assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel


def test_shard_ranges_are_disjoint_and_cover_every_chunk():
    for chunks in (1, 2, 5, 7, 16):
        for shards in (1, 2, 3, 4, 9):
            ranges = [shard_chunks(chunks, i, shards) for i in range(shards)]
            assert [c for r in ranges for c in r] == list(range(chunks))


def test_killed_shard_rerun_and_other_shard_equal_one_process(tmp_path, tiny_llama):
    """Shard 0/2 killed with kill -9 mid-chunk, shard 1/2 finished, the store is refused as incomplete; rerunning
    shard 0/2 completes it, and it equals a one-process cache byte for byte."""
    vocab = tiny_llama.config.vocab_size
    store = tmp_path / "sharded.zarr"
    # 10 sequences / chunk 4 = 3 chunks: shard 0 has chunk 0, shard 1 has chunks 1-2. Die at its 6th forward
    # pass would be past shard 0's 4 sequences, so die on the 3rd: chunk 0 half done, nothing marked.
    script = KILLER.format(tests=str(ROOT / "tests"), out=str(store), fp=FP,
                           shard={"shard_index": 0, "num_shards": 2}).replace("len(calls) == 6", "len(calls) == 3")
    proc = subprocess.run([sys.executable, "-c", script], env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=120)
    assert proc.returncode == -9
    cfg = CacheConfig(out=str(store), data=str(tmp_path), top_k=5, chunk_size=4, seq_len=12, num_shards=2)
    other = write_cache(tiny_llama, corpus(vocab), cfg.model_copy(update={"shard_index": 1}), FP, vocab)
    assert (other.computed_chunks, other.chunks_done, other.complete) == (2, 2, False)
    with pytest.raises(CacheIncompleteError, match="2 of 3 chunks"):
        TeacherCache(str(store))
    rerun = write_cache(tiny_llama, corpus(vocab), cfg, FP, vocab)
    assert (rerun.resumed_chunks, rerun.computed_chunks, rerun.complete) == (0, 1, True)
    clean = tmp_path / "clean.zarr"
    write_cache(tiny_llama, corpus(vocab), cfg.model_copy(update={"out": str(clean), "num_shards": 1}), FP, vocab)
    same_arrays(store, clean)
    assert TeacherCache(str(store)).fingerprint == TeacherCache(str(clean)).fingerprint


def test_two_concurrent_cli_shards_equal_one_process(tmp_path, tiny_model_dir, capsys):
    """`sparsekd cache --shard 0/2` and `--shard 1/2` started at once on one store give a one-process cache."""
    text = tmp_path / "corpus.txt"
    text.write_text("\n\n".join(f"Document {i}. {t}" for i in range(4) for t in TRAIN_TEXT))
    common = ["--model", str(tiny_model_dir), "--data", str(text), "--seq-len", "16", "--top-k", "4",
              "--chunk-size", "2", "--batch-size", "1", "--json"]
    sharded = tmp_path / "sharded.zarr"
    procs = [subprocess.Popen([sys.executable, "-m", "sparsekd", "cache", *common, "--out", str(sharded),
                               "--shard", f"{i}/2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=dict(os.environ, PYTHONPATH=str(ROOT))) for i in range(2)]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert sorted(r["shard"] for r in results) == ["0/2", "1/2"]
    chunks = results[0]["chunks"]
    assert chunks >= 3 and sum(r["computed_chunks"] for r in results) == chunks  # no chunk computed twice
    assert any(r["complete"] for r in results)  # whichever finished last saw the whole store
    clean = tmp_path / "clean.zarr"
    assert main(["cache", *common, "--out", str(clean)]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["computed_chunks"] == chunks
    same_arrays(sharded, clean)
    assert main(["cache", *common, "--out", str(clean), "--shard", "2/2"]) == 2
    assert "I must be 0..N-1" in capsys.readouterr().err


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


def test_sampled_cache_round_trip_and_shards(tmp_path, tiny_llama):
    """--teacher-sample: N draws per position (distinct ids, counts summing to N, tempered log-probs), seeded per
    chunk, so two shards give the one-process store byte for byte."""
    from sparsekd_core.cache import sample_classes

    vocab = tiny_llama.config.vocab_size
    ids = corpus(vocab)
    cfg = CacheConfig(out=str(tmp_path / "one.zarr"), data=str(tmp_path), chunk_size=4, seq_len=12, teacher_sample=12,
                      batch_size=2)
    res = write_cache(tiny_llama, ids, cfg, FP, vocab)
    assert res.top_k is None and res.format == 3 and res.teacher_sample == 12
    cache = TeacherCache(cfg.out)
    assert cache.kind == "sampled" and cache.sample_temperature == 2.0
    got = cache[[5, 6]]  # chunk 1, its two batches
    assert (got["sample_counts"].sum(-1) == 12).all()
    with torch.no_grad():
        logits = tiny_llama(input_ids=ids[4:8]).logits
    generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + 1)
    draws = [sample_classes(logits[i:i + 2], 12, 2.0, generator) for i in (0, 2)]
    assert torch.equal(got["sample_ids"], torch.cat([d[0] for d in draws])[1:3])
    assert torch.allclose(got["sample_logprobs"].float(), torch.cat([d[2] for d in draws])[1:3],
                          atol=cfg.logprob_step / 2 + 1e-6)
    sharded = cfg.model_copy(update={"out": str(tmp_path / "sharded.zarr"), "num_shards": 2})
    for index in (1, 0):
        write_cache(tiny_llama, ids, sharded.model_copy(update={"shard_index": index}), FP, vocab)
    same_arrays(Path(cfg.out), Path(sharded.out))
