"""Serving benchmarks: decode speed against transformers, MTP speculation, and the
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
  against transformers `generate` over the same prompts in static batches of the same size. The
  server decodes with the compiled static step (`dsv3 serve --compile`; `--no-compile`: eager),
  warmed up by one pass of the whole load.
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
    from dsv3.serve.model_runner import ModelRunner, step_input

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


# ---- MTP speculative decoding -------------------------------------------------------------------
def phrase_docs(n_docs: int, vocab: int, seed: int, n_phrases: int = 64):
    """Documents made of 64 fixed random 'phrases' (6-19 tokens) in random order: inside a phrase
    the next two tokens are determined, at a boundary the next phrase is a 1-in-64 guess (~8% of
    positions), so a trained MTP module can reach the paper's 85-90% second-token acceptance.
    Documents are ~3,000 tokens long so that end-of-document (1 in ~250 boundaries) is less likely
    than any one phrase (1 in 64): greedy decoding then continues with phrases, as training saw,
    instead of emitting EOS at every boundary and drifting into text the model never saw."""
    import numpy as np

    rng = np.random.default_rng(0)
    phrases = [rng.integers(2, vocab, int(rng.integers(6, 20))) for _ in range(n_phrases)]
    rng = np.random.default_rng(seed)
    for _ in range(n_docs):
        parts, n = [], 0
        while n < 3000:
            p = phrases[int(rng.integers(n_phrases))]
            parts.append(p)
            n += len(p)
        yield np.append(np.concatenate(parts), 1)


def train_spec_model(a, out: Path) -> str:
    """bench_model.py's architecture with one MTP module, trained through dsv3.train."""
    from dsv3.config import RunConfig
    from dsv3.data.shards import write_split
    from dsv3.model.config import PRESETS
    from dsv3.train.loop import train

    vocab = BENCH["vocab_size"]
    write_split(out / "shards", "train", list(phrase_docs(120, vocab, 1)), vocab)
    write_split(out / "shards", "val", list(phrase_docs(4, vocab, 2)), vocab)
    cfg = RunConfig.from_dict({
        "preset": "tiny", "model": {**PRESETS["tiny"], **BENCH, "num_nextn_predict_layers": 1},
        "train": {"shards": str(out / "shards"), "tokenizer": str(out / "none"), "out_dir": str(out / "run"),
                  "seq_len": 128, "batch_size": 8, "steps": a.spec_steps, "lr": 1.5e-3, "warmup_frac": 0.05,
                  "eval_every": a.spec_steps, "eval_batches": 1, "ckpt_every": a.spec_steps, "ema": False,
                  "plots": False, "log_checkpoints": False, "register_model": False, "threads": a.threads,
                  "precision": "fp32"}})
    t = time.perf_counter()
    res = train(cfg, track=False)
    print(f"  trained {a.spec_steps} steps through dsv3.train in {time.perf_counter() - t:.0f}s: "
          f"final {', '.join(f'{k} {v:.3f}' for k, v in res.final.items() if 'loss' in k)}")
    return res.model_dir


class _Tok:  # the engine detokenizes for stop strings; this bench needs none
    eos_token_id = None

    def decode(self, ids, skip_special_tokens=True):
        return ""


def spec_run(model, prompt: list[int], n: int, K: int, compile: bool, reps: int):
    """Best and median per-token seconds (first to last token) and acceptance of one engine."""
    from dsv3.serve.config import ServeConfig
    from dsv3.serve.engine import Engine, Request
    from dsv3.serve.sampling import SamplingParams

    eng = Engine(model, _Tok(), ServeConfig(speculative=K, compile=compile, block_size=64,
                                            cache_tokens=len(prompt) + n + 256))
    times, toks = [], None
    for r in range(reps + 1):  # the first run warms up (compiles)
        stamps: list[float] = []
        got: list[int] = []
        req = Request(prompt, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True),
                      sink=lambda o: (stamps.append(time.perf_counter()), got.extend(o.token_ids)))
        eng.submit(req)
        while eng.waiting or eng.running:
            eng.step()
        if r:
            times.append((stamps[-1] - stamps[0]) / (n - 1))
        toks = got
    return times, toks, eng


def step_costs(eng, prompt: list[int], K: int, reps: int = 20) -> dict[str, float]:
    """Best seconds of the calls one speculative iteration makes (batch 1, same engine and step):
    a plain decode step, the verification of K+1 tokens, the MTP catch-up and one more draft."""
    from dsv3.serve.model_runner import step_input

    run, bs = eng.runner, eng.pool.block_size
    seq = eng.pool.alloc(len(prompt) + 2 * K + 8)
    _, h = run.forward(step_input([0], torch.tensor([prompt]), [seq.table], bs), all_logits=False)
    P, S = len(prompt), K + 1

    def best(fn):
        fn()
        out = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t)
        return min(out)

    ids = lambda n: torch.tensor([prompt[:n]])  # noqa: E731
    c = {"plain": best(lambda: run.forward(step_input([P], ids(1), [seq.table], bs))),
         "verify": best(lambda: run.forward(step_input([P], ids(S), [seq.table], bs))),
         "mtp": best(lambda: run.mtp_forward(0, h[:, :S], step_input([P - S], ids(S), [seq.table], bs, lens=[S]),
                                             all_logits=False))}
    c["draft"] = best(lambda: run.mtp_forward(0, h[:, :1], step_input([P], ids(1), [seq.table], bs))) if K > 1 else 0.0
    eng.pool.release(seq)
    return c


def part_spec(a) -> None:
    from dsv3 import DeepSeekV3

    print(f"\n== MTP speculative decoding (batch 1, greedy): acceptance and speed-up over our own decode")
    path = a.spec_ckpt or train_spec_model(a, Path(tempfile.mkdtemp()))
    model = DeepSeekV3.from_pretrained(path).eval()
    prompt = [int(x) for x in next(phrase_docs(1, model.config.vocab_size, 99))[:256]]  # held-out document
    n = a.spec_tokens
    base, toks0, _ = spec_run(model, prompt, n, 0, a.compile, a.reps)
    print(f"  no speculation: {fmt(base)} ms/token   ({'compiled' if a.compile else 'eager'} step, {n} tokens "
          f"after a {len(prompt)}-token prompt)")
    rows = {}
    for K in a.spec_k:
        t, toks, eng = spec_run(model, prompt, n, K, a.compile, a.reps)
        st = eng.spec.stats()
        acc = " ".join(f"pos{k}: {st[f'serve/spec_accept_pos{k}'] * 100:.0f}%" for k in range(1, K + 1)
                       if f"serve/spec_accept_pos{k}" in st)
        rows[K] = (statistics.median(base) / statistics.median(t), min(base) / min(t), st)
        c = step_costs(eng, prompt, K)
        tps = st["serve/spec_tokens_per_step"]
        ceiling = tps * c["plain"] / (c["verify"] + c["mtp"] + (K - 1) * c["draft"])
        print(f"  K={K} drafts:     {fmt(t)} ms/token   acceptance {acc}   tokens/step "
              f"{tps:.2f}   speed-up {rows[K][0]:.2f}x (best/best {rows[K][1]:.2f}x)"
              f"   same tokens as without: {toks == toks0}")
        print(f"               one iteration = verify {K + 1} tokens {c['verify'] / c['plain']:.2f}x a plain step + "
              f"MTP catch-up {c['mtp'] / c['plain']:.2f}x" + (f" + {K - 1} x draft {c['draft'] / c['plain']:.2f}x"
                                                            if K > 1 else "")
              + f"  ->  ceiling at this acceptance {ceiling:.2f}x")
    if a.track:
        from dsv3 import tracking

        with tracking.start_run({"bench": "serve", "spec_k": a.spec_k}, stage="bench_serve"):
            for K, (sp, sp_best, st) in rows.items():
                tracking.log_metrics({**{f"{k}_k{K}": v for k, v in st.items()}, f"serve/spec_speedup_k{K}": sp})


# ---- the server under load ----------------------------------------------------------------------
def bench_checkpoint(out: Path, mtp: int = 0) -> str:
    """bench_model.py's config with random weights and a small byte-level BPE tokenizer."""
    from dsv3 import DeepSeekV3, ModelConfig
    from dsv3.data.config import TokenizerConfig
    from dsv3.data.tokenizer import train_tokenizer

    text = [" ".join(f"w{i * j % 997} x{j}" for j in range(60)) for i in range(200)]
    train_tokenizer(text, out, TokenizerConfig(vocab_size=2048, min_frequency=1))
    torch.manual_seed(0)
    DeepSeekV3(ModelConfig.make(**{**BENCH, "num_nextn_predict_layers": mtp})).save_pretrained(out)
    return str(out)


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))] if xs else float("nan")


def load_test(url: str, name: str, prompts: list[list[int]], concurrency: int, max_tokens: int) -> dict:
    """`concurrency` client threads (official openai client, streaming) work through the prompts;
    returns throughput and TTFT / TPOT samples measured at the client."""
    import threading

    import openai

    todo = list(enumerate(prompts))
    lock = threading.Lock()
    ttft, tpot, ntok = [], [], [0]

    def worker():
        c = openai.OpenAI(base_url=url + "/v1", api_key="bench", max_retries=0, timeout=3600)
        while True:
            with lock:
                if not todo:
                    return
                i, p = todo.pop(0)
            t0 = time.perf_counter()
            last, n = None, 0
            for ch in c.completions.create(model=name, prompt=p, max_tokens=max_tokens, temperature=0, seed=i,
                                           stream=True, extra_body={"ignore_eos": True}):
                now = time.perf_counter()
                if ch.choices and ch.choices[0].finish_reason is None or n == 0:
                    if last is None:
                        ttft.append(now - t0)
                    else:
                        tpot.append(now - last)
                    last = now
                n += 1
            with lock:
                ntok[0] += max_tokens
    t = time.perf_counter()
    ts = [threading.Thread(target=worker) for _ in range(concurrency)]
    for th in ts:
        th.start()
    for th in ts:
        th.join()
    wall = time.perf_counter() - t
    return {"tok_s": ntok[0] / wall, "ttft": ttft, "tpot": tpot, "wall": wall}


def hf_static(path: str, prompts: list[list[int]], batch: int, max_tokens: int) -> dict:
    """transformers `generate` over the same prompts in static batches of `batch` (left-padded)."""
    import transformers

    m = transformers.DeepseekV3ForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ttft, tpot, total = [], [], 0.0
    for s in range(0, len(prompts), batch):
        chunk = prompts[s:s + batch]
        S = max(map(len, chunk))
        ids = torch.zeros(len(chunk), S, dtype=torch.long)
        am = torch.zeros(len(chunk), S, dtype=torch.long)
        for r, p in enumerate(chunk):
            ids[r, S - len(p):], am[r, S - len(p):] = torch.tensor(p), 1
        kw = dict(attention_mask=am, do_sample=False, pad_token_id=0)
        with torch.no_grad():
            t = time.perf_counter()
            m.generate(ids, max_new_tokens=1, min_new_tokens=1, **kw)
            t1 = time.perf_counter() - t
            t = time.perf_counter()
            m.generate(ids, max_new_tokens=max_tokens, min_new_tokens=max_tokens, **kw)
            tn = time.perf_counter() - t
        total += tn
        ttft += [t1] * len(chunk)  # every request of a static batch waits for the batch's prefill
        tpot += [(tn - t1) / (max_tokens - 1)] * len(chunk)
    return {"tok_s": len(prompts) * max_tokens / total, "ttft": ttft, "tpot": tpot}


def part_server(a) -> None:
    from dsv3.serve.config import ServeConfig
    from dsv3.serve.server import Server

    path = bench_checkpoint(Path(tempfile.mkdtemp()))
    g = torch.Generator().manual_seed(0)
    mt = a.server_tokens
    print(f"\n== server on loopback, official openai client, greedy, {mt} tokens per request, prompts of "
          f"64-256 tokens, {'compiled' if a.compile else 'eager'} decode step (ms; ratios vs transformers generate "
          f"in static batches of the same size)")
    print(f"  {'conc':>4} {'who':<14} {'tok/s':>8} {'TTFT p50':>9} {'p99':>8} {'TPOT p50':>9} {'p99':>8}")
    for conc in a.concurrency:
        n_req = max(2 * conc, 8)
        prompts = [torch.randint(2, BENCH["vocab_size"], (int(torch.randint(64, 257, (1,), generator=g)),),
                                 generator=g).tolist() for _ in range(n_req)]
        cfg = ServeConfig(model=path, port=0, max_batch=max(conc, 1), max_queue=4 * n_req, block_size=64,
                          cache_tokens=conc * (256 + mt + 64) + 1024, threads=a.threads, compile=a.compile)
        with Server(cfg) as srv:
            # warm-up: the whole load once (a compiled step compiles once per padded batch size)
            load_test(srv.url, srv.name, prompts, conc, mt if a.compile else 4)
            ours = load_test(srv.url, srv.name, prompts, conc, mt)
        hf = hf_static(path, prompts, conc, mt)
        for who, r in (("dsv3 server", ours), ("HF static", hf)):
            print(f"  {conc:>4} {who:<14} {r['tok_s']:8.1f} {pct(r['ttft'], 50) * 1e3:9.0f} {pct(r['ttft'], 99) * 1e3:8.0f} "
                  f"{pct(r['tpot'], 50) * 1e3:9.1f} {pct(r['tpot'], 99) * 1e3:8.1f}")
        print(f"  {conc:>4} {'ratio':<14} {ours['tok_s'] / hf['tok_s']:7.2f}x {pct(hf['ttft'], 50) / pct(ours['ttft'], 50):8.2f}x"
              f" {'':>8} {pct(hf['tpot'], 50) / pct(ours['tpot'], 50):8.2f}x")


def part_mixed(a) -> None:
    """Decode TPOT of short requests while long prompts arrive: colocated vs disaggregated."""
    import threading

    import openai

    from dsv3.serve.config import ServeConfig
    from dsv3.serve.server import Server

    path = bench_checkpoint(Path(tempfile.mkdtemp()))
    g = torch.Generator().manual_seed(1)
    shorts = [torch.randint(2, 8192, (32,), generator=g).tolist() for _ in range(a.mixed_decoders)]
    longs = [torch.randint(2, 8192, (a.prompt,), generator=g).tolist() for _ in range(a.mixed_long)]
    print(f"\n== mixed load: {a.mixed_decoders} streams decoding {a.mixed_tokens} tokens each while {a.mixed_long} "
          f"prompts of {a.prompt} tokens arrive (decode TPOT at the client, ms)")
    for pd in ("colocated", "disaggregated"):
        cfg = ServeConfig(model=path, port=0, max_batch=a.mixed_decoders + a.mixed_long, block_size=64,
                          cache_tokens=(a.mixed_decoders + a.mixed_long) * (a.prompt + a.mixed_tokens + 64),
                          threads=1, pd=pd, pd_worker="process", prefill_threads=1,
                          max_model_len=a.prompt + a.mixed_tokens + 64)
        with Server(cfg) as srv:
            load_test(srv.url, srv.name, shorts[:1], 1, 4)  # warm-up
            c = openai.OpenAI(base_url=srv.url + "/v1", api_key="bench", max_retries=0, timeout=3600)
            c.completions.create(model=srv.name, prompt=longs[0][:64], max_tokens=1)
            res: dict = {}

            def decoders():
                res.update(load_test(srv.url, srv.name, shorts, len(shorts), a.mixed_tokens))

            th = threading.Thread(target=decoders)
            th.start()
            time.sleep(1.0)
            t_long = []
            for p in longs:  # long prompts, one after another, while the streams decode
                t = time.perf_counter()
                c.completions.create(model=srv.name, prompt=p, max_tokens=1)
                t_long.append(time.perf_counter() - t)
            th.join()
            moved = srv.engine.metrics.pd_bytes._value.get()
        print(f"  {pd:<14} TPOT p50 {pct(res['tpot'], 50) * 1e3:7.1f}  p99 {pct(res['tpot'], 99) * 1e3:8.1f}  max "
              f"{max(res['tpot']) * 1e3:8.1f}   long-prompt latency p50 {statistics.median(t_long):.2f}s"
              + (f"   latent cache handed over {moved / 1e6:.1f} MB" if moved else ""))


PARTS = {"decode": part_decode, "spec": part_spec, "server": part_server, "mixed": part_mixed}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--parts", default="decode,spec,server,mixed")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=2048)
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--no-compile", dest="compile", action="store_false")
    ap.add_argument("--spec-ckpt", default=None, help="a checkpoint with a trained MTP module (prompts are "
                                                      "this bench's phrase documents)")
    ap.add_argument("--spec-steps", type=int, default=300, help="training steps of the speculation bench model")
    ap.add_argument("--spec-tokens", type=int, default=64)
    ap.add_argument("--spec-k", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 3])
    ap.add_argument("--track", action="store_true", help="log speculation figures to MLflow")
    ap.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8, 32])
    ap.add_argument("--server-tokens", type=int, default=32)
    ap.add_argument("--mixed-decoders", type=int, default=4)
    ap.add_argument("--mixed-tokens", type=int, default=96)
    ap.add_argument("--mixed-long", type=int, default=3)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    import transformers

    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {a.threads} threads; "
          f"load average at start {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores (a shared machine: noisy)")
    for p in a.parts.split(","):
        PARTS[p.strip()](a)


if __name__ == "__main__":
    main()
