"""Stage identities: what changes a stage's key and what does not, and cache hits read from a real
MLflow store (a crashed run, deleted files or another store are never a hit)."""

from __future__ import annotations

import shutil

import pytest

from dsv3.config import RunConfig
from dsv3.errors import ConfigError
from dsv3.lifecycle import plan

from .conftest import TINY


def keys(cfg, parent="models:/dsv3-long/1") -> dict[str, str]:
    return {s: plan.stage_key(cfg, s, {"data": "d1", "parent": parent}).key for s in plan.ORDER}


def test_closure_follows_lazy_imports_and_leaves_out_config_and_tracking():
    mods = plan.closure(plan.ROOTS["posttrain"])
    assert {"dsv3.posttrain.grpo", "dsv3.posttrain.sft", "dsv3.model.transformer", "dsv3.model.mla"} <= set(mods)
    assert not [m for m in mods if m.startswith("dsv3.tracking") or m.endswith("config")]
    assert "dsv3.data.curate" in plan.closure(plan.ROOTS["data"]) and "dsv3.model.mla" not in plan.closure(
        plan.ROOTS["data"])


def test_code_digest_changes_only_for_the_stages_that_use_a_file(tmp_path, monkeypatch):
    shutil.copytree(plan.SRC / "dsv3", tmp_path / "dsv3", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(plan.SRC / "evals", tmp_path / "evals")
    monkeypatch.setattr(plan, "SRC", tmp_path)

    def clear():
        for f in (plan._modules, plan._imports, plan.code_digest):
            f.cache_clear()

    def digests():
        clear()
        return {s: plan.code_digest(s) for s in plan.ORDER}

    try:
        before = digests()
        for rel, changed in (("dsv3/tracking/registry.py", set()),  # logging, not computation
                             ("dsv3/posttrain/grpo.py", {"posttrain", "eval"}),  # eval scores with grpo's task
                             ("dsv3/model/mla.py", {"pretrain", "extend", "posttrain", "eval"}),
                             ("dsv3/data/dedup.py", {"data"}),
                             ("evals/tasks/dsv3_drop.yaml", {"eval"})):
            path = tmp_path / rel
            assert path.is_file(), rel
            path.write_text(path.read_text() + "\n# edited\n")
            after = digests()
            assert {s for s in plan.ORDER if after[s] != before[s]} == changed, rel
            before = after
    finally:
        monkeypatch.undo()
        clear()


def test_keys_follow_config_sections_and_inputs():
    cfg = RunConfig.load(TINY)
    k = keys(cfg)
    pt = keys(RunConfig.load(TINY, ["posttrain.grpo.lr=0.001"]))
    assert {s for s in plan.ORDER if pt[s] != k[s]} == {"posttrain"}
    ex = keys(RunConfig.load(TINY, ["train.extend.lr=0.001"]))
    assert {s for s in plan.ORDER if ex[s] != k[s]} == {"extend"}
    tr = keys(RunConfig.load(TINY, ["train.lr=0.001"]))
    assert {s for s in plan.ORDER if tr[s] != k[s]} == {"pretrain", "extend"}
    ev = keys(RunConfig.load(TINY, ["lifecycle.heldout.n=7"]))
    assert {s for s in plan.ORDER if ev[s] != k[s]} == {"eval"}
    # bookkeeping (where files go, threads, logging) and gates do not make another model
    same = keys(RunConfig.load(TINY, ["train.out_dir=elsewhere", "train.threads=2", "train.log_every=5",
                                      "posttrain.out_dir=x", "data.workers=2", "lifecycle.gates.chat.margin=0.1",
                                      "name=other"]))
    assert same == k
    assert keys(cfg, parent="models:/dsv3-long/2")["posttrain"] != k["posttrain"]  # a retrained parent


def test_force_and_prepared():
    cfg = RunConfig.load(TINY)
    assert [plan.use_cache(cfg, s, "posttrain") for s in plan.ORDER] == [True, True, True, False, False]
    assert not plan.use_cache(RunConfig.load(TINY, ["lifecycle.cache=false"]), "data", None)
    with pytest.raises(ValueError, match="not a lifecycle stage.*data, pretrain"):
        plan.check_force("sft")
    assert plan.prepared(cfg).eval.bpb_shards == "data/shards" and cfg.eval.bpb_shards is None
    for bad, key in ((["train.register_model=false"], "train.register_model"), (["posttrain.init=x"], "posttrain.init"),
                     (["train.shards=/other/shards"], "train.shards")):
        with pytest.raises(ConfigError, match=key):
            plan.prepared(RunConfig.load(TINY, bad))


@pytest.mark.timeout(300)
def test_hits_come_from_the_store(repo, tmp_path, monkeypatch, empty_db):
    import mlflow

    from dsv3 import tracking
    from dsv3.lifecycle import ledger
    from tests.tracking.conftest import make_model

    cfg = RunConfig.load(TINY)
    sk = plan.stage_key(cfg, "pretrain", {"data": "d1"})
    assert plan.cached_model(cfg, sk) is None and ledger.hit(cfg, sk, None) is None  # empty store
    model = make_model(tmp_path / "m")
    with tracking.start_run({}, stage="pretrain"):
        v1 = tracking.register_stage_model(model, "dsv3-base")
    ledger.mark_model(v1.uri, sk)
    with pytest.raises(RuntimeError):  # a crashed stage run: its version is never reused
        with tracking.start_run({}, stage="pretrain"):
            v2 = tracking.register_stage_model(model, "dsv3-base")
            ledger.mark_model(v2.uri, plan.stage_key(cfg, "pretrain", {"data": "d2"}))
            raise RuntimeError("stage crashed after registering")
    assert plan.cached_model(cfg, plan.stage_key(cfg, "pretrain", {"data": "d2"})) is None
    assert tracking.resolve_stage_model("dsv3-base", ("candidate",)) == "models:/dsv3-base/2"
    rec = ledger.hit(cfg, sk, None)
    assert rec["model_uri"] == v1.uri and rec["status"] == "cached"
    assert tracking.resolve_stage_model("dsv3-base", ("candidate",)) == v1.uri  # downstream reads @candidate
    assert ledger.hit(cfg, sk, "pretrain") is None  # forced
    shutil.rmtree(tracking.hf_dir(v1.uri))  # the files are gone: not a hit
    assert plan.cached_model(cfg, sk) is None

    ek = plan.stage_key(cfg, "eval", {"model": v1.uri})
    with tracking.start_run({}, stage="eval", tags={plan.KEY_TAG: ek.key}):
        tracking.log_metrics({"eval/bpb": 3.5})
    assert plan.cached_run(cfg, ek)["metrics"] == {"eval/bpb": 3.5}
    shutil.copy(empty_db, tmp_path / "other.db")
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/other.db")  # another (or a wiped) store
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/other.db")
    assert plan.cached_run(cfg, ek) is None and plan.cached_model(cfg, sk) is None
