"""End-to-end pipeline on the planted corpus: accounting, quarantine, tokenizer, shards, CLI, GX."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dsv3.data.fim import fim_invert
from dsv3.data.curate import read_split
from dsv3.data.shards import TokenShards
from dsv3.data.tokenizer import load_tokenizer

ROOT = Path(__file__).parents[2]


def test_accounting_identity_and_planted_buckets(curated, corpus):
    out, cfg, res = curated
    expected = corpus[1]
    stats = json.loads((out / "stats.json").read_text())
    assert stats["input"] == sum(stats["buckets"].values())
    b = stats["buckets"]
    for k in ("exact_dup", "near_dup", "decontaminated", "rejected:malformed_json", "rejected:undecodable",
              "rejected:missing_text_field", "rejected:oversize"):
        assert b.get(k) == 1, (k, b)
    assert sum(v for k, v in b.items() if k.startswith("filtered:")) >= 1  # the "buy now" junk
    assert {k: b.get(k) for k in expected} == expected
    removed = [json.loads(l) for l in open(out / "curated" / "removed.jsonl")]
    by_bucket = {r["bucket"]: r for r in removed}
    assert by_bucket["exact_dup"]["path"].endswith("dup_exact.md") and by_bucket["exact_dup"]["dup_of"].endswith("doc0.txt:file")
    assert by_bucket["near_dup"]["path"].endswith("dup_near.txt")
    assert by_bucket["decontaminated"]["path"].endswith("contaminated.py")
    q = [json.loads(l) for l in open(out / "curated" / "quarantine.jsonl")]
    assert {(r["reason"], r["loc"]) for r in q} == {("malformed_json", "line 2"), ("undecodable", "line 3"),
                                                     ("missing_text_field", "line 4"), ("oversize", "line 5")}
    docs = read_split(out, "train") + read_split(out, "val")
    assert len(docs) == expected["kept"] and read_split(out, "val")
    assert len({d["hash"] for d in docs}) == len(docs)
    pii_doc = next(d for d in docs if d["license"] == "cc-by")
    assert "[EMAIL]" in pii_doc["text"] and "alice" not in pii_doc["text"]
    assert stats["stages"]["pii"]["docs_with_pii"] >= 1


def test_split_is_deterministic(curated, tmp_path):
    from dsv3.data.curate import curate

    out, cfg, _ = curated
    curate(cfg, tmp_path)
    for s in ("train", "val", "removed", "quarantine"):
        assert (tmp_path / "curated" / f"{s}.jsonl").read_bytes() == (out / "curated" / f"{s}.jsonl").read_bytes()


def test_tokenizer_special_tokens_and_transformers_load(curated):
    out, _, _ = curated
    tok = load_tokenizer(out / "tokenizer")
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜pad｜>")
    assert tok.bos_token_id == 0 and tok.eos_token_id == 1
    for t in ("<｜fim▁hole｜>", "<｜fim▁begin｜>", "<｜fim▁end｜>", "<｜User｜>", "<｜Assistant｜>"):
        assert len(tok.encode(t, add_special_tokens=False)) == 1
    s = "def f(x):\n    return x  # ünïcode ✓"
    assert tok.decode(tok.encode(s, add_special_tokens=False)) == s
    assert len(tok) <= 320


def test_shards_round_trip_and_fim(curated):
    out, cfg, res = curated
    tok = load_tokenizer(out / "tokenizer")
    idx = json.loads((out / "shards" / "index.json").read_text())
    assert idx["bos_id"] == 0 and idx["eos_id"] == 1 and idx["dtype"] == "uint16"
    for split in ("train", "val"):
        ts = TokenShards(out / "shards", split)
        docs = read_split(out, split)
        assert len(ts.doc_offsets) - 1 == len(docs) and ts.n_bytes == sum(d["n_bytes"] for d in docs)
        assert int(np.asarray(ts.tokens).max()) < ts.vocab_size
        for i, d in enumerate(docs):
            ids = ts.doc(i).tolist()
            assert ids[0] == 0 and ids[-1] == 1
            text = tok.decode(ids[1:-1])
            assert fim_invert(text) == d["text"]
            if split == "val":
                assert text == d["text"]
    assert res["shards"]["val"]["fim_docs"] == 0


def test_cli_curate_and_stats(corpus, tmp_path, capsys):
    from dsv3.cli import main

    root, _ = corpus
    rc = main(["data", "curate", str(root / "doc*.txt"), str(root / "mixed.jsonl"), "--out", str(tmp_path),
               "--params", "none", "--set", "data.source.max_doc_bytes=8000", "--set", "data.tokenizer.vocab_size=300",
               "--set", "data.decontam.paths=[]"])
    assert rc == 0
    assert (tmp_path / "shards" / "index.json").is_file() and (tmp_path / "tokenizer" / "tokenizer.json").is_file()
    capsys.readouterr()
    assert main(["data", "stats", str(tmp_path)]) == 0
    txt = capsys.readouterr().out
    assert "rejected:malformed_json" in txt and "(= input)" in txt and "input documents: 14" in txt
    assert main(["data", "stats", str(tmp_path / "missing")]) == 2
    assert main(["data", "curate", "--out", str(tmp_path), "--params", "none", "--set", "data.dedup.bandz=3"]) == 2
    assert "data.dedup.bandz: unknown key (did you mean 'data.dedup.bands'?)" in capsys.readouterr().err


def test_hf_source_offline_clear_error(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-m", "dsv3.cli", "data", "curate", "hf:nobody/no-such-dataset",
                        "--out", str(tmp_path), "--params", "none"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and "cannot stream Hugging Face dataset 'nobody/no-such-dataset'" in r.stderr


def _reseal(sd: Path, split: str) -> None:
    from dsv3.data.shards import entry_checksum, file_checksum

    idx = json.loads((sd / "index.json").read_text())
    e = idx["splits"][split]
    e["checksum"] = file_checksum(sd / e["file"])
    e["entry_checksum"] = entry_checksum(e, idx["dtype"], idx["vocab_size"])
    (sd / "index.json").write_text(json.dumps(idx))


def test_gx_suite_fails_on_planted_pii_and_bad_ids(curated, tmp_path, capsys):
    out, cfg, _ = curated
    bad = tmp_path / "bad"
    shutil.copytree(out / "curated", bad / "curated")
    shutil.copytree(out / "shards", bad / "shards")
    rows = read_split(bad, "val")
    rows[0]["text"] += " mail me at bob@corp.example.org"
    rows.append(dict(rows[0]))  # duplicate hash and id
    (bad / "curated" / "val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    raw = (bad / "shards" / "val.bin")
    a = np.fromfile(raw, dtype=np.uint16)
    a[1] = 60000  # token id beyond the vocabulary
    a.tofile(raw)
    _reseal(bad / "shards", "val")  # as a buggy writer would: checksums match, content is wrong
    from dsv3.cli import main

    capsys.readouterr()
    assert main(["data", "validate", str(bad)]) == 1  # a failing suite exits non-zero
    text = capsys.readouterr().out
    assert "FAIL suite curated_docs" in text and "FAIL suite token_shards" in text
    assert "PASS suite shard_totals" in text
    assert "expect_column_values_to_not_match_regex" in text and "expect_column_values_to_be_unique" in text
    assert "...bob@***" in text and "bob@corp" not in text  # offending match shown, masked
    docs = text.split("Data Docs: ")[1].split()[0]
    assert docs.startswith("file://") and Path(docs.removeprefix("file://")).is_file()
