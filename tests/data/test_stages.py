"""Unit tests of the per-document and global stages on small planted inputs."""

from __future__ import annotations

import random
from collections import Counter

import numpy as np
import pytest
import yaml

from dsv3.data import dedup, pii
from dsv3.data.config import DataConfig, DedupConfig
from dsv3.data.decontam import is_contaminated, load_eval_ngrams
from dsv3.data.fim import FIM_BEGIN, fim_invert, maybe_fim
from dsv3.data.normalize import normalize
from dsv3.data.quality import quality
from dsv3.data.sources import DataSourceError, iter_source, stdlib_files

from .conftest import PII_TEXT, humaneval_prompt, prose, small_cfg


def test_params_yaml_mirrors_dataconfig():
    from pathlib import Path

    p = yaml.safe_load((Path(__file__).parents[2] / "params.yaml").read_text())
    assert DataConfig(**p["data"]) == DataConfig()


def test_normalize_nfc_controls_whitespace_special_tokens():
    st = Counter()
    d = normalize({"text": "Cafe\u0301\x00 bad\x07  spaced\r\n\n\n\n\nend <｜fim▁hole｜>x   ", "kind": "text"},
                  DataConfig(), st)
    assert d["text"] == "Café bad spaced\n\n\nend x"
    assert st["control_chars_removed"] == 2 and st["special_tokens_removed"] == 1
    code = normalize({"text": "def f():\n        return  1   \n", "kind": "code"}, DataConfig(), Counter())
    assert code["text"] == "def f():\n        return  1"  # indentation and inner spaces kept
    assert normalize({"text": " \x00 \n", "kind": "text"}, DataConfig(), Counter()) is None


def test_quality_prose_and_code_rules():
    cfg, st = DataConfig(), Counter()
    assert quality({"text": prose(3), "kind": "text"}, cfg, st) is not None
    bad = {"text": "buy now " * 50, "kind": "text"}
    assert quality(bad, cfg, st) is None and bad["drop"].startswith("filtered:")
    short = {"text": "too short", "kind": "text"}
    assert quality(short, cfg, st) is None and short["drop"] == "filtered:min_words"
    code = {"text": "\n".join(f"x{i} = compute({i}) + other_value" for i in range(10)), "kind": "code"}
    assert quality(code, cfg, st) is not None and code["quality_score"] == 1.0
    long_line = {"text": "a = 1\n" * 5 + "b = '" + "z" * 2000 + "'", "kind": "code"}
    assert quality(long_line, cfg, st) is None and long_line["drop"] == "filtered:code_max_line_len"


def test_pii_every_kind_scrubbed_with_typed_placeholders():
    st = Counter()
    out = pii.scrub_text(PII_TEXT, DataConfig(), st)
    for ph in ("[EMAIL]", "[PHONE]", "[IPV4]", "[IPV6]", "[CREDIT_CARD]", "[AWS_KEY]", "[TOKEN]", "[PRIVATE_KEY]"):
        assert ph in out, (ph, out)
    for secret in ("alice.smith", "93.184", "2a00:", "4111", "AKIA", "ghp_", "MIIEow", "555-0132"):
        assert secret not in out
    assert set(st) == {"email", "phone", "ipv4", "ipv6", "credit_card", "aws_key", "token", "private_key"}


def test_pii_luhn_and_private_ips():
    assert pii.luhn_ok("4111111111111111") and not pii.luhn_ok("4111111111111112")
    cfg = DataConfig()
    assert pii.scrub_text("card 4111 1111 1111 1112 ok", cfg) == "card 4111 1111 1111 1112 ok"
    assert pii.scrub_text("bind 127.0.0.1 and 10.0.0.7 and ::1", cfg) == "bind 127.0.0.1 and 10.0.0.7 and ::1"
    assert pii.scrub_text('Aws_Secret_Access_Key = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"', cfg) == "[TOKEN]\""
    strict = DataConfig(pii={"keep_private_ips": False})
    assert pii.scrub_text("bind 10.0.0.7", strict) == "bind [IPV4]"


def test_fim_rate_and_invertible():
    texts = [prose(i, 40) for i in range(2000)]
    n = 0
    for i, t in enumerate(texts):
        f, applied = maybe_fim(t, f"h{i}", 0.1, seed=0)
        n += applied
        assert applied == f.startswith(FIM_BEGIN)
        assert fim_invert(f) == t
        assert maybe_fim(t, f"h{i}", 0.1, seed=0)[0] == f  # deterministic
    assert 0.08 < n / len(texts) < 0.12
    assert maybe_fim("abc", "k", 0.0, 0) == ("abc", False)
    assert maybe_fim("abc", "k", 1.0, 0)[1]


def test_exact_and_near_dedup_planted():
    base = prose(7, 300)
    words = base.split(" ")
    words[100] = "zebra"
    docs = [base, prose(8, 300), " ".join(words), base.upper(), prose(9, 300), prose(8, 300) + " extra words"]
    res, st = dedup.exact_dedup([dedup.content_hash(t) for t in docs])
    assert res == [None, None, None, 0, None, None] and st["exact_dup"] == 1
    cfg = DedupConfig()
    sigs = np.stack([dedup.minhash(t, cfg) for t in docs])
    res, st = dedup.near_dedup(sigs, cfg)
    assert res[2] == 0 and res[3] == 0 and res[5] == 1  # near copies point at the kept first doc
    assert res[0] is None and res[1] is None and res[4] is None
    # strict threshold: a one-word edit is still within 0.9, an unrelated doc never is
    est = float(np.mean(sigs[0] == sigs[2]))
    assert 0.85 < est < 1.0 and float(np.mean(sigs[0] == sigs[1])) < 0.2


def test_near_dedup_connected_clusters_keep_one():
    rng = random.Random(0)
    base = prose(11, 400).split(" ")
    chain = [base]
    for _ in range(4):  # each copy differs a little from the previous one
        nxt = list(chain[-1])
        nxt[rng.randrange(len(nxt))] = "zebra"
        chain.append(nxt)
    docs = [" ".join(c) for c in chain] + [prose(12, 400)]
    cfg = DedupConfig(threshold=0.9)
    res, st = dedup.near_dedup(np.stack([dedup.minhash(t, cfg) for t in docs]), cfg)
    assert res[:5] == [None, 0, 0, 0, 0] and res[5] is None and st["clusters_with_dups"] == 1


def test_decontamination_humaneval():
    grams, st = load_eval_ngrams(DataConfig().decontam)
    assert st["prompts:humaneval"] == 164 and st["ngrams"] > 1000
    assert is_contaminated("intro text\n" + humaneval_prompt(), grams, 13)
    assert not is_contaminated(prose(5), grams, 13)


def test_sources_reject_bad_input_and_keep_provenance(corpus):
    root, _ = corpus
    cfg = small_cfg([root])
    items = list(iter_source(str(root / "mixed.jsonl"), cfg))
    reasons = [x.get("reason") for x in items]
    assert reasons == [None, "malformed_json", "undecodable", "missing_text_field", "oversize", None]
    assert items[1]["loc"] == "line 2" and items[1]["path"].endswith("mixed.jsonl")
    assert items[0]["license"] == "cc-by" and items[0]["kind"] == "text"
    code = list(iter_source(str(root / "code.py"), cfg))
    assert code[0]["kind"] == "code"
    glob_items = list(iter_source(str(root / "doc*.txt"), cfg))
    assert len(glob_items) == 8
    with pytest.raises(DataSourceError, match="no such file"):
        list(iter_source(str(root / "nope*.txt"), cfg))


def test_sources_json_parquet_and_text_field(tmp_path):
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "a.json").write_text(json.dumps([{"body": "one two"}, {"body": 3}]))
    pq.write_table(pa.table({"body": ["x y", None], "license": ["mit", "mit"]}), tmp_path / "b.parquet")
    cfg = small_cfg([tmp_path], source={"text_field": "body"})
    a = list(iter_source(str(tmp_path / "a.json"), cfg))
    assert a[0]["text"] == "one two" and a[1]["reason"] == "missing_text_field"
    b = list(iter_source(str(tmp_path / "b.parquet"), cfg))
    assert b[0]["text"] == "x y" and b[0]["license"] == "mit" and b[1]["reason"] == "missing_text_field"


def test_builtin_stdlib_capped():
    cfg = DataConfig(source={"builtin_max_files": 5})
    files = stdlib_files(cfg)
    assert len(files) == 5 and files == stdlib_files(cfg)  # deterministic order
    assert len(stdlib_files(DataConfig(source={"builtin_max_files": 0, "builtin_max_bytes": 50_000}))) >= 1
    docs = list(iter_source("builtin:stdlib", cfg))
    assert len(docs) == 5 and all(d["kind"] == "code" and d["license"] == "PSF-2.0" for d in docs)
    assert docs[0]["id"].startswith("stdlib:")


def test_dataconfig_in_runconfig_names_bad_keys():
    from dsv3.config import RunConfig
    from dsv3.model.config import ConfigError

    rc = RunConfig.from_dict({"data": {"dedup": {"bands": 20}, "fim": {"rate": 0.5}}})
    assert rc.data.dedup.bands == 20 and rc.data.fim.rate == 0.5
    with pytest.raises(ConfigError, match="data.dedup.bandz"):
        RunConfig.from_dict({"data": {"dedup": {"bandz": 3}}})
    with pytest.raises(ConfigError, match="data.fim.rate"):
        RunConfig.from_dict({"data": {"fim": {"rate": 2.0}}})
