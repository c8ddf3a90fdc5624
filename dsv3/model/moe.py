"""DeepSeekMoE with auxiliary-loss-free load balancing (paper §2.1.2, eq. 12-20).

Design choices
- FFN output = x-independent sum of `n_shared_experts` shared experts (one fused MLP of
  width n_shared·moe_intermediate_size, as in the released weights) plus the weighted
  routed experts: h' = Σ shared(u) + Σ_i g_i · FFN_i(u).
- Affinities s_i = sigmoid(u·e_i) (V3) or softmax (V2). Expert *selection* uses
  s_i + b_i, where b is the correction bias of auxiliary-loss-free balancing; the gating
  *weights* use the original s_i only (eq. 16-17): the bias never weights an expert.
- Group-limited routing (node-limited in §2.1.2/§3.2): experts split into `n_group`
  groups; a group's score is the sum of its top-2 biased affinities (V3; max for V2);
  only the `topk_group` best groups stay, the others are masked with -inf.
- Weights g = s_topk / Σ s_topk (sigmoid / norm_topk_prob), times routed_scaling_factor.
- Dropless: every token reaches its K experts. Tokens are dispatched by sorting the
  (token, expert) pairs by expert id and running each expert once on its contiguous
  slice (no Python loop over tokens); results are scattered back with index_add.
- Balancing: the gate counts tokens per expert in a fp32 buffer `load`; the training loop
  calls `update_bias(γ)`: b_i += γ·sign(mean(load) − load_i), outside autograd. The bias
  is a buffer (never seen by the optimizer) kept in fp32 even if the model is cast.
- Complementary sequence-wise balance loss (eq. 17-20) with weight α (`aux_loss_alpha`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dsv3.model.config import ModelConfig
from dsv3.model.layers import MLP, Expert


class Gate(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_experts, self.topk = cfg.n_routed_experts, cfg.num_experts_per_tok
        self.n_group, self.topk_group = cfg.n_group, cfg.topk_group
        self.score_func, self.topk_method = cfg.scoring_func, cfg.topk_method
        self.norm_topk = cfg.norm_topk_prob
        self.route_scale = cfg.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size))
        self.register_buffer("e_score_correction_bias", torch.zeros(cfg.n_routed_experts))
        self.register_buffer("load", torch.zeros(cfg.n_routed_experts), persistent=False)
        self.count_load = True

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        # routing stays in fp32 whatever the model dtype (§3.3: the gate keeps high precision)
        for name in ("e_score_correction_bias", "load"):
            setattr(self, name, getattr(self, name).float())
        self.weight.data = self.weight.data.float()
        return self

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        logits = F.linear(x.float(), self.weight.float())
        return logits.sigmoid() if self.score_func == "sigmoid" else logits.softmax(dim=-1)

    def route(self, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """scores [T,E] -> (weights [T,k] fp32, indices [T,k])."""
        choice = scores
        if self.topk_method == "noaux_tc":
            choice = scores + self.e_score_correction_bias
        if self.n_group > 1:
            g = choice.view(-1, self.n_group, self.n_experts // self.n_group)
            group_scores = g.topk(2, dim=-1)[0].sum(-1) if self.topk_method == "noaux_tc" else g.amax(-1)
            keep = group_scores.topk(self.topk_group, dim=-1)[1]
            gmask = torch.ones_like(group_scores, dtype=torch.bool).scatter_(1, keep, False)
            choice = g.masked_fill(gmask.unsqueeze(-1), float("-inf")).flatten(1)
        indices = choice.topk(self.topk, dim=-1)[1]
        weights = scores.gather(1, indices)  # original affinities: the bias never weights
        if self.norm_topk:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * self.route_scale, indices

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        w, idx = self.route(self.scores(x))
        return w, idx


class DeepSeekMoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_experts, self.topk = cfg.n_routed_experts, cfg.num_experts_per_tok
        self.alpha = cfg.aux_loss_alpha
        self.gate = Gate(cfg)
        self.experts = nn.ModuleList(Expert(cfg.hidden_size, cfg.moe_intermediate_size)
                                     for _ in range(cfg.n_routed_experts))
        self.shared_experts = (MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts)
                               if cfg.n_shared_experts else None)
        self.balance_loss: torch.Tensor | None = None  # set by forward in training

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, S, D = x.shape
        flat = x.reshape(-1, D)
        scores = self.gate.scores(flat)
        weights, indices = self.gate.route(scores)
        self.account(scores, indices, B, S)
        y = self.dispatch(flat, weights, indices).view(B, S, D)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        return y

    def account(self, scores: torch.Tensor, indices: torch.Tensor, B: int, S: int) -> None:
        """Training bookkeeping of one routing: per-expert load counts and the balance loss."""
        if self.training and self.gate.count_load:
            with torch.no_grad():
                self.gate.load += torch.bincount(indices.flatten(), minlength=self.n_experts).float()
        self.balance_loss = None
        if self.training and self.alpha > 0 and torch.is_grad_enabled():
            self.balance_loss = self._sequence_balance_loss(scores.view(B, S, -1), indices.view(B, S, -1))

    def dispatch(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Sort (token, expert) pairs by expert, run each expert on its slice, scatter back."""
        T, k = indices.shape
        if T == 1:  # one token (batch-1 decode): run its k experts directly, no sort / scatter
            w = weights.to(x.dtype)
            y = None
            for j, e in enumerate(indices[0].tolist()):
                ye = self.experts[e](x) * w[:, j:j + 1]
                y = ye if y is None else y + ye
            return y
        flat_e = indices.flatten()
        order = flat_e.argsort(stable=True)
        counts = torch.bincount(flat_e, minlength=self.n_experts).tolist()
        tok = order // k
        xs = x[tok]
        ws = weights.flatten()[order].unsqueeze(-1)
        outs, start = [], 0
        for e, c in enumerate(counts):
            if c:
                outs.append(self.experts[e](xs[start:start + c]))
                start += c
        ys = torch.cat(outs) * ws.to(x.dtype) if outs else xs.new_zeros(0, x.shape[1])
        return torch.zeros_like(x).index_add_(0, tok, ys.to(x.dtype))

    def _sequence_balance_loss(self, scores: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """L_bal = α Σ_i f_i P_i per sequence, averaged over the batch (eq. 17-20)."""
        B, S, E = scores.shape
        s_norm = scores / scores.sum(-1, keepdim=True)  # s'_{i,t}
        P = s_norm.mean(1)  # [B,E]
        hits = torch.zeros(B, E, device=scores.device).scatter_add_(
            1, indices.reshape(B, -1), torch.ones(B, S * self.topk, device=scores.device))
        f = hits * (E / (self.topk * S))
        return self.alpha * (f * P).sum(-1).mean()

    @torch.no_grad()
    def update_bias(self, gamma: float, load: torch.Tensor | None = None) -> None:
        """b_i += γ·sign(mean(load) − load_i) (§2.1.2), then reset the counters."""
        load = self.gate.load if load is None else load.to(self.gate.load)
        if gamma > 0 and load.sum() > 0:
            self.gate.e_score_correction_bias += gamma * torch.sign(load.mean() - load)
        self.gate.load.zero_()
