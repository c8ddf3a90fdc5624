"""The lifecycle's report card: `report.md` + `report.png`, generated from the MLflow store only.

nanochat wrote such a card from the training process and removed it when it drifted from what was
logged; this one is rebuilt from tracked data, so it cannot say anything the store does not:
- the lifecycle run: its params (the config), tags `git_commit`, `dvc_data_digest`,
  `prefect_flow_run_id`, one `lifecycle.stage.<stage>` JSON tag per stage (cached or ran, its key,
  run ids, model URI, wall time in this lifecycle; the serve smoke's start-up, latency and TTFT) and
  one `lifecycle.gate.<stage>` JSON tag per gate decision (gates.py),
- each stage's runs: wall time (end - start), loss curves (`train/loss`, `val/loss` of pretraining and
  the extension stages, SFT `sft/loss` / `val/loss`, GRPO `grpo/reward_mean`),
- each evaluated model's eval run: its metrics, side by side (`evals.report.results_table`).
`write_report(run_id, out_dir)` writes both files and returns the markdown; the flow logs them to the
lifecycle run and publishes the markdown as a Prefect artifact.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

from dsv3 import tracking

STAGE_TAG, GATE_TAG = "lifecycle.stage.", "lifecycle.gate."
STAGE_OF = {"base": "pretrain", "long": "extend", "chat": "posttrain"}
HEADLINE = ("eval/bpb", "eval/arith/acc", "eval/mmlu/acc", "eval/drop/f1", "eval/drop/em",
            "eval/humaneval/pass_at_1")
CURVES = (  # (panel, stage, run name in the stage's run tree, metric)
    ("pretraining", "pretrain", "pretrain", "train/loss"), ("pretraining", "pretrain", "pretrain", "val/loss"),
    ("context extension", "extend", "extend_", "train/loss"),
    ("SFT", "posttrain", "sft", "sft/loss"), ("SFT", "posttrain", "sft", "val/loss"),
    ("GRPO", "posttrain", "grpo", "grpo/reward_mean"))


def _json_tags(tags: dict, prefix: str) -> dict[str, dict]:
    return {k[len(prefix):]: json.loads(v) for k, v in tags.items() if k.startswith(prefix)}


def _seconds(run) -> float | None:
    i = run.info
    return (i.end_time - i.start_time) / 1000 if i.end_time and i.start_time else None


def _tree(run_id: str | None) -> list:
    """A run and its descendants (two levels: extend -> extend_i, posttrain -> sft, grpo)."""
    if not run_id:
        return []
    out = [tracking.run_info(run_id)]
    for child in tracking.child_runs(run_id):
        out += [child, *tracking.child_runs(child.info.run_id)]
    return out


def collect(run_id: str) -> dict:
    """Everything the card shows, read from the store."""
    run = tracking.run_info(run_id)
    tags = run.data.tags
    stages, gates = _json_tags(tags, STAGE_TAG), _json_tags(tags, GATE_TAG)
    curves: dict[str, dict[str, list]] = {}
    for panel, stage, prefix, key in CURVES:
        for r in _tree(stages.get(stage, {}).get("model_run_id")):
            name = r.data.tags.get("stage", "")
            if (name == prefix or (prefix.endswith("_") and name.startswith(prefix))) and key in r.data.metrics:
                label = f"{name} {key}" if prefix.endswith("_") else key
                curves.setdefault(panel, {})[label] = tracking.metric_history(r.info.run_id, key)
    for rec in stages.values():
        if rec.get("model_run_id"):
            rec["train_s"] = _seconds(tracking.run_info(rec["model_run_id"]))
    evals, eval_records = {}, _json_tags(tags, "lifecycle.eval.")
    for label, rec in eval_records.items():
        m = tracking.run_info(rec["run_id"]).data.metrics
        evals[f"{label}: {rec['model_uri'].removeprefix('models:/')}"] = {
            k: v for k, v in m.items() if k in HEADLINE or (k.endswith("_stderr") and k[:-7] in HEADLINE)}
    return {"run_id": run_id, "name": run.data.tags.get("mlflow.runName", run_id), "tags": tags,
            "params": run.data.params, "metrics": run.data.metrics, "stages": stages, "gates": gates,
            "curves": curves, "evals": evals, "eval_records": eval_records}


def _fmt_s(s: float | None) -> str:
    return "—" if s is None else f"{s / 60:.1f} min" if s >= 90 else f"{s:.1f} s"


def markdown(card: dict) -> str:
    from dsv3.evals.report import results_table

    t = card["tags"]
    lines = [f"# Lifecycle report: {card['name']}", "",
             f"- MLflow run `{card['run_id']}`; Prefect flow run `{t.get('prefect_flow_run_id', '—')}`",
             f"- git commit `{t.get('git_commit', '—')}`; data digest (DVC md5 of the shards) "
             f"`{t.get('dvc_data_digest', '—')}`",
             f"- wall time {_fmt_s(card['metrics'].get('lifecycle/wall_s'))}",
             *([f"- **failed**: {t['lifecycle.error']}"] if t.get("lifecycle.error") else []), "",
             "## Stages", "", "| stage | this run | wall time here | training run time | model | key |",
             "|---|---|---|---|---|---|"]
    for stage, r in card["stages"].items():
        lines.append(f"| {stage} | {r.get('status')} | {_fmt_s(r.get('wall_s'))} | {_fmt_s(r.get('train_s'))} | "
                     f"{r.get('model_uri') or r.get('data_digest') or '—'} | `{r.get('key', '')[:12]}` |")
    lines += ["", "## Evaluation (every stage model, same settings)", "",
              results_table(card["evals"]) if card["evals"] else "no evaluations", "## Gates", "",
              "| stage | candidate | champion before | metric | candidate | champion | promoted | why |",
              "|---|---|---|---|---|---|---|---|"]
    for stage, g in card["gates"].items():
        cv, hv = g.get("candidate_value"), g.get("champion_value")
        lines.append(f"| {stage} | {g['candidate']} | {g.get('champion') or '—'} | {g['metric']} "
                     f"({g['direction']}) | "
                     f"{'—' if cv is None else f'{cv:.4f}'} | {'—' if hv is None else f'{hv:.4f}'} | "
                     f"{'yes' if g['promote'] else 'no'} | {g['reason']} |")
    lines += _serving(card["stages"].get("serve"))
    lines += ["", "![report](report.png)", "", "<details><summary>config (MLflow params)</summary>", "", "```"]
    lines += [f"{k}: {v}" for k, v in sorted(card["params"].items())]
    lines += ["```", "</details>", ""]
    return "\n".join(lines)


def _serving(r: dict | None) -> list[str]:
    """The serve smoke's row: the champion served, start-up, smoke latency and TTFT (flows/serve.py)."""
    if not r:
        return []
    if r.get("status") == "skipped":
        return ["", "## Serving", "", f"skipped: {r.get('reason')}"]
    ms = (lambda v: "—" if v is None else f"{v * 1000:.0f} ms")
    return ["", "## Serving (`dsv3 serve` on the chat champion, one smoke request)", "",
            "| served model | this run | server start-up | smoke latency | smoke TTFT | serve run |",
            "|---|---|---|---|---|---|",
            f"| {r.get('model_uri')} | {r.get('status')} | {_fmt_s(r.get('startup_s'))} | "
            f"{ms(r.get('smoke_latency_s'))} | {ms(r.get('smoke_ttft_s'))} | `{r.get('run_id', '—')}` |"]


def _eval_table(ax, card: dict) -> None:
    """Every stage model's headline metrics side by side, drawn as a table."""
    ax.axis("off")
    cols = list(card["evals"])
    keys = [k for k in HEADLINE if any(k in m for m in card["evals"].values())]
    if not cols or not keys:
        ax.text(0.5, 0.5, "no evaluations", ha="center")
        return
    cells = [[("—" if k not in card["evals"][c] else f"{card['evals'][c][k]:.4f}") for c in cols] for k in keys]
    t = ax.table(cellText=cells, rowLabels=[k.removeprefix("eval/") for k in keys],
                 colLabels=[c.replace(": ", "\n") for c in cols], loc="center", cellLoc="center")
    t.auto_set_font_size(False)
    t.set_fontsize(8)
    t.scale(1, 1.6)


def _text(ax, card: dict) -> None:
    """Commit, data digest and the gate decisions, as text."""
    ax.axis("off")
    t = card["tags"]
    lines = [f"git {t.get('git_commit', '—')[:12]}   data {t.get('dvc_data_digest', '—')[:12]}",
             f"wall time {_fmt_s(card['metrics'].get('lifecycle/wall_s'))}", "", "gates:"]
    for stage, g in card["gates"].items():
        lines.append(f"{stage}: {'PROMOTED' if g['promote'] else 'kept'} {g['candidate'].removeprefix('models:/')}")
        lines += ["   " + part for part in textwrap.wrap(g["reason"], 64)]
    ax.text(0, 1, "\n".join(lines), va="top", family="monospace", fontsize=8)


def figure(card: dict):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = list(card["curves"]) + ["evaluation", "wall time", "summary"]
    cols = 3
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.5 * cols, 3.4 * rows), squeeze=False)
    for ax, panel in zip(axes.flat, panels):
        ax.set_title(panel)
        if panel == "evaluation":
            _eval_table(ax, card)
        elif panel == "summary":
            _text(ax, card)
        elif panel == "wall time":
            recs = {**card["stages"], **{f"eval {k}": v for k, v in card["eval_records"].items()}}
            ax.barh(list(recs), [r.get("wall_s") or 0.0 for r in recs.values()],
                    color=["#bbb" if r.get("status") == "cached" else "#4a7" for r in recs.values()])
            ax.set_xlabel("seconds in this lifecycle run (grey: cached)")
            ax.tick_params(axis="y", labelsize=7)
        else:
            for label, hist in card["curves"][panel].items():
                if hist:
                    ax.plot([s for s, _ in hist], [v for _, v in hist], label=label)
            ax.set_xlabel("step")
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(f"{card['name']}  ({card['run_id'][:8]})")
    fig.tight_layout()
    return fig


def write_report(run_id: str, out_dir: str | Path) -> tuple[str, Path, Path]:
    """Write `report.md` and `report.png` for lifecycle run `run_id` under `out_dir`; (markdown, md, png)."""
    import matplotlib.pyplot as plt

    card = collect(run_id)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md = markdown(card)
    (out / "report.md").write_text(md)
    fig = figure(card)
    fig.savefig(out / "report.png", dpi=90)
    plt.close(fig)
    return md, out / "report.md", out / "report.png"


def table_rows(card: dict) -> list[dict]:
    """One row per stage model: stage, model version, cached or ran, promoted, headline metrics."""
    rows = []
    for label, metrics in card["evals"].items():
        stage, _, uri = label.partition(": ")
        gate = card["gates"].get(stage, {})
        trained = card["stages"].get(STAGE_OF.get(stage, ""), {}).get("status", "")
        row = {"stage": stage, "model": uri, "this run": trained if not stage.endswith("champion") else "",
               "promoted": "" if stage.endswith("champion") else ("yes" if gate.get("promote") else "no")}
        row.update({k.removeprefix("eval/"): round(metrics[k], 4) for k in HEADLINE if k in metrics})
        rows.append(row)
    return rows
