"""GSM8K accuracy: the answer filter on real GSM8K answers, batched greedy generation, the reference log-likelihood."""

from __future__ import annotations

import pytest
import torch

from conftest import make_model
from sparsekd_core.data import gsm8k_records
from sparsekd_core.downstream import final_number, generate, gsm8k_accuracy, prompt_text, reference_loglik, retention


def test_final_number_on_real_gsm8k_answers():
    records = gsm8k_records("gsm8k:test")
    assert len(records) == 1319
    for r in records:
        after = r["answer"].rsplit("####", 1)[1].strip()
        assert final_number(r["answer"]) == final_number(after) is not None, r["answer"]
    assert final_number(records[0]["answer"]) == "18"  # Janet's ducks


@pytest.mark.parametrize("text, expected", [
    ("so she pays $1,200.\n#### 1,200", "1200"),
    ("The answer is 42.", "42"),
    ("First 3 apples, then 5 more: 8", "8"),
    ("#### 7.50 dollars", "7.5"),
    ("#### -3", "-3"),
    ("no digits here", None),
    ("#### 12\nThen 99", "12"),
])
def test_final_number(text, expected):
    assert final_number(text) == expected


def test_batched_generation_equals_one_at_a_time(tiny_tokenizer):
    model = make_model("llama", len(tiny_tokenizer))
    prompts = [tiny_tokenizer(t, add_special_tokens=False)["input_ids"] for t in
               ["Question: 2 + 2?", "Natalia sold clips to 48 of her friends", "def add(a, b):"]]
    batched = generate(model, tiny_tokenizer, prompts, max_new_tokens=6, batch_size=3)
    single = [generate(model, tiny_tokenizer, [p], max_new_tokens=6, batch_size=1)[0] for p in prompts]
    assert batched == single and all(len(o) <= 6 for o in batched)


def test_reference_loglik_by_hand_and_accuracy_fields(tiny_tokenizer):
    model = make_model("llama", len(tiny_tokenizer))
    records = [{"question": "Tom has 3 apples and buys 4. How many?", "answer": "3 + 4 = 7\n#### 7"}]
    prompt = tiny_tokenizer(prompt_text(tiny_tokenizer, records[0]["question"]), add_special_tokens=False)["input_ids"]
    answer = tiny_tokenizer(records[0]["answer"], add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + answer])).logits[0].double()
    expected = sum(float(torch.log_softmax(logits[len(prompt) - 1 + i], -1)[t]) for i, t in enumerate(answer))
    assert reference_loglik(model, tiny_tokenizer, records) == pytest.approx(expected / len(answer), rel=1e-5)
    result = gsm8k_accuracy(model, tiny_tokenizer, records * 2, max_new_tokens=4, batch_size=2)
    assert result.problems == 2 and 0 <= result.correct <= 2 and result.accuracy == result.correct / 2
    assert retention(0.2, 0.4) == 0.5 and retention(0.1, 0.0) is None


def test_cli_eval_gsm8k_json(tmp_path, tiny_model_dir, capsys):
    import json

    from sparsekd.cli import main

    problems = tmp_path / "gsm.jsonl"
    problems.write_text("".join(json.dumps(r) + "\n" for r in gsm8k_records("gsm8k:test")[:5]))
    assert main(["eval", "--kind", "gsm8k", "--model", str(tiny_model_dir), "--data", str(problems),
                 "--max-problems", "3", "--max-new-tokens", "4", "--batch-size", "2", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["kind"] == "gsm8k" and result["problems"] == 3 and 0 <= result["accuracy"] <= 1
    assert result["reference_loglik"] < 0 and result["examples"][0]["reference"] == "18"
    assert main(["eval", "--model", str(tiny_model_dir), "--max-problems", "3"]) == 2
    assert "--kind gsm8k only" in capsys.readouterr().err


def test_lm_eval_scores_a_factored_checkpoint_as_sparsekd_loads_it(tmp_path, tiny_model_dir, capsys):
    """lm-evaluation-harness on the packaged WikiText-2 task, offline: on a dense model and on an SVD-pruned
    (factored) one, which it gets as the in-memory module (no dense export)."""
    import json
    import math

    from sparsekd.cli import main

    calib = tmp_path / "calib.txt"
    calib.write_text("The quick brown fox jumps over the lazy dog. " * 60)
    assert main(["prune", "--model", str(tiny_model_dir), "--target-reduction", "0.5", "--calibration", str(calib),
                 "--calibration-samples", "2", "--calibration-seq-len", "16", "--out", str(tmp_path / "p")]) == 0
    scores = {}
    for name, model in (("dense", tiny_model_dir), ("pruned", tmp_path / "p")):
        capsys.readouterr()
        assert main(["eval", "--kind", "lm-eval", "--model", str(model), "--limit", "2", "--json"]) == 0
        result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        metrics = result["results"]["wikitext2_sparsekd"]
        assert math.isfinite(metrics["word_perplexity"]) and metrics["bits_per_byte"] > 0
        scores[name] = metrics["bits_per_byte"]
    assert scores["dense"] != scores["pruned"]  # the factored model itself was scored
    assert main(["eval", "--kind", "lm-eval", "--model", str(tiny_model_dir), "--tasks", "no_such_task"]) == 2
