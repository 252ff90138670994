"""Nothing corrupt is ever trusted: a changed byte, an edited manifest, a truncated student or a flipped bit in a
teacher-cache chunk means recompute (or a clear error naming the chunk), never reuse; a copied workdir checks its own
files (tasks/store.py, sparsekd_core/distill.py, sparsekd_core/cache.py)."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import TRAIN_TEXT, make_flow_project
from tasks.store import MANIFEST, run_stage
from test_object_storage import s3  # noqa: F401 - the moto S3 server fixture

pytestmark = pytest.mark.filterwarnings("ignore")


def quiet(message: str) -> None:
    pass


def flip_bit(path: Path, byte: int = 10, bit: int = 2) -> None:
    """Flip one bit of a file in place (same size)."""
    data = bytearray(path.read_bytes())
    data[byte % len(data)] ^= 1 << bit
    path.write_bytes(bytes(data))


class Producer:
    """A stage whose output is a pure function of its config: weights.bin and a result that points into the stage."""

    def __init__(self):
        self.calls = 0

    def __call__(self, directory: Path) -> dict:
        self.calls += 1
        (directory / "model").mkdir(exist_ok=True)
        (directory / "model" / "weights.bin").write_bytes(bytes(range(256)) * 8)
        (directory / "metrics.json").write_text(json.dumps({"ppl": 2.145}))
        return {"ppl": 2.145, "model": str(directory / "model")}


def stage(root, produce, log=quiet):
    return run_stage(root, "prune", {"rho": 0.15}, {"model": "abc"}, produce, log=log)


# -------------------------------------------------------------------------------------------------------- the store


def test_same_size_byte_change_recomputes_the_stage(tmp_path):
    produce, lines = Producer(), []
    first = stage(tmp_path, produce)
    weights = Path(first["path"]) / "model" / "weights.bin"
    original = weights.read_bytes()
    assert stage(tmp_path, produce)["cached"]  # verified (and, in this process, not hashed again)
    flip_bit(weights)
    assert weights.stat().st_size == len(original)
    again = stage(tmp_path, produce, log=lines.append)
    assert not again["cached"] and produce.calls == 2
    assert again["result"] == first["result"] and weights.read_bytes() == original
    assert [line for line in lines if "not reused" in line] == [
        f"prune: not reused, {weights} does not match its sha256 in the manifest; recomputing the stage in "
        f"{first['path']}"]
    # A file gone, or cut short: recomputed too.
    weights.write_bytes(original[:100])
    assert not stage(tmp_path, produce)["cached"] and produce.calls == 3 and weights.read_bytes() == original


def test_edited_manifest_recomputes_the_stage(tmp_path):
    produce = Producer()
    first = stage(tmp_path, produce)
    path = Path(first["path"]) / MANIFEST
    manifest = json.loads(path.read_text())
    assert manifest["files"]["model/weights.bin"]["sha256"] and manifest["digest"]
    manifest["result"]["ppl"] = 1.0  # a better number, written by hand
    path.write_text(json.dumps(manifest))
    again = stage(tmp_path, produce)
    assert not again["cached"] and produce.calls == 2 and again["result"]["ppl"] == 2.145
    # A manifest of the sizes-only kind (written before digests) is not trusted either.
    old = json.loads(path.read_text())
    old["files"] = {rel: record["size"] for rel, record in old["files"].items()}
    for key in ("digest", "manifest_version", "remote_files"):
        old.pop(key)
    path.write_text(json.dumps(old))
    assert not stage(tmp_path, produce)["cached"] and produce.calls == 3
    assert stage(tmp_path, produce)["cached"] and produce.calls == 3


def test_copied_workdir_verifies_its_own_files(tmp_path):
    produce = Producer()
    first = stage(tmp_path / "a", produce)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "a")
    copied = stage(tmp_path / "b", produce)
    here = tmp_path.resolve() / "b" / "prune" / first["key"]
    assert copied["cached"] and produce.calls == 1
    assert copied["path"] == str(here) and copied["result"]["model"] == str(here / "model")
    assert json.loads((here / MANIFEST).read_text())["files"].keys() == {"metrics.json", "model/weights.bin"}
    flip_bit(here / "metrics.json", byte=3)  # the copy's own file is what is checked
    assert not stage(tmp_path / "b", produce)["cached"] and produce.calls == 2
    assert not (tmp_path / "a").exists()


# -------------------------------------------------------------------------------------------------------- distill


def test_truncated_distill_student_is_trained_again(tmp_path, tiny_llama, tiny_tokenizer):
    from safetensors.torch import load_file

    from sparsekd_core.config import DistillConfig
    from sparsekd_core.distill import distill
    from test_distill import make_cache

    val = tmp_path / "valid.txt"
    val.write_text(" ".join(TRAIN_TEXT) * 3)
    teacher = copy.deepcopy(tiny_llama)
    with torch.no_grad():  # a student that differs from the teacher, so training moves it
        teacher.get_input_embeddings().weight.mul_(4.0)
    cache = make_cache(tmp_path, teacher, tiny_tokenizer, "sharp.zarr", 12)
    cfg = DistillConfig(cache=cache, out=str(tmp_path / "out"), val_data=str(val), val_tokens=64, val_ctx=32,
                        lr=1e-3, max_steps=4, eval_every=2, patience=10, seed=1)
    first = distill(cfg, copy.deepcopy(tiny_llama), tiny_tokenizer, "tiny", log=quiet)
    student = tmp_path / "out" / "model.safetensors"
    expected = {name: t.clone() for name, t in load_file(student).items()}  # not a view of the file's pages
    done = json.loads((tmp_path / "out" / "distill.json").read_text())
    assert done["student_files"]["model.safetensors"]["size"] == student.stat().st_size

    lines = []
    assert distill(cfg, copy.deepcopy(tiny_llama), tiny_tokenizer, "tiny", log=lines.append) == first
    assert any("nothing to do" in line for line in lines)  # an intact student: reused

    size = student.stat().st_size
    student.write_bytes(student.read_bytes()[: size // 2])  # truncated
    lines = []
    again = distill(cfg, copy.deepcopy(tiny_llama), tiny_tokenizer, "tiny", log=lines.append)
    assert not any("nothing to do" in line for line in lines)
    assert lines[0] == (f"distill: {student} has {size // 2} bytes, the finished marker records {size}; training the "
                        "run again")
    got = load_file(student)
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in expected)
    assert again.steps == first.steps and again.val_history == first.val_history

    flip_bit(student, byte=student.stat().st_size // 2)  # the same size, one bit changed: trained again too
    lines = []
    distill(cfg, copy.deepcopy(tiny_llama), tiny_tokenizer, "tiny", log=lines.append)
    assert lines[0] == f"distill: {student} does not match its sha256 in the finished marker; training the run again"
    assert all(torch.equal(load_file(student)[k], expected[k]) for k in expected)


# -------------------------------------------------------------------------------------------------------- the cache


def test_bit_flip_in_a_cache_chunk_fails_the_read_naming_the_chunk(tmp_path, tiny_llama):
    import zarr

    from sparsekd_core.cache import CacheCorruptError, TeacherCache, write_cache
    from sparsekd_core.config import CacheConfig
    from test_cache import FP, corpus

    vocab = tiny_llama.config.vocab_size
    cfg = CacheConfig(out=str(tmp_path / "c.zarr"), data=str(tmp_path), top_k=5, chunk_size=4, seq_len=12)
    write_cache(tiny_llama, corpus(vocab), cfg, FP, vocab)
    cache = TeacherCache(cfg.out)
    assert cache.chunk_checksum == "crc32c" and cache.fingerprint["chunk_checksum"] == "crc32c"
    for name in cache.arrays:
        assert zarr.open_group(cfg.out, mode="r")[name].metadata.codecs[-1].to_dict()["name"] == "crc32c", name
    want = cache[list(range(10))]

    flip_bit(Path(cfg.out) / "topk_ids" / "c" / "1" / "0" / "0")
    with pytest.raises(CacheCorruptError, match=r"c\.zarr' is corrupt: chunk file topk_ids/c/1/0/0 fails its crc32c"):
        TeacherCache(cfg.out)[[0, 5, 9]]
    assert torch.equal(TeacherCache(cfg.out)[[0, 1, 9]]["topk_ids"], want["topk_ids"][[0, 1, 9]])  # other chunks

    flip_bit(Path(cfg.out) / "chunk_done" / "c" / "2", byte=0, bit=0)  # the progress record itself
    with pytest.raises(CacheCorruptError, match="chunk file chunk_done/c/2 fails its crc32c checksum"):
        TeacherCache(cfg.out)
    with pytest.raises(CacheCorruptError, match="chunk_done/c/2"):  # a rerun of the writer says so too
        write_cache(tiny_llama, corpus(vocab), cfg, FP, vocab)


def test_store_without_checksums_is_still_read(tmp_path, tiny_llama):
    """A store written before chunks carried a checksum (no crc32c codec, no chunk_checksum in its fingerprint)."""
    import zarr

    from sparsekd_core.cache import TeacherCache, write_cache
    from sparsekd_core.config import CacheConfig
    from test_cache import FP, corpus

    vocab = tiny_llama.config.vocab_size
    cfg = CacheConfig(out=str(tmp_path / "c.zarr"), data=str(tmp_path), top_k=5, chunk_size=4, seq_len=12)
    write_cache(tiny_llama, corpus(vocab), cfg, FP, vocab)
    want = TeacherCache(cfg.out)[list(range(10))]
    group = zarr.open_group(cfg.out, mode="a", zarr_format=3)
    for name in list(group.array_keys()):
        values, array = group[name][:], group[name]
        old = group.create_array(name, shape=values.shape, dtype=values.dtype, chunks=array.chunks, fill_value=0,
                                 compressors=list(array.compressors)[:-1], filters=array.filters, overwrite=True)
        old[:] = values
    fingerprint = group.attrs.asdict()["sparsekd_cache"]
    fingerprint.pop("chunk_checksum")
    group.attrs["sparsekd_cache"] = fingerprint
    cache = TeacherCache(cfg.out)
    assert cache.chunk_checksum is None
    got = cache[list(range(10))]
    assert all(torch.equal(got[name], want[name]) for name in want)


# -------------------------------------------------------------------------------------------------------- the flows


@pytest.fixture
def project(tmp_path):
    return make_flow_project(tmp_path / "project")


def cache_task(project, workdir):
    from tasks.stages import cache_teacher, dense_ref

    return cache_teacher.fn(dense_ref(str(project / "model")), {"data": str(project / "corpus.jsonl"),
                            "num_samples": 8, "seq_len": 16, "top_k": 4, "chunk_size": 4}, str(workdir),
                            device="cpu")


def chunk_files(store: Path) -> dict[str, bytes]:
    return {p.relative_to(store).as_posix(): p.read_bytes() for p in sorted(store.rglob("*"))
            if p.is_file() and "/c/" in p.relative_to(store).as_posix()}


def test_flipped_bit_in_a_finished_cache_recomputes_the_cache_stage(project, tmp_path):
    first = cache_task(project, tmp_path / "w")
    store = Path(first["cache_path"])
    assert store.parent == Path(first["path"]) and not first["cached"]
    manifest = json.loads((Path(first["path"]) / MANIFEST).read_text())
    assert "teacher.zarr/topk_ids/c/1/0/0" in manifest["files"]  # the chunk files are digested with the stage
    clean = chunk_files(store)
    flip_bit(store / "topk_ids" / "c" / "1" / "0" / "0")
    again = cache_task(project, tmp_path / "w")
    assert not again["cached"] and again["key"] == first["key"]
    assert chunk_files(store) == clean  # recomputed from nothing: the bytes of the uncorrupted run
    assert again["result"]["computed_chunks"] == 2 and again["result"]["resumed_chunks"] == 0
    assert cache_task(project, tmp_path / "w")["cached"]


@pytest.fixture
def bucket(s3):
    """The moto S3 server of test_object_storage.py, with s3fs's cached clients dropped before and after (a client
    made for another module's server would keep calling that server's port)."""
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    yield s3
    s3fs.S3FileSystem.clear_instance_cache()


def test_flipped_bit_in_a_cache_in_a_bucket_recomputes_the_cache_stage(project, tmp_path, monkeypatch, bucket):
    """Under an s3:// root the store is written straight to the bucket: its objects are in the manifest's
    remote_files, a flipped bit there is found by the same worker and by another one, and the stage is recomputed."""
    import fsspec

    from tasks.store import MIRROR_ENV
    from test_object_storage import BUCKET, s3_bytes

    root = f"s3://{BUCKET}/integrity"
    monkeypatch.setenv(MIRROR_ENV, str(tmp_path / "worker-a"))
    first = cache_task(project, root)
    url = first["cache_path"]
    assert url.startswith(root + "/cache/") and not first["cached"]
    assert "teacher.zarr/topk_ids/c/1/0/0" in first["remote_files"]
    clean = s3_bytes(url)
    fs, base = fsspec.url_to_fs(url)

    def corrupt() -> None:
        data = bytearray(fs.cat_file(f"{base}/topk_ids/c/1/0/0"))
        data[10] ^= 4
        fs.pipe_file(f"{base}/topk_ids/c/1/0/0", bytes(data))
        fs.invalidate_cache()

    corrupt()
    again = cache_task(project, root)  # the same worker, its mirror's manifest: the bucket's objects are checked
    assert not again["cached"] and s3_bytes(url) == clean
    corrupt()
    monkeypatch.setenv(MIRROR_ENV, str(tmp_path / "worker-b"))
    other = cache_task(project, root)  # another worker: nothing in its mirror, the bucket's stage does not verify
    assert not other["cached"] and s3_bytes(url) == clean
    monkeypatch.setenv(MIRROR_ENV, str(tmp_path / "worker-c"))
    assert cache_task(project, root)["cached"]  # and a clean stage is fetched as before
