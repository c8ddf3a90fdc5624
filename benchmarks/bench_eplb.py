"""EPLB and micro-batch overlap benchmarks (§3.4): prints figures, never pass/fail.

1. Balance on DeepSeek's published EPLB example: max/mean GPU load of its plan.
2. Balance on *recorded* loads: a short real training run (`dsv3.train.loop.train`, preset `--preset`,
   `--steps` steps; or `--loads SOURCE`: a checkpoint, a run out_dir or an MLflow run) gives load_total
   [moe layers, experts]. For EP = 2 and 4 ranks: expected max/mean expert-rank load of the plain E/EP
   sharding vs the EPLB plan with EP redundant experts (tokens of an expert split evenly over replicas).
3. Measured balance: `--ep` gloo ranks serve held-out tokens with the trained model, once with the plain
   sharding and once with the EPLB placement planned from the training loads; rows each rank's experts
   computed -> max/mean per MoE layer.
4. Micro-batch overlap at `--ep` ranks: forward time of a prefill batch and of a decode step (one token per
   sequence over the latent cache), whole batch vs two micro-batches one after the other vs two
   micro-batches overlapped (dispatch/combine of one in flight while the other computes). Median of
   `--repeats`, slowest rank, modes interleaved; also the time blocked in collectives' wait() (transfer
   plus waiting for the other rank: what overlap could still hide).

On a shared 2-core machine the timings are noisy and the overlap can only hide what the gloo threads do
while the other micro-batch holds a core: with ranks, gloo threads and other jobs competing for 2 cores the
gain is small or negative. The figures are indicative; re-measure on an idle machine.

    python benchmarks/bench_eplb.py [--preset tiny] [--steps 30] [--ep 2] [--loads SOURCE] [--repeats 7]
                                    [--overlap-preset small] [--batch 8] [--seq-len 64]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dsv3.model.transformer import DeepSeekV3  # noqa: E402
from dsv3.parallel.local import spawn  # noqa: E402
from dsv3.serve.eplb import default_placement, gpu_loads, imbalance, rebalance_experts  # noqa: E402
from dsv3.serve.expert_parallel import (WAIT_SECONDS, EPConfig, ep_logits, place_experts, rank_loads,  # noqa: E402
                                        run_micro_batches)
from dsv3.serve.load_stats import checkpoint_loads, training_loads  # noqa: E402

README_WEIGHT = torch.tensor([[90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
                              [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27]])


def fmt(t: torch.Tensor) -> str:
    return " ".join(f"{v:.3f}" for v in t.tolist())


def readme_example() -> None:
    print("== DeepSeek EPLB README example (2 layers x 12 experts)")
    phy2log, _, logcnt = rebalance_experts(README_WEIGHT, 16, 4, 2, 8)
    for gpus in (4, 6):
        before = imbalance(gpu_loads(README_WEIGHT, *default_placement(2, 12)[::2], gpus))
        print(f"  plain sharding, 12 experts on {gpus} GPUs   max/mean per layer: {fmt(before)}")
    print(f"  EPLB, 16 slots (4 redundant) on 8 GPUs    max/mean per layer: {fmt(imbalance(gpu_loads(README_WEIGHT, phy2log, logcnt, 8)))}")


def recorded_loads(a, tmp: Path) -> tuple[dict, str | None, str | None]:
    """({name: load [moe layers, experts]}, model dir or None, shards dir or None) from --loads or a short
    training run (loads summed over the run, and over its last checkpoint interval)."""
    if a.loads:
        return {"training": training_loads(a.loads)}, a.model, a.shards
    from benchmarks.bench_train import cfg_for, shards_for
    from dsv3.train.loop import train

    sh = shards_for(a.preset, tmp)
    t0 = time.perf_counter()
    res = train(cfg_for(a.preset, sh, tmp / "run", steps=a.steps, seq_len=a.seq_len, batch_size=4,
                        ckpt_every=max(1, a.steps // 3), lr=3e-3), track=False)
    print(f"\n== recorded loads: {a.preset} preset trained {a.steps} steps (seq {a.seq_len} x batch 4) "
          f"in {time.perf_counter() - t0:.0f}s; final loss {res.history[-1]['train/loss']:.3f}")
    return ({"training": checkpoint_loads(tmp / "run"),
             "training last third": checkpoint_loads(tmp / "run", last_interval=True)}, res.model_dir, sh)


def expected_balance(name: str, load: torch.Tensor, n_group: int) -> None:
    L, E = load.shape
    print(f"  {name} loads [{L} moe layers x {E} experts]; expert max/mean per layer: {fmt(imbalance(load))}")
    for ep in (2, 4):
        if E % ep:
            continue
        before = imbalance(gpu_loads(load, *default_placement(L, E)[::2], ep))
        phy2log, _, logcnt = EPConfig(ep=ep, num_redundant=ep).plan(load, n_group)
        after = imbalance(gpu_loads(load, phy2log, logcnt, ep))
        print(f"  EP={ep}: expected rank max/mean  plain {fmt(before)}  ->  EPLB (+{ep} redundant) {fmt(after)}")


def _measure_worker(rank, world, model_dir, shards, seq_len, n_seq, plans_path, out):
    import copy

    from dsv3.serve.load_stats import ExpertLoadRecorder
    from dsv3.train.stream import PackedStream

    ref = DeepSeekV3.from_pretrained(model_dir).eval()
    val = PackedStream(shards, "val", seq_len, shuffle=False)
    calib = val.samples(rank * n_seq, n_seq)[:, :seq_len].long()              # set A: online statistics
    x = val.samples((world + rank) * n_seq, n_seq)[:, :seq_len].long()        # set B: measured
    rec = ExpertLoadRecorder.for_model(ref)
    with torch.no_grad():
        ref(calib)
    rec.detach()
    rec.sync()  # every rank's calibration tokens
    plans = torch.load(plans_path)
    E = ref.config.n_routed_experts
    plans["plain"] = default_placement(len(ref.moe_layers()), E)
    plans["eplb online"] = EPConfig(ep=world, num_redundant=world).plan(rec.load, ref.config.n_group)
    n_main = len(ref.layers) - ref.config.first_k_dense_replace
    res = {}
    for name, p in plans.items():
        model = place_experts(copy.deepcopy(ref), *p)
        ep_logits(model, x)
        res[name] = rank_loads(model)[:n_main].tolist()
    if rank == 0:
        Path(out).write_text(json.dumps(res))


def measured_balance(a, tmp: Path, model_dir, shards, plans: dict) -> None:
    torch.save(plans, tmp / "plans.pt")
    out = tmp / "measured.json"
    spawn(_measure_worker, a.ep, model_dir, shards, a.seq_len, 8, str(tmp / "plans.pt"), str(out))
    got = {k: torch.tensor(v) for k, v in json.loads(out.read_text()).items()}
    print(f"  measured at EP={a.ep} on {a.ep} x 8 held-out sequences of {a.seq_len} tokens (rows each rank's "
          f"experts computed; 'online' = planned from {a.ep} x 8 other held-out sequences):")
    for name in ("plain", *[k for k in got if k != "plain"]):
        print(f"    {name:>20}: rank max/mean per layer {fmt(imbalance(got[name]))}")


def _overlap_worker(rank, world, model_dir, batch, seq_len, repeats, out):
    import copy

    torch.manual_seed(0)
    ref = DeepSeekV3.from_pretrained(model_dir).eval()
    L, E = len(ref.moe_layers()), ref.config.n_routed_experts
    model = place_experts(copy.deepcopy(ref), *default_placement(L, E))
    g = torch.Generator().manual_seed(rank)
    x = torch.randint(0, ref.config.vocab_size, (batch, seq_len), generator=g)
    halves = x.chunk(2)

    def prefill(mode):
        if mode == "whole":
            return lambda: ep_logits(model, x)
        return lambda: run_micro_batches([lambda h=h: model(h).logits for h in halves], overlap=mode == "overlap")

    def decode(mode):
        if mode == "whole":
            cache = model.new_cache(batch, seq_len + 1)
            cache.length = seq_len
            cache.valid[:, :seq_len] = True
            return lambda: model.forward_step(x[:, :1], cache)
        caches = []
        for h in halves:
            c = model.new_cache(h.shape[0], seq_len + 1)
            c.length = seq_len
            c.valid[:, :seq_len] = True
            caches.append(c)
        return lambda: run_micro_batches([lambda h=h, c=c: model.forward_step(h[:, :1], c)
                                          for h, c in zip(halves, caches)], overlap=mode == "overlap")

    res = {}
    with torch.no_grad():
        for kind, make in (("prefill", prefill), ("decode", decode)):
            times = {m: [] for m in ("whole", "sequential", "overlap")}
            waits = {m: [] for m in times}
            for r in range(repeats + 1):
                for m in times:
                    fn = make(m)
                    dist.barrier()
                    WAIT_SECONDS[0] = 0.0
                    t0 = time.perf_counter()
                    fn()
                    dt = torch.tensor([time.perf_counter() - t0, WAIT_SECONDS[0]])
                    dist.all_reduce(dt, op=dist.ReduceOp.MAX)
                    if r:  # the first round warms up
                        times[m].append(float(dt[0]))
                        waits[m].append(float(dt[1]))
            res[kind] = {m: statistics.median(v) for m, v in times.items()}
            res[kind].update({f"wait_{m}": statistics.median(v) for m, v in waits.items()})
    if rank == 0:
        Path(out).write_text(json.dumps(res))


def overlap(model_dir, a, tmp: Path) -> None:
    out = tmp / "overlap.json"
    spawn(_overlap_worker, a.ep, model_dir, a.batch, a.seq_len, a.repeats, str(out))
    res = json.loads(out.read_text())
    print(f"\n== micro-batch overlap, {a.overlap_preset or a.preset} model, EP={a.ep} gloo ranks, {a.batch} sequences x {a.seq_len} tokens per rank, "
          f"median of {a.repeats} (slowest rank)")
    for kind, t in res.items():
        print(f"  {kind:>7}: whole batch {1e3 * t['whole']:.1f} ms | 2 micro-batches sequential "
              f"{1e3 * t['sequential']:.1f} ms | overlapped {1e3 * t['overlap']:.1f} ms | "
              f"speed-up vs sequential {t['sequential'] / t['overlap']:.2f}x, vs whole {t['whole'] / t['overlap']:.2f}x")
        print(f"  {'':>7}  blocked on collectives: whole {1e3 * t['wait_whole']:.1f} ms | sequential "
              f"{1e3 * t['wait_sequential']:.1f} ms | overlapped {1e3 * t['wait_overlap']:.1f} ms")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8, help="sequences per rank in the overlap timing")
    ap.add_argument("--ep", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--overlap-preset", help="time the overlap on a random-init model of this preset "
                    "(default: the trained model)")
    ap.add_argument("--loads", help="expert loads from a checkpoint / run out_dir / runs:/<id> instead of training")
    ap.add_argument("--model", help="with --loads: HF model dir for the measured balance and overlap")
    ap.add_argument("--shards", help="with --loads: shards dir (val split) for the measured balance")
    a = ap.parse_args()
    torch.set_num_threads(1)
    print("(shared machine: timings are noisy; re-measure on an idle one)")
    readme_example()
    with tempfile.TemporaryDirectory(prefix="bench_eplb_") as d:
        tmp = Path(d)
        loads, model_dir, shards = recorded_loads(a, tmp)
        n_group = DeepSeekV3.from_pretrained(model_dir).config.n_group if model_dir else 1
        for name, load in loads.items():
            expected_balance(name, load, n_group)
        if model_dir and shards:
            plans = {f"eplb {k}": EPConfig(ep=a.ep, num_redundant=a.ep).plan(v, n_group) for k, v in loads.items()}
            measured_balance(a, tmp, model_dir, shards, plans)
        if a.overlap_preset:
            from dsv3.model.config import ModelConfig

            torch.manual_seed(0)
            DeepSeekV3(ModelConfig.preset(a.overlap_preset)).save_pretrained(tmp / "overlap_model")
            model_dir = str(tmp / "overlap_model")
        if model_dir:
            overlap(model_dir, a, tmp)
    return 0


if __name__ == "__main__":
    sys.exit(main())
