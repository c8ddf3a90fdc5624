"""Gates: whether a stage's candidate model replaces its champion (`lifecycle.gates`).

`decide(gate, candidate, champion)` compares the gate's metric from the two models' evaluations in
this lifecycle (the champion is re-scored with the same evaluation settings, a cache hit when that
was done before), so the numbers compare like with like. The candidate is promoted when
- there is no champion yet, or
- it beats the champion by more than `margin` in the gate's direction (`min`: lower is better).
It is not promoted when it is the champion already (nothing to do), when it does not beat the
champion by the margin, or when either metric is missing (a gate never passes on absent data);
`reason` says which, in words the report prints.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass


@dataclass
class Decision:
    stage: str
    candidate: str  # models:/NAME/VERSION
    champion: str | None  # the champion before this decision
    metric: str
    direction: str
    margin: float
    candidate_value: float | None
    champion_value: float | None
    promote: bool
    reason: str

    def to_json(self) -> dict:
        return asdict(self)


def _value(metrics: dict | None, key: str) -> float | None:
    v = (metrics or {}).get(key)
    return float(v) if v is not None and math.isfinite(float(v)) else None


def decide(stage: str, gate, candidate: str, cand_metrics: dict, champion: str | None = None,
           champ_metrics: dict | None = None) -> Decision:
    """The gate decision for `candidate` (its eval metrics) against `champion` (its eval metrics)."""
    cv, hv = _value(cand_metrics, gate.metric), _value(champ_metrics, gate.metric)
    d = dict(stage=stage, candidate=candidate, champion=champion, metric=gate.metric, direction=gate.direction,
             margin=gate.margin, candidate_value=cv, champion_value=hv)
    if champion == candidate:
        return Decision(**d, promote=False, reason=f"{candidate} is the champion already")
    if cv is None:
        return Decision(**d, promote=False, reason=f"the candidate has no {gate.metric} (not evaluated?)")
    if champion is None:
        return Decision(**d, promote=True, reason=f"no champion yet; {gate.metric} = {cv:.4g}")
    if hv is None:
        return Decision(**d, promote=False, reason=f"the champion {champion} has no {gate.metric} to compare with")
    gain = (hv - cv) if gate.direction == "min" else (cv - hv)
    better = "lower" if gate.direction == "min" else "higher"
    if gain > gate.margin:
        return Decision(**d, promote=True, reason=f"{gate.metric} {cv:.4g} vs champion {hv:.4g}: "
                                                  f"{better} by {gain:.4g} > margin {gate.margin:g}")
    return Decision(**d, promote=False, reason=f"{gate.metric} {cv:.4g} vs champion {hv:.4g}: does not beat it "
                                               f"by more than the margin {gate.margin:g} ({better} is better)")
