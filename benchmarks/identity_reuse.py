"""What a code edit costs a finished run: a dense-kd flow fresh, after a comment in profile.py, after a change to
kd_loss.py's code (sparsekd_core/identity.py decides what each recomputes).

The edits are real: the project's packages are copied to a temporary source tree, the flow runs from it
(`sparsekd run dense-kd --json` in a subprocess, PYTHONPATH first), and the copy's files are edited between runs.
Prints one line per run (seconds, stages recomputed) and the ratio of each rerun to the fresh run.

    python benchmarks/identity_reuse.py                       # SmolLM2-135M-Instruct (Q4_1 GGUF), small budget
    python benchmarks/identity_reuse.py --workdir /tmp/reuse  # keep the stages (a second invocation starts warm)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("sparsekd_core", "tasks", "flows", "sparsekd")


def run_flow(src: Path, config: Path) -> tuple[float, dict]:
    env = {**os.environ, "PYTHONPATH": f"{src}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "SPARSEKD_PROGRESS_SECONDS": "600"}
    t0 = time.perf_counter()
    command = [sys.executable, "-c", "import sys; from sparsekd.cli import main; sys.exit(main(sys.argv[1:]))",
               "run", "dense-kd", "--config", str(config), "--json"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=src)
    seconds = time.perf_counter() - t0
    if done.returncode != 0:
        sys.exit(f"flow failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return seconds, json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--workdir", help="stage store (default: a temporary directory)")
    parser.add_argument("--steps", type=int, default=8, help="distillation steps per arm")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "src"
        for package in PACKAGES:
            shutil.copytree(ROOT / package, src / package, ignore=shutil.ignore_patterns("__pycache__"))
        workdir = Path(args.workdir or Path(tmp) / "work").resolve()
        config = Path(tmp) / "dense-kd.yaml"
        config.write_text(json.dumps({
            "model": args.model, "workdir": str(workdir), "device": "cpu",
            "corpus": {"data": "mix:paper-offline", "num_samples": 16, "seq_len": 128},
            "distill": {"max_steps": args.steps, "batch_size": 4, "eval_every": args.steps, "val_tokens": 1024},
            "eval_sets": [{"name": "wikitext2", "data": "wikitext2:test", "max_tokens": 2048}],
        }))
        rows = []
        seconds, fresh = run_flow(src, config)
        rows.append(("fresh", seconds, fresh))
        profile = src / "sparsekd_core" / "profile.py"
        profile.write_text("# a comment added by benchmarks/identity_reuse.py\n" + profile.read_text())
        rows.append(("after a comment in profile.py", *run_flow(src, config)))
        kd_loss = src / "sparsekd_core" / "kd_loss.py"
        kd_loss.write_text(kd_loss.read_text() + "\n_EDITED_BY_BENCHMARK = True\n")
        rows.append(("after a code change in kd_loss.py", *run_flow(src, config)))

    print(f"dense-kd flow, {args.model} (SmolLM2-135M-Instruct is a Q4_1 GGUF, dequantised to fp32), CPU, "
          f"{os.cpu_count()} cores")
    base = rows[0][1]
    for label, seconds, summary in rows:
        ran = [s["label"] for s in summary["stages"] if not s["cached"]]
        print(f"{label:36s} {seconds:7.1f} s  ({seconds / base:.2f}× fresh)  recomputed: {', '.join(ran) or 'nothing'}")
        same = summary["metrics"] == rows[0][2]["metrics"]
        print(f"{'':36s} metrics equal to the fresh run's: {same}")


if __name__ == "__main__":
    main()
