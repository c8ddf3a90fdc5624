"""MLflow content of a training run (params, namespaced metrics, system metrics, dataset
input, tags, plots, checkpoint artifacts, registered version) and precision / recompute
modes of the loop."""

import pytest
import torch

from dsv3 import tracking
from dsv3.config import RunConfig
from dsv3.model.transformer import DeepSeekV3
from dsv3.train.loop import train
from dsv3.train.recompute import apply_recompute
from tests.train.conftest import tiny_cfg


def test_run_is_fully_tracked(tiny_shards, tmp_path, mlflow_uri):
    cfg = tiny_cfg(tiny_shards, tmp_path / "run", "train.plots=true", "train.register_model=true",
                   "train.log_checkpoints=true", "train.steps=4", "train.eval_every=2")
    res = train(cfg)
    run = tracking.run_info(res.run_id)
    p, m, tags = run.data.params, run.data.metrics, run.data.tags
    assert p["train.steps"] == "4" and p["model.hidden_size"] == "64" and "derived.total_tokens" in p
    for k in ("train/loss", "train/mtp_loss_1", "train/balance_loss", "train/lr", "train/grad_norm",
              "perf/tokens_per_s", "perf/mfu", "moe/load_max_over_mean/layer_0", "moe/bias_norm",
              "val/loss", "val/bpb", "val/ema_loss"):
        assert k in m, k
    assert len(tracking.metric_history(res.run_id, "train/loss")) == 4
    assert tags["stage"] == "pretrain" and tags.get("git_commit") and tags.get("dvc_data_digest")
    assert run.inputs.dataset_inputs and run.inputs.dataset_inputs[0].dataset.digest
    from mlflow.tracking import MlflowClient

    arts = {a.path for a in MlflowClient().list_artifacts(res.run_id, "plots")}
    assert {"plots/loss_curves.png", "plots/expert_load_heatmap.png"} <= arts
    assert MlflowClient().list_artifacts(res.run_id, "checkpoints/step_00000004")
    assert res.model_version == "1" and res.model_uri == "models:/dsv3-base/1"  # no tokenizer: a plain folder
    assert tags["registered_model"] == res.model_uri
    local = tracking.resolve_model_uri("models:/dsv3-base/1")
    DeepSeekV3.from_pretrained(local)  # the registered version is a loadable HF directory


@pytest.mark.parametrize("precision", ["bf16", "fp8"])
def test_low_precision_trains(tiny_shards, tmp_path, precision):
    cfg = tiny_cfg(tiny_shards, tmp_path / precision, f"train.precision={precision}", "train.steps=2",
                   "train.ema=false")
    res = train(cfg, track=False)
    assert len(res.history) == 2 and all(h["train/loss"] == h["train/loss"] for h in res.history)


@pytest.mark.parametrize("mode", ["norm_up", "block"])
def test_recompute_matches_plain(mode):
    cfg = RunConfig.load("configs/pretrain_tiny.yaml").model
    torch.manual_seed(0)
    a = DeepSeekV3(cfg)
    b = DeepSeekV3(cfg)
    b.load_state_dict(a.state_dict())
    assert apply_recompute(b, mode) > 0
    x = torch.randint(0, 512, (2, 16))
    la, lb = a(x, labels=x).loss, b(x, labels=x).loss
    la.backward()
    lb.backward()
    assert torch.allclose(la, lb)
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        if pa.grad is not None:
            assert torch.allclose(pa.grad, pb.grad, atol=1e-6), n
