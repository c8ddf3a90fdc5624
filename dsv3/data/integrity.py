"""Check DVC-tracked data against dvc.lock without trusting DVC's shortcuts.

What DVC 3.67 does with a damaged copy (measured in tests/faults/test_dvc_cache.py; the
logic is dvc_data's `LocalHashFileDB.check` and its state database):
- a workspace out rewritten in place is re-hashed (its mtime moved): `dvc status` says
  `modified`, `dvc repro` checks the good copy out of the cache;
- a cache object that was made writable and changed is re-hashed, found corrupted and
  deleted (`not in cache`), and `dvc repro` re-runs the stage;
- a cache object that is still read-only (mode 0444, as DVC leaves it) is trusted without
  hashing. Bit rot, or a write by root, passes `dvc status`; `dvc checkout` puts the damaged
  object in the workspace; `dvc push` uploads it under the good name; and `dvc pull`
  installs it unless the remote has `verify = true` (then it is refused as missing).
  There is no `dvc fsck` in 3.x.
`verify_outs(repo, stages)` re-hashes, with md5 as DVC does, every workspace file and every
cache object of the stages' outs in dvc.lock (a `.dir` object is the md5 of its own JSON
listing, so it is checked the same way). `repair=True` deletes each corrupted copy, which
DVC then sees as missing: `dvc repro` checks out the surviving good copy or re-runs the
stage, and `dvc pull` fetches it again from a remote. Cost: one md5 read of the outs and of
their cache objects (md5 runs at about 0.3-0.5 GB/s per core, so a few seconds per GB).
Token shards carry their own faster checksums (dsv3.data.shards); this covers every stage.

    python -m dsv3.data.integrity [REPO] [--stage curate ...] [--repair]   (exit 1 on a problem)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

DATA_STAGES = ("curate", "tokenizer", "shards")


@dataclass
class Problem:
    kind: str  # cache_corrupt | workspace_corrupt | workspace_missing
    path: str  # the file at fault
    stage: str
    out: str  # the dvc.lock out it belongs to
    expected: str
    got: str | None = None

    def __str__(self) -> str:
        got = f", found {self.got}" if self.got else ""
        return f"{self.kind}: {self.path} (stage {self.stage!r}, out {self.out}: dvc.lock md5 {self.expected}{got})"


@dataclass
class IntegrityReport:
    files: int = 0
    bytes: int = 0
    problems: list[Problem] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def text(self) -> str:
        head = f"checked {self.files} files ({self.bytes} bytes): " + ("OK" if self.ok else f"{len(self.problems)} problem(s)")
        return "\n".join([head, *(f"  {p}" for p in self.problems), *(f"  removed {r}" for r in self.repaired)])


def md5_file(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(16 << 20):
            h.update(chunk)
    return h.hexdigest()


def cache_dir(repo: Path) -> Path:
    """DVC's own answer (`dvc cache dir`), so a configured cache location is honoured."""
    env = {**os.environ, "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
    r = subprocess.run([sys.executable, "-m", "dvc", "cache", "dir"], cwd=repo, env=env, capture_output=True,
                       text=True, timeout=120)
    if r.returncode:
        raise RuntimeError(f"`dvc cache dir` failed in {repo}: {r.stderr.strip()[-500:]}")
    return Path(r.stdout.strip().splitlines()[-1])


def _obj(cache: Path, md5: str) -> Path:
    return cache / "files" / "md5" / md5[:2] / md5[2:]


def _lock_outs(repo: Path, stages) -> list[tuple[str, dict]]:
    lock = repo / "dvc.lock"
    if not lock.is_file():
        raise FileNotFoundError(f"no dvc.lock in {repo}: run `dvc repro` first")
    st = yaml.safe_load(lock.read_text()).get("stages", {})
    missing = [s for s in stages if s not in st]
    if missing:
        raise KeyError(f"{lock}: no stage(s) {missing} (have {sorted(st)})")
    return [(s, o) for s in stages for o in st[s].get("outs", [])]


def _check(report: IntegrityReport, path: Path, md5: str, kind: str, stage: str, out: str, must_exist: bool) -> bool:
    """True when `path` is present and hashes to md5; records a Problem otherwise."""
    if not path.is_file():
        if must_exist:
            report.problems.append(Problem("workspace_missing", str(path), stage, out, md5))
        return False
    got = md5_file(path)
    report.files += 1
    report.bytes += path.stat().st_size
    if got != md5:
        report.problems.append(Problem(kind, str(path), stage, out, md5, got))
        return False
    return True


def _dir_md5(d: Path, report: IntegrityReport) -> str | None:
    """DVC's md5 of a directory out: md5 of the sorted JSON listing [{"md5", "relpath"}] + ".dir"."""
    if not d.is_dir():
        return None
    files = sorted(p for p in d.rglob("*") if p.is_file())
    report.files += len(files)
    report.bytes += sum(p.stat().st_size for p in files)
    listing = sorted(({"md5": md5_file(p), "relpath": p.relative_to(d).as_posix()} for p in files),
                     key=lambda e: e["relpath"])
    return hashlib.md5(json.dumps(listing, sort_keys=True).encode()).hexdigest() + ".dir"


def verify_outs(repo: str | Path = ".", stages=DATA_STAGES, repair: bool = False) -> IntegrityReport:
    """Re-hash the stages' outs (workspace) and their DVC cache objects against dvc.lock."""
    repo = Path(repo).resolve()
    cache = cache_dir(repo)
    rep = IntegrityReport()
    for stage, o in _lock_outs(repo, stages):
        out, md5 = o["path"], o["md5"]
        if not md5.endswith(".dir"):
            _check(rep, _obj(cache, md5), md5, "cache_corrupt", stage, out, must_exist=False)
            _check(rep, repo / out, md5, "workspace_corrupt", stage, out, must_exist=True)
            continue
        listing = _obj(cache, md5)
        entries = None
        if _check(rep, listing, md5.removesuffix(".dir"), "cache_corrupt", stage, out, must_exist=False):
            entries = json.loads(listing.read_text())
        if entries is None:  # no trustworthy listing in the cache: hash the workspace dir as DVC does
            got = _dir_md5(repo / out, rep)
            if got is None:
                rep.problems.append(Problem("workspace_missing", str(repo / out), stage, out, md5))
            elif got != md5:
                rep.problems.append(Problem("workspace_corrupt", str(repo / out), stage, out, md5, got))
            continue
        for e in entries:
            _check(rep, _obj(cache, e["md5"]), e["md5"], "cache_corrupt", stage, out, must_exist=False)
            _check(rep, repo / out / e["relpath"], e["md5"], "workspace_corrupt", stage, out, must_exist=True)
    if repair:
        for p in rep.problems:
            if p.kind in ("cache_corrupt", "workspace_corrupt") and Path(p.path).is_file():
                Path(p.path).unlink()
                rep.repaired.append(p.path)
    return rep


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dsv3.data.integrity", description=__doc__.splitlines()[0])
    ap.add_argument("repo", nargs="?", default=".")
    ap.add_argument("--stage", action="append", default=None, help=f"stage(s) to check (default {DATA_STAGES})")
    ap.add_argument("--repair", action="store_true", help="delete corrupted copies so `dvc repro` restores them")
    a = ap.parse_args(argv)
    rep = verify_outs(a.repo, tuple(a.stage or DATA_STAGES), repair=a.repair)
    print(rep.text())
    return 0 if rep.ok else 1


if __name__ == "__main__":
    sys.exit(main())
