"""The in-memory curation path: the reference the streaming pipeline (dsv3.data.curate) must equal.

This is the pipeline as it was before it streamed, kept small on purpose: every document, hash
and signature is held in one process and the global stages (`dedup.exact_dedup`,
`dedup.near_dedup` over all signatures, decontamination, `assign_splits`) run over whole lists,
then whole splits are tokenized at once. Memory grows with the corpus, so it is only for small
corpora: tests/data/test_streaming.py runs both paths on the same inputs and compares every
output, and benchmarks/bench_data.py uses it as the peer whose peak RSS grows with the corpus.
The per-document stages are the same functions (`curate.process_batch`).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np

from dsv3.data import decontam, dedup
from dsv3.data.config import DataConfig
from dsv3.data.curate import (PER_DOC_STAGES, _removed, finish_shards, process_batch, read_split, shard_tokenizer,
                              split_of, split_stats, write_stats)
from dsv3.data.sources import iter_sources


def assign_splits(kept: list[dict], cfg: DataConfig) -> dict[str, list[dict]]:
    """Each document's split by its content hash; never an empty val split (when asked for, >= 2 docs)."""
    rows: dict[str, list[dict]] = {"train": [], "val": []}
    for d in kept:
        d["split"] = split_of(d["hash"], cfg)
        rows[d["split"]].append(d)
    if not rows["val"] and cfg.split.val_fraction > 0 and len(kept) > 1:
        d = min(rows["train"], key=lambda x: x["hash"])
        rows["train"].remove(d)
        d["split"] = "val"
        rows["val"].append(d)
    return rows


def _write_jsonl(path: Path, rows) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def curate_in_memory(cfg: DataConfig, out: str | Path) -> dict:
    """Stage `curate`, in memory: same outputs as `curate.curate` (stats without its "stream" part)."""
    out = Path(out)
    (out / "curated").mkdir(parents=True, exist_ok=True)
    buckets, docs, quarantine, in_bytes = Counter(), [], [], 0
    for item in iter_sources(cfg):
        if "reason" in item:
            quarantine.append(item)
            buckets[f"rejected:{item['reason']}"] += 1
        else:
            in_bytes += len(item["text"].encode("utf-8", "surrogatepass"))
            docs.append(item)
    n_input = len(docs) + len(quarantine)
    stages = {"ingest": {"input": n_input, "docs": len(docs), "rejected": len(quarantine), "bytes": in_bytes}}
    kept, removed, sigs, per = [], [], [], {s: Counter() for s in PER_DOC_STAGES}
    for i in range(0, len(docs), cfg.batch_size):
        k, r, st, sg = process_batch((docs[i:i + cfg.batch_size], cfg))
        kept += k
        removed += r
        sigs += sg
        for s in PER_DOC_STAGES:
            per[s].update(st[s])
    stages.update({s: dict(per[s]) for s in PER_DOC_STAGES})
    buckets.update(r["bucket"] for r in removed)

    def drop(res: list, bucket: str, dup: bool) -> None:
        nonlocal kept, sigs
        for d, x in zip(kept, res):
            if x is not None:
                removed.append(_removed(d, bucket, **({"dup_of": kept[x]["id"]} if dup else {})))
                buckets[bucket] += 1
        keep = [x is None for x in res]
        kept, sigs = [d for d, k in zip(kept, keep) if k], [s for s, k in zip(sigs, keep) if k]

    if cfg.dedup.exact:
        res, st = dedup.exact_dedup([d["hash"] for d in kept])
        stages["exact_dedup"] = dict(st)
        drop(res, "exact_dup", True)
    if cfg.dedup.near and kept:
        res, st = dedup.near_dedup(np.stack(sigs), cfg.dedup)
        stages["near_dedup"] = dict(st)
        drop(res, "near_dup", True)
    if cfg.decontam.enabled:
        grams, st = decontam.load_eval_ngrams(cfg.decontam)
        res = [0 if decontam.is_contaminated(d["text"], grams, cfg.decontam.ngram) else None for d in kept]
        st["decontaminated"] = sum(x is not None for x in res)
        stages["decontam"] = dict(st)
        drop(res, "decontaminated", False)
    rows = assign_splits(kept, cfg)
    buckets["kept"] = len(kept)
    for name, r in (*rows.items(), ("quarantine", quarantine), ("removed", removed)):
        _write_jsonl(out / "curated" / f"{name}.jsonl", r)
    stages["split"] = {s: len(r) for s, r in rows.items()}
    stats = {"input": n_input, "buckets": dict(sorted(buckets.items())), "kept": len(kept), "removed": len(removed),
             "quarantined": len(quarantine), "input_bytes": in_bytes, "kept_bytes": sum(d["n_bytes"] for d in kept),
             "stages": stages}
    write_stats(out / "stats.json", stats)
    return stats


def shards_in_memory(cfg: DataConfig, out: str | Path) -> dict:
    """Stage `shards`, in memory: each split FIM'd and tokenized as one list, then written."""
    from dsv3.data.fim import maybe_fim
    from dsv3.data.shards import write_split

    out = Path(out)
    tok, bos, eos, vocab = shard_tokenizer(out)
    stats: dict = {"vocab_size": vocab, "seq_len": cfg.seq_len}
    for split in ("train", "val"):
        docs = read_split(out, split)
        fim = [maybe_fim(d["text"], d["hash"], cfg.fim.rate if split == "train" else 0.0, cfg.fim.seed) for d in docs]
        enc = tok.encode_batch([t for t, _ in fim], add_special_tokens=False) if docs else []
        n_bytes = sum(d["n_bytes"] for d in docs)
        e = write_split(out / "shards", split, [[bos] + x.ids + [eos] for x in enc], vocab, n_bytes=n_bytes)
        stats[split] = split_stats(e, n_bytes, sum(a for _, a in fim), cfg.seq_len)
    return finish_shards(out, bos, eos, stats)
