"""The eval stage body: perplexity of a text, GSM8K accuracy of a problem set."""

from __future__ import annotations

from ..config import AccuracyConfig, ConfigError, EvalConfig
from ._common import quiet, run_with_progress


def evaluate_text(loaded, text: str, cfg: EvalConfig, max_tokens: int | None = None, *, log=quiet,
                  progress_factory=None, teacher=None):
    """Sliding-window perplexity of ``text`` (its first ``max_tokens`` tokens if given) under ``cfg``; with a loaded
    ``teacher`` (same tokenizer) also KL(teacher ‖ model) on the same windows.

    Returns ``(eval.PerplexityResult, text_tokens)``; a text of fewer than 2 tokens is a ConfigError (the caller
    names the data field). ``progress_factory`` counts windows.
    """
    from ..data import bos_token
    from ..eval import make_windows, perplexity, tokenize_text

    bos = bos_token(loaded.tokenizer)
    if teacher is not None:
        check_same_vocabulary(loaded, teacher)
    ids = tokenize_text(loaded.tokenizer, text, max_tokens)
    if ids.numel() < 2:
        raise ConfigError(f"the text has {ids.numel()} token(s); at least 2 are needed")
    n_windows = len(make_windows(ids.numel(), cfg.ctx, cfg.stride, cfg.protocol))
    with_bos = ", BOS in front of each window" if bos is not None else ""
    log(f"eval: {ids.numel()} tokens, {n_windows} windows of {cfg.ctx} (stride {cfg.stride}), protocol "
        f"{cfg.protocol}{with_bos}, {loaded.device.type} {str(loaded.dtype).removeprefix('torch.')}")
    result = run_with_progress(progress_factory, n_windows,
                                lambda update: perplexity(loaded.model, ids, cfg, progress=update, bos=bos,
                                                          teacher=None if teacher is None else teacher.model))
    return result, int(ids.numel())


def check_same_vocabulary(loaded, teacher) -> None:
    """A KL between two models needs one tokenizer: the same vocabulary, the same ids for the same text."""
    probe = "The teacher and the student read 123 tokens."
    a, b = loaded.tokenizer(probe)["input_ids"], teacher.tokenizer(probe)["input_ids"]
    va, vb = loaded.model.get_output_embeddings().weight.shape[0], teacher.model.get_output_embeddings().weight.shape[0]
    if a != b or va != vb:
        raise ConfigError(f"KL(teacher ‖ model) needs the same tokenizer: the teacher has {vb} output rows and "
                          f"tokenizes a probe as {b[:8]}…, the model {va} and {a[:8]}…")


def evaluate_gsm8k(loaded, records: list[dict], cfg: AccuracyConfig, *, progress_factory=None):
    """GSM8K exact-match accuracy of greedy answers on ``records`` and the reference solutions' log-likelihood
    (``downstream.gsm8k_accuracy``); ``progress_factory`` counts problems."""
    from ..downstream import gsm8k_accuracy

    return run_with_progress(progress_factory, len(records), lambda update: gsm8k_accuracy(
        loaded.model, loaded.tokenizer, records, cfg.max_new_tokens, cfg.batch_size, progress=update))
