"""GRPO reward curve on the built-in arithmetic task (DeepSeek-V3 §5.2.2), CPU-sized.

SFT a fresh model briefly on a+b problems, then run GRPO (exact answer + 0.5·boxed format
reward) and print: the reward curve (means over windows of steps), KL / clip fraction /
length / entropy, greedy accuracy on held-out prompts before vs after GRPO (the peer is
the SFT model itself), and rollout throughput on the MLA latent cache vs recomputing the
whole prefix for every new token (the peer for `model.generate`).

    python benchmarks/bench_grpo.py [--preset tiny] [--sft-steps 120] [--steps 160] [--prompts 16] [--lr 5e-4] [--max-operand 6]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dsv3 import DeepSeekV3, ModelConfig  # noqa: E402
from dsv3.data.chat import build_chat_tokenizer, encode_chat, prompt_messages  # noqa: E402
from dsv3.posttrain.config import GRPOConfig, SFTConfig  # noqa: E402
from dsv3.posttrain.grpo import arithmetic_task, train_grpo  # noqa: E402
from dsv3.posttrain.rewards import Combined, FormatReward, MathReward  # noqa: E402
from dsv3.posttrain.rollout import left_pad, rollout  # noqa: E402
from dsv3.posttrain.sft import train_sft  # noqa: E402
from dsv3.posttrain.sft_data import arithmetic_problems  # noqa: E402


def accuracy(model, tok, probs, temperature: float, k: int = 1) -> float:
    """Exact-answer rate on held-out prompts (temperature ~0: greedy; 1: sampled, k samples each)."""
    torch.manual_seed(0)
    ro = rollout(model, tok, [p["prompt"] for p in probs], k, 16, temperature=temperature)
    return sum(MathReward()([p for p in probs for _ in range(k)], ro.texts)) / (len(probs) * k)


@torch.no_grad()
def throughput(model, tok, prompts, new: int) -> tuple[float, float]:
    """Tokens/s of sampling `new` tokens: latent-cache generate vs full recompute."""
    model.eval()
    ids, mask = left_pad([encode_chat(tok, prompt_messages(p), True)[0] for p in prompts], tok.pad_token_id)
    t = time.perf_counter()
    model.generate(ids, max_new_tokens=new, temperature=1.0, attention_mask=mask)
    cached = ids.shape[0] * new / (time.perf_counter() - t)
    t = time.perf_counter()
    x, m = ids, mask
    for _ in range(new):
        logits = model(x, attention_mask=m).logits[:, -1]
        nxt = torch.multinomial(logits.softmax(-1), 1)
        x, m = torch.cat([x, nxt], 1), torch.cat([m, torch.ones_like(nxt)], 1)
    full = ids.shape[0] * new / (time.perf_counter() - t)
    return cached, full


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--sft-steps", type=int, default=120)
    ap.add_argument("--steps", type=int, default=160)
    ap.add_argument("--max-operand", type=int, default=6)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--kl", type=float, default=0.02)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--prompts", type=int, default=16)
    a = ap.parse_args(argv)
    torch.manual_seed(a.seed)
    train = arithmetic_task(600, a.seed, a.max_operand)
    held = arithmetic_task(128, a.seed + 99, a.max_operand)
    texts = [r["prompt"] + "\n" + r["response"] for r in arithmetic_problems(2000, a.seed + 1, 20)]
    tok = build_chat_tokenizer(texts, vocab_size=512)
    cfg = ModelConfig.preset(a.preset, vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = DeepSeekV3(cfg)
    n = sum(p.numel() for p in model.parameters())
    print(f"model preset={a.preset} params={n / 1e6:.2f}M; task a+b, operands <= {a.max_operand}")
    t0 = time.perf_counter()
    s = train_sft(model, tok, train[:500], train[500:], SFTConfig(max_steps=a.sft_steps, epochs=100, batch_size=16,
                                                                   lr=3e-3, warmup_steps=5),
                  log=lambda d, k: None)
    print(f"SFT {s['steps']} steps: val/loss {s['val/loss_before']:.3f} -> {s['val/loss']:.3f} "
          f"({time.perf_counter() - t0:.0f}s)")
    acc0 = accuracy(model, tok, held, 1e-6), accuracy(model, tok, held, 1.0, 4)
    gc = GRPOConfig(steps=a.steps, prompts_per_step=a.prompts, group_size=a.group, max_new_tokens=16, lr=a.lr,
                    kl_coef=a.kl,
                    seed=a.seed, max_operand=a.max_operand)
    t0 = time.perf_counter()
    hist = train_grpo(model, tok, train, Combined([(1.0, MathReward()), (0.5, FormatReward())]), gc)
    dt = time.perf_counter() - t0
    acc1 = accuracy(model, tok, held, 1e-6), accuracy(model, tok, held, 1.0, 4)
    w = max(1, a.steps // 10)
    print(f"\nGRPO {a.steps} steps, G={gc.group_size}, {gc.prompts_per_step} prompts/step ({dt:.0f}s, "
          f"{dt / a.steps:.2f}s/step)")
    print(f"{'steps':>9} {'reward':>7} {'kl':>7} {'clip':>6} {'len':>5} {'entropy':>7}")
    for i in range(0, a.steps, w):
        win = hist[i:i + w]
        mean = lambda k: sum(h[k] for h in win) / len(win)  # noqa: E731
        bar = "#" * int(20 * mean("grpo/reward_mean") / 1.5)
        print(f"{i + 1:4d}-{i + len(win):<4d} {mean('grpo/reward_mean'):7.3f} {mean('grpo/kl'):7.4f} "
              f"{mean('grpo/clip_frac'):6.3f} {mean('grpo/resp_len'):5.1f} {mean('grpo/entropy'):7.3f} {bar}")
    first = sum(h["grpo/reward_mean"] for h in hist[:w]) / w
    last = sum(h["grpo/reward_mean"] for h in hist[-w:]) / w
    print(f"\nmean reward first {w} steps {first:.3f} -> last {w} steps {last:.3f} (x{last / max(first, 1e-9):.2f})")
    print(f"held-out exact-answer rate ({len(held)} prompts), SFT -> SFT+GRPO: greedy {acc0[0]:.3f} -> {acc1[0]:.3f}; "
          f"sampled T=1 {acc0[1]:.3f} -> {acc1[1]:.3f}")
    cached, full = throughput(model, tok, [p["prompt"] for p in held[:32]], 16)
    print(f"rollout throughput: latent cache {cached:.0f} tok/s vs full recompute {full:.0f} tok/s "
          f"(x{cached / full:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
