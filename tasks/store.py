"""Content-addressed stage outputs: a stage whose inputs are unchanged and whose output still verifies is not rerun.

Every stage run lives in ``<root>/<stage>/<key>/`` where ``key`` hashes the stage name, its validated config,
the *fingerprints* (keys) of the artifacts it consumes, the digest of the ``sparsekd_core`` and ``tasks`` sources
and the library versions (``sparsekd_core.provenance`` says what a key covers). The stage writes its files there
(resumable stages — cache, distill — keep their own progress there, so a rerun after a crash resumes inside the
same directory), and ``manifest.json`` is written last, atomically, with every file's size. A manifest whose
files are all present with those sizes is a finished stage; anything else is rerun.
A consumer's key includes its producer's key, so a change anywhere upstream changes every key downstream.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

from sparsekd_core import provenance
from sparsekd_core.files import write_json_atomic

MANIFEST = "manifest.json"


CODE_PACKAGES = ("sparsekd_core", "tasks")  # the code that computes a stage's output


def code_digest() -> str:
    """Digest of the sparsekd_core and tasks sources (16 hex chars): a code change invalidates every cached stage."""
    return provenance.code_digest(CODE_PACKAGES)


def stage_key(stage: str, config: dict[str, Any], inputs: dict[str, str]) -> str:
    """Hash of what can change the stage's output (sparsekd_core/provenance.py): the stage, its config (resolved
    runtime and content digests included by the task), its inputs' keys, the code and the library versions."""
    payload = json.dumps({"stage": stage, "config": config, "inputs": inputs, "code": code_digest(),
                          "env": provenance.environment()}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


def stage_dir(root: str | os.PathLike, stage: str, config: dict[str, Any], inputs: dict[str, str]) -> Path:
    """Where the stage with this config and these inputs lives (``run_stage`` computes it there)."""
    return Path(root).expanduser().resolve() / stage / stage_key(stage, config, inputs)


def _file_sizes(directory: Path) -> dict[str, int]:
    return {
        str(p.relative_to(directory)): p.stat().st_size
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }


def verify(manifest: dict[str, Any]) -> bool:
    """True if every file the manifest lists is present with its recorded size."""
    directory = Path(manifest["path"])
    for rel, size in manifest.get("files", {}).items():
        p = directory / rel
        if not p.is_file() or p.stat().st_size != size:
            return False
    return True


def load_manifest(directory: Path) -> dict[str, Any] | None:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    return manifest if verify(manifest) else None


def run_stage(
    root: str | os.PathLike,
    stage: str,
    config: dict[str, Any],
    inputs: dict[str, str],
    produce: Callable[[Path], dict[str, Any]],
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Return the finished stage's manifest, running ``produce(directory)`` only if no verified output exists.

    ``produce`` writes its files into ``directory`` and returns a JSON-able result (metrics, sub-paths).
    The manifest: ``{"stage", "key", "path", "files", "result", "seconds", "cached"}``; ``key`` is the
    fingerprint that consumers pass on in their ``inputs``.
    """
    key = stage_key(stage, config, inputs)
    directory = stage_dir(root, stage, config, inputs)
    found = load_manifest(directory)
    if found is not None:
        log(f"{stage}: cached ({directory})")
        return {**found, "cached": True}
    directory.mkdir(parents=True, exist_ok=True)
    with _stage_lock(directory, log):
        # Another process (a parallel seed, a second worker on the same storage) may have finished it meanwhile.
        found = load_manifest(directory)
        if found is not None:
            log(f"{stage}: cached ({directory}, made by another run while this one waited)")
            return {**found, "cached": True}
        return _produce(stage, key, directory, config, inputs, produce)


@contextmanager
def _stage_lock(directory: Path, log: Callable[[str], None]):
    """Exclusive lock on one stage directory across processes (flock), so two runs that need
    the same stage at once compute it once; released when the process dies, so a crash leaves no stale lock.
    The lock file sits beside the directory (``<key>.lock``) so the stage's own files stay exactly its output."""
    with open(directory.with_name(directory.name + ".lock"), "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"waiting for another run computing {directory}")
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _produce(stage: str, key: str, directory: Path, config: dict[str, Any], inputs: dict[str, str],
             produce: Callable[[Path], dict[str, Any]]) -> dict[str, Any]:
    t0 = time.perf_counter()
    result = produce(directory)
    manifest = {
        "stage": stage,
        "key": key,
        "path": str(directory),
        "config": config,
        "inputs": inputs,
        "result": result,
        "seconds": time.perf_counter() - t0,
        "files": _file_sizes(directory),
    }
    write_json_atomic(directory / MANIFEST, manifest)
    return {**manifest, "cached": False}
