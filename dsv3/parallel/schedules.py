"""Pipeline schedules as per-rank op lists, plus a discrete-event simulator (DeepSeek-V3 report §3.2.1).

A schedule is, for each pipeline rank, a list of ops executed in order by `pipeline.PipelineSchedule`:
  ("F", d)        forward of the next chunk of direction d (d = index of the rank's stage module)
  ("B", d, zb)    backward (input grads) of the next chunk of direction d; zb=True defers the weight grads
                  into the WeightGradStore, zb=False computes them in place (full backward)
  ("W",)          run the oldest deferred weight-grad entry
  ("FB", df, db)  a forward of direction df paired with a backward of direction db (the overlapped
                  "F&B" chunk pair of §3.2.1; its communication is overlapped with the compute)
Chunks of one direction are always processed in order, so an op needs no chunk id.

Topology: `topology(kind, pp, rank)` gives, per direction, the (rank, direction) that feeds it (prev)
and that it feeds (next); None means "takes the step inputs" / "computes the loss".
  dualpipe : rank r holds stage r of the forward pipe (d=0) and stage PP-1-r of the reverse pipe (d=1).
  dualpipev: rank r holds stages r (d=0) and 2PP-1-r (d=1): the "V" — rank PP-1 hands over locally.
  1f1b     : rank r holds stage r.

The DualPipe/DualPipeV op lists follow the 8 phases of the DualPipe schedule (nF0, nF0F1, nB1W1F1,
the steady nF0B1F1B0 of overlapped pairs, nB1F1B0, nB1B0 with zero-bubble on the second half,
nWB0, nW). Written from the paper/README description; the order is checked here, by simulation, to be
deadlock-free, to run every F/B/W exactly once, and to send messages on every rank pair in the same
order the receiver expects them (what NCCL needs, since it ignores tags).
"""

from __future__ import annotations

from collections import defaultdict

KINDS = ("dualpipe", "dualpipev", "1f1b")


def topology(kind: str, pp: int, rank: int) -> tuple[list, list]:
    """(prev, next): per direction, (rank, direction) or None."""
    r = rank
    if kind == "1f1b":
        return [(r - 1, 0) if r > 0 else None], [(r + 1, 0) if r < pp - 1 else None]
    if kind == "dualpipe":
        prev = [(r - 1, 0) if r > 0 else None, (r + 1, 1) if r < pp - 1 else None]
        nxt = [(r + 1, 0) if r < pp - 1 else None, (r - 1, 1) if r > 0 else None]
        return prev, nxt
    if kind == "dualpipev":
        prev = [(r - 1, 0) if r > 0 else None, (r + 1, 1) if r < pp - 1 else (r, 0)]
        nxt = [(r + 1, 0) if r < pp - 1 else (r, 1), (r - 1, 1) if r > 0 else None]
        return prev, nxt
    raise ValueError(f"schedule: unknown kind {kind!r}; choose one of {KINDS}")


def chunks_per_direction(kind: str, num_chunks: int) -> int:
    return num_chunks // 2 if kind == "dualpipe" else num_chunks


def check_args(kind: str, pp: int, num_chunks: int) -> None:
    if kind == "dualpipe" and pp % 2:
        raise ValueError(f"DualPipe needs an even number of pipeline ranks, got {pp}")
    if kind in ("dualpipe", "dualpipev") and num_chunks < 2 * pp:
        raise ValueError(f"{kind} needs num_chunks >= 2 * pipeline ranks = {2 * pp}, got num_chunks={num_chunks}")
    if kind == "dualpipe" and num_chunks % 2:
        raise ValueError(f"DualPipe needs an even num_chunks (half per direction), got {num_chunks}")
    if num_chunks < 1:
        raise ValueError(f"num_chunks must be >= 1, got {num_chunks}")


def _bidirectional(pp_eff: int, h: int, n: int, swap: int, overlap_first: bool) -> list:
    """The 8-phase DualPipe order for a rank at distance h from the pipe's end, n chunks per direction.
    pp_eff: ranks of one 'half' (PP/2 for DualPipe, PP for DualPipeV); phases are mapped to directions by
    `swap` (ranks in DualPipe's second half run the reverse pipe as their phase 0)."""
    F = lambda p: ("F", p ^ swap)
    B = lambda p, zb=False: ("B", p ^ swap, zb)
    FB = lambda p, q: ("FB", p ^ swap, q ^ swap)
    W = ("W",)
    k = pp_eff - h - 1
    ops = [F(0)] * (2 * k)                                   # 1: nF0 (warm-up of the own direction)
    ops += [F(0), F(1)] * (h + 1)                            # 2: nF0F1
    ops += [B(1, True), W, F(1)] * k                         # 3: nB1W1F1 (zero bubble)
    steady = n - 2 * pp_eff + h + 1                          # 4: nF0B1F1B0 (overlapped pairs)
    for i in range(steady):
        ops += [F(0), B(1)] if (i == 0 and not overlap_first) else [FB(0, 1)]
        ops += [FB(1, 0)]
    ops += [B(1), FB(1, 0)] * k                              # 5: nB1F1B0
    tail = [B(1), B(0)] * (h + 1)                            # 6: nB1B0, the last h+1 use zero bubble
    ops += [(o[0], o[1], j >= h + 1) for j, o in enumerate(tail)]
    ops += [W, B(0, True)] * k                               # 7: nWB0
    ops += [W] * (h + 1)                                     # 8: nW
    return ops


def build(kind: str, pp: int, rank: int, num_chunks: int, forward_only: bool = False) -> list:
    check_args(kind, pp, num_chunks)
    if kind == "1f1b":
        warm = min(pp - rank - 1, num_chunks)
        ops = [("F", 0)] * warm + [("F", 0), ("B", 0, False)] * (num_chunks - warm) + [("B", 0, False)] * warm
    elif kind == "dualpipe":
        half = pp // 2
        h = min(rank, pp - 1 - rank)
        middle = rank in (half - 1, half)
        ops = _bidirectional(half, h, num_chunks // 2, int(rank >= half), overlap_first=not middle)
    else:
        ops = _bidirectional(pp, rank, num_chunks, 0, overlap_first=rank != pp - 1)
    if forward_only:
        ops = [("F", o[1]) if o[0] == "FB" else o for o in ops if o[0] in ("F", "FB")]
    return ops


def _check_coverage(kind: str, num_chunks: int, ops, pos, cnt, wq, n: int, forward_only: bool) -> None:
    """Every rank ran all its ops (else: deadlock), each chunk's F and B exactly once per direction,
    and every deferred weight-grad entry."""
    pp = len(ops)
    if any(pos[r] < len(ops[r]) for r in range(pp)):
        stuck = {r: ops[r][pos[r]] for r in range(pp) if pos[r] < len(ops[r])}
        raise RuntimeError(f"{kind} PP={pp} chunks={num_chunks}: deadlock, ranks stuck at {stuck}")
    for r in range(pp):
        for d in range(1 if kind == "1f1b" else 2):
            want_b = 0 if forward_only else n
            if cnt[r]["F", d] != n or cnt[r]["B", d] != want_b:
                raise RuntimeError(f"rank {r} dir {d}: ran {cnt[r]['F', d]} F / {cnt[r]['B', d]} B of {n}")
        if wq[r]:
            raise RuntimeError(f"rank {r}: {wq[r]} weight-grad entries never run")


def simulate(kind: str, pp: int, num_chunks: int, cost: dict | None = None, forward_only: bool = False) -> dict:
    """Run all ranks' op lists as a discrete-event model (sends never block, a recv waits for the data).
    cost: durations {"F","B","W","FB"} (B is the input-grad part; a non-zb B costs B+W). Returns
    {"timeline": per-rank [(op, dir, t0, t1)], "makespan", "busy": per rank, "channels_ok": bool,
    "channels": {(src, dst): (send order, receive order)}}.
    Raises RuntimeError on deadlock or a schedule that does not cover every chunk exactly once."""
    c = {"F": 1.0, "B": 1.0, "W": 1.0, **(cost or {})}
    c.setdefault("FB", c["F"] + c["B"] + c["W"])
    ops = [build(kind, pp, r, num_chunks, forward_only) for r in range(pp)]
    topo = [topology(kind, pp, r) for r in range(pp)]
    n = chunks_per_direction(kind, num_chunks)
    done = {}                      # ("F"|"B", rank, dir, chunk) -> finish time
    cnt = [defaultdict(int) for _ in range(pp)]
    pos, clock = [0] * pp, [0.0] * pp
    timeline = [[] for _ in range(pp)]
    sent = defaultdict(list)       # (src, dst) -> message sequence in send order
    recvd = defaultdict(list)      # (src, dst) -> message sequence in receive-posting order
    wq = [0] * pp

    def ready(r, o):
        prev, nxt = topo[r]
        deps = []
        if o[0] in ("F", "FB") and prev[o[1]] is not None:
            pr, pd = prev[o[1]]
            deps.append(("F", pr, pd, cnt[r]["F", o[1]]))
        bd = o[2] if o[0] == "FB" else (o[1] if o[0] == "B" else None)
        if bd is not None:
            i = cnt[r]["B", bd]
            deps.append(("F", r, bd, i))
            if nxt[bd] is not None:
                deps.append(("B", nxt[bd][0], nxt[bd][1], i))
        if any(k not in done for k in deps):
            return None
        return max([done[k] for k in deps], default=0.0)

    progress = True
    while progress:
        progress = False
        for r in range(pp):
            while pos[r] < len(ops[r]):
                o = ops[r][pos[r]]
                if o[0] == "W":
                    if wq[r] == 0:
                        raise RuntimeError(f"rank {r}: W with an empty weight-grad store at op {pos[r]}")
                    wq[r] -= 1
                    t0 = clock[r]
                    timeline[r].append(("W", -1, t0, t0 + c["W"]))
                    clock[r] = t0 + c["W"]
                    pos[r] += 1
                    continue
                t = ready(r, o)
                if t is None:
                    break
                t0 = max(clock[r], t)
                prev, nxt = topo[r]
                parts = [("F", o[1])] if o[0] == "F" else [("B", o[1])] if o[0] == "B" else [("F", o[1]), ("B", o[2])]
                dur = c["FB"] if o[0] == "FB" else c["F"] if o[0] == "F" else c["B"] + (0.0 if forward_only or o[2] else c["W"])
                for kind_, d in parts:   # message order: receives of F then B, sends of F then B
                    src = prev[d] if kind_ == "F" else nxt[d]
                    if src is not None and src[0] != r:
                        recvd[src[0], r].append((kind_, d))
                for kind_, d in parts:
                    i = cnt[r][kind_, d]
                    if i >= n:
                        raise RuntimeError(f"rank {r}: more than {n} {kind_} chunks of direction {d}")
                    cnt[r][kind_, d] += 1
                    done[kind_, r, d, i] = t0 + dur
                    dst = nxt[d] if kind_ == "F" else prev[d]
                    if dst is not None and dst[0] != r:
                        sent[r, dst[0]].append(("F", dst[1]) if kind_ == "F" else ("B", dst[1]))
                if o[0] == "B" and o[2] and not forward_only:
                    wq[r] += 1
                timeline[r].append((o[0], o[1], t0, t0 + dur))
                clock[r] = t0 + dur
                pos[r] += 1
                progress = True
    _check_coverage(kind, num_chunks, ops, pos, cnt, wq, n, forward_only)
    return _summary(timeline, clock, sent, recvd)


def _summary(timeline, clock, sent, recvd) -> dict:
    """simulate's result: the timeline, makespan, busy time per rank and the per-channel message orders."""
    channels = {k: (sent[k], recvd[k]) for k in set(sent) | set(recvd)}
    return {"timeline": timeline, "makespan": max(clock), "busy": [sum(t1 - t0 for _, _, t0, t1 in tl) for tl in timeline],
            "channels_ok": all(a == b for a, b in channels.values()), "channels": channels}
