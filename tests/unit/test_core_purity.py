"""The protocol core stays sans-IO: no module in minismtp/smtp/ imports the OS.

The worker, the arbiter and delivery own every socket, file, thread, clock and log line;
a core that imported one of them could block the loop or behave differently in tests.
"""

from __future__ import annotations

import ast
from pathlib import Path

import minismtp.smtp

CORE = Path(minismtp.smtp.__file__).parent
FORBIDDEN = {
    "socket", "os", "selectors", "ssl", "threading", "logging", "time", "signal", "mmap",
    "subprocess", "select", "asyncio", "io", "sys", "shutil", "tempfile", "multiprocessing",
}
# Within the project the core may import only itself.
ALLOWED_OWN = "minismtp.smtp"


def imported_names(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: stays inside the package only at level 1
                found.append((node.lineno, "." * node.level + (node.module or "")))
            else:
                found.append((node.lineno, node.module or ""))
    return found


def offences(path: Path) -> list[str]:
    bad = []
    for line, name in imported_names(path):
        top = name.split(".")[0]
        if name.startswith(".."):
            bad.append(f"{path.name}:{line}: relative import {name} leaves the core")
        elif top in FORBIDDEN:
            bad.append(f"{path.name}:{line}: imports {name}")
        elif top == "minismtp" and not (name == ALLOWED_OWN or name.startswith(ALLOWED_OWN + ".")):
            bad.append(f"{path.name}:{line}: imports {name}, outside the core")
    return bad


def test_core_modules_import_nothing_of_the_os() -> None:
    modules = sorted(CORE.glob("*.py"))
    assert {p.name for p in modules} >= {
        "protocol.py", "events.py", "replies.py", "arguments.py", "scanner.py", "buffer.py"}
    problems = [problem for path in modules for problem in offences(path)]
    assert problems == []


def test_the_check_catches_an_os_import(tmp_path: Path) -> None:
    sneaky = tmp_path / "sneaky.py"
    sneaky.write_text("import re\nfrom os import path\nimport socket as s\n"
                      "from minismtp.worker import Worker\nfrom minismtp.smtp import replies\n")
    assert offences(sneaky) == [
        "sneaky.py:2: imports os", "sneaky.py:3: imports socket",
        "sneaky.py:4: imports minismtp.worker, outside the core",
    ]
