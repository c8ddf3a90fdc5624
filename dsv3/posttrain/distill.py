"""Knowledge distillation from a stronger teacher (DeepSeek-V3 §5.4.1; DeepSeek-R1).

- Sequence-level: the teacher generates responses to the verifiable problems,
  `sft_data.rejection_sample` keeps only verified-correct ones, and the student is
  SFT'd on them (`distill_sequence`), which is how DeepSeek-V3 distils R1's reasoning.
- Token-level (Hinton et al.): on assistant tokens only, minimise
  τ² · KL(softmax(z_t/τ) ‖ softmax(z_s/τ)) (+ `alpha_ce` · hard-label CE). The τ² factor
  keeps gradient magnitudes comparable across temperatures.
- Teacher: a dsv3 checkpoint (`DeepSeekV3.from_pretrained`) or any Hugging Face causal
  LM directory (`transformers.AutoModelForCausalLM`) with the same tokenizer; the
  vocabularies must match (checked), since the KL is over the vocabulary.
Tracked: `distill/loss`, `distill/kl`, `distill/ce`, `val/loss` (student CE on assistant tokens).
Precision (§3.3): `precision` (a `dsv3.train.precision.Precision` or its name, fp32 by default)
converts the student in place (fp8: FP8 Linears) and autocasts the student's and the teacher's
forwards (and the teacher's sampling); the KL and CE are computed in fp32.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
import torch.nn.functional as F

from dsv3.data.chat import IGNORE
from dsv3.posttrain.sft import encode_records, make_batches, sft_val_loss
from dsv3.train.precision import Precision


def load_teacher(path: str | Path):
    """A dsv3 checkpoint or any HF-format causal LM directory, in eval mode, frozen."""
    p = Path(path)
    mt = json.loads((p / "config.json").read_text()).get("model_type")
    if mt in ("deepseek_v3", "deepseek_v2", None):
        from dsv3 import DeepSeekV3

        m = DeepSeekV3.from_pretrained(p)
    else:
        from transformers import AutoModelForCausalLM

        m = AutoModelForCausalLM.from_pretrained(str(p))
    m.eval()
    for q in m.parameters():
        q.requires_grad_(False)
    return m


def _vocab(model) -> int:
    cfg = model.config
    return int(getattr(cfg, "vocab_size"))


def kd_loss(student_logits, teacher_logits, labels, tau: float = 2.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(τ²·KL(teacher‖student) per kept token, student CE); both over labels != -100, shifted."""
    s = student_logits[:, :-1].float()
    t = teacher_logits[:, :-1].float()
    y = labels[:, 1:]
    keep = (y != IGNORE).float()
    n = keep.sum().clamp_min(1)
    ls, lt = F.log_softmax(s / tau, -1), F.log_softmax(t / tau, -1)
    kl = (lt.exp() * (lt - ls)).sum(-1)
    ce = F.cross_entropy(s.reshape(-1, s.shape[-1]), y.reshape(-1), ignore_index=IGNORE)
    return tau * tau * (kl * keep).sum() / n, ce


def distill_token(student, teacher, tok, records: list[dict], val_records: list[dict], cfg, log=None,
                  seq_len: int = 128, precision: Precision | str = "fp32") -> dict:
    """Token-level KD for `cfg.steps` steps; returns {'val/loss_before', 'val/loss', 'distill/kl'}."""
    from dsv3 import tracking

    log = log or tracking.log_metrics
    precision = Precision.of(precision)
    precision.prepare(student)
    if _vocab(student) != _vocab(teacher):
        raise ValueError(f"teacher vocab {_vocab(teacher)} != student vocab {_vocab(student)}: "
                         "token-level distillation needs the same tokenizer")
    torch.manual_seed(cfg.seed)
    tr = encode_records(tok, records, seq_len)
    va = make_batches(encode_records(tok, val_records, seq_len), cfg.batch_size, tok.pad_token_id, shuffle=False)
    res = {"val/loss_before": sft_val_loss(student, va, precision) if va else float("nan")}
    opt = torch.optim.AdamW(student.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.0)
    student.train()
    step, rng = 0, random.Random(cfg.seed)
    kl = torch.tensor(0.0)
    while step < cfg.steps:
        for ids, lab, am in make_batches(tr, cfg.batch_size, tok.pad_token_id, seed=rng.randrange(1 << 30)):
            if step >= cfg.steps:
                break
            with torch.no_grad(), precision.autocast(ids.device):
                teacher_logits = teacher(ids, attention_mask=am).logits
            with precision.autocast(ids.device):
                student_logits = student(ids, attention_mask=am).logits
            kl, ce = kd_loss(student_logits, teacher_logits, lab, cfg.temperature)
            loss = kl + cfg.alpha_ce * ce
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
            opt.step()
            step += 1
            log({"distill/loss": loss.detach().item(), "distill/kl": kl.detach().item(),
                 "distill/ce": ce.detach().item()}, step)
    res["val/loss"] = sft_val_loss(student, va, precision) if va else float("nan")
    log({"val/loss": res["val/loss"]}, step)
    res.update({"distill/kl": float(kl.detach()), "steps": step})
    return res


def distill_sequence(student, teacher, tok, problems: list[dict], val_records: list[dict], reward_fn, cfg,
                     sft_cfg, dcfg=None, log=None, teacher_uri: str = "teacher",
                     precision: Precision | str = "fp32") -> dict:
    """Sequence-level KD: verified teacher samples (rejection sampling), then SFT of the student."""
    from dsv3.posttrain.sft import train_sft
    from dsv3.posttrain.sft_data import rejection_sample

    precision = Precision.of(precision)
    kw = {}
    if dcfg is not None:
        kw = dict(k=dcfg.samples_per_prompt, max_new_tokens=dcfg.max_new_tokens, temperature=dcfg.temperature)
    with precision.autocast(next(teacher.parameters()).device):
        kept, stats = rejection_sample(teacher, tok, problems, reward_fn, teacher_uri=teacher_uri, **kw)
    res = {f"distill/{k}": v for k, v in stats.items()}
    if log:
        log({"distill/accept_rate": stats["accept_rate"], "distill/kept": stats["kept"]}, 0)
    if kept:
        res.update(train_sft(student, tok, kept, val_records, sft_cfg, log=log, precision=precision))
    res["records"] = kept
    return res
