"""Fixtures for post-training tests: a tiny BPE chat tokenizer (vocab 512) trained on the
generated SFT data, and a tiny dsv3 model whose vocabulary matches it."""

import pytest
import torch

from dsv3.data.chat import build_chat_tokenizer
from dsv3.posttrain.config import DataGenConfig
from dsv3.posttrain.sft_data import build_sft_dataset


# tiny models: one intra-op thread is as fast and does not spin on a shared, loaded CPU
torch.set_num_threads(1)


def corpus():
    recs = build_sft_dataset(DataGenConfig(n_arithmetic=400, n_algebra=100, n_code=40, seed=123))
    return [r["prompt"] + "\n" + r["response"] for r in recs]


@pytest.fixture(scope="session")
def tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    build_chat_tokenizer(corpus(), vocab_size=512, out_dir=d)
    return d


@pytest.fixture(scope="session")
def tok(tok_dir):
    from dsv3.data.chat import load_tokenizer

    return load_tokenizer(tok_dir)


def tiny_model(tok, seed=0, **kw):
    from dsv3 import DeepSeekV3, ModelConfig

    torch.manual_seed(seed)
    kw = {"vocab_size": len(tok), "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
          "pad_token_id": tok.pad_token_id, **kw}
    cfg = ModelConfig.preset("tiny", **kw)
    return DeepSeekV3(cfg)


@pytest.fixture(scope="session")
def sft_result(tok, tmp_path_factory):
    """A tiny model SFT'd (briefly: format learnt, sums only partly) on the built-in a+b task."""
    from dsv3.posttrain.config import SFTConfig
    from dsv3.posttrain.grpo import arithmetic_task
    from dsv3.posttrain.sft import train_sft

    probs = arithmetic_task(300, seed=0, max_operand=4)
    m = tiny_model(tok)
    out = tmp_path_factory.mktemp("sft") / "ckpt"
    logged = []
    res = train_sft(m, tok, probs[:200], probs[200:230],
                    SFTConfig(max_steps=70, epochs=10, batch_size=16, lr=3e-3, warmup_steps=5, eval_every=35),
                    out_dir=out, log=lambda d, s: logged.append((s, d)))
    return {"model": m, "res": res, "ckpt": out, "logged": logged}
