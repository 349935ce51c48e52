"""HAProxy in TCP mode in front of two minismtp instances, with the PROXY protocol
(`send-proxy-v2`, and `send-proxy` for version 1): minismtp sees each client's own
address, and losing one instance under load loses no acknowledged message.

HAProxy gets its own configuration in a temporary directory, a frontend on a free
loopback port and a backend of two servers (each a whole minismtp: master and workers),
and runs in the foreground (`-db`) as a child of the test, stopped when it ends. Clients
connect from 127.0.0.2 and 127.0.0.3; HAProxy connects to minismtp from 127.0.0.1, the
only network the listeners trust.
"""

from __future__ import annotations

import os
import re
import signal
import smtplib
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from support.neighbours import end_processes, free_port, process_tree, program, wait_for_port
from support.server import Server, wait_until

pytestmark = pytest.mark.neighbour("haproxy")

HOST = "127.0.0.1"
CLIENTS = ("127.0.0.2", "127.0.0.3")
REFUSED = "550 5.7.1 Not from 127.0.0.3"
HAPROXY_START_S = 10.0
CLIENT_TIMEOUT_S = 10.0

HAPROXY_CFG = """\
global
    maxconn 256

defaults
    mode tcp
    timeout connect 2s
    timeout client 30s
    timeout server 30s
    retries 3
    option redispatch

frontend smtp
    bind {host}:{port}
    default_backend mx

backend mx
    balance roundrobin
    option smtpchk EHLO haproxy.test
    server a {host}:{port_a} {send_proxy} check check-send-proxy inter 300ms fall 2 rise 2
    server b {host}:{port_b} {send_proxy} check check-send-proxy inter 300ms fall 2 rise 2
"""


def instance(root: Path, version: str) -> Server:
    root.mkdir()
    return Server(root, {
        "server": {"workers": 2, "listen": [{
            "address": f"{HOST}:0",
            "proxy_protocol": {"version": version, "trusted": ["127.0.0.1/32"]}}]},
        "delivery": {"line_endings": "crlf"},
        "faults": {"rules": [{"name": "no-3", "stage": "mail", "client": "127.0.0.3/32",
                              "reply": REFUSED}]},
    }).start()


class Balancer:
    def __init__(self, tmp_path: Path, ports: tuple[int, int], version: str) -> None:
        self.port = free_port()
        self.config = tmp_path / "haproxy.cfg"
        self.config.write_text(HAPROXY_CFG.format(
            host=HOST, port=self.port, port_a=ports[0], port_b=ports[1],
            send_proxy="send-proxy-v2" if version == "v2" else "send-proxy"))
        self.log_path = tmp_path / "haproxy.log"
        self.log_file = self.log_path.open("wb")
        self.proc = subprocess.Popen([program("haproxy"), "-f", str(self.config), "-db"],
                                     stdin=subprocess.DEVNULL, stdout=self.log_file,
                                     stderr=subprocess.STDOUT)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        tree = process_tree(self.proc.pid)
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        end_processes(tree, 2)
        self.log_file.close()


@pytest.fixture(params=["v2", "v1"])
def cluster(request, tmp_path) -> Iterator[tuple[Balancer, Server, Server]]:
    version = request.param
    servers: list[Server] = []
    balancer = None
    try:
        servers = [instance(tmp_path / "a", version)]
        servers.append(instance(tmp_path / "b", version))
        balancer = Balancer(tmp_path, (servers[0].port, servers[1].port), version)
        if not wait_for_port(balancer.port, HAPROXY_START_S):
            pytest.fail(f"haproxy did not start:\n{balancer.log()}")
        # Both servers passed their health checks (an SMTP greeting after a LOCAL header).
        for server in servers:
            server.wait_for_log(r"disconnect from 127\.0\.0\.1:\d+ listener=\S+ ehlo=1 ",
                                HAPROXY_START_S)
        yield balancer, servers[0], servers[1]
    finally:
        if balancer is not None:
            balancer.stop()
        for server in servers:
            server.stop()


def message(marker: str) -> bytes:
    return (f"From: s@example.org\r\nTo: r@example.org\r\nSubject: {marker}\r\n"
            f"Message-ID: <{marker}@client.test>\r\n\r\nbody of {marker}\r\n").encode()


def stored(server: Server) -> dict[str, list[bytes]]:
    """Message-ID marker -> the stored copies of it in this instance's Maildir."""
    out: dict[str, list[bytes]] = {}
    for _, data in server.maildir_messages():
        m = re.search(rb"Message-ID: <([^@>]+)@client\.test>", data)
        assert m, data[:300]
        out.setdefault(m.group(1).decode(), []).append(data)
    return out


def send(port: int, source: str, marker: str) -> int:
    """One message in a connection of its own; the client's port."""
    with smtplib.SMTP(HOST, port, timeout=CLIENT_TIMEOUT_S,
                      source_address=(source, 0)) as smtp:
        client_port = smtp.sock.getsockname()[1]
        smtp.ehlo("client.test")
        smtp.sendmail("s@example.org", ["r@example.org"], message(marker))
        smtp.quit()
    return client_port


def test_minismtp_sees_the_clients_behind_haproxy(cluster):
    balancer, a, b = cluster
    ports = [send(balancer.port, CLIENTS[0], f"seen-{i}") for i in range(4)]
    copies = {**stored(a), **stored(b)}
    assert sorted(copies) == [f"seen-{i}" for i in range(4)]
    assert stored(a) and stored(b)  # round robin: two each, unless a check flapped
    for [data] in copies.values():
        assert b"Received: from client.test ([127.0.0.2])\r\n" in data
    for server in (a, b):
        server.wait_for_log(r"id=\S+ peer=127\.0\.0\.2 listener=\S+ "
                            r"from=<s@example\.org> .*result=250")
        server.wait_for_log(r"disconnect from 127\.0\.0\.2:\d+ listener=\S+ ehlo=1 mail=1 "
                            r"rcpt=1 data=1 quit=1 commands=5 end=quit")
    for client_port in ports:  # the client's own port too, not HAProxy's
        line = rf"disconnect from 127\.0\.0\.2:{client_port} "
        wait_until(lambda line=line: a.count_log(line) + b.count_log(line) == 1, 10,
                   message=line)
    # The fault rule for 127.0.0.3 fires on either instance; 127.0.0.2 is untouched.
    refused_3 = r"disconnect from 127\.0\.0\.3:\d+ .*mail=1 "
    for attempt in range(1, 7):  # round robin: two are enough, unless a check flapped
        with pytest.raises(smtplib.SMTPSenderRefused) as info:
            send(balancer.port, CLIENTS[1], "refused")
        assert info.value.smtp_code == 550
        wait_until(lambda n=attempt: a.count_log(refused_3) + b.count_log(refused_3) == n,
                   10, message="the refused session's log line")
        if a.count_log(refused_3) and b.count_log(refused_3):
            break
    assert a.count_log(refused_3) and b.count_log(refused_3)
    assert "refused" not in {**stored(a), **stored(b)}


def kill_instance(server: Server) -> None:
    """SIGKILL the master and its workers at once: the instance is gone, mid-session."""
    pids = [server.pid, *server.worker_pids()]
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    server.kill()  # reaps the master; strays, if any, are killed again


def test_losing_an_instance_under_load_loses_no_acknowledged_message(cluster):
    balancer, a, b = cluster
    per_client, threads_n = 30, 4
    acked: set[str] = set()
    failed: list[str] = []
    lock = threading.Lock()
    progress = threading.Semaphore(0)

    def client(n: int) -> None:
        source = CLIENTS[0]
        for i in range(per_client):
            marker = f"load-{n}-{i}"  # never sent twice: a retry would be a new message
            try:
                send(balancer.port, source, marker)
            except (OSError, smtplib.SMTPException) as exc:
                with lock:
                    failed.append(f"{marker}: {exc!r}")
            else:
                with lock:
                    acked.add(marker)
            progress.release()

    workers = [threading.Thread(target=client, args=(n,), daemon=True)
               for n in range(threads_n)]
    for thread in workers:
        thread.start()
    for _ in range(threads_n * per_client // 4):  # a quarter done: kill one instance
        assert progress.acquire(timeout=60), "clients stalled before the kill"
    kill_instance(a)
    killed_at = len(acked)
    for thread in workers:
        thread.join(120)
    assert not any(thread.is_alive() for thread in workers), "clients did not finish"

    in_a, in_b = stored(a), stored(b)
    assert all(len(copies) == 1 for copies in (*in_a.values(), *in_b.values()))
    assert not set(in_a) & set(in_b), "a message stored by both instances"
    lost = acked - set(in_a) - set(in_b)
    assert not lost, f"acknowledged but not stored: {sorted(lost)}"
    # The survivor took the rest: most messages after the kill were acknowledged.
    assert len(acked) - killed_at >= (threads_n * per_client - killed_at) // 2, failed
    assert in_a and len(in_b) > len(in_a)  # a served until killed; b took the rest
    wait_until(lambda: "is DOWN" in balancer.log(), 10, message="haproxy marking a DOWN")


def test_the_shipped_example_config_is_valid():
    example = Path(__file__).resolve().parents[2] / "etc" / "haproxy.cfg"
    result = subprocess.run([program("haproxy"), "-c", "-f", str(example)],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr
