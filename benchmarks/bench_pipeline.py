"""Pipeline bubbles of 1F1B, DualPipe and DualPipeV at PP=4 on CPU/gloo (DeepSeek-V3 report §3.2.1).

Each schedule runs training steps on PP local gloo ranks (the fastest of 3 is reported); every rank records its timeline
(F, B, Bi, W, F&B, wait), and the measured bubble per rank is printed beside (a) the discrete-event
simulation of the same op lists with the measured op costs and (b) the report's analytic formulas
(1F1B (PP-1)(F+B), ZB1P (PP-1)(F+B-2W), DualPipe (PP/2-1)(F&B+B-3W)). A Gantt PNG per schedule.

Default stages are `SleepStage`s (fixed F / B-input / W costs), because PP processes on a 2-core
machine would otherwise slow each other's compute down; `--real` uses Linear+GELU stages instead
(their F/B/W costs are measured, the figures are then noisy). DualPipeV stages get half the cost: a
rank holds two stages of a 2*PP-stage model, the same work per rank as the other two schedules.

    .venv/bin/python benchmarks/bench_pipeline.py [--pp 4] [--chunks 16] [--ms 10] [--real] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

import torch
import torch.nn as nn
import torch.nn.functional as F

from dsv3.parallel import DualPipe, DualPipeV, OneFOneB
from dsv3.parallel import schedules
from dsv3.parallel.bubble import SleepStage, analytic, gantt, gather_timelines, report
from dsv3.parallel.local import spawn

DIM, MB = 256, 16


def _stage(real: bool, ms: float, scale: float, seed: int):
    if real:
        torch.manual_seed(seed)
        width = int(DIM * 4 * scale)
        return nn.Sequential(nn.Linear(DIM, width), nn.GELU(), nn.Linear(width, DIM))
    s = ms * scale / 1000
    return SleepStage(s, s, s)


def _worker(rank, pp, kind, chunks, ms, real, out):
    cls = {"1f1b": OneFOneB, "dualpipe": DualPipe, "dualpipev": DualPipeV}[kind]
    if kind == "1f1b":
        mods = _stage(real, ms, 1.0, rank)
    elif kind == "dualpipe":
        mods = (_stage(real, ms, 1.0, rank), _stage(real, ms, 1.0, pp - 1 - rank))
    else:
        mods = (_stage(real, ms, 0.5, rank), _stage(real, ms, 0.5, 2 * pp - 1 - rank))
    pipe = cls(mods)
    pipe.set_p2p_tensor_shapes([(MB, DIM)])
    pipe.set_p2p_tensor_dtype(torch.float32)
    n_in = chunks // 2 if kind == "dualpipe" else chunks
    x, y = torch.randn(n_in * MB, DIM), torch.randn(n_in * MB, DIM)
    first, last = rank == 0, rank == pp - 1
    feeds = first or (kind == "dualpipe" and last)
    loss_here = (kind == "1f1b" and last) or (kind != "1f1b" and first) or (kind == "dualpipe" and last)
    runs = []
    for i in range(4):  # step 0 warms up allocators and the gloo pairs; keep the fastest of the rest
        pipe.step(*((x,) if feeds else ()), num_chunks=chunks, criterion=F.mse_loss,
                  labels=(y,) if loss_here else ())
        if i:
            runs.append(gather_timelines(pipe))
    if rank == 0:
        rep = min((report(kind, t) for t in runs), key=lambda r: r["span"])
        tls = runs[[report(kind, t)["span"] for t in runs].index(rep["span"])]
        png = gantt(tls, os.path.join(out, f"gantt_{kind}_pp{pp}.png"), f"{kind} PP={pp} chunks={chunks}")
        with open(os.path.join(out, f"{kind}.json"), "w") as f:
            json.dump({**{k: v for k, v in rep.items() if k != "per_rank"}, "png": png}, f)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pp", type=int, default=4)
    ap.add_argument("--chunks", type=int, default=16)
    ap.add_argument("--ms", type=float, default=10.0, help="SleepStage cost of each of F, B-input, W")
    ap.add_argument("--real", action="store_true", help="Linear+GELU stages instead of SleepStage")
    ap.add_argument("--out", default=os.path.join(tempfile.gettempdir(), "dsv3_bench_pipeline"))
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    print(f"PP={a.pp} chunks={a.chunks} stages={'Linear+GELU' if a.real else f'sleep {a.ms} ms each of F/B/W'}")
    print(f"{'schedule':10} {'span ms':>8} {'bubble ms':>10} {'frac':>6} {'sim ms':>7} | op costs ms: F B W F&B"
          f" | analytic ms: 1F1B ZB1P DualPipe")
    for kind in ("1f1b", "dualpipe", "dualpipev"):
        spawn(_worker, a.pp, kind, a.chunks, a.ms, a.real, a.out)
        with open(os.path.join(a.out, f"{kind}.json")) as f:
            r = json.load(f)
        c = r["costs"]
        sim = schedules.simulate(kind, a.pp, a.chunks, {"F": c["F"], "B": c["B"] - c["W"], "W": c["W"], "FB": c["FB"]})
        sim_bubble = sim["makespan"] - sum(sim["busy"]) / a.pp
        an = analytic(a.pp, c["F"], c["B"], c["W"], c["FB"])
        ms = lambda v: f"{1000 * v:.1f}"
        print(f"{kind:10} {ms(r['span']):>8} {ms(r['bubble']):>10} {r['fraction']:>6.3f} {ms(sim_bubble):>7} | "
              f"{ms(c['F'])} {ms(c['B'])} {ms(c['W'])} {ms(c['FB'])} | "
              f"{ms(an['1f1b'])} {ms(an['zb1p'])} {ms(an['dualpipe'])}   {r['png']}")
    print("DualPipeV stages are half-size (2 per rank of a 2*PP-stage model); the report gives no "
          "formula for it.")


if __name__ == "__main__":
    main()
