"""Atomic, checksummed, rotating training checkpoints.

Layout of `<out_dir>/checkpoints/step_00000123/`:
    model/               HF format (config.json + safetensors via `model.save_pretrained`)
                         plus the tokenizer files: what every later stage consumes
    optimizer.pt         `optimizer.state_dict()` (tensors + numbers: loads with weights_only=True)
    ema.safetensors      CPU EMA of the weights (if enabled)
    extra.safetensors    RNG state (torch CPU/CUDA) and the routing biases (also in model/)
    state.json           step, data position, tokens seen, spike-guard state, MLflow run id
    manifest.json        sha256 of every file above; written last

Design choices
- Atomic: everything is written into `.tmp-step_...` and the directory is renamed into
  place (a rename is atomic on POSIX), so a SIGKILL mid-write leaves only a temp dir,
  which is ignored and swept on the next save. Files are fsync'ed before the rename and the
  parent directory after it. Deleting (keep-last-K, or an older copy of the same step) also
  renames first and removes second, so no half-deleted `step_*` directory is ever seen.
- A failed write (disk full, file-size limit, I/O error) removes its temp dir and raises one
  `CheckpointError` naming the checkpoint, the file being written and the cause (`No space left
  on device`), and that the previous checkpoint is untouched; `dsv3 ...` prints it as one line.
- Fault injection (tests/faults/test_checkpoint_faults.py): `DSV3_CKPT_FAULT=<point>[@<step>],...`
  makes `save` write `<root>/.fault-<point>` and pause (`DSV3_CKPT_FAULT_WAIT` s, default 60) at
  that point, so a test can SIGKILL the real process inside the write (`FAULT_POINTS`).
- Integrity: `latest()` walks checkpoints newest first and verifies the manifest and
  every checksum; a truncated or corrupt one is skipped with a warning and the
  previous one is used.
- Safe loading: safetensors and `torch.load(weights_only=True)` only; no arbitrary
  unpickling. The scheduler needs no state beyond `step` (schedules are pure functions
  of the step, see lr_schedule.py); the data loader needs only the sample position.
- keep-last-K: older complete checkpoints are deleted after a successful save.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from dsv3.errors import CheckpointError  # noqa: F401  (raised here; importable from here too)

log = logging.getLogger("dsv3.train")

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def _fsync_tree(d: Path) -> None:
    for p in sorted(d.rglob("*")):
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def copy_tokenizer(tok_dir: str | Path | None, dst: Path) -> None:
    if not tok_dir:
        return
    src = Path(tok_dir)
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)


def routing_biases(model) -> torch.Tensor:
    layers = model.moe_layers() if hasattr(model, "moe_layers") else []
    if not layers:
        return torch.zeros(0)
    return torch.stack([m.gate.e_score_correction_bias.detach().float().cpu() for m in layers])


FAULT_POINTS = ("model", "optimizer", "ema", "extra", "state", "manifest", "synced", "renamed", "pruning")


def _fault_point(root: Path, point: str, step: int) -> None:
    """The test hook (module docstring): pause at `point` of `save` when $DSV3_CKPT_FAULT names it."""
    spec = os.environ.get("DSV3_CKPT_FAULT")
    if not spec:
        return
    for item in spec.split(","):
        name, _, at = item.strip().partition("@")
        if name == point and (not at or int(at) == step):
            (root / f".fault-{point}").write_text(str(os.getpid()))
            time.sleep(float(os.environ.get("DSV3_CKPT_FAULT_WAIT", "60")))


def _fsync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sweep(ckpt_root: str | Path) -> list[Path]:
    """Remove what interrupted saves and deletions left (`.tmp-*`); the writer calls it before each save."""
    stale = sorted(Path(ckpt_root).glob(".tmp-*"))
    for d in stale:
        shutil.rmtree(d, ignore_errors=True)
    return stale


def _discard(root: Path, d: Path, step: int) -> None:
    """Delete a checkpoint directory: rename it out of sight first (atomic), then remove it."""
    doomed = root / f".tmp-drop-{d.name}-{os.getpid()}"
    os.replace(d, doomed)
    _fault_point(root, "pruning", step)
    shutil.rmtree(doomed, ignore_errors=True)


def _cause(e: BaseException, where: Path) -> str:
    """The OS-level reason behind a failed write (torch and safetensors hide it in their own errors)."""
    seen: BaseException | None = e
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno:
            return os.strerror(seen.errno)
        m = re.search(r"os error (\d+)", str(seen))
        if m:
            return os.strerror(int(m.group(1)))
        seen = seen.__cause__ or seen.__context__
    with contextlib.suppress(OSError):
        if shutil.disk_usage(where).free < (1 << 20):
            return f"{os.strerror(28)} (free: {shutil.disk_usage(where).free} bytes)"
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def _write_files(tmp: Path, step: int, model, optimizer, state: dict[str, Any], ema, tokenizer_dir,
                 doing: list[str]) -> None:
    """Every file of one checkpoint into `tmp`, manifest last; `doing[-1]`: the file being written."""
    root = tmp.parent
    doing.append("model/")
    (tmp / "model").mkdir()
    model.save_pretrained(tmp / "model")
    copy_tokenizer(tokenizer_dir, tmp / "model")
    _fault_point(root, "model", step)
    doing.append("optimizer.pt")
    with open(tmp / "optimizer.pt", "wb") as f:  # a Python file: a failed write keeps its OSError
        torch.save(optimizer.state_dict(), f)
    _fault_point(root, "optimizer", step)
    if ema is not None:
        doing.append("ema.safetensors")
        save_file({k: v.contiguous() for k, v in ema.state_dict().items()}, tmp / "ema.safetensors")
        _fault_point(root, "ema", step)
    doing.append("extra.safetensors")
    extra = {"rng_cpu": torch.get_rng_state(), "routing_biases": routing_biases(model)}
    if torch.cuda.is_available():
        extra["rng_cuda"] = torch.cuda.get_rng_state()
    save_file(extra, tmp / "extra.safetensors")
    _fault_point(root, "extra", step)
    doing.append("state.json")
    (tmp / "state.json").write_text(json.dumps({**state, "step": step}, indent=1))
    _fault_point(root, "state", step)
    doing.append("manifest.json")
    files = {str(p.relative_to(tmp)): sha256(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
    (tmp / "manifest.json").write_text(json.dumps({"step": step, "files": files}, indent=1))
    _fault_point(root, "manifest", step)
    doing.append("(fsync)")
    _fsync_tree(tmp)
    _fault_point(root, "synced", step)


def save(ckpt_root: str | Path, step: int, model, optimizer, state: dict[str, Any], ema=None,
         tokenizer_dir: str | Path | None = None, keep_last: int = 2) -> Path:
    """Write checkpoint `step` atomically (module docstring); returns its directory. A failed write
    raises CheckpointError (checkpoint, file, cause) and leaves nothing of itself behind."""
    root = Path(ckpt_root)
    root.mkdir(parents=True, exist_ok=True)
    sweep(root)
    name = f"step_{step:08d}"
    final, tmp = root / name, root / f".tmp-{name}-{os.getpid()}"
    doing = ["its temp directory"]
    try:
        tmp.mkdir()
        _write_files(tmp, step, model, optimizer, state, ema, tokenizer_dir, doing)
        doing.append("the rename into place")
        if final.exists():  # the same step saved again (after a rollback): move the old copy aside first
            os.replace(final, root / f".tmp-drop-{name}-{os.getpid()}")
        os.replace(tmp, final)
        _fsync_dir(root)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if not isinstance(e, Exception):
            raise
        prev = next((d for d in list_checkpoints(root) if (d / "manifest.json").is_file()), None)
        raise CheckpointError(f"could not write checkpoint {final}: {_cause(e, root)} (writing {doing[-1]}); "
                              f"the partial write was removed, the previous checkpoint "
                              f"{prev or '(none)'} is untouched") from e
    _fault_point(root, "renamed", step)
    _prune(root, keep_last, step)
    sweep(root)
    return final


def _prune(root: Path, keep_last: int, step: int = 0) -> None:
    done = sorted(p for p in root.glob("step_*") if (p / "manifest.json").is_file())
    for old in done[:-keep_last]:
        with contextlib.suppress(OSError):
            _discard(root, old, step)


def verify(ckpt: str | Path) -> None:
    d = Path(ckpt)
    man = d / "manifest.json"
    if not man.is_file():
        raise CheckpointError(f"{d}: no manifest.json (incomplete checkpoint)")
    try:
        files = json.loads(man.read_text())["files"]
    except (json.JSONDecodeError, KeyError) as e:
        raise CheckpointError(f"{man}: unreadable ({e})") from None
    for rel, digest in files.items():
        p = d / rel
        if not p.is_file():
            raise CheckpointError(f"{d}: missing {rel}")
        if sha256(p) != digest:
            raise CheckpointError(f"{d}: checksum mismatch in {rel}")


def list_checkpoints(ckpt_root: str | Path) -> list[Path]:
    root = Path(ckpt_root)
    return sorted(root.glob("step_*"), reverse=True) if root.is_dir() else []


def latest(ckpt_root: str | Path) -> Path | None:
    """Newest checkpoint that verifies; corrupt ones are skipped with a warning."""
    for d in list_checkpoints(ckpt_root):
        try:
            verify(d)
            return d
        except CheckpointError as e:
            msg = f"skipping corrupt checkpoint: {e}; falling back to the previous one"
            warnings.warn(msg, RuntimeWarning, stacklevel=2)
            log.warning(msg)
    return None


@torch.no_grad()
def load_model_weights(model, model_dir: str | Path, strict: bool = True) -> None:
    """Copy the HF-format weights of `model_dir` into `model` (same architecture)."""
    src = type(model).from_pretrained(model_dir) if hasattr(type(model), "from_pretrained") else None
    sd = src.state_dict()
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.endswith("load")]
    if strict and (missing or unexpected):
        raise CheckpointError(f"{model_dir}: weights do not match the model "
                              f"(missing {missing[:5]}, unexpected {unexpected[:5]})")


def load(ckpt: str | Path, model, optimizer=None, ema=None, part=None) -> dict[str, Any]:
    """Restore everything into live objects; returns state.json (step, data position, ...).
    `part`: a sharded layout (dsv3.train.expert_step.ExpertStep, dsv3.train.pipeline_step.PipelineStep) whose
    `load_weights(model, whole_state_dict)`, `local_optimizer_state(optimizer, whole_state_dict)` and
    `local_ema_state(ema, whole_ema)` keep this rank's part of the whole checkpoint (which every rank reads)."""
    d = Path(ckpt)
    verify(d)
    if part is None:
        load_model_weights(model, d / "model")
    else:
        with torch.no_grad():
            part.load_weights(model, type(model).from_pretrained(d / "model").state_dict())
    extra = load_file(d / "extra.safetensors")
    if "routing_biases" in extra and extra["routing_biases"].numel():
        with torch.no_grad():
            for m, b in zip(model.moe_layers(), extra["routing_biases"]):
                m.gate.e_score_correction_bias.copy_(b)
    if optimizer is not None:
        full = torch.load(d / "optimizer.pt", weights_only=True, map_location="cpu")
        optimizer.load_state_dict(full if part is None else part.local_optimizer_state(optimizer, full))
    if ema is not None and (d / "ema.safetensors").is_file():
        ema_state = load_file(d / "ema.safetensors")
        ema.load_state_dict(ema_state if part is None else part.local_ema_state(ema, ema_state))
    torch.set_rng_state(extra["rng_cpu"])
    if "rng_cuda" in extra and torch.cuda.is_available():
        torch.cuda.set_rng_state(extra["rng_cuda"])
    return json.loads((d / "state.json").read_text())


def merge_optimizer_state(param_groups: list[dict], group_names: list[list[str]], state: dict[str, dict]) -> dict:
    """The whole model's optimizer state_dict from per-parameter states gathered by name: `group_names[g]`
    = the whole model's parameter names of group g in the optimizer's order (indices are numbered over
    the groups in order, as torch does), `param_groups` = the groups' hyper-parameters."""
    index = {n: i for i, n in enumerate(n for names in group_names for n in names)}
    groups, start = [], 0
    for pg, names in zip(param_groups, group_names):
        groups.append({**pg, "params": list(range(start, start + len(names)))})
        start += len(names)
    return {"state": {index[n]: st for n, st in sorted(state.items(), key=lambda kv: index[kv[0]])},
            "param_groups": groups}


def slice_optimizer_state(full: dict, group_names: list[list[str]], local_names: list[list[str]],
                          to_whole=lambda n: n, keep=None) -> dict:
    """This rank's optimizer state_dict from a whole one (`merge_optimizer_state`'s layout): `local_names[g]`
    = this rank's parameter names of group g in its optimizer's order, `to_whole(local name)` = the name in
    the whole model, `keep(local name)` (default: all) = whether this rank takes that parameter's state."""
    index = {n: i for i, n in enumerate(n for names in group_names for n in names)}
    local, groups, start = {}, [], 0
    for pg, names in zip(full["param_groups"], local_names):
        for k, n in enumerate(names):
            i = index[to_whole(n)]
            if i in full["state"] and (keep is None or keep(n)):
                local[start + k] = full["state"][i]
        groups.append({**pg, "params": list(range(start, start + len(names)))})
        start += len(names)
    return {"state": local, "param_groups": groups}


class StateDict:
    """What `save` needs of an optimizer / EMA: `state_dict()` (for states assembled from several ranks)."""

    def __init__(self, sd: dict):
        self.sd = sd

    def state_dict(self) -> dict:
        return self.sd
