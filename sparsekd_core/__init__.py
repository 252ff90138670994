"""The SparseKD method: loading, data, evaluation, caching, pruning, distillation, profiling.

Pure Python + torch/transformers/zarr: nothing here imports Prefect or MLflow, so a stage runs on a GPU box
with only those installed.
"""

__version__ = "0.1.0"
