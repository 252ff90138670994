"""The second study: per-window NLL and KL in eval, the paired bootstrap (checked against SciPy's), verdicts that
pair seeds, the config's checks, and the flow end to end on a tiny model (twice: the second run reuses and joins)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from conftest import make_flow_project, make_model
from sparsekd_core.config import EvalConfig
from sparsekd_core.eval import make_windows, perplexity
from sparsekd_core.stats import bootstrap_ppl, paired_bootstrap, signed
from sparsekd_core.study_report import arm_label, budget_section, reach_statement, verdict_lines

pytestmark = pytest.mark.filterwarnings("ignore")


# ---------------------------------------------------------------------------------------------------------------- eval
@pytest.mark.parametrize("protocol,stride", [("paper", 8), ("standard", 8), ("standard", 16)])
def test_window_nll_and_kl_match_a_hand_computation(tiny_tokenizer, protocol, stride):
    student = make_model("llama", len(tiny_tokenizer), seed=1).eval()
    teacher = make_model("llama", len(tiny_tokenizer), seed=2).eval()
    ids = torch.randint(0, len(tiny_tokenizer), (53,), generator=torch.Generator().manual_seed(0))
    cfg = EvalConfig(ctx=16, stride=stride, protocol=protocol, batch_size=3)
    res = perplexity(student, ids, cfg, teacher=teacher)
    windows = make_windows(ids.numel(), 16, stride, protocol)
    assert len(res.window_nll) == len(res.window_tokens) == len(res.window_kl) == len(windows)
    with torch.no_grad():
        for w, nll, n, kl in zip(windows, res.window_nll, res.window_tokens, res.window_kl):
            x = ids[w.begin : w.end][None]
            s_logp = torch.log_softmax(student(x).logits[0].double(), -1)
            t_logp = torch.log_softmax(teacher(x).logits[0].double(), -1)
            rows = range(w.first_target - w.begin - 1, w.end - w.begin - 1)  # positions predicting scored targets
            assert n == len(rows)
            want_nll = -sum(s_logp[j, x[0, j + 1]].item() for j in rows)
            want_kl = sum(F.kl_div(s_logp[j], t_logp[j], log_target=True, reduction="sum").item() for j in rows)
            assert nll == pytest.approx(want_nll, rel=1e-5)
            assert kl == pytest.approx(want_kl, rel=1e-4, abs=1e-7) and kl > 0
    assert res.ppl == pytest.approx(math.exp(sum(res.window_nll) / sum(res.window_tokens)))
    assert res.kl == pytest.approx(sum(res.window_kl) / res.tokens)
    # The model against itself: no distance; and no teacher, no KL.
    assert perplexity(student, ids, cfg, teacher=student).kl == pytest.approx(0, abs=1e-6)
    plain = perplexity(student, ids, cfg)
    assert plain.window_kl is None and "kl" not in plain.as_dict() and plain.window_nll == res.window_nll


# ---------------------------------------------------------------------------------------------------------------- bootstrap
def _fake_windows(n=40, seed=0, shift=0.0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(20, 60, n)
    hard = rng.gamma(2.0, 1.0, n)  # windows differ in difficulty far more than the models do
    return tokens, hard


def test_paired_bootstrap_agrees_with_scipy_and_pairing_cancels_window_difficulty():
    from scipy.stats import bootstrap

    tokens, hard = _fake_windows()
    rng = np.random.default_rng(1)
    a = (2.0 + hard + rng.normal(0, 0.02, hard.size)) * tokens  # per-window NLL sums
    b = (2.0 + hard + 0.05 + rng.normal(0, 0.02, hard.size)) * tokens
    ours = paired_bootstrap(a.tolist(), b.tolist(), tokens.tolist(), n_boot=4000)

    def diff(x, y, t):
        return np.exp(x.sum() / t.sum()) - np.exp(y.sum() / t.sum())

    ref = bootstrap((a, b, tokens.astype(float)), diff, paired=True, vectorized=False, n_resamples=4000,
                    method="percentile", random_state=7).confidence_interval
    width = ref.high - ref.low
    assert ours["diff"].estimate == pytest.approx(diff(a, b, tokens))
    assert ours["diff"].low == pytest.approx(ref.low, abs=0.1 * width)
    assert ours["diff"].high == pytest.approx(ref.high, abs=0.1 * width)
    assert ours["diff"].high < 0  # a is better on every window by a little: pairing resolves it
    # Unpaired (each model's own interval) the same difference is lost in the windows' spread.
    ia, ib = bootstrap_ppl(a.tolist(), tokens.tolist()), bootstrap_ppl(b.tolist(), tokens.tolist())
    assert ia.high > ib.low
    same = paired_bootstrap(a.tolist(), a.tolist(), tokens.tolist())
    assert (same["diff"].low, same["diff"].high) == (0.0, 0.0)


def test_paired_bootstrap_refuses_different_windows_and_unpaired_seeds():
    tokens, hard = _fake_windows()
    with pytest.raises(ValueError, match="same windows"):
        paired_bootstrap((hard * tokens)[:-1].tolist(), (hard * tokens)[:-1].tolist(), tokens.tolist())
    with pytest.raises(ValueError, match="pair the same seeds"):
        paired_bootstrap([hard.tolist(), hard.tolist()], [hard.tolist()], tokens.tolist())


# ---------------------------------------------------------------------------------------------------------------- verdicts
def _arm(student, kind, nll, tokens, alpha=None, seed=None, train=64):
    return {"student": student, "kind": kind, "alpha": alpha, "seed": seed,
            "tokens": None if kind == "base" else train,
            "sets": {"wt": {"ppl": math.exp(sum(nll) / sum(tokens)), "window_nll": list(nll),
                            "window_tokens": list(tokens)}}}


def test_verdicts_pair_seed_with_seed_and_never_a_mean_against_one_seed():
    tokens, hard = _fake_windows()
    base = (3 + hard) * tokens
    arms = {"dense": _arm("dense", "base", base, tokens)}
    for seed, (kd_shift, ce_shift) in {1: (-0.10, -0.05), 2: (-0.11, -0.06), 3: (-0.09, -0.04)}.items():
        arms[f"kd{seed}"] = _arm("dense", "kd", base + kd_shift * tokens, tokens, 0.5, seed)
    arms["ce1"] = _arm("dense", "ce", base - 0.05 * tokens, tokens, 0.0, 1)  # CE-only ran one seed only
    lines, metrics = verdict_lines(arms, ["wt"], {"wt": "out of corpus"}, [0.5], 64, n_boot=500)
    kd_vs_ce = next(x for x in lines if x.startswith("- KD effect, wt (out of corpus), KD α=0.5 vs CE-only"))
    assert "1 paired seed (1)" in kd_vs_ce and "**KD α=0.5 lower**" in kd_vs_ce  # seed 1 against seed 1 only
    want = math.exp((base - 0.10 * tokens).sum() / tokens.sum()) - math.exp((base - 0.05 * tokens).sum() / tokens.sum())
    assert metrics["dense.wt.kd0.5_minus_ce"] == pytest.approx(want)
    vs_start = next(x for x in lines if "KD α=0.5 vs start" in x)
    assert "3 paired seeds (1, 2, 3)" in vs_start and "**KD α=0.5 lower**" in vs_start
    # The other way round: CE-only better → the line says so; a 0-width difference is not resolved.
    arms["ce1"] = _arm("dense", "ce", base - 0.2 * tokens, tokens, 0.0, 1)
    lines, _ = verdict_lines(arms, ["wt"], {"wt": "out of corpus"}, [0.5], 64, n_boot=500)
    assert "**CE-only lower**" in next(x for x in lines if "KD α=0.5 vs CE-only" in x)
    arms["ce1"] = _arm("dense", "ce", base - 0.10 * tokens, tokens, 0.0, 1)
    lines, _ = verdict_lines(arms, ["wt"], {"wt": "out of corpus"}, [0.5], 64, n_boot=500)
    assert "**not resolved**" in next(x for x in lines if "KD α=0.5 vs CE-only" in x)


def test_a_line_whose_arms_all_kept_their_start_model_says_no_arm_moved():
    tokens, hard = _fake_windows()
    base = (3 + hard) * tokens
    arms = {"dense": _arm("dense", "base", base, tokens)}
    for seed in (1, 2):  # best on validation at step 0: both arms are the start model, window for window
        for kind, alpha in (("kd", 0.5), ("ce", 0.0)):
            arms[f"{kind}{seed}"] = {**_arm("dense", kind, base, tokens, alpha, seed), "kept": {"best_step": 0, "steps": 8}}
    lines, _ = verdict_lines(arms, ["wt"], {"wt": "out of corpus"}, [0.5], 64, n_boot=200)
    kd_vs_ce = next(x for x in lines if "KD α=0.5 vs CE-only" in x)
    assert "+0.00 [+0.00, +0.00]" in kd_vs_ce and "**no arm moved**" in kd_vs_ce and "not resolved" not in kd_vs_ce
    assert all("**no arm moved**" in x for x in lines if x.startswith("- "))  # vs start too: base is the start model
    # One seed moved (its KD arm kept step 8 and is better): the line is judged on the interval, and names the seed
    # at which nothing moved.
    arms["kd2"] = {**_arm("dense", "kd", base - 0.1 * tokens, tokens, 0.5, 2), "kept": {"best_step": 8, "steps": 8}}
    lines, _ = verdict_lines(arms, ["wt"], {"wt": "out of corpus"}, [0.5], 64, n_boot=200)
    kd_vs_ce = next(x for x in lines if "KD α=0.5 vs CE-only" in x)
    assert "no arm moved**" not in kd_vs_ce and "at seed 1 no arm moved" in kd_vs_ce
    # A difference that rounds to zero is written +0.00, never -0.00 (float noise of an eval is not a sign).
    assert (signed(-1e-7), signed(-0.006), signed(0.5)) == ("+0.00", "-0.01", "+0.50")


def test_budget_trend_and_the_reach_statement():
    tokens, hard = _fake_windows()
    base = (3 + hard) * tokens
    arms = {"dense": _arm("dense", "base", base, tokens)}
    for t, gap, level in ((64, 0.20, 0.5), (128, 0.10, 0.3), (256, 0.05, 0.2)):
        arms[f"kd{t}"] = _arm("R1", "kd", base + level * tokens, tokens, 0.5, 1, train=t)
        arms[f"ce{t}"] = _arm("R1", "ce", base + (level + gap) * tokens, tokens, 0.0, 1, train=t)
    dense = {"wt": arms["dense"]["sets"]["wt"]["ppl"]}
    text, metrics = budget_section(arms, ["wt"], dense, 0.5, [64, 128, 256], 1, n_boot=300)
    # KD is lower at every budget, by less with more tokens: the gap's change has its own interval, above zero.
    assert "says KD loses ground to CE-only with tokens." in text and metrics["budget.64.wt.kd_minus_ce"] < 0
    assert metrics["budget.wt.gap_change"] == pytest.approx(
        metrics["budget.256.wt.kd_minus_ce"] - metrics["budget.64.wt.kd_minus_ce"])
    assert "reverses" not in text
    assert "reaches 1.05× dense at about" in text and "extrapolation" in text
    # The same gap at both ends: no trend. A gap that changes sign (both ends resolved): the verdict reverses.
    for t, gap in ((64, 0.2), (256, 0.2)):
        arms[f"ce{t}"] = _arm("R1", "ce", base + (0.5 + gap) * tokens, tokens, 0.0, 1, train=t)
        arms[f"kd{t}"] = _arm("R1", "kd", base + 0.5 * tokens, tokens, 0.5, 1, train=t)
    text, _ = budget_section(arms, ["wt"], dense, 0.5, [64, 128, 256], 1, n_boot=300)
    assert "cannot be told apart from no change." in text
    arms["kd256"] = _arm("R1", "kd", base + 0.9 * tokens, tokens, 0.5, 1, train=256)
    text, _ = budget_section(arms, ["wt"], dense, 0.5, [64, 128, 256], 1, n_boot=300)
    assert "says KD loses ground to CE-only with tokens; the verdict reverses: KD lower at 64, CE-only lower at " \
           "256." in text
    assert "cannot be told" in reach_statement([(1, 2.0), (2, 2.1)], 1.0, "wt")
    assert "within 1.05× dense" in reach_statement([(1, 2.0), (2, 1.01)], 1.0, "wt")
    assert arm_label("R1", "kd", 0.5, 42, 65536) == "R1 · KD α=0.5 · seed 42 · 64k tokens"


# ---------------------------------------------------------------------------------------------------------------- config
def test_config_checks_relations_budgets_and_alphas(tmp_path):
    from flows.configs import StudyV2Config

    root = make_flow_project(tmp_path)
    ok = _values(root, tmp_path / "w")
    StudyV2Config(**ok)
    with pytest.raises(ValidationError, match="relations must label every perplexity eval set"):
        StudyV2Config(**{**ok, "relations": []})
    with pytest.raises(ValidationError, match="not a whole number of optimizer steps"):
        StudyV2Config(**{**ok, "budgets": [100]})
    with pytest.raises(ValidationError, match="exceed the corpus"):
        StudyV2Config(**{**ok, "budgets": [64 * 100]})
    with pytest.raises(ValidationError, match=r"alphas: 0.0 is not in \(0, 1\]"):
        StudyV2Config(**{**ok, "alphas": [0.0]})
    with pytest.raises(ValidationError, match=r"tail_seeds \[3\] are not in seeds \[1, 2\]"):
        StudyV2Config(**{**ok, "tail_seeds": [1, 3]})
    with pytest.raises(ValidationError, match="repeats a seed"):
        StudyV2Config(**{**ok, "tail_seeds": [1, 1]})
    assert StudyV2Config(**{**ok, "tail_seeds": [2]}).tail_seeds == [2]


def test_an_eval_sets_relation_to_the_corpus_is_decided_once_and_checked_against_the_label():
    from flows.configs import StudyV2Config
    from sparsekd_core.relations import corpus_relation

    assert corpus_relation("mix:no-wikitext-offline", "wikitext2:test") == "out of corpus"
    assert corpus_relation("mix:paper-offline", "wikitext2:test") == "held-out documents"  # its train split is in
    assert corpus_relation("mix:paper", "python:heldout") == "held-out documents"  # CodeParrot and stdlib: code
    assert corpus_relation("c4:train", "gsm8k:test") == "out of corpus"
    assert corpus_relation("mix:paper", "c4:train") == "in corpus"  # the hub copy of the same split
    assert corpus_relation("/data/corpus.txt", "c4:heldout") is None  # a local file: the user's to state
    assert corpus_relation("mix:paper-offline", "/data/eval.txt") is None
    StudyV2Config(model="smollm2-135m")  # the defaults agree with the corpus
    with pytest.raises(ValidationError, match="wikitext2 .wikitext2:test. is labelled 'out of corpus', but against "
                                              "the corpus mix:paper-offline it is 'held-out documents'"):
        StudyV2Config(model="smollm2-135m", corpus={"data": "mix:paper-offline", "num_samples": 1024, "seq_len": 256})
    with pytest.raises(ValidationError, match="must not be a split the corpus is built from"):
        StudyV2Config(model="smollm2-135m", eval_sets=[{"name": "c4", "data": "c4:train", "max_tokens": 8192}],
                      relations=[{"set": "c4", "relation": "held-out documents"}])


def test_the_committed_study_v2_configs_validate():
    import yaml

    from pathlib import Path

    from flows.configs import StudyV2Config
    from sparsekd_core.config import NAMED_MIXTURES

    paths = sorted(Path("flows/configs_yaml").glob("study-v2-*.yaml"))
    assert paths
    for path in paths:
        cfg = StudyV2Config(**yaml.safe_load(path.read_text()))
        sources = NAMED_MIXTURES[cfg.corpus.data]
        assert not any(s.startswith("wikitext") for s in sources) and cfg.relation_of()["wikitext2"] == "out of corpus"
        by_name = {es.name: es for es in cfg.eval_sets}
        assert by_name["wikitext2"].max_tokens >= 16384
        assert all(es.max_tokens >= 8192 for es in cfg.eval_sets)
        assert cfg.eval.stride == cfg.eval.ctx and len(cfg.seeds) >= 3


# ---------------------------------------------------------------------------------------------------------------- the flow
def _values(root, workdir, **extra):
    from test_flows import PRUNE, flow_values

    return flow_values(root, workdir, prune=PRUNE, eval={"ctx": 32, "stride": 32, "protocol": "standard"},
                       distill={**flow_values(root, workdir)["distill"], "max_steps": None},
                       relations=[{"set": "text", "relation": "out of corpus"}], seeds=[1, 2], alphas=[0.5, 1.0], train_tokens=128,
                       budgets=[64, 256], n_boot=200, **extra)


@pytest.fixture(scope="module")
def prefect_server():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


def test_study_v2_flow_runs_joins_published_arms_and_reuses_stages(prefect_server, tmp_path):
    import flows.study_v2 as study_v2
    from flows.configs import StudyV2Config
    from flows.study_v2 import study_v2_flow

    root = make_flow_project(tmp_path / "project")
    out = tmp_path / "published"
    first = study_v2_flow(StudyV2Config(**_values(root, tmp_path / "w", parts=["dense", "r1"])), out=str(out))
    labels = set(first["arms"])
    assert {"dense", "R1 · base", "dense · CE-only · seed 1", "dense · KD α=1 · seed 2",
            "R1 · KD α=0.5 · seed 2"} <= labels and len(labels) == 2 + 2 * 2 * 3
    report = (out / "report.md").read_text()
    assert "- KD effect, text (out of corpus), KD α=0.5 vs CE-only: PPL(KD α=0.5) − PPL(CE-only) =" in report
    assert "2 paired seeds (1, 2)" in report and "out of corpus" in report
    start = first["arms"]["dense · CE-only · seed 1"]["kept"]["val_ppl_start"]
    assert f"The teacher (the dense model) has PPL {start:.2f} on the validation slice" in report
    kd = first["arms"]["dense · KD α=0.5 · seed 1"]
    assert kd["sets"]["text"]["kl"] > 0 and "kl" not in first["arms"]["dense"]["sets"]["text"]
    assert kd["kept"]["steps"] == 2  # 128 tokens = 2 steps of 2 × 32
    # Trained arms really moved (or kept their step-0 model, the best on validation, and say so); seeds differ.
    ppl = {k: v["sets"]["text"]["ppl"] for k, v in first["arms"].items()}
    start = {"dense": ppl["dense"], "R1": ppl["R1 · base"]}
    for label, arm in first["arms"].items():
        if arm["kind"] != "base":
            assert (ppl[label] != start[arm["student"]]) == (arm["kept"]["best_step"] > 0), label
    # An arm that kept step 0 holds its start model's weights: the start arm's windows are its own (no second eval),
    # and a dense student that kept step 0 is the teacher (KL 0).
    unmoved = [label for label, arm in first["arms"].items() if arm["kind"] != "base" and arm["kept"]["best_step"] == 0]
    assert unmoved  # the α = 1 arms of this tiny setup never beat step 0 on validation
    evaluated = {s["label"] for s in first["stages"] if s["stage"] == "eval"}
    for label in unmoved:
        arm, origin = first["arms"][label], "dense" if label.startswith("dense") else "R1 · base"
        assert arm["eval_of"] == origin and f"eval {label}" not in evaluated
        assert arm["sets"]["text"]["window_nll"] == first["arms"][origin]["sets"]["text"]["window_nll"]
        assert arm["sets"]["text"]["kl"] == (0.0 if origin == "dense" else first["arms"][origin]["sets"]["text"]["kl"])
    assert {f"eval {label}" for label, arm in first["arms"].items() if label not in unmoved} <= evaluated
    assert ppl["dense · CE-only · seed 1"] < ppl["dense"] and ppl["R1 · CE-only · seed 1"] < ppl["R1 · base"]
    assert ppl["dense · CE-only · seed 1"] != ppl["dense · CE-only · seed 2"]
    assert ppl["dense · KD α=0.5 · seed 1"] != ppl["dense · CE-only · seed 1"]
    raw = (out / "study.json").read_text(encoding="utf-8")
    saved = json.loads(raw)
    assert set(saved["arms"]) == labels
    assert "dense · KD α=0.5 · seed 1" in raw  # labels stay readable in the file (no \u escapes)
    # MLflow: every arm is its own nested run (named by its label) holding its own eval figures and, for a trained
    # arm, its own validation curve; an arm that kept its start model shows that model's figures and says so.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(first["tracking_uri"])
    children = {r.info.run_name: r for r in client.search_runs(
        [client.get_run(first["mlflow_run_id"]).info.experiment_id],
        f"tags.mlflow.parentRunId = '{first['mlflow_run_id']}'")}
    assert set(children) == labels
    for label, arm in first["arms"].items():
        r = children[label]
        assert r.info.status == "FINISHED" and r.data.tags["kind"] == arm["kind"], label
        assert r.data.metrics["ppl_text"] == pytest.approx(arm["sets"]["text"]["ppl"]), label
        if arm["kind"] != "base":
            assert r.data.tags["seed"] == str(arm["seed"]) and r.data.tags.get("eval_of") == arm.get("eval_of")
            curve = client.get_metric_history(r.info.run_id, "val_ppl")
            assert [(m.step, m.value) for m in curve] == [tuple(p) for p in arm["kept"]["val_history"]], label
    assert children["R1 · base"].data.metrics["mlp_reduction"] > 0  # the prune's figures sit with the pruned model
    # One budget (the matched arms') is no curve: no budget section, no budget plot.
    assert "## Token budget" not in report and not (out / "budget.png").exists()
    (out / "old.png").write_bytes(b"stale")  # a plot an earlier report drew and the next one has not: removed

    # The other parts in a second invocation: the published arms are joined, their stages reused.
    # (The tails at both seeds: tail_seeds is not part of the setup, so the published arms still join.)
    bucket = study_v2_flow(StudyV2Config(**_values(root, tmp_path / "w", parts=["tails"], tail_seeds=[2],
                                                   tail_kinds=["bucket"])), out=str(out))
    assert set(bucket["arms"]) - labels == {"dense · KD, bucket tail · seed 2", "R1 · KD, bucket tail · seed 2"}
    assert not any("sampled" in s["label"] for s in bucket["stages"])  # no sampled arm: its cache is not written
    second = study_v2_flow(StudyV2Config(**_values(root, tmp_path / "w", parts=["tails", "budget"], tail_seeds=[1, 2])),
                           out=str(out))
    assert labels < set(second["arms"])
    assert {"R1 · KD, sampled-cache tail · seed 1", "dense · KD, bucket tail · seed 1", "R1 · CE-only · seed 1 · 64 tokens",
            "R1 · KD α=0.5 · seed 1 · 256 tokens", "R1 · KD, bucket tail · seed 2",
            "dense · KD, sampled-cache tail · seed 2"} <= set(second["arms"])
    report = (out / "report.md").read_text()
    # Only the arms this invocation made have runs under it (published arms and the reused R1 base make none).
    children = client.search_runs([client.get_run(second["mlflow_run_id"]).info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{second['mlflow_run_id']}'")
    assert {r.info.run_name for r in children} == set(second["arms"]) - set(bucket["arms"])
    assert {r.info.status for r in children} == {"FINISHED"}
    tails = [line for line in report.split("## Verdicts")[1].split("## Every model")[0].splitlines()
             if line.startswith("- KD effect, text (out of corpus), KD, bucket tail vs CE-only")]
    assert len(tails) == 2 and all("2 paired seeds (1, 2)" in line for line in tails)  # dense and R1
    assert "## Token budget (R1, seed 1)" in report and (out / "budget.png").is_file() and not (out / "old.png").exists()
    assert not any("earlier" in st for st in json.loads((out / "study.json").read_text())["stages"])
    assert "![learning-dense](learning-dense.png)" in report and (out / "learning-R1.png").is_file()
    assert "KD, sampled-cache tail vs CE-only" in report
    # Published arms are not made again (their evals do not run); the pruned student is reached through its key.
    assert not {s["label"] for s in second["stages"]} & {"eval dense", "eval R1 · base", "distill R1 · CE-only · seed 1"}
    assert [s["cached"] for s in second["stages"] if s["label"] == "prune R1"] == [True]

    # The report alone, from the published arms; arms made by other stage code are not joined.
    third = study_v2_flow(StudyV2Config(**_values(root, tmp_path / "w", parts=["report"])), out=str(out))
    assert set(third["arms"]) == set(second["arms"]) and third["stages"] == []  # nothing to make: not even the cache
    report = (out / "report.md").read_text()  # and it says so: no stage of the earlier invocations counts as run
    n_earlier = len({s["key"] for s in first["stages"] + bucket["stages"] + second["stages"]})
    assert f"This invocation ran 0 stage(s) and reused the others from their manifests ({n_earlier} were made by " \
           "earlier invocations" in report
    assert "## Stages\n\nThis invocation reached no stage: it was built from results already published." in report
    # Published in another storage root (another machine): the arms are still joined and not made again.
    fourth = study_v2_flow(StudyV2Config(**_values(root, tmp_path / "w2", parts=["dense", "budget"])), out=str(out))
    assert set(fourth["arms"]) == set(second["arms"])
    assert {s["label"] for s in fourth["stages"]} == {"prune R1"}  # needed to know the student; no arm retrains
    saved = json.loads((out / "study.json").read_text())
    assert saved["code"] == study_v2.stage_code()
    saved["code"]["distill"] = "other"
    (out / "study.json").write_text(json.dumps(saved))
    config = StudyV2Config(**_values(root, tmp_path / "w", parts=["report"]))
    assert study_v2.previous(config, out) == ({}, [])
    saved["code"] = study_v2.stage_code()
    (out / "study.json").write_text(json.dumps(saved))
    assert set(study_v2.previous(config, out)[0]) == set(second["arms"])
    assert study_v2.previous(config.model_copy(update={"train_tokens": 64}), out) == ({}, [])  # another setup

    # The combined report over families, from the published arms only (no stage runs, no Prefect).
    import yaml

    family = tmp_path / "family.yaml"
    family.write_text(yaml.safe_dump(json.loads(json.dumps(_values(root, tmp_path / "w")))))
    index = tmp_path / "index.yaml"
    dense_only = tmp_path / "dense-only.yaml"  # the same setup, the dense part only (joins the same arms)
    dense_only.write_text(yaml.safe_dump({**yaml.safe_load(family.read_text()), "parts": ["dense"]}))
    index.write_text(yaml.safe_dump({"families": [{"config": str(family), "dir": "published"},
                                                  {"config": str(family), "dir": "not-yet"}]}))
    assert study_v2.main(["--config", str(index), "--combine", "--out", str(tmp_path)]) == 0
    combined = (tmp_path / "report.md").read_text()
    # Two families of one model: each named by its directory, in the table and in its heading.
    assert f"| {root / 'model'} (published/) | R1 | text (out of corpus) | 0.5 |" in combined
    assert "| 2 (1, 2) |" in combined and f"## {root / 'model'} (not-yet/)\n" in combined
    assert "tokens at peak lr 0.001." in combined
    assert "![budget](published/budget.png)" in combined and "[published/report.md](published/report.md)" in combined
    assert f"No arms published yet; run:\n\n```\npython -m flows.study_v2 --config {family} --out " \
           f"{tmp_path / 'not-yet'}\n```" in combined
    assert "| dense · KD α=0.5 · seed 1 |" in combined  # every model, with its KL column
    index.write_text(yaml.safe_dump({"families": [{"config": str(family), "dir": "published"}]}))
    assert study_v2.main(["--config", str(index), "--combine", "--out", str(tmp_path)]) == 0
    assert f"| {root / 'model'} | R1 |" in (tmp_path / "report.md").read_text()  # one family: the model alone
    index.write_text(yaml.safe_dump({"families": [{"config": str(dense_only), "dir": "published"}]}))
    assert study_v2.main(["--config", str(index), "--combine", "--out", str(tmp_path)]) == 0
    assert "Not part of this family: it trains the dense student only." in (tmp_path / "report.md").read_text()
    index.write_text(yaml.safe_dump({"families": [{"config": str(family), "dir": "published"}]}))
    family.write_text(yaml.safe_dump({**yaml.safe_load(family.read_text()), "train_tokens": 64}))
    with pytest.raises(ValueError, match="made with another setup"):
        study_v2.main(["--config", str(index), "--combine", "--out", str(tmp_path)])


def test_the_command_line_takes_parts_and_refuses_unknown_ones(tmp_path, monkeypatch):
    import yaml

    import flows.study_v2 as study_v2

    root = make_flow_project(tmp_path)
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(_values(root, tmp_path / "w")))
    seen = {}
    monkeypatch.setattr(study_v2, "study_v2_flow", lambda config, out, command: seen.update(
        parts=config.parts, command=command) or {"report": "r.md"})
    assert study_v2.main(["--config", str(path), "--parts", "dense, budget"]) == 0
    assert seen["parts"] == ["dense", "budget"] and "--parts dense, budget" in seen["command"]
    with pytest.raises(ValidationError, match="parts"):
        study_v2.main(["--config", str(path), "--parts", "everything"])


def test_table_iii_beside_the_papers_rows_as_ratios_to_each_dense():
    from sparsekd_core.config import PAPER_ROUND_TARGETS
    from sparsekd_core.report import iterative_section

    rounds = [{"round": i, "mlp_reduction": t, "pre": {"wt": 100.0 + i}, "post": {"wt": 40.0 + i}}
              for i, t in enumerate(PAPER_ROUND_TARGETS, 1)]
    text, _ = iterative_section(["wt"], {"wt": 30.0}, rounds, False)
    beside = text.split("### Beside the paper's Table III (wt)")[1]
    rows = [line for line in beside.splitlines() if line.startswith("| R")]
    assert [r.split("|")[1].strip() for r in rows] == ["R1", "R4", "R6", "R8"]
    r1 = [c.strip() for c in rows[0].split("|")[1:-1]]
    assert r1[4] == f"{41 / 30:.2f}×" and r1[6] == "21.06" and r1[7] == f"{21.06 / 35.87:.2f}×"
    # Three rounds (15, 35, 65%): only round 1 is the paper's round at the same sparsity.
    three = [{**r, "round": i} for i, r in enumerate([rounds[0], rounds[3], rounds[7]], 1)]
    text = iterative_section(["wt"], {"wt": 30.0}, three, False)[0].split("### Beside the paper's Table III")[1]
    assert [line.split("|")[1].strip() for line in text.splitlines() if line.startswith("| R")] == ["R1"]
    assert "Beside the paper" not in iterative_section(["wt"], {"wt": 30.0}, three[1:], False)[0]


def test_table_iii_says_which_step_each_round_kept_and_names_a_round_that_kept_its_pruned_model():
    from sparsekd_core.report import iterative_section

    rounds = [{"round": 1, "mlp_reduction": 0.15, "pre": {"wt": 90.0}, "post": {"wt": 60.0},
               "kept": (32, 32, 88.0, 61.5)},
              {"round": 2, "mlp_reduction": 0.22, "pre": {"wt": 70.0}, "post": {"wt": 70.0},
               "kept": (0, 24, 84.8, 84.8)},
              {"round": 3, "mlp_reduction": 0.29, "pre": {"wt": 80.0}, "post": {"wt": 75.0}}]  # no record: "—"
    text, _ = iterative_section(["wt"], {"wt": 30.0}, rounds, False)
    header = next(line for line in text.splitlines() if line.startswith("| round"))
    column = [c.strip() for c in header.split("|")].index("kept step")
    cells = {line.split("|")[1].strip(): line.split("|")[column].strip()
             for line in text.split("### Beside")[0].splitlines() if line.startswith("| R")}
    assert cells == {"R1": "32/32 (val 88.0 → 61.5)", "R2": "0/24 (val 84.8 → 84.8)", "R3": "—"}
    never = text.split("**Rounds whose training never improved the validation perplexity**")[1].split("###")[0]
    assert "R2 (validation 84.8 at step 0)" in never and "R1" not in never and "R3" not in never
    assert "never improved" not in iterative_section(["wt"], {"wt": 30.0}, rounds[:1], False)[0]


def test_the_setup_says_how_r1_was_pruned_and_what_its_calibration_shares_with_the_eval_sets():
    from sparsekd_core.study_report import prune_line

    sets = [{"name": "wikitext2", "data": "wikitext2:test"}, {"name": "c4_heldout", "data": "c4:heldout"},
            {"name": "gsm8k_acc", "data": "gsm8k:test", "kind": "gsm8k"}]
    relations = {"wikitext2": "out of corpus", "c4_heldout": "held-out documents"}
    prune = {"method": "svd", "schedule": None, "whiten": None, "calibration": "wikitext2:train",
             "calibration_samples": 32, "calibration_seq_len": 256}
    line = prune_line(prune, 0.15, sets, relations)
    assert line.startswith("R1 student: `svd` (tiered), MLP −15%, whitened on 32 × 256 tokens of `wikitext2:train`. "
                           "wikitext2 come(s) from the calibration's source: for R1, *out of corpus* means out of the "
                           "KD corpus only")
    assert "c4_heldout" not in line and "paired KD − CE-only lines are unaffected" in line
    # A held-out-documents set of the calibration's source is what its label says: no caveat.
    assert "source" not in prune_line({**prune, "calibration": "c4:train"}, 0.15, sets, relations)
    assert "come(s) from" in prune_line({**prune, "calibration": "c4:train"}, 0.15, sets,
                                        {**relations, "c4_heldout": "out of corpus"})
    assert prune_line({**prune, "whiten": False}, 0.15, sets, relations).startswith(
        "R1 student: `svd` (tiered), MLP −15%, calibrated on 32 × 256 tokens of `wikitext2:train`. wikitext2 come(s)")
    assert prune_line({**prune, "calibration": "NONE"}, 0.15, sets, relations) == \
        "R1 student: `svd` (tiered), MLP −15%, without calibration data.\n\n"
    width = prune_line({**prune, "method": "width"}, 0.2, sets, relations)  # width always calibrates
    assert width.startswith("R1 student: `width` (uniform), MLP −20%, calibrated on 32 × 256 tokens")
