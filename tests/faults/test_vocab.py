"""A tokenizer that does not match the model's vocabulary, where a model and a
tokenizer (or token shards) meet: the lm-eval adapter (`dsv3 eval`, `lm_eval --model dsv3`),
post-training's checkpoint loader, and token shards against a model config (what training
checks). Each stops with a ConfigError naming both sides and both sizes; nothing is written."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from dsv3 import ModelConfig
from dsv3.data.tokenizer import check_vocab
from dsv3.model.config import ConfigError
from tests.data.conftest import prose

SPECIAL = ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜fim▁hole｜>", "<｜fim▁begin｜>",
           "<｜fim▁end｜>", "<｜User｜>", "<｜Assistant｜>", "<｜pad｜>"]


def _tokenizer(out: Path, vocab_size: int, special=SPECIAL):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([prose(i, 400) for i in range(30)], trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=special, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=SPECIAL[0], eos_token=SPECIAL[1],
                                   pad_token=SPECIAL[-1], clean_up_tokenization_spaces=False)
    fast.save_pretrained(out)
    return fast


def _ckpt(d: Path, tok_vocab: int, special=SPECIAL) -> Path:
    import torch

    from dsv3 import DeepSeekV3

    torch.manual_seed(0)
    DeepSeekV3(ModelConfig.preset("tiny")).save_pretrained(d)  # vocab_size 512, bos 0, eos 1
    _tokenizer(d, tok_vocab, special)
    return d


def _digest(d: Path) -> str:
    return hashlib.sha256(b"".join(p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file())).hexdigest()


def test_check_vocab_rules(tmp_path):
    cfg = ModelConfig.preset("tiny")
    check_vocab(512, cfg)
    check_vocab(300, cfg)  # a padded vocabulary is fine (DeepSeek-V3: 128K tokenizer, 129280 rows)
    with pytest.raises(ConfigError, match=r"tokenizer t.json has 600 tokens but model m has vocab_size 512 "
                                          r"\(ids 512\.\.599"):
        check_vocab(600, cfg, tokenizer_name="t.json", model_name="m")
    tok = _tokenizer(tmp_path / "tok", 400, [SPECIAL[1], SPECIAL[0], *SPECIAL[2:]])  # EOS and BOS swapped
    with pytest.raises(ConfigError, match=r"has bos_token_id 1 but the model has bos_token_id 0"):
        check_vocab(tok, cfg)
    with pytest.raises(ConfigError, match=r"has bos_token_id 1"):
        check_vocab(tok.backend_tokenizer, cfg)  # the bare `tokenizers` object the shard packer uses


def test_shards_against_model_config(tmp_path):
    from dsv3.data.shards import TokenShards, write_split

    write_split(tmp_path / "sh", "train", [[0, 5, 70000, 1]], 70001)
    sh = TokenShards(tmp_path / "sh", "train")
    with pytest.raises(ConfigError, match=rf"tokenizer shards {tmp_path / 'sh'} has 70001 tokens but the model "
                                          r"has vocab_size 512"):
        check_vocab(sh, ModelConfig.preset("tiny"))
    check_vocab(sh, ModelConfig.preset("tiny", vocab_size=70400))


@pytest.mark.timeout(300)
def test_eval_adapter_refuses_a_bigger_tokenizer(tmp_path):
    import lm_eval
    from lm_eval.tasks import TaskManager

    import dsv3.evals  # noqa: F401  (registers the "dsv3" model)
    from dsv3.evals.adapter import DSV3LM
    from dsv3.evals.tasks import TASK_DIR

    d = _ckpt(tmp_path / "ckpt", 700)
    assert len(_tokenizer(tmp_path / "probe", 700)) > 512
    before = _digest(d)
    with pytest.raises(ConfigError, match=rf"tokenizer {d} has \d+ tokens but model {d} has vocab_size 512"):
        DSV3LM(str(d))
    with pytest.raises(ConfigError, match="vocab mismatch"):  # as `lm_eval --model dsv3` loads it
        lm_eval.simple_evaluate(model="dsv3", model_args={"pretrained": str(d)}, tasks=["dsv3_humaneval"],
                                task_manager=TaskManager(include_path=str(TASK_DIR), include_defaults=False))
    assert _digest(d) == before


@pytest.mark.timeout(300)
def test_posttrain_loader_refuses_swapped_special_tokens(tmp_path):
    from dsv3.posttrain.stages import load_model

    d = _ckpt(tmp_path / "ckpt", 400, [SPECIAL[1], SPECIAL[0], *SPECIAL[2:]])
    with pytest.raises(ConfigError, match=rf"tokenizer {d} has bos_token_id 1 but model {d} has bos_token_id 0"):
        load_model(str(d))
    ok = _ckpt(tmp_path / "ok", 400)
    model, tok, _ = load_model(str(ok))
    assert len(tok) <= model.config.vocab_size
