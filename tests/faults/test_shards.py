"""Corrupted token shards: flipped bytes, truncation, an edited index.json.

Each fault is caught by `TokenShards` (what training, validation and bits-per-byte open)
before a token is read, with a ShardError naming the file at fault; the other files are left
as they were, so rebuilding the one stage restores the run."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest

from dsv3.data import shards
from dsv3.data.shards import FORMAT, ShardError, TokenShards, verify_shards, write_split

VOCAB = 300


def _make(d: Path, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for split, n in (("train", 40), ("val", 8)):
        docs = [[0, *rng.integers(2, VOCAB, rng.integers(5, 60)).tolist(), 1] for _ in range(n)]
        write_split(d, split, docs, VOCAB, n_bytes=n * 100)
    return d


@pytest.fixture
def sd(tmp_path) -> Path:
    return _make(tmp_path / "shards")


def _flip(path: Path, at: int, keep_mtime: bool = False) -> None:
    st = path.stat()
    with open(path, "r+b") as f:
        f.seek(at)
        b = f.read(1)
        f.seek(at)
        f.write(bytes([b[0] ^ 0x5A]))
    if keep_mtime:  # what a careless copy tool or bit rot under a backup would look like
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_clean_shards_verify_and_read(sd):
    idx = json.loads((sd / "index.json").read_text())
    assert idx["format"] == FORMAT and idx["splits"]["train"]["checksum"].startswith("xxh3_128:")
    got = verify_shards(sd)
    assert got == {s: idx["splits"][s]["n_tokens"] for s in ("train", "val")}
    ts = TokenShards(sd, "train")
    assert ts.doc(0)[0] == 0 and ts.doc(0)[-1] == 1


def test_flipped_byte_is_caught_before_training_reads(sd):
    from dsv3.train.stream import PackedStream

    before = {p.name: p.read_bytes() for p in sd.iterdir()}
    _flip(sd / "train.bin", 123)
    with pytest.raises(ShardError, match=r"train\.bin: checksum mismatch"):
        TokenShards(sd, "train")
    with pytest.raises(ShardError, match=r"train\.bin: checksum mismatch"):
        PackedStream(str(sd), "train", 16)  # the training reader
    with pytest.raises(ShardError, match=r"train\.bin"):
        verify_shards(sd)
    assert TokenShards(sd, "val").split == "val"  # the intact split still opens
    after = {p.name: p.read_bytes() for p in sd.iterdir()}
    assert after["index.json"] == before["index.json"] and after["val.bin"] == before["val.bin"]


def test_verified_once_then_corrupted_with_mtime_restored(sd, monkeypatch):
    calls = []
    real = shards.file_checksum
    monkeypatch.setattr(shards, "file_checksum", lambda p: calls.append(Path(p).name) or real(p))
    TokenShards(sd, "train")
    TokenShards(sd, "train")
    assert calls == ["train.bin"]  # "once": the marker spares the second read
    _flip(sd / "train.bin", 7, keep_mtime=True)  # ctime still moves: the marker no longer applies
    with pytest.raises(ShardError, match=r"train\.bin: checksum mismatch"):
        TokenShards(sd, "train")
    assert calls == ["train.bin", "train.bin"]
    TokenShards(sd, "train", verify="never")  # explicitly opted out: structure and size only


def test_truncated_and_extended_bin(sd):
    raw = (sd / "train.bin").read_bytes()
    (sd / "train.bin").write_bytes(raw[:-10])
    with pytest.raises(ShardError, match=r"train\.bin: size does not match index .*truncated"):
        TokenShards(sd, "train")
    (sd / "train.bin").write_bytes(raw + b"\0\0")
    with pytest.raises(ShardError, match=r"train\.bin: size does not match"):
        TokenShards(sd, "train")
    (sd / "train.bin").unlink()
    with pytest.raises(ShardError, match=r"train\.bin: .*missing"):
        TokenShards(sd, "train")


def _edit(sd: Path, fn) -> None:
    idx = json.loads((sd / "index.json").read_text())
    fn(idx)
    (sd / "index.json").write_text(json.dumps(idx))


@pytest.mark.parametrize("edit,msg", [
    (lambda i: i["splits"]["train"]["doc_offsets"].__setitem__(3, i["splits"]["train"]["doc_offsets"][3] + 1),
     "split 'train': entry does not match its entry_checksum"),
    (lambda i: i.__setitem__("vocab_size", 100000), "split 'train': entry does not match"),
    (lambda i: i["splits"]["train"].__setitem__("checksum", "xxh3_128:" + "0" * 32), "entry does not match"),
    (lambda i: i["splits"]["train"].pop("checksum"), "missing field 'checksum'"),
    (lambda i: i["splits"]["train"].__setitem__("file", "../../etc/passwd"), "field 'file' must name a file"),
    (lambda i: i["splits"]["train"]["doc_offsets"].reverse(), "doc_offsets must be"),
    (lambda i: i["splits"]["train"].pop("n_docs"), "missing field 'n_docs'"),
    (lambda i: i.__setitem__("dtype", "float64"), "dtype 'float64'"),
    (lambda i: i.__setitem__("format", "dsv3-shards/9"), "unknown format 'dsv3-shards/9'"),
])
def test_edited_index_names_index_json(sd, edit, msg):
    _edit(sd, edit)
    with pytest.raises(ShardError, match="index.json") as e:
        TokenShards(sd, "train")
    assert msg in str(e.value)


def test_index_not_json(sd):
    raw = (sd / "index.json").read_text()
    (sd / "index.json").write_text(raw[: len(raw) // 2])
    with pytest.raises(ShardError, match=r"index\.json: corrupt index"):
        TokenShards(sd, "train")


def test_format1_still_read_with_a_warning(sd):
    """Shards written before checksums: read (size + structure checked) with a warning to rebuild."""
    def to_v1(i):
        i["format"] = "dsv3-shards/1"
        for e in i["splits"].values():
            e.pop("checksum"), e.pop("entry_checksum")
    _edit(sd, to_v1)
    with pytest.warns(RuntimeWarning, match="no checksums.*rebuild"):
        ts = TokenShards(sd, "train")
    assert len(ts) == json.loads((sd / "index.json").read_text())["splits"]["train"]["n_tokens"]
    (sd / "train.bin").write_bytes((sd / "train.bin").read_bytes()[:-2])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ShardError, match="size does not match"):
            TokenShards(sd, "train")


def test_merging_into_another_format_or_vocab_is_refused(sd):
    with pytest.raises(ShardError, match="vocab_size 300.*fresh directory"):
        write_split(sd, "extra", [[0, 1]], 70000)
