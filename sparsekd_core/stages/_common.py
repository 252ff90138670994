"""What the stage bodies share: a silent log and a progress object around a run."""

from __future__ import annotations


def quiet(message: str) -> None:
    pass


def run_with_progress(progress_factory, total: int, run):
    """``run(update)`` with a progress object of ``total`` steps (closed afterwards), or with no progress."""
    if progress_factory is None:
        return run(None)
    bar = progress_factory(total)
    try:
        return run(bar.update)
    finally:
        bar.close()
