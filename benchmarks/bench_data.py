"""Data pipeline memory and throughput (DeepSeek-V3 §4.1 curation), printed, never pass/fail.

1. Streaming vs in-memory, 1x and 8x a corpus. The 1x corpus is the built-in one (the running
   Python's stdlib, `--mb` MB, one .py file per document) written to a directory; the 8x corpus
   is it replicated and perturbed so dedup keeps working: per file, the original, an exact copy
   (trailing spaces, which normalization removes), a near copy (one comment line added) and five
   splices (first half of this file + second half of another: new documents, no new words).
   Each stage runs in a fresh process through the same functions as `dvc repro` (curate,
   tokenizer, shards; the in-memory reference dsv3.data.reference for curate and shards), and
   reports its peak RSS (VmHWM of that process: the driver) and documents/s; with `--workers`
   the streaming curate also runs on a local Ray cluster and reports the workers' peak RSS
   (measured inside the tasks) separately, and how much of the driver's RSS is Ray's shared
   object-store pages (results it fetched) rather than its own memory. Acceptance: the streaming driver's peak RSS stays
   within 1.3x while the corpus grows 8x. The machine is shared (up to 9 sessions on 2 cores),
   so the throughput figures are noisy; RSS is the acceptance figure.
2. Near dedup alone (MinHash signatures + LSH + clustering, 14 bands x 8 rows, 5-gram
   shingles) on the same documents: the in-memory `near_dedup`, the spilled band-bucket shuffle
   (`near_shuffle`, what curation runs) and datatrove's four-stage MinHash dedup
   (LocalPipelineExecutor, 1 worker, same bands/rows/n-grams), documents/s and the ratio.
   datatrove is not a dependency: if it is not importable the script installs it with pip
   into `.venv/datatrove-pkgs` (appended to sys.path, so the venv's own packages win) and
   prints a note if that is impossible (offline). datatrove's English word tokenizer needs
   spaCy, so it is given a whitespace tokenizer (the same split dsv3 uses).
Usage: python benchmarks/bench_data.py [--mb 3] [--workers 2] [--skip-datatrove]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
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
from dsv3.data.sources import stdlib_files  # noqa: E402

DT_DIR = ROOT / ".venv" / "datatrove-pkgs"
STAGES = {"stream": ("curate", "tokenizer", "shards"), "memory": ("curate", "shards")}


# ---- corpora --------------------------------------------------------------------------------
def write_corpora(mb: float, root: Path) -> tuple[Path, Path, list[str]]:
    """root/x1 (the built-in corpus as files) and root/x8 (replicated + perturbed), and the texts."""
    import sysconfig

    base = Path(sysconfig.get_paths()["stdlib"])
    files = stdlib_files(DataConfig(source={"builtin_max_files": 0, "builtin_max_bytes": int(mb * 1e6)}))
    texts = [f.read_bytes().decode("utf-8", "replace") for f in files]
    rel = [f.relative_to(base) for f in files]
    n = len(texts)

    def variant(i: int, k: int) -> str:
        t = texts[i]
        if k == 1:
            return t.replace("\n", "  \n")  # exact copy once normalized
        if k == 2:
            return t + "\n# a near copy of the file above\n"
        if k >= 3:
            a, b = t.split("\n"), texts[(i + 7919 * k) % n].split("\n")
            return "\n".join(a[: len(a) // 2] + b[len(b) // 2:])  # a splice: a new document
        return t

    for name, ks in (("x1", [0]), ("x8", range(8))):
        for k in ks:
            for i, r in enumerate(rel):
                f = root / name / f"v{k}" / r
                f.parent.mkdir(parents=True, exist_ok=True)
                f.write_text(variant(i, k), encoding="utf-8")
    return root / "x1", root / "x8", texts


# ---- one stage in a fresh process (the driver whose RSS is measured) -------------------------
def child(a) -> None:
    from dsv3.data import curate, reference

    cfg = DataConfig(sources=[a.src], workers=a.workers)
    fn = {("stream", "curate"): curate.curate, ("stream", "tokenizer"): curate.tokenizer_stage,
          ("stream", "shards"): curate.shards_stage, ("memory", "curate"): reference.curate_in_memory,
          ("memory", "shards"): reference.shards_in_memory}[(a.mode, a.stage)]
    mapper = curate.make_mapper(cfg) if a.stage == "curate" and a.mode == "stream" else None
    t = time.perf_counter()
    st = fn(cfg, a.out, mapper) if mapper else fn(cfg, a.out)
    secs = time.perf_counter() - t
    now = {x.split(":")[0]: int(x.split()[1]) / 1024 for x in open("/proc/self/status") if x.startswith("Rss")}
    if a.workers:
        from dsv3.cluster import ray_shutdown

        ray_shutdown()
    docs = st["input"] if a.stage == "curate" else st.get("train_docs") or st["train"]["docs"] + st["val"]["docs"]
    print(json.dumps({"rss_mb": curate.peak_rss_mb(), "seconds": secs, "docs": docs, "now_mb": now,
                      "worker_rss_mb": st.get("stream", {}).get("worker_peak_rss_mb"),
                      "buckets": st.get("buckets")}))


def run_stage(mode: str, stage: str, src: Path, out: Path, workers: int = 0) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, "--stage", stage, "--src", str(src), "--out", str(out),
           "--workers", str(workers)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode:
        raise RuntimeError(f"{mode} {stage} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def bench_memory(a, root: Path, x1: Path, x8: Path) -> None:
    res: dict = {}
    for mode, stages in STAGES.items():
        for size, src in (("1x", x1), ("8x", x8)):
            out = root / f"out-{mode}-{size}"
            if mode == "memory":  # the tokenizer is the same streamed stage for both paths: reuse it
                out.mkdir(parents=True, exist_ok=True)
                os.symlink(root / f"out-stream-{size}" / "tokenizer", out / "tokenizer")
            for stage in stages:
                res[mode, stage, size] = run_stage(mode, stage, src, out)
    b8 = res["stream", "curate", "8x"]["buckets"]
    print(f"  8x corpus buckets: kept={b8['kept']} exact_dup={b8.get('exact_dup', 0)} near_dup={b8.get('near_dup', 0)}")
    print(f"  {'stage':<10} {'path':<10} {'RSS 1x':>8} {'RSS 8x':>8} {'ratio':>6}  {'docs/s 1x':>10} {'docs/s 8x':>10}")
    for mode, stages in STAGES.items():
        for stage in stages:
            r1, r8 = res[mode, stage, "1x"], res[mode, stage, "8x"]
            print(f"  {stage:<10} {mode:<10} {r1['rss_mb']:7.0f}M {r8['rss_mb']:7.0f}M {r8['rss_mb'] / r1['rss_mb']:5.2f}x"
                  f"  {r1['docs'] / r1['seconds']:10.1f} {r8['docs'] / r8['seconds']:10.1f}")
    worst = max(res["stream", s, "8x"]["rss_mb"] / res["stream", s, "1x"]["rss_mb"] for s in STAGES["stream"])
    print(f"  streaming driver peak RSS 8x/1x, worst stage: {worst:.2f}x ({'within' if worst <= 1.3 else 'OVER'} 1.3x)")
    if a.workers:
        print(f"  streaming curate on Ray, {a.workers} workers (Ray start-up excluded):")
        for size, src in (("1x", x1), ("8x", x8)):
            r = run_stage("stream", "curate", src, root / f"out-ray-{size}", a.workers)
            now = r["now_mb"]
            print(f"    {size}: driver peak RSS {r['rss_mb']:.0f}M (at the end: {now['RssAnon']:.0f}M private, "
                  f"{now['RssShmem']:.0f}M Ray object-store pages), worker peak RSS {r['worker_rss_mb']:.0f}M, "
                  f"{r['docs'] / r['seconds']:.1f} docs/s")


# ---- near dedup alone ------------------------------------------------------------------------
def ours_near(texts: list[str], cfg: DataConfig) -> tuple[float, int]:
    t = time.perf_counter()
    sigs = np.stack([dedup.minhash(x, cfg.dedup) for x in texts])
    res, st = dedup.near_dedup(sigs, cfg.dedup)
    return time.perf_counter() - t, st["near_dup"]


def ours_near_shuffle(texts: list[str], cfg: DataConfig, batch: int = 64) -> tuple[float, int]:
    """Signatures per batch, spilled band rows and signature file, owner + confirm tasks (in-process)."""
    with tempfile.TemporaryDirectory() as d:
        t = time.perf_counter()
        spill = dedup.Spill(Path(d) / "near", cfg.dedup.rows + 2)
        with open(Path(d) / "sigs.bin", "wb") as f:
            for i in range(0, len(texts), batch):
                sigs = np.stack([dedup.minhash(x, cfg.dedup) for x in texts[i:i + batch]])
                f.write(sigs.tobytes())
                spill.add(*dedup.band_rows(sigs, i, cfg.dedup))
        spill.flush()
        _, st, _ = dedup.near_shuffle(spill, np.ones(len(texts), dtype=bool), Path(d) / "sigs.bin", cfg.dedup)
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
    ap.add_argument("--mb", type=float, default=3.0, help="size of the 1x corpus (built-in stdlib slice)")
    ap.add_argument("--workers", type=int, default=2, help="Ray workers for the Ray row (0: skip it)")
    ap.add_argument("--skip-datatrove", action="store_true")
    ap.add_argument("--child", choices=list(STAGES), help=argparse.SUPPRESS)
    ap.add_argument("--stage", help=argparse.SUPPRESS)
    ap.add_argument("--src", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        a.mode = a.child
        return child(a)
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        x1, x8, texts = write_corpora(a.mb, root)
        print(f"== streaming vs in-memory curation, python {sys.version.split()[0]}: 1x = builtin:stdlib "
              f"({len(texts)} files, {sum(map(len, texts)) / 1e6:.1f} MB), 8x = replicated + perturbed; "
              "each stage a fresh process; shared machine: docs/s are noisy, RSS is the figure")
        bench_memory(a, root, x1, x8)
    texts += [x + "\n# copy" for x in texts[: len(texts) // 10]]  # plant 10% near duplicates
    cfg = DataConfig()
    print(f"== near dedup (MinHash {cfg.dedup.bands}x{cfg.dedup.rows}, {cfg.dedup.shingle_size}-gram shingles) "
          f"on {len(texts)} docs ({sum(map(len, texts)) / 1e6:.1f} MB, {len(texts) // 11} planted near copies)")
    s_ours, n_ours = ours_near(texts, cfg)
    print(f"  dsv3 in-memory near_dedup   {s_ours:7.2f} s  {len(texts) / s_ours:8.1f} docs/s  removed={n_ours}")
    s_sh, n_sh = ours_near_shuffle(texts, cfg)
    print(f"  dsv3 spilled shuffle         {s_sh:7.2f} s  {len(texts) / s_sh:8.1f} docs/s  removed={n_sh}")
    if not a.skip_datatrove and import_datatrove():
        s_dt, n_dt = datatrove_near(texts, cfg)
        print(f"  datatrove MinHash (4 stages) {s_dt:7.2f} s  {len(texts) / s_dt:8.1f} docs/s  removed={n_dt}")
        print(f"  speed ratio vs datatrove: in-memory {s_dt / s_ours:.2f}x, spilled shuffle {s_dt / s_sh:.2f}x")


if __name__ == "__main__":
    main()
