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
or a reject dict {"reason", "source", "path", "loc", "detail"} that curation writes to
quarantine.jsonl. Reasons: malformed_json, undecodable (not UTF-8: the detail gives the
byte offset and bytes), binary (a NUL byte: the detail gives the offset and a sniffed type),
missing_text_field, oversize, unreadable (I/O error, corrupt gzip/parquet, broken symlink;
what was read before the error is kept), symlink_outside. Bad input never raises; a spec that
names nothing (no file matches) or an unreachable HF dataset raises DataSourceError.

Symlinks. A directory or glob source is walked without following directory links (a link
loop cannot hang the walk). A link whose target resolves inside the source root is fine
(a file link is read; a directory link is skipped, as its files are reached by their real
path); a link resolving outside the root (a file, a directory, or a dangling target) is
not opened and is quarantined as `symlink_outside`, naming link and target. The root of a
glob is its directory part before the first wildcard. A spec naming one file is read as
named, link or not: the user chose it.
"""

from __future__ import annotations

import gzip
import json
import os
import sysconfig
import zlib
from pathlib import Path
from typing import Iterator

from dsv3.data.config import DataConfig

TEXT_EXT = {".txt", ".md", ".rst"}
REJECT_REASONS = ("malformed_json", "undecodable", "binary", "missing_text_field", "oversize", "unreadable",
                  "symlink_outside")
_MAGIC = {b"\x89PNG": "PNG image", b"\x7fELF": "ELF executable", b"\x1f\x8b": "gzip data", b"PK\x03\x04": "zip archive",
          b"%PDF": "PDF document", b"\xff\xd8\xff": "JPEG image", b"PAR1": "parquet file", b"\x00asm": "wasm module"}


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


_BOMS = {b"\xff\xfe\x00\x00": "UTF-32-LE", b"\x00\x00\xfe\xff": "UTF-32-BE", b"\xff\xfe": "UTF-16-LE",
         b"\xfe\xff": "UTF-16-BE"}


def _undecodable(raw: bytes) -> str:
    bom = next((v for k, v in _BOMS.items() if raw.startswith(k)), None)
    if bom:
        return f"not UTF-8: {bom} text (byte-order mark)"
    try:
        raw.decode("utf-8")
        return "not UTF-8"
    except UnicodeDecodeError as e:
        return f"not UTF-8: {e.reason} at byte {e.start} ({raw[max(0, e.start - 8):e.start + 8]!r})"


def _binary(raw: bytes) -> str | None:
    """Why `raw` is binary (a NUL byte, the usual heuristic of git and grep), or None."""
    if any(raw.startswith(k) for k in _BOMS):  # UTF-16/32 text has NULs but is text: undecodable
        return None
    i = raw.find(b"\x00")
    if i < 0:
        return None
    kind = next((v for k, v in _MAGIC.items() if raw.startswith(k)), "binary data")
    return f"{kind}: NUL byte at offset {i}"


def _from_record(rec, source, path, loc, cfg) -> dict:
    field = cfg.source.text_field
    if not isinstance(rec, dict) or not isinstance(rec.get(field), str):
        got = type(rec.get(field)).__name__ if isinstance(rec, dict) and field in rec else "absent"
        return _reject("missing_text_field", source, path, loc, f"field {field!r}: {got}")
    return _doc(rec[field], source, path, loc, "text", rec.get("license"), cfg)


def _records(p: Path, source: str, cfg: DataConfig) -> Iterator[dict]:
    path, ext = str(p), "".join(p.suffixes[-2:]) if p.name.endswith(".gz") else p.suffix
    if ext in (".jsonl", ".jsonl.gz"):
        opener = gzip.open if ext.endswith(".gz") else open
        with opener(p, "rb") as f:
            if why := _binary(f.peek(8192)[:8192]):
                yield _reject("binary", source, path, "file", why)
                return
            for i, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                line = _decode(raw)
                if line is None:
                    yield _reject("undecodable", source, path, f"line {i}", _undecodable(raw))
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    yield _reject("malformed_json", source, path, f"line {i}", str(e))
                    continue
                yield _from_record(rec, source, path, f"line {i}", cfg)
    elif ext == ".json":
        raw = p.read_bytes()
        text = None if _binary(raw) else _decode(raw)
        if text is None:
            why = _binary(raw)
            yield _reject("binary" if why else "undecodable", source, path, "file", why or _undecodable(raw))
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
        if why := _binary(raw):
            yield _reject("binary", source, path, "file", why)
            return
        text = _decode(raw)
        if text is None:
            yield _reject("undecodable", source, path, "file", _undecodable(raw))
            return
        kind = "code" if p.suffix in cfg.source.code_extensions else "text"
        yield _doc(text, source, path, "file", kind, None, cfg)


def _read_file(p: Path, source: str, cfg: DataConfig) -> Iterator[dict]:
    """The file's items; an I/O error or a corrupt container ends it with one `unreadable` reject
    (the items read before it are kept)."""
    loc = None
    try:
        for item in _records(p, source, cfg):
            loc = item["loc"]
            yield item
    except (OSError, EOFError, ValueError, zlib.error) as e:  # ValueError: pyarrow's ArrowInvalid
        yield _reject("unreadable", source, str(p), f"after {loc}" if loc else "file", f"{type(e).__name__}: {e}")


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
    for x, why in _source_paths(spec):
        if why is None:
            yield from _read_file(x, spec, cfg)
        else:
            yield _reject(why[0], spec, str(x), "file", why[1])


def _walk(root: Path) -> Iterator[Path]:
    """Files and directory links below `root`; directory links are not followed."""
    for dirpath, dirnames, files in os.walk(root, followlinks=False):
        yield from (Path(dirpath, d) for d in dirnames if os.path.islink(os.path.join(dirpath, d)))
        yield from (Path(dirpath, f) for f in files)


def _glob(spec: str) -> tuple[Path, list[Path]]:
    """(root, matches): root = the directory part before the first wildcard; ** does not follow links."""
    parts = Path(spec).parts
    k = next(i for i, q in enumerate(parts) if any(c in q for c in "*?["))
    root, pattern = Path(*parts[:k]) if k else Path("."), str(Path(*parts[k:]))
    hidden_ok = any(q.startswith(".") for q in parts[k:])  # like glob.glob: * does not match dot-names
    out = [x for x in root.glob(pattern) if hidden_ok or not any(
        q.startswith(".") for q in x.relative_to(root).parts)]
    return root, out


def _source_paths(spec: str) -> list[tuple[Path, tuple[str, str] | None]]:
    """[(path, None to read it | (reason, detail) to quarantine it)] in sorted order."""
    p = Path(spec)
    if p.is_file():
        return [(p, None)]
    if any(c in spec for c in "*?["):
        root, found = _glob(spec)
    elif p.is_dir():
        root, found = p, list(_walk(p))
    else:
        root, found = p, []
    real_root = Path(os.path.realpath(root))
    out = []
    for x in sorted(set(found)):
        real = Path(os.path.realpath(x))  # never raises, even on a link loop
        if real != real_root and real_root not in real.parents:
            out.append((x, ("symlink_outside", f"symlink to {real}, outside the source root {real_root}: not read")))
        elif x.is_symlink() and real.is_dir():
            continue  # its files are walked by their real path
        elif x.is_file():
            out.append((x, None))
        elif x.is_symlink():
            out.append((x, ("unreadable", f"broken symlink to {os.readlink(x)}")))
        elif not x.is_dir():
            out.append((x, ("unreadable", "not a regular file (fifo, socket or device): not read")))
    if not out:
        raise DataSourceError(f"source {spec!r}: no such file, directory or glob match")
    return out


def iter_sources(cfg: DataConfig) -> Iterator[dict]:
    for spec in cfg.sources:
        yield from iter_source(spec, cfg)
