"""A corrupted DVC cache entry or workspace out, with real `dvc repro` of the data
stages in a temporary git + DVC repo, and the real Prefect data flow.

What DVC 3.67 does (these tests pin it down; see dsv3/data/integrity.py): a workspace out
rewritten in place is re-hashed, `dvc status` says `modified` and `dvc repro` checks the
good copy out of the cache; a cache object made writable and changed is re-hashed, deleted
as corrupted (`not in cache`) and rebuilt by `dvc repro`; but a cache object that is still
read-only (0444, as DVC leaves it) is trusted without hashing, so bit rot or a write as root
passes through `dvc status`, `dvc checkout` and `dvc push` unseen, and `dvc pull` installs it
unless the remote has `verify = true`. The shard checksums stop training (and the data flow's
validation) before such a shard is read, and `dsv3.data.integrity.verify_outs` names the
corrupted copies and removes them so that `dvc repro` rebuilds only the stage that lost its
output. Completed work is kept: upstream stages are not re-run and dvc.lock is unchanged."""

from __future__ import annotations

import configparser
import os
import shutil
from pathlib import Path

import pytest
import yaml

from dsv3.data.integrity import verify_outs
from dsv3.data.shards import ShardError, TokenShards
from dsv3.data.version import data_digest
from tests.dvc_helpers import ROOT, dvc, sh, tiny_data_repo

DATA_STAGES = ("curate", "tokenizer", "shards")  # the stages with data outs (what _ran counts)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """The data stages reproduced once; each test works on its own copy."""
    r = tmp_path_factory.mktemp("dvcbase") / "repo"
    r.mkdir()
    tiny_data_repo(r, "/gx/\nmlruns.db\nmlartifacts/\n")
    out = dvc(r, "repro")
    assert all(f"Running stage '{s}'" in out for s in DATA_STAGES), out
    sh(r, "git", "add", "-A")
    sh(r, "git", "commit", "-qm", "data")
    return r


@pytest.fixture
def repo(base, tmp_path) -> Path:
    r = tmp_path / "repo"
    shutil.copytree(base, r, symlinks=True)
    return r


def _obj(repo: Path, rel: str) -> Path:
    """The cache object of data/shards/<rel> (through the .dir listing in dvc.lock)."""
    import json

    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    md5 = next(o["md5"] for o in lock["stages"]["shards"]["outs"] if o["path"] == "data/shards")
    cache = repo / ".dvc" / "cache" / "files" / "md5"
    listing = json.loads((cache / md5[:2] / md5[2:]).read_text())
    m = next(e["md5"] for e in listing if e["relpath"] == rel)
    return cache / m[:2] / m[2:]


def _flip(path: Path, at: int = 100, read_only: bool = False) -> None:
    """Flip one byte. DVC leaves cache objects read-only (0444); `read_only` leaves them so, as
    bit rot or a process running as root would; otherwise the object stays writable, as after
    a user's `chmod u+w` and edit."""
    mode = path.stat().st_mode
    os.chmod(path, 0o644)
    with open(path, "r+b") as f:
        f.seek(at)
        b = f.read(1)
        f.seek(at)
        f.write(bytes([b[0] ^ 0xFF]))
    if read_only:
        os.chmod(path, mode)


def _same_lock(repo: Path, lock: str) -> None:
    import difflib

    now = (repo / "dvc.lock").read_text()
    assert now == lock, "".join(difflib.unified_diff(lock.splitlines(True), now.splitlines(True), n=8))


def _ran(out: str) -> set[str]:
    return {s for s in DATA_STAGES if f"Running stage '{s}'" in out}


def test_workspace_out_corrupted_is_restored_from_cache(repo):
    lock = (repo / "dvc.lock").read_text()
    _flip(repo / "data" / "shards" / "train.bin")
    assert "modified:           data/shards" in dvc(repo, "status")
    with pytest.raises(ShardError, match=r"data/shards/train\.bin: checksum mismatch"):
        TokenShards(repo / "data" / "shards", "train")
    out = dvc(repo, "repro")
    assert "Stage 'shards' is cached - skipping run, checking out outputs" in out and not _ran(out), out
    TokenShards(repo / "data" / "shards", "train")
    assert verify_outs(repo).ok and (repo / "dvc.lock").read_text() == lock


def test_cache_object_corrupted_is_detected_and_rebuilt(repo):
    obj = _obj(repo, "train.bin")
    _flip(obj)
    rep = verify_outs(repo)
    assert [(p.kind, p.path) for p in rep.problems] == [("cache_corrupt", str(obj))]
    # not read-only any more, so DVC re-hashes it, finds it corrupted and deletes it from the cache
    assert "not in cache:       data/shards" in dvc(repo, "status") and not obj.exists()
    out = dvc(repo, "repro")
    assert _ran(out) == {"shards"}, out  # curate and tokenizer kept
    assert verify_outs(repo).ok  # the rebuilt object is byte-identical to the one dvc.lock names


def test_silent_cache_corruption_is_caught_by_checksums_and_repaired(repo):
    lock = (repo / "dvc.lock").read_text()
    obj = _obj(repo, "train.bin")
    _flip(obj, read_only=True)
    assert "up to date" in dvc(repo, "status")  # a read-only cache object is trusted unhashed: DVC's blind spot
    shutil.rmtree(repo / "data" / "shards")
    dvc(repo, "checkout")  # ... and checked out as it is
    assert "up to date" in dvc(repo, "status")
    with pytest.raises(ShardError, match=r"data/shards/train\.bin: checksum mismatch"):
        TokenShards(repo / "data" / "shards", "train")  # training stops before reading it
    rep = verify_outs(repo, repair=True)
    assert {(p.kind, Path(p.path).name) for p in rep.problems} == {
        ("cache_corrupt", obj.name), ("workspace_corrupt", "train.bin")}
    assert "train.bin" in str(rep.problems) and "stage 'shards'" in rep.text()
    assert "not in cache" in dvc(repo, "status")
    out = dvc(repo, "repro")
    assert _ran(out) == {"shards"}, out
    assert verify_outs(repo).ok
    _same_lock(repo, lock)
    TokenShards(repo / "data" / "shards", "train")


@pytest.mark.slow
def test_corrupted_object_on_the_remote_is_refused_by_a_verifying_pull(repo, tmp_path):
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / ".dvc" / "config")
    assert cfg['\'remote "local"\''].get("verify") == "true"  # the project's remote verifies downloads
    dvc(repo, "remote", "add", "-d", "local", str(tmp_path / "remote"))
    dvc(repo, "remote", "modify", "local", "verify", "true")
    _flip(_obj(repo, "train.bin"), read_only=True)
    assert not verify_outs(repo).ok  # what a pre-push check sees
    dvc(repo, "push")  # DVC uploads the corrupted object as it is
    shutil.rmtree(repo / ".dvc" / "cache")
    shutil.rmtree(repo / "data" / "shards")
    r = dvc_fail(repo, "pull")
    assert "data/shards" in r  # refused: named, not checked out
    assert not (repo / "data" / "shards" / "train.bin").exists()
    out = dvc(repo, "repro")
    assert _ran(out) == {"shards"}, out
    assert verify_outs(repo).ok


def dvc_fail(repo: Path, *args: str) -> str:
    import subprocess
    import sys

    from tests.dvc_helpers import ENV

    r = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=repo, env=ENV, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode != 0, r.stdout
    return r.stdout + r.stderr


def _curated_mtimes(repo: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in (repo / "data" / "curated").iterdir()}


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_data_flow_stops_on_a_silently_corrupted_shard_then_rebuilds(repo, prefect_harness, tmp_path, monkeypatch):
    from flows.data import data_flow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlruns.db")
    digest = data_digest(repo / "data" / "shards", repo)
    curated = _curated_mtimes(repo)
    _flip(_obj(repo, "train.bin"), read_only=True)
    shutil.rmtree(repo / "data" / "shards")
    dvc(repo, "checkout")  # e.g. a branch switch: DVC materialises the corrupted object
    with pytest.raises(ShardError, match=r"data/shards/train\.bin: checksum mismatch"):
        data_flow(repo=str(repo))  # dvc repro is a no-op; validation opens the shards and stops
    rep = verify_outs(repo, repair=True)
    assert not rep.ok and len(rep.repaired) == 2, rep.text()
    res = data_flow(repo=str(repo))
    assert res["digest"] == digest and res["validation"]["success"]  # the same data version again
    assert _curated_mtimes(repo) == curated  # curation (completed work) was not redone
    assert verify_outs(repo).ok


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_data_flow_repairs_a_visibly_corrupted_cache_and_workspace(repo, prefect_harness, tmp_path, monkeypatch):
    from flows.data import data_flow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlruns.db")
    digest = data_digest(repo / "data" / "shards", repo)
    curated = _curated_mtimes(repo)
    _flip(_obj(repo, "train.bin"))  # a writable, changed cache object: DVC drops it and the stage re-runs
    _flip(repo / "data" / "shards" / "val.bin")  # a changed workspace out
    res = data_flow(repo=str(repo))
    assert res["digest"] == digest and res["validation"]["success"]
    assert _curated_mtimes(repo) == curated
    assert verify_outs(repo).ok
