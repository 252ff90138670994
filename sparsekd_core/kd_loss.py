"""Top-k knowledge-distillation loss over a cached teacher distribution (a leaf module: no project imports).

Notation, per position (b, l): student logits z ∈ R^V; the cache holds the teacher's top-k ids S (|S| = k),
their log-probabilities lp_i = log p_i (full-vocabulary softmax at T = 1) and the tail log-mass
λ = log(1 − Σ_{i∈S} p_i). T is the temperature, α the KD weight.

    loss = α · T² · KL(p̃ ‖ q̃) + (1 − α) · CE(next token)

``tail`` decides what p̃ and q̃ are (all three equal the textbook full-vocabulary KD loss when k = V):

* ``topk`` (default) — both sides renormalised over the cached ids:
      p̃_i = softmax_S(lp / T)_i,   q̃_i = softmax_S(z / T)_i,   KL = Σ_S p̃_i (log p̃_i − log q̃_i).
  A dense student on its own cache is an exact fixed point (loss and gradient zero).
* ``bucket`` — the top-k plus one bucket holding the rest of the mass, on both sides:
      teacher  ∝ (p_i^{1/T} for i∈S,  P_tail^{1/T}),   P_tail = e^λ
      student  ∝ (q_i^{1/T} for i∈S,  Q_tail^{1/T}),   q = softmax(z), Q_tail = Σ_{j∉S} q_j
  Exact (the KL of the (k+1)-way distributions) at T = 1. At T ≠ 1 the tail is softened *as one token*
  (P_tail^{1/T}), on both sides, because the teacher's tail is not cached token by token; this under-weights the
  tail relative to Σ_{j∉S} p_j^{1/T} for T > 1, but keeps the dense model a fixed point at every T.
* ``paper`` — a literal reading of the paper (DistillKit's convention): teacher as in ``topk``, student the
  full-vocabulary log-softmax at T gathered at the cached ids:
      log q_i = z_i / T − logsumexp_V(z / T),   KL = Σ_S p̃_i (log p̃_i − log q_i).
  q does not sum to one over S, so a dense model on its own cache does NOT start at zero and is pushed to move its
  mass onto its top-k. Kept only to replicate the paper.

* ``sampled`` — an unbiased estimate of the full-vocabulary KD loss from a sampled-class cache: per position the
  teacher's softened distribution p̃ = softmax(z_teacher / T) was sampled N times (ids v_j with counts c_j, and the
  cached log p̃_{v_j}); with the empirical weights w_j = c_j / N,
      KL̂ = Σ_j w_j (log p̃_{v_j} − log q̃_{v_j}),   q̃ = softmax(z / T) over the full vocabulary.
  E[KL̂] = KL(p̃ ‖ q̃) and E[∂(T²·KL̂)/∂z] = T·(q̃ − p̃), the full-vocabulary T²·KL gradient (the samples are drawn at
  the same T as the loss; the distill stage checks it). A dense model on its own sampled cache has zero expected
  gradient; one batch's gradient is noise around it.

The KD term (``kd``) is T²·KL averaged over all B·L positions; the CE term (``ce``) is the mean next-token
cross-entropy over the B·(L−1) positions that have a next token; both in fp32 (fp64 if the logits are fp64).

Memory: the loss needs from the [B, L, V] logits only a few logsumexps and gathers. ``_LogitStats`` computes them
in chunks over L and, in backward, writes the gradient chunk by chunk into one [B, L, V] buffer (the size of the
logits' own gradient), so no other [B, L, V] float32 tensor is ever alive: a 151k vocabulary fits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

Tail = Literal["topk", "bucket", "paper", "sampled"]
TAILS: tuple[str, ...] = ("topk", "bucket", "paper")  # the treatments of a top-k cache
SAMPLED = "sampled"  # the estimator on a sampled-class cache
NEG_FLOOR = -1e4  # stands in for log(0) (an empty tail) so that 0·log 0 terms stay finite


def _chunk_softmax(z: torch.Tensor, lse: torch.Tensor, scale: float) -> torch.Tensor:
    return torch.exp(z * scale - lse.unsqueeze(-1))


class _LogitStats(torch.autograd.Function):
    """From logits [B, L, V]: gathered logits at ``ids`` [B, L, m], lse(z) [B, L], lse(z/T) [B, L] and the
    logsumexp over the complement of ``mask_ids`` [B, L, k] (the tail) [B, L]; chunked over L."""

    @staticmethod
    def forward(ctx, logits, ids, mask_ids, temperature: float, chunk: int, need_t: bool, need_tail: bool):
        B, L, V = logits.shape
        dt = torch.float64 if logits.dtype == torch.float64 else torch.float32
        gathered = logits.gather(-1, ids).to(dt)
        lse1 = logits.new_empty((B, L), dtype=dt)
        lse_t = logits.new_zeros((B, L), dtype=dt)  # only computed when needed (one pass over V each)
        lse_tail = logits.new_zeros((B, L), dtype=dt)
        for s in range(0, L, chunk):
            z = logits[:, s : s + chunk].to(dt)
            lse1[:, s : s + chunk] = torch.logsumexp(z, -1)
            if need_t:
                lse_t[:, s : s + chunk] = torch.logsumexp(z / temperature, -1)
            if not need_tail:
                continue
            z = z.scatter(-1, mask_ids[:, s : s + chunk], float("-inf"))
            lse_tail[:, s : s + chunk] = torch.logsumexp(z, -1)
        ctx.set_materialize_grads(False)  # unused outputs get None, not a zero tensor to multiply through
        ctx.save_for_backward(logits, ids, mask_ids, lse1, lse_t, lse_tail)
        ctx.temperature, ctx.chunk = temperature, chunk
        return gathered, lse1, lse_t, lse_tail

    @staticmethod
    def backward(ctx, g_gathered, g_lse1, g_lse_t, g_tail):
        logits, ids, mask_ids, lse1, lse_t, lse_tail = ctx.saved_tensors
        T, chunk = ctx.temperature, ctx.chunk
        grad = torch.empty_like(logits)  # every chunk is written whole below
        dt = lse1.dtype
        for s in range(0, logits.shape[1], chunk):
            sl = slice(s, s + chunk)
            z = logits[:, sl].to(dt)  # a no-op for fp32/fp64 logits; one cast per chunk for bf16 ones
            # softmax(z)·g_lse1 is written straight into the gradient buffer where the dtypes agree (fp32 in fp32
            # out): with only the CE's lse(z) and the gathered logits carrying gradient (the topk tail), three
            # passes over V.
            g = grad[:, sl] if grad.dtype == dt else torch.empty_like(z)
            if g_lse1 is None:
                g.zero_()
            else:
                torch.sub(z, lse1[:, sl, None], out=g)
                g.exp_().mul_(g_lse1[:, sl, None])
            if g_lse_t is not None:
                g += (g_lse_t[:, sl, None] / T) * _chunk_softmax(z, lse_t[:, sl], 1.0 / T)
            if g_tail is not None:
                finite = torch.isfinite(lse_tail[:, sl])
                p_tail = _chunk_softmax(z, torch.where(finite, lse_tail[:, sl], 0.0), 1.0)
                p_tail = p_tail.scatter(-1, mask_ids[:, sl], 0.0) * finite[..., None]
                g += g_tail[:, sl, None] * p_tail
            if g_gathered is not None:
                g.scatter_add_(-1, ids[:, sl], g_gathered[:, sl])
            if grad.dtype != dt:
                grad[:, sl] = g.to(grad.dtype)
        return grad, None, None, None, None, None, None


@dataclass
class KDLossOutput:
    loss: torch.Tensor  # α·kd + (1−α)·ce, the quantity to backpropagate
    kd: torch.Tensor  # T²·KL, mean over positions
    ce: torch.Tensor  # next-token cross-entropy, mean over positions with a target
    # What the means are over, where it varies between batches of one shape (SFT: response tokens); None = the same
    # for every batch of the same shape (KD). Data-parallel training weights each rank's means by it (dist.py).
    weight: torch.Tensor | None = None


class KDLoss(torch.nn.Module):
    """α·T²·KL(teacher_T ‖ student_T) over the cached top-k + (1−α)·CE; see the module docstring for the math.

    forward(logits [B, L, V], input_ids [B, L], topk_ids [B, L, k] (int), topk_logprobs [B, L, k],
    tail_logmass [B, L]) → KDLossOutput. ``chunk`` = positions per chunk when touching the V-sized logits.
    """

    def __init__(self, alpha: float = 0.5, temperature: float = 2.0, tail: Tail = "topk", chunk: int = 128):
        super().__init__()
        if tail not in (*TAILS, SAMPLED):
            raise ValueError(f"tail={tail!r}; allowed: {', '.join((*TAILS, SAMPLED))}")
        if not 0.0 <= alpha <= 1.0 or temperature <= 0:
            raise ValueError(f"need 0 <= alpha <= 1 and temperature > 0, got alpha={alpha}, temperature={temperature}")
        self.alpha, self.temperature, self.tail, self.chunk = alpha, temperature, tail, chunk

    def forward(self, logits, input_ids, topk_ids, topk_logprobs, tail_logmass=None, counts=None) -> KDLossOutput:
        """``tail="sampled"``: topk_ids / topk_logprobs are the sampled ids and their tempered teacher log-probs,
        ``counts`` [B, L, N] how often each was drawn (0 = padding); tail_logmass is not used."""
        T = self.temperature
        k = topk_ids.shape[-1]
        topk_ids = topk_ids.long()
        # Targets: position l predicts input_ids[l+1]; the last position has none (its column is a dummy, id 0).
        targets = torch.cat([input_ids[:, 1:], torch.zeros_like(input_ids[:, :1])], dim=1).long()
        ids = torch.cat([topk_ids, targets[..., None]], dim=-1)
        gathered, lse1, lse_t, lse_tail = _LogitStats.apply(
            logits, ids, topk_ids, T, self.chunk, self.tail in ("paper", "sampled"), self.tail == "bucket"
        )
        z_top, z_target = gathered[..., :k], gathered[..., k]

        ce = (lse1 - z_target)[:, :-1].mean()

        teacher_lp = topk_logprobs.to(gathered.dtype)
        if self.tail == "sampled":
            if counts is None:
                raise ValueError("tail='sampled' needs the sample counts (a cache written with --teacher-sample)")
            weights = counts.to(gathered.dtype)
            weights = weights / weights.sum(-1, keepdim=True)
            kl = (weights * (teacher_lp - (z_top / T - lse_t[..., None]))).sum(-1)
            kd = (T * T) * kl.mean()
            return KDLossOutput(loss=self.alpha * kd + (1.0 - self.alpha) * ce, kd=kd, ce=ce)
        if self.tail == "bucket":
            teacher_tail = tail_logmass.to(gathered.dtype).nan_to_num(neginf=NEG_FLOOR).clamp_min(NEG_FLOOR)
            student_tail = torch.where(torch.isfinite(lse_tail), lse_tail - lse1, NEG_FLOOR).clamp_min(NEG_FLOOR)
            teacher = torch.log_softmax(torch.cat([teacher_lp, teacher_tail[..., None]], -1) / T, -1)
            student = torch.log_softmax(torch.cat([z_top - lse1[..., None], student_tail[..., None]], -1) / T, -1)
        else:
            teacher = torch.log_softmax(teacher_lp / T, -1)
            if self.tail == "topk":
                student = torch.log_softmax(z_top / T, -1)
            else:  # paper
                student = z_top / T - lse_t[..., None]
        kl = (teacher.exp() * (teacher - student)).sum(-1)
        kd = (T * T) * kl.mean()
        loss = self.alpha * kd + (1.0 - self.alpha) * ce
        return KDLossOutput(loss=loss, kd=kd, ce=ce)


def ce_loss(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Plain next-token cross-entropy (the reference a KD step is compared with in benchmarks and tests)."""
    flat = logits[:, :-1].reshape(-1, logits.shape[-1])
    return F.cross_entropy(flat if flat.dtype == torch.float64 else flat.float(), input_ids[:, 1:].reshape(-1))
