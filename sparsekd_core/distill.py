"""Offline self-referential distillation: train a student on a teacher cache (a recipe around a nanoGPT-style loop).

loss = α·T²·KL(teacher_T ‖ student_T) over the cached top-k + (1−α)·CE (sparsekd_core/kd_loss.py for the math).
The teacher is never run: its top-k distribution comes from the Zarr cache, so the teacher may be the student's own
dense self (self-referential KD), a KD-improved model (teacher swap: any cache written with the same tokenizer), or
nobody at all (α = 0, the CE-only control: same corpus, same steps).

Output directory ``out``:
    checkpoint/   model.safetensors, optimizer.pt, state.pt (step, data position, RNG, history): resume point,
                  rewritten every checkpoint_minutes of wall time (and/or checkpoint_every steps), at each new best
                  model and at the end
    best/         HF directory of the best-validation model so far (while training)
    config.json, model.safetensors, tokenizer files   the final student = the best-validation model (HF-loadable)
    distill.json  the run's figures (the `sparsekd distill` JSON, plus loss_history: [step, loss, kd, ce] of every
                  update, and student_files: {name: {size, sha256}} of the final student's files); written last: its
                  presence means done, once the student it records still verifies (else the run is trained again)
Directories are swapped in with ``files.replace_dir`` and recovered at start, so a kill at any point (inside a
step, a checkpoint, the final publication) leaves a state that the same command resumes to the same weights.
Precision: fp32 master weights, bf16 autocast on CUDA, saved fp32 (``precision.py``), whatever the caller loaded;
AdamW is the fused kernel on CUDA. The next micro-batch is read from the cache while the current one computes
(``BatchReader``); ``data_wait_seconds`` says how long the loop still waited for data.
Under torchrun the same loop runs on every rank, DDP or FSDP2, at the same global batch; rank 0 writes (``dist.py``).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

from . import dist, identity, precision
from .cache import TeacherCache, tokenizer_digest
from .config import ConfigError, DistillConfig, EvalConfig, TrainConfig
from .files import recover_dir, remove_stale_tmp, replace_dir, sha256_file, write_file_atomic, write_json_atomic
from .identity import NOT_IDENTITY, identity_fields  # noqa: F401 - where callers found them before
from .kd_loss import KDLoss


class DistillError(RuntimeError):
    """Training cannot go on (e.g. the loss stayed NaN/inf); the message names the step."""


# ---------------------------------------------------------------------------------------------------------------- files


def save_checkpoint(path: Path, model, optimizer_state: dict, state: dict) -> None:
    from safetensors.torch import save_model

    def build(tmp: Path) -> None:
        save_model(model, str(tmp / "model.safetensors"))  # handles tied embeddings
        torch.save(optimizer_state, tmp / "optimizer.pt")
        torch.save(state, tmp / "state.pt")

    replace_dir(build, path)


def load_checkpoint(path: Path, model) -> tuple[dict, dict]:
    """Load the weights into ``model`` (unwrapped); return (the optimizer's state dict, the loop state)."""
    from safetensors.torch import load_model

    load_model(model, str(path / "model.safetensors"), device=str(next(model.parameters()).device))
    # Onto the CPU: a checkpoint saved on cuda:1 resumes on cuda:0, on another GPU count or on a CPU (the optimizer
    # moves its state to the parameters' device when it loads it; RNG states are CPU tensors).
    return (torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu"),
            torch.load(path / "state.pt", weights_only=True, map_location="cpu"))


def save_hf(path: Path, model, tokenizer) -> None:
    from .prune.lowrank import compression_record, save_compressed

    if compression_record(model) is not None:  # a pruned student stays a compressed (factored) checkpoint
        save_compressed(model, tokenizer, path)
        return

    def build(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)

    replace_dir(build, path)


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        # A resume may see fewer (or more) devices than the run that saved: restore those both have.
        for index, device_state in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(device_state, device=index)


def _publish_final(best_dir: Path, out: Path) -> None:
    """Put the best model's files into ``out``, each by an atomic replace of a hard link (a copy where links are
    not possible). ``best/`` stays intact until distill.json is written, so a kill here is redone by a rerun."""
    def link_or_copy(item: Path):
        def write(tmp: Path) -> None:
            try:
                os.link(item, tmp)
            except OSError:
                shutil.copy2(item, tmp)
        return write

    for item in sorted(best_dir.iterdir()):
        if not item.is_file():
            raise DistillError(f"distill: unexpected directory {item} in the best-model directory")
        remove_stale_tmp(out / item.name)  # a kill between link and rename leaves an extra name of the weights
        write_file_atomic(out / item.name, link_or_copy(item))


def student_files(out: Path, names) -> dict[str, dict]:
    """{name: {"size", "sha256"}} of the published student's files ``names`` in ``out`` (what the finished marker
    records; hashing costs ~0.4 s for a 540 MB fp32 SmolLM2-135M)."""
    return {name: {"size": (out / name).stat().st_size, "sha256": sha256_file(out / name)} for name in sorted(names)}


def student_problem(out: Path, recorded: dict | None) -> str | None:
    """Why the student in ``out`` is not the one the finished marker recorded (one line naming the file), or None."""
    if not recorded:
        return f"the finished marker in {out} records no student digests (written before they were)"
    for name, want in recorded.items():  # sizes first: a truncated file costs no hashing
        path = out / name
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != want["size"]:
            return f"{path} has {path.stat().st_size} bytes, the finished marker records {want['size']}"
    for name, want in recorded.items():
        if sha256_file(out / name) != want["sha256"]:
            return f"{out / name} does not match its sha256 in the finished marker"
    return None


# ---------------------------------------------------------------------------------------------------------------- pieces


def get_lr(step: int, total: int, cfg: TrainConfig, warmup: int) -> float:
    """Linear warmup to cfg.lr, then cosine decay to cfg.lr·min_lr_ratio at the last step."""
    if step < warmup:
        return cfg.lr * (step + 1) / (warmup + 1)
    progress = (step - warmup) / max(1, total - warmup)
    min_lr = cfg.lr * cfg.min_lr_ratio
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))) * (cfg.lr - min_lr)


def batch_indices(micro_index: int, n: int, batch_size: int, seed: int) -> list[int]:
    """Sequences of global micro-batch `micro_index`: a seeded permutation per epoch, cut into batches."""
    per_epoch = n // batch_size
    epoch, j = divmod(micro_index, per_epoch)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    return order[j * batch_size : (j + 1) * batch_size].tolist()


def should_stop(history: list[tuple[int, float]], patience: int, min_delta: float) -> str | None:
    """The paper's rule: stop when none of the last `patience` evaluations improved on the best before them by
    more than `min_delta` (relative): 'degraded' when all were worse (a clear minimum, then worse), else 'saturated'."""
    if len(history) <= patience:
        return None
    before = min(p for _, p in history[:-patience])
    recent = [p for _, p in history[-patience:]]
    if min(recent) > before * (1.0 - min_delta):
        return "degraded" if all(p > before for p in recent) else "saturated"
    return None


def run_key(cfg: TrainConfig, data_fingerprint: dict, student_spec: str, stage: str = "distill") -> str:
    """What a checkpoint must match to be resumed (identity.run_key): the config less ``NOT_IDENTITY``, the
    training data, the student and the code the stage runs."""
    return identity.run_key(stage, cfg.model_dump(), data_fingerprint, student_spec)


PREFETCH = True  # read the next micro-batch on a background thread (False: read in the loop; tests compare the two)
_clock = time.monotonic  # the wall clock of time-based checkpoints (tests move it)


class BatchReader:
    """Micro-batch i of the loop on ``device``, with micro-batch i+1 read (and decoded) on one background thread
    while i computes: ``get(i)`` returns ``data[indices_for(i)]`` and starts the read of i+1 (none at or past
    ``stop``, so exactly the sequences trained on are read). The loop's micro index stays the truth: a read-ahead
    of another index than the one asked for is dropped and the batch read on the spot. On CUDA the host tensors
    are pinned, so the copy to the GPU is asynchronous. An exception in the reader is raised by ``get``.
    ``waited``: seconds ``get`` spent waiting for data (what the read-ahead did not hide). ``close()`` ends the
    thread (call it on every way out)."""

    def __init__(self, data, indices_for, stop: int, device: torch.device, ahead: bool = True):
        self.data, self.indices_for, self.stop, self.device = data, indices_for, stop, device
        self.pin = device.type == "cuda"
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="sparsekd-batch-reader") if ahead else None
        self.pending: tuple[int, Future] | None = None
        self.waited = 0.0

    def _read(self, micro_index: int) -> dict[str, torch.Tensor]:
        batch = self.data[self.indices_for(micro_index)]
        return {name: t.pin_memory() for name, t in batch.items()} if self.pin else batch

    def get(self, micro_index: int) -> dict[str, torch.Tensor]:
        t0 = time.perf_counter()
        pending, self.pending = self.pending, None
        if pending is not None and pending[0] == micro_index:
            host = pending[1].result()  # re-raises the reader's exception here
        else:
            if pending is not None:
                pending[1].cancel()  # a read of another index: not wanted (if already running, it is ignored)
            host = self._read(micro_index)
        if self.pool is not None and micro_index + 1 < self.stop:
            self.pending = (micro_index + 1, self.pool.submit(self._read, micro_index + 1))
        batch = {name: t.to(self.device, non_blocking=self.pin) for name, t in host.items()}
        self.waited += time.perf_counter() - t0
        return batch

    def close(self) -> None:
        self.pending = None
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)


@dataclass
class DistillResult:
    steps: int
    kd_loss_first: float | None
    kd_loss_last: float | None
    ce_loss_first: float | None
    ce_loss_last: float | None
    val_ppl_best: float | None
    tokens_per_s: float
    resumed_from_step: int
    val_ppl_start: float | None
    best_step: int | None
    stop_reason: str
    bad_steps: int
    val_history: list
    self_referential: bool  # the student's weights are the cache's teacher's (compared in the teacher's precision)
    out: str
    precision: str  # e.g. "fp32 weights + bf16 autocast"
    # Counted on the saved student (prune/masks.measured_compression): what the evaluated model really holds.
    mlp_params: int
    mlp_nonzero: int
    mlp_zero_fraction: float
    mlp_reduction: float
    total_params: int
    masked_entries: int  # entries held at zero through training (a WANDA mask); 0 for dense/SVD students
    train_seconds: float = 0.0  # wall time of the optimizer steps (validation and checkpoints excluded)
    data_wait_seconds: float = 0.0  # of which the loop waited for its batches (the read-ahead hides the rest)
    # What self_referential means for the step-0 loss under this run's precision (precision.self_referential_meaning).
    self_referential_meaning: str | None = None

    def as_dict(self) -> dict:
        return dict(self.__dict__)


# ---------------------------------------------------------------------------------------------------------------- state


@dataclass
class StepLosses:
    """One optimizer step's loss terms: the mean over its grad_accum micro-batches of each micro-batch's global mean
    (``dist.Ranks.mean_terms``). ``finite`` is False once a micro-batch's loss was NaN/inf (it adds nothing here)."""

    loss: float = 0.0
    kd: float = 0.0  # 0.0 when the loss has no KD term (has_kd False: SFT)
    ce: float = 0.0
    has_kd: bool = False
    finite: bool = True

    def add(self, loss: float, kd: float | None, ce: float, grad_accum: int) -> None:
        self.has_kd = kd is not None
        self.kd += kd / grad_accum if self.has_kd else 0.0
        self.ce += ce / grad_accum
        self.loss += loss / grad_accum


@dataclass
class TrainState:
    """Everything the loop carries from one optimizer step to the next. With the weights and the optimizer state it
    is the checkpoint: ``checkpoint/state.pt`` holds ``as_dict()``, ``from_dict`` reads it back."""

    step: int = 0  # optimizer steps done
    micro_index: int = 0  # global micro-batches consumed: the data position (batch_indices), on any number of ranks
    best_ppl: float | None = None  # the best validation perplexity so far, at best_step: the model in best/
    best_step: int | None = None
    best_counts: dict | None = None  # measured_compression of that model (rank 0)
    history: list = field(default_factory=list)  # (step, validation ppl) of every validation so far
    kd_first: float | None = None  # the first and the latest update's KD and CE terms (KD None without a KD term)
    ce_first: float | None = None
    kd_last: float | None = None
    ce_last: float | None = None
    bad_in_row: int = 0  # NaN/inf steps skipped in a row (the guard gives up at max_bad_steps), and in all
    bad_total: int = 0
    tokens: int = 0  # tokens trained on, all ranks together
    train_seconds: float = 0.0  # wall time of the optimizer steps
    data_wait_seconds: float = 0.0  # of which the loop waited for its batches
    rng: dict | None = None  # the RNG states when the checkpoint was taken (_rng_state)
    run_key: str | None = None  # the run the state belongs to (run_key): another run's checkpoint is refused
    finished: bool = False  # training is over (publication may remain); stop_reason says why
    stop_reason: str | None = None
    loss_history: list = field(default_factory=list)  # (step, loss, kd, ce) of every update

    def as_dict(self) -> dict:
        """The fields by name, in declaration order; the values themselves, not copies."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, saved: dict) -> TrainState:
        """The state that ``as_dict`` gave (a field it lacks takes its default)."""
        state = cls(**{f.name: saved[f.name] for f in fields(cls) if f.name in saved})
        state.history = [tuple(h) for h in state.history]  # (step, ppl) pairs, as the loop appends them
        return state

    def record_update(self, losses: StepLosses) -> None:
        """An applied update: its terms are the latest (the first time also the first), and join the history."""
        kd = losses.kd if losses.has_kd else None  # SFT has no KD term: None, not a zero
        if self.ce_first is None:
            self.kd_first, self.ce_first = kd, losses.ce
        self.kd_last, self.ce_last = kd, losses.ce
        self.loss_history.append((self.step + 1, losses.loss, kd, losses.ce))
        self.bad_in_row = 0

    def record_skip(self) -> None:
        """A skipped update (a NaN/inf loss or gradient)."""
        self.bad_in_row += 1
        self.bad_total += 1


# ---------------------------------------------------------------------------------------------------------------- loop


def distill(cfg: DistillConfig, model, tokenizer, student_spec: str = "", log=print, progress=None,
            on_step=None) -> DistillResult:
    """Train `model` (an HF causal LM) on the cache `cfg.cache`; write `cfg.out`; return the figures.

    Precision (sparsekd_core/precision.py): the weights are trained and saved in fp32 whatever dtype they arrive
    in (upcast, logged); forward passes run under bf16 autocast on CUDA (``cfg.autocast``). Pruning invariants
    (prune/masks.py): a WANDA student's zeros stay zero through every step, checkpoint and resume.
    ``progress(step, total, postfix: dict)``: optional progress hook. ``on_step(step)``: called after each
    optimizer step (tests use it to simulate a kill).
    """
    from .models import weights_digest

    cache = TeacherCache(cfg.cache)
    if cache.fingerprint.get("tokenizer_digest") != tokenizer_digest(tokenizer):
        raise ConfigError(
            f"distill.cache={cfg.cache!r} was written with another tokenizer than the student's "
            f"(cache model {cache.fingerprint.get('model')!r}); a teacher cache must share the student's tokenizer"
        )
    vocab = model.get_output_embeddings().weight.shape[0]
    if vocab < int(cache.fingerprint["vocab_size"]):
        raise ConfigError(f"distill: the student's vocabulary ({vocab}) is smaller than the cache's "
                          f"({cache.fingerprint['vocab_size']})")
    # The cache's teacher digest was taken in the dtype it ran in (bf16 on a GPU worker): compare like with like.
    cache_dtype = getattr(torch, str(cache.fingerprint.get("dtype", "float32")), None)
    self_referential = weights_digest(model, cache_dtype if isinstance(cache_dtype, torch.dtype) else None) \
        == cache.fingerprint.get("weights_digest")
    if (cache.kind == "sampled") != (cfg.tail == "sampled"):
        raise ConfigError(
            f"distill.tail={cfg.tail!r} does not fit the {cache.kind} cache {cfg.cache!r}: a sampled-class cache "
            "(sparsekd cache --teacher-sample N) needs tail=sampled, and tail=sampled needs such a cache")
    if cache.kind == "sampled" and abs(cache.sample_temperature - cfg.temperature) > 1e-9:
        raise ConfigError(
            f"distill.temperature={cfg.temperature} differs from the temperature the cache's classes were sampled at "
            f"({cache.sample_temperature}); the sampled estimator is unbiased only at that temperature: give "
            f"--temperature {cache.sample_temperature} or re-cache with --sample-temperature {cfg.temperature}")
    kd_loss = KDLoss(alpha=cfg.alpha, temperature=cfg.temperature, tail=cfg.tail)

    def loss_fn(logits, batch):
        if cache.kind == "sampled":
            return kd_loss(logits, batch["input_ids"], batch["sample_ids"], batch["sample_logprobs"],
                           counts=batch["sample_counts"])
        return kd_loss(logits, batch["input_ids"], batch["topk_ids"], batch["topk_logprobs"], batch["tail_logmass"])

    return train(cfg, model, tokenizer, cache, loss_fn, run_key(cfg, cache.fingerprint, student_spec), "distill",
                 log=log, progress=progress, on_step=on_step, self_referential=self_referential,
                 extra={"teacher": cache.fingerprint})


def train(cfg: TrainConfig, model, tokenizer, data, loss_fn, key: str, stage: str, log=print, progress=None,
          on_step=None, self_referential: bool = False, extra: dict | None = None) -> DistillResult:
    """The training loop every training stage shares (distill, SFT): ``data[indices]`` gives a batch dict with
    ``input_ids`` [B, L]; ``loss_fn(logits, batch)`` gives (loss, kd or None, ce). Writes ``cfg.out`` with
    ``<stage>.json`` last; resumes from ``cfg.out/checkpoint``; see the module docstring for the rest.

    Under torchrun every rank calls it with the same arguments and returns the same result (``dist.py``: each rank
    trains on its slice of every global batch; rank 0 alone logs, reports progress and writes files). Under FSDP
    the ``model`` passed in is left sharded; under DDP it holds the trained weights, as in one process."""
    if cfg.batch_size % dist.world_size():
        raise ConfigError(f"{stage}.batch_size={cfg.batch_size} is the global micro-batch, split over "
                          f"{dist.world_size()} processes; allowed: a multiple of {dist.world_size()}")
    ranks = dist.setup(cfg.parallel, model)
    result = _train(ranks, cfg, model, tokenizer, data, loss_fn, key, stage, log, progress, on_step,
                    self_referential, extra)
    ranks.close()  # after an error the process's exit takes the process group down (and torchrun the other ranks)
    return result


def _train(ranks: dist.Ranks, cfg: TrainConfig, model, tokenizer, data, loss_fn, key, stage, log, progress, on_step,
           self_referential, extra) -> DistillResult:
    recipe = TrainRecipe(ranks, cfg, stage, model, tokenizer, loss_fn, log=log, progress=progress, on_step=on_step)
    done = recipe.recover(key)
    if done is not None:
        return done
    state = recipe.setup(data, key)
    recipe.run(state)
    return recipe.publish(state, self_referential, extra)


# ---------------------------------------------------------------------------------------------------------------- recipe


def plan_steps(n: int, cfg: TrainConfig, stage: str) -> tuple[int, int]:
    """(optimizer steps of the run, warmup steps) on ``n`` training sequences: cfg.epochs of whole steps, at most
    cfg.max_steps; warmup cfg.warmup_steps, by default a twentieth of the run."""
    steps_per_epoch = n // cfg.batch_size // cfg.grad_accum
    if steps_per_epoch == 0:
        raise ConfigError(f"{stage}: the training data has {n} sequences, fewer than one step needs "
                          f"(batch_size {cfg.batch_size} x grad_accum {cfg.grad_accum})")
    total = cfg.epochs * steps_per_epoch if cfg.max_steps is None else min(cfg.max_steps, cfg.epochs * steps_per_epoch)
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else max(1, total // 20)
    return total, warmup


class TrainRecipe:
    """The training loop every training stage shares (distill, SFT), in named phases:

    ``recover``  finish the directory swaps a kill interrupted; a run already finished in ``out`` is its result
                 (if its student still matches the digests the finished marker records; else it is trained again)
    ``setup``    schedule, validation text, ``resume`` (weights, optimizer, RNG and ``TrainState`` from the last
                 checkpoint, or a seeded start), the DDP/FSDP wrapper, AdamW, the mask guard, the batch reader
    ``run``      the loop: per step ``validate`` (maybe stop), ``step`` (one optimizer step), ``checkpoint`` when due
    ``publish``  the best model's files into ``out``, then ``<stage>.json`` (the result), then the clean-up

    The state that changes from step to step is the ``TrainState`` each phase is given; the recipe holds what stays
    (``setup`` sets total, warmup, device, val_ids, trained, optimizer, guard, reader, resumed_from). Every rank runs
    every phase (collectives inside); rank 0 alone logs and writes files (``dist.py``).
    """

    def __init__(self, ranks: dist.Ranks, cfg: TrainConfig, stage: str, model, tokenizer, loss_fn, log=print,
                 progress=None, on_step=None):
        if not ranks.is_main:  # rank 0 speaks for the run
            log, progress = (lambda message: None), None
        self.ranks, self.cfg, self.stage = ranks, cfg, stage
        self.model, self.tokenizer, self.loss_fn = model, tokenizer, loss_fn
        self.log, self.progress, self.on_step = log, progress, on_step
        self.out = Path(cfg.out).expanduser()
        self.ckpt_dir, self.best_dir = self.out / "checkpoint", self.out / "best"
        self.done_file = self.out / f"{stage}.json"

    # ------------------------------------------------------------------------------------------------ setup

    def recover(self, key: str) -> DistillResult | None:
        """Finish or undo the directory swaps a kill interrupted; the result of this run if ``out`` holds it
        finished (nothing left to do), else None. Another finished run in ``out`` is refused. A finished run whose
        student no longer matches the marker's digests (truncated, altered, missing) loses its marker (logged, one
        line) and None is returned: the run is trained again."""
        if self.ranks.is_main:
            for work_dir in (self.ckpt_dir, self.best_dir):
                recover_dir(work_dir)
        self.ranks.barrier()  # from here on every rank sees the same files
        if not self.done_file.is_file():
            return None
        finished = json.loads(self.done_file.read_text())
        if finished.get("run_key") != key:
            raise ConfigError(f"{self.stage}.out={self.cfg.out!r} holds a different finished run (config, data, student "
                              "or the code that trains differ); give another --out")
        # The student must still be the one the run published (not truncated or altered): else train it again.
        problem = self.ranks.broadcast(
            student_problem(self.out, finished.get("student_files")) if self.ranks.is_main else None)
        if problem is not None:
            self.log(f"{self.stage}: {problem}; training the run again")
            if self.ranks.is_main:
                self.done_file.unlink()
            self.ranks.barrier()
            return None
        if self.ranks.is_main:
            shutil.rmtree(self.best_dir, ignore_errors=True)  # a kill after the JSON, before the clean-up
            shutil.rmtree(self.ckpt_dir, ignore_errors=True)
        self.log(f"{self.stage}: {self.out} already holds this finished run; nothing to do")
        return DistillResult(**{k: finished[k] for k in DistillResult.__dataclass_fields__ if k in finished})

    def setup(self, data, key: str) -> TrainState:
        """Everything the loop needs, in an order that makes a resume exact; returns the state to start from.
        ``data[indices]``: a batch dict with ``input_ids`` [B, L]."""
        from .data import bos_token, load_text
        from .eval import tokenize_text
        from .prune.masks import MaskGuard, unstructured_masks

        cfg, model = self.cfg, self.model
        self.sequences = len(data)
        self.total, self.warmup = plan_steps(self.sequences, cfg, self.stage)
        precision.ensure_master_weights(model, log=self.log)
        self.device = next(model.parameters()).device
        masks = unstructured_masks(model)  # the pruned checkpoint's zeros, taken before a checkpoint is loaded
        self.val_ids = tokenize_text(self.tokenizer, load_text(cfg.val_data), cfg.val_tokens)
        self.val_bos = bos_token(self.tokenizer)
        self.val_cfg = EvalConfig(ctx=cfg.val_ctx, stride=cfg.val_ctx, protocol="standard", batch_size=1)
        ranks = self.ranks
        parallel = f", {ranks.world_size} processes ({ranks.strategy})" if ranks.world_size > 1 else ""
        self.log(f"{self.stage}: {precision.describe(self.device, cfg.autocast)} on {self.device.type}{parallel}, "
                 f"{self.total} steps")

        state, saved_optimizer = self.resume(key)
        self.resumed_from = state.step
        # What forward/backward run through: a DDP wrapper, or `model` itself (one process; FSDP2 shards it in place).
        # Wrapped after loading, so every rank starts from the checkpoint's weights; the optimizer and the mask guard
        # then hold the parameters as trained (FSDP: this rank's shards).
        self.trained = ranks.wrap(model)
        self.optimizer = self.make_optimizer(saved_optimizer)
        self.guard = MaskGuard(model, masks)
        if self.guard.pairs:
            self.log(f"{self.stage}: holding {self.guard.masked_entries:,} pruned MLP entries at zero (unstructured "
                     f"mask of {len(self.guard.pairs)} matrices)")
        self.saved_at = _clock()  # when the last checkpoint was written (or the loop began): checkpoint_minutes' clock
        # Each micro-step's batch is read while the one before computes (a background thread, BatchReader).
        self.reader = BatchReader(data, self.rank_indices, stop=self.total * cfg.grad_accum, device=self.device,
                                  ahead=PREFETCH)
        return state

    def resume(self, key: str) -> tuple[TrainState, dict | None]:
        """The state to start from and the optimizer state dict to load: from the last checkpoint of this run (its
        weights loaded into the model, the RNG restored), or a fresh state with the RNG seeded (cfg.seed) and None."""
        if not (self.ckpt_dir / "state.pt").is_file():
            torch.manual_seed(self.cfg.seed)
            return TrainState(run_key=key), None
        optimizer_state, saved = load_checkpoint(self.ckpt_dir, self.model)
        if saved.get("run_key") != key:
            raise ConfigError(f"{self.stage}.out={self.cfg.out!r} holds a checkpoint of a different run (config, data, "
                              "student or the code that trains differ); give another --out or delete it")
        state = TrainState.from_dict(saved)
        _set_rng_state(state.rng)
        self.log(f"{self.stage}: resuming from step {state.step} ({self.ckpt_dir})"
                 + (", training had finished" if state.finished else ""))
        return state, optimizer_state

    def make_optimizer(self, saved: dict | None) -> torch.optim.Optimizer:
        """AdamW over the parameters as trained (FSDP: this rank's shards), holding ``saved`` if resuming."""
        fused = self.device.type == "cuda"  # one kernel for all parameters; the CPU keeps the reference implementation
        optimizer = torch.optim.AdamW(self.model.parameters(), lr=self.cfg.lr, weight_decay=self.cfg.weight_decay,
                                      fused=fused)
        if saved is not None:
            self.ranks.load_optimizer_state(self.model, optimizer, saved)
            for group in optimizer.param_groups:
                group["fused"] = fused  # the saved groups carry the flag of the device that wrote them
        return optimizer

    def rank_indices(self, micro_index: int) -> list[int]:
        """This rank's contiguous slice of global micro-batch `micro_index`: N ranks together see what one would."""
        return self.ranks.shard(batch_indices(micro_index, self.sequences, self.cfg.batch_size, self.cfg.seed))

    def autocast(self):
        """A fresh autocast context for a forward pass (bf16 on CUDA unless cfg.autocast says otherwise)."""
        return precision.autocast(self.device, self.cfg.autocast)

    # ------------------------------------------------------------------------------------------------ the loop

    def run(self, state: TrainState) -> None:
        """Train from ``state`` to the end of the run (or an early stop) and checkpoint it as finished. A resumed
        run that had finished goes straight on to publication."""
        cfg, total = self.cfg, self.total
        stop_reason = "max_steps" if cfg.max_steps is not None and total == cfg.max_steps else "epochs"
        try:
            self.model.train()
            while not state.finished:
                lr = get_lr(state.step, total, cfg, self.warmup)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr

                # Validate at the start, every eval_every steps and at the end; keep the best model; maybe stop.
                early_stop = self.validate(state)
                if early_stop is not None:
                    stop_reason = early_stop
                    break
                if state.step >= total:
                    break

                postfix = self.step(state)
                if self.progress is not None:
                    self.progress(state.step, total, postfix)
                if self.checkpoint_due(state) and state.step < total:
                    self.checkpoint(state)
                if self.on_step is not None:
                    self.on_step(state.step)

            if not state.finished:  # training is over: record that first, so a kill below never retrains
                state.finished, state.stop_reason = True, stop_reason
                self.checkpoint(state)
        finally:
            self.close()

    def close(self) -> None:
        """The end of the loop, however it ended: no reader thread outlives it, the caller's model keeps no hooks."""
        self.reader.close()
        self.guard.remove()

    def step(self, state: TrainState) -> dict:
        """One optimizer step: grad_accum micro-steps of forward/backward, then (unless the NaN/inf guard skips it)
        the clipped AdamW update with the pruned entries held at zero. Returns the progress figures of the step."""
        t0, waited = time.perf_counter(), self.reader.waited
        losses = self.accumulate(state)
        self.update(state, losses)
        state.train_seconds += time.perf_counter() - t0
        state.data_wait_seconds += self.reader.waited - waited
        state.step += 1
        return {"loss": losses.loss, "kd": losses.kd, "ce": losses.ce,
                "tok/s": state.tokens / max(state.train_seconds, 1e-9),
                "wait_s": self.reader.waited - waited}  # this step's wait for data

    def accumulate(self, state: TrainState) -> StepLosses:
        """The step's grad_accum micro-batches, forward and backward: their mean loss's gradient accumulates in the
        parameters' ``.grad`` (reduced over ranks at the last one). Every micro-batch is consumed, even after a
        non-finite loss, so the data position stays step-aligned."""
        cfg, ranks = self.cfg, self.ranks
        losses = StepLosses()
        for micro in range(cfg.grad_accum):
            batch = self.reader.get(state.micro_index)
            state.micro_index += 1
            ranks.sync_gradients(self.trained, micro == cfg.grad_accum - 1)  # reduce gradients once per step
            with self.autocast():
                logits = self.trained(input_ids=batch["input_ids"], use_cache=False).logits
            out_loss = self.loss_fn(logits, batch)
            # The global micro-batch's terms, the same on every rank (one all-reduce; dist.Ranks.mean_terms).
            all_finite, loss_value, kd_value, ce_value, scale = ranks.mean_terms(out_loss)
            if not all_finite:
                losses.finite = False
                continue
            (out_loss.loss * scale / cfg.grad_accum).backward()
            losses.add(loss_value, kd_value, ce_value, cfg.grad_accum)
            state.tokens += batch["input_ids"].numel() * ranks.world_size  # equal slices: the global count
        return losses

    def update(self, state: TrainState, losses: StepLosses) -> None:
        """Clip the global gradient and apply it, or skip a non-finite step (NaN/inf guard: counted, and after
        max_bad_steps in a row a DistillError); the gradients are cleared either way."""
        cfg = self.cfg
        self.guard.mask_grads()  # FSDP's sharded gradients bypass the guard's hooks
        clip = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
        norm = self.ranks.clip_grad_norm(self.model.parameters(), clip)  # of the global gradient, on every rank
        if losses.finite and torch.isfinite(norm):
            self.optimizer.step()
            self.guard.apply()  # weight decay and rounding must not bring a pruned entry back
            state.record_update(losses)
        else:
            state.record_skip()
            step = state.step + 1  # the step being taken, counted from 1
            self.log(f"{self.stage}: step {step}: non-finite loss or gradient, update skipped")
            if state.bad_in_row >= cfg.max_bad_steps:
                raise DistillError(
                    f"{self.stage}: the loss or gradient was NaN/inf at {state.bad_in_row} steps in a row "
                    f"(steps {step + 1 - state.bad_in_row}..{step}); lower --lr, check the student and the cache, or "
                    "resume from the last checkpoint"
                )
        self.optimizer.zero_grad(set_to_none=True)

    # ------------------------------------------------------------------------------------------------ validation

    def evaluate(self) -> float:
        """Validation perplexity of the model as it is. Every rank evaluates (an FSDP forward needs them all);
        rank 0's figure is the one every rank keeps, so every rank takes the same stopping decision."""
        from .eval import perplexity

        self.model.eval()
        with self.autocast():
            ppl = perplexity(self.model, self.val_ids, self.val_cfg, bos=self.val_bos).ppl
        self.model.train()
        return self.ranks.broadcast(ppl)

    def validate(self, state: TrainState) -> str | None:
        """At step 0, every eval_every steps and at the last step (once per step, a resume included): evaluate,
        keep the model if it is the best so far; the reason to stop early (``should_stop``) or None to go on."""
        step, cfg = state.step, self.cfg
        due = step == 0 or step == self.total or (cfg.eval_every and step % cfg.eval_every == 0)
        if not due or any(s == step for s, _ in state.history):
            return None
        ppl = self.evaluate()
        state.history.append((step, ppl))
        self.log(f"{self.stage}: step {step}: validation ppl {ppl:.3f}")
        if state.best_ppl is None or ppl < state.best_ppl:
            self.keep_best(state, ppl)
        reason = should_stop(state.history, cfg.patience, cfg.min_delta)
        if reason is None or step >= self.total:
            return None
        self.log(f"{self.stage}: stopping at step {step}: validation ppl {reason}")
        return reason

    def keep_best(self, state: TrainState, ppl: float) -> None:
        """The model as it is becomes the best: written to best/ (an HF directory), with a checkpoint that says so."""
        from .prune.masks import measured_compression

        state.best_ppl, state.best_step = ppl, state.step
        weights = self.ranks.full_model(self.model)
        if self.ranks.is_main:
            state.best_counts = measured_compression(weights)
            save_hf(self.best_dir, weights, self.tokenizer)
        # best/ and the state that describes it move together: a replay of the steps since the last checkpoint need
        # not give the same weights on a GPU.
        if 0 < state.step < self.total:
            self.checkpoint(state)

    # ------------------------------------------------------------------------------------------------ checkpoints

    def checkpoint(self, state: TrainState) -> None:
        """Write checkpoint/ (weights, optimizer, ``state`` with the RNG now). Every rank takes part (FSDP gathers the
        full state); rank 0 writes; nobody goes on before it is whole."""
        state.rng = _rng_state()
        weights = self.ranks.full_model(self.model)
        optimizer_state = self.ranks.optimizer_state(self.model, self.optimizer)
        if self.ranks.is_main:
            save_checkpoint(self.ckpt_dir, weights, optimizer_state, state.as_dict())
        self.ranks.barrier()
        self.saved_at = _clock()

    def checkpoint_due(self, state: TrainState) -> bool:
        """Every checkpoint_every steps, or once checkpoint_minutes have passed since the last checkpoint; rank 0's
        clock decides for every rank (a checkpoint is a collective)."""
        cfg = self.cfg
        by_steps = cfg.checkpoint_every is not None and state.step % cfg.checkpoint_every == 0
        by_time = cfg.checkpoint_minutes > 0 and self.ranks.broadcast(
            _clock() - self.saved_at >= 60 * cfg.checkpoint_minutes)
        return by_steps or by_time

    # ------------------------------------------------------------------------------------------------ publication

    def publish(self, state: TrainState, self_referential: bool, extra: dict | None) -> DistillResult:
        """The final student is the best-validation model: its files go to ``out``; ``<stage>.json`` marks the run
        done; only then are the work directories removed (a rerun after a kill anywhere here redoes this part only).
        Rank 0 alone touches the files; every rank returns the result."""
        result = None
        if self.ranks.is_main:
            _publish_final(self.best_dir, self.out)
            result = self.result(state, self_referential, extra)
            # loss_history: [step, loss, kd, ce] of every update, the global micro-batch's means (not in the CLI JSON);
            # student_files: what `recover` checks before it calls the run finished.
            write_json_atomic(self.done_file, result.as_dict() | {
                "run_key": state.run_key, "config": self.cfg.model_dump(),
                "loss_history": [list(h) for h in state.loss_history], **(extra or {}),
                "student_files": student_files(self.out, [item.name for item in self.best_dir.iterdir()])})
            shutil.rmtree(self.best_dir, ignore_errors=True)
            shutil.rmtree(self.ckpt_dir, ignore_errors=True)
        return self.ranks.broadcast(result)

    def result(self, state: TrainState, self_referential: bool, extra: dict | None) -> DistillResult:
        """The run's figures from its final state (rank 0: the compression is counted on the best model)."""
        counts, device, autocast = state.best_counts, self.device, self.cfg.autocast
        teacher_precision = (extra or {}).get("teacher", {}).get("teacher_precision")
        return DistillResult(
            steps=state.step, kd_loss_first=state.kd_first, kd_loss_last=state.kd_last,
            ce_loss_first=state.ce_first, ce_loss_last=state.ce_last, val_ppl_best=state.best_ppl,
            tokens_per_s=state.tokens / state.train_seconds if state.train_seconds > 0 else 0.0,
            resumed_from_step=self.resumed_from, val_ppl_start=state.history[0][1] if state.history else None,
            best_step=state.best_step, stop_reason=state.stop_reason, bad_steps=state.bad_total,
            val_history=[list(h) for h in state.history], self_referential=self_referential, out=str(self.out),
            precision=precision.describe(device, autocast), mlp_params=counts["mlp_params"],
            mlp_nonzero=counts["mlp_nonzero"], mlp_zero_fraction=counts["mlp_zero_fraction"],
            mlp_reduction=counts["mlp_reduction"], total_params=counts["total_params"],
            masked_entries=self.guard.masked_entries, train_seconds=state.train_seconds,
            data_wait_seconds=state.data_wait_seconds,
            self_referential_meaning=precision.self_referential_meaning(device, autocast, teacher_precision)
            if self_referential else None,
        )
