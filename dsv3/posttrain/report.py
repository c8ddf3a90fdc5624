"""The end-of-run report of the post-training chain (the posttrain flow's result, as text, §5).

`res` is what `flows.posttrain.posttrain_flow` returns: the parent MLflow run, each stage's
result (`sft`, `reward`, `grpo`, optional `distill`), the final checkpoint and its registry URI.
"""

from __future__ import annotations


def summary(res: dict, elapsed: float) -> str:
    """SFT validation loss before/after, the reward model's held-out pair accuracy, GRPO's first
    and last mean reward, and where the final model went."""
    g = res["grpo"]
    return "\n".join([
        f"\nposttrain finished in {elapsed / 60:.1f} min; MLflow parent run {res['run_id']}",
        f"SFT val/loss {res['sft']['val/loss_before']:.3f} -> {res['sft']['val/loss']:.3f}; "
        f"reward model held-out pair acc {res['reward']['val/pair_acc']:.2f}; "
        f"GRPO reward {g['reward_first']:.3f} -> {g['reward_last']:.3f}",
        f"final model {res['final']} registered as {res['model_uri']}",
    ])
