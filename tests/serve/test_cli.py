"""`dsv3 serve models:/NAME@ALIAS` as a user runs it: a subprocess resolving a registered model
version through MLflow (real SQLite store), logging the URI and version, answering the official
client; bad flags are refused with the field named."""

import os
import re
import signal
import subprocess
import sys

import openai


def _register(model_dir, tmp_path):
    from mlflow.tracking import MlflowClient

    from dsv3 import tracking

    with tracking.start_run({"x": 1}, stage="posttrain"):
        version = tracking.register_model(model_dir, "tiny-chat")
    MlflowClient(tracking.tracking_uri()).set_registered_model_alias("tiny-chat", "champion", version)
    return version


def test_serve_registered_alias(tiny_dir, tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path}/mlruns.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    version = _register(tiny_dir, tmp_path)
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "dsv3.cli", "serve", "models:/tiny-chat@champion", "--port", "0",
                             "--threads", "1", "--set", "block_size=8", "--set", "cache_tokens=2048"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=tmp_path)
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if "listening on" in line:
                break
        head = "".join(lines)
        m = re.search(r"listening on (http://127\.0\.0\.1:\d+)", head)
        assert m, head
        assert f"models:/tiny-chat@champion as `tiny-chat`: tiny-chat version {version}" in head
        c = openai.OpenAI(base_url=m.group(1) + "/v1", api_key="unused", max_retries=0, timeout=60)
        assert [x.id for x in c.models.list().data] == ["tiny-chat"]
        r = c.completions.create(model="tiny-chat", prompt="Hello", max_tokens=3, temperature=0)
        assert r.usage.completion_tokens >= 1
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_bad_flags_name_the_field(tiny_dir, capsys):
    from dsv3.cli import main

    assert main(["serve", str(tiny_dir), "--set", "max_batch=0"]) == 2
    assert "serve.max_batch" in capsys.readouterr().err
    assert main(["serve", str(tiny_dir), "--set", "nonsense=1"]) == 2
    assert "serve.nonsense" in capsys.readouterr().err
