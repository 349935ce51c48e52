"""One source per fact: README.md's settings table and etc/minismtp.yaml against SETTINGS."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from minismtp import settings_doc
from minismtp.config import SETTINGS, Setting
from minismtp.values import integer

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
EXAMPLE = ROOT / "etc" / "minismtp.yaml"


def test_readme_settings_table_is_the_generated_one():
    current = settings_doc.current_table(README.read_text(encoding="utf-8"))
    assert current == settings_doc.settings_table(), (
        f"README.md's settings table differs from minismtp/config.py SETTINGS; "
        f"regenerate it with `{settings_doc.REGENERATE}`")


def test_every_setting_has_a_row():
    rows = settings_doc.settings_table().splitlines()[2:]
    assert [re.match(r"\| `([^`]+)` \|", row)[1] for row in rows] == [s.name for s in SETTINGS]


def _section_text(text: str, section: str) -> str:
    """The lines of one top-level section of a YAML file, comments included."""
    match = re.search(rf"^{section}:\n((?:[ #].*\n|\n)*)", text, re.M)
    assert match, f"no {section}: section"
    return match[1]


def test_example_config_shows_every_setting_with_its_default():
    text = EXAMPLE.read_text(encoding="utf-8")
    document = yaml.safe_load(text)
    wrong = []
    for setting in SETTINGS:
        section, key = setting.name.split(".")
        if callable(setting.default):  # computed here and now: shown commented out
            if not re.search(rf"^  # {key}: ", _section_text(text, section), re.M):
                wrong.append(f"{setting.name}: missing (commented out, with an example)")
        elif key not in (document.get(section) or {}):
            wrong.append(f"{setting.name}: missing (should read {key}: {setting.default!r})")
        elif document[section][key] != setting.default:
            wrong.append(f"{setting.name}: {document[section][key]!r}, but the default is "
                         f"{setting.default!r}")
    assert not wrong, "etc/minismtp.yaml must show every setting with its default:\n" + \
        "\n".join(wrong)


def test_table_cells_escape_pipes_and_show_computed_defaults():
    def computed() -> int:
        """twice the CPU count"""
        return 2

    settings = [Setting("a.b", "x|y", integer(0), "one | two"),
                Setting("a.c", computed, integer(0), "computed"),
                Setting("a.d", [1, None, True], integer(0), "a list")]
    assert settings_doc.settings_table(settings).splitlines()[2:] == [
        r"| `a.b` | `x\|y` | one \| two |",
        "| `a.c` | twice the CPU count | computed |",
        "| `a.d` | `[1, null, true]` | a list |",
    ]


def test_write_replaces_only_the_table(tmp_path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n\n{settings_doc.BEGIN}\n| stale |\n{settings_doc.END}\n\nrest\n",
                      encoding="utf-8")
    assert settings_doc.main(["--write", str(readme)]) == 0
    assert readme.read_text(encoding="utf-8") == (
        f"# title\n\n{settings_doc.BEGIN}\n\n{settings_doc.settings_table()}\n"
        f"{settings_doc.END}\n\nrest\n")
    assert settings_doc.main([]) == 0
    assert capsys.readouterr().out == settings_doc.settings_table()


def test_write_without_markers_fails_and_leaves_the_file(tmp_path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text("# no table here\n", encoding="utf-8")
    assert settings_doc.main(["--write", str(readme)]) == 1
    assert readme.read_text(encoding="utf-8") == "# no table here\n"
    assert "no settings table between the markers" in capsys.readouterr().err
