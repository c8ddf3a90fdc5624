"""Results tables and `dsv3 eval compare RUN...` (side-by-side table + PNG bar chart).

Tables are markdown (they double as the Prefect artifact and the MLflow `results.md`):
one row per metric (`eval/<bench>/<metric>`, MMLU subjects last), one column per run, with
`± stderr` where lm-eval reported one. The chart shows the headline metric per benchmark
(MMLU acc, DROP F1, HumanEval pass@1, bits-per-byte) for each run.
"""

from __future__ import annotations

from pathlib import Path

HEADLINE = ["eval/mmlu/acc", "eval/drop/em", "eval/drop/f1", "eval/humaneval/pass_at_1", "eval/bpb"]


CATEGORIES = ["stem", "humanities", "social_sciences", "other"]


def _order(keys: set[str]) -> list[str]:
    """Headline metrics, other benchmark metrics, MMLU categories, MMLU subjects, timings."""
    keys = {k for k in keys if not k.endswith("_stderr")}
    head = [k for k in HEADLINE if k in keys]
    cats = [k for c in CATEGORIES for k in sorted(keys) if k.startswith(f"eval/mmlu/{c}/")]
    timing = sorted(k for k in keys if k.endswith("/seconds"))
    taken = set(head) | set(cats) | set(timing)
    bench = sorted(k for k in keys - taken if k.count("/") <= 2)
    rest = sorted(keys - taken - set(bench))
    return head + bench + cats + rest + timing


def results_table(runs: dict[str, dict[str, float]]) -> str:
    """Markdown table: rows = metrics, columns = runs."""
    keys = set().union(*[set(m) for m in runs.values()]) if runs else set()
    lines = ["| metric | " + " | ".join(runs) + " |", "|---|" + "---|" * len(runs)]
    for k in _order(keys):
        cells = []
        for m in runs.values():
            v, se = m.get(k), m.get(k + "_stderr")
            cells.append("—" if v is None else f"{v:.4f}" + (f" ± {se:.4f}" if se is not None else ""))
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def markdown(ckpt: str, run_id: str | None, table: str) -> str:
    """The results page of one evaluation (the Prefect artifact)."""
    return f"# Eval of `{ckpt}`\n\nMLflow run: `{run_id}`\n\n{table}"


def run_metrics(run_id: str) -> tuple[str, dict[str, float]]:
    from dsv3.tracking import run_info

    r = run_info(run_id)
    label = r.data.tags.get("mlflow.runName", run_id[:8])
    return f"{label} ({run_id[:8]})", {k: v for k, v in r.data.metrics.items() if k.startswith("eval/")}


def chart(runs: dict[str, dict[str, float]], path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    keys = [k for k in HEADLINE if any(k in m for m in runs.values())] or \
        sorted({k for m in runs.values() for k in m if k.count("/") == 2})[:8]
    x = np.arange(len(keys))
    w = 0.8 / max(1, len(runs))
    fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(keys)), 3.6))
    for i, (name, m) in enumerate(runs.items()):
        vals = [m.get(k, np.nan) for k in keys]
        errs = [m.get(k + "_stderr", 0.0) for k in keys]
        ax.bar(x + i * w - 0.4 + w / 2, vals, w, yerr=errs, label=name, capsize=2)
    ax.set_xticks(x, [k.removeprefix("eval/") for k in keys], rotation=20, ha="right")
    ax.set_title("dsv3 eval compare")
    ax.legend(fontsize=7)
    fig.tight_layout()
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(p, dpi=110)
    plt.close(fig)
    return p


def compare(run_ids: list[str], out_png: str | Path = "plots/eval_compare.png") -> tuple[str, Path]:
    runs = dict(run_metrics(r) for r in run_ids)
    return results_table(runs), chart(runs, out_png)
