"""Serving benchmarks (issue 14): decode speed against transformers, MTP speculation, and the
OpenAI-compatible server under load, all ratios measured in one run on the same weights.

    python benchmarks/bench_serve.py [--parts decode,spec,server,mixed] [--threads 2]

- decode: batch-1 greedy decode after a 2,048-token prompt on bench_model.py's config (fp32 and
  bf16, whole model cast): transformers `generate` ((time of n+1 new tokens - time of 1) / n, as
  bench_model.py), the model's eager `forward_step`, and the engine's static-shape step under
  torch.compile (no speculation). The floor is (activated weights + latent cache) bytes / the
  best memory-streaming rate measured in-run (a plain reduction over 512 MB and compiled
  GEMVs over weight matrices that do not fit in cache): no decode step can beat it.
- spec: a small model with one MTP module trained here through dsv3.train on a predictable
  synthetic corpus (or `--spec-ckpt DIR`, e.g. the small preset after `make pretrain`):
  acceptance per draft position and tokens/s of speculative vs plain decoding, both with the
  same engine and step (compiled when --compile).
- server: the OpenAI server on loopback under a bounded load generator (the official `openai`
  client, concurrency 1 / 8 / 32, fixed prompts and seeds): throughput, TTFT and TPOT p50/p99,
  against transformers `generate` over the same prompts in static batches of the same size.
- mixed: short requests decoding while long prompts arrive: decode TPOT p50/p99 with prefill
  disaggregated (a prefill worker process) vs colocated.

The machine these figures were taken on is shared (other processes compete for its 2 cores);
every figure prints its median and best of several runs; treat ratios as indicative.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from bench_model import BENCH  # noqa: E402


def fmt(xs: list[float], scale: float = 1e3) -> str:
    return f"{statistics.median(xs) * scale:7.2f} (best {min(xs) * scale:.2f})"


def stream_bandwidth(dtype) -> float:
    """Best bytes/s of reading memory: a reduction over 512 MB, and compiled GEMVs over 256 MB of
    weight matrices (the access pattern of a decode step)."""
    big = torch.randn(128 << 20 if dtype == torch.float32 else 256 << 20).to(dtype)
    best = 0.0
    for _ in range(3):
        t = time.perf_counter()
        big.sum()
        best = max(best, big.numel() * big.element_size() / (time.perf_counter() - t))
    del big
    ws = [torch.randn(1024, 512).to(dtype) for _ in range(128 if dtype == torch.float32 else 256)]
    x = torch.randn(1, 512).to(dtype)
    gemv = torch.compile(lambda w, x: (w.float() * x.float()).sum(-1), dynamic=False)
    for w in ws[:2]:
        gemv(w, x)
    for _ in range(3):
        t = time.perf_counter()
        for w in ws:
            gemv(w, x)
        best = max(best, sum(w.numel() * w.element_size() for w in ws) / (time.perf_counter() - t))
    return best


# ---- decode vs transformers ------------------------------------------------------------------
def decode_ours(model, prompt, n: int, compile: bool, reps: int):
    """Per-token seconds of the engine's decode step (batch 1) after prefilling `prompt`."""
    from dsv3.serve.cache import BlockPool
    from dsv3.serve.runner import ModelRunner, step_input

    c = model.config
    pool = BlockPool(c.num_hidden_layers, prompt.shape[1] + n + 64, 64, c.kv_lora_rank + c.qk_rope_head_dim,
                     dtype=model.dtype)
    run = ModelRunner(model, pool, static_moe=True, compile=compile)
    seq = pool.alloc(prompt.shape[1] + n + 1)
    t0 = time.perf_counter()
    logits, _ = run.forward(step_input([0], prompt, [seq.table], 64), all_logits=False)
    t_prefill = time.perf_counter() - t0
    P = prompt.shape[1]

    def one_pass():
        seq.length = P
        lg, toks = logits[0, -1], []
        t = time.perf_counter()
        for _ in range(n):
            toks.append(int(lg.argmax()))
            lg, _ = run.forward(step_input([seq.length], torch.tensor([[toks[-1]]]), [seq.table], 64))
            lg = lg[0, -1]
            seq.length += 1
        return (time.perf_counter() - t) / n, toks

    t0 = time.perf_counter()
    one_pass()  # warm-up (compiles)
    t_warm = time.perf_counter() - t0
    times, toks = [], None
    for _ in range(reps):
        dt, toks = one_pass()
        times.append(dt)
    return times, toks, t_prefill, t_warm, pool.bytes_per_token()


def decode_model_eager(model, prompt, n: int, reps: int):
    cache = model.new_cache(1, prompt.shape[1] + n + 1)
    with torch.no_grad():
        lg0 = model.forward_step(prompt, cache)[:, -1]
    P = prompt.shape[1]
    times = []
    for _ in range(reps):
        cache.length = P
        lg = lg0
        t = time.perf_counter()
        with torch.no_grad():
            for _ in range(n):
                lg = model.forward_step(lg.argmax(-1, keepdim=True), cache)[:, -1]
        times.append((time.perf_counter() - t) / n)
    return times


def decode_hf(path, dtype, prompt, n: int, reps: int):
    """transformers `generate`: per-token time = (t(n+1 tokens) - t(1 token)) / n, each the best
    of `reps` runs (the difference of two noisy timings is only stable with best-of)."""
    import transformers

    m = transformers.DeepseekV3ForCausalLM.from_pretrained(path, dtype=dtype).eval()
    gen = lambda k: m.generate(prompt, max_new_tokens=k, min_new_tokens=k, do_sample=False,  # noqa: E731
                               pad_token_id=0)
    t_n, t_1, out = [], [], None
    with torch.no_grad():
        for _ in range(reps):
            t = time.perf_counter()
            out = gen(n + 1)
            t_n.append(time.perf_counter() - t)
            t = time.perf_counter()
            gen(1)
            t_1.append(time.perf_counter() - t)
    return [(min(t_n) - min(t_1)) / n], out[0, prompt.shape[1]:prompt.shape[1] + n].tolist()


def part_decode(a) -> None:
    from dsv3 import DeepSeekV3, ModelConfig

    cfg = ModelConfig.make(**BENCH)
    torch.manual_seed(0)
    tmp = tempfile.mkdtemp()
    DeepSeekV3(cfg).save_pretrained(tmp)
    prompt = torch.randint(0, cfg.vocab_size, (1, a.prompt), generator=torch.Generator().manual_seed(1))
    n = a.decode
    print(f"\n== decode: batch 1, greedy, {n} tokens after a {a.prompt}-token prompt, {a.threads} threads "
          f"(ms/token: median (best) of {a.reps})")
    for dtype in (torch.float32, torch.bfloat16):
        name = str(dtype).replace("torch.", "")
        hf, hf_toks = decode_hf(tmp, dtype, prompt, n, max(2, a.reps // 2))
        eager = decode_model_eager(DeepSeekV3.from_pretrained(tmp, dtype=dtype).eval(), prompt, n, a.reps)
        ours, toks, t_pre, t_warm, cbytes = decode_ours(DeepSeekV3.from_pretrained(tmp, dtype=dtype).eval(), prompt, n,
                                                        a.compile, a.reps)
        bw = stream_bandwidth(dtype)
        esz = torch.finfo(dtype).bits // 8
        w_bytes = esz * (cfg.num_params(activated=True, include_embedding=False) + cfg.vocab_size * cfg.hidden_size)
        floor = (w_bytes + cbytes * (a.prompt + n // 2)) / bw
        step = "compiled static step" if a.compile else "static step (eager)"
        print(f"  {name}: transformers generate {hf[0] * 1e3:7.2f}   dsv3 eager forward_step {fmt(eager)}   "
              f"engine {step} {fmt(ours)}  (prefill {t_pre:.1f}s, warm-up/compile {t_warm:.0f}s)")
        print(f"  {name}: speed-up vs transformers generate: {hf[0] / min(ours):.2f}x (engine best; "
              f"{hf[0] / statistics.median(ours):.2f}x on its median; eager forward_step {hf[0] / min(eager):.2f}x)"
              f"   same greedy tokens: {toks == hf_toks}")
        print(f"  {name}: floor {floor * 1e3:.2f} ms = ({w_bytes / 1e6:.1f} MB weights + "
              f"{cbytes * (a.prompt + n // 2) / 1e6:.1f} MB latent cache) / {bw / 1e9:.1f} GB/s -> engine at "
              f"{floor / min(ours) * 100:.0f}% of the floor; largest reachable ratio {min(hf) / floor:.2f}x")


PARTS = {"decode": part_decode}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--parts", default="decode,spec,server,mixed")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=2048)
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--no-compile", dest="compile", action="store_false")
    ap.add_argument("--spec-ckpt", default=None, help="a checkpoint with a trained MTP module")
    ap.add_argument("--spec-steps", type=int, default=300, help="training steps of the speculation bench model")
    ap.add_argument("--track", action="store_true", help="log speculation figures to MLflow")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    import transformers

    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {a.threads} threads; "
          f"load average at start {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores (a shared machine: noisy)")
    for p in a.parts.split(","):
        PARTS[p.strip()](a)


if __name__ == "__main__":
    main()
