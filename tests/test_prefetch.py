"""The training loop's data path and checkpoint cadence: the read-ahead changes no result, surfaces reader errors and
leaves no thread behind; a cache batch decodes each touched chunk once; checkpoints by wall time; run_key ignores the
cadence; AdamW is not fused on the CPU."""

from __future__ import annotations

import copy
import json
import threading

import numpy as np
import pytest
import torch
from test_distill import distill_config, make_cache, val_file  # noqa: F401  (val_file: a fixture)

import sparsekd_core.distill as distill_module
from sparsekd_core.cache import TeacherCache
from sparsekd_core.distill import BatchReader, batch_indices, distill, run_key


@pytest.fixture
def cache_path(tmp_path, tiny_llama, tiny_tokenizer):
    return make_cache(tmp_path, tiny_llama, tiny_tokenizer, "teacher.zarr", 12)


def reader_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("sparsekd-batch-reader")]


def quiet_distill(cfg, model, tokenizer, **kw):
    return distill(cfg, model, tokenizer, "tiny", log=lambda m: None, **kw)


class Killed(Exception):
    """Raised by ``kill_after``'s hook, as a kill after that step would stop the run."""


def kill_after(step_to_kill: int):
    def on_step(step: int) -> None:
        if step == step_to_kill:
            raise Killed

    return on_step


# --------------------------------------------------------------------------------------------------------------- reader


class Rows:
    """Data whose batch i is [i]; records the indices it was asked for."""

    def __init__(self, fail_at: int | None = None):
        self.asked, self.fail_at = [], fail_at

    def __getitem__(self, indices):
        self.asked.append(list(indices))
        if indices[0] == self.fail_at:
            raise OSError(f"cannot read row {self.fail_at}")
        return {"input_ids": torch.tensor([indices])}


def test_reader_reads_ahead_in_order_drops_a_wrong_guess_and_stops_at_the_end():
    data = Rows()
    reader = BatchReader(data, lambda i: [i], stop=8, device=torch.device("cpu"))
    try:
        assert [int(reader.get(i)["input_ids"]) for i in range(3)] == [0, 1, 2]
        assert int(reader.get(6)["input_ids"]) == 6  # not the one read ahead (3): read on the spot
        assert int(reader.get(7)["input_ids"]) == 7
        assert reader.pending is None  # nothing past `stop` is read
    finally:
        reader.close()
    # The read of 3 was cancelled, or ran and was thrown away: its thread raced the call for 6.
    assert data.asked[:3] == [[0], [1], [2]] and sorted(data.asked[3:]) in ([[6], [7]], [[3], [6], [7]])
    assert reader.waited > 0 and not reader_threads()


def test_reader_without_read_ahead_reads_only_what_is_asked():
    data = Rows()
    reader = BatchReader(data, lambda i: [i], stop=8, device=torch.device("cpu"), ahead=False)
    assert [int(reader.get(i)["input_ids"]) for i in (0, 1, 5)] == [0, 1, 5]
    reader.close()
    assert data.asked == [[0], [1], [5]]


def test_a_reader_exception_is_raised_by_get_in_the_caller():
    reader = BatchReader(Rows(fail_at=2), lambda i: [i], stop=8, device=torch.device("cpu"))
    try:
        reader.get(0)
        reader.get(1)  # starts the read of 2 on the reader thread, which fails there
        with pytest.raises(OSError, match="cannot read row 2"):
            reader.get(2)
    finally:
        reader.close()
    assert not reader_threads()


# ------------------------------------------------------------------------------------------------------------- the loop


def test_read_ahead_gives_bit_identical_training(tmp_path, cache_path, val_file,  # noqa: F811
                                                 tiny_llama, tiny_tokenizer, monkeypatch):
    """The same weights, loss history and validation curve with and without the read-ahead, reading exactly the
    sequences of every micro-step in order (grad_accum 2, a NaN step skipped), and the wait is reported."""
    real_getitem = TeacherCache.__getitem__
    real_forward = distill_module.KDLoss.forward
    seen, calls = [], [0]

    def spy(self, indices):
        seen.append([int(i) for i in indices])
        return real_getitem(self, indices)

    def nan_at_third_call(self, *a):
        out = real_forward(self, *a)
        calls[0] += 1
        if calls[0] == 3:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(TeacherCache, "__getitem__", spy)
    monkeypatch.setattr(distill_module.KDLoss, "forward", nan_at_third_call)
    runs = {}
    for ahead in (True, False):
        monkeypatch.setattr(distill_module, "PREFETCH", ahead)
        seen.clear()
        calls[0] = 0
        postfixes = []
        cfg = distill_config(tmp_path, f"ahead-{ahead}", cache_path, val_file, max_steps=5, batch_size=2, epochs=2,
                             grad_accum=2, eval_every=2, seed=7)
        res = quiet_distill(cfg, copy.deepcopy(tiny_llama), tiny_tokenizer,
                            progress=lambda s, t, p: postfixes.append(p))
        runs[ahead] = (res, list(seen), json.loads((tmp_path / f"ahead-{ahead}" / "distill.json").read_text()),
                       postfixes)
    from safetensors.torch import load_file

    (res_on, seen_on, json_on, post_on), (res_off, seen_off, json_off, _) = runs[True], runs[False]
    expected = [batch_indices(m, 12, 2, 7) for m in range(5 * 2)]
    assert seen_on == seen_off == expected
    assert res_on.bad_steps == res_off.bad_steps == 1
    assert json_on["loss_history"] == json_off["loss_history"] and json_on["val_history"] == json_off["val_history"]
    on, off = (load_file(tmp_path / f"ahead-{a}" / "model.safetensors") for a in (True, False))
    assert on.keys() == off.keys() and all(torch.equal(on[k], off[k]) for k in on)
    assert 0 < json_on["data_wait_seconds"] <= json_on["train_seconds"]
    assert len(post_on) == 5 and all(p["wait_s"] >= 0 for p in post_on)
    assert not reader_threads()


def test_a_reader_exception_stops_training_and_no_thread_is_left(tmp_path, cache_path, val_file,  # noqa: F811
                                                                 tiny_llama, tiny_tokenizer, monkeypatch):
    real_getitem, calls = TeacherCache.__getitem__, [0]

    def fails_on_the_fourth_read(self, indices):
        calls[0] += 1
        if calls[0] == 4:  # read ahead, on the reader thread
            raise OSError("the store went away")
        return real_getitem(self, indices)

    monkeypatch.setattr(TeacherCache, "__getitem__", fails_on_the_fourth_read)
    cfg = distill_config(tmp_path, "broken", cache_path, val_file, max_steps=6)
    with pytest.raises(OSError, match="the store went away"):
        quiet_distill(cfg, copy.deepcopy(tiny_llama), tiny_tokenizer)
    assert not reader_threads()

    monkeypatch.setattr(TeacherCache, "__getitem__", real_getitem)
    with pytest.raises(Killed):  # an exception of the training thread, with a read in flight
        quiet_distill(distill_config(tmp_path, "killed", cache_path, val_file, max_steps=6),
                      copy.deepcopy(tiny_llama), tiny_tokenizer, on_step=kill_after(2))
    assert not reader_threads()


# ---------------------------------------------------------------------------------------------------------- checkpoints


def test_checkpoints_by_wall_time_and_by_steps(tmp_path, cache_path, val_file, tiny_llama, tiny_tokenizer,  # noqa: F811
                                               monkeypatch):
    """checkpoint_minutes: a checkpoint once the clock passed the interval since the last one; checkpoint_every:
    every N steps; both: either; neither: only the final one."""
    now = [1000.0]
    monkeypatch.setattr(distill_module, "_clock", lambda: now[0])
    real_save, saved = distill_module.save_checkpoint, []

    def spy(path, model, optimizer_state, state):
        saved.append((state["step"], state["finished"]))
        real_save(path, model, optimizer_state, state)

    monkeypatch.setattr(distill_module, "save_checkpoint", spy)

    def clock_moves(step):  # after step 2 and after step 5 the clock jumps past ten minutes
        if step in (2, 5):
            now[0] += 601

    cases = {"minutes": (dict(checkpoint_every=None, checkpoint_minutes=10), [(3, False), (6, False), (8, True)]),
             "off": (dict(checkpoint_every=None, checkpoint_minutes=0), [(8, True)]),
             "steps": (dict(checkpoint_every=3, checkpoint_minutes=0), [(3, False), (6, False), (8, True)]),
             "either": (dict(checkpoint_every=4, checkpoint_minutes=10),
                        [(3, False), (4, False), (6, False), (8, True)])}
    for name, (cadence, expected) in cases.items():
        saved.clear()
        cfg = distill_config(tmp_path, name, cache_path, val_file, max_steps=8, eval_every=0, **cadence)
        quiet_distill(cfg, copy.deepcopy(tiny_llama), tiny_tokenizer, on_step=clock_moves)
        assert saved == expected, name


def test_checkpoint_cadence_is_not_part_of_the_run(tmp_path, cache_path, val_file, tiny_llama,  # noqa: F811
                                                   tiny_tokenizer, monkeypatch):
    """run_key ignores checkpoint_every and checkpoint_minutes: a run killed under one cadence resumes under another
    to the weights of an uninterrupted run. AdamW is not fused on the CPU."""
    base = distill_config(tmp_path, "run", cache_path, val_file, max_steps=6)
    key = run_key(base, {"data": 1}, "tiny")
    assert key == run_key(base.model_copy(update={"checkpoint_every": None, "checkpoint_minutes": 0.5}), {"data": 1},
                          "tiny")
    assert key != run_key(base.model_copy(update={"lr": 2e-3}), {"data": 1}, "tiny")

    fused = []

    class RecordingAdamW(torch.optim.AdamW):
        def __init__(self, *a, **kw):
            fused.append(kw.get("fused"))
            super().__init__(*a, **kw)

    monkeypatch.setattr(torch.optim, "AdamW", RecordingAdamW)
    reference = quiet_distill(distill_config(tmp_path, "reference", cache_path, val_file, max_steps=6),
                              copy.deepcopy(tiny_llama), tiny_tokenizer)

    with pytest.raises(Killed):
        quiet_distill(base.model_copy(update={"checkpoint_every": 4}), copy.deepcopy(tiny_llama), tiny_tokenizer,
                      on_step=kill_after(5))
    resumed = quiet_distill(base.model_copy(update={"checkpoint_every": None, "checkpoint_minutes": 30}),
                            copy.deepcopy(tiny_llama), tiny_tokenizer)
    assert resumed.resumed_from_step == 4 and resumed.steps == reference.steps == 6
    from safetensors.torch import load_file

    got, expected = (load_file(f"{r.out}/model.safetensors") for r in (resumed, reference))
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    assert fused == [False, False, False]


# ---------------------------------------------------------------------------------------------------------- cache reads


def test_a_cache_batch_decodes_each_touched_chunk_once(cache_path, monkeypatch):
    """Zarr's orthogonal selection groups the rows by chunk: a batch decodes each chunk it touches once per array,
    however many of its rows lie there and in whatever order; the rows equal a plain slice read."""
    from zarr.codecs import BloscCodec

    decoded = []
    real = BloscCodec._decode_single

    async def counting(self, chunk_bytes, chunk_spec):
        decoded.append(chunk_spec.shape)
        return await real(self, chunk_bytes, chunk_spec)

    monkeypatch.setattr(BloscCodec, "_decode_single", counting)
    cache = TeacherCache(cache_path)  # 12 sequences, chunks of 4, format 2: 5 arrays read per batch
    arrays = 5
    for rows, chunks in (([2, 0, 3, 1], 1), ([5], 1), ([9, 1, 2, 10, 3], 2), ([11, 0, 6, 4], 3)):
        decoded.clear()
        batch = cache[rows]
        assert len(decoded) == arrays * chunks, rows
        expected = slice_read(cache, rows)
        assert batch.keys() == expected.keys()
        for name, values in expected.items():
            assert batch[name].dtype == values.dtype and torch.equal(batch[name], values), name


def slice_read(cache: TeacherCache, rows: list[int]) -> dict[str, torch.Tensor]:
    """What ``cache[rows]`` must give, from whole-array reads indexed in numpy (the reader as it was before it kept
    its arrays open)."""
    from sparsekd_core.cache import decode_logprobs

    def read(name: str) -> np.ndarray:
        return cache.group[name][:][np.asarray(rows)]

    out = {name: torch.from_numpy(read(name).astype(np.int64)) for name in ("input_ids", "topk_ids")}
    out["tail_logmass"] = torch.from_numpy(read("tail_logmass"))
    out["topk_logprobs"] = torch.from_numpy(decode_logprobs(read("topk_top"), read("topk_codes"), cache.step))
    return out
