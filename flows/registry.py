"""Every flow by name: what `sparsekd run FLOW` and the deployments (deployments/prefect.yaml) can start.

The study (flows/study.py) builds on the paper flow, so it lives in a module of its own and joins the others here;
so does the compare flow (flows/compare.py).
"""

from __future__ import annotations

from .compare import compare_flow
from .experiments import ALL_FLOWS as EXPERIMENT_FLOWS
from .study import study_flow

ALL_FLOWS = {**EXPERIMENT_FLOWS, "study": study_flow, "compare": compare_flow}

__all__ = ["ALL_FLOWS"]
