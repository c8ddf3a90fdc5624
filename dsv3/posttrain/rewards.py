"""Rewards (DeepSeek-V3 §5.2.1): rule-based and model-based, behind one interface.

Interface: a reward is a callable `reward(samples, responses) -> list[float]`, where
`samples[i]` is the problem record (`kind`, `answer`, `tests`, ...) the i-th response
answers. `Combined([(w, r), ...])` is the weighted sum, so rules and models mix.

Rule-based (used where a result is verifiable, as in the paper):
- `MathReward`: the answer is taken from the last `\\boxed{...}` (nested braces ok) or,
  failing that, the last number on the final non-empty line; it is compared with the
  reference numerically and exactly (`Fraction`: "1/2" == "0.5" == "2/4"; "1,000" == 1000).
- `CodeReward`: the response's code (last ```python block, or the whole text) followed by
  the record's unit tests runs in `dsv3.evals.sandbox.run_code`; 1 if it exits cleanly.
- `FormatReward`: 1 when the response carries the expected shape (`\\boxed{}` for math,
  a code block for code, non-empty otherwise).
Rewards for records of another kind are 0 (a math rule ignores code tasks, ...).

Model-based: `RewardModel` is a dsv3 backbone with a scalar head on the hidden state of
the last real token, trained on preference pairs with the Bradley–Terry loss
-log σ(r_chosen − r_rejected); `train_reward_model` reports held-out pairwise accuracy.
`ModelReward` wraps it in the common interface.
Precision (§3.3): `precision` (a `dsv3.train.precision.Precision` or its name, fp32 by default)
converts the backbone in place (fp8: FP8 Linears; the scalar head stays a plain Linear) and
autocasts its forwards, in training, pairwise accuracy and scoring alike.
"""

from __future__ import annotations

import random
import re
from fractions import Fraction
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from dsv3.train.precision import Precision

_NUM = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?|-?\.\d+")


# ---- rule-based ------------------------------------------------------------------
def extract_boxed(text: str) -> str | None:
    i = text.rfind("\\boxed{")
    if i < 0:
        return None
    j, depth = i + len("\\boxed{"), 1
    for k in range(j, len(text)):
        depth += {"{": 1, "}": -1}.get(text[k], 0)
        if depth == 0:
            return text[j:k].strip()
    return None


def extract_answer(text: str) -> str | None:
    """`\\boxed{}` content, else the last number on the final non-empty line."""
    b = extract_boxed(text)
    if b is not None:
        return b
    lines = [x for x in text.strip().splitlines() if x.strip()]
    if not lines:
        return None
    nums = _NUM.findall(lines[-1])
    return nums[-1] if nums else None


def to_number(s: str | None) -> Fraction | None:
    if s is None:
        return None
    s = s.strip().replace(",", "").replace(" ", "").rstrip(".").strip("$")
    m = re.fullmatch(r"\\(?:d|t)?frac\{(-?[\d.]+)\}\{(-?[\d.]+)\}", s)
    if m:
        s = f"{m.group(1)}/{m.group(2)}"
    try:
        if "/" in s:
            a, b = s.split("/", 1)
            return Fraction(a) / Fraction(b)
        return Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None


def numeric_equal(a: str | None, b: str | None) -> bool:
    x, y = to_number(a), to_number(b)
    if x is not None and y is not None:
        return x == y
    return a is not None and b is not None and a.strip() == b.strip()


class MathReward:
    kinds = ("arithmetic", "algebra", "math")

    def __call__(self, samples: list[dict], responses: list[str]) -> list[float]:
        return [float(s.get("kind") in self.kinds and numeric_equal(extract_answer(r), s.get("answer")))
                for s, r in zip(samples, responses)]


def extract_code(text: str) -> str:
    blocks = re.findall(r"```(?:python)?\n(.*?)```", text, flags=re.S)
    return blocks[-1] if blocks else text


class CodeReward:
    def __init__(self, timeout_s: float = 5.0, memory_mb: int = 512):
        self.timeout_s, self.memory_mb = timeout_s, memory_mb

    def __call__(self, samples: list[dict], responses: list[str]) -> list[float]:
        from dsv3.evals.sandbox import run_code

        out = []
        for s, r in zip(samples, responses):
            if s.get("kind") != "code" or not s.get("tests"):
                out.append(0.0)
                continue
            res = run_code(extract_code(r) + "\n\n" + s["tests"] + "\n", timeout_s=self.timeout_s,
                           memory_mb=self.memory_mb)
            out.append(float(res.ok))
        return out


class FormatReward:
    def __call__(self, samples: list[dict], responses: list[str]) -> list[float]:
        out = []
        for s, r in zip(samples, responses):
            k = s.get("kind")
            if k in MathReward.kinds:
                out.append(float(extract_boxed(r) is not None))
            elif k == "code":
                out.append(float("```" in r and "def " in r))
            else:
                out.append(float(bool(r.strip())))
        return out


class Combined:
    """Weighted sum of rewards: `Combined([(1.0, MathReward()), (0.1, FormatReward())])`."""

    def __init__(self, parts: list[tuple[float, object]]):
        self.parts = [(w, r) for w, r in parts if w]

    def __call__(self, samples: list[dict], responses: list[str]) -> list[float]:
        total = [0.0] * len(responses)
        for w, r in self.parts:
            for i, v in enumerate(r(samples, responses)):
                total[i] += w * v
        return total


def build_reward(cfg, reward_model: "RewardModel | None" = None, tokenizer=None,
                 precision: Precision | str = "fp32") -> Combined:
    """The reward of a RewardConfig: rules, plus the reward model when model_weight > 0."""
    parts = [(cfg.math_weight, MathReward()), (cfg.format_weight, FormatReward()),
             (cfg.code_weight, CodeReward(cfg.code_timeout_s))]
    if cfg.model_weight and reward_model is not None:
        parts.append((cfg.model_weight, ModelReward(reward_model, tokenizer, precision=precision)))
    return Combined(parts)


# ---- model-based -----------------------------------------------------------------
class RewardModel(nn.Module):
    """A dsv3 backbone with a scalar head on the last real token's final hidden state."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.config.hidden_size, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        self._h = None
        self._norm().register_forward_hook(lambda m, i, o: setattr(self, "_h", o))

    def _norm(self) -> nn.Module:
        inner = getattr(self.backbone, "model", self.backbone)
        return inner.norm

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Scores [B] for RIGHT-padded sequences (causal attention: padding after a token
        cannot change it)."""
        self.backbone(input_ids)
        h = self._h
        last = attention_mask.long().sum(1) - 1
        return self.head(h[torch.arange(h.shape[0]), last].float()).squeeze(-1)

    def save(self, out_dir: str | Path) -> None:
        from safetensors.torch import save_file

        out = Path(out_dir)
        self.backbone.save_pretrained(out)
        (out / "reward_head").mkdir(exist_ok=True)  # a subfolder: the backbone loader globs *.safetensors
        save_file({k: v.contiguous() for k, v in self.head.state_dict().items()},
                  str(out / "reward_head" / "head.safetensors"))

    @classmethod
    def load(cls, path: str | Path) -> "RewardModel":
        from safetensors.torch import load_file

        from dsv3 import DeepSeekV3

        rm = cls(DeepSeekV3.from_pretrained(path))
        rm.head.load_state_dict(load_file(str(Path(path) / "reward_head" / "head.safetensors")))
        return rm


def _right_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    n = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), n), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
        mask[i, :len(s)] = 1
    return ids, mask


def _encode(tok, prompt: str, response: str) -> list[int]:
    from dsv3.data.chat import encode_chat

    return encode_chat(tok, [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}])[0]


class ModelReward:
    def __init__(self, rm: RewardModel, tokenizer, batch_size: int = 32, precision: Precision | str = "fp32"):
        self.rm, self.tok, self.bs = rm, tokenizer, batch_size
        self.precision = Precision.of(precision)
        self.precision.prepare(rm.backbone)

    @torch.no_grad()
    def __call__(self, samples: list[dict], responses: list[str]) -> list[float]:
        was = self.rm.training
        self.rm.eval()
        out: list[float] = []
        for i in range(0, len(responses), self.bs):
            seqs = [_encode(self.tok, s["prompt"], r) for s, r in
                    zip(samples[i:i + self.bs], responses[i:i + self.bs])]
            ids, mask = _right_pad(seqs, self.tok.pad_token_id)
            with self.precision.autocast(ids.device):
                out += self.rm(ids, mask).float().tolist()
        self.rm.train(was)
        return out


def preference_pairs(records: list[dict], seed: int = 0) -> list[dict]:
    """Pairs {prompt, chosen, rejected}: the verified response against a corrupted one
    (wrong boxed answer, missing box, or failing code)."""
    rng = random.Random(seed)
    out = []
    for r in records:
        good = r["response"]
        if r["kind"] in MathReward.kinds:
            ans = extract_boxed(good) or "0"
            x = to_number(ans) or Fraction(0)
            wrong = str(x + rng.choice([-2, -1, 1, 2, 3]))
            bad = good.replace("\\boxed{" + ans + "}", "\\boxed{" + wrong + "}") if rng.random() < 0.7 \
                else good.replace("\\boxed{" + ans + "}", "")
        elif r["kind"] == "code":
            bad = good.replace("return ", "return -", 1)
        else:
            bad = " ".join(reversed(good.split())) if len(good.split()) > 1 else good + " no"
        if bad != good:
            out.append({"prompt": r["prompt"], "chosen": good, "rejected": bad})
    return out


def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> torch.Tensor:
    return -F.logsigmoid(r_chosen - r_rejected).mean()


def _pair_batches(pairs, tok, bs):
    for i in range(0, len(pairs), bs):
        chunk = pairs[i:i + bs]
        seqs = [_encode(tok, p["prompt"], p["chosen"]) for p in chunk] + \
               [_encode(tok, p["prompt"], p["rejected"]) for p in chunk]
        yield _right_pad(seqs, tok.pad_token_id), len(chunk)


@torch.no_grad()
def pairwise_accuracy(rm: RewardModel, tok, pairs: list[dict], batch_size: int = 32,
                      precision: Precision | str = "fp32") -> float:
    precision = Precision.of(precision)
    rm.eval()
    hits = 0
    for (ids, mask), n in _pair_batches(pairs, tok, batch_size):
        with precision.autocast(ids.device):
            scores = rm(ids, mask)
        hits += float((scores[:n] > scores[n:]).sum()) + 0.5 * float((scores[:n] == scores[n:]).sum())  # ties: half
    rm.train()
    return hits / max(len(pairs), 1)


def train_reward_model(rm: RewardModel, tok, pairs: list[dict], cfg, log=None,
                       precision: Precision | str = "fp32") -> dict:
    """Bradley–Terry training; returns {'val/pair_acc_before', 'val/pair_acc', 'train/loss'}."""
    precision = Precision.of(precision)
    precision.prepare(rm.backbone)
    torch.manual_seed(cfg.seed)
    pairs = list(pairs)
    random.Random(cfg.seed).shuffle(pairs)
    n_val = max(1, int(len(pairs) * cfg.rm_val_fraction))
    val, train = pairs[:n_val], pairs[n_val:]
    opt = torch.optim.AdamW(rm.parameters(), lr=cfg.rm_lr, weight_decay=0.0)
    res = {"val/pair_acc_before": pairwise_accuracy(rm, tok, val, precision=precision)}
    step, loss = 0, torch.tensor(0.0)
    rm.train()
    for ep in range(cfg.rm_epochs):
        random.Random(cfg.seed + ep).shuffle(train)
        for (ids, mask), n in _pair_batches(train, tok, cfg.rm_batch_size):
            with precision.autocast(ids.device):
                scores = rm(ids, mask)
            loss = bradley_terry_loss(scores[:n].float(), scores[n:].float())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(rm.parameters(), 1.0)
            opt.step()
            step += 1
            if log:
                log({"rm/loss": loss.detach().item()}, step)
        acc = pairwise_accuracy(rm, tok, val, precision=precision)
        if log:
            log({"rm/val_pair_acc": acc}, step)
    res.update({"val/pair_acc": acc, "train/loss": float(loss.detach()), "steps": step,
                "n_train": len(train), "n_val": len(val)})
    return res
