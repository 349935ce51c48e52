"""Interop tests: real programs (swaks, curl, s-nail, Python's smtplib, Postfix relaying,
Dovecot serving the Maildir over IMAP, HAProxy balancing two instances) against a real
minismtp.

Each test is marked `integration` and `interop`. `@pytest.mark.neighbour("swaks", ...)`
names the programs a test runs: in CI a missing one fails the test, elsewhere it skips
(support/neighbours.py). The Postfix and Dovecot fixtures live in support/postfix.py and
support/dovecot.py, one module per neighbour; each starts its own instance, with its own
configuration in a temporary directory and on a free loopback port, and stops it when the
test ends, also when it fails.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from support.dovecot import dovecot  # noqa: F401  (fixtures)
from support.neighbours import program, shared_tmp  # noqa: F401
from support.postfix import postfix  # noqa: F401


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(item.path).parents:
            item.add_marker(pytest.mark.integration)
            item.add_marker(pytest.mark.interop)


def pytest_runtest_setup(item: pytest.Item) -> None:
    for marker in item.iter_markers("neighbour"):
        for name in marker.args:
            program(name)
