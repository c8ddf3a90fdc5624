import pytest

from dsv3.posttrain.rewards import (CodeReward, Combined, FormatReward, MathReward, extract_answer,
                                    numeric_equal)
from dsv3.posttrain.sft_data import algebra_problems, arithmetic_problems, code_tasks


@pytest.mark.parametrize("text,ans", [
    ("so x = 3. \\boxed{3}", "3"), ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"), ("first 4\nthe answer is 12", "12"),
    ("\\boxed{1} then \\boxed{2}", "2"), ("no numbers here", None), ("total: 1,000.", "1,000"),
])
def test_extract_answer(text, ans):
    assert extract_answer(text) == ans


@pytest.mark.parametrize("a,b,eq", [
    ("1/2", "0.5", True), ("2/4", "1/2", True), ("\\frac{1}{2}", "0.5", True), ("1,000", "1000", True),
    ("-3", "-3.0", True), ("0.33", "1/3", False), ("7", "8", False), (None, "1", False), ("x+1", "x+1", True),
])
def test_numeric_equal(a, b, eq):
    assert numeric_equal(a, b) is eq


def test_math_and_format_rewards_on_generated_problems():
    probs = arithmetic_problems(20, seed=1) + algebra_problems(20, seed=1)
    good = [p["response"] for p in probs]
    assert MathReward()(probs, good) == [1.0] * 40  # reference responses verify
    assert FormatReward()(probs, good) == [1.0] * 40
    bad = [f"\\boxed{{{p['answer']}1}}" for p in probs]
    assert sum(MathReward()(probs, bad)) == 0
    assert FormatReward()(probs[:1], ["the answer is " + probs[0]["answer"]]) == [0.0]
    assert MathReward()(probs[:1], ["the answer is\n" + probs[0]["answer"]]) == [1.0]  # final line


def test_code_reward_runs_unit_tests_in_sandbox():
    tasks = code_tasks(4, seed=0)
    ok = CodeReward(timeout_s=10)(tasks, [t["response"] for t in tasks])
    assert ok == [1.0] * 4
    wrong = [t["response"].replace("return ", "return 1 + ", 1) for t in tasks]
    assert CodeReward(timeout_s=10)(tasks, wrong) == [0.0] * 4
    loop = CodeReward(timeout_s=1)(tasks[:1], ["while True: pass"])
    assert loop == [0.0]


def test_combined_is_a_weighted_sum_and_kinds_do_not_leak():
    p = arithmetic_problems(1, seed=3)[0]
    c = code_tasks(1)[0]
    r = Combined([(1.0, MathReward()), (0.25, FormatReward()), (1.0, CodeReward())])
    assert r([p, c], [p["response"], p["response"]]) == [1.25, 0.0]
