"""Every flow by name: what `sparsekd run FLOW` and the deployments (deployments/prefect.yaml) can start.

The studies (flows/study.py, flows/study_v2.py) build on the paper flow, so they live in modules of their own and joins the others here;
so does the compare flow (flows/compare.py).
"""

from __future__ import annotations

from .compare import compare_flow
from .experiments import ALL_FLOWS as EXPERIMENT_FLOWS
from .study import study_flow
from .study_v2 import study_v2_flow

ALL_FLOWS = {**EXPERIMENT_FLOWS, "study": study_flow, "study-v2": study_v2_flow, "compare": compare_flow}

__all__ = ["ALL_FLOWS"]
