"""What a flow's log says while a stage runs: no rate from a single point in time, and a GPU-slot wait only when
there is one (issue 27, item 7)."""

from __future__ import annotations

import contextlib
import time

import pytest


def test_the_first_progress_line_has_no_rate_and_later_ones_do(monkeypatch):
    import tasks.stages as stages

    lines: list[str] = []
    monkeypatch.setattr(stages, "run_log", lambda: lines.append)
    monkeypatch.setenv(stages.PROGRESS_SECONDS_ENV, "0")
    clock = iter([99.0, 100.0, 102.0, 104.0])  # construction, then one reading per report
    monkeypatch.setattr(stages.time, "monotonic", lambda: next(clock))
    progress = stages.SteadyProgress("distill", "step")
    progress.step(1, 5)
    progress.step(2, 5)
    progress.step(3, 5)
    assert lines[0] == "distill: step 1/5 (20%)"  # was "... 1e+09 step/s, ETA 0 s"
    assert lines[1] == "distill: step 2/5 (40%), 0.5 step/s, ETA 6 s"
    assert lines[2] == "distill: step 3/5 (60%), 0.5 step/s, ETA 4 s"


@pytest.mark.parametrize("wait, said", [(0.0, False), (0.3, True)])
def test_a_gpu_slot_wait_is_logged_only_when_the_slot_is_awaited(monkeypatch, wait, said):
    import prefect.concurrency.sync as sync

    import tasks.stages as stages

    lines: list[str] = []
    monkeypatch.setattr(stages, "run_log", lambda: lines.append)
    monkeypatch.setattr(stages, "ensure_concurrency_limit", lambda name, limit: False)
    monkeypatch.setattr(stages, "GPU_WAIT_NOTICE_SECONDS", 0.1)
    monkeypatch.setenv(stages.GPU_SLOT_ENV, "gpu-test-0")

    @contextlib.contextmanager
    def slot(name, occupy, strict):
        time.sleep(wait)  # another stage holds the slot this long
        yield

    monkeypatch.setattr(sync, "concurrency", slot)
    with stages.gpu_slot():
        pass
    time.sleep(0.2)  # a notice timer left running would fire now
    assert any("waiting for GPU slot 'gpu-test-0'" in line for line in lines) is said
