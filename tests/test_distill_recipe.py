"""The training recipe's phases one at a time (distill.TrainRecipe): the TrainState round trip, the step plan, one
step (weights move, pruned zeros stay zero, a NaN step is skipped), validate (eval's perplexity, the best model, an
early stop), checkpoint then resume (the same state, then the same steps), and a run published then recovered."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from conftest import TRAIN_TEXT
from sparsekd_core import dist
from sparsekd_core.config import ConfigError, EvalConfig, TrainConfig
from sparsekd_core.distill import DistillError, StepLosses, TrainRecipe, TrainState, plan_steps
from sparsekd_core.kd_loss import KDLossOutput

SEQUENCES, LENGTH = 12, 16


@pytest.fixture
def val_file(tmp_path):
    path = tmp_path / "valid.txt"
    path.write_text(" ".join(TRAIN_TEXT) * 3)
    return str(path)


class Tokens:
    """Random token sequences: ``data[indices]`` is the batch {"input_ids": [B, LENGTH]}."""

    def __init__(self, vocab: int):
        self.ids = torch.randint(0, vocab, (SEQUENCES, LENGTH), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return SEQUENCES

    def __getitem__(self, indices) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[indices]}


def next_token_loss(logits: torch.Tensor, batch: dict) -> KDLossOutput:
    """Plain next-token cross-entropy, no KD term (as SFT's loss)."""
    ce = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch["input_ids"][:, 1:].flatten())
    return KDLossOutput(loss=ce, kd=None, ce=ce)


def train_config(tmp_path, val_file, **overrides) -> TrainConfig:
    values = dict(out=str(tmp_path / "run"), val_data=val_file, val_tokens=64, val_ctx=32, lr=1e-2, batch_size=2,
                  max_steps=6, eval_every=2, patience=10, checkpoint_every=None, checkpoint_minutes=0)
    return TrainConfig(**(values | overrides))


def set_up(cfg: TrainConfig, model, tokenizer, loss_fn=next_token_loss, key: str = "run"):
    """A recipe for ``model`` on ``Tokens``, set up (resumed when ``cfg.out`` holds a checkpoint of ``key``)."""
    recipe = TrainRecipe(dist.Ranks(), cfg, "test", model, tokenizer, loss_fn, log=lambda message: None)
    state = recipe.setup(Tokens(model.config.vocab_size), key)
    return recipe, state


def weights(model) -> dict[str, torch.Tensor]:
    return {name: t.detach().clone() for name, t in model.state_dict().items()}


def assert_same_state(got: TrainState, expected: dict) -> None:
    got = got.as_dict()
    assert list(got) == list(expected)
    for name, value in expected.items():
        if name == "rng":
            assert torch.equal(got[name]["torch"], value["torch"])
        else:
            assert got[name] == value, name


# ------------------------------------------------------------------------------------------------------------ state


def test_state_round_trips_through_the_checkpoint_dict():
    state = TrainState(step=4, micro_index=8, best_ppl=12.5, best_step=3, history=[(0, 20.0), (3, 12.5)],
                       kd_first=None, ce_first=5.0, tokens=256, run_key="k", loss_history=[(1, 5.0, None, 5.0)])
    saved = state.as_dict()
    # state.pt's keys, in the order the loop has always written them: older checkpoints stay readable.
    assert list(saved) == ["step", "micro_index", "best_ppl", "best_step", "best_counts", "history", "kd_first",
                           "ce_first", "kd_last", "ce_last", "bad_in_row", "bad_total", "tokens", "train_seconds",
                           "data_wait_seconds", "rng", "run_key", "finished", "stop_reason", "loss_history"]
    assert TrainState.from_dict(saved) == state
    assert TrainState.from_dict(saved | {"history": [[0, 20.0], [3, 12.5]]}).history == [(0, 20.0), (3, 12.5)]
    assert TrainState.from_dict({"step": 2}) == TrainState(step=2)


def test_record_update_and_skip():
    state = TrainState(step=2, bad_in_row=1)
    losses = StepLosses()
    losses.add(3.0, None, 3.0, grad_accum=2)
    losses.add(5.0, None, 5.0, grad_accum=2)
    state.record_update(losses)
    assert (state.kd_first, state.ce_first, state.ce_last, state.bad_in_row) == (None, 4.0, 4.0, 0)
    assert state.loss_history == [(3, 4.0, None, 4.0)]  # the update that step 2 -> 3 makes
    state.record_skip()
    state.record_skip()
    assert (state.bad_in_row, state.bad_total) == (2, 2)


def test_plan_steps():
    cfg = TrainConfig(out="o", batch_size=2, grad_accum=2, epochs=2)
    assert plan_steps(12, cfg, "test") == (6, 1)  # 3 steps an epoch; warmup a twentieth, at least 1
    assert plan_steps(12, cfg.model_copy(update={"max_steps": 4, "warmup_steps": 2}), "test") == (4, 2)
    with pytest.raises(ConfigError, match="fewer than one step"):
        plan_steps(3, cfg, "test")


# ------------------------------------------------------------------------------------------------------------- step


def test_one_step_moves_the_weights_and_keeps_pruned_zeros_zero(tmp_path, val_file, tiny_llama, tiny_tokenizer,
                                                                monkeypatch):
    import sparsekd_core.prune.masks as masks_module

    model = copy.deepcopy(tiny_llama)
    pruned = "model.layers.0.mlp.down_proj.weight"
    matrix = model.get_parameter(pruned)
    with torch.no_grad():
        matrix[:, ::2] = 0.0  # half the entries, as a WANDA round would leave them
    mask = matrix == 0
    monkeypatch.setattr(masks_module, "unstructured_masks", lambda m: {pruned: mask.clone()})
    recipe, state = set_up(train_config(tmp_path, val_file, grad_accum=2, weight_decay=0.1), model, tiny_tokenizer)
    before = weights(model)
    try:
        postfix = recipe.step(state)
    finally:
        recipe.close()
    after = weights(model)
    assert (state.step, state.micro_index, state.tokens) == (1, 2, 2 * 2 * LENGTH)
    assert [h[0] for h in state.loss_history] == [1] and state.kd_first is None and state.ce_first == postfix["ce"]
    assert set(postfix) == {"loss", "kd", "ce", "tok/s", "wait_s"} and postfix["kd"] == 0.0
    assert all(p.grad is None for p in model.parameters())  # cleared for the next step
    assert torch.equal(after[pruned] == 0, mask)  # zero exactly where pruned, weight decay notwithstanding
    assert (after[pruned] != before[pruned])[~mask].float().mean() > 0.9
    assert not torch.equal(after["model.layers.1.mlp.up_proj.weight"], before["model.layers.1.mlp.up_proj.weight"])
    assert not recipe.guard.handles  # close() took the hooks off the caller's model


def test_a_non_finite_step_is_skipped_counted_and_at_last_refused(tmp_path, val_file, tiny_llama, tiny_tokenizer):
    def nan_loss(logits, batch):
        out = next_token_loss(logits, batch)
        return KDLossOutput(loss=out.loss * float("nan"), kd=None, ce=out.ce)

    model = copy.deepcopy(tiny_llama)
    recipe, state = set_up(train_config(tmp_path, val_file, max_bad_steps=2), model, tiny_tokenizer, nan_loss)
    before = weights(model)
    try:
        recipe.step(state)
        assert (state.step, state.micro_index, state.bad_in_row, state.bad_total) == (1, 1, 1, 1)
        assert state.loss_history == [] and all(torch.equal(before[k], v) for k, v in weights(model).items())
        with pytest.raises(DistillError, match=r"2 steps in a row \(steps 1\.\.2\)"):
            recipe.step(state)
    finally:
        recipe.close()


# --------------------------------------------------------------------------------------------------------- validate


def test_validate_gives_eval_perplexity_and_keeps_the_best_model(tmp_path, val_file, tiny_llama, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    from sparsekd_core.data import load_text
    from sparsekd_core.eval import perplexity, tokenize_text

    model = copy.deepcopy(tiny_llama)
    ids = tokenize_text(tiny_tokenizer, load_text(val_file), 64)
    expected = perplexity(model, ids, EvalConfig(ctx=32, stride=32, protocol="standard", batch_size=1)).ppl
    recipe, state = set_up(train_config(tmp_path, val_file), model, tiny_tokenizer)
    try:
        assert recipe.evaluate() == expected
        assert recipe.validate(state) is None
        assert state.history == [(0, expected)] and (state.best_ppl, state.best_step) == (expected, 0)
        assert state.best_counts["mlp_params"] > 0
        assert AutoModelForCausalLM.from_pretrained(recipe.best_dir).config.vocab_size == model.config.vocab_size
        assert recipe.validate(state) is None and len(state.history) == 1  # once per step
        state.step = 1
        assert recipe.validate(state) is None and len(state.history) == 1  # not a validation step (eval_every 2)
    finally:
        recipe.close()


def test_validate_stops_a_run_that_got_worse(tmp_path, val_file, tiny_llama, tiny_tokenizer):
    recipe, state = set_up(train_config(tmp_path, val_file, patience=1), copy.deepcopy(tiny_llama), tiny_tokenizer)
    try:
        state.step, state.history, state.best_ppl, state.best_step = 2, [(0, 1.0)], 1.0, 0  # a ppl no model reaches
        assert recipe.validate(state) == "degraded"
        assert state.best_step == 0 and len(state.history) == 2
        state.step = recipe.total  # at the last step the run ends anyway: no early stop
        assert recipe.validate(state) is None
    finally:
        recipe.close()


# ------------------------------------------------------------------------------------------------ checkpoint/resume


def test_checkpoint_then_resume_restores_the_state_and_continues_identically(tmp_path, val_file, tiny_llama,
                                                                             tiny_tokenizer):
    cfg = train_config(tmp_path, val_file)
    recipe, state = set_up(cfg, copy.deepcopy(tiny_llama), tiny_tokenizer)
    try:
        recipe.validate(state)
        recipe.step(state)
        recipe.step(state)
        recipe.checkpoint(state)
        saved, saved_weights = copy.deepcopy(state.as_dict()), weights(recipe.model)
        recipe.step(state)
        recipe.step(state)
    finally:
        recipe.close()
    uninterrupted, uninterrupted_weights = state, weights(recipe.model)

    torch.manual_seed(1234)  # another process: its RNG is elsewhere until the resume restores it
    resumed, state = set_up(cfg, copy.deepcopy(tiny_llama), tiny_tokenizer)  # a fresh model, as after a kill
    try:
        assert resumed.resumed_from == 2
        assert_same_state(state, saved)
        assert torch.equal(torch.get_rng_state(), saved["rng"]["torch"])  # the RNG is where it was saved
        assert all(torch.equal(saved_weights[k], v) for k, v in weights(resumed.model).items())
        assert resumed.optimizer.state_dict()["state"].keys() == recipe.optimizer.state_dict()["state"].keys()
        resumed.step(state)
        resumed.step(state)
    finally:
        resumed.close()
    assert state.loss_history == uninterrupted.loss_history and state.micro_index == uninterrupted.micro_index
    assert all(torch.equal(uninterrupted_weights[k], v) for k, v in weights(resumed.model).items())


def test_resume_refuses_a_checkpoint_of_another_run(tmp_path, val_file, tiny_llama, tiny_tokenizer):
    cfg = train_config(tmp_path, val_file)
    recipe, state = set_up(cfg, copy.deepcopy(tiny_llama), tiny_tokenizer, key="one")
    try:
        recipe.checkpoint(state)
    finally:
        recipe.close()
    with pytest.raises(ConfigError, match="checkpoint of a different run"):
        set_up(cfg, copy.deepcopy(tiny_llama), tiny_tokenizer, key="another")


# -------------------------------------------------------------------------------------------------------- publish


def test_run_then_publish_then_recover(tmp_path, val_file, tiny_llama, tiny_tokenizer):
    """The loop to the end, the published result, and a second call that finds the run done."""
    import json

    cfg = train_config(tmp_path, val_file, max_steps=3)
    recipe, state = set_up(cfg, copy.deepcopy(tiny_llama), tiny_tokenizer)
    recipe.run(state)
    assert state.finished and state.stop_reason == "max_steps" and state.step == 3
    assert [s for s, _ in state.history] == [0, 2, 3]
    result = recipe.publish(state, self_referential=False, extra={"data": "tokens"})
    done = json.loads((tmp_path / "run" / "test.json").read_text())
    assert done["run_key"] == "run" and done["data"] == "tokens" and len(done["loss_history"]) == 3
    assert result.steps == 3 and result.val_history == [list(h) for h in state.history]
    assert not (tmp_path / "run" / "checkpoint").exists() and not (tmp_path / "run" / "best").exists()
    again = TrainRecipe(dist.Ranks(), cfg, "test", copy.deepcopy(tiny_llama), tiny_tokenizer, next_token_loss,
                        log=lambda message: None)
    assert again.recover("run") == result
    with pytest.raises(ConfigError, match="different finished run"):
        again.recover("another")
