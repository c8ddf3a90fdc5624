"""Fixtures for dsv3.train tests: tiny shards, tiny configs, an MLflow store in tmp."""

from __future__ import annotations

import numpy as np
import pytest

from dsv3.config import RunConfig
from dsv3.data.shards import write_split


def make_shards(d, vocab: int = 512, n_docs: int = 200, seed: int = 0) -> str:
    """Learnable synthetic documents: noisy arithmetic sequences ending with EOS (=1)."""
    rng = np.random.default_rng(seed)

    def docs(n):
        for _ in range(n):
            start, step, L = rng.integers(2, vocab), rng.integers(1, 7), rng.integers(20, 120)
            doc = (start + step * np.arange(L)) % (vocab - 2) + 2
            yield np.append(doc, 1)

    write_split(d, "train", list(docs(n_docs)), vocab, n_bytes=n_docs * 70 * 3)
    write_split(d, "val", list(docs(max(20, n_docs // 10))), vocab, n_bytes=max(20, n_docs // 10) * 70 * 3)
    return str(d)


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("shards"))


@pytest.fixture
def mlflow_uri(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path}/mlruns.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


def tiny_cfg(shards: str, out_dir, *overrides: str) -> RunConfig:
    ov = [f"train.shards={shards}", f"train.out_dir={out_dir}", f"train.tokenizer={out_dir}/no-tokenizer", "train.seq_len=32", "train.batch_size=4",
          "train.steps=6", "train.eval_every=3", "train.eval_batches=2", "train.ckpt_every=3",
          "train.threads=1", "train.plots=false", "train.precision=fp32", "train.warmup_frac=0.2",
          "train.log_checkpoints=false", "train.register_model=false", *overrides]
    return RunConfig.load("configs/pretrain_tiny.yaml", ov)
