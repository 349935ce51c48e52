"""Code run first in a test's server process, as a `sitecustomize` module in a directory
put first on its PYTHONPATH: what a test needs from inside the process (a worker that
crashes at start, a slow start) without any hook in the server's own code."""

from __future__ import annotations

import os
from pathlib import Path


def site_env(tmp_path: Path, source: str) -> dict[str, str]:
    """Our environment, with `source` as the sitecustomize of the processes started in it."""
    hook_dir = tmp_path / "sitehook"
    hook_dir.mkdir()
    (hook_dir / "sitecustomize.py").write_text(source)
    path = [str(hook_dir), *filter(None, [os.environ.get("PYTHONPATH")])]
    return dict(os.environ, PYTHONPATH=os.pathsep.join(path))
