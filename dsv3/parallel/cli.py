"""`dsv3 parallel schedule`: simulated bubbles of 1F1B / DualPipe / DualPipeV beside the report's
formulas (§3.2.1), and a Gantt PNG; the measured (multi-process) figures are benchmarks/bench_pipeline.py."""

from __future__ import annotations

import argparse


def _schedule(a: argparse.Namespace) -> int:
    from dsv3.parallel import schedules
    from dsv3.parallel.bubble import analytic, gantt

    cost = {"F": a.f, "B": a.b, "W": a.w}
    an = analytic(a.pp, a.f, a.b + a.w, a.w, a.f + a.b + a.w)
    print(f"PP={a.pp} chunks={a.chunks} F={a.f} B(input)={a.b} W={a.w}; analytic bubble: "
          f"1F1B {an['1f1b']:.2f}  ZB1P {an['zb1p']:.2f}  DualPipe {an['dualpipe']:.2f}")
    for kind in schedules.KINDS:
        if kind == "dualpipe" and a.pp % 2:
            continue
        sim = schedules.simulate(kind, a.pp, a.chunks, cost)
        bub = [sim["makespan"] - b for b in sim["busy"]]
        print(f"  {kind:10} simulated makespan {sim['makespan']:.2f}  bubble/rank {sum(bub) / len(bub):.2f} "
              f"(max {max(bub):.2f})  NCCL-safe order: {sim['channels_ok']}")
        if a.png:
            print("    ", gantt(sim["timeline"], f"{a.png}_{kind}.png", f"{kind} PP={a.pp} (simulated)"))
    return 0


def register(sub) -> None:
    p = sub.add_parser("parallel", help="pipeline schedules: simulated bubbles and Gantt charts")
    ps = p.add_subparsers(dest="parallel_command", metavar="SUBCOMMAND")
    s = ps.add_parser("schedule", help="simulate 1F1B / DualPipe / DualPipeV bubbles")
    s.add_argument("--pp", type=int, default=4)
    s.add_argument("--chunks", type=int, default=16)
    s.add_argument("--f", type=float, default=1.0, help="forward chunk cost")
    s.add_argument("--b", type=float, default=1.0, help="input-grad backward cost")
    s.add_argument("--w", type=float, default=1.0, help="weight-grad backward cost")
    s.add_argument("--png", default=None, help="write Gantt charts to PNG_<kind>.png")
    s.set_defaults(func=_schedule)
