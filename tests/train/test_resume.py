"""Resume gives exactly the losses of an uninterrupted run (CPU, fp32, 1 thread), also after
SIGKILL mid-step; NaN steps are skipped and repeated ones roll back."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from dsv3.train.loop import train
from tests.train.conftest import tiny_cfg


def _losses(run_dir) -> dict[int, float]:
    out = {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if "train/loss" in r:
            out[r["step"]] = r["train/loss"]  # last occurrence wins
    return out


def test_resume_is_bitwise(tiny_shards, tmp_path, mlflow_uri):
    ref = train(tiny_cfg(tiny_shards, tmp_path / "ref"), track=False)
    part = tiny_cfg(tiny_shards, tmp_path / "res", "train.steps=6")
    # "interrupt" after step 3: drop the final checkpoint, so the latest one is step 3
    r1 = train(part, track=False)
    assert r1.checkpoint.endswith("step_00000006")
    shutil.rmtree(Path(r1.checkpoint))
    r2 = train(part, resume=True, track=False)
    a, b = _losses(tmp_path / "ref"), _losses(tmp_path / "res")
    assert sorted(b) == list(range(1, 7))
    assert [a[s] for s in range(1, 7)] == [b[s] for s in range(1, 7)]  # bitwise
    assert ref.final["val/loss"] == r2.final["val/loss"]


def test_resume_after_sigkill(tiny_shards, tmp_path, mlflow_uri):
    steps = ["train.steps=40", "train.ckpt_every=5", "train.eval_every=100"]
    run = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    cmd = [sys.executable, "-m", "dsv3.cli", "pretrain", "--config", "configs/pretrain_tiny.yaml"]
    sets = [f"--set={s}" for s in [f"train.shards={tiny_shards}", f"train.out_dir={run}", "train.plots=false",
                                    "train.register_model=false", "train.log_checkpoints=false", *steps]]
    p = subprocess.Popen(cmd + sets, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and p.poll() is None:
        if metrics.exists() and sum(1 for _ in metrics.open()) >= 12:
            break
        time.sleep(0.05)
    assert p.poll() is None, "run finished before it could be killed"
    os.kill(p.pid, signal.SIGKILL)  # mid-step (some step after 12)
    p.wait()
    done = max(_losses(run))
    assert done < 40
    r = subprocess.run(cmd + sets + ["--resume"], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    from dsv3.config import RunConfig

    ref_sets = [x.removeprefix("--set=") for x in sets]
    ref_sets = [x for x in ref_sets if not x.startswith("train.out_dir")] + [f"train.out_dir={tmp_path / 'ref'}"]
    ref = train(RunConfig.load("configs/pretrain_tiny.yaml", ref_sets), track=False)
    got = _losses(run)
    assert sorted(got) == list(range(1, 41))
    assert [got[s] for s in range(1, 41)] == [h["train/loss"] for h in ref.history]


def test_nan_skip_and_rollback(tiny_shards, tmp_path, mlflow_uri):
    cfg = tiny_cfg(tiny_shards, tmp_path / "nan", "train.steps=8", "train.ckpt_every=2",
                   "train.debug_nan_steps=[3,5,6,7]", "train.max_bad_steps=3")
    r = train(cfg, track=False)
    h = {x["step"]: x for x in r.history}
    assert h[3]["train/skipped_steps"] == 1
    assert r.history[-1]["train/rollbacks"] == 1  # 5,6,7 in a row -> back to step 4
    assert r.history[-1]["train/skipped_steps"] == 4
    assert all(v == v for v in r.final.values())  # no NaN left in the final metrics
