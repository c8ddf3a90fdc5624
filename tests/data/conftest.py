"""Shared fixtures: a small planted corpus (exact / near duplicates, PII, contamination, junk,
corrupt lines) and a DataConfig sized so each pipeline run takes about a second."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from dsv3.data.config import DataConfig

WORDS = ("the of and to with that have be model data train layer expert token quality source "
         "python paper result method value table figure section network attention memory cache "
         "reason answer question large small fast slow early later first second system design "
         "choice budget cluster compute sequence batch length window context prompt sample "
         "number metric score curve loss gradient update step schedule warmup decay weight "
         "matrix vector tensor kernel thread block device host buffer stream event queue "
         "worker driver record index shard file folder path branch commit review change").split()
PII_TEXT = ("Contact alice.smith@example.com or call +1 415-555-0132; server at 93.184.216.34 and "
            "2a00:1450:4001:81b::200e; card 4111 1111 1111 1111; key AKIAIOSFODNN7EXAMPLE; token "
            "ghp_abcdefghijklmnopqrstuvwxyz0123456789AB; -----BEGIN RSA PRIVATE KEY-----\nMIIEow\n"
            "-----END RSA PRIVATE KEY----- done")


def prose(seed: int, n: int = 160) -> str:
    rng = random.Random(seed)
    out, line = [], []
    for i in range(n):
        line.append(rng.choice(WORDS))
        if len(line) >= 12:
            out.append(" ".join(line) + ".")
            line = []
    return "\n".join(out + ([" ".join(line)] if line else []))


def humaneval_prompt(i: int = 2) -> str:
    import gzip

    from dsv3.data.decontam import humaneval_path

    with gzip.open(humaneval_path(), "rt") as f:
        return [json.loads(l) for l in f][i]["prompt"]


def make_corpus(root: Path) -> dict:
    """Planted corpus; returns the expected bucket counts."""
    root.mkdir(parents=True, exist_ok=True)
    for i in range(8):
        (root / f"doc{i}.txt").write_text(prose(i))
    (root / "dup_exact.md").write_text(prose(0).upper().replace("\n", "  \n"))  # same normalized content as doc0
    near = prose(1).split(" ")
    near[40] = "zebra"
    (root / "dup_near.txt").write_text(" ".join(near))
    (root / "junk.txt").write_text("buy now " * 50)
    (root / "contaminated.py").write_text("import math\n\n" + humaneval_prompt() + "    return number % 1.0\n\n"
                                          "print(truncate_number(3.5))\n")
    (root / "code.py").write_text("\n".join(f"def f{i}(x):\n    return x * {i} + math.sqrt(x)\n" for i in range(6)))
    lines = [json.dumps({"text": prose(20) + "\n" + PII_TEXT, "license": "cc-by"}).encode(),
             b'{"text": "broken',
             b'{"text": "bad bytes \xff\xfe here"}',
             json.dumps({"content": "no text field here"}).encode(),
             json.dumps({"text": prose(21, 3000)}).encode(),
             b"",
             json.dumps({"text": prose(22)}).encode()]
    (root / "mixed.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    return {"kept": 11, "exact_dup": 1, "near_dup": 1, "decontaminated": 1, "rejected:malformed_json": 1,
            "rejected:undecodable": 1, "rejected:missing_text_field": 1, "rejected:oversize": 1}


def small_cfg(sources, **kw) -> DataConfig:
    base = dict(sources=[str(s) for s in sources], seq_len=64,
                source={"max_doc_bytes": 8000}, decontam={"paths": []},
                split={"val_fraction": 0.2}, tokenizer={"vocab_size": 320, "min_frequency": 1})
    base.update(kw)
    return DataConfig(**base)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("corpus") / "c"
    return root, make_corpus(root)


@pytest.fixture(scope="session")
def curated(corpus, tmp_path_factory) -> tuple[Path, DataConfig, dict]:
    """The whole pipeline (curate, tokenizer, shards) run once, in-process."""
    from dsv3.data.curate import run_all

    out = tmp_path_factory.mktemp("out")
    cfg = small_cfg([corpus[0]])
    return out, cfg, run_all(cfg, out)
