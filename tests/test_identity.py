"""One stage identity (sparsekd_core/identity.py): prose edits reuse every stage, a code change recomputes exactly
the stages that run that code, and the fields that change no number are left out once, at any depth."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from sparsekd_core import identity

STAGES = ("eval", "cache", "prune", "distill", "sft", "selfdata", "instructions", "profile")


@pytest.fixture
def edit(monkeypatch):
    """edit(module, transform): every stage digest from now on reads ``transform(source)`` for that module."""
    real = identity.module_source
    edits: dict[str, callable] = {}

    def source(name: str) -> str:
        text = real(name)
        return edits[name](text) if name in edits else text

    monkeypatch.setattr(identity, "module_source", source)

    def apply(module: str, transform) -> dict[str, str]:
        edits[module] = transform
        identity.forget_code()
        return {stage: identity.code_digest(stage) for stage in STAGES}

    yield apply
    identity.forget_code()


def _digests() -> dict[str, str]:
    identity.forget_code()
    return {stage: identity.code_digest(stage) for stage in STAGES}


def _add_docstring_line(text: str) -> str:
    """A new line inside the module docstring (its first triple quote closes after it)."""
    return text.replace('"""', '"""A prose edit.\n', 1)


def test_comments_and_docstrings_reuse_every_stage(edit):
    before = _digests()
    assert edit("sparsekd_core.profile", lambda t: "# a new comment\n" + t.replace("\n", "\n# another\n", 3)) == before
    assert edit("sparsekd_core.kd_loss", _add_docstring_line) == before
    assert edit("sparsekd_core.cache", lambda t: t + "\n\n# trailing comment\n") == before


def test_a_kd_loss_code_change_recomputes_training_only(edit):
    before = _digests()
    after = edit("sparsekd_core.kd_loss", lambda t: t + "\nEDITED = 1\n")
    changed = {s for s in STAGES if after[s] != before[s]}
    assert changed == {"distill", "sft"}  # not the teacher cache, the eval, pruning, generation or profiling


def test_a_cache_code_change_recomputes_the_cache(edit):
    before = _digests()
    after = edit("sparsekd_core.cache", lambda t: t + "\nEDITED = 1\n")
    assert after["cache"] != before["cache"]
    assert after["eval"] == before["eval"] and after["prune"] == before["prune"] and after["profile"] == before["profile"]


def test_a_docstring_that_is_not_first_is_code():
    """Only a body's leading string is prose; a string expression later in a body stays in the digest."""
    base = "def f():\n    '''doc'''\n    return 1\n"
    assert identity.code_fingerprint(base) == identity.code_fingerprint(base.replace("'''doc'''", "'''other'''"))
    assert identity.code_fingerprint(base) != identity.code_fingerprint(base.replace("return 1", "return 2"))
    moved = "def f():\n    x = 1\n    'not a docstring'\n    return x\n"
    assert identity.code_fingerprint(moved) != identity.code_fingerprint(moved.replace("not a", "no"))


def test_every_stage_the_tasks_run_has_an_identity():
    """Every stage name tasks/stages.py stores under is known here (an unknown one would hash the whole package),
    and each has a version to bump."""
    tree = ast.parse(Path("tasks/stages.py").read_text())
    used = {node.args[1].value for node in ast.walk(tree)
            if isinstance(node, ast.Call) and getattr(node.func, "id", "") in ("_run_heavy_stage", "run_stage")
            and len(node.args) > 1 and isinstance(node.args[1], ast.Constant)}
    assert used and used <= set(identity.STAGE_ROOTS)
    assert set(identity.STAGE_VERSION) == set(identity.STAGE_ROOTS)
    for stage in identity.STAGE_ROOTS:  # each stage runs the loader and its own module
        assert any(m.startswith("sparsekd_core.") for m in identity.code_modules(stage))


def test_a_stage_version_bump_changes_only_that_stage(monkeypatch):
    before = _digests()
    monkeypatch.setitem(identity.STAGE_VERSION, "prune", identity.STAGE_VERSION["prune"] + 1)
    after = _digests()
    assert {s for s in STAGES if after[s] != before[s]} == {"prune"}


def test_fields_that_change_no_number_are_not_identity():
    """Stripped at the top level and, through identity_fields, from each stage section; never from data (a
    {source: digest} mapping keeps a source named like a field)."""
    base = {"cache": {"top_k": 8, "shards": 1}, "distill": {"lr": 1e-3, "parallel": "none", "checkpoint_every": 5}}
    other = {"cache": {"top_k": 8, "shards": 4}, "distill": {"lr": 1e-3, "parallel": "ddp", "checkpoint_every": 50,
                                                             "checkpoint_minutes": 2.0}, "out": "/elsewhere"}

    def key(stage, config, inputs):
        sections = {k: identity.identity_fields(v) if isinstance(v, dict) else v for k, v in config.items()}
        return identity.stage_key(stage, sections, inputs)

    assert key("distill", base, {"a": "1"}) == key("distill", other, {"a": "1"})
    assert key("distill", base, {"a": "1"}) != key("distill", base, {"a": "2"})
    changed = {**base, "distill": {**base["distill"], "lr": 2e-3}}
    assert key("distill", base, {}) != key("distill", changed, {})
    assert key("eval", base, {}) != key("prune", base, {})
    data = {"prune": {}, "calibration": {"out": "digest-a"}}
    assert identity.stage_key("prune", data, {}) != identity.stage_key("prune", {**data, "calibration": {"out": "b"}}, {})


def test_field_descriptions_are_prose(edit):
    """A flag's help text (a Field description in config.py) is prose: rewording it reuses every stage; a default
    beside it is code."""
    before = _digests()
    old = 'description="Tokens per sequence."'
    assert old in identity.module_source("sparsekd_core.config")  # the edit below really edits something
    assert edit("sparsekd_core.config", lambda t: t.replace(old, 'description="Tokens in each sequence."')) == before
    after = edit("sparsekd_core.config", lambda t: t.replace("seq_len: int = Field(512,", "seq_len: int = Field(256,"))
    assert after != before


def test_the_key_machinery_and_the_shipped_modeling_file():
    """identity/provenance decide keys and compute no output: not stage code. The modeling file a factored
    checkpoint ships is code of every stage that writes checkpoints, though nothing imports it."""
    shipped = "sparsekd_core.prune.remote_code.modeling_sparsekd"
    for stage in identity.STAGE_ROOTS:
        modules = identity.code_modules(stage)
        assert not set(modules) & identity.NOT_STAGE_CODE
        assert (shipped in modules) == (stage in ("prune", "distill", "sft"))


def test_a_stage_root_that_does_not_exist_is_an_error(monkeypatch):
    monkeypatch.setitem(identity.STAGE_ROOTS, "eval", ("sparsekd_core.no_such_module",))
    with pytest.raises(RuntimeError, match="no_such_module"):
        identity.code_modules("eval")


def test_a_training_run_key_follows_its_code(edit):
    fields = {"lr": 1e-3, "checkpoint_every": 5, "out": "a"}
    key = identity.run_key("distill", fields, {"teacher": "x"}, "student")
    assert identity.run_key("distill", {**fields, "checkpoint_every": 9, "out": "b"}, {"teacher": "x"}, "student") == key
    edit("sparsekd_core.kd_loss", _add_docstring_line)
    assert identity.run_key("distill", fields, {"teacher": "x"}, "student") == key
    edit("sparsekd_core.kd_loss", lambda t: t + "\nEDITED = 1\n")
    assert identity.run_key("distill", fields, {"teacher": "x"}, "student") != key


def test_the_gpu_name_is_part_of_a_cuda_runtime(monkeypatch):
    import torch

    from sparsekd_core import provenance

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda dev=None: "NVIDIA H200")
    assert provenance._device(torch.device("cuda", 1)) == {"device": "cuda", "gpu": "NVIDIA H200"}
    assert provenance._device(torch.device("cpu")) == {"device": "cpu"}


def test_the_cache_store_fingerprint_records_the_cache_code(tmp_path):
    """The Zarr fingerprint's code_version is the cache stage's code digest, not the package version."""
    import torch

    from conftest import make_model, make_tokenizer
    from sparsekd_core.cache import write_cache
    from sparsekd_core.config import CacheConfig

    tok = make_tokenizer()
    model = make_model("llama", len(tok))
    cfg = CacheConfig(out=str(tmp_path / "c.zarr"), data="wikitext2:train", top_k=4,
                      chunk_size=2, seq_len=8, num_samples=2)
    ids = torch.randint(0, len(tok), (2, 8))
    write_cache(model, ids, cfg, {"model": "tiny"}, len(tok))
    import zarr

    found = zarr.open_group(cfg.out, mode="r").attrs["sparsekd_cache"]
    assert found["code_version"] == identity.code_digest("cache")


def test_a_stage_body_counts_for_its_own_stage_only():
    """The CLI and the tasks share one body per stage (sparsekd_core/stages/); each is in its stage's code only."""
    modules = {stage: set(identity.code_modules(stage)) for stage in ("eval", "prune", "profile")}
    for stage, found in modules.items():
        assert f"sparsekd_core.stages.{stage}" in found
        assert not {f"sparsekd_core.stages.{other}" for other in modules if other != stage} & found
