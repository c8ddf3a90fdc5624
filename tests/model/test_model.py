import pytest
import torch

from dsv3 import DeepSeekV3, ModelConfig
from dsv3.model.hf import CheckpointError
from dsv3.model.moe import DeepSeekMoE, Gate
from dsv3.model.rope import apply_rope, softmax_scale


def _model(seed=0, **kw):
    torch.manual_seed(seed)
    return DeepSeekV3(ModelConfig.preset("tiny", **kw))


def test_forward_shapes_and_losses():
    m = _model()
    x = torch.randint(0, 512, (2, 24))
    out = m(x, labels=x)
    assert out.logits.shape == (2, 24, 512)
    assert len(out.mtp_logits) == 1 and out.mtp_logits[0].shape == (2, 23, 512)
    lam = m.mtp_loss_weight
    expect = out.main_loss + lam * out.mtp_losses[0] + out.balance_loss
    assert torch.allclose(out.loss, expect)
    assert out.balance_loss.item() > 0
    out.loss.backward()
    assert m.mtp[0].eh_proj.weight.grad is not None
    # inference: no MTP work, no loss
    assert m(x).mtp_logits == [] and m(x).loss is None


def test_mtp_targets_are_shifted_by_depth():
    """Depth-1 MTP at position i predicts token i+2: train it on a sequence where that is
    deterministic and check the loss uses exactly that alignment."""
    m = _model()
    x = torch.randint(0, 512, (1, 12))
    out = m(x, labels=x)
    lg = out.mtp_logits[0]  # [1, 11, V], position i -> t_{i+2}
    ref = torch.nn.functional.cross_entropy(lg[0, :10], x[0, 2:12])
    assert torch.allclose(out.mtp_losses[0], ref)


def test_mtp_shares_embedding_and_head():
    m = _model()
    names = [n for n, _ in m.named_parameters()]
    assert not any("mtp" in n and ("embed" in n or "lm_head" in n) for n in names)
    # dropping the modules leaves the main path unchanged
    x = torch.randint(0, 512, (1, 10))
    a = m(x).logits
    m.mtp = torch.nn.ModuleList()
    assert torch.equal(a, m(x).logits)


def test_absorbed_cache_path_matches_training_path():
    m = _model(rope_scaling=dict(type="yarn", factor=4.0, original_max_position_embeddings=128,
                                 beta_fast=32, beta_slow=1, mscale=1.0, mscale_all_dim=1.0)).eval()
    x = torch.randint(0, 512, (2, 30))
    full = m(x).logits
    cache = m.new_cache(2, 30)
    a = m.forward_step(x[:, :17], cache)
    b = [m.forward_step(x[:, i:i + 1], cache) for i in range(17, 30)]
    stepped = torch.cat([a] + b, dim=1)
    assert (full - stepped).abs().max() < 1e-4
    assert cache.bytes_per_token() == 3 * (32 + 8) * 4  # latent + rope key, fp32, per layer


def test_greedy_generate_equals_stepwise_argmax():
    m = _model(1).eval()
    x = torch.randint(0, 512, (1, 7))
    got = m.generate(x, max_new_tokens=8)
    seq = x
    for _ in range(8):
        nxt = m(seq).logits[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], 1)
    assert torch.equal(got, seq)


def test_batched_left_padded_generate_matches_single():
    m = _model(2).eval()
    p1 = torch.randint(3, 512, (1, 9))
    p2 = torch.randint(3, 512, (1, 4))
    batch = torch.zeros(2, 9, dtype=torch.long)
    mask = torch.zeros(2, 9, dtype=torch.long)
    batch[0], mask[0] = p1[0], 1
    batch[1, 5:], mask[1, 5:] = p2[0], 1
    got = m.generate(batch, 6, attention_mask=mask)
    assert torch.equal(got[0, 9:], m.generate(p1, 6)[0, 9:])
    assert torch.equal(got[1, 9:], m.generate(p2, 6)[0, 4:])


def test_generate_stops_at_eos_and_samples():
    m = _model(3).eval()
    x = torch.randint(0, 512, (2, 5))
    g = m.generate(x, 5)
    eos = int(g[0, 6])  # the second generated token of row 0 becomes EOS
    out = m.generate(x, 5, eos_token_id=eos)
    row = out[0, 5:]
    first = (row == eos).nonzero()[0].item()
    assert (row[first:] == eos).all()
    s1 = m.generate(x, 4, temperature=1.0, top_p=0.9, generator=torch.Generator().manual_seed(0))
    s2 = m.generate(x, 4, temperature=1.0, top_p=0.9, generator=torch.Generator().manual_seed(0))
    assert torch.equal(s1, s2)


def test_gate_bias_selects_but_never_weights():
    cfg = ModelConfig.preset("tiny", n_group=1, topk_group=1)
    g = Gate(cfg)
    scores = torch.rand(5, 8)
    w0, i0 = g.route(scores)
    g.e_score_correction_bias[:] = torch.tensor([0, 0, 0, 0, 0, 0, 5.0, 5.0])
    w1, i1 = g.route(scores)
    assert set(i1[0].tolist()) == {6, 7}  # bias forces the choice...
    raw = scores.gather(1, i1)
    assert torch.allclose(w1, raw / raw.sum(-1, keepdim=True) * cfg.routed_scaling_factor)  # ...not the weights


def test_group_limited_routing_masks_groups():
    cfg = ModelConfig.preset("tiny")  # 8 experts, 4 groups of 2, top-2 groups
    g = Gate(cfg)
    g.e_score_correction_bias[:] = torch.tensor([-1.0, -1.0, 0, 0, 0, 0, 0, 0])  # negative biased scores
    scores = torch.rand(100, 8)
    _, idx = g.route(scores)
    groups = idx // 2
    assert (torch.tensor([len(set(r)) for r in groups.tolist()]) <= 2).all()
    assert not (idx < 2).any()  # group 0 never wins with its -1 bias (a 0-mask would be beaten by -inf)


def test_moe_dispatch_matches_dense_reference():
    cfg = ModelConfig.preset("tiny")
    torch.manual_seed(0)
    moe = DeepSeekMoE(cfg)
    for p in moe.parameters():
        torch.nn.init.normal_(p, 0, 0.1)
    x = torch.randn(2, 7, cfg.hidden_size)
    y = moe(x)
    flat = x.reshape(-1, cfg.hidden_size)
    w, idx = moe.gate(flat)
    ref = torch.stack([sum(w[t, j] * moe.experts[int(idx[t, j])](flat[t]) for j in range(idx.shape[1]))
                       for t in range(flat.shape[0])]).view_as(x) + moe.shared_experts(x)
    assert torch.allclose(y, ref, atol=1e-5)


def test_bias_update_balances_load():
    m = _model()
    m.train()
    x = torch.randint(0, 512, (4, 32))
    m(x)
    load = m.expert_load()
    # 2 MoE layers in the trunk + 1 in the MTP block (idle without labels); top-2 routing
    assert load.shape == (3, 8) and load[:2].sum(1).eq(4 * 32 * 2).all() and load[2].sum() == 0
    before = [l.gate.e_score_correction_bias.clone() for l in m.moe_layers()]
    m.update_bias(0.01)
    for b, layer, ld in zip(before, m.moe_layers(), load):
        expect = b + 0.01 * torch.sign(ld.mean() - ld)
        assert torch.allclose(layer.gate.e_score_correction_bias, expect)
        assert layer.gate.load.sum() == 0
    assert all(b.dtype == torch.float32 for b in m.to(torch.bfloat16).expert_load())
    assert "e_score_correction_bias" not in " ".join(n for n, _ in m.named_parameters())


def test_rope_interleaved_pairs_and_yarn_scale():
    x = torch.zeros(1, 1, 1, 4)
    x[..., 0] = 1.0  # pair (x0, x1) = (1, 0)
    ang = torch.tensor([[0.5, 0.0]])
    rope = (ang.cos()[None, :, None], ang.sin()[None, :, None])
    y = apply_rope(x, rope)
    assert torch.allclose(y[0, 0, 0], torch.tensor([0.5 ** 0 * torch.cos(torch.tensor(0.5)),
                                                    torch.sin(torch.tensor(0.5)), 0, 0]))
    cfg = ModelConfig.preset("v3")
    m = 0.1 * 1.0 * torch.log(torch.tensor(40.0)).item() + 1
    assert softmax_scale(cfg) == pytest.approx(cfg.qk_head_dim ** -0.5 * m * m)


def test_bf16_forward_backward():
    m = _model().to(torch.bfloat16)
    x = torch.randint(0, 512, (2, 16))
    out = m(x, labels=x)
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.loss)
    out.loss.backward()


def test_bad_checkpoints(tmp_path):
    m = _model()
    m.save_pretrained(tmp_path / "ok")
    from safetensors.torch import load_file, save_file
    sd = load_file(tmp_path / "ok" / "model.safetensors")
    # wrong shape
    bad = dict(sd)
    bad["model.layers.0.self_attn.o_proj.weight"] = torch.zeros(3, 3)
    (tmp_path / "shape").mkdir()
    save_file(bad, tmp_path / "shape" / "model.safetensors")
    (tmp_path / "shape" / "config.json").write_text((tmp_path / "ok" / "config.json").read_text())
    with pytest.raises(CheckpointError, match="o_proj.weight has shape"):
        DeepSeekV3.from_pretrained(tmp_path / "shape")
    # missing + unexpected
    bad = dict(sd)
    bad.pop("model.norm.weight")
    bad["model.extra.weight"] = torch.zeros(1)
    (tmp_path / "miss").mkdir()
    save_file(bad, tmp_path / "miss" / "model.safetensors")
    (tmp_path / "miss" / "config.json").write_text((tmp_path / "ok" / "config.json").read_text())
    with pytest.raises(CheckpointError, match="missing tensors: \\['model.norm.weight'\\].*unexpected.*extra"):
        DeepSeekV3.from_pretrained(tmp_path / "miss")
    # truncated file
    (tmp_path / "trunc").mkdir()
    raw = (tmp_path / "ok" / "model.safetensors").read_bytes()
    (tmp_path / "trunc" / "model.safetensors").write_bytes(raw[: len(raw) // 2])
    (tmp_path / "trunc" / "config.json").write_text((tmp_path / "ok" / "config.json").read_text())
    with pytest.raises(CheckpointError, match="unreadable"):
        DeepSeekV3.from_pretrained(tmp_path / "trunc")
    # pickles are refused
    (tmp_path / "pkl").mkdir()
    torch.save({}, tmp_path / "pkl" / "pytorch_model.bin")
    (tmp_path / "pkl" / "config.json").write_text((tmp_path / "ok" / "config.json").read_text())
    with pytest.raises(CheckpointError, match="safetensors only"):
        DeepSeekV3.from_pretrained(tmp_path / "pkl")


def test_sharded_and_fp8_checkpoints(tmp_path):
    m = _model(4)
    m.save_pretrained(tmp_path / "sh", max_shard_bytes=200_000)
    assert (tmp_path / "sh" / "model.safetensors.index.json").exists()
    back = DeepSeekV3.from_pretrained(tmp_path / "sh")
    x = torch.randint(0, 512, (1, 9))
    assert torch.equal(back(x).logits, m(x).logits)
    # DeepSeek-style FP8 release: weight in e4m3 + weight_scale_inv per 128x128 block
    from safetensors.torch import load_file, save_file
    import json
    shards = sorted((tmp_path / "sh").glob("model-*.safetensors"))
    assert len(shards) > 1
    sd = {}
    for f in shards:
        sd.update(load_file(f))
    name = "model.layers.0.mlp.gate_proj.weight"  # [128, 64]
    w = sd[name]
    scale = w.abs().amax().clamp(min=1e-4) / 448
    sd[name] = (w / scale).to(torch.float8_e4m3fn)
    sd[name.replace("weight", "weight_scale_inv")] = scale.reshape(1, 1).float()
    (tmp_path / "fp8").mkdir()
    save_file(sd, tmp_path / "fp8" / "model.safetensors")
    cfg = json.loads((tmp_path / "sh" / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [128, 128]}
    (tmp_path / "fp8" / "config.json").write_text(json.dumps(cfg))
    q = DeepSeekV3.from_pretrained(tmp_path / "fp8", dtype=torch.float32)
    got = q.layers[0].mlp.gate_proj.weight
    assert not torch.equal(got, w) and (got - w).abs().max() <= (w.abs().max() * 0.07)
