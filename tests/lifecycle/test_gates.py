"""Gate decisions: promote when there is no champion or the candidate beats it by more than the margin."""

from dsv3.lifecycle.config import GateConfig
from dsv3.lifecycle.gates import decide

BPB = GateConfig(metric="eval/bpb", direction="min", margin=0.01)
ACC = GateConfig(metric="eval/arith/acc", direction="max")


def test_no_champion_promotes_a_scored_candidate():
    d = decide("base", BPB, "models:/dsv3-base/1", {"eval/bpb": 2.5})
    assert d.promote and "no champion yet" in d.reason and d.candidate_value == 2.5


def test_direction_and_margin():
    c, h = "models:/dsv3-base/2", "models:/dsv3-base/1"
    assert decide("base", BPB, c, {"eval/bpb": 2.4}, h, {"eval/bpb": 2.5}).promote  # lower by 0.1 > 0.01
    kept = decide("base", BPB, c, {"eval/bpb": 2.495}, h, {"eval/bpb": 2.5})
    assert not kept.promote and "margin 0.01" in kept.reason  # better, but not by the margin
    assert not decide("base", BPB, c, {"eval/bpb": 2.6}, h, {"eval/bpb": 2.5}).promote
    assert decide("chat", ACC, c, {"eval/arith/acc": 0.5}, h, {"eval/arith/acc": 0.25}).promote
    tie = decide("chat", ACC, c, {"eval/arith/acc": 0.25}, h, {"eval/arith/acc": 0.25})
    assert not tie.promote and "does not beat" in tie.reason  # margin 0: a tie is not better


def test_never_promotes_on_missing_data_or_itself():
    c, h = "models:/dsv3-chat/2", "models:/dsv3-chat/1"
    assert "has no eval/arith/acc" in decide("chat", ACC, c, {}, h, {"eval/arith/acc": 0.5}).reason
    assert not decide("chat", ACC, c, {"eval/arith/acc": float("nan")}).promote
    d = decide("chat", ACC, c, {"eval/arith/acc": 0.5}, h, {})
    assert not d.promote and "champion" in d.reason
    same = decide("chat", ACC, h, {"eval/arith/acc": 0.5}, h, {"eval/arith/acc": 0.5})
    assert not same.promote and "champion already" in same.reason
