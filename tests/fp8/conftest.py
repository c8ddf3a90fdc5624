"""The Triton interpreter must be chosen before `triton` is first imported (triton's own
library functions are decorated at import time), so it is set here, when pytest enters
tests/fp8, on machines without CUDA. With CUDA the kernels run for real."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _one_thread():
    """Many tiny GEMMs: one intra-op thread is fastest on a shared CPU (no spin-waiting)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
