"""Flows compose, they do not compute (issue 25, part 4).

* The report is rendered in one module (sparsekd_core/report.py); MLflow and the model registry are tasks/; the
  held-out check is sparsekd_core/checks.py. A flow file renders no Markdown, writes no file and imports no MLflow.
* The study runs the iterative flow's round loop (``experiments.iterative_rounds``), so both reach the same stages.
* Flow config sections are made from the core stage configs; a default that differs from the stage's is one of the
  documented flow-level overrides below, with the value the committed configs and deployments were run with.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FLOW_FILES = sorted((ROOT / "flows").glob("*.py"))


def _called_names(tree: ast.AST) -> set[str]:
    """The names of every function or method a module calls (``f(...)`` → f, ``x.f(...)`` → f)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            names.add(func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", ""))
    return names


def _string_constants(tree: ast.AST) -> list[str]:
    """Every string literal (f-string parts included) except docstrings."""
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef)) and node.body
                  and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    return [node.value for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings]


@pytest.mark.parametrize("path", FLOW_FILES, ids=lambda p: p.name)
def test_a_flow_file_renders_no_report_writes_no_file_and_imports_no_mlflow(path):
    tree = ast.parse(path.read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not {m for m in imported if m.split(".")[0] in ("mlflow", "subprocess", "statistics")}, imported
    forbidden = {"table", "write_text_atomic", "write_json_atomic", "write_file_atomic", "create_markdown_artifact",
                 "create_model_version", "MlflowClient"}
    assert not _called_names(tree) & forbidden, _called_names(tree) & forbidden
    markdown = [s for s in _string_constants(tree) if s.lstrip().startswith("#") or "\n#" in s or "|---" in s]
    assert markdown == [], f"{path.name} renders Markdown (sparsekd_core/report.py does): {markdown}"


def test_experiments_is_composition_only():
    """flows/experiments.py holds the flows and the round loop they share; the run context is flows/context.py."""
    lines = len((ROOT / "flows" / "experiments.py").read_text().splitlines())
    assert lines < 500, lines


def _function(path: Path, name: str) -> ast.FunctionDef:
    tree = ast.parse(path.read_text())
    return next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == name)


def test_the_study_and_the_iterative_flow_share_one_round_loop():
    for path, name in ((ROOT / "flows" / "study.py", "study_flow"), (ROOT / "flows" / "experiments.py",
                                                                      "iterative_flow")):
        body = _function(path, name)
        assert "iterative_rounds" in _called_names(body), name
        loops = [ast.unparse(n.iter) for n in ast.walk(body) if isinstance(n, ast.For)]
        assert not [loop for loop in loops if "targets" in loop], (name, loops)  # no round loop of its own


class _Stages:
    """A stand-in for flows.context.Run: records which stage ran on what, returns made-up manifests."""

    def __init__(self):
        self.calls = []

    def prune(self, model, run_id, label, step=None, **fields):
        self.calls.append(("prune", model["spec"], fields["target_reduction"], run_id))
        spec = f"pruned({model['spec']})"
        return {"model": {"spec": spec}, "key": spec, "result": {"mlp_reduction": fields["target_reduction"] + 0.01}}

    def distill(self, student, cache, run_id, label, **overrides):
        self.calls.append(("distill", student["spec"], cache["key"], run_id))
        spec = f"kd({student['spec']})"
        return {"model": {"spec": spec}, "key": spec, "result": {}}

    def cache(self, teacher, run_id, label):
        self.calls.append(("cache", teacher["spec"]))
        return {"key": f"cache({teacher['spec']})"}


@pytest.mark.parametrize("keep_original_teacher", [False, True])
def test_the_round_loop_prunes_distills_and_recaches_in_order(keep_original_teacher):
    from flows.experiments import iterative_rounds

    stages, seen, closed = _Stages(), [], []
    rounds = iterative_rounds(stages, {"spec": "dense"}, {"key": "cache(dense)"}, [0.2, 0.4], keep_original_teacher,
                              open_round=lambda index, target: f"run{index}",
                              evaluate=lambda m, run_id, index, when: seen.append((m["model"]["spec"], when))
                              or {"set": float(index)},
                              close_round=lambda done: closed.append(done.index))
    r1, r2 = "kd(pruned(dense))", "kd(pruned(kd(pruned(dense))))"
    teacher2 = "cache(dense)" if keep_original_teacher else f"cache({r1})"
    assert stages.calls == [("prune", "dense", 0.2, "run1"), ("distill", "pruned(dense)", "cache(dense)", "run1"),
                            *([] if keep_original_teacher else [("cache", r1)]),
                            ("prune", r1, 0.4, "run2"), ("distill", f"pruned({r1})", teacher2, "run2")]
    assert seen == [("pruned(dense)", "pre"), (r1, "post"), (f"pruned({r1})", "pre"), (r2, "post")]
    assert closed == [1, 2] and [x.start["spec"] for x in rounds] == ["dense", r1]
    assert [x.summary()["mlp_reduction"] for x in rounds] == [pytest.approx(0.21), pytest.approx(0.41)]


# -------------------------------------------------------------------------------------------------------- configs

# A flow default that is not the stage's, and why (each is documented where it is declared in flows/configs.py).
FLOW_OVERRIDES = {
    ("CorpusSpec", "num_samples"): 64,  # the stage: all a source gives; flows always size their corpus
    ("CorpusSpec", "seq_len"): 256,  # the stage: 512; every flow corpus and the deployments ran with 256
    ("EvalSet", "max_problems"): None,  # unset = the accuracy stage's default, resolved by the eval task
    ("EvalSet", "max_new_tokens"): None,
    ("FlowConfig", "seed"): 42,  # the training stage: 0; the paper's first seed, what the committed runs used
}


def _sections():
    from flows import configs as fc
    from sparsekd_core import config as cc

    return [(fc.CorpusSpec, cc.CacheConfig), (fc.DistillSection, cc.DistillConfig), (fc.PruneSection, cc.PruneConfig),
            (fc.WandaSection, cc.PruneConfig), (fc.DepthSection, cc.PruneConfig),
            (fc.SelfDataSection, cc.SelfDataConfig), (fc.ProfileSection, cc.ProfileConfig),
            (fc.SFTSection, cc.SFTConfig), (fc.EvalSet, cc.DataConfig), (fc.EvalSet, cc.AccuracyConfig),
            (fc.FlowConfig, cc.ModelConfig), (fc.FlowConfig, cc.DistillConfig)]


def _constraints(info) -> list:
    """A field's bounds (gt, ge, le, min_length, ...), not its validators (a flow field may validate through a shared
    Annotated type where the stage config has a field_validator)."""
    return [m for m in info.metadata if type(m).__module__.startswith("annotated_types")]


@pytest.mark.parametrize("section, stage", _sections(), ids=lambda c: c.__name__)
def test_a_flow_section_takes_the_stage_fields_defaults_and_constraints(section, stage):
    shared = [n for n in section.model_fields if n in stage.model_fields
              and not (section.__name__ == "FlowConfig" and stage.__name__ == "DistillConfig" and n != "seed")
              and not (section.__name__ == "FlowConfig" and n == "model")]
    assert shared, (section, stage)
    for name in shared:
        ours, theirs = section.model_fields[name], stage.model_fields[name]
        expected = FLOW_OVERRIDES.get((section.__name__, name), theirs.default)
        assert ours.default == expected, (section.__name__, name, ours.default, theirs.default)
        assert _constraints(ours) == _constraints(theirs), (section.__name__, name)  # same gt/ge/le
        assert ours.description, (section.__name__, name)


def test_the_flow_defaults_are_those_the_committed_results_were_run_with():
    from flows.configs import FLOW_CONFIGS, CorpusSpec, StudyConfig

    assert CorpusSpec().model_dump() == {"data": "mix:paper-offline", "num_samples": 64, "seq_len": 256, "seed": 0,
                                         "max_sequences_per_document": 1, "top_k": 32, "teacher_precision": "fp32",
                                         "batch_size": None, "shards": 1, "teacher_sample": None,
                                         "sample_temperature": 2.0}
    # The cache stage's key is over these fields: a top-k corpus gives the ones it gave before sampling was offered.
    assert CorpusSpec().cache_fields() == {"data": "mix:paper-offline", "num_samples": 64, "seq_len": 256,
                                           "seed": 0, "max_sequences_per_document": 1, "top_k": 32,
                                           "teacher_precision": "fp32", "batch_size": None}
    study = StudyConfig()
    assert (study.seed, study.dtype, study.device, study.targets) == (42, "auto", "auto",
                                                                      [0.15, 0.22, 0.29, 0.35, 0.43, 0.51, 0.58, 0.65])
    assert (study.verdict_much_lower, study.verdict_comparable) == (0.8, 1.05)
    for name in ("dense-kd-smollm2", "iterative-3round-smollm2", "iterative-8round-smollm2", "study-smollm2",
                 "selfdata-smollm2"):
        import yaml

        values = yaml.safe_load((ROOT / "flows" / "configs_yaml" / f"{name}.yaml").read_text())
        flow = {"dense-kd-smollm2": "dense-kd", "iterative-3round-smollm2": "iterative", "study-smollm2": "study",
                "selfdata-smollm2": "selfdata", "iterative-8round-smollm2": "iterative"}[name]
        config = FLOW_CONFIGS[flow](**values)
        assert config.corpus.seq_len == values["corpus"].get("seq_len", 256) == 256, name


def test_every_field_of_every_flow_form_has_a_description():
    from prefect.utilities.callables import parameter_schema

    from flows.registry import ALL_FLOWS

    for name, flow in ALL_FLOWS.items():
        schema = parameter_schema(flow.fn).model_dump_for_openapi()
        assert not [d for d in schema["definitions"] if d.startswith("_")], name  # no helper class in the form
        bare = [(d, f) for d, body in schema["definitions"].items() for f, prop in body.get("properties", {}).items()
                if not prop.get("description")]
        assert bare == [], (name, bare)


def test_the_shared_field_types_validate_the_flow_fields(tmp_path):
    from flows.configs import CorpusSpec, EvalSet, FlowConfig

    with pytest.raises(ValueError, match="unknown model alias"):
        FlowConfig(model="nonsense")
    with pytest.raises(ValueError, match="allowed: auto"):
        FlowConfig(device="gpu0")
    with pytest.raises(ValueError, match="does not exist"):
        CorpusSpec(data=str(tmp_path / "missing.jsonl"))
    with pytest.raises(ValueError, match="one source, not a mixture"):
        EvalSet(name="m", data="mix:paper-offline")
    assert json.loads(EvalSet(name="w", data=" wikitext2:test ").model_dump_json())["data"] == "wikitext2:test"


# -------------------------------------------------------------------------------------------------------- core checks


def test_the_held_out_check_is_core(tmp_path):
    from sparsekd_core.checks import check_held_out
    from sparsekd_core.config import CacheConfig
    from sparsekd_core.data import DataOverlapError

    docs = [f"document {i} " + " ".join(f"w{i}x{j}" for j in range(30)) for i in range(6)]
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[:4]))
    (tmp_path / "held.txt").write_text("\n\n".join(docs[4:]))
    (tmp_path / "leaky.txt").write_text(docs[1])
    cfg = CacheConfig(data=str(corpus), out="unused")
    checked = check_held_out({"held": str(tmp_path / "held.txt")}, None, cfg)
    assert checked == {"eval_documents": 2, "corpus_documents": 4, "shared": 0}
    with pytest.raises(DataOverlapError, match="'distill.val_data'"):
        check_held_out({"held": str(tmp_path / "held.txt")}, str(tmp_path / "leaky.txt"), cfg)


def test_every_committed_flow_config_validates_against_the_flow_its_first_line_runs():
    """Each YAML in flows/configs_yaml/ starts with the command that runs it; the config validates as that flow's."""
    import re

    import yaml

    from flows.configs import FLOW_CONFIGS

    modules = {"flows.study": "study", "flows.study_v2": "study-v2"}
    for path in sorted((ROOT / "flows" / "configs_yaml").glob("*.yaml")):
        first = path.read_text().splitlines()[0]
        match = re.match(r"# (?:sparsekd run (\S+)|python -m (\S+)) --config flows/configs_yaml/(\S+)", first)
        assert match and match.group(3) == path.name, (path.name, first)
        if " --combine" in first:  # the index of a combined report: the families' configs validate themselves
            from flows.configs import StudyV2Index

            for family in StudyV2Index(**yaml.safe_load(path.read_text())).families:
                assert (ROOT / family.config).is_file(), (path.name, family.config)
            continue
        flow = match.group(1) or modules[match.group(2)]
        FLOW_CONFIGS[flow](**yaml.safe_load(path.read_text()))


def test_the_paper_configs_ce_control_reaches_its_iterative_part_only():
    """`ce_control` on a paper (or study) config is the iterative part's per-round CE-only twins; the dense-kd and
    cascade parts keep their own twins (on by default) and the parts without the field do not receive it."""
    from flows.configs import PaperConfig, paper_parts

    for on in (False, True):
        parts = paper_parts(PaperConfig(model="smollm2-135m", ce_control=on))
        assert parts["iterative"].ce_control is on
        assert parts["dense-kd"].ce_control is True and parts["cascade"].ce_control is True
        assert not hasattr(parts["wanda"], "ce_control") and not hasattr(parts["teacher-swap"], "ce_control")
