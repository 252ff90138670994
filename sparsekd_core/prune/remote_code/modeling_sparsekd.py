"""A sparsekd factored (SVD-pruned) or per-block-width checkpoint as a plain transformers model: no sparsekd needed.

    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)

sparsekd copies this file into every factored checkpoint it writes; ``config.json`` points at it
(``"auto_map": {"AutoModelForCausalLM": "modeling_sparsekd.SparsekdForCausalLM"}``) and keeps the base
architecture's ``model_type`` (``llama``, ``qwen2``, ``qwen3``, ``mistral``, ``phi3``, ``gemma``, ...). It needs only
torch and transformers, and runs only when the caller passes ``trust_remote_code=True``.

What it builds: a subclass of the base architecture's own class (``LlamaForCausalLM``, ``Phi3ForCausalLM``, ...),
made from the config, with every MLP projection named in ``config.sparsekd_compression["ranks"]`` (module name →
rank r) replaced by ``LowRankLinear``: two linears ``v`` (in → r, no bias) and ``u`` (r → out, with the dense
layer's bias if it had one), ``y = u(v(x))``. Parameter names match the checkpoint (``<name>.v.weight`` [r, in],
``<name>.u.weight`` [out, r], ``<name>.u.bias`` [out]). Before that, every MLP named in the record's ``widths`` (MLP
module name → intermediate size I_b; width pruning with per-block sizes) gets dense projections of its own size:
``gate_proj``/``up_proj`` [I_b, hidden] (Phi-3's ``gate_up_proj`` [2·I_b, hidden]), ``down_proj`` [hidden, I_b].
So transformers' own ``from_pretrained`` loads the weights
(tied embeddings and dtype included) and ``generate``, ``pipeline``, ``save_pretrained`` and the rest are the base
class's.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from torch import nn
from transformers import AutoConfig, PretrainedConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

COMPRESSION_KEY = "sparsekd_compression"
NEURON_ROWS = {"gate_proj": 1, "up_proj": 1, "gate_up_proj": 2}  # output rows per intermediate neuron
AUTO_MAP = {"AutoModelForCausalLM": "modeling_sparsekd.SparsekdForCausalLM"}


class LowRankLinear(nn.Module):
    """``y = u(v(x))``: a rank-r stand-in for ``nn.Linear(in_features, out_features)``.

    ``v.weight`` [r, in], ``u.weight`` [out, r], ``u.bias`` [out] or None.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = False,
                 device=None, dtype=None) -> None:
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.v = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.u = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)

    def forward(self, x):
        return self.u(self.v(x))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


def factor_projections(model: nn.Module, ranks: dict[str, int]) -> None:
    """Replace each named dense linear of ``model`` by an (uninitialised) LowRankLinear of its rank, in place."""
    for name, rank in ranks.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        dense = getattr(parent, child)
        setattr(parent, child, LowRankLinear(dense.in_features, dense.out_features, rank, bias=dense.bias is not None,
                                             device=dense.weight.device, dtype=dense.weight.dtype))


def resize_mlps(model: nn.Module, widths: dict[str, int]) -> None:
    """Give each named MLP of ``model`` its own intermediate size (uninitialised dense projections), in place."""
    for mlp_name, width in widths.items():
        mlp = model.get_submodule(mlp_name)
        shapes = {proj: (getattr(mlp, proj).in_features, copies * width)
                  for proj, copies in NEURON_ROWS.items() if hasattr(mlp, proj)}
        shapes["down_proj"] = (width, mlp.down_proj.out_features)
        for proj, (in_features, out_features) in shapes.items():
            old = getattr(mlp, proj)
            setattr(mlp, proj, nn.Linear(in_features, out_features, bias=old.bias is not None,
                                         device=old.weight.device, dtype=old.weight.dtype))


class FactoredMixin:
    """Put in front of a base architecture's class: resize, then factor the recorded projections right after the
    base builds the dense model, and keep this file and its ``auto_map`` entry in every directory ``save_pretrained``
    writes."""

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        record = getattr(config, COMPRESSION_KEY, None) or {}
        resize_mlps(self, record.get("widths", {}))
        factor_projections(self, record.get("ranks", {}))

    def save_pretrained(self, save_directory, *args, **kwargs):
        self.config.auto_map = {**(getattr(self.config, "auto_map", None) or {}), **AUTO_MAP}
        super().save_pretrained(save_directory, *args, **kwargs)
        shutil.copyfile(__file__, Path(save_directory) / "modeling_sparsekd.py")


_FACTORED_CLASSES: dict[type, type] = {}


def factored_class(config: PretrainedConfig) -> type:
    """The causal-LM class transformers maps the config's type to, with ``FactoredMixin`` in front; one per base,
    made on first use. It keeps the base's name (``LlamaForCausalLM``, ...): transformers goes by class names (the
    ``architectures`` that ``save_pretrained`` records, the models a ``pipeline`` task accepts), and this is that
    architecture. Its ``__module__`` (``...modeling_sparsekd``) and ``sparsekd_factored`` tell it apart."""
    base = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    if base not in _FACTORED_CLASSES:
        _FACTORED_CLASSES[base] = type(base.__name__, (FactoredMixin, base),
                                       {"sparsekd_factored": True, "__doc__": FactoredMixin.__doc__})
    return _FACTORED_CLASSES[base]


class SparsekdForCausalLM:
    """The class ``auto_map`` names. It only dispatches: constructing or loading it returns an instance of
    ``factored_class(config)``, a subclass of the base architecture's own class with factored MLP projections.

    A plain class, not a ``PreTrainedModel``: that would give it ``config_class = None``, and transformers <= 5.18
    reads ``config_class.__name__`` of any remote class before loading it (``AttributeError``); a class with no
    ``config_class`` passes. No instance of it is ever made."""

    def __new__(cls, config, *args, **kwargs):
        return factored_class(config)(config, *args, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, config=None, **kwargs):
        if not isinstance(config, PretrainedConfig):  # called directly rather than through AutoModelForCausalLM
            hub = {k: kwargs[k] for k in ("cache_dir", "revision", "token", "local_files_only") if k in kwargs}
            config = AutoConfig.from_pretrained(config or pretrained_model_name_or_path, **hub)
        return factored_class(config).from_pretrained(pretrained_model_name_or_path, *args, config=config, **kwargs)

    @classmethod
    def _from_config(cls, config, **kwargs):
        return factored_class(config)._from_config(config, **kwargs)

    @classmethod
    def register_for_auto_class(cls, auto_class="AutoModelForCausalLM"):
        """AutoModelForCausalLM calls this on remote classes; the instances' ``save_pretrained`` writes ``auto_map``."""
