"""R1's budget curve of the second study on a GPU: KD against its CE-only twin at growing token budgets, by the
study's own protocol and settings, through sparsekd_core alone (a GPU host without Prefect or MLflow runs it).

    python benchmarks/study_budget_gpu.py --config flows/configs_yaml/study-v2-smollm2.yaml --out DIR \\
        [--model FILE.gguf] [--budgets 16384,65536,262144] [--seeds 42,43,44] [--stdlib DIR] [--deadline S]
    python benchmarks/study_budget_gpu.py --dry-run --out DIR         # a tiny random model on CPU, seconds
    python benchmarks/study_budget_gpu.py --report DIR --study docs/results/study-v2/smollm2/study.json \\
        --write docs/results/study-v2/smollm2/budget-gpu.md          # the report, here (no GPU needed)

What runs, in the order of the flow (flows/study_v2.py): the dense model's eval; the teacher cache (the config's
corpus, fp32 teacher); R1 (the config's prune at r1_target) and its eval; then, seed by seed and budget by budget,
the CE-only twin (α = 0) and KD at the config's first α, each evaluated on the config's sets with per-window NLL
and KL(teacher ‖ student). Training keeps the study's settings and the precision policy (fp32 master weights, bf16
autocast on CUDA); every eval here loads fp32 weights, so a comparison with the CPU arms isolates training. Budgets
are distinct corpus tokens, as in the flow (the config's check: at most the corpus's tokens). Checkpoints are not written (the cadence is not part of an arm's identity; a stopped run re-trains its arm).

DIR/budget_gpu.json holds the arms in study.json's shape, rewritten after every arm: a stopped run keeps what it
finished, and a rerun with the same DIR skips those arms. ``--deadline`` stops before an arm would start after that
many seconds. ``--stdlib`` reads the ``python:stdlib`` / ``python:heldout`` sources from DIR instead of this
interpreter's standard library (another Python version's modules are other documents: pass the tree of the
Python that made the arms being compared, e.g. 3.11's, to a host with 3.12).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FORMAT = "study-budget-gpu/1"


def log(message: str) -> None:
    print(message, flush=True)


def use_stdlib(root: Path) -> None:
    """Make data.py read python:stdlib / python:heldout from ``root`` (a standard-library tree)."""
    import sysconfig

    from sparsekd_core import data

    if not root.is_dir():
        raise SystemExit(f"study_budget_gpu: --stdlib {root} is not a directory")
    paths = dict(sysconfig.get_paths(), stdlib=str(root))
    data.sysconfig = types.SimpleNamespace(get_paths=lambda: paths)
    data._stdlib_split.cache_clear()


def machine(device: torch.device) -> dict:
    import platform

    import transformers

    out = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
           "device": device.type}
    if device.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(device)
    return out


def dry_config(work: Path) -> dict:
    """A CPU-sized study config for --dry-run: a tiny random Llama, a small corpus, two small budgets."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from gpu_check import tiny_model_dir

    return {"model": tiny_model_dir(work), "workdir": str(work / "runs"), "seed": 42, "seeds": [42],
            "alphas": [0.5], "r1_target": 0.15, "prune": {"method": "svd", "schedule": "tiered"},
            "corpus": {"data": "mix:no-wikitext-offline", "num_samples": 16, "seq_len": 32, "top_k": 8},
            "train_tokens": 128, "budgets": [128, 512],
            "distill": {"lr": 1e-3, "temperature": 2.0, "batch_size": 2, "eval_every": 2, "val_data": "c4:val",
                        "val_tokens": 64, "val_ctx": 32, "patience": 1000},
            "eval": {"protocol": "standard", "ctx": 32, "stride": 32, "batch_size": 4},
            "eval_sets": [{"name": "wikitext2", "data": "wikitext2:test", "max_tokens": 128},
                          {"name": "c4_heldout", "data": "c4:heldout", "max_tokens": 128}],
            "relations": [{"set": "wikitext2", "relation": "out of corpus"},
                          {"set": "c4_heldout", "relation": "held-out documents"}]}


class Budget:
    """One invocation: the config, the stages' directories under ``work``, and the arms in ``out``."""

    def __init__(self, config, model: str, out: Path, work: Path, device: torch.device):
        from sparsekd_core.config import ModelConfig

        self.cfg, self.model, self.out, self.work, self.device = config, model, out, work, device
        self.path = out / "budget_gpu.json"
        self.doc = json.loads(self.path.read_text()) if self.path.is_file() else {}
        if self.doc and self.doc.get("setup") != self.setup():
            raise SystemExit(f"study_budget_gpu: {self.path} was made with other settings; use another --out")
        self.doc.setdefault("format", FORMAT)
        self.doc["setup"] = self.setup()
        self.doc.setdefault("arms", {})
        self.doc.setdefault("seconds", {})
        self.doc["machine"] = machine(device)
        self.started: float | None = None
        self.model_cfg = lambda spec, dtype="fp32": ModelConfig(model=spec, dtype=dtype, device=device.type)

    def setup(self) -> dict:
        keep = ("corpus", "distill", "eval", "eval_sets", "prune", "r1_target", "alphas", "relations")
        return {"model": self.model, **{k: v for k, v in self.cfg.model_dump(mode="json").items() if k in keep}}

    def save(self) -> None:
        from sparsekd_core.files import write_json_atomic

        if self.started is not None:  # wall time so far, over every invocation: right even if this one is killed
            self.doc["wall_seconds"] = self.doc.get("wall_seconds_before", 0.0) + time.perf_counter() - self.started
        self.out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.path, self.doc)

    def load(self, stage: str, spec: str):
        from sparsekd_core.models import load_for

        return load_for(stage, self.model_cfg(spec), log=log)

    def evaluate(self, label: str, spec: str, teacher: str | None, **fields) -> None:
        from sparsekd_core.data import load_text
        from sparsekd_core.stages import evaluate_text

        t0 = time.perf_counter()
        loaded = self.load("eval", spec)
        loaded_teacher = None if teacher is None else self.load("eval", teacher)
        sets = {}
        for es in self.cfg.eval_sets:
            if es.kind != "perplexity":
                continue
            res, _ = evaluate_text(loaded, load_text(es.data), self.cfg.eval_config(), es.max_tokens,
                                   teacher=loaded_teacher)
            sets[es.name] = {**res.as_dict(), "kind": "perplexity", "data": es.data}
            kl = "" if res.kl is None else f", KL {res.kl:.4f}"
            log(f"  {label}: {es.name} ppl {res.ppl:.3f}{kl}")
        del loaded, loaded_teacher
        self.doc["arms"][label] = {**fields, "sets": sets}
        self.doc["seconds"][f"eval {label}"] = time.perf_counter() - t0
        self.save()

    def cache(self) -> str:
        from sparsekd_core.cache import run_cache
        from sparsekd_core.config import CacheConfig

        store = self.work / "teacher.zarr"
        t0 = time.perf_counter()
        result = run_cache(self.load("teacher", self.model),
                           CacheConfig(**self.cfg.corpus.cache_fields(), out=str(store)), log=log)
        self.doc["seconds"].setdefault("cache", time.perf_counter() - t0)
        self.doc["corpus_tokens"] = int(result.as_dict().get("tokens") or 0) or (
            self.cfg.corpus.num_samples * self.cfg.corpus.seq_len)
        return str(store)

    def prune(self) -> str:
        from sparsekd_core.config import PruneConfig
        from sparsekd_core.stages import prune_and_save

        target = self.work / "r1"
        if not (target / "config.json").is_file():
            t0 = time.perf_counter()
            fields = {**self.cfg.prune.model_dump(), "target_reduction": self.cfg.r1_target}
            prune_and_save(self.load("prune", self.model), [PruneConfig(**fields)], target, parent=self.model,
                           log=log)
            self.doc["seconds"]["prune"] = time.perf_counter() - t0
        return str(target)

    def train(self, start: str, cache: str, kind: str, seed: int, tokens: int) -> None:
        from sparsekd_core import study_report as sr
        from sparsekd_core.config import DistillConfig
        from sparsekd_core.distill import distill

        alpha = 0.0 if kind == "ce" else self.cfg.alphas[0]
        label = sr.arm_label("R1", kind, alpha if kind == "kd" else None, seed,
                             tokens if tokens != self.cfg.train_tokens else None)
        if label in self.doc["arms"]:
            return
        steps = self.cfg.steps(tokens)
        directory = self.work / label.replace(" · ", "_").replace(" ", "-").replace("α=", "a")
        fields = {**self.cfg.distill.model_dump(), "alpha": alpha, "max_steps": steps,
                  "checkpoint_every": steps + 1}
        dcfg = DistillConfig(**fields, seed=seed, cache=cache, out=str(directory))
        t0 = time.perf_counter()
        loaded = self.load("train", start)
        result = distill(dcfg, loaded.model, loaded.tokenizer, student_spec=start, log=log).as_dict()
        del loaded
        train_seconds = time.perf_counter() - t0
        kept = {k: result.get(k) for k in ("best_step", "steps", "val_ppl_start", "val_ppl_best", "val_history")}
        # Where a training stage's time goes: the optimizer steps (of which waiting for batches) vs the rest
        # (loading, validation every eval_every steps, saving).
        timing = {k: result.get(k) for k in ("train_seconds", "data_wait_seconds", "tokens_per_s")}
        log(f"{label}: {result['steps']} steps in {train_seconds:.0f}s, kept step {kept['best_step']} "
            f"(val {kept['val_ppl_start']:.3f} -> {kept['val_ppl_best']:.3f}), {result['precision']}")
        self.doc["seconds"][f"distill {label}"] = train_seconds
        self.evaluate(label, str(directory), self.model, student="R1", kind=kind, alpha=alpha, seed=seed,
                      tokens=tokens, kept=kept, precision=result["precision"], timing=timing)


def run(args) -> int:
    import yaml

    from flows.configs import StudyV2Config
    from sparsekd_core.config import MODEL_ALIASES

    out = Path(args.out).expanduser()
    work = Path(args.work or out / "work").expanduser()
    work.mkdir(parents=True, exist_ok=True)
    if args.stdlib:
        use_stdlib(Path(args.stdlib))
    values = dry_config(work) if args.dry_run else yaml.safe_load(Path(args.config).read_text())
    if args.budgets:  # validated by the config, as the flow's budgets are
        values["budgets"] = [int(b) for b in args.budgets.split(",")]
    config = StudyV2Config(**values)
    model = args.model or config.model
    budgets = list(config.budgets)
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else [config.seeds[0]]
    device = torch.device("cpu" if args.dry_run or not torch.cuda.is_available() else "cuda")
    t_start = time.perf_counter()
    b = Budget(config, model, out, work, device)
    b.doc["budgets"], b.doc["seeds"], b.doc["stdlib"] = budgets, seeds, args.stdlib or "this interpreter's"
    b.doc["command"] = "python benchmarks/study_budget_gpu.py " + " ".join(args.argv)
    what = MODEL_ALIASES.get(config.model)
    b.doc["model_label"] = (f"{config.model}: {what}" if what else config.model) + (
        f" (read from {args.model})" if args.model else "")
    # Until the loop ends, the record says the run has not finished: a process killed from outside (a time limit)
    # leaves that, the arms it finished and its wall time so far (summed over invocations).
    b.doc["stopped"] = "the process ended before its last arm (killed from outside, e.g. by a time limit)"
    b.doc["wall_seconds_before"] = b.doc.get("wall_seconds", 0.0)
    b.started = t_start
    if "dense" not in b.doc["arms"]:
        b.evaluate("dense", model, None, student="dense", kind="base")
    cache = b.cache()
    r1 = b.prune()
    label = "R1 · base"
    if label not in b.doc["arms"]:
        b.evaluate(label, r1, model, student="R1", kind="base")
    stopped = None
    for seed, tokens, kind in [(s, t, k) for s in seeds for t in sorted(budgets) for k in ("ce", "kd")]:
        if args.deadline and time.perf_counter() - t_start > args.deadline:
            stopped = f"deadline ({args.deadline:.0f} s) reached before R1 {kind} seed {seed} at {tokens} tokens"
            break
        b.train(r1, cache, kind, seed, tokens)
    b.doc["stopped"] = stopped
    b.save()
    log(f"study_budget_gpu: {len(b.doc['arms'])} arms in {b.path}" + (f"; stopped: {stopped}" if stopped else ""))
    return 0


def report(args) -> int:
    from sparsekd_core.files import write_text_atomic
    from sparsekd_core.study_report import gpu_budget_report

    doc = json.loads((Path(args.report) / "budget_gpu.json").read_text())
    study = json.loads(Path(args.study).read_text()) if args.study else None
    target = Path(args.write)
    text = gpu_budget_report(doc, study, plot=target.with_suffix(".png"),
                             command="python benchmarks/study_budget_gpu.py " + " ".join(args.argv))
    write_text_atomic(target, text)
    log(f"study_budget_gpu: report -> {target}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="the study-v2 family config (YAML)")
    parser.add_argument("--out", help="directory of budget_gpu.json (and, by default, work/ for the stages)")
    parser.add_argument("--work", help="where the cache, R1 and the students go (default OUT/work)")
    parser.add_argument("--model", help="the model (default: the config's); e.g. a local GGUF file")
    parser.add_argument("--budgets", help="comma-separated training tokens (default: the config's budgets)")
    parser.add_argument("--seeds", help="comma-separated seeds (default: the config's first)")
    parser.add_argument("--stdlib", help="read python:stdlib / python:heldout from this standard-library tree")
    parser.add_argument("--deadline", type=float, help="start no arm after this many seconds")
    parser.add_argument("--dry-run", action="store_true", help="a tiny random model on CPU (seconds)")
    parser.add_argument("--report", help="render the report from DIR/budget_gpu.json (no training)")
    parser.add_argument("--study", help="with --report: the CPU study.json whose arms are compared with these")
    parser.add_argument("--write", help="with --report: the markdown file to write (the plot goes beside it)")
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.report:
        if not args.write:
            parser.error("--report needs --write FILE.md")
        return report(args)
    if not args.out or not (args.config or args.dry_run):
        parser.error("a run needs --out and --config (or --dry-run)")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
