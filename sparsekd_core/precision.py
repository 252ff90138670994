"""The precision policy, in one place; every entry point (CLI, task, flow) loads and runs a stage through it.

| stage | weights | math | on CUDA | who decides |
|---|---|---|---|---|
| teacher cache | fp32 | fp32 (TF32 off) | same | ``stage_load_dtype`` and ``teacher_math``: whatever dtype was asked; a cheaper teacher only by the named opt-in ``teacher_precision: tf32 | bf16``, whose fidelity to fp32 the cache reports |
| pruning | fp32 | fp32, decompositions fp64 | same | ``stage_load_dtype``: a checkpoint pruned on CUDA holds the fp32 tensors a CPU prune writes |
| training | fp32 masters | bf16 autocast | yes (``autocast: auto``) | ``stage_load_dtype``, ``autocast`` |
| evaluation | as asked | as asked | ``dtype: auto`` = bf16 | a measurement: allowed in bf16, and its JSON says ``dtype`` |

Why an fp32 teacher: the cache is the target every later stage is trained to. Loading SmolLM2-135M in bf16 (what
``dtype: auto`` gives on CUDA) moves its top-32 log-probs by 0.067 nats on average and up to 6.7 nats (2x256
tokens of WikiText-2 valid, measured on CPU), ~3x format 2's quantisation step, and only 54% of the top-32 ids
agree rank by rank with the fp32 teacher's; computing the LM head alone in fp32 leaves 0.057 (the bf16 body
dominates). So the default teacher is fp32 throughout, and a dense model's cache is its own exact distribution.

Why fp32 pruning: the whitening statistics and SVDs run in fp64 from the weights as loaded; a model loaded in
bf16 would be decomposed from bf16-rounded weights and its factors saved in bf16, so a GPU worker's checkpoint would
differ from a CPU's, and every later stage (fp32 masters) would start from rounded factors.

Why fp32 masters: AdamW moves a weight by about the learning rate per step (2e-5..5e-5 here). A bf16 weight of
magnitude |w| has an ulp of |w|·2⁻⁷, so for |w| > ~2.5e-3 an update of 2e-5 is below half an ulp and is rounded
away: measured on SmolLM2-135M with bf16 weights, 4 steps at lr 2e-5 left 23% of the MLP weights exactly unchanged
(the larger ones). Autocast keeps the matmuls in bf16 (the speed) while the weights and optimizer state stay fp32.
"""

from __future__ import annotations

import contextlib
from typing import Literal

import torch

MASTER_DTYPE = torch.float32
Autocast = Literal["auto", "bf16", "off"]
TeacherPrecision = Literal["fp32", "tf32", "bf16"]
TEACHER_PRECISIONS: dict[str, str] = {
    "fp32": "fp32 weights, fp32 math (TF32 off)",
    "tf32": "fp32 weights, TF32 matmuls on CUDA (opt-in; on CPU the same as fp32)",
    "bf16": "bf16 weights and math (opt-in)",
}


# Why each stage loads fp32 whatever was asked, in the words the log shows (see the table above).
_FIXED_FP32 = {
    "train": "training keeps fp32 master weights; forward passes use bf16 autocast on CUDA",
    "prune": "pruning decomposes in fp64 and saves an fp32 checkpoint",
    "teacher": "the teacher's log-probs are the training target; a bf16 teacher is the opt-in "
               "teacher_precision=bf16 (--teacher-precision bf16), whose fidelity the cache reports",
}
Stage = Literal["train", "prune", "teacher", "eval"]


def stage_load_dtype(stage: Stage, requested: str, log=print) -> str:
    """The dtype a stage loads its model in: fp32 for training, pruning and the teacher whatever was asked (and
    the log says so when it differs); evaluation, profiling and generation take what was asked (a measurement)."""
    if stage not in _FIXED_FP32:
        return requested
    if requested not in ("auto", "fp32"):
        log(f"precision: the {stage} stage loads the model in fp32, not {requested} ({_FIXED_FP32[stage]})")
    return "fp32"


def teacher_weights_dtype(precision: TeacherPrecision) -> torch.dtype:
    """The teacher's weights under a teacher precision: fp32, but for the bf16 opt-in (cast after the probe)."""
    return torch.bfloat16 if precision == "bf16" else torch.float32


@contextlib.contextmanager
def teacher_math(device: torch.device, precision: TeacherPrecision):
    """The matmul precision of a teacher forward: TF32 on CUDA only for ``tf32``, strict fp32 otherwise (whatever
    the process had set); restored afterwards. On CPU there is nothing to set."""
    if device.type != "cuda":
        yield
        return
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    before = (matmul.allow_tf32, cudnn.allow_tf32)
    matmul.allow_tf32 = cudnn.allow_tf32 = precision == "tf32"
    try:
        yield
    finally:
        matmul.allow_tf32, cudnn.allow_tf32 = before


def ensure_master_weights(model: torch.nn.Module, log=print,
                          why: str = "updates of ~lr would round away in bf16") -> torch.nn.Module:
    """Upcast every floating parameter and buffer of ``model`` to fp32 in place (and say so) if any is not."""
    lower = sorted({str(t.dtype).removeprefix("torch.") for t in (*model.parameters(), *model.buffers())
                    if t.is_floating_point() and t.dtype != MASTER_DTYPE})
    if lower:
        log(f"precision: the model was handed over in {', '.join(lower)}; upcast to fp32 ({why})")
        model.to(MASTER_DTYPE)
    return model


def autocast_dtype(device: torch.device, mode: Autocast) -> torch.dtype | None:
    """bf16 under ``auto`` on CUDA, none on CPU; ``bf16`` forces it (CPU autocast too: how tests exercise the GPU
    path); ``off`` never."""
    if mode == "off" or (mode == "auto" and device.type != "cuda"):
        return None
    return torch.bfloat16


def autocast(device: torch.device, mode: Autocast):
    dtype = autocast_dtype(device, mode)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def describe(device: torch.device, mode: Autocast) -> str:
    dtype = autocast_dtype(device, mode)
    return "fp32 weights" + (" + bf16 autocast" if dtype is not None else "")


def self_referential_meaning(device: torch.device, mode: Autocast, teacher_precision: str | None) -> str:
    """What ``self_referential: true`` (the student's weights are the cached teacher's) means for the KD loss at
    step 0 under this run's precision."""
    cast = autocast_dtype(device, mode)
    teacher = teacher_precision or "fp32"
    if cast is None and teacher in ("fp32", "tf32"):
        return ("the student's weights are the teacher's: its fp32 forward reproduces the cached fp32 log-probs up to "
                "the cache's quantisation, so the KD loss starts at ~0 (topk and bucket tails)")
    if cast is not None and teacher in ("fp32", "tf32"):
        return ("the student's weights are the teacher's, but its forward runs under bf16 autocast while the cache "
                "holds fp32 log-probs: the step-0 KD loss is the bf16 rounding of the forward (about 0.07 nats per "
                "log-prob on SmolLM2), not 0; the weights still start at the teacher's fixed point")
    return ("the student's weights, rounded to bf16, are the teacher's: the cache holds a bf16 teacher "
            "(teacher_precision=bf16), so its targets carry the bf16 error that the cache JSON's teacher_fidelity "
            "reports" + ("" if cast is not None else "; the student's fp32 forward differs from them by that error"))
