"""What verifying a token shard costs: prints figures, never pass/fail.

One shard of --mb MiB is written with `write_split` (which hashes while it writes), then,
in the same run and on the same file: a plain sequential read (the peer: the floor any full
check pays), the xxh3-128 check `TokenShards` runs on first open, sha256 and md5 (what
`dsv3.data.integrity` uses, as DVC does), and a second `TokenShards` open that hits the
verified-once marker. Throughputs in GB/s and as a ratio of the plain read. The first read
is warm (page cache): the figures are hashing cost, not disk speed.

    python benchmarks/bench_shard_verify.py [--mb 512]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dsv3.data import shards  # noqa: E402


def _read(path: Path, h=None) -> None:
    with open(path, "rb") as f:
        while chunk := f.read(16 << 20):
            if h is not None:
                h.update(chunk)


def _time(fn, reps: int = 3) -> float:
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=int, default=512)
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["DSV3_CACHE_DIR"] = str(Path(tmp) / "cache")
        n = a.mb * (1 << 20) // 2
        rng = np.random.default_rng(0)
        docs = np.array_split(rng.integers(0, 65536, n, dtype=np.uint32), max(1, n // 2048))
        t = time.perf_counter()
        shards.write_split(tmp, "train", docs, 65536)
        write_s = time.perf_counter() - t
        path = Path(tmp) / "train.bin"
        size = path.stat().st_size
        entry = __import__("json").loads((Path(tmp) / "index.json").read_text())["splits"]["train"]
        _read(path)  # warm the page cache
        rows = {"plain read (peer)": _time(lambda: _read(path)),
                "xxh3-128 verify (TokenShards)": _time(lambda: shards.verify_file(path, entry["checksum"], "always")),
                "sha256": _time(lambda: _read(path, hashlib.sha256())),
                "md5 (DVC, dsv3.data.integrity)": _time(lambda: _read(path, hashlib.md5()))}
        shards.TokenShards(tmp, "train")  # first open: verifies and leaves the marker
        rows["second open (marker hit)"] = _time(lambda: shards.TokenShards(tmp, "train"))
        base = rows["plain read (peer)"]
        print(f"shard: {size / 2**20:.0f} MiB; write_split (hashing while writing) {size / write_s / 1e9:.2f} GB/s")
        print(f"{'check':<34} {'seconds':>9} {'GB/s':>8} {'x plain read':>13}")
        for k, s in rows.items():
            print(f"{k:<34} {s:>9.4f} {size / s / 1e9:>8.2f} {s / base:>13.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
