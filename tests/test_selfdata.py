"""Self-data generation: kept/dropped by the GSM8K answer filter, resume after a kill, refusal of a foreign store."""

from __future__ import annotations

import json

import pytest

from sparsekd.cli import main
from sparsekd_core.config import ConfigError, ModelConfig, SelfDataConfig
from sparsekd_core.data import gsm8k_records
from sparsekd_core.models import load_model
from sparsekd_core.selfdata import run_selfdata


@pytest.fixture
def problems(tmp_path):
    path = tmp_path / "gsm.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in gsm8k_records("gsm8k:train")[:6]))
    return path


def test_filter_keeps_only_rewrites_with_the_reference_answer(tmp_path, tiny_model_dir, problems, monkeypatch):
    import sparsekd_core.downstream as downstream

    loaded = load_model(ModelConfig(model=str(tiny_model_dir)), log=lambda m: None)
    refs = [r["answer"].rsplit("####", 1)[1].strip() for r in gsm8k_records("gsm8k:train")[:6]]
    # A stand-in generator: the right answer for even records, a wrong one for odd ones, no number for the last.
    answers = iter([f"So it is {refs[0]}.\n#### {refs[0]}", "#### 123456789", f"#### {refs[2]}",
                    "#### 987654321", f"#### {refs[4]}", "I do not know."])
    monkeypatch.setattr(downstream, "generate", lambda model, tok, prompts, *a, **k: [
        tok(next(answers), add_special_tokens=False)["input_ids"] for _ in prompts])
    cfg = SelfDataConfig(out=str(tmp_path / "self.jsonl"), data=str(problems), batch_size=2, chunk_size=2)
    res = run_selfdata(loaded, cfg, log=lambda m: None)
    assert (res.records, res.kept, res.dropped, res.no_answer) == (6, 3, 3, 1)
    kept = [json.loads(line) for line in (tmp_path / "self.jsonl").read_text().splitlines()]
    assert [row["response"].rsplit("####", 1)[1].strip() for row in kept] == [refs[0], refs[2], refs[4]]
    assert set(kept[0]) == {"prompt", "response"} and not (tmp_path / "self.jsonl.work").exists()


def test_resume_after_a_kill_generates_only_the_missing_chunks(tmp_path, tiny_model_dir, problems, capsys,
                                                              monkeypatch):
    import sparsekd_core.selfdata as selfdata

    argv = ["selfdata", "--model", str(tiny_model_dir), "--data", str(problems), "--num-samples", "6",
            "--max-new-tokens", "6", "--batch-size", "2", "--chunk-size", "2", "--json"]
    assert main(argv + ["--out", str(tmp_path / "full.jsonl")]) == 0
    full = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert full["records"] == 6 and full["kept"] + full["dropped"] == 6 and full["computed_chunks"] == 3

    real, committed = selfdata.write_text_atomic, []

    def interrupted_after_two_chunks(path, text):
        if "chunk-" in str(path) and len(committed) == 2:
            raise KeyboardInterrupt  # leaves what a kill leaves: two committed chunks, nothing else
        committed.append(path)
        return real(path, text)

    monkeypatch.setattr(selfdata, "write_text_atomic", interrupted_after_two_chunks)
    assert main(argv + ["--out", str(tmp_path / "killed.jsonl")]) == 130
    monkeypatch.setattr(selfdata, "write_text_atomic", real)
    assert not (tmp_path / "killed.jsonl").exists()
    capsys.readouterr()
    assert main(argv + ["--out", str(tmp_path / "killed.jsonl")]) == 0
    resumed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert resumed["resumed_chunks"] == 2 and resumed["computed_chunks"] == 1
    assert (tmp_path / "killed.jsonl").read_text() == (tmp_path / "full.jsonl").read_text()
    assert main(argv + ["--out", str(tmp_path / "killed.jsonl")]) == 0  # finished: nothing to do
    assert main(argv[:-1] + ["--max-new-tokens", "7", "--out", str(tmp_path / "killed.jsonl")]) == 2
    assert "another run" in capsys.readouterr().err


def test_config_and_record_errors(tmp_path):
    from sparsekd_core.selfdata import instruction_records

    with pytest.raises(ValueError, match="does not divide"):
        SelfDataConfig(out="x.jsonl", batch_size=3, chunk_size=4)
    with pytest.raises(ValueError, match="jsonl"):
        SelfDataConfig(out="x.txt")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "no fields"}\n')
    with pytest.raises(ConfigError, match="prompt/response"):
        instruction_records(str(bad))
    alpaca = tmp_path / "alpaca.jsonl"
    alpaca.write_text('{"instruction": "Say hi.", "output": "Hi."}\n')
    assert instruction_records(str(alpaca)) == ([{"prompt": "Say hi.", "response": "Hi."}], False)


def test_any_hugging_face_dataset_online_and_a_clear_error_offline(monkeypatch):
    import datasets

    import sparsekd_core.models as models
    from sparsekd_core.config import check_data_spec
    from sparsekd_core.data import DataUnavailableError
    from sparsekd_core.selfdata import instruction_records

    assert check_data_spec("hf:tatsu-lab/alpaca:train@100") == "hf:tatsu-lab/alpaca:train@100"
    with pytest.raises(ValueError, match="hf:org/name:split"):
        check_data_spec("hf:alpaca")
    with pytest.raises(DataUnavailableError, match="hub is not reachable"):
        instruction_records("hf:tatsu-lab/alpaca:train")
    calls = []

    def fake_load(repo, config, split, streaming):
        calls.append((repo, config, split, streaming))
        return iter({"instruction": f"Say {i}.", "output": f"{i}.", "input": ""} for i in range(10))

    monkeypatch.setattr(models, "hub_reachable", lambda *a, **k: True)
    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    records, is_gsm8k = instruction_records("hf:tatsu-lab/alpaca:default:train@3")
    assert records == [{"prompt": f"Say {i}.", "response": f"{i}."} for i in range(3)] and not is_gsm8k
    assert calls == [("tatsu-lab/alpaca", "default", "train", True)]
