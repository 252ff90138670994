"""Every arrow points down (the house style, "The shape"): each layer imports only the layers below it.

    sparsekd_core  the method: none of this project above it, and never Prefect or MLflow
    tasks          Prefect tasks: sparsekd_core
    flows          composition: tasks, sparsekd_core
    sparsekd, deployments   the CLI and the deployments: anything

Read with `ast` from every .py file of the five packages: module-level and function-level imports (a lazy import in
a function is still an arrow), relative imports resolved against the file's package, and
`importlib.import_module("...")` / `__import__("...")` with a literal name.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Each layer and the project packages it may import (its own is always allowed).
ALLOWED = {
    "sparsekd_core": set(),
    "tasks": {"sparsekd_core"},
    "flows": {"tasks", "sparsekd_core"},
    "sparsekd": {"sparsekd_core", "tasks", "flows", "deployments"},
    "deployments": {"sparsekd_core", "tasks", "flows", "sparsekd"},
}
PROJECT = set(ALLOWED)
NEVER_IN_CORE = {"prefect", "mlflow"}  # the core runs without an orchestrator or a tracker


def module_name(path: Path, root: Path = ROOT) -> str:
    """`sparsekd_core/prune/svd.py` -> `sparsekd_core.prune.svd`; a package's `__init__.py` -> the package."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def resolve(node: ast.ImportFrom, importer: str, is_package: bool) -> str:
    """The absolute module a `from ... import` names (relative levels resolved as Python does)."""
    if node.level == 0:
        return node.module or ""
    package = importer.split(".") if is_package else importer.split(".")[:-1]
    if node.level - 1 > len(package) - 1:
        raise ImportError(f"{importer}: relative import beyond the top-level package (level {node.level})")
    base = package[: len(package) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(path: Path, root: Path = ROOT) -> list[tuple[int, str]]:
    """(line, absolute module) of every import in a file, at any depth."""
    importer, is_package = module_name(path, root), path.name == "__init__.py"
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            found.append((node.lineno, resolve(node, importer, is_package)))
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if name in ("import_module", "__import__"):
                found.append((node.lineno, node.args[0].value))
    return found


def project_files() -> list[Path]:
    files = sorted(p for package in PROJECT for p in (ROOT / package).rglob("*.py") if "__pycache__" not in p.parts)
    assert len(files) > 20, "too few files: the search is broken"
    return files


def violations(files: list[Path], root: Path = ROOT) -> list[str]:
    """One line per upward import: `file:line: layer imports module (allowed: ...)`."""
    found = []
    for path in files:
        layer = module_name(path, root).split(".")[0]
        for line, module in imports_of(path, root):
            top = module.split(".")[0]
            where = f"{path.relative_to(root)}:{line}"
            if top in PROJECT and top != layer and top not in ALLOWED[layer]:
                found.append(f"{where}: {layer} imports {module} (allowed: {sorted(ALLOWED[layer]) or 'nothing'})")
            if layer == "sparsekd_core" and top in NEVER_IN_CORE:
                found.append(f"{where}: sparsekd_core imports {module}")
    return sorted(set(found))


def test_every_import_points_down():
    found = violations(project_files())
    assert not found, "imports that point up:\n" + "\n".join(found)


def test_the_check_sees_every_kind_of_import(tmp_path):
    """The scanner on a made-up tree: each kind of upward import is caught, with its file and line."""
    files = {
        "sparsekd_core/__init__.py": "",
        "sparsekd_core/prune/__init__.py": "",
        "sparsekd_core/prune/svd.py": "from ...tasks import stages\n",  # resolves beyond the package: an error
        "sparsekd_core/eval.py": "import math\n\ndef f():\n    import mlflow\n    from flows.experiments import x\n",
        "sparsekd_core/cache.py": "import importlib\nmod = importlib.import_module('tasks.stages')\n",
        "sparsekd_core/ok.py": "from . import eval\nfrom .prune import svd\n",
        "tasks/__init__.py": "",
        "tasks/stages.py": "import prefect\nfrom sparsekd_core import cache\nfrom flows import registry\n",
        "flows/__init__.py": "from . import experiments\n",
        "flows/experiments.py": "from tasks.stages import x\nfrom sparsekd.cli import main\n",
        "sparsekd/__init__.py": "",
        "sparsekd/cli.py": "from flows.experiments import x\nfrom deployments import setup\n",
        "deployments/__init__.py": "",
        "deployments/setup.py": "import flows.experiments, sparsekd.cli, tasks.stages, sparsekd_core.data\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    paths = sorted(tmp_path / name for name in files if name != "sparsekd_core/prune/svd.py")
    assert violations(paths, tmp_path) == [
        "flows/experiments.py:2: flows imports sparsekd.cli (allowed: ['sparsekd_core', 'tasks'])",
        "sparsekd_core/cache.py:2: sparsekd_core imports tasks.stages (allowed: nothing)",
        "sparsekd_core/eval.py:4: sparsekd_core imports mlflow",
        "sparsekd_core/eval.py:5: sparsekd_core imports flows.experiments (allowed: nothing)",
        "tasks/stages.py:3: tasks imports flows (allowed: ['sparsekd_core'])",
    ]
    assert imports_of(tmp_path / "sparsekd_core/ok.py", tmp_path) == [(1, "sparsekd_core"), (2, "sparsekd_core.prune")]
    with pytest.raises(ImportError, match="beyond the top-level package"):
        imports_of(tmp_path / "sparsekd_core/prune/svd.py", tmp_path)
