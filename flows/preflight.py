"""The pre-flight: every check a flow run makes before any work, so that a bad input is one line and exit code 2
before a Prefect server starts, a stage directory is made or a model is loaded.

``sparsekd run``/``demo`` call ``preflight`` right after the config validates (before the flow, and so before the
temporary Prefect server); every flow calls it again where its run starts (``flows/context.py``), so a deployment's
run, which never passes through the CLI, is checked the same way. Each check raises a one-line ``ConfigError``
(``ModelLoadError`` for an alias whose wheel is missing); the checks themselves live with what they check:

=====================================  ===========================================================================
workdir can be written                 ``sparsekd_core.checks.check_workdir`` (its local mirror for a URL root)
object-store credentials (s3://)       ``check_store_credentials`` below
tracking URI opens and answers         ``tasks.tracking.check_tracking_uri`` (one attempt, 3 s)
``device: cuda`` is there              ``sparsekd_core.checks.check_device_available``
model source is a model                ``sparsekd_core.checks.check_model_source`` (and each ``compare`` model)
``top_k`` fits the vocabulary          ``sparsekd_core.checks.check_top_k`` (config.json / GGUF header)
corpus gives ``num_samples``           ``sparsekd_core.checks.check_corpus_size`` (a bound from bytes)
eval sets held out from the corpus     ``sparsekd_core.checks.check_held_out``
=====================================  ===========================================================================

Cost: well under a second with a local model and packaged or file data, plus the first read of each corpus source
(~1 s for python:stdlib, then memoised in the process), plus the time a hub id's reachability probe takes (up to
3 s when offline without ``HF_HUB_OFFLINE``).
"""

from __future__ import annotations

import os

from pydantic import BaseModel

from sparsekd_core import checks
from sparsekd_core.config import ConfigError
from tasks.store import is_url, local_root
from tasks.tracking import check_tracking_uri, default_tracking_uri

from .configs import FlowConfig, MultiSeedConfig, ProfileFlowConfig, SelfDataFlowConfig


def preflight(config: BaseModel) -> None:
    """Run every pre-work check on a validated flow config (a multi-seed config: on its inner flow's config)."""
    cfg: FlowConfig = config.config if isinstance(config, MultiSeedConfig) else config
    local = local_root(cfg.workdir)
    checks.check_workdir(local, "workdir" if not is_url(cfg.workdir) else f"workdir's local mirror ({local})")
    if is_url(cfg.workdir):
        check_store_credentials(cfg.workdir)
    from_env = cfg.tracking_uri is None and bool(os.environ.get("MLFLOW_TRACKING_URI"))
    check_tracking_uri(cfg.tracking_uri or default_tracking_uri(local),
                       "MLFLOW_TRACKING_URI" if from_env else "tracking_uri")
    checks.check_device_available(cfg.device)
    checks.check_model_source(cfg.model)
    for i, spec in enumerate(getattr(cfg, "compare", [])):
        checks.check_model_source(spec, field=f"compare[{i}]")
    if isinstance(cfg, ProfileFlowConfig):  # profiling reads no corpus and no eval set
        return
    checks.check_top_k(cfg.corpus.top_k, cfg.model)
    if not isinstance(cfg, SelfDataFlowConfig):  # selfdata caches every prompt it made: no size to check
        checks.check_corpus_size(cfg.corpus.cache_config())
    checks.check_held_out({es.name: es.data for es in cfg.eval_sets}, cfg.distill.val_data,
                          cfg.corpus.cache_config())


def check_store_credentials(root: str) -> None:
    """An ``s3://`` storage root has credentials to use: ``AWS_ACCESS_KEY_ID`` + ``AWS_SECRET_ACCESS_KEY``, or what
    botocore's chain finds (a profile in ~/.aws, SSO, a web identity, a container or instance role: the last two
    ask a local metadata endpoint, 1 s at most). Other schemes (gs://, az://) are left to their providers' chains,
    which fail on first use. (Its home is beside ``tasks.store.check_root``; it lives here while that file is
    another change's.)"""
    if not root.startswith("s3://"):
        return
    if os.environ.get("AWS_ACCESS_KEY_ID") and os.environ.get("AWS_SECRET_ACCESS_KEY"):
        return
    import botocore.session

    try:
        found = botocore.session.get_session().get_credentials()
    except Exception as err:  # noqa: BLE001 - a broken profile is as unusable as none
        raise ConfigError(f"workdir={root!r}: the AWS credentials cannot be read ({str(err).splitlines()[0]})") \
            from None
    if found is None:
        raise ConfigError(f"workdir={root!r}: no AWS credentials found; set AWS_ACCESS_KEY_ID and "
                          "AWS_SECRET_ACCESS_KEY (and AWS_ENDPOINT_URL for a non-AWS store), or AWS_PROFILE with "
                          "~/.aws/credentials")
