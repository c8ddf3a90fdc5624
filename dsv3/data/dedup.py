"""Dedup stages: exact (normalized-content hash) and near (MinHash + LSH banding), §4.1.

Exact: sha1 of the lower-cased, whitespace-collapsed text; the first document in input
order wins, later ones are `exact_dup`.
Near: our own numpy MinHash. Words -> crc32, word `shingle_size`-grams combined by a
wrapping polynomial into uint64 shingle hashes, then `bands * rows` hash functions
(xor with a per-permutation seed, then the splitmix64 finaliser) and a min per function.
LSH: a band's `rows` values are its bucket key. The work is partitioned by band: each
band is an independent task (`band_buckets`, run through the same mapper as the per-doc
stages, so on Ray each band is a Ray task) that receives only that band's keys
(n x rows) and returns its multi-member buckets; the driver confirms a candidate pair when
the estimated Jaccard (signature agreement) >= `threshold` (`confirm_edges`).
Confirmed edges of all bands go into a union-find; one document per connected cluster
is kept (the earliest in input order), the rest are `near_dup`.

At corpus scale (`exact_shuffle`, `near_shuffle`, what `curate` runs) no process holds all the
hashes or signatures. Records are spilled to disk while the documents stream by (`Spill`:
256 bucket files, rows of uint64, a bounded write buffer) and each bucket group is one task of
at most `TASK_BYTES` of records:
- exact: rows (sha1 as 3 words, doc seq) bucketed by the hash's first byte; a task sorts its
  rows and maps every later copy to the first (`first_of`).
- near: one row (band, its `rows` keys, doc seq) per document and band, bucketed by a mix of
  band and keys, so each task owns a range of band-hash buckets (`band_runs` -> the candidate
  buckets, members in input order). Confirming needs whole signatures: the driver reads just
  the members' rows from the signature file (`read_rows`, positional reads) and a second task
  runs `confirm_edges` on them (`confirm_runs`). Edges go into a union-find over doc seqs
  (`DisjointSet`, one int64 per document).
Grouping by the whole band key and confirming with the same rule give the same edges as
`near_dedup`, hence the same clusters and statistics; tasks are pure (arrays in, arrays out),
so they run in-process or as Ray tasks without a shared filesystem.
"""

from __future__ import annotations

import hashlib
import os
import re
import zlib
from collections import Counter, defaultdict
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from dsv3.data.config import DedupConfig

_WS = re.compile(r"\s+")
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_POLY = np.uint64(0x100000001B3)


def content_hash(text: str) -> str:
    return hashlib.sha1(_WS.sub(" ", text.lower()).strip().encode("utf-8", "surrogatepass")).hexdigest()


def _seeds(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(1, 2**63 - 1, size=n, dtype=np.int64).astype(np.uint64)


def shingle_hashes(text: str, k: int) -> np.ndarray:
    words = text.lower().split()
    if not words:
        return np.zeros(0, dtype=np.uint64)
    w = np.fromiter((zlib.crc32(x.encode("utf-8", "surrogatepass")) for x in words), dtype=np.uint64, count=len(words))
    k = min(k, len(w))
    n = len(w) - k + 1
    h = np.zeros(n, dtype=np.uint64)
    for j in range(k):
        h = h * _POLY + w[j:j + n]
    return np.unique(h)


def minhash(text: str, cfg: DedupConfig) -> np.ndarray:
    """uint64 signature of length bands*rows; all-ones (never matches) for an empty text."""
    perm = cfg.bands * cfg.rows
    sh = shingle_hashes(text, cfg.shingle_size)
    if sh.size == 0:
        return np.full(perm, np.iinfo(np.uint64).max, dtype=np.uint64)
    x = sh[:, None] ^ _seeds(perm, cfg.seed)[None, :]
    x = (x ^ (x >> np.uint64(30))) * _M1
    x = (x ^ (x >> np.uint64(27))) * _M2
    x ^= x >> np.uint64(31)
    return x.min(axis=0)


def band_buckets(keys: np.ndarray) -> list[list[int]]:
    """One LSH band (keys [n, rows], uint64; all-ones rows = no shingles) -> buckets with >= 2 docs."""
    buckets: dict[bytes, list[int]] = {}
    empty = (keys == np.iinfo(np.uint64).max).all(axis=1)
    for i in np.flatnonzero(~empty):
        buckets.setdefault(keys[i].tobytes(), []).append(int(i))
    return [m for m in buckets.values() if len(m) > 1]


def confirm_edges(members: list[int], sigs: np.ndarray, threshold: float, max_reps: int = 8) -> list[tuple[int, int]]:
    """Edges (rep, member) inside one bucket whose estimated Jaccard >= threshold."""
    edges, reps = [], [members[0]]
    for m in members[1:]:
        for r in reps:
            if float(np.mean(sigs[m] == sigs[r])) >= threshold:
                edges.append((r, m))
                break
        else:
            if len(reps) < max_reps:
                reps.append(m)
    return edges


def _find(parent: list[int], i: int) -> int:
    while parent[i] != i:
        parent[i] = parent[parent[i]]
        i = parent[i]
    return i


def near_dedup(sigs: np.ndarray, cfg: DedupConfig, mapper=map) -> tuple[list[int | None], Counter]:
    """For each doc: None if kept, else the index of the kept doc of its cluster."""
    n = len(sigs)
    stats = Counter(docs=n)
    if n == 0:
        return [], stats
    tasks = [np.ascontiguousarray(sigs[:, b * cfg.rows:(b + 1) * cfg.rows]) for b in range(cfg.bands)]
    parent = list(range(n))
    for buckets in mapper(band_buckets, tasks):  # each task sees one band's keys only
        for members in buckets:
            stats["candidate_buckets"] += 1
            for a, b in confirm_edges(members, sigs, cfg.threshold):
                stats["confirmed_edges"] += 1
                ra, rb = _find(parent, a), _find(parent, b)
                if ra != rb:
                    parent[max(ra, rb)] = min(ra, rb)  # root = earliest document of the cluster
    out: list[int | None] = []
    for i in range(n):
        r = _find(parent, i)
        out.append(None if r == i else r)
    sizes = Counter(_find(parent, i) for i in range(n))
    stats["clusters_with_dups"] = sum(1 for s in sizes.values() if s > 1)
    stats["near_dup"] = sum(x is not None for x in out)
    return out, stats


def exact_dedup(hashes: list[str]) -> tuple[list[int | None], Counter]:
    first: dict[str, int] = {}
    out = []
    for i, h in enumerate(hashes):
        out.append(first.get(h))
        first.setdefault(h, i)
    return out, Counter(docs=len(hashes), exact_dup=sum(x is not None for x in out))


# ---- streaming: spilled, hash-partitioned buckets ------------------------------------------------
SPILL_BUCKETS = 256
SPILL_BUFFER_BYTES = 8 << 20  # records buffered in memory before they are appended to bucket files
TASK_BYTES = 64 << 20  # records one task holds at most (a single bucket larger than this goes alone)
_MAX = np.iinfo(np.uint64).max


class Spill:
    """Append-only record files `root/NNN.bin` (uint64 rows of `width`), one per bucket."""

    def __init__(self, root: str | Path, width: int, buffer_bytes: int | None = None):
        self.root, self.width = Path(root), width
        self.root.mkdir(parents=True, exist_ok=True)
        self.limit = buffer_bytes or SPILL_BUFFER_BYTES
        self.buf: dict[int, list[np.ndarray]] = defaultdict(list)
        self.buffered = 0
        self.rows = np.zeros(SPILL_BUCKETS, dtype=np.int64)  # rows written per bucket

    def add(self, bucket: np.ndarray, rows: np.ndarray) -> None:
        order = np.argsort(bucket, kind="stable")
        b, rows = bucket[order], rows[order]
        cuts = np.flatnonzero(np.diff(b)) + 1
        for k, chunk in zip(b[np.r_[0, cuts]] if len(b) else [], np.split(rows, cuts)):
            self.buf[int(k)].append(chunk)
        self.buffered += rows.nbytes
        if self.buffered >= self.limit:
            self.flush()

    def flush(self) -> None:
        for k, parts in self.buf.items():
            with open(self.root / f"{k:03d}.bin", "ab") as f:
                for a in parts:
                    f.write(np.ascontiguousarray(a, dtype=np.uint64).tobytes())
            self.rows[k] += sum(len(a) for a in parts)
        self.buf.clear()
        self.buffered = 0

    @property
    def nbytes(self) -> int:
        return int(self.rows.sum()) * self.width * 8

    def groups(self, max_bytes: int | None = None) -> list[list[int]]:
        """Consecutive non-empty buckets grouped so that a group's records stay under `max_bytes`."""
        limit, out, cur, size = max_bytes or TASK_BYTES, [], [], 0
        for k in np.flatnonzero(self.rows):
            b = int(self.rows[k]) * self.width * 8
            if cur and size + b > limit:
                out.append(cur)
                cur, size = [], 0
            cur.append(int(k))
            size += b
        return out + [cur] if cur else out

    def read(self, group: list[int]) -> np.ndarray:
        parts = [np.fromfile(self.root / f"{k:03d}.bin", dtype=np.uint64) for k in group]
        return np.concatenate(parts).reshape(-1, self.width) if parts else np.zeros((0, self.width), np.uint64)


def _mix(x: np.ndarray) -> np.ndarray:
    x = (x ^ (x >> np.uint64(30))) * _M1
    x = (x ^ (x >> np.uint64(27))) * _M2
    return x ^ (x >> np.uint64(31))


def hash_rows(hexes: list[str], seq0: int) -> tuple[np.ndarray, np.ndarray]:
    """(bucket = first hash byte, rows [3 words of the sha1, seq]) for documents seq0, seq0+1, ..."""
    raw = np.zeros((len(hexes), 24), dtype=np.uint8)
    if hexes:
        raw[:, :20] = np.frombuffer(b"".join(bytes.fromhex(h) for h in hexes), dtype=np.uint8).reshape(-1, 20)
    seq = np.arange(seq0, seq0 + len(hexes), dtype=np.uint64)[:, None]
    return raw[:, 0].astype(np.int64), np.concatenate([raw.view(np.uint64), seq], axis=1)


def band_rows(sigs: np.ndarray, seq0: int, cfg: DedupConfig) -> tuple[np.ndarray, np.ndarray]:
    """(bucket, rows [band, its `rows` keys, seq]) for every document and band (empty docs: none)."""
    k = len(sigs)
    keys = sigs.reshape(k, cfg.bands, cfg.rows)
    band = np.broadcast_to(np.arange(cfg.bands, dtype=np.uint64)[None, :, None], (k, cfg.bands, 1))
    seq = np.broadcast_to(np.arange(seq0, seq0 + k, dtype=np.uint64)[:, None, None], (k, cfg.bands, 1))
    rows = np.concatenate([band, keys, seq], axis=2).reshape(-1, cfg.rows + 2)
    rows = rows[~(keys == _MAX).all(axis=2).reshape(-1)]
    h = _mix(rows[:, 0] + np.uint64(0x9E3779B97F4A7C15))
    for j in range(1, cfg.rows + 1):
        h = _mix(h ^ rows[:, j])
    return (h >> np.uint64(56)).astype(np.int64), rows


def _sorted_runs(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows sorted by (key columns, seq) -> (seqs in that order, True where a new key starts)."""
    keys, seq = rows[:, :-1], rows[:, -1]
    order = np.lexsort([seq] + [keys[:, j] for j in reversed(range(keys.shape[1]))])
    k = keys[order]
    new = np.ones(len(rows), dtype=bool)
    new[1:] = (k[1:] != k[:-1]).any(axis=1)
    return seq[order].astype(np.int64), new


def first_of(rows: np.ndarray) -> np.ndarray:
    """Exact-dedup task: [m, (key..., seq)] -> (seq, first seq with the same key) for each later copy."""
    if len(rows) < 2:
        return np.zeros((0, 2), dtype=np.int64)
    s, new = _sorted_runs(rows)
    start = np.maximum.accumulate(np.where(new, np.arange(len(s)), 0))
    return np.stack([s[~new], s[start[~new]]], axis=1)


def band_runs(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Near-dedup owner task: band rows -> candidate buckets (>= 2 members) as (offsets, members)."""
    if len(rows) < 2:
        return np.zeros(1, dtype=np.int64), np.zeros(0, dtype=np.int64)
    s, new = _sorted_runs(rows)
    starts = np.flatnonzero(new)
    lens = np.diff(np.r_[starts, len(s)])
    keep = lens > 1
    members = np.concatenate([s[a:a + n] for a, n in zip(starts[keep], lens[keep])]) if keep.any() else s[:0]
    return np.r_[0, np.cumsum(lens[keep])].astype(np.int64), members


def confirm_runs(task: tuple) -> tuple[np.ndarray, int]:
    """Near-dedup confirm task: (offsets, members, uniq seqs, their signatures, threshold) -> (edges, buckets)."""
    offsets, members, uniq, sigs, threshold = task
    loc = np.searchsorted(uniq, members)
    edges = [(uniq[a], uniq[b]) for i in range(len(offsets) - 1)
             for a, b in confirm_edges(loc[offsets[i]:offsets[i + 1]].tolist(), sigs, threshold)]
    return np.asarray(edges, dtype=np.int64).reshape(-1, 2), len(offsets) - 1


def read_rows(path: str | Path, idx: np.ndarray, width: int) -> np.ndarray:
    """Rows `idx` (sorted, unique) of a flat uint64 file of `width`-wide rows, by positional reads."""
    out = np.empty((len(idx), width), dtype=np.uint64)
    rb, pos = width * 8, 0
    fd = os.open(path, os.O_RDONLY)
    try:
        for run in np.split(idx, np.flatnonzero(np.diff(idx) != 1) + 1) if len(idx) else []:
            buf = os.pread(fd, rb * len(run), int(run[0]) * rb)
            out[pos:pos + len(run)] = np.frombuffer(buf, dtype=np.uint64).reshape(len(run), width)
            pos += len(run)
    finally:
        os.close(fd)
    return out


class DisjointSet:
    """Union-find over 0..n-1 (numpy int64 parents); a set's root is its smallest member."""

    def __init__(self, n: int):
        self.parent = np.arange(n, dtype=np.int64)

    def find(self, i: int) -> int:
        p = self.parent
        while p[i] != i:
            p[i] = p[p[i]]
            i = int(p[i])
        return i

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)

    def roots(self) -> np.ndarray:
        p = self.parent.copy()
        while not np.array_equal(q := p[p], p):
            p = q
        return p


Mapper = Callable[[Callable, Iterator], Iterator]


def exact_shuffle(spill: Spill, n: int, mapper: Mapper = map) -> tuple[np.ndarray, Counter, int]:
    """first[i] = the earliest document with document i's content hash, or -1 (spilled hash rows)."""
    first = np.full(n, -1, dtype=np.int64)
    groups = spill.groups()
    for pairs in mapper(first_of, (spill.read(g) for g in groups)):
        first[pairs[:, 0]] = pairs[:, 1]
    return first, Counter(docs=n, exact_dup=int((first >= 0).sum())), len(groups)


def near_shuffle(spill: Spill, alive: np.ndarray, sig_path: str | Path, cfg: DedupConfig,
                 mapper: Mapper = map) -> tuple[np.ndarray, Counter, int]:
    """root[i] = the kept document of i's near-duplicate cluster, or -1 (only `alive` documents take part)."""
    n, perm = len(alive), cfg.bands * cfg.rows
    groups = spill.groups()

    def owned():  # each group: the band rows of one range of band-hash buckets, alive documents only
        for g in groups:
            rows = spill.read(g)
            yield rows[alive[rows[:, -1].astype(np.int64)]]

    def with_sigs(cand):
        offsets, members = cand
        uniq = np.unique(members)
        return offsets, members, uniq, read_rows(sig_path, uniq, perm), cfg.threshold

    ds, n_buckets, n_edges = DisjointSet(n), 0, 0
    for edges, nb in mapper(confirm_runs, (with_sigs(c) for c in mapper(band_runs, owned()))):
        n_buckets += nb
        n_edges += len(edges)
        for a, b in edges.tolist():
            ds.union(a, b)
    stats = Counter(docs=int(alive.sum()))
    if n_buckets:
        stats["candidate_buckets"] += n_buckets
    if n_edges:
        stats["confirmed_edges"] += n_edges
    root = ds.roots()
    dup = alive & (root != np.arange(n))
    stats["clusters_with_dups"] = int(np.unique(root[dup]).size)
    stats["near_dup"] = int(dup.sum())
    return np.where(dup, root, -1), stats, len(groups)
