"""The study (flows/study.py): its verdicts judge numbers both ways, and the flow runs end to end on a tiny model."""

from __future__ import annotations

import pytest

from flows.study import verdicts

pytestmark = pytest.mark.filterwarnings("ignore")


NAMES = {"kd": "dense+kd", "ce": "ce-only", "r1ce": "R1 ce-only"}


def _ppl(**rows):
    return {NAMES.get(k, k.replace("_", " ")): {"wt": v[0], "code": v[1]} for k, v in rows.items()}


def test_verdicts_say_holds_and_does_not_hold_from_the_numbers():
    good = _ppl(dense=(30, 20), kd=(29, 19), ce=(31, 21), R1_pre=(60, 40), R1_post=(31, 20.5),
                R2_pre=(90, 60), R2_post=(40, 25), r1ce=(33, 22))
    found = {v["criterion"]: v for v in verdicts(good, "wt", ["code"])}
    assert all(v["holds"] for v in found.values()), found
    assert found["Dense+KD better than dense (wt)"]["evidence"] == "Dense+KD 29.00 vs dense 30.00 (-3.3%)"
    # The same rows with the patterns broken: each criterion flips.
    bad = _ppl(dense=(30, 20), kd=(31, 19), ce=(30, 18), R1_pre=(60, 40), R1_post=(55, 39),
               R2_pre=(90, 60), R2_post=(50, 38), r1ce=(33, 22))
    found = verdicts(bad, "wt", ["code"], {"wt": [55, 56, 54]})

    def holds(start, end=""):
        (match,) = [v["holds"] for v in found if v["criterion"].startswith(start) and v["criterion"].endswith(end)]
        return match

    assert holds("post-KD ≪ post-prune") is False
    assert holds("low-sparsity post-KD comparable") is False
    assert holds("monotonic degradation with sparsity (wt") is False
    assert holds("Dense+KD better than dense (wt)") is False and holds("Dense+KD better than dense (code)") is True
    assert holds("KD beats CE-only, dense, relation to the corpus not stated (code)") is False


def test_kd_is_compared_with_ce_only_at_the_matched_seed_never_a_seed_mean():
    """CE-only ran at one seed: KD is judged at that seed (the first of ``seeds``); the other seeds are quoted beside,
    not averaged against it. Here the KD seed mean (31) beats CE-only (33) but the matched seed (34) does not."""
    rows = _ppl(dense=(30, 20), kd=(31, 19), ce=(30, 18), R1_pre=(60, 40), R1_post=(34, 20), r1ce=(33, 22))
    found = verdicts(rows, "wt", ["code"], {"wt": [34, 30, 29], "code": [20, 21, 22]},
                     relations={"wt": "out of corpus", "code": "held-out documents"})
    r1 = next(v for v in found if v["criterion"] == "KD beats CE-only, R1 pruned, out of corpus (wt)")
    assert r1["holds"] is False
    assert r1["evidence"] == ("KD 34.00 vs CE-only 33.00 at the same seed (+3.0%); KD at the other 2 seeds: 30.00, "
                              "29.00 (no CE-only twin at those seeds: not compared)")
    assert "mean" not in " ".join(v["evidence"] for v in found)
    code = next(v for v in found if v["criterion"] == "KD beats CE-only, R1 pruned, held-out documents (code)")
    assert code["holds"] is True


def test_wanda_rows_are_judged_on_the_papers_first_two_criteria():
    rows = _ppl(dense=(30, 20), kd=(29, 19), ce=(31, 21))
    good = {0.15: {"pre": {"wt": 40, "code": 30}, "post": {"wt": 31, "code": 21}},
            0.65: {"pre": {"wt": 900, "code": 500}, "post": {"wt": 90, "code": 60}}}
    found = {v["criterion"].split(" (")[0]: v for v in verdicts(rows, "wt", ["code"], wanda=good)}
    assert found["WANDA: post-KD ≪ post-prune"]["holds"] is True
    assert found["WANDA: post-KD ≪ post-prune"]["evidence"] == "15%: 40.00 → 31.00 (78%); 65%: 900.00 → 90.00 (10%)"
    low = found["WANDA: low-sparsity post-KD comparable to or better than dense"]
    assert low["holds"] is True and low["evidence"] == "WANDA 15% post-KD 31.00 vs dense 30.00 (1.03×)"
    bad = {0.15: {"pre": {"wt": 33, "code": 22}, "post": {"wt": 32, "code": 21}}}  # 97% of pre; 1.07× dense
    found = {v["criterion"].split(" (")[0]: v["holds"] for v in verdicts(rows, "wt", ["code"], wanda=bad)}
    assert found["WANDA: post-KD ≪ post-prune"] is False
    assert found["WANDA: low-sparsity post-KD comparable to or better than dense"] is False
    assert not any(c.startswith("WANDA") for c in (v["criterion"] for v in verdicts(rows, "wt", ["code"])))


def test_wanda_rows_are_read_from_the_paper_flows_metric_names():
    from flows.study import wanda_rows

    metrics = {"wanda.wanda0.15_pre_kd_c4_heldout": 3.0, "wanda.wanda0.15_post_kd_c4_heldout": 2.0,
               "wanda.wanda0.15_pre_kd_wt": 5.0, "wanda.wanda0.15_post_kd_wt": 4.0,
               "wanda.wanda0.15_pre_kd_mlp_zero_fraction": 0.15, "wanda.wanda0.35_pre_kd_wt": 9.0,
               "dense_kd.ppl_dense_wt": 1.0}
    assert wanda_rows(metrics, ["wt", "c4_heldout"]) == {
        0.15: {"pre": {"wt": 5.0, "c4_heldout": 3.0}, "post": {"wt": 4.0, "c4_heldout": 2.0}}}  # 0.35 incomplete


def test_a_published_study_is_judged_again_from_its_json(tmp_path):
    """--rejudge replaces the verdict lines and the eval-sets line of report.md from study.json, keeps everything
    else, says so once however often it runs, and marks WANDA unknown in a study.json that did not keep it."""
    import json

    from flows.study import main

    ppl = {**_ppl(dense=(30, 20), kd=(29, 19), ce=(31, 21), R1_pre=(60, 40), R1_post=(34, 20), r1ce=(33, 22)),
           "R1 post seed=43": {"wt": 30, "code": 21}}
    (tmp_path / "study.json").write_text(json.dumps({"ppl": ppl, "verdicts": [], "metrics": {}, "models": {}}))
    report = ("# Study\n\n- **Eval sets**: old words, in domain\n- **Code version**: x\n\n## Verdicts\n\n"
              "- KD beats CE-only, R1 pruned, in domain (wt): **holds** — KD 32 ± 2 (mean ± std of 2 seeds)\n\n\n"
              "Standard protocol, dense: PPL 25.00.\n\n## Every model\n\n| a |\n")
    (tmp_path / "report.md").write_text(report)
    config = tmp_path / "study.yaml"
    config.write_text("model: smollm2-135m\nstandard_protocol_set: wt\neval_sets:\n  - {name: wt, data: wikitext2:test}\n"
                      "  - {name: code, data: python:heldout}\n")
    args = ["--config", str(config), "--out", str(tmp_path), "--rejudge"]
    assert main(args) == 0
    first = (tmp_path / "report.md").read_text()
    assert main(args) == 0
    text = (tmp_path / "report.md").read_text()
    assert text.count("Judged again by") == 1 and text.replace(text.split("Judged again")[1].split("\n")[0], "") \
        == first.replace(first.split("Judged again")[1].split("\n")[0], "")
    assert "mean ± std" not in text and "in domain" not in text
    assert "- KD beats CE-only, R1 pruned, held-out documents (wt): **does not hold** — KD 34.00 vs CE-only 33.00 " \
           "at the same seed (+3.0%); KD at the other 1 seeds: 30.00" in text
    assert "`wt` held-out documents, `code` held-out documents" in text  # the config's corpus: mix:paper-offline
    assert "Standard protocol, dense: PPL 25.00.\n\n## Every model\n\n| a |\n" in text
    assert "- WANDA: low-sparsity post-KD comparable to or better than dense: not measured" in text
    saved = json.loads((tmp_path / "study.json").read_text())
    assert saved["judged"]["wanda"] is None and saved["verdicts"][-1]["holds"] is None
