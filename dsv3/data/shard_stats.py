"""Token-shard statistics computed in a stream, for the Great Expectations suites (§4.1 QA).

Instead of one row per document built from every token loaded as int64, each split is read
in chunks of whole documents (about `CHUNK_TOKENS` tokens, one read each, no memmap) and
summarised as one row per chunk: documents, tokens, shortest / longest document, the smallest
and largest token id, and the framing of its documents. The columns the `token_shards` suite
checks keep their meaning over a chunk: `max_id` / `min_id` are the extreme ids of the chunk
(`min_id` = -1 when a document is empty), `first` / `last` are `bos_id` / `eos_id` when every
document of the chunk starts / ends with them, else the first offending value (-1 for an empty
document), and `n_bad_first` / `n_bad_last` count the offenders. So any out-of-range id or
broken framing fails the same expectation it failed with per-document rows, with an offending
value as the sample, while memory stays at one chunk whatever the corpus size. `shard_totals`
compares the .bin size, the index's n_tokens and the last offset, without reading the tokens.
Opening each split with `TokenShards` first runs its usual checks (structure, size, checksum).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import numpy as np

CHUNK_TOKENS = 1 << 20


def chunk_rows(shard_dir: str | Path, split: str, bos: int, eos: int,
               chunk_tokens: int | None = None) -> Iterator[dict]:
    """One summary row per chunk of whole documents of `split`."""
    from dsv3.data.shards import TokenShards

    ts = TokenShards(shard_dir, split)
    off, item, limit = ts.doc_offsets, ts.dtype.itemsize, chunk_tokens or CHUNK_TOKENS
    n_docs, i, c = len(off) - 1, 0, 0
    with open(ts.path, "rb") as f:
        while i < n_docs:
            j = max(i + 1, int(np.searchsorted(off, off[i] + limit, side="right")) - 1)
            j = min(j, n_docs)
            f.seek(int(off[i]) * item)
            tok = np.fromfile(f, dtype=ts.dtype, count=int(off[j] - off[i])).astype(np.int64)
            yield _summary(split, c, i, tok, off[i:j + 1] - off[i], bos, eos)
            i, c = j, c + 1


def _summary(split: str, chunk: int, first_doc: int, tok: np.ndarray, loc: np.ndarray, bos: int, eos: int) -> dict:
    lens = np.diff(loc)
    full = lens > 0
    firsts = np.where(full, tok[np.minimum(loc[:-1], max(0, tok.size - 1))] if tok.size else -1, -1)
    lasts = np.where(full, tok[np.maximum(loc[1:] - 1, 0)] if tok.size else -1, -1)
    bad_f, bad_l = np.flatnonzero(firsts != bos), np.flatnonzero(lasts != eos)
    return {"split": split, "chunk": chunk, "first_doc": first_doc, "n_docs": int(lens.size),
            "n_tokens": int(tok.size), "min_doc_len": int(lens.min()), "max_doc_len": int(lens.max()),
            "min_id": int(tok.min()) if tok.size and full.all() else -1,
            "max_id": int(tok.max()) if tok.size else -1,
            "first": int(firsts[bad_f[0]]) if bad_f.size else bos, "n_bad_first": int(bad_f.size),
            "last": int(lasts[bad_l[0]]) if bad_l.size else eos, "n_bad_last": int(bad_l.size)}


def shard_frames(out: str | Path, chunk_tokens: int | None = None):
    """(per-chunk frame, per-split totals frame, index) of OUT/shards, streamed."""
    import pandas as pd

    sd = Path(out) / "shards"
    idx = json.loads((sd / "index.json").read_text())
    bos, eos = idx.get("bos_id", 0), idx.get("eos_id", 1)
    rows, totals = [], []
    for split, e in idx["splits"].items():
        rows += chunk_rows(sd, split, bos, eos, chunk_tokens)
        size = (sd / e["file"]).stat().st_size // np.dtype(idx["dtype"]).itemsize
        totals.append({"split": split, "bin_tokens": int(size), "index_tokens": int(e["n_tokens"]),
                       "offset_tokens": int(e["doc_offsets"][-1])})
    return pd.DataFrame(rows), pd.DataFrame(totals), idx
