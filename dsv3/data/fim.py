"""Fill-in-the-Middle, document level, Prefix-Suffix-Middle (DeepSeek-V3 §4.1: FIM rate 0.1).

With probability `fim.rate` a document `text` is split at two uniform character
positions into prefix / middle / suffix and rewritten, as in the paper, as
    <｜fim▁begin｜>prefix<｜fim▁hole｜>suffix<｜fim▁end｜>middle
(the EOS is appended by the packer). The choice and the split points are drawn from a
generator seeded by (fim.seed, document hash), so the transform is deterministic and
independent of order or worker count. `fim_invert` recovers the original exactly
(the normalize stage removes literal special-token strings from documents first).
"""

from __future__ import annotations

import random

FIM_BEGIN, FIM_HOLE, FIM_END = "<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>"


def fim_psm(text: str, rng: random.Random) -> str:
    i, j = sorted(rng.randint(0, len(text)) for _ in range(2))
    return f"{FIM_BEGIN}{text[:i]}{FIM_HOLE}{text[j:]}{FIM_END}{text[i:j]}"


def fim_invert(text: str) -> str:
    if not text.startswith(FIM_BEGIN):
        return text
    body = text[len(FIM_BEGIN):]
    prefix, _, rest = body.partition(FIM_HOLE)
    suffix, _, middle = rest.partition(FIM_END)
    return prefix + middle + suffix


def maybe_fim(text: str, key: str, rate: float, seed: int) -> tuple[str, bool]:
    rng = random.Random(f"{seed}:{key}")
    if rng.random() >= rate:
        return text, False
    return fim_psm(text, rng), True
