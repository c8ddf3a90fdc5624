"""The eval path (runner -> lm-eval -> tasks.pass_at_k -> sandbox) with the real harness and a tiny
model. "No mechanism" is the real switch $DSV3_SANDBOX_MECHANISMS=none, not a mock.

The HumanEval problem here passes whatever the model writes (its completion lands inside a string
literal the test closes) and its test writes a marker into /tmp: pass@1 = 1 shows the program ran;
the marker on the host's /tmp shows whether it ran contained (absent: the sandbox's private /tmp)
or not (present: --unsafe-no-sandbox)."""

import json
import os
import secrets

import pytest

from dsv3 import tracking
from dsv3.evals import runner
from dsv3.evals.config import EvalConfig
from dsv3.evals.sandbox import ENV_MECHANISMS, UNSAFE_FLAG, SandboxUnavailable
from dsv3.evals.tasks import ENV


@pytest.fixture()
def case(tmp_path, monkeypatch, tiny_ckpt):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlruns.db")
    monkeypatch.chdir(tmp_path)
    mark = f"/tmp/dsv3-eval-mark-{secrets.token_hex(6)}"
    prob = {"task_id": "Test/0", "entry_point": "f", "canonical_solution": "\n",
            "prompt": 'def f():\n    return 1\n\n\nNOTE = """', "test": (
                f'"""\n\n\ndef check(fn):\n    open({mark!r}, "w").write("ran")\n    assert fn() == 1\n')}
    (tmp_path / "data" / "humaneval").mkdir(parents=True)
    (tmp_path / "data" / "humaneval" / "HumanEval.jsonl").write_text(json.dumps(prob) + "\n")
    monkeypatch.setenv(ENV, str(tmp_path / "data"))
    runner._LM_CACHE.clear()
    yield tmp_path, mark
    if os.path.exists(mark):
        os.remove(mark)


def _cfg(data, **kw):
    return EvalConfig(tasks=["humaneval"], limit=1, data_dir=str(data), max_gen_toks=8, batch_size=8, **kw)


def test_humaneval_refused_without_mechanism_before_loading(case, tiny_ckpt, monkeypatch):
    d, mark = case
    monkeypatch.setenv(ENV_MECHANISMS, "none")
    with pytest.raises(SandboxUnavailable) as e:
        runner.evaluate_checkpoint(str(tiny_ckpt), _cfg(d / "data"))
    assert "bubblewrap (bwrap)" in str(e.value) and UNSAFE_FLAG in str(e.value)
    assert not runner._LM_CACHE  # refused before the model was loaded or anything generated
    res = runner.evaluate_checkpoint(str(tiny_ckpt), _cfg(d / "data").model_copy(update={"tasks": []}), tracking=False)
    assert res["metrics"] == {}  # an eval without HumanEval needs no sandbox


@pytest.mark.slow
def test_humaneval_runs_sandboxed_and_tags_the_run(case, tiny_ckpt):
    d, mark = case
    res = runner.evaluate_checkpoint(str(tiny_ckpt), _cfg(d / "data"))
    assert res["metrics"]["eval/humaneval/pass_at_1"] == 1.0  # the program ran ...
    assert not os.path.exists(mark)  # ... in the sandbox: its /tmp was private
    tags = tracking.run_info(res["run_id"]).data.tags
    assert tags["sandbox"] == "bwrap" and tags["unsafe_no_sandbox"] == "False"


@pytest.mark.slow
def test_cli_unsafe_no_sandbox_runs_uncontained_warns_and_tags(case, tiny_ckpt, monkeypatch, capsys):
    from dsv3.cli import main

    d, mark = case
    monkeypatch.setenv(ENV_MECHANISMS, "none")
    argv = ["eval", "run", "--ckpt", str(tiny_ckpt), "--tasks", "humaneval", "--limit", "1", "--data-dir",
            str(d / "data"), "--set", "eval.max_gen_toks=8"]
    with pytest.raises(SandboxUnavailable):
        main(argv)
    with pytest.warns(RuntimeWarning, match="UNCONTAINED"):
        assert main(argv + [UNSAFE_FLAG]) == 0
    assert os.path.exists(mark)  # uncontained: it wrote the host's /tmp
    run_id = capsys.readouterr().out.split("mlflow run: ")[1].split()[0]
    tags = tracking.run_info(run_id).data.tags
    assert tags["sandbox"] == "none" and tags["unsafe_no_sandbox"] == "True"
