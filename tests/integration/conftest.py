"""Integration tests: a real `python -m minismtp serve` process and raw SMTP clients.

The fixtures (`make_server`, `server`, `raw_clients`) are in tests/conftest.py, built on
support/server.py and support/rawclient.py, so tests/interop uses the same ones.
"""

from __future__ import annotations

from pathlib import Path

import pytest


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Everything here starts real processes: `pytest -m "not integration"` leaves it out."""
    here = Path(__file__).parent
    for item in items:
        if here in Path(item.path).parents:
            item.add_marker(pytest.mark.integration)
