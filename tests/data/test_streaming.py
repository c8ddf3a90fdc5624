"""The streaming curation (dsv3.data.curate) against the in-memory reference (dsv3.data.reference),
both computed here on the same inputs: every output file, the accounting and the per-stage
statistics must be equal, for several batch sizes, spill / task sizes and dedup settings. Plus the
bounded-memory property itself (traced Python allocations flat while the corpus grows) and the
streamed shard statistics the GX suite reads."""

from __future__ import annotations

import json
import random
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from dsv3.data import curate, dedup, reference
from dsv3.data.shard_stats import chunk_rows
from dsv3.data.shards import write_split

from .conftest import prose, small_cfg

VOLATILE = ("seconds", "docs_per_s", "stream", "peak_rss_mb")


def dup_corpus(root: Path, n_base: int = 12, seed: int = 0) -> Path:
    """Prose documents with exact copies (case / spacing), near copies and edit chains, spread over
    several files and formats so that duplicates straddle batches and shuffle partitions."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n_base):
        base = prose(100 + i, 220)
        rows.append(base)
        if i % 2 == 0:
            rows.append(base.upper().replace("\n", "  \n"))  # exact duplicate after normalization
        if i % 3 == 0:
            w = base.split(" ")
            for _ in range(3):  # a chain: each copy one word away from the previous
                w[rng.randrange(len(w))] = "zebra"
                rows.append(" ".join(w))
    rng.shuffle(rows)
    for k in range(0, len(rows), 7):
        (root / f"part{k // 7}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in rows[k:k + 7]))
    return root


def _both(cfg, tmp: Path) -> tuple[Path, Path, dict, dict]:
    s, m = tmp / "stream", tmp / "memory"
    st = curate.curate(cfg, s)
    sm = reference.curate_in_memory(cfg, m)
    return s, m, st, sm


def _assert_same_curation(s: Path, m: Path, st: dict, sm: dict) -> None:
    for name in ("train", "val", "removed", "quarantine"):
        a, b = (s / "curated" / f"{name}.jsonl").read_bytes(), (m / "curated" / f"{name}.jsonl").read_bytes()
        assert a == b, name
    assert {k: v for k, v in st.items() if k not in VOLATILE} == sm
    assert json.loads((s / "stats.json").read_text())["buckets"] == sm["buckets"]
    assert not list(s.glob(".curate-work-*"))  # the spill directory is gone


@pytest.mark.parametrize("batch_size,tiny_spill", [(3, True), (64, False)])
def test_planted_corpus_equals_in_memory_through_every_stage(corpus, tmp_path, monkeypatch, batch_size, tiny_spill):
    if tiny_spill:  # flush the spill buffers often and cut the shuffles into many tasks
        monkeypatch.setattr(dedup, "SPILL_BUFFER_BYTES", 64)
        monkeypatch.setattr(dedup, "TASK_BYTES", 128)
    monkeypatch.setattr(curate, "SHARD_BATCH", 2)
    cfg = small_cfg([corpus[0]], batch_size=batch_size)
    s, m, st, sm = _both(cfg, tmp_path)
    _assert_same_curation(s, m, st, sm)
    assert sm["buckets"]["exact_dup"] == sm["buckets"]["near_dup"] == 1  # the planted duplicates were found
    n_docs = st["stages"]["ingest"]["docs"]
    assert st["stream"]["batches"] == -(-n_docs // batch_size)
    if tiny_spill:
        assert st["stream"]["tasks"]["exact_dedup"] > 1 and st["stream"]["tasks"]["near_dedup"] > 1
    # tokenizer (streamed from train.jsonl) and shards (appended per SHARD_BATCH docs)
    for d in (s, m):
        curate.tokenizer_stage(cfg, d)
    assert (s / "tokenizer" / "tokenizer.json").read_bytes() == (m / "tokenizer" / "tokenizer.json").read_bytes()
    a, b = curate.shards_stage(cfg, s), reference.shards_in_memory(cfg, m)
    assert {k: v for k, v in a.items() if k not in VOLATILE} == b and a["train"]["fim_docs"] >= 0
    for f in ("index.json", "train.bin", "val.bin"):
        assert (s / "shards" / f).read_bytes() == (m / "shards" / f).read_bytes(), f


@pytest.mark.parametrize("dedup_cfg", [{}, {"exact": False}, {"near": False}, {"threshold": 0.95, "bands": 7}])
def test_duplicate_heavy_corpus_equals_in_memory(tmp_path, monkeypatch, dedup_cfg):
    monkeypatch.setattr(dedup, "TASK_BYTES", 2048)
    src = dup_corpus(tmp_path / "src")
    cfg = small_cfg([src], batch_size=5, dedup=dedup_cfg)
    s, m, st, sm = _both(cfg, tmp_path)
    _assert_same_curation(s, m, st, sm)
    b = sm["buckets"]
    if dedup_cfg.get("exact", True):
        assert b["exact_dup"] >= 6
    if dedup_cfg.get("near", True):
        assert b["near_dup"] >= 6 and sm["stages"]["near_dedup"]["clusters_with_dups"] >= 2


def test_empty_val_split_fallback_equals_in_memory(tmp_path):
    """A val fraction so small that no hash falls in it: both paths move the min-hash train doc."""
    src = dup_corpus(tmp_path / "src")
    cfg = small_cfg([src], batch_size=4, split={"val_fraction": 1e-9})
    s, m, st, sm = _both(cfg, tmp_path)
    _assert_same_curation(s, m, st, sm)
    assert sm["stages"]["split"]["val"] == 1 and json.loads((s / "curated" / "val.jsonl").read_text())["split"] == "val"


def _traced_peak(fn, runs: int = 2) -> int:
    """Peak traced allocations of `fn()`, the least of `runs` (the first run also warms lazy imports,
    and a one-off resize of the interpreter's interned-string table can land in any single run)."""
    peaks = []
    for _ in range(runs):
        tracemalloc.start()
        try:
            fn()
            peaks.append(tracemalloc.get_traced_memory()[1])
        finally:
            tracemalloc.stop()
    return min(peaks)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_streaming_memory_stays_flat_while_the_corpus_grows(tmp_path, monkeypatch):
    """Peak traced Python allocations of curate + shards on a corpus and on 4x that corpus: flat for
    the streaming path, growing for the in-memory reference (so the measurement can tell). The
    streaming knobs are set small against this small corpus, as the defaults are against a real one."""
    monkeypatch.setattr(curate, "SHARD_BATCH", 8)
    monkeypatch.setattr(dedup, "SPILL_BUFFER_BYTES", 16 << 10)
    monkeypatch.setattr(dedup, "TASK_BYTES", 64 << 10)
    peaks = {}
    for k in (1, 4):
        root = tmp_path / f"c{k}"
        root.mkdir()
        for f in range(k):  # k files of 30 distinct documents of ~1.5 KB
            (root / f"{f}.jsonl").write_text("".join(json.dumps({"text": prose(1000 * f + i, 250)}) + "\n"
                                                     for i in range(30)))
        cfg = small_cfg([root], batch_size=8, decontam={"enabled": False}, tokenizer={"vocab_size": 300})
        out_s, out_m = tmp_path / f"s{k}", tmp_path / f"m{k}"
        for out, cur in ((out_s, curate.curate), (out_m, reference.curate_in_memory)):
            cur(cfg, out)
            curate.tokenizer_stage(cfg, out)  # the shards stage needs it; Rust memory, not traced
        peaks[k] = (_traced_peak(lambda: (curate.curate(cfg, out_s), curate.shards_stage(cfg, out_s))),
                    _traced_peak(lambda: (reference.curate_in_memory(cfg, out_m), reference.shards_in_memory(cfg, out_m))))
    stream, memory = peaks[4][0] / peaks[1][0], peaks[4][1] / peaks[1][1]
    assert memory > 2.0, peaks  # the reference holds the corpus
    assert stream < 1.3, peaks  # the streaming path does not


def _per_doc(docs: list[list[int]], bos: int, eos: int) -> dict:
    flat = [t for d in docs for t in d]
    firsts = [d[0] if d else -1 for d in docs]
    lasts = [d[-1] if d else -1 for d in docs]
    return {"min_id": min(flat) if all(docs) else -1, "max_id": max(flat),
            "n_bad_first": sum(f != bos for f in firsts), "n_bad_last": sum(x != eos for x in lasts),
            "n_docs": len(docs), "n_tokens": len(flat)}


@pytest.mark.parametrize("chunk_tokens", [1, 7, 50, 1 << 20])
def test_shard_chunk_stats_equal_per_document_stats(tmp_path, chunk_tokens):
    rng = np.random.default_rng(0)
    docs = [[0, *rng.integers(2, 300, rng.integers(0, 30)).tolist(), 1] for _ in range(40)]
    docs[5] = [0, 7, 299]  # no EOS
    docs[17] = [3, 5, 1]  # no BOS
    docs[23] = []  # empty document
    write_split(tmp_path, "train", docs, 300)
    rows = list(chunk_rows(tmp_path, "train", 0, 1, chunk_tokens))
    assert sum(r["n_docs"] for r in rows) == len(docs) and [r["first_doc"] for r in rows] == sorted(
        {r["first_doc"] for r in rows})
    got = {"min_id": min(r["min_id"] for r in rows), "max_id": max(r["max_id"] for r in rows),
           "n_bad_first": sum(r["n_bad_first"] for r in rows), "n_bad_last": sum(r["n_bad_last"] for r in rows),
           "n_docs": sum(r["n_docs"] for r in rows), "n_tokens": sum(r["n_tokens"] for r in rows)}
    assert got == _per_doc(docs, 0, 1)
    for r in rows:  # a clean chunk shows BOS / EOS, a bad one an offending value as the GX sample
        assert r["first"] == 0 if not r["n_bad_first"] else r["first"] in (3, -1)
        assert r["last"] == 1 if not r["n_bad_last"] else r["last"] in (299, -1)
    if chunk_tokens >= 1 << 20:
        assert len(rows) == 1
    elif chunk_tokens == 1:
        assert len(rows) == len(docs)  # a chunk never splits a document
