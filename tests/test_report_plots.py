"""A flow report's plots show wherever the report is read (issue 27, item 3).

The copy on disk links its plots by file name (they lie beside it, and the study publishes them beside it). The
copy sent to Prefect carries them as data: images (both Prefect UIs show those; a relative link is a 404 there).
The copy logged to MLflow links the tracking server's ``/get-artifact`` URL of each plot: MLflow's Markdown preview
shows only http(s) images (a relative one prints as ``[alt](src)``, a data: one loses its source); with a local
store, which no server serves, it gets the data: images. No server runs here: the http case uses a stand-in
tracker that records what would be logged.
"""

from __future__ import annotations

import base64
import re
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from flows.context import Run
from sparsekd_core import report as rep
from tasks import tracking
from tasks.tracking import FlowTracking, Tracker

IMAGE = re.compile(r"!\[[^\]]*\]\(([^)\s]+)\)")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def image_sources(text: str) -> list[str]:
    return IMAGE.findall(text)


def png_of(data_uri: str) -> bytes:
    assert data_uri.startswith("data:image/png;base64,"), data_uri[:40]
    return base64.b64decode(data_uri.split(",", 1)[1], validate=True)


class _Config:
    """What Run.finish reads of a flow config when the caller gives the header."""

    def model_dump_json(self, indent: int) -> str:
        return "{}"


class _HttpTracker:
    """A Tracker whose tracking URI is a server's: records the logging instead of sending it."""

    run_url, ui_url = Tracker.run_url, Tracker.ui_url  # the real links, from the URI

    def __init__(self, uri: str):
        self.tracking_uri, self.experiment_id = uri, "1"
        self.client = self
        self.files: dict[str, str] = {}  # artifact path -> the local file logged there
        self.texts: dict[str, str] = {}  # artifact path -> the text logged there

    def log_metrics(self, run_id, metrics, step=None):
        pass

    def set_tags(self, run_id, tags):
        pass

    def log_artifact(self, run_id, path, artifact_path=None):
        self.files[f"{artifact_path}/{Path(path).name}"] = str(path)

    def log_text(self, run_id, text, artifact_file):
        self.texts[artifact_file] = text

    def end_run(self, run_id, status="FINISHED"):
        pass


def _finish(mlflow: FlowTracking, workdir: Path, monkeypatch) -> tuple[dict, str]:
    """Run.finish of a flow with one recovery curve; returns its summary and the text sent to Prefect."""
    sent = []
    monkeypatch.setattr(tracking, "report_artifact", lambda flow_name, text: sent.append(text))
    run = Run(_Config(), "dense-kd", mlflow, str(workdir))
    run.curves["dense+kd"] = [(0, 40.0), (2, 30.0), (4, 25.0)]
    summary = run.finish(["## A section\n"], {"ppl": 25.0}, header="# dense-kd\n\n")
    assert len(sent) == 1
    return summary, sent[0]


def test_the_report_on_disk_links_its_plots_by_file_name_and_prefect_gets_them_inside(tmp_path, monkeypatch):
    mlflow = FlowTracking(_HttpTracker("http://mlflow.example:5000"), {"uri": "http://mlflow.example:5000"}, "r" * 32)
    summary, prefect_text = _finish(mlflow, tmp_path, monkeypatch)
    plot = Path(summary["report"]).parent / "recovery.png"
    assert image_sources(Path(summary["report"]).read_text()) == ["recovery.png"]  # beside it: folder, publish
    [src] = image_sources(prefect_text)
    assert png_of(src) == plot.read_bytes() and png_of(src).startswith(PNG_MAGIC)
    assert prefect_text.replace(src, "recovery.png") == Path(summary["report"]).read_text()  # the same report


def test_a_tracking_server_gets_its_own_urls_of_the_plots(tmp_path, monkeypatch):
    uri = "http://user:secret@mlflow.example:5000/"
    tracker = _HttpTracker(uri)
    parent = "0123456789abcdef0123456789abcdef"
    summary, _ = _finish(FlowTracking(tracker, {"uri": uri}, parent), tmp_path, monkeypatch)
    mlflow_text = tracker.texts["report/report.md"]
    [src] = image_sources(mlflow_text)
    url = urlsplit(src)
    assert (url.scheme, url.netloc, url.path) == ("http", "mlflow.example:5000", "/get-artifact")  # no credentials
    assert summary["mlflow_run_url"] == f"http://mlflow.example:5000/#/experiments/1/runs/{parent}" \
        "?workflowType=machine_learning"
    assert parse_qs(url.query) == {"path": ["report/recovery.png"], "run_uuid": [parent]}
    # That file is logged there, beside the report's other files; the text on disk is not.
    assert tracker.files["report/recovery.png"] == str(Path(summary["report"]).parent / "recovery.png")
    assert set(tracker.files) == {"report/recovery.png", "report/metrics.json", "report/config.json"}


def test_a_local_store_gets_the_plots_inside_its_report(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(uri, "plots", str(tmp_path / "mlartifacts"))
    mlflow = FlowTracking(tracker, {"uri": uri}, tracker.start_run("dense-kd"))
    assert mlflow.report_file_url("recovery.png") is None  # no server to name
    summary, prefect_text = _finish(mlflow, tmp_path / "w", monkeypatch)
    logged = Path(tracker.client.download_artifacts(mlflow.parent_id, "report", str(tmp_path / "down")))
    assert {p.name for p in logged.iterdir()} >= {"report.md", "recovery.png", "metrics.json", "config.json"}
    mlflow_text = (logged / "report.md").read_text()
    assert mlflow_text == prefect_text
    [src] = image_sources(mlflow_text)
    assert png_of(src) == (logged / "recovery.png").read_bytes() == (Path(summary["report"]).parent
                                                                     / "recovery.png").read_bytes()


@pytest.mark.parametrize("plot_src", [None, rep.png_data_uri, lambda p: f"https://x/{p.name}"])
def test_flow_report_puts_each_plot_where_plot_src_says(tmp_path, plot_src):
    plots = [tmp_path / "a.png", tmp_path / "b.png"]
    for i, p in enumerate(plots):
        p.write_bytes(PNG_MAGIC + bytes([i]))
    text = rep.flow_report("# t\n\n", ["## s\n"], plots, [], plot_src=plot_src)
    sources = image_sources(text)
    if plot_src is None:
        assert sources == ["a.png", "b.png"]
    elif plot_src is rep.png_data_uri:
        assert [png_of(s) for s in sources] == [p.read_bytes() for p in plots]
    else:
        assert sources == ["https://x/a.png", "https://x/b.png"]


def test_flow_reports_say_what_an_alias_model_is():
    """A report on an alias names what the model is (instruct or base, which quantisation): every figure below it
    is about that checkpoint, not the original full-precision model."""
    from sparsekd_core.report import flow_header

    args = ({"protocol": "paper", "ctx": 512, "stride": 256}, [], {"data": "d", "num_samples": 1, "seq_len": 2,
                                                                  "top_k": 3}, {})
    assert "SmolLM2-135M-Instruct (Q4_1" in flow_header("compare", "smollm2-135m", 0, *args)
    assert "Gemma 3 270M base (Q4_K_M" in flow_header("dense-kd", "gemma3-270m", 0, *args)
    assert "Model:" not in flow_header("dense-kd", "/some/dir", 0, *args)
