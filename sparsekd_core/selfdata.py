"""Self-data generation ("self-data distillation", Thangarasa et al., 2024): the unpruned model rewrites the
responses of an instruction dataset given the instruction and the original response, so that fine-tuning a pruned
model on the rewrites keeps it in its own distribution (plain SFT on foreign text makes it forget more).

Per record, through the chat template, the model is asked to restate the reference solution in its own words,
ending with ``#### <answer>``; greedy or seeded sampling, batched. For GSM8K a rewrite is kept only when its final
number equals the reference's (``downstream.final_number``); kept/dropped are counted.

Output ``out`` (a .jsonl of {"prompt", "response"}, what the SFT stage reads) and ``out + ".json"`` (fingerprint
and counts) are written last. While it runs, ``out + ".work/"`` holds a fingerprint and one file per finished chunk
of records, each written atomically: a rerun of the same command after a kill generates only the missing chunks
(sampling is seeded per chunk, so the result is the same), and a store made for anything else is refused.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import ConfigError, SelfDataConfig
from .files import write_json_atomic, write_text_atomic

REWRITE = ("{prompt}\n\nHere is a reference solution:\n{response}\n\nRewrite the solution in your own words, step by "
           "step, and end with the final answer after '####'.")


def instruction_records(spec: str, limit: int | None = None) -> tuple[list[dict], bool]:
    """[{"prompt", "response"}] of an instruction source, and whether it is GSM8K (answers can be checked)."""
    from .config import parse_hf_spec
    from .data import gsm8k_records, hf_rows

    path = Path(spec).expanduser()
    hf = parse_hf_spec(spec)
    if hf is not None:
        raw = hf_rows(spec, limit)
    elif path.suffix.lower() == ".jsonl" and path.is_file():
        raw = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        records = [{"prompt": r["question"], "response": r["answer"]} for r in gsm8k_records(spec)]
        return records[:limit], True
    for keys, is_gsm8k in ((("question", "answer"), True), (("prompt", "response"), False),
                           (("instruction", "output"), False)):
        if raw and all(k in r for r in raw for k in keys):
            records = [{"prompt": r[keys[0]], "response": r[keys[1]]} for r in raw]
            return records[:limit], is_gsm8k
    raise ConfigError(f"selfdata.data={spec!r}: records need prompt/response, question/answer or "
                      "instruction/output fields")


def write_instruction_records(records: list[dict], is_gsm8k: bool, path: Path) -> None:
    """Write ``records`` as the .jsonl the selfdata and SFT stages read back with ``instruction_records``: GSM8K
    records keep GSM8K's field names (question/answer), so their answers stay checkable."""
    from .files import write_text_atomic

    rows = [({"question": r["prompt"], "answer": r["response"]} if is_gsm8k else r) for r in records]
    write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in rows))


@dataclass
class SelfDataResult:
    out: str
    records: int
    kept: int
    dropped: int
    no_answer: int
    generated_tokens: int
    tokens_per_s: float
    resumed_chunks: int
    computed_chunks: int
    seconds: float

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def fingerprint(loaded, cfg: SelfDataConfig, records: list[dict]) -> dict:
    from .cache import tokenizer_digest
    from .data import documents_digest
    from .models import weights_digest

    settings = cfg.model_dump(exclude={"out"})  # batch size included: padding can change a float's last bit
    return {"model": loaded.spec, "weights_digest": weights_digest(loaded.model),
            "tokenizer_digest": tokenizer_digest(loaded.tokenizer),
            "records_digest": documents_digest(json.dumps(r, sort_keys=True) for r in records), "settings": settings,
            "dtype": str(loaded.dtype).removeprefix("torch.")}


def run_selfdata(loaded, cfg: SelfDataConfig, log=print, progress=None) -> SelfDataResult:
    """Generate (or finish) the self-data file ``cfg.out`` with ``loaded`` (the unpruned model)."""
    from .downstream import chat_ids, final_number, generate

    out = Path(cfg.out).expanduser()
    summary_file, work = out.with_name(out.name + ".json"), out.with_name(out.name + ".work")
    records, is_gsm8k = instruction_records(cfg.data, cfg.num_samples)
    if not records:
        raise ConfigError(f"selfdata.data={cfg.data!r} has no records")
    fp = fingerprint(loaded, cfg, records)
    if summary_file.is_file() and out.is_file():
        done = json.loads(summary_file.read_text())
        if done.get("fingerprint") == fp:
            log(f"selfdata: {out} already holds this run; nothing to do")
            return SelfDataResult(**done["result"])
        raise ConfigError(f"selfdata.out={cfg.out!r} holds self-data of another run; give another --out")
    work.mkdir(parents=True, exist_ok=True)
    fp_file = work / "fingerprint.json"
    if fp_file.is_file() and json.loads(fp_file.read_text()) != fp:
        raise ConfigError(f"selfdata: {work} holds an unfinished run of another model, data or settings; delete it "
                          "or give another --out")
    write_json_atomic(fp_file, fp)

    chunks = [records[i : i + cfg.chunk_size] for i in range(0, len(records), cfg.chunk_size)]
    done_chunks = {c for c in range(len(chunks)) if (work / f"chunk-{c:05d}.jsonl").is_file()}
    if done_chunks:
        log(f"selfdata: resuming, {len(done_chunks)} of {len(chunks)} chunks already done")
        if progress is not None:
            progress(sum(len(chunks[c]) for c in done_chunks))
    sample = {"temperature": cfg.temperature, "top_p": cfg.top_p} if cfg.sampling == "sample" else None
    t0, generated = time.perf_counter(), 0
    for c, chunk in enumerate(chunks):
        if c in done_chunks:
            continue
        torch.manual_seed(cfg.seed * 1_000_003 + c)  # per chunk: a resumed run samples what the first one would
        prompts = [chat_ids(loaded.tokenizer, REWRITE.format(**r)) for r in chunk]
        outputs = generate(loaded.model, loaded.tokenizer, prompts, cfg.max_new_tokens, cfg.batch_size,
                           progress=progress, sample=sample)
        rows = []
        for r, ids in zip(chunk, outputs):
            text = loaded.tokenizer.decode(ids, skip_special_tokens=True).strip()
            predicted = final_number(text) if is_gsm8k else None
            keep = not (is_gsm8k and cfg.filter_answers) or (predicted is not None
                                                             and predicted == final_number(r["response"]))
            rows.append({"prompt": r["prompt"], "response": text, "original": r["response"], "kept": keep,
                         "answer": predicted, "tokens": len(ids)})
            generated += len(ids)
        write_text_atomic(work / f"chunk-{c:05d}.jsonl", "".join(json.dumps(row) + "\n" for row in rows))
    seconds = time.perf_counter() - t0

    rows = [json.loads(line) for c in range(len(chunks))
            for line in (work / f"chunk-{c:05d}.jsonl").read_text(encoding="utf-8").splitlines()]
    kept = [row for row in rows if row["kept"]]
    result = SelfDataResult(
        out=str(out), records=len(rows), kept=len(kept), dropped=len(rows) - len(kept),
        no_answer=sum(1 for row in rows if is_gsm8k and row["answer"] is None), generated_tokens=generated,
        tokens_per_s=generated / seconds if seconds > 0 else 0.0, resumed_chunks=len(done_chunks),
        computed_chunks=len(chunks) - len(done_chunks), seconds=seconds)
    write_text_atomic(out, "".join(json.dumps({"prompt": row["prompt"], "response": row["response"]}) + "\n"
                                   for row in kept))
    write_json_atomic(summary_file, {"fingerprint": fp, "result": result.as_dict(), "data": cfg.data,
                                     "filtered": is_gsm8k and cfg.filter_answers})
    shutil.rmtree(work, ignore_errors=True)
    log(f"selfdata: kept {result.kept} of {result.records} rewrites ({result.dropped} dropped"
        + (f", {result.no_answer} without a number)" if is_gsm8k else ")"))
    return result
