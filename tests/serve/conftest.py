"""Fixtures: a tiny random dsv3 checkpoint (with its MTP module) saved with save_pretrained,
and a byte-level BPE tokenizer trained here with dsv3.data.tokenizer on a few strings."""

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CORPUS = [
    "The quick brown fox jumps over the lazy dog. ",
    "Question: What is the capital of France?\nA. Paris\nB. Rome\nC. Berlin\nD. Madrid\nAnswer: A",
    "The following are multiple choice questions (with answers) about anatomy.",
    "def add(a, b):\n    return a + b\n",
    "Hello, how are you today? I am fine, thank you very much!",
    "Serving models with continuous batching and speculative decoding.",
] * 30


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    import torch

    torch.set_num_threads(1)  # 2 shared cores


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    import torch

    from dsv3 import DeepSeekV3, ModelConfig
    from dsv3.data.config import TokenizerConfig
    from dsv3.data.tokenizer import load_tokenizer, train_tokenizer

    out = tmp_path_factory.mktemp("tiny_model")
    train_tokenizer(CORPUS, out, TokenizerConfig(vocab_size=512, min_frequency=1))
    vocab = len(load_tokenizer(out))
    torch.manual_seed(0)
    cfg = ModelConfig.preset("tiny", initializer_range=0.1, vocab_size=vocab)
    DeepSeekV3(cfg).save_pretrained(out)
    return out


@pytest.fixture
def loaded(tiny_dir):
    """(model, tokenizer, dir, info) freshly loaded (the engine re-points expert weights)."""
    from dsv3.serve.server import load_served_model

    return load_served_model(str(tiny_dir))


def counting_batch(g, batch: int = 16, length: int = 48):
    """Arithmetic progressions (stride 1 or 2) over token ids 100..163: predictable two tokens ahead."""
    import torch

    start = torch.randint(0, 64, (batch, 1), generator=g)
    stride = torch.randint(1, 3, (batch, 1), generator=g)
    return 100 + (start + stride * torch.arange(length)) % 64


@pytest.fixture(scope="session")
def trained_dir(tiny_dir, tmp_path_factory) -> Path:
    """The tiny model trained briefly (main + MTP losses) on counting sequences, so that its MTP
    module drafts tokens the main model accepts: speculation runs its accept and reject paths."""
    import shutil

    import torch

    from dsv3 import DeepSeekV3

    out = tmp_path_factory.mktemp("trained_model")
    torch.manual_seed(0)
    m = DeepSeekV3.from_pretrained(tiny_dir).train()
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(70):
        ids = counting_batch(g)
        m(ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
        m.update_bias(1e-3)
    m.save_pretrained(out)
    for f in tiny_dir.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, out / f.name)
    return out
