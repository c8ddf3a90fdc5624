"""`dsv3 data ...`: curate sources, print accounting, validate, and the DVC stage entry points.

    dsv3 data curate SOURCE... --out DIR [--workers N] [--ray-address A] [--params FILE] [--set data.k=v]
    dsv3 data stats DIR
    dsv3 data validate DIR            (Great Expectations suites; non-zero exit on failure)
    python -m dsv3.data.cli stage {curate,tokenizer,shards,validate} [--params params.yaml]   (dvc.yaml)
Parameters: the `data:` section (DataConfig) of `--params` (a RunConfig-shaped YAML; default
params.yaml when present, `none` for none), then `--set data.k=v`, then the flags; loaded by
`dsv3.config_base.load_config` like every other entry point.
"""

from __future__ import annotations

import sys
from pathlib import Path

from dsv3.config_base import load_config, run_command
from dsv3.data.config import DataConfig
from dsv3.data.report import format_stats

DEFAULT_PARAMS = "params.yaml"


def _run_config():
    from dsv3.config import RunConfig  # the file is a whole run config: its other sections are checked too

    return RunConfig


def load_data_config(params: str | None = None, overrides: list[str] | tuple[str, ...] = (), **fields) -> DataConfig:
    """DataConfig from the `data:` section of `params` (None: params.yaml if present; "none": no
    file), `--set data.k=v` overrides and flag values (`fields`, None = not given)."""
    if params is None:
        params = DEFAULT_PARAMS if Path(DEFAULT_PARAMS).is_file() else "none"
    path = None if params == "none" else params
    return load_config(DataConfig, path, overrides, section="data", root=_run_config(), values={f"data.{k}": v for k, v in fields.items()})


def _curate(a) -> int:
    from dsv3.data.curate import run_all
    from dsv3.data.sources import DataSourceError

    cfg = load_data_config(a.params, a.set, sources=a.sources or None, workers=a.workers, ray_address=a.ray_address)
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

    cfg = load_data_config(a.params, a.set)
    out = a.out or cfg.out_dir
    if a.name == "validate":  # GX suites; a failure fails `dvc repro`; Data Docs under ./gx as in the data flow
        from dsv3.data.validate import run_stage

        return 0 if run_stage(cfg, out, gx_root=a.gx_root).success else 1
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
    c.add_argument("--params", default=None, help="YAML with a data: section (default params.yaml if present; none)")
    c.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. data.dedup.bands=20")
    c.set_defaults(func=_curate)
    s = sub.add_parser("stats", help="print the accounting of a curated DIR")
    s.add_argument("dir")
    s.set_defaults(func=_stats)
    v = sub.add_parser("validate", help="Great Expectations suites on DIR/curated and DIR/shards")
    v.add_argument("dir")
    v.add_argument("--gx-root", default=None, help="GX project root (default DIR; GX writes DIR/gx/)")
    v.set_defaults(func=_validate)
    st = sub.add_parser("stage", help="one DVC stage (used by dvc.yaml)")
    st.add_argument("name", choices=["curate", "tokenizer", "shards", "validate"])
    st.add_argument("--params", default="params.yaml")
    st.add_argument("--out", default=None)
    st.add_argument("--gx-root", default=".", help="validate: GX project root (writes GX_ROOT/gx/)")
    st.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    st.set_defaults(func=_stage)
    p.set_defaults(func=lambda a: (p.print_help(), 2)[1])


def main(argv: list[str] | None = None) -> int:
    """`python -m dsv3.data.cli ...` == `dsv3 data ...` (what dvc.yaml's stages call)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m dsv3.data.cli")
    register(parser.add_subparsers(dest="command"))
    return run_command(parser, ["data", *(argv if argv is not None else sys.argv[1:])])


if __name__ == "__main__":
    sys.exit(main())

