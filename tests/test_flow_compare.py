"""The compare flow: its config, the budget → method-size conversion, and one run on a tiny model and corpus."""

from __future__ import annotations

import re

import pytest
from pydantic import ValidationError

from conftest import make_flow_project

pytestmark = pytest.mark.filterwarnings("ignore")


# ---------------------------------------------------------------------------------------------------------------- config


def test_config_defaults_and_bad_budgets_and_methods():
    from flows.configs import CompareConfig

    cfg = CompareConfig()
    assert cfg.budgets == [0.1, 0.2] and cfg.methods == ["svd", "width", "depth", "wanda", "wanda-2:4"]
    assert cfg.profile_settings.batch_sizes == [1, 16]
    for budgets in ([], [0.0], [1.0], [0.1, 0.1], [-0.2]):
        with pytest.raises(ValidationError, match="budgets"):
            CompareConfig(budgets=budgets)
    for methods in ([], ["svd", "svd"], ["lora"]):
        with pytest.raises(ValidationError, match="methods"):
            CompareConfig(methods=methods)
    with pytest.raises(ValidationError, match="at least one kind=perplexity set"):
        CompareConfig(eval_sets=[{"name": "gsm8k", "data": "gsm8k:test", "kind": "gsm8k"}])
    with pytest.raises(ValidationError, match="prune"):  # the flow sets each method and its size
        CompareConfig(prune={"method": "svd"})


# ---------------------------------------------------------------------------------------------------------------- sizes


def test_total_budget_to_mlp_target_and_block_count_on_a_tiny_model():
    from conftest import make_model
    from sparsekd_core import report as rep
    from sparsekd_core.prune import count_params

    model = make_model("llama", 300)
    counts = count_params(model)
    # An independent count: MLP = gate/up/down of every block; one block = everything under layers.0.
    mlp = sum(p.numel() for n, p in model.named_parameters() if ".mlp." in n)
    block = sum(p.numel() for n, p in model.named_parameters() if ".layers.0." in n)
    total = sum(p.numel() for p in model.parameters())
    assert (counts["mlp"], counts["total"]) == (mlp, total)

    target = rep.mlp_target_for_budget(0.1, counts["total"], counts["mlp"])
    assert target * mlp == pytest.approx(0.1 * total)  # cutting this much of the MLP removes 10% of everything
    assert rep.blocks_for_budget(0.1, total, block, 2) == 1  # at least one block, at least one kept
    assert rep.blocks_for_budget(0.9, total, block, 2) == 1
    assert rep.blocks_for_budget(0.1, 30 * 10 + 50, 10, 30) == 4  # 35 parameters nearest 4 blocks of 10
    assert rep.achieved_total_reduction({"total_params": 90, "total_nonzero": 90, "counted": "parameters"}, 100) \
        == pytest.approx(0.1)
    assert rep.achieved_total_reduction({"total_params": 100, "total_nonzero": 80, "counted": "nonzero entries"},
                                        100) == pytest.approx(0.2)


# ---------------------------------------------------------------------------------------------------------------- the flow


@pytest.fixture(scope="module")
def prefect_server():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


def compare_values(root, workdir, **extra):
    """test_flows' tiny settings, with two distill steps and tiny calibration and profile cells."""
    from test_flows import PRUNE, flow_values

    return flow_values(root, workdir, distill={**flow_values(root, workdir)["distill"], "max_steps": 2},
                       prune=PRUNE, profile_settings={"batch_sizes": [1, 2], "seq_len": [8], "new_tokens": 2,
                                                      "warmup": 0, "repeats": 1}, **extra)


def _number(cell: str) -> float:
    return float(cell.replace(",", "").rstrip("%"))


def test_compare_flow_table_lines_and_reuse(prefect_server, tmp_path):
    from flows.configs import CompareConfig
    from flows.registry import ALL_FLOWS

    root = make_flow_project(tmp_path / "project")
    methods = ["svd", "width", "depth", "wanda-2:4"]
    values = compare_values(root, tmp_path / "w", budgets=[0.1], methods=methods)
    first = ALL_FLOWS["compare"](CompareConfig(**values))
    report = open(first["report"]).read()
    assert "compare_pareto.png" in report

    # One row per method (plus dense) in the budget's table; pre-KD, KD and CE-only perplexities; achieved sizes.
    section = report.split("### Budget: 10.00% of all parameters")[1].split("\n## ")[0]
    body = section.strip().splitlines()
    lines = [line for line in body[:next(i for i, line in enumerate(body) if not line.startswith("|"))]
             if not line.startswith("|---")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = {cells[0]: dict(zip(header, cells)) for cells in
            ([c.strip() for c in line.strip("|").split("|")] for line in lines[1:])}
    assert set(rows) == {"dense", *methods}, section
    for m in methods:
        for column in ("pre-KD text", "KD text", "CE-only text"):
            assert _number(rows[m][column]) > 1, (m, column)
        assert _number(rows[m]["total removed"]) > 0
        assert first["metrics"][f"b10_{m.replace('-', '_').replace(':', '_')}_total_reduction"] > 0
    assert 8 < _number(rows["svd"]["total removed"]) < 12  # 10% of the total, within the solver's tolerance
    assert "50% of MLP weights zero" in rows["wanda-2:4"]["size"]
    assert "does not shrink" in rows["wanda-2:4"]["note"] and "not accelerated" in rows["wanda-2:4"]["note"]
    assert "1 of 2 blocks" in rows["depth"]["size"]

    # The computed lines name the best (lowest KD PPL) and the fastest (highest decode tok/s at batch 1) rows.
    best = min(methods, key=lambda m: _number(rows[m]["KD text"]))
    fastest = max(methods, key=lambda m: _number(rows[m]["decode tok/s b1"]))
    best_line = re.search(r"\*\*Best after recovery \(10.00% budget\):\*\* (\S+): KD PPL text ([\d.,]+)", section)
    fast_line = re.search(r"\*\*Fastest \(10.00% budget\):\*\* (\S+): decode ([\d.,]+) tok/s", section)
    assert best_line.group(1) == best and best_line.group(2) == rows[best]["KD text"]
    assert fast_line.group(1) == fastest and _number(fast_line.group(2)) == pytest.approx(
        _number(rows[fastest]["decode tok/s b1"]), rel=0.01)

    # A second run reuses every stage: the prune stages (and everything after them) come from the store.
    second = ALL_FLOWS["compare"](CompareConfig(**values))
    prunes = [s for s in second["stages"] if s["stage"] == "prune"]
    assert prunes and all(s["cached"] for s in prunes)
    assert all(s["cached"] for s in second["stages"]), [s for s in second["stages"] if not s["cached"]]
