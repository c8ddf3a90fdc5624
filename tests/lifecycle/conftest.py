"""Fixtures: a temporary git + DVC repository shaped like this one (dsv3/ for the data stages' code
deps, dvc.yaml, params.yaml, configs/) with its own MLflow store, the working directory moved there,
so a flow run writes data/, runs/, checkpoints/ and mlruns.db inside it and nowhere else."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from ..dvc_helpers import ROOT, init_repo

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
TINY = "configs/lifecycle_tiny.yaml"


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    import torch

    torch.set_num_threads(1)  # 2 shared cores


def make_repo(r: Path) -> Path:
    shutil.copytree(ROOT / "dsv3", r / "dsv3", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "configs", r / "configs")
    for f in ("dvc.yaml", "params.yaml"):
        shutil.copy(ROOT / f, r / f)
    (r / ".gitignore").write_text("/data/\n/runs/\n/checkpoints/\n/gx/\nmlruns.db\nmlartifacts/\n")
    init_repo(r)
    return r


@pytest.fixture(scope="session")
def empty_db(tmp_path_factory) -> Path:
    """An initialised, empty MLflow SQLite DB (creating the schema costs ~15 s on a loaded box: copy it)."""
    from mlflow.tracking import MlflowClient

    db = tmp_path_factory.mktemp("emptydb") / "mlruns.db"
    MlflowClient(f"sqlite:///{db}").search_experiments()
    return db


@pytest.fixture
def repo(tmp_path, monkeypatch, empty_db) -> Path:
    """A fresh repository and MLflow store; the test runs inside it."""
    import mlflow

    r = make_repo(tmp_path / "repo")
    shutil.copy(empty_db, r / "mlruns.db")
    monkeypatch.chdir(r)
    uri = f"sqlite:///{r}/mlruns.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    yield r
    mlflow.set_tracking_uri(None)
