"""`make screenshots`: PNGs of the MLflow and Prefect UIs for the README (docs/img/).

    python infra/screenshots.py [--out docs/img] [--mlflow-run RUN_ID] [--flow-run ID] [--model dsv3-chat]

Starts `mlflow server` on the project's store ($MLFLOW_TRACKING_URI, else sqlite:///mlruns.db)
and `prefect server start --no-services` (read-only UI on Prefect's database, $PREFECT_HOME) on
127.0.0.1 free ports with bounded starts, drives headless Chromium (Debian's `chromium`) through
the DevTools protocol (no Node, no Playwright: `websockets`, which Prefect already needs), and
always stops all three. Pages, each waited for until its data is on screen:

- `mlflow-compare.png`: MLflow's run comparison of the newest lifecycle run's stage runs (the
  leaves under the run tagged `stage=lifecycle`; until one exists, under the newest top-level run
  that has children), in the model-training view (`?workflowType=machine_learning`, see
  `dsv3.tracking.experiment_url`), visualisations and parameters folded so the metrics show.
- `mlflow-registry.png`: the registered model `dsv3-chat` with its versions and aliases
  (else the registered-models list).
- `prefect-flow-run.png`: the Prefect flow-run graph of the newest `lifecycle` flow run (else the
  newest top-level flow run). The graph is WebGL: software-rendered (SwiftShader), no GPU.

A page whose data does not appear within the time limit fails the script (exit 1) rather than
saving a blank or loading page.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from servers import free_port, serving_all, stop_group  # noqa: E402

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[1]
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
                  "--use-angle=swiftshader", "--enable-unsafe-swiftshader"]  # WebGL in software
CLOSE_ASSISTANT = """(() => { const b = document.querySelector('[data-component-id="mlflow.assistant.chat_panel.close"]');
  if (b) b.click(); return true; })()"""
FOLD = """((titles) => { for (const t of titles) { const w = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
  let n; while ((n = w.nextNode())) { if (n.nodeValue.trim() === t) { n.parentElement.click(); break; } } } return true; })"""


class Page:
    """One headless Chromium tab driven over the DevTools protocol."""

    def __init__(self, tmp: Path, width: int = 1400, timeout: float = 60.0):
        from websockets.sync.client import connect

        port = free_port()
        self.proc = subprocess.Popen([shutil.which("chromium") or "chromium", *CHROMIUM_FLAGS,
                                      f"--user-data-dir={tmp}", f"--remote-debugging-port={port}",
                                      "--remote-debugging-address=127.0.0.1", "about:blank"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=2) as r:
                    tab = next(t for t in json.load(r) if t["type"] == "page")
                break
            except (OSError, StopIteration, ValueError):
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    self.close()
                    raise RuntimeError("chromium did not start (is the Debian package `chromium` installed?)")
                time.sleep(0.3)
        self.ws, self.n, self.timeout, self.width = connect(tab["webSocketDebuggerUrl"], max_size=None), 0, timeout, width

    def call(self, method: str, **params):
        self.n += 1
        self.ws.send(json.dumps({"id": self.n, "method": method, "params": params}))
        while True:  # events in between are not needed
            m = json.loads(self.ws.recv(timeout=self.timeout))
            if m.get("id") == self.n:
                if "error" in m:
                    raise RuntimeError(f"{method}: {m['error']}")
                return m["result"]

    def js(self, expr: str):
        return self.call("Runtime.evaluate", expression=expr, returnByValue=True).get("result", {}).get("value")

    def shot(self, url: str, out: Path, texts: list[str], ready_js: str = "true", actions: list[str] = (),
             settle: float = 1.5, height: int = 900) -> None:
        """Open `url` in a `width` x `height` window, wait until every one of `texts` is on the page
        and `ready_js` holds, run `actions`, let it settle, save the window as a PNG."""
        self.call("Emulation.setDeviceMetricsOverride", width=self.width, height=height, deviceScaleFactor=1, mobile=False)
        self.call("Page.navigate", url=url)
        deadline, body = time.monotonic() + self.timeout, ""
        while time.monotonic() < deadline:
            body = self.js("document.body ? document.body.innerText : ''") or ""
            if all(t in body for t in texts) and self.js(ready_js):
                break
            time.sleep(0.5)
        else:
            raise RuntimeError(f"{url}: {texts} not on the page within {self.timeout:.0f} s; it shows:\n{body[:800]}")
        for a in actions:
            self.js(a)
        time.sleep(settle)
        data = self.call("Page.captureScreenshot", format="png")["data"]
        out.write_bytes(base64.b64decode(data))
        print(f"saved {out} ({url})")

    def close(self) -> None:
        if getattr(self, "ws", None):
            self.ws.close()
        stop_group(self.proc.pid, grace=5)
        self.proc.wait(timeout=10)


def _store_uri() -> str:
    uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{REPO / 'mlruns.db'}"
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        raise RuntimeError(f"no MLflow store at {uri}: run `make lifecycle` (or another flow) first")
    return uri


def stage_runs(client, run_id: str | None) -> tuple[object, list]:
    """(the lifecycle run, its leaf runs in start order, at most 10)."""
    exps = [e.experiment_id for e in client.search_experiments()]
    if run_id:
        root = client.get_run(run_id)
    else:
        # the newest lifecycle run that ran stages (a fully cached rerun has none under it), else the newest
        # top-level run with children
        found = client.search_runs(exps, "tags.stage = 'lifecycle'", order_by=["attributes.start_time DESC"], max_results=50)
        tops = found or [r for r in client.search_runs(exps, order_by=["attributes.start_time DESC"], max_results=200)
                         if "mlflow.parentRunId" not in r.data.tags]
        root = next((r for r in tops if client.search_runs(
            [r.info.experiment_id], f"tags.mlflow.parentRunId = '{r.info.run_id}'", max_results=1)), None)
    if root is None:
        raise RuntimeError("no MLflow run with stage runs under it: run `make lifecycle` first")
    leaves, todo = [], [root]
    while todo:
        r = todo.pop()
        kids = client.search_runs([r.info.experiment_id], f"tags.mlflow.parentRunId = '{r.info.run_id}'", max_results=200)
        todo += kids
        if not kids and r is not root:
            leaves.append(r)
    if not leaves:
        raise RuntimeError(f"MLflow run {root.info.run_id} has no stage runs under it (a fully cached lifecycle run?)")
    return root, sorted(leaves, key=lambda r: r.info.start_time)[:10]


def latest_flow_run(api: str, flow_run: str | None) -> dict:
    def post(path: str, body: dict):
        req = urllib.request.Request(f"{api}{path}", json.dumps(body).encode(), {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.load(r)

    if flow_run:
        with urllib.request.urlopen(f"{api}/flow_runs/{flow_run}", timeout=30) as r:
            return json.load(r)
    top = {"parent_task_run_id": {"is_null_": True}}
    for flows in ({"name": {"any_": ["lifecycle"]}}, None):
        body = {"sort": "START_TIME_DESC", "limit": 1, "flow_runs": top, **({"flows": flows} if flows else {})}
        if runs := post("/flow_runs/filter", body):
            return runs[0]
    raise RuntimeError(f"no flow run in the Prefect database behind {api}: run `make lifecycle` first")


@contextmanager
def servers(state: Path, timeout: float):
    """The MLflow and Prefect servers on loopback; yields their base URLs."""
    mp, pp = free_port(), free_port()
    mlflow_url, prefect_url = f"http://127.0.0.1:{mp}", f"http://127.0.0.1:{pp}"
    penv = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_UI_API_URL": f"{prefect_url}/api",
            "PREFECT_SERVER_UI_API_URL": f"{prefect_url}/api"}
    with serving_all([
        {"cmd": [str(BIN / "mlflow"), "server", "--backend-store-uri", _store_uri(), "--host", "127.0.0.1",
                 "--port", str(mp), "--workers", "1", "--default-artifact-root", str(REPO / "mlartifacts")],
         "url": f"{mlflow_url}/health", "log": state / "mlflow.log", "what": "mlflow server"},
        {"cmd": [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(pp), "--no-services"],
         "url": f"{prefect_url}/api/health", "log": state / "prefect.log", "env": penv, "what": "prefect server"},
    ], timeout):
        yield mlflow_url, prefect_url


def take(out: Path, mlflow_run: str | None, flow_run: str | None, model: str, timeout: float) -> list[Path]:
    from mlflow import MlflowClient

    from dsv3.tracking import experiment_url

    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="dsv3-shots-"))
    saved = []
    try:
        with servers(tmp, timeout) as (mlflow_url, prefect_url):
            client = MlflowClient(mlflow_url)
            root, leaves = stage_runs(client, mlflow_run)
            fr = latest_flow_run(f"{prefect_url}/api", flow_run)
            page = Page(tmp / "chromium")
            try:
                ids = [r.info.run_id for r in leaves]
                exps = sorted({r.info.experiment_id for r in leaves})
                base = experiment_url(mlflow_url, exps[0]).split("#")[0]
                url = (f"{base}#/compare-runs?runs={urllib.parse.quote(json.dumps(ids))}"
                       f"&experiments={urllib.parse.quote(json.dumps(exps))}&workflowType=machine_learning")
                page.shot(url, out / "mlflow-compare.png", [leaves[-1].info.run_name, "Metrics"],
                          actions=[CLOSE_ASSISTANT, FOLD + '(["Visualizations", "Parameters", "Artifacts"])'], height=1050)
                try:
                    client.get_registered_model(model)
                    url, texts = f"{base}#/models/{model}?workflowType=machine_learning", [model, "Version 1"]
                except Exception:  # noqa: BLE001 - no such model yet: the registry list
                    url, texts = f"{base}#/models?workflowType=machine_learning", ["Registered Models"]
                page.shot(url, out / "mlflow-registry.png", texts, actions=[CLOSE_ASSISTANT], height=720)
                page.shot(f"{prefect_url}/runs/flow-run/{fr['id']}", out / "prefect-flow-run.png", [fr["name"]],
                          ready_js="document.querySelectorAll('canvas').length > 0", settle=4.0, height=900)
                saved = [out / n for n in ("mlflow-compare.png", "mlflow-registry.png", "prefect-flow-run.png")]
            finally:
                page.close()
        print(f"MLflow run {root.info.run_id} ({len(leaves)} stage runs); Prefect flow run {fr['name']} ({fr['id']})")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return saved


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python infra/screenshots.py", description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(REPO / "docs" / "img"))
    ap.add_argument("--mlflow-run", default=None, help="the parent run whose stage runs to compare (default: newest lifecycle)")
    ap.add_argument("--flow-run", default=None, help="Prefect flow run id (default: newest lifecycle, else newest)")
    ap.add_argument("--model", default="dsv3-chat", help="registered model to show")
    ap.add_argument("--timeout", type=float, default=240.0, help="seconds each server may take to start")
    a = ap.parse_args(argv)
    try:
        take(Path(a.out), a.mlflow_run, a.flow_run, a.model, a.timeout)
    except RuntimeError as e:
        print(f"screenshots: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
