import json

import pytest

from dsv3 import ConfigError, ModelConfig


def test_presets_sizes():
    tiny = ModelConfig.preset("tiny")
    assert tiny.num_params(include_mtp=True) < 1_000_000
    small = ModelConfig.preset("small")
    assert 20e6 <= small.num_params() <= 60e6 and small.n_routed_experts >= 8
    v2 = ModelConfig.preset("v2-lite")
    assert v2.scoring_func == "softmax" and v2.q_lora_rank == 0
    assert 15e9 < v2.num_params() < 16.5e9


def test_v3_counts_from_shapes():
    v3 = ModelConfig.preset("v3")
    total, act = v3.num_params(), v3.num_params(activated=True)
    assert abs(total / 1e9 - 671) < 2, total
    assert abs(act / 1e9 - 37) < 1, act
    # HF release (MTP + its embedding/head copies) is 685B
    with_mtp = v3.num_params(include_mtp=True) + 2 * v3.vocab_size * v3.hidden_size
    assert abs(with_mtp / 1e9 - 685) < 2
    # training FLOPs per token: 6N rule of thumb on activated params, plus attention
    f = v3.flops_per_token(4096)
    assert 6 * 36e9 < f < 6 * 60e9


@pytest.mark.parametrize("kw,field", [
    (dict(topk_group=5), "topk_group"),
    (dict(n_routed_experts=10), "n_group"),
    (dict(qk_rope_head_dim=7), "qk_rope_head_dim"),
    (dict(num_experts_per_tok=9, n_routed_experts=8), "num_experts_per_tok"),
    (dict(hidden_sise=3), "hidden_sise"),
    (dict(scoring_func="relu"), "scoring_func"),
])
def test_bad_configs_name_the_field(kw, field):
    with pytest.raises(ConfigError, match=field):
        ModelConfig.preset("tiny", **kw)


def test_unknown_preset():
    with pytest.raises(ConfigError, match="unknown model preset"):
        ModelConfig.preset("huge")


def test_hf_round_trip(tmp_path):
    v3 = ModelConfig.preset("v3")
    d = v3.to_hf()
    assert d["model_type"] == "deepseek_v3" and d["q_lora_rank"] == 1536
    (tmp_path / "config.json").write_text(json.dumps(d))
    assert ModelConfig.from_hf(tmp_path) == v3
    lite = ModelConfig.preset("v2-lite")
    back = ModelConfig.from_hf(lite.to_hf())
    assert back.q_lora_rank == 0 and back == lite


def test_from_hf_errors(tmp_path):
    d = ModelConfig.preset("tiny").to_hf()
    with pytest.raises(ConfigError, match="frobnicate"):
        ModelConfig.from_hf({**d, "frobnicate": 1})
    d2 = dict(d)
    d2.pop("hidden_size")
    with pytest.raises(ConfigError, match="hidden_size"):
        ModelConfig.from_hf(d2)
    with pytest.raises(ConfigError, match="not a DeepSeek"):
        ModelConfig.from_hf({**d, "model_type": "llama"})
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.from_hf(tmp_path)


def test_official_v3_config_json_parses_to_the_v3_preset():
    """The keys of DeepSeek-V3's released config.json (transformers 4.33 era, FP8 quantization block)."""
    official = {
        "architectures": ["DeepseekV3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekV3Config"}, "aux_loss_alpha": 0.001,
        "bos_token_id": 0, "eos_token_id": 1, "ep_size": 1, "first_k_dense_replace": 3, "hidden_act": "silu",
        "hidden_size": 7168, "initializer_range": 0.02, "intermediate_size": 18432, "kv_lora_rank": 512,
        "max_position_embeddings": 163840, "model_type": "deepseek_v3", "moe_intermediate_size": 2048,
        "moe_layer_freq": 1, "n_group": 8, "n_routed_experts": 256, "n_shared_experts": 1,
        "norm_topk_prob": True, "num_attention_heads": 128, "num_experts_per_tok": 8, "num_hidden_layers": 61,
        "num_key_value_heads": 128, "num_nextn_predict_layers": 1, "pretraining_tp": 1, "q_lora_rank": 1536,
        "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
        "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                "weight_block_size": [128, 128]},
        "rms_norm_eps": 1e-06, "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0,
                                                "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096,
                                                "type": "yarn"},
        "rope_theta": 10000, "routed_scaling_factor": 2.5, "scoring_func": "sigmoid", "seq_aux": True,
        "tie_word_embeddings": False, "topk_group": 4, "topk_method": "noaux_tc", "torch_dtype": "bfloat16",
        "transformers_version": "4.33.1", "use_cache": True, "v_head_dim": 128, "vocab_size": 129280,
    }
    cfg = ModelConfig.from_hf(official)
    v3 = ModelConfig.preset("v3")
    assert cfg.replace(aux_loss_alpha=v3.aux_loss_alpha, initializer_range=v3.initializer_range) == v3
