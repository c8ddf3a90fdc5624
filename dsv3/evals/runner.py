"""Evaluate a checkpoint: lm-eval benchmarks + bits-per-byte, logged to MLflow.

`evaluate_checkpoint(ckpt, cfg)` loads the model once (`DSV3LM`), runs each benchmark with
`lm_eval.simple_evaluate` (offline YAMLs from `evals/tasks/` when a data dir is set), computes
bits-per-byte on the curated validation shards, and returns a flat metric dict:
`eval/mmlu/acc`, `eval/mmlu/acc_stderr`, `eval/mmlu/<subject>/acc`, `eval/drop/f1`,
`eval/humaneval/pass_at_1`, `eval/bpb`, ... (the names the MLflow dashboard plots).
Tracking: a new run with stage "eval", nested under the checkpoint's training run when the
checkpoint came from one (`runs:/<id>/...`, a registered version's run, or the run id in the
checkpoint's state.json), tagged with the checkpoint URI; params are the EvalConfig, artifacts
the raw lm-eval results, per-sample JSONL and the markdown results table. A registered model
(`models:/NAME/VERSION` or `@alias`) also gets `model_name` / `model_version` tags and its metrics
on the logged model (`tracking.log_eval_metrics`), so the model's page lists them.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Any

from dsv3.evals.config import EvalConfig
from dsv3.evals.tasks import DEFAULT_DATA, ENV, FEWSHOT, PRIMARY, TASK_DIR, task_name  # noqa: F401


def find_latest_checkpoint(root: str | Path = "runs") -> str:
    """Newest `runs/*/checkpoints/step_*/model` (what dsv3.train writes), else `models:/dsv3/latest`."""
    cands = sorted(Path(root).glob("*/checkpoints/step_*/model/config.json"), key=lambda p: (p.stat().st_mtime, str(p)))
    if cands:
        return str(cands[-1].parent)
    return "models:/dsv3/latest"


def source_run_id(ckpt: str) -> str | None:
    """The training run a checkpoint came from, when it can be told."""
    if ckpt.startswith("runs:/"):
        return ckpt[len("runs:/"):].split("/")[0]
    if ckpt.startswith("models:/"):
        from dsv3 import tracking

        try:
            return tracking.model_version(ckpt).run_id
        except tracking.ModelNotFound:
            return None
    state = Path(ckpt).parent / "state.json"
    if state.is_file():
        s = json.loads(state.read_text())
        return s.get("mlflow_run_id") or s.get("run_id")
    return None


def metric_key(name: str) -> str:
    """An MLflow-safe metric name (`pass@1` -> `pass_at_1`)."""
    return re.sub(r"[^/\w.\- :]", "_", name.replace("@", "_at_"))


def summarize(bench: str, res: dict) -> dict[str, float]:
    """Flatten one lm-eval result into `eval/<bench>/<metric>` (+ `_stderr`), MMLU categories
    and subjects as `eval/mmlu/<name>/<metric>`."""
    out: dict[str, float] = {}
    for name, r in res["results"].items():
        short = name.removeprefix("dsv3_")
        if short == bench:
            prefix = f"eval/{bench}"
        elif bench == "mmlu":
            prefix = f"eval/mmlu/{short.removeprefix('mmlu_')}"
        else:
            prefix = f"eval/{bench}/{short}"
        for k, v in r.items():
            if "," in k and isinstance(v, (int, float)) and not (isinstance(v, float) and math.isnan(v)):
                out[metric_key(f"{prefix}/{k.split(',')[0]}")] = float(v)
    if bench == "mmlu" and "eval/mmlu/acc" not in out:  # a subset of subjects: size-weighted mean
        n = {t: c.get("effective", 0) for t, c in res.get("n-samples", {}).items()}
        rows = [(r["acc,none"], r.get("acc_stderr,none", 0.0), n.get(t, 0)) for t, r in res["results"].items()
                if "acc,none" in r]
        if rows and sum(w for *_, w in rows):
            from lm_eval.api.metrics import pooled_sample_stderr

            out["eval/mmlu/acc"] = sum(a * w for a, _, w in rows) / sum(w for *_, w in rows)
            se = [(s if isinstance(s, float) and math.isfinite(s) else 0.0) for _, s, _ in rows]
            sizes = [w for *_, w in rows]
            if len(rows) == 1:
                out["eval/mmlu/acc_stderr"] = se[0]
            elif sum(sizes) > len(sizes):
                out["eval/mmlu/acc_stderr"] = float(pooled_sample_stderr(se, sizes))
    return out


def shard_bits_per_byte(lm, shard_dir: str, split: str = "val", max_tokens: int | None = None,
                  seq_len: int = 512) -> dict[str, float]:
    """Bits per UTF-8 byte on a token-shard split: Σ NLL(nats) / (ln 2 · n_bytes).

    Documents are scored in disjoint windows of `seq_len` (each window conditions on its
    own tokens only); with `max_tokens` the byte count is scaled by the token fraction."""
    import numpy as np

    from dsv3.data.shards import TokenShards

    sh = TokenShards(shard_dir, split)
    if not sh.n_bytes:
        raise ValueError(f"{shard_dir}/{split}: index has no n_bytes, cannot compute bits-per-byte")
    n = len(sh) if max_tokens is None else min(len(sh), max_tokens)
    toks = np.asarray(sh.tokens[:n], dtype=np.int64).tolist()
    reqs = [(None, toks[i:i + 1], toks[i + 1:i + seq_len]) for i in range(0, n - 1, seq_len - 1)]
    reqs = [r for r in reqs if r[2]]
    nll = -sum(ll for ll, _ in lm._loglikelihood_tokens(reqs))
    scored = sum(len(r[2]) for r in reqs)
    n_bytes = sh.n_bytes * scored / max(1, len(sh) - 1)
    return {"eval/bpb": nll / (math.log(2) * n_bytes), "eval/val_loss": nll / max(1, scored),
            "eval/bpb_tokens": float(scored)}


_LM_CACHE: dict[tuple, Any] = {}


def get_lm(ckpt: str, cfg: EvalConfig):
    """The adapter for `ckpt`, loaded once per process (the flow's tasks share it)."""
    import dsv3.evals  # noqa: F401  (registers the model)
    from dsv3.evals.adapter import DSV3LM

    key = (ckpt, cfg.batch_size, cfg.dtype, cfg.device)
    if key not in _LM_CACHE:
        _LM_CACHE.clear()
        _LM_CACHE[key] = DSV3LM(ckpt, batch_size=cfg.batch_size, dtype=cfg.dtype, device=cfg.device)
    return _LM_CACHE[key]


def is_offline(cfg: EvalConfig) -> bool:
    """Offline when eval.data_dir or $DSV3_EVAL_DATA is set, or `make eval-data` output exists."""
    if cfg.data_dir:
        os.environ[ENV] = str(Path(cfg.data_dir).resolve())
    elif not os.environ.get(ENV) and (DEFAULT_DATA / "manifest.json").is_file():
        os.environ[ENV] = str(DEFAULT_DATA)
    return bool(os.environ.get(ENV))


def run_benchmark(ckpt: str, bench: str, cfg: EvalConfig, out: str | Path) -> dict[str, float]:
    """One benchmark through lm_eval.simple_evaluate; writes results/samples under `out`."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from dsv3.evals import sandbox

    code = bench == "humaneval"  # model-written code: sandboxed, or refused before the model loads
    uncontained = code and sandbox.gate(cfg.unsafe_no_sandbox) == "none"
    offline = is_offline(cfg)
    lm = get_lm(ckpt, cfg)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    tasks = [task_name(bench, offline)]
    if bench == "mmlu" and cfg.mmlu_subjects:
        tasks = [f"{tasks[0]}_{s}" for s in cfg.mmlu_subjects]
    with sandbox.allow_unsafe(uncontained):
        res = lm_eval.simple_evaluate(
            model=lm, tasks=tasks, num_fewshot=cfg.num_fewshot.get(bench, FEWSHOT[bench]),
            limit=cfg.limit, task_manager=TaskManager(include_path=str(TASK_DIR), include_defaults=not offline),
            log_samples=cfg.log_samples, confirm_run_unsafe_code=code,  # only past the sandbox gate
            gen_kwargs=f"max_gen_toks={cfg.max_gen_toks}" if cfg.max_gen_toks else None,
            random_seed=cfg.seed, numpy_random_seed=cfg.seed, torch_random_seed=cfg.seed,
            fewshot_random_seed=cfg.seed)
    m = summarize(bench, res)
    m[f"eval/{bench}/seconds"] = time.time() - t0
    raw = {k: res.get(k) for k in ("results", "groups", "n-shot", "n-samples", "higher_is_better")}
    (out / f"{bench}_results.json").write_text(json.dumps(raw, indent=1, default=str))
    if cfg.log_samples:
        with open(out / f"{bench}_samples.jsonl", "w") as f:
            for task, rows in res.get("samples", {}).items():
                for r in rows:
                    f.write(json.dumps({"task": task, **r}, default=str) + "\n")
    return m


def run_bpb(ckpt: str, cfg: EvalConfig) -> dict[str, float]:
    lm = get_lm(ckpt, cfg)
    return shard_bits_per_byte(lm, cfg.bpb_shards, cfg.bpb_split, cfg.bpb_max_tokens, min(cfg.bpb_seq_len, lm.max_length))


def finish(ckpt: str, cfg: EvalConfig, metrics: dict[str, float], out: str | Path, tracking: bool = True,
           run_name: str | None = None, tags: dict[str, str] | None = None) -> tuple[str, str | None]:
    """Write the results table + config next to the results; log all to MLflow (`tags` added to the
    eval run's, e.g. the lifecycle's stage key). (table, run_id)"""
    from dsv3.evals.report import results_table

    out = Path(out)
    table = results_table({run_name or "eval": metrics})
    (out / "results.md").write_text(table)
    (out / "eval_config.json").write_text(cfg.model_dump_json(indent=1))
    return table, (_track(ckpt, cfg, metrics, out, run_name, tags) if tracking else None)


def output_dir(out_dir: str | Path | None = None) -> Path:
    """Where an evaluation writes its results (a fresh temporary directory by default)."""
    return Path(out_dir or tempfile.mkdtemp(prefix="dsv3-eval-"))


def evaluate_checkpoint(ckpt: str, cfg: EvalConfig | None = None, tracking: bool = True,
                        run_name: str | None = None, out_dir: str | Path | None = None) -> dict[str, Any]:
    """Run the configured benchmarks (+ bpb) on `ckpt`; returns {"metrics", "run_id", "table", ...}."""
    cfg = cfg or EvalConfig()
    out = output_dir(out_dir)
    metrics: dict[str, float] = {}
    for bench in cfg.tasks:
        metrics.update(run_benchmark(ckpt, bench, cfg, out))
    if cfg.bpb_shards:
        metrics.update(run_bpb(ckpt, cfg))
    table, run_id = finish(ckpt, cfg, metrics, out, tracking, run_name)
    return {"metrics": metrics, "run_id": run_id, "table": table, "out_dir": str(out), "offline": is_offline(cfg)}


def _track(ckpt: str, cfg: EvalConfig, metrics: dict, out: Path, run_name: str | None,
           extra_tags: dict[str, str] | None = None) -> str:
    from dsv3 import tracking

    parent = None
    try:
        parent = source_run_id(ckpt)
    except Exception:  # a checkpoint from another store: an unlinked eval run
        parent = None
    params = {f"eval.{k}": v for k, v in cfg.model_dump(mode="json").items()}
    params["eval.checkpoint"] = ckpt
    tags = {"checkpoint_uri": ckpt, "source_run_id": parent, "primary": json.dumps(PRIMARY), **(extra_tags or {})}
    if "humaneval" in cfg.tasks:  # where model-written code ran: "bwrap", or "none" under --unsafe-no-sandbox
        from dsv3.evals import sandbox

        tags.update(sandbox=sandbox.describe()["mechanism"] or "none", unsafe_no_sandbox=str(cfg.unsafe_no_sandbox))
    with tracking.start_run(params, stage="eval", run_name=run_name or "eval", parent_run_id=parent,
                            tags=tags) as run:
        if ckpt.startswith("models:/"):  # metrics on the run and on the scored logged model
            tracking.log_eval_metrics(metrics, ckpt)
        else:
            tracking.log_metrics(metrics)
        tracking.log_artifact(out, "eval")
        return run.info.run_id
