"""deployments/prefect.yaml, checked without a server: every deployment names a real flow, its parameters
validate against that flow's pydantic config, and the pools, schedules and limits are what the README says."""

from __future__ import annotations

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def _deployments():
    return yaml.safe_load((ROOT / "deployments" / "prefect.yaml").read_text())["deployments"]


def _flow(entrypoint: str):
    import flows.experiments as experiments
    import flows.study as study

    path, name = entrypoint.split(":")
    modules = {"flows/experiments.py": experiments, "flows/study.py": study}
    assert path in modules, path
    return getattr(modules[path], name)


def test_every_flow_has_a_gpu_and_a_docker_deployment():
    from flows.registry import ALL_FLOWS

    deps = _deployments()
    for kind, pool in (("gpu", "sparsekd-gpu"), ("docker", "sparsekd-docker")):
        names = sorted(_flow(d["entrypoint"]).name for d in deps if d["name"] == kind)
        assert names == sorted(ALL_FLOWS), kind
        assert {d["work_pool"]["name"] for d in deps if d["name"] == kind} == {pool}


def test_parameters_validate_against_the_flow_configs():
    from flows.configs import FLOW_CONFIGS

    for d in _deployments():
        flow = _flow(d["entrypoint"])
        config = FLOW_CONFIGS[flow.name](**d["parameters"]["config"])
        if flow.name == "multi-seed":
            # The pool deployment fans the seeds out to the inner flow's deployment of the same kind.
            assert config.fan_out == "deployments" and config.deployment == d["name"]


def test_weekly_rerun_ships_paused_and_programmes_run_one_at_a_time():
    deps = _deployments()
    scheduled = [d for d in deps if d.get("schedules")]
    assert {_flow(d["entrypoint"]).name for d in scheduled} == {"multi-seed"}
    for d in scheduled:
        assert [s["active"] for s in d["schedules"]] == [False] and d["schedules"][0]["cron"]
    limited = {(_flow(d["entrypoint"]).name, d["concurrency_limit"]) for d in deps if d.get("concurrency_limit")}
    assert limited == {("multi-seed", 1), ("paper", 1), ("study", 1)}


def test_setup_refuses_without_a_server(monkeypatch, capsys):
    from deployments import setup
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: None}):
        assert setup.main([]) == 2
    assert "no Prefect server" in capsys.readouterr().err


def _untyped_objects(schema: dict) -> list[str]:
    """Paths of objects in a JSON schema whose fields are not declared (free-form JSON boxes in the UI form)."""
    found = []

    def visit(node, path):
        if isinstance(node, dict):
            if node.get("type") == "object" and not node.get("properties") and "$ref" not in node:
                found.append(path)
            for key, value in node.items():
                visit(value, f"{path}/{key}")
        elif isinstance(node, list):
            for i, value in enumerate(node):
                visit(value, f"{path}[{i}]")

    visit(schema, "")
    return found


def test_every_flow_form_is_typed_all_the_way_down():
    """The Prefect UI builds the Run form from this schema: every section has named, typed fields with defaults
    and descriptions (no free-form JSON box), and the defaults a flow applies are in it."""
    from prefect.utilities.callables import parameter_schema

    from flows.registry import ALL_FLOWS

    for name, flow in ALL_FLOWS.items():
        schema = parameter_schema(flow.fn).model_dump_for_openapi()
        assert not _untyped_objects(schema), (name, _untyped_objects(schema))
    schema = parameter_schema(ALL_FLOWS["cascade"].fn).model_dump_for_openapi()
    distill = schema["definitions"]["DistillSection"]["properties"]
    for field in ("alpha", "temperature", "tail", "lr", "max_steps"):
        assert field in distill and distill[field].get("description"), field
    assert distill["tail"]["enum"] == ["topk", "bucket", "paper"] and distill["alpha"]["default"] == 0.5
    prune = schema["definitions"]["PruneSection"]["properties"]
    assert {"method", "schedule", "whiten"} <= set(prune)
    cascade = schema["definitions"]["CascadeConfig"]["properties"]
    assert [s["name"] for s in cascade["eval_sets"]["default"]] == ["wikitext2", "c4_heldout"]


def test_every_flow_has_a_config_and_the_cli_names_it():
    """`sparsekd run FLOW` validates with FLOW_CONFIGS and runs ALL_FLOWS: the two must name the same flows, and
    the command's help must list them all."""
    import argparse

    from flows.configs import FLOW_CONFIGS
    from flows.registry import ALL_FLOWS
    from sparsekd.cli import add_run_parser

    assert sorted(FLOW_CONFIGS) == sorted(ALL_FLOWS)
    sub = argparse.ArgumentParser().add_subparsers()
    add_run_parser(sub)
    flow_help = next(a.help for a in sub.choices["run"]._actions if a.dest == "flow")
    assert sorted(n.strip() for n in flow_help.split("|")) == sorted(ALL_FLOWS)
