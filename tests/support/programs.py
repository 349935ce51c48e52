"""Programs from the system that some tests drive (systemd-analyze, swaks, ...).

In CI (`CI` set) a missing program fails the test: `.ci/run` installs every one, and a
test that silently skipped there would prove nothing. Elsewhere it skips, naming the
Debian package that brings it.
"""

from __future__ import annotations

import os
import shutil

import pytest


def require_program(name: str, package: str) -> str:
    """The path of `name`, or the test ends here (fails in CI, skips elsewhere)."""
    found = shutil.which(name) or next(
        (path for path in (f"/usr/sbin/{name}", f"/sbin/{name}") if os.access(path, os.X_OK)),
        None)
    if found:
        return found
    message = f"{name} is not installed (Debian package {package})"
    if os.environ.get("CI"):
        pytest.fail(message + "; .ci/run should have installed it")
    pytest.skip(message)
