"""The PROXY protocol on a real server: raw sockets and headers from support/proxyheader.py.

A listener with `proxy_protocol` says nothing until a whole header has come from a trusted
peer; the header's source is then the client everywhere (`Received:`, the log, fault rules'
`client` networks); anything else is closed without a byte sent, logged and counted by
reason, and the worker goes on serving.
"""

from __future__ import annotations

import re
import signal
import socket
import time

import pytest

from support import proxyheader
from support.tlsserver import HOST, free_ports, metrics, wait_for_metric

pytest.importorskip("trustme")

DST = ("127.0.0.1", 25)
REFUSED = "554 5.7.1 Not from that network"


def failures_key(reason: str) -> str:
    return f'minismtp_proxy_failures_total{{reason="{reason}"}}'


def proxy_overrides(version: str = "any", **limits: str) -> dict:
    stats = free_ports(1)[0]
    return {
        "server": {"workers": 1, "listen": [{
            "address": f"{HOST}:0",
            "proxy_protocol": {"version": version, "trusted": ["127.0.0.1/32"]}}]},
        "limits": {"proxy_timeout": "10s", **limits},
        "stats": {"listen": f"{HOST}:{stats}"},
        "delivery": {"line_endings": "crlf"},
        "faults": {"rules": [{"name": "doc-net", "stage": "connect",
                              "client": "192.0.2.0/24", "reply": REFUSED}]},
    }


@pytest.fixture
def proxied(make_server):
    return make_server(proxy_overrides(proxy_timeout="1s"))


def marker_message(marker: str) -> bytes:
    return f"Subject: {marker}\r\nMessage-ID: <{marker}@test>\r\n\r\n{marker}\r\n".encode()


def stored_by_marker(server) -> dict[str, bytes]:
    out = {}
    for _, data in server.maildir_messages():
        m = re.search(rb"Message-ID: <([^@>]+)@test>", data)
        assert m, data[:200]
        out[m.group(1).decode()] = data
    return out


def send_through(server, raw_clients, header: bytes, marker: str, **client) -> None:
    c = raw_clients(server.port, **client)
    c.send(header)
    c.hello()
    assert c.send_message(marker_message(marker)).code == 250
    c.cmd("QUIT", 221)
    c.close()


def closed_unanswered(client, timeout: float = 5.0) -> None:
    """The server closed the connection without sending a byte."""
    assert client.wait_closed(timeout) == b""


@pytest.mark.parametrize("encode", [proxyheader.v1, proxyheader.v2], ids=["v1", "v2"])
def test_header_source_is_the_client_everywhere(proxied, raw_clients, encode):
    server = proxied
    send_through(server, raw_clients, encode(("198.51.100.9", 40001), DST), "four")
    send_through(server, raw_clients, encode(("2001:db8::7", 40002), ("::1", 25)), "six")
    stored = stored_by_marker(server)
    assert b"Received: from client.test ([198.51.100.9])\r\n" in stored["four"]
    assert b"Received: from client.test ([IPv6:2001:db8::7])\r\n" in stored["six"]
    assert b"127.0.0.1" not in stored["four"] + stored["six"]
    server.wait_for_log(r"id=\S+ peer=198\.51\.100\.9 listener=\S+ "
                        r"from=<sender@example\.org> rcpts=1 .*"
                        r"result=250")
    server.wait_for_log(r"disconnect from 198\.51\.100\.9:40001 listener=\S+ ehlo=1 mail=1 rcpt=1 "
                        r"data=1 quit=1 commands=5 end=quit")
    server.wait_for_log(r"disconnect from \[2001:db8::7\]:40002 ")
    wait_for_metric(server, "minismtp_proxy_headers_total", 2)


def test_v2_with_tlvs_and_smtp_pipelined_right_after_the_header(proxied, raw_clients):
    server = proxied
    header = proxyheader.v2(("198.51.100.10", 1234), DST, [
        (proxyheader.PP2_TYPE_ALPN, b"smtp"), (proxyheader.PP2_TYPE_UNIQUE_ID, b"x" * 32)])
    body = marker_message("piped")
    c = raw_clients(server.port)
    # One segment: the header, then a whole pipelined transaction. Nothing may be lost.
    c.send(header + b"EHLO client.test\r\n" + c.envelope("s@example.org", ["r@example.org"]))
    c.expect(220)
    c.expect(250)
    c.expect(250, "2.1.0")
    c.expect(250, "2.1.5")
    c.expect(354)
    c.send(c.stuff(body) + b"QUIT\r\n")
    c.expect(250)
    c.expect(221)
    assert b"([198.51.100.10])" in stored_by_marker(server)["piped"]


def test_commands_sent_with_the_header_are_counted_as_received(proxied, raw_clients):
    """Bytes read with the header are the session's: counted, once, like any others."""
    server = proxied
    early = b"EHLO x\r\nNOOP\r\nNOOP\r\n"
    c = raw_clients(server.port)
    c.send(proxyheader.v2(("198.51.100.11", 1), DST) + early)
    for code in (220, 250, 250, 250):
        c.expect(code)
    c.cmd("QUIT", 221)
    c.close()
    wait_for_metric(server, "minismtp_received_bytes_total", len(early) + len(b"QUIT\r\n"))


def test_a_slow_greeting_answers_commands_sent_with_the_header_after_it(make_server,
                                                                       raw_clients):
    """A connect tarpit sends the greeting slowly: commands that came with the header
    wait for it to be whole, and a tarpit on them still applies (the session resumes
    when the greeting is out, not while it trickles)."""
    overrides = proxy_overrides()
    overrides["faults"] = {"rules": [
        {"name": "slow-greeting", "stage": "connect", "tarpit": 200},
        {"name": "slow-ehlo", "stage": "helo", "tarpit": 100}]}
    server = make_server(overrides)
    c = raw_clients(server.port)
    started = time.monotonic()
    c.send(proxyheader.v2(("198.51.100.12", 1), DST) + b"EHLO client.test\r\n")
    greeting = c.expect(220, timeout=30)
    greeted = time.monotonic() - started
    reply = c.expect(250, timeout=30)
    answered = time.monotonic() - started - greeted
    # Each reply takes about its length over its rate; at least half that, each in turn.
    assert greeted >= 0.5 * len(greeting.raw) / 200, greeted
    assert answered >= 0.5 * len(reply.raw) / 100, (answered, len(reply.raw))
    c.cmd("QUIT", 221)
    c.close()
    wait_for_metric(server, 'minismtp_faults_injected_total{rule="slow-ehlo"}', 1)


def test_fault_rule_client_network_matches_the_claimed_address(proxied, raw_clients):
    server = proxied
    c = raw_clients(server.port)
    c.send(proxyheader.v2(("192.0.2.7", 5000), DST))
    reply = c.reply()  # the connect stage's fault reply, in place of the greeting
    assert (reply.code, reply.text) == (554, REFUSED[4:])
    c.close()
    c = raw_clients(server.port)
    c.send(proxyheader.v1(("192.0.2.200", 5001), DST))
    assert c.reply().code == 554
    c.close()
    for header in (proxyheader.v2(("192.0.3.7", 5002), DST), proxyheader.local_v2()):
        c = raw_clients(server.port)
        c.send(header)
        c.expect(220)
        c.cmd("QUIT", 221)
        c.close()
    wait_for_metric(server, 'minismtp_faults_injected_total{rule="doc-net"}', 2)


@pytest.mark.parametrize("header", [proxyheader.local_v2(), proxyheader.v1(None, None),
                                    proxyheader.v2(None, None)],
                         ids=["v2-local", "v1-unknown", "v2-unspec"])
def test_addressless_headers_keep_the_real_peer(proxied, raw_clients, header):
    server = proxied
    send_through(server, raw_clients, header, "local")
    assert b"Received: from client.test ([127.0.0.1])\r\n" in stored_by_marker(server)["local"]
    server.wait_for_log(r"disconnect from 127\.0\.0\.1:\d+ listener=\S+ ehlo=1 ")


def test_untrusted_source_is_closed_unread(proxied, raw_clients):
    server = proxied
    mark = server.mark()
    c = raw_clients(server.port, source="127.0.0.2")
    c.send(proxyheader.v2(("198.51.100.9", 1), DST))
    closed_unanswered(c)
    server.wait_for_log(r"PROXY header refused: peer=127\.0\.0\.2 listener=\S+ "
                        r"reason=untrusted source",
                        since=mark)
    server.wait_for_log(r"disconnect from 127\.0\.0\.2:\d+ listener=\S+ commands=0 "
                        r"end=no PROXY header: untrusted source", since=mark)
    wait_for_metric(server, failures_key("untrusted source"), 1)


MALFORMED = {
    "bad v1 header": b"PROXY TCP4 198.51.100.9 127.0.0.1 1 25\n",  # a bare LF
    "bad address": b"PROXY TCP4 198.51.100.300 127.0.0.1 1 25\r\n",
    "bad port": b"PROXY TCP4 198.51.100.9 127.0.0.1 010 25\r\n",
    "v1 header too long": b"PROXY UNKNOWN " + b"x" * 120,
    "bad v2 version": proxyheader.v2_raw(0x11, proxyheader.TCP4, bytes(12)),
    "bad v2 command": proxyheader.v2_raw(0x23, proxyheader.TCP4, bytes(12)),
    "bad v2 family": proxyheader.v2_raw(proxyheader.PROXY, proxyheader.UDP4, bytes(12)),
    "v2 length too short for its family": proxyheader.v2_raw(
        proxyheader.PROXY, proxyheader.TCP6, bytes(12)),
    "v2 header too long": proxyheader.v2_raw(proxyheader.PROXY, proxyheader.TCP4, b"",
                                             length=4000),
    "bad v2 tlv": proxyheader.v2_raw(proxyheader.PROXY, proxyheader.TCP4,
                                     bytes(12) + b"\x01\x00\x09ab"),
}


def test_malformed_headers_are_closed_and_counted_and_the_worker_serves_on(
        proxied, raw_clients):
    server = proxied
    workers = server.worker_pids()
    for reason, data in MALFORMED.items():
        mark = server.mark()
        c = raw_clients(server.port)
        c.send(data)
        closed_unanswered(c)
        server.wait_for_log(rf"PROXY header refused: peer=127\.0\.0\.1 listener=\S+ reason={reason}$",
                            since=mark)
    # Half a header, then the balancer goes away.
    c = raw_clients(server.port)
    c.send(proxyheader.v2(("198.51.100.9", 1), DST)[:20])
    c.sock.shutdown(socket.SHUT_WR)
    closed_unanswered(c)
    samples = wait_for_metric(server, failures_key("closed mid-header"), 1)
    for reason in MALFORMED:
        assert samples[failures_key(reason)] == 1, reason
    assert samples["minismtp_proxy_headers_total"] == 0
    assert server.worker_pids() == workers
    send_through(server, raw_clients, proxyheader.v1(("198.51.100.11", 7), DST), "after")
    assert b"([198.51.100.11])" in stored_by_marker(server)["after"]


def test_plain_smtp_client_is_turned_away_on_its_first_byte(proxied, raw_clients):
    server = proxied
    c = raw_clients(server.port)
    started = time.monotonic()
    c.send(b"EHLO client.test\r\n")
    closed_unanswered(c, timeout=5)
    assert time.monotonic() - started < 5
    server.wait_for_log(r"reason=not a proxy header")
    wait_for_metric(server, failures_key("not a proxy header"), 1)


def test_a_version_the_listener_does_not_take(make_server, raw_clients):
    server = make_server(proxy_overrides("v2"))
    c = raw_clients(server.port)
    c.send(proxyheader.v1(("198.51.100.9", 1), DST))
    closed_unanswered(c)
    wait_for_metric(server, failures_key("unsupported version"), 1)
    send_through(server, raw_clients, proxyheader.v2(("198.51.100.9", 2), DST), "v2only")


def test_stalled_partial_header_is_closed_after_the_deadline(proxied, raw_clients):
    server = proxied  # limits.proxy_timeout: 1s
    workers = server.worker_pids()
    stalled = [raw_clients(server.port) for _ in range(2)]
    stalled[0].send(b"PROXY TCP4 198.51")
    started = time.monotonic()  # the other sends nothing at all: a plain client waiting
    for c in stalled:
        closed_unanswered(c, timeout=10)
    elapsed = time.monotonic() - started
    assert 0.5 < elapsed < 10, elapsed
    wait_for_metric(server, failures_key("timeout"), 2)
    assert server.worker_pids() == workers
    send_through(server, raw_clients, proxyheader.v2(("198.51.100.12", 3), DST), "later")


def test_an_http_request_counts_under_its_reason_only(proxied, raw_clients):
    server = proxied
    c = raw_clients(server.port)
    c.send(b"GET / HTTP/1.1\r\n\r\n")
    closed_unanswered(c)
    samples = wait_for_metric(server, failures_key("not a proxy header"), 1)
    assert all(v == 0 for k, v in samples.items()
               if k.startswith("minismtp_proxy_failures_total") and "not a proxy" not in k)
    assert metrics(server)["minismtp_connections_total"] == 1


# --- implicit TLS: the header first, then the handshake (HAProxy send-proxy in TCP mode) ---

@pytest.fixture
def tls_proxied(make_server, tmp_path):
    from support.tlsserver import Pki

    pki = Pki()
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    Pki.write(pki.issue(), cert, key)
    overrides = proxy_overrides()
    overrides["server"]["listen"][0]["tls"] = "implicit"
    overrides["tls"] = {"certificates": [{"cert": str(cert), "key": str(key)}]}
    return make_server(overrides), pki


def test_implicit_tls_after_the_header(tls_proxied, raw_clients):
    from support.tlsserver import start_tls

    server, pki = tls_proxied
    c = raw_clients(server.port)
    c.send(proxyheader.v2(("198.51.100.20", 4242), DST))
    start_tls(c, pki.client_context())
    c.hello()
    assert c.send_message(marker_message("sealed")).code == 250
    c.cmd("QUIT", 221)
    stored = stored_by_marker(server)["sealed"]
    assert b"Received: from client.test ([198.51.100.20])\r\n\t(using TLSv1.3" in stored
    server.wait_for_log(r"disconnect from 198\.51\.100\.20:4242 .* tls=TLSv1\.3")


def test_client_hello_in_the_same_segment_as_the_header_reaches_tls(tls_proxied):
    from support.tlsserver import client_hello

    server, pki = tls_proxied
    with socket.create_connection((HOST, server.port), timeout=10) as sock:
        sock.sendall(proxyheader.v1(("198.51.100.21", 1), DST)
                     + client_hello(pki.client_context()))
        first = sock.recv(5)
    assert first[:1] == b"\x16", first  # a ServerHello record, not an alert or a close
    assert metrics(server).get(failures_key("not a proxy header"), 0) == 0


def test_plaintext_header_then_no_tls_is_a_handshake_failure(tls_proxied, raw_clients):
    server, _ = tls_proxied
    c = raw_clients(server.port)
    c.send(proxyheader.v2(("198.51.100.22", 1), DST) + b"EHLO client.test\r\n")
    closed_unanswered(c)
    server.wait_for_log(r"TLS handshake failed: peer=198\.51\.100\.22 ")


def test_too_many_connections_on_a_proxy_port_closes_without_a_word(make_server, raw_clients):
    overrides = proxy_overrides()
    overrides["server"]["max_connections"] = 1
    server = make_server(overrides)
    held = raw_clients(server.port)
    held.send(proxyheader.v2(("198.51.100.30", 1), DST))
    held.expect(220)
    extra = raw_clients(server.port)
    extra.send(proxyheader.v2(("198.51.100.31", 1), DST))
    closed_unanswered(extra)
    server.wait_for_log(r"disconnect from 127\.0\.0\.1:\d+ listener=\S+ commands=0 "
                        r"end=refused: too many connections")
    held.cmd("QUIT", 221)


def test_a_header_completed_while_the_worker_stops_gets_421(proxied, raw_clients):
    server = proxied
    c = raw_clients(server.port)
    header = proxyheader.v1(("198.51.100.40", 1), DST)
    c.send(header[:10])
    time.sleep(0.2)  # the worker has the connection, still without its header
    mark = server.mark()
    server.send_signal(signal.SIGTERM)
    server.wait_for_log(r"stopping: workers finish", since=mark)
    time.sleep(0.5)  # the worker has its SIGTERM too, as a rule (the grace is 2s)
    c.send(header[10:])
    codes = [c.reply().code]
    if codes[0] == 220:  # a worker slower than that: then it sends the idle session off
        codes.append(c.reply().code)
    assert codes[-1] == 421, codes
    assert server.wait(15) == 0


def test_a_handshake_begun_while_the_worker_stops_is_held_to_the_grace(make_server, tmp_path):
    """On an implicit-TLS listener a header completed in a stopping worker's grace starts
    a handshake then: a client that sends no ClientHello holds the stop for the
    handshakes' grace (2 s), not for limits.tls_handshake_timeout (25 s here)."""
    from support.tlsserver import Pki

    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    Pki.write(Pki().issue(), cert, key)
    overrides = proxy_overrides()
    overrides["server"].update(workers=1, shutdown_timeout="25s")
    overrides["server"]["listen"][0]["tls"] = "implicit"
    overrides["limits"] = {"proxy_timeout": "10s", "tls_handshake_timeout": "25s"}
    overrides["tls"] = {"certificates": [{"cert": str(cert), "key": str(key)}]}
    server = make_server(overrides)
    header = proxyheader.v1(("198.51.100.41", 1), DST)
    with socket.create_connection((HOST, server.port), timeout=30) as sock:
        sock.sendall(header[:10])
        time.sleep(0.2)  # the worker has the connection, still without its header
        mark = server.mark()
        server.send_signal(signal.SIGTERM)
        server.wait_for_log(r"stopping: workers finish", since=mark)
        time.sleep(0.5)
        sock.sendall(header[10:])  # whole within the header's grace; no ClientHello
        started = time.monotonic()
        assert server.wait(40) == 0
        took = time.monotonic() - started
    assert took < 10, f"the worker held its stop {took:.1f}s for a silent handshake"
    server.wait_for_log(r"TLS handshake failed: peer=198\.51\.100\.41 listener=\S+ reason=stopping")


def test_a_reload_that_drops_the_proxy_protocol_greets_plain_clients_at_once(make_server,
                                                                            raw_clients):
    """A PROXY listener's socket lets the kernel hold a connection until its first bytes
    come (listeners.py); a reload that makes it a plain listener, where the server
    speaks first, must clear that, or each client would wait about a second to be
    greeted. Then back: a header is read at accept again."""
    port = free_ports(1)[0]
    proxy = {"version": "v2", "trusted": ["127.0.0.1/32"]}
    server = make_server({**proxy_overrides(), "server": {"workers": 1, "listen": [
        {"address": f"{HOST}:{port}", "proxy_protocol": proxy}]}})
    send_through(server, raw_clients, proxyheader.v2(("198.51.100.20", 5), DST), "before")

    def reload(listener: dict) -> None:
        server.reload({"server": {"listen": [listener]}})

    reload({"address": f"{HOST}:{port}"})
    for _ in range(3):
        started = time.monotonic()
        client = raw_clients(port)
        client.expect(220)
        assert time.monotonic() - started < 0.5  # the deferral would hold it for 1 s
        client.cmd("QUIT", 221)
        client.close()

    reload({"address": f"{HOST}:{port}", "proxy_protocol": proxy})
    send_through(server, raw_clients, proxyheader.v2(("198.51.100.21", 5), DST), "after")
    assert sorted(stored_by_marker(server)) == ["after", "before"]
