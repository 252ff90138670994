"""A stage's identity: the one rule that decides when a stage's output can be reused.

Two runs of a stage are the same computation, and the second may reuse the first's output, exactly when these agree:

* the stage's **resolved config** less the fields that change no number (``NOT_IDENTITY``: where the output goes,
  how many shards or which parallel strategy computed it, how often it checkpoints; sharding writes the same bytes
  and DDP/FSDP train the same weights, tests/test_cache.py and tests/test_distributed.py check both);
* its **inputs by content**: models by weights digest or hub commit, data by document digest, upstream stages by
  their keys (so a change upstream changes every key downstream);
* the **runtime that computes it**: the dtype the precision policy really loads (``auto`` resolved), the autocast
  of a training stage, the device kind, and on a GPU its name (an H100 and an A100 differ in the last bits);
* the **code that can change its result**: the modules the stage runs (``STAGE_ROOTS`` and every ``sparsekd_core``
  module they import, at module or function level), read as syntax trees without docstrings, comments or line
  numbers, plus ``STAGE_VERSION`` for a change the code digest cannot see; a comment in ``kd_loss.py`` reuses
  every stage, a change to its code recomputes distillation and what depends on it, never the teacher cache;
* the versions of the libraries that compute the numbers (``provenance.environment``).

The flows' stage store (``tasks/store.py``), the teacher cache's store fingerprint (``cache.py``) and a training
checkpoint's run key (``distill.run_key``) all go through this module.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib.util
import json
from pathlib import Path
from typing import Any

PACKAGE = "sparsekd_core"

# Config fields that change no result: output locations, the parallel strategy, checkpoint cadence, sharding.
NOT_IDENTITY = frozenset({"out", "parallel", "checkpoint_every", "checkpoint_minutes", "shards", "shard_index",
                          "num_shards"})

# The modules each stage runs (their imports within sparsekd_core are followed). Every stage loads its model
# through ``models`` under the precision policy; ``stages.<stage>`` is the body the CLI and the tasks share.
_LOAD = ("sparsekd_core.models", "sparsekd_core.precision")
# A factored checkpoint ships this modeling file (prune/lowrank.py copies it): the stages that write checkpoints
# count it, though nothing imports it.
_SHIPPED = ("sparsekd_core.prune.remote_code.modeling_sparsekd",)
STAGE_ROOTS: dict[str, tuple[str, ...]] = {
    "eval": _LOAD + ("sparsekd_core.stages.eval", "sparsekd_core.eval", "sparsekd_core.downstream",
                     "sparsekd_core.prune.masks"),
    "cache": _LOAD + ("sparsekd_core.cache",),
    "prune": _LOAD + _SHIPPED + ("sparsekd_core.stages.prune", "sparsekd_core.prune"),
    "distill": _LOAD + _SHIPPED + ("sparsekd_core.distill",),
    "sft": _LOAD + _SHIPPED + ("sparsekd_core.sft",),
    "selfdata": _LOAD + ("sparsekd_core.selfdata",),
    "instructions": ("sparsekd_core.selfdata",),
    "profile": _LOAD + ("sparsekd_core.stages.profile", "sparsekd_core.profile"),
}

# The key machinery itself: it decides keys, it computes no stage's output (a change to it that changes keys
# changes them by itself). ``sparsekd_core`` is the package's __init__ (``__version__``).
NOT_STAGE_CODE = frozenset({"sparsekd_core", "sparsekd_core.identity", "sparsekd_core.provenance"})

# Bump a stage's number when its output changes for a reason its code digest cannot see (a packaged data file's
# meaning, a library behaviour worked around elsewhere); tests/test_identity.py lists the stages.
STAGE_VERSION: dict[str, int] = {stage: 1 for stage in STAGE_ROOTS}


def identity_fields(fields: dict[str, Any]) -> dict[str, Any]:
    """A stage config's fields less those that change no result (``NOT_IDENTITY``)."""
    return {k: v for k, v in fields.items() if k not in NOT_IDENTITY}


# ---------------------------------------------------------------------------------------------------------------- code


def _module_file(name: str) -> Path | None:
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or spec.origin is None or not spec.origin.endswith(".py"):
        return None
    return Path(spec.origin)


def module_source(name: str) -> str:
    """The source text of module ``name`` (tests replace this to simulate an edit)."""
    path = _module_file(name)
    return path.read_text(encoding="utf-8") if path is not None else ""


def _strip_prose(tree: ast.AST) -> ast.AST:
    """Docstrings, and the ``description=``/``title=``/``examples=`` of pydantic ``Field(...)`` calls (help text of
    the CLI and the UI forms: prose too)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) == "Field":
            node.keywords = [k for k in node.keywords if k.arg not in ("description", "title", "examples")]
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant) \
                    and isinstance(body[0].value.value, str):
                node.body = body[1:] or [ast.Pass()]
    return tree


def code_fingerprint(source: str) -> str:
    """Digest of what a module's code does: its syntax tree without docstrings and field descriptions (comments
    and layout never reach the tree; positions are left out), so an edit of prose or formatting keeps the digest."""
    tree = _strip_prose(ast.parse(source))
    return hashlib.sha256(ast.dump(tree, include_attributes=False).encode()).hexdigest()


def _imports(name: str, source: str) -> set[str]:
    """The sparsekd_core modules ``name`` imports anywhere in its code (relative imports resolved)."""
    is_package = (_module_file(name) or Path("")).name == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{a.name}" for a in node.names)  # `from . import data` imports a module
    return {m for m in found if (m == PACKAGE or m.startswith(PACKAGE + ".")) and _module_file(m) is not None}


def code_modules(stage: str) -> list[str]:
    """Every sparsekd_core module ``stage`` runs: its roots and what they import, transitively. A stage this
    module does not know counts the whole package (conservative)."""
    roots = STAGE_ROOTS.get(stage)
    if roots is None:
        return sorted(_all_modules() - NOT_STAGE_CODE)
    missing = [r for r in roots if _module_file(r) is None]
    if missing:  # a renamed module must not silently shrink what a key covers
        raise RuntimeError(f"identity.STAGE_ROOTS[{stage!r}] names modules that do not exist: {missing}")
    seen: set[str] = set()
    todo = list(roots)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        todo.extend(_imports(name, module_source(name)) - seen - NOT_STAGE_CODE)
    return sorted(seen)


def _all_modules() -> set[str]:
    root = _module_file(PACKAGE).parent
    names = set()
    for path in root.rglob("*.py"):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names.add(".".join(parts))
    return names


@functools.lru_cache(maxsize=None)
def _stage_code_digest(stage: str) -> str:
    h = hashlib.sha256(f"{stage}:{STAGE_VERSION.get(stage, 1)}".encode())
    for name in code_modules(stage):
        h.update(name.encode())
        h.update(code_fingerprint(module_source(name)).encode())
    return h.hexdigest()[:16]


def code_digest(stage: str) -> str:
    """Digest (16 hex chars) of the code that can change ``stage``'s result; computed once per process."""
    return _stage_code_digest(stage)


def forget_code() -> None:
    """Drop the per-process code digests (tests that simulate an edit call this)."""
    _stage_code_digest.cache_clear()


# ---------------------------------------------------------------------------------------------------------------- keys


def runtime(dtype: str, device: str, stage: str = "eval") -> dict[str, str]:
    """The runtime of an inference stage as it will really run: the policy's load dtype, the device kind, and the
    GPU's name on CUDA (see provenance.resolved_runtime)."""
    from .provenance import resolved_runtime

    return resolved_runtime(dtype, device, stage)


def training_runtime(device: str, autocast: str) -> dict[str, str | None]:
    """The runtime of a training stage: fp32 master weights, the autocast dtype, the device (and GPU name)."""
    from .provenance import training_runtime as resolve

    return resolve(device, autocast)


def stage_key(stage: str, config: dict[str, Any], inputs: dict[str, str]) -> str:
    """The key of one stage run (20 hex chars): the stage, its config (less ``NOT_IDENTITY`` at its top level: a
    caller passes each stage config section through ``identity_fields``, never data such as ``{source: digest}``;
    the caller includes the resolved runtime and content digests), its inputs' keys, its code and the library
    versions."""
    from .provenance import environment

    payload = json.dumps({"stage": stage, "config": identity_fields(config), "inputs": inputs,
                          "code": code_digest(stage), "env": environment()}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


def run_key(stage: str, fields: dict[str, Any], data_fingerprint: dict, student_spec: str) -> str:
    """What a training checkpoint must match to be resumed (16 hex chars): the config less ``NOT_IDENTITY``, the
    training data, the student and the stage's code."""
    blob = json.dumps([identity_fields(fields), data_fingerprint, student_spec, code_digest(stage)], sort_keys=True,
                      default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
