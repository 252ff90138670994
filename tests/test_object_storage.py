"""Object storage: caches and the flows' storage root on s3:// — against a real S3-compatible server (moto's server
mode) started on localhost by the test, reached over HTTP by s3fs exactly as a bucket would be."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import make_flow_project
from test_cache import FP, KILLER, ROOT, corpus

BUCKET = "sparsekd-test"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "sparsekd-test-key", "AWS_SECRET_ACCESS_KEY": "sparsekd-test-secret-value",
               "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server on a free localhost port, with one bucket; the environment points s3fs at it."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {**CREDENTIALS, "AWS_ENDPOINT_URL": f"http://{host}:{port}"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import boto3
    import fsspec

    boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"]).create_bucket(Bucket=BUCKET)
    fsspec.filesystem("s3").invalidate_cache()
    try:
        yield env
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()


def s3_bytes(url: str) -> dict[str, bytes]:
    """{relative name: bytes} of every object under ``url``."""
    import fsspec

    fs, base = fsspec.url_to_fs(url)
    fs.invalidate_cache()
    return {p[len(base) + 1:]: fs.cat_file(p) for p in fs.find(base)}


def local_bytes(path: Path) -> dict[str, bytes]:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in path.rglob("*") if p.is_file()}


def test_cache_on_s3_resumes_after_kill_and_matches_a_local_one(s3, tmp_path, tiny_llama):
    """A cache written to s3:// is killed with kill -9 inside its second chunk; the same command resumes it from
    the bucket and the objects equal a local store's files, chunk for chunk."""
    from sparsekd_core.cache import TeacherCache, write_cache
    from sparsekd_core.config import CacheConfig

    url = f"s3://{BUCKET}/kill/teacher.zarr"
    script = KILLER.format(tests=str(ROOT / "tests"), out=url, fp=FP, shard={})
    proc = subprocess.run([sys.executable, "-c", script], env={**os.environ, **s3, "PYTHONPATH": str(ROOT)},
                          timeout=180)
    assert proc.returncode == -9
    done_before = {k for k in s3_bytes(url) if k.startswith("chunk_done/c/")}
    assert done_before == {"chunk_done/c/0"}  # chunk 0 marked, chunk 1 in flight when killed

    vocab = tiny_llama.config.vocab_size
    cfg = CacheConfig(out=url, data=str(tmp_path), top_k=5, chunk_size=4, seq_len=12)
    res = write_cache(tiny_llama, corpus(vocab), cfg, FP, vocab)
    assert (res.resumed_chunks, res.computed_chunks, res.complete) == (1, 2, True)
    local = tmp_path / "local.zarr"
    write_cache(tiny_llama, corpus(vocab), cfg.model_copy(update={"out": str(local)}), FP, vocab)
    remote, here = s3_bytes(url), local_bytes(local)
    assert remote.keys() == here.keys()
    for name in remote:
        if name != "zarr.json":  # the group metadata holds the same fingerprint; key order may differ
            assert remote[name] == here[name], name
    assert TeacherCache(url).fingerprint == TeacherCache(str(local)).fingerprint
    assert res.bytes == sum(len(b) for b in remote.values())  # bytes/token counts the objects in the bucket


def test_storage_root_url_is_checked():
    from tasks.store import check_root

    assert check_root("file:///x/y") == "/x/y" and check_root("runs") == "runs"
    assert check_root(f"s3://{BUCKET}/prefix/") == f"s3://{BUCKET}/prefix"
    with pytest.raises(ValueError, match="must not carry credentials"):
        check_root(f"s3://key:secret@{BUCKET}/prefix")
    with pytest.raises(ValueError, match="needs its fsspec implementation"):
        check_root("nosuchproto://bucket/prefix")


def test_a_stage_computed_by_one_worker_is_reused_by_another(s3, tmp_path, monkeypatch):
    """Two workers with their own local disks (mirrors) share an s3:// storage root: the first computes every stage
    and uploads it; the second computes none, downloads what it needs, and reports the same figures. Worker A's
    teacher cache lives in the bucket, not on its disk. The credentials never reach a log, manifest or report."""
    from prefect.testing.utilities import prefect_test_harness

    from tasks.store import MIRROR_ENV
    from test_flows import flow_values, run_flow

    project = make_flow_project(tmp_path / "project")
    root = f"s3://{BUCKET}/shared-root"
    values = flow_values(project, root)
    with prefect_test_harness(server_startup_timeout=180):
        monkeypatch.setenv(MIRROR_ENV, str(tmp_path / "worker-a"))
        first = run_flow("dense-kd", values)
        monkeypatch.setenv(MIRROR_ENV, str(tmp_path / "worker-b"))
        second = run_flow("dense-kd", values)
    assert first["stages"] and not any(s["cached"] for s in first["stages"])
    assert all(s["cached"] for s in second["stages"])
    assert second["metrics"] == pytest.approx(first["metrics"])
    assert first["report_url"].startswith(root + "/reports/")
    assert second["report"].startswith(str(tmp_path / "worker-b"))

    objects = s3_bytes(root)
    assert any(k.startswith("cache/") and "/teacher.zarr/" in k for k in objects)  # the cache is in the bucket
    assert not any("teacher.zarr" in str(p) for p in (tmp_path / "worker-a").rglob("*"))
    manifests = [k for k in objects if k.endswith("manifest.json")]
    assert {k.split("/")[0] for k in manifests} >= {"eval", "cache", "distill"}
    distill = next(json.loads(objects[k]) for k in manifests if k.startswith("distill/"))
    student = tmp_path / "worker-b" / "s3" / BUCKET / "shared-root" / Path(distill["path"]).relative_to(
        tmp_path / "worker-a" / "s3" / BUCKET / "shared-root") / "student" / "model.safetensors"
    assert student.is_file()  # worker B downloaded the student it evaluated
    assert any(k.startswith("reports/") and k.endswith("report.md") for k in objects)
    everything = b"".join(v for k, v in objects.items() if k.endswith((".json", ".md")))
    everything += b"".join(p.read_bytes() for p in tmp_path.rglob("*.json") if p.is_file())
    assert CREDENTIALS["AWS_SECRET_ACCESS_KEY"].encode() not in everything
    assert CREDENTIALS["AWS_ACCESS_KEY_ID"].encode() not in everything
