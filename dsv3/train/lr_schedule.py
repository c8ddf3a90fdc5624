"""Token-based schedules of §4.2: learning rate, batch-size ramp, MTP λ, bias speed γ.

Design choices
- Everything is a function of the fraction of the *total training tokens* consumed, as
  in the paper (which states its schedule in tokens, 14.8T in all). Because the batch
  ramp makes early steps smaller, a `Plan` is precomputed once: for every optimizer step
  its global batch (sequences) and the tokens consumed before it; total = their sum.
  The plan is a pure function of the config, so a resumed run recomputes it exactly and
  the scheduler "state" is only the step index (saved anyway).
- LR (§4.2): linear warmup -> constant peak -> cosine decay to `decay_lr_ratio`·peak ->
  constant -> a last, lower constant `tail_lr_ratio`·peak.
- Batch ramp (§4.2, 3072 -> 15360 over the first 469B tokens): linear in tokens, rounded
  down to a multiple of the data-parallel granule (ranks × micro-batch).
- MTP λ: 0.3 for the first 10T tokens then 0.1 (§4.2); bias update γ: 0.001 until 14.3T
  then 0 (§4.2). Early values come from ModelConfig, late ones from TrainConfig.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Plan:
    batches: list[int]  # global sequences per optimizer step
    tokens_before: list[int]  # tokens consumed before each step
    seq_len: int

    @property
    def total_tokens(self) -> int:
        return self.tokens_before[-1] + self.batches[-1] * self.seq_len if self.batches else 0

    def frac(self, step: int) -> float:
        """Fraction of total tokens consumed once `step` (0-based) is done."""
        return (self.tokens_before[step] + self.batches[step] * self.seq_len) / max(1, self.total_tokens)

    def frac_before(self, step: int) -> float:
        return self.tokens_before[step] / max(1, self.total_tokens)


def make_plan(steps: int, batch_size: int, seq_len: int, ramp_start: int | None = None,
              ramp_frac: float = 0.0, granule: int = 1) -> Plan:
    if batch_size % granule:
        raise ValueError(f"batch_size {batch_size} is not a multiple of ranks x micro-batch = {granule}")
    nominal = steps * batch_size * seq_len
    batches, before, tokens = [], [], 0
    for _ in range(steps):
        batch = batch_size
        if ramp_start is not None and ramp_frac > 0 and tokens < ramp_frac * nominal:
            batch = ramp_start + (batch_size - ramp_start) * tokens / (ramp_frac * nominal)
            batch = max(granule, int(batch) // granule * granule)
        batches.append(int(batch))
        before.append(tokens)
        tokens += int(batch) * seq_len
    return Plan(batches, before, seq_len)


def lr_at(f: float, peak: float, warmup: float, constant_until: float, decay_until: float,
          decay_ratio: float, tail_switch: float, tail_ratio: float) -> float:
    """LR when a fraction f of the tokens is consumed (f in (0, 1])."""
    if warmup > 0 and f < warmup:
        return peak * f / warmup
    if f <= constant_until:
        return peak
    low = peak * decay_ratio
    if f <= decay_until:
        p = (f - constant_until) / max(1e-12, decay_until - constant_until)
        return low + (peak - low) * 0.5 * (1 + math.cos(math.pi * p))
    if f <= tail_switch:
        return low
    return peak * tail_ratio


class Schedules:
    """All per-step knobs of one run, from its TrainConfig and ModelConfig."""

    def __init__(self, tcfg, mcfg, world: int = 1):
        self.granule = world * (tcfg.micro_batch_size or 1)
        self.plan = make_plan(tcfg.steps, tcfg.batch_size, tcfg.seq_len, tcfg.batch_ramp_start,
                              tcfg.batch_ramp_frac, self.granule)
        self.tcfg, self.mcfg = tcfg, mcfg
        self.world = world

    def lr(self, step: int) -> float:
        tcfg = self.tcfg
        return lr_at(self.plan.frac(step), tcfg.lr, tcfg.warmup_frac, tcfg.constant_until, tcfg.decay_until,
                     tcfg.decay_lr_ratio, tcfg.tail_switch, tcfg.tail_lr_ratio)

    def batch(self, step: int) -> int:
        return self.plan.batches[step]

    def micro_batches(self, step: int) -> tuple[int, int]:
        """(micro-batch size per rank, accumulation steps) for this step."""
        per_rank = self.batch(step) // self.world
        micro = min(self.tcfg.micro_batch_size or per_rank, per_rank)
        if per_rank % micro:
            micro = math.gcd(per_rank, micro)
        return micro, per_rank // micro

    def mtp_weight(self, step: int) -> float:
        late = self.plan.frac_before(step) >= self.tcfg.mtp_switch_frac
        return self.tcfg.mtp_loss_weight_late if late else self.mcfg.mtp_loss_weight

    def bias_gamma(self, step: int) -> float:
        late = self.plan.frac_before(step) >= self.tcfg.bias_switch_frac
        return self.tcfg.bias_update_speed_late if late else self.mcfg.bias_update_speed
