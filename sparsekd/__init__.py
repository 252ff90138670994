"""The `sparsekd` command (top floor): stage verbs call sparsekd_core; `run`/`demo` call flows."""
