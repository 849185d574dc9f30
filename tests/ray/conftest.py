"""The Ray tests' setup. The session's Ray instance (fixtures ``ray_instances``, ``local_ray``) lives in
``tests/raysession.py``, shared with the Ray rows of ``tests/conformance``.

Before Ray starts anywhere in this session: ``prepare_environment`` keeps every Ray process bound to
127.0.0.1 and puts this checkout's ``prefetch`` and the test helpers first on ``PYTHONPATH``, so the
actors run the code under test.
"""

from __future__ import annotations

import pytest
from raysession import prepare_environment

prepare_environment()


@pytest.fixture(autouse=True)
def no_leaks():
    """Replaces the suite's process check: Ray starts and pools worker processes of its own. Each
    Ray test checks that the loader's actors are gone instead (``assert_no_actors``)."""
    yield
