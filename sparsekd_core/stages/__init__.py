"""A stage run on a loaded model: the one body that ``sparsekd <verb>`` and the Prefect tasks both call.

The entry points differ in how they load a model (flags or a ModelRef), report progress (a bar or log lines) and
what they keep (JSON on stdout, a stage directory); the steps of a stage and their order are here, once.
Each function takes a ``models.LoadedModel`` and a stage config and returns data.
``progress_factory(total)`` returns a tqdm-like object (``update(n)``, ``close()``), as in ``cache.run_cache``.

One module per stage (``stages/eval.py``, ``stages/prune.py``, ``stages/profile.py``), so that a stage's identity
(identity.py) covers its own body and not the others'.
"""

from .eval import evaluate_gsm8k, evaluate_text
from .profile import profile_models, save_profile
from .prune import PruneRun, prune_and_save

__all__ = ["PruneRun", "evaluate_gsm8k", "evaluate_text", "profile_models", "prune_and_save", "save_profile"]
