"""Session-wide fixtures for the tests that launch real runs, and the environment guard of in-process runs.

An entry point called in this process (`launch/train.py`'s `main`) fills RANK, WORLD_SIZE, MASTER_PORT ...
for a world of one (hdpo_ds.runtime.dist.fill_single_process_env); left behind, they would make every later
in-process run think a launcher started it. Such a test takes `isolated_environ`, and every test is
checked for having left those variables as it found them.
"""

from __future__ import annotations

import os

import pytest

from tests.run_helpers import RENDEZVOUS_VARIABLES, make_assets, restored_environ


@pytest.fixture(scope="session")
def assets(tmp_path_factory):
    return make_assets(tmp_path_factory.mktemp("runs"))


@pytest.fixture
def isolated_environ():
    """os.environ restored in full after the test (variables added, changed and removed alike)."""
    with restored_environ():
        yield os.environ


@pytest.fixture(autouse=True)
def _launcher_variables_unchanged(request):
    before = {k: os.environ.get(k) for k in RENDEZVOUS_VARIABLES}
    yield
    after = {k: os.environ.get(k) for k in RENDEZVOUS_VARIABLES}
    if after != before:
        changed = {k: (before[k], after[k]) for k in before if before[k] != after[k]}
        pytest.fail(
            f"{request.node.nodeid} left launcher variables changed (before, after): {changed}; "
            "an in-process run must use the isolated_environ fixture"
        )
