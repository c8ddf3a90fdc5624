"""Ingest: turn source specs into documents with provenance, or into rejects (DeepSeek-V3 §4.1).

A source spec is one of
    builtin:stdlib        the running Python's standard-library sources (code + docstrings);
                          exists on every machine, needs no network; capped by
                          `source.builtin_max_files` / `builtin_max_bytes`, in sorted path order
    hf:ORG/NAME[:SPLIT]   a Hugging Face dataset, streamed (clear DataSourceError offline)
    PATH or GLOB          .txt .md (one doc per file), .jsonl (one per line), .json (object or
                          list of objects), .parquet (one per row), source-code files (one per file)
Every record yields exactly one item: a document dict
    {"id", "text", "source", "path", "loc", "kind": "text"|"code", "license"}
or a reject dict {"reason", "source", "path", "loc", "detail"} (reasons: malformed_json,
undecodable, missing_text_field, oversize). Bad input never raises; a spec that names
nothing (no file matches) or an unreachable HF dataset raises DataSourceError.
"""

from __future__ import annotations

import glob
import gzip
import json
import os
import sysconfig
from pathlib import Path
from typing import Iterator

from dsv3.data.config import DataConfig

TEXT_EXT = {".txt", ".md", ".rst"}
REJECT_REASONS = ("malformed_json", "undecodable", "missing_text_field", "oversize")


class DataSourceError(RuntimeError):
    pass


def _doc(text: str, source: str, path: str, loc: str, kind: str, license: str | None, cfg: DataConfig):
    nbytes = len(text.encode("utf-8", "surrogatepass"))
    if nbytes > cfg.source.max_doc_bytes:
        return _reject("oversize", source, path, loc, f"{nbytes} bytes > max_doc_bytes={cfg.source.max_doc_bytes}")
    return {"id": f"{source}:{path}:{loc}", "text": text, "source": source, "path": path, "loc": loc,
            "kind": kind, "license": license}


def _reject(reason: str, source: str, path: str, loc: str, detail: str) -> dict:
    return {"reason": reason, "source": source, "path": path, "loc": loc, "detail": detail[:300]}


def _decode(raw: bytes) -> str | None:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _from_record(rec, source, path, loc, cfg) -> dict:
    field = cfg.source.text_field
    if not isinstance(rec, dict) or not isinstance(rec.get(field), str):
        got = type(rec.get(field)).__name__ if isinstance(rec, dict) and field in rec else "absent"
        return _reject("missing_text_field", source, path, loc, f"field {field!r}: {got}")
    return _doc(rec[field], source, path, loc, "text", rec.get("license"), cfg)


def _read_file(p: Path, source: str, cfg: DataConfig) -> Iterator[dict]:
    path, ext = str(p), "".join(p.suffixes[-2:]) if p.name.endswith(".gz") else p.suffix
    if ext in (".jsonl", ".jsonl.gz"):
        opener = gzip.open if ext.endswith(".gz") else open
        with opener(p, "rb") as f:
            for i, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                line = _decode(raw)
                if line is None:
                    yield _reject("undecodable", source, path, f"line {i}", repr(raw[:80]))
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    yield _reject("malformed_json", source, path, f"line {i}", str(e))
                    continue
                yield _from_record(rec, source, path, f"line {i}", cfg)
    elif ext == ".json":
        text = _decode(p.read_bytes())
        if text is None:
            yield _reject("undecodable", source, path, "file", "not UTF-8")
            return
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            yield _reject("malformed_json", source, path, "file", str(e))
            return
        for i, rec in enumerate(data if isinstance(data, list) else [data]):
            yield _from_record(rec, source, path, f"item {i}", cfg)
    elif ext == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(p)
        field = cfg.source.text_field
        col = table.column(field).to_pylist() if field in table.column_names else [None] * table.num_rows
        lic = table.column("license").to_pylist() if "license" in table.column_names else [None] * table.num_rows
        for i, (t, li) in enumerate(zip(col, lic)):
            yield _from_record({field: t, "license": li} if t is not None else {}, source, path, f"row {i}", cfg)
    else:
        raw = p.read_bytes()
        text = _decode(raw)
        if text is None:
            yield _reject("undecodable", source, path, "file", repr(raw[:80]))
            return
        kind = "code" if p.suffix in cfg.source.code_extensions else "text"
        yield _doc(text, source, path, "file", kind, None, cfg)


def stdlib_files(cfg: DataConfig) -> list[Path]:
    """Sorted .py files of the running Python's stdlib (no site-packages, no test suites), capped."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "test", "tests", "idlelib", "__pycache__", "lib2to3", "turtledemo"}
    out, total = [], 0
    for dirpath, dirnames, files in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in skip and not d.startswith("."))
        for f in sorted(files):
            if not f.endswith(".py"):
                continue
            p = Path(dirpath) / f
            size = p.stat().st_size
            if cfg.source.builtin_max_bytes and total + size > cfg.source.builtin_max_bytes:
                return out
            out.append(p)
            total += size
            if cfg.source.builtin_max_files and len(out) >= cfg.source.builtin_max_files:
                return out
    return out


def _hf(spec: str, cfg: DataConfig) -> Iterator[dict]:
    name, _, split = spec[3:].partition(":")
    try:
        import datasets

        ds = datasets.load_dataset(name, split=split or "train", streaming=True)
        it = iter(ds)
        first = next(it, None)
    except Exception as e:  # offline, unknown id, missing package: one clear message
        raise DataSourceError(f"cannot stream Hugging Face dataset {name!r} ({type(e).__name__}: {e}); "
                              "HF sources need network access (or a local cache); use local files or "
                              "builtin:stdlib offline") from None
    if first is None:
        return
    import itertools

    for i, rec in enumerate(itertools.islice(itertools.chain([first], it), cfg.source.hf_max_docs)):
        yield _from_record(rec, spec, name, f"row {i}", cfg)


def iter_source(spec: str, cfg: DataConfig) -> Iterator[dict]:
    if spec == "builtin:stdlib":
        root = Path(sysconfig.get_paths()["stdlib"])
        for p in stdlib_files(cfg):
            for d in _read_file(p, spec, cfg):
                d["path"] = str(p.relative_to(root))
                if "id" in d:
                    d["id"], d["kind"], d["license"] = f"stdlib:{d['path']}", "code", "PSF-2.0"
                yield d
        return
    if spec.startswith("hf:"):
        yield from _hf(spec, cfg)
        return
    p = Path(spec)
    paths = [p] if p.is_file() else (sorted(Path(x) for x in glob.glob(spec, recursive=True)) if any(
        c in spec for c in "*?[") else sorted(x for x in p.rglob("*") if x.is_file()) if p.is_dir() else [])
    paths = [x for x in paths if x.is_file()]
    if not paths:
        raise DataSourceError(f"source {spec!r}: no such file, directory or glob match")
    for x in paths:
        yield from _read_file(x, spec, cfg)


def iter_sources(cfg: DataConfig) -> Iterator[dict]:
    for spec in cfg.sources:
        yield from iter_source(spec, cfg)
