"""Helpers for tests against the server-mode stack (infra/stack.py): run its CLI, run Python with the
stack's exports (what `source .stack/env` gives a user) in a chosen working directory, bring a stack up
in a temp state dir and down again. The `stack` fixture (tests/infra/conftest.py) uses them."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
STACK = REPO / "infra" / "stack.py"


def stack_cmd(state: Path, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(STACK), *args, "--state", str(state)], capture_output=True,
                          text=True, timeout=timeout)


def run_py(code: str, env: dict, cwd: Path, timeout: float = 300) -> dict:
    """Run `code` with the stack's env in `cwd`; it prints one JSON line last."""
    full = {**os.environ, **env, "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=full, cwd=cwd, capture_output=True,
                       text=True, timeout=timeout)
    assert r.returncode == 0, f"rc={r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}"
    return json.loads(r.stdout.strip().splitlines()[-1])


@contextlib.contextmanager
def stack_up(*up_args: str):
    """A stack in a fresh temp state dir: yields {state, env, st, up}; always brought down and removed."""
    # short path: Ray's unix sockets live under its temp dir (107-byte limit)
    state = Path(tempfile.mkdtemp(prefix="dsv3s-", dir="/tmp"))
    try:
        r = stack_cmd(state, "up", *up_args)
        assert r.returncode == 0, f"stack up failed:\n{r.stdout}\n{r.stderr}"
        yield {"state": state, "env": json.loads((state / "env.json").read_text()),
               "st": json.loads((state / "state.json").read_text()), "up": r.stdout}
    finally:
        stack_cmd(state, "down", timeout=300)
        shutil.rmtree(state, ignore_errors=True)
