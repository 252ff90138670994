"""Content-addressed stage outputs: a stage whose inputs are unchanged and whose output still verifies is not rerun.

Every stage run lives in ``<root>/<stage>/<key>/`` where ``key`` is the stage's identity
(``sparsekd_core/identity.py`` says what it covers: the resolved config, the *fingerprints* (keys) of the artifacts
it consumes, the runtime, the code the stage runs and the library versions). The stage writes its files there
(resumable stages — cache, distill — keep their own progress there, so a rerun after a crash resumes inside the
same directory), and ``manifest.json`` is written last, atomically, with every file's size. A manifest whose
files are all present with those sizes is a finished stage; anything else is rerun.
A consumer's key includes its producer's key, so a change anywhere upstream changes every key downstream.

The root may be an fsspec URL (``s3://bucket/prefix``; any protocol fsspec has an installed implementation for),
so that workers on different hosts share stages without a shared filesystem. Each worker then computes in a
local mirror (``$SPARSEKD_MIRROR``, default ``~/.cache/sparsekd/mirror/<scheme>/<bucket>/<prefix>``), uploads a
finished stage's files and then its manifest, last; a worker that needs a stage another one finished downloads it
(its manifest verified against the objects' sizes first) instead of computing it. Stages that must survive a
worker (the teacher cache) write straight to the URL (``remote_path``). Credentials come from the environment
(``AWS_*`` / the provider's usual variables); a URL that carries them is refused, and none is ever logged.
Two hosts may compute the same stage at once (object stores have no lock); both produce the same files and the
last upload wins.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

from sparsekd_core import identity
from sparsekd_core.files import write_json_atomic

MANIFEST = "manifest.json"


def stage_key(stage: str, config: dict[str, Any], inputs: dict[str, str]) -> str:
    """The stage's identity (sparsekd_core.identity.stage_key): the key its directory is named by."""
    return identity.stage_key(stage, config, inputs)


MIRROR_ENV = "SPARSEKD_MIRROR"


def is_url(root: str | os.PathLike) -> bool:
    """True for an object-store (fsspec) root such as s3://bucket/prefix; a path or file:// is local."""
    text = str(root)
    return "://" in text and not text.startswith("file://")


def check_root(root: str) -> str:
    """The storage root as the flows keep it: a local path (file:// stripped), or a URL whose protocol fsspec can
    open here and which carries no credentials. Raises ValueError with what to do."""
    from urllib.parse import urlsplit

    if not is_url(root):
        return root.removeprefix("file://")
    scheme = root.split("://", 1)[0]
    if "@" in urlsplit(root).netloc:
        raise ValueError("the storage root URL must not carry credentials; give them in the environment "
                         "(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_ENDPOINT_URL for S3)")
    import fsspec

    try:
        fsspec.get_filesystem_class(scheme)
    except (ImportError, ValueError) as err:
        raise ValueError(f"{scheme}:// needs its fsspec implementation (s3fs for s3://, gcsfs for gs://, adlfs "
                         f"for az://): {err}") from None
    return root.rstrip("/")


def local_root(root: str | os.PathLike) -> Path:
    """Where this worker keeps stage directories: the root itself, or its local mirror for a URL root."""
    if not is_url(root):
        return Path(str(root).removeprefix("file://")).expanduser().resolve()
    scheme, rest = str(root).rstrip("/").split("://", 1)
    base = Path(os.environ.get(MIRROR_ENV) or "~/.cache/sparsekd/mirror").expanduser().resolve()
    return base / scheme / rest


def remote_path(root: str | os.PathLike, local: Path) -> str:
    """The URL of a local mirror path under a URL root (the path itself under a local root)."""
    if not is_url(root):
        return str(local)
    return str(root).rstrip("/") + "/" + Path(local).resolve().relative_to(local_root(root)).as_posix()


def _fs(url: str):
    import fsspec

    fs, path = fsspec.url_to_fs(url)
    return fs, path


def upload_dir(local: Path, url: str, skip: tuple[str, ...] = ()) -> None:
    """Copy every file under ``local`` to ``url`` (same relative names), but those named in ``skip``."""
    fs, base = _fs(url)
    for p in sorted(local.rglob("*")):
        if p.is_file() and p.name not in skip:
            fs.put_file(str(p), f"{base}/{p.relative_to(local).as_posix()}")


def stage_dir(root: str | os.PathLike, stage: str, config: dict[str, Any], inputs: dict[str, str]) -> Path:
    """Where the stage with this config and these inputs lives on this worker (``run_stage`` computes it there)."""
    return local_root(root) / stage / stage_key(stage, config, inputs)


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
        if is_url(root):
            found = fetch_stage(root, directory)
            if found is not None:
                log(f"{stage}: cached (fetched {found['remote']}, made by another worker)")
                return {**found, "cached": True}
        manifest = _produce(stage, key, directory, config, inputs, produce,
                            remote=remote_path(root, directory) if is_url(root) else None)
        if is_url(root):
            publish_stage(directory, manifest["remote"])
            log(f"{stage}: uploaded to {manifest['remote']}")
        return manifest


def publish_stage(directory: Path, url: str) -> None:
    """Upload a finished stage: its files, then its manifest (last: its presence means the stage is whole)."""
    upload_dir(directory, url, skip=(MANIFEST,))
    fs, base = _fs(url)
    fs.put_file(str(directory / MANIFEST), f"{base}/{MANIFEST}")


def fetch_stage(root: str | os.PathLike, directory: Path) -> dict[str, Any] | None:
    """Download the stage at ``directory``'s URL if another worker finished it (its manifest there, and every file
    it lists with its size); the manifest is rewritten for this worker's paths. None if it is not there."""
    url = remote_path(root, directory)
    fs, base = _fs(url)
    fs.invalidate_cache()  # another worker may have written here since this process last listed it
    try:
        manifest = json.loads(fs.cat_file(f"{base}/{MANIFEST}"))
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    try:
        sizes = {p[len(base) + 1:]: info["size"] for p, info in fs.find(base, detail=True).items()}
    except FileNotFoundError:
        return None
    if any(sizes.get(rel) != size for rel, size in manifest.get("files", {}).items()):
        return None  # an upload in progress or cut short: compute it here instead
    for rel in manifest.get("files", {}):
        target = directory / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        fs.get_file(f"{base}/{rel}", str(target))
    manifest = _relocate(manifest, manifest["path"], str(directory))
    write_json_atomic(directory / MANIFEST, manifest)
    return manifest


def _relocate(value: Any, old: str, new: str) -> Any:
    """``value`` with every string under the path ``old`` moved under ``new`` (another worker's mirror)."""
    if isinstance(value, str):
        return new + value[len(old):] if value == old or value.startswith(old + "/") else value
    if isinstance(value, dict):
        return {k: _relocate(v, old, new) for k, v in value.items()}
    if isinstance(value, list):
        return [_relocate(v, old, new) for v in value]
    return value


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
             produce: Callable[[Path], dict[str, Any]], remote: str | None = None) -> dict[str, Any]:
    t0 = time.perf_counter()
    result = produce(directory)
    manifest = {
        "stage": stage,
        "key": key,
        "path": str(directory),
        "remote": remote,
        "config": config,
        "inputs": inputs,
        "result": result,
        "seconds": time.perf_counter() - t0,
        "files": _file_sizes(directory),
    }
    write_json_atomic(directory / MANIFEST, manifest)
    return {**manifest, "cached": False}
