"""Supervised fine-tuning (DeepSeek-V3 §5.1).

- Samples are chat-encoded (`chat.encode_chat`): only assistant tokens (and their EOS)
  carry labels; the loss is the model's own (main CE + λ·MTP + balance, §2.2).
- Batching that respects sample boundaries: the model contract only exposes a padding
  mask (no block-diagonal / document mask), so concatenating samples in one row would
  let attention cross samples. `make_batches` therefore puts ONE sample per row, right-
  padded, and groups samples of similar length into the same batch (sorted buckets,
  then the batches shuffled), which removes most of the padding that packing would
  save while keeping attention strictly within a sample. Samples longer than `seq_len`
  are truncated from the right.
- Schedule: linear warm-up then cosine decay to `min_lr_ratio·lr` over the total steps
  (epochs × batches, capped by `max_steps`), AdamW (β = 0.9, 0.95), gradient clipping
  (§4.2 settings, scaled down). Validation loss (assistant tokens only, main CE) every
  `eval_every` steps and at the end; checkpoints are HF-format directories with the
  tokenizer (`save_pretrained`), the last one being the stage output.
- Tracking: `dsv3.tracking.log_metrics` (`sft/loss`, `sft/lr`, `val/loss`), a no-op
  outside an MLflow run.
- Precision (§3.3): `precision` (a `dsv3.train.precision.Precision` or its name, fp32 by default)
  converts the model in place (fp8: FP8 Linears) and autocasts every forward, training and
  validation alike; master weights and AdamW states stay fp32.
"""

from __future__ import annotations

import math
import random
import time
from pathlib import Path

import torch

from dsv3.data.chat import IGNORE, encode_chat
from dsv3.posttrain.sft_data import to_messages
from dsv3.train.optim import param_groups
from dsv3.train.precision import Precision


def encode_records(tok, records: list[dict], seq_len: int) -> list[tuple[list[int], list[int]]]:
    out = []
    for r in records:
        ids, labels = encode_chat(tok, to_messages(r))
        ids, labels = ids[:seq_len], labels[:seq_len]
        if any(x != IGNORE for x in labels[1:]):
            out.append((ids, labels))
    return out


def make_batches(samples: list[tuple[list[int], list[int]]], batch_size: int, pad_id: int,
                 seed: int = 0, shuffle: bool = True) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Length-grouped batches, one sample per row: (input_ids, labels, attention_mask)."""
    order = sorted(range(len(samples)), key=lambda i: len(samples[i][0]))
    groups = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    if shuffle:
        random.Random(seed).shuffle(groups)
    out = []
    for g in groups:
        n = max(len(samples[i][0]) for i in g)
        ids = torch.full((len(g), n), pad_id, dtype=torch.long)
        lab = torch.full((len(g), n), IGNORE, dtype=torch.long)
        am = torch.zeros((len(g), n), dtype=torch.long)
        for r, i in enumerate(g):
            x, y = samples[i]
            ids[r, :len(x)], lab[r, :len(y)], am[r, :len(x)] = torch.tensor(x), torch.tensor(y), 1
        out.append((ids, lab, am))
    return out


def sft_lr_at(step: int, total: int, lr: float, warmup: int, min_ratio: float) -> float:
    if warmup and step < warmup:
        return lr * (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


@torch.no_grad()
def sft_val_loss(model, batches, precision: Precision | str = "fp32") -> float:
    """Mean main-model CE per assistant token."""
    precision = Precision.of(precision)
    was = model.training
    model.eval()
    tot, n = 0.0, 0
    for ids, lab, am in batches:
        k = int((lab[:, 1:] != IGNORE).sum())
        with precision.autocast(ids.device):
            out = model(ids, labels=lab, attention_mask=am)
        tot += float(out.main_loss) * k
        n += k
    model.train(was)
    return tot / max(n, 1)


def save_checkpoint(model, tok, out_dir: str | Path) -> str:
    p = Path(out_dir)
    p.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(p)
    if tok is not None:
        tok.save_pretrained(str(p))
    return str(p)


def train_sft(model, tok, train_records: list[dict], val_records: list[dict], cfg,
              out_dir: str | Path | None = None, log=None, precision: Precision | str = "fp32") -> dict:
    """SFT in place on `model`; returns {'train/loss', 'val/loss', 'val/loss_before', 'steps', 'ckpt'}."""
    from dsv3 import tracking

    log = log or tracking.log_metrics
    precision = Precision.of(precision)
    precision.prepare(model)
    torch.manual_seed(cfg.seed)
    tr = encode_records(tok, train_records, cfg.seq_len)
    va = make_batches(encode_records(tok, val_records, cfg.seq_len), cfg.batch_size, tok.pad_token_id,
                      shuffle=False)
    per_epoch = math.ceil(len(tr) / cfg.batch_size)
    total = per_epoch * cfg.epochs if cfg.max_steps is None else min(cfg.max_steps, per_epoch * cfg.epochs)
    opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.95))
    res = {"val/loss_before": sft_val_loss(model, va, precision) if va else float("nan")}
    log({"val/loss": res["val/loss_before"]}, 0)
    model.train()
    step, loss, t0, ntok = 0, torch.tensor(float("nan")), time.perf_counter(), 0
    for ep in range(cfg.epochs):
        for ids, lab, am in make_batches(tr, cfg.batch_size, tok.pad_token_id, seed=cfg.seed + ep):
            if step >= total:
                break
            lr = sft_lr_at(step, total, cfg.lr, cfg.warmup_steps, cfg.min_lr_ratio)
            for g in opt.param_groups:
                g["lr"] = lr
            with precision.autocast(ids.device):
                out = model(ids, labels=lab, attention_mask=am)
            loss = out.loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            gn = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            step += 1
            ntok += int(am.sum())
            log({"sft/loss": loss.detach().item(), "sft/main_loss": out.main_loss.detach().item(), "sft/lr": lr,
                 "sft/grad_norm": float(gn), "sft/epoch": ep,
                 "perf/tokens_per_s": ntok / (time.perf_counter() - t0)}, step)
            if va and step % cfg.eval_every == 0:
                log({"val/loss": sft_val_loss(model, va, precision)}, step)
            if out_dir and cfg.save_every and step % cfg.save_every == 0:
                save_checkpoint(model, tok, Path(out_dir) / f"step-{step}")
    res["val/loss"] = sft_val_loss(model, va, precision) if va else float("nan")
    log({"val/loss": res["val/loss"]}, step)
    res.update({"train/loss": float(loss.detach()), "steps": step, "n_train": len(tr)})
    if out_dir:
        res["ckpt"] = save_checkpoint(model, tok, out_dir)
    return res
