"""Parity with transformers' DeepseekV3 on random checkpoints, both directions."""

import pytest
import torch

from dsv3 import DeepSeekV3, ModelConfig

transformers = pytest.importorskip("transformers")

BASE = dict(vocab_size=256, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
            num_hidden_layers=3, first_k_dense_replace=1, num_attention_heads=4, q_lora_rank=32,
            kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
            n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=4, topk_group=2,
            routed_scaling_factor=2.5, max_position_embeddings=256, num_nextn_predict_layers=0)

CASES = {
    "q_lora_groups": {},
    "no_q_lora": dict(q_lora_rank=0),
    "one_group_two_dense": dict(n_group=1, topk_group=1, first_k_dense_replace=2),
    "yarn": dict(max_position_embeddings=1024, rope_scaling=dict(
        type="yarn", factor=4.0, original_max_position_embeddings=256, beta_fast=32, beta_slow=1,
        mscale=0.707, mscale_all_dim=0.707)),
    "yarn_v3_mscale": dict(max_position_embeddings=1024, rope_scaling=dict(
        type="yarn", factor=8.0, original_max_position_embeddings=128, beta_fast=32, beta_slow=1,
        mscale=1.0, mscale_all_dim=1.0)),
}


def _hf_model(cfg: ModelConfig, seed: int = 0):
    d = cfg.to_hf()
    d.pop("architectures"), d.pop("model_type"), d.pop("torch_dtype")
    hc = transformers.DeepseekV3Config(**d)
    torch.manual_seed(seed)
    m = transformers.DeepseekV3ForCausalLM(hc).eval()
    with torch.no_grad():  # HF initialises the correction bias to zero: make routing use it
        for layer in m.model.layers:
            if hasattr(layer.mlp, "gate"):
                layer.mlp.gate.e_score_correction_bias.normal_(0, 0.05)
    return m


@pytest.mark.parametrize("case", sorted(CASES))
def test_from_pretrained_matches_transformers(case, tmp_path):
    cfg = ModelConfig.make(**{**BASE, **CASES[case]})
    hf = _hf_model(cfg)
    hf.save_pretrained(tmp_path / "hf")
    ours = DeepSeekV3.from_pretrained(tmp_path / "hf").eval()
    assert ours.config.rope_scaling == cfg.rope_scaling or not cfg.rope_scaling
    ids = torch.randint(0, cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids).logits
        got = ours(ids).logits
    assert (ref - got).abs().max().item() < 1e-4


@pytest.mark.parametrize("case", ["q_lora_groups", "yarn"])
def test_transformers_loads_our_checkpoint(case, tmp_path):
    cfg = ModelConfig.make(**{**BASE, **CASES[case], "num_nextn_predict_layers": 1})
    torch.manual_seed(3)
    ours = DeepSeekV3(cfg).eval()
    with torch.no_grad():
        for m in ours.moe_layers():
            m.gate.e_score_correction_bias.normal_(0, 0.05)
    ours.save_pretrained(tmp_path / "ours")
    hf = transformers.DeepseekV3ForCausalLM.from_pretrained(tmp_path / "ours").eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 33), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        diff = (hf(ids).logits - ours(ids).logits).abs().max().item()
    assert diff < 1e-4
    # and our own round trip keeps the MTP module
    back = DeepSeekV3.from_pretrained(tmp_path / "ours")
    assert len(back.mtp) == 1
    for (k, a), (_, b) in zip(ours.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a, b), k


def test_padded_batch_matches_transformers(tmp_path):
    cfg = ModelConfig.make(**BASE)
    hf = _hf_model(cfg, seed=5)
    hf.save_pretrained(tmp_path / "hf")
    ours = DeepSeekV3.from_pretrained(tmp_path / "hf").eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 20))
    mask = torch.ones(2, 20, dtype=torch.long)
    mask[1, 14:] = 0  # right padding
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask).logits
        got = ours(ids, attention_mask=mask).logits
    assert (ref[0] - got[0]).abs().max() < 1e-4
    assert (ref[1, :14] - got[1, :14]).abs().max() < 1e-4
