"""Reports on a curated data directory (§4.1): the text accounting, MLflow metrics, the markdown summary.

All three read the stage outputs under DIR (`stats.json` from curate, `tokenizer_stats.json`,
`shards_stats.json`) and nothing else, so `dsv3 data stats`, the data flow's MLflow run and its
Prefect artifact show the same numbers. Metric names are namespaced `data/...`
(`data/bucket/filtered/min_words`, `data/train/tokens`, ...).
"""

from __future__ import annotations

import json
from pathlib import Path

STATS_FILES = ("stats.json", "tokenizer_stats.json", "shards_stats.json")
SPLITS = ("train", "val")


def _read(d: Path, name: str) -> dict:
    p = d / name
    return json.loads(p.read_text()) if p.is_file() else {}


def format_stats(out: str | Path) -> str:
    """The accounting of DIR as text: every bucket with its share, and whether they sum to the input."""
    out = Path(out)
    if not (out / "stats.json").is_file():
        raise FileNotFoundError(f"no stats.json in {out}")
    s = _read(out, "stats.json")
    lines = [f"input documents: {s['input']}  ({s['input_bytes']} bytes)"]
    for k, v in s["buckets"].items():
        lines.append(f"  {k:<32} {v:>8}  {100 * v / max(1, s['input']):6.2f}%")
    ok = sum(s["buckets"].values()) == s["input"]
    lines.append(f"  {'sum of buckets':<32} {sum(s['buckets'].values()):>8}  ({'= input' if ok else 'MISMATCH'})")
    for name in STATS_FILES[1:]:
        if (out / name).is_file():
            lines.append(f"{name}: {(out / name).read_text().strip()}")
    return "\n".join(lines)


def metrics(data_dir: str | Path) -> dict[str, float]:
    """MLflow metrics of a curated DIR: input/kept counts and bytes, every bucket, vocab size, per-split shards."""
    d = Path(data_dir)
    stats, tok, shards = (_read(d, n) for n in STATS_FILES)
    m = {"data/input": stats["input"], "data/kept": stats["kept"], "data/input_bytes": stats["input_bytes"],
         "data/kept_bytes": stats["kept_bytes"], "data/vocab_size": tok.get("vocab_size", 0)}
    m.update({f"data/bucket/{k.replace(':', '/')}": v for k, v in stats["buckets"].items()})
    for split in SPLITS:
        for k in ("docs", "tokens", "fim_docs", "bytes_per_token"):
            if split in shards:
                m[f"data/{split}/{k}"] = shards[split][k]
    return m


def markdown(data_dir: str | Path, digest: str, run_id: str | None, validation: dict,
             outs: dict[str, str]) -> str:
    """The data version as a markdown page: digest, MLflow run, GX result, buckets, splits, DVC outs."""
    d = Path(data_dir)
    stats, shards = _read(d, "stats.json"), _read(d, "shards_stats.json")
    gx = "passed" if validation.get("success") else "FAILED"
    docs = f" ([Data Docs]({validation['docs']}))" if validation.get("docs") else ""
    buckets = "\n".join(f"| {k} | {v} |" for k, v in stats["buckets"].items())
    splits = "\n".join(f"| {s} | {shards[s]['docs']} | {shards[s]['tokens']} | {shards[s]['fim_docs']} |"
                       for s in SPLITS if s in shards)
    lock = "\n".join(f"- `{p}`: `{h}`" for p, h in outs.items())
    return (f"# Data version `{digest}`\n\nMLflow run `{run_id}`; GX: {gx}{docs}\n\n"
            f"| bucket | docs |\n|---|---|\n{buckets}\n| **input** | **{stats['input']}** |\n\n"
            f"| split | docs | tokens | FIM docs |\n|---|---|---|---|\n{splits}\n\n"
            f"outs (dvc.lock md5):\n{lock}")
