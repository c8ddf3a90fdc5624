"""Model speed against transformers' DeepseekV3 on the same weights, same batch, same run.

Prints, for fp32 and bf16: training-step (fwd+bwd+AdamW) and forward tokens/s of dsv3 and
transformers, their ratio, and MFU against a matmul peak measured in this run; then greedy
decode tokens/s after a 2048-token prompt with dsv3's latent cache vs transformers (its
`generate`, and a bare step loop over its cache, which is stricter), and the KV-cache bytes
per token of both (read off the live cache tensors).

Bounds, measured in the same run, say how far any implementation could go on this machine:
- training: the time our step spends inside GEMM / attention kernels (torch.profiler, self
  time of mm/addmm/bmm/SDPA ops, forward and backward) — work a faster implementation still
  has to do with the same kernels — so `transformers step time / our kernel time` is the
  largest ratio reachable without faster GEMM kernels;
- decode (batch 1): a step must stream every activated weight and the latent cache from
  memory; `bytes per token / streaming bandwidth` (bandwidth measured on weight matrices
  that do not fit in cache) is a floor on ms/token, so `transformers ms/token / floor` is the
  largest ratio reachable at that bandwidth.

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


GEMM_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")


def kernel_time(fn) -> float:
    """Seconds of one call of fn spent in GEMM and fused-attention kernels (profiler self time)."""
    from torch.profiler import profile

    fn()
    with profile() as prof:
        fn()
    return sum(e.self_cpu_time_total for e in prof.key_averages()
               if e.key in GEMM_OPS or "scaled_dot_product" in e.key and "flash" in e.key) / 1e6


def stream_bandwidth(dtype=torch.float32, mb: int = 512) -> float:
    """Bytes/s of batch-1 matmuls over weight matrices that do not fit in cache (decode's access pattern)."""
    ws = [torch.randn(1024, 512, dtype=dtype) for _ in range(mb * 2 ** 20 // (1024 * 512 * 4))]
    x = torch.randn(1, 512, dtype=dtype)
    for w in ws:
        x @ w.T
    t = time.perf_counter()
    for w in ws:
        x @ w.T
    return sum(w.numel() * w.element_size() for w in ws) / (time.perf_counter() - t)


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
            step = train_step_fn(model, ids, hf)
            t_train = timeit(step, args.steps)
            k_train = kernel_time(step) if name == "dsv3" else None
            model.eval()
            with torch.no_grad():
                t_fwd = timeit(lambda: model(ids), args.steps)
            model.train()
            res[name] = (ntok / t_train, ntok / t_fwd, k_train)
        for i, what in enumerate(("train step", "forward")):
            a, b = res["dsv3"][i], res["transformers"][i]
            f = flops_tok if i == 0 else flops_tok / 3
            bound = (ntok / b) / res["dsv3"][2] if i == 0 else None
            rows.append((str(dtype).replace("torch.", ""), what, a, b, a / b, a * f / peak, b * f / peak, peak, bound))
        del m1, m2
    if rows:
        print(f"\n{'dtype':<9}{'path':<12}{'dsv3 tok/s':>12}{'HF tok/s':>12}{'ratio':>8}{'MFU':>8}{'HF MFU':>8}"
              f"{'peak GFLOP/s':>14}{'max ratio':>11}")
        for r in rows:
            mx = f"{r[8]:>10.2f}x" if r[8] else f"{'':>11}"
            print(f"{r[0]:<9}{r[1]:<12}{r[2]:>12.0f}{r[3]:>12.0f}{r[4]:>7.2f}x{r[5] * 100:>7.1f}%{r[6] * 100:>7.1f}%"
                  f"{r[7] / 1e9:>14.1f}{mx}")
        print("  max ratio = transformers' step time / the time our step spends in GEMM + attention kernels")

    # ---- decode after a long prompt -------------------------------------------------------
    m1 = DeepSeekV3.from_pretrained(tmp, dtype=torch.float32).eval()
    m2 = transformers.DeepseekV3ForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
    prompt = torch.randint(0, cfg.vocab_size, (1, args.prompt), generator=torch.Generator().manual_seed(1))
    n = args.decode
    with torch.no_grad():
        cache = m1.new_cache(1, args.prompt + n)
        t = time.perf_counter()
        logits = m1.forward_step(prompt, cache)[:, -1]
        t_prefill = time.perf_counter() - t
        t = time.perf_counter()
        toks = []
        for _ in range(n):
            nxt = logits.argmax(-1, keepdim=True)
            toks.append(nxt)
            logits = m1.forward_step(nxt, cache)[:, -1]
        ours_ms = (time.perf_counter() - t) / n * 1e3
        ours_bytes = cache.bytes_per_token()

        # transformers: a bare greedy step loop over its cache (what generate runs, minus its overhead)
        t = time.perf_counter()
        out = m2(input_ids=prompt, use_cache=True)
        hf_prefill = time.perf_counter() - t
        past = out.past_key_values
        hf_bytes = sum(x.element_size() * x.shape[-1] * x.shape[1]
                       for layer in past.layers for x in (layer.keys, layer.values))
        lg, hf_toks = out.logits[:, -1], []
        t = time.perf_counter()
        for _ in range(n):
            nxt = lg.argmax(-1, keepdim=True)
            hf_toks.append(nxt)
            o = m2(input_ids=nxt, past_key_values=past, use_cache=True)
            lg, past = o.logits[:, -1], o.past_key_values
        hf_loop_ms = (time.perf_counter() - t) / n * 1e3
        # transformers generate: (time for n + 1 new tokens - time for 1) / n, both with the prefill
        gen = lambda k: m2.generate(prompt, max_new_tokens=k, min_new_tokens=k, do_sample=False,  # noqa: E731
                                    pad_token_id=0)
        t = time.perf_counter()
        g = gen(n + 1)
        t_n = time.perf_counter() - t
        t = time.perf_counter()
        gen(1)
        hf_gen_ms = (t_n - (time.perf_counter() - t)) / n * 1e3
    same = torch.equal(torch.cat(toks, 1), g[:, args.prompt:args.prompt + n])
    same_loop = torch.equal(torch.cat(toks, 1), torch.cat(hf_toks, 1))
    # floor: every activated weight (embedding row aside) and the whole latent cache streamed once per token
    w_bytes = 4 * (cfg.num_params(activated=True, include_embedding=False) + cfg.vocab_size * cfg.hidden_size)
    c_bytes = ours_bytes * (args.prompt + n // 2)
    bw = stream_bandwidth()
    floor_ms = (w_bytes + c_bytes) / bw * 1e3
    print(f"\ndecode after a {args.prompt}-token prompt (fp32, batch 1, greedy, {n} tokens, ms/token = 1000/tok/s):")
    print(f"  dsv3 latent cache     : {1e3 / ours_ms:7.1f} tok/s  {ours_ms:6.2f} ms  (prefill {t_prefill:.2f}s)  "
          f"cache {ours_bytes} B/token")
    print(f"  transformers generate : {1e3 / hf_gen_ms:7.1f} tok/s  {hf_gen_ms:6.2f} ms  (prefill {hf_prefill:.2f}s)  "
          f"cache {hf_bytes} B/token   same greedy tokens: {same}")
    print(f"  transformers step loop: {1e3 / hf_loop_ms:7.1f} tok/s  {hf_loop_ms:6.2f} ms  same tokens: {same_loop}")
    print(f"  ratio                 : {hf_gen_ms / ours_ms:7.2f}x vs generate, {hf_loop_ms / ours_ms:.2f}x vs the step loop")
    print(f"  floor                 : {floor_ms:6.2f} ms/token = ({w_bytes / 1e6:.1f} MB activated weights + "
          f"{c_bytes / 1e6:.1f} MB latent cache) / {bw / 1e9:.1f} GB/s streaming  ->  max ratio "
          f"{hf_gen_ms / floor_ms:.2f}x vs generate; dsv3 is at {floor_ms / ours_ms * 100:.0f}% of the floor")


if __name__ == "__main__":
    main()
