"""DeepSeek-V3 at the paper's scale, on paper: layout, per-rank parameters and memory, pipeline bubble.

A calculation, not a run (no GPU, nothing allocated): the report's training setup (arXiv 2412.19437)
pushed through this project's own code.
- §3.1: 2,048 H800 GPUs, 256 nodes x 8. §3.2: PP16 with DualPipe, EP64 spanning 8 nodes, ZeRO-1 data
  parallelism, no tensor parallelism; so DP = 2048 / 16 = 128 and each expert slice is replicated on
  DP / EP = 2 ranks of a stage position. §4.2: 15,360 sequences of 4,096 tokens per step.
- Layout: `ParallelConfig` (dsv3/parallel/config.py) and `check_layout` (dsv3/train/layout.py) validate
  it for 2,048 ranks, the way `dsv3 pretrain` would before starting Ray.
- Parameters: the `v3` preset's shape accounting (`ModelConfig.num_params`) against the paper's 671B /
  37B, and the real `DeepSeekV3` modules built on the meta device (no memory) against that accounting.
- Stages: `split_model` / `stages_for_rank` (dsv3/parallel/partition.py) cut the meta model into 16
  stages; DualPipe rank r holds stages r and 15 - r (Table 2: parameters 2x), so rank 0 holds the
  embedding, the output head and the MTP module, sharing the embedding and head (§3.2.3).
- FP8: `convert_to_fp8` (dsv3/fp8/linear.py) marks the Linear layers whose GEMMs run in FP8 (§3.3.1:
  embedding, output head, MoE gate and norms stay in higher precision).
- Memory per rank (§3.3.3): BF16 working weights, FP32 gradients (kept for batch accumulation), FP32
  master weights and BF16 AdamW moments sharded by ZeRO-1 over DP (expert slices over their 2
  replicas); routed experts sharded 4 per rank per MoE layer by EP64 (ExpertParallelMoE's slicing).
  EMA lives in CPU memory (§3.2.3). Activation memory is NOT computed: the headroom left for it is.
- Bubble: `schedules.simulate` (the project's discrete-event simulator of the op lists its pipeline
  runs) for DualPipe, DualPipeV and 1F1B at PP=16, beside Table 2's formulas (bubble.analytic).
Every assumption is printed under "assumptions" with the flag that changes it.

    .venv/bin/python benchmarks/v3_scale.py [--micro-batch 1] [--f 1 --b 1 --w 1 --fb 3] [--hbm-gb 80]
"""

from __future__ import annotations

import argparse
import time

import torch
from pydantic import ValidationError

from dsv3.config import RunConfig
from dsv3.errors import ConfigError
from dsv3.fp8.linear import FP8Linear, convert_to_fp8
from dsv3.model.config import ModelConfig
from dsv3.model.transformer import DeepSeekV3
from dsv3.parallel import schedules
from dsv3.parallel.bubble import analytic
from dsv3.parallel.config import ParallelConfig
from dsv3.parallel.partition import split_model, stages_for_rank
from dsv3.train.layout import check_layout

# the report's figures (section in the comment)
PAPER = dict(
    gpus=2048, gpus_per_node=8,           # §3.1
    pp=16, ep=64, ep_nodes=8,             # §3.2
    max_nodes=4,                          # §2.1.2: a token goes to at most M = 4 nodes
    total=671e9, activated=37e9,          # §1, §4.2 (main model, MTP excluded)
    hf_total=685e9,                       # the released checkpoint, MTP included (README of the HF release)
    batch=15360, seq_len=4096,            # §4.2 (after the batch-size ramp from 3,072)
    ramp_start=3072, ramp_tokens=469e9, tokens=14.8e12,  # §4.2
    gpu_hours_per_T=180e3,                # §1: 180K H800 GPU hours per trillion tokens
)
G = 1e9


def layout_config(pp: int, ep: int, dp: int, chunks: int, gpus_per_node: int, max_nodes: int,
                  batch: int, seq_len: int, ramp: tuple | None = None, bounds: list | None = None) -> RunConfig:
    """The run config a `dsv3 pretrain` of the paper's layout would take."""
    train = dict(batch_size=batch, seq_len=seq_len, steps=1)
    if ramp:  # (start batch, steps, ramp fraction): the §4.2 ramp, coarsely stepped
        train.update(batch_ramp_start=ramp[0], steps=ramp[1], batch_ramp_frac=ramp[2])
    return RunConfig.from_dict(dict(
        preset="v3", train=train,
        parallel=dict(dp=dp, pp=pp, schedule="dualpipe", num_chunks=chunks, ep=ep,
                      ep_ranks_per_node=gpus_per_node, max_nodes=max_nodes, stage_bounds=bounds)))


def meta_model(cfg: ModelConfig) -> DeepSeekV3:
    """The real modules on the meta device (shapes only), FP8 Linear swapped in as training does (§3.3.1)."""
    with torch.device("meta"):
        model = DeepSeekV3(cfg)
    convert_to_fp8(model)
    return model


def _expert_index(name: str) -> int | None:
    """Routed-expert index of a parameter name (`...mlp.experts.<i>.up_proj.weight`), else None."""
    if ".experts." not in name:
        return None
    return int(name.split(".experts.")[1].split(".")[0])


def stage_table(cfg: ModelConfig, stages: list) -> list[dict]:
    """Per stage: main-model layers it runs, dense/MoE counts, extras, whole parameter count."""
    out, lo = [], 0
    for i, st in enumerate(stages):
        n = len(st.layers)
        idx = list(range(lo, lo + n))
        extras = (["embedding"] if st.first else []) + (["norm+head", f"MTP x{len(st.mtp)}"] if st.last else [])
        params = {id(p): p.numel() for p in st.parameters()}
        out.append(dict(stage=i, layers=(lo, lo + n - 1), n=n,
                        dense=sum(not cfg.is_moe_layer(j) for j in idx), moe=sum(cfg.is_moe_layer(j) for j in idx),
                        extras=extras, params=sum(params.values())))
        lo += n
    return out


def rank_params(held: tuple, ep: int, n_experts: int) -> dict:
    """Parameters one pipeline rank keeps: its stages' parameters (a tensor shared by two of its stages
    counted once), routed experts cut to EP rank 0's contiguous slice of n_experts / ep (every slice has
    the same size). Split into dense (replicated over DP) and expert (replicated over DP / EP), and the
    FP8 GEMM weights with their FP32 block scales (one per 128x128 block, §3.3.1)."""
    per = n_experts // ep if n_experts else 0
    seen, r = set(), dict(dense=0, expert=0, fp8=0, fp8_scale_bytes=0)
    for st in held:
        for mname, mod in st.named_modules():
            for pname, p in mod.named_parameters(recurse=False):
                if id(p) in seen:
                    continue
                seen.add(id(p))
                e = _expert_index(f"{mname}.{pname}")
                if e is not None and e >= per:
                    continue  # another EP rank's expert
                r["expert" if e is not None else "dense"] += p.numel()
                if isinstance(mod, FP8Linear) and pname == "weight":
                    b = mod.fp8_block
                    r["fp8"] += p.numel()
                    r["fp8_scale_bytes"] += 4 * (-(-p.shape[0] // b)) * (-(-p.shape[1] // b))
    r["total"] = r["dense"] + r["expert"]
    return r


def rank_memory(rp: dict, dp: int, ep: int) -> dict:
    """Bytes one rank keeps for its parameters (§3.3.3), given rank_params' counts. ZeRO-1 shards the FP32
    master weights and the BF16 AdamW moments over the ranks holding the same parameters: DP for the dense
    part, DP / EP for the expert slices. Gradients (FP32, for accumulation) are not sharded by ZeRO-1."""
    shard = rp["dense"] / dp + rp["expert"] / (dp // ep)
    m = {"bf16 w": 2 * rp["total"],                          # BF16 working weights
         "fp8 w": rp["fp8"] + rp["fp8_scale_bytes"],          # FP8 GEMM weights + FP32 block scales
         "fp32 grad": 4 * rp["total"],                        # FP32 gradients
         "fp32 master": 4 * shard,                            # FP32 master weights, ZeRO-1 shard
         "bf16 m+v": 2 * 2 * shard}                           # BF16 AdamW moments, ZeRO-1 shard
    m["static"] = sum(m.values())
    return m


def bubbles(pp: int, chunks: int, F: float, Bin: float, W: float, FB: float) -> tuple[list, dict]:
    """Simulated bubble per rank (step span - busy time) of each schedule, and Table 2's formulas with
    B = Bin + W (full backward). DualPipeV gets half-cost stages (two of a 2·PP-stage model per rank)."""
    an = analytic(pp, F, Bin + W, W, FB)
    rows = []
    for kind in ("1f1b", "dualpipe", "dualpipev"):
        s = 0.5 if kind == "dualpipev" else 1.0
        sim = schedules.simulate(kind, pp, chunks, {"F": F * s, "B": Bin * s, "W": W * s, "FB": FB * s})
        bub = [sim["makespan"] - b for b in sim["busy"]]
        rows.append(dict(kind=kind, max=max(bub), mean=sum(bub) / len(bub), span=sim["makespan"],
                         fraction=sum(bub) / len(bub) / sim["makespan"], nccl_safe=sim["channels_ok"],
                         formula=an.get(kind)))
    return rows, an


def print_layout(par: ParallelConfig, gpus: int, gpus_per_node: int, cfg_ok: str, ramp_msg: str) -> None:
    dp = gpus // par.pp
    print(f"== layout (§3.1-3.2): {gpus} GPUs = {gpus // gpus_per_node} nodes x {gpus_per_node}")
    print(f"  PP={par.pp} ({par.schedule})  EP={par.ep} over {par.ep // par.ep_ranks_per_node} nodes "
          f"(node-limited routing M={par.max_nodes})  DP={dp} (ZeRO-1)  TP=1")
    print(f"  expert-slice replicas per stage position: DP/EP = {dp // par.ep}; routed experts per rank per "
          f"MoE layer: 256/{par.ep} = {256 // par.ep}")
    print(f"  dsv3 check_layout(world={gpus}): {cfg_ok}")
    print(f"  with the §4.2 batch ramp: {ramp_msg}")
    try:
        ParallelConfig(**{**par.model_dump(), "zero1": True})
        print("  parallel.zero1 with this layout: accepted")
    except ValidationError as e:
        msg = e.errors()[0]["msg"].removeprefix("Value error, ")
        print(f"  parallel.zero1 with this layout: refused by dsv3 ({msg}); ZeRO-1 below is computed, not run")


def print_params(cfg: ModelConfig, model: DeepSeekV3) -> None:
    total, act = cfg.num_params(), cfg.num_params(activated=True)
    mtp = cfg.num_params(include_mtp=True)
    built = sum(p.numel() for p in model.parameters())
    hf = mtp + 2 * cfg.vocab_size * cfg.hidden_size  # the release stores MTP's own embedding/head copies
    print("== parameters (ModelConfig.num_params, shapes of the v3 preset)")
    print(f"  total      {total / G:8.2f}B  paper 671B  ({100 * (total / PAPER['total'] - 1):+.2f}%)")
    no_emb = cfg.num_params(activated=True, include_embedding=False) + cfg.vocab_size * cfg.hidden_size
    print(f"  activated  {act / G:8.2f}B  paper  37B  ({100 * (act / PAPER['activated'] - 1):+.2f}%; without the "
          f"input embedding, a lookup: {no_emb / G:.2f}B, {100 * (no_emb / PAPER['activated'] - 1):+.2f}%)")
    print(f"  with MTP   {mtp / G:8.2f}B  (+ MTP's own embedding/head copies as released: {hf / G:.2f}B; HF 685B)")
    print(f"  DeepSeekV3 modules built on the meta device: {built / G:.3f}B parameters "
          f"({'equal to' if built == mtp else 'DIFFERENT from'} the accounting with MTP)")


def print_stages(table: list, pp: int, bounds: list | None) -> None:
    how = f"bounds {bounds}" if bounds else "even split, earlier stages take the extra layer"
    print(f"== pipeline stages (split_model: {how})")
    print(f"  {'stage':>5} {'layers':>9} {'dense':>5} {'MoE':>4}  {'params (whole)':>15}  extras")
    for s in table:
        print(f"  {s['stage']:>5} {s['layers'][0]:>4}-{s['layers'][1]:<4} {s['dense']:>5} {s['moe']:>4}  "
              f"{s['params'] / G:14.2f}B  {', '.join(s['extras'])}")
    print(f"  DualPipe rank r holds stages r and {pp - 1}-r (stages_for_rank): rank 0 = stage 0 + stage {pp - 1} "
          "holds embedding, head and MTP together (§3.2.3)")


def print_ranks(ranks: list, mem: list, one_f: list, pp: int, hbm: float, tokens_mb: int, layers: list) -> None:
    print(f"== per-rank parameters and memory, GB (DualPipe; rank r and rank {pp - 1}-r hold the same stages)")
    keys = list(mem[0])
    print(f"  {'rank':>4} {'params':>8} {'expert':>8} {'FP8':>8} | " + " ".join(f"{k:>11}" for k in keys)
          + f" | {'headroom':>8} {'/mb':>6} {'KB/tok/layer':>12}")
    for r in range(pp // 2):
        rp, m = ranks[r], mem[r]
        head = hbm - m["static"]
        per_mb = head / (pp + 1)  # Table 2: DualPipe keeps PP+1 micro-batches of activations
        print(f"  {r:>4} {rp['total'] / G:7.2f}B {rp['expert'] / G:7.2f}B {rp['fp8'] / G:7.2f}B | "
              + " ".join(f"{m[k] / G:11.2f}" for k in keys)
              + f" | {head / G:8.2f} {per_mb / G:6.2f} {per_mb / (tokens_mb * layers[r]) / 1e3:12.1f}")
    worst = max(range(pp), key=lambda r: mem[r]["static"])
    print("  params: held by the rank (expert: its routed-expert slices; FP8: weights whose GEMMs run in FP8); "
          "bf16 w: BF16 working weights; fp8 w: FP8 copies + FP32 128x128 block scales; fp32 grad: FP32 gradients "
          "(§3.3.3); fp32 master, bf16 m+v: FP32 master weights and BF16 AdamW moments, ZeRO-1 shard (§3.3.3)")
    print(f"  headroom = HBM {hbm / G:.0f} GB - static; /mb = headroom / (PP+1) "
          f"micro-batches in flight (Table 2); KB/tok/layer = /mb over {tokens_mb} tokens x the layers of "
          "the rank's larger stage (MTP counted as a layer)")
    print(f"  most loaded rank: {worst} ({mem[worst]['static'] / G:.2f} GB static of {hbm / G:.0f} GB)")
    one = max(one_f, key=lambda r: r["total"])
    print(f"  1F1B/ZB1P on the same stages (one stage per rank): at most {one['total'] / G:.2f}B params/rank vs "
          f"DualPipe {max(r['total'] for r in ranks) / G:.2f}B (Table 2: parameters 1x vs 2x; EP64 keeps 2x small)")


def print_bubbles(rows: list, an: dict, pp: int, chunks: int, cost: dict, step_s: float) -> None:
    print(f"== pipeline bubble at PP={pp}, {chunks} micro-batches (schedules.simulate vs Table 2), "
          f"cost units: F={cost['F']} B(input)={cost['B']} W={cost['W']} F&B={cost['FB']}")
    print(f"  {'schedule':10} {'sim max':>8} {'sim mean':>8} {'Table 2':>8} {'span':>7} {'bubble %':>8} "
          f"{'~s/step':>7}  NCCL-safe order")
    for r in rows:
        f = "-" if r["formula"] is None else f"{r['formula']:.2f}"
        print(f"  {r['kind']:10} {r['max']:8.2f} {r['mean']:8.2f} {f:>8} {r['span']:7.1f} "
              f"{100 * r['fraction']:7.2f}% {r['fraction'] * step_s:7.2f}  {r['nccl_safe']}")
    print(f"  {'zb1p':10} {'-':>8} {'-':>8} {an['zb1p']:8.2f}  (formula only: no ZB1P schedule in dsv3)")
    print("  DualPipeV: half-size stages (2 of a 2*PP-stage model per rank); Table 2 has no formula for it.")
    print("  ~s/step = bubble fraction x the step time implied by the paper's GPU hours (above), i.e. as if the"
          " whole step were the pipeline.")
    bad = [r["kind"] for r in rows if not r["nccl_safe"]]
    if bad:
        print(f"  NOTE: dsv3's simulator finds the {', '.join(bad)} message order at PP={pp} not NCCL-safe "
              "(relies on P2P tags): dsv3.parallel.pipeline refuses that step on NCCL (gloo runs it).")


def print_step_time(cfg: ModelConfig, gpus: int, batch: int, seq: int, peak_tflops: float) -> float:
    tps = 1e12 / (PAPER["gpu_hours_per_T"] * 3600)  # tokens / s / GPU
    step_s = batch * seq / (gpus * tps)
    flops = cfg.flops_per_token(seq, include_mtp=True)
    achieved = flops * tps
    print("== step time from the paper's 180K H800 GPU hours per trillion tokens (§1)")
    print(f"  {tps:.0f} tokens/s/GPU -> {step_s:.1f} s per step of {batch} x {seq} tokens on {gpus} GPUs; "
          f"{PAPER['tokens'] / (batch * seq):,.0f} steps for 14.8T tokens (ignoring the ramp)")
    print(f"  model FLOPs/token (ModelConfig.flops_per_token, training, MTP incl.) {flops / 1e9:.0f} GFLOP -> "
          f"{achieved / 1e12:.0f} TFLOP/s/GPU = {100 * achieved / (peak_tflops * 1e12):.1f}% of "
          f"{peak_tflops:.0f} TFLOP/s (assumed dense BF16 peak)")
    return step_s


def _check(cfg: RunConfig, world: int) -> str:
    try:
        check_layout(cfg, world)
        return "accepted"
    except ConfigError as e:
        return f"refused: {e}"


def calculate(cfg: ModelConfig, pp: int, ep: int, dp: int, bounds: list | None = None) -> dict:
    """Stage table and per-rank parameters/memory of a DualPipe (and 1F1B) layout of `cfg`."""
    model = meta_model(cfg)
    stages = split_model(model, pp, bounds)
    hold = {k: [stages_for_rank(k, stages, pp, r) for r in range(pp)] for k in ("dualpipe", "1f1b")}
    ranks = [rank_params(h, ep, cfg.n_routed_experts) for h in hold["dualpipe"]]
    layers = [max(len(s.layers) + (len(s.mtp) if s.last else 0) for s in h) for h in hold["dualpipe"]]
    return dict(model=model, table=stage_table(cfg, stages), ranks=ranks, layers=layers,
                mem=[rank_memory(r, dp, ep) for r in ranks],
                one_f=[rank_params(h, ep, cfg.n_routed_experts) for h in hold["1f1b"]])


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--micro-batch", type=int, default=1, help="sequences per pipeline micro-batch (assumed)")
    ap.add_argument("--f", type=float, default=1.0, help="forward chunk cost (unit)")
    ap.add_argument("--b", type=float, default=1.0, help="input-grad backward cost, in F units (assumed)")
    ap.add_argument("--w", type=float, default=1.0, help="weight-grad backward cost, in F units (assumed)")
    ap.add_argument("--fb", type=float, default=None, help="overlapped F&B pair cost (default F+B+W: "
                    "communication fully hidden, no compute speed-up)")
    ap.add_argument("--bounds", default=None, help="stage start layers, comma-separated, 0 to 61 (parallel."
                    "stage_bounds; default: even split)")
    ap.add_argument("--hbm-gb", type=float, default=80.0, help="GPU memory (H800: 80 GB; not in the paper)")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="dense BF16 peak per GPU (H800 spec)")
    a = ap.parse_args(argv)
    P, t0 = PAPER, time.perf_counter()
    pp, ep, gpus = P["pp"], P["ep"], P["gpus"]
    dp = gpus // pp
    per_pipe = P["batch"] // dp
    if per_pipe % a.micro_batch:
        ap.error(f"--micro-batch {a.micro_batch} does not divide the {per_pipe} sequences of a pipeline")
    chunks = per_pipe // a.micro_batch
    fb = a.f + a.b + a.w if a.fb is None else a.fb
    cost = {"F": a.f, "B": a.b, "W": a.w, "FB": fb}
    print("== assumptions (not in the paper; flag to change)")
    print(f"  micro-batch: {a.micro_batch} sequence(s) -> {chunks} micro-batches per pipeline per step "
          f"(= {P['batch']} / DP {dp} / {a.micro_batch})   [--micro-batch]")
    print(f"  chunk costs in F units: B(input)={a.b} W={a.w} F&B={fb}   [--b --w --fb]")
    print(f"  HBM {a.hbm_gb:.0f} GB per GPU, BF16 working weights, FP8 weight copies cached once per step, "
          "optimizer state sharded over DP only (not also across the DualPipe pair)   [--hbm-gb]")
    print("  activation memory: not computed; the headroom it may use is")
    bounds = [int(x) for x in a.bounds.split(",")] if a.bounds else None
    rc = layout_config(pp, ep, dp, chunks, P["gpus_per_node"], P["max_nodes"], P["batch"], P["seq_len"],
                       bounds=bounds)
    steps = round(P["tokens"] / (P["batch"] * P["seq_len"]))
    ramp = layout_config(pp, ep, dp, chunks, P["gpus_per_node"], P["max_nodes"], P["batch"], P["seq_len"],
                         (P["ramp_start"], steps, P["ramp_tokens"] / P["tokens"]))
    ramp_msg = _check(ramp, gpus) + (f" (at batch {P['ramp_start']} a pipeline gets {P['ramp_start'] // dp} "
                                     f"sequences; DualPipe needs >= 2*PP = {2 * pp} micro-batches)")
    print_layout(rc.parallel, gpus, P["gpus_per_node"], _check(rc, gpus), ramp_msg)
    cfg = rc.model
    res = calculate(cfg, pp, ep, dp, bounds)
    print_params(cfg, res["model"])
    print_stages(res["table"], pp, bounds)
    print_ranks(res["ranks"], res["mem"], res["one_f"], pp, a.hbm_gb * G, a.micro_batch * P["seq_len"],
                res["layers"])
    step_s = print_step_time(cfg, gpus, P["batch"], P["seq_len"], a.peak_tflops)
    rows, an = bubbles(pp, chunks, a.f, a.b, a.w, fb)
    print_bubbles(rows, an, pp, chunks, cost, step_s)
    print(f"(calculated in {time.perf_counter() - t0:.0f} s on CPU; nothing was trained)")
    return dict(res, bubbles=rows, analytic=an, chunks=chunks, step_s=step_s)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
