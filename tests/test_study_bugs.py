"""Three bugs of flows/study.py (issue 25, part 6), each pinned by a test that failed before its fix:
(a) an epoch-based config (no `distill.max_steps`) raised TypeError after every stage had run;
(b) `publish` copied every `iterative-*` report directory of the workdir, so an earlier run's plots could overwrite
    this run's;
(c) the verdict thresholds were module constants, not fields of the study config.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from test_flows import PRUNE, flow_values, prefect_server, tiny_setup  # noqa: F401 - the session fixtures

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """One storage root for the module: the second study run reuses every stage of the first."""
    return tmp_path_factory.mktemp("study-bugs") / "w"


def epoch_study(root, workdir, **extra) -> dict:
    """A small study whose training runs one epoch over the corpus (no max_steps)."""
    values = flow_values(root, workdir, targets=[0.3], sparsities=[0.5], seeds=[], lr_probe=[], tails=["topk"],
                         prune=PRUNE, pruned_ce_control=False, last_round_swap=False, standard_protocol_set=None,
                         **extra)
    values["distill"] = {**{k: v for k, v in values["distill"].items() if k != "max_steps"}, "epochs": 1}
    return values


def test_a_study_without_max_steps_finishes_and_states_its_budget(prefect_server, tiny_setup, workdir):
    from flows.study import StudyConfig, study_flow

    result = study_flow(StudyConfig(**epoch_study(tiny_setup, workdir)))
    text = Path(result["report"]).read_text()
    # 8 sequences of 32 tokens, one epoch at batch 2: 4 steps, 256 tokens.
    assert "- **Budget per trained arm**: 1 epoch(s) over the 8×32-token corpus, batch 2 = 256 tokens (lr" in text
    assert result["verdicts"] and "## Verdicts" in text


def test_verdict_thresholds_are_fields_of_the_study_config(prefect_server, tiny_setup, workdir):
    from flows.study import StudyConfig, study_flow, verdicts

    defaults = StudyConfig(model=str(tiny_setup / "model"))
    assert (defaults.verdict_much_lower, defaults.verdict_comparable) == (0.8, 1.05)  # the constants they were
    rows = {"dense": {"wt": 30.0}, "dense+kd": {"wt": 29.0}, "R1 pre": {"wt": 60.0}, "R1 post": {"wt": 50.0}}

    def holds(**thresholds):
        return {v["criterion"].split(" (")[0]: v["holds"] for v in verdicts(rows, "wt", [], **thresholds)}

    assert holds()["post-KD ≪ post-prune"] is False  # 50/60 = 83% > 80%
    assert holds(much_lower=0.9)["post-KD ≪ post-prune"] is True
    assert holds()["low-sparsity post-KD comparable to or better than dense"] is False  # 50/30 > 1.05
    assert holds(comparable=2.0)["low-sparsity post-KD comparable to or better than dense"] is True

    # The flow judges with the config's thresholds (every stage reused from the first test when it ran).
    result = study_flow(StudyConfig(**epoch_study(tiny_setup, workdir, verdict_much_lower=0.95,
                                                  verdict_comparable=2.0)))
    criteria = [v["criterion"] for v in result["verdicts"]]
    assert any("at most 95% of its pre-KD PPL" in c for c in criteria), criteria
    assert any("≤ 2.00× dense" in c for c in criteria), criteria
    assert "≤ 2.00× dense" in Path(result["report"]).read_text()


def test_publish_copies_only_this_runs_outputs(tmp_path):
    from flows.study import publish

    reports = tmp_path / "reports"

    def report(name: str, pngs: tuple[str, ...] = (), profile: bool = False) -> str:
        d = reports / name
        d.mkdir(parents=True)
        (d / "report.md").write_text(f"# {name}\n")
        for png in pngs:
            (d / png).write_bytes(name.encode())
        if profile:
            (d / "profile.md").write_text(f"profile of {name}\n")
        return str(d / "report.md")

    # An earlier run in the same workdir: other eval sets, and the profile on.
    report("iterative-00000000", ("ppl_vs_reduction_old_set.png", "ppl_vs_reduction_text.png"), profile=True)
    this = report("iterative-ffffffff", ("ppl_vs_reduction_text.png",))
    paper = {"report": report("paper-11111111"), "parts": {"dense-kd": report("dense-kd-22222222"),
                                                           "iterative": this}}
    result = {"report": report("study-33333333", ("recovery.png",)), "verdicts": [], "models": {}, "metrics": {},
              "judged": {}, "ppl": {}}
    out = tmp_path / "out"
    publish(result, paper, out)
    assert sorted(p.name for p in out.iterdir()) == ["iterative-ppl_vs_reduction_text.png", "paper-report.md",
                                                     "recovery.png", "report.md", "study.json"]
    assert (out / "iterative-ppl_vs_reduction_text.png").read_bytes() == b"iterative-ffffffff"


def test_the_study_command_without_out_passes_parameters_the_flow_accepts(tiny_setup, tmp_path, monkeypatch):
    """`python -m flows.study --config F` (no --out): `out` became a plain string in the Run form, and the command
    passed None, which the flow's parameter validation refuses before any work."""
    import yaml

    import flows.study as study

    config = tmp_path / "study.yaml"
    config.write_text(yaml.safe_dump(epoch_study(tiny_setup, tmp_path / "w")))
    seen, real = {}, study.study_flow

    def accept(config, out, command):
        seen.update(real.validate_parameters({"config": config, "out": out, "command": command}))
        return {"verdicts": [], "report": "r.md"}

    monkeypatch.setattr(study, "study_flow", accept)
    monkeypatch.setattr(study, "verdict_lines", lambda verdicts: "")
    assert study.main(["--config", str(config)]) == 0
    assert seen["out"] == "" and seen["command"].startswith("python -m flows.study --config")
