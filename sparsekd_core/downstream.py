"""Downstream accuracy: GSM8K exact match by greedy generation, and the reference solution's log-likelihood.

* **Prompt**: the question, with one line asking for the final answer after ``####``, through the tokenizer's chat
  template when it has one (as a user turn, generation prompt appended), else ``Question: …\\nAnswer:``.
* **Accuracy**: greedy decoding (batched, left-padded) of up to ``max_new_tokens``; the prediction is the number
  after the first ``####`` in the output, else the last number in it (``final_number``); exact match against the
  number after ``####`` in the reference, compared as decimals (``1,000`` = ``1000`` = ``1000.0``).
* **Reference log-likelihood**: the mean log-probability per token of the reference solution given the prompt,
  averaged over problems. It still moves where a 135M model's accuracy is near zero.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

import torch

from .data import with_bos

INSTRUCTION = "Solve the problem step by step, then give the final answer as a number after '####'."
_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?")


def _normalise(number: str) -> str | None:
    cleaned = number.replace(",", "").replace("$", "").rstrip(".")
    try:
        value = Decimal(cleaned)
    except InvalidOperation:
        return None
    text = format(value.normalize(), "f")
    return "0" if text in ("-0", "") else text


def final_number(text: str) -> str | None:
    """The answer a text gives: the first number after ``####``, else the last number in the text (normalised:
    no thousands separators, no ``$``, no trailing zeros after a decimal point); None if there is no number."""
    if "####" in text:
        found = _NUMBER.search(text.split("####", 1)[1])
        if found:
            return _normalise(found.group(0))
    numbers = _NUMBER.findall(text)
    return _normalise(numbers[-1]) if numbers else None


def prompt_text(tokenizer, question: str) -> str:
    content = f"{question.strip()}\n{INSTRUCTION}"
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                             add_generation_prompt=True)
    return f"Question: {content}\nAnswer:"


def chat_ids(tokenizer, content: str) -> list[int]:
    """A user turn through the chat template (generation prompt appended), or the plain text if there is none.
    The template already holds any special tokens it wants; a plain prompt gets only the model's BOS, if it takes
    one (``data.with_bos``, like eval.py's windows)."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                             add_generation_prompt=True)
    else:
        text = content
    return with_bos(tokenizer, tokenizer(text, add_special_tokens=False)["input_ids"])


def _prompt_ids(tokenizer, question: str) -> list[int]:
    return with_bos(tokenizer, tokenizer(prompt_text(tokenizer, question), add_special_tokens=False)["input_ids"])


@torch.inference_mode()
def generate(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, batch_size: int = 8,
             progress=None, sample: dict | None = None) -> list[list[int]]:
    """Continuations of token-id prompts, batched with left padding; each stops at EOS (not included).
    Greedy, or sampled with ``sample={"temperature": T, "top_p": p}`` (seed torch's RNG before the call)."""
    device = next(model.parameters()).device
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos if eos is not None else 0)
    out: list[list[int]] = []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start : start + batch_size]
        width = max(len(p) for p in batch)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=device)
        how = dict(do_sample=True, **sample) if sample else dict(do_sample=False)
        generated = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                   pad_token_id=pad, eos_token_id=eos, **how)
        for row in generated[:, width:].tolist():
            if eos is not None and eos in row:
                row = row[: row.index(eos)]
            out.append(row)
        if progress is not None:
            progress(len(batch))
    return out


@torch.inference_mode()
def reference_loglik(model, tokenizer, records: list[dict]) -> float:
    """Mean over problems of the mean log-probability per token of the reference answer given the prompt (nats).
    One problem per forward pass: no padding to get wrong, and the prompts are short."""
    device = next(model.parameters()).device
    per_problem = []
    for r in records:
        prompt = _prompt_ids(tokenizer, r["question"])
        answer = tokenizer(r["answer"], add_special_tokens=False)["input_ids"]
        ids = torch.tensor([prompt + answer], device=device)
        logits = model(input_ids=ids, use_cache=False).logits[0, len(prompt) - 1 : -1].float()
        logprobs = torch.log_softmax(logits, -1).gather(-1, torch.tensor(answer, device=device)[:, None])
        per_problem.append(float(logprobs.mean()))
    return sum(per_problem) / len(per_problem)


@dataclass
class AccuracyResult:
    accuracy: float
    correct: int
    problems: int
    no_answer: int  # outputs with no number at all
    reference_loglik: float
    seconds: float
    generated_tokens: int
    examples: list  # the first few (question, output, predicted, reference) for the report

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def gsm8k_accuracy(model, tokenizer, records: list[dict], max_new_tokens: int = 256, batch_size: int = 8,
                   progress=None) -> AccuracyResult:
    """Exact-match accuracy of greedy answers on ``records`` ({"question", "answer"}), and the reference
    solutions' mean log-likelihood (see the module docstring)."""
    t0 = time.perf_counter()
    prompts = [_prompt_ids(tokenizer, r["question"]) for r in records]
    outputs = generate(model, tokenizer, prompts, max_new_tokens, batch_size, progress)
    correct = no_answer = 0
    examples = []
    for record, output in zip(records, outputs):
        text = tokenizer.decode(output, skip_special_tokens=True)
        predicted, reference = final_number(text), final_number(record["answer"])
        no_answer += predicted is None
        correct += predicted is not None and predicted == reference
        if len(examples) < 3:
            examples.append({"question": record["question"], "output": text, "predicted": predicted,
                             "reference": reference})
    loglik = reference_loglik(model, tokenizer, records)
    return AccuracyResult(accuracy=correct / len(records), correct=correct, problems=len(records),
                          no_answer=no_answer, reference_loglik=loglik, seconds=time.perf_counter() - t0,
                          generated_tokens=sum(len(o) for o in outputs), examples=examples)


def retention(pruned: float | None, dense: float | None) -> float | None:
    """pruned accuracy / dense accuracy (None when the dense model scores 0: retention is undefined then)."""
    if pruned is None or dense is None or dense == 0 or math.isnan(dense):
        return None
    return pruned / dense
