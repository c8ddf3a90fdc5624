"""Chat format and loss masks (DeepSeek-V3 §5.1).

The template is DeepSeek-V3's:

    <｜begin▁of▁sentence｜>{system}<｜User｜>{user}<｜Assistant｜>{assistant}<｜end▁of▁sentence｜>

repeated `<｜User｜>…<｜Assistant｜>…<｜end▁of▁sentence｜>` for further turns.

Design choices
- Pieces are tokenised separately (special tokens by id, text with
  `add_special_tokens=False`) and concatenated, so the loss mask is exact: a label is
  kept only for the assistant's tokens and the EOS that closes each assistant turn
  (the model must learn to stop); system, user and role tokens are `-100`.
- `apply_chat_template(..., add_generation_prompt=True)` ends with `<｜Assistant｜>`
  for generation (GRPO rollouts, rejection sampling).
- `build_chat_tokenizer` trains a small byte-level BPE with the contract's special
  tokens; it is for tests and for a fresh model when no checkpoint tokenizer exists.
  Real runs use the checkpoint's tokenizer (`load_tokenizer`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from dsv3.data.normalize import SPECIAL_TOKENS  # the tokenizer contract (docs/CONTRACTS.md)
from dsv3.data.tokenizer import load_tokenizer  # noqa: F401  (the checkpoint's tokenizer, re-exported)

BOS, EOS, *FIM, USER, ASSISTANT, PAD = SPECIAL_TOKENS
IGNORE = -100


def render(messages: list[dict], add_generation_prompt: bool = False) -> str:
    """The chat template as a string (for display and for string-level round trips)."""
    out = [BOS]
    for m in messages:
        role, content = m["role"], m["content"]
        if role == "system":
            out.append(content)
        elif role == "user":
            out.append(USER + content)
        elif role == "assistant":
            out.append(ASSISTANT + content + EOS)
        else:
            raise ValueError(f"unknown chat role {role!r}")
    if add_generation_prompt:
        out.append(ASSISTANT)
    return "".join(out)


def _special_id(tok, t: str) -> int:
    i = tok.convert_tokens_to_ids(t)
    if i is None or (tok.unk_token_id is not None and i == tok.unk_token_id and t != tok.unk_token):
        raise ValueError(f"tokenizer lacks the special token {t!r}")
    return int(i)


def encode_chat(tok, messages: list[dict], add_generation_prompt: bool = False) -> tuple[list[int], list[int]]:
    """Token ids and labels (assistant tokens + their EOS kept, everything else -100)."""
    ids: list[int] = [_special_id(tok, BOS)]
    labels: list[int] = [IGNORE]

    def add(pieces: list[int], train: bool) -> None:
        ids.extend(pieces)
        labels.extend(pieces if train else [IGNORE] * len(pieces))

    text = lambda s: tok.encode(s, add_special_tokens=False) if s else []  # noqa: E731
    for m in messages:
        role, content = m["role"], m["content"]
        if role == "system":
            add(text(content), False)
        elif role == "user":
            add([_special_id(tok, USER)] + text(content), False)
        elif role == "assistant":
            add([_special_id(tok, ASSISTANT)], False)
            add(text(content) + [_special_id(tok, EOS)], True)
        else:
            raise ValueError(f"unknown chat role {role!r}")
    if add_generation_prompt:
        add([_special_id(tok, ASSISTANT)], False)
    return ids, labels


def apply_chat_template(tok, messages: list[dict], add_generation_prompt: bool = False,
                        tokenize: bool = True) -> list[int] | str:
    if not tokenize:
        return render(messages, add_generation_prompt)
    return encode_chat(tok, messages, add_generation_prompt)[0]


def prompt_messages(prompt: str, system: str | None = None) -> list[dict]:
    msgs = [{"role": "system", "content": system}] if system else []
    return msgs + [{"role": "user", "content": prompt}]


def decode_response(tok, ids: Iterable[int]) -> str:
    """Decode generated ids, stopping at the first EOS."""
    eos = _special_id(tok, EOS)
    out = []
    for i in ids:
        if int(i) == eos:
            break
        out.append(int(i))
    return tok.decode(out, skip_special_tokens=True)


# ---- tokenizers ------------------------------------------------------------------
def build_chat_tokenizer(texts: Iterable[str], vocab_size: int = 512, out_dir: str | Path | None = None):
    """Train a byte-level BPE with the chat special tokens; return a PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    t.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    t.train_from_iterator(list(texts), trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=t, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                  additional_special_tokens=[USER, ASSISTANT, *FIM])
    if out_dir is not None:
        tok.save_pretrained(str(out_dir))
    return tok
