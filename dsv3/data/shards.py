"""Packed token shards: the contract between dsv3.data (writer) and dsv3.train (reader).

Layout of a shard directory:
    index.json          {"format": "dsv3-shards/1", "dtype": "uint16"|"uint32", "vocab_size": V,
                         "bos_id": .., "eos_id": .., "splits": {"train": {...}, "val": {...}}}
    train.bin, val.bin  flat token memmaps (documents concatenated, each ends with EOS)
Per split: {"file": "train.bin", "n_tokens": N, "n_docs": D, "doc_offsets": [0, ...]}
(`doc_offsets[i]` is the first token of document i; n_docs + 1 entries, last = N), plus
optional "n_bytes" (UTF-8 bytes of the text, for bits-per-byte).
uint16 when the vocabulary fits, uint32 otherwise.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

FORMAT = "dsv3-shards/1"


class ShardError(ValueError):
    pass


def dtype_for(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 65536 else np.uint32)


def write_split(out_dir: str | Path, split: str, docs: Iterable[Sequence[int]], vocab_size: int,
                n_bytes: int | None = None) -> dict:
    """Write one split's token memmap; returns its index entry (also merged into index.json)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dt = dtype_for(vocab_size)
    offsets = [0]
    path = out / f"{split}.bin"
    tmp = path.with_suffix(".bin.tmp")
    with open(tmp, "wb") as f:
        for doc in docs:
            a = np.asarray(doc, dtype=np.int64)
            if a.size and (a.min() < 0 or a.max() >= vocab_size):
                raise ShardError(f"token id out of range [0, {vocab_size}) in split {split!r}")
            f.write(a.astype(dt).tobytes())
            offsets.append(offsets[-1] + int(a.size))
    tmp.replace(path)
    entry = {"file": path.name, "n_tokens": offsets[-1], "n_docs": len(offsets) - 1, "doc_offsets": offsets}
    if n_bytes is not None:
        entry["n_bytes"] = int(n_bytes)
    idx_path = out / "index.json"
    idx = json.loads(idx_path.read_text()) if idx_path.exists() else {
        "format": FORMAT, "dtype": dt.name, "vocab_size": vocab_size, "splits": {}}
    idx["splits"][split] = entry
    idx_tmp = idx_path.with_suffix(".json.tmp")
    idx_tmp.write_text(json.dumps(idx))
    idx_tmp.replace(idx_path)
    return entry


class TokenShards:
    """Read-only view of one split: `.tokens` (np.memmap), `.doc_offsets`, `.vocab_size`."""

    def __init__(self, shard_dir: str | Path, split: str = "train"):
        d = Path(shard_dir)
        idx_path = d / "index.json"
        if not idx_path.is_file():
            raise ShardError(f"no index.json in {d}")
        try:
            idx = json.loads(idx_path.read_text())
        except json.JSONDecodeError as e:
            raise ShardError(f"{idx_path}: corrupt index ({e})") from None
        if idx.get("format") != FORMAT:
            raise ShardError(f"{idx_path}: unknown format {idx.get('format')!r}")
        if split not in idx["splits"]:
            raise ShardError(f"{idx_path}: no split {split!r} (have {sorted(idx['splits'])})")
        e = idx["splits"][split]
        self.index = idx
        self.split = split
        self.vocab_size = int(idx["vocab_size"])
        self.dtype = np.dtype(idx["dtype"])
        self.n_bytes = e.get("n_bytes")
        self.doc_offsets = np.asarray(e["doc_offsets"], dtype=np.int64)
        path = d / e["file"]
        expect = e["n_tokens"] * self.dtype.itemsize
        if not path.is_file() or path.stat().st_size != expect:
            raise ShardError(f"{path}: size does not match index ({expect} bytes expected)")
        self.tokens = (np.memmap(path, dtype=self.dtype, mode="r") if e["n_tokens"]
                       else np.zeros(0, dtype=self.dtype))

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    def doc(self, i: int) -> np.ndarray:
        return np.asarray(self.tokens[self.doc_offsets[i]:self.doc_offsets[i + 1]])
