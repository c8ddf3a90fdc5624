"""Stage identities for the lifecycle's cache and resume (marin's executor is the model).

A stage's identity is a content hash of three things, so an unchanged stage is a cache hit and any
change re-runs it and everything downstream of it:
- its config section (`RunConfig.section(stage)`: e.g. `posttrain` + `train.precision`, without
  bookkeeping fields such as paths and threads),
- its code version: the sha256 of the source files in the import closure of the stage's entry
  modules (`ROOTS`, found with `ast` like tests/test_layering.py), not the git commit, so an
  unrelated commit does not invalidate it. Config modules (their values are in the section) and
  dsv3.tracking (logging, not computation) are left out,
- its inputs: the data digest (DVC's md5 of the shards) and the concrete upstream model versions
  (`models:/dsv3-long/3`), so a retrained parent changes every child's key.

The store is the source of truth for a hit: a model stage is done when a version of its registered
model carries the key tag (`KEY_TAG`) and its run finished and its files resolve; the data stage and
evaluations when a finished run carries it (the data run's digest must also match the shards on
disk). A wiped store is never a false hit. `--force STAGE` ignores hits from that stage on.
Order (`ORDER`): data -> pretrain -> extend -> posttrain -> eval; a failure in stage k leaves
stages < k as hits, so the next run resumes at k. The serve smoke of the chat champion comes last
(`serve`: a key in ROOTS, not a `--force` choice; keyed by the champion version it served).
"""

from __future__ import annotations

import ast
import hashlib
import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from dsv3 import tracking

ORDER = ("data", "pretrain", "extend", "posttrain", "eval")
MODEL_OF = {"pretrain": "base", "extend": "long", "posttrain": "chat"}  # stage -> registered stage model
ROOTS = {  # the entry modules of each stage; the code version hashes their import closure
    "data": ("dsv3.data.curate", "dsv3.data.cli", "dsv3.data.validate", "dsv3.data.report"),
    "pretrain": ("dsv3.train.loop", "dsv3.train.launcher"),
    "extend": ("dsv3.train.extend", "dsv3.train.launcher"),
    "posttrain": ("dsv3.posttrain.stages",),
    "eval": ("dsv3.evals.runner", "dsv3.evals.adapter", "dsv3.lifecycle.verifiable"),
    "serve": ("dsv3.serve.smoke", "dsv3.serve.server", "dsv3.serve.cli"),  # after ORDER: the champion's smoke
}
DATA_FILES = {"eval": ("evals/tasks",)}  # non-Python files a stage reads (repository-relative)
KEY_TAG = "lifecycle_key"
SRC = Path(__file__).resolve().parents[2]  # the checkout holding dsv3/


@dataclass
class StageKey:
    stage: str
    key: str
    config_digest: str
    code_digest: str
    inputs: dict[str, str] = field(default_factory=dict)


# ---- code version --------------------------------------------------------------------------
@lru_cache(maxsize=1)
def _modules() -> dict[str, Path]:
    out = {}
    for p in sorted((SRC / "dsv3").rglob("*.py")):
        parts = p.relative_to(SRC).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return out


def _left_out(mod: str) -> bool:
    """Config modules (their values are hashed as the section) and tracking (logging only)."""
    return (mod in ("dsv3.errors", "dsv3.config_base", "dsv3.config") or mod.endswith(".config")
            or mod.startswith("dsv3.tracking"))


@lru_cache(maxsize=None)
def _imports(mod: str) -> frozenset[str]:
    """Modules of dsv3 that `mod` imports anywhere (also inside functions)."""
    mods, path = _modules(), _modules()[mod]
    found = set()
    for n in ast.walk(ast.parse(path.read_text())):
        if isinstance(n, ast.Import):
            names = [a.name for a in n.names]
        elif isinstance(n, ast.ImportFrom):
            base = n.module or ""
            if n.level:
                pkg = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
                pkg = pkg.rsplit(".", n.level - 1)[0] if n.level > 1 else pkg
                base = f"{pkg}.{base}" if base else pkg
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in n.names]
        else:
            continue
        for name in names:
            while name and name not in mods:
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
    return frozenset(found)


def closure(roots: tuple[str, ...]) -> list[str]:
    """The dsv3 modules `roots` import, directly or not, without the left-out ones."""
    seen, todo = set(), [r for r in roots if not _left_out(r)]
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        todo += [x for x in _imports(m) if x not in seen and not _left_out(x)]
    return sorted(seen)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@lru_cache(maxsize=None)
def code_digest(stage: str) -> str:
    """sha256 of (path, content hash) of every source file the stage uses."""
    files = [_modules()[m] for m in closure(ROOTS[stage])]
    for d in DATA_FILES.get(stage, ()):
        files += sorted(p for p in (SRC / d).rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    listing = [(p.relative_to(SRC).as_posix(), _sha(p)) for p in sorted(set(files))]
    return hashlib.sha256(json.dumps(listing).encode()).hexdigest()


# ---- keys ---------------------------------------------------------------------------------------
def stage_key(cfg, stage: str, inputs: dict[str, str] | None = None) -> StageKey:
    """The identity of `stage` run with `cfg` on `inputs` ({"data": digest, "parent": models:/N/V, ...})."""
    inputs = {k: str(v) for k, v in (inputs or {}).items() if v is not None}
    section = cfg.section(stage)
    cdig, code = tracking.config_digest(section), code_digest(stage)
    blob = json.dumps({"stage": stage, "config": cdig, "code": code, "inputs": inputs}, sort_keys=True)
    return StageKey(stage, hashlib.sha256(blob.encode()).hexdigest()[:32], cdig, code, inputs)


def check_force(force: str | None) -> str | None:
    if force is not None and force not in ORDER:
        raise ValueError(f"--force {force!r}: not a lifecycle stage; choose one of {', '.join(ORDER)}")
    return force


def use_cache(cfg, stage: str, force: str | None) -> bool:
    """Whether a hit may be reused: caching on, and `stage` is before the forced one (the serve smoke,
    not in ORDER, comes after every stage: any `--force` re-runs it)."""
    return cfg.lifecycle.cache and (force is None or (stage in ORDER and ORDER.index(stage) < ORDER.index(force)))


# ---- hits -----------------------------------------------------------------------------------------
def model_name(cfg, stage: str) -> str:
    return tracking.stage_model_name(MODEL_OF[stage], cfg.tracking.registered_model)


def cached_model(cfg, sk: StageKey) -> dict | None:
    """The registered version made by a finished run of this exact stage, if its files still resolve."""
    sm = tracking.find_model_version(model_name(cfg, sk.stage), {KEY_TAG: sk.key})
    if sm is None or not tracking.model_files_exist(sm.uri):  # files gone: not a hit
        return None
    return {"uri": sm.uri, "name": sm.name, "version": sm.version, "run_id": sm.run_id, "aliases": sm.aliases}


def cached_run(cfg, sk: StageKey, data_dir: str | None = None) -> dict | None:
    """A finished run tagged with this key (data / eval stages). For the data stage, the digest it
    recorded must also be the digest of the shards on disk now."""
    run = tracking.find_run({KEY_TAG: sk.key}, cfg.tracking.experiment)
    if run is None:
        return None
    tags = run.data.tags
    if data_dir is not None:
        from dsv3.data.version import data_digest

        try:
            if tags.get("dvc_data_digest") != data_digest(Path(data_dir) / "shards"):
                return None
        except FileNotFoundError:
            return None
    return {"run_id": run.info.run_id, "metrics": dict(run.data.metrics), "tags": dict(tags)}


def needs_eval_data(cfg) -> bool:
    """Whether the lifecycle needs the offline benchmark data before it starts: the benchmarks it scores,
    or the eval sets curation decontaminates against (`data.decontam.paths`, by default where
    `make eval-data` writes)."""
    d = cfg.data.decontam
    return bool(cfg.eval.tasks) or (d.enabled and bool(d.paths))


def prepared(cfg):
    """`cfg` as the lifecycle runs it, or a ConfigError naming what cannot be: models must be registered
    (the hand-off), training reads the data stage's shards (the data digest is an input of its key),
    post-training starts from the model the lifecycle extends. Bits-per-byte is measured on the data
    stage's validation split unless `eval.bpb_shards` names other shards."""
    from dsv3.errors import ConfigError

    shards = Path(cfg.data.out_dir) / "shards"
    if not cfg.train.register_model:
        raise ConfigError("train.register_model: the lifecycle hands models on through the registry; it must be true")
    if cfg.train.shards and Path(cfg.train.shards).resolve() != shards.resolve():
        raise ConfigError(f"train.shards: the lifecycle trains on the data stage's shards ({shards}); "
                          f"leave it unset (got {cfg.train.shards})")
    if cfg.posttrain.init:
        raise ConfigError("posttrain.init: the lifecycle post-trains the model it extends; leave it unset "
                          f"(got {cfg.posttrain.init}); `make posttrain --init` runs post-training alone")
    if cfg.eval.bpb_shards is None:
        cfg = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"bpb_shards": str(shards)})})
    return cfg
