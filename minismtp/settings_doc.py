"""README.md's table of settings, generated from `config.SETTINGS`.

    python -m minismtp.settings_doc            # print the table
    python -m minismtp.settings_doc --write    # replace the table in README.md

Each setting is described once, by its `Setting` (default and `doc`); the README shows
that, and a test fails when the two differ. Adding a setting: add its `Setting`, show it
with its default in etc/minismtp.yaml, and run the `--write` command above.

Untrusted input: none (this checkout's settings and README).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable
from pathlib import Path

from minismtp.config import SETTINGS, Setting

README = Path(__file__).resolve().parent.parent / "README.md"
REGENERATE = "python -m minismtp.settings_doc --write"
BEGIN = (f"<!-- settings table: generated from minismtp/config.py SETTINGS by `{REGENERATE}`; "
         "edit the Setting, not this table -->")
END = "<!-- end of settings table -->"


def shown_default(setting: Setting) -> str:
    """The default's cell: a YAML value in backticks (strings bare, the rest as JSON, which
    YAML reads), or for a default computed at load time the docstring of what computes it."""
    default = setting.default
    if callable(default):
        return " ".join((default.__doc__ or default.__name__).split())
    return f"`{default if isinstance(default, str) else json.dumps(default)}`"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def settings_table(settings: Iterable[Setting] = SETTINGS) -> str:
    """The Markdown table: key, default, meaning; one row per setting, in table order."""
    rows = ["| key | default | meaning |", "| --- | --- | --- |"]
    rows += [f"| `{setting.name}` | {_cell(shown_default(setting))} | {_cell(setting.doc)} |"
             for setting in settings]
    return "\n".join(rows) + "\n"


def _bounds(text: str) -> tuple[int, int]:
    """Where the table sits in `text`: just after the BEGIN line, at the END line."""
    begin = text.find(BEGIN + "\n")
    end = text.find(END, begin)
    if begin < 0 or end < 0:
        raise ValueError(f"no settings table between the markers {BEGIN!r} and {END!r}")
    return begin + len(BEGIN) + 1, end


def current_table(text: str) -> str:
    """The table as it stands between the markers of `text` (a README)."""
    start, end = _bounds(text)
    return text[start:end].strip("\n") + "\n"


def with_table(text: str, table: str) -> str:
    """`text` with the table between its markers replaced by `table`. Blank lines around
    it keep the markers (HTML comments) out of the table in every Markdown renderer."""
    start, end = _bounds(text)
    return f"{text[:start]}\n{table}\n{text[end:]}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m minismtp.settings_doc",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--write", nargs="?", const=str(README), metavar="README",
                        help=f"replace the table in this file (default {README})")
    args = parser.parse_args(argv)
    table = settings_table()
    if args.write is None:
        sys.stdout.write(table)
        return 0
    path = Path(args.write)
    try:
        text = path.read_text(encoding="utf-8")
        path.write_text(with_table(text, table), encoding="utf-8")
    except (OSError, ValueError) as exc:
        print(f"settings_doc: {path}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
