"""Data-parallel gradient sync on CPU/gloo (§3.2): is communication hidden behind backward?

dp local gloo ranks (default 2, 1 intra-op thread each) train the same model (default the `small` preset,
~33M parameters, 16 routed experts) on random tokens; per optimizer step each mode is timed:
- flat     : backward, then one flat all-reduce of every gradient (parallel.bucket_mb=0, the old path)
- buckets  : gradient buckets all-reduced while backward runs (dsv3/parallel/grad_buckets.py)
- zero1    : buckets + AdamW state sharded over the ranks (dsv3/parallel/zero.py): a shard's update,
             then an all-gather of the parameters
- ddp      : the peer, torch DistributedDataParallel(find_unused_parameters=True, the same bucket size)
             around the same model (its bucket waits happen inside backward)
Columns (medians over the timed steps): step = forward/backward + sync + clip + AdamW (rank 0); fb = the
slowest rank's forward/backward (for buckets: with the collectives launched from its hooks); exposed =
that rank's sync_grads (it arrives last, so this is communication not hidden behind compute; flat: the
whole all-reduce; buckets: leftovers + waits + copy-back; ddp: 0, its waits are inside backward); wait =
its time blocked in work.wait(); imbal = slowest minus fastest rank's fb (what the others wait in sync).
`comm alone` is the flat all-reduce of the gradient buffer with the ranks otherwise idle: what there is
to hide. hidden = flat's exposed - the mode's exposed; vs flat = flat step / mode step.

What to expect here: with 2 ranks of 1 thread on a 2-core machine both cores run compute, and gloo does
its transfers and reductions on its own threads, which then compete with backward for the same cores;
overlap only hides communication when a core is free (more cores than ranks × threads), or on GPUs
where the network and the copy engines work beside the SMs. On a shared machine the figures are noisy:
run it a few times (--rounds).

    .venv/bin/python benchmarks/bench_dp_overlap.py [--preset small] [--dp 2] [--steps 4] [--rows 2]
        [--seq-len 256] [--bucket-mb 25] [--threads 1] [--modes flat,buckets,zero1,ddp] [--rounds 1] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dsv3.config import RunConfig  # noqa: E402
from dsv3.parallel.local import spawn  # noqa: E402
from dsv3.train.optim import make_optimizer  # noqa: E402
from dsv3.train.step import PlainStep, build_model  # noqa: E402


def _cfg(args) -> RunConfig:
    return RunConfig.from_dict({"preset": args.preset, "parallel": {"dp": args.dp, "bucket_mb": args.bucket_mb},
                                "train": {"seq_len": args.seq_len, "precision": "fp32", "recompute": "none"}})


class Modes:
    """Each rank's models driven four ways, switched step by step (so the shared machine's load falls on
    every mode alike): one PlainStep with its buckets off (flat) or on, with an AdamW or a Zero1 over its
    parameters; a second copy of the model inside DDP with its own AdamW."""

    def __init__(self, args, rank: int):
        cfg = _cfg(args)
        self.args, self.vocab = args, cfg.model.vocab_size
        self.model = build_model(cfg, torch.device("cpu"))
        self.step = PlainStep(self.model, cfg)
        self.adamw = make_optimizer(self.model, cfg.train)
        self.zero1 = make_optimizer(self.model, cfg.train, zero1=True) if "zero1" in args.modes else None
        self.ddp = self.ddp_opt = None
        if "ddp" in args.modes:  # its own copy: DDP's reducer breaks when the wrapped model runs backward without it
            from torch.nn.parallel import DistributedDataParallel

            model = build_model(cfg, torch.device("cpu"))
            self.ddp = DistributedDataParallel(model, find_unused_parameters=True, bucket_cap_mb=args.bucket_mb,
                                               broadcast_buffers=False)
            self.ddp_opt = make_optimizer(model, cfg.train)
            self.ddp_params = [p for p in model.parameters() if p.requires_grad]
        self.gen = torch.Generator().manual_seed(1000 + rank)

    def run(self, mode: str) -> dict:
        args, step = self.args, self.step
        x = torch.randint(2, self.vocab, (args.rows, args.seq_len), generator=self.gen)
        step.bucket_mb = 0 if mode in ("flat", "ddp") else args.bucket_mb  # flat: the hooks stay unarmed
        opt = {"zero1": self.zero1, "ddp": self.ddp_opt}.get(mode, self.adamw)
        dist.barrier()
        t0 = time.perf_counter()
        if mode != "ddp":
            sums = step.forward_backward(x, args.rows, 0.3)
            t1 = time.perf_counter()
            step.sync_grads(sums)
        else:
            self.ddp(x, labels=x).loss.backward()  # DDP's reducer waits for its buckets at the end of backward
            t1 = time.perf_counter()
        t2 = time.perf_counter()
        if mode == "ddp":
            torch.nn.utils.clip_grad_norm_(self.ddp_params, 1.0)
        else:
            step.clip_grad_norm(1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        stats = step.grad_buckets().stats() if mode in ("buckets", "zero1") else {}
        return {"step": t3 - t0, "fb": t1 - t0, "sync": t2 - t1, "wait": stats.get("wait_s", float("nan")),
                "buckets": stats.get("buckets", 0), "early": stats.get("launched_in_backward", 0)}


def _comm_alone(n: int, repeats: int = 3) -> float:
    buf = torch.randn(n)
    times = []
    for _ in range(repeats):
        dist.barrier()
        t0 = time.perf_counter()
        dist.all_reduce(buf)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _merge(per_rank: list[list[dict]]) -> dict:
    """Per step: the step time (rank 0), the slowest rank's forward/backward, the sync time of that rank (the
    last to arrive, so its sync is communication not hidden behind compute: `exposed`), its wait, the spread
    of the ranks' forward/backward (`imbalance`: the others wait that long in sync); medians over steps."""
    rows = []
    for k in range(len(per_rank[0])):
        at = [rank_rows[k] for rank_rows in per_rank]
        slow = max(at, key=lambda r: r["fb"])
        rows.append({"step": at[0]["step"], "fb": slow["fb"], "exposed": slow["sync"], "wait": slow["wait"],
                     "imbalance": slow["fb"] - min(r["fb"] for r in at), "buckets": slow["buckets"],
                     "early": slow["early"]})
    return {key: statistics.median(r[key] for r in rows) for key in rows[0]}


def _worker(rank, world, args, out):
    torch.set_num_threads(args.threads)
    modes = Modes(args, rank)
    for mode in args.modes:  # warm-up
        modes.run(mode)
    n_grad = sum(p.numel() for p in modes.step.params)
    results = []
    for _ in range(args.rounds):
        rows: dict[str, list] = {m: [] for m in args.modes}
        for k in range(args.steps):
            order = args.modes[k % len(args.modes):] + args.modes[:k % len(args.modes)]  # rotate: no order bias
            for mode in order:
                rows[mode].append(modes.run(mode))
        every = [None] * world
        dist.all_gather_object(every, rows)
        res = {m: _merge([r[m] for r in every]) for m in args.modes}
        res["comm_alone_s"] = _comm_alone(n_grad)
        res["grad_mb"] = n_grad * 4 / 2 ** 20
        if modes.zero1 is not None:  # AdamW moments (2 fp32 per parameter) each rank keeps
            res["zero1_state_mb"] = [2 * n * 4 / 2 ** 20 for n in modes.zero1.shard_numel]
        results.append(res)
    if rank == 0:
        Path(out).write_text(json.dumps(results))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--dp", type=int, default=2)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--rows", type=int, default=2, help="sequences per rank per step")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--bucket-mb", type=float, default=25.0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--modes", default="flat,buckets,zero1,ddp")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--out", default=None, help="write the figures as JSON")
    args = ap.parse_args()
    args.modes = args.modes.split(",")
    tmp = Path(args.out or "/tmp/bench_dp_overlap.json")
    t0 = time.perf_counter()
    spawn(_worker, args.dp, args, str(tmp))
    results = json.loads(tmp.read_text())
    print(f"preset {args.preset}, dp={args.dp} gloo ranks × {args.threads} thread(s), {args.rows}×{args.seq_len} "
          f"tokens per rank per step, bucket {args.bucket_mb} MB, median of {args.steps} steps "
          f"({time.perf_counter() - t0:.0f} s in all)")
    for rnd, res in enumerate(results):
        flat = res.get("flat")
        print(f"round {rnd + 1}: gradients {res['grad_mb']:.0f} MB, "
              f"comm alone (flat all-reduce, ranks idle) {res['comm_alone_s']:.3f} s")
        if "zero1_state_mb" in res:
            print(f"  AdamW state per rank: {2 * res['grad_mb']:.0f} MB unsharded, zero1 "
                  + " / ".join(f"{x:.0f}" for x in res["zero1_state_mb"]) + " MB")
        print(f"  {'mode':8s} {'step s':>8s} {'fb s':>8s} {'exposed':>8s} {'wait s':>8s} {'imbal s':>8s} "
              f"{'buckets':>8s} {'early':>6s} {'hidden s':>9s} {'vs flat':>8s}")
        for mode in args.modes:
            m = res[mode]
            hidden = (flat["exposed"] - m["exposed"]) if flat else float("nan")
            ratio = (flat["step"] / m["step"]) if flat else float("nan")
            print(f"  {mode:8s} {m['step']:8.3f} {m['fb']:8.3f} {m['exposed']:8.3f} {m['wait']:8.3f} "
                  f"{m['imbalance']:8.3f} {m['buckets']:8.0f} {m['early']:6.0f} {hidden:9.3f} {ratio:7.2f}x")


if __name__ == "__main__":
    main()
