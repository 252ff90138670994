"""Perplexity equals a hand computation of the protocol text, for both protocols and a last short window."""

from __future__ import annotations

import math

import pytest
import torch

from sparsekd_core.config import EvalConfig
from sparsekd_core.eval import make_windows, perplexity


def hand_windows(n: int, ctx: int, stride: int) -> list[tuple[int, int]]:
    """Windows straight from the protocol text: starts 0, stride, ...; stop at the first that reaches n."""
    out = []
    for start in range(0, n, stride):
        out.append((start, min(start + ctx, n)))
        if start + ctx >= n:
            break
    return out


@torch.no_grad()
def hand_ppl(model, ids: torch.Tensor, ctx: int, stride: int, protocol: str) -> tuple[float, int]:
    """Token-by-token loop, one window at a time (batch 1), no shared code with sparsekd_core.eval."""
    n = ids.numel()
    windows = hand_windows(n, ctx, stride)
    logprobs = [torch.log_softmax(model(ids[b:e][None]).logits[0].double(), -1) for b, e in windows]
    nll, count = 0.0, 0
    if protocol == "paper":
        for (b, e), lp in zip(windows, logprobs):
            for t in range(b + 1, e):
                nll -= lp[t - b - 1, ids[t]].item()
                count += 1
    else:  # each token once, scored by the first window that holds it as a target
        for t in range(1, n):
            holders = [i for i, (b, e) in enumerate(windows) if b < t < e]
            if not holders:  # stride == ctx: a window's first token has no context in any window
                continue
            w = holders[0]
            b = windows[w][0]
            nll -= logprobs[w][t - b - 1, ids[t]].item()
            count += 1
    return math.exp(nll / count), count


@pytest.mark.parametrize("protocol", ["paper", "standard"])
@pytest.mark.parametrize("n,ctx,stride", [(40, 16, 8), (37, 16, 8), (50, 16, 5), (10, 16, 8), (33, 8, 8)])
def test_matches_hand_computation(tiny_model, protocol, n, ctx, stride):
    torch.manual_seed(n)
    ids = torch.randint(0, tiny_model.config.vocab_size, (n,))
    expected_ppl, expected_count = hand_ppl(tiny_model, ids, ctx, stride, protocol)
    res = perplexity(tiny_model, ids, EvalConfig(ctx=ctx, stride=stride, protocol=protocol))
    assert res.tokens == expected_count
    assert res.ppl == pytest.approx(expected_ppl, rel=1e-5)
    assert res.nll == pytest.approx(math.log(expected_ppl), rel=1e-5)


def test_token_counts():
    # paper: every predicted token of every window; standard: n - 1.
    windows = make_windows(37, 16, 8, "paper")
    assert [(w.begin, w.end) for w in windows] == [(0, 16), (8, 24), (16, 32), (24, 37)]
    assert sum(w.end - w.first_target for w in windows) == 15 + 15 + 15 + 12
    std = make_windows(37, 16, 8, "standard")
    assert sum(w.end - w.first_target for w in std) == 36


def test_last_window_reaches_end_and_none_is_nested():
    for n in range(2, 80):
        for ctx, stride in [(16, 8), (16, 16), (16, 1), (9, 4)]:
            ws = make_windows(n, ctx, stride, "paper")
            assert ws[-1].end == n
            assert all(w.end < n for w in ws[:-1])  # the last window is the first that reaches the end
            for i, w in enumerate(ws[1:], 1):
                assert w.end > ws[i - 1].end  # never wholly inside an earlier window


@pytest.mark.parametrize("protocol", ["paper", "standard"])
def test_batch_size_does_not_change_result(tiny_llama, protocol):
    torch.manual_seed(1)
    ids = torch.randint(0, tiny_llama.config.vocab_size, (101,))
    results = [perplexity(tiny_llama, ids, EvalConfig(ctx=16, stride=8, protocol=protocol, batch_size=b)) for b in (1, 3, 64)]
    assert len({r.tokens for r in results}) == 1
    for r in results[1:]:
        assert r.ppl == pytest.approx(results[0].ppl, rel=1e-6)


def test_too_short_text(tiny_llama):
    with pytest.raises(ValueError, match="at least 2"):
        perplexity(tiny_llama, torch.tensor([5]), EvalConfig(ctx=16, stride=8))
