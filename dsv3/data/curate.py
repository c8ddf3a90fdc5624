"""The curation pipeline: stages wired together, with exact accounting (DeepSeek-V3 §4.1).

    ingest -> normalize -> quality -> pii -> exact dedup -> near dedup -> decontam -> split
           -> tokenizer (train split) -> FIM (PSM, rate 0.1, train split) -> pack into shards

Three DVC stages (`curate`, `tokenizer`, `shards`) are the three functions below; the CLI
`dsv3 data curate` runs all three. Per-document work (normalize, quality, PII, content
hash, MinHash signature) is `process_batch`, a pure function on a batch of documents,
mapped in-process or on Ray (`workers > 0` or `ray_address`) with identical results;
the LSH bands of near dedup go through the same mapper. Global stages run in the driver
in input order, so outputs do not depend on the worker count.
Accounting: every input item lands in exactly one bucket (`kept`, `filtered:<rule>`,
`exact_dup`, `near_dup`, `decontaminated`, `rejected:<reason>`); rejects are written with
their source location to `quarantine.jsonl`, removed documents (id + bucket, no text) to
`removed.jsonl`; `stats.json` asserts input == sum(buckets).
Layout under OUT: curated/{train,val,quarantine,removed}.jsonl, stats.json,
tokenizer/, tokenizer_stats.json, shards/{index.json,train.bin,val.bin}, shards_stats.json.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from pathlib import Path
from typing import Callable

import numpy as np

from dsv3.data import decontam, dedup
from dsv3.data.config import DataConfig
from dsv3.data.normalize import normalize
from dsv3.data.pii import scrub
from dsv3.data.quality import quality
from dsv3.data.sources import iter_sources

PER_DOC_STAGES = ("normalize", "quality", "pii")


class AccountingError(RuntimeError):
    pass


def process_batch(task: tuple[list[dict], DataConfig]) -> tuple[list[dict], list[dict], dict, list]:
    """Per-document stages on one batch -> (kept docs, removed, per-stage stats, signatures)."""
    docs, cfg = task
    stats = {s: Counter() for s in PER_DOC_STAGES}
    kept, removed, sigs = [], [], []
    for doc in docs:
        d = normalize(doc, cfg, stats["normalize"])
        d = d and quality(d, cfg, stats["quality"])
        d = d and scrub(d, cfg, stats["pii"])
        if d is None:
            removed.append(_removed(doc, doc.pop("drop")))
            continue
        d["hash"] = dedup.content_hash(d["text"])
        d["n_bytes"] = len(d["text"].encode("utf-8", "surrogatepass"))
        kept.append(d)
        sigs.append(dedup.minhash(d["text"], cfg.dedup) if cfg.dedup.near else None)
    return kept, removed, {k: dict(v) for k, v in stats.items()}, sigs


def _removed(doc: dict, bucket: str, **extra) -> dict:
    return {"id": doc["id"], "bucket": bucket, "source": doc["source"], "path": doc["path"], "loc": doc["loc"], **extra}


def make_mapper(cfg: DataConfig) -> Callable:
    if cfg.workers > 0 or cfg.ray_address:
        from dsv3.cluster import ray_init, ray_map

        ray_init(cfg.ray_address, num_cpus=cfg.workers or None)
        return lambda fn, items: ray_map(fn, list(items), max(1, cfg.workers))
    return lambda fn, items: list(map(fn, items))


def split_of(h: str, cfg: DataConfig) -> str:
    x = int.from_bytes(hashlib.blake2b(f"{cfg.split.seed}:{h}".encode(), digest_size=8).digest(), "big")
    return "val" if x / 2**64 < cfg.split.val_fraction else "train"


def _write_jsonl(path: Path, rows) -> int:
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
            n += 1
    return n


def assign_splits(kept: list[dict], cfg: DataConfig) -> dict[str, list[dict]]:
    """Each document's split (`split_of` its content hash, written into d["split"]); never an empty
    val split when a val fraction is asked for and there are two documents or more."""
    split_rows: dict[str, list[dict]] = {"train": [], "val": []}
    for d in kept:
        d["split"] = split_of(d["hash"], cfg)
        split_rows[d["split"]].append(d)
    if not split_rows["val"] and cfg.split.val_fraction > 0 and len(kept) > 1:
        d = min(split_rows["train"], key=lambda x: x["hash"])
        split_rows["train"].remove(d)
        d["split"] = "val"
        split_rows["val"].append(d)
    return split_rows


def curate(cfg: DataConfig, out: str | Path, mapper: Callable | None = None) -> dict:
    """Stage `curate`: sources -> OUT/curated/*.jsonl + OUT/stats.json; returns the stats."""
    t0 = time.time()
    out = Path(out)
    cur = out / "curated"
    cur.mkdir(parents=True, exist_ok=True)
    mapper = mapper or make_mapper(cfg)
    buckets, stages = Counter(), {}
    docs, quarantine, n_input, in_bytes = [], [], 0, 0
    for item in iter_sources(cfg):
        n_input += 1
        if "reason" in item:
            quarantine.append(item)
            buckets[f"rejected:{item['reason']}"] += 1
        else:
            in_bytes += len(item["text"].encode("utf-8", "surrogatepass"))
            docs.append(item)
    stages["ingest"] = {"input": n_input, "docs": len(docs), "rejected": len(quarantine), "bytes": in_bytes}
    batches = [(docs[i:i + cfg.batch_size], cfg) for i in range(0, len(docs), cfg.batch_size)]
    kept, removed, sigs = [], [], []
    per = {s: Counter() for s in PER_DOC_STAGES}
    for k, r, st, sg in mapper(process_batch, batches):
        kept += k
        removed += r
        sigs += sg
        for s in PER_DOC_STAGES:
            per[s].update(st[s])
    stages.update({s: dict(per[s]) for s in PER_DOC_STAGES})
    for r in removed:
        buckets[r["bucket"]] += 1

    def drop(keep_mask_from: list, bucket: str, dup_key: str | None = None):
        nonlocal kept, sigs
        nk, ns = [], []
        for d, s, x in zip(kept, sigs, keep_mask_from):
            if x is None:
                nk.append(d)
                ns.append(s)
            else:
                extra = {dup_key: kept[x]["id"]} if dup_key else {}
                removed.append(_removed(d, bucket, **extra))
                buckets[bucket] += 1
        kept, sigs = nk, ns

    if cfg.dedup.exact:
        res, st = dedup.exact_dedup([d["hash"] for d in kept])
        stages["exact_dedup"] = dict(st)
        drop(res, "exact_dup", "dup_of")
    if cfg.dedup.near and kept:
        res, st = dedup.near_dedup(np.stack(sigs), cfg.dedup, mapper)
        stages["near_dedup"] = dict(st)
        drop(res, "near_dup", "dup_of")
    if cfg.decontam.enabled:
        grams, st = decontam.load_eval_ngrams(cfg.decontam)
        res = [0 if decontam.is_contaminated(d["text"], grams, cfg.decontam.ngram) else None for d in kept]
        st["decontaminated"] = sum(x is not None for x in res)
        stages["decontam"] = dict(st)
        drop(res, "decontaminated")
    split_rows = assign_splits(kept, cfg)
    buckets["kept"] = len(kept)
    for s, rows in split_rows.items():
        _write_jsonl(cur / f"{s}.jsonl", rows)
    _write_jsonl(cur / "quarantine.jsonl", quarantine)
    _write_jsonl(cur / "removed.jsonl", removed)
    stages["split"] = {s: len(r) for s, r in split_rows.items()}
    total = sum(buckets.values())
    if total != n_input:
        raise AccountingError(f"accounting broken: input {n_input} != sum of buckets {total} ({dict(buckets)})")
    secs = time.time() - t0
    stats = {"input": n_input, "buckets": dict(sorted(buckets.items())), "kept": len(kept),
             "removed": len(removed), "quarantined": len(quarantine), "input_bytes": in_bytes,
             "kept_bytes": sum(d["n_bytes"] for d in kept), "seconds": round(secs, 3),
             "docs_per_s": round(n_input / max(secs, 1e-9), 1), "stages": stages}
    (out / "stats.json").write_text(json.dumps(stats, indent=1))
    return stats


def read_split(out: str | Path, split: str) -> list[dict]:
    p = Path(out) / "curated" / f"{split}.jsonl"
    with open(p, encoding="utf-8") as f:
        return [json.loads(l) for l in f if l.strip()]


def tokenizer_stage(cfg: DataConfig, out: str | Path) -> dict:
    """Stage `tokenizer`: train BPE on OUT/curated/train.jsonl -> OUT/tokenizer/."""
    from dsv3.data.tokenizer import train_tokenizer

    out = Path(out)
    t0 = time.time()
    st = train_tokenizer((d["text"] for d in read_split(out, "train")), out / "tokenizer", cfg.tokenizer)
    stats = {**st, "seconds": round(time.time() - t0, 3)}
    (out / "tokenizer_stats.json").write_text(json.dumps(stats, indent=1))
    return stats


def shards_stage(cfg: DataConfig, out: str | Path) -> dict:
    """Stage `shards`: FIM (train split) + tokenize + pack -> OUT/shards/ (dsv3.data.shards format)."""
    from dsv3.data.fim import maybe_fim
    from dsv3.data.shards import write_split
    from dsv3.data.tokenizer import BOS, EOS, load_raw

    out = Path(out)
    tok = load_raw(out / "tokenizer")
    bos, eos, vocab = tok.token_to_id(BOS), tok.token_to_id(EOS), tok.get_vocab_size()
    sd = out / "shards"
    if (sd / "index.json").exists():
        (sd / "index.json").unlink()
    stats: dict = {"vocab_size": vocab, "seq_len": cfg.seq_len}
    for split in ("train", "val"):
        docs = read_split(out, split)
        texts, n_fim = [], 0
        for d in docs:
            t, applied = maybe_fim(d["text"], d["hash"], cfg.fim.rate if split == "train" else 0.0, cfg.fim.seed)
            texts.append(t)
            n_fim += applied
        enc = tok.encode_batch(texts, add_special_tokens=False) if texts else []
        ids = [[bos] + e.ids + [eos] for e in enc]
        n_bytes = sum(d["n_bytes"] for d in docs)
        entry = write_split(sd, split, ids, vocab, n_bytes=n_bytes)
        stats[split] = {"docs": entry["n_docs"], "tokens": entry["n_tokens"], "bytes": n_bytes, "fim_docs": n_fim,
                        "sequences": entry["n_tokens"] // (cfg.seq_len + 1),
                        "bytes_per_token": round(n_bytes / max(1, entry["n_tokens"]), 4)}
    idx = json.loads((sd / "index.json").read_text())
    idx.update(bos_id=bos, eos_id=eos)
    (sd / "index.json").write_text(json.dumps(idx))
    (out / "shards_stats.json").write_text(json.dumps(stats, indent=1))
    return stats


def run_all(cfg: DataConfig, out: str | Path) -> dict:
    s = curate(cfg, out)
    return {"curate": s, "tokenizer": tokenizer_stage(cfg, out), "shards": shards_stage(cfg, out)}
