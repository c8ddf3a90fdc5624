"""Model speed against transformers' DeepseekV3 on the same weights, same batch, same run.

Prints, for fp32 and bf16: training-step (fwd+bwd+AdamW) and forward tokens/s of dsv3 and
transformers, their ratio, and MFU against a matmul peak measured in this run; then greedy
decode tokens/s after a 2048-token prompt with dsv3's latent cache vs transformers
`generate`, and the KV-cache bytes per token of both (read off the live cache tensors).

    .venv/bin/python benchmarks/bench_model.py [--threads 2] [--steps 3] [--decode 32]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from dsv3 import DeepSeekV3, ModelConfig

BENCH = dict(vocab_size=8192, hidden_size=512, num_hidden_layers=6, first_k_dense_replace=1,
             num_attention_heads=8, n_routed_experts=16, num_experts_per_tok=4, n_shared_experts=1,
             n_group=4, topk_group=2, q_lora_rank=192, kv_lora_rank=128, qk_nope_head_dim=64,
             qk_rope_head_dim=32, v_head_dim=64, intermediate_size=1408, moe_intermediate_size=256,
             num_nextn_predict_layers=0, max_position_embeddings=4096, aux_loss_alpha=0.0)


def matmul_peak(dtype, n=1024, reps=10) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(2):
        a @ b
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n ** 3 * reps / (time.perf_counter() - t)


def timeit(fn, steps: int) -> float:
    fn()  # warm-up
    t = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - t) / steps


def train_step_fn(model, ids, hf: bool):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def step():
        out = model(input_ids=ids, labels=ids) if hf else model(ids, labels=ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--prompt", type=int, default=2048)
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--skip-train", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import transformers

    cfg = ModelConfig.make(**BENCH)
    torch.manual_seed(0)
    ours = DeepSeekV3(cfg)
    tmp = tempfile.mkdtemp()
    ours.save_pretrained(tmp)
    ntok = args.batch * args.seq
    flops_tok = cfg.flops_per_token(args.seq)
    print(f"config: {cfg.num_params() / 1e6:.1f}M params ({cfg.num_params(activated=True) / 1e6:.1f}M activated), "
          f"batch {args.batch}x{args.seq}, {args.threads} threads, torch {torch.__version__}, "
          f"transformers {transformers.__version__}")
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    rows = []
    for dtype in ([] if args.skip_train else [torch.float32, torch.bfloat16]):
        peak = matmul_peak(dtype)
        m1 = DeepSeekV3.from_pretrained(tmp, dtype=dtype).train()
        m2 = transformers.DeepseekV3ForCausalLM.from_pretrained(tmp, dtype=dtype).train()
        res = {}
        for name, model, hf in (("dsv3", m1, False), ("transformers", m2, True)):
            t_train = timeit(train_step_fn(model, ids, hf), args.steps)
            model.eval()
            with torch.no_grad():
                t_fwd = timeit(lambda: model(ids), args.steps)
            model.train()
            res[name] = (ntok / t_train, ntok / t_fwd)
        for i, what in enumerate(("train step", "forward")):
            a, b = res["dsv3"][i], res["transformers"][i]
            f = flops_tok if i == 0 else flops_tok / 3
            rows.append((str(dtype).replace("torch.", ""), what, a, b, a / b, a * f / peak, peak))
        del m1, m2
    if rows:
        print(f"\n{'dtype':<9}{'path':<12}{'dsv3 tok/s':>12}{'HF tok/s':>12}{'ratio':>8}{'MFU':>8}{'peak GFLOP/s':>14}")
        for r in rows:
            print(f"{r[0]:<9}{r[1]:<12}{r[2]:>12.0f}{r[3]:>12.0f}{r[4]:>7.2f}x{r[5] * 100:>7.1f}%{r[6] / 1e9:>14.1f}")

    # ---- decode after a long prompt -------------------------------------------------------
    m1 = DeepSeekV3.from_pretrained(tmp, dtype=torch.float32).eval()
    m2 = transformers.DeepseekV3ForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
    prompt = torch.randint(0, cfg.vocab_size, (1, args.prompt), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        cache = m1.new_cache(1, args.prompt + args.decode)
        t = time.perf_counter()
        logits = m1.forward_step(prompt, cache)[:, -1]
        t_prefill = time.perf_counter() - t
        t = time.perf_counter()
        toks = []
        for _ in range(args.decode):
            nxt = logits.argmax(-1, keepdim=True)
            toks.append(nxt)
            logits = m1.forward_step(nxt, cache)[:, -1]
        ours_tps = args.decode / (time.perf_counter() - t)
        ours_bytes = cache.bytes_per_token()

        t = time.perf_counter()
        out = m2(input_ids=prompt, use_cache=True)
        hf_prefill = time.perf_counter() - t
        past = out.past_key_values
        hf_bytes = sum(x.element_size() * x.shape[-1] * x.shape[1]
                       for layer in past.layers for x in (layer.keys, layer.values))
        t = time.perf_counter()
        g = m2.generate(prompt, max_new_tokens=args.decode, min_new_tokens=args.decode, do_sample=False,
                        pad_token_id=0)
        hf_gen = time.perf_counter() - t
        hf_tps = args.decode / max(hf_gen - hf_prefill, 1e-9)
    same = torch.equal(torch.cat(toks, 1), g[:, args.prompt:])
    print(f"\ndecode after a {args.prompt}-token prompt (fp32, batch 1, greedy, {args.decode} tokens):")
    print(f"  dsv3 latent cache : {ours_tps:8.1f} tok/s  (prefill {t_prefill:.2f}s)  cache {ours_bytes} B/token")
    print(f"  transformers      : {hf_tps:8.1f} tok/s  (prefill {hf_prefill:.2f}s)  cache {hf_bytes} B/token")
    print(f"  ratio             : {ours_tps / hf_tps:8.2f}x   same greedy tokens: {same}")


if __name__ == "__main__":
    main()
