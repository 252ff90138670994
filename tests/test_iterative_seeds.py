"""benchmarks/iterative_seeds.py: several seeds of the iterative flow side by side, from the flow's own
metrics.json and config.json; it refuses runs that differ in more than their seed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import load_benchmark



def _module():
    return load_benchmark("iterative_seeds")


def _run(path: Path, seed: int, posts: list[float], **config) -> Path:
    path.mkdir(parents=True)
    metrics = {"ppl_dense_wt": 30.0, **{f"R{i}_post_kd_wt": p for i, p in enumerate(posts, 1)},
               **{f"R{i}_pre_kd_wt": 2 * p for i, p in enumerate(posts, 1)}}
    (path / "metrics.json").write_text(json.dumps(metrics))
    (path / "config.json").write_text(json.dumps({"model": "m", "seed": seed, "workdir": f"w{seed}",
                                                      "eval_sets": [{"name": "wt", "data": "wikitext2:test"}],
                                                      **config}))
    return path


def test_seeds_side_by_side_with_mean_range_and_the_papers_ratio(tmp_path, capsys):
    module = _module()
    targets = [0.15, 0.22, 0.29, 0.35]
    a = _run(tmp_path / "a", 42, [60.0, 90.0, 100.0, 120.0], targets=targets)
    b = _run(tmp_path / "b", 43, [66.0, 96.0, 110.0, 126.0], targets=targets)
    assert module.main([str(a), str(b), "--set", "wt"]) == 0
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in capsys.readouterr().out.splitlines() if line.startswith("| R")}
    assert list(rows) == ["R1", "R2", "R3", "R4"]
    assert rows["R1"] == ["60.00", "66.00", "63.00", "60.00–66.00", f"{63 / 30:.2f}×", f"{21.06 / 35.87:.2f}×"]
    assert rows["R2"][-1] == "—" and rows["R4"][-1] == f"{24.92 / 35.87:.2f}×"
    # Round 4 at another sparsity than the paper's round 4: no paper ratio beside it.
    c = _run(tmp_path / "c", 42, [60.0, 90.0, 100.0, 120.0], targets=[0.15, 0.22, 0.29, 0.5])
    assert module.main([str(c), "--set", "wt"]) == 0
    last = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| R4")][0]
    assert last.split("|")[-2].strip() == "—"
    # Another eval set than WikiText-2: the paper's Table III is not beside it.
    d = _run(tmp_path / "d", 42, [60.0], targets=[0.15], eval_sets=[{"name": "wt", "data": "c4:heldout"}])
    assert module.main([str(d), "--set", "wt"]) == 0
    first = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| R1")][0]
    assert first.split("|")[-2].strip() == "—"


def test_runs_that_differ_in_more_than_the_seed_are_refused(tmp_path):
    module = _module()
    a = _run(tmp_path / "a", 42, [60.0], targets=[0.15])
    with pytest.raises(SystemExit, match="targets"):
        module.main([str(a), str(_run(tmp_path / "b", 43, [61.0], targets=[0.2])), "--set", "wt"])
    with pytest.raises(SystemExit, match="another seed"):
        module.main([str(a), str(_run(tmp_path / "c", 42, [61.0], targets=[0.15])), "--set", "wt"])
