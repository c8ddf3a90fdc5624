"""Expert loads for EPLB: what a real (tiny) training run recorded, read back from its checkpoints and from
its MLflow run; the online recorder against the gate's own training-mode counters."""

import shutil

import pytest
import torch

from dsv3 import tracking
from dsv3.model.config import ModelConfig
from dsv3.model.transformer import DeepSeekV3
from dsv3.serve.eplb import gpu_loads, imbalance
from dsv3.serve.load_stats import ExpertLoadRecorder, checkpoint_loads, run_loads, training_loads
from dsv3.train.loop import train
from tests.train.conftest import make_shards, tiny_cfg

STEPS, BATCH, SEQ = 2, 4, 32


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    d = tmp_path_factory.mktemp("eplb_run")
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{d}/mlruns.db")
    cfg = tiny_cfg(make_shards(d / "shards"), d / "run", f"train.steps={STEPS}", "train.ckpt_every=1",
                   "train.log_every=1", "train.eval_every=2", "train.log_checkpoints=true", "train.ema=false")
    res = train(cfg)
    yield cfg, res, d / "run"
    mp.undo()


def test_checkpoint_loads_are_the_routed_tokens(trained):
    cfg, res, out = trained
    load = checkpoint_loads(out)
    m = cfg.model
    n_main = m.num_hidden_layers - m.first_k_dense_replace
    assert load.shape == (n_main + m.num_nextn_predict_layers, m.n_routed_experts)
    tokens = STEPS * BATCH * SEQ
    assert load[:n_main].sum(1).tolist() == [tokens * m.num_experts_per_tok] * n_main
    # the MTP module (depth 1) routes the S - 1 positions that have a next-next token
    assert load[n_main:].sum().item() == STEPS * BATCH * (SEQ - 1) * m.num_experts_per_tok
    assert torch.equal(checkpoint_loads(res.checkpoint), load)
    assert torch.equal(checkpoint_loads(out / "checkpoints"), load)


def test_loads_match_the_logged_balance_metric(trained):
    _, res, out = trained
    first, last = sorted((out / "checkpoints").glob("step_*"))
    step2 = checkpoint_loads(last) - checkpoint_loads(first)  # the load of step 2 alone
    assert torch.equal(checkpoint_loads(out, last_interval=True), step2)
    assert torch.equal(checkpoint_loads(first, last_interval=True), checkpoint_loads(first))  # no older one
    ratio = step2.max(1).values / step2.mean(1)
    for i, r in enumerate(ratio.tolist()):
        logged = dict(tracking.metric_history(res.run_id, f"moe/load_max_over_mean/layer_{i}"))
        assert logged[STEPS] == pytest.approx(r, rel=1e-6)


def test_run_loads_from_mlflow(trained, tmp_path):
    _, res, out = trained
    want = checkpoint_loads(out)
    assert torch.equal(run_loads(res.run_id), want)
    assert torch.equal(training_loads(f"runs:/{res.run_id}"), want)
    assert torch.equal(training_loads(res.run_id), want)
    # the checkpoint folder is gone: the state.json artifact logged with the run is used
    moved = tmp_path / "moved"
    shutil.move(str(res.checkpoint), moved)
    try:
        assert torch.equal(run_loads(res.run_id), want)
    finally:
        shutil.move(str(moved), res.checkpoint)
    # the loads feed EPLB: 2 GPUs, 2 redundant experts
    from dsv3.serve.expert_parallel import EPConfig

    phy2log, _, logcnt = EPConfig(ep=2, num_redundant=2).plan(want, 4)
    assert imbalance(gpu_loads(want, phy2log, logcnt, 2)).shape == (want.shape[0],)


def test_bad_sources(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlruns.db")
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        checkpoint_loads(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="neither a checkpoint"):
        checkpoint_loads(tmp_path)
    with pytest.raises(FileNotFoundError, match="neither a path nor an MLflow run"):
        training_loads("not-a-run")
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "state.json").write_text('{"step": 3}')
    with pytest.raises(ValueError, match="no expert load statistics"):
        checkpoint_loads(tmp_path / "ck")
    with tracking.start_run({}, stage="other") as run:
        pass
    with pytest.raises(ValueError, match="no checkpoint_uri tag"):
        run_loads(run.info.run_id)


def test_recorder_counts_what_the_gates_count(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = DeepSeekV3(ModelConfig.preset("tiny", vocab_size=512))
    x = torch.randint(0, 512, (3, 10), generator=torch.Generator().manual_seed(0))
    rec = ExpertLoadRecorder.for_model(model, decay=0.5)
    with torch.no_grad():
        model.eval()
        model(x)  # eval mode: the gates' own counters stay at zero; the recorder counts
        assert model.expert_load().sum() == 0
        rec.detach()
        model.train()
        model(x)  # training mode: the gates count the same routing
    torch.testing.assert_close(rec.load.float(), model.expert_load())
    assert rec.load.sum() == 2 * 3 * 10 * model.config.num_experts_per_tok  # 2 MoE layers; MTP not run
    window = rec.load.clone()
    rec.step()
    rec.add(window)
    torch.testing.assert_close(rec.load, 2 * window)
    rec.step()
    torch.testing.assert_close(rec.load, 1.5 * window)  # 0.5 * window + window
    with torch.no_grad():
        model.eval()
        model(x)  # detached: nothing more counted
    torch.testing.assert_close(rec.load, 1.5 * window)
    with pytest.raises(ValueError, match="load shape"):
        rec.add(torch.ones(2, 8))
    phy2log, log2phy, logcnt = rec.plan(10, 4, 1, 2)  # the unseen MTP row: uniform
    assert phy2log.shape == (3, 10) and (logcnt.sum(1) == 10).all()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlruns.db")
    with tracking.start_run({}, stage="serve") as run:
        logged = rec.log(step=1)
    assert set(logged) == {"serve/moe/load_max_over_mean/layer_0", "serve/moe/load_max_over_mean/layer_1"}
    assert tracking.run_info(run.info.run_id).data.metrics == pytest.approx(logged)
