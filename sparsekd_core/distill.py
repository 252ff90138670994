"""Offline self-referential distillation: train a student on a teacher cache (nanoGPT-style loop, top to bottom).

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
                  update); written last: its presence means done
Directories are swapped in with ``files.replace_dir`` and recovered at start, so a kill at any point (inside a
step, a checkpoint, the final publication) leaves a state that the same command resumes to the same weights.
Precision: fp32 master weights, bf16 autocast on CUDA, saved fp32 (``precision.py``), whatever the caller loaded;
AdamW is the fused kernel on CUDA. The next micro-batch is read from the cache while the current one computes
(``BatchReader``); ``data_wait_seconds`` says how long the loop still waited for data.
Under torchrun the same loop runs on every rank, DDP or FSDP2, at the same global batch; rank 0 writes (``dist.py``).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from . import dist, precision
from .cache import TeacherCache, tokenizer_digest
from .config import ConfigError, DistillConfig, EvalConfig, TrainConfig
from .files import recover_dir, remove_stale_tmp, replace_dir, write_file_atomic, write_json_atomic
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


# Training fields that change no result: where it goes, how many ranks and how, how often checkpoints are written.
# Neither a checkpoint's run key nor a flow's stage key covers them (tasks/stages.py uses identity_fields too).
NOT_IDENTITY = frozenset({"out", "parallel", "checkpoint_every", "checkpoint_minutes"})


def identity_fields(fields: dict) -> dict:
    """A training config's fields less those that change no result (``NOT_IDENTITY``)."""
    return {k: v for k, v in fields.items() if k not in NOT_IDENTITY}


def run_key(cfg: TrainConfig, data_fingerprint: dict, student_spec: str) -> str:
    """What a checkpoint must match to be resumed: the config less ``NOT_IDENTITY``, the training data and the
    student."""
    keep = identity_fields(cfg.model_dump())
    blob = json.dumps([keep, data_fingerprint, student_spec], sort_keys=True, default=str)
    return hashlib.blake2b(blob.encode(), digest_size=8).hexdigest()


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
    from .data import load_text
    from .eval import perplexity, tokenize_text
    from .prune.masks import MaskGuard, measured_compression, unstructured_masks

    if not ranks.is_main:  # rank 0 speaks for the run
        log, progress = (lambda message: None), None
    out = Path(cfg.out).expanduser()
    ckpt_dir, best_dir = out / "checkpoint", out / "best"
    done_file = out / f"{stage}.json"
    if ranks.is_main:
        for work_dir in (ckpt_dir, best_dir):  # finish or undo a directory swap a kill interrupted
            recover_dir(work_dir)
    ranks.barrier()  # from here on every rank sees the same files
    if done_file.is_file():
        finished = json.loads(done_file.read_text())
        if finished.get("run_key") == key:
            if ranks.is_main:
                shutil.rmtree(best_dir, ignore_errors=True)  # a kill after the JSON, before the clean-up
                shutil.rmtree(ckpt_dir, ignore_errors=True)
            log(f"{stage}: {out} already holds this finished run; nothing to do")
            return DistillResult(**{k: finished[k] for k in DistillResult.__dataclass_fields__ if k in finished})
        raise ConfigError(f"{stage}.out={cfg.out!r} holds a different finished run; give another --out")

    n = len(data)
    micro_per_epoch = n // cfg.batch_size
    steps_per_epoch = micro_per_epoch // cfg.grad_accum
    if steps_per_epoch == 0:
        raise ConfigError(f"{stage}: the training data has {n} sequences, fewer than one step needs "
                          f"(batch_size {cfg.batch_size} x grad_accum {cfg.grad_accum})")
    total = cfg.epochs * steps_per_epoch if cfg.max_steps is None else min(cfg.max_steps, cfg.epochs * steps_per_epoch)
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else max(1, total // 20)
    precision.ensure_master_weights(model, log=log)
    device = next(model.parameters()).device
    autocast = lambda: precision.autocast(device, cfg.autocast)  # noqa: E731 - a fresh context each use
    masks = unstructured_masks(model)  # the pruned checkpoint's zeros, taken before a checkpoint is loaded
    val_ids = tokenize_text(tokenizer, load_text(cfg.val_data), cfg.val_tokens)
    val_cfg = EvalConfig(ctx=cfg.val_ctx, stride=cfg.val_ctx, protocol="standard", batch_size=1)
    parallel = f", {ranks.world_size} processes ({ranks.strategy})" if ranks.world_size > 1 else ""
    log(f"{stage}: {precision.describe(device, cfg.autocast)} on {device.type}{parallel}, {total} steps")

    # Everything the loop carries from step to step; it is the checkpoint (with model and optimizer).
    state = dict(step=0, micro_index=0, best_ppl=None, best_step=None, best_counts=None, history=[], kd_first=None,
                 ce_first=None, kd_last=None, ce_last=None, bad_in_row=0, bad_total=0, tokens=0, train_seconds=0.0,
                 data_wait_seconds=0.0, rng=None, run_key=key, finished=False, stop_reason=None, loss_history=[])
    resumed_from = 0
    saved_optimizer = None
    if (ckpt_dir / "state.pt").is_file():
        saved_optimizer, saved = load_checkpoint(ckpt_dir, model)
        if saved.get("run_key") != key:
            raise ConfigError(f"{stage}.out={cfg.out!r} holds a checkpoint of a different run (config, data or "
                              "student differ); give another --out or delete it")
        state.update(saved)
        state["history"] = [tuple(h) for h in state["history"]]
        _set_rng_state(state["rng"])
        resumed_from = state["step"]
        log(f"{stage}: resuming from step {resumed_from} ({ckpt_dir})"
            + (", training had finished" if state["finished"] else ""))
    else:
        torch.manual_seed(cfg.seed)

    # What forward/backward run through: a DDP wrapper, or `model` itself (one process; FSDP2 shards it in place).
    # Wrapped after loading, so every rank starts from the checkpoint's weights; the optimizer and the mask guard
    # then hold the parameters as trained (FSDP: this rank's shards).
    trained = ranks.wrap(model)
    fused = device.type == "cuda"  # one kernel for all parameters; the CPU keeps the reference implementation
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused)
    if saved_optimizer is not None:
        ranks.load_optimizer_state(model, optimizer, saved_optimizer)
        for group in optimizer.param_groups:
            group["fused"] = fused  # the saved groups carry the flag of the device that wrote them
    guard = MaskGuard(model, masks)
    if guard.pairs:
        log(f"{stage}: holding {guard.masked_entries:,} pruned MLP entries at zero (unstructured mask of "
            f"{len(guard.pairs)} matrices)")

    def evaluate() -> float:
        """Every rank evaluates (an FSDP forward needs them all); rank 0's figure is the one every rank keeps, so
        every rank takes the same stopping decision."""
        model.eval()
        with autocast():
            ppl = perplexity(model, val_ids, val_cfg).ppl
        model.train()
        return ranks.broadcast(ppl)

    saved_at = _clock()  # when the last checkpoint was written (or the loop began): the clock of checkpoint_minutes

    def checkpoint() -> None:
        """Every rank takes part (FSDP gathers the full state); rank 0 writes; nobody goes on before it is whole."""
        nonlocal saved_at
        state["rng"] = _rng_state()
        weights, optimizer_state = ranks.full_model(model), ranks.optimizer_state(model, optimizer)
        if ranks.is_main:
            save_checkpoint(ckpt_dir, weights, optimizer_state, state)
        ranks.barrier()
        saved_at = _clock()

    def checkpoint_due() -> bool:
        """Every checkpoint_every steps, or once checkpoint_minutes have passed since the last checkpoint; rank 0's
        clock decides for every rank (a checkpoint is a collective)."""
        by_steps = cfg.checkpoint_every is not None and state["step"] % cfg.checkpoint_every == 0
        by_time = cfg.checkpoint_minutes > 0 and ranks.broadcast(_clock() - saved_at >= 60 * cfg.checkpoint_minutes)
        return by_steps or by_time

    def rank_indices(micro_index: int) -> list[int]:
        """This rank's contiguous slice of global micro-batch `micro_index`: N ranks together see what one would."""
        return ranks.shard(batch_indices(micro_index, n, cfg.batch_size, cfg.seed))

    # Each micro-step's batch is read while the one before computes (a background thread, BatchReader).
    reader = BatchReader(data, rank_indices, stop=total * cfg.grad_accum, device=device, ahead=PREFETCH)

    stop_reason = "max_steps" if cfg.max_steps is not None and total == cfg.max_steps else "epochs"
    try:
        model.train()
        while not state["finished"]:
            step = state["step"]
            lr = get_lr(step, total, cfg, warmup)
            for group in optimizer.param_groups:
                group["lr"] = lr

            # Validate at the start, every eval_every steps and at the end; keep the best model; maybe stop.
            if step == 0 or step == total or (cfg.eval_every and step % cfg.eval_every == 0):
                if not any(s == step for s, _ in state["history"]):
                    ppl = evaluate()
                    state["history"].append((step, ppl))
                    log(f"{stage}: step {step}: validation ppl {ppl:.3f}")
                    if state["best_ppl"] is None or ppl < state["best_ppl"]:
                        state["best_ppl"], state["best_step"] = ppl, step
                        weights = ranks.full_model(model)
                        if ranks.is_main:
                            state["best_counts"] = measured_compression(weights)
                            save_hf(best_dir, weights, tokenizer)
                        # best/ and the state that describes it move together: a replay of the steps since the
                        # last checkpoint need not give the same weights on a GPU.
                        if 0 < step < total:
                            checkpoint()
                    reason = should_stop(state["history"], cfg.patience, cfg.min_delta)
                    if reason is not None and step < total:
                        stop_reason = reason
                        log(f"{stage}: stopping at step {step}: validation ppl {reason}")
                        break
            if step >= total:
                break

            # One optimizer step = grad_accum micro-steps; the loss is averaged over them.
            t0, waited = time.perf_counter(), reader.waited
            kd_sum = ce_sum = loss_sum = 0.0
            has_kd = False
            finite = True
            for micro in range(cfg.grad_accum):
                batch = reader.get(state["micro_index"])
                state["micro_index"] += 1
                ranks.sync_gradients(trained, micro == cfg.grad_accum - 1)  # reduce gradients once per step
                with autocast():
                    logits = trained(input_ids=batch["input_ids"], use_cache=False).logits
                out_loss = loss_fn(logits, batch)
                # The global micro-batch's terms, the same on every rank (one all-reduce; dist.Ranks.mean_terms).
                all_finite, loss_value, kd_value, ce_value, scale = ranks.mean_terms(out_loss)
                if not all_finite:
                    finite = False  # keep consuming this step's data so the data position stays step-aligned
                    continue
                (out_loss.loss * scale / cfg.grad_accum).backward()
                has_kd = kd_value is not None
                kd_sum += kd_value / cfg.grad_accum if has_kd else 0.0
                ce_sum += ce_value / cfg.grad_accum
                loss_sum += loss_value / cfg.grad_accum
                state["tokens"] += batch["input_ids"].numel() * ranks.world_size  # equal slices: the global count
            guard.mask_grads()  # FSDP's sharded gradients bypass the guard's hooks
            clip = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
            norm = ranks.clip_grad_norm(model.parameters(), clip)  # of the global gradient, on every rank
            if finite and torch.isfinite(norm):
                optimizer.step()
                guard.apply()  # weight decay and rounding must not bring a pruned entry back
                state["bad_in_row"] = 0
                kd_value = kd_sum if has_kd else None  # SFT has no KD term: None, not a zero
                if state["ce_first"] is None:
                    state["kd_first"], state["ce_first"] = kd_value, ce_sum
                state["kd_last"], state["ce_last"] = kd_value, ce_sum
                state["loss_history"].append((step + 1, loss_sum, kd_value, ce_sum))
            else:  # NaN/inf guard: skip the update, count it, give up after max_bad_steps in a row
                state["bad_in_row"] += 1
                state["bad_total"] += 1
                log(f"{stage}: step {step + 1}: non-finite loss or gradient, update skipped")
                if state["bad_in_row"] >= cfg.max_bad_steps:
                    raise DistillError(
                        f"{stage}: the loss or gradient was NaN/inf at {state['bad_in_row']} steps in a row "
                        f"(steps {step + 2 - state['bad_in_row']}..{step + 1}); lower --lr, check the student and "
                        "the cache, or resume from the last checkpoint"
                    )
            optimizer.zero_grad(set_to_none=True)
            state["train_seconds"] += time.perf_counter() - t0
            state["data_wait_seconds"] += reader.waited - waited
            state["step"] = step + 1

            if progress is not None:
                progress(state["step"], total, {
                    "loss": loss_sum, "kd": kd_sum, "ce": ce_sum,
                    "tok/s": state["tokens"] / max(state["train_seconds"], 1e-9),
                    "wait_s": reader.waited - waited})  # this step's wait for data
            if checkpoint_due() and state["step"] < total:
                checkpoint()
            if on_step is not None:
                on_step(state["step"])

        if not state["finished"]:  # training is over: record that first, so a kill below never retrains
            state["finished"], state["stop_reason"] = True, stop_reason
            checkpoint()
    finally:
        reader.close()  # no reader thread outlives the loop, however it ended
        guard.remove()  # the caller's model keeps no hooks, whether training ended or raised

    # The final student is the best-validation model: its files go to `out`; distill.json marks the run done;
    # only then are the work directories removed (a rerun after a kill anywhere here redoes this part only).
    # Rank 0 alone touches the files; every rank returns its result.
    result = None
    if ranks.is_main:
        _publish_final(best_dir, out)
        counts = state["best_counts"]
        result = DistillResult(
            steps=state["step"], kd_loss_first=state["kd_first"], kd_loss_last=state["kd_last"],
            ce_loss_first=state["ce_first"], ce_loss_last=state["ce_last"], val_ppl_best=state["best_ppl"],
            tokens_per_s=state["tokens"] / state["train_seconds"] if state["train_seconds"] > 0 else 0.0,
            resumed_from_step=resumed_from, val_ppl_start=state["history"][0][1] if state["history"] else None,
            best_step=state["best_step"], stop_reason=state["stop_reason"], bad_steps=state["bad_total"],
            val_history=[list(h) for h in state["history"]], self_referential=self_referential, out=str(out),
            precision=precision.describe(device, cfg.autocast), mlp_params=counts["mlp_params"],
            mlp_nonzero=counts["mlp_nonzero"], mlp_zero_fraction=counts["mlp_zero_fraction"],
            mlp_reduction=counts["mlp_reduction"], total_params=counts["total_params"],
            masked_entries=guard.masked_entries, train_seconds=state["train_seconds"],
            data_wait_seconds=state["data_wait_seconds"],
            self_referential_meaning=precision.self_referential_meaning(
                device, cfg.autocast, (extra or {}).get("teacher", {}).get("teacher_precision"))
            if self_referential else None,
        )
        # loss_history: [step, loss, kd, ce] of every update, the global micro-batch's means (not in the CLI JSON).
        write_json_atomic(done_file, result.as_dict() | {
            "run_key": key, "config": cfg.model_dump(), "loss_history": [list(h) for h in state["loss_history"]],
            **(extra or {})})
        shutil.rmtree(best_dir, ignore_errors=True)
        shutil.rmtree(ckpt_dir, ignore_errors=True)
    return ranks.broadcast(result)
