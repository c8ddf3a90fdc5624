import json

from dsv3.posttrain.config import DataGenConfig
from dsv3.posttrain.rewards import Combined, MathReward
from dsv3.posttrain.sft_data import (build_sft_dataset, read_dataset, rejection_sample, split, write_dataset)

from .conftest import tiny_model


def test_generated_dataset_is_deterministic_and_verified(tmp_path):
    cfg = DataGenConfig(n_arithmetic=50, n_algebra=20, n_code=10, seed=5)
    a, b = build_sft_dataset(cfg), build_sft_dataset(cfg)
    assert a == b and len({r["id"] for r in a}) == len(a)
    kinds = {r["kind"] for r in a}
    assert kinds == {"arithmetic", "algebra", "code", "instruction"}
    math = [r for r in a if r["kind"] in ("arithmetic", "algebra")]
    assert MathReward()(math, [r["response"] for r in math]) == [1.0] * len(math)
    tr, va = split(a, 0.1)
    assert len(va) == len(a) // 10 and not {r["id"] for r in tr} & {r["id"] for r in va}
    meta = write_dataset(tr, tmp_path, "sft_train", {"generator": "test", "seed": 5})
    assert read_dataset(tmp_path / "sft_train.jsonl") == [json.loads(json.dumps(r)) for r in tr]
    side = json.loads((tmp_path / "sft_train.meta.json").read_text())
    assert side["sha256"] == meta["sha256"] and side["provenance"]["seed"] == 5 and side["n"] == len(tr)


def test_rejection_sampling_keeps_only_verified(tok):
    from dsv3.posttrain.grpo import arithmetic_task

    probs = arithmetic_task(6, seed=0, max_operand=3)
    teacher = tiny_model(tok)
    # a random teacher is (almost) never right; the filter must keep only verified ones
    always_ok = lambda s, r: [1.0] * len(r)  # noqa: E731
    kept, st = rejection_sample(teacher, tok, probs, always_ok, k=2, max_new_tokens=4, teacher_uri="t")
    assert st["samples"] == 12 and 1 <= len(kept) <= 12 and kept[0]["source"] == "teacher:t"
    kept, st = rejection_sample(teacher, tok, probs, Combined([(1.0, MathReward())]), k=2, max_new_tokens=4)
    assert all(MathReward()([k], [k["response"]]) == [1.0] for k in kept)
    assert st["accept_rate"] == len(kept) / 12
