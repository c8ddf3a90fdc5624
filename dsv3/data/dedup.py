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
"""

from __future__ import annotations

import hashlib
import re
import zlib
from collections import Counter

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
