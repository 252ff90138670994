"""Flow configurations: one pydantic model per flow, loaded from YAML (`sparsekd run FLOW --config F`) and used
as the deployment's parameter form. Stage sections (`corpus`, `distill`, `prune`, `eval`, ...) are made from the
stage configs of sparsekd_core (the same fields, types, constraints and descriptions) and validated against them,
so a bad value fails before any work starts.

Where a flow's default differs from the stage's, the section overrides that one field (``from_stage(...,
default=...)``) and a comment says why: it is the value the deployments' parameters and the committed configs that
leave the field out were run with, so no number changes.
"""

from __future__ import annotations

import copy
import os
import re
from typing import Annotated, Any, Literal, Union

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    WithJsonSchema,
    create_model,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic.json_schema import SkipJsonSchema

from sparsekd_core import report
from sparsekd_core.relations import IN_CORPUS, corpus_relation
from sparsekd_core.config import (
    PAPER_ROUND_TARGETS,
    AccuracyConfig,
    CacheConfig,
    DataConfig,
    DataSpec,
    Device,
    DistillConfig,
    Dtype,
    EvalConfig,
    ModelConfig,
    ModelSpec,
    ProfileConfig,
    PruneConfig,
    SelfDataConfig,
    SFTConfig,
    format_validation_error,
)

# The paper's 8-round schedule (sparsekd_core/config.py): R1 15%, R4 35%, R6 51%, R8 65% MLP-parameter reduction
# (§V-B); the rounds in between are interpolated (the paper gives only these four).
PAPER_TARGETS = list(PAPER_ROUND_TARGETS)


def _form_schema(schema: dict[str, Any], cls: type[BaseModel]) -> None:
    """How a section reads as the deployment's Run form (Prefect UI), where the schema went through PostgreSQL JSONB.

    - ``position``: the declared field order. JSONB reorders object keys (by length, then alphabetically) and the
      UI sorts fields by ``position``, so without it a form opens with Eval, Seed, Dtype, Model.
    - An optional field (``int | None``) is offered as its plain type, not as Prefect's ``int | None`` switch
      ("Property is type None"). Where the default is None ("unset: the stage decides"), a field left empty is
      left out by the UI and takes its default; where it is not, the field takes a string that means None
      (calibration 'none', standard_protocol_set ''). Validation is pydantic's, on the model, unchanged.
    - Section defaults (the values a form opens with) leave out the fields that default to None (``_without_none``).
    A class's ``__form_first__`` names fields that go first (multi-seed's ``flow`` choice).
    """
    if isinstance(schema.get("default"), (dict, list)):
        schema["default"] = _without_none(schema["default"])
    first = getattr(cls, "__form_first__", ())
    props = schema.get("properties", {})
    ordered = [*(n for n in first if n in props), *(n for n in props if n not in first)]
    for position, prop in enumerate(props[n] for n in ordered):
        options = prop.get("anyOf", [])
        if len(options) == 2 and {"type": "null"} in options:
            kept = {k: v for k, v in prop.items() if k != "anyOf" and not (k == "default" and v is None)}
            prop.clear()
            prop.update({**next(o for o in options if o != {"type": "null"}), **kept})
        if isinstance(prop.get("default"), (dict, list)):
            prop["default"] = _without_none(prop["default"])
        if "auto" in prop.get("enum", ()) and prop.get("default", "auto") is None:
            prop["default"] = "auto"  # AutoOnOff: None is offered as 'auto'
        prop["position"] = position


def _without_none(value: Any) -> Any:
    """A section's default as the form fills it in: fields that default to None left out (the UI would send null,
    which an enum refuses, and turn a None boolean into false), so that they take their default on the worker."""
    if isinstance(value, dict):
        return {k: _without_none(v) for k, v in value.items() if v is not None}
    return [_without_none(v) for v in value] if isinstance(value, list) else value


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra=_form_schema)


def from_stage(cls: type[BaseModel], name: str, **changes: Any) -> FieldInfo:
    """Field ``name`` of the stage config ``cls``: its default, constraints and description, with ``changes``
    (``default=``: the flow's own default, where it differs; ``description=``: one that says what the flow does)."""
    return FieldInfo.merge_field_infos(cls.model_fields[name], **changes)


def as_stage(cls: type[BaseModel], name: str) -> FieldInfo:
    """The default and description of the stage config's field ``name``, for a flow field annotated with the same
    shared type (``Dtype``, ``Device``): the type brings the allowed values and the validator (a copy of the
    stage's field would bring the validator a second time)."""
    info = cls.model_fields[name]
    return Field(info.default, description=info.description)


def section_model(cls: type[BaseModel], name: str, doc: str, exclude: set[str] = frozenset(),
                  keep: set[str] | None = None, narrow: dict[str, Any] | None = None) -> type[BaseModel]:
    """A flow's typed form section made from a core stage config: the same fields, types, defaults, allowed values
    and descriptions, less the fields the flow sets itself (``narrow``: a field's type narrowed to what the flow
    supports, or given a shared Annotated type such as ``DataSpec`` that validates it). The stage's cross-field
    validators run in the flow's validator (``_check_stage``)."""
    fields = {n: ((narrow or {}).get(n, f.annotation), copy.copy(f)) for n, f in cls.model_fields.items()
              if n not in exclude and (keep is None or n in keep)}
    return create_model(name, __base__=_Section, __doc__=doc, **fields)


_CorpusFields = section_model(CacheConfig, "_CorpusFields", "The cache stage's corpus fields.",
                              keep={"data", "num_samples", "seq_len", "seed", "max_sequences_per_document", "top_k",
                                    "teacher_sample", "sample_temperature", "teacher_precision", "batch_size"},
                              narrow={"data": DataSpec})


class CorpusSpec(_CorpusFields):
    """The KD corpus the teacher is cached on (a mixture, named source or file): the cache stage's corpus fields
    (sparsekd_core/config.py, CacheConfig) and how many task runs write the cache."""

    # Flow defaults, not the cache stage's (all of a source; 512 tokens): a flow's corpus has always been 64
    # sequences of 256 tokens, and the deployments (deployments/prefect.yaml: `config: {model: ...}` only) and any
    # config that leaves these out were run with them; a flow always sizes its corpus (the report states N×L).
    num_samples: int = from_stage(CacheConfig, "num_samples", default=64, description="Sequences in the corpus.")
    seq_len: int = from_stage(CacheConfig, "seq_len", default=256)
    shards: int = Field(1, gt=0, le=64, description="Write each teacher cache as this many concurrent task runs, "
                                                    "each a disjoint chunk range of one store (same bytes as one; "
                                                    "on a host with several GPUs, one GPU each).")

    @model_validator(mode="after")
    def _as_cache(self) -> "CorpusSpec":
        """Every check of the cache stage (batch_size divides the chunk, ...) before any work."""
        _check_stage(CacheConfig, "corpus", self.cache_fields(), out="unused")
        return self

    def cache_fields(self) -> dict[str, Any]:
        """The cache stage's fields (the flow sets `out`; `shards` is how the flow writes the store, not what).
        A top-k corpus leaves out the sampled cache's two fields: they do not change its bytes, and the cache
        stage's key is over these fields, so top-k stores written before the flows offered sampling are reused."""
        unused = set() if self.teacher_sample is not None else {"teacher_sample", "sample_temperature"}
        return self.model_dump(exclude={"shards", *unused})

    def cache_config(self) -> CacheConfig:
        """The corpus as the cache stage's config (its `out` unset: for what reads the corpus, not the store)."""
        return CacheConfig(**self.cache_fields(), out="unused")


EVAL_SET_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,63}$")


class EvalSet(_Section):
    name: str = Field(description="Short name used in tables, file names and metric keys: a letter, then letters, "
                                  "digits or underscores (e.g. wikitext2, c4_heldout).")
    data: DataSpec = Field(description="Named source or file.")
    kind: Literal["perplexity", "gsm8k"] = Field(
        "perplexity", description="perplexity (protocol of `eval`), or gsm8k: exact-match accuracy of greedy answers "
                                  "and the reference solutions' log-likelihood (data: gsm8k:test or a .jsonl).")
    max_tokens: int | None = from_stage(DataConfig, "max_tokens", description="perplexity: first N tokens only.")
    # Unset (None) means the accuracy stage's default (AccuracyConfig: 100 problems, 256 tokens), resolved by the
    # eval task; a set stays None here because an eval set is part of the eval stage's key as given, and the fields
    # of the other kind must be unset.
    max_problems: int | None = from_stage(
        AccuracyConfig, "max_problems", default=None,
        description=f"gsm8k: the first N problems (default {AccuracyConfig.model_fields['max_problems'].default}).")
    max_new_tokens: int | None = from_stage(
        AccuracyConfig, "max_new_tokens", default=None,
        description=f"gsm8k: greedy decode budget (default {AccuracyConfig.model_fields['max_new_tokens'].default}).")

    @model_validator(mode="after")
    def _fields_of_its_kind(self) -> "EvalSet":
        if self.kind == "perplexity" and (self.max_problems or self.max_new_tokens):
            raise ValueError("max_problems and max_new_tokens apply to kind=gsm8k sets only")
        if self.kind == "gsm8k" and self.max_tokens:
            raise ValueError("max_tokens applies to kind=perplexity sets; a gsm8k set takes max_problems")
        return self

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not EVAL_SET_NAME.match(v):
            raise ValueError("must be an identifier: a letter, then up to 63 letters, digits or underscores")
        return v

    @field_validator("data", mode="before")
    @classmethod
    def _one_source(cls, v: Any) -> Any:
        if isinstance(v, str) and v.startswith("mix:"):
            raise ValueError("an eval set is one source, not a mixture")
        return v


STORAGE_ROOT_ENV = "SPARSEKD_STORAGE_ROOT"


def _default_eval_sets() -> list[EvalSet]:
    # In-domain (WikiText-2 test, never trained on) and out-of-domain held-out C4 (disjoint from the KD corpus).
    return [EvalSet(name="wikitext2", data="wikitext2:test", max_tokens=8192),
            EvalSet(name="c4_heldout", data="c4:heldout", max_tokens=8192)]


def _check_stage(cls, section: str, values: Any, **fill: Any) -> Any:
    """Build the core stage config from a flow's section (plus what the flow fills in), so that every field and
    cross-field check of the stage runs at validation, before any work. Returns the section unchanged."""
    fields = values.model_dump() if isinstance(values, BaseModel) else values
    try:
        cls(**{**fill, **fields})
    except ValidationError as err:
        raise ValueError(format_validation_error(section, err)) from None
    return values


DistillSection = section_model(DistillConfig, "DistillSection", "Distillation: the KD loss and the training loop "
                               "(sparsekd_core/distill.py). The flow sets the cache, the output and the seed; a "
                               "flow's stage trains in one process (torchrun is for `sparsekd distill`).",
                               exclude={"cache", "out", "seed", "parallel"})
def _auto_on_off(v: Any) -> Any:
    return {"auto": None, "on": True, "off": False}.get(v, v) if isinstance(v, str) else v


# A stage's three-way switch (None = "the stage decides") as the form offers it: auto / on / off. As `bool | None`
# the form showed a None switch, or, with the section's default, a toggle that submitted false: an unchanged form
# turned whitening off. The value is still None/True/False for the stage.
AutoOnOff = Annotated[bool | None, BeforeValidator(_auto_on_off),
                      WithJsonSchema({"type": "string", "enum": ["auto", "on", "off"], "default": "auto"})]

PruneSection = section_model(PruneConfig, "PruneSection", "Pruning (sparsekd_core/prune). The flow sets the "
                             "reduction of each round.", exclude={"target_reduction", "energy", "drop_blocks"},
                             narrow={"whiten": AutoOnOff})
WandaSection = section_model(PruneConfig, "WandaSection", "WANDA calibration (the flow sets the sparsities).",
                             keep={"calibration", "calibration_samples", "calibration_seq_len"})
DepthSection = section_model(PruneConfig, "DepthSection", "Depth (and optional SVD) pruning calibration; the flow "
                             "sets the method, drop_blocks and the SVD target.",
                             exclude={"method", "drop_blocks", "target_reduction", "energy"},
                             narrow={"whiten": AutoOnOff})
SelfDataSection = section_model(SelfDataConfig, "SelfDataSection", "Self-data generation by the dense model "
                                "(sparsekd_core/selfdata.py); the flow sets its data, how many records (the "
                                "flow's num_samples) and output.",
                                exclude={"data", "num_samples", "out"})
ProfileSection = section_model(ProfileConfig, "ProfileSection", "Inference profiling cells (sparsekd_core/profile.py): "
                               "TTFT/TPOT per batch size and prompt length, attention vs FFN time.")
EvalSection = section_model(EvalConfig, "EvalSection", "The perplexity protocol (sparsekd_core/eval.py).")
SFTSection = section_model(SFTConfig, "SFTSection", "SFT-only settings; training settings come from `distill`, "
                           "so every arm trains the same way.", keep={"max_len"})


def _profile_cells(v: BaseModel) -> BaseModel:
    """A flow's ``profile_settings`` section: every check of the profile stage, before any work."""
    return _check_stage(ProfileConfig, "profile_settings", v)


def _calibration_only(v: BaseModel) -> BaseModel:
    """A ``WandaSection`` (calibration fields only; the flow sets method and size): the prune stage's checks."""
    return _check_stage(PruneConfig, "prune", v, method="wanda", target_reduction=0.5)


class FlowConfig(_Section):
    """Settings every flow shares."""

    model: ModelSpec = Field("smollm2-135m", description="Dense model: alias (smollm2-135m, gemma3-270m), hub id, local directory or .gguf file.")
    dtype: Dtype = as_stage(ModelConfig, "dtype")
    device: Device = as_stage(ModelConfig, "device")
    workdir: str = Field(default_factory=lambda: os.environ.get(STORAGE_ROOT_ENV) or "runs",
                         description="Storage root for caches, checkpoints, manifests, reports: a path every "
                                     "worker sees (a shared volume), or an object-store URL (s3://bucket/prefix; "
                                     "credentials from the environment). Default: $SPARSEKD_STORAGE_ROOT, else ./runs.")
    tracking_uri: str | None = Field(None, description="MLflow URI; default $MLFLOW_TRACKING_URI or sqlite in workdir.")
    experiment: str | None = Field(None, description="MLflow experiment name (default: sparsekd- and the flow's "
                                                     "name, e.g. sparsekd-dense-kd).")
    # The flows' seed is the paper's first (42, 123, 456), not the training stage's 0: the committed configs and
    # the deployments' parameters that leave it out were run with 42.
    seed: int = from_stage(DistillConfig, "seed", default=42,
                           description="Distillation seed (data order and torch RNG).")
    corpus: CorpusSpec = Field(CorpusSpec(), description="The KD corpus the teacher is cached on.")
    distill: DistillSection = Field(DistillSection(), description="KD loss and training loop settings.")
    eval: EvalSection = Field(EvalSection(), description="Perplexity protocol: ctx, stride, protocol, batch size.")
    eval_sets: list[EvalSet] = Field(_default_eval_sets(), min_length=1,
                                     description="What every model is evaluated on (default: WikiText-2 test and a "
                                                 "held-out C4 sample, 8192 tokens each).")
    log_models: bool = Field(False, description="Also log model checkpoints to MLflow (large).")

    @field_validator("workdir")
    @classmethod
    def _workdir(cls, v: str) -> str:
        from tasks.store import check_root

        return check_root(v.strip())

    @field_validator("eval_sets")
    @classmethod
    def _unique_eval_sets(cls, v: list[EvalSet]) -> list[EvalSet]:
        names = [es.name for es in v]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"eval set names must be unique; repeated: {', '.join(repeated)}")
        return v

    @field_validator("distill", mode="before")
    @classmethod
    def _distill_keys(cls, v: Any) -> Any:
        for key in ("cache", "out", "seed"):
            if isinstance(v, dict) and key in v:
                raise ValueError(f"distill.{key} is set by the flow; remove it (use the flow's `seed` for seeds)")
        return v

    @field_validator("distill")
    @classmethod
    def _distill(cls, v: BaseModel) -> BaseModel:
        return _check_stage(DistillConfig, "distill", v, cache="cache", out="out")

    @field_validator("eval")
    @classmethod
    def _eval(cls, v: BaseModel) -> BaseModel:
        return _check_stage(EvalConfig, "eval", v)

    @model_validator(mode="after")
    def _tail_fits_the_cache(self) -> "FlowConfig":
        """tail=sampled trains from a sampled-class cache and only from one (sparsekd_core/distill.py checks the
        same when it opens the cache; here it fails before any work)."""
        sampled = self.corpus.teacher_sample is not None
        if sampled != (self.distill.tail == "sampled"):
            raise ValueError("distill.tail=sampled and corpus.teacher_sample go together: a sampled-class cache "
                             f"trains with tail=sampled only (corpus.teacher_sample={self.corpus.teacher_sample}, "
                             f"distill.tail={self.distill.tail!r})")
        if sampled and abs(self.corpus.sample_temperature - self.distill.temperature) > 1e-9:
            raise ValueError(f"distill.temperature={self.distill.temperature} must equal corpus.sample_temperature="
                             f"{self.corpus.sample_temperature}: the sampled estimator is unbiased only at the "
                             "temperature the classes were drawn at")
        return self

    def model_config_for(self, spec: str) -> ModelConfig:
        return ModelConfig(model=spec, dtype=self.dtype, device=self.device)

    def eval_config(self) -> EvalConfig:
        return EvalConfig(**self.eval.model_dump())


class DenseKDConfig(FlowConfig):
    """Dense+KD: distill the unpruned model on its own cache, beside its CE-only twin (same corpus/steps/seed)."""

    ce_control: bool = Field(True, description="Also run the CE-only control arm (alpha = 0).")


class PruningFlowConfig(FlowConfig):
    prune: PruneSection = Field(PruneSection(), description="Pruning method and schedule (the flow sets the targets).")

    @field_validator("prune", mode="before")
    @classmethod
    def _prune_keys(cls, v: Any) -> Any:
        if isinstance(v, dict) and ("target_reduction" in v or "energy" in v):
            raise ValueError("prune.target_reduction/energy are set by the flow (targets / sparsities)")
        return v

    @field_validator("prune")
    @classmethod
    def _prune(cls, v: BaseModel) -> BaseModel:
        return _check_stage(PruneConfig, "prune", v, target_reduction=0.5)


class IterativeConfig(PruningFlowConfig):
    """Rounds of prune → eval (pre-KD) → distill → eval (post-KD) → re-cache the recovered model."""

    targets: list[float] = Field(list(PAPER_ROUND_TARGETS),
                                 description="Cumulative MLP-parameter reduction after each round.")
    keep_original_teacher: bool = Field(False, description="Distill every round from the dense model's cache.")
    ce_control: bool = Field(False, description="Also train each round's CE-only twin (alpha = 0: the same pruned "
                                                "student, teacher-cache tokens, steps and seed) and report KD minus "
                                                "CE-only per round with a paired 95% interval over eval windows. The "
                                                "next round still starts from the KD model; doubles training time.")
    profile: bool = Field(False, description="Also profile the dense model and each round's recovered model side by "
                                             "side (Tables VII-VIII, speedup vs reduction). Off by default: timings "
                                             "on a shared or busy CPU are not worth the time they take; turn it on "
                                             "on an idle machine or a GPU worker.")
    profile_settings: ProfileSection = Field(ProfileSection(), description="The profiling cells when profile is on.")

    _profile_settings = field_validator("profile_settings")(_profile_cells)

    @field_validator("targets")
    @classmethod
    def _targets(cls, v: list[float]) -> list[float]:
        if not v or any(not 0 < t < 1 for t in v) or any(b <= a for a, b in zip(v, v[1:])):
            raise ValueError(f"targets={v}: need an increasing list of reductions in (0, 1)")
        return v


class CascadeConfig(PruningFlowConfig):
    """Dense → Dense+KD (and its CE-only twin) → Pruned+KD from the Dense+KD teacher, + the teacher swap."""

    target: float = Field(0.15, gt=0, lt=1, description="MLP-parameter reduction of the pruned student.")
    ce_control: bool = Field(True, description="Run the CE-only twin of Dense+KD.")
    teacher_swap: bool = Field(True, description="Also distill the pruned student from the original teacher.")


class TeacherSwapConfig(PruningFlowConfig):
    """One pruned student, distilled from the original teacher and from the KD-improved (Dense+KD) teacher."""

    target: float = Field(0.65, gt=0, lt=1, description="MLP-parameter reduction of the pruned student.")


class WandaConfig(FlowConfig):
    """WANDA (unstructured) pruning at given sparsities + the same KD."""

    sparsities: list[float] = Field([0.5], description="Fraction of each MLP matrix zeroed.")
    prune: WandaSection = Field(WandaSection(), description="WANDA calibration data.")

    @field_validator("sparsities")
    @classmethod
    def _sparsities(cls, v: list[float]) -> list[float]:
        if not v or any(not 0 < s < 1 for s in v):
            raise ValueError(f"sparsities={v}: each must be in (0, 1)")
        return v

    _prune = field_validator("prune")(_calibration_only)


class SelfDataCorpus(CorpusSpec):
    """The KD arm's teacher cache: taken over the flow's own prompts (``instructions``, first ``num_samples``),
    so the corpus's data and size are not form fields; the other cache settings are."""

    data: SkipJsonSchema[DataSpec] = CorpusSpec.model_fields["data"].default
    num_samples: SkipJsonSchema[int] = CorpusSpec.model_fields["num_samples"].default


def _default_selfdata_eval_sets() -> list[EvalSet]:
    return [EvalSet(name="wikitext2", data="wikitext2:test", max_tokens=4096),
            EvalSet(name="gsm8k", data="gsm8k:test", kind="gsm8k", max_problems=32)]


class SelfDataFlowConfig(FlowConfig):
    """Depth pruning (and optionally SVD) recovered three ways on the same prompts, same steps and seed: SFT on
    the original responses, SFT on the dense model's own rewrites (self-data distillation), and logit KD."""

    instructions: DataSpec = Field("gsm8k:train", description="Instruction data: gsm8k:train, hub:gsm8k:train or a "
                                                              ".jsonl of prompt/response (question/answer) records.")
    num_samples: int = Field(64, gt=0, description="The first N records: the prompts every arm trains on.")
    # A factory, not an instance: the form then opens with the fields' own defaults, not with a dump that holds
    # the hidden data and num_samples (which the server's schema check refuses).
    corpus: SelfDataCorpus = Field(default_factory=SelfDataCorpus,
                                   description="The KD arm's teacher cache (over the same prompts).")
    drop_blocks: int = Field(4, gt=0, description="Decoder blocks removed by depth pruning.")
    svd_target: float | None = Field(None, gt=0, lt=1, description="Also SVD-prune the remaining blocks to this "
                                                                   "cumulative MLP reduction (off by default).")
    prune: DepthSection = Field(DepthSection(), description="Calibration of the depth (and SVD) rounds.")
    selfdata: SelfDataSection = Field(SelfDataSection(), description="How the dense model rewrites the responses.")
    sft: SFTSection = Field(SFTSection(), description="SFT-only settings (max_len); training settings come from "
                                                      "`distill`.")
    eval_sets: list[EvalSet] = Field(_default_selfdata_eval_sets(), min_length=1,
                                     description="Default: WikiText-2 test perplexity and GSM8K accuracy (32 problems).")

    @field_validator("prune", mode="before")
    @classmethod
    def _prune_keys(cls, v: Any) -> Any:
        if isinstance(v, dict) and {"method", "drop_blocks", "target_reduction", "energy"} & set(v):
            raise ValueError("prune.method/drop_blocks/target_reduction are set by the flow (drop_blocks, svd_target)")
        return v

    @field_validator("prune")
    @classmethod
    def _prune(cls, v: BaseModel) -> BaseModel:
        return _check_stage(PruneConfig, "prune", v, method="depth", drop_blocks=1)

    @field_validator("selfdata", mode="before")
    @classmethod
    def _selfdata_keys(cls, v: Any) -> Any:
        if isinstance(v, dict) and {"data", "out"} & set(v):
            raise ValueError("selfdata.data/out are set by the flow (instructions, its workdir)")
        return v

    @field_validator("selfdata")
    @classmethod
    def _selfdata(cls, v: BaseModel) -> BaseModel:
        return _check_stage(SelfDataConfig, "selfdata", v, out="x.jsonl")

    @field_validator("sft", mode="before")
    @classmethod
    def _sft_keys(cls, v: Any) -> Any:
        if isinstance(v, dict) and set(v) - {"max_len"}:
            raise ValueError(f"sft: only max_len is set here ({sorted(set(v) - {'max_len'})} given); training "
                             "fields come from `distill`, so every arm trains the same way")
        return v

    @field_validator("sft")
    @classmethod
    def _sft(cls, v: BaseModel) -> BaseModel:
        return _check_stage(SFTConfig, "sft", v, data="gsm8k:train", out="out")

    @model_validator(mode="after")
    def _corpus_is_the_instructions(self) -> "SelfDataFlowConfig":
        # The KD arm's teacher cache is taken over the same prompts; the held-out check compares against them.
        if self.corpus.data != self.instructions:
            self.corpus = self.corpus.model_copy(update={"data": self.instructions})
        return self

    def sft_fields(self) -> dict[str, Any]:
        """The training fields every arm shares (from `distill`, less the KD-only ones) + SFT's own."""
        kd_only = {"alpha", "temperature", "tail"}
        return {**{k: v for k, v in self.distill.model_dump().items() if k not in kd_only}, **self.sft.model_dump()}


class PaperConfig(IterativeConfig):
    """The whole programme at one scale: dense-kd, iterative, cascade, teacher-swap, wanda; then one report."""

    cascade_target: float = Field(0.15, gt=0, lt=1, description="MLP-parameter reduction of the cascade's student.")
    swap_target: float = Field(0.65, gt=0, lt=1, description="MLP-parameter reduction of the teacher-swap student.")
    sparsities: list[float] = Field([0.5], description="WANDA sparsities.")

    @model_validator(mode="after")
    def _every_part(self) -> "PaperConfig":
        """Every sub-flow's config is built (and so validated) now, before any of them runs."""
        paper_parts(self)
        return self


def paper_parts(config: PaperConfig, experiment: str | None = None) -> dict[str, FlowConfig]:
    """The sub-flow configs of a paper run, in run order; a bad value raises ValueError naming the part."""
    common = config.model_dump(exclude={"targets", "keep_original_teacher", "ce_control", "cascade_target",
                                        "swap_target", "sparsities", "prune", "profile", "profile_settings"})
    if experiment is not None:
        common["experiment"] = experiment  # nested runs live in the parent's experiment
    builders = {
        "dense-kd": lambda: DenseKDConfig(**common),
        "iterative": lambda: IterativeConfig(**common, prune=config.prune, targets=config.targets,
                                             keep_original_teacher=config.keep_original_teacher,
                                             ce_control=config.ce_control, profile=config.profile,
                                             profile_settings=config.profile_settings),
        "cascade": lambda: CascadeConfig(**common, prune=config.prune, target=config.cascade_target),
        "teacher-swap": lambda: TeacherSwapConfig(**common, prune=config.prune, target=config.swap_target),
        "wanda": lambda: WandaConfig(**common, sparsities=config.sparsities),
    }
    parts = {}
    for name, build in builders.items():
        try:
            parts[name] = build()
        except ValidationError as err:
            raise ValueError(format_validation_error(name, err)) from None
    return parts


class StudyConfig(PaperConfig):
    """The paper flow's config plus the study's extra arms (flows/study.py)."""

    tails: list[Literal["topk", "bucket", "paper"]] = Field(
        ["topk", "bucket", "paper"], description="Dense+KD once per KD tail (the paper flow runs distill.tail).")
    seeds: list[int] = Field([43, 44], description="More seeds of the first round's Pruned+KD (besides `seed`).")
    lr_probe: list[float] = Field([], description="Other learning rates for the first round's Pruned+KD (evidence "
                                                  "for the default lr).")
    last_round_swap: bool = Field(True, description="Also distill the last round's student from the dense cache.")
    pruned_ce_control: bool = Field(True, description="CE-only twins of the first round's and the one-shot "
                                                      "teacher-swap student.")
    standard_protocol_set: str | None = Field("wikitext2", description="Also evaluate the dense model on this eval "
                                                                       "set with the standard protocol (empty: "
                                                                       "not at all).")
    verdict_much_lower: float = Field(
        report.DEFAULT_MUCH_LOWER, gt=0, description="Verdict 'post-KD ≪ post-prune' holds when every round's "
                                                     "post-KD in-domain PPL is at most this fraction of its pre-KD "
                                                     "PPL.")
    verdict_comparable: float = Field(
        report.DEFAULT_COMPARABLE, gt=0, description="Verdict 'low-sparsity post-KD comparable to dense' holds when "
                                                     "the first round's post-KD in-domain PPL is at most this many "
                                                     "times the dense model's.")

    @field_validator("standard_protocol_set")
    @classmethod
    def _empty_is_none(cls, v: str | None) -> str | None:
        return v or None

    @model_validator(mode="after")
    def _every_part(self) -> "StudyConfig":  # replaces PaperConfig's: the paper part is validated without our fields
        paper_part(self)
        if self.corpus.teacher_sample is not None and self.tails:
            raise ValueError("tails: the study's extra Dense+KD arms use top-k tails, which a sampled-class corpus "
                             "(corpus.teacher_sample) cannot train; set tails: []")
        if self.standard_protocol_set and self.standard_protocol_set not in {e.name for e in self.eval_sets}:
            raise ValueError(f"standard_protocol_set={self.standard_protocol_set!r} is not one of the eval sets")
        return self


def paper_part(config: StudyConfig) -> PaperConfig:
    """The paper flow's config inside a study's."""
    return PaperConfig(**config.model_dump(include=set(PaperConfig.model_fields)))


class SetRelation(_Section):
    """An eval set's relation to the KD corpus, as every table and verdict of the second study labels it."""

    set: str = Field(description="An eval set's name.")
    relation: Literal["held-out documents", "out of corpus"] = Field(
        description="`held-out documents`: documents of a corpus source that the corpus does not hold; `out of "
                    "corpus`: a source the corpus does not draw from at all.")


def _study_v2_sets() -> list[EvalSet]:
    return [EvalSet(name="wikitext2", data="wikitext2:test", max_tokens=16384),
            EvalSet(name="c4_heldout", data="c4:heldout", max_tokens=8192),
            EvalSet(name="code_heldout", data="python:heldout", max_tokens=8192),
            EvalSet(name="gsm8k_test", data="gsm8k:test", max_tokens=8192)]


class StudyV2Config(FlowConfig):
    """The second study (flows/study_v2.py): self-referential KD against its CE-only twin, arm for arm on the same
    seeds, scored on the same windows, for the dense model and the first-round pruned student, with a token-budget
    curve; every eval set labelled by its relation to the KD corpus."""

    corpus: CorpusSpec = Field(CorpusSpec(data="mix:no-wikitext-offline", num_samples=1024, seq_len=256),
                               description="The KD corpus (default: the packaged paper mixture without WikiText, "
                                           "1024 × 256 tokens, enough for the largest budget).")
    distill: DistillSection = Field(
        DistillSection(val_data="c4:val", patience=1000, lr=5e-5, batch_size=2, eval_every=8, checkpoint_every=16),
        description="Training settings of every arm (max_steps comes from the arm's tokens). Default validation: "
                    "held-out C4 documents (a corpus source; never an eval text), every arm its whole budget.")
    eval: EvalSection = Field(EvalSection(protocol="standard", ctx=512, stride=512),
                              description="Perplexity protocol; stride = ctx gives disjoint windows, the "
                                          "bootstrap's independent draws.")
    eval_sets: list[EvalSet] = Field(default_factory=_study_v2_sets, min_length=1,
                                     description="WikiText-2 test (16k tokens, out of corpus) and held-out C4, "
                                                 "code and GSM8K documents (8k tokens each).")
    relations: list[SetRelation] = Field(
        [SetRelation(set="wikitext2", relation="out of corpus"),
         *(SetRelation(set=n, relation="held-out documents") for n in ("c4_heldout", "code_heldout", "gsm8k_test"))],
        description="Each perplexity eval set's relation to the KD corpus: `held-out documents` (documents of a "
                    "corpus source that the corpus does not hold) or `out of corpus` (a source the corpus lacks).")
    parts: list[Literal["dense", "r1", "tails", "budget", "report"]] = Field(
        ["dense", "r1", "tails", "budget"], min_length=1,
        description="What this invocation runs: `dense` and `r1` the matched KD/CE arms of the dense and pruned "
                    "student; `tails` the bucket and sampled-cache tails; `budget` R1's token-budget curve; "
                    "`report` nothing new (the report of the arms published in `out`). The report joins the arms "
                    "already published in `out` (same setup and stage code).")
    r1_target: float = Field(0.15, gt=0, lt=1, description="The pruned student's MLP reduction (the paper's R1).")
    prune: PruneSection = Field(PruneSection(), description="How R1 is pruned.")
    alphas: list[float] = Field([0.5, 1.0], min_length=1, description="KD weights of the matched KD arms (0 < α ≤ 1; "
                                                                       "α = 0 is the CE-only twin, always run).")
    seeds: list[int] = Field([42, 43, 44], min_length=1, description="Seeds of every matched arm (KD and CE-only).")
    train_tokens: int = Field(16384, gt=0, description="Training tokens of a matched arm: max_steps = this / "
                                                       "(batch_size × grad_accum × corpus.seq_len).")
    budgets: list[int] = Field([16384, 65536, 262144], description="Training tokens of R1's budget curve (KD at "
                                                                   "alphas[0] and CE-only, first seed).")
    sampled_classes: int = Field(12, gt=0, description="Classes per position of the sampled-cache tail arm.")
    tail_seeds: list[int] | None = Field(None, min_length=1,
                                         description="Seeds of the bucket and sampled-cache tail arms (default: the "
                                                     "first of `seeds`); each tail arm is compared with the CE-only "
                                                     "twin of its seed, so every tail seed must be one of `seeds`.")
    tail_kinds: list[Literal["bucket", "sampled"]] = Field(
        ["bucket", "sampled"], min_length=1,
        description="Which tails the `tails` part trains: `bucket` (the dense cache's top-k plus one bucket for the "
                    "rest) and `sampled` (its own cache of `sampled_classes` sampled classes a position, written "
                    "when the first sampled arm trains).")
    kl: bool = Field(True, description="Also KL(dense ‖ model) on every eval set (runs the dense model beside).")
    n_boot: int = Field(2000, ge=200, description="Bootstrap resamples of the paired intervals.")

    @model_validator(mode="after")
    def _study_v2(self) -> "StudyV2Config":
        if self.tail_seeds and len(set(self.tail_seeds)) != len(self.tail_seeds):
            raise ValueError(f"tail_seeds {self.tail_seeds} repeats a seed: each tail seed once")
        unpaired = sorted(set(self.tail_seeds or []) - set(self.seeds))
        if unpaired:
            raise ValueError(f"tail_seeds {unpaired} are not in seeds {self.seeds}: a tail arm is compared with the "
                             "CE-only twin of its seed, which only `seeds` trains; add them to seeds or drop them")
        names = {es.name for es in self.eval_sets if es.kind == "perplexity"}
        labelled = [r.set for r in self.relations]
        missing, extra = sorted(names - set(labelled)), sorted(set(labelled) - names)
        if len(labelled) != len(set(labelled)):
            raise ValueError("relations: each eval set is labelled once")
        if missing or extra:
            raise ValueError(f"relations must label every perplexity eval set and nothing else (missing: "
                             f"{', '.join(missing) or 'none'}; unknown: {', '.join(extra) or 'none'})")
        specs = {es.name: es.data for es in self.eval_sets}
        for r in self.relations:  # a label the corpus contradicts would put a wrong word in every verdict
            known = corpus_relation(self.corpus.data, specs[r.set])
            if known is not None and known != r.relation:
                raise ValueError(f"relations: {r.set} ({specs[r.set]}) is labelled {r.relation!r}, but against the "
                                 f"corpus {self.corpus.data} it is {known!r}"
                                 + (": an eval set must not be a split the corpus is built from"
                                    if known == IN_CORPUS else ""))
        for a in self.alphas:
            if not 0 < a <= 1:
                raise ValueError(f"alphas: {a} is not in (0, 1]; the CE-only twin (α = 0) is always run")
        per_step = self.distill.batch_size * self.distill.grad_accum * self.corpus.seq_len
        corpus_tokens = self.corpus.num_samples * self.corpus.seq_len
        for tokens in [self.train_tokens, *self.budgets]:
            if tokens % per_step:
                raise ValueError(f"{tokens} training tokens are not a whole number of optimizer steps of {per_step} "
                                 "tokens (distill.batch_size × distill.grad_accum × corpus.seq_len)")
            if tokens > corpus_tokens:
                raise ValueError(f"{tokens} training tokens exceed the corpus ({self.corpus.num_samples} × "
                                 f"{self.corpus.seq_len} = {corpus_tokens}); a budget is distinct tokens, not "
                                 "epochs: raise corpus.num_samples")
        if self.corpus.teacher_sample is not None:
            raise ValueError("corpus.teacher_sample: the study writes its sampled cache itself (sampled_classes); "
                             "leave the corpus a top-k one")
        return self

    def relation_of(self) -> dict[str, str]:
        return {r.set: r.relation for r in self.relations}

    def steps(self, tokens: int) -> int:
        return tokens // (self.distill.batch_size * self.distill.grad_accum * self.corpus.seq_len)


class StudyV2Family(_Section):
    """One model family of the combined second-study report."""

    config: str = Field(description="The family's study-v2 config (YAML), relative to the project root.")
    dir: str = Field(pattern=r"^[A-Za-z0-9._-]+$",
                     description="The subdirectory of --out where its arms are published (e.g. smollm2).")


class StudyV2Index(_Section):
    """The combined second-study report (`python -m flows.study_v2 --combine`): the families it reads."""

    families: list[StudyV2Family] = Field(min_length=1, description="Each family's config and published arms.")


class ProfileFlowConfig(FlowConfig):
    """Inference profiling of several models side by side: `model` is the baseline, `compare` the others."""

    compare: list[ModelSpec] = Field([], description="Models profiled after the baseline `model` (aliases, hub ids, "
                                                     "local directories such as pruned checkpoints).")
    profile: ProfileSection = Field(ProfileSection(), description="Batch sizes, prompt lengths, decode steps, "
                                                                  "repeats. Run it on an idle machine.")

    @field_validator("profile")
    @classmethod
    def _profile(cls, v: BaseModel) -> BaseModel:
        return _check_stage(ProfileConfig, "profile", v)


INNER_FLOWS: dict[str, type[FlowConfig]] = {"iterative": IterativeConfig, "dense-kd": DenseKDConfig,
                                             "cascade": CascadeConfig, "teacher-swap": TeacherSwapConfig,
                                             "wanda": WandaConfig, "selfdata": SelfDataFlowConfig}


def _seeded(name: str, cls: type[FlowConfig]) -> type[FlowConfig]:
    """``cls`` with a first field ``flow`` fixed to ``name``: one choice of multi-seed's ``config``, titled by the
    flow. The choice carries its flow, so the form's tab and the flow it runs cannot disagree."""
    return type(f"{cls.__name__}Seeds", (cls,), {
        "__module__": __name__, "__doc__": cls.__doc__, "__form_first__": ("flow",),
        "__annotations__": {"flow": Literal[name]},
        "flow": Field(name, description="The flow run once per seed."),
        "model_config": ConfigDict(title=name)})


_SEEDED = {name: _seeded(name, cls) for name, cls in INNER_FLOWS.items()}


class MultiSeedConfig(_Section):
    """Any other flow over several seeds; reports mean ± std per metric."""

    config: Union[tuple(_SEEDED.values())] = Field(  # noqa: UP007 - a Union of the classes: one tab per flow
        _SEEDED["iterative"](), union_mode="left_to_right",
        description="The flow run once per seed (the tab) and its config (its `seed` is set per run).")
    seeds: list[int] = Field([42, 123, 456], min_length=1, description="One run of the inner flow per seed.")
    fan_out: Literal["subflows", "deployments"] = Field(
        "subflows", description="subflows: seeds run one after another in this flow run; deployments: one run of "
                                "the inner flow's deployment per seed, on the work pool, so several GPU workers "
                                "share the seeds.")
    pool: Literal["gpu", "docker"] = Field(
        "gpu", description="With fan_out=deployments: the seeds' runs go to the inner flow's deployment on this "
                           "pool (gpu: e.g. cascade/cascade-gpu on sparsekd-gpu; docker: cascade/cascade-docker "
                           "on sparsekd-docker).")
    wait_timeout_s: float = Field(7 * 24 * 3600, gt=0, description="With fan_out=deployments: give up waiting "
                                                                     "for the seeds' runs after this long.")

    @model_validator(mode="before")
    @classmethod
    def _inner(cls, data: Any) -> Any:
        """Validate ``config`` as the config of its flow, with that flow's error messages. The flow may also be
        given beside it (``flow: cascade`` at the top, as configs written before the tabs do), and the pool as
        ``deployment: gpu``."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        if "deployment" in data and "pool" not in data:
            data["pool"] = data.pop("deployment")
        inner = data.get("config", {})
        if isinstance(inner, BaseModel):
            inner = inner.model_dump(exclude_unset=True)
        inner = dict(inner)
        outer = data.pop("flow", None)
        if outer is not None and inner.setdefault("flow", outer) != outer:
            raise ValueError(f"flow={outer!r} but config.flow={inner['flow']!r}: give the flow once")
        name = inner.setdefault("flow", "iterative")
        if name not in _SEEDED:
            raise ValueError(f"config.flow={name!r}: multi-seed runs one of {', '.join(_SEEDED)}")
        try:
            data["config"] = _SEEDED[name](**inner)
        except ValidationError as err:
            raise ValueError(format_validation_error(f"config({name})", err)) from None
        return data

    @property
    def flow(self) -> str:
        return self.config.flow

    def deployment(self) -> str:
        """The inner flow's deployment the seeds go to with fan_out=deployments."""
        return deployment_name(self.flow, self.pool)

    def inner_values(self) -> dict[str, Any]:
        """The inner config as given (fields left out keep the inner flow's defaults), without its seed or flow."""
        return {k: v for k, v in self.config.model_dump(exclude_unset=True).items() if k not in ("seed", "flow")}


def deployment_name(flow_name: str, pool: str) -> str:
    """'<flow>/<flow>-<pool>': deployments are named after their flow, so the UI's list reads as the flows."""
    return f"{flow_name}/{flow_name}-{pool}"


class CompareConfig(FlowConfig):
    """Every pruning method at the same total size, each recovered by KD and by its CE-only twin (same tokens and
    seed), then evaluated and profiled side by side: one table per budget, a Pareto plot, the best and the fastest."""

    budgets: list[float] = Field([0.1, 0.2], description="Targets as fractions of ALL the dense model's parameters "
                                                         "removed (SVD/width/WANDA are sized from the MLP share; "
                                                         "depth takes the nearest block count; WANDA 2:4 is fixed "
                                                         "at half of the MLP weights).")
    methods: list[Literal["svd", "width", "depth", "wanda", "wanda-2:4"]] = Field(
        ["svd", "width", "depth", "wanda", "wanda-2:4"],
        description="svd: whitened, tiered; width: uniform MLP neurons; depth: whole blocks; wanda: unstructured "
                    "zeros; wanda-2:4: 2 zeros in every 4 inputs (zeros counted; the weights file does not shrink).")
    prune: WandaSection = Field(WandaSection(), description="Calibration of every method (the flow sets each "
                                                            "method, its schedule and its size).")
    profile_settings: ProfileSection = Field(ProfileSection(batch_sizes=[1, 16]),
                                             description="The profiling cells: prefill and decode tokens/s of the "
                                                         "dense model and every recovered model.")

    @field_validator("budgets")
    @classmethod
    def _budgets(cls, v: list[float]) -> list[float]:
        if not v or any(not 0 < b < 1 for b in v) or len(set(v)) != len(v):
            raise ValueError(f"budgets={v}: need one or more distinct fractions of the total parameters in (0, 1)")
        return v

    @field_validator("methods")
    @classmethod
    def _methods(cls, v: list[str]) -> list[str]:
        if not v or len(set(v)) != len(v):
            raise ValueError(f"methods={v}: need one or more distinct methods")
        return v

    _prune = field_validator("prune")(_calibration_only)

    _profile_settings = field_validator("profile_settings")(_profile_cells)

    @model_validator(mode="after")
    def _a_perplexity_set(self) -> "CompareConfig":
        # The best method and the Pareto plot are by post-KD perplexity on the first perplexity set.
        if not any(es.kind == "perplexity" for es in self.eval_sets):
            raise ValueError("eval_sets: compare ranks methods by perplexity; give at least one kind=perplexity set")
        return self


FLOW_CONFIGS: dict[str, type[BaseModel]] = {
    "dense-kd": DenseKDConfig,
    "iterative": IterativeConfig,
    "cascade": CascadeConfig,
    "teacher-swap": TeacherSwapConfig,
    "wanda": WandaConfig,
    "multi-seed": MultiSeedConfig,
    "paper": PaperConfig,
    "study": StudyConfig,
    "study-v2": StudyV2Config,
    "selfdata": SelfDataFlowConfig,
    "profile": ProfileFlowConfig,
    "compare": CompareConfig,
}


def cache_config_fields(corpus: CorpusSpec) -> dict[str, Any]:
    """CacheConfig fields for a corpus (the flow sets `out`; `shards` is how the flow writes it, not what)."""
    return corpus.cache_fields()


__all__ = ["FLOW_CONFIGS", "PAPER_TARGETS", "CacheConfig", "StudyConfig", "cache_config_fields", "paper_part"]
