"""The `stack` fixture: one server-mode stack (infra/stack.py) per test module, in a temp state dir,
one logical CPU per Ray node (so a two-worker job is placed one worker per node)."""

import pytest

from tests.infra.stack_helpers import stack_up


@pytest.fixture(scope="module")
def stack():
    with stack_up("--ray-cpus", "1") as s:
        yield s
