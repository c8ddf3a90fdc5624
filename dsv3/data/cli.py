"""`dsv3 data ...`: curate sources, print accounting, validate, and the DVC stage entry points.

    dsv3 data curate SOURCE... --out DIR [--workers N] [--ray-address A] [--params params.yaml] [--set k=v]
    dsv3 data stats DIR
    dsv3 data validate DIR            (Great Expectations suites; non-zero exit on failure)
    python -m dsv3.data.cli stage {curate,tokenizer,shards} [--params params.yaml]   (dvc.yaml)
Parameters come from params.yaml's `data:` section (DataConfig), then CLI flags / `--set`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

from dsv3.data.config import DataConfig


def load_config(params: str | None = None, overrides: list[str] | None = None, **fields) -> DataConfig:
    from dsv3.config import apply_override, format_errors
    from dsv3.model.config import ConfigError
    from pydantic import ValidationError

    d: dict = {}
    if params and Path(params).is_file():
        d = (yaml.safe_load(Path(params).read_text()) or {}).get("data", {}) or {}
    for ov in overrides or []:
        apply_override(d, ov)
    d.update({k: v for k, v in fields.items() if v is not None})
    try:
        return DataConfig(**d)
    except ValidationError as e:
        raise ConfigError(format_errors(e, DataConfig).replace("invalid config: ", "invalid config: data.")) from None


def format_stats(out: str | Path) -> str:
    out = Path(out)
    p = out / "stats.json"
    if not p.is_file():
        raise FileNotFoundError(f"no stats.json in {out}")
    s = json.loads(p.read_text())
    lines = [f"input documents: {s['input']}  ({s['input_bytes']} bytes)"]
    for k, v in s["buckets"].items():
        lines.append(f"  {k:<32} {v:>8}  {100 * v / max(1, s['input']):6.2f}%")
    ok = sum(s["buckets"].values()) == s["input"]
    lines.append(f"  {'sum of buckets':<32} {sum(s['buckets'].values()):>8}  ({'= input' if ok else 'MISMATCH'})")
    for name in ("tokenizer_stats.json", "shards_stats.json"):
        if (out / name).is_file():
            lines.append(f"{name}: {(out / name).read_text().strip()}")
    return "\n".join(lines)


def _curate(a) -> int:
    from dsv3.data.curate import run_all
    from dsv3.data.sources import DataSourceError

    cfg = load_config(a.params, a.set, sources=a.sources or None, workers=a.workers, ray_address=a.ray_address)
    try:
        run_all(cfg, a.out)
    except DataSourceError as e:
        print(f"dsv3 data: {e}", file=sys.stderr)
        return 2
    print(format_stats(a.out))
    return 0


def _stats(a) -> int:
    try:
        print(format_stats(a.dir))
    except FileNotFoundError as e:
        print(f"dsv3 data: {e}", file=sys.stderr)
        return 2
    return 0


def _validate(a) -> int:
    from dsv3.data.validate import validate

    report = validate(a.dir, gx_root=a.gx_root)
    print(report.text)
    return 0 if report.success else 1


def _stage(a) -> int:
    from dsv3.data import curate

    cfg = load_config(a.params, a.set)
    out = a.out or cfg.out_dir
    fn = {"curate": curate.curate, "tokenizer": curate.tokenizer_stage, "shards": curate.shards_stage}[a.name]
    try:
        fn(cfg, out)
    except curate.AccountingError as e:
        print(f"dsv3 data: {e}", file=sys.stderr)
        return 1
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("data", help="curate data, train the tokenizer, pack shards")
    sub = p.add_subparsers(dest="data_command", metavar="ACTION")
    c = sub.add_parser("curate", help="run the whole pipeline on SOURCE... into --out DIR")
    c.add_argument("sources", nargs="*", help="files, dirs, globs, hf:ORG/NAME, builtin:stdlib")
    c.add_argument("--out", required=True)
    c.add_argument("--workers", type=int, default=None, help="run per-document stages on Ray with N workers")
    c.add_argument("--ray-address", default=None)
    c.add_argument("--params", default="params.yaml", help="params file with a data: section (if present)")
    c.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. dedup.bands=20")
    c.set_defaults(func=_curate)
    s = sub.add_parser("stats", help="print the accounting of a curated DIR")
    s.add_argument("dir")
    s.set_defaults(func=_stats)
    v = sub.add_parser("validate", help="Great Expectations suites on DIR/curated and DIR/shards")
    v.add_argument("dir")
    v.add_argument("--gx-root", default=None, help="GX project root (default DIR; GX writes DIR/gx/)")
    v.set_defaults(func=_validate)
    st = sub.add_parser("stage", help="one DVC stage (used by dvc.yaml)")
    st.add_argument("name", choices=["curate", "tokenizer", "shards"])
    st.add_argument("--params", default="params.yaml")
    st.add_argument("--out", default=None)
    st.add_argument("--set", action="append", default=[])
    st.set_defaults(func=_stage)
    p.set_defaults(func=lambda a: (p.print_help(), 2)[1])


def main(argv: list[str] | None = None) -> int:
    """`python -m dsv3.data.cli ...` == `dsv3 data ...` (what dvc.yaml's stages call)."""
    from dsv3.cli import main as dsv3_main

    return dsv3_main(["data", *(argv if argv is not None else sys.argv[1:])])


if __name__ == "__main__":
    sys.exit(main())
