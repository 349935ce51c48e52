"""TLS across processes: a session resumed with a worker other than the one that issued
its ticket (the master's one context), and certificates replaced by HUP while clients
keep connecting (a broken pair refused, the working one kept)."""

from __future__ import annotations

import re
import signal
import socket
import ssl
import threading

import pytest

pytest.importorskip("trustme")

from minismtp.smtp import replies  # noqa: E402
from support.tlsserver import HOST, NAME, Pki, der, tls_overrides  # noqa: E402

_PID = re.compile(r"P(\d+)Q")


def read_reply(sock: ssl.SSLSocket, finals: int = 1) -> bytes:
    """Replies up to the `finals`-th final line ("NNN ..."); the client pipelines no
    further than that, so nothing more can arrive meanwhile."""
    data = b""
    for _ in range(100):
        piece = sock.recv(4096)
        if not piece:
            raise ConnectionError(f"closed after {data!r}")
        data += piece
        if data.endswith(b"\r\n") and len(re.findall(rb"^\d{3} ", data, re.M)) >= finals:
            return data
    raise AssertionError(data)


def send_one(port: int, context: ssl.SSLContext, session: ssl.SSLSession | None = None
             ) -> tuple[int, bool, ssl.SSLSession]:
    """One message over implicit TLS: the pid of the worker that stored it, whether the
    TLS session was resumed, and the session to resume next time."""
    with socket.create_connection((HOST, port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname=NAME, session=session) as sock:
            assert read_reply(sock).startswith(b"220 ")  # TLS 1.3: the tickets came too
            sock.sendall(b"EHLO c.test\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<r@x.org>\r\n"
                         b"DATA\r\n")
            assert read_reply(sock, 4).endswith(b"\r\n354 End data with <CR><LF>.<CR><LF>\r\n")
            sock.sendall(b"Subject: resume\r\n\r\nhi\r\n.\r\n")
            queued = read_reply(sock).decode()
            pid = int(_PID.search(queued).group(1))
            reused = sock.session_reused
            new_session = sock.session
            sock.sendall(b"QUIT\r\n")
            assert read_reply(sock) == replies.CLOSING.wire
            return pid, reused, new_session


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2],
                         ids=["TLSv1.3", "TLSv1.2"])
def test_session_resumes_with_the_other_worker(make_server, pki, tmp_path, version):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    Pki.write(pki.issue(), cert, key)
    # reuse_port: each worker its own socket, and the kernel spreads connections over
    # them by address and port; on one shared socket whichever worker wakes first may
    # take every connection made one at a time.
    server = make_server(tls_overrides(cert, key, [{"address": f"{HOST}:0", "tls": "implicit"}],
                                       server={"workers": 2, "reuse_port": True}))
    workers = set(server.worker_pids())
    context = pki.client_context(version)
    first, reused, session = send_one(server.port, context)
    assert session is not None
    assert first in workers and not reused
    seen = []
    for _ in range(60):  # bounded: the kernel picks the worker
        pid, reused, _ = send_one(server.port, context, session)
        seen.append((pid, reused))
        if pid != first and reused:
            break
    assert (workers - {first}).pop() in {pid for pid, reused in seen if reused}, seen
    assert all(reused for _, reused in seen), seen


def _present(port: int, context: ssl.SSLContext) -> tuple[bytes, bytes]:
    """Connect over implicit TLS: the certificate presented and the first reply."""
    with socket.create_connection((HOST, port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname=NAME) as sock:
            presented = sock.getpeercert(binary_form=True)
            first = read_reply(sock)
            if first.startswith(b"220 "):
                sock.sendall(b"QUIT\r\n")
                read_reply(sock)
            return presented, first


def test_hup_swaps_the_certificate_without_failing_a_handshake(make_server, pki, tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    a, b = pki.issue(), pki.issue()
    Pki.write(a, cert, key)
    server = make_server(tls_overrides(cert, key, [{"address": f"{HOST}:0", "tls": "implicit"}],
                                       server={"workers": 2}))
    context = pki.client_context()
    assert _present(server.port, context)[0] == der(a)

    outcomes: list[tuple[bytes, bytes]] = []
    failures: list[str] = []

    def connect_in_a_loop() -> None:
        for _ in range(100):
            try:
                outcomes.append(_present(server.port, context))
            except (OSError, AssertionError) as exc:
                failures.append(repr(exc))

    threads = [threading.Thread(target=connect_in_a_loop, daemon=True) for _ in range(2)]
    for thread in threads:
        thread.start()
    server.wait_until(lambda: len(outcomes) >= 20, 10, message="connections before the HUP")
    Pki.write(b, cert, key)
    old = set(server.worker_pids())
    mark = server.mark()
    server.send_signal(signal.SIGHUP)
    server.wait_for_log(r"reloaded .*: starting generation 1 ", since=mark)
    server.wait_until(lambda: not set(server.worker_pids()) & old and
                      len(server.worker_pids()) == 2, 15, message="the new generation")
    for thread in threads:
        thread.join(60)
    assert not [thread for thread in threads if thread.is_alive()]
    assert failures == [] and len(outcomes) == 200, server.log_text()
    # A retiring worker may turn a session away with 421 (as for plain SMTP); never a
    # failed handshake.
    assert {first[:4] for _, first in outcomes} <= {b"220 ", b"421 "}, outcomes
    assert {presented for presented, _ in outcomes} <= {der(a), der(b)}
    assert _present(server.port, context)[0] == der(b)
    assert "TLS handshake failed" not in server.log_text()

    # A broken pair (B's certificate, A's key) is refused; B stays.
    Pki.write(b, cert, key, key_of=a)
    mark = server.mark()
    server.send_signal(signal.SIGHUP)
    server.wait_for_log(r"reload refused: tls\.certificates\[0\]\.key: .* is not the key "
                        r"of ", since=mark)
    server.wait_for_log(r"reload refused: still running on the previous configuration",
                        since=mark)
    assert server.count_log(r"starting generation 2", since=mark) == 0
    assert _present(server.port, context)[0] == der(b)
