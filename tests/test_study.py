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
    assert holds("KD beats CE-only, dense, out of domain") is False
    noisy = verdicts(bad, "wt", ["code"], {"wt": [55, 56, 54]})
    r1 = next(v for v in noisy if v["criterion"] == "KD beats CE-only, R1 pruned, in domain (wt)")
    assert r1["holds"] is False and r1["evidence"].startswith("KD 55.00 ± 1.00 (mean ± std of 3 seeds) vs CE-only 33.00")
    assert r1["evidence"].endswith("beyond 2 std")
