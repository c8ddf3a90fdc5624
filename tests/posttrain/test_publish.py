"""dsv3.posttrain.stages.publish: with a storage URI a stage's output directory goes to
`<storage>/<posttrain.out_dir>/<name>` (a verified round trip); without one it stays where it is."""

import pytest


def _dir(tmp_path):
    d = tmp_path / "scratch" / "sft"
    d.mkdir(parents=True)
    (d / "config.json").write_text('{"vocab_size": 512}')
    (d / "model.safetensors").write_bytes(bytes(range(256)) * 8)
    return d


def test_publish_without_storage_keeps_the_local_path(tmp_path, monkeypatch):
    from dsv3.config import RunConfig
    from dsv3.posttrain import stages

    monkeypatch.delenv("DSV3_CHECKPOINT_URI", raising=False)
    cfg = RunConfig.load(None, ["preset=tiny"])
    d = _dir(tmp_path)
    assert stages.storage_base(cfg) is None
    assert stages.publish(cfg, d) == str(d)


@pytest.mark.parametrize("via_env", [False, True])
def test_publish_uploads_under_the_posttrain_run_key(tmp_path, monkeypatch, via_env):
    from dsv3.config import RunConfig
    from dsv3.posttrain import stages
    from dsv3.train import storage

    base = f"file://{tmp_path / 'remote'}"
    monkeypatch.delenv("DSV3_CHECKPOINT_URI", raising=False)
    sets = ["preset=tiny", "posttrain.out_dir=checkpoints/pt"]
    if via_env:
        monkeypatch.setenv("DSV3_CHECKPOINT_URI", base)
    else:
        sets.append(f"train.storage_uri={base}")
    cfg = RunConfig.load(None, sets)
    d = _dir(tmp_path)
    uri = stages.publish(cfg, d)
    assert uri == f"{base}/checkpoints/pt/sft" and storage.complete(uri)
    back = storage.fetch_dir(uri, tmp_path / "back")
    assert {p.name: p.read_bytes() for p in back.iterdir() if p.name != storage.DIR_MANIFEST} == \
        {p.name: p.read_bytes() for p in d.iterdir()}
