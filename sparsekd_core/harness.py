"""lm-evaluation-harness (``lm_eval``) on any model sparsekd loads: an evaluator we did not write.

The model object itself is handed to lm-eval's ``HFLM`` wrapper, so a factored (SVD-pruned), WANDA or depth-pruned
checkpoint is scored as sparsekd loads it — no dense export needed. Offline, tasks come from local task files:
``sparsekd_local_tasks()`` writes one for the packaged WikiText-2 test split (``wikitext2_sparsekd``: rolling
log-likelihood per article, lm-eval's word/byte perplexity and bits per byte, like its ``wikitext`` task but on the
packaged text) into the sparsekd cache; ``include`` adds a directory of the user's own task YAMLs. Online, any task
lm-eval knows works by name.
"""

from __future__ import annotations

import json
from pathlib import Path

LOCAL_TASK = "wikitext2_sparsekd"
_TASK_YAML = """task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
should_decontaminate: false
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
"""


def sparsekd_local_tasks() -> Path:
    """A directory with the local task files (written once per content into the sparsekd cache)."""
    from .data import load_documents, source_digest
    from .files import write_text_atomic
    from .models import cache_root

    root = cache_root() / "lm_eval_tasks" / source_digest("wikitext2:test")
    data = root / "wikitext2_test.jsonl"
    if not (root / f"{LOCAL_TASK}.yaml").is_file():
        articles = [a for a in load_documents("wikitext2:test") if isinstance(a, str) and a.strip()]
        write_text_atomic(data, "".join(json.dumps({"text": a}) + "\n" for a in articles))
        write_text_atomic(root / f"{LOCAL_TASK}.yaml", _TASK_YAML.format(task=LOCAL_TASK, data=data))
    return root


def run_lm_eval(model, tokenizer, tasks: list[str], include: str | None = None, limit: int | None = None,
                batch_size: int = 1, max_length: int | None = None) -> dict:
    """``lm_eval.simple_evaluate`` on the in-memory ``model``; returns {task: {metric: value}} (stderr dropped
    where lm-eval has none)."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)
    paths = [str(sparsekd_local_tasks())] + ([str(Path(include).expanduser())] if include else [])
    manager = TaskManager(include_path=paths)
    out = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit, log_samples=False)
    return {task: {k.removesuffix(",none"): v for k, v in metrics.items()
                   if k not in ("name", "alias") and v != "N/A"}
            for task, metrics in out["results"].items()}
