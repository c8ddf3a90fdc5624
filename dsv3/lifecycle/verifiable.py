"""The held-out verifiable task: exact-answer accuracy on a+b problems, scored the same way for every
stage model so the chat model's gate can compare it with the extended base model (§5.2: rule-based
rewards for questions with a deterministic answer; §5.3 reports the chat models on such tasks).

- Problems: `dsv3.posttrain.grpo.arithmetic_task` (the task GRPO trains on: `a+b=?`, operands
  0..`max_operand`) drawn with the held-out seed (`lifecycle.heldout.seed`), which neither the SFT
  data nor GRPO use. With small operands the space is small, so "held out" means fresh draws of
  the same distribution, not unseen sums.
- Prompting: every model gets the same chat-template prompt (one user turn ending in the Assistant
  tag), as GRPO's rollouts do; a base model that never saw the template scores what it scores.
- Decoding: greedy (temperature 0), `max_new_tokens`; answer: `\\boxed{}` or the last number of the
  last line (`rewards.extract_answer`), exact numeric match (`rewards.MathReward`).
Returns `eval/arith/acc` (the chat gate's default metric) and `eval/arith/n`.
"""

from __future__ import annotations

import torch


def heldout_problems(cfg) -> list[dict]:
    from dsv3.posttrain.grpo import arithmetic_task

    return arithmetic_task(cfg.n, cfg.seed, cfg.max_operand)


@torch.no_grad()
def heldout_accuracy(model_uri: str, cfg, precision: str = "fp32", batch_size: int = 32) -> tuple[dict, list[dict]]:
    """(metrics, samples) of the model at `model_uri` (path, runs:/ or models:/) on the held-out task."""
    from dsv3.posttrain.rewards import MathReward
    from dsv3.posttrain.rollout import rollout
    from dsv3.posttrain.stages import load_model
    from dsv3.train.precision import Precision

    model, tok, _ = load_model(model_uri)
    prec = Precision.of(precision)
    prec.prepare(model)
    model.eval()
    problems = heldout_problems(cfg)
    texts: list[str] = []
    for i in range(0, len(problems), batch_size):
        chunk = [p["prompt"] for p in problems[i:i + batch_size]]
        with prec.autocast(model.device):
            texts += rollout(model, tok, chunk, 1, cfg.max_new_tokens, temperature=0.0).texts
    scores = MathReward()(problems, texts)
    samples = [{"prompt": p["prompt"], "answer": p["answer"], "response": t, "correct": bool(s)}
               for p, t, s in zip(problems, texts, scores)]
    return {"eval/arith/acc": sum(scores) / len(scores), "eval/arith/n": float(len(scores))}, samples
