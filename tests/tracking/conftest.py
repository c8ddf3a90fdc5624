"""Fixtures: a tiny random dsv3 model in HF format with a byte-level BPE tokenizer trained by
dsv3.data.tokenizer (the chat special tokens included), and fresh SQLite MLflow stores."""

import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

CORPUS = ([f"{a}+{b}={a + b}" for a in range(20) for b in range(20)]
          + ["The quick brown fox jumps over the lazy dog.", "def add(a, b):\n    return a + b\n"] * 20)


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    import torch

    torch.set_num_threads(1)  # 2 shared cores


def make_model(out: Path, seed: int = 0) -> Path:
    """save_pretrained of a tiny random DeepSeekV3 + the tokenizer files: a stage model dir."""
    import torch

    from dsv3 import DeepSeekV3, ModelConfig
    from dsv3.data.config import TokenizerConfig
    from dsv3.data.tokenizer import load_tokenizer, train_tokenizer

    train_tokenizer(CORPUS, out, TokenizerConfig(vocab_size=320, min_frequency=1))
    tok = load_tokenizer(out)
    torch.manual_seed(seed)
    cfg = ModelConfig.preset("tiny", vocab_size=len(tok), initializer_range=0.1, bos_token_id=tok.bos_token_id,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    DeepSeekV3(cfg).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def hf_model(tmp_path_factory) -> Path:
    return make_model(tmp_path_factory.mktemp("hf"))


@pytest.fixture(scope="session")
def empty_db(tmp_path_factory) -> Path:
    """An initialised, empty MLflow SQLite DB (creating the schema costs seconds: copy it)."""
    from mlflow.tracking import MlflowClient

    db = tmp_path_factory.mktemp("emptydb") / "mlruns.db"
    MlflowClient(f"sqlite:///{db}").search_experiments()
    return db


def use_store(root: Path, monkeypatch) -> str:
    """Point $MLFLOW_TRACKING_URI and mlflow's global URI at `root`/mlruns.db."""
    import mlflow

    uri = f"sqlite:///{root}/mlruns.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    monkeypatch.chdir(root)
    return uri


@pytest.fixture()
def store(tmp_path, empty_db, monkeypatch) -> Path:
    """A fresh store for one test: $MLFLOW_TRACKING_URI = sqlite:///<tmp>/mlruns.db."""
    import mlflow

    shutil.copy(empty_db, tmp_path / "mlruns.db")
    use_store(tmp_path, monkeypatch)
    yield tmp_path
    mlflow.set_tracking_uri(None)  # then monkeypatch restores the environment


FLOW_RUN_ID = "5d1c0a4e-0000-4000-8000-00000000f10w"


def next_stage(parent_uri: str, out: Path, noise: float) -> Path:
    """A 'trained' successor: the parent read back through the registry, weights perturbed."""
    import torch

    from dsv3 import DeepSeekV3, tracking
    from dsv3.train.checkpoint import TOKENIZER_FILES

    src = Path(tracking.resolve_model_uri(parent_uri))
    m = DeepSeekV3.from_pretrained(src)
    g = torch.Generator().manual_seed(int(noise * 1000))
    with torch.no_grad():
        for p in m.parameters():
            p.add_(noise * torch.randn(p.shape, generator=g))
    m.save_pretrained(out)
    for f in TOKENIZER_FILES:
        shutil.copy(src / f, out / f)
    return out


@pytest.fixture(scope="session")
def _chain(tmp_path_factory, empty_db, hf_model):
    """dsv3-base → dsv3-long → dsv3-chat registered under one lifecycle-like parent run (data
    digest tagged on it, a Prefect flow-run id in the environment); each stage reads its parent
    through the registry (`@candidate`) and records the concrete version it started from."""
    from dsv3 import tracking

    root = tmp_path_factory.mktemp("chain")
    shutil.copy(empty_db, root / "mlruns.db")
    mp = pytest.MonkeyPatch()
    use_store(root, mp)
    mp.setenv("PREFECT__FLOW_RUN_ID", FLOW_RUN_ID)
    sections = {"base": {"lr": 3e-3, "steps": 10}, "long": {"yarn_factor": 4}, "chat": {"sft": {"lr": 1e-3}}}
    runs, models, dirs = {}, {}, {"base": hf_model}
    try:
        with tracking.start_run({"name": "lifecycle"}, stage="lifecycle") as parent:
            tracking.log_dataset_input("a3f9c2d1e5b7a3f9c2d1e5b7a3f9c2d1", "shards", str(root))
            for stage, prev in (("base", None), ("long", "base"), ("chat", "long")):
                with tracking.start_run(sections[stage], stage=stage) as run:
                    parent_uri = f"models:/dsv3-{prev}@candidate" if prev else None
                    if prev:
                        dirs[stage] = next_stage(parent_uri, root / f"{stage}_out", noise=0.01 * len(runs))
                    models[stage] = tracking.register_stage_model(
                        dirs[stage], f"dsv3-{stage}", parent_model=parent_uri, config=sections[stage],
                        data_digest="5ft-sha256-of-sft-data" if stage == "chat" else None)
                    runs[stage] = run.info.run_id
    finally:
        import mlflow

        mlflow.set_tracking_uri(None)
        mp.undo()  # other test modules must not see this store
    return {"root": root, "uri": f"sqlite:///{root}/mlruns.db", "parent_run": parent.info.run_id,
            "runs": runs, "models": models, "dirs": dirs, "sections": sections}


@pytest.fixture()
def chain(_chain, monkeypatch):
    """The session's registered chain, with this test pointed at its store."""
    import mlflow

    use_store(_chain["root"], monkeypatch)
    yield _chain
    mlflow.set_tracking_uri(None)
