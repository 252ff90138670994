"""Config errors: one line naming the field, the value and what is allowed; exit code 2; no traceback."""

from __future__ import annotations

import json

import pytest

from sparsekd.cli import main
from sparsekd_core.config import ConfigError, EvalConfig, MixtureConfig, build


def run_cli(capsys, *argv):
    capsys.readouterr()  # drop what fixtures printed
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(
    "argv,needles",
    [
        (["--ctx", "128", "--stride", "256"], ["stride=256", "ctx=128", "1 <= stride <= ctx"]),
        (["--ctx", "1"], ["eval.ctx=1", "greater than 1"]),
        (["--ctx", "0"], ["eval.ctx=0"]),
        (["--batch-size", "0"], ["eval.batch_size=0", "greater than 0"]),
        (["--stride", "-4"], ["eval.stride=-4"]),
        (["--max-tokens", "0"], ["data.max_tokens=0"]),
        (["--protocol", "fancy"], ["eval.protocol='fancy'", "'paper' or 'standard'"]),
        (["--data", "/no/such/file.txt"], ["data.data='/no/such/file.txt'", "does not exist"]),
        (["--data", "wikitext2:tset"], ["unknown data source", "wikitext2:test"]),
        (["--ctx", "abc"], ["--ctx", "invalid int value"]),
    ],
)
def test_eval_bad_input_is_one_line_exit_2(capsys, tiny_model_dir, argv, needles):
    code, out, err = run_cli(capsys, "eval", "--model", str(tiny_model_dir), *argv)
    assert code == 2
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("sparsekd: error: ")
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0]


@pytest.mark.parametrize(
    "model,needles",
    [
        ("no-such-alias", ["unknown model alias 'no-such-alias'", "smollm2-135m"]),
        ("./missing/model.gguf", ["does not exist"]),
        ("/tmp/definitely/not/here", ["does not exist"]),
    ],
)
def test_bad_model_spec(capsys, model, needles):
    code, _, err = run_cli(capsys, "eval", "--model", model, "--data", "wikitext2:test")
    assert code == 2 and len(err.strip().splitlines()) == 1
    for needle in needles:
        assert needle in err


def test_offline_hub_id_fails_fast(capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", "/nonexistent-hf-home")
    code, _, err = run_cli(capsys, "eval", "--model", "someorg/not-cached-model", "--data", "wikitext2:test")
    assert code == 2
    assert "offline" in err and "not in the local Hugging Face cache" in err


def test_missing_config_file_and_unknown_field(capsys, tmp_path, tiny_model_dir):
    code, _, err = run_cli(capsys, "eval", "--config", str(tmp_path / "nope.yaml"))
    assert code == 2 and "does not exist" in err
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"model:\n  model: {tiny_model_dir}\neval:\n  ctxx: 12\n")
    code, _, err = run_cli(capsys, "eval", "--config", str(bad))
    assert code == 2 and "eval.ctxx: unknown field" in err


def test_eval_from_yaml_and_flags(capsys, tmp_path, tiny_model_dir):
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 20)
    cfg = tmp_path / "eval.yaml"
    cfg.write_text(f"model:\n  model: {tiny_model_dir}\ndata:\n  data: {text}\neval:\n  ctx: 32\n  stride: 16\n")
    code, out, _ = run_cli(capsys, "eval", "--config", str(cfg), "--protocol", "standard", "--json")
    assert code == 0
    result = json.loads(out.strip().splitlines()[-1])
    assert {"ppl", "nll", "tokens", "tokens_per_s", "protocol", "ctx", "stride"} <= set(result)
    assert result["protocol"] == "standard" and result["ctx"] == 32 and result["stride"] == 16
    assert result["tokens"] == result["text_tokens"] - 1  # standard protocol scores each token once


def test_stage_configs_directly():
    with pytest.raises(ConfigError, match=r"eval.stride=9 is larger than ctx=8.*allowed: 1 <= stride <= ctx"):
        build(EvalConfig, "eval", {"ctx": 8, "stride": 9})
    with pytest.raises(ConfigError, match="may not be part of a training corpus"):
        build(MixtureConfig, "mixture", {"components": [{"source": "wikitext2:test", "weight": 1}], "num_samples": 4})
    with pytest.raises(ConfigError, match="weight"):
        build(MixtureConfig, "mixture", {"components": [{"source": "c4:train", "weight": 0}], "num_samples": 4})
