"""GRPO: Group Relative Policy Optimization (DeepSeekMath; DeepSeek-V3 §5.2.2).

For each prompt q, G responses {o_i} are sampled from the old policy (on the MLA latent
KV cache, `rollout.py`) and scored; the advantage of every token of o_i is the group-
normalised reward A_i = (r_i − mean(r)) / (std(r) + eps), so no value model is needed.
The policy maximises, per response token t,

    min(ρ_t A_i, clip(ρ_t, 1−ε, 1+ε) A_i) − β · D_KL,   ρ_t = π_θ / π_old,
    D_KL = π_ref/π_θ − log(π_ref/π_θ) − 1   (the unbiased, non-negative k3 estimator)

against a frozen reference (the SFT model). Normalisation (`loss_norm`): "token" = sum
over all response tokens of the batch / their count (DAPO-style: longer answers weigh
more); "sequence" = mean over each response's tokens, then over responses (the
DeepSeekMath formula). μ = `inner_epochs` optimisation passes reuse one rollout batch
(π_old is the policy at rollout time), which is what makes the clip active.

Tracked per step: `grpo/reward_mean`, `grpo/reward_std`, `grpo/kl` (mean over the inner
epochs; `grpo/kl_start`: before the step's first update), `grpo/clip_frac`,
`grpo/resp_len`, `grpo/entropy`, `grpo/loss`. Rollouts may run on Ray actors
(`rollout_workers > 0`, through `dsv3.cluster.ray_map`); the policy weights travel to the
workers each step as a CPU state dict.

Precision (§3.3): `precision` (a `dsv3.train.precision.Precision` or its name, fp32 by default)
converts the policy and the reference in place (fp8: FP8 Linears) and autocasts every forward:
rollouts (also on Ray workers), log-probabilities and the update. Master weights stay fp32.
"""

from __future__ import annotations

import copy
import random
import time

import torch

from dsv3.posttrain.rollout import Rollout, rollout, token_logprobs
from dsv3.train.precision import Precision


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-4) -> torch.Tensor:
    r = rewards.view(-1, group_size).float()
    adv = (r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + eps)
    return adv.view(-1)


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """π_ref/π − log(π_ref/π) − 1, per token (≥ 0)."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def grpo_loss(logp, old_logp, ref_logp, adv, mask, clip_eps: float = 0.2, kl_coef: float = 0.0,
              loss_norm: str = "token") -> tuple[torch.Tensor, dict]:
    """The (negated) GRPO objective; `adv` is per sequence [N], the rest per token [N, T]."""
    ratio = torch.exp(logp - old_logp)
    a = adv.unsqueeze(1)
    surr = torch.min(ratio * a, torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps) * a)
    kl = kl_k3(logp, ref_logp) if kl_coef > 0 or ref_logp is not None else torch.zeros_like(logp)
    per_tok = -(surr - kl_coef * kl)
    if loss_norm == "token":
        loss = (per_tok * mask).sum() / mask.sum().clamp_min(1)
    elif loss_norm == "sequence":
        loss = ((per_tok * mask).sum(1) / mask.sum(1).clamp_min(1)).mean()
    else:
        raise ValueError(f"loss_norm must be 'token' or 'sequence', not {loss_norm!r}")
    n = mask.sum().clamp_min(1)
    clipped = ((ratio - 1).abs() > clip_eps).float()
    stats = {"kl": float((kl.detach() * mask).sum() / n), "clip_frac": float((clipped.detach() * mask).sum() / n)}
    return loss, stats


def arithmetic_task(n: int = 200, seed: int = 0, max_operand: int = 4) -> list[dict]:
    """The built-in GRPO task: a+b with small operands, answers verified by MathReward."""
    from dsv3.posttrain.sft_data import arithmetic_problems

    return arithmetic_problems(n, seed, max_operand, ops="+", word_fraction=0.0)


def _remote_rollout(args):
    """Ray worker body: rebuild the policy from (config, state dict) in its precision and sample."""
    cfg_json, state, tok_dir, prompts, g, max_new, temp, seed, precision = args
    from dsv3 import DeepSeekV3, ModelConfig
    from dsv3.data.chat import load_tokenizer

    torch.manual_seed(seed)
    precision = Precision.of(precision)
    m = DeepSeekV3(ModelConfig.model_validate_json(cfg_json))
    m.load_state_dict(state)
    precision.prepare(m)
    with precision.autocast(m.device):
        r = rollout(m, load_tokenizer(tok_dir), prompts, g, max_new, temp)
    return r.seq, r.attention_mask, r.response_mask, r.prompt_len, r.texts


def _merge(parts) -> Rollout:
    P = max(p[3] for p in parts)
    T = max(p[0].shape[1] - p[3] for p in parts)
    seqs, ams, rms, texts = [], [], [], []
    for seq, am, rm, pl, tx in parts:
        lp, rp = P - pl, T - (seq.shape[1] - pl)
        seqs.append(torch.nn.functional.pad(seq, (lp, rp)))
        ams.append(torch.nn.functional.pad(am, (lp, rp)))
        rms.append(torch.nn.functional.pad(rm, (0, rp)))
        texts += tx
    return Rollout(torch.cat(seqs), torch.cat(ams), torch.cat(rms), P, texts)


def ray_rollout(policy, tok_dir: str, prompts: list[str], cfg, step: int,
                precision: Precision | str = "fp32") -> Rollout:
    from dsv3.cluster import ray_map

    state = {k: v.detach().cpu() for k, v in policy.state_dict().items()}
    w = min(cfg.rollout_workers, len(prompts))
    size = -(-len(prompts) // w)
    chunks = [prompts[i:i + size] for i in range(0, len(prompts), size)]  # contiguous: order kept
    items = [(policy.config.model_dump_json(), state, tok_dir, c, cfg.group_size, cfg.max_new_tokens,
              cfg.temperature, cfg.seed * 1000 + step * 10 + i, str(precision)) for i, c in enumerate(chunks)]
    return _merge(ray_map(_remote_rollout, items, workers=len(items)))


def train_grpo(policy, tok, problems: list[dict], reward_fn, cfg, ref=None, log=None,
               tok_dir: str | None = None, precision: Precision | str = "fp32") -> list[dict]:
    """Run `cfg.steps` GRPO steps in place on `policy`; returns the per-step metrics."""
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    precision = Precision.of(precision)
    precision.prepare(policy)
    if ref is None:
        ref = copy.deepcopy(policy)
    precision.prepare(ref)
    device = policy.device
    ref.eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=cfg.lr,
                            betas=(0.9, 0.95), weight_decay=0.0)
    G, history = cfg.group_size, []
    for step in range(1, cfg.steps + 1):
        t0 = time.perf_counter()
        batch = rng.sample(problems, min(cfg.prompts_per_step, len(problems)))
        prompts = [p["prompt"] for p in batch]
        if cfg.rollout_workers > 0 and tok_dir:
            ro = ray_rollout(policy, tok_dir, prompts, cfg, step, precision)
        else:
            with precision.autocast(device):
                ro = rollout(policy, tok, prompts, G, cfg.max_new_tokens, cfg.temperature)
        samples = [p for p in batch for _ in range(G)]
        rewards = torch.tensor(reward_fn(samples, ro.texts), dtype=torch.float32)
        adv = group_advantages(rewards, G, cfg.adv_eps)
        mask = ro.response_mask
        with torch.no_grad(), precision.autocast(device):
            old_lp = token_logprobs(policy, ro.seq, ro.attention_mask, ro.prompt_len, cfg.temperature)
            ref_lp = token_logprobs(ref, ro.seq, ro.attention_mask, ro.prompt_len, cfg.temperature)
        policy.train()
        agg: dict[str, float] = {}
        for epoch in range(cfg.inner_epochs):
            with precision.autocast(device):
                lp, ent = token_logprobs(policy, ro.seq, ro.attention_mask, ro.prompt_len, cfg.temperature,
                                         with_entropy=True)
            loss, st = grpo_loss(lp, old_lp, ref_lp, adv, mask, cfg.clip_eps, cfg.kl_coef, cfg.loss_norm)
            if epoch == 0:  # KL of the rollout policy itself, before this step's updates
                agg["kl_start"] = st["kl"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            gn = torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.grad_clip)
            opt.step()
            for k, v in {**st, "loss": loss.item(), "grad_norm": float(gn),
                         "entropy": float((ent.detach() * mask).sum() / mask.sum().clamp_min(1))}.items():
                agg[k] = agg.get(k, 0.0) + v / cfg.inner_epochs
        m = {"grpo/reward_mean": rewards.mean().item(), "grpo/reward_std": rewards.std().item(),
             "grpo/resp_len": mask.sum(1).mean().item(), "grpo/step_s": time.perf_counter() - t0,
             **{f"grpo/{k}": v for k, v in agg.items()}}
        history.append(m)
        if log:
            log(m, step)
    return history
