"""Running real git / dvc commands in a temporary repository (shared by the DVC tests)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).parents[1]
ENV = {**os.environ, "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
       "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}


def sh(repo: Path, *cmd: str) -> str:
    r = subprocess.run(list(cmd), cwd=repo, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"{cmd}: {r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    return r.stdout


def dvc(repo: Path, *args: str) -> str:
    return sh(repo, sys.executable, "-m", "dvc", *args)


def init_repo(repo: Path, remote: Path | None = None) -> Path:
    """`git init` + `dvc init` (analytics off, `remote` as the default DVC remote) and a first
    commit of what `repo` holds."""
    sh(repo, "git", "init", "-q")
    dvc(repo, "init", "-q")
    dvc(repo, "config", "core.analytics", "false")
    if remote is not None:
        dvc(repo, "remote", "add", "-d", "local", str(remote))
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "init")
    return repo


def tiny_data_repo(r: Path, gitignore: str, *, dirs: tuple[str, ...] = ("dsv3",), data_only: bool = True,
                   files: tuple[str, ...] = (), remote: Path | None = None) -> Path:
    """A git + DVC repo at `r` holding the project's `dirs`, its dvc.yaml (only the data flow's
    stages when `data_only`), `files`, a planted corpus (tests/data/conftest.make_corpus) and
    params.yaml sized for it (64-token sequences, a 320-token vocabulary); committed."""
    from dsv3.data.version import DATA_STAGES

    from .data.conftest import make_corpus

    for d in dirs:
        shutil.copytree(ROOT / d, r / d, ignore=shutil.ignore_patterns("__pycache__"))
    if data_only:  # curate, tokenizer, shards and the GX `validate` stage (not sft_data)
        spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())
        spec["stages"] = {k: v for k, v in spec["stages"].items() if k in DATA_STAGES}
        assert list(spec["stages"]) == list(DATA_STAGES), list(spec["stages"])
        (r / "dvc.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    else:
        shutil.copy(ROOT / "dvc.yaml", r / "dvc.yaml")
    for f in files:
        shutil.copy(ROOT / f, r / f)
    make_corpus(r / "corpus")
    p = yaml.safe_load((ROOT / "params.yaml").read_text())
    d = p["data"]
    d.update(sources=["corpus"], seq_len=64)
    d["source"]["max_doc_bytes"] = 8000
    d["decontam"]["paths"] = []
    d["split"]["val_fraction"] = 0.2
    d["tokenizer"].update(vocab_size=320, min_frequency=1)
    (r / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    (r / ".gitignore").write_text(gitignore)
    return init_repo(r, remote)
