"""Supervised fine-tuning on prompt/response pairs, the loss on the response tokens only.

An example is the prompt through the chat template (a user turn, generation prompt appended, as
``downstream.chat_ids`` builds it for generation) followed by the response and EOS, cut to ``max_len`` tokens and
right-padded; a batch is cut to its longest example (no position past every example's end is computed). The loss
is the mean next-token cross-entropy over the response tokens (and the EOS) of the micro-batch; prompt and padding
positions count for nothing. Right padding needs no attention mask in a causal model: padding comes after every real
token, so no real position attends to it.

The loop is distill's (``distill.train``): the same AdamW, schedule, clipping, validation, stopping, checkpoints,
resume, precision policy (fp32 masters) and pruning-mask guard. The arms of the self-data comparison are SFT on the
original responses, SFT on the self-data rewrites, and logit KD (``distill``) on the same prompts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch

from .config import ConfigError, SFTConfig
from .kd_loss import KDLossOutput, _LogitStats  # the chunked logsumexp/gather the KD loss uses, shared


@dataclass
class SFTData:
    """Tokenized examples: ``input_ids`` [N, L] (right-padded), ``loss_mask`` [N, L] (1 on response tokens),
    ``lengths`` [N] (real tokens of each example)."""

    input_ids: torch.Tensor
    loss_mask: torch.Tensor
    lengths: torch.Tensor
    fingerprint: dict

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def __getitem__(self, indices) -> dict[str, torch.Tensor]:
        """The examples ``indices``, [B, W] with W the longest of them: the padding past it changes no loss."""
        rows = torch.as_tensor(indices, dtype=torch.long).reshape(-1)
        width = int(self.lengths[rows].max())
        return {"input_ids": self.input_ids[rows, :width], "loss_mask": self.loss_mask[rows, :width]}


def build_sft_data(cfg: SFTConfig, tokenizer) -> SFTData:
    """Tokenize the records of ``cfg.data`` (the first ``num_samples``); see the module docstring."""
    from .cache import tokenizer_digest
    from .data import documents_digest
    from .downstream import chat_ids
    from .selfdata import instruction_records

    records, _ = instruction_records(cfg.data, cfg.num_samples)
    if not records:
        raise ConfigError(f"sft.data={cfg.data!r} has no records")
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos if eos is not None else 0)
    ids = torch.full((len(records), cfg.max_len), pad, dtype=torch.long)
    mask = torch.zeros((len(records), cfg.max_len), dtype=torch.long)
    lengths = torch.zeros(len(records), dtype=torch.long)
    for i, r in enumerate(records):
        prompt = chat_ids(tokenizer, r["prompt"])
        response = tokenizer(r["response"], add_special_tokens=False)["input_ids"] + ([eos] if eos is not None else [])
        row = (prompt + response)[: cfg.max_len]
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, len(prompt) : len(row)] = 1
        lengths[i] = len(row)
    if int(mask[:, 1:].sum()) == 0:
        raise ConfigError(f"sft.max_len={cfg.max_len} leaves no response token of any example; raise max_len")
    fingerprint = {"data": cfg.data, "records_digest": documents_digest(json.dumps(r, sort_keys=True) for r in records),
                   "tokenizer_digest": tokenizer_digest(tokenizer), "examples": len(records)}
    return SFTData(ids, mask, lengths, fingerprint)


def response_loss(logits: torch.Tensor, batch: dict, chunk: int = 128) -> KDLossOutput:
    """Mean cross-entropy of the next token over response positions (targets with loss_mask 1), in fp32.

    logits [B, L, V] (any float dtype; bf16 under autocast) are never copied whole to fp32: the logsumexp over V is
    taken ``chunk`` positions at a time and the backward writes its gradient chunk by chunk into one buffer of the
    logits' size (kd_loss's ``_LogitStats``, as the KD loss does). Positions outside the response get zero gradient.
    """
    targets = torch.cat([batch["input_ids"][:, 1:], torch.zeros_like(batch["input_ids"][:, :1])], dim=1)
    gathered, lse, _, _ = _LogitStats.apply(logits, targets[..., None].long(), targets[..., None].long(), 1.0, chunk,
                                            False, False)
    nll = (lse - gathered[..., 0])[:, :-1]  # position l predicts token l+1; the last predicts nothing here
    weight = batch["loss_mask"][:, 1:].to(nll.dtype)
    ce = (nll * weight).sum() / weight.sum().clamp(min=1.0)
    return KDLossOutput(loss=ce, kd=None, ce=ce, weight=weight.sum())


def sft(cfg: SFTConfig, model, tokenizer, student_spec: str = "", log=print, progress=None, on_step=None):
    """Fine-tune ``model`` on ``cfg.data``; write ``cfg.out`` (the best-validation model + sft.json)."""
    from .distill import run_key, train

    data = build_sft_data(cfg, tokenizer)
    log(f"sft: {len(data)} examples of up to {cfg.max_len} tokens, {int(data.loss_mask.sum())} response tokens")
    return train(cfg, model, tokenizer, data, response_loss, run_key(cfg, data.fingerprint, student_spec, "sft"), "sft",
                 log=log, progress=progress, on_step=on_step, extra={"data": data.fingerprint})
