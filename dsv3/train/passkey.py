"""Passkey retrieval ("needle in a haystack") over context lengths × needle depths (§4.3).

The paper checks its two YaRN stages with Needle-In-A-Haystack up to 128K (Figure 8);
we run the same probe scaled down. A prompt is: an intro, filler text with the needle
("The pass key is 71432 ...") inserted at a relative depth, then the question; the
score is teacher-forced *token accuracy* of the answer (argmax at every answer token),
averaged over trials, so a small CPU model gets a graded signal rather than only 0/1.
With a tokenizer the prompt is English text; without one (unit tests on synthetic
shards) it is built from token ids with the same structure.
"""

from __future__ import annotations

import numpy as np
import torch

from dsv3.train.precision import Precision


def _text_parts(tok, key: str):
    enc = lambda text: tok.encode(text, add_special_tokens=False)  # noqa: E731
    return (enc("There is an important pass key hidden inside a lot of irrelevant text. "
                "Find it and memorize it.\n"),
            enc("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.\n"),
            enc(f"The pass key is {key}. Remember it. {key} is the pass key.\n"),
            enc("What is the pass key? The pass key is"),
            enc(f" {key}"))


def _id_parts(vocab: int, rng: np.random.Generator):
    lo = min(100, vocab // 4)
    key = rng.integers(lo, vocab, size=5).tolist()
    intro, question = [3, 4, 5], [3, 4, 6]
    filler = list(range(10, min(40, lo)))
    return intro, filler, [7, 8] + key + [9], question, key


def build_prompt(length: int, depth: float, rng: np.random.Generator, tokenizer=None,
                 vocab: int = 512) -> tuple[list[int], list[int]]:
    """(prompt ids of about `length` tokens incl. answer, answer ids)."""
    if tokenizer is not None:
        key = str(rng.integers(10000, 99999))
        intro, filler, needle, question, answer = _text_parts(tokenizer, key)
    else:
        intro, filler, needle, question, answer = _id_parts(vocab, rng)
    room = max(0, length - len(intro) - len(needle) - len(question) - len(answer))
    hay = (filler * (room // max(1, len(filler)) + 1))[:room]
    at = int(round(depth * room))
    ids = intro + hay[:at] + needle + hay[at:] + question
    return ids + answer, answer


@torch.no_grad()
def passkey_grid(model, lengths: list[int], depths: list[float], trials: int = 2, tokenizer=None,
                 seed: int = 0, precision: Precision | str = "fp32") -> np.ndarray:
    """Token accuracy [len(lengths), len(depths)] of the answer, teacher-forced, in `precision`'s autocast."""
    precision = Precision.of(precision)
    was = model.training
    model.eval()
    vocab = model.config.vocab_size
    grid = np.zeros((len(lengths), len(depths)))
    for i, length in enumerate(lengths):
        for j, depth in enumerate(depths):
            rng = np.random.default_rng(seed + 1000 * i + j)
            acc = []
            for _ in range(trials):
                ids, ans = build_prompt(length, depth, rng, tokenizer, vocab)
                x = torch.tensor([ids], device=model.device)
                with precision.autocast(model.device):
                    logits = model(x).logits[0]
                n = len(ans)
                pred = logits[-n - 1:-1].argmax(-1).tolist()
                acc.append(float(np.mean([p == a for p, a in zip(pred, ans)])))
            grid[i, j] = float(np.mean(acc))
    model.train(was)
    return grid
