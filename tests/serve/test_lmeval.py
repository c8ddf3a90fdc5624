"""lm-eval's `local-completions` model type against the server scores MMLU (5-shot, offline
task YAMLs of dsv3.evals) with the same per-request log-likelihoods as the in-process `dsv3`
adapter: the server's `echo` + `logprobs` completions are what lm-eval reads."""

import json
import warnings

import pytest

QUESTIONS = {
    "anatomy": [("Which organ pumps blood?", ["lung", "heart", "liver", "skin"], 1),
                ("How many lungs do humans have?", ["1", "2", "3", "4"], 1),
                ("Where is the femur?", ["arm", "leg", "head", "chest"], 1)],
    "abstract_algebra": [("Find the order of 2 in Z_5.", ["1", "2", "4", "5"], 2),
                         ("Is Z_4 a field?", ["yes", "no", "maybe", "never"], 1)],
}


@pytest.fixture(scope="module")
def mmlu_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("evaldata")
    for subj, rows in QUESTIONS.items():
        for split, part in (("dev", (rows * 3)[:5]), ("test", rows)):
            p = d / "mmlu" / subj / f"{split}.jsonl"
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text("".join(json.dumps({"question": q, "subject": subj, "choices": c, "answer": a}) + "\n"
                                 for q, c, a in part))
    return d


def test_local_completions_matches_the_dsv3_adapter(tiny_dir, mmlu_dir, monkeypatch):
    import lm_eval
    from lm_eval.models.openai_completions import LocalCompletionsAPI
    from lm_eval.tasks import TaskManager

    from dsv3.evals.adapter import DSV3LM
    from dsv3.evals.tasks import TASK_DIR
    from dsv3.serve.config import ServeConfig
    from dsv3.serve.server import Server

    monkeypatch.setenv("DSV3_EVAL_DATA", str(mmlu_dir))
    tm = TaskManager(include_path=str(TASK_DIR), include_defaults=False)
    tasks = ["dsv3_mmlu_anatomy", "dsv3_mmlu_abstract_algebra"]
    kw = dict(tasks=tasks, num_fewshot=5, task_manager=tm, log_samples=True, random_seed=0)
    ours = lm_eval.simple_evaluate(model=DSV3LM(str(tiny_dir), batch_size=4), **kw)
    with Server(ServeConfig(model=str(tiny_dir), port=0, block_size=16, cache_tokens=16384)) as srv:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            api = LocalCompletionsAPI(base_url=srv.url + "/v1/completions", model=srv.name,
                                      tokenizer_backend="huggingface", tokenizer=str(tiny_dir), batch_size=4,
                                      max_length=512)
        theirs = lm_eval.simple_evaluate(model=api, **kw)
        served = srv.engine.metrics.requests.labels(finish_reason="length")._value.get()
    n = 0
    for t in tasks:
        for a, b in zip(ours["samples"][t], theirs["samples"][t], strict=True):
            assert a["arguments"] == b["arguments"]
            for ra, rb in zip(a["resps"], b["resps"], strict=True):
                (x, g), (u, h) = ra[0], rb[0]
                assert abs(x - u) < 1e-4 and x != 0.0 and g == h
                n += 1
        assert ours["results"][t]["acc,none"] == theirs["results"][t]["acc,none"]
    assert n == 4 * sum(len(v) for v in QUESTIONS.values()) and served >= n
