"""Configuration files for the config tests, and what load_config refuses in them."""

from __future__ import annotations

from pathlib import Path

import pytest

from minismtp.config import ConfigError, load_config


def problems_of(path: Path | str | None = None,
                overrides: dict[str, object] | None = None) -> list[str]:
    """The problems load_config reports for a configuration it must refuse; its message
    is those problems, one per line."""
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    assert str(info.value) == "\n".join(info.value.problems)
    return info.value.problems
