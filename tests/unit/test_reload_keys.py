"""The README's list of what a reload applies agrees with the settings and the code."""

from __future__ import annotations

import re
from pathlib import Path

from minismtp.arbiter import RESTART_ONLY
from minismtp.config import SETTINGS

README = Path(__file__).resolve().parents[2] / "README.md"
_KEY = re.compile(r"`([a-z_]+\.[a-z_]+)`")


def _section() -> str:
    text = README.read_text()
    start = text.index("## Reloading (HUP)")
    end = text.index("\n## ", start + 1)
    return text[start:end]


def _keys_after(marker: str) -> tuple[set[str], str]:
    """Keys named in the paragraph or list that follows `marker`, and its raw text."""
    section = _section()
    start = section.index(marker) + len(marker)
    rest = section[start:].lstrip("\n")
    block = re.split(r"\n\n(?!- |  )", rest, maxsplit=1)[0]
    return set(_KEY.findall(block)), block


def test_every_setting_is_either_reloadable_or_restart_only():
    applied, _ = _keys_after("Applied on HUP:")
    restart, text = _keys_after("Restart needed:")
    names = {setting.name for setting in SETTINGS}
    assert applied | restart == names, sorted(names - applied - restart)
    assert not applied & restart
    assert not (applied | restart) - names  # nothing listed that does not exist


def test_the_restart_only_list_is_the_codes():
    restart, text = _keys_after("Restart needed:")
    assert restart == set(RESTART_ONLY)
    if not RESTART_ONLY:
        assert text.strip() == "none."
