"""Pipeline bubbles: per-rank timelines, measured bubble, the analytic formulas, Gantt charts (report §3.2.1).

Notation of the report's Table 2: F = forward chunk, B = full backward chunk, W = its weight-grad part,
F&B = an overlapped forward+backward pair. Analytic bubble per rank:
  1F1B      (PP-1)(F+B)
  ZB1P      (PP-1)(F+B-2W)
  DualPipe  (PP/2-1)(F&B+B-3W)
Measured bubble of a rank = its step span - time spent in F/B/W/F&B ops (so receive waits and any
other stall count as bubble). Event names in a timeline: F, B (full backward), Bi (input-grad part of a
zero-bubble backward), W, FB, wait. `SleepStage` models a stage whose F / B-input / W cost fixed sleeps,
so that a schedule's shape can be measured on an oversubscribed CPU (PP processes on 2 cores), where
real compute of one rank slows the others down.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist
import torch.nn as nn

from dsv3.parallel.pipeline import WeightGradStore

COMPUTE = ("F", "B", "Bi", "W", "FB")
COLORS = {"F": "#4c72b0", "B": "#55a868", "Bi": "#8fd19e", "W": "#8172b2", "FB": "#dd8452", "wait": "#dddddd"}


def analytic(pp: int, F: float, B: float, W: float, FB: float | None = None) -> dict:
    """Bubble per rank of the report's Table 2 (B = full backward, W = its weight part)."""
    FB = F + B if FB is None else FB
    return {"1f1b": (pp - 1) * (F + B), "zb1p": (pp - 1) * (F + B - 2 * W),
            "dualpipe": (pp / 2 - 1) * (FB + B - 3 * W)}


def _per_op(timelines: list) -> dict:
    """name -> list of op durations (segments of one op, same op index, summed; waits kept apart)."""
    per = {}
    for r, tl in enumerate(timelines):
        for name, _, t0, t1, j in tl:
            key = (name, r, j) if j >= 0 else (name, r, id(object()))
            per[key] = per.get(key, 0.0) + (t1 - t0)
    out = {}
    for (name, *_), v in per.items():
        out.setdefault(name, []).append(v)
    return out


def stats(timeline: list) -> dict:
    """One rank's timeline [(name, dir, t0, t1, op)] -> span, busy, bubble, bubble fraction, mean op times."""
    span = max(e[3] for e in timeline) - min(e[2] for e in timeline) if timeline else 0.0
    per = _per_op([timeline])
    busy = sum(sum(per.get(k, [])) for k in COMPUTE)
    mean = {k: sum(v) / len(v) for k, v in per.items()}
    return {"span": span, "busy": busy, "bubble": span - busy, "fraction": (span - busy) / span if span else 0.0,
            "wait": sum(per.get("wait", [])), "mean": mean, "count": {k: len(v) for k, v in per.items()}}


def op_costs(timelines: list) -> dict:
    """Mean F, B (full), W, F&B over all ranks, in the notation of `analytic`."""
    m = {k: sum(v) / len(v) for k, v in _per_op(timelines).items()}
    W = m.get("W", 0.0)
    B = m["B"] if "B" in m else m.get("Bi", 0.0) + W
    return {"F": m.get("F", 0.0), "B": B, "W": W, "FB": m.get("FB", m.get("F", 0.0) + B)}


def gather_timelines(pipe) -> list:
    """All ranks' timelines of the last step, on every rank (all_gather_object over the pipe's group)."""
    out = [None] * pipe.num_ranks
    dist.all_gather_object(out, pipe.timeline, group=pipe.group)
    return out


def gantt(timelines: list, path: str, title: str = "") -> str:
    """Draw one row per rank (rank 0 on top) and save a PNG. Simulated timelines (4-tuples) work too."""
    timelines = [[(*e, -1) if len(e) == 4 else e for e in tl] for tl in timelines]
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(12, 1.2 + 0.45 * len(timelines)))
    span = max((e[3] for tl in timelines for e in tl), default=1.0)
    for r, tl in enumerate(timelines):
        y = len(timelines) - 1 - r
        for name, d, t0, t1, _ in tl:
            ax.broken_barh([(t0, t1 - t0)], (y - 0.4, 0.8), facecolors=COLORS.get(name, "k"),
                           edgecolor="white" if name != "wait" else "none", linewidth=0.3)
            if name in ("F", "B", "Bi", "FB") and (t1 - t0) > span / 120:
                ax.text((t0 + t1) / 2, y, f"{name}{d}", ha="center", va="center", fontsize=5, color="white")
    ax.set_yticks(range(len(timelines)), [f"rank {len(timelines) - 1 - i}" for i in range(len(timelines))])
    ax.set_xlabel("time")
    ax.set_title(title)
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in COLORS.values()]
    ax.legend(handles, list(COLORS), ncol=len(COLORS), fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.35))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def report(kind: str, timelines: list) -> dict:
    """Measured bubble (mean over ranks) next to the analytic formulas evaluated with measured op costs."""
    pp = len(timelines)
    st = [stats(tl) for tl in timelines]
    c = op_costs(timelines)
    return {"kind": kind, "pp": pp, "bubble": sum(s["bubble"] for s in st) / pp,
            "fraction": sum(s["fraction"] for s in st) / pp, "span": max(s["span"] for s in st),
            "costs": c, "analytic": analytic(pp, c["F"], c["B"], c["W"], c["FB"]), "per_rank": st}


class _SleepFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, f, b, wt):
        time.sleep(f)
        ctx.b, ctx.wt = b, wt
        ctx.w = w
        return x * w

    @staticmethod
    def backward(ctx, g):
        time.sleep(ctx.b)
        w, wt = ctx.w, ctx.wt

        def wgrad():
            time.sleep(wt)
            return torch.zeros_like(w)

        if WeightGradStore.enabled:
            WeightGradStore.put(lambda: setattr(w, "grad", wgrad() if w.grad is None else w.grad + wgrad()))
            return g * w, None, None, None, None
        return g * w, wgrad(), None, None, None


class SleepStage(nn.Module):
    """A stage costing `f` s forward, `b` s input-grad backward and `w` s weight-grad (a sleep each)."""

    def __init__(self, f: float, b: float, w: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(()))
        self.f, self.b, self.w = f, b, w

    def forward(self, x):
        return _SleepFn.apply(x, self.weight, self.f, self.b, self.w)
