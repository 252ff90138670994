"""`sparsekd run FLOW --config F.yaml` and `sparsekd demo`: the experiment flows (Prefect + MLflow)."""

from __future__ import annotations

import argparse

from sparsekd_core.config import ConfigError, load_yaml

from ._common import add_output_flags, emit
from ._signals import start_temporary_prefect_server, until_stopped

DEMO_CONFIG = {
    # Sized for ~15 minutes on 2 CPU cores: a 64×256-token offline mixture, 16 distillation steps per arm
    # (24 steps took 19.9 min in all; validation PPL had made most of its gain by step 16), 3072-token
    # evaluations on WikiText-2 test (in-domain) and held-out C4 (out-of-domain).
    "model": "smollm2-135m",
    "workdir": "runs/demo",
    "corpus": {"data": "mix:paper-offline", "num_samples": 64, "seq_len": 256, "seed": 0, "top_k": 32},
    "distill": {"max_steps": 16, "lr": 5e-5, "batch_size": 2, "eval_every": 8, "val_tokens": 1024,
                "checkpoint_every": 8},
    "eval_sets": [{"name": "wikitext2", "data": "wikitext2:test", "max_tokens": 3072},
                  {"name": "c4_heldout", "data": "c4:heldout", "max_tokens": 3072}],
    "target": 0.15,
}


def add_run_parser(sub) -> None:
    p = sub.add_parser("run", help="run an experiment flow (dense-kd, iterative, multi-seed, cascade, ...)")
    p.add_argument("flow", help="dense-kd | iterative | multi-seed | cascade | teacher-swap | wanda | selfdata | "
                                 "paper | profile | study | study-v2 | compare")
    add_output_flags(p, "the flow's YAML config (examples: flows/configs_yaml/)")
    p.set_defaults(func=cmd_run)


def add_demo_parser(sub) -> None:
    p = sub.add_parser("demo", help="the main job: the cascade flow on the packaged SmolLM2-135M, offline")
    p.add_argument("--workdir", help=f"where caches, checkpoints, reports and mlflow.db go (default "
                                     f"{DEMO_CONFIG['workdir']})")
    p.add_argument("--model", help=f"model (default {DEMO_CONFIG['model']}; hub ids work online)")
    add_output_flags(p, None)
    p.set_defaults(func=cmd_demo)


def _run_flow(flow_name: str, values: dict, as_json: bool) -> int:
    import os

    from pydantic import ValidationError

    # The temporary local server otherwise tries to send telemetry (and logs an error when offline).
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

    from flows.configs import FLOW_CONFIGS
    from sparsekd_core.config import format_validation_error

    if flow_name not in FLOW_CONFIGS:
        raise ConfigError(f"run: unknown flow {flow_name!r}; allowed: {', '.join(FLOW_CONFIGS)}")
    try:
        config = FLOW_CONFIGS[flow_name](**values)
    except ValidationError as err:  # before any work starts
        raise ConfigError(format_validation_error(flow_name, err)) from None
    from flows.preflight import preflight

    preflight(config)  # before the flow starts the temporary Prefect server: a bad input is one line, exit 2
    from flows.registry import ALL_FLOWS

    start_temporary_prefect_server()  # one that dies with this process, however it dies (_signals.py)
    summary = ALL_FLOWS[flow_name](config)
    db = summary["tracking_uri"]
    ran = sum(not s["cached"] for s in summary["stages"])
    human = (f"\n{flow_name}: done ({ran} stages ran, {len(summary['stages']) - ran} reused from cache)\n"
             f"report:    {summary['report']}\n"
             f"MLflow UI: mlflow ui --backend-store-uri {db} --host 127.0.0.1 --port 5000   (then http://127.0.0.1:5000)\n"
             f"Prefect UI: prefect server start --host 127.0.0.1   (then http://127.0.0.1:4200)")
    emit(summary, as_json, human)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    values = load_yaml(args.config) if args.config else {}
    return until_stopped(lambda: _run_flow(args.flow, values, args.json))  # SIGTERM/SIGHUP: exit 128 + signal


def cmd_demo(args: argparse.Namespace) -> int:
    values = dict(DEMO_CONFIG)
    if args.workdir:
        values["workdir"] = args.workdir
    if args.model:
        values["model"] = args.model
    return until_stopped(lambda: _run_flow("cascade", values, args.json))
