"""The benchmark's work folder (every server's Maildir and logs) and a file system probe.

Untrusted input: none.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

DEFERRED: list[Path] = []  # folders to remove when the benchmark ends
ROOTS: list[Path] = []  # the benchmark's own work folders


def make_root(parent: str | None) -> tuple[Path, str]:
    """The folder every server's Maildir and logs go under; (path, how it was set up).

    Marked as a top of directory hierarchy (chattr +T) so that ext4 puts each server's
    folder in a block group of its own. Without it they share the block groups of the
    temporary folder, where other programs create and delete files all the time; on ext4
    without a journal the kernel then skips every inode freed in the last minutes when
    allocating one, and each file created costs a scan (measured here: 528 us instead of
    28 us per create+link+unlink), which would be charged to the Maildir servers.
    """
    root = Path(tempfile.mkdtemp(prefix="minismtp-bench-", dir=parent))
    chattr = shutil.which("chattr")
    if chattr is None:
        return root, "chattr not found, so server folders share block groups"
    done = subprocess.run([chattr, "+T", str(root)], capture_output=True, text=True)
    if done.returncode != 0:
        return root, f"chattr +T failed: {done.stderr.strip()[:80]}"
    return root, "chattr +T: a block group per server folder"


def filesystem_probe(root: Path, files: int = 1000) -> dict[str, Any]:
    """File system under `root` and the cost of a Maildir-like create+write+link+unlink."""
    best, fstype, journal = "", "?", None
    with open("/proc/mounts") as mounts:
        for line in mounts:
            device, point, kind = line.split()[:3]
            if str(root).startswith(point.rstrip("/") + "/") and len(point) >= len(best):
                best, fstype = point, kind
                name = os.path.basename(device)
                journal = (any(entry.startswith(name + "-") for entry in os.listdir(
                    "/proc/fs/jbd2")) if os.path.isdir("/proc/fs/jbd2") else False
                ) if kind.startswith("ext") else None
    probe = Path(tempfile.mkdtemp(prefix="fsprobe-", dir=root))
    (probe / "tmp").mkdir()
    (probe / "new").mkdir()
    data = b"x" * 1200
    started = time.perf_counter()
    for index in range(files):
        tmp, new = f"{probe}/tmp/{index}", f"{probe}/new/{index}"
        fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        os.write(fd, data)
        os.close(fd)
        os.link(tmp, new)
        os.unlink(tmp)
    cost = (time.perf_counter() - started) / files * 1e6
    DEFERRED.append(probe)
    return {"mount": best, "type": fstype, "journal": journal,
            "create_link_unlink_us": round(cost, 1)}


def remove_deferred() -> None:
    """Remove what DEFERRED lists, then the work folders if nothing is left in them."""
    for path in DEFERRED:
        shutil.rmtree(path, ignore_errors=True)
    DEFERRED.clear()
    for root in ROOTS:  # empty unless a failed server's logs are kept there
        try:
            root.rmdir()
        except OSError:
            pass
