"""Ray Train launcher: 2 CPU workers (gloo) on a local Ray cluster with a worker killed
mid-run (the group restarts from the latest checkpoint), and on a simulated two-node
cluster (`ray.cluster_utils.Cluster`). Data-parallel losses match one process."""

import json
from pathlib import Path

import pytest
import ray

from dsv3.cluster import ray_init
from dsv3.train.launcher import run_training
from dsv3.train.loop import train
from tests.train.conftest import tiny_cfg

pytestmark = pytest.mark.slow


def _losses(run_dir):
    out = {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if "train/loss" in r:
            out[r["step"]] = r["train/loss"]
    return [out[k] for k in sorted(out)]


@pytest.fixture(scope="module")
def reference(tiny_shards, tmp_path_factory):
    d = tmp_path_factory.mktemp("ref")
    train(tiny_cfg(tiny_shards, d), track=False)
    return _losses(d)


def test_local_two_workers_restart_after_worker_death(tiny_shards, tmp_path, mlflow_uri, reference):
    ray.shutdown()
    ray_init(num_cpus=3)
    try:
        cfg = tiny_cfg(tiny_shards, tmp_path / "run", "parallel.dp=2", "train.debug_kill_rank_at_step=4")
        res = run_training(cfg, progress=False)
    finally:
        ray.shutdown()
    assert (tmp_path / "run" / ".killed_at_4").exists()  # rank 1 was SIGKILLed once
    assert "resumed from" in (tmp_path / "run" / "train.log").read_text()
    assert res["checkpoint"].endswith("step_00000006")
    got = _losses(tmp_path / "run")
    assert len(got) == 6
    assert got == pytest.approx(reference, rel=1e-4)  # DP grads = mean of half-batch grads


def test_two_node_cluster(tiny_shards, tmp_path, mlflow_uri, reference):
    from ray.cluster_utils import Cluster

    ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    cluster.add_node(num_cpus=2)
    try:
        ray_init(address=cluster.address)
        assert len([n for n in ray.nodes() if n["Alive"]]) == 2
        cfg = tiny_cfg(tiny_shards, tmp_path / "run", "parallel.dp=2", "train.steps=6")
        res = run_training(cfg, address=cluster.address, progress=False, placement_strategy="STRICT_SPREAD")
    finally:
        ray.shutdown()
        cluster.shutdown()
    assert res["run_id"]
    assert _losses(tmp_path / "run") == pytest.approx(reference, rel=1e-4)
