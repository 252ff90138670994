"""Crash-safe writes: the one place where files and directories are written under a temporary name and renamed
into place (a leaf module: no project imports).

Rules, the same for every file and directory the project writes:

* a file is written to ``.<name>.tmp-<pid>-<random>`` in the same directory, flushed and fsynced, then
  ``os.replace``d over ``<name>`` (atomic on POSIX), and the directory entry is fsynced: a reader sees the old
  file or the new one, never half of one, even after a kill -9 or a power cut;
* a directory is built under ``<name>.tmp-*``; when complete it is renamed to ``<name>.new`` (the commit point),
  the previous ``<name>`` moves to ``<name>.old``, ``<name>.new`` becomes ``<name>``, and ``<name>.old`` is removed.
  A kill at any point leaves a state that ``recover_dir`` turns into exactly one complete ``<name>`` (the new one
  once the commit point is passed, else the old one); every writer and every reader of a replaced directory calls
  it first. Leftover ``.tmp-*`` builds are garbage and removed.

A write that fails because the filesystem is full (``ENOSPC``, or a used-up quota, ``EDQUOT``) raises
``DiskFullError``: one line, "no space left on device writing <path>", whatever the writer said (``OSError``,
torch's ``[enforce fail at inline_container.cc:...] unexpected pos`` / ``PytorchStreamWriter failed writing file``,
safetensors' ``No space left on device (os error 28)``). The temporary name is removed, so a full disk leaves no
half-written file, and a rerun after space is freed resumes.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import secrets
import shutil
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable

__all__ = ["write_bytes_atomic", "write_text_atomic", "write_json_atomic", "write_file_atomic", "replace_dir",
           "publish_dir", "recover_dir", "remove_stale_tmp", "sha256_file", "DiskFullError", "disk_full_message"]


class DiskFullError(OSError):
    """A write failed for want of space (ENOSPC, or EDQUOT: the quota is used up); its text is one line."""

    def __init__(self, path: str | os.PathLike):
        super().__init__(errno.ENOSPC, f"no space left on device writing {path}", str(path))

    def __str__(self) -> str:
        return self.strerror


# What torch and safetensors say when a write comes up short: they drop the OSError (and its errno) on the way.
_DISK_FULL_TEXT = ("PytorchStreamWriter failed writing file", "No space left on device", "os error 28",
                   "Disk quota exceeded", "os error 122")


def _errors(err: BaseException | None):
    """``err`` and the errors it was raised from or during (``__cause__`` / ``__context__``), once each."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


def _out_of_space(err: BaseException) -> bool:
    if isinstance(err, OSError):
        return err.errno in (errno.ENOSPC, errno.EDQUOT)
    text = str(err)
    # torch's stream writer: "[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534", i.e. it
    # wrote fewer bytes than it asked to (on a local filesystem: a full disk or quota).
    return any(t in text for t in _DISK_FULL_TEXT) or ("inline_container" in text and "unexpected pos" in text)


def disk_full_message(err: BaseException) -> str | None:
    """"no space left on device writing <path>" (without the path where no writer here named it) when ``err`` or
    an error it came from is a write that ran out of space; else None."""
    chain = list(_errors(err))
    named = [e for e in chain if isinstance(e, DiskFullError)]
    if named:
        return str(named[0])
    for e in chain:
        if _out_of_space(e):
            filename = getattr(e, "filename", None)
            return "no space left on device" + (f" writing {filename}" if filename else "")
    return None


def _naming_full_disk(path: Path, err: BaseException) -> BaseException:
    """The error to raise for a failed write of ``path``: a ``DiskFullError`` naming it when space ran out."""
    if isinstance(err, Exception) and not isinstance(err, DiskFullError) and disk_full_message(err) is not None:
        return DiskFullError(path)
    return err


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # not every filesystem lets a directory be opened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")


def write_file_atomic(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Let ``write(tmp_path)`` create a file (e.g. ``fig.savefig``, ``torch.save``), then move it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        # rename() of two hard links to one file does nothing and succeeds (POSIX): drop the spare name.
        tmp.unlink(missing_ok=True)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        named = _naming_full_disk(path, err)
        if named is err:
            raise
        raise named from err
    _fsync_dir(path.parent)
    return path


def remove_stale_tmp(path: str | os.PathLike) -> None:
    """Remove the temporary names ``write_file_atomic`` left for ``path`` when a process died mid-write (one
    writer per path at a time, as for every writer here)."""
    path = Path(path)
    if path.parent.is_dir():
        for leftover in path.parent.glob(f".{path.name}.tmp-*"):
            leftover.unlink(missing_ok=True)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    return write_file_atomic(path, lambda tmp: tmp.write_bytes(data))


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | os.PathLike, payload: Any, indent: int = 1) -> Path:
    """JSON with sorted keys (stable bytes for equal content); non-JSON values as ``str``."""
    return write_text_atomic(path, json.dumps(payload, indent=indent, sort_keys=True, default=str) + "\n")


def _with_suffix(final: Path, suffix: str) -> Path:
    return final.with_name(final.name + suffix)


def _fsync_tree(root: Path) -> None:
    for p in root.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(root)


def _user_permissions(root: Path) -> None:
    """mkdtemp makes 0700; give the result the permissions the user's umask gives a plain mkdir/open."""
    umask = os.umask(0)
    os.umask(umask)
    for p in [root, *root.rglob("*")]:
        p.chmod((0o777 if p.is_dir() else 0o666) & ~umask)


def recover_dir(final: str | os.PathLike) -> Path:
    """Finish or undo an interrupted ``replace_dir`` of ``final``; afterwards at most ``final`` exists."""
    final = Path(final)
    new, old = _with_suffix(final, ".new"), _with_suffix(final, ".old")
    if new.is_dir():  # the commit point was passed: the new version wins
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
        new.rename(final)
        _fsync_dir(final.parent)
    shutil.rmtree(old, ignore_errors=True)
    if final.parent.is_dir():
        for leftover in final.parent.glob(final.name + ".tmp-*"):
            shutil.rmtree(leftover, ignore_errors=True)
    return final


def _build(build: Callable[[Path], None], final: Path) -> Path:
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=final.name + ".tmp-", dir=final.parent))
    try:
        build(tmp)
        _user_permissions(tmp)
        _fsync_tree(tmp)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        named = _naming_full_disk(final, err)
        if named is err:
            raise
        raise named from err
    return tmp


def replace_dir(build: Callable[[Path], None], final: str | os.PathLike) -> Path:
    """Build a directory with ``build(tmp)`` and swap it in for ``final`` (which may exist); see the module doc.

    One writer per ``final`` at a time (callers hold the stage lock or own the directory)."""
    final = Path(final)
    recover_dir(final)
    tmp = _build(build, final)
    new = _with_suffix(final, ".new")
    tmp.rename(new)  # commit point: from here on recover_dir promotes the new version
    _fsync_dir(final.parent)
    return recover_dir(final)


def publish_dir(build: Callable[[Path], None], final: str | os.PathLike) -> Path:
    """Build a directory and rename it to ``final`` unless another process published one first (kept as is).

    For outputs that are a pure function of their inputs (a converted model), where any complete copy is right."""
    final = Path(final)
    tmp = _build(build, final)
    try:
        tmp.rename(final)
        _fsync_dir(final.parent)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if err.errno not in (errno.ENOTEMPTY, errno.EEXIST) or not final.is_dir():
            raise  # not "another process finished the same work first"
    return final


def sha256_file(source: str | os.PathLike | BinaryIO) -> str:
    """The hex sha256 of a file's bytes: a path, or a file object opened for binary reading (an fsspec object in a
    bucket). ~1.3 GB/s on one core with SHA-NI (a 500 MB file in the page cache); a cold disk or a bucket is slower."""
    if not isinstance(source, (str, os.PathLike)):
        h = hashlib.sha256()
        while block := source.read(1 << 22):
            h.update(block)
        return h.hexdigest()
    with open(source, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
