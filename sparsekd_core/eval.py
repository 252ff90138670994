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

Per window the result keeps the NLL sum and the tokens scored (``window_nll``, ``window_tokens``), so two models
scored on the same text can be compared window by window (``stats.paired_bootstrap``). With a ``teacher`` the
same windows also give KL(teacher ‖ model) per scored token (natural log, temperature 1): the distance between
the two next-token distributions that distillation is meant to close, summed per window in ``window_kl``.
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


def _nll_rows(logits: torch.Tensor, targets: torch.Tensor, rows_per_chunk: int = 4096) -> torch.Tensor:
    """-log p(target) per row of [R, V] logits (fp64 [R]), from fp32 row chunks (bounded extra memory)."""
    out = [F.cross_entropy(logits[s : s + rows_per_chunk].float(), targets[s : s + rows_per_chunk], reduction="none")
           for s in range(0, logits.shape[0], rows_per_chunk)]
    return torch.cat(out).double() if out else torch.zeros(0, dtype=torch.float64, device=logits.device)


def _kl_rows(teacher: torch.Tensor, student: torch.Tensor, rows_per_chunk: int = 1024) -> torch.Tensor:
    """KL(softmax(teacher) ‖ softmax(student)) per row of two [R, V] logit tensors (fp64 [R]), in fp32 chunks."""
    out = []
    for s in range(0, teacher.shape[0], rows_per_chunk):
        t = F.log_softmax(teacher[s : s + rows_per_chunk].float(), -1)
        q = F.log_softmax(student[s : s + rows_per_chunk].float(), -1)
        out.append((t.exp() * (t - q)).sum(-1).clamp_min(0))
        del t, q
    return torch.cat(out).double() if out else torch.zeros(0, dtype=torch.float64, device=teacher.device)


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
    window_nll: list[float] | None = None  # NLL summed over each window's scored tokens, in window order
    window_tokens: list[int] | None = None  # tokens each window scored
    window_kl: list[float] | None = None  # KL(teacher ‖ model) summed over each window's scored tokens (teacher given)

    @property
    def kl(self) -> float | None:
        """Mean KL(teacher ‖ model) per scored token (nats), or None without a teacher."""
        return None if self.window_kl is None else sum(self.window_kl) / self.tokens

    def as_dict(self) -> dict:
        extra = {} if self.window_kl is None else {"kl": self.kl, "window_kl": self.window_kl}
        return {**extra,
            "ppl": self.ppl,
            "nll": self.nll,
            "tokens": self.tokens,
            "windows": self.windows,
            "seconds": self.seconds,
            "tokens_per_s": self.tokens_per_s,
            "precision": self.precision,
            "device": self.device,
            "window_nll": self.window_nll,
            "window_tokens": self.window_tokens,
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
               bos: int | None = None, teacher=None) -> PerplexityResult:
    """Perplexity of `model` on a 1-D token tensor under `cfg` (ctx, stride, protocol, batch_size); ``bos``: the id
    put in front of every window (``data.bos_token(tokenizer)``), None for none; ``teacher``: a model of the same
    vocabulary run on the same windows for KL(teacher ‖ model) (its time is not in ``tokens_per_s``).

    ``progress``: optional callable(n_windows_done) for progress bars. The model runs in its own dtype; the loss is
    accumulated in fp64 from fp32 log-probabilities.
    """
    ids = input_ids.reshape(-1)
    windows = make_windows(ids.numel(), cfg.ctx, cfg.stride, cfg.protocol)
    device = next(model.parameters()).device
    ids = ids.to(device)
    window_nll: list[float] = []
    window_tokens: list[int] = []
    window_kl: list[float] = []
    model_seconds = 0.0
    forwarded = 0
    # Consecutive windows of equal length form a batch (all but possibly the last window have length ctx).
    batches: list[list[Window]] = []
    for w in windows:
        if batches and len(batches[-1]) < cfg.batch_size and batches[-1][0].end - batches[-1][0].begin == w.end - w.begin:
            batches[-1].append(w)
        else:
            batches.append([w])

    def forward(net, x: torch.Tensor) -> torch.Tensor:
        if bos is None:
            return net(input_ids=x, use_cache=False).logits  # [B, L, V]
        # the BOS position predicts the window's first token, which no protocol scores: drop it
        head = torch.full((x.shape[0], 1), bos, dtype=x.dtype, device=device)
        return net(input_ids=torch.cat([head, x], 1), use_cache=False).logits[:, 1:]

    def scored_rows(logits: torch.Tensor, batch: list[Window]) -> torch.Tensor:
        # Position j of window w predicts token begin+j+1; keep predictions whose target is >= first_target.
        return torch.cat([logits[i, w.first_target - w.begin - 1 : -1] for i, w in enumerate(batch)])

    for batch in batches:
        x = torch.stack([ids[w.begin : w.end] for w in batch])  # [B, L]
        t0 = time.perf_counter()
        logits = forward(model, x)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        model_seconds += time.perf_counter() - t0
        pred = scored_rows(logits, batch)
        del logits
        tgt = torch.cat([x[i, w.first_target - w.begin :] for i, w in enumerate(batch)])
        counts = [w.end - w.first_target for w in batch]
        window_nll += [float(v.sum()) for v in _nll_rows(pred, tgt).split(counts)]
        window_tokens += counts
        if teacher is not None:
            kl = _kl_rows(scored_rows(forward(teacher, x), batch), pred)
            window_kl += [float(v.sum()) for v in kl.split(counts)]
        forwarded += x.numel() + (x.shape[0] if bos is not None else 0)
        del pred
        if progress is not None:
            progress(len(batch))
    scored = sum(window_tokens)
    nll = math.fsum(window_nll) / scored
    return PerplexityResult(
        ppl=math.exp(nll),
        nll=nll,
        tokens=scored,
        windows=len(windows),
        seconds=model_seconds,
        tokens_per_s=forwarded / model_seconds if model_seconds > 0 else float("inf"),
        precision=running_precision(model),
        device=device.type,
        window_nll=window_nll,
        window_tokens=window_tokens,
        window_kl=window_kl if teacher is not None else None,
    )


def tokenize_text(tokenizer, text: str, max_tokens: int | None = None) -> torch.Tensor:
    """Tokenize once, without special tokens; keep the first `max_tokens` tokens if given."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if max_tokens is not None:
        ids = ids[:max_tokens]
    return torch.tensor(ids, dtype=torch.int64)
