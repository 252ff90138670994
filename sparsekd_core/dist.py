"""Data-parallel training under ``torchrun``: the one place that knows about ranks (used by ``distill.train``).

``torchrun --nproc-per-node N -m sparsekd distill ...`` starts N processes with RANK, WORLD_SIZE and LOCAL_RANK in
their environment; ``setup`` joins them in a process group (nccl on CUDA, gloo on CPU) unless one exists. Without
those variables everything here is a no-op: one process, rank 0 of 1. The policy:

* **The global batch is the config's.** ``batch_size`` is the global micro-batch; it must be divisible by N. Rank r
  takes the contiguous slice [r·B/N, (r+1)·B/N) of the same seeded global batch (``distill.batch_indices``), so
  N ranks × B/N sequences follow the loss curve of 1 process × B, within float rounding. Gradient accumulation is
  unchanged (gradients are reduced once, at the last micro-step).
* **Averaging.** Each rank's loss is a mean over its own positions and DDP/FSDP average the gradients over ranks:
  that is the global mean when every rank scores the same number of positions (KD: equal-length sequences,
  ``kd_loss.py``). A loss whose count varies (SFT's response tokens) says so in ``KDLossOutput.weight``, and each
  rank's loss is scaled by N·w_r/Σw so that the average is again the global token mean. The logged terms are the
  same weighted means, so rank 0 reports the global numbers. Clipping sees the global norm: DDP's gradients are
  already averaged, FSDP2's are DTensors whose norm ``clip_grad_norm_`` reduces over the shards.
* **Strategies** (``TrainConfig.parallel``): ``ddp`` (default when N > 1): a full replica per rank, gradients
  all-reduced. ``fsdp``: FSDP2 ``fully_shard`` per decoder layer and at the root: parameters, gradients and AdamW
  state are sharded; rank 0 keeps a CPU copy of the model to write full checkpoints and HF directories from.
* **Files** (``distill.train``): rank 0 writes everything, the others wait at a barrier; a checkpoint holds the full
  model and the optimizer state keyed as a one-process AdamW keys it, and the data position counts global
  batches, so a run resumes on any number of ranks. Every rank reads the checkpoint, so ``out`` must be visible to
  all of them (on one node it always is).
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as tdist

PARALLEL_MODES = ("auto", "ddp", "fsdp")


def world_size() -> int:
    """Processes in this run, as torchrun set it (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def bind_cuda_device() -> None:
    """Under torchrun on CUDA, make ``cuda`` mean this process's GPU (LOCAL_RANK), before a model is loaded."""
    if world_size() > 1 and torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))


@dataclass
class Ranks:
    """This process's place in the run and the few collective operations the training loop needs."""

    rank: int = 0
    world_size: int = 1
    strategy: str = "single"  # single | ddp | fsdp
    owns_group: bool = False  # setup() created the process group, so close() destroys it
    # fsdp: the parameter names in one-process order (the optimizer checkpoint's keys), and on rank 0 a CPU copy of
    # the unsharded model that full checkpoints and HF directories are written from.
    param_names: list[str] = field(default_factory=list)
    full_copy: torch.nn.Module | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ------------------------------------------------------------------------------------------------ data and sums

    def shard(self, indices: list[int]) -> list[int]:
        """This rank's contiguous slice of a global batch (its length is divisible by the world size)."""
        per_rank = len(indices) // self.world_size
        return indices[self.rank * per_rank : (self.rank + 1) * per_rank]

    def mean_terms(self, out) -> tuple[bool, float | None, float | None, float | None, float]:
        """(all finite, loss, kd or None, ce, scale) of the global micro-batch from each rank's ``KDLossOutput``:
        the rank means weighted by ``out.weight`` (None = equal on every rank), in one all-reduce. ``scale``
        turns this rank's loss into its share of the global mean under gradient averaging (1 for equal weights)."""
        if self.world_size == 1:
            if not torch.isfinite(out.loss):
                return False, None, None, None, 1.0
            return True, out.loss.item(), None if out.kd is None else out.kd.item(), out.ce.item(), 1.0
        weight = 1.0 if out.weight is None else float(out.weight)
        finite = bool(torch.isfinite(out.loss))
        kd = 0.0 if out.kd is None else out.kd.item()
        sums = torch.tensor([out.loss.item() * weight if finite else 0.0, kd * weight if finite else 0.0,
                             out.ce.item() * weight if finite else 0.0, weight, 0.0 if finite else 1.0],
                            dtype=torch.float64, device=out.loss.device)
        tdist.all_reduce(sums)
        loss_sum, kd_sum, ce_sum, total_weight, non_finite = sums.tolist()
        if non_finite:
            return False, None, None, None, 1.0
        total_weight = max(total_weight, 1e-12)
        scale = 1.0 if out.weight is None else self.world_size * weight / total_weight
        return (True, loss_sum / total_weight, None if out.kd is None else kd_sum / total_weight,
                ce_sum / total_weight, scale)

    def broadcast(self, value):
        """Rank 0's ``value`` (any picklable object) on every rank."""
        if self.world_size == 1:
            return value
        box = [value]
        tdist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.world_size > 1:
            tdist.barrier()

    def close(self) -> None:
        """The end of a run: every rank is here; the process group goes if ``setup`` made it."""
        if self.owns_group and tdist.is_initialized():
            tdist.barrier()
            tdist.destroy_process_group()
            self.owns_group = False

    # ------------------------------------------------------------------------------------------------ the model

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """The module to run forward/backward through: ``model`` itself (one process; FSDP2 shards it in place)
        or a DDP wrapper of it. ``model`` keeps its parameter names; under DDP its parameters are the trained ones."""
        if self.strategy == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            device = next(model.parameters()).device
            return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        if self.strategy == "fsdp":
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            self.param_names = [name for name, _ in model.named_parameters()]
            if self.is_main:
                self.full_copy = _cpu_copy(model)
            mesh = init_device_mesh(next(model.parameters()).device.type, (self.world_size,))
            layers = set(getattr(model, "_no_split_modules", None) or ())  # HF: the decoder-layer class
            for module in list(model.modules()):
                if type(module).__name__ in layers:
                    fully_shard(module, mesh=mesh)
            fully_shard(model, mesh=mesh)
            # FSDP2 allocates its unsharded parameters at the first all-gather and reuses them; were that inside
            # validation's inference_mode, training could not write to them. Allocate them here, outside it.
            for module in model.modules():
                if hasattr(module, "unshard") and hasattr(module, "reshard"):
                    module.unshard()
                    module.reshard()
        return model

    def sync_gradients(self, trained: torch.nn.Module, sync: bool) -> None:
        """Reduce gradients in the next forward/backward (the last micro-step) or let them accumulate locally (the
        others). For DDP this is the flag its ``no_sync()`` context toggles, set without a context (as nanoGPT)."""
        if self.strategy == "ddp":
            trained.require_backward_grad_sync = sync
        elif self.strategy == "fsdp":
            trained.set_requires_gradient_sync(sync)

    def clip_grad_norm(self, parameters, max_norm: float) -> torch.Tensor:
        """``clip_grad_norm_`` on the global gradient; the norm as a plain tensor (equal on every rank)."""
        norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm)
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm

    def full_model(self, model: torch.nn.Module) -> torch.nn.Module | None:
        """Rank 0: an unwrapped model holding the current full weights (``model`` itself unless FSDP); other ranks:
        None. A collective under FSDP (every rank must call it)."""
        if self.strategy != "fsdp":
            return model if self.is_main else None
        from torch.distributed.checkpoint import state_dict as dcp

        full = dcp.get_model_state_dict(model, options=dcp.StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not self.is_main:
            return None
        self.full_copy.load_state_dict(full)
        return self.full_copy

    def optimizer_state(self, model: torch.nn.Module, optimizer) -> dict | None:
        """Rank 0: the optimizer's full state dict keyed by parameter index, as a one-process AdamW keys it; other
        ranks: None. A collective under FSDP."""
        if self.strategy != "fsdp":
            return optimizer.state_dict() if self.is_main else None
        from torch.distributed.checkpoint import state_dict as dcp

        by_name = dcp.get_optimizer_state_dict(model, optimizer,
                                               options=dcp.StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not self.is_main:
            return None
        index = {name: i for i, name in enumerate(self.param_names)}
        return {"state": {index[name]: value for name, value in by_name["state"].items()},
                "param_groups": [{**g, "params": [index[name] for name in g["params"]]}
                                 for g in by_name["param_groups"]]}

    def load_optimizer_state(self, model: torch.nn.Module, optimizer, saved: dict) -> None:
        """Load a state dict that ``optimizer_state`` wrote (on any number of ranks) into ``optimizer``."""
        if self.strategy != "fsdp":
            optimizer.load_state_dict(saved)
            return
        from torch.distributed.checkpoint import state_dict as dcp

        names = self.param_names
        by_name = {"state": {names[i]: value for i, value in saved["state"].items()},
                   "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in saved["param_groups"]]}
        dcp.set_optimizer_state_dict(model, optimizer, by_name, options=dcp.StateDictOptions(full_state_dict=True))


def setup(parallel: str, model: torch.nn.Module) -> Ranks:
    """This process's ``Ranks`` from torchrun's environment; joins the process group (nccl on CUDA, gloo on CPU) if
    there is more than one process and none exists yet, and on CUDA moves ``model`` to this rank's GPU (LOCAL_RANK).
    ``parallel``: auto (= ddp) | ddp | fsdp; ignored in a single process."""
    if parallel not in PARALLEL_MODES:
        raise ValueError(f"parallel={parallel!r}; allowed: {', '.join(PARALLEL_MODES)}")
    if world_size() == 1:
        return Ranks()
    device = next(model.parameters()).device
    if device.type == "cuda":
        bind_cuda_device()
        model.to(torch.device("cuda", torch.cuda.current_device()))
    owns = False
    if not tdist.is_initialized():
        tdist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        owns = True
    return Ranks(rank=tdist.get_rank(), world_size=tdist.get_world_size(),
                 strategy="fsdp" if parallel == "fsdp" else "ddp", owns_group=owns)


def _cpu_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A deep copy of ``model`` on the CPU (ties kept), made without a second copy on the model's device."""
    memo = {id(p): torch.nn.Parameter(p.detach().to("cpu", copy=True), requires_grad=p.requires_grad)
            for p in model.parameters()}
    memo |= {id(b): b.detach().to("cpu", copy=True) for b in model.buffers()}
    return copy.deepcopy(model, memo)
