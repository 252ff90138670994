"""The pruning pipeline: matrices found once per model state, counts checked by hand, each method's transform alone
gives what the pipeline gives, and the method registry is the one place a method is added."""

from __future__ import annotations

import sys
import typing

import pytest
import torch

from conftest import make_model
from sparsekd_core.config import ConfigError, PruneConfig
from sparsekd_core.prune import METHODS, Method, MethodResult, PruneInput, census, find_mlp_matrices, prune_model
from sparsekd_core.prune.calibration import calibration_ids, input_statistics
from sparsekd_core.prune.method import Calibration
from sparsekd_core.prune.report import LayerReport
from test_prune import one_thread  # noqa: F401  (autouse: tiny matrices run fastest on one thread)

CALIB_TEXT = ("The quick brown fox jumps over the lazy dog. Structured pruning removes directions; "
              "distillation restores the distribution. ") * 30

SETTINGS = {  # one config per method, small enough for the tiny 2-block model
    "svd": dict(target_reduction=0.3),
    "wanda": dict(method="wanda", target_reduction=0.5),
    "depth": dict(method="depth", drop_blocks=1),
    "width": dict(method="width", target_reduction=0.25),  # 16 of 64 neurons per block: exactly 0.25
}


@pytest.fixture
def calib(tmp_path):
    path = tmp_path / "calib.txt"
    path.write_text(CALIB_TEXT)
    return dict(calibration=str(path), calibration_samples=3, calibration_seq_len=16)


def quiet(_message: str) -> None:
    pass


def counted_by_hand(model) -> dict[str, int]:
    """The counts ``count_params`` must give, by parameter names alone (the tiny Llama's MLP lives under .mlp.)."""
    params = dict(model.named_parameters())  # tied weights once
    mlp = [p for name, p in params.items() if ".mlp." in name]
    return {"total": sum(p.numel() for p in params.values()), "mlp": sum(p.numel() for p in mlp),
            "total_nonzero": sum(int((p != 0).sum()) for p in params.values()),
            "mlp_nonzero": sum(int((p != 0).sum()) for p in mlp)}


@pytest.fixture
def finder_calls(monkeypatch):
    """Replace ``find_mlp_matrices`` wherever the prune package holds it; the list gets one entry per call."""
    calls: list[str] = []

    def counting(model):
        calls.append("find")
        return find_mlp_matrices(model)

    for name, module in list(sys.modules.items()):
        if name.startswith("sparsekd_core.prune") and hasattr(module, "find_mlp_matrices"):
            monkeypatch.setattr(module, "find_mlp_matrices", counting)
    return calls


@pytest.mark.parametrize("method", sorted(SETTINGS))
def test_matrices_are_found_once_before_and_once_after_the_transform(method, finder_calls, monkeypatch, calib,
                                                                     tiny_tokenizer):
    real = METHODS[method]

    def transform(job: PruneInput) -> MethodResult:
        finder_calls.append("transform")
        assert job.matrices == find_mlp_matrices(job.model)  # the pipeline's list is the model's, before the round
        return real.transform(job)

    monkeypatch.setitem(METHODS, method, Method(transform=transform, calibration=real.calibration))
    model = make_model("llama", len(tiny_tokenizer))
    prune_model(model, tiny_tokenizer, PruneConfig(**SETTINGS[method], **calib), log=quiet)
    assert finder_calls == ["find", "transform", "find"]


@pytest.mark.parametrize("method", sorted(SETTINGS))
def test_counts_before_and_after_equal_a_count_by_hand(method, calib, tiny_tokenizer):
    model = make_model("llama", len(tiny_tokenizer))
    before = counted_by_hand(model)
    report = prune_model(model, tiny_tokenizer, PruneConfig(**SETTINGS[method], **calib), log=quiet)
    assert report.counts_before == before
    assert report.counts_after == counted_by_hand(model)
    assert report.counts_after != before  # each method removed something
    assert report.mlp_params_dense == before["mlp"]
    record = model.config.sparsekd_compression
    assert record["round"] == 1 and len(record["history"]) == 1  # the round is recorded once


def job_for(model, tokenizer, cfg: PruneConfig) -> PruneInput:
    """A method's input built by hand, as a caller without the pipeline would."""
    matrices = find_mlp_matrices(model)
    need = METHODS[cfg.method].calibration(cfg)
    ids = stats = None
    if need is not None:
        ids = calibration_ids(tokenizer, cfg.calibration, cfg.calibration_samples, cfg.calibration_seq_len)
    if need in ("input_gram", "input_sq_norm"):
        stats, _ = input_statistics(model, matrices, ids, diagonal_only=need == "input_sq_norm")
    mlp = sum(p.numel() for m in matrices for p in m.module.parameters())
    return PruneInput(model=model, matrices=matrices, cfg=cfg, mlp_params_dense=mlp, calibration_ids=ids,
                      input_stats=stats, log=quiet)


@pytest.mark.parametrize("method,whiten", [("svd", True), ("svd", False), ("wanda", None), ("depth", None),
                                           ("width", None)])
def test_each_transform_alone_does_what_the_pipeline_does(method, whiten, calib, tiny_tokenizer):
    cfg = PruneConfig(**SETTINGS[method], **calib, **({} if whiten is None else {"whiten": whiten}))
    alone = make_model("llama", len(tiny_tokenizer))
    result = METHODS[method].transform(job_for(alone, tiny_tokenizer, cfg))
    assert isinstance(result, MethodResult) and all(isinstance(row, LayerReport) for row in result.layers)
    assert not hasattr(alone.config, "sparsekd_compression")  # recording is the pipeline's business

    piped = make_model("llama", len(tiny_tokenizer))
    report = prune_model(piped, tiny_tokenizer, cfg, log=quiet)
    assert (report.method, report.layers, report.settings) == (result.method, result.layers, result.settings)
    alone_state, piped_state = alone.state_dict(), piped.state_dict()
    assert alone_state.keys() == piped_state.keys()
    assert all(torch.equal(alone_state[k], piped_state[k]) for k in alone_state)


def test_the_registry_lists_every_method_the_config_accepts():
    accepted = typing.get_args(PruneConfig.model_fields["method"].annotation)
    assert set(METHODS) == set(accepted) == {"svd", "wanda", "depth", "width"}
    for name, method in METHODS.items():
        assert callable(method.transform), name
        cfg = PruneConfig(**SETTINGS[name], calibration="wikitext2:train")
        assert method.calibration(cfg) in (None, *typing.get_args(Calibration)), name


def test_a_registered_method_gets_the_pipeline_input_and_lands_in_report_and_record(monkeypatch, calib,
                                                                                   tiny_tokenizer):
    seen = {}

    def halve_down_projections(job: PruneInput) -> MethodResult:  # a stand-in for a future method
        seen.update(names=[m.name for m in job.matrices], stats=sorted(job.input_stats))
        rows = []
        for m in job.matrices:
            if m.proj == "down_proj":
                weight = m.module.weight
                with torch.no_grad():
                    weight[:, : weight.shape[1] // 2] = 0
                rows.append(LayerReport(m.name, m.layer, m.proj, m.shape, None, None, weight.numel(),
                                        int((weight != 0).sum()), 1.0))
        return MethodResult(method="halve-down", layers=rows, settings={"which": "down_proj"})

    monkeypatch.setitem(METHODS, "wanda", Method(transform=halve_down_projections,
                                                 calibration=lambda cfg: "input_sq_norm"))
    model = make_model("llama", len(tiny_tokenizer))
    report = prune_model(model, tiny_tokenizer, PruneConfig(**SETTINGS["wanda"], **calib), parent="p", log=quiet)
    names = [m.name for m in find_mlp_matrices(model)]
    assert seen == {"names": names, "stats": sorted(names)}
    down = sum(m.module.weight.numel() for m in find_mlp_matrices(model) if m.proj == "down_proj")
    assert report.counts_before["mlp_nonzero"] - report.counts_after["mlp_nonzero"] == down // 2
    assert report.summary()["which"] == "down_proj" and len(report.layers) == 2
    entry = model.config.sparsekd_compression["history"][-1]
    assert (entry["method"], entry["which"], entry["parent"]) == ("halve-down", "down_proj", "p")


def test_census_is_the_finder_and_the_counts_together(tiny_tokenizer):
    model = make_model("llama", len(tiny_tokenizer))
    taken = census(model)
    assert [m.name for m in taken.matrices] == [m.name for m in find_mlp_matrices(model)]
    assert taken.counts == counted_by_hand(model)


def test_a_method_missing_from_the_registry_is_a_config_error(tiny_tokenizer):
    cfg = PruneConfig.model_construct(**{**PruneConfig(target_reduction=0.3).model_dump(), "method": "lottery"})
    with pytest.raises(ConfigError, match="prune.method='lottery'.*allowed: svd, wanda, depth, width"):
        prune_model(make_model("llama", len(tiny_tokenizer)), tiny_tokenizer, cfg, log=quiet)
