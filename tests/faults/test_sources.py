"""Bad data sources: binary and non-UTF-8 files, corrupt containers, symlinks out of
the source, a link loop and a FIFO, through the `dsv3 data curate` entry point.

Each bad file is quarantined (curated/quarantine.jsonl) with a reason naming the file and what is
wrong; the good documents around it are kept; nothing outside the source is read; the run
completes and the accounting still adds up."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import pytest

from dsv3.data.sources import iter_source
from tests.data.conftest import prose, small_cfg

SECRET = "TOP-SECRET-OUTSIDE-THE-SOURCE"
SMALL = ["data.seq_len=64", "data.source.max_doc_bytes=8000", "data.decontam.paths=[]", "data.split.val_fraction=0.2",
         "data.tokenizer.vocab_size=320", "data.tokenizer.min_frequency=1"]


def _source(tmp_path: Path) -> Path:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text(prose(90) + "\n" + SECRET)
    (outside / "more.txt").write_text(prose(91) + "\n" + SECRET)
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    for i in range(4):
        (src / f"doc{i}.txt").write_text(prose(i))
    (src / "sub" / "deep.md").write_text(prose(10))
    (src / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)))
    (src / "latin1.txt").write_bytes(prose(11).encode() + " caf\xe9 cr\xe8me".encode("latin-1"))
    (src / "utf16.txt").write_bytes(prose(12).encode("utf-16"))
    (src / "nul.py").write_bytes(b"def f():\n    return 1\n\x00\x00\x00")
    good = [json.dumps({"text": prose(20 + i)}) for i in range(3)]
    gz = gzip.compress(("\n".join(good) + "\n").encode())
    (src / "truncated.jsonl.gz").write_bytes(gz[: int(len(gz) * 0.8)])
    (src / "broken.parquet").write_bytes(b"PAR1" + b"garbage" * 20)
    os.symlink(outside / "secret.txt", src / "leak.txt")  # a file link out of the source
    os.symlink("../../outside", src / "sub" / "escape")  # a directory link out of the source
    os.symlink("doc0.txt", src / "alias.txt")  # a link inside: fine
    os.symlink("..", src / "sub" / "loop")  # a link loop: must not hang the walk
    os.symlink("missing.txt", src / "dangling.txt")
    os.mkfifo(src / "pipe.txt")  # reading it would block forever
    return src


EXPECT = {"image.png": ("binary", "PNG image: NUL byte at offset"),
          "latin1.txt": ("undecodable", "not UTF-8: invalid continuation byte at byte"),
          "utf16.txt": ("undecodable", "UTF-16-LE text (byte-order mark)"),
          "nul.py": ("binary", "binary data: NUL byte at offset 22"),
          "truncated.jsonl.gz": ("unreadable", "EOFError"),
          "broken.parquet": ("unreadable", ""),
          "leak.txt": ("symlink_outside", "outside the source root"),
          "sub/escape": ("symlink_outside", "outside the source root"),
          "dangling.txt": ("unreadable", "broken symlink to missing.txt"),
          "pipe.txt": ("unreadable", "not a regular file")}


@pytest.mark.timeout(60)
def test_iter_source_quarantines_each_bad_file_with_a_reason(tmp_path):
    src = _source(tmp_path)
    items = list(iter_source(str(src), small_cfg([src])))
    rejects = {str(Path(r["path"]).relative_to(src)): r for r in items if "reason" in r}
    assert set(rejects) == set(EXPECT)
    for name, (reason, detail) in EXPECT.items():
        assert rejects[name]["reason"] == reason and detail in rejects[name]["detail"], rejects[name]
    assert rejects["truncated.jsonl.gz"]["loc"].startswith("after line ")  # lines before the damage kept
    docs = [d for d in items if "text" in d]
    assert sum(d["path"].endswith("truncated.jsonl.gz") for d in docs) >= 1
    assert {Path(d["path"]).name for d in docs} >= {"doc0.txt", "doc3.txt", "deep.md", "alias.txt"}
    assert not any(SECRET in d["text"] for d in docs)
    glob_items = list(iter_source(str(src / "**" / "*.txt"), small_cfg([src])))  # a glob walks the same way
    assert {r["reason"] for r in glob_items if "reason" in r} == {"undecodable", "unreadable", "symlink_outside"}
    assert not any(SECRET in d.get("text", "") for d in glob_items)


@pytest.mark.timeout(300)
def test_curate_entry_point_completes_and_accounts_for_every_file(tmp_path, capsys):
    from dsv3.cli import main

    src = _source(tmp_path)
    out = tmp_path / "out"
    sets = [a for kv in SMALL for a in ("--set", kv)]
    assert main(["data", "curate", str(src), "--out", str(out), "--params", "none", *sets]) == 0
    q = [json.loads(l) for l in (out / "curated" / "quarantine.jsonl").read_text().splitlines()]
    got = {str(Path(r["path"]).relative_to(src)): r["reason"] for r in q}
    assert got == {k: v[0] for k, v in EXPECT.items()}
    stats = json.loads((out / "stats.json").read_text())
    assert sum(stats["buckets"].values()) == stats["input"] and stats["quarantined"] == len(EXPECT)
    assert stats["buckets"]["rejected:symlink_outside"] == 2 and stats["buckets"]["rejected:binary"] == 2
    assert stats["kept"] >= 5  # the good documents made it through to the shards
    for f in out.rglob("*"):
        if f.is_file():
            assert SECRET.encode() not in f.read_bytes(), f
