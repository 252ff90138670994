"""Low-rank MLP layers, MLP-matrix discovery, parameter accounting and the compressed checkpoint format.

A pruned projection ``W`` [out, in] is stored as two dense linears, ``v`` (in → r, no bias) and ``u``
(r → out, with W's bias if any): ``y = u(v(x)) = (u.weight @ v.weight) x + b``. It only pays when
``r·(in + out) < in·out``.

Compressed checkpoint (a directory that ``sparsekd_core.models.load_model`` loads back):

* ``config.json``: the base architecture's config plus ``sparsekd_compression`` = {``format``: 1, ``method``,
  ``round``, ``parent``, ``ranks`` (module name → rank, the factored modules), ``mlp_params_dense``,
  ``history`` (one entry per round)};
* ``model.safetensors``: the state dict, factored modules as ``<name>.u.weight`` [out, r] and
  ``<name>.v.weight`` [r, in] (tied weights stored once), so the file size follows the parameter count;
* the tokenizer files;
* ``widths`` (MLP module name → intermediate size), only where an MLP's size differs from the config's
  ``intermediate_size`` (width pruning with a non-uniform schedule, ``width.py``);
* where at least one module is factored or resized: ``modeling_sparsekd.py`` (``remote_code/``, copied verbatim) and
  ``config.json``'s ``auto_map`` pointing at it, so ``AutoModelForCausalLM.from_pretrained(DIR,
  trust_remote_code=True)`` builds the same model with only torch and transformers installed. ``model_type`` stays
  the base's: without ``trust_remote_code`` transformers builds the dense architecture, reports the factor weights
  as unexpected and the dense MLP weights as missing (randomly initialised), i.e. a wrong model. WANDA, depth and
  uniform width-pruned checkpoints factor and resize nothing: they are standard checkpoints and carry no code.

``save_dense`` merges the factors back (``u.weight @ v.weight``) into a plain checkpoint that stock
``transformers`` loads; its config keeps the record under ``sparsekd_dense_export`` instead.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..config import ConfigError
from ..files import replace_dir
from .remote_code import AUTO_MAP, MODELING_FILE

COMPRESSION_KEY = "sparsekd_compression"
DENSE_EXPORT_KEY = "sparsekd_dense_export"
WEIGHTS_FILE = "model.safetensors"
FORMAT_VERSION = 1

# An MLP matrix is a linear inside a decoder block's MLP: ``...layers.<i>.<mlp|feed_forward|ffn>.<proj>``.
# Covers Llama, Qwen2/Qwen3, Mistral, Gemma (gate/up/down_proj) and Phi-3/Phi-4-mini (fused gate_up_proj).
MLP_NAME = re.compile(r"(?:^|\.)layers\.(\d+)\.(?:mlp|feed_forward|ffn)\.(\w+)$")
# An MLP's intermediate neurons: output rows of these projections (per neuron; Phi-3's fused gate_up_proj holds
# gate rows [0, I) and up rows [I, 2I)) and input columns of down_proj. ``remote_code/`` has its own copy.
NEURON_ROWS = {"gate_proj": 1, "up_proj": 1, "gate_up_proj": 2}


class LowRankLinear(nn.Module):
    """``y = u(v(x))``: a rank-r stand-in for an ``nn.Linear(in_features, out_features)``.

    ``v.weight`` [r, in], ``u.weight`` [out, r], ``u.bias`` [out] or None. Trainable like any two linears.
    ``remote_code/modeling_sparsekd.py`` has its own copy (it may import nothing from sparsekd);
    ``tests/test_portable_checkpoints.py`` checks that both load the same checkpoints to the same logits.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = False,
                 device=None, dtype=None) -> None:
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.v = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.u = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)

    @classmethod
    def from_factors(cls, u: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None) -> "LowRankLinear":
        """Build from u [out, r] and v [r, in] (taking their device and dtype)."""
        layer = cls(v.shape[1], u.shape[0], u.shape[1], bias=bias is not None, device=u.device, dtype=u.dtype)
        with torch.no_grad():
            layer.u.weight.copy_(u)
            layer.v.weight.copy_(v)
            if bias is not None:
                layer.u.bias.copy_(bias)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.u(self.v(x))

    def merged_weight(self) -> torch.Tensor:
        """The dense product u.weight @ v.weight [out, in], in the layer's dtype (computed in ≥ fp32)."""
        compute = torch.promote_types(self.u.weight.dtype, torch.float32)
        return (self.u.weight.to(compute) @ self.v.weight.to(compute)).to(self.u.weight.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


@dataclass
class MlpMatrix:
    """One MLP projection found in a model: its qualified name, block index, projection name and module."""

    name: str
    layer: int
    proj: str  # gate_proj, up_proj, down_proj, gate_up_proj, ...
    module: nn.Module  # nn.Linear or LowRankLinear

    @property
    def shape(self) -> tuple[int, int]:
        return (self.module.out_features, self.module.in_features)

    @property
    def rank(self) -> int | None:
        """Current rank if factored, None if dense."""
        return self.module.rank if isinstance(self.module, LowRankLinear) else None

    @property
    def is_gate(self) -> bool:
        return "gate" in self.proj


def find_mlp_matrices(model: nn.Module) -> list[MlpMatrix]:
    """All MLP projections (dense nn.Linear or LowRankLinear) in block order; attention is never matched."""
    found = []
    for name, module in model.named_modules():
        match = MLP_NAME.search(name)
        if match and isinstance(module, (nn.Linear, LowRankLinear)):
            found.append(MlpMatrix(name, int(match.group(1)), match.group(2), module))
    return found


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def module_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def factored_ranks(matrices: list[MlpMatrix]) -> dict[str, int]:
    """{module name: rank} of the factored (LowRankLinear) matrices: what a checkpoint's record lists as ``ranks``."""
    return {m.name: m.rank for m in matrices if m.rank is not None}


def count_params(model: nn.Module, matrices: list[MlpMatrix] | None = None) -> dict[str, int]:
    """Exact counts: ``total`` = Σ numel over ``model.parameters()`` (tied weights once), ``mlp`` = the MLP
    projections' parameters (factors and biases included), ``mlp_nonzero`` / ``total_nonzero`` = nonzero entries
    (what unstructured pruning reduces). ``matrices``: ``find_mlp_matrices(model)`` if the caller has it already."""
    params = list(model.parameters())
    if matrices is None:
        matrices = find_mlp_matrices(model)
    mlp = [p for m in matrices for p in m.module.parameters()]
    return {
        "total": sum(p.numel() for p in params),
        "mlp": sum(p.numel() for p in mlp),
        "total_nonzero": sum(int(torch.count_nonzero(p)) for p in params),
        "mlp_nonzero": sum(int(torch.count_nonzero(p)) for p in mlp),
    }


def compression_record(model: nn.Module) -> dict | None:
    return getattr(model.config, COMPRESSION_KEY, None)


def apply_ranks(model: nn.Module, ranks: dict[str, int]) -> None:
    """Replace the named dense MLP linears by (uninitialised) LowRankLinear of the given ranks, in place."""
    for name, rank in ranks.items():
        old = model.get_submodule(name)
        set_module(model, name, LowRankLinear(old.in_features, old.out_features, rank, bias=old.bias is not None,
                                              device=old.weight.device, dtype=old.weight.dtype))


def mlp_widths(model: nn.Module) -> dict[str, int]:
    """{MLP module name: intermediate size} of the MLPs whose size differs from ``config.intermediate_size`` (a
    width-pruned model with per-block sizes); empty for a model whose MLPs all have the config's size."""
    size = getattr(model.config, "intermediate_size", None)
    if not isinstance(size, int):
        return {}
    return {m.name.rpartition(".")[0]: m.module.in_features for m in find_mlp_matrices(model)
            if m.proj == "down_proj" and m.module.in_features != size}


def apply_widths(model: nn.Module, widths: dict[str, int]) -> None:
    """Give each named MLP its own intermediate size: (uninitialised) dense linears of that width, in place."""
    for mlp_name, width in widths.items():
        mlp = model.get_submodule(mlp_name)
        shapes = {proj: (mlp.get_submodule(proj).in_features, copies * width)
                  for proj, copies in NEURON_ROWS.items() if hasattr(mlp, proj)}
        shapes["down_proj"] = (width, mlp.down_proj.out_features)
        for proj, (in_features, out_features) in shapes.items():
            old = mlp.get_submodule(proj)
            setattr(mlp, proj, nn.Linear(in_features, out_features, bias=old.bias is not None,
                                         device=old.weight.device, dtype=old.weight.dtype))


def is_compressed_dir(path: str | Path) -> bool:
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    return COMPRESSION_KEY in json.loads(config.read_text(encoding="utf-8"))


def _shared_groups(model: nn.Module) -> list[list[str]]:
    """State-dict names grouped by storage (tied weights share one); in state-dict order."""
    groups: dict[tuple, list[str]] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        groups.setdefault((tensor.device, tensor.untyped_storage().data_ptr()), []).append(name)
    return list(groups.values())


def load_compressed(path: str | Path, dtype: torch.dtype) -> nn.Module:
    """Load a sparsekd compressed checkpoint: build the architecture, factor the recorded modules, load weights."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    path = Path(path)
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    # The auto_map describes the files beside the weights, not this in-memory model (sparsekd's own LowRankLinear);
    # save_compressed writes it again, and a dense export or a plain save_pretrained must not inherit it.
    if hasattr(config, "auto_map"):
        delattr(config, "auto_map")
    with no_init_weights():  # every tensor is overwritten below; random init would only cost time
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    record = getattr(config, COMPRESSION_KEY)
    apply_widths(model, record.get("widths", {}))  # before factoring: a factored MLP of a resized block
    apply_ranks(model, record.get("ranks", {}))
    model.tie_weights()
    # Our own writer makes one model.safetensors; a factored model saved with save_pretrained (e.g. after
    # training) may be sharded with an index. Either loads.
    index = path / (WEIGHTS_FILE + ".index.json")
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else [WEIGHTS_FILE]
    state = {k: v for f in files for k, v in load_file(path / f).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    # A tied weight is stored once under one of its names; the others share that storage.
    stored_once = {name for group in _shared_groups(model) if set(group) & state.keys() for name in group}
    missing = [name for name in missing if name not in stored_once]
    if missing or unexpected:
        raise ValueError(f"{path}: checkpoint does not match its recorded structure "
                         f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})")
    return model.eval()


def _save_common(model: nn.Module, tokenizer, out: Path) -> None:
    model.config.save_pretrained(out)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)


def add_remote_code(directory: Path) -> None:
    """Make a saved factored checkpoint loadable without sparsekd: copy ``modeling_sparsekd.py`` beside it and add
    the ``auto_map`` entry that ``AutoModelForCausalLM`` follows under ``trust_remote_code=True``."""
    shutil.copyfile(MODELING_FILE, directory / MODELING_FILE.name)
    config_file = directory / "config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    config["auto_map"] = {**config.get("auto_map", {}), **AUTO_MAP}
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def save_compressed(model: nn.Module, tokenizer, out: str | Path) -> Path:
    """Write ``model`` (with its ``sparsekd_compression`` record) as a compressed checkpoint, atomically."""
    from safetensors.torch import save_file

    record = compression_record(model)
    if record is None:
        raise ValueError("model has no sparsekd_compression record; set it before saving a compressed checkpoint")
    record["ranks"] = factored_ranks(find_mlp_matrices(model))
    record.pop("widths", None)
    widths = mlp_widths(model)
    if widths:  # only width-pruned models with per-block sizes carry the key
        record["widths"] = widths

    state = model.state_dict()
    tensors = {group[0]: state[group[0]].detach().contiguous() for group in _shared_groups(model)}

    def build(tmp: Path) -> None:
        _save_common(model, tokenizer, tmp)
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        if record["ranks"] or widths:
            add_remote_code(tmp)

    return replace_dir(build, Path(out))


def save_dense(model: nn.Module, tokenizer, out: str | Path) -> Path:
    """Merge every LowRankLinear into a plain nn.Linear and save a stock Hugging Face checkpoint (``model`` is not
    modified). Outputs equal the factored model's up to the rounding of one extra matmul."""
    import copy

    if mlp_widths(model):
        raise ConfigError("prune: a dense export of a model with per-block MLP sizes (width pruning, schedule "
                          "tiered) is not a stock architecture; use schedule uniform, or load the compressed "
                          "checkpoint (its modeling code builds the per-block sizes)")
    dense = copy.deepcopy(model)
    for m in find_mlp_matrices(dense):
        if m.rank is not None:
            layer = m.module
            linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.u.bias is not None,
                               device=layer.u.weight.device, dtype=layer.u.weight.dtype)
            with torch.no_grad():
                linear.weight.copy_(layer.merged_weight())
                if layer.u.bias is not None:
                    linear.bias.copy_(layer.u.bias)
            set_module(dense, m.name, linear)
    if hasattr(dense.config, "auto_map"):  # a stock checkpoint: no custom code to point at
        delattr(dense.config, "auto_map")
    record = compression_record(dense)
    if record is not None:
        delattr(dense.config, COMPRESSION_KEY)
        setattr(dense.config, DENSE_EXPORT_KEY, {**record, "ranks": {}})

    def build(tmp: Path) -> None:
        dense.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)

    return replace_dir(build, Path(out))
