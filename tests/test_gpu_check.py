"""benchmarks/gpu_check.py --dry-run: every section runs on CPU with tiny models and reports numbers (the script a
GPU worker runs must not first fail there)."""

from __future__ import annotations

import json
import math

from conftest import load_benchmark



def _numbers(value) -> list[float]:
    if isinstance(value, bool):
        return []
    if isinstance(value, (int, float)):
        return [float(value)]
    if isinstance(value, dict):
        return [x for v in value.values() for x in _numbers(v)]
    if isinstance(value, list):
        return [x for v in value for x in _numbers(v)]
    return []


def test_dry_run_writes_every_section_with_numbers(tmp_path):
    gpu_check = load_benchmark("gpu_check")
    assert gpu_check.main(["--dry-run", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    for name in gpu_check.SECTIONS:
        assert "error" not in report[name], report[name].get("error")
        assert [x for x in _numbers(report[name]) if math.isfinite(x)], name
    assert report["environment"]["torch"] and report["environment"]["gemm_tflops_measured"] > 0
    ev = report["eval"]
    assert ev["ppl_fp32"] > 1 and ev["ppl_bf16"] > 1 and ev["tokens_per_s_fp32_b16"] > 0
    assert abs(ev["ppl_fp32_b1"] - ev["ppl_fp32_b16"]) < 1e-6 * ev["ppl_fp32"]  # batching changes no score
    cache = report["cache"]
    assert cache["bytes_per_token"] > 0 and cache["teacher_precision"] == "fp32"
    assert cache["fidelity"]["tf32"]["logprob_abs_error_max"] == 0  # TF32 does not exist on a CPU
    assert cache["fidelity"]["bf16"]["logprob_abs_error_mean"] > 0
    distill = report["distill"]
    assert distill["kd_step_seconds"] > 0 and distill["ce_step_seconds"] > 0 and distill["kd_over_ce"] > 0
    cells = report["profile"]["cells"]
    assert {c["model"] for c in cells} == {"dense", "svd 35%", "svd 65%"} and len(cells) == 6
    assert abs(report["profile"]["mlp_reduction"]["svd 65%"] - 0.65) < 0.01
    assert all(c["amdahl_bound"] >= 1 and c["peak_mem_bytes"] > 0 for c in cells)
    sparse = report["sparse24"]  # sparsekd's 2:4 mask; a CPU has no semi-structured kernel: counted, not timed
    assert sparse["zero_fraction"] == 0.5 and sparse["groups_with_two_zeros"] == 1.0
    assert sparse["dense_ms_decode_b16"] > 0 and (sparse["accelerated"] or "not accelerated" in sparse["note"])
    hours = report["projection"]["models"]
    assert set(hours) == {"Qwen3-0.6B", "Phi-4-mini"}
    assert all(m["programme_gpu_hours"]["2_epoch"] > m["programme_gpu_hours"]["1_epoch"] > 0 for m in hours.values())
    assert "Dry run" in (tmp_path / "gpu_check.md").read_text()
