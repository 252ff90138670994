"""End to end on real servers: a Prefect server and an MLflow server, each on its own PostgreSQL database (as
docker/compose.yaml runs them in production), and a process worker, all on localhost.

What a user does, in order: start the servers, apply the deployments (`python -m deployments.setup`), start a
worker on the pool, press Run in the Prefect UI (the same POST /deployments/{id}/create_flow_run the UI sends),
and find the results in MLflow. Then a schedule on the multi-seed deployment fires and its seeds fan out as one
deployment run each on the same pool. Headless Chromium loads both UIs and saves screenshots as test artifacts
(``test-artifacts/e2e/``, not in git). Everything runs on a tiny random model and corpus.

Marked ``e2e``: it runs in the default test command (CI), ~2-4 minutes on 2 cores; `-m "not e2e"` leaves it out.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from conftest import make_flow_project

pytestmark = [pytest.mark.e2e, pytest.mark.filterwarnings("ignore")]

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = Path(os.environ.get("SPARSEKD_TEST_ARTIFACTS", ROOT / "test-artifacts" / "e2e"))
FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float = 240) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[:4]} exited {proc.returncode}:\n{_tail(log)}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise TimeoutError(f"{url} not up after {timeout} s:\n{_tail(log)}")


def _tail(path: Path, n: int = 4000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else "(no log)"


PG = dict(host=os.environ.get("SPARSEKD_TEST_PGHOST", "127.0.0.1"),
          port=int(os.environ.get("SPARSEKD_TEST_PGPORT", "5432")),
          user=os.environ.get("SPARSEKD_TEST_PGUSER", "postgres"))


class Databases:
    """Two PostgreSQL databases, one per server, as docker/compose.yaml runs them in production; created for the
    test and dropped after (trust auth on the project machines' local server)."""

    def __init__(self):
        import psycopg2

        self.psycopg2 = psycopg2
        tag = f"{os.getpid()}_{int(time.time())}"
        self.names = {"prefect": f"sparsekd_e2e_prefect_{tag}", "mlflow": f"sparsekd_e2e_mlflow_{tag}"}
        try:
            self._admin([f'CREATE DATABASE "{name}"' for name in self.names.values()])
        except psycopg2.OperationalError as err:
            pytest.fail(f"PostgreSQL at {PG['host']}:{PG['port']} is not reachable ({str(err).strip()}); the "
                        "project machines run it (see DEVELOPERS.md)")

    def _admin(self, statements: list[str]) -> None:
        conn = self.psycopg2.connect(dbname="postgres", **PG)
        conn.autocommit = True  # CREATE/DROP DATABASE cannot run inside a transaction
        try:
            with conn.cursor() as cur:
                for statement in statements:
                    cur.execute(statement)
        finally:
            conn.close()

    def url(self, server: str, driver: str) -> str:
        return f"postgresql+{driver}://{PG['user']}@{PG['host']}:{PG['port']}/{self.names[server]}" \
            if driver else f"postgresql://{PG['user']}@{PG['host']}:{PG['port']}/{self.names[server]}"

    def drop(self) -> None:
        self._admin([f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)' for name in self.names.values()])


class Stack:
    """The processes of one local stack; stop() ends each process group, worker first."""

    def __init__(self, base: Path, db: Databases):
        self.base = base
        self.db = db
        self.procs: dict[str, tuple[subprocess.Popen, Path]] = {}
        self.prefect_port, self.mlflow_port = _free_port(), _free_port()
        self.api = f"http://127.0.0.1:{self.prefect_port}/api"
        self.mlflow = f"http://127.0.0.1:{self.mlflow_port}"
        self.storage = base / "storage"
        self.env = {**os.environ,
                    "PREFECT_HOME": str(base / "prefect-home"),
                    "PREFECT_API_URL": self.api,
                    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                    "PREFECT_API_DATABASE_CONNECTION_URL": db.url("prefect", "asyncpg"),
                    "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "2",
                    "PREFECT_WORKER_QUERY_SECONDS": "2",
                    "PREFECT_LOGGING_LEVEL": "INFO",
                    "MLFLOW_TRACKING_URI": self.mlflow,
                    "SPARSEKD_STORAGE_ROOT": str(self.storage),
                    "SPARSEKD_GPU_SLOT": "gpu-e2e-0",
                    "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}

    def start(self, name: str, args: list[str]) -> subprocess.Popen:
        log = self.base / f"{name}.log"
        proc = subprocess.Popen([sys.executable, "-m", *args], cwd=self.base, env=self.env, stdout=open(log, "w"),
                                stderr=subprocess.STDOUT, start_new_session=True)
        self.procs[name] = (proc, log)
        return proc

    def log(self, name: str) -> str:
        return _tail(self.procs[name][1])

    def stop(self) -> None:
        for name in ("worker", "mlflow", "prefect"):
            if name in self.procs:
                proc, _ = self.procs[name]
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGTERM)
                    try:
                        proc.wait(30)
                    except subprocess.TimeoutExpired:
                        os.killpg(proc.pid, signal.SIGKILL)
                        proc.wait(10)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    base = tmp_path_factory.mktemp("e2e")
    db = Databases()
    s = Stack(base, db)
    try:
        prefect = s.start("prefect", ["prefect", "server", "start", "--host", "127.0.0.1",
                                      "--port", str(s.prefect_port)])
        mlflow = s.start("mlflow", ["mlflow", "server", "--backend-store-uri", db.url("mlflow", ""),
                                    "--artifacts-destination", str(base / "mlartifacts"), "--host", "127.0.0.1",
                                    "--port", str(s.mlflow_port), "--workers", "1"])
        _wait_http(f"{s.api}/health", prefect, base / "prefect.log")
        _wait_http(f"{s.mlflow}/health", mlflow, base / "mlflow.log")
        setup = subprocess.run([sys.executable, "-m", "deployments.setup", "--gpu-slots", "gpu-e2e-0"], cwd=ROOT,
                               env=s.env, capture_output=True, text=True, timeout=300)
        assert setup.returncode == 0, setup.stdout + setup.stderr
        s.setup_output = setup.stdout
        s.start("worker", ["prefect", "worker", "start", "--pool", "sparsekd-gpu", "--type", "process",
                           "--name", "e2e-worker"])
        yield s
    finally:
        s.stop()
        db.drop()
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        for name in ("prefect", "mlflow", "worker"):
            if (base / f"{name}.log").exists():
                shutil.copy(base / f"{name}.log", ARTIFACTS / f"{name}.log")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = make_flow_project(tmp_path_factory.mktemp("e2e-data"))
    # No `workdir`, no `tracking_uri`: the worker's $SPARSEKD_STORAGE_ROOT and $MLFLOW_TRACKING_URI decide.
    return {"model": str(root / "model"),
            "corpus": {"data": str(root / "corpus.jsonl"), "num_samples": 8, "seq_len": 32, "top_k": 8},
            "distill": {"max_steps": 4, "batch_size": 2, "eval_every": 2, "checkpoint_every": 2, "lr": 1e-3,
                        "val_tokens": 256, "val_ctx": 64},
            "eval": {"ctx": 32, "stride": 16},
            "eval_sets": [{"name": "text", "data": str(root / "eval.txt"), "max_tokens": 200}]}


def _client(stack: Stack):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    class _Ctx:
        def __enter__(self):
            self.settings = temporary_settings({PREFECT_API_URL: stack.api})
            self.settings.__enter__()
            self.client = get_client(sync_client=True)
            return self.client.__enter__()

        def __exit__(self, *exc):
            self.client.__exit__(*exc)
            self.settings.__exit__(*exc)

    return _Ctx()


def _wait_flow_run(stack: Stack, flow_run_id: str, timeout: float = 900) -> dict:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:  # under load (seeds running on 2 cores) the server can answer slowly: poll again
            fr = httpx.get(f"{stack.api}/flow_runs/{flow_run_id}", timeout=30).json()
        except httpx.TimeoutException:
            continue
        if fr.get("state_type") in FINAL:
            return fr
        assert stack.procs["worker"][0].poll() is None, f"worker died:\n{stack.log('worker')}"
        time.sleep(2)
    raise TimeoutError(f"flow run {flow_run_id} not finished after {timeout} s:\n{stack.log('worker')}")


def _mlflow_runs_of(stack: Stack, experiment: str, flow_run_id: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(stack.mlflow)
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no MLflow experiment {experiment!r} on the server"
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.prefect_flow_run_id = '{flow_run_id}'")
    parents = [r for r in runs if r.data.tags.get("mlflow.parentRunId") is None or r.data.tags.get("flow") == "multi-seed"]
    return client, exp, runs, parents


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def _browse(url: str, screenshot: Path) -> str:
    """Load ``url`` in headless Chromium (scripts run), save a screenshot, return the rendered DOM."""
    exe = _chromium()
    if exe is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed (.ci/run installs Debian's `chromium`)")
        pytest.skip("chromium not installed here (apt-get install chromium); CI installs it and runs this check")
    flags = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             "--disable-background-networking", "--no-first-run", "--hide-scrollbars", "--window-size=1400,1000",
             "--virtual-time-budget=20000", f"--user-data-dir={screenshot.parent / '.chromium'}"]
    screenshot.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([*flags, f"--screenshot={screenshot}", url], capture_output=True, timeout=120)
    dom = subprocess.run([*flags, "--dump-dom", url], capture_output=True, text=True, timeout=120).stdout
    (screenshot.with_suffix(".html")).write_text(dom)
    return dom


def _image_sources(markdown: str) -> list[str]:
    """The source of every Markdown image, in order."""
    import re

    return re.findall(r"!\[[^\]]*\]\(([^)\s]+)\)", markdown)


def _img_sources(dom: str) -> set[str]:
    """The src of every <img> in a rendered DOM (as the page holds it, entities decoded)."""
    import html
    import re

    return {html.unescape(src) for src in re.findall(r"<img\b[^>]*?\bsrc=\"([^\"]*)\"", dom)}


def _load_png(src: str) -> bytes:
    """The image a browser gets for ``src``: an http(s) URL is fetched (200), a data: URI decoded; a PNG."""
    import base64

    import httpx

    if src.startswith(("http://", "https://")):
        response = httpx.get(src, timeout=30)
        assert response.status_code == 200, f"{src}: HTTP {response.status_code}"
        body = response.content
    else:
        assert src.startswith("data:image/png;base64,"), f"not an absolute image source: {src[:80]}"
        body = base64.b64decode(src.split(",", 1)[1], validate=True)
    assert body.startswith(b"\x89PNG\r\n\x1a\n"), f"{src[:80]}: not a PNG"
    return body


# ------------------------------------------------------------------------------------------------------------ tests


def test_ui_run_button_to_worker_to_mlflow(stack, tiny):
    import httpx

    assert "dense-kd/dense-kd-gpu" in stack.setup_output and "multi-seed/multi-seed-gpu" in stack.setup_output
    dep = httpx.get(f"{stack.api}/deployments/name/dense-kd/dense-kd-gpu", timeout=30).json()
    # What the UI's Run button sends (custom parameters from the form).
    resp = httpx.post(f"{stack.api}/deployments/{dep['id']}/create_flow_run",
                      json={"parameters": {"config": {**tiny, "ce_control": True}}, "state": {"type": "SCHEDULED"}},
                      timeout=30)
    assert resp.status_code == 201, resp.text
    flow_run = resp.json()
    fr = _wait_flow_run(stack, flow_run["id"])
    assert fr["state_type"] == "COMPLETED", f"{fr['state_type']}: {fr['state']['message']}\n{stack.log('worker')}"
    assert fr["work_pool_name"] == "sparsekd-gpu"

    # Results are in the MLflow *server* (its artifact store), nested under one parent run.
    client, exp, runs, parents = _mlflow_runs_of(stack, "sparsekd-dense-kd", flow_run["id"])
    assert len(parents) == 1
    # The experiment opens on MLflow's training-runs view, not the GenAI overview, and names what ran in it.
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    assert exp.tags["sparsekd.flow"] == "dense-kd" and exp.tags["sparsekd.config_digest"]
    parent = parents[0]
    children = client.search_runs([exp.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert {c.data.tags["arm"] for c in children} == {"dense", "dense+kd", "ce-only"}
    for key in ("ppl_dense_text", "ppl_dense_kd_text", "ppl_ce_only_text"):
        assert parent.data.metrics[key] > 1, key
    kd = next(c for c in children if c.data.tags["arm"] == "dense+kd")
    assert [m.step for m in client.get_metric_history(kd.info.run_id, "val_ppl")]  # the recovery curve
    names = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert "report/report.md" in names and "report/config.json" in names
    served = list((stack.base / "mlartifacts").rglob("report.md"))
    assert served, "the report did not reach the MLflow server's artifact store"
    assert "Dense+KD vs its CE-only twin" in served[0].read_text()
    # Its plots show where it is read: MLflow's copy (fetched as the UI's preview fetches it) links the server's URL
    # of each plot, the Prefect artifact carries them inside; no source is a bare file name; each loads as a PNG,
    # the same in both.
    mlflow_md = httpx.get(f"{stack.mlflow}/get-artifact", timeout=30,
                          params={"path": "report/report.md", "run_uuid": parent.info.run_id}).text
    [report_artifact] = httpx.post(f"{stack.api}/artifacts/filter", timeout=30, json={"artifacts": {
        "flow_run_id": {"any_": [flow_run["id"]]}, "key": {"any_": ["dense-kd-report"]}}}).json()
    mlflow_plots, prefect_plots = _image_sources(mlflow_md), _image_sources(report_artifact["data"])
    assert mlflow_plots and all(s.startswith(f"{stack.mlflow}/get-artifact?") for s in mlflow_plots), mlflow_plots
    assert len(prefect_plots) == len(mlflow_plots) and all(s.startswith("data:image/png") for s in prefect_plots)
    assert [_load_png(s) for s in mlflow_plots] == [_load_png(s) for s in prefect_plots]
    # ... and a browser renders them: an <img> with each source is on both pages.
    prefect_page = _browse(f"http://127.0.0.1:{stack.prefect_port}/artifacts/artifact/{report_artifact['id']}",
                           ARTIFACTS / "prefect-report-artifact.png")
    assert set(prefect_plots) <= _img_sources(prefect_page), "the Prefect artifact page shows no plot"
    mlflow_page = _browse(f"{stack.mlflow}/#/experiments/{exp.experiment_id}/runs/{parent.info.run_id}/artifacts/"
                          "report/report.md", ARTIFACTS / "mlflow-report.png")
    assert set(mlflow_plots) <= _img_sources(mlflow_page), "MLflow's preview of report.md shows no plot"
    # The Dense+KD student is in the server's Model Registry with its lineage (no weights uploaded).
    version = client.get_latest_versions("sparsekd-dense-kd-dense-kd")[0]
    assert version.run_id == kd.info.run_id and version.tags["sparsekd.weights_uploaded"] == "False"
    assert version.tags["sparsekd.checkpoint_path"].startswith(str(stack.storage))
    # The version is an MLflow model: its source has an MLmodel, and it loads from the registry and generates.
    import mlflow

    assert "model/MLmodel" in {a.path for a in client.list_artifacts(version.run_id, "model")}
    mlmodel = httpx.get(f"{stack.mlflow}/model-versions/get-artifact", timeout=30,  # what the version page asks
                        params={"path": "MLmodel", "name": version.name, "version": version.version})
    assert mlmodel.status_code == 200 and "python_function" in mlmodel.text, mlmodel.text[:500]
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MLFLOW_TRACKING_URI", stack.mlflow)
        texts = mlflow.pyfunc.load_model(f"models:/{version.name}/{version.version}").predict(
            ["The capital of France is"])
    assert len(texts) == 1 and isinstance(texts[0], str), texts
    assert parent.data.tags["prefect_flow_run_id"] == flow_run["id"]
    assert parent.data.tags["prefect_flow_run_url"].startswith(f"http://127.0.0.1:{stack.prefect_port}/")
    # The stages wrote under the worker's storage root, and held the worker's GPU slot.
    assert list(stack.storage.glob("distill/*/manifest.json"))
    gcl = httpx.get(f"{stack.api}/v2/concurrency_limits/gpu-e2e-0", timeout=30).json()
    assert gcl["limit"] == 1 and gcl["active_slots"] == 0

    # The two UIs, rendered by a real browser: the run's name is on both pages.
    from tasks.tracking import Tracker

    links = Tracker(stack.mlflow, "sparsekd-dense-kd")
    mlflow_dom = _browse(links.run_url(parent.info.run_id), ARTIFACTS / "mlflow-run.png")
    assert parent.info.run_name in mlflow_dom, "MLflow UI page does not show the run"
    # The experiment's page, as sparsekd links it, opens on the runs table, not on the GenAI traces overview
    # (which MLflow 3.17 shows by default whatever the experiment's kind tag says).
    experiment_dom = _browse(links.ui_url(f"/experiments/{exp.experiment_id}"), ARTIFACTS / "mlflow-experiment.png")
    assert parent.info.run_name in experiment_dom and "Detect Issues" not in experiment_dom
    models_dom = _browse(f"{stack.mlflow}/#/models", ARTIFACTS / "mlflow-models.png")
    assert "sparsekd-dense-kd-dense-kd" in models_dom, "MLflow's Models page does not list the registered student"
    prefect_dom = _browse(f"http://127.0.0.1:{stack.prefect_port}/runs/flow-run/{flow_run['id']}",
                          ARTIFACTS / "prefect-flow-run.png")
    assert flow_run["name"] in prefect_dom, "Prefect UI page does not show the flow run"


def test_scheduled_multi_seed_fans_out_on_the_pool(stack, tiny):
    import httpx
    from prefect.client.schemas.schedules import IntervalSchedule

    dep = httpx.get(f"{stack.api}/deployments/name/multi-seed/multi-seed-gpu", timeout=30).json()
    assert [s["active"] for s in dep["schedules"]] == [False]  # the weekly rerun ships paused
    params = {"config": {"seeds": [7, 8], "fan_out": "deployments", "pool": "gpu",
                         "config": {"flow": "dense-kd", **tiny, "ce_control": False}}}
    start = datetime.now(timezone.utc) + timedelta(seconds=5)
    with _client(stack) as client:
        client.create_deployment_schedules(dep["id"], [(IntervalSchedule(interval=timedelta(hours=1),
                                                                         anchor_date=start), True)],
                                           parameters=params)
    # The server's scheduler makes the run; the worker picks it up when it is due.
    deadline, flow_run = time.monotonic() + 120, None
    while flow_run is None and time.monotonic() < deadline:
        try:
            found = httpx.post(f"{stack.api}/flow_runs/filter", timeout=30, json={
                "deployments": {"id": {"any_": [dep["id"]]}}, "sort": "EXPECTED_START_TIME_ASC", "limit": 5}).json()
        except httpx.TimeoutException:
            continue
        flow_run = found[0] if found else None
        time.sleep(2)
    assert flow_run is not None, f"the scheduler made no run:\n{stack.log('prefect')[-2000:]}"
    assert flow_run["auto_scheduled"] and "auto-scheduled" in flow_run["tags"]
    fr = _wait_flow_run(stack, flow_run["id"])
    assert fr["state_type"] == "COMPLETED", f"{fr['state_type']}: {fr['state']['message']}\n{stack.log('worker')}"

    # One dense-kd deployment run per seed, on the same pool, each Completed.
    inner = httpx.get(f"{stack.api}/deployments/name/dense-kd/dense-kd-gpu", timeout=30).json()
    seeds = httpx.post(f"{stack.api}/flow_runs/filter", timeout=30, json={
        "deployments": {"id": {"any_": [inner["id"]]}}, "flow_runs": {"tags": {"all_": ["multi-seed"]}}}).json()
    assert sorted(r["name"] for r in seeds) == ["dense-kd-seed7", "dense-kd-seed8"]
    assert {r["state_type"] for r in seeds} == {"COMPLETED"}
    assert {r["work_pool_name"] for r in seeds} == {"sparsekd-gpu"}
    # The two seeds ran at the same time (as two workers would), both logging to the PostgreSQL-backed MLflow.
    spans = sorted((datetime.fromisoformat(r["start_time"]), datetime.fromisoformat(r["end_time"])) for r in seeds)
    assert spans[1][0] < spans[0][1], f"the seeds did not overlap: {spans}"

    # MLflow: the multi-seed parent with mean ± std, the seeds' runs nested under it.
    client, exp, runs, parents = _mlflow_runs_of(stack, "sparsekd-multi-seed", flow_run["id"])
    parent = parents[0]
    assert parent.data.metrics["ppl_dense_kd_text_mean"] > 1
    assert parent.data.metrics["ppl_dense_kd_text_std"] >= 0
    nested = client.search_runs([exp.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(r.data.tags["seed"] for r in nested) == ["7", "8"]
    report = client.download_artifacts(parent.info.run_id, "report/report.md", str(stack.base))
    assert "one deployment run per seed on the work pool" in Path(report).read_text()


def test_custom_run_form_shows_typed_fields(stack):
    """Deployments → cascade-gpu → Run → Custom run: the form has typed fields for the distillation, pruning and
    evaluation settings, with the default eval sets filled in (rendered by Chromium, screenshot kept)."""
    import httpx

    dep = httpx.get(f"{stack.api}/deployments/name/cascade/cascade-gpu", timeout=30).json()
    dom = _browse(f"http://127.0.0.1:{stack.prefect_port}/deployments/deployment/{dep['id']}/run",
                  ARTIFACTS / "prefect-custom-run-form.png")
    for label in ("Alpha", "Temperature", "Tail", "Lr", "Max Steps", "Method", "Schedule", "Eval Sets"):
        assert label in dom, f"{label!r} is not in the Custom Run form"
    assert "c4_heldout" in dom  # the default eval sets are visible, not applied behind the user's back


BUTTON = "[...document.querySelectorAll('button')].find(b => b.textContent.trim() === {text!r})"
# The form validates on Submit with POST /api/ui/schemas/validate (XHR); keep the answers to report a refusal.
RECORD_VALIDATIONS = """window.__validations = []; (function () {
  const send = XMLHttpRequest.prototype.send;
  XMLHttpRequest.prototype.send = function (body) {
    this.addEventListener('load', () => { if (this.responseURL.includes('schemas/validate'))
      window.__validations.push(this.responseText.slice(0, 3000)); });
    return send.call(this, body);
  };
})(); true"""
# The "Run Name" box: the first text input of the form, filled with a generated name such as "zeta-sirius".
RUN_NAME = "document.querySelector('input:not([type]), input[type=text]').value"
LABELS = ("[...document.querySelectorAll('label')].map(l => l.textContent.trim().replace(/ \\(Optional\\)$/, ''))"
          ".filter(Boolean)")


def _field_titles(cls, n: int) -> list[str]:
    """The first ``n`` field labels of a config as the form titles them ("max_steps" → "Max Steps")."""
    return [info.title or name.replace("_", " ").title() for name, info in list(cls.model_fields.items())[:n]]


def test_every_custom_run_form_submits_as_it_opens(stack):
    """Deployments → each deployment → Run → Custom run → Submit, in a real browser, changing nothing: the UI
    creates the run (the server validated the parameters against the stored schema), the flow's own validation
    accepts them (what the engine runs first on the worker), and the form lists the flow's first fields in their
    declared order (the server stores the schema as JSONB, which reorders keys). The pool is paused meanwhile so
    that the worker does not start full-size runs of the defaults; the runs are deleted after."""
    import httpx

    from browser import Browser

    from flows.configs import FLOW_CONFIGS
    from flows.registry import ALL_FLOWS

    exe = _chromium()
    if exe is None:
        _browse("about:blank", ARTIFACTS / "unused.png")  # fails in CI, skips here, with the reason
    deployments = httpx.post(f"{stack.api}/deployments/filter", json={}, timeout=30).json()
    flows = {f["id"]: f["name"] for f in httpx.post(f"{stack.api}/flows/filter", json={}, timeout=30).json()}
    assert sorted(flows[d["flow_id"]] for d in deployments) == sorted(ALL_FLOWS)
    httpx.patch(f"{stack.api}/work_pools/sparsekd-gpu", json={"is_paused": True}, timeout=30).raise_for_status()
    created, problems = [], []
    try:
        with Browser(exe, stack.base / "chromium-forms") as browser:
            for dep in deployments:
                flow_name = flows[dep["flow_id"]]
                browser.goto(f"http://127.0.0.1:{stack.prefect_port}/deployments/deployment/{dep['id']}/run")
                browser.wait_for(BUTTON.format(text="Submit") + " !== undefined")
                time.sleep(1)  # the form's sections render after the button
                labels = browser.eval(LABELS)
                browser.screenshot(ARTIFACTS / "forms" / f"{dep['name']}.png")
                fields = labels[labels.index("config") + 1:]
                expected = _field_titles(FLOW_CONFIGS[flow_name], 3)
                if flow_name == "multi-seed":  # its first field is the inner flow's tab, then that flow's fields
                    expected = ["Config", "Flow", "Model"]
                if fields[:3] != expected:
                    problems.append(f"{dep['name']}: the form starts {fields[:3]}, the flow declares {expected}")
                run_name = browser.eval(RUN_NAME)  # the form's generated name: how the created run is found
                before = browser.eval("location.href")
                browser.eval(RECORD_VALIDATIONS)
                browser.eval(BUTTON.format(text="Submit") + ".click()")
                try:
                    browser.wait_for(f"location.href !== {before!r}", timeout=30)
                except TimeoutError:  # the form refused: the server's answer to its validation says why
                    problems.append(f"{dep['name']}: Submit refused: {browser.eval('window.__validations')}")
                    continue
                runs = httpx.post(f"{stack.api}/flow_runs/filter", timeout=30, json={
                    "deployments": {"id": {"any_": [dep["id"]]}},
                    "flow_runs": {"name": {"any_": [run_name]}}}).json()
                if not runs:
                    problems.append(f"{dep['name']}: Submit created no run")
                    continue
                created.append(runs[0]["id"])
                try:
                    submitted = ALL_FLOWS[flow_name].validate_parameters(runs[0]["parameters"])["config"]
                except Exception as err:  # what the worker would fail the run with
                    problems.append(f"{dep['name']}: {type(err).__name__}: {str(err)[:600]}")
                    continue
                # Unchanged means unchanged: the run is the deployment's own defaults (a form whose toggle turned
                # `whiten: None` into false would pass validation and prune differently).
                default = ALL_FLOWS[flow_name].validate_parameters(dep["parameters"])["config"]
                if submitted.model_dump() != default.model_dump():
                    diff = {k: (v, default.model_dump()[k]) for k, v in submitted.model_dump().items()
                            if v != default.model_dump()[k]}
                    problems.append(f"{dep['name']}: the form submitted other settings than the defaults: {diff}")
    finally:
        for run_id in created:
            httpx.delete(f"{stack.api}/flow_runs/{run_id}", timeout=30)
        httpx.patch(f"{stack.api}/work_pools/sparsekd-gpu", json={"is_paused": False}, timeout=30)
    assert not problems, "\n".join(problems)
    assert len(created) == len(deployments)
