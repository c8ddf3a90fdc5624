"""What a training run writes besides checkpoints: progress lines, `metrics.jsonl`, the final MLflow logging.

Design choices
- Rank 0 only. Progress lines go to stdout and to `<out_dir>/train.log`, which the Ray driver tails
  (launcher.py), each prefixed with the stage (`[pretrain] ...`).
- `metrics.jsonl` mirrors every step record and every validation record, one JSON object a line. On
  resume it is truncated to the records up to the resumed step (so a resumed run's file equals an
  uninterrupted run's); a fresh run starts it empty.
- At the end (`log_final`): loss curves and the expert-load heatmap (layer × expert) as PNGs under
  plots/, the checkpoint and model-dir tags, the latest checkpoint's files under checkpoints/ and the
  final HF export registered as a version of `<tracking.registered_model>-base` (`register_stage`:
  the stage-model hand-off, also used by extend.py for `-long`), or logged as an artifact. All
  through dsv3.tracking.
"""

from __future__ import annotations

import json
import re
import threading
from contextlib import contextmanager
from pathlib import Path


def fmt_eta(seconds: float) -> str:
    return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"


class RunLog:
    def __init__(self, out_dir: Path, stage: str, rank: int):
        self.out_dir, self.stage, self.rank = out_dir, stage, rank
        self.metrics_path = out_dir / "metrics.jsonl"
        self.log_path: Path | None = None
        if rank == 0:
            out_dir.mkdir(parents=True, exist_ok=True)
            self.log_path = out_dir / "train.log"

    def say(self, msg: str) -> None:
        if self.rank != 0:
            return
        line = f"[{self.stage}] {msg}"
        print(line, flush=True)
        with open(self.log_path, "a") as f:
            f.write(line + "\n")

    def restore(self, resume: bool, step: int) -> tuple[list[dict], list[dict]]:
        """(step records, validation records) kept from an earlier run of this out_dir (rank 0)."""
        if self.rank != 0:
            return [], []
        if self.metrics_path.exists():
            lines = self.metrics_path.read_text().splitlines()
            keep = [rec for rec in map(json.loads, filter(str.strip, lines)) if resume and rec["step"] <= step]
            self.metrics_path.write_text("".join(json.dumps(rec) + "\n" for rec in keep))
            return [rec for rec in keep if "train/loss" in rec], [rec for rec in keep if "val/loss" in rec]
        if not resume:
            self.metrics_path.write_text("")
        return [], []

    def append(self, record: dict) -> None:
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")


_PROGRESS = re.compile(r"^\[(?P<stage>[^\]]+)\] step (?P<step>\d+)/(?P<total>\d+) ")


def parse_progress(line: str) -> tuple[str, int, int] | None:
    """(stage, step, total) of a progress line `[pretrain] step 12/250 loss ...` (RunLog.say), else None."""
    m = _PROGRESS.match(line)
    return (m["stage"], int(m["step"]), int(m["total"])) if m else None


def progress_sink(callback):
    """A sink for train.log text arriving in chunks (the Ray launcher's `on_output`: rank 0's lines from its
    file, or through a Ray queue when there is no shared filesystem): `callback(step, total)` for the last
    progress line of each chunk; a failing callback is ignored (progress must never stop training)."""
    buf = [""]

    def feed(chunk: str) -> None:
        buf[0] += chunk
        *lines, buf[0] = buf[0].split("\n")
        last = next((p for p in map(parse_progress, reversed(lines)) if p), None)
        if last:
            try:
                callback(last[1], last[2])
            except Exception:  # noqa: BLE001
                pass

    return feed


@contextmanager
def watch_progress(out_dir: str | Path, callback, every: float = 1.0):
    """Call `callback(step, total)` for each new progress line of `<out_dir>/train.log` while the block
    runs (the file rank 0 appends to, also on Ray workers: the driver reads it). Lines written before
    the block are skipped; a file truncated by a fresh launch is read from its start."""
    path = Path(out_dir) / "train.log"
    stop = threading.Event()
    start = path.stat().st_size if path.is_file() else 0

    def follow() -> None:
        pos, buf = start, ""
        while True:
            done = stop.is_set()
            if path.is_file():
                if path.stat().st_size < pos:
                    pos = 0
                with open(path) as f:
                    f.seek(pos)
                    buf += f.read()
                    pos = f.tell()
                *lines, buf = buf.split("\n")
                last = next((p for p in map(parse_progress, reversed(lines)) if p), None)
                if last:
                    try:
                        callback(last[1], last[2])
                    except Exception:  # noqa: BLE001 - progress display must never stop training
                        pass
            if done:
                return
            stop.wait(every)

    t = threading.Thread(target=follow, daemon=True)
    t.start()
    try:
        yield
    finally:
        stop.set()
        t.join(timeout=5)


def log_final(cfg, stage: str, result, history: list[dict], val_history: list[dict], load_total,
              latest: Path | None, final_dir: Path) -> None:
    """Plots, tags, checkpoint artifacts and the registered model of a finished run (rank 0, in its run)."""
    from dsv3 import tracking

    tcfg = cfg.train
    if tcfg.plots:
        from dsv3.train import plots

        fig = plots.loss_curves(history, val_history)
        tracking.log_figure(fig, "plots/loss_curves.png")
        plots.close(fig)
        if load_total.numel():
            fig = plots.expert_load_heatmap(load_total.numpy(), f"{stage}: expert load / mean (layer x expert)")
            tracking.log_figure(fig, "plots/expert_load_heatmap.png")
            plots.close(fig)
    tracking.set_tags({"checkpoint_uri": result.checkpoint, "model_dir": result.model_dir})
    if latest is not None and tcfg.log_checkpoints:
        for path in sorted(latest.iterdir()):
            if path.name != "model":  # the model directory is logged once, by register_model
                tracking.log_artifact(path, f"checkpoints/{latest.name}")
    if result.model_dir and tcfg.register_model:
        result.model_uri = register_stage(cfg, final_dir, "base", "pretrain", parent=tcfg.init_from, step=tcfg.steps)
        result.model_version = result.model_uri.rsplit("/", 1)[1]
    elif result.model_dir:
        tracking.log_artifact(final_dir, "model")


def register_stage(cfg, model_dir: Path | str, stage_model: str, section: str, parent: str | None = None,
                   data_digest: str | None = None, step: int = 0) -> str:
    """Register `model_dir` from the active (stage) run as a new version of `<registered_model>-<stage_model>`
    (`base` after pretraining, `long` after context extension), alias `candidate`, lineage tags with
    `parent` (the `models:/NAME/VERSION` it started from; a path is recorded as `parent_source`) and
    the digest of the stage's config section; tags the run `registered_model`; returns
    `models:/NAME/VERSION`. A directory without a tokenizer cannot be a text-in/text-out model: it is
    registered as a plain folder, with a warning."""
    from dsv3 import tracking

    name = tracking.stage_model_name(stage_model, cfg.tracking.registered_model)
    if (Path(model_dir) / "tokenizer.json").is_file():
        version = tracking.register_stage_model(model_dir, name, parent_model=parent, config=cfg.section(section),
                                                data_digest=data_digest, step=int(step or 0)).version
    else:
        version = tracking.register_model(model_dir, name)
    uri = f"models:/{name}/{version}"
    tracking.set_tags({"registered_model": uri})
    return uri
