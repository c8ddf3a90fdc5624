"""`!function` targets of the task YAMLs in this folder (lm-eval resolves them relative to the YAML)."""

from dsv3.evals.tasks import (build_predictions, drop_dataset, humaneval_dataset,  # noqa: F401
                              mmlu_dataset, pass_at_k)
