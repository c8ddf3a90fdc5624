"""The static-shape decode step (issue item 6): one function of tensors that `torch.compile`
takes whole, and that CUDA graphs can replay on a GPU.

Why: a batch-1 decode step of the eager model is a few hundred tiny ATen calls (norms, RoPE,
routing, each expert's three Linears), and a MoE layer asks the host which experts were picked
(`.tolist()`) before it can slice their weights: data-dependent shapes that break a graph.
What is left of the step is memory streaming: every activated weight and the latent cache
are read once per token, so that is what the step should cost.

Design choices
- Nothing in the step depends on data: routing is top-k (static); experts run either gathered
  per token from stacked weights (T*k < E: `w13[idx]` [T,k,2I,D], so each token streams only its
  k experts) or all E experts with a dense gate (T*k >= E, every expert is read anyway).
- Projections that read the same input are fused into one weight (q_a / q and kv_a of MLA;
  gate and up of every SwiGLU); the experts are stacked. The model's parameters become views
  of these tensors, so nothing is duplicated.
- `gemv=True` (used under torch.compile for steps of a few tokens) writes each projection as a
  multiply-and-reduce over the input dimension instead of a GEMM call. Inductor turns that into
  one vectorised loop per weight that streams it once, with the expert gather folded into the
  load; on the CPUs measured here that reads weights ~1.7x faster than the GEMV of a BLAS call
  (fp32 and bf16; benchmarks/bench_serve.py), and it is how a gather-then-matmul costs no copy.
  Eagerly it would build a [T, out, in] temporary, so eager runs use `F.linear`.
- Norms, RoPE and routing are the model's formulas (`RMSNorm` in fp32, `apply_rope`,
  `Gate.route`), so the step agrees with `forward_step` to float rounding.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F

from dsv3.model.moe import DeepSeekMoE
from dsv3.model.rope import apply_rope


def _fuse_rows(*linears) -> torch.Tensor:
    """Concatenate Linear weights along the output dim; the Linears become views of the result."""
    w = torch.cat([lin.weight.data for lin in linears])
    o = 0
    for lin in linears:
        n = lin.weight.shape[0]
        lin.weight.data = w[o:o + n]
        o += n
    return w


def _bias(*linears):
    if all(lin.bias is None for lin in linears):
        return None
    return torch.cat([lin.bias.data if lin.bias is not None else lin.weight.new_zeros(lin.weight.shape[0])
                      for lin in linears])


def _mlp(mlp) -> SimpleNamespace:
    return SimpleNamespace(w13=_fuse_rows(mlp.gate_proj, mlp.up_proj), w2=mlp.down_proj.weight,
                           inter=mlp.gate_proj.weight.shape[0])


def absorb_weights(a) -> tuple[torch.Tensor, torch.Tensor]:
    """W_UK [H, nope, r] and W_UV^T [H, r, v] of one MLA, cut out of kv_b_proj (§2.1.1)."""
    w = a.kv_b_proj.weight.data.view(a.n_heads, a.nope + a.v_dim, a.kv_lora_rank)
    return w[:, : a.nope].contiguous(), w[:, a.nope:].transpose(1, 2).contiguous()


def absorbed_attention(a, absorb, q_nope, q_pe, kv, mask, lin=F.linear, sdpa: bool = True) -> torch.Tensor:
    """q_nope [B,S,H,nope], q_pe [B,S,H,rope] over latents kv [B,T,r+rope] -> [B,S,D]. Absorption
    (§2.1.1): W_UK folded into the query, W_UV applied after; the H*S queries of a row share the
    latent keys/values (multi-query attention), so the row's cache is read once for all heads:
    one fused SDPA call (eager), or two batched matmuls around a fp32 softmax (compiled: the
    gather of the row's blocks feeds them directly, measured faster than SDPA there)."""
    B, S, H, nope = q_nope.shape
    r = a.kv_lora_rank
    w_uk, w_uv_t = absorb
    q_abs = torch.bmm(q_nope.permute(2, 0, 1, 3).reshape(H, B * S, nope), w_uk)  # [H,B*S,r]
    q = torch.cat([q_abs.view(H, B, S, r).permute(1, 2, 0, 3), q_pe], dim=-1).reshape(B, 1, S * H, -1)
    msk = mask if S == 1 else mask.repeat_interleave(H, dim=2)  # [B,1,S*H,T]
    if sdpa:
        o = F.scaled_dot_product_attention(q, kv[:, None], kv[:, None], attn_mask=msk, scale=a.scale)[:, 0]
    else:
        s = torch.bmm(q[:, 0], kv.transpose(1, 2)).float() * a.scale  # [B,S*H,T]
        p = s.masked_fill(~msk[:, 0], float("-inf")).softmax(-1).to(kv.dtype)
        o = torch.bmm(p, kv[..., :r])  # [B,S*H,r]
    o = torch.bmm(o[..., :r].reshape(B * S, H, r).transpose(0, 1), w_uv_t)  # [H,B*S,v]
    o = lin(o.transpose(0, 1).reshape(B, S, H * a.v_dim).to(q_nope.dtype), a.o_proj.weight)
    return o if a.o_proj.bias is None else o + a.o_proj.bias


def prepare_block(blk, stacked: tuple[torch.Tensor, torch.Tensor] | None) -> SimpleNamespace:
    a = blk.self_attn
    first = a.q_a_proj if a.q_lora_rank else a.q_proj
    p = SimpleNamespace(
        in_norm=blk.input_layernorm, post_norm=blk.post_attention_layernorm, attn=a,
        w_a=_fuse_rows(first, a.kv_a_proj_with_mqa), b_a=_bias(first, a.kv_a_proj_with_mqa),
        q_split=first.weight.shape[0], moe=None, mlp=None,
        absorb=absorb_weights(a))
    if isinstance(blk.mlp, DeepSeekMoE):
        moe = blk.mlp
        p.moe = SimpleNamespace(gate=moe.gate, w13=stacked[0], w2=stacked[1], k=moe.topk, E=moe.n_experts,
                                shared=_mlp(moe.shared_experts) if moe.shared_experts is not None else None)
    else:
        p.mlp = _mlp(blk.mlp)
    return p


class FusedStep:
    """Decode / verify step over the paged latent cache for S (small) new tokens per row."""

    def __init__(self, model, stacked: dict[int, tuple[torch.Tensor, torch.Tensor]], gemv: bool = False,
                 gemv_rows: int = 4):
        self.m = model
        self.gemv = gemv  # compiled: projections of <= gemv_rows tokens as reductions (see above)
        self.gemv_rows = gemv_rows
        self.layers = [prepare_block(b, stacked.get(id(b.mlp))) for b in model.layers]
        self.mtp_layers = [prepare_block(md.block, stacked.get(id(md.block.mlp))) for md in model.mtp]
        self.absorb = {id(p.attn): p.absorb for p in self.layers + self.mtp_layers}

    # ---- primitives -----------------------------------------------------------------------
    def lin(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        if not self.gemv or x.numel() > self.gemv_rows * x.shape[-1]:
            return F.linear(x, w)
        rows = x.reshape(-1, x.shape[-1])
        wf, rf = (w, rows) if x.dtype == torch.float32 else (w.float(), rows.float())  # fp32 accumulation
        # one reduction per row over the same weight: Inductor fuses them into one loop that streams
        # w once for all rows (measured: 2 rows cost ~1.15x one row; a [R, out, in] product ~1.4x)
        y = torch.stack([(wf * rf[i]).sum(-1) for i in range(rf.shape[0])])
        return y.reshape(*x.shape[:-1], w.shape[0]).to(x.dtype)

    def swiglu(self, x, mlp) -> torch.Tensor:
        h = self.lin(x, mlp.w13)
        return self.lin(F.silu(h[..., : mlp.inter]) * h[..., mlp.inter:], mlp.w2)

    # ---- the step ---------------------------------------------------------------------------
    def __call__(self, ids, pos, write, read, mask, kv, real, last=None):
        """Main layers; logits at every position, or (last [B] given) at each row's last one."""
        m = self.m
        rope = m.rotary(pos)
        h = m.embed_tokens(ids)
        load = []
        for i, p in enumerate(self.layers):
            h = self.block(p, h, rope, kv[i], write, read, mask, real, load)
        return self.lin(m.norm(h if last is None else at_last(h, last)), m.lm_head.weight), h, load

    def mtp(self, k: int, h_prev, ids, pos, write, read, mask, kv_l, real, last=None):
        """MTP module k at these positions (§2.2 eq. 21-23): h' = M_k[enorm(Emb(t)); hnorm(h_prev)],
        one block over the module's own latent cache, logits through the shared head."""
        m, mod = self.m, self.m.mtp[k]
        x = self.lin(torch.cat([mod.enorm(m.embed_tokens(ids)), mod.hnorm(h_prev)], dim=-1), mod.eh_proj.weight)
        load: list = []
        x = self.block(self.mtp_layers[k], x, m.rotary(pos), kv_l, write, read, mask, real, load)
        return self.lin(mod.norm(x if last is None else at_last(x, last)), m.lm_head.weight), x, load

    def block(self, p, x, rope, kv_l, write, read, mask, real, load):
        x = x + self.attention(p, p.in_norm(x), rope, kv_l, write, read, mask)
        y = p.post_norm(x)
        return x + (self.moe(p.moe, y, real, load) if p.moe is not None else self.swiglu(y, p.mlp))

    def attention(self, p, x, rope, kv_l, write, read, mask) -> torch.Tensor:
        a = p.attn
        B, S, _ = x.shape
        H, r, nope = a.n_heads, a.kv_lora_rank, a.nope
        z = self.lin(x, p.w_a)
        if p.b_a is not None:
            z = z + p.b_a
        qz, c_kv, k_pe = z.split([p.q_split, r, a.rope_dim], dim=-1)
        q = self.lin(a.q_a_layernorm(qz), a.q_b_proj.weight) if a.q_lora_rank else qz
        q = q.view(B, S, H, nope + a.rope_dim)
        q_nope, q_pe = q.split([nope, a.rope_dim], dim=-1)
        q_pe = apply_rope(q_pe, rope)
        k_pe = apply_rope(k_pe.unsqueeze(2), rope).squeeze(2)
        new = torch.cat([a.kv_a_layernorm(c_kv), k_pe], dim=-1).to(kv_l.dtype)
        kv_l.index_copy_(0, write, new.reshape(B * S, -1))
        return self.attention_absorbed(a, q_nope, q_pe, kv_l[read].to(x.dtype), mask)

    def attention_absorbed(self, a, q_nope, q_pe, kv, mask) -> torch.Tensor:
        return absorbed_attention(a, self.absorb[id(a)], q_nope, q_pe, kv, mask, self.lin, sdpa=not self.gemv)

    def moe(self, p, x, real, load) -> torch.Tensor:
        B, S, D = x.shape
        flat = x.reshape(-1, D)
        scores = self.lin(flat.float(), p.gate.weight)
        scores = scores.sigmoid() if p.gate.score_func == "sigmoid" else scores.softmax(dim=-1)
        weights, idx = p.gate.route(scores)  # [T,k] fp32, [T,k]
        T, k = idx.shape
        load.append(torch.zeros(p.E, device=x.device).index_add_(
            0, idx.flatten(), real.float().repeat_interleave(S * k)))  # padding rows count 0
        w = weights.to(x.dtype)
        I = p.w2.shape[-1]
        few = self.gemv and T <= self.gemv_rows  # compiled step of a few tokens: reductions stream each gather
        if T * k < p.E or few:  # gathered: each token streams its k experts
            w13, w2 = p.w13[idx], p.w2[idx]  # [T,k,2I,D], [T,k,D,I]
            if few:
                h = _gathered_gemv(flat[:, None, :], w13)
                y = _gathered_gemv(F.silu(h[..., :I]) * h[..., I:], w2)
            else:
                h = torch.matmul(w13, flat[:, None, :, None]).squeeze(-1)  # [T,k,2I]
                y = torch.matmul(w2, (F.silu(h[..., :I]) * h[..., I:])[..., None]).squeeze(-1)  # [T,k,D]
            y = (y * w[..., None]).sum(1)
        else:  # dense: every expert on every token, zero gate off the top-k
            E, I2, _ = p.w13.shape
            h = F.linear(flat, p.w13.view(E * I2, D)).view(T, E, I2)  # a GEMM reads each expert once
            a = (F.silu(h[..., :I]) * h[..., I:]).transpose(0, 1)  # [E,T,I]
            ye = torch.bmm(a, p.w2.transpose(1, 2))  # [E,T,D]
            g = torch.zeros(T, E, dtype=x.dtype, device=x.device).scatter_(1, idx, w)
            y = (ye * g.t()[..., None]).sum(0)
        y = y.view(B, S, D)
        return y if p.shared is None else y + self.swiglu(x, p.shared)


def at_last(h: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """h [B,S,D] at column last[b] of each row -> [B,1,D] (a static-shape gather)."""
    return h.gather(1, last[:, None, None].expand(-1, 1, h.shape[-1]))


def _gathered_gemv(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [T,k,in] (or [T,1,in]) times gathered weights w [T,k,out,in] -> [T,k,out], as a reduction."""
    if x.dtype == torch.float32:
        return (w * x[..., None, :]).sum(-1)
    return (w.float() * x.float()[..., None, :]).sum(-1).to(x.dtype)
