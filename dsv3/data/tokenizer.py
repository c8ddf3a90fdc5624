"""Byte-level BPE tokenizer trained with `tokenizers` (DeepSeek-V3 §4.1: byte-level BPE).

The paper's tokenizer is byte-level BPE (128K vocabulary) with pre-tokenization that mixes
punctuation and line breaks; here `tokenizers`' ByteLevel pre-tokenizer (GPT-2 regex, no
prefix space) and a configurable vocabulary (`tokenizer.vocab_size`) trained on the train
split only. DeepSeek-style special tokens (docs/CONTRACTS.md) take the first ids, so BOS = 0,
EOS = 1. Saved as `tokenizer.json` + `tokenizer_config.json` + `special_tokens_map.json`,
loadable by `transformers.PreTrainedTokenizerFast`; `load_tokenizer` sets bos/eos/pad.

`check_vocab(tokenizer, model_config)` is the one check that a tokenizer (or token shards)
belongs with a model, called wherever the two meet: every id the tokenizer can emit must have
an embedding row (tokenizer size <= model vocab_size; smaller is fine: DeepSeek-V3 pads its
128K tokenizer to vocab_size 129280), and BOS/EOS must be the ids the model was trained with.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Iterable

from dsv3.data.config import TokenizerConfig
from dsv3.data.normalize import SPECIAL_TOKENS
from dsv3.model.config import ConfigError

BOS, EOS, PAD = SPECIAL_TOKENS[0], SPECIAL_TOKENS[1], SPECIAL_TOKENS[-1]


def train_tokenizer(texts: Iterable[str], out_dir: str | Path, cfg: TokenizerConfig) -> Counter:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=cfg.vocab_size, min_frequency=cfg.min_frequency,
                                  special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    stats = Counter()

    def it():
        for i, t in enumerate(texts):
            if cfg.max_train_docs and i >= cfg.max_train_docs:
                return
            stats["train_docs"] += 1
            stats["train_bytes"] += len(t.encode("utf-8"))
            yield t

    tok.train_from_iterator(it(), trainer=trainer)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    conf = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": EOS, "pad_token": PAD,
            "additional_special_tokens": SPECIAL_TOKENS[2:7], "add_bos_token": False, "add_eos_token": False,
            "model_max_length": 1_000_000, "clean_up_tokenization_spaces": False}
    (out / "tokenizer_config.json").write_text(json.dumps(conf, indent=1, ensure_ascii=False))
    (out / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD, "additional_special_tokens": SPECIAL_TOKENS[2:7]},
        indent=1, ensure_ascii=False))
    stats["vocab_size"] = tok.get_vocab_size()
    return stats


def load_tokenizer(path_or_dir: str | Path):
    """A `transformers.PreTrainedTokenizerFast` with bos/eos/pad set (docs/CONTRACTS.md)."""
    from transformers import PreTrainedTokenizerFast

    p = Path(path_or_dir)
    f = p / "tokenizer.json" if p.is_dir() else p
    if not f.is_file():
        raise FileNotFoundError(f"no tokenizer.json at {p}")
    return PreTrainedTokenizerFast(tokenizer_file=str(f), bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   additional_special_tokens=SPECIAL_TOKENS[2:7], clean_up_tokenization_spaces=False)


def load_raw(path_or_dir: str | Path):
    """The bare `tokenizers.Tokenizer` (fast batch encoding for the packer)."""
    from tokenizers import Tokenizer

    p = Path(path_or_dir)
    return Tokenizer.from_file(str(p / "tokenizer.json" if p.is_dir() else p))


def _ids(tok) -> tuple[int, int | None, int | None, str | None]:
    """(size, bos id, eos id, name) of a transformers tokenizer, a `tokenizers.Tokenizer`,
    token shards (`TokenShards` or a shard index dict) or a bare vocabulary size."""
    if isinstance(tok, int):
        return tok, None, None, None
    if isinstance(tok, dict) and "vocab_size" in tok:  # shards index.json
        return int(tok["vocab_size"]), tok.get("bos_id"), tok.get("eos_id"), None
    from dsv3.data.shards import TokenShards

    if isinstance(tok, TokenShards):
        n, b, e, _ = _ids(tok.index)
        return n, b, e, f"shards {tok.path.parent}"
    if hasattr(tok, "get_vocab_size") and hasattr(tok, "token_to_id"):  # tokenizers.Tokenizer
        return tok.get_vocab_size(with_added_tokens=True), tok.token_to_id(BOS), tok.token_to_id(EOS), None
    return len(tok), tok.bos_token_id, tok.eos_token_id, getattr(tok, "name_or_path", None) or None


def check_vocab(tokenizer, model_config, *, tokenizer_name: str | None = None, model_name: str | None = None) -> None:
    """Raise ConfigError (naming both sides and both sizes) unless `tokenizer` fits the model.

    `tokenizer`: see `_ids`; `model_config`: a ModelConfig, HF config or a model (its `.config`)."""
    cfg = getattr(model_config, "config", model_config)
    V = int(cfg.vocab_size)
    n, bos, eos, name = _ids(tokenizer)
    tname = f"tokenizer {tokenizer_name or name}" if (tokenizer_name or name) else "the tokenizer"
    mname = f"model {model_name}" if model_name else "the model"
    if n > V:
        raise ConfigError(f"vocab mismatch: {tname} has {n} tokens but {mname} has vocab_size {V} "
                          f"(ids {V}..{n - 1} have no embedding row): they do not belong together")
    for what, mine, theirs in (("bos_token_id", bos, getattr(cfg, "bos_token_id", None)),
                               ("eos_token_id", eos, getattr(cfg, "eos_token_id", None))):
        if mine is not None and theirs is not None and int(mine) != int(theirs):
            raise ConfigError(f"vocab mismatch: {tname} has {what} {mine} but {mname} has {what} {theirs} "
                              f"(vocab sizes {n} and {V}): they do not belong together")
