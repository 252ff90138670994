"""Sliding-window perplexity, exactly as the protocol text defines it.

The text is tokenized once with ``add_special_tokens=False`` (``max_tokens`` keeps the first N tokens).
Windows start at 0, stride, 2·stride, … and end at ``min(start + ctx, n)``; the last window is the first one
that reaches the end of the text (it may be shorter than ctx), so no window lies wholly inside an earlier one.
Inside a window ``[b, e)`` the model predicts token t from tokens ``b..t-1`` for ``t = b+1 .. e-1``.

* ``paper``: every predicted token of every window counts; tokens in overlaps count once per window.
  Tokens scored = Σ_windows (e - b - 1).
* ``standard``: each token is scored once, by the window that gives it the most context: window w scores the
  targets ``t >= end of window w-1`` (the first window scores ``1 .. e-1``). Tokens scored = n - 1 when
  stride < ctx; with stride == ctx a window's first token has no context and is not scored (as in ``paper``).

With a BOS (``data.bos_token``: the tokenizer puts one in front of every text it encodes, as Gemma's does) every
window is run with that BOS in front of it, as the model saw every document in training; the tokens scored are the
same as without it (the BOS only adds context), so ``tokens`` and the windows do not change.

ppl = exp(mean NLL over the scored tokens). Windows of equal length are batched; the loss is computed from one
batch of logits at a time in fp32, in row chunks, so no more than one batch of logits ever exists.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .config import EvalConfig


@dataclass(frozen=True)
class Window:
    begin: int
    end: int
    first_target: int  # first position scored in this window (targets first_target .. end-1)


def make_windows(n_tokens: int, ctx: int, stride: int, protocol: str) -> list[Window]:
    if n_tokens < 2:
        raise ValueError(f"the text has {n_tokens} token(s); perplexity needs at least 2")
    windows: list[Window] = []
    prev_end = 0
    begin = 0
    while True:
        end = min(begin + ctx, n_tokens)
        first = begin + 1 if protocol == "paper" else max(begin + 1, prev_end)
        windows.append(Window(begin, end, first))
        if end == n_tokens:
            return windows
        prev_end = end
        begin += stride


def _nll_sum(logits: torch.Tensor, targets: torch.Tensor, rows_per_chunk: int = 4096) -> torch.Tensor:
    """Sum of -log p(target) over rows of [R, V] logits, in fp32 row chunks (bounded extra memory)."""
    total = torch.zeros((), dtype=torch.float64, device=logits.device)
    for start in range(0, logits.shape[0], rows_per_chunk):
        chunk = logits[start : start + rows_per_chunk].float()
        total += F.cross_entropy(chunk, targets[start : start + rows_per_chunk], reduction="sum").double()
    return total


@dataclass
class PerplexityResult:
    ppl: float
    nll: float
    tokens: int
    windows: int
    seconds: float
    tokens_per_s: float  # tokens forwarded (window lengths summed) per second of model time
    precision: str = "float32"  # the weights' dtype as the model ran, plus "+ bf16 autocast" when it was on
    device: str = "cpu"

    def as_dict(self) -> dict:
        return {
            "ppl": self.ppl,
            "nll": self.nll,
            "tokens": self.tokens,
            "windows": self.windows,
            "seconds": self.seconds,
            "tokens_per_s": self.tokens_per_s,
            "precision": self.precision,
            "device": self.device,
        }


def running_precision(model) -> str:
    """The precision a forward of ``model`` runs in here: its weights' dtype, and the autocast dtype if on."""
    param = next(model.parameters())
    text = str(param.dtype).removeprefix("torch.")
    if torch.is_autocast_enabled(param.device.type):
        text += f" + {str(torch.get_autocast_dtype(param.device.type)).removeprefix('torch.')} autocast"
    return text


@torch.inference_mode()
def perplexity(model, input_ids: torch.Tensor, cfg: EvalConfig, progress=None,
               bos: int | None = None) -> PerplexityResult:
    """Perplexity of `model` on a 1-D token tensor under `cfg` (ctx, stride, protocol, batch_size); ``bos``: the id
    put in front of every window (``data.bos_token(tokenizer)``), None for none.

    ``progress``: optional callable(n_windows_done) for progress bars. The model runs in its own dtype; the loss is
    accumulated in fp64 from fp32 log-probabilities.
    """
    ids = input_ids.reshape(-1)
    windows = make_windows(ids.numel(), cfg.ctx, cfg.stride, cfg.protocol)
    device = next(model.parameters()).device
    ids = ids.to(device)
    total_nll = torch.zeros((), dtype=torch.float64, device=device)
    scored = 0
    forwarded = 0
    # Consecutive windows of equal length form a batch (all but possibly the last window have length ctx).
    batches: list[list[Window]] = []
    for w in windows:
        if batches and len(batches[-1]) < cfg.batch_size and batches[-1][0].end - batches[-1][0].begin == w.end - w.begin:
            batches[-1].append(w)
        else:
            batches.append([w])
    t0 = time.perf_counter()
    for batch in batches:
        x = torch.stack([ids[w.begin : w.end] for w in batch])  # [B, L]
        if bos is None:
            logits = model(input_ids=x, use_cache=False).logits  # [B, L, V]
        else:  # the BOS position predicts the window's first token, which no protocol scores: drop it
            head = torch.full((x.shape[0], 1), bos, dtype=x.dtype, device=device)
            logits = model(input_ids=torch.cat([head, x], 1), use_cache=False).logits[:, 1:]
        # Position j of window w predicts token begin+j+1; keep predictions whose target is >= first_target.
        offset = batch[0].first_target - batch[0].begin - 1
        same_offset = all(w.first_target - w.begin - 1 == offset for w in batch)
        if same_offset:
            pred = logits[:, offset:-1, :].reshape(-1, logits.shape[-1])
            tgt = x[:, offset + 1 :].reshape(-1)
        else:
            pred = torch.cat([logits[i, w.first_target - w.begin - 1 : -1] for i, w in enumerate(batch)])
            tgt = torch.cat([x[i, w.first_target - w.begin :] for i, w in enumerate(batch)])
        total_nll += _nll_sum(pred, tgt)
        scored += tgt.numel()
        forwarded += x.numel() + (x.shape[0] if bos is not None else 0)
        del logits, pred
        if progress is not None:
            progress(len(batch))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    nll = (total_nll / scored).item()
    return PerplexityResult(
        ppl=math.exp(nll),
        nll=nll,
        tokens=scored,
        windows=len(windows),
        seconds=seconds,
        tokens_per_s=forwarded / seconds if seconds > 0 else float("inf"),
        precision=running_precision(model),
        device=device.type,
    )


def tokenize_text(tokenizer, text: str, max_tokens: int | None = None) -> torch.Tensor:
    """Tokenize once, without special tokens; keep the first `max_tokens` tokens if given."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if max_tokens is not None:
        ids = ids[:max_tokens]
    return torch.tensor(ids, dtype=torch.int64)
