"""MLflow tracking (tasks/tracking.py): a diverged figure shows in MLflow, it is never silently dropped."""

from __future__ import annotations

import math

from tasks.tracking import Tracker


def test_non_finite_metrics_are_logged_and_tagged(tmp_path):
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "diverged")
    run = tracker.start_run("arm")
    tracker.log_metrics(run, {"val_ppl": float("nan"), "kd_loss_last": float("inf"), "ce_loss_last": 2.5,
                              "finished": True}, step=3)
    tracker.log_curve(run, "val_ppl_curve", [(0, 30.0), (8, float("nan")), (16, float("nan"))])
    data = tracker.client.get_run(run).data
    assert math.isnan(data.metrics["val_ppl"]) and data.metrics["kd_loss_last"] > 1e300
    assert data.metrics["ce_loss_last"] == 2.5 and "finished" not in data.metrics  # a bool is not a metric
    assert data.tags["sparsekd.diverged.val_ppl"] == "nan at step 3"
    assert data.tags["sparsekd.diverged.kd_loss_last"] == "inf at step 3"
    assert data.tags["sparsekd.diverged.val_ppl_curve"] == "nan at step 8"  # its first bad step
    history = tracker.client.get_metric_history(run, "val_ppl_curve")
    assert [h.step for h in history] == [0, 8, 16]  # every point is there, the bad ones too
    assert "sparsekd.diverged.ce_loss_last" not in data.tags


def test_experiments_are_of_the_model_training_kind(tmp_path):
    """Experiments are tagged custom_model_development (model training, not GenAI); an experiment made before the
    tag gets it on the next open. (MLflow 3.17's own UI ignores the tag: see test_ui_links_open_the_training_view.)"""
    from mlflow.tracking import MlflowClient

    from tasks.tracking import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, Tracker

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(uri, "sparsekd-dense-kd")
    client = MlflowClient(uri)
    assert client.get_experiment(tracker.experiment_id).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
    old = client.create_experiment("made-elsewhere")
    assert EXPERIMENT_KIND_TAG not in client.get_experiment(old).tags
    Tracker(uri, "made-elsewhere")
    assert client.get_experiment(old).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND


def test_ui_links_open_the_training_view(tmp_path):
    """Every MLflow page sparsekd links (run, registered version) asks for the "Model training" view: MLflow 3.17's
    UI opens in its GenAI view by default, whatever the experiment's kind tag (the e2e test loads one in Chromium);
    the links name the server without the credentials of the tracking URI; a local store has no UI to link."""
    from tasks.tracking import Tracker

    local = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "sparsekd-dense-kd")
    assert local.run_url("abc") is None and local.model_url("m", 1) is None
    served = Tracker.__new__(Tracker)
    served.tracking_uri, served.experiment_id = "https://user:secret@mlflow.example:5000/", "7"
    assert served.run_url("abc") == \
        "https://mlflow.example:5000/#/experiments/7/runs/abc?workflowType=machine_learning"
    assert served.model_url("sparsekd-x", 2) == \
        "https://mlflow.example:5000/#/models/sparsekd-x/versions/2?workflowType=machine_learning"


def test_the_code_version_names_every_changed_file_whole(tmp_path):
    """A report's code-version line: the commit and each changed tracked file, not one character cut (git status
    --porcelain lines start with a two-letter code; a file changed only in the work tree starts with a space)."""
    import subprocess

    from tasks.tracking import code_version

    def git(*args):
        subprocess.run(["git", "-c", "user.email=t@t", "-c", "user.name=t", *args], cwd=tmp_path, check=True,
                       capture_output=True)

    git("init", "-q")
    for name in ("docs/report.md", "staged.py", "untracked_later.py"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text("a\n")
    git("add", "docs/report.md", "staged.py")
    git("commit", "-qm", "first")
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=tmp_path, capture_output=True, text=True,
                         check=True).stdout.strip()
    assert code_version(tmp_path).startswith(f"{rev}; python ")  # clean: the commit alone
    (tmp_path / "docs/report.md").write_text("b\n")  # " M docs/report.md": changed in the work tree only
    (tmp_path / "staged.py").write_text("b\n")
    git("add", "staged.py")  # "M  staged.py"
    line = code_version(tmp_path)
    assert line.startswith(f"{rev} with these files changed from it: docs/report.md, staged.py; python "), line
