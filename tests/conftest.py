"""Session-wide fixtures for the tests that launch real runs."""

from __future__ import annotations

import pytest

from tests.run_helpers import make_assets


@pytest.fixture(scope="session")
def assets(tmp_path_factory):
    return make_assets(tmp_path_factory.mktemp("runs"))
