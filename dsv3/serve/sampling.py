"""Sampling parameters, token choice and the speculative acceptance rule.

Design choices
- OpenAI semantics: temperature 0 is greedy (argmax); otherwise softmax(logits / T) cut to the
  smallest nucleus of mass >= top_p, then one draw. Each request with a `seed` draws from its
  own `torch.Generator`, so its output does not depend on what else shares the batch.
- Log-probabilities reported to clients are those of the model's raw distribution
  (log_softmax of the logits, before temperature / top-p), as vLLM reports them; lm-eval's
  scoring (`echo` + `logprobs`) needs exactly those.
- Speculative acceptance (§5.4.3 reuses the MTP module as the drafter) follows the standard
  rule (Leviathan et al. 2023; Chen et al. 2023): draft x ~ q is kept with probability
  min(1, p(x)/q(x)), else one token is drawn from norm(max(p - q, 0)) and the rest of the draft
  is dropped; if every draft is kept a bonus token is drawn from p. The output distribution is
  exactly p (tests/serve/test_spec.py checks it statistically). Greedy requests are the
  one-hot case: keep drafts while they equal the target argmax, so speculative greedy output
  equals plain greedy output token for token.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch



@dataclass
class TokenLogprob:
    """One token's log-probability and its top alternatives (what `logprobs` reports)."""
    token: int
    logprob: float | None
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # top-N alternatives per generated token (0 = only the chosen one)
    echo: bool = False  # return the prompt (and its logprobs when `logprobs` is set)

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0


def processed_probs(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """The distribution a draw uses: softmax(logits / T) restricted to the top-p nucleus [.., V]."""
    probs = (logits.float() / temperature).softmax(dim=-1)
    if top_p < 1.0:
        sp, si = probs.sort(dim=-1, descending=True)
        keep = sp.cumsum(-1) - sp < top_p  # always keeps the most likely token
        probs = torch.zeros_like(probs).scatter_(-1, si, sp * keep)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def draw(probs: torch.Tensor, gen: torch.Generator | None) -> int:
    return int(torch.multinomial(probs, 1, generator=gen))


def choose(logits: torch.Tensor, params: SamplingParams, gen: torch.Generator | None) -> int:
    """One token from logits [V]."""
    if params.greedy:
        return int(logits.argmax())
    return draw(processed_probs(logits, params.temperature, params.top_p), gen)


def accept_drafts(drafts: list[int], q: torch.Tensor | None, target_logits: torch.Tensor,
                  params: SamplingParams, gen: torch.Generator | None) -> tuple[list[int], int]:
    """Speculative verification of one sequence.

    drafts: K drafted tokens; q [K, V]: the draft distributions they were drawn from (None for
    greedy); target_logits [K+1, V]: the main model's logits at the K+1 verified positions.
    Returns (new tokens: the accepted drafts then one corrected or bonus token, n accepted)."""
    K = len(drafts)
    if params.greedy:
        tgt = target_logits.argmax(-1).tolist()
        a = 0
        while a < K and drafts[a] == tgt[a]:
            a += 1
        return drafts[:a] + [tgt[a]], a
    p = processed_probs(target_logits, params.temperature, params.top_p)  # [K+1, V]
    out: list[int] = []
    for i, x in enumerate(drafts):
        ratio = float(p[i, x]) / max(float(q[i, x]), 1e-30)
        u = float(torch.rand((), generator=gen))
        if u < ratio:
            out.append(x)
            continue
        resid = (p[i] - q[i]).clamp(min=0)
        out.append(draw(resid if float(resid.sum()) > 0 else p[i], gen))
        return out, i
    out.append(draw(p[K], gen))
    return out, K


def top_logprobs(logprobs: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The n best (values, ids) of log-probabilities [.., V]."""
    return logprobs.topk(max(n, 1), dim=-1)
