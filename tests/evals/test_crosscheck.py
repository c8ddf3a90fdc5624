"""Cross-check against lm-eval's own `hf` backend: a tiny random checkpoint written by
transformers' DeepseekV3ForCausalLM, loaded by both; per-request log-likelihoods agree within
1e-4 and the task metrics are identical. Needs `accelerate` (imported by lm-eval's hf backend)."""

import shutil

import pytest

pytest.importorskip("accelerate")


@pytest.fixture(scope="module")
def hf_ckpt(tiny_ckpt, tmp_path_factory):
    import torch
    from transformers import AutoConfig, DeepseekV3ForCausalLM

    out = tmp_path_factory.mktemp("hfckpt")
    torch.manual_seed(1)
    cfg = AutoConfig.from_pretrained(tiny_ckpt)
    DeepseekV3ForCausalLM(cfg).save_pretrained(out)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_ckpt / f, out / f)
    return out


@pytest.fixture(scope="module")
def pair(hf_ckpt):
    import warnings

    from lm_eval.models.huggingface import HFLM

    from dsv3.evals.adapter import DSV3LM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = HFLM(pretrained=str(hf_ckpt), batch_size=4, device="cpu", dtype="float32")
    return DSV3LM(str(hf_ckpt), batch_size=4), hf


def test_per_request_loglikelihoods_match_hf(pair, tiny_data, monkeypatch):
    import lm_eval
    from lm_eval.tasks import TaskManager

    from dsv3.evals.tasks import TASK_DIR

    ours, hf = pair
    assert ours.tok_encode("Answer: B") == hf.tok_encode("Answer: B")
    monkeypatch.setenv("DSV3_EVAL_DATA", str(tiny_data))
    tm = TaskManager(include_path=str(TASK_DIR), include_defaults=False)
    tasks = ["dsv3_mmlu_anatomy", "dsv3_mmlu_abstract_algebra"]
    kw = dict(tasks=tasks, num_fewshot=5, task_manager=tm, log_samples=True, random_seed=0)
    r_ours = lm_eval.simple_evaluate(model=ours, **kw)
    r_hf = lm_eval.simple_evaluate(model=hf, **kw)
    n = 0
    for t in tasks:
        for a, b in zip(r_ours["samples"][t], r_hf["samples"][t], strict=True):
            assert a["arguments"] == b["arguments"]
            for ra, rb in zip(a["resps"], b["resps"], strict=True):  # [[(loglik, is_greedy)]] per request
                (x, g), (u, h) = ra[0], rb[0]
                assert abs(x - u) < 1e-4 and x != 0.0 and g == h
                n += 1
        assert r_ours["results"][t]["acc,none"] == r_hf["results"][t]["acc,none"]
    assert n == 24


def test_rolling_and_generation_match_hf(pair):
    from lm_eval.api.instance import Instance

    ours, hf = pair
    text = "def add(a, b):\n    return a + b\n" * 30
    roll = [Instance("loglikelihood_rolling", {}, (text,), 0), Instance("loglikelihood_rolling", {}, ("x y",), 1)]
    for a, b in zip(ours.loglikelihood_rolling(roll), hf.loglikelihood_rolling(roll)):
        assert abs(a - b) < 1e-3 * max(1.0, abs(b) / 100)
    gen = [Instance("generate_until", {}, (p, {"until": ["\n#"], "max_gen_toks": 12, "do_sample": False}), i)
           for i, p in enumerate(["def add(a, b):", "Passage: The Lions scored"])]
    assert ours.generate_until(gen) == hf.generate_until(gen)
