"""The curation pipeline: stages wired together as streams, with exact accounting (DeepSeek-V3 §4.1).

    ingest -> normalize -> quality -> pii -> exact dedup -> near dedup -> decontam -> split
           -> tokenizer (train split) -> FIM (PSM, rate 0.1, train split) -> pack into shards

Three DVC stages (`curate`, `tokenizer`, `shards`) are the three functions below; the CLI
`dsv3 data curate` runs all three. No stage holds the corpus: memory is bounded by a batch
(`batch_size` documents) times the tasks in flight, the spill buffers and one shuffle task's
records (dsv3.data.dedup), plus a few numbers per document (~40 bytes: dedup results, flags).
- curate, pass 1: the sources stream by in batches; `map_batch` (normalize, quality, PII,
  content hash, MinHash signature, decontamination flag, split) runs in-process or as Ray tasks
  (`workers > 0` or `ray_address`; `ray_imap`, 2 tasks per worker in flight, results in input
  order). Rejects go straight to quarantine.jsonl; kept documents to a spill file in input order,
  their hash rows and band rows to hash-partitioned spill buckets, their signatures to a flat file.
- exact dedup and near dedup are shuffles over those buckets (dsv3.data.dedup: `exact_shuffle`,
  `near_shuffle`); the results are per-document integers.
- pass 2 streams the spilled documents once more and writes train/val/removed.
Global decisions are the in-memory ones (first copy wins, cluster root = earliest document,
dedup before decontam, split by content hash), so the outputs equal the in-memory reference
(dsv3.data.reference, checked by tests/data/test_streaming.py) for any batch size or worker count.
Accounting: every input item lands in exactly one bucket (`kept`, `filtered:<rule>`,
`exact_dup`, `near_dup`, `decontaminated`, `rejected:<reason>`); rejects are written with
their source location to `quarantine.jsonl`, removed documents (id + bucket, no text) to
`removed.jsonl` (per-document drops, then exact, near, decontaminated, each in input order);
`stats.json` asserts input == sum(buckets) and records the streaming figures under "stream".
The tokenizer streams train.jsonl through `tokenizers`' iterator API; the shards stage reads
`SHARD_BATCH` documents (at most about `SHARD_BATCH_BYTES` of text) at a time, tokenizes them
(`encode_batch_fast`: ids only) and appends them to the shard files (`ShardWriter`).
Layout under OUT: curated/{train,val,quarantine,removed}.jsonl, stats.json,
tokenizer/, tokenizer_stats.json, shards/{index.json,train.bin,val.bin}, shards_stats.json.
"""

from __future__ import annotations

import functools
import hashlib
import json
import resource
import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from dsv3.data import decontam, dedup
from dsv3.data.config import DataConfig, DecontamConfig
from dsv3.data.normalize import normalize
from dsv3.data.pii import scrub
from dsv3.data.quality import quality
from dsv3.data.sources import iter_sources

PER_DOC_STAGES = ("normalize", "quality", "pii")
SHARD_BATCH = 256  # documents tokenized and appended to the shards at a time, at most
SHARD_BATCH_BYTES = 1 << 20  # ... and at most about this much text (a batch's encodings are ~100x its ids)


class AccountingError(RuntimeError):
    pass


RUN_FIGURES = ("seconds", "docs_per_s", "peak_rss_mb", "driver_peak_rss_mb", "worker_peak_rss_mb")


def write_stats(path: Path, stats: dict) -> None:
    """A stage's stats as its DVC metric, without the figures of this particular run (RUN_FIGURES:
    wall time, RSS), which differ from run to run: a stage rebuilt from the same inputs writes the
    same file, so `dvc.lock` is reproduced exactly. The stage functions still return them."""
    def steady(d):
        return {k: steady(v) if isinstance(v, dict) else v for k, v in d.items() if k not in RUN_FIGURES}

    path.write_text(json.dumps(steady(stats), indent=1))


def peak_rss_mb() -> float:
    """This process's peak resident set (MiB): VmHWM of its own address space on Linux (getrusage's
    ru_maxrss would also carry the parent's peak across fork + exec), else ru_maxrss."""
    try:
        with open("/proc/self/status") as f:
            return round(next(int(x.split()[1]) for x in f if x.startswith("VmHWM:")) / 1024, 1)
    except (OSError, StopIteration):
        return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


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


@functools.lru_cache(maxsize=2)
def _eval_ngrams(cfg_json: str) -> tuple[set[str], Counter]:
    return decontam.load_eval_ngrams(DecontamConfig.model_validate_json(cfg_json))


def map_batch(task: tuple[list[dict], DataConfig]) -> dict:
    """Pass-1 task: the per-document stages plus everything per-document the global stages need."""
    docs, cfg = task
    kept, removed, stats, sigs = process_batch(task)
    contam = np.zeros(len(kept), dtype=bool)
    if cfg.decontam.enabled:
        grams, _ = _eval_ngrams(cfg.decontam.model_dump_json())
        contam[:] = [decontam.is_contaminated(d["text"], grams, cfg.decontam.ngram) for d in kept]
    for d in kept:
        d["split"] = split_of(d["hash"], cfg)
    return {"lines": [json.dumps(d, ensure_ascii=False) + "\n" for d in kept], "hashes": [d["hash"] for d in kept],
            "sigs": np.stack(sigs) if cfg.dedup.near and sigs else None, "contam": contam,
            "removed": [json.dumps(r, ensure_ascii=False) + "\n" for r in removed],
            "removed_buckets": Counter(r["bucket"] for r in removed), "stats": stats,
            "rss_mb": peak_rss_mb()}


def _removed(doc: dict, bucket: str, **extra) -> dict:
    return {"id": doc["id"], "bucket": bucket, "source": doc["source"], "path": doc["path"], "loc": doc["loc"], **extra}


def make_mapper(cfg: DataConfig) -> Callable:
    """A lazy, ordered map: the builtin `map` in-process, `ray_imap` on Ray (`workers` > 0 or `ray_address`)."""
    if cfg.workers > 0 or cfg.ray_address:
        from dsv3.cluster import ray_imap, ray_init

        ray_init(cfg.ray_address, num_cpus=cfg.workers or None)
        return lambda fn, items: ray_imap(fn, items, max(1, cfg.workers))
    return map


def split_of(h: str, cfg: DataConfig) -> str:
    x = int.from_bytes(hashlib.blake2b(f"{cfg.split.seed}:{h}".encode(), digest_size=8).digest(), "big")
    return "val" if x / 2**64 < cfg.split.val_fraction else "train"


def _batches(cfg: DataConfig, quarantine, ingest: Counter, buckets: Counter) -> Iterator[tuple[list[dict], DataConfig]]:
    """The sources' documents in batches; rejects are written to quarantine.jsonl as they come."""
    batch: list[dict] = []
    for item in iter_sources(cfg):
        ingest["input"] += 1
        if "reason" in item:
            quarantine.write(json.dumps(item, ensure_ascii=False) + "\n")
            ingest["rejected"] += 1
            buckets[f"rejected:{item['reason']}"] += 1
            continue
        ingest["docs"] += 1
        ingest["bytes"] += len(item["text"].encode("utf-8", "surrogatepass"))
        batch.append(item)
        if len(batch) >= cfg.batch_size:
            yield batch, cfg
            batch = []
    if batch:
        yield batch, cfg


class _Pass1:
    """Pass 1's sinks: spilled documents, hash and band buckets, signatures, flags and counters."""

    def __init__(self, cfg: DataConfig, work: Path):
        self.cfg, self.work, self.n, self.batches, self.worker_rss = cfg, work, 0, 0, 0.0
        self.docs = open(work / "kept.jsonl", "w", encoding="utf-8")
        self.removed = open(work / "removed.0.jsonl", "w", encoding="utf-8")
        self.sigs = open(work / "sigs.bin", "wb")
        self.exact = dedup.Spill(work / "exact", 4)
        self.near = dedup.Spill(work / "near", cfg.dedup.rows + 2)
        self.contam: list[np.ndarray] = []
        self.per = {s: Counter() for s in PER_DOC_STAGES}
        self.n_removed = Counter()

    def add(self, r: dict) -> None:
        self.docs.writelines(r["lines"])
        self.removed.writelines(r["removed"])
        self.n_removed.update(r["removed_buckets"])
        for s in PER_DOC_STAGES:
            self.per[s].update(r["stats"][s])
        if self.cfg.dedup.exact:
            self.exact.add(*dedup.hash_rows(r["hashes"], self.n))
        if r["sigs"] is not None:
            self.sigs.write(np.ascontiguousarray(r["sigs"]).tobytes())
            self.near.add(*dedup.band_rows(r["sigs"], self.n, self.cfg.dedup))
        self.contam.append(r["contam"])
        self.n += len(r["lines"])
        self.batches += 1
        self.worker_rss = max(self.worker_rss, r["rss_mb"])

    def close(self) -> np.ndarray:
        for f in (self.docs, self.removed, self.sigs):
            f.close()
        self.exact.flush()
        self.near.flush()
        return np.concatenate(self.contam) if self.contam else np.zeros(0, dtype=bool)


def curate(cfg: DataConfig, out: str | Path, mapper: Callable | None = None) -> dict:
    """Stage `curate`: sources -> OUT/curated/*.jsonl + OUT/stats.json; returns the stats."""
    t0 = time.time()
    out = Path(out)
    cur = out / "curated"
    cur.mkdir(parents=True, exist_ok=True)
    mapper = mapper or make_mapper(cfg)
    work = Path(tempfile.mkdtemp(prefix=".curate-work-", dir=out))
    try:
        buckets, ingest = Counter(), Counter(input=0, docs=0, rejected=0, bytes=0)
        stages: dict = {"ingest": ingest}
        p1 = _Pass1(cfg, work)
        with open(cur / "quarantine.jsonl", "w", encoding="utf-8") as q:
            for r in mapper(map_batch, _batches(cfg, q, ingest, buckets)):
                p1.add(r)
        contam = p1.close()
        stages.update({s: dict(p1.per[s]) for s in PER_DOC_STAGES})
        stages["ingest"] = dict(ingest)
        buckets.update(p1.n_removed)
        n = p1.n
        first, near_root, tasks = np.full(n, -1, np.int64), np.full(n, -1, np.int64), {}
        if cfg.dedup.exact:
            first, st, tasks["exact_dedup"] = dedup.exact_shuffle(p1.exact, n, mapper)
            stages["exact_dedup"] = dict(st)
        alive = first < 0
        if cfg.dedup.near and alive.any():
            near_root, st, tasks["near_dedup"] = dedup.near_shuffle(p1.near, alive, work / "sigs.bin", cfg.dedup, mapper)
            stages["near_dedup"] = dict(st)
        if cfg.decontam.enabled:
            st = Counter(_eval_ngrams(cfg.decontam.model_dump_json())[1])
            st["decontaminated"] = int((contam & alive & (near_root < 0)).sum())
            stages["decontam"] = dict(st)
        else:
            contam[:] = False
        kept, n_removed, kept_bytes, split = _pass2(cfg, work, cur, first, near_root, contam, buckets)
        stages["split"] = split
        n_removed += sum(p1.n_removed.values())
        stream = {"batches": p1.batches, "batch_size": cfg.batch_size, "workers": cfg.workers,
                  "spill_bytes": {"exact": p1.exact.nbytes, "near": p1.near.nbytes,
                                  "signatures": (work / "sigs.bin").stat().st_size},
                  "tasks": tasks, "driver_peak_rss_mb": peak_rss_mb(), "worker_peak_rss_mb": p1.worker_rss}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    total = sum(buckets.values())
    if total != ingest["input"]:
        raise AccountingError(f"accounting broken: input {ingest['input']} != sum of buckets {total} ({dict(buckets)})")
    secs = time.time() - t0
    stats = {"input": ingest["input"], "buckets": dict(sorted(buckets.items())), "kept": kept,
             "removed": n_removed, "quarantined": ingest["rejected"], "input_bytes": ingest["bytes"],
             "kept_bytes": kept_bytes, "seconds": round(secs, 3),
             "docs_per_s": round(ingest["input"] / max(secs, 1e-9), 1), "stages": stages, "stream": stream}
    write_stats(out / "stats.json", stats)
    return stats


def _pass2(cfg: DataConfig, work: Path, cur: Path, first: np.ndarray, root: np.ndarray, contam: np.ndarray,
           buckets: Counter) -> tuple[int, int, int, dict]:
    """Stream the spilled documents: kept ones to train/val.jsonl, the rest to removed.jsonl (after
    pass 1's drops). Returns (kept, removed, kept bytes, docs per split)."""
    need = np.zeros(len(first), dtype=bool)  # documents others are duplicates of: their ids are kept
    need[first[first >= 0]] = True
    need[root[root >= 0]] = True
    ids: dict[int, str] = {}
    names = ("exact_dup", "near_dup", "decontaminated")
    parts = {b: open(work / f"removed.{i + 1}.jsonl", "w", encoding="utf-8") for i, b in enumerate(names)}
    split, kept_bytes, best = Counter(train=0, val=0), 0, None  # best: (hash, line) of the min-hash train doc
    with open(work / "kept.jsonl", encoding="utf-8") as src, open(cur / "train.jsonl", "w", encoding="utf-8") as tr, \
            open(cur / "val.jsonl", "w", encoding="utf-8") as va:
        for s, line in enumerate(src):
            d = json.loads(line)
            if need[s]:
                ids[s] = d["id"]
            if first[s] >= 0 or root[s] >= 0 or contam[s]:
                b = names[0] if first[s] >= 0 else names[1] if root[s] >= 0 else names[2]
                extra = {"dup_of": ids[int(first[s] if first[s] >= 0 else root[s])]} if b != names[2] else {}
                parts[b].write(json.dumps(_removed(d, b, **extra), ensure_ascii=False) + "\n")
                buckets[b] += 1
                continue
            if d["split"] == "train" and (best is None or d["hash"] < best[0]):
                best = (d["hash"], split["train"])
            (va if d["split"] == "val" else tr).write(line)
            split[d["split"]] += 1
            kept_bytes += d["n_bytes"]
    for f in parts.values():
        f.close()
    kept = split["train"] + split["val"]
    if not split["val"] and cfg.split.val_fraction > 0 and kept > 1:  # never an empty val split
        _move_to_val(cur, best[1])
        split["train"], split["val"] = split["train"] - 1, 1
    buckets["kept"] = kept
    with open(cur / "removed.jsonl", "wb") as f:
        for i in range(len(names) + 1):
            with open(work / f"removed.{i}.jsonl", "rb") as part:
                shutil.copyfileobj(part, f)
    return kept, sum(buckets[b] for b in names), kept_bytes, dict(split)


def _move_to_val(cur: Path, line_no: int) -> None:
    """Move line `line_no` of train.jsonl to the (empty) val.jsonl, with its split set to val."""
    tmp = cur / "train.jsonl.tmp"
    with open(cur / "train.jsonl", encoding="utf-8") as src, open(tmp, "w", encoding="utf-8") as dst:
        for i, line in enumerate(src):
            if i != line_no:
                dst.write(line)
                continue
            d = json.loads(line)
            d["split"] = "val"
            (cur / "val.jsonl").write_text(json.dumps(d, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(cur / "train.jsonl")


def iter_split(out: str | Path, split: str) -> Iterator[dict]:
    with open(Path(out) / "curated" / f"{split}.jsonl", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def read_split(out: str | Path, split: str) -> list[dict]:
    return list(iter_split(out, split))


def tokenizer_stage(cfg: DataConfig, out: str | Path) -> dict:
    """Stage `tokenizer`: train BPE on OUT/curated/train.jsonl (streamed) -> OUT/tokenizer/."""
    from dsv3.data.tokenizer import train_tokenizer

    out = Path(out)
    t0 = time.time()
    st = train_tokenizer((d["text"] for d in iter_split(out, "train")), out / "tokenizer", cfg.tokenizer)
    stats = {**st, "seconds": round(time.time() - t0, 3), "peak_rss_mb": peak_rss_mb()}
    write_stats(out / "tokenizer_stats.json", stats)
    return stats


def _chunks(docs: Iterator[dict], n: int, max_bytes: int) -> Iterator[list[dict]]:
    """Consecutive documents, at most `n` and about `max_bytes` of text (n_bytes) per chunk."""
    buf, size = [], 0
    for d in docs:
        buf.append(d)
        size += d["n_bytes"]
        if len(buf) >= n or size >= max_bytes:
            yield buf
            buf, size = [], 0
    if buf:
        yield buf


def _framed(ids: list[int], bos: int, eos: int) -> np.ndarray:
    a = np.empty(len(ids) + 2, dtype=np.int64)
    a[0], a[1:-1], a[-1] = bos, ids, eos
    return a


def shards_stage(cfg: DataConfig, out: str | Path) -> dict:
    """Stage `shards`: FIM (train split) + tokenize + pack -> OUT/shards/, `SHARD_BATCH` documents at a time."""
    from dsv3.data.fim import maybe_fim
    from dsv3.data.shards import ShardWriter

    out = Path(out)
    tok, bos, eos, vocab = shard_tokenizer(out)
    sd = out / "shards"
    if (sd / "index.json").exists():
        (sd / "index.json").unlink()
    stats: dict = {"vocab_size": vocab, "seq_len": cfg.seq_len}
    for split in ("train", "val"):
        n_fim = n_bytes = 0
        rate = cfg.fim.rate if split == "train" else 0.0
        with ShardWriter(sd, split, vocab) as w:
            for docs in _chunks(iter_split(out, split), SHARD_BATCH, SHARD_BATCH_BYTES):
                texts = []
                for d in docs:
                    t, applied = maybe_fim(d["text"], d["hash"], rate, cfg.fim.seed)
                    texts.append(t)
                    n_fim += applied
                    n_bytes += d["n_bytes"]
                w.extend(_framed(e.ids, bos, eos) for e in tok.encode_batch_fast(texts, add_special_tokens=False))
            entry = w.close(n_bytes=n_bytes)
        stats[split] = split_stats(entry, n_bytes, n_fim, cfg.seq_len)
    stats["peak_rss_mb"] = peak_rss_mb()
    return finish_shards(out, bos, eos, stats)


def shard_tokenizer(out: Path):
    """(tokenizer, bos, eos, vocab size) of the `tokenizer` stage's output, what the shards are made with."""
    from dsv3.data.tokenizer import BOS, EOS, load_raw

    tok = load_raw(out / "tokenizer")
    return tok, tok.token_to_id(BOS), tok.token_to_id(EOS), tok.get_vocab_size()


def split_stats(entry: dict, n_bytes: int, n_fim: int, seq_len: int) -> dict:
    """One split's line of shards_stats.json from its index entry."""
    return {"docs": entry["n_docs"], "tokens": entry["n_tokens"], "bytes": n_bytes, "fim_docs": n_fim,
            "sequences": entry["n_tokens"] // (seq_len + 1),
            "bytes_per_token": round(n_bytes / max(1, entry["n_tokens"]), 4)}


def finish_shards(out: Path, bos: int, eos: int, stats: dict) -> dict:
    """The special-token ids into shards/index.json, the stats into shards_stats.json; returns the stats."""
    sd = out / "shards"
    idx = json.loads((sd / "index.json").read_text())
    idx.update(bos_id=bos, eos_id=eos)
    (sd / "index.json").write_text(json.dumps(idx))
    write_stats(out / "shards_stats.json", stats)
    return stats


def run_all(cfg: DataConfig, out: str | Path) -> dict:
    s = curate(cfg, out)
    return {"curate": s, "tokenizer": tokenizer_stage(cfg, out), "shards": shards_stage(cfg, out)}
