"""Suite-wide fixtures. One real Prefect test server for every flow test of the session
(starting one costs ~30 s, so modules share it instead of starting their own)."""

import pytest


@pytest.fixture(scope="session")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=240):
        yield
