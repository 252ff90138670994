"""Modeling code that travels inside every factored checkpoint (``modeling_sparsekd.py``).

The file is copied verbatim by ``prune.lowrank.save_compressed`` and runs in the user's process under
``trust_remote_code=True`` with only torch and transformers installed, so it imports nothing from sparsekd.
Nothing in sparsekd imports it; this package only ships it (setuptools packages every ``.py`` of a package).
"""

from pathlib import Path

MODELING_FILE = Path(__file__).with_name("modeling_sparsekd.py")
AUTO_MAP = {"AutoModelForCausalLM": "modeling_sparsekd.SparsekdForCausalLM"}  # config.json's pointer into it
