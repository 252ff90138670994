"""Paired bootstrap intervals for perplexity differences between models scored on the same windows.

Two models evaluated on the same text with the same protocol score the same windows (``eval.perplexity`` keeps each
window's NLL sum and token count). A difference between their perplexities is then *paired*: it is resampled by
drawing windows with replacement and recomputing both perplexities on the same draw, so the text's own variation
(some windows are hard for every model) cancels. With several seeds per arm, each seed's pair is the two arms of
that seed, and the statistic is the mean over seeds of the per-seed differences, every seed scored on the same
drawn windows: the interval covers the eval text's variation; the seeds' spread is reported beside it (with three
seeds it cannot make an interval of its own).

Windows of the ``paper`` protocol overlap, so they are not independent draws; the study evaluates with
``stride == ctx`` (disjoint windows), where the remaining dependence is that of neighbouring text.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Interval:
    estimate: float
    low: float
    high: float
    level: float = 0.95

    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    def as_dict(self) -> dict:
        return {"estimate": self.estimate, "low": self.low, "high": self.high, "level": self.level}

    def text(self, digits: int = 2) -> str:
        return f"{signed(self.estimate, digits)} [{signed(self.low, digits)}, {signed(self.high, digits)}]"


def signed(x: float, digits: int = 2) -> str:
    """``x`` with its sign, and no "-0.00" for a difference that rounds to zero."""
    return f"{round(x, digits) + 0.0:+.{digits}f}"


def _ppl(nll: np.ndarray, tokens: np.ndarray, draws: np.ndarray | None = None) -> np.ndarray:
    """Perplexity of window sums; with ``draws`` [n_boot, n_windows] of window indices, one per draw."""
    if draws is None:
        return np.exp(nll.sum(-1) / tokens.sum())
    return np.exp(nll[..., draws].sum(-1) / tokens[draws].sum(-1))


def _draws(n_windows: int, n_boot: int, seed: int) -> np.ndarray:
    """[n_boot, n_windows] window indices drawn with replacement: every model of a comparison uses the same draws."""
    return np.random.default_rng(seed).integers(0, n_windows, size=(n_boot, n_windows))


def _percentiles(level: float) -> list[float]:
    return [(1 - level) / 2 * 100, (1 + level) / 2 * 100]


def _check(arms: list[np.ndarray], tokens: np.ndarray) -> None:
    for a in arms:
        if a.shape != tokens.shape:
            raise ValueError(f"paired bootstrap: {a.shape[0]} window NLLs against {tokens.shape[0]} window token "
                             "counts; both models must be scored on the same windows (same text, protocol, ctx, "
                             "stride and max_tokens)")


def paired_bootstrap(a: list[list[float]] | list[float], b: list[list[float]] | list[float], tokens: list[int],
                     n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> dict:
    """PPL(a) − PPL(b) over windows, with a percentile interval from a paired bootstrap.

    ``a`` and ``b``: per-window NLL sums of one model each, or of one model per seed (lists of equal length, seed i
    of ``a`` paired with seed i of ``b``); ``tokens``: the tokens each window scored (the same for every model).
    Returns {"diff": Interval of the mean over seeds of PPL(a_i) − PPL(b_i), "ratio": Interval of the mean over
    seeds of PPL(a_i) / PPL(b_i), "per_seed": [PPL(a_i) − PPL(b_i)], "seeds": n, "windows": n, "n_boot": n_boot}.
    """
    a_arr = np.atleast_2d(np.asarray(a, dtype=np.float64))
    b_arr = np.atleast_2d(np.asarray(b, dtype=np.float64))
    tok = np.asarray(tokens, dtype=np.float64)
    if a_arr.shape[0] != b_arr.shape[0]:
        raise ValueError(f"paired bootstrap: {a_arr.shape[0]} seed(s) against {b_arr.shape[0]}; pair the same seeds")
    _check([*a_arr, *b_arr], tok)
    if tok.size < 2:
        raise ValueError("paired bootstrap: at least 2 windows are needed")
    draws = _draws(tok.size, n_boot, seed)
    pa, pb = _ppl(a_arr, tok), _ppl(b_arr, tok)  # [seeds]
    boot_a, boot_b = _ppl(a_arr, tok, draws), _ppl(b_arr, tok, draws)  # [seeds, n_boot]
    q = _percentiles(level)

    def interval(point: np.ndarray, boot: np.ndarray) -> Interval:
        lo, hi = np.percentile(boot.mean(0), q)
        return Interval(float(point.mean()), float(lo), float(hi), level)

    return {"diff": interval(pa - pb, boot_a - boot_b), "ratio": interval(pa / pb, boot_a / boot_b),
            "per_seed": [float(x) for x in pa - pb], "seeds": int(a_arr.shape[0]), "windows": int(tok.size),
            "n_boot": n_boot}


def gap_change(kd_first: list[float], ce_first: list[float], kd_last: list[float], ce_last: list[float],
               tokens: list[int], n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> Interval:
    """How a paired gap moved between two settings (e.g. two training budgets): [PPL(kd_last) − PPL(ce_last)] −
    [PPL(kd_first) − PPL(ce_first)], all four models scored on the same windows and resampled on the same draws,
    with a percentile interval. Negative: the first model of the pair gained on the second."""
    arms = [np.asarray(x, dtype=np.float64) for x in (kd_first, ce_first, kd_last, ce_last)]
    tok = np.asarray(tokens, dtype=np.float64)
    _check(arms, tok)
    if tok.size < 2:
        raise ValueError("paired bootstrap: at least 2 windows are needed")
    draws = _draws(tok.size, n_boot, seed)

    def change(d: np.ndarray | None) -> np.ndarray:
        kf, cf, kl, cl = (_ppl(a, tok, d) for a in arms)
        return (kl - cl) - (kf - cf)

    lo, hi = np.percentile(change(draws), _percentiles(level))
    return Interval(float(change(None)), float(lo), float(hi), level)


def bootstrap_ppl(nll: list[float], tokens: list[int], n_boot: int = 2000, seed: int = 0,
                  level: float = 0.95) -> Interval:
    """One model's perplexity with a percentile interval over windows."""
    arr, tok = np.asarray(nll, dtype=np.float64), np.asarray(tokens, dtype=np.float64)
    _check([arr], tok)
    lo, hi = np.percentile(_ppl(arr, tok, _draws(tok.size, n_boot, seed)), _percentiles(level))
    return Interval(math.exp(arr.sum() / tok.sum()), float(lo), float(hi), level)
