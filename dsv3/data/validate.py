"""Great Expectations (v1 API) suites on curated documents and on token shards (§4.1 QA).

`curated_docs` (one row per kept document, both splits): schema (required columns exist),
non-empty text within the size bound, no remaining PII patterns (private-key blocks, AWS
key ids, e-mails: `pii.RESIDUAL_PATTERNS`), unique content hashes, quality_score in [0, 1],
split in {train, val}, kind in {text, code}.
`token_shards` (one row per chunk of documents, both splits, streamed by dsv3.data.shard_stats):
every token id below vocab_size, each document framed by BOS ... EOS; plus one row per split
comparing the token count of the .bin file with the index (`n_tokens`, last doc offset).
A file data context lives under `gx_root` (default OUT/gx) so each run renders Data Docs
HTML; `validate` returns a Report whose `.text` lists every failed expectation with
sample values and the Data Docs path; callers exit non-zero when `.success` is False.

Under DVC the suites are the stage `validate` (after `shards`; `python -m dsv3.data.cli stage
validate`): `run_stage` writes OUT/validation.json (a DVC metric) and a failing suite fails
`dvc repro`. `read_validation` reads that result back (what the data flow reports), refusing a
failed one or one made for other shards than those on disk.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from dsv3.data.config import DataConfig
from dsv3.data.pii import RESIDUAL_PATTERNS
from dsv3.data.shard_stats import shard_frames

os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")


@dataclass
class Report:
    success: bool
    text: str
    docs_path: str | None = None
    results: dict = field(default_factory=dict)


def _sample(x, regex: str | None) -> str:
    """A short sample of an unexpected value; for PII patterns the match itself, masked."""
    if regex and (m := re.search(regex, str(x))):
        return f"...{m.group(0)[:4]}*** (at char {m.start()})"
    return str(x)[:60]


def _docs_frame(out: Path):
    import pandas as pd

    rows = []
    for split in ("train", "val"):
        p = out / "curated" / f"{split}.jsonl"
        if p.is_file():
            with open(p, encoding="utf-8") as f:
                rows += [json.loads(l) for l in f if l.strip()]
    cols = ["id", "text", "source", "path", "kind", "hash", "quality_score", "n_bytes", "split"]
    return pd.DataFrame(rows, columns=sorted(set(cols) | {k for r in rows for k in r}))


def _suites(cfg: DataConfig, idx: dict | None):
    import great_expectations.expectations as gxe

    req = ["id", "text", "source", "path", "kind", "hash", "quality_score", "n_bytes", "split"]
    docs = [gxe.ExpectColumnToExist(column=c) for c in req] + [
        gxe.ExpectTableRowCountToBeBetween(min_value=1),
        gxe.ExpectColumnValuesToNotBeNull(column="text"),
        gxe.ExpectColumnValueLengthsToBeBetween(column="text", min_value=1, max_value=cfg.source.max_doc_bytes),
        gxe.ExpectColumnValuesToBeBetween(column="n_bytes", min_value=1, max_value=cfg.source.max_doc_bytes),
        gxe.ExpectColumnValuesToBeUnique(column="hash"),
        gxe.ExpectColumnValuesToBeUnique(column="id"),
        gxe.ExpectColumnValuesToBeBetween(column="quality_score", min_value=0.0, max_value=1.0),
        gxe.ExpectColumnValuesToBeInSet(column="split", value_set=["train", "val"]),
        gxe.ExpectColumnValuesToBeInSet(column="kind", value_set=["text", "code"]),
    ] + [gxe.ExpectColumnValuesToNotMatchRegex(column="text", regex=rx, meta={"pii": k})
         for k, rx in RESIDUAL_PATTERNS.items()]
    suites = {"curated_docs": docs}
    if idx is not None:
        v = int(idx["vocab_size"])
        suites["token_shards"] = [
            gxe.ExpectTableRowCountToBeBetween(min_value=1),
            gxe.ExpectColumnValuesToBeBetween(column="max_id", min_value=0, max_value=v - 1),
            gxe.ExpectColumnValuesToBeBetween(column="min_id", min_value=0, max_value=v - 1),
            gxe.ExpectColumnValuesToBeInSet(column="first", value_set=[idx.get("bos_id", 0)]),
            gxe.ExpectColumnValuesToBeInSet(column="last", value_set=[idx.get("eos_id", 1)]),
        ]
        suites["shard_totals"] = [
            gxe.ExpectColumnPairValuesToBeEqual(column_A="bin_tokens", column_B="index_tokens"),
            gxe.ExpectColumnPairValuesToBeEqual(column_A="offset_tokens", column_B="index_tokens"),
        ]
    return suites


def validate(out: str | Path, cfg: DataConfig | None = None, gx_root: str | Path | None = None) -> Report:
    import great_expectations as gx

    out = Path(out)
    cfg = cfg or DataConfig()
    root = Path(gx_root) if gx_root else out  # GX creates ROOT/gx/
    root.mkdir(parents=True, exist_ok=True)
    ctx = gx.get_context(mode="file", project_root_dir=str(root))
    try:
        from great_expectations.data_context.types.base import ProgressBarsConfig

        ctx.variables.progress_bars = ProgressBarsConfig(globally=False)
    except Exception:  # cosmetic only
        pass
    frames = {"curated_docs": _docs_frame(out)}
    idx = None
    if (out / "shards" / "index.json").is_file():
        frames["token_shards"], frames["shard_totals"], idx = shard_frames(out)  # streamed, per chunk
    ds = ctx.data_sources.add_or_update_pandas("dsv3")
    lines, ok, results = [], True, {}
    for name, exps in _suites(cfg, idx).items():
        asset = next((a for a in ds.assets if a.name == name), None) or ds.add_dataframe_asset(name=name)
        bd = next((b for b in asset.batch_definitions if b.name == "all"), None) or \
            asset.add_batch_definition_whole_dataframe("all")
        suite = gx.ExpectationSuite(name=name)
        for e in exps:
            suite.add_expectation(e)
        suite = ctx.suites.add_or_update(suite)
        vd = ctx.validation_definitions.add_or_update(gx.ValidationDefinition(name=f"{name}_vd", data=bd, suite=suite))
        cp = ctx.checkpoints.add_or_update(gx.Checkpoint(
            name=f"{name}_checkpoint", validation_definitions=[vd],
            actions=[gx.checkpoint.UpdateDataDocsAction(name="update_docs")], result_format="SUMMARY"))
        res = cp.run(batch_parameters={"dataframe": frames[name]})
        n_fail = 0
        for vr in res.run_results.values():
            for r in vr.results:
                if not r.success:
                    n_fail += 1
                    kw = {k: v for k, v in r.expectation_config.kwargs.items() if k != "batch_id"}
                    sample = [_sample(x, kw.get("regex")) for x in (r.result.get("partial_unexpected_list") or [])[:3]]
                    lines.append(f"  FAIL {r.expectation_config.type} {kw}: "
                                 f"{r.result.get('unexpected_count', '?')} unexpected, e.g. {sample}")
        results[name] = {"success": bool(res.success), "expectations": len(exps), "failed": n_fail}
        lines.insert(len(lines) - n_fail, f"{'PASS' if res.success else 'FAIL'} suite {name}: "
                     f"{len(exps) - n_fail}/{len(exps)} expectations met ({len(frames[name])} rows)")
        ok = ok and bool(res.success)
    urls = ctx.get_docs_sites_urls()
    docs = urls[0]["site_url"] if urls else None
    lines.append(f"Data Docs: {docs}")
    return Report(ok, "\n".join(lines), docs, results)


# ---- the DVC stage `validate` (dvc.yaml, after `shards`) and reading its result ----------------
RESULT = "validation.json"  # OUT/validation.json: the stage's metrics output


class ValidationFailed(RuntimeError):
    """The GX suites failed on the current data, or no (fresh) validation result exists."""


def run_stage(cfg: DataConfig, out: str | Path, gx_root: str | Path | None = None) -> Report:
    """Validate OUT (curated docs + shards), write OUT/validation.json (success, per-suite counts,
    the shard digest it validated, Data Docs path, the report) and print the report. Callers exit
    non-zero when `.success` is False, so a failing suite fails `dvc repro`."""
    from dsv3.data.version import data_digest

    out = Path(out)
    rep = validate(out, cfg, gx_root=gx_root)
    shards = out / "shards"
    res = {"success": rep.success, "suites": rep.results, "docs": _portable(rep.docs_path),
           "data_digest": data_digest(shards) if shards.is_dir() else None,
           "failed": sum(s["failed"] for s in rep.results.values()), "report": rep.text}
    tmp = out / (RESULT + ".tmp")
    tmp.write_text(json.dumps(res, indent=1, sort_keys=True) + "\n")
    tmp.replace(out / RESULT)
    print(rep.text)
    return rep


def _portable(docs: str | None) -> str | None:
    """The Data Docs URL as a path relative to the working directory (the repo root, where `dvc repro`
    runs) when it lies under it: validation.json is a DVC metric, so it must not change with the
    checkout's location."""
    if not docs or not docs.startswith("file://"):
        return docs
    path = Path(docs.removeprefix("file://"))
    try:
        return path.resolve().relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return docs


def read_validation(data_dir: str | Path = "data", check: bool = True) -> dict:
    """The `validate` stage's result for DATA_DIR (default `data`, relative to the repo root):
    {"success", "docs", "suites", "data_digest", "failed", "report"}, the shape the data flow's own
    validation returned. With `check`, raises ValidationFailed when the result is missing, failed,
    or was made for other shards than DATA_DIR/shards holds now (run `dvc repro validate`)."""
    from dsv3.data.version import data_digest

    d = Path(data_dir)
    p = d / RESULT
    if not p.is_file():
        if check:
            raise ValidationFailed(f"no validation result at {p}: run `dvc repro validate` (or `make data`)")
        return {}
    res = json.loads(p.read_text())
    if res.get("docs") and "://" not in res["docs"]:  # relative to the repo (the data dir's parent)
        res["docs"] = (d.parent / res["docs"]).resolve().as_uri()
    if not check:
        return res
    if not res.get("success"):
        raise ValidationFailed(f"Great Expectations validation failed ({res.get('failed')} expectations); "
                               f"Data Docs: {res.get('docs')}\n{res.get('report', '')}")
    shards = d / "shards"
    if shards.is_dir() and res.get("data_digest") != (now := data_digest(shards, d.parent)):
        raise ValidationFailed(f"{p} validated shards {res.get('data_digest')}, but {shards} is now {now}: "
                               f"run `dvc repro validate`")
    return res
