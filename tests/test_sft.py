"""SFT: response-only loss masking, the shared training loop (resume gives the same losses), the verb."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from conftest import TRAIN_TEXT
from sparsekd.cli import main
from sparsekd_core.config import SFTConfig
from sparsekd_core.downstream import chat_ids
from sparsekd_core.sft import build_sft_data, response_loss, sft


@pytest.fixture
def pairs(tmp_path):
    path = tmp_path / "pairs.jsonl"
    records = [{"prompt": f"Question {i}: what is {i} plus {i}?", "response": f"{i} + {i} = {2 * i}. #### {2 * i}"}
               for i in range(8)]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture
def val_file(tmp_path):
    path = tmp_path / "valid.txt"
    path.write_text(" ".join(TRAIN_TEXT) * 3)
    return str(path)


def test_examples_mask_exactly_the_response_tokens(pairs, tiny_tokenizer):
    data = build_sft_data(SFTConfig(data=str(pairs), out="unused", max_len=64), tiny_tokenizer)
    first = json.loads(pairs.read_text().splitlines()[0])
    prompt = chat_ids(tiny_tokenizer, first["prompt"])
    response = tiny_tokenizer(first["response"], add_special_tokens=False)["input_ids"] + [tiny_tokenizer.eos_token_id]
    assert data.input_ids[0, : len(prompt) + len(response)].tolist() == prompt + response
    assert data.loss_mask[0].tolist() == [0] * len(prompt) + [1] * len(response) + \
        [0] * (64 - len(prompt) - len(response))


def test_response_loss_by_hand_and_no_gradient_from_the_prompt(pairs, tiny_tokenizer, tiny_llama):
    data = build_sft_data(SFTConfig(data=str(pairs), out="unused", max_len=64), tiny_tokenizer)
    batch = data[[0, 1]]
    logits = tiny_llama(input_ids=batch["input_ids"]).logits.detach().requires_grad_(True)
    out = response_loss(logits, batch)
    logp = torch.log_softmax(logits.detach().double(), -1)
    terms = [-logp[b, t - 1, batch["input_ids"][b, t]] for b in range(2) for t in range(1, batch["input_ids"].shape[1])
             if batch["loss_mask"][b, t]]
    assert out.kd is None and out.ce.detach().item() == pytest.approx(float(sum(terms) / len(terms)), rel=1e-5)
    out.loss.backward()
    predicts_prompt = batch["loss_mask"][:, 1:] == 0  # position t-1 predicts token t
    assert float(logits.grad[:, :-1][predicts_prompt].abs().max()) == 0.0
    assert float(logits.grad[:, -1].abs().max()) == 0.0


def full_vocabulary_loss(logits: torch.Tensor, batch: dict) -> torch.Tensor:
    """The loss as it was computed before: the whole [B, L-1, V] logits cast to fp32, per-position CE, masked mean."""
    targets, weight = batch["input_ids"][:, 1:], batch["loss_mask"][:, 1:].float()
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                            reduction="none").reshape(targets.shape)
    return (nll * weight).sum() / weight.sum().clamp(min=1.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batches_are_cut_to_their_longest_example_and_the_loss_is_unchanged(tmp_path, tiny_tokenizer, tiny_llama,
                                                                            dtype):
    """Uneven examples: a batch is as wide as its longest example; the chunked response loss (chunks that end
    inside the batch) gives the value and the logits' gradient of the full-vocabulary fp32 CE."""
    path = tmp_path / "uneven.jsonl"
    records = [{"prompt": f"Q{i}?", "response": "word " * (2 + 3 * i)} for i in range(4)]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    data = build_sft_data(SFTConfig(data=str(path), out="unused", max_len=96), tiny_tokenizer)
    lengths = (data.loss_mask.cumsum(1).argmax(1) + 1).tolist()  # the last response token ends each example
    assert len(set(lengths)) == 4 and max(lengths) < 96
    for rows in ([0, 1], [2, 0], [3, 1, 0]):
        batch = data[rows]
        assert batch["input_ids"].shape[1] == batch["loss_mask"].shape[1] == max(lengths[r] for r in rows)
        assert torch.equal(batch["input_ids"], data.input_ids[rows, : batch["input_ids"].shape[1]])
    batch = data[[3, 1, 0]]
    with torch.no_grad():
        logits = tiny_llama(input_ids=batch["input_ids"]).logits.to(dtype)
    got_logits, ref_logits = logits.clone().requires_grad_(True), logits.clone().requires_grad_(True)
    got = response_loss(got_logits, batch, chunk=5)  # several chunks, the last one short
    ref = full_vocabulary_loss(ref_logits, batch)
    got.loss.backward()
    ref.backward()
    assert got.loss.dtype == torch.float32
    torch.testing.assert_close(got.loss, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got_logits.grad, ref_logits.grad, rtol=1e-5 if dtype == torch.float32 else 1e-2,
                               atol=1e-8 if dtype == torch.float32 else 1e-5)
    assert float(got.weight) == float(batch["loss_mask"][:, 1:].sum())


def test_sft_resumes_to_the_same_losses(tmp_path, pairs, val_file, tiny_llama, tiny_tokenizer):
    def run(name, on_step=None):
        losses = []
        cfg = SFTConfig(data=str(pairs), out=str(tmp_path / name), max_len=48, lr=1e-3, batch_size=2, epochs=2,
                        checkpoint_every=2, eval_every=3, val_data=val_file, val_tokens=64, val_ctx=32, patience=10)
        res = sft(cfg, copy.deepcopy(tiny_llama), tiny_tokenizer, "tiny", log=lambda m: None,
                  progress=lambda s, t, p: losses.append((s, p["ce"])), on_step=on_step)
        return res, losses

    full, full_losses = run("full")
    assert full.steps == 8 and full.kd_loss_first is None and full.ce_loss_last < full.ce_loss_first

    class Killed(Exception):
        pass

    def kill_at_5(step):
        if step == 5:
            raise Killed

    with pytest.raises(Killed):
        run("killed", kill_at_5)
    resumed, resumed_losses = run("killed")
    assert resumed.resumed_from_step == 4 and resumed_losses == full_losses[4:]
    assert (tmp_path / "killed" / "sft.json").is_file() and (tmp_path / "killed" / "model.safetensors").is_file()


def test_sft_verb(tmp_path, tiny_model_dir, pairs, val_file, capsys):
    argv = ["sft", "--student", str(tiny_model_dir), "--data", str(pairs), "--out", str(tmp_path / "s"),
            "--max-steps", "2", "--batch-size", "2", "--max-len", "48", "--val-data", val_file, "--val-tokens", "64",
            "--val-ctx", "32", "--json"]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["steps"] == 2 and result["kd_loss_first"] is None and result["ce_loss_first"] > 0
    assert main(argv[:-3] + ["--max-len", "1"]) == 2
