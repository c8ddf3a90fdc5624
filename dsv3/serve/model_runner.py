"""ModelRunner: the model's forward over the paged latent cache, for a batch of sequences
that each sit at their own position (what continuous batching needs).

Design choices
- A step is described by tensors only (`StepInput`): token ids and absolute positions [B, S],
  the pool rows the new latents go to, the rows of every visible position [B, T] and a causal
  mask [B, 1, S, T]. Sequences of different lengths share one step; rows past a sequence's end
  are masked. B and T can be padded to buckets so that shapes repeat across steps.
- Prompts (S > `expand_min`) run through the model's own modules (`Block`, `MLA._project`,
  `MLA._attend_expanded`: up-project the gathered latents once, then SDPA), so a prompt gives
  the model's `forward_step` numbers (tests/serve/test_runner.py).
- Decode and draft-verification steps (S small) run `FusedStep` (fused.py): absorbed MLA
  (§2.1.1) and a MoE without data-dependent shapes, eagerly or under `torch.compile`
  (`compile=True`; CUDA graphs on a GPU), with T marked dynamic so one graph serves every
  context length. `static_moe=False` runs decode through the model's modules instead.
- Expert loads seen in serving are counted per MoE layer (`expert_load`, main layers then MTP
  modules): the online statistic EPLB rebalances from (§3.4).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dsv3.model.moe import DeepSeekMoE
from dsv3.model.transformer import DeepSeekV3
from dsv3.serve.cache import BlockPool, read_slots
from dsv3.serve.fused import FusedStep, absorb_weights, absorbed_attention, at_last


@dataclass
class StepInput:
    ids: torch.Tensor  # [B,S] token ids
    pos: torch.Tensor  # [B,S] absolute positions
    write: torch.Tensor  # [B*S] pool rows receiving the new latents
    read: torch.Tensor  # [B,T] pool rows of positions 0..T-1
    mask: torch.Tensor  # [B,1,S,T] bool, True = key visible to query
    n_real: int  # rows 0..n_real-1 are sequences, the rest padding
    last: torch.Tensor  # [B] index of each row's last real column (where "last-position" logits are taken)


def step_input(starts: list[int], ids: torch.Tensor, tables: list[torch.Tensor], block_size: int,
               lens: list[int] | None = None, pad_batch: int | None = None, t_bucket: int = 1) -> StepInput:
    """Row b appends ids[b, :lens[b]] (default: all S) at positions starts[b]..; T is rounded up to
    t_bucket. Padding (columns past lens[b], rows past len(starts) up to pad_batch) writes into
    scratch block 0 and sees position 0 only; its outputs are to be ignored."""
    B, S = ids.shape
    dev = ids.device
    Bp = max(B, pad_batch or B)
    lens = list(lens) if lens is not None else [S] * B
    T = -(-max(s + n for s, n in zip(starts, lens)) // t_bucket) * t_bucket
    st = torch.tensor(starts + [0] * (Bp - B), dtype=torch.long, device=dev)
    valid = torch.arange(S, device=dev)[None, :] < torch.tensor(lens + [0] * (Bp - B), device=dev)[:, None]
    pos = torch.where(valid, st[:, None] + torch.arange(S, device=dev), 0)  # [Bp,S]
    read = read_slots(tables + [tables[0][:0]] * (Bp - B), T, block_size)  # [Bp,T]
    write = torch.where(valid, read.gather(1, pos), 0)  # padding: row 0 of block 0
    keys = torch.arange(T, device=dev)[None, None, :]
    mask = torch.where(valid[..., None], keys <= pos[:, :, None], keys == 0)[:, None]  # [Bp,1,S,T]
    if Bp > B:
        ids = torch.cat([ids, ids.new_zeros(Bp - B, S)])
    last = torch.tensor([n - 1 for n in lens] + [0] * (Bp - B), device=dev)
    return StepInput(ids, pos, write.reshape(-1), read, mask, B, last)


class ModelRunner:
    def __init__(self, model: DeepSeekV3, pool: BlockPool, static_moe: bool = True, compile: bool = False,
                 expand_min: int = 16):
        self.model = model.eval()
        self.cfg = model.config
        self.pool = pool
        self.static_moe = static_moe
        self.expand_min = expand_min
        self.L = self.cfg.num_hidden_layers
        blocks = list(model.layers) + [md.block for md in model.mtp]
        moes = [b.mlp for b in blocks if isinstance(b.mlp, DeepSeekMoE)]
        self.moe_index = {id(m): i for i, m in enumerate(moes)}
        self.n_main_moe = sum(isinstance(b.mlp, DeepSeekMoE) for b in model.layers)
        self.expert_load = torch.zeros(len(moes), self.cfg.n_routed_experts, device=model.device)
        self.fused = FusedStep(model, {id(m): _stack_experts(m) for m in moes}, gemv=compile) \
            if static_moe or compile else None
        self._absorb: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.compiled = self.compiled_mtp = None
        self.cuda = model.device.type == "cuda"
        if compile:
            # CPU: T (context length) is a dynamic dimension: one graph per batch bucket serves every
            # length. GPU: CUDA graphs ("reduce-overhead") replay fixed shapes, so T is bucketed
            # (`t_bucket`) instead of dynamic. (Not run on a GPU in this project yet.)
            mode = "reduce-overhead" if self.cuda else None
            # one graph per (batch bucket, tokens per row, runner): far more than dynamo's default
            # cache of 8 per function, past which it would silently run the step eagerly
            dyn = torch._dynamo.config
            dyn.cache_size_limit = max(dyn.cache_size_limit, 256)
            dyn.accumulated_cache_size_limit = max(dyn.accumulated_cache_size_limit, 1024)
            self.compiled = torch.compile(self.fused.__call__, dynamic=False, mode=mode)
            self.compiled_mtp = torch.compile(self.fused.mtp, dynamic=False, mode=mode)

    # ---- main model ---------------------------------------------------------------------
    @torch.no_grad()
    def forward(self, inp: StepInput, all_logits: bool = True, prompt: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the main layers over inp; returns (logits [B,S,V], or [B,1,V] at each row's last
        real position only, and the last hidden states [B,S,D] before the final norm). Prompts
        (`prompt=True`, or more than expand_min tokens) run through the model's modules: their
        lengths vary, and a compiled step keeps one graph per decode shape."""
        B, S = inp.ids.shape
        real = torch.arange(B, device=inp.ids.device) < inp.n_real
        if prompt or S > self.expand_min or self.fused is None:
            load = torch.zeros_like(self.expert_load)
            logits, h = self._forward_modules(inp, real, load, all_logits)
            self.expert_load += load
            return logits, h
        fn = self.fused
        if self.compiled is not None:
            fn = self.compiled
            self._mark(inp)
        logits, h, load = fn(inp.ids, inp.pos, inp.write, inp.read, inp.mask, self.pool.kv, real,
                             None if all_logits else inp.last)
        if load:
            self.expert_load[: self.n_main_moe] += torch.stack(load)
        return logits, h

    @property
    def t_bucket(self) -> int:
        """Context lengths are padded to this multiple (compiled on a GPU: CUDA graphs per bucket)."""
        return 256 if self.compiled is not None and self.cuda else 1

    def _mark(self, inp: StepInput) -> None:
        if not self.cuda:
            torch._dynamo.mark_dynamic(inp.read, 1)
            torch._dynamo.mark_dynamic(inp.mask, 3)

    def _forward_modules(self, inp: StepInput, real, load, all_logits: bool):
        m = self.model
        rope = m.rotary(inp.pos)
        h = m.embed_tokens(inp.ids)
        for i, blk in enumerate(m.layers):
            h = self._block(blk, h, rope, self.pool.kv[i], inp, real, load)
        return m.lm_head(m.norm(h if all_logits else at_last(h, inp.last))), h

    # ---- MTP modules (speculative drafts, §2.2) -------------------------------------------------
    @torch.no_grad()
    def mtp_forward(self, k: int, h_prev: torch.Tensor, inp: StepInput, all_logits: bool = True,
                    prompt: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """MTP module k (0-based) at inp's positions: h_prev [B,S,D] is its input hidden state at
        each position, inp.ids the token k+1 further ahead (§2.2 eq. 21-23). Its own latent cache is
        pool layer L + k. Returns (logits [B,S,V] (or last position), h^{k+1} [B,S,D])."""
        real = torch.arange(inp.ids.shape[0], device=inp.ids.device) < inp.n_real
        if h_prev.shape[0] < inp.ids.shape[0]:  # padded batch rows
            h_prev = torch.cat([h_prev, h_prev.new_zeros(inp.ids.shape[0] - h_prev.shape[0], *h_prev.shape[1:])])
        kv = self.pool.kv[self.L + k]
        li = self.moe_index.get(id(self.model.mtp[k].block.mlp))
        if prompt or inp.ids.shape[1] > self.expand_min or self.fused is None:
            m, mod = self.model, self.model.mtp[k]
            x = mod.eh_proj(torch.cat([mod.enorm(m.embed_tokens(inp.ids)), mod.hnorm(h_prev)], dim=-1))
            load = torch.zeros_like(self.expert_load)
            x = self._block(mod.block, x, m.rotary(inp.pos), kv, inp, real, load)
            self.expert_load += load
            return m.lm_head(mod.norm(x if all_logits else at_last(x, inp.last))), x
        fn = self.fused.mtp
        if self.compiled_mtp is not None:
            fn = self.compiled_mtp
            self._mark(inp)
        logits, x, load = fn(k, h_prev, inp.ids, inp.pos, inp.write, inp.read, inp.mask, kv, real,
                             None if all_logits else inp.last)
        if load:
            self.expert_load[li] += load[0]
        return logits, x

    # ---- one block through the model's modules ---------------------------------------------------
    def _block(self, blk, x, rope, kv_l, inp: StepInput, real, load):
        x = x + self._attn(blk.self_attn, blk.input_layernorm(x), rope, kv_l, inp)
        y = blk.post_attention_layernorm(x)
        if not isinstance(blk.mlp, DeepSeekMoE):
            return x + blk.mlp(y)
        moe = blk.mlp
        B, S, D = y.shape
        flat = y.reshape(-1, D)
        weights, idx = moe.gate(flat)
        load[self.moe_index[id(moe)]].index_add_(0, idx.flatten(), real.to(load.dtype).repeat_interleave(
            S * idx.shape[1]))
        out = moe.dispatch(flat, weights, idx).view(B, S, D)
        if moe.shared_experts is not None:
            out = out + moe.shared_experts(y)
        return x + out

    def _attn(self, attn, x, rope, kv_l, inp: StepInput) -> torch.Tensor:
        B, S, _ = x.shape
        r = attn.kv_lora_rank
        q_nope, q_pe, c_kv, k_pe = attn._project(x, rope)
        new = torch.cat([c_kv.to(kv_l.dtype), k_pe.squeeze(2).to(kv_l.dtype)], dim=-1)
        kv_l.index_copy_(0, inp.write, new.reshape(B * S, -1))
        kv = kv_l[inp.read].to(x.dtype)  # [B,T,r+rope]
        if S > self.expand_min:  # a prompt: the model's path, expand the latents once, then SDPA
            return attn._attend_expanded(q_nope, q_pe, kv[..., :r], kv[..., r:], inp.mask)
        if id(attn) not in self._absorb:
            self._absorb[id(attn)] = absorb_weights(attn)
        return absorbed_attention(attn, self._absorb[id(attn)], q_nope, q_pe, kv, inp.mask)


def _stack_experts(moe: DeepSeekMoE) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack the routed experts into w13 [E, 2I, D] (gate; up) and w2 [E, D, I]; the experts'
    Linear weights become views of them (same storage: no second copy of the experts)."""
    ex = moe.experts
    w13 = torch.stack([torch.cat([e.gate_proj.weight.data, e.up_proj.weight.data]) for e in ex])
    w2 = torch.stack([e.down_proj.weight.data for e in ex])
    I = w2.shape[-1]
    for i, e in enumerate(ex):
        e.gate_proj.weight.data = w13[i, :I]
        e.up_proj.weight.data = w13[i, I:]
        e.down_proj.weight.data = w2[i]
    return w13, w2
