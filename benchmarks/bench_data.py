"""Data pipeline throughput (DeepSeek-V3 §4.1 curation), printed, never pass/fail.

1. Whole curation (ingest -> ... -> split, `dsv3.data.curate.curate`) on the built-in
   corpus (the running Python's stdlib, `--mb` MB) in-process and on a local Ray cluster
   with 1 and 2 workers: documents/s and MB/s (Ray start-up excluded, tasks included).
2. Near dedup alone (MinHash signatures + LSH + clustering, 14 bands x 8 rows, 5-gram
   shingles) on the same documents: ours vs datatrove's four-stage MinHash dedup
   (LocalPipelineExecutor, 1 worker, same bands/rows/n-grams), documents/s and the ratio.
   datatrove is not a dependency: if it is not importable the script installs it with pip
   into `.venv/datatrove-pkgs` (appended to sys.path, so the venv's own packages win) and
   prints a note if that is impossible (offline). datatrove's English word tokenizer needs
   spaCy, so it is given a whitespace tokenizer (the same split dsv3 uses).
Usage: python benchmarks/bench_data.py [--mb 12] [--skip-ray]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dsv3.data import dedup  # noqa: E402
from dsv3.data.config import DataConfig  # noqa: E402
from dsv3.data.curate import curate, make_mapper, read_split  # noqa: E402

DT_DIR = ROOT / ".venv" / "datatrove-pkgs"


def bench_curate(cfg: DataConfig, label: str) -> tuple[float, dict]:
    mapper = make_mapper(cfg)
    with tempfile.TemporaryDirectory() as d:
        t = time.perf_counter()
        st = curate(cfg, d, mapper)
        secs = time.perf_counter() - t
    mb = st["input_bytes"] / 1e6
    print(f"  {label:<22} {st['input']:>6} docs {mb:7.2f} MB {secs:7.2f} s  {st['input'] / secs:8.1f} docs/s "
          f"{mb / secs:6.2f} MB/s  kept={st['kept']}")
    return secs, st


def ours_near(texts: list[str], cfg: DataConfig) -> tuple[float, int]:
    t = time.perf_counter()
    sigs = np.stack([dedup.minhash(x, cfg.dedup) for x in texts])
    res, st = dedup.near_dedup(sigs, cfg.dedup)
    return time.perf_counter() - t, st["near_dup"]


def import_datatrove() -> bool:
    try:
        import datatrove  # noqa: F401
        return True
    except ImportError:
        pass
    if not DT_DIR.is_dir():
        r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--target", str(DT_DIR), "datatrove"],
                           capture_output=True, text=True)
        if r.returncode:
            print(f"  datatrove unavailable (pip install failed: {r.stderr.strip()[-200:]})")
            return False
    sys.path.append(str(DT_DIR))
    try:
        import datatrove  # noqa: F401
        return True
    except ImportError as e:
        print(f"  datatrove unavailable ({e})")
        return False


def datatrove_near(texts: list[str], cfg: DataConfig) -> tuple[float, int]:
    from datatrove.data import Document
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup.minhash import (MinhashConfig, MinhashDedupBuckets, MinhashDedupCluster,
                                                  MinhashDedupFilter, MinhashDedupSignature)
    from datatrove.utils.hashing import HashConfig
    from loguru import logger

    import datatrove.pipeline.dedup.minhash as dtm
    from datatrove.utils.word_tokenizers import WordTokenizer

    class SplitTokenizer(WordTokenizer):  # datatrove's en tokenizer needs spaCy; split on whitespace like dsv3
        def word_tokenize(self, text):
            return text.split()

        def sent_tokenize(self, text):
            return text.split("\n")

        def span_tokenize(self, text):
            return [(0, len(text))]

    dtm.load_word_tokenizer = lambda language: SplitTokenizer()
    import xxhash

    import datatrove.utils.hashes.xxhash as dtx  # the venv's xxhash 4 no longer hashes str; encode first
    dtx.xxhash64 = lambda data: xxhash.xxh64_intdigest(data.encode() if isinstance(data, str) else data)
    dtx.xxhash32 = lambda data: xxhash.xxh32_intdigest(data.encode() if isinstance(data, str) else data)
    logger.remove()
    c = cfg.dedup
    mc = MinhashConfig(n_grams=c.shingle_size, num_buckets=c.bands, hashes_per_bucket=c.rows,
                       hash_config=HashConfig(precision=64))
    docs = [Document(text=x, id=str(i)) for i, x in enumerate(texts)]
    kept: list = []

    def collect(data, rank=0, world_size=1):
        for d in data:
            kept.append(d.id)
            yield d

    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        t = time.perf_counter()
        for pipe, tasks in (([docs, MinhashDedupSignature(output_folder=str(d / "sigs"), config=mc)], 1),
                            ([MinhashDedupBuckets(input_folder=str(d / "sigs"), output_folder=str(d / "buckets"),
                                                  config=mc)], mc.num_buckets),
                            ([MinhashDedupCluster(input_folder=str(d / "buckets"), output_folder=str(d / "ids"),
                                                  config=mc)], 1),
                            ([docs, MinhashDedupFilter(input_folder=str(d / "ids")), collect], 1)):
            with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
                LocalPipelineExecutor(pipeline=pipe, tasks=tasks, workers=1, logging_dir=str(d / "logs"),
                                      skip_completed=False).run()
        return time.perf_counter() - t, len(texts) - len(kept)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=float, default=12.0, help="size of the built-in corpus slice")
    ap.add_argument("--skip-ray", action="store_true")
    a = ap.parse_args()
    base = dict(sources=["builtin:stdlib"], source={"builtin_max_files": 0, "builtin_max_bytes": int(a.mb * 1e6)})
    print(f"== whole curation on builtin:stdlib (~{a.mb:g} MB), python {sys.version.split()[0]}")
    secs0, st = bench_curate(DataConfig(**base), "in-process (1 worker)")
    if not a.skip_ray:
        from dsv3.cluster import ray_init, ray_shutdown

        ray_init(num_cpus=2)
        try:
            for w in (1, 2):
                bench_curate(DataConfig(**base, workers=w, batch_size=16), f"ray, {w} worker{'s' * (w > 1)}")
        finally:
            ray_shutdown()
    with tempfile.TemporaryDirectory() as d:
        cfg = DataConfig(**base, dedup={"near": False})
        curate(cfg, d)
        texts = [x["text"] for x in read_split(d, "train") + read_split(d, "val")]
    texts += [x + "\n# copy" for x in texts[: len(texts) // 10]]  # plant 10% near duplicates
    cfg = DataConfig(**base)
    print(f"== near dedup (MinHash {cfg.dedup.bands}x{cfg.dedup.rows}, {cfg.dedup.shingle_size}-gram shingles) "
          f"on {len(texts)} docs ({sum(map(len, texts)) / 1e6:.1f} MB, {len(texts) // 11} planted near copies)")
    s_ours, n_ours = ours_near(texts, cfg)
    print(f"  dsv3 (numpy MinHash+LSH)  {s_ours:7.2f} s  {len(texts) / s_ours:8.1f} docs/s  removed={n_ours}")
    if import_datatrove():
        s_dt, n_dt = datatrove_near(texts, cfg)
        print(f"  datatrove MinHash (4 stg) {s_dt:7.2f} s  {len(texts) / s_dt:8.1f} docs/s  removed={n_dt}")
        print(f"  speed ratio dsv3 / datatrove: {s_dt / s_ours:.2f}x")


if __name__ == "__main__":
    main()
