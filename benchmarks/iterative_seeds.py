"""Several seeds of the iterative flow, side by side: per round the post-KD perplexity of each run, their mean and
range, and the post / dense ratio beside the paper's Table III (Qwen3-0.6B, WikiText-2: shown for a WikiText-2 set at
the paper's sparsity of that round only; compare ratios, not values).

    python benchmarks/iterative_seeds.py docs/results/study-v2/iterative-8round-smollm2 \
        docs/results/study-v2/iterative-8round-smollm2/seed43 --set wikitext2

Each argument is a directory holding an iterative report's ``metrics.json`` and ``config.json`` (the flow writes both
beside its report). Runs must share everything but the seed (checked: the configs must agree but for seed/workdir).
The spread of 2-3 seeds is a range, not a standard deviation worth quoting.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sparsekd_core.report import PAPER_TABLE_III, PAPER_TABLE_III_DENSE  # noqa: E402

IGNORED = {"seed", "workdir"}


def load(directory: Path) -> tuple[dict, dict]:
    metrics = json.loads((directory / "metrics.json").read_text(encoding="utf-8"))
    config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    return metrics, config


def table(runs: list[tuple[dict, dict]], eval_set: str) -> str:
    base = {k: v for k, v in runs[0][1].items() if k not in IGNORED}
    for _, config in runs[1:]:
        other = {k: v for k, v in config.items() if k not in IGNORED}
        if other != base:
            differ = sorted(k for k in set(base) | set(other) if base.get(k) != other.get(k))
            raise SystemExit(f"the runs differ in more than their seed: {', '.join(differ)}")
    seeds = [config["seed"] for _, config in runs]
    if len(set(seeds)) != len(seeds):
        raise SystemExit(f"seeds {seeds}: each run must be another seed")
    dense = [m[f"ppl_dense_{eval_set}"] for m, _ in runs]
    if max(dense) - min(dense) > 1e-6 * max(dense):
        raise SystemExit(f"the dense perplexities differ ({dense}): not the same model or eval set")
    # The paper's Table III is WikiText-2: its ratios sit beside a WikiText-2 set only.
    wikitext = any(es.get("name") == eval_set and str(es.get("data", "")).startswith("wikitext2")
                   for es in runs[0][1].get("eval_sets", []))
    rounds = sorted({int(x) for m, _ in runs for x in re.findall(r"^R(\d+)_post_kd_", "\n".join(m), re.M)})
    header = ["round", *[f"post-KD seed {s}" for s in seeds], "mean", "range", "mean / dense", "paper post / dense"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rounds:
        post = [m[f"R{r}_post_kd_{eval_set}"] for m, _ in runs]
        paper = PAPER_TABLE_III.get(r)
        targets = runs[0][1].get("targets") or []
        if not wikitext or (paper is not None and (len(targets) < r or abs(targets[r - 1] - paper[0]) > 0.02)):
            paper = None  # the paper's round r is at another sparsity: not the same row
        mean = statistics.fmean(post)
        lines.append("| " + " | ".join([f"R{r}", *[f"{p:.2f}" for p in post], f"{mean:.2f}",
                                         f"{min(post):.2f}–{max(post):.2f}", f"{mean / dense[0]:.2f}×",
                                         "—" if paper is None else f"{paper[2] / PAPER_TABLE_III_DENSE:.2f}×"]) + " |")
    return f"Dense {eval_set}: {dense[0]:.2f}; seeds {', '.join(map(str, seeds))}.\n\n" + "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="directories with metrics.json and config.json")
    parser.add_argument("--set", default="wikitext2", help="eval set name (default: wikitext2)")
    args = parser.parse_args(argv)
    print(table([load(d) for d in args.runs], args.set))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
