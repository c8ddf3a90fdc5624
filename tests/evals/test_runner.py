"""evaluate_checkpoint(): benchmarks + bits-per-byte logged to MLflow on an eval run linked to the
checkpoint's training run; `dsv3 eval compare` prints a table and writes a PNG."""

import math

import numpy as np
import pytest

from dsv3.evals.config import EvalConfig


@pytest.fixture()
def store(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlruns.db")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_eval_config_forbids_unknown_keys():
    from dsv3.config import RunConfig
    from dsv3.model.config import ConfigError

    assert RunConfig.load(overrides=["eval.limit=3", "eval.tasks=[mmlu]"]).eval.limit == 3
    with pytest.raises(ConfigError, match="eval.limt"):
        RunConfig.load(overrides=["eval.limt=3"])
    with pytest.raises(ConfigError, match="eval.tasks"):
        RunConfig.load(overrides=["eval.tasks=[gsm8k]"])


def test_evaluate_logs_to_mlflow_linked_run_and_compare(store, tiny_ckpt, tiny_data):
    from dsv3 import tracking
    from dsv3.data.shards import write_split
    from dsv3.evals.cli import _compare
    from dsv3.evals.runner import evaluate_checkpoint, source_run_id
    from dsv3.evals.tasks import PRIMARY

    # a "training run" that registered the checkpoint
    with tracking.start_run({"x": 1}, stage="pretrain") as run:
        train_id = run.info.run_id
        version = tracking.register_model(tiny_ckpt, "tiny-eval")
    uri = f"models:/tiny-eval/{version}"
    assert source_run_id(uri) == train_id

    # a curated validation split with n_bytes for bits-per-byte
    rng = np.random.default_rng(0)
    docs = [rng.integers(8, 512, size=60).tolist() for _ in range(4)]
    write_split(store / "shards", "val", docs, vocab_size=512, n_bytes=4 * 60 * 3)

    cfg = EvalConfig(tasks=["mmlu", "drop", "humaneval"], limit=2, data_dir=str(tiny_data), max_gen_toks=8,
                     mmlu_subjects=["anatomy", "abstract_algebra"], batch_size=8, bpb_shards=str(store / "shards"),
                     bpb_seq_len=64)
    res = evaluate_checkpoint(uri, cfg, run_name="eval-a")
    m = res["metrics"]
    assert res["offline"] and res["run_id"]
    for key in ("eval/mmlu/acc", "eval/mmlu/anatomy/acc", "eval/mmlu/anatomy/acc_stderr", "eval/drop/em",
                "eval/drop/f1", "eval/humaneval/pass_at_1", "eval/bpb"):
        assert key in m and math.isfinite(m[key]), key
    # a random model over a 512-token vocabulary: ~ln(512) nats per token, 3 bytes per token
    assert abs(m["eval/val_loss"] - math.log(512)) < 1.5
    assert m["eval/bpb"] == pytest.approx(m["eval/val_loss"] / math.log(2) / 3, rel=0.05)

    r = tracking.run_info(res["run_id"])
    assert r.data.tags["mlflow.parentRunId"] == train_id and r.data.tags["stage"] == "eval"
    assert r.data.tags["checkpoint_uri"] == uri and r.data.params["eval.limit"] == "2"
    assert r.data.metrics["eval/mmlu/acc"] == pytest.approx(m["eval/mmlu/acc"])
    from mlflow.tracking import MlflowClient

    arts = {a.path for a in MlflowClient().list_artifacts(res["run_id"], "eval")}
    assert {"eval/results.md", "eval/mmlu_samples.jsonl", "eval/eval_config.json"} <= arts
    assert set(PRIMARY) <= {k.split("/")[1] for k in m}

    # second run from a plain directory path: an unlinked eval run; then compare both
    res2 = evaluate_checkpoint(str(tiny_ckpt), cfg.model_copy(update={"tasks": ["mmlu"], "bpb_shards": None}),
                    run_name="eval-b")
    assert "mlflow.parentRunId" not in tracking.run_info(res2["run_id"]).data.tags

    class A:
        runs = [res["run_id"], res2["run_id"]]
        out = str(store / "cmp.png")

    assert _compare(A) == 0
    png = store / "cmp.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from dsv3.evals.report import compare

    table, _ = compare(A.runs, png)
    row = next(line for line in table.splitlines() if line.startswith("| eval/mmlu/acc |"))
    assert row.count("±") == 2 and "eval-a" in table and "eval-b" in table
    assert next(line for line in table.splitlines() if line.startswith("| eval/bpb |")).endswith("| — |")


def test_source_run_id_from_training_checkpoint_layout(tmp_path):
    import json

    from dsv3.evals.runner import find_latest_checkpoint, source_run_id

    for step, rid in (("step_00000010", "aaa"), ("step_00000020", "bbb")):
        d = tmp_path / "runs" / "pretrain" / "checkpoints" / step
        (d / "model").mkdir(parents=True)
        (d / "model" / "config.json").write_text("{}")
        (d / "state.json").write_text(json.dumps({"step": 1, "mlflow_run_id": rid}))
    latest = find_latest_checkpoint(tmp_path / "runs")
    assert latest.endswith("step_00000020/model") and source_run_id(latest) == "bbb"
    assert source_run_id("runs:/abc123/model") == "abc123"
    assert find_latest_checkpoint(tmp_path / "nothing") == "models:/dsv3/latest"
