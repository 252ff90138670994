"""The experiment flows on a tiny model and corpus, under one session-wide Prefect test server."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from conftest import make_flow_project
from sparsekd.cli import main

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="session")
def prefect_server():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


@pytest.fixture(scope="session")
def tiny_setup(tmp_path_factory):
    return make_flow_project(tmp_path_factory.mktemp("flows"))


def flow_values(root, workdir, **extra):
    values = {
        "model": str(root / "model"),
        "workdir": str(workdir),
        "corpus": {"data": str(root / "corpus.jsonl"), "num_samples": 8, "seq_len": 32, "top_k": 8},
        "distill": {"max_steps": 4, "batch_size": 2, "eval_every": 2, "checkpoint_every": 2, "lr": 1e-3,
                    "val_tokens": 256, "val_ctx": 64, "val_data": str(root / "valid.txt")},
        "eval": {"ctx": 32, "stride": 16},
        "eval_sets": [{"name": "text", "data": str(root / "eval.txt"), "max_tokens": 200}],
    }
    values.update(extra)
    return values


PRUNE = {"calibration_samples": 2, "calibration_seq_len": 32}


def run_flow(name, values):
    from flows.configs import FLOW_CONFIGS
    from flows.registry import ALL_FLOWS

    return ALL_FLOWS[name](FLOW_CONFIGS[name](**values))


def mlflow_runs(summary):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(summary["tracking_uri"])
    parent = client.get_run(summary["mlflow_run_id"])
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    return client, parent, children


def test_cascade_completes_tracks_and_reuses_cache(prefect_server, tiny_setup, tmp_path):
    values = flow_values(tiny_setup, tmp_path / "w", target=0.3, prune=PRUNE)
    first = run_flow("cascade", values)
    labels = [s["label"] for s in first["stages"]]
    assert "distill dense+kd" in labels and "distill ce-only" in labels and "distill pruned+kd" in labels
    assert "distill pruned+kd teacher dense" in labels and not any(s["cached"] for s in first["stages"])
    for key in ("ppl_dense_text", "ppl_dense_kd_text", "ppl_ce_only_text", "ppl_pruned_pre_kd_text",
                "ppl_pruned_kd_text", "ppl_pruned_kd_teacher_dense_text"):
        assert first["metrics"][key] > 1
    report = open(first["report"]).read()
    assert "Teacher swap" in report and "CE-only" in report and "recovery.png" in report
    assert "disjoint from the KD corpus: 15 of their documents checked against 60 corpus documents" in report

    client, parent, children = mlflow_runs(first)
    assert parent.data.metrics["ppl_pruned_kd_text"] == pytest.approx(first["metrics"]["ppl_pruned_kd_text"])
    assert parent.data.params["corpus.num_samples"] == "8"
    assert parent.data.tags["flow"] == "cascade" and parent.data.tags.get("prefect_flow_run_id")
    # The experiment opens on MLflow's training view and says what ran in it last (flow, model, config digest).
    from flows.configs import CascadeConfig
    from flows.context import config_digest

    experiment = client.get_experiment(parent.info.experiment_id).tags
    digest = config_digest(CascadeConfig(**values))
    assert experiment["mlflow.experimentKind"] == "custom_model_development"
    assert (experiment["sparsekd.flow"], experiment["sparsekd.model"], experiment["sparsekd.config_digest"]) == \
        ("cascade", values["model"], digest) and parent.data.tags["sparsekd.config_digest"] == digest
    arms = {r.data.tags["arm"]: r for r in children}
    assert {"dense", "dense+kd", "ce-only", "pruned", "pruned+kd (teacher dense+kd)", "pruned+kd (teacher dense)"} <= set(arms)
    assert "ppl_text" in arms["dense+kd"].data.metrics and "kd_loss_first" in arms["dense+kd"].data.metrics
    assert "mlp_reduction" in arms["pruned"].data.metrics
    assert len(client.get_metric_history(arms["dense+kd"].info.run_id, "val_ppl")) >= 2
    artifacts = [a.path for a in client.list_artifacts(parent.info.run_id, "report")]
    assert "report/report.md" in artifacts

    # The students are in the Model Registry with their lineage; the report links them.
    names = {r["name"] for r in first["registered"]}
    assert names == {"sparsekd-cascade-dense-kd", "sparsekd-cascade-pruned-kd", "sparsekd-cascade-pruned-kd-teacher-dense"}
    version = client.get_model_version("sparsekd-cascade-pruned-kd", "1")
    tags = version.tags
    assert tags["sparsekd.teacher_cache_key"] and tags["sparsekd.pruning_method"] == "svd-whitened"
    assert float(tags["sparsekd.mlp_reduction"]) == pytest.approx(0.3, abs=0.01)
    assert tags["sparsekd.checkpoint_path"].endswith("/student") and tags["sparsekd.weights_uploaded"] == "False"
    assert float(tags["sparsekd.eval.text"]) == pytest.approx(first["metrics"]["ppl_pruned_kd_text"])
    assert json.loads(tags["sparsekd.training_config"])["max_steps"] == 4
    assert version.source.endswith("/model") and "## Registered models" in report
    pruned_arm = arms["pruned+kd (teacher dense+kd)"]
    model_files = {a.path for a in client.list_artifacts(pruned_arm.info.run_id, "model")}
    assert {"model/MLmodel", "model/sparsekd_checkpoint.json"} <= model_files  # a pyfunc model with its lineage
    assert "model/artifacts" not in model_files  # and no weights (log_models: false)

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as prefect_client:  # the flow run shows the report as a Markdown artifact
        artifacts = prefect_client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=["cascade-report"])))
    assert artifacts and artifacts[0].type == "markdown" and "## Registered models" in artifacts[0].data

    second = run_flow("cascade", values)  # nothing is recomputed
    assert all(s["cached"] for s in second["stages"]), [s for s in second["stages"] if not s["cached"]]
    assert second["metrics"] == first["metrics"]


def test_killed_flow_resumes_with_the_same_metrics(prefect_server, tiny_setup, tmp_path, monkeypatch):
    import sparsekd_core.prune as prune_pkg

    values = flow_values(tiny_setup, tmp_path / "a", prune=PRUNE, targets=[0.2, 0.4])
    reference = run_flow("iterative", values)

    crash_values = {**values, "workdir": str(tmp_path / "b")}
    real = prune_pkg.prune_model
    calls = {"n": 0}

    def crash_in_round_2(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("simulated crash in round 2")
        return real(*args, **kwargs)

    monkeypatch.setattr(prune_pkg, "prune_model", crash_in_round_2)
    with pytest.raises(Exception, match="simulated crash"):
        run_flow("iterative", crash_values)
    monkeypatch.setattr(prune_pkg, "prune_model", real)
    resumed = run_flow("iterative", crash_values)
    cached = {s["label"]: s["cached"] for s in resumed["stages"]}
    assert cached["prune R1"] and cached["distill R1"] and not cached["prune R2"]
    for key, value in reference["metrics"].items():
        assert resumed["metrics"][key] == pytest.approx(value, rel=1e-5), key
    report = open(resumed["report"]).read()
    assert "R2" in report and "ppl_vs_reduction_text.png" in report
    # Each round's row says which checkpoint its distill run kept (read from the run's own result, resumed or not).
    rows = [line for line in report.split("## Iterative pruning")[1].splitlines() if line.startswith("| R")][:2]
    assert len(rows) == 2 and all(re.search(r"\| \d+/\d+ \(val \d+\.\d → \d+\.\d\) \|", r) for r in rows), rows


def test_iterative_ce_twins_train_beside_each_round_and_leave_the_kd_chain_alone(prefect_server, tiny_setup, tmp_path):
    values = flow_values(tiny_setup, tmp_path / "plain", prune=PRUNE, targets=[0.2, 0.4])
    plain = run_flow("iterative", values)
    twinned = run_flow("iterative", {**values, "workdir": str(tmp_path / "twins"), "ce_control": True})
    labels = [s["label"] for s in twinned["stages"]]
    assert "distill R1 CE-only" in labels and "distill R2 CE-only" in labels
    assert "distill R1 CE-only" not in [s["label"] for s in plain["stages"]]
    m = twinned["metrics"]
    # The KD chain is the plain flow's: round 2 prunes round 1's KD model, not its twin.
    for key in ("R1_post_kd_text", "R2_pre_kd_text", "R2_post_kd_text"):
        assert m[key] == pytest.approx(plain["metrics"][key], rel=1e-6), key
    for r in (1, 2):
        # The twin really trained to another model; the difference is KD's PPL minus the twin's, on the same windows.
        assert m[f"R{r}_ce_only_text"] > 1 and m[f"R{r}_ce_only_text"] != m[f"R{r}_post_kd_text"]
        assert m[f"R{r}_kd_minus_ce_text"] == pytest.approx(m[f"R{r}_post_kd_text"] - m[f"R{r}_ce_only_text"],
                                                           rel=1e-6, abs=1e-9)
    report = open(twinned["report"]).read()
    section = report.split("### KD against its CE-only twin, per round")[1]
    rows = [line for line in section.splitlines() if line.startswith("| R")]
    assert [r.split("|")[1].strip() for r in rows] == ["R1", "R2"]
    assert re.search(r"\[[+−-]?\d+\.\d\d, [+−-]?\d+\.\d\d\]", rows[0]) and "- text: KD lower than" in section
    assert "KD against its CE-only twin" not in open(plain["report"]).read()
    _, _, children = mlflow_runs(twinned)
    twin_runs = {r.data.tags["arm"]: r for r in children if r.data.tags.get("arm", "").endswith("ce-only")}
    assert set(twin_runs) == {"round-1-ce-only", "round-2-ce-only"}
    assert twin_runs["round-1-ce-only"].data.metrics["post_ce_ppl_text"] == pytest.approx(m["R1_ce_only_text"])


def test_wanda_and_multi_seed(prefect_server, tiny_setup, tmp_path):
    w = run_flow("wanda", flow_values(tiny_setup, tmp_path / "w", sparsities=[0.5], prune=PRUNE, log_models=True))
    assert w["metrics"]["wanda0.5_post_kd_text"] > 1 and "Table V" in open(w["report"]).read()
    # The sparsity of the models that were evaluated, counted after KD: the mask held through distillation.
    assert w["metrics"]["wanda0.5_pre_kd_mlp_zero_fraction"] == 0.5
    assert w["metrics"]["wanda0.5_post_kd_mlp_zero_fraction"] == 0.5
    assert "| 50% | 50.00% | 50.00% |" in open(w["report"]).read()
    distilled = next(s for s in w["stages"] if s["label"] == "distill wanda 0.5")
    assert distilled["stage"] == "distill"
    client, _, children = mlflow_runs(w)
    arm = next(r for r in children if r.data.tags["arm"] == "wanda-0.5")
    assert any(a.path == "model/config.json" for a in client.list_artifacts(arm.info.run_id, "model"))
    m = run_flow("multi-seed", {"flow": "dense-kd", "seeds": [1, 2],
                                "config": flow_values(tiny_setup, tmp_path / "m")})
    assert "ppl_dense_kd_text_mean" in m["metrics"] and m["metrics"]["ppl_dense_text_std"] == 0.0
    _, _, children = mlflow_runs(m)
    assert len(children) == 2  # one nested flow run per seed


def test_bad_flow_config_fails_before_any_work(tiny_setup, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"model: {tiny_setup / 'model'}\nworkdir: {tmp_path / 'never'}\ndistill: {{lr: -1}}\ntargets: [0.5, 0.2]\n")
    capsys.readouterr()
    assert main(["run", "iterative", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "distill.lr=-1" in err and "targets" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "never").exists()
    assert main(["run", "no-such-flow"]) == 2


def test_storage_root_defaults_to_env_and_takes_object_store_urls(monkeypatch, tiny_setup):
    from flows.configs import CascadeConfig

    monkeypatch.setenv("SPARSEKD_STORAGE_ROOT", "/mnt/shared/sparsekd")
    assert CascadeConfig(model=str(tiny_setup / "model")).workdir == "/mnt/shared/sparsekd"
    assert CascadeConfig(model=str(tiny_setup / "model"), workdir="file:///x/y").workdir == "/x/y"
    monkeypatch.delenv("SPARSEKD_STORAGE_ROOT")
    assert CascadeConfig(model=str(tiny_setup / "model")).workdir == "runs"
    assert CascadeConfig(model=str(tiny_setup / "model"), workdir="s3://bucket/sparsekd/").workdir == \
        "s3://bucket/sparsekd"
    with pytest.raises(ValueError, match="must not carry credentials"):
        CascadeConfig(model=str(tiny_setup / "model"), workdir="s3://AKIA:secret@bucket/sparsekd")


def test_multi_seed_fan_out_needs_the_deployment(prefect_server, tiny_setup, tmp_path):
    """Under a server without deployments (here the test harness), the fan-out fails before any work."""
    values = {"flow": "dense-kd", "seeds": [1, 2], "fan_out": "deployments",
              "config": flow_values(tiny_setup, tmp_path / "w", ce_control=False)}
    with pytest.raises(ValueError, match="needs the deployment 'dense-kd/dense-kd-gpu'"):
        run_flow("multi-seed", values)
    assert not (tmp_path / "w").exists()


def test_a_failing_flow_marks_its_mlflow_runs_failed(prefect_server, tiny_setup, tmp_path, monkeypatch):
    import sparsekd_core.distill as distill_mod

    def boom(*args, **kwargs):
        raise RuntimeError("simulated failure in distill")

    monkeypatch.setattr(distill_mod, "distill", boom)
    values = flow_values(tiny_setup, tmp_path / "w", ce_control=False)
    with pytest.raises(Exception, match="simulated failure"):
        run_flow("dense-kd", values)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'w' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("sparsekd-dense-kd").experiment_id])
    status = {r.data.tags.get("arm", "parent"): r.info.status for r in runs}
    assert status == {"parent": "FAILED", "dense": "FINISHED", "dense+kd": "FAILED"}
    reasons = {r.data.tags.get("arm", "parent"): r.data.tags.get("sparsekd.error") for r in runs}
    assert reasons["dense"] is None  # it finished
    assert all("RuntimeError: simulated failure in distill" in reasons[k] for k in ("parent", "dense+kd"))


def test_eval_sets_overlapping_the_corpus_fail_before_any_work(tiny_setup, tmp_path):
    """An eval set that shares documents with the KD corpus is an error at the flow's start (nothing written);
    a held-out one is reported as checked."""
    from sparsekd_core.data import DataOverlapError

    leaky = tmp_path / "leaky.txt"
    corpus_docs = [json.loads(line)["text"] for line in (tiny_setup / "corpus.jsonl").read_text().splitlines()]
    leaky.write_text("\n\n".join(corpus_docs[:3]))
    values = flow_values(tiny_setup, tmp_path / "never", eval_sets=[{"name": "leaky", "data": str(leaky)}])
    from flows.configs import FLOW_CONFIGS
    from flows.experiments import check_held_out

    with pytest.raises(DataOverlapError, match=r"eval set 'leaky'.*shares 3 document\(s\) or paragraph"):
        check_held_out(FLOW_CONFIGS["dense-kd"](**values))
    checked = check_held_out(FLOW_CONFIGS["dense-kd"](**flow_values(tiny_setup, tmp_path / "never")))
    assert checked["shared"] == 0 and checked["eval_documents"] > 0 and checked["corpus_documents"] == 60
    assert main(["run", "dense-kd", "--config", str(_yaml(tmp_path, values))]) == 2
    assert not (tmp_path / "never").exists()


def _yaml(tmp_path, values):
    import yaml

    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


@pytest.mark.parametrize("sets, message", [
    ([{"name": "a b", "data": "wikitext2:test"}], "must be an identifier"),
    ([{"name": "../x", "data": "wikitext2:test"}], "must be an identifier"),
    ([{"name": "a", "data": "wikitext2:test"}, {"name": "a", "data": "c4:heldout"}], "unique; repeated: a"),
])
def test_eval_set_names_are_unique_identifiers(tiny_setup, sets, message):
    from flows.configs import DenseKDConfig

    with pytest.raises(ValueError, match=message):
        DenseKDConfig(model=str(tiny_setup / "model"), eval_sets=sets)


def test_paper_config_validates_every_part_before_any_work(tiny_setup, tmp_path, capsys):
    bad = tmp_path / "paper.yaml"
    bad.write_text(f"model: {tiny_setup / 'model'}\nworkdir: {tmp_path / 'never'}\nsparsities: [1.5]\n")
    assert main(["run", "paper", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "paper.wanda.sparsities" in err and "[1.5]: each must be in (0, 1)" in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "never").exists()


def test_source_names_print_as_typed_in_prefect_logs(tiny_tokenizer):
    """Prefect's console renders `:train:` as an emoji; the mixture log quotes source names so they stay as typed."""
    import io
    import logging

    from prefect.logging.handlers import PrefectConsoleHandler

    from sparsekd_core.config import MixtureComponent, MixtureConfig
    from sparsekd_core.data import build_mixture

    lines = []
    cfg = MixtureConfig(components=[MixtureComponent(source="c4:train", weight=1)], num_samples=2, seq_len=16)
    build_mixture(cfg, tiny_tokenizer, log=lines.append)
    stream = io.StringIO()
    handler = PrefectConsoleHandler(stream=stream)
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler.emit(logging.LogRecord("x", logging.INFO, __file__, 1, lines[0], None, None))
    assert "'c4:train' gives 2 sequences" in stream.getvalue()


def test_a_gsm8k_eval_set_beside_the_perplexity_sets(prefect_server, tiny_setup, tmp_path):
    from sparsekd_core.data import gsm8k_records

    problems = tmp_path / "gsm.jsonl"
    problems.write_text("".join(json.dumps(r) + "\n" for r in gsm8k_records("gsm8k:test")[:3]))
    values = flow_values(tiny_setup, tmp_path / "w", ce_control=False)
    values["eval_sets"] = values["eval_sets"] + [{"name": "gsm", "data": str(problems), "kind": "gsm8k",
                                                  "max_problems": 2, "max_new_tokens": 4}]
    summary = run_flow("dense-kd", values)
    assert {"acc_dense_gsm", "acc_dense_kd_gsm", "ref_loglik_dense_gsm"} <= set(summary["metrics"])
    assert summary["metrics"]["ppl_dense_text"] > 1 and not any("ppl" in k and "gsm" in k for k in summary["metrics"])
    report = open(summary["report"]).read()
    assert "## Downstream accuracy (GSM8K)" in report and "| dense+kd | gsm |" in report
    assert "GSM8K accuracy, first 2 problems" in report
    with pytest.raises(ValueError, match="max_tokens applies to kind=perplexity"):
        from flows.configs import EvalSet

        EvalSet(name="g", data="gsm8k:test", kind="gsm8k", max_tokens=10)


def test_selfdata_flow_compares_three_recoveries(prefect_server, tiny_setup, tmp_path):
    def problems(path, start, n):  # short GSM8K-style records: the tiny model has 256 positions
        path.write_text("".join(json.dumps({"question": f"What is {i} plus {i + 1}?",
                                            "answer": f"{i} + {i + 1} = {2 * i + 1}\n#### {2 * i + 1}"}) + "\n"
                                for i in range(start, start + n)))
        return path

    train, test = problems(tmp_path / "train.jsonl", 0, 6), problems(tmp_path / "test.jsonl", 100, 2)
    values = flow_values(tiny_setup, tmp_path / "w", instructions=str(train), num_samples=4, drop_blocks=1,
                         prune={"calibration": str(tiny_setup / "eval.txt"), **PRUNE},
                         selfdata={"max_new_tokens": 8, "batch_size": 2, "chunk_size": 2, "filter_answers": False},
                         sft={"max_len": 96})
    values["distill"] = {**values["distill"], "max_steps": 2, "epochs": 10}
    values["eval_sets"] = values["eval_sets"] + [{"name": "gsm", "data": str(test), "kind": "gsm8k",
                                                  "max_problems": 2, "max_new_tokens": 4}]
    summary = run_flow("selfdata", values)
    labels = [s["label"] for s in summary["stages"]]
    assert {"sft original", "sft self-data", "distill logit kd", "selfdata", "instructions"} <= set(labels)
    for key in ("ppl_dense_text", "ppl_pruned_text", "ppl_sft_original_text", "ppl_sft_self_data_text",
                "ppl_logit_kd_text", "acc_logit_kd_gsm"):
        assert key in summary["metrics"], key
    assert summary["metrics"]["selfdata_kept"] == 4
    report = open(summary["report"]).read()
    assert "SFT vs self-data SFT vs logit KD" in report and "depth −1 blocks" in report and "retention" in report
    again = run_flow("selfdata", values)
    assert all(s["cached"] for s in again["stages"])


TINY_PROFILE = {"batch_sizes": [1], "seq_len": [8], "new_tokens": 2, "warmup": 0, "repeats": 1}


def test_iterative_with_profiling_reports_the_speedup_table_and_plot(prefect_server, tiny_setup, tmp_path):
    values = flow_values(tiny_setup, tmp_path / "w", prune=PRUNE, targets=[0.3], profile=True,
                         profile_settings=TINY_PROFILE)
    summary = run_flow("iterative", values)
    report = open(summary["report"]).read()
    assert "## Inference profile (Tables VII-VIII): dense vs each round" in report
    assert "| dense | 1 | 8 |" in report and "| R1 | 1 | 8 |" in report
    assert "speedup_vs_reduction.png" in report and (Path(summary["report"]).parent / "speedup_vs_reduction.png").is_file()
    assert "R1_b1_s8_prefill_speedup" in summary["metrics"]
    client, parent, children = mlflow_runs(summary)
    arm = next(r for r in children if r.data.tags["arm"] == "profile")
    assert {a.path for a in client.list_artifacts(arm.info.run_id)} >= {"profile.md", "speedup.png"}


def test_profile_flow_puts_models_side_by_side(prefect_server, tiny_setup, tmp_path):
    values = {"model": str(tiny_setup / "model"), "workdir": str(tmp_path / "w"), "compare": [str(tiny_setup / "model")],
              "profile": TINY_PROFILE}
    summary = run_flow("profile", values)
    report = open(summary["report"]).read()
    assert report.startswith("# profile:") and report.count("| 1 | 8 |") == 2
    assert summary["metrics"]["m0_b1_s8_speedup"] == 1.0 and "m1_b1_s8_speedup" in summary["metrics"]


def test_sharded_cache_fan_out_gives_the_one_process_store(prefect_server, tiny_setup, tmp_path, capsys):
    """`corpus.shards: 2`: two shard task runs write disjoint chunk ranges of the stage's store, the cache stage
    then only checks and records it, and the store equals `sparsekd cache` in one process, byte for byte."""
    from test_cache import same_arrays

    corpus = {"data": str(tiny_setup / "corpus.jsonl"), "num_samples": 40, "seq_len": 32, "top_k": 8}
    summary = run_flow("dense-kd", flow_values(tiny_setup, tmp_path / "w", corpus={**corpus, "shards": 2}))
    cache_dir = next(Path(p) for p in (tmp_path / "w" / "cache").iterdir() if p.is_dir())
    manifest = json.loads((cache_dir / "manifest.json").read_text())
    assert manifest["config"]["cache"].get("shards") is None  # how it was written is not part of the key
    assert (manifest["result"]["computed_chunks"], manifest["result"]["resumed_chunks"]) == (0, 3)
    assert [s["cached"] for s in summary["stages"] if s["stage"] == "cache"] == [False]
    one = tmp_path / "one.zarr"
    assert main(["cache", "--model", str(tiny_setup / "model"), "--data", corpus["data"], "--num-samples", "40",
                 "--seq-len", "32", "--top-k", "8", "--out", str(one), "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["computed_chunks"] == 3
    same_arrays(cache_dir / "teacher.zarr", one)


def test_study_flow_end_to_end(tiny_setup, prefect_server, tmp_path, capsys):
    """flows/study.py: the paper flow, the arms it lacks (reusing the paper flow's stages), the self-judging report."""
    from flows.study import StudyConfig, study_flow

    values = flow_values(tiny_setup, tmp_path / "w", targets=[0.2, 0.4], sparsities=[0.5], seeds=[43], lr_probe=[2e-3],
                         prune=PRUNE, tails=["topk", "bucket"], standard_protocol_set="text")
    values["eval_sets"].append({"name": "more", "data": str(tiny_setup / "eval.txt"), "max_tokens": 100})
    out = tmp_path / "docs"
    result = study_flow(StudyConfig(**values), out=str(out))
    text = (out / "report.md").read_text()
    assert "## Verdicts" in text and "post-KD ≪ post-prune" in text and "KD beats CE-only, R1 pruned" in text
    assert "Standard protocol, dense" in text and "## Seeds: R1 Pruned+KD, seeds 42, 43" in text
    assert (out / "paper-report.md").exists() and (out / "study.json").exists()
    summary = json.loads((out / "study.json").read_text())
    assert {"dense+kd tail=bucket", "R1 ce-only", "oneshot ce-only", "R2 post, dense teacher",
            "R1 post seed=43", "R1 post lr=0.002"} <= set(summary["models"])
    # The paper flow's WANDA arm is judged on the paper's criteria; what --rejudge reads is kept.
    assert "- WANDA: low-sparsity post-KD comparable to or better than dense (50% post-KD" in text
    assert set(summary["judged"]["wanda"]) == {"0.5"} and summary["judged"]["relations"]["text"] == \
        "relation not known"  # local files: only named sources are known
    assert summary["judged"]["seeds"]["text"] == [summary["ppl"]["R1 post"]["text"],
                                                  summary["ppl"]["R1 post seed=43"]["text"]]
    # The paper flow's models are reached again through their keys, not retrained.
    stages = {s["label"]: s["cached"] for s in result["stages"]}
    assert stages["distill dense+kd"] and stages["distill R1"] and stages["distill R2"]
    assert not stages["distill R1 ce-only"] and not stages["distill dense+kd tail=bucket"]
    # `sparsekd run study` (the registry the CLI and the deployments use) reaches the same flow: all reused.
    capsys.readouterr()
    assert main(["run", "study", "--config", str(_yaml(tmp_path, values)), "--json"]) == 0
    rerun = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rerun["stages"] and all(s["cached"] for s in rerun["stages"]) and rerun["ppl"] == result["ppl"]


def test_a_prose_edit_reuses_a_run_and_a_kd_loss_edit_recomputes_only_training(prefect_server, tiny_setup, tmp_path,
                                                                                 monkeypatch):
    """The stage identity in a whole flow: a comment in profile.py or kd_loss.py's docstring reuses every stage;
    a change to kd_loss.py's code recomputes the trained students and their evals, never the teacher cache, the
    dense eval (sparsekd_core/identity.py)."""
    from sparsekd_core import identity

    values = flow_values(tiny_setup, tmp_path / "w")
    first = run_flow("dense-kd", values)
    real = identity.module_source
    edits = {"sparsekd_core.profile": lambda t: "# a comment\n" + t,
             "sparsekd_core.kd_loss": lambda t: t.replace('"""', '"""Prose.\n', 1)}
    monkeypatch.setattr(identity, "module_source", lambda name: edits.get(name, lambda t: t)(real(name)))
    identity.forget_code()
    again = run_flow("dense-kd", values)
    assert all(s["cached"] for s in again["stages"]) and again["metrics"] == first["metrics"]

    edits["sparsekd_core.kd_loss"] = lambda t: t + "\nEDITED = 1\n"
    identity.forget_code()
    changed = run_flow("dense-kd", values)
    recomputed = {s["stage"] for s in changed["stages"] if not s["cached"]}
    kept = {s["stage"] for s in changed["stages"] if s["cached"]}
    assert "distill" in recomputed and {"cache", "eval"} <= kept
    assert all(s["stage"] in ("distill", "eval") for s in changed["stages"] if not s["cached"])
    monkeypatch.setattr(identity, "module_source", real)
    identity.forget_code()


def test_a_flow_writes_and_trains_from_a_sampled_class_cache(prefect_server, tiny_setup, tmp_path):
    """corpus.teacher_sample + distill.tail=sampled (the form offers `sampled`, so the flows must run it): the
    flow writes a format-3 cache of N sampled classes per position and both arms train from it; the KD arm's
    weights moved, and differ from the CE-only twin's (the sampled KD term did something)."""
    import torch
    from safetensors.torch import load_file

    from sparsekd_core.cache import TeacherCache

    values = flow_values(tiny_setup, tmp_path / "w", ce_control=True)
    values["corpus"] = {**values["corpus"], "teacher_sample": 4}
    values["distill"] = {**values["distill"], "tail": "sampled"}
    summary = run_flow("dense-kd", values)
    caches = [json.loads(p.read_text()) for p in (tmp_path / "w").glob("cache/*/manifest.json")]
    assert len(caches) == 1
    cache = TeacherCache(caches[0]["result"]["path"] if "path" in caches[0]["result"] else
                         str(next((tmp_path / "w").glob("cache/*/cache.zarr"))))
    assert cache.kind == "sampled" and cache.teacher_sample == 4 and cache.format == 3
    trained = {json.loads(p.read_text())["config"]["distill"]["alpha"]: json.loads(p.read_text())
               for p in (tmp_path / "w").glob("distill/*/manifest.json")}
    assert set(trained) == {0.0, 0.5} and trained[0.5]["config"]["distill"]["tail"] == "sampled"
    dense = load_file(str(next(Path(tiny_setup / "model").glob("*.safetensors"))))
    kd = load_file(str(next(Path(trained[0.5]["result"]["student"]).glob("*.safetensors"))))
    ce = load_file(str(next(Path(trained[0.0]["result"]["student"]).glob("*.safetensors"))))
    name = next(n for n in kd if "mlp" in n and n in dense)
    assert not torch.equal(kd[name], dense[name]) and not torch.equal(kd[name], ce[name])
    assert summary["metrics"]["ppl_dense_kd_text"] > 1


def test_sampled_tail_and_sampled_corpus_go_together(tiny_setup, tmp_path):
    from flows.configs import DenseKDConfig

    values = flow_values(tiny_setup, tmp_path / "w")
    with pytest.raises(ValueError, match="tail=sampled and corpus.teacher_sample go together"):
        DenseKDConfig(**{**values, "distill": {**values["distill"], "tail": "sampled"}})
    with pytest.raises(ValueError, match="go together"):
        DenseKDConfig(**{**values, "corpus": {**values["corpus"], "teacher_sample": 4}})
    with pytest.raises(ValueError, match="sample_temperature"):
        DenseKDConfig(**{**values, "corpus": {**values["corpus"], "teacher_sample": 4, "sample_temperature": 1.0},
                         "distill": {**values["distill"], "tail": "sampled"}})
