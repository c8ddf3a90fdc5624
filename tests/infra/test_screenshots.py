"""`make screenshots` for real: infra/screenshots.py starts `mlflow server` and
`prefect server` on loopback, finds the newest lifecycle run in a real MLflow store and the newest
lifecycle flow run in a real Prefect database, and saves PNGs from headless Chromium only once the
pages show that data (the script fails otherwise); the servers and the browser are stopped."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ..dvc_helpers import ENV, ROOT

SHOTS = ROOT / "infra" / "screenshots.py"


def test_screenshots_say_what_to_run_without_a_store(tmp_path):
    r = subprocess.run([sys.executable, str(SHOTS), "--out", str(tmp_path / "img")], capture_output=True, text=True,
                       env={**ENV, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/absent.db"}, timeout=60)
    assert r.returncode == 1 and "no MLflow store" in r.stderr and "make lifecycle" in r.stderr, r.stderr
    assert not (tmp_path / "img").exists() or not any((tmp_path / "img").iterdir())


def _mlflow_store(uri: str, tmp: Path) -> str:
    import mlflow

    c = mlflow.MlflowClient(uri)
    exp = c.create_experiment("dsv3", artifact_location=str(tmp / "art"))
    root = c.create_run(exp, run_name="tiny-lifecycle", tags={"stage": "lifecycle"})
    mid = c.create_run(exp, run_name="pipeline", tags={"stage": "pipeline", "mlflow.parentRunId": root.info.run_id})
    for name, parent, metrics in (("pretrain", mid, {"train/loss": 5.1, "val/bpb": 2.4}),
                                  ("extend", mid, {"train/loss": 4.9, "val/bpb": 2.3}),
                                  ("eval-chat", root, {"eval/mmlu/acc": 0.26, "val/bpb": 2.2})):
        r = c.create_run(exp, run_name=name, tags={"stage": name, "mlflow.parentRunId": parent.info.run_id})
        for k, v in metrics.items():
            c.log_metric(r.info.run_id, k, v)
        c.set_terminated(r.info.run_id)
    c.create_registered_model("dsv3-chat")
    (tmp / "model").mkdir()
    v = c.create_model_version("dsv3-chat", source=str(tmp / "model"), run_id=root.info.run_id)
    c.set_registered_model_alias("dsv3-chat", "champion", v.version)
    return root.info.run_id


FLOW = textwrap.dedent('''
    from prefect import flow, task

    @task
    def stage(name: str) -> str:
        return name

    @flow(name="lifecycle")
    def lifecycle() -> list:
        a = stage("data")
        return [a, stage.submit("pretrain", wait_for=[a]).result()]

    print(lifecycle())
''')


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_make_screenshots_saves_pictures_of_real_runs(tmp_path):
    from PIL import Image, ImageStat

    uri = f"sqlite:///{tmp_path}/mlruns.db"
    root = _mlflow_store(uri, tmp_path)
    env = {**ENV, "MLFLOW_TRACKING_URI": uri, "PREFECT_HOME": str(tmp_path / "prefect"),
           "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "240", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    r = subprocess.run([sys.executable, "-c", FLOW], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "['data', 'pretrain']" in r.stdout, r.stdout + r.stderr
    out = tmp_path / "img"
    r = subprocess.run([sys.executable, str(SHOTS), "--out", str(out)], env=env, capture_output=True, text=True,
                       timeout=560)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"MLflow run {root} (3 stage runs)" in r.stdout, r.stdout  # the leaves: pretrain, extend, eval-chat
    for name, size in (("mlflow-compare", (1400, 1050)), ("mlflow-registry", (1400, 720)), ("prefect-flow-run", (1400, 900))):
        img = Image.open(out / f"{name}.png").convert("L")
        assert img.size == size
        assert ImageStat.Stat(img).stddev[0] > 15 and len(img.getcolors(1 << 16)) > 50, name  # not a blank page
    leftovers = subprocess.run(["pgrep", "-f", str(tmp_path)], capture_output=True, text=True).stdout.split()
    assert not leftovers, leftovers  # servers and browser stopped
