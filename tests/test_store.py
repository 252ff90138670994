"""Content-addressed stage outputs: reuse when verified, rerun when missing, new key when inputs change."""

from __future__ import annotations

import pytest

from tasks.store import run_stage


def test_run_stage_caches_and_verifies(tmp_path):
    calls = []

    def produce(directory):
        calls.append(directory)
        (directory / "weights.bin").write_bytes(b"x" * 10)
        return {"ppl": 12.5}

    first = run_stage(tmp_path, "prune", {"rho": 0.15}, {"model": "abc"}, produce, log=lambda m: None)
    again = run_stage(tmp_path, "prune", {"rho": 0.15}, {"model": "abc"}, produce, log=lambda m: None)
    assert len(calls) == 1 and not first["cached"] and again["cached"]
    assert again["result"] == {"ppl": 12.5} and again["key"] == first["key"]
    # A changed input or config is a new key; a damaged output is redone in place.
    other = run_stage(tmp_path, "prune", {"rho": 0.35}, {"model": "abc"}, produce, log=lambda m: None)
    assert other["key"] != first["key"] and len(calls) == 2
    (tmp_path / "prune" / first["key"] / "weights.bin").write_bytes(b"x")
    redone = run_stage(tmp_path, "prune", {"rho": 0.15}, {"model": "abc"}, produce, log=lambda m: None)
    assert not redone["cached"] and len(calls) == 3 and redone["key"] == first["key"]


def test_crash_before_manifest_is_rerun(tmp_path):
    def crash(directory):
        (directory / "partial.bin").write_bytes(b"half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):  # the crash reaches the caller, no manifest is written
        run_stage(tmp_path, "cache", {}, {}, crash, log=lambda m: None)
    seen = []
    done = run_stage(tmp_path, "cache", {}, {}, lambda d: seen.append(sorted(p.name for p in d.iterdir())) or {},
                     log=lambda m: None)
    assert not done["cached"] and seen == [["partial.bin"]]  # same directory: a resumable stage finds its progress


def _produce_slowly(directory):
    import os
    import time

    with open(directory.parent.parent / "calls.log", "a") as f:
        f.write(f"{os.getpid()}\n")
    time.sleep(1.0)
    (directory / "out.bin").write_bytes(b"y" * 5)
    return {"pid": os.getpid()}


def _run_in_child(root):
    return run_stage(root, "cache", {"k": 1}, {"teacher": "t"}, _produce_slowly, log=lambda m: None)


def test_parallel_runs_of_one_stage_compute_it_once(tmp_path):
    """Two processes that need the same stage at once (parallel seeds on one storage root): one computes it,
    the other waits and reuses it."""
    import multiprocessing as mp

    with mp.get_context("spawn").Pool(2) as pool:
        manifests = pool.map(_run_in_child, [tmp_path, tmp_path])
    assert (tmp_path / "calls.log").read_text().count("\n") == 1
    assert sorted(m["cached"] for m in manifests) == [False, True]
    assert manifests[0]["result"] == manifests[1]["result"]


@pytest.mark.parametrize("state", ["tmp only", "committed new", "old moved aside", "old left over"])
def test_recover_dir_leaves_exactly_one_complete_directory(tmp_path, state):
    """Every state a kill can leave inside files.replace_dir comes back as one complete directory: the new version
    once the commit point (the rename to `.new`) was passed, the old one before it."""
    from sparsekd_core.files import recover_dir

    final = tmp_path / "ckpt"

    def version(path, text):
        path.mkdir()
        (path / "weights").write_text(text)

    if state == "tmp only":  # killed while building
        version(final, "old")
        version(tmp_path / "ckpt.tmp-abc", "half")
        expected = "old"
    elif state == "committed new":  # killed right after the commit point
        version(final, "old")
        version(tmp_path / "ckpt.new", "new")
        expected = "new"
    elif state == "old moved aside":  # killed between the two renames: no `ckpt` at all
        version(tmp_path / "ckpt.old", "old")
        version(tmp_path / "ckpt.new", "new")
        expected = "new"
    else:  # killed before the old version was removed
        version(final, "new")
        version(tmp_path / "ckpt.old", "old")
        expected = "new"
    recover_dir(final)
    assert (final / "weights").read_text() == expected
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
