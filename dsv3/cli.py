"""`dsv3 <stage> ...`: one console script, one sub-command group per package.

Each package that has commands exposes `register(subparsers)` in its own `cli.py`
(dsv3/data/cli.py, dsv3/train/cli.py, ...); this file only wires them together, so
no package reaches into another's internals.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# packages whose cli.py registers sub-commands, in help order
_MODULES = ["dsv3.model.cli", "dsv3.data.cli", "dsv3.train.cli", "dsv3.parallel.cli",
            "dsv3.posttrain.cli", "dsv3.evals.cli", "dsv3.serve.cli"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dsv3", description="DeepSeek-V3 lifecycle platform")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name in _MODULES:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:
                continue
            raise
        mod.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    from dsv3.config_base import run_command

    return run_command(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
