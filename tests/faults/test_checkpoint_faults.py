"""Checkpoint writes under faults: SIGKILL inside the write, and a full disk.

The process under test is the real `dsv3 pretrain` (python -m dsv3.cli) on tiny shards, tracked in
a SQLite MLflow store. SIGKILL: `DSV3_CKPT_FAULT=<point>@<step>` makes checkpoint.save pause at that
point of the write (checkpoint.FAULT_POINTS) and the test kills the process from outside; then
`latest()` never returns a partial checkpoint and a resume reproduces the uninterrupted losses bitwise.
Disk full: a size-limited tmpfs (where this machine lets us mount one) or RLIMIT_FSIZE in the child:
the run stops with one line naming the checkpoint and the cause, no temp dir is left behind, and the
previous checkpoint verifies and loads (and the run resumes from it once there is room)."""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dsv3.config import RunConfig
from dsv3.train import checkpoint as ckpt
from dsv3.train.loop import train
from dsv3.train.optim import make_optimizer
from dsv3.train.step import build_model
from tests.train.conftest import make_shards

ROOT = Path(__file__).resolve().parents[2]
CONFIG = "configs/pretrain_tiny.yaml"


def _sets(shards, out_dir, *extra: str) -> list[str]:
    return [f"train.shards={shards}", f"train.out_dir={out_dir}", f"train.tokenizer={out_dir}/no-tokenizer",
            "train.seq_len=32", "train.batch_size=4", "train.threads=1", "train.plots=false",
            "train.precision=fp32", "train.warmup_frac=0.2", "train.log_checkpoints=false",
            "train.register_model=false", "train.eval_every=100", "train.eval_batches=2", *extra]


def _cfg(shards, out_dir, *extra: str) -> RunConfig:
    return RunConfig.load(CONFIG, _sets(shards, out_dir, *extra))


def _losses(run_dir) -> dict[int, float]:
    out = {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if "train/loss" in r:
            out[r["step"]] = r["train/loss"]
    return out


def _cli(shards, out_dir, extra, db, env=None, resume=False, **kw) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": db, **(env or {})}
    cmd = [sys.executable, "-m", "dsv3.cli", "pretrain", "--config", CONFIG,
           *(f"--set={s}" for s in _sets(shards, out_dir, *extra)), *(["--resume"] if resume else [])]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("shards"))


@pytest.fixture(scope="module")
def empty_store(tmp_path_factory) -> Path:
    """An empty SQLite MLflow store, created once (its migrations take seconds) and copied per test."""
    from dsv3 import tracking

    path = tmp_path_factory.mktemp("mlflow") / "mlruns.db"
    tracking.setup(f"sqlite:///{path}")
    tracking.runs._EXPLICIT_URI = None  # later tests pick their store themselves
    return path


@pytest.fixture
def db(empty_store, tmp_path) -> str:
    shutil.copy(empty_store, tmp_path / "mlruns.db")
    return f"sqlite:///{tmp_path}/mlruns.db"


KILL = ["train.steps=8", "train.ckpt_every=2", "train.keep_last=2"]


@pytest.fixture(scope="module")
def reference(shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref")
    train(_cfg(shards, out, *KILL), track=False)
    return _losses(out)


# point -> (the checkpoint latest() must return after the kill, what the interrupted write left behind)
POINTS = {
    "model": (4, "temp dir holding model/ only"),
    "optimizer": (4, "temp dir without a manifest"),
    "manifest": (4, "complete temp dir, not yet synced"),
    "synced": (4, "complete, fsynced temp dir, not yet renamed"),
    "renamed": (6, "step 6 in place, step 2 not yet pruned"),
    "pruning": (6, "step 2 renamed aside, not yet removed"),
}


@pytest.mark.slow
@pytest.mark.parametrize("point", list(POINTS))
def test_sigkill_inside_checkpoint_write(point, shards, db, reference, tmp_path):
    run = tmp_path / "run"
    root = run / "checkpoints"
    p = _cli(shards, run, KILL, db, env={"DSV3_CKPT_FAULT": f"{point}@6", "DSV3_CKPT_FAULT_WAIT": "120"})
    marker, deadline = root / f".fault-{point}", time.time() + 180
    while not marker.exists() and p.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert marker.exists(), f"never reached {point}: rc={p.poll()} {p.stderr.read()[-2000:] if p.poll() else ''}"
    time.sleep(0.1)  # let the marker's pause begin
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    p.stdout.close(), p.stderr.close()
    marker.unlink()

    want, _ = POINTS[point]
    temps = sorted(x.name for x in root.glob(".tmp-*"))
    if want == 4:  # killed before the rename: the step-6 write exists only as a temp dir
        assert temps and all("step_00000006" in t for t in temps), temps
        assert not (root / "step_00000006").exists()
    if point == "pruning":
        assert temps == [f".tmp-drop-step_00000002-{p.pid}"]
    for d in ckpt.list_checkpoints(root):  # every visible checkpoint is complete: nothing half-written
        ckpt.verify(d)
    latest = ckpt.latest(root)
    assert latest is not None and latest.name == f"step_{want:08d}"

    res = train(_cfg(shards, run, *KILL), resume=True, track=False)
    assert f"resumed from {latest}" in (run / "train.log").read_text()
    got = _losses(run)
    assert sorted(got) == list(range(1, 9))
    assert [got[s] for s in range(1, 9)] == [reference[s] for s in range(1, 9)]  # bitwise
    assert res.checkpoint.endswith("step_00000008")
    assert not list(root.glob(".tmp-*")), "the resumed run's first save sweeps what the kill left"
    assert [d.name for d in ckpt.list_checkpoints(root)] == ["step_00000008", "step_00000006"]


def _check_disk_full(p: subprocess.Popen, root: Path, cause: str, writing: str) -> None:
    out, err = p.communicate(timeout=300)
    assert p.returncode == 1, (p.returncode, err[-3000:])
    assert "Traceback" not in err, err[-3000:]
    line = [x for x in err.splitlines() if "checkpoint error" in x]
    assert len(line) == 1, err[-3000:]
    msg = line[0]
    assert f"could not write checkpoint {root / 'step_00000006'}: {cause}" in msg, msg
    assert re.search(rf"\(writing {re.escape(writing)}[\w./]*\);", msg), msg  # names the file
    assert f"the previous checkpoint {root / 'step_00000003'} is untouched" in msg, msg
    assert not list(root.glob(".tmp-*")), "the failed write removed its temp dir"
    assert [d.name for d in ckpt.list_checkpoints(root)] == ["step_00000003"]
    assert ckpt.latest(root) == root / "step_00000003"


def _loads(ckpt_dir: Path, cfg: RunConfig) -> dict:
    import torch

    model = build_model(cfg, torch.device("cpu"))
    opt = make_optimizer(model, cfg.train)
    state = ckpt.load(ckpt_dir, model, opt)
    assert state["step"] == 3 and opt.state_dict()["state"], "weights, optimizer state and state.json load"
    return state


@pytest.fixture
def small_disk(tmp_path):
    """A 9 MiB tmpfs: room for one tiny checkpoint (5.7 MB) and the run's logs, not for two."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=9m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip()}); the RLIMIT_FSIZE test covers disk full")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.mark.slow
def test_disk_full_stops_cleanly_and_keeps_the_last_checkpoint(small_disk, shards, db, tmp_path):
    run = small_disk / "run"
    root = run / "checkpoints"
    steps = ["train.steps=6", "train.ckpt_every=3"]
    p = _cli(shards, run, steps, db)
    _check_disk_full(p, root, "No space left on device", "")  # the file that did not fit is named
    cfg = _cfg(shards, run, *steps)
    _loads(root / "step_00000003", cfg)
    # with room again (the same filesystem grown), the run resumes from step 3 and nothing is lost
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
    train(cfg, resume=True, track=False)
    ref = tmp_path / "ref"
    train(_cfg(shards, ref, *steps), track=False)
    assert _losses(run) == _losses(ref)


@pytest.mark.slow
def test_file_size_limit_stops_cleanly(shards, db, tmp_path):
    """RLIMIT_FSIZE (works without privileges): a resumed run whose checkpoint files may not exceed
    1.5 MB (the model's safetensors is 1.6 MB) fails at its first save with EFBIG, cleanly."""
    run = tmp_path / "run"
    root = run / "checkpoints"
    train(_cfg(shards, run, "train.steps=3", "train.ckpt_every=3"), track=False)
    limit = 1_500_000

    def cap():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))

    db_file = Path(db.removeprefix("sqlite:///"))
    assert db_file.stat().st_size < limit - 200_000, "the MLflow store must stay writable under the cap"
    p = _cli(shards, run, ["train.steps=6", "train.ckpt_every=3"], db, resume=True, preexec_fn=cap)
    _check_disk_full(p, root, "File too large", "model/")
    _loads(root / "step_00000003", _cfg(shards, run, "train.steps=6"))
