"""FP8 vs BF16: training-loss gap and GEMM throughput (DeepSeek-V3 §3.3, Fig. 10).

Numerics: the same model (``--preset``, default ``small``), from the same initialisation,
on the same token stream, is trained twice for ``--steps`` steps (default 200):
- ``bf16``: FP32 master weights, every op under ``torch.autocast(bfloat16)``;
- ``fp8``: the same, after ``convert_to_fp8`` (Linear Fprop/Dgrad/Wgrad in E4M3 with
  1x128 / 128x128 scaling; embedding, head, gate, norms, attention core untouched).
The data is a fixed random-but-learnable stream: a first-order Markov chain over
``--markov-vocab`` token ids in which each token has ``--successors`` possible successors.
``--shards DIR`` trains on real packed token shards instead (e.g. ``data/shards`` built by
``make data``), with held-out batches from their val split.
The LR follows the shape of §4.2 scaled to the run: linear warmup (5% of the steps), constant,
cosine decay over the last ``--decay`` fraction of the steps to 10% of the peak, so the runs
end in the flat part of their curves. It prints both loss curves (every ``--print-every``
steps) and two relative gaps: of the final training loss (mean of the last ``--tail``
steps) and of the loss on ``--val-batches`` held-out batches of the same chain (never
trained on; each model evaluated in its own precision). The paper reports < 0.25% at scale.
``--modes bf16_perturbed`` adds a control run: BF16 again with the weights nudged by a
relative 1e-3 at init. Its gap to BF16 is the run-to-run noise floor of this measure
(a short MoE run is chaotic: routing decisions flip, loss drops shift by a few steps),
against which the FP8 gap should be read.

Throughput: block-scaled FP8 GEMM (quantization + GEMM, on the selected back end: exact
emulation on CPU, Triton on CUDA) vs a BF16 and an FP32 ``matmul`` of the same shapes,
measured in the same run. The CPU emulation is a numerics tool, not a fast path.

    .venv/bin/python benchmarks/bench_fp8.py                 # small, 200 steps
    .venv/bin/python benchmarks/bench_fp8.py --preset tiny --steps 30 --gemm-only
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dsv3 import DeepSeekV3, ModelConfig  # noqa: E402
from dsv3.fp8 import convert_to_fp8, fp8_gemm, quantize_act, quantize_weight  # noqa: E402


def markov_stream(vocab: int, successors: int, n: int, seed: int = 0, walk_seed: int | None = None) -> torch.Tensor:
    """n tokens of a walk on the chain fixed by `seed`; `walk_seed` draws another walk on the same chain."""
    g = torch.Generator().manual_seed(seed)
    nxt = torch.randint(0, vocab, (vocab, successors), generator=g)
    if walk_seed is not None:
        g = torch.Generator().manual_seed(walk_seed)
    pick = torch.randint(0, successors, (n,), generator=g).tolist()
    nxt = nxt.tolist()
    out, t = [], 0
    for i in range(n):
        out.append(t)
        t = nxt[t][pick[i]]
    return torch.tensor(out, dtype=torch.long)


def lr_factor(step: int, steps: int, decay: float) -> float:
    """§4.2's shape in miniature: warmup (5%), constant, cosine to 0.1 over the last `decay` fraction."""
    warm = max(1, steps // 20)
    if step < warm:
        return (step + 1) / warm
    start = int(steps * (1 - decay))
    if step < start or decay <= 0:
        return 1.0
    t = (step - start) / max(1, steps - start)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))


@torch.no_grad()
def val_loss(model, val: torch.Tensor, device: str) -> float:
    model.eval()
    tot = 0.0
    for ids in val:
        with torch.autocast(device if device != "cpu" else "cpu", dtype=torch.bfloat16):
            tot += model(ids.to(device), labels=ids.to(device)).main_loss.item()
    model.train()
    return tot / len(val)


def train(mode: str, cfg: ModelConfig, data: torch.Tensor, args, device: str, val: torch.Tensor) -> dict:
    torch.manual_seed(args.seed)
    model = DeepSeekV3(cfg).to(device)
    if mode == "bf16_perturbed":  # control: same as bf16, weights nudged by a relative 1e-3
        g = torch.Generator().manual_seed(args.seed + 1)
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(1 + 1e-3 * torch.randn(p.shape, generator=g).to(device))
    n_fp8 = len(convert_to_fp8(model, backend=args.backend)) if mode == "fp8" else 0
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, args.steps, args.decay))
    tok = args.batch * args.seq
    losses, t0 = [], time.perf_counter()
    for step in range(args.steps):
        ids = data[step * tok:(step + 1) * tok].view(args.batch, args.seq).to(device)
        with torch.autocast(device if device != "cpu" else "cpu", dtype=torch.bfloat16):
            out = model(ids, labels=ids)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(out.main_loss.item())
        if not math.isfinite(losses[-1]):
            raise RuntimeError(f"{mode}: non-finite loss at step {step}")
        if (step + 1) % args.print_every == 0 or step == 0:
            el = time.perf_counter() - t0
            print(f"  [{mode}] step {step + 1:4d}  loss {losses[-1]:.4f}  "
                  f"{tok * (step + 1) / el:7.0f} tok/s", flush=True)
    el = time.perf_counter() - t0
    vl = val_loss(model, val, device)
    print(f"  [{mode}] held-out loss {vl:.4f} ({len(val)} batches)", flush=True)
    return dict(losses=losses, seconds=el, tokens_per_s=tok * args.steps / el, n_fp8_linears=n_fp8, val_loss=vl)


def _timeit(fn, reps: int, device: str) -> float:
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / reps


def gemm_bench(shapes, device: str, backend: str | None, reps: int) -> list[dict]:
    rows = []
    for m, n, k in shapes:
        x = torch.randn(m, k, device=device)
        w = torch.randn(n, k, device=device) * 0.02
        xb, wb = x.bfloat16(), w.bfloat16()
        xq, xs = quantize_act(x, backend=backend)
        wq, ws = quantize_weight(w, backend=backend)
        flop = 2.0 * m * n * k
        t_fp32 = _timeit(lambda: x @ w.T, reps, device)
        t_bf16 = _timeit(lambda: xb @ wb.T, reps, device)
        t_gemm = _timeit(lambda: fp8_gemm(xq, xs, wq, ws, backend=backend), reps, device)
        t_full = _timeit(lambda: fp8_gemm(*quantize_act(x, backend=backend), *quantize_weight(w, backend=backend),
                                          backend=backend), reps, device)
        r = dict(shape=f"{m}x{n}x{k}", fp32_gflops=flop / t_fp32 / 1e9, bf16_gflops=flop / t_bf16 / 1e9,
                 fp8_gemm_gflops=flop / t_gemm / 1e9, fp8_quant_gemm_gflops=flop / t_full / 1e9)
        r["fp8_vs_bf16"] = r["fp8_gemm_gflops"] / r["bf16_gflops"]
        rows.append(r)
        print(f"  {r['shape']:>16}  fp32 {r['fp32_gflops']:7.1f}  bf16 {r['bf16_gflops']:7.1f}  "
              f"fp8-gemm {r['fp8_gemm_gflops']:7.1f}  fp8 quant+gemm {r['fp8_quant_gemm_gflops']:7.1f} GFLOP/s"
              f"  (fp8/bf16 {r['fp8_vs_bf16']:.2f}x)", flush=True)
    return rows


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--shards", type=Path, default=None,
                    help="train on these packed token shards (e.g. data/shards from `make data`) instead of the "
                         "Markov stream; held-out batches from their val split")
    ap.add_argument("--markov-vocab", type=int, default=1024)
    ap.add_argument("--successors", type=int, default=4)
    ap.add_argument("--tail", type=int, default=20)
    ap.add_argument("--decay", type=float, default=0.3, help="fraction of the steps with cosine LR decay")
    ap.add_argument("--val-batches", type=int, default=8)
    ap.add_argument("--print-every", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = leave as is)")
    ap.add_argument("--backend", choices=["emulate", "triton"], default=None)
    ap.add_argument("--modes", default="bf16,fp8",
                    help="runs to compare with bf16: fp8 and/or bf16_perturbed (a noise-floor control)")
    ap.add_argument("--gemm-only", action="store_true")
    ap.add_argument("--skip-gemm", action="store_true")
    ap.add_argument("--gemm-reps", type=int, default=5)
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = ModelConfig.preset(args.preset)
    res: dict = dict(preset=args.preset, device=device, threads=torch.get_num_threads(),
                     backend=args.backend or ("triton" if device == "cuda" else "emulate"))
    print(f"FP8 benchmark: preset={args.preset} device={device} threads={res['threads']} "
          f"backend={res['backend']}", flush=True)

    if not args.skip_gemm:
        h, f = cfg.hidden_size, cfg.intermediate_size
        tok = args.batch * args.seq
        shapes = [(tok, f, h), (tok, h, f), (tok * 4, f, h)]
        print("GEMM throughput (M x N x K):", flush=True)
        res["gemm"] = gemm_bench(shapes, device, args.backend, args.gemm_reps)

    if not args.gemm_only:
        n_tok = args.steps * args.batch * args.seq
        if args.shards is not None:
            from dsv3.train.stream import PackedStream

            train_s = PackedStream(args.shards, "train", args.seq, seed=args.seed)
            val_s = PackedStream(args.shards, "val", args.seq, shuffle=False)
            if train_s.shards.vocab_size > cfg.vocab_size:
                raise SystemExit(f"--shards: vocab {train_s.shards.vocab_size} > the {args.preset} preset's "
                                 f"{cfg.vocab_size}")
            data = train_s.samples(0, args.steps * args.batch).flatten()
            val = val_s.samples(0, args.val_batches * args.batch).view(args.val_batches, args.batch, args.seq)
            print(f"Training {args.steps} steps, batch {args.batch} x seq {args.seq} on {args.shards} "
                  f"({len(train_s.shards):,} train tokens)", flush=True)
        else:
            mv = min(args.markov_vocab, cfg.vocab_size)
            data = markov_stream(mv, args.successors, n_tok + 1, args.seed)
            val = markov_stream(mv, args.successors, args.val_batches * args.batch * args.seq, args.seed,
                                walk_seed=args.seed + 12345).view(args.val_batches, args.batch, args.seq)
            print(f"Training {args.steps} steps, batch {args.batch} x seq {args.seq}, Markov chain over {mv} ids "
                  f"({args.successors} successors; entropy floor {math.log(args.successors):.3f})", flush=True)
        modes = ["bf16"] + [m for m in args.modes.split(",") if m and m != "bf16"]
        runs = {mode: train(mode, cfg, data, args, device, val) for mode in modes}
        tail = min(args.tail, args.steps)
        lb = sum(runs["bf16"]["losses"][-tail:]) / tail
        if "bf16_perturbed" in runs:
            lp = sum(runs["bf16_perturbed"]["losses"][-tail:]) / tail
            vb, vp = runs["bf16"]["val_loss"], runs["bf16_perturbed"]["val_loss"]
            res["control"] = dict(bf16_perturbed_final=lp, rel_gap=(lp - lb) / lb, val_loss=vp,
                                  val_rel_gap=(vp - vb) / vb, losses=runs["bf16_perturbed"]["losses"])
            print(f"Control (bf16 with weights perturbed by 1e-3): final {lp:.4f}, relative gap "
                  f"{100 * (lp - lb) / lb:+.3f}%; held-out {vp:.4f}, gap {100 * (vp - vb) / vb:+.3f}% "
                  "(run-to-run noise floor of these measures)")
        if "fp8" not in runs:
            if args.json:
                args.json.write_text(json.dumps(res, indent=1))
            return res
        lf = sum(runs["fp8"]["losses"][-tail:]) / tail
        gap = (lf - lb) / lb
        res["train"] = dict(steps=args.steps, batch=args.batch, seq=args.seq, bf16_final=lb, fp8_final=lf,
                            rel_gap=gap, bf16_first=runs["bf16"]["losses"][0], fp8_first=runs["fp8"]["losses"][0],
                            bf16_tokens_per_s=runs["bf16"]["tokens_per_s"],
                            fp8_tokens_per_s=runs["fp8"]["tokens_per_s"],
                            n_fp8_linears=runs["fp8"]["n_fp8_linears"],
                            bf16_losses=runs["bf16"]["losses"], fp8_losses=runs["fp8"]["losses"],
                            bf16_val=runs["bf16"]["val_loss"], fp8_val=runs["fp8"]["val_loss"],
                            val_rel_gap=(runs["fp8"]["val_loss"] - runs["bf16"]["val_loss"]) / runs["bf16"]["val_loss"])
        print(f"Final loss (mean of last {tail} steps): bf16 {lb:.4f}  fp8 {lf:.4f}  "
              f"relative gap {100 * gap:+.3f}%  (paper: < 0.25%)")
        tr = res["train"]
        print(f"Held-out loss: bf16 {tr['bf16_val']:.4f}  fp8 {tr['fp8_val']:.4f}  "
              f"relative gap {100 * tr['val_rel_gap']:+.3f}%")
        print(f"Speed: bf16 {runs['bf16']['tokens_per_s']:.0f} tok/s, fp8 {runs['fp8']['tokens_per_s']:.0f} tok/s "
              f"({runs['fp8']['n_fp8_linears']} FP8 Linear layers)")
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
