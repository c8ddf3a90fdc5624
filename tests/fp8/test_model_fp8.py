"""convert_to_fp8 on the dsv3 model (tiny preset): what is converted, and training numerics."""

import pytest
import torch

from dsv3 import DeepSeekV3, ModelConfig
from dsv3.fp8.linear import FP8Linear, convert_to_fp8


def _markov_stream(vocab, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    nxt = torch.randint(0, vocab, (vocab, 4), generator=g)  # each token has 4 likely successors
    pick = torch.randint(0, 4, (n,), generator=g)
    out = torch.empty(n, dtype=torch.long)
    t = 0
    for i in range(n):
        out[i] = t
        t = int(nxt[t, pick[i]])
    return out


def _model(seed=0):
    torch.manual_seed(seed)
    return DeepSeekV3(ModelConfig.preset("tiny"))


def test_converted_layers_follow_the_paper():
    m = _model()
    done = set(convert_to_fp8(m))
    assert done, "nothing converted"
    for name, mod in m.named_modules():
        leaf = name.split(".")[-1]
        if isinstance(mod, torch.nn.Linear) and ("head" in leaf or leaf == "gate" or "embed" in leaf):
            assert type(mod) is torch.nn.Linear, name
    assert any(n.endswith("experts.0.gate_proj") for n in done)  # expert FFNs are FP8
    assert any(n.endswith("self_attn.q_a_proj") for n in done)  # attention projections too
    assert not any(n.endswith(".gate") or "lm_head" in n for n in done)
    assert all(isinstance(m.get_submodule(n), FP8Linear) for n in done)
    assert all(p.dtype == torch.float32 for p in m.parameters())  # FP32 master weights


def test_tiny_model_fp8_training_tracks_bf16():
    cfg = ModelConfig.preset("tiny")
    B, S, steps = 4, 32, 12
    data = _markov_stream(64, steps * B * S + 1)  # 64 of the 512 ids: learnable fast
    losses = {}
    for mode in ("bf16", "fp8"):
        m = _model()
        if mode == "fp8":
            convert_to_fp8(m)
        opt = torch.optim.AdamW(m.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
        hist = []
        for s in range(steps):
            ids = data[s * B * S:(s + 1) * B * S].view(B, S)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = m(ids, labels=ids)
            opt.zero_grad()
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
            opt.step()
            hist.append(out.main_loss.item())
        losses[mode] = hist
    b, f = losses["bf16"], losses["fp8"]
    assert all(torch.isfinite(torch.tensor(f)))
    assert b[-1] < b[0] - 0.5 and f[-1] < f[0] - 0.5  # both learn
    assert abs(f[0] - b[0]) / b[0] < 0.01  # same init: the first forward differs only by FP8 error
    gap = abs(sum(f[-3:]) - sum(b[-3:])) / sum(b[-3:])
    assert gap < 0.02, (b, f)
