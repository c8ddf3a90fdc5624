"""The next-token loss shared by the model, its MTP depths (§2.2) and the pipeline stages (§3.2.1).

`shifted_cross_entropy(logits, labels, shift)` scores logits[:, i] against labels[:, i + shift]:
shift = 1 is the main model's next token (HF convention: labels equal the inputs, shifted inside),
shift = k + 1 is MTP depth k. Labels of -100 are ignored; the CE is computed in fp32 whatever the
logits' dtype (bf16 / fp8 runs keep the loss in high precision, §3.3).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def shifted_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, shift: int) -> torch.Tensor:
    """Mean CE of logits [B, S', V] against labels[:, shift:shift + S'] (ignore_index -100)."""
    S_l = logits.shape[1]
    tgt = labels[:, shift:shift + S_l]
    lg = logits[:, : tgt.shape[1]]
    return F.cross_entropy(lg.reshape(-1, lg.shape[-1]).float(), tgt.reshape(-1), ignore_index=-100)
