"""Content-addressed stage outputs: a stage whose inputs are unchanged and whose output still verifies is not rerun.

Every stage run lives in ``<root>/<stage>/<key>/`` where ``key`` is the stage's identity
(``sparsekd_core/identity.py`` says what it covers: the resolved config, the *fingerprints* (keys) of the artifacts
it consumes, the runtime, the code the stage runs and the library versions). The stage writes its files there
(resumable stages — cache, distill — keep their own progress there, so a rerun after a crash resumes inside the
same directory), and ``manifest.json`` is written last, atomically.
A consumer's key includes its producer's key, so a change anywhere upstream changes every key downstream.

Integrity: nothing corrupt is ever reused. The manifest records every file of the stage (the teacher cache's Zarr
chunk files included) by its path relative to the stage directory, its size and its sha256, plus a sha256 of the
manifest's own content (``digest``), so an edited manifest is caught too. Before a finished stage is reused every
file is checked: sizes first, then the digests. A stage that does not verify (a file missing, truncated or changed,
an edited manifest, or a manifest from before digests: those recorded sizes only and are never trusted) is
*recomputed*: one log line names the file, the stage directory is emptied (a finished stage's leftovers are not
progress to resume: the teacher cache's ``chunk_done`` would keep a corrupt chunk) and the stage runs again.
Paths are resolved from where the manifest is found, so a copied or moved workdir checks and returns its own files
(``path`` and every path under it in ``result``); ``path`` in what ``run_stage`` returns is the local directory.
Cost: hashing runs at ~1.3 GB/s (hashlib sha256 with SHA-NI over a 500 MB file in the page cache, one core; a cold
disk reads slower), so reusing a SmolLM2-135M student (~540 MB fp32) costs ~0.4 s and a teacher cache ~0.8 s per GB
of store (SmolLM2 at k = 32: ~75 bytes/token, ~0.75 GB per 10M tokens). A stage verified once is not hashed again in
the same process unless a file's size, mtime, ctime or inode changed since; never across processes.

The root may be an fsspec URL (``s3://bucket/prefix``; any protocol fsspec has an installed implementation for),
so that workers on different hosts share stages without a shared filesystem. Each worker then computes in a
local mirror (``$SPARSEKD_MIRROR``, default ``~/.cache/sparsekd/mirror/<scheme>/<bucket>/<prefix>``), uploads a
finished stage's files and then its manifest, last; a worker that needs a stage another one finished downloads it
(its manifest's own digest checked, then the objects' sizes, then every downloaded file's sha256) instead of
computing it. Stages that must survive a worker (the teacher cache) write straight to the URL (``remote_path``):
those objects are listed in the manifest's ``remote_files`` (size and sha256, hashed by streaming them once when the
stage finishes) and verified by streaming them again before reuse (a download of the store at the bucket's speed);
a stage there that does not verify is deleted from the bucket (its manifest first) and recomputed. Credentials
come from the environment (``AWS_*`` / the provider's usual variables); a URL that carries them is refused, and
none is ever logged. Two hosts may compute the same stage at once (object stores have no lock); both produce the
same files and the last upload wins.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

from sparsekd_core import identity
from sparsekd_core.files import sha256_file, write_json_atomic

MANIFEST = "manifest.json"
MANIFEST_VERSION = 2  # 2: size + sha256 per file and the manifest's own digest; none (1): sizes only, never trusted


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


def _file_records(directory: Path) -> dict[str, dict[str, Any]]:
    """{path relative to ``directory``: {"size", "sha256"}} of every file under it but the manifest."""
    return {p.relative_to(directory).as_posix(): {"size": p.stat().st_size, "sha256": sha256_file(p)}
            for p in sorted(directory.rglob("*")) if p.is_file() and p != directory / MANIFEST}


def _remote_records(fs, base: str, sizes: dict[str, int]) -> dict[str, dict[str, Any]]:
    """{name: {"size", "sha256"}} of the objects ``base/name`` ({name: size} as listed; streamed once to hash)."""
    records = {}
    for rel, size in sorted(sizes.items()):
        with fs.open(f"{base}/{rel}", "rb") as f:
            records[rel] = {"size": size, "sha256": sha256_file(f)}
    return records


def manifest_digest(manifest: dict[str, Any]) -> str:
    """sha256 of the manifest's content less its ``digest`` (canonical JSON): an edit anywhere changes it."""
    body = {k: v for k, v in manifest.items() if k != "digest"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str, separators=(",", ":")).encode()).hexdigest()


_verified: set[tuple] = set()  # (place, manifest digest, each file's stat) of stages this process already hashed


def _files_problem(files: dict[str, dict[str, Any]],
                   found: dict[str, tuple[str, int, Callable[[], str]]]) -> str | None:
    """Why the files a manifest records (``files``: {rel: {"size", "sha256"}}) differ from those ``found``
    ({rel: (name to report, size, a function giving its sha256)}), or None. Every size before any hash: a truncated
    file costs no hashing."""
    for rel, want in files.items():
        name, size, _ = found[rel]
        if size != want.get("size"):
            return f"{name} has {size} bytes, the manifest records {want.get('size')}"
    for rel, want in files.items():
        name, _, sha256 = found[rel]
        if sha256() != want.get("sha256"):
            return f"{name} does not match its sha256 in the manifest"
    return None


def _local_stamp(directory: Path, digest: str, stats: dict[str, os.stat_result]) -> tuple:
    """What a verification of these files holds for, in this process: any rewrite changes a file's ctime."""
    return (str(directory), digest,
            tuple((rel, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino) for rel, st in sorted(stats.items())))


def _local_problem(manifest: dict[str, Any], directory: Path) -> str | None:
    files = manifest.get("files", {})
    stats = {}
    for rel in files:
        if not (directory / rel).is_file():
            return f"{directory / rel} is missing"
        stats[rel] = (directory / rel).stat()
    stamp = _local_stamp(directory, manifest["digest"], stats)
    if stamp in _verified:
        return None
    problem = _files_problem(files, {rel: (str(directory / rel), st.st_size, lambda p=directory / rel: sha256_file(p))
                                     for rel, st in stats.items()})
    if problem is None:
        _verified.add(stamp)
    return problem


def _remote_problem(manifest: dict[str, Any], url: str) -> str | None:
    """Why the objects written straight to the stage's URL (``remote_files``) do not verify, or None."""
    files = manifest.get("remote_files") or {}
    if not files:
        return None
    fs, base = _fs(url)
    fs.invalidate_cache()
    try:
        listing = {p[len(base) + 1:]: info for p, info in fs.find(base, detail=True).items()}
    except FileNotFoundError:
        listing = {}
    missing = sorted(set(files) - set(listing))
    if missing:
        return f"{url}/{missing[0]} is missing"

    def version(info: dict) -> str:  # what changes when an object is rewritten
        return str(info.get("ETag") or info.get("LastModified") or info.get("mtime"))

    stamp = (url, manifest["digest"],
             tuple((rel, listing[rel].get("size"), version(listing[rel])) for rel in sorted(files)))
    if stamp in _verified:
        return None

    def sha256(rel: str) -> str:
        with fs.open(f"{base}/{rel}", "rb") as f:
            return sha256_file(f)

    problem = _files_problem(files, {rel: (f"{url}/{rel}", listing[rel].get("size"), lambda rel=rel: sha256(rel))
                                     for rel in files})
    if problem is None:
        _verified.add(stamp)
    return problem


def _content_problem(manifest: dict[str, Any]) -> str | None:
    """Why the manifest itself cannot be trusted (before any file is looked at), or None."""
    if manifest.get("manifest_version") != MANIFEST_VERSION or "digest" not in manifest:
        return "the manifest predates content digests (it records sizes only: not trusted)"
    if manifest["digest"] != manifest_digest(manifest):
        return "the manifest does not match its own digest (edited?)"
    return None


def _resolved(manifest: dict[str, Any], directory: Path, remote: str | None) -> dict[str, Any]:
    """The manifest as found at ``directory`` (and ``remote``): every path under the one it was written with moved
    there, so a copied or moved workdir (or another worker's mirror) uses its own files."""
    found = _relocate(manifest, manifest["path"], str(directory))
    if remote is not None and manifest.get("remote") and manifest["remote"] != remote:
        found = _relocate(found, manifest["remote"], remote)
    return found


def _output_problem(manifest: dict[str, Any]) -> str | None:
    """Why the files of a finished stage (its manifest as ``_resolved``: ``path`` and ``remote`` where it is now)
    differ from those the manifest records (one line naming the file), or None."""
    problem = _local_problem(manifest, Path(manifest["path"]))
    if problem is None and manifest.get("remote"):
        problem = _remote_problem(manifest, manifest["remote"])
    return problem


def verify(manifest: dict[str, Any]) -> bool:
    """True if every file a manifest (as ``load_manifest`` or ``run_stage`` return it) lists is there with its
    recorded size and sha256. The manifest's own digest is checked where it is read (``inspect_stage``)."""
    return _output_problem(manifest) is None


def inspect_stage(directory: Path, remote: str | None = None) -> tuple[dict[str, Any] | None, str | None]:
    """(the verified manifest of the stage at ``directory``, None) or (None, why not): the reason is None when there
    is no manifest at all (a stage never finished here), else names what failed. ``remote``: the stage's URL under
    a URL root (default: the one the manifest recorded)."""
    directory = Path(directory).resolve()
    path = directory / MANIFEST
    if not path.is_file():
        return None, None
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None, f"{path} is not valid JSON"
    if not isinstance(manifest, dict) or "path" not in manifest:
        return None, f"{path} is not a stage manifest"
    problem = _content_problem(manifest)
    if problem is not None:
        return None, problem
    found = _resolved(manifest, directory, remote)
    problem = _output_problem(found)
    return (None, problem) if problem is not None else (found, None)


def load_manifest(directory: Path, remote: str | None = None) -> dict[str, Any] | None:
    """The verified manifest of the finished stage at ``directory`` (paths resolved there), or None."""
    return inspect_stage(directory, remote)[0]


def discard_stage(directory: Path, remote: str | None = None) -> None:
    """Empty a stage directory whose finished output does not verify (and, under a URL root, delete the stage from
    the bucket: its manifest first, so no worker trusts it meanwhile), so that it is recomputed from nothing."""
    if remote is not None:
        fs, base = _fs(remote)
        fs.invalidate_cache()
        if fs.exists(f"{base}/{MANIFEST}"):
            fs.rm_file(f"{base}/{MANIFEST}")
        if fs.exists(base):
            fs.rm(base, recursive=True)
        fs.invalidate_cache()
    for p in Path(directory).iterdir() if Path(directory).is_dir() else ():
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


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
    The manifest: ``{"stage", "key", "path", "remote", "files", "remote_files", "result", "seconds", "digest",
    "cached"}``; ``key`` is the fingerprint that consumers pass on in their ``inputs``; ``path`` is the stage
    directory on this worker. A finished stage that does not verify is recomputed (one log line says why).
    """
    key = stage_key(stage, config, inputs)
    directory = stage_dir(root, stage, config, inputs)
    remote = remote_path(root, directory) if is_url(root) else None
    found, _ = inspect_stage(directory, remote)
    if found is not None:
        log(f"{stage}: cached ({directory})")
        return {**found, "cached": True}
    directory.mkdir(parents=True, exist_ok=True)
    with _stage_lock(directory, log):
        # Another process (a parallel seed, a second worker on the same storage) may have finished it meanwhile.
        found, problem = inspect_stage(directory, remote)
        if found is not None:
            log(f"{stage}: cached ({directory}, made by another run while this one waited)")
            return {**found, "cached": True}
        in_bucket = problem is not None and remote is not None and problem.startswith(remote + "/")
        if problem is not None:
            log(f"{stage}: not reused, {problem}; recomputing the stage in {directory}")
            # A problem in this worker's mirror only: fetch_stage checks (and if need be deletes) the bucket's copy.
            discard_stage(directory, remote if in_bucket else None)
        if remote is not None and not in_bucket:
            found = fetch_stage(root, directory, log)
            if found is not None:
                log(f"{stage}: cached (fetched {found['remote']}, made by another worker)")
                return {**found, "cached": True}
        manifest = _produce(stage, key, directory, config, inputs, produce, remote=remote)
        if remote is not None:
            publish_stage(directory, remote)
            log(f"{stage}: uploaded to {remote}")
        return manifest


def publish_stage(directory: Path, url: str) -> None:
    """Upload a finished stage: its files, then its manifest (last: its presence means the stage is whole)."""
    upload_dir(directory, url, skip=(MANIFEST,))
    fs, base = _fs(url)
    fs.put_file(str(directory / MANIFEST), f"{base}/{MANIFEST}")


def fetch_stage(root: str | os.PathLike, directory: Path, log: Callable[[str], None] = print) -> dict[str, Any] | None:
    """Download the stage at ``directory``'s URL if another worker finished it, and return its manifest (paths
    resolved to this worker's mirror); None if it is not there. Before anything is trusted, the manifest's own digest
    is checked, then the objects' sizes (a size that differs: an upload in progress, computed here instead), then
    each downloaded file's sha256 and the sha256 of the objects that stay in the bucket. A stage there that does
    not verify is deleted from the bucket (logged, one line) and None returned: it is recomputed here."""
    url = remote_path(root, directory)
    fs, base = _fs(url)
    fs.invalidate_cache()  # another worker may have written here since this process last listed it
    try:
        text = fs.cat_file(f"{base}/{MANIFEST}")
    except FileNotFoundError:
        return None
    try:
        manifest = json.loads(text)
        problem = _content_problem(manifest) if isinstance(manifest, dict) and "path" in manifest else \
            f"{url}/{MANIFEST} is not a stage manifest"
    except (json.JSONDecodeError, UnicodeDecodeError):
        manifest, problem = None, f"{url}/{MANIFEST} is not valid JSON"
    if problem is None:
        try:
            sizes = {p[len(base) + 1:]: info["size"] for p, info in fs.find(base, detail=True).items()}
        except FileNotFoundError:
            return None
        if any(sizes.get(rel) != want["size"] for rel, want in manifest["files"].items()):
            return None  # an upload in progress or cut short: compute it here instead
        for rel in manifest["files"]:
            target = directory / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(f"{base}/{rel}", str(target))
        write_json_atomic(directory / MANIFEST, manifest)  # the same content: its digest still holds
        found = _resolved(manifest, directory.resolve(), url)
        problem = _output_problem(found)
        if problem is None:
            return found
    log(f"{directory.parent.name}: not reused, {problem}; deleting the stage at {url} and recomputing it")
    discard_stage(directory, url)
    return None


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
    seconds = time.perf_counter() - t0
    files = _file_records(directory)
    remote_files = {}
    if remote is not None:  # objects the stage wrote straight to its URL (the teacher cache's store)
        fs, base = _fs(remote)
        fs.invalidate_cache()
        try:
            there = {p[len(base) + 1:]: info["size"] for p, info in fs.find(base, detail=True).items()}
        except FileNotFoundError:
            there = {}
        remote_files = _remote_records(fs, base, {rel: size for rel, size in there.items()
                                                  if rel not in files and rel != MANIFEST})
    manifest = {
        "manifest_version": MANIFEST_VERSION,
        "stage": stage,
        "key": key,
        "path": str(directory),  # where it was written; a reader resolves paths from where it finds the manifest
        "remote": remote,
        "config": config,
        "inputs": inputs,
        "result": result,
        "seconds": seconds,
        "files": files,
        "remote_files": remote_files,
    }
    stored = json.loads(json.dumps(manifest, default=str))  # the content exactly as a reader will load it
    stored["digest"] = manifest_digest(stored)
    write_json_atomic(directory / MANIFEST, stored)
    # Hashed just now: a reuse later in this process need not hash them again (unless a file changes).
    _verified.add(_local_stamp(directory.resolve(), stored["digest"],
                               {rel: (directory / rel).stat() for rel in files}))
    return {**manifest, "digest": stored["digest"], "cached": False}
