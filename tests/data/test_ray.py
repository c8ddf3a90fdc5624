"""Per-document stages and LSH bands on a real local Ray cluster (2 CPUs): identical outputs."""

from __future__ import annotations

import json

import pytest

from dsv3.data.dedup import content_hash
from dsv3.data.curate import curate

from .conftest import small_cfg


@pytest.mark.timeout(300)
def test_ray_two_workers_identical_outputs(curated, corpus, tmp_path):
    ray = pytest.importorskip("ray")
    from dsv3.cluster import ray_map, ray_shutdown

    out, cfg, _ = curated
    rcfg = small_cfg([corpus[0]], workers=2, batch_size=3)  # several batches -> several Ray tasks
    try:
        st = curate(rcfg, tmp_path)
        assert ray.is_initialized() and ray.cluster_resources().get("CPU") == 2
        items = [f"doc {i}" for i in range(7)]
        assert ray_map(content_hash, items, 2) == [content_hash(x) for x in items]  # ordered results
    finally:
        ray_shutdown()
    for s in ("train", "val", "removed", "quarantine"):
        assert (tmp_path / "curated" / f"{s}.jsonl").read_bytes() == (out / "curated" / f"{s}.jsonl").read_bytes(), s
    ref = json.loads((out / "stats.json").read_text())
    assert st["buckets"] == ref["buckets"] and st["stages"] == ref["stages"]
