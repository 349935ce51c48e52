"""Reading the configuration file: only a regular file, at most MAX_CONFIG_BYTES, never
a wait (the master reads it on every HUP)."""

from __future__ import annotations

import os
import threading

import pytest

from minismtp.config import MAX_CONFIG_BYTES, load_config
from support.configfiles import problems_of


def test_a_fifo_is_refused_without_waiting_for_a_writer(tmp_path):
    path = tmp_path / "fifo.yaml"
    os.mkfifo(path)
    outcome: list[list[str]] = []
    reader = threading.Thread(target=lambda: outcome.append(problems_of(path)), daemon=True)
    reader.start()
    reader.join(10)
    if reader.is_alive():  # unblock the reader so the test process can end
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail("reading a FIFO blocked")
    assert outcome == [[f'config: cannot read "{path}": not a regular file']]


def test_a_character_device_is_refused():
    assert problems_of("/dev/zero") == ['config: cannot read "/dev/zero": not a regular file']


def test_a_file_over_the_limit_is_refused(tmp_path):
    path = tmp_path / "big.yaml"
    path.write_bytes(b"# padding\n" * (MAX_CONFIG_BYTES // 10 + 1))
    assert path.stat().st_size > MAX_CONFIG_BYTES
    assert problems_of(path) == [
        f'config: "{path}" is larger than {MAX_CONFIG_BYTES} bytes (1 MiB), '
        "the most a configuration may be"]


def test_a_file_exactly_at_the_limit_is_read(tmp_path):
    path = tmp_path / "full.yaml"
    text = b"server:\n  workers: 3\n"
    path.write_bytes(text + b"#" * (MAX_CONFIG_BYTES - len(text) - 1) + b"\n")
    assert path.stat().st_size == MAX_CONFIG_BYTES
    assert load_config(path).server.workers == 3


def test_a_symlink_to_a_regular_file_is_followed(tmp_path):
    target = tmp_path / "real.yaml"
    target.write_text("server:\n  workers: 2\n")
    link = tmp_path / "link.yaml"
    link.symlink_to(target)
    assert load_config(link).server.workers == 2
