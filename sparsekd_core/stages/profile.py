"""The profile stage body: several models timed side by side, and the files that show it."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

from ..config import ProfileConfig
from ._common import quiet


def profile_models(models: Sequence[tuple[str, Callable[[], object]]], cfg: ProfileConfig, *,
                   log=quiet) -> list[dict]:
    """Profile several models side by side: ``models`` is ``[(label, load)]`` where ``load()`` returns a
    LoadedModel, called one at a time so that one model is in memory at once; the first is the baseline of the
    speedups (``profile.add_speedups``). One row per model × batch size × sequence length."""
    from ..profile import add_speedups, profile_model

    def cell(r: dict) -> None:
        log(f"  batch {r['batch_size']:>3} seq {r['seq_len']:>4}: TTFT {r['ttft_ms']:.1f} ms, TPOT "
            f"{r['tpot_ms']:.2f} ms, attention {r['attention_ms']:.1f} ms, FFN {r['ffn_ms']:.1f} ms")

    results: list[dict] = []
    for index, (label, load) in enumerate(models):
        loaded = load()
        log(f"profile: {label} on {loaded.device.type} {str(loaded.dtype).removeprefix('torch.')}")
        results += profile_model(label, loaded.model, cfg, index, progress=cell)
        del loaded
    return add_speedups(results)


def save_profile(results: list[dict], out: str | Path) -> str:
    """Write ``profile.json``, ``profile.md`` and ``speedup.png`` into ``out``; returns the Markdown table."""
    from ..files import write_json_atomic, write_text_atomic
    from ..profile import markdown_table, speedup_plot

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    table = markdown_table(results)
    write_json_atomic(out / "profile.json", {"results": results})
    write_text_atomic(out / "profile.md", table)
    speedup_plot(results, out / "speedup.png")
    return table
