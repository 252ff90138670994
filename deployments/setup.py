"""Create the work pools and GPU limits on a Prefect server and apply ``deployments/prefect.yaml``.

    export PREFECT_API_URL=http://127.0.0.1:4200/api
    python -m deployments.setup                 # pool sparsekd-gpu (process) + the <flow>/<flow>-gpu deployments
    python -m deployments.setup --docker        # also pool sparsekd-docker + the <flow>/<flow>-docker deployments
    python -m deployments.setup --gpu-slots gpu-host1-0,gpu-host1-1   # pre-create per-GPU limits (optional)

Idempotent: pools and limits that exist are left as they are; deployments are updated in place.
Run it from anywhere; it deploys from the project root (the entrypoints are relative to it).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
PREFECT_FILE = PROJECT_ROOT / "deployments" / "prefect.yaml"
GPU_POOL = "sparsekd-gpu"
DOCKER_POOL = "sparsekd-docker"
DEFAULT_IMAGE = "sparsekd-worker:0.1.0"


class SetupError(RuntimeError):
    pass


def api_url() -> str:
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        raise SetupError("no Prefect server: start one (`prefect server start --host 127.0.0.1`) and "
                         "`export PREFECT_API_URL=http://127.0.0.1:4200/api`, or set it in your Prefect profile")
    return url


def ensure_pool(name: str, pool_type: str, log=print) -> bool:
    """Create work pool ``name`` of ``pool_type`` with its default job template; True if created."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            pool = client.read_work_pool(name)
            if pool.type != pool_type:
                raise SetupError(f"work pool {name!r} exists with type {pool.type!r}, expected {pool_type!r}: "
                                 f"delete it (`prefect work-pool delete {name}`) or rename ours")
            log(f"work pool {name} ({pool_type}): exists")
            return False
        except ObjectNotFound:
            pass
        template = _default_template(pool_type)
        try:
            client.create_work_pool(WorkPoolCreate(name=name, type=pool_type, base_job_template=template))
        except ObjectAlreadyExists:
            return False
    log(f"work pool {name} ({pool_type}): created")
    return True


def _default_template(pool_type: str) -> dict:
    if pool_type == "process":
        from prefect.workers.process import ProcessWorker

        return ProcessWorker.get_default_base_job_template()
    # Other types: the template the server knows for that worker type (as `prefect work-pool create --type`).
    from prefect.client.collections import get_collections_metadata_client

    import anyio

    async def fetch() -> dict:
        async with get_collections_metadata_client() as client:
            metadata = await client.read_worker_metadata()
        for collection in metadata.values():
            for worker in collection.values():
                if worker.get("type") == pool_type:
                    return worker["default_base_job_configuration"]
        raise SetupError(f"the Prefect server knows no worker type {pool_type!r} (install its collection, e.g. "
                         f"`pip install prefect-docker`, where the worker runs)")

    return anyio.run(fetch)


def deploy(pattern: str, project_dir: str, image: str, log=print) -> None:
    env = {**os.environ, "SPARSEKD_PROJECT_DIR": project_dir, "SPARSEKD_IMAGE": image,
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    cmd = [sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--prefect-file", str(PREFECT_FILE),
           "--name", pattern]
    log("$ " + " ".join(cmd[2:]))
    done = subprocess.run(cmd, cwd=PROJECT_ROOT, env=env, text=True, capture_output=True)
    if done.returncode != 0:
        raise SetupError(f"prefect deploy failed (exit {done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    names = [line.split("'")[1] for line in done.stdout.splitlines() if "Deployment '" in line and "'" in line]
    log(f"deployed: {', '.join(sorted(set(names))) or done.stdout[-500:]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deployments.setup", description=__doc__.split("\n\n")[0])
    parser.add_argument("--docker", action="store_true", help=f"also create {DOCKER_POOL} and the <flow>/<flow>-docker deployments")
    parser.add_argument("--image", default=os.environ.get("SPARSEKD_IMAGE", DEFAULT_IMAGE),
                        help="worker image for the docker pool (default: %(default)s)")
    parser.add_argument("--project-dir", default=os.environ.get("SPARSEKD_PROJECT_DIR", str(PROJECT_ROOT)),
                        help="where the project is checked out on the process workers (default: this checkout)")
    parser.add_argument("--gpu-slots", default="",
                        help="comma-separated GPU slot names to create as concurrency limits of 1 (the workers' "
                             "$SPARSEKD_GPU_SLOT values; created on first use otherwise)")
    args = parser.parse_args(argv)
    try:
        print(f"Prefect API: {api_url()}")
        ensure_pool(GPU_POOL, "process")
        if args.docker:
            ensure_pool(DOCKER_POOL, "docker")
        from tasks.stages import ensure_concurrency_limit

        for slot in filter(None, (s.strip() for s in args.gpu_slots.split(","))):
            made = ensure_concurrency_limit(slot, 1)
            print(f"concurrency limit {slot} (1 slot): {'created' if made else 'exists'}")
        deploy("*/*-gpu", args.project_dir, args.image)
        if args.docker:
            deploy("*/*-docker", args.project_dir, args.image)
    except SetupError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"next: start a worker on each GPU host:  SPARSEKD_GPU_SLOT=gpu-$(hostname)-0 "
          f"prefect worker start --pool {GPU_POOL}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
