"""dsv3.train.storage on a `file://` store (the same object layout as S3, no server): verified
transfers, content-addressed shards, and a run resumed in another working directory from storage
alone, falling back past a corrupt newest checkpoint. The S3 / two-node runs: tests/infra/test_noshare.py."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from dsv3.errors import ConfigError
from dsv3.train import storage
from dsv3.train.loop import train
from tests.train.conftest import make_shards, tiny_cfg


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DSV3_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv(storage.ENV, raising=False)


def test_run_key_and_base_uri(monkeypatch):
    assert storage.run_key("runs/pretrain") == "runs/pretrain"
    assert storage.run_key("./runs//x/") == "runs/x"
    assert storage.run_key("/tmp/a/run") == "tmp/a/run"
    for bad in ("../up", "runs/../x", ".", "/"):
        with pytest.raises(ConfigError, match="train.out_dir"):
            storage.run_key(bad)
    cfg = tiny_cfg("s", "o")
    assert storage.base_uri(cfg) is None  # the laptop default
    monkeypatch.setenv(storage.ENV, "s3://bucket/pre/")
    assert storage.base_uri(cfg) == "s3://bucket/pre"
    cfg = tiny_cfg("s", "o", "train.storage_uri=/mnt/shared")
    with pytest.raises(ConfigError, match="train.storage_uri: '/mnt/shared' is not a storage URI"):
        storage.base_uri(cfg)


def test_dir_round_trip_verifies_and_refuses_incomplete_or_corrupt(tmp_path):
    src = tmp_path / "tok"
    (src / "sub").mkdir(parents=True)
    (src / "a.json").write_text('{"a": 1}')
    (src / "sub" / "b.bin").write_bytes(os.urandom(5000))
    remote = tmp_path / "remote"
    uri = storage.push_dir(src, f"file://{remote}/inputs/tok")
    got = storage.fetch_dir(uri)
    assert storage.sha256_files(got) == storage.sha256_files(src)
    assert Path(storage.local_dir(uri)) == got  # cached: same place, no second copy
    assert got.is_relative_to(tmp_path / "cache")
    # a flipped byte in the store: refused, naming the object
    blob = remote / "inputs" / "tok" / "sub" / "b.bin"
    data = bytearray(blob.read_bytes())
    data[10] ^= 1
    blob.write_bytes(bytes(data))
    with pytest.raises(storage.StorageError, match="sub/b.bin: checksum mismatch"):
        storage.fetch_dir(uri, tmp_path / "elsewhere")
    assert not (tmp_path / "elsewhere").exists()  # nothing half-downloaded left in place
    # no manifest = an upload that did not finish
    (remote / "inputs" / "tok" / storage.DIR_MANIFEST).unlink()
    with pytest.raises(storage.StorageError, match="no manifest"):
        storage.fetch_dir(uri)


def test_shards_uploaded_by_digest_and_fetched_verified(tmp_path):
    shards = make_shards(tmp_path / "shards", n_docs=40)
    base = f"file://{tmp_path / 'remote'}"
    uri = storage.push_shards(shards, base)
    from dsv3.data.version import data_digest

    assert uri == f"{base}/shards/{data_digest(shards).removesuffix('.dir')}"
    assert storage.push_shards(shards, base) == uri  # once
    local = storage.local_shards(uri)
    assert {p.name: p.read_bytes() for p in Path(local).iterdir()} == \
        {p.name: p.read_bytes() for p in Path(shards).iterdir()}
    # corrupt the remote .bin (same size): the shards' own xxh3 checksum catches it on a fresh node
    shutil.rmtree(tmp_path / "cache")
    binf = Path(uri[len("file://"):]) / "train.bin"
    data = bytearray(binf.read_bytes())
    data[3] ^= 0xFF
    binf.write_bytes(bytes(data))
    with pytest.raises(storage.StorageError, match="fail their checksums.*checksum mismatch"):
        storage.local_shards(uri)
    assert not any((tmp_path / "cache" / "storage" / "shards").glob("[!.]*"))


def _losses(records: str) -> dict[int, float]:
    return {r["step"]: r["train/loss"] for r in map(json.loads, records.splitlines()) if "train/loss" in r}


def test_resume_in_another_working_dir_from_storage_alone(tmp_path, monkeypatch, mlflow_uri):
    """Node A trains and uploads; its disk is then gone. Node B (another cwd, the same relative out_dir)
    resumes from the store, skipping the corrupt newest checkpoint, and reproduces A's losses bitwise."""
    shards = make_shards(tmp_path / "shards", n_docs=60)
    remote = tmp_path / "remote"
    over = (f"train.storage_uri=file://{remote}", "train.ckpt_every=2", "train.keep_last=2", "train.ema=false")
    cfg = tiny_cfg(shards, "runs/t", *over)  # the same relative out_dir on both "nodes"
    node_a, node_b = tmp_path / "a", tmp_path / "b"
    node_a.mkdir()
    node_b.mkdir()
    monkeypatch.chdir(node_a)
    res_a = train(cfg, track=False)
    run = remote / "runs" / "t"
    assert res_a.checkpoint == f"file://{run}/checkpoints/step_00000006"
    assert res_a.model_dir == f"file://{run}/final"
    steps = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert steps == ["step_00000004", "step_00000006"]  # keep_last=2 in the store too
    full = _losses((node_a / "runs" / "t" / "metrics.jsonl").read_text())
    shutil.rmtree(node_a)  # node A is gone
    model = run / "checkpoints" / "step_00000006" / "model" / "model.safetensors"
    data = bytearray(model.read_bytes())
    data[-5] ^= 1
    model.write_bytes(bytes(data))
    monkeypatch.chdir(node_b)
    with pytest.warns(RuntimeWarning, match="skipping checkpoint .*step_00000006.*checksum mismatch"):
        res_b = train(cfg, resume=True, track=False)
    log = (node_b / "runs" / "t" / "train.log").read_text()
    assert "resumed from" in log and "step_00000004" in log
    got = _losses((node_b / "runs" / "t" / "metrics.jsonl").read_text())
    assert got == full  # steps 1-4 restored from the store's metrics.jsonl, 5-6 recomputed bitwise
    final = storage.local_dir(res_b.model_dir)
    assert (Path(final) / "config.json").is_file()


def test_ray_storage_mode_refuses_a_one_machine_tracking_store(tmp_path, monkeypatch):
    """With shared storage the workers may be on other nodes: a SQLite MLflow file is refused before Ray starts."""
    from dsv3.train.launcher import run_training

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = tiny_cfg(make_shards(tmp_path / "shards", n_docs=30), "runs/x", f"train.storage_uri=file://{tmp_path}/r",
                   "parallel.dp=2")
    with pytest.raises(ConfigError, match="MLFLOW_TRACKING_URI: .*SQLite.*tracking server"):
        run_training(cfg, progress=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/m.db")
    with pytest.raises(ConfigError, match=f"MLFLOW_TRACKING_URI: sqlite:///{tmp_path}/m.db is on one machine"):
        run_training(cfg, progress=False)
    assert not (tmp_path / "r").exists()  # nothing uploaded
