"""deployments/prefect.yaml, checked without a server: every deployment names a real flow, its parameters
validate against that flow's pydantic config, and the pools, schedules and limits are what the README says."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent


def _deployments():
    return yaml.safe_load((ROOT / "deployments" / "prefect.yaml").read_text())["deployments"]


def _flow(entrypoint: str):
    import flows.compare as compare
    import flows.experiments as experiments
    import flows.study as study
    import flows.study_v2 as study_v2

    path, name = entrypoint.split(":")
    modules = {"flows/experiments.py": experiments, "flows/study.py": study, "flows/compare.py": compare,
               "flows/study_v2.py": study_v2}
    assert path in modules, path
    return getattr(modules[path], name)


def test_every_flow_has_a_gpu_and_a_docker_deployment():
    from flows.registry import ALL_FLOWS

    deps = _deployments()
    for kind, pool in (("gpu", "sparsekd-gpu"), ("docker", "sparsekd-docker")):
        of_kind = [d for d in deps if d["name"].endswith(f"-{kind}")]
        assert sorted(_flow(d["entrypoint"]).name for d in of_kind) == sorted(ALL_FLOWS), kind
        assert {d["work_pool"]["name"] for d in of_kind} == {pool}
        # Named after their flow ('<flow>-gpu'), so the UI's deployment list reads as the flows, not "gpu" ten times.
        assert all(d["name"] == f"{_flow(d['entrypoint']).name}-{kind}" for d in of_kind)


def test_parameters_validate_against_the_flow_configs():
    from flows.configs import FLOW_CONFIGS

    for d in _deployments():
        flow = _flow(d["entrypoint"])
        config = FLOW_CONFIGS[flow.name](**d["parameters"]["config"])
        if flow.name == "multi-seed":
            # The pool deployment fans the seeds out to the inner flow's deployment of the same kind.
            kind = d["name"].rsplit("-", 1)[1]
            assert config.fan_out == "deployments" and config.deployment() == f"{config.flow}/{config.flow}-{kind}"


def test_weekly_rerun_ships_paused_and_programmes_run_one_at_a_time():
    deps = _deployments()
    scheduled = [d for d in deps if d.get("schedules")]
    assert {_flow(d["entrypoint"]).name for d in scheduled} == {"multi-seed"}
    for d in scheduled:
        assert [s["active"] for s in d["schedules"]] == [False] and d["schedules"][0]["cron"]
    limited = {(_flow(d["entrypoint"]).name, d["concurrency_limit"]) for d in deps if d.get("concurrency_limit")}
    assert limited == {("multi-seed", 1), ("paper", 1), ("study", 1), ("study-v2", 1)}


def test_setup_refuses_without_a_server(monkeypatch, capsys):
    from deployments import setup
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: None}):
        assert setup.main([]) == 2
    assert "no Prefect server" in capsys.readouterr().err


def _paths_where(schema: dict, hit) -> list[str]:
    """Paths of the objects of a JSON schema for which ``hit(node)`` holds."""
    found = []

    def visit(node, path):
        if isinstance(node, dict):
            if hit(node):
                found.append(path)
            for key, value in node.items():
                visit(value, f"{path}/{key}")
        elif isinstance(node, list):
            for i, value in enumerate(node):
                visit(value, f"{path}[{i}]")

    visit(schema, "")
    return found


def _untyped_objects(schema: dict) -> list[str]:
    """Objects whose fields are not declared (free-form JSON boxes in the UI form)."""
    return _paths_where(schema, lambda n: n.get("type") == "object" and not n.get("properties") and "$ref" not in n)


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
    assert distill["tail"]["enum"] == ["topk", "bucket", "paper", "sampled"] and distill["alpha"]["default"] == 0.5
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


def _jsonb(node):
    """What PostgreSQL's JSONB does to a stored schema: object keys come back shorter first, then alphabetical."""
    if isinstance(node, dict):
        return {k: _jsonb(node[k]) for k in sorted(node, key=lambda k: (len(k), k))}
    return [_jsonb(v) for v in node] if isinstance(node, list) else node


def _form_order(props: dict) -> list[str]:
    """The Prefect UI's field order: by ``position``, missing last (SchemaFormFields in the UI bundle)."""
    return [k for k, _ in sorted(props.items(), key=lambda kv: kv[1].get("position", float("inf")))]


def test_forms_keep_the_declared_field_order_through_jsonb():
    """Every object of every flow's form lists its fields in the model's declared order after the server's JSONB
    storage scrambled the keys (the cascade form opened with Eval, Seed, Dtype, Model)."""
    from prefect.utilities.callables import parameter_schema

    from flows.configs import FLOW_CONFIGS
    from flows.registry import ALL_FLOWS

    for name, flow in ALL_FLOWS.items():
        schema = _jsonb(parameter_schema(flow.fn).model_dump_for_openapi())
        config = schema["definitions"][schema["properties"]["config"]["$ref"].split("/")[-1]]
        declared = list(FLOW_CONFIGS[name].model_fields)
        if name == "multi-seed":
            assert _form_order(config["properties"]) == declared
            tab = schema["definitions"]["IterativeConfigSeeds"]["properties"]
            assert _form_order(tab)[:3] == ["flow", "model", "dtype"]
        else:
            assert _form_order(config["properties"]) == declared, name
        for definition, body in schema["definitions"].items():
            if "properties" in body:
                assert all("position" in p for p in body["properties"].values()), (name, definition)


def _none_switches(schema: dict) -> list[str]:
    """Fields offered as Prefect's ``X | None`` switch ("Property is type None")."""
    return _paths_where(schema, lambda n: {"type": "null"} in n.get("anyOf", []))


def test_forms_have_no_internal_fields_and_no_none_switches():
    """The forms show what a user sets: no `parent_run_id` (the calling flow sets it), no study `command`, and no
    `str | None` switch ("Property is type None") where leaving the field empty means its default."""
    from prefect.utilities.callables import parameter_schema

    from flows.registry import ALL_FLOWS

    for name, flow in ALL_FLOWS.items():
        schema = parameter_schema(flow.fn).model_dump_for_openapi()
        assert set(schema["properties"]) <= {"config", "out"}, (name, set(schema["properties"]))
        assert not _none_switches(schema), (name, _none_switches(schema))
        for prop in schema["properties"].values():
            assert prop.get("description") or prop.get("$ref") or prop.get("allOf"), (name, prop)
        text = str(schema)
        assert "<flow>" not in text, name  # the UI renders descriptions as HTML: <flow> vanished
    selfdata = parameter_schema(ALL_FLOWS["selfdata"].fn).model_dump_for_openapi()["definitions"]
    # The KD arm caches the flow's own prompts: one "Num Samples" (the flow's), no corpus Data.
    assert not {"data", "num_samples"} & set(selfdata["SelfDataCorpus"]["properties"])
    assert "num_samples" not in selfdata["SelfDataSection"]["properties"]


def test_an_empty_optional_field_validates_as_its_default():
    """A field offered without its None switch: left empty, the UI leaves it out, and the flow's default applies
    (here `distill.max_steps`: unset = one epoch); an explicit null, as older clients send, is still accepted."""
    from flows.configs import DenseKDConfig

    assert DenseKDConfig(distill={}).distill.max_steps is None
    assert DenseKDConfig(distill={"max_steps": None}).distill.max_steps is None
    assert DenseKDConfig(distill={"max_steps": 3}).distill.max_steps == 3


def test_multi_seed_tabs_carry_their_flow():
    """Each tab of multi-seed's `config` is one flow with its fields; the flow runs what the tab says, so a form
    submitted as it opens is valid whichever tab it opened on (it opened on DenseKDConfig with flow: iterative and
    failed on `ce_control`)."""
    from flows.configs import INNER_FLOWS, MultiSeedConfig

    for name in INNER_FLOWS:
        tab_defaults = MultiSeedConfig(config={"flow": name}).model_dump(mode="json")
        again = MultiSeedConfig(**tab_defaults)
        assert again.flow == name and type(again.config).__mro__[1] is INNER_FLOWS[name]
        assert "flow" not in again.inner_values() and "seed" not in again.inner_values()
    # Configs written before the tabs: the flow beside the config, the pool as `deployment`.
    old = MultiSeedConfig(flow="cascade", deployment="docker", config={"ce_control": False})
    assert (old.flow, old.deployment(), old.inner_values()) == ("cascade", "cascade/cascade-docker",
                                                              {"ce_control": False})
    with pytest.raises(ValueError, match=r"config\(iterative\).teacher_swap"):
        MultiSeedConfig(config={"flow": "iterative", "teacher_swap": True})
    with pytest.raises(ValueError, match="give the flow once"):
        MultiSeedConfig(flow="iterative", config={"flow": "dense-kd"})
