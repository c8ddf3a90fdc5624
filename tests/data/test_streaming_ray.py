"""The streaming curation on a real local Ray cluster (2 CPUs): batches and both dedup shuffles as
Ray tasks, with a bounded number in flight, outputs equal to the in-memory reference."""

from __future__ import annotations

import pytest

from dsv3.data import curate, dedup, reference

from .conftest import small_cfg
from .test_streaming import _assert_same_curation, dup_corpus


@pytest.mark.timeout(300)
def test_ray_streaming_bounded_in_flight_and_equal_to_in_memory(tmp_path, monkeypatch):
    ray = pytest.importorskip("ray")
    from dsv3.cluster import ray_imap, ray_shutdown

    monkeypatch.setattr(dedup, "TASK_BYTES", 512)  # several exact and near-dedup tasks
    src = dup_corpus(tmp_path / "src")
    cfg = small_cfg([src], batch_size=4, workers=2)
    pulled = []

    def items():
        for i in range(20):
            pulled.append(i)
            yield f"doc {i}"

    try:
        seen = []
        for i, x in enumerate(ray_imap(dedup.content_hash, items(), workers=2, window=3)):
            assert len(pulled) - i <= 3  # never more than `window` items taken but not yet returned
            seen.append(x)
        assert seen == [dedup.content_hash(f"doc {i}") for i in range(20)]  # in input order
        st = curate.curate(cfg, tmp_path / "stream")
        assert ray.is_initialized() and ray.cluster_resources().get("CPU") == 2
    finally:
        ray_shutdown()
    sm = reference.curate_in_memory(small_cfg([src], batch_size=4), tmp_path / "memory")
    _assert_same_curation(tmp_path / "stream", tmp_path / "memory", st, sm)
    assert st["stream"]["tasks"]["exact_dedup"] > 1 and st["stream"]["tasks"]["near_dedup"] > 1
    assert st["stream"]["worker_peak_rss_mb"] > 0 and st["stream"]["workers"] == 2
