"""Training benchmarks: prints figures, never pass/fail.

1. tokens/s and MFU per precision (fp32, bf16, fp8) on one process, MFU against a
   matmul peak measured in the same run (fp32 peak for fp32, bf16 peak otherwise);
2. FP8 vs BF16 loss gap after N steps from the same init and data (the paper reports
   < 0.25% relative; the acceptance bar is on `small` with >= 200 steps:
   `--gap-preset small --gap-steps 200`, which takes hours on a 2-core CPU);
3. resume determinism: 6 steps straight vs 3 + resume, CPU fp32, 1 thread: bitwise?

    python benchmarks/bench_train.py [--preset small] [--steps 3] [--gap-preset tiny] [--gap-steps 60]
Data: ./data/shards when present (make data), else synthetic shards in a temp dir.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dsv3.config import RunConfig  # noqa: E402
from dsv3.data.shards import write_split  # noqa: E402
from dsv3.train.loop import train  # noqa: E402
from dsv3.train.perf import measure_matmul_peak  # noqa: E402


def synthetic_shards(d: Path, vocab: int) -> str:
    rng = np.random.default_rng(0)

    def docs(n):
        for _ in range(n):
            a, s, L = rng.integers(2, vocab), rng.integers(1, 7), rng.integers(50, 400)
            yield np.append((a + s * np.arange(L)) % (vocab - 2) + 2, 1)

    write_split(d, "train", list(docs(3000)), vocab, n_bytes=3000 * 225 * 3)
    write_split(d, "val", list(docs(100)), vocab, n_bytes=100 * 225 * 3)
    return str(d)


def cfg_for(preset: str, shards: str, out: Path, **train) -> RunConfig:
    t = dict(shards=shards, out_dir=str(out), seq_len=256, batch_size=4, steps=3, eval_every=10 ** 6,
             ckpt_every=10 ** 6, plots=False, register_model=False, log_checkpoints=False, ema=False,
             warmup_frac=0.1, lr=1e-3, threads=torch.get_num_threads())
    if Path(shards).resolve() != Path("data/shards").resolve():  # synthetic ids: no tokenizer goes with them
        t["tokenizer"] = str(Path(shards) / "no-tokenizer")
    t.update(train)
    return RunConfig.from_dict({"name": "bench", "preset": preset, "train": t})


def shards_for(preset: str, tmp: Path) -> str:
    vocab = RunConfig.from_dict({"preset": preset}).model.vocab_size
    real = Path("data/shards/index.json")
    if real.is_file():
        import json

        if json.loads(real.read_text())["vocab_size"] <= vocab:
            return "data/shards"
    return synthetic_shards(tmp / f"shards_{vocab}", vocab)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="small")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--gap-preset", default="tiny")
    ap.add_argument("--gap-steps", type=int, default=60)
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench_train_"))
    try:
        print(f"threads {torch.get_num_threads()}; matmul peak fp32 {measure_matmul_peak(torch.float32) / 1e9:.1f} "
              f"GFLOP/s, bf16 {measure_matmul_peak(torch.bfloat16) / 1e9:.1f} GFLOP/s")
        sh = shards_for(a.preset, tmp)
        print(f"\n== throughput: preset {a.preset}, seq {a.seq_len} x batch {a.batch}, {a.steps} steps "
              f"(first step excluded)")
        print(f"{'precision':>9} {'tokens/s':>10} {'MFU':>7} {'s/step':>8}")
        for prec in ("fp32", "bf16", "fp8"):
            r = train(cfg_for(a.preset, sh, tmp / prec, precision=prec, steps=a.steps, seq_len=a.seq_len,
                              batch_size=a.batch), track=False)
            h = r.history[1:] or r.history
            tps = float(np.mean([x["perf/tokens_per_s"] for x in h]))
            mfu = float(np.mean([x["perf/mfu"] for x in h]))
            print(f"{prec:>9} {tps:>10.1f} {100 * mfu:>6.2f}% {np.mean([x['perf/step_s'] for x in h]):>8.2f}")

        print(f"\n== FP8 vs BF16 loss gap: preset {a.gap_preset}, {a.gap_steps} steps, seq 128 x batch 4")
        gsh = shards_for(a.gap_preset, tmp)
        loss = {}
        for prec in ("bf16", "fp8"):
            r = train(cfg_for(a.gap_preset, gsh, tmp / f"gap_{prec}", precision=prec, steps=a.gap_steps,
                              seq_len=128, batch_size=4), track=False)
            loss[prec] = float(np.mean([x["train/main_loss"] for x in r.history[-10:]]))
        gap = (loss["fp8"] - loss["bf16"]) / loss["bf16"]
        print(f"final train loss (mean of last 10 steps): bf16 {loss['bf16']:.4f}  fp8 {loss['fp8']:.4f}  "
              f"relative gap {100 * gap:+.3f}% (paper: < 0.25%)")

        print("\n== resume determinism: tiny, CPU fp32, 1 thread, 6 steps vs 3 + resume")
        torch.set_num_threads(1)
        rsh = shards_for("tiny", tmp)
        ref = train(cfg_for("tiny", rsh, tmp / "ref", steps=6, seq_len=64, threads=1, ckpt_every=3), track=False)
        part = cfg_for("tiny", rsh, tmp / "res", steps=6, seq_len=64, threads=1, ckpt_every=3)
        r1 = train(part, track=False)
        shutil.rmtree(r1.checkpoint)  # the latest is now step 3
        t0 = time.time()
        train(part, resume=True, track=False)
        import json

        got = {}
        for line in (tmp / "res" / "metrics.jsonl").read_text().splitlines():
            x = json.loads(line)
            if "train/loss" in x:
                got[x["step"]] = x["train/loss"]
        same = [got[s] for s in range(1, 7)] == [x["train/loss"] for x in ref.history]
        print(f"resumed losses bitwise equal to the uninterrupted run: {same} (resume took {time.time() - t0:.1f}s)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
