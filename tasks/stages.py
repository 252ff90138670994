"""Prefect tasks, one per stage: thin wrappers that call sparsekd_core, persist, log to MLflow.

Each task returns a small JSON-able manifest (``tasks.store``): where its output is, its fingerprint (``key``),
its result metrics and whether it was ``cached``. Models travel between tasks as a ``ModelRef`` dict
``{"spec": <what load_model takes>, "fingerprint": <key of the stage that made it, or the dense spec>}``.
Caching is by content (``tasks.store.run_stage``), not by Prefect's run-scoped cache: a rerun of a finished flow
recomputes nothing, a rerun after a crash redoes only what is missing (resumable stages resume in place).
Transient errors (I/O, connection) are retried with exponential backoff; configuration errors never are.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff

from sparsekd_core.config import ConfigError
from sparsekd_core.files import write_json_atomic

from .store import remote_path, run_stage
from .tracking import Tracker

ModelRef = dict[str, str]  # {"spec", "fingerprint"} and, for a hub model, "revision" (the pinned commit)


def dense_ref(spec: str) -> ModelRef:
    """A model given by the user, fingerprinted by content (GGUF/directory digest or hub commit), not by name."""
    from sparsekd_core.models import model_fingerprint

    found = model_fingerprint(spec)
    ref = {"spec": spec, "fingerprint": "model:" + json.dumps(found, sort_keys=True)}
    if "commit" in found:  # a hub model is loaded at the commit its key names, not whatever `main` is by then
        ref["revision"] = found["commit"]
    return ref


def _transient(task, task_run, state) -> bool:
    """Retry only errors that may pass by themselves (I/O, network); never bad input or a diverged run."""
    from sparsekd_core.data import DataQualityError, DataUnavailableError
    from sparsekd_core.files import DiskFullError
    from sparsekd_core.models import ModelLoadError

    try:
        state.result()
    except (ConfigError, DataQualityError, DataUnavailableError, ModelLoadError, ValueError, FloatingPointError,
            DiskFullError):  # a full disk stays full: retrying only repeats the failure
        return False
    except (OSError, ConnectionError, TimeoutError):
        return True
    except Exception:  # noqa: BLE001 - anything else: not known to be transient
        return False
    return False


STAGE_TASK = dict(cache_policy=NO_CACHE, retries=2, retry_delay_seconds=exponential_backoff(backoff_factor=5),
                  retry_condition_fn=_transient, persist_result=False)


GPU_SLOT_ENV = "SPARSEKD_GPU_SLOT"
GPU_WAIT_NOTICE_SECONDS = 2.0


@contextmanager
def gpu_slot():
    """Hold this worker's accelerator while a heavy stage computes (not while it is served from the store).

    ``$SPARSEKD_GPU_SLOT`` names a Prefect global concurrency limit of 1 per GPU (e.g. ``gpu-host1-0``); every flow
    run on that worker (the seeds of a multi-seed fan-out, a scheduled rerun beside a UI run) then queues for it,
    so one GPU runs one heavy stage at a time. The limit is created on first use. Unset: no limit (a laptop, tests).
    """
    name = os.environ.get(GPU_SLOT_ENV, "").strip()
    if not name:
        yield
        return
    from prefect.concurrency.sync import concurrency

    ensure_concurrency_limit(name, 1)
    # Said only when the slot is really awaited: most stages find it free at once.
    notice = threading.Timer(GPU_WAIT_NOTICE_SECONDS, run_log(), args=(f"waiting for GPU slot {name!r} (held by "
                                                                       "another stage on this GPU)",))
    notice.start()
    try:
        with concurrency(name, occupy=1, strict=True):
            notice.cancel()
            yield
    finally:
        notice.cancel()


def ensure_concurrency_limit(name: str, limit: int) -> bool:
    """Create the global concurrency limit ``name`` if it does not exist; True if it was created."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
            return False
        except ObjectNotFound:
            pass
        try:
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=limit))
        except ObjectAlreadyExists:  # another worker made it first
            return False
        return True


def _run_heavy_stage(workdir: str, stage: str, config: dict, inputs: dict, produce) -> dict:
    """``run_stage`` for a heavy stage: served from the store when it can be, else computed holding the GPU slot."""
    def guarded(directory: Path) -> dict:
        with gpu_slot():
            return produce(directory)

    return run_stage(workdir, stage, config, inputs, guarded, log=run_log())


def run_log():
    """The Prefect run logger's ``info`` inside a flow/task run, else ``print``."""
    try:
        return get_run_logger().info
    except Exception:  # noqa: BLE001 - outside a run (direct call in a test)
        return print


PROGRESS_SECONDS_ENV = "SPARSEKD_PROGRESS_SECONDS"


class SteadyProgress:
    """Progress of a long stage as log lines at a steady rate (Prefect's logs have no progress bars): at most one
    line every ``$SPARSEKD_PROGRESS_SECONDS`` (default 30) s, and the last one, with the rate and an ETA.

    Use as ``step(done, total, postfix)`` (training stages: step counts and loss terms) or as a tqdm-like bar
    (``update(n)``, ``close()``) for caches and generation."""

    def __init__(self, stage: str, unit: str, total: int | None = None):
        self.stage, self.unit, self.total = stage, unit, total
        self.every = float(os.environ.get(PROGRESS_SECONDS_ENV, "30"))
        self.done, self.start_done, self.t0, self.last = 0, None, time.monotonic(), float("-inf")
        self.log = run_log()

    def step(self, done: int, total: int, postfix: dict | None = None) -> None:
        self.total, self.done = total, done
        self._report(postfix or {})

    def update(self, n: int = 1) -> None:
        self.done += n
        self._report({})

    def close(self) -> None:
        pass

    def _report(self, postfix: dict) -> None:
        now = time.monotonic()
        if self.start_done is None:  # the rate counts from the first report (a resumed stage: where it resumed)
            self.start_done, self.t0 = self.done, now
        finished = self.total is not None and self.done >= self.total
        if now - self.last < self.every and not finished:
            return
        self.last = now
        parts = [f"{self.stage}: {self.unit} {self.done}" + (f"/{self.total} ({100 * self.done / self.total:.0f}%)"
                                                            if self.total else "")]
        parts += [f"{k} {v:.4g}" for k, v in postfix.items() if isinstance(v, (int, float))]
        if self.done > self.start_done and now > self.t0:  # no rate from a single point in time
            rate = (self.done - self.start_done) / (now - self.t0)
            parts.append(f"{rate:.3g} {self.unit}/s")
            if self.total and not finished:
                parts.append(f"ETA {(self.total - self.done) / rate:.0f} s")
        self.log(", ".join(parts))


def _load(ref: ModelRef, dtype: str, device: str, stage: str = "eval"):
    """Load a model for a stage through the core precision policy (precision.stage_load_dtype: fp32 for train,
    prune and teacher whatever the flow's dtype; eval as asked)."""
    from sparsekd_core.config import ModelConfig
    from sparsekd_core.models import load_for

    cfg = ModelConfig(model=ref["spec"], dtype=dtype, device=device, revision=ref.get("revision"))
    return load_for(stage, cfg, log=run_log())


def _runtime(dtype: str, device: str, stage: str = "eval") -> dict:
    from sparsekd_core.identity import runtime

    return runtime(dtype, device, stage)


def _track(tracking: dict | None, run_id: str | None, metrics: dict[str, Any], step: int | None = None,
           artifacts: list[str] = ()) -> None:
    if not tracking or not run_id:
        return
    tracker = Tracker(tracking["uri"], tracking["experiment"], tracking.get("artifact_root"))
    tracker.log_metrics(run_id, metrics, step=step)
    for path in artifacts:
        if Path(path).exists():
            tracker.log_artifact(run_id, path)


# ---------------------------------------------------------------------------------------------------------------- eval


@task(name="evaluate", **STAGE_TASK)
def evaluate(model: ModelRef, eval_sets: list[dict], eval_cfg: dict, workdir: str, dtype: str = "auto",
             device: str = "auto", tracking: dict | None = None, run_id: str | None = None,
             metric_prefix: str = "", step: int | None = None, teacher: ModelRef | None = None) -> dict:
    """One model on every eval set: perplexity sets give {ppl, nll, tokens, window_nll, window_tokens, ...}, GSM8K
    sets (``kind: gsm8k``) {accuracy, correct, problems, reference_loglik, ...}; plus ``_model``: the parameter and
    nonzero counts of the model that was evaluated (what a report must state, e.g. WANDA sparsity). With a
    ``teacher``, perplexity sets also give ``kl``: KL(teacher ‖ model) per token on the same windows."""
    from sparsekd_core.config import AccuracyConfig, EvalConfig
    from sparsekd_core.data import gsm8k_records, load_text, text_digest
    from sparsekd_core.prune.masks import measured_compression
    from sparsekd_core.stages import evaluate_gsm8k, evaluate_text  # the same stage bodies as `sparsekd eval`

    inputs = {}  # what each set evaluates on: a text, or the GSM8K problems (its first max_problems)
    for es in eval_sets:
        if es.get("kind", "perplexity") == "gsm8k":
            inputs[es["name"]] = gsm8k_records(es["data"])[: es.get("max_problems") or AccuracyConfig().max_problems]
        else:
            inputs[es["name"]] = load_text(es["data"])

    def produce(directory: Path) -> dict:
        loaded = _load(model, dtype, device)
        loaded_teacher = None if teacher is None else _load(teacher, dtype, device)
        cfg = EvalConfig(**eval_cfg)
        out = {}
        for es in eval_sets:
            name = es["name"]
            if es.get("kind", "perplexity") == "gsm8k":
                acc = AccuracyConfig(**{k: es[k] for k in ("max_problems", "max_new_tokens") if es.get(k)})
                res = evaluate_gsm8k(loaded, inputs[name], acc)
                out[name] = {**res.as_dict(), "kind": "gsm8k", "data": es["data"]}
                run_log()(f"eval {name}: accuracy {res.accuracy:.4f} ({res.correct}/{res.problems}), reference "
                          f"log-likelihood {res.reference_loglik:.4f}")
                continue
            res, _ = evaluate_text(loaded, inputs[name], cfg, es.get("max_tokens"), log=run_log(),
                                   teacher=loaded_teacher)
            out[name] = {**res.as_dict(), "kind": "perplexity", "data": es["data"]}
            kl = "" if res.kl is None else f", KL(teacher ‖ model) {res.kl:.4f} nats/token"
            run_log()(f"eval {name}: ppl {out[name]['ppl']:.3f}{kl}")
        out[MODEL_COUNTS] = measured_compression(loaded.model)
        write_json_atomic(directory / "metrics.json", out)
        return out

    digests = {name: text_digest(value if isinstance(value, str) else json.dumps(value, sort_keys=True))
               for name, value in inputs.items()}
    config = {"sets": [{**es, "digest": digests[es["name"]]} for es in eval_sets], "eval": eval_cfg,
              "runtime": _runtime(dtype, device)}
    inputs_key = {"model": model["fingerprint"]}
    if teacher is not None:
        inputs_key["teacher"] = teacher["fingerprint"]
    manifest = _run_heavy_stage(workdir, "eval", config, inputs_key, produce)
    metrics = {}
    for name, r in eval_results(manifest).items():
        if r.get("kind") == "gsm8k":
            metrics.update({f"{metric_prefix}acc_{name}": r["accuracy"],
                            f"{metric_prefix}ref_loglik_{name}": r["reference_loglik"]})
        else:
            metrics[f"{metric_prefix}ppl_{name}"] = r["ppl"]
            if r.get("kl") is not None:
                metrics[f"{metric_prefix}kl_{name}"] = r["kl"]
    _track(tracking, run_id, metrics, step)
    counts = manifest["result"].get(MODEL_COUNTS, {})
    _track(tracking, run_id, {f"{metric_prefix}{k}": counts[k] for k in ("mlp_zero_fraction", "mlp_reduction")
                              if k in counts}, step)
    return manifest


MODEL_COUNTS = "_model"  # key of the evaluated model's counts in an eval result (not an eval set name)


def eval_results(manifest: dict) -> dict:
    """{set name: metrics} of an evaluate manifest (without the model counts)."""
    return {k: v for k, v in manifest["result"].items() if k != MODEL_COUNTS}


# ---------------------------------------------------------------------------------------------------------------- cache


def _cache_stage(teacher: ModelRef, cache_fields: dict, dtype: str, device: str) -> tuple[dict, dict, dict]:
    """(the cache fields less `shards`, the stage's key config, its inputs): how many shards wrote a store does
    not change its bytes, so it is not part of the key (identity.NOT_IDENTITY)."""
    from sparsekd_core.cache import corpus_digests
    from sparsekd_core.config import CacheConfig
    from sparsekd_core.identity import identity_fields

    fields = identity_fields(cache_fields)
    digests = corpus_digests(CacheConfig(**fields, out="unused"))
    config = {"cache": fields, "data": digests, "runtime": _runtime(dtype, device, "teacher")}
    return fields, config, {"teacher": teacher["fingerprint"]}


@task(name="cache-teacher", **STAGE_TASK)
def cache_teacher(teacher: ModelRef, cache_fields: dict, workdir: str, dtype: str = "auto", device: str = "auto",
                  tracking: dict | None = None, run_id: str | None = None) -> dict:
    """The teacher's top-k distribution over the KD corpus, as a Zarr store (resumes a crashed run in place, and
    finishes what ``cache_teacher_shard`` runs wrote: after a fan-out it only checks and records the store)."""
    from sparsekd_core.cache import run_cache
    from sparsekd_core.config import CacheConfig

    fields, config, inputs = _cache_stage(teacher, cache_fields, dtype, device)

    def produce(directory: Path) -> dict:
        # Under a URL root the store is written straight to the bucket: a killed worker's chunks are not lost.
        cfg = CacheConfig(**fields, out=remote_path(workdir, directory / "teacher.zarr"))
        return run_cache(_load(teacher, dtype, device, "teacher"), cfg, log=run_log(),
                         progress_factory=lambda total: SteadyProgress("cache", "sequences", total)).as_dict()

    manifest = _run_heavy_stage(workdir, "cache", config, inputs, produce)
    _track(tracking, run_id, {f"cache_{k}": v for k, v in manifest["result"].items()
                              if k in ("bytes_per_token", "tokens_per_s", "seconds", "tokens", "documents")})
    return {**manifest, "cache_path": remote_path(workdir, Path(manifest["path"]) / "teacher.zarr")}


@task(name="cache-teacher-shard", **STAGE_TASK)
def cache_teacher_shard(teacher: ModelRef, cache_fields: dict, workdir: str, shard_index: int, num_shards: int,
                        dtype: str = "auto", device: str = "auto") -> dict:
    """Shard ``shard_index`` of ``num_shards`` of the cache stage: its disjoint chunk range of the stage's store
    (sparsekd_core/cache.py), no manifest; ``cache_teacher`` afterwards finishes and records the stage. With
    device ``auto`` or ``cuda`` on a host with several GPUs, shard i takes GPU i mod count (models.shard_device)."""
    from sparsekd_core.cache import run_cache
    from sparsekd_core.config import CacheConfig

    from .store import load_manifest, stage_dir

    fields, config, inputs = _cache_stage(teacher, cache_fields, dtype, device)
    directory = stage_dir(workdir, "cache", config, inputs)
    if load_manifest(directory) is not None:
        return {"shard": f"{shard_index}/{num_shards}", "cached": True}
    directory.mkdir(parents=True, exist_ok=True)
    cfg = CacheConfig(**fields, out=remote_path(workdir, directory / "teacher.zarr"), shard_index=shard_index,
                      num_shards=num_shards)
    from sparsekd_core.models import shard_device

    device = shard_device(device, shard_index)  # auto/cuda on a host with several GPUs: one GPU per shard
    with gpu_slot():
        result = run_cache(_load(teacher, dtype, device, "teacher"), cfg, log=run_log(), progress_factory=lambda total:
                           SteadyProgress(f"cache shard {shard_index}/{num_shards}", "sequences", total))
    return {**result.as_dict(), "cached": False}


# ---------------------------------------------------------------------------------------------------------------- prune


@task(name="prune", **STAGE_TASK)
def prune(model: ModelRef, prune_fields: dict, workdir: str, dtype: str = "auto", device: str = "auto",
          tracking: dict | None = None, run_id: str | None = None, step: int | None = None) -> dict:
    """One pruning round of `model` (SVD or WANDA); the compressed checkpoint is in <stage dir>/model."""
    from sparsekd_core.config import PruneConfig
    from sparsekd_core.provenance import data_digests

    cfg = PruneConfig(**prune_fields)

    def produce(directory: Path) -> dict:
        from sparsekd_core.stages import prune_and_save  # the same stage body as `sparsekd prune`

        loaded = _load(model, dtype, device, "prune")
        summary = prune_and_save(loaded, [cfg], directory / "model", parent=model["spec"], log=run_log()).summary
        write_json_atomic(directory / "layers.json", summary.get("layers", []))
        return {k: v for k, v in summary.items() if k != "layers"}

    calibration = data_digests([cfg.calibration]) if cfg.calibration else {}
    manifest = _run_heavy_stage(workdir, "prune", {"prune": prune_fields, "calibration": calibration,
                                                   "runtime": _runtime(dtype, device, "prune")},
                                {"model": model["fingerprint"]}, produce)
    _track(tracking, run_id, {k: manifest["result"][k] for k in ("mlp_reduction", "mlp_params_after",
                              "total_params_after", "seconds") if k in manifest["result"]}, step,
           artifacts=[str(Path(manifest["path"]) / "layers.json")])
    manifest["model"] = {"spec": str(Path(manifest["path"]) / "model"), "fingerprint": manifest["key"]}
    return manifest


# ---------------------------------------------------------------------------------------------------------------- distill


@task(name="distill", **STAGE_TASK)
def distill(student: ModelRef, cache: dict, distill_fields: dict, seed: int, workdir: str, dtype: str = "auto",
            device: str = "auto", tracking: dict | None = None, run_id: str | None = None) -> dict:
    """Train `student` on a teacher cache (KD, or CE-only with alpha=0); resumes from its last checkpoint."""
    from sparsekd_core.config import DistillConfig
    from sparsekd_core.data import load_text, text_digest
    from sparsekd_core.distill import distill as run_distill
    from sparsekd_core.identity import identity_fields, training_runtime

    check = DistillConfig(**distill_fields, seed=seed, cache="cache", out="out")

    def produce(directory: Path) -> dict:
        cfg = DistillConfig(**distill_fields, seed=seed, cache=cache["cache_path"], out=str(directory / "student"))
        loaded = _load(student, dtype, device, stage="train")  # fp32 master weights, whatever the flow's dtype
        result = run_distill(cfg, loaded.model, loaded.tokenizer, student_spec=student["spec"], log=run_log(),
                             progress=SteadyProgress("distill", "step").step)
        return {**result.as_dict(), "student": str(directory / "student")}

    # The flow's dtype does not reach training (the precision policy decides), so it is not in the key; nor does the
    # checkpoint cadence (identity.NOT_IDENTITY).
    config = {"distill": identity_fields(distill_fields), "seed": seed, "val_text": text_digest(load_text(check.val_data)),
              "runtime": training_runtime(device, check.autocast)}
    manifest = _run_heavy_stage(workdir, "distill", config,
                                {"student": student["fingerprint"], "teacher_cache": cache["key"]}, produce)
    return _trained(manifest, tracking, run_id)


def _trained(manifest: dict, tracking: dict | None, run_id: str | None) -> dict:
    """Log a training stage's figures and validation curve; the manifest gains the student's ModelRef."""
    result = manifest["result"]
    if tracking and run_id:
        tracker = Tracker(tracking["uri"], tracking["experiment"], tracking.get("artifact_root"))
        tracker.log_metrics(run_id, {k: v for k, v in result.items() if isinstance(v, (int, float))})
        tracker.log_curve(run_id, "val_ppl", [(p[0], p[1]) for p in result.get("val_history", [])])
    manifest["model"] = {"spec": result["student"], "fingerprint": manifest["key"]}
    return manifest


# ---------------------------------------------------------------------------------------------------------------- self-data


@task(name="instructions", **STAGE_TASK)
def instructions(data: str, num_samples: int, workdir: str) -> dict:
    """The first ``num_samples`` instruction records of ``data`` as a .jsonl of {prompt, response}: the one set of
    prompts every arm of the self-data comparison trains on."""
    from sparsekd_core.selfdata import instruction_records, write_instruction_records

    records, is_gsm8k = instruction_records(data, num_samples)

    def produce(directory: Path) -> dict:
        write_instruction_records(records, is_gsm8k, directory / "records.jsonl")
        return {"records": len(records), "gsm8k": is_gsm8k}

    config = {"records": json.dumps(records, sort_keys=True), "num_samples": num_samples}
    manifest = run_stage(workdir, "instructions", config, {}, produce, log=run_log())
    return {**manifest, "data_path": str(Path(manifest["path"]) / "records.jsonl")}


@task(name="selfdata", **STAGE_TASK)
def self_data(teacher: ModelRef, prompts: dict, selfdata_fields: dict, workdir: str, dtype: str = "auto",
              device: str = "auto", tracking: dict | None = None, run_id: str | None = None) -> dict:
    """The (unpruned) teacher rewrites the responses of ``prompts`` (an ``instructions`` manifest); resumable."""
    from sparsekd_core.config import SelfDataConfig
    from sparsekd_core.selfdata import run_selfdata

    def produce(directory: Path) -> dict:
        cfg = SelfDataConfig(**selfdata_fields, data=prompts["data_path"], out=str(directory / "selfdata.jsonl"))
        progress = SteadyProgress("selfdata", "records", cfg.num_samples or prompts["result"]["records"])
        return run_selfdata(_load(teacher, dtype, device), cfg, log=run_log(), progress=progress.update).as_dict()

    manifest = _run_heavy_stage(workdir, "selfdata", {"selfdata": selfdata_fields, "runtime": _runtime(dtype, device)},
                                {"teacher": teacher["fingerprint"], "prompts": prompts["key"]}, produce)
    _track(tracking, run_id, {f"selfdata_{k}": v for k, v in manifest["result"].items()
                              if k in ("kept", "dropped", "no_answer", "records", "seconds")})
    return {**manifest, "data_path": str(Path(manifest["path"]) / "selfdata.jsonl")}


@task(name="sft", **STAGE_TASK)
def sft(student: ModelRef, data: dict, sft_fields: dict, seed: int, workdir: str, dtype: str = "auto",
        device: str = "auto", tracking: dict | None = None, run_id: str | None = None) -> dict:
    """Fine-tune ``student`` on prompt/response pairs (``data``: an instructions or selfdata manifest)."""
    from sparsekd_core.config import SFTConfig
    from sparsekd_core.data import load_text, text_digest
    from sparsekd_core.identity import identity_fields, training_runtime
    from sparsekd_core.sft import sft as run_sft

    check = SFTConfig(**sft_fields, seed=seed, data=data["data_path"], out="out")

    def produce(directory: Path) -> dict:
        cfg = SFTConfig(**sft_fields, seed=seed, data=data["data_path"], out=str(directory / "student"))
        loaded = _load(student, dtype, device, stage="train")
        result = run_sft(cfg, loaded.model, loaded.tokenizer, student_spec=student["spec"], log=run_log(),
                         progress=SteadyProgress("sft", "step").step)
        return {**result.as_dict(), "student": str(directory / "student")}

    config = {"sft": identity_fields(sft_fields), "seed": seed, "val_text": text_digest(load_text(check.val_data)),
              "runtime": training_runtime(device, check.autocast)}
    manifest = _run_heavy_stage(workdir, "sft", config, {"student": student["fingerprint"], "data": data["key"]},
                                produce)
    return _trained(manifest, tracking, run_id)


# ---------------------------------------------------------------------------------------------------------------- profile


@task(name="profile", **STAGE_TASK)
def profile(models: list[ModelRef], profile_fields: dict, workdir: str, dtype: str = "auto", device: str = "auto",
            tracking: dict | None = None, run_id: str | None = None) -> dict:
    """TTFT/TPOT/memory/breakdown of several models side by side (the first is the baseline); profile.json,
    profile.md, speedup.png. A ModelRef may carry a ``label`` (the name in the tables; default its spec)."""
    from sparsekd_core.config import ProfileConfig
    from sparsekd_core.provenance import machine
    from sparsekd_core.stages import profile_models, save_profile  # the same stage body as `sparsekd profile`

    def produce(directory: Path) -> dict:
        loaders = [(ref.get("label", ref["spec"]), lambda ref=ref: _load(ref, dtype, device)) for ref in models]
        results = profile_models(loaders, ProfileConfig(**profile_fields), log=run_log())
        save_profile(results, directory)
        return {"results": results}

    # Timings are measurements of this machine: keyed by the models, labels, settings and the hardware.
    manifest = _run_heavy_stage(workdir, "profile", {"profile": profile_fields, "runtime": _runtime(dtype, device),
                                                     "machine": machine(device),
                                                     "labels": [m.get("label", m["spec"]) for m in models]},
                                {"models": ",".join(m["fingerprint"] for m in models)}, produce)
    if tracking and run_id:
        tracker = Tracker(tracking["uri"], tracking["experiment"], tracking.get("artifact_root"))
        for r in manifest["result"]["results"]:
            tag = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"m{r['model_index']}_{Path(r['model']).name}")
            tag = f"{tag}_b{r['batch_size']}_s{r['seq_len']}"
            tracker.log_metrics(run_id, {f"{tag}_{k}": r[k] for k in ("ttft_ms", "tpot_ms", "speedup", "amdahl_bound")})
        for name in ("profile.json", "profile.md", "speedup.png"):
            tracker.log_artifact(run_id, Path(manifest["path"]) / name)
    return manifest
