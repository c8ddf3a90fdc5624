"""Suite-wide fixtures and the `scale` tier.

One real Prefect test server for every flow test of the session (starting one costs ~30 s, so
modules share it instead of starting their own).

`scale`: the server-mode and multi-node scenarios (the two-node stack, Ray head restarts, tracking and
Prefect servers killed mid-run, deployments on a worker, screenshots of the real UIs). Each starts real
servers and clusters for minutes, so they run as their own tier: `make test` runs everything else
(under 20 minutes on 2 cores), `make test-scale` runs these, and CI (`.ci/run`) runs both.
"""

from pathlib import Path

import pytest

SCALE = {  # test modules (relative to tests/) that form the `scale` tier
    "infra/test_stack.py", "infra/test_noshare.py", "infra/test_deploy.py", "infra/test_screenshots.py",
    "faults/test_ray_head.py", "faults/test_tracking_outage.py", "faults/test_prefect_outage.py",
}
_TESTS = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config, items):
    for item in items:
        rel = Path(str(item.fspath)).resolve().relative_to(_TESTS).as_posix()
        if rel in SCALE:
            item.add_marker(pytest.mark.scale)


@pytest.fixture(scope="session")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=240):
        yield
