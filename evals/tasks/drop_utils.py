"""DROP EM/F1: lm-eval's own implementation (lm_eval/tasks/drop/utils.py), re-exported."""

from lm_eval.tasks.drop.utils import process_results  # noqa: F401
