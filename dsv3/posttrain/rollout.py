"""Rollouts and per-token log-probabilities (shared by GRPO, rejection sampling, distillation).

- Prompts are chat-encoded with the generation prompt, LEFT-padded with an
  `attention_mask` (the model contract for batched `generate`), repeated G times
  (`repeat_interleave`: rows i*G .. i*G+G-1 are prompt i's group) and decoded by
  `model.generate`, which runs on the MLA latent KV cache (§2.1.1).
- The response mask keeps generated tokens up to and including the first EOS; later
  tokens (whatever `generate` emitted after EOS) are masked out of every loss.
- `token_logprobs` recomputes log π(token) with one full forward pass over
  prompt + response, with logits divided by the sampling temperature so the ratio and
  the KL refer to the distribution that was sampled.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dsv3.data.chat import EOS, decode_response, encode_chat, prompt_messages


def left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    n = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), n), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, n - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[i, n - len(s):] = 1
    return ids, mask


@dataclass
class Rollout:
    seq: torch.Tensor  # [N, P + T] prompt (left-padded) + response
    attention_mask: torch.Tensor  # [N, P + T] 1 = real token (prompt) or kept response token
    response_mask: torch.Tensor  # [N, T] float, 1 for response tokens up to and incl. EOS
    prompt_len: int  # P
    texts: list[str]


def eos_id(tok) -> int:
    return int(tok.convert_tokens_to_ids(EOS))


def response_mask(resp: torch.Tensor, eos: int) -> torch.Tensor:
    """1 up to and including the first EOS in each row, 0 after."""
    is_eos = (resp == eos).long()
    before = torch.cumsum(is_eos, dim=1) - is_eos  # EOS seen strictly before this position
    return (before == 0).float()


@torch.no_grad()
def rollout(model, tok, prompts: list[str], group_size: int = 1, max_new_tokens: int = 32,
            temperature: float = 1.0) -> Rollout:
    enc = [encode_chat(tok, prompt_messages(p), add_generation_prompt=True)[0] for p in prompts]
    ids, mask = left_pad(enc, tok.pad_token_id)
    ids, mask = ids.repeat_interleave(group_size, 0), mask.repeat_interleave(group_size, 0)
    was = model.training
    model.eval()
    seq = model.generate(ids, max_new_tokens=max_new_tokens, temperature=temperature,
                         eos_token_id=eos_id(tok), attention_mask=mask)
    model.train(was)
    P = ids.shape[1]
    resp = seq[:, P:]
    rmask = response_mask(resp, eos_id(tok))
    texts = [decode_response(tok, r.tolist()) for r in resp]
    return Rollout(seq, torch.cat([mask, rmask.long()], 1), rmask, P, texts)


def sample_responses(model, tok, prompts: list[str], k: int, max_new_tokens: int, temperature: float) -> list[str]:
    return rollout(model, tok, prompts, k, max_new_tokens, temperature).texts


def token_logprobs(model, seq: torch.Tensor, attention_mask: torch.Tensor, prompt_len: int,
                   temperature: float = 1.0, with_entropy: bool = False):
    """log π(seq[:, P:]) per token [N, T] (and the entropy of π at those positions)."""
    logits = model(seq, attention_mask=attention_mask).logits[:, prompt_len - 1:-1].float() / temperature
    logp_all = F.log_softmax(logits, -1)
    lp = logp_all.gather(-1, seq[:, prompt_len:].unsqueeze(-1)).squeeze(-1)
    if not with_entropy:
        return lp
    ent = -(logp_all.exp() * logp_all).sum(-1)
    return lp, ent
