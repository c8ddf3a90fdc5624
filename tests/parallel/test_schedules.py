"""Schedule op lists (no processes): coverage, deadlock-freedom, bubbles vs the report's formulas (§3.2.1)."""

import pytest

from dsv3.parallel import schedules
from dsv3.parallel.bubble import analytic, gantt, stats


@pytest.mark.parametrize("kind", schedules.KINDS)
@pytest.mark.parametrize("pp", [2, 4, 6, 8])
@pytest.mark.parametrize("extra", [0, 2, 7])
@pytest.mark.parametrize("forward_only", [False, True])
def test_every_chunk_once_and_no_deadlock(kind, pp, extra, forward_only):
    nc = 2 * pp + extra + (extra % 2 if kind == "dualpipe" else 0)
    sim = schedules.simulate(kind, pp, nc, forward_only=forward_only)  # raises on deadlock / wrong counts
    n = schedules.chunks_per_direction(kind, nc)
    for r in range(pp):
        ops = schedules.build(kind, pp, r, nc, forward_only)
        n_w = sum(o[0] == "W" for o in ops)
        n_zb = sum(o[0] == "B" and o[2] for o in ops)
        assert n_w == n_zb  # every deferred weight grad is run, none twice
        if kind != "1f1b" and not forward_only:
            assert sum(o[0] == "FB" for o in ops) > 0
    assert len(sim["timeline"]) == pp and n > 0


def test_one_f_one_b_bubble_matches_formula():
    F, Bin, W = 1.0, 1.5, 0.7
    for pp in (2, 4, 8):
        sim = schedules.simulate("1f1b", pp, 3 * pp, {"F": F, "B": Bin, "W": W})
        for busy in sim["busy"]:
            assert sim["makespan"] - busy == pytest.approx(analytic(pp, F, Bin + W, W)["1f1b"])


@pytest.mark.parametrize("pp", [4, 8])
def test_dualpipe_bubble_is_smaller_and_does_not_grow_with_chunks(pp):
    cost = {"F": 1.0, "B": 1.0, "W": 1.0}
    bub = {}
    for nc in (2 * pp, 4 * pp, 6 * pp):
        sim = schedules.simulate("dualpipe", pp, nc, cost)
        bub[nc] = max(sim["makespan"] - b for b in sim["busy"])
        one = schedules.simulate("1f1b", pp, nc, cost)
        assert bub[nc] < min(one["makespan"] - b for b in one["busy"])
    assert len(set(bub.values())) == 1, bub
    an = analytic(pp, 1.0, 2.0, 1.0, 3.0)
    assert an["dualpipe"] < an["zb1p"] < an["1f1b"]


def test_channels_are_in_receive_order_for_small_pp():
    # NCCL ignores tags: every rank pair must see sends in the order the receiver posts receives.
    for kind, pp in [("dualpipe", 2), ("dualpipe", 4), ("dualpipev", 2), ("1f1b", 4)]:
        assert schedules.simulate(kind, pp, 4 * pp)["channels_ok"], (kind, pp)


def test_errors():
    with pytest.raises(ValueError, match="even number of pipeline ranks"):
        schedules.build("dualpipe", 3, 0, 12)
    with pytest.raises(ValueError, match="num_chunks >= 2"):
        schedules.build("dualpipev", 4, 0, 6)
    with pytest.raises(ValueError, match="unknown kind"):
        schedules.topology("gpipe", 4, 0)


def test_gantt_and_stats(tmp_path):
    sim = schedules.simulate("dualpipe", 4, 8)
    tls = [[(*e, i) for i, e in enumerate(tl)] for tl in sim["timeline"]]
    st = stats(tls[0])
    assert st["bubble"] == pytest.approx(sim["makespan"] - sim["busy"][0])
    png = gantt(sim["timeline"], str(tmp_path / "g.png"), "sim")
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("pp", [4, 8])
def test_dualpipe_simulation_meets_the_formula_at_equal_costs(pp):
    sim = schedules.simulate("dualpipe", pp, 4 * pp, {"F": 1.0, "B": 1.0, "W": 1.0})
    an = analytic(pp, F=1.0, B=2.0, W=1.0, FB=3.0)  # non-overlapped F&B = F + B(full)
    assert all(sim["makespan"] - b == pytest.approx(an["dualpipe"]) for b in sim["busy"])


def test_parallel_config_errors_name_the_field():
    from pydantic import ValidationError

    from dsv3.parallel.config import ParallelConfig

    assert ParallelConfig(pp=4).chunks == 8
    for bad, field in [(dict(pp=3), "pp"), (dict(pp=4, num_chunks=6), "num_chunks"),
                       (dict(ep=4, ep_ranks_per_node=3), "ep_ranks_per_node"),
                       (dict(ep=4, ep_ranks_per_node=2, max_nodes=3), "max_nodes"), (dict(nope=1), "nope")]:
        with pytest.raises(ValidationError, match=field):
            ParallelConfig(**bad)


def test_cli_schedule(tmp_path, capsys):
    from dsv3.cli import main

    assert main(["parallel", "schedule", "--pp", "4", "--chunks", "8", "--png", str(tmp_path / "g")]) == 0
    out = capsys.readouterr().out
    assert "dualpipe" in out and "1F1B 9.00" in out
    assert (tmp_path / "g_dualpipe.png").exists()
