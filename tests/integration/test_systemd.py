"""Running under systemd: the notify protocol spoken for real, the shipped unit file
checked by systemd itself, and a start as root on a privileged port that drops to
`server.user` before any client byte is read."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest

from support.neighbours import program

UNIT = Path(__file__).resolve().parents[2] / "etc" / "minismtp.service"


@pytest.fixture
def notify_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A datagram socket standing in for systemd's, named in $NOTIFY_SOCKET."""
    path = tmp_path / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(15)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    yield sock
    sock.close()


def _next(sock: socket.socket) -> dict[str, str]:
    message = sock.recv(4096).decode()
    return dict(line.split("=", 1) for line in message.splitlines())


def test_ready_reloading_and_stopping_are_announced(make_server, notify_socket):
    server = make_server({"server": {"workers": 2}})
    ready = _next(notify_socket)
    assert ready["READY"] == "1" and ready["MAINPID"] == str(server.pid)
    assert ready["STATUS"] == f"2 worker(s) on 127.0.0.1:{server.port}"
    server.send_signal(signal.SIGHUP)
    reloading = _next(notify_socket)
    assert reloading["RELOADING"] == "1" and int(reloading["MONOTONIC_USEC"]) > 0
    assert _next(notify_socket)["READY"] == "1"  # once the new generation accepts
    server.send_signal(signal.SIGTERM)
    assert _next(notify_socket)["STOPPING"] == "1"


def test_the_shipped_unit_passes_systemd_analyze_verify(tmp_path: Path):
    analyze = program("systemd-analyze")
    minismtp = shutil.which("minismtp")
    assert minismtp, "the minismtp command is installed with the package"
    # The unit names where a system-wide install puts the command; verify needs it to
    # exist, so check a copy that names this installation's.
    text = UNIT.read_text().replace("/usr/local/bin/minismtp", minismtp)
    unit = tmp_path / "minismtp.service"
    unit.write_text(text)
    result = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True,
                            timeout=60)
    problems = [line for line in (result.stdout + result.stderr).splitlines()
                if "minismtp.service" in line]
    assert result.returncode == 0 and problems == [], result.stdout + result.stderr


def _free_privileged_port() -> int:
    for port in range(1023, 900, -1):
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    pytest.fail("no free port below 1024 on 127.0.0.1")


def _uid(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])  # real uid
    raise AssertionError("no Uid line")


@pytest.mark.skipif(os.geteuid() != 0, reason="binding below 1024 and switching user need root")
def test_root_binds_a_privileged_port_and_workers_run_as_server_user(make_server, raw_clients):
    port = _free_privileged_port()
    # pytest's own temporary folders are root's alone (0700): the Maildir goes where
    # the worker, once `nobody`, can reach it.
    home = Path(tempfile.mkdtemp(prefix="minismtp-nobody-"))
    home.chmod(0o755)
    try:
        server = make_server({"server": {"workers": 1, "listen": [f"127.0.0.1:{port}"],
                                         "user": "nobody"},
                              "delivery": {"path": str(home / "mail")}})
        _check_a_low_port_session(server, port, raw_clients)
        server.stop()
    finally:
        shutil.rmtree(home, ignore_errors=True)


def _check_a_low_port_session(server, port: int, raw_clients) -> None:
    assert server.port == port
    client = raw_clients(port)
    client.hello()
    queued = client.send_message(b"Subject: low port\r\n\r\nstored by nobody\r\n")
    # The worker that served the session (it switches user before its loop runs).
    [worker] = server.worker_pids()
    assert _uid(server.pid) == 0 and _uid(worker) == 65534  # nobody
    [(name, body)] = server.maildir_messages()
    assert name.startswith(queued.queue_id)
    assert body.endswith(server.stored_form(b"stored by nobody\r\n"))
    path = next((server.mail_dir / "new").iterdir())
    assert path.stat().st_uid == 65534
