"""Offline tasks through the real harness (`lm_eval.simple_evaluate`) with the dsv3 adapter on
tiny local data: MMLU (2 subjects, 5-shot), DROP (3-shot EM/F1), sandboxed HumanEval."""

import pytest

import dsv3.evals  # noqa: F401
from dsv3.evals.tasks import TASK_DIR, build_predictions, humaneval_rows, pass_at_k


@pytest.fixture(scope="module")
def env(tiny_ckpt, tiny_data, monkeypatch_module):
    from lm_eval.tasks import TaskManager

    from dsv3.evals.adapter import DSV3LM

    monkeypatch_module.setenv("DSV3_EVAL_DATA", str(tiny_data))
    return DSV3LM(str(tiny_ckpt), batch_size=8), TaskManager(include_path=str(TASK_DIR), include_defaults=False)


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def _run(env, tasks, n, **kw):
    import lm_eval

    lm, tm = env
    return lm_eval.simple_evaluate(model=lm, tasks=tasks, num_fewshot=n, task_manager=tm, log_samples=True,
                                   confirm_run_unsafe_code=True, **kw)


def test_all_57_mmlu_subjects_configured():
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=str(TASK_DIR), include_defaults=False)
    subj = [t for t in tm.all_subtasks if t.startswith("dsv3_mmlu_")]
    assert len(subj) == 57 and "dsv3_mmlu" in tm.all_groups and "dsv3_drop" in tm.all_tasks


def test_mmlu_offline_5shot(env, tiny_data):
    res = _run(env, ["dsv3_mmlu_abstract_algebra", "dsv3_mmlu_anatomy"], 5)
    r = res["results"]["dsv3_mmlu_anatomy"]
    assert 0.0 <= r["acc,none"] <= 1.0 and "acc_stderr,none" in r
    s = res["samples"]["dsv3_mmlu_anatomy"][0]
    prompt = s["arguments"][0][0]
    # lm-eval's MMLU prompt: description + 5 dev shots + question, answer letters as choices
    assert prompt.startswith("The following are multiple choice questions (with answers) about anatomy.\n\n")
    assert prompt.count("\nAnswer:") == 6 and prompt.endswith("\nD. skin\nAnswer:")
    assert [a[1] for a in s["arguments"]] == [" A", " B", " C", " D"]
    # acc is the argmax over the 4 scored letters
    lls = [x[0] for x in s["filtered_resps"]]
    assert s["acc"] == float(max(range(4), key=lambda i: lls[i]) == s["target"])


def test_drop_offline_3shot(env):
    res = _run(env, ["dsv3_drop"], 3, gen_kwargs="max_gen_toks=16")
    r = res["results"]["dsv3_drop"]
    assert {"em,none", "f1,none"} <= set(r) and r["em,none"] <= r["f1,none"] + 1e-9
    s = res["samples"]["dsv3_drop"][0]
    ctx = s["arguments"][0][0]
    assert ctx.count("The Lions scored first.") == 4  # 3 shots + the question
    assert "." not in s["resps"][0][0]  # cut at the stop string


def test_humaneval_task_runs_in_sandbox(env):
    res = _run(env, ["dsv3_humaneval"], 0, limit=2, gen_kwargs="max_gen_toks=16")
    r = res["results"]["dsv3_humaneval"]
    assert r["pass@1,create_test"] == 0.0  # a random tiny model does not solve HumanEval
    s = res["samples"]["dsv3_humaneval"][0]
    fr = s["filtered_resps"][0]
    assert (fr[0] if isinstance(fr, list) else fr).startswith(s["doc"]["prompt"])
    for stop in ("\nclass", "\ndef", "\n#", "\nif", "\nprint"):
        assert stop not in s["resps"][0][0]


def test_pass_at_k_metric_with_canonical_and_wrong_solutions():
    docs = humaneval_rows()[:4]
    refs = [f"{d['test']}\ncheck({d['entry_point']})" for d in docs]
    good = build_predictions([[d["canonical_solution"]] for d in docs], docs)
    assert pass_at_k(refs, good, k=[1]) == {"pass@1": 1.0}
    bad = build_predictions([["    return None\n"] for d in docs], docs)
    assert pass_at_k(refs, bad, k=[1]) == {"pass@1": 0.0}
    mixed = [[g[0], b[0]] for g, b in zip(good, bad)]
    assert pass_at_k(refs, mixed, k=[1, 2]) == {"pass@1": 0.5, "pass@2": 1.0}
