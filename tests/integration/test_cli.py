"""The `minismtp` command as a subprocess: exit statuses and what it prints."""

from __future__ import annotations

import grp
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import yaml

import minismtp

CLI = [sys.executable, "-m", "minismtp"]
RUN_TIMEOUT_S = 20


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], cwd=cwd, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=RUN_TIMEOUT_S)


def _problems(result: subprocess.CompletedProcess) -> list[str]:
    lines = result.stderr.splitlines()
    assert "Traceback" not in result.stderr
    assert all(line.startswith("minismtp: ") for line in lines), lines
    return [line.removeprefix("minismtp: ") for line in lines]


BAD_CONFIGS = {
    "invalid-yaml": (
        "server:\n  listen: [\"127.0.0.1:0\"\n  workers: 1\n",
        [r'^config: invalid YAML in ".*bad\.yaml" at line \d+, column \d+: .+']),
    "unknown-key": (
        "server:\n  hostnme: mx.example.org\n",
        [r'^server\.hostnme: unknown key \(did you mean "hostname"\?\)$']),
    "unknown-section": (
        "limit:\n  max_recipients: 10\n",
        [r'^limit: unknown section \(did you mean "limits"\?\)$']),
    "wrong-type": (
        'limits:\n  max_recipients: "ten"\n',
        [r'^limits\.max_recipients: must be an integer >= 1, got "ten"$']),
    "out-of-range": (
        "limits:\n  max_command_length: 100\n",
        [r"^limits\.max_command_length: must be an integer from 512 to 65536, got 100$"]),
    "several-at-once": (
        "server:\n  workers: 0\n  listen: [\"nowhere\"]\n"
        "limits:\n  command_timeout: soon\n  bare_lf: maybe\n"
        "delivery:\n  fsync: \"yes\"\n",
        [r"^server\.listen\[0\]: missing port",
         r'^server\.workers: must be an integer >= 1 or "auto", got 0$',
         r'^limits\.command_timeout: must be a duration of at least 1s .*got "soon"$',
         r'^limits\.bare_lf: must be one of "normalize", "reject", "accept", got "maybe"$',
         r'^delivery\.fsync: must be true or false, got "yes"$']),
    "backlog-past-c-int": (  # listen() would raise OverflowError
        "server:\n  backlog: 2147483648\n",
        [r"^server\.backlog: must be an integer from 1 to 2147483647, got 2147483648$"]),
}


@pytest.mark.parametrize("command", ["serve", "check-config"])
@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_bad_config_exits_2_naming_the_key(tmp_path, case, command):
    text, expected = BAD_CONFIGS[case]
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    result = run(command, "--config", str(path), cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    problems = _problems(result)
    assert len(problems) == len(expected), problems
    for pattern in expected:
        assert sum(bool(re.search(pattern, p)) for p in problems) == 1, (pattern, problems)
    assert not (tmp_path / "var").exists()  # nothing started, nothing created


def test_missing_config_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    result = run("serve", "--config", str(missing), cwd=tmp_path)
    assert result.returncode == 2
    [problem] = _problems(result)
    assert problem == f'config: cannot read "{missing}": No such file or directory'


def test_bad_command_line_override(tmp_path):
    result = run("serve", "--listen", "127.0.0.1", "--workers", "none", cwd=tmp_path)
    assert result.returncode == 2
    problems = _problems(result)
    assert any(p.startswith("server.listen[0]: missing port") for p in problems), problems
    assert any(p.startswith("server.workers: ") for p in problems), problems


@pytest.mark.parametrize("workers", ["\u00b2", "\u0663", "1\u00b2"])
def test_workers_that_are_digits_only_to_unicode(tmp_path, workers):
    # str.isdigit() accepts these; int() refuses "²": one line naming the key, not a traceback.
    result = run("serve", "--listen", "127.0.0.1:0", "--workers", workers, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert _problems(result) == [
        f'server.workers: must be an integer >= 1 or "auto", got "{workers}"']
    assert not (tmp_path / "var").exists()


@pytest.mark.parametrize("command", ["serve", "check-config"])
def test_ciphers_leaving_tls_1_2_clients_nothing_exit_2(tmp_path, tls_files, command):
    """aRSA with an ECDSA certificate only: every TLS 1.2 client would fail its handshake
    while TLS 1.3 works, so neither serve nor check-config takes it."""
    cert, key = tls_files  # an ECDSA pair
    path = tmp_path / "ciphers.yaml"
    path.write_text(f'server:\n  listen: ["127.0.0.1:0"]\n  workers: 1\n'
                    f'delivery:\n  path: {tmp_path / "mail"}\n'
                    f'tls:\n  ciphers: "aRSA"\n'
                    f'  certificates: [{{cert: "{cert}", key: "{key}"}}]\n')
    result = run(command, "--config", str(path), cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    assert _problems(result) == [
        'tls.ciphers: "aRSA" leaves TLS 1.2 clients no cipher usable with the certificates '
        "(ECDSA); only TLS 1.3 clients would get through (TLS 1.3 suites are OpenSSL's, not "
        "set here)"]
    assert not (tmp_path / "mail").exists()  # nothing started, nothing created


def test_check_config_prints_effective_yaml(tmp_path):
    path = tmp_path / "good.yaml"
    path.write_text("server:\n  hostname: mx.example.org\n  workers: 3\n"
                    "limits:\n  max_message_size: 10M\n  command_timeout: 90s\n")
    result = run("check-config", "--config", str(path), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    document = yaml.safe_load(result.stdout)
    assert {"server", "limits", "delivery", "logging"} <= set(document)
    assert document["server"]["hostname"] == "mx.example.org"
    assert document["server"]["workers"] == 3
    assert document["limits"]["max_message_size"] == "10M"
    assert document["limits"]["command_timeout"] in ("90s", 90, 90.0)
    assert document["limits"]["bare_lf"] == "normalize"
    # What it prints is itself a valid configuration that reads back the same.
    again = tmp_path / "again.yaml"
    again.write_text(result.stdout)
    second = run("check-config", "--config", str(again), cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    assert yaml.safe_load(second.stdout) == document


def test_check_config_accepts_the_example_file(tmp_path):
    example = Path(minismtp.__file__).resolve().parent.parent / "etc" / "minismtp.yaml"
    if not example.is_file():
        pytest.skip("etc/minismtp.yaml is not next to the package")
    result = run("check-config", "--config", str(example), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert yaml.safe_load(result.stdout)["limits"]["bare_lf"] == "normalize"


def test_check_config_warns_of_a_maildir_its_group_cannot_read(tmp_path):
    """A Maildir root made 0700 for the server alone, with delivery.group naming a
    reader's group: a warning naming the directory, and the configuration still passes."""
    groups = [g for g in grp.getgrall() if g.gr_gid != os.getegid()
              and (os.geteuid() == 0 or g.gr_gid in os.getgroups())]
    if not groups:
        pytest.skip("no second group to give files to")
    group = groups[0].gr_name
    mail = tmp_path / "mail"
    mail.mkdir()
    mail.chmod(0o700)
    path = tmp_path / "group.yaml"
    path.write_text(f"delivery:\n  path: {mail}\n  group: {group}\n"
                    f'  file_mode: "0640"\n  dir_mode: "0750"\n')
    result = run("check-config", "--config", str(path), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert _problems(result) == [
        f'warning: delivery.group: "{mail}" is closed to group "{group}" (mode 0700, group '
        f'"{grp.getgrgid(os.getegid()).gr_name}"), so a reader in it cannot get in: '
        f"chgrp {group} and chmod g+rwxs it"]
    assert yaml.safe_load(result.stdout)["delivery"]["group"] == group
    os.chown(mail, -1, groups[0].gr_gid)
    mail.chmod(0o2770)
    result = run("check-config", "--config", str(path), cwd=tmp_path)
    assert result.returncode == 0 and result.stderr == "", result.stderr


def test_version():
    result = run("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"minismtp {minismtp.__version__}"


def _read_stderr_into(proc: subprocess.Popen, lines: list[str]) -> threading.Thread:
    def read() -> None:
        for raw in proc.stderr:
            lines.append(raw.decode("utf-8", "replace"))
    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    return thread


def test_serve_without_config_file(tmp_path):
    proc = subprocess.Popen([*CLI, "serve", "--listen", "127.0.0.1:0", "--workers", "1"],
                            cwd=tmp_path, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    lines: list[str] = []
    reader = _read_stderr_into(proc, lines)
    try:
        deadline = time.monotonic() + 15
        port = None
        while port is None and time.monotonic() < deadline:
            for line in list(lines):
                m = re.search(r"listening on 127\.0\.0\.1:(\d+)", line)
                if m:
                    port = int(m.group(1))
            time.sleep(0.05)
        assert port, "".join(lines)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            f = s.makefile("rwb")
            assert f.readline().startswith(b"220 ")
            f.write(b"EHLO cli.test\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.org>\r\n"
                    b"DATA\r\n")
            f.flush()
            while not f.readline().startswith(b"354 "):
                pass
            f.write(b"Subject: defaults\r\n\r\nhello\r\n.\r\nQUIT\r\n")
            f.flush()
            assert f.readline().startswith(b"250 2.0.0 Ok: queued as ")
            assert f.readline().startswith(b"221 ")
        # The embedded default delivery path, relative to the working directory.
        stored = list((tmp_path / "var" / "mail" / "new").iterdir())
        assert len(stored) == 1 and stored[0].read_bytes().endswith(b"\n\nhello\n")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        reader.join(5)
    assert "Traceback" not in "".join(lines)


def test_port_in_use_exits_1(tmp_path):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        result = run("serve", "--listen", f"127.0.0.1:{port}", "--workers", "1", cwd=tmp_path)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, lines
    assert re.search(rf"ERROR cannot start: .*cannot listen on 127\.0\.0\.1:{port}: "
                     r"Address already in use$", lines[0]), lines


@pytest.mark.skipif(os.geteuid() != 0, reason="server.user applies only when started as root")
def test_unknown_user_exits_1_before_forking(tmp_path):
    config = tmp_path / "user.yaml"
    config.write_text('server:\n  listen: ["127.0.0.1:0"]\n  user: "no-such-user-x"\n')
    result = run("serve", "--config", str(config), cwd=tmp_path)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.rstrip().endswith(
        'ERROR cannot start: server.user: no such user "no-such-user-x"'), result.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="server.user applies only when started as root")
def test_a_maildir_server_user_cannot_reach_exits_1_before_forking(tmp_path):
    """What check-config refuses, serve refuses too: else every message would get 451."""
    private = Path(tempfile.mkdtemp(prefix="minismtp-private-"))  # mode 0700, root's
    try:
        config = tmp_path / "user.yaml"
        config.write_text(yaml.safe_dump({
            "server": {"listen": ["127.0.0.1:0"], "user": "nobody"},
            "delivery": {"path": str(private / "mail")}}))
        result = run("serve", "--config", str(config), cwd=tmp_path)
        assert result.returncode == 1
        assert "Traceback" not in result.stderr
        [line] = result.stderr.splitlines()
        assert line.endswith(
            f'ERROR cannot start: delivery.path: server.user "nobody" cannot reach '
            f'"{private}/mail": "{private}" is mode 0700, owner 0, group 0'), line
        assert not (private / "mail").exists()
    finally:
        shutil.rmtree(private, ignore_errors=True)


def test_check_config_into_a_closed_pipe_or_a_full_disk_says_one_line(tmp_path):
    """`check-config | head -0` and `> /dev/full`: no traceback, status 1."""
    reader, writer = os.pipe()
    os.close(reader)  # the reader has gone: the first write fails with EPIPE
    try:
        closed = subprocess.run([*CLI, "check-config"], cwd=tmp_path, stdout=writer,
                                stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
                                timeout=RUN_TIMEOUT_S)
    finally:
        os.close(writer)
    assert (closed.returncode, closed.stderr) == (1, "")
    if os.path.exists("/dev/full"):
        with open("/dev/full", "w") as full:
            result = subprocess.run([*CLI, "check-config"], cwd=tmp_path, stdout=full,
                                    stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                                    text=True, timeout=RUN_TIMEOUT_S)
        assert result.returncode == 1
        assert _problems(result) == ["cannot write the output: No space left on device"]


def test_serve_with_stderr_closed_still_greets(tmp_path):
    """Started with `2>&-`: /dev/null takes descriptor 2 (else workers, finding no
    sys.stderr, failed to start, and the next file opened got number 2)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = tmp_path / "minismtp.yaml"
    config.write_text(yaml.safe_dump({"server": {"listen": [f"127.0.0.1:{port}"],
                                                 "workers": 1},
                                      "delivery": {"backend": "discard"}}))
    server = subprocess.Popen([*CLI, "serve", "--config", str(config)], cwd=tmp_path,
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              preexec_fn=lambda: os.close(2))
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=5) as client:
                    assert client.recv(512).startswith(b"220 ")
                    break
            except (ConnectionRefusedError, socket.timeout):
                assert time.monotonic() < deadline, "no greeting"
                time.sleep(0.1)
        assert os.readlink(f"/proc/{server.pid}/fd/2") == "/dev/null"
    finally:
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=15) == 0
