"""Fault-injection fixtures: every test gets its own shard-verification cache (no ~/.cache writes)."""

import pytest


@pytest.fixture(autouse=True)
def _verify_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DSV3_CACHE_DIR", str(tmp_path / "dsv3-cache"))
    monkeypatch.delenv("DSV3_SHARD_VERIFY", raising=False)
