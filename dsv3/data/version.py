"""The data version: one digest naming the data a model is trained on (§4.1 outputs, DVC-tracked).

What it digests: the packed token shards (`data/shards`: index.json + one .bin per split), i.e.
exactly the tokens training reads. The curated text and the tokenizer reach training only
through the shards (the `shards` stage depends on both), so any upstream change that changes
what the model sees changes the digest, and a rerun that reproduces the same tokens keeps it.

The value is DVC's own content hash of that directory (DVC 3, `hash: md5`): the md5 of the
JSON list `[{"md5": <file md5>, "relpath": <posix path>}, ...]` (sorted by relpath, keys
sorted, json.dumps' default separators) followed by `.dir` -- the `md5` that dvc.lock records
for the `data/shards` out. So the data flow, training (`log_dataset_input`) and the lineage
tag `dvc_data_digest` all carry the same string, and it can be looked up in dvc.lock or the
DVC cache. When the directory is an out in a dvc.lock whose recorded size and file count
match, the recorded value is used (no rehashing of large shards); otherwise (not DVC-tracked,
or changed since `dvc repro`) it is computed from the files, which gives the same value DVC
would record.

`repro` runs the data stages with DVC; `lock_outs` lists their outs' md5s (provenance for the
data report).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

# the dvc.yaml stages the data flow runs and versions (sft_data, the post-training SFT data, is not one);
# `validate` (GX) has only a metrics output, so `lock_outs` lists the first three
DATA_STAGES = ("curate", "tokenizer", "shards", "validate")


def file_md5(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _files(d: Path) -> list[Path]:
    return sorted((p for p in d.rglob("*") if p.is_file()), key=lambda p: p.relative_to(d).as_posix())


def dir_md5(path: str | Path) -> str:
    """DVC's hash of a directory out: md5 of its sorted {md5, relpath} manifest, plus `.dir`."""
    d = Path(path)
    manifest = [{"md5": file_md5(p), "relpath": p.relative_to(d).as_posix()} for p in _files(d)]
    return hashlib.md5(json.dumps(manifest, sort_keys=True).encode(), usedforsecurity=False).hexdigest() + ".dir"


def _find_lock(target: Path, repo: str | Path | None) -> Path | None:
    bases = [Path(repo).resolve()] if repo is not None else [Path.cwd().resolve(), *target.parents]
    return next((b / "dvc.lock" for b in bases if (b / "dvc.lock").is_file()), None)


def _lock_record(target: Path, repo: str | Path | None) -> dict | None:
    """The dvc.lock entry of the out at `target` (None when it is not one)."""
    lock = _find_lock(target, repo)
    if lock is None:
        return None
    try:
        stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {}) or {}
    except yaml.YAMLError:
        return None
    for st in stages.values():
        for o in st.get("outs", []) or []:
            if o.get("md5") and (lock.parent / o.get("path", "")).resolve() == target:
                return o
    return None


def _still_matches(target: Path, rec: dict) -> bool:
    """Cheap staleness check of a dvc.lock entry: total size and file count as recorded."""
    if target.is_dir():
        files = _files(target)
        return rec.get("nfiles") == len(files) and rec.get("size") == sum(p.stat().st_size for p in files)
    return rec.get("size") == target.stat().st_size


def data_digest(shards: str | Path, repo: str | Path | None = None) -> str:
    """The data version of a shard directory (or any DVC out): DVC's md5 of it, `<32 hex>.dir`
    for a directory. `repo`: where dvc.lock lives (default: the working directory, else the
    closest parent of `shards` that has one)."""
    target = Path(shards).resolve()
    if not target.exists():
        raise FileNotFoundError(f"no data at {target}")
    rec = _lock_record(target, repo)
    if rec is not None and _still_matches(target, rec):
        return str(rec["md5"])
    return dir_md5(target) if target.is_dir() else file_md5(target)


def lock_outs(repo: str | Path, stages: tuple[str, ...] = DATA_STAGES) -> dict[str, str]:
    """{out path: md5} of `stages` in repo/dvc.lock; metrics files (timings) are left out."""
    repo = Path(repo)
    lock = yaml.safe_load((repo / "dvc.lock").read_text()) or {}
    spec = yaml.safe_load((repo / "dvc.yaml").read_text()) or {}
    metrics = {next(iter(m)) if isinstance(m, dict) else m
               for st in spec.get("stages", {}).values() for m in st.get("metrics", [])}
    return {o["path"]: o["md5"] for name, st in lock.get("stages", {}).items() if name in stages
            for o in st.get("outs", []) if o["path"] not in metrics}


def repro(repo: str | Path, stages: tuple[str, ...] = DATA_STAGES) -> str:
    """`dvc repro <stages>` in `repo` with this Python's bin dir on PATH (dvc.yaml's commands call
    `python`); returns DVC's output, RuntimeError with its tail on failure."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    r = subprocess.run([sys.executable, "-m", "dvc", "repro", *stages], cwd=repo, env=env,
                       capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"dvc repro failed ({r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}")
    return r.stdout
