"""DeepSeekV3: the whole model, top to bottom (paper §2).

    input_ids ─► embed_tokens ─► Block × num_hidden_layers ─► norm ─► lm_head ─► logits
                                  (MLA + MLP for the first `first_k_dense_replace`,
                                   MLA + DeepSeekMoE after)
                 └► MTPModule × num_nextn_predict_layers (training; shared embed/head)

Design choices
- Pre-norm residual blocks (block.py): x += attn(norm(x)); x += ffn(norm(x)).
- Training/scoring path (`forward`) uses SDPA over full keys; generation (`forward_step`)
  uses the MLA absorbed path over a latent cache (`Cache`), see mla.py.
- Padding: batches may carry `attention_mask` (1 = token). Positions are the running
  count of real tokens, so left-padded prompts (generation) and right-padded batches
  (scoring) see the same positions as unpadded sequences. Pad queries attend to
  themselves only, which keeps softmax finite.
- Loss = CE(main) + λ·mean_k CE(MTP depth k) + Σ_layers balance loss (§2.2 eq. 25;
  §2.1.2 eq. 17). Labels use the HF convention (shifted inside, -100 ignored).
- Weight init: normal(0, initializer_range = 0.006) for every matrix (§4.2).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from dsv3.model.block import Block
from dsv3.model.config import ModelConfig
from dsv3.model.layers import RMSNorm
from dsv3.model.loss import shifted_cross_entropy
from dsv3.model.moe import DeepSeekMoE
from dsv3.model.mtp import MTPModule
from dsv3.model.rope import RotaryEmbedding


@dataclass
class ModelOutput:
    logits: torch.Tensor
    mtp_logits: list[torch.Tensor] = field(default_factory=list)
    loss: torch.Tensor | None = None
    main_loss: torch.Tensor | None = None
    mtp_losses: list[torch.Tensor] = field(default_factory=list)
    balance_loss: torch.Tensor | None = None
    hidden_states: torch.Tensor | None = None


class LayerCache:
    """Latent cache of one MLA layer: normalised c_KV and rotated k_R per token."""

    def __init__(self, B: int, T: int, r: int, rope: int, dtype, device, owner: "Cache"):
        # one buffer [B, T, r + rope]: a decode step scores both parts with a single matmul
        self.kv = torch.zeros(B, T, r + rope, dtype=dtype, device=device)
        self.latent, self.pe = self.kv[..., :r], self.kv[..., r:]  # views
        self._owner = owner

    @property
    def start(self) -> int:
        return self._owner.length


class Cache:
    """Per-model generation cache: one LayerCache per layer plus token validity."""

    def __init__(self, cfg: ModelConfig, B: int, max_len: int, dtype=torch.float32, device=None):
        self.length = 0
        self.max_len = max_len
        self.valid = torch.zeros(B, max_len, dtype=torch.bool, device=device)
        self.layers = [LayerCache(B, max_len, cfg.kv_lora_rank, cfg.qk_rope_head_dim, dtype, device, self)
                       for _ in range(cfg.num_hidden_layers)]

    def bytes_per_token(self) -> int:
        l0 = self.layers[0]
        per_layer = (l0.latent.shape[-1] + l0.pe.shape[-1]) * l0.latent.element_size()
        return per_layer * len(self.layers)


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Running count of real tokens minus one (pads get 0)."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


class DeepSeekV3(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.mtp = nn.ModuleList(MTPModule(cfg, cfg.num_hidden_layers + k)
                                 for k in range(cfg.num_nextn_predict_layers))
        self.rotary = RotaryEmbedding(cfg)
        self.mtp_loss_weight = cfg.mtp_loss_weight
        self.reset_parameters()
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    # ---- construction -------------------------------------------------------------------
    @torch.no_grad()
    def reset_parameters(self) -> None:
        std = self.config.initializer_range
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, 0.0, std)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, RMSNorm):
                nn.init.ones_(m.weight)
            elif hasattr(m, "e_score_correction_bias"):
                nn.init.normal_(m.weight, 0.0, std)
                m.e_score_correction_bias.zero_()

    @classmethod
    def from_pretrained(cls, path, dtype: torch.dtype | None = None, device=None) -> "DeepSeekV3":
        from dsv3.model.hf import load_pretrained

        return load_pretrained(cls, path, dtype=dtype, device=device)

    def save_pretrained(self, path, max_shard_bytes: int = 4 << 30) -> None:
        from dsv3.model.hf import save_pretrained

        save_pretrained(self, path, max_shard_bytes=max_shard_bytes)

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    def rope_for(self, positions: torch.Tensor):
        return self.rotary(positions)

    # ---- MoE balancing ---------------------------------------------------------------------
    def moe_layers(self) -> list[DeepSeekMoE]:
        return [m for m in self.modules() if isinstance(m, DeepSeekMoE)]

    def expert_load(self) -> torch.Tensor:
        layers = self.moe_layers()
        if not layers:
            return torch.zeros(0, 0)
        return torch.stack([m.gate.load for m in layers])

    def update_bias(self, gamma: float, load: torch.Tensor | None = None) -> None:
        for i, m in enumerate(self.moe_layers()):
            m.update_bias(gamma, None if load is None else load[i])

    # ---- training / scoring path -------------------------------------------------------------
    def _mask_and_rope(self, S: int, attention_mask: torch.Tensor | None, device):
        if attention_mask is None:
            return None, self.rotary(torch.arange(S, device=device))
        am = attention_mask.bool()
        pos = positions_from_mask(am)
        causal = torch.ones(S, S, dtype=torch.bool, device=device).tril()
        mask = causal[None] & am[:, None, :]
        mask |= torch.eye(S, dtype=torch.bool, device=device)[None]
        return mask[:, None], self.rotary(pos)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, return_mtp: bool | None = None,
                return_hidden: bool = False) -> ModelOutput:
        B, S = input_ids.shape
        mask, rope = self._mask_and_rope(S, attention_mask, input_ids.device)
        emb = self.embed_tokens(input_ids)
        h = emb
        for layer in self.layers:
            h = layer(h, rope, mask)
        logits = self.lm_head(self.norm(h))
        out = ModelOutput(logits=logits, hidden_states=h if return_hidden else None)
        want_mtp = (labels is not None) if return_mtp is None else return_mtp
        if want_mtp and len(self.mtp):
            h_k = h
            for k, mod in enumerate(self.mtp, start=1):
                if S - k < 1:
                    break
                m_k = None if mask is None else mask[:, :, : S - k, : S - k]
                rope_k = (rope[0][:, : S - k], rope[1][:, : S - k])
                h_k = mod(h_k[:, : S - k], emb[:, k:], rope_k, m_k)
                out.mtp_logits.append(self.lm_head(mod.norm(h_k)))
        if labels is not None:
            out.main_loss = shifted_cross_entropy(logits, labels, 1)
            out.mtp_losses = [shifted_cross_entropy(lg, labels, k + 1) for k, lg in enumerate(out.mtp_logits, start=1)]
            bal = [m.balance_loss for m in self.moe_layers() if m.balance_loss is not None]
            out.balance_loss = torch.stack(bal).sum() if bal else logits.new_zeros(())
            loss = out.main_loss + out.balance_loss
            if out.mtp_losses:
                loss = loss + self.mtp_loss_weight * torch.stack(out.mtp_losses).mean()
            out.loss = loss
        return out

    # ---- generation path (latent cache) ------------------------------------------------------
    def new_cache(self, batch_size: int, max_len: int) -> Cache:
        return Cache(self.config, batch_size, max_len, dtype=self.dtype, device=self.device)

    @torch.no_grad()
    def forward_step(self, input_ids: torch.Tensor, cache: Cache,
                     attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Append input_ids [B,S] to the cache and return their logits [B,S,V]."""
        B, S = input_ids.shape
        start, end = cache.length, cache.length + S
        if end > cache.max_len:
            raise ValueError(f"cache overflow: {end} tokens > max_len {cache.max_len}")
        new_valid = (torch.ones(B, S, dtype=torch.bool, device=input_ids.device)
                     if attention_mask is None else attention_mask[:, -S:].bool())
        cache.valid[:, start:end] = new_valid
        valid = cache.valid[:, :end]
        pos = positions_from_mask(valid)[:, start:end]
        mask = None  # one query at the newest slot of an unpadded cache sees every key: no mask to build
        if S > 1 or attention_mask is not None or not bool(valid.all()):
            q_slot = torch.arange(start, end, device=input_ids.device)
            k_slot = torch.arange(end, device=input_ids.device)
            mask = (k_slot[None, :] <= q_slot[:, None])[None] & valid[:, None, :]
            mask |= (k_slot[None, :] == q_slot[:, None])[None]
            mask = mask[:, None]  # [B,1,S,T]
        rope = self.rotary(pos)
        h = self.embed_tokens(input_ids)
        for layer, lc in zip(self.layers, cache.layers):
            h = layer(h, rope, mask, lc)
        cache.length = end
        return self.lm_head(self.norm(h))

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
                 top_p: float = 1.0, eos_token_id: int | None = None,
                 attention_mask: torch.Tensor | None = None, generator: torch.Generator | None = None
                 ) -> torch.Tensor:
        """Prefill then decode over the latent cache. Prompts of different lengths are
        left-padded with `attention_mask`. Finished rows are padded with eos_token_id."""
        was_training = self.training
        self.eval()
        B, S = input_ids.shape
        cache = self.new_cache(B, S + max_new_tokens)
        logits = self.forward_step(input_ids, cache, attention_mask)[:, -1]
        out = [input_ids]
        done = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
        for _ in range(max_new_tokens):
            nxt = sample(logits, temperature, top_p, generator)
            if eos_token_id is not None:
                nxt = torch.where(done, torch.full_like(nxt, eos_token_id), nxt)
                done |= nxt == eos_token_id
            out.append(nxt[:, None])
            if eos_token_id is not None and bool(done.all()):
                break
            if len(out) - 1 == max_new_tokens:
                break
            logits = self.forward_step(nxt[:, None], cache)[:, -1]
        self.train(was_training)
        return torch.cat(out, dim=1)


def sample(logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Greedy when temperature == 0, else temperature + nucleus (top-p) sampling."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = (logits.float() / temperature).softmax(dim=-1)
    if top_p < 1.0:
        sp, si = probs.sort(dim=-1, descending=True)
        keep = sp.cumsum(-1) - sp < top_p
        sp = sp * keep
        probs = torch.zeros_like(probs).scatter_(-1, si, sp)
    return torch.multinomial(probs / probs.sum(-1, keepdim=True), 1, generator=generator).squeeze(-1)
