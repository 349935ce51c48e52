"""Limits and hostile input over a real socket: split terminators, smuggling, sizes,
timeouts, over-long lines and the memory an idle connection costs."""

from __future__ import annotations

import resource
import select
import socket
import time

import pytest

from minismtp.smtp import replies

SIZE_LIMIT = 10 * 1024


# --- the end-of-data marker ---------------------------------------------------------------

def test_terminator_split_at_every_offset(make_server, raw_clients):
    server = make_server({"server": {"workers": 1}})
    client = raw_clients(server.port)
    client.hello()
    terminator = b"\r\n.\r\n"
    expected: dict[str, bytes] = {}
    cases = []
    for k in range(len(terminator) + 1):  # split before terminator[k] (k = 5: after it)
        cases.append(("terminator", k))
    for k in (1, 4, 9):  # inside the last body line, counted back from its end
        cases.append(("last line", k))
    for kind, k in cases:
        body = (f"Subject: split {kind} {k}\r\n\r\n".encode()
                + b".leading dot\r\n\xe2\x82\xac 8-bit\r\nlast line of " + f"{kind} {k}".encode())
        wire = client.stuff(body + b"\r\n")  # ends in b"\r\n.\r\n"
        tail = len(terminator) if kind == "terminator" else len(terminator) + k
        cut = len(wire) - tail + (k if kind == "terminator" else 0)
        client.send(client.envelope("split@example.org", ["r@example.org"]))
        assert [r.code for r in client.replies(3)] == [250, 250, 354]
        client.send(wire[:cut])
        if cut < len(wire):
            # Not the end yet: the server must stay silent until the second part arrives.
            assert client.quiet_for(0.1), (kind, k)
        client.send(wire[cut:])
        reply = client.reply()
        assert reply.code == 250, (kind, k, reply)
        expected[reply.queue_id] = body + b"\r\n"
    client.cmd("QUIT", 221)
    stored = {key.split(".")[0] + "." + key.split(".")[1]: data
              for key, data in server.maildir_messages()}
    assert len(stored) == len(cases)
    for queue_id, body in expected.items():
        assert stored[queue_id].endswith(server.stored_form(b"\r\n" + body)), queue_id
    assert server.files("tmp") == []


SMUGGLED = b"\n.\r\nMAIL FROM:<evil@x>\r\nRCPT TO:<v@x>\r\nDATA\r\nsmuggled\r\n.\r\n"


def _smuggle(client, separator: bytes = SMUGGLED) -> None:
    client.hello()
    client.send(client.envelope("real@example.org", ["victim@example.org"]))
    assert [r.code for r in client.replies(3)] == [250, 250, 354]
    # The body ends with `separator`, whose own last five bytes are the real terminator.
    client.send(b"Subject: smuggle\r\n\r\nhello" + separator)


def _smuggled_and_stored(server, client) -> bytes:
    """The smuggling attempt, then QUIT: had the server taken "\n.\r\n" as the end,
    MAIL/RCPT/DATA would get replies before the 221. The one file stored, checked to be
    the message the 250 named."""
    _smuggle(client)
    queue_id = client.reply().queue_id
    client.send(b"QUIT\r\n")
    assert client.reply().raw == replies.CLOSING.wire
    assert client.wait_closed() == b""
    [(key, stored)] = server.maildir_messages()
    assert key.startswith(queue_id + ".")
    return stored


def test_smuggling_with_bare_lf_accepted_stores_one_message(make_server, raw_clients):
    server = make_server({"limits": {"bare_lf": "accept"}})
    stored = _smuggled_and_stored(server, raw_clients(server.port))
    # Stored as it came ("\n.\r\n" keeps its dot), but for the LF line endings of the file.
    assert stored.endswith(server.stored_form(b"\r\n\r\nhello" + SMUGGLED[:-3]))
    assert b"MAIL FROM:<evil@x>\nRCPT TO:<v@x>\nDATA\nsmuggled\n" in stored
    server.wait_for_log(r"disconnect from")  # the session's lines are all out by then
    assert server.count_log(r"result=250 queued") == 1


def test_smuggling_with_bare_lf_normalized_stores_one_message(make_server, raw_clients):
    """Under the default, "\n.\r\n" is an empty line (its dot unstuffed), not the end."""
    server = make_server()  # limits.bare_lf defaults to normalize
    stored = _smuggled_and_stored(server, raw_clients(server.port))
    assert stored.endswith(server.stored_form(
        b"\r\n\r\nhello\r\n\r\nMAIL FROM:<evil@x>\r\nRCPT TO:<v@x>\r\nDATA\r\nsmuggled\r\n"))
    server.wait_for_log(r"disconnect from")  # the session's lines are all out by then
    assert server.count_log(r"result=250 queued") == 1


def test_smuggling_with_bare_lf_rejected_stores_nothing(make_server, raw_clients):
    server = make_server({"limits": {"bare_lf": "reject"}})
    client = raw_clients(server.port)
    _smuggle(client)
    assert client.reply().raw == replies.BARE_LF_DATA.wire
    client.send(b"QUIT\r\n")
    assert client.reply().raw == replies.CLOSING.wire
    assert server.maildir_messages() == []
    assert server.files("tmp") == []


def test_smuggling_with_bare_cr_is_body(make_server, raw_clients):
    """"\\r.\\r\\n" ends nothing either (and holds no bare LF, so it is stored)."""
    server = make_server()
    client = raw_clients(server.port)
    separator = SMUGGLED.replace(b"\n.\r\n", b"\r.\r\n", 1)
    _smuggle(client, separator)
    queue_id = client.reply().queue_id
    client.send(b"QUIT\r\n")
    assert client.reply().raw == replies.CLOSING.wire
    [(key, stored)] = server.maildir_messages()
    assert key.startswith(queue_id + ".")
    assert stored.endswith(server.stored_form(
        b"hello\r.\r\nMAIL FROM:<evil@x>\r\nRCPT TO:<v@x>\r\nDATA\r\nsmuggled\r\n"))


# --- message size ----------------------------------------------------------------------------

def test_oversize_body_refused_after_terminator(make_server, raw_clients):
    server = make_server({"limits": {"max_message_size": "10K"}})
    client = raw_clients(server.port)
    ehlo = client.hello()
    assert b"250-SIZE 10240" in ehlo.raw
    client.send(client.envelope("big@example.org", ["r@example.org"]))
    assert [r.code for r in client.replies(3)] == [250, 250, 354]
    body = b"Subject: big\r\n\r\n" + (b"x" * 998 + b"\r\n") * 50  # about 50 KiB
    wire = client.stuff(body)
    client.send(wire[:-5])
    assert client.quiet_for(0.3), "the size reply must wait for the end of the data"
    client.send(wire[-5:])
    assert client.reply().raw == replies.MESSAGE_TOO_BIG.wire
    assert server.files("new") == [] and server.files("tmp") == []
    # The session is still in step: a small message on the same connection goes through.
    queue_id = client.send_message(b"Subject: small\r\n\r\nok\r\n").queue_id
    [(key, stored)] = server.maildir_messages()
    assert key.startswith(queue_id + ".") and stored.endswith(b"\n\nok\n")
    server.wait_for_log(r"result=rejected: message too big")


def test_size_parameter_over_limit_refused_at_once(make_server, raw_clients):
    server = make_server({"limits": {"max_message_size": "10K"}})
    client = raw_clients(server.port)
    client.hello()
    client.send(b"MAIL FROM:<big@example.org> SIZE=10241\r\n")
    assert client.reply().raw == replies.MESSAGE_TOO_BIG.wire
    client.cmd("MAIL FROM:<ok@example.org> SIZE=10240", 250, "2.1.0")
    client.cmd("RCPT TO:<r@example.org>", 250, "2.1.5")


# --- timeouts ---------------------------------------------------------------------------------

def test_idle_client_times_out(make_server, raw_clients):
    server = make_server({"server": {"workers": 1}, "limits": {"command_timeout": "1s"}})
    client = raw_clients(server.port)
    client.expect(220)
    started = time.monotonic()
    reply = client.reply(timeout=5)
    elapsed = time.monotonic() - started
    assert reply.raw == replies.TIMEOUT.wire
    assert 0.8 <= elapsed < 3, elapsed
    assert client.wait_closed() == b""


def _trickle(client, piece: bytes, every_s: float, limit_s: float) -> tuple[bytes, float]:
    """Send `piece` every `every_s` until the server answers; return (reply bytes, time)."""
    started = time.monotonic()
    while time.monotonic() - started < limit_s:
        try:
            client.sock.sendall(piece)
        except OSError:
            pass  # closed under us: the reply is already in our receive queue
        readable, _, _ = select.select([client.sock], [], [], every_s)
        if readable:
            return client.reply(timeout=2).raw, time.monotonic() - started
    raise AssertionError(f"no reply within {limit_s}s")


def test_trickling_client_cut_off_by_min_data_rate(make_server, raw_clients):
    server = make_server({"server": {"workers": 1},
                          "limits": {"command_timeout": "30s", "min_data_rate": 1000,
                                     "min_data_rate_grace": "1s"}})
    client = raw_clients(server.port)
    client.hello()
    client.send(client.envelope("slow@example.org", ["r@example.org"]))
    assert [r.code for r in client.replies(3)] == [250, 250, 354]
    reply, elapsed = _trickle(client, b"x", 0.25, limit_s=15)
    assert reply == replies.TIMEOUT.wire
    # The grace, then a few bytes' worth at 1000 B/s: not the 30 s command timeout.
    assert 0.9 <= elapsed < 6, elapsed
    print(f"trickling client cut off after {elapsed:.1f}s")
    assert client.wait_closed() == b""
    assert server.files("new") == [] and server.files("tmp") == []


def test_a_pause_before_the_body_keeps_the_message_at_the_defaults(make_server, raw_clients):
    """A sender's filter (DKIM signing, scanning) or a lossy link may hold the first byte
    of the body for a few seconds (RFC 5321 4.5.3.2.5 lets a client wait 3 minutes for a
    block to go out): with the default limits the message is stored, not cut off by the
    minimum data rate."""
    server = make_server({"server": {"workers": 1}})
    client = raw_clients(server.port)
    client.hello()
    client.send(client.envelope("pausing@example.org", ["r@example.org"]))
    assert [r.code for r in client.replies(3)] == [250, 250, 354]
    time.sleep(6.5)  # past the 5 s head start the minimum rate once allowed
    client.send(b"Subject: late\r\n\r\nbody\r\n.\r\n")
    assert client.reply(timeout=5).code == 250
    assert len(server.files("new")) == 1


def test_data_timeout_ends_a_slow_but_steady_data(make_server, raw_clients):
    server = make_server({"server": {"workers": 1},
                          "limits": {"command_timeout": "30s", "data_timeout": "2s",
                                     "min_data_rate": 500}})
    client = raw_clients(server.port)
    client.hello()
    client.send(client.envelope("steady@example.org", ["r@example.org"]))
    assert [r.code for r in client.replies(3)] == [250, 250, 354]
    reply, elapsed = _trickle(client, b"y" * 78 + b"\r\n", 0.1, limit_s=10)  # ~800 B/s
    assert reply == replies.TIMEOUT.wire
    assert 1.5 <= elapsed < 4, elapsed
    assert client.wait_closed() == b""
    assert server.files("new") == [] and server.files("tmp") == []


# --- memory -----------------------------------------------------------------------------------

def _steady_rss(server, pid: int) -> int:
    """RSS once it stops moving (the worker may still be settling after a burst)."""
    last = server.rss_kib(pid)
    for _ in range(10):
        time.sleep(0.1)
        now = server.rss_kib(pid)
        if now == last:
            return now
        last = now
    return last


def test_megabytes_long_line_costs_no_memory(make_server, raw_clients):
    server = make_server({"server": {"workers": 1}})
    [worker] = server.worker_pids()
    client = raw_clients(server.port)
    client.hello()
    before = _steady_rss(server, worker)
    chunk = b"A" * (64 * 1024)
    for _ in range(8 * 16):  # 8 MiB, no line ending
        client.send(chunk)
    client.send(b"\r\nNOOP\r\n")
    assert client.reply().raw == replies.LINE_TOO_LONG.wire
    assert client.reply().raw == replies.OK.wire
    after = _steady_rss(server, worker)
    growth = after - before
    print(f"worker RSS {before} KiB -> {after} KiB after an 8 MiB line ({growth:+d} KiB)")
    assert growth < 4 * 1024
    # One over-long line is one error, not one per chunk: the session is fine.
    client.cmd("MAIL FROM:<a@example.org>", 250, "2.1.0")


IDLE_CONNECTIONS = 1000


def test_idle_connections_are_cheap(make_server):
    need = IDLE_CONNECTIONS + 200
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < need:
        if hard != resource.RLIM_INFINITY and hard < need:
            pytest.skip(f"RLIMIT_NOFILE hard limit {hard} < {need}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
    server = make_server({"server": {"workers": 1, "max_connections": IDLE_CONNECTIONS + 10}})
    [worker] = server.worker_pids()
    socks: list[socket.socket] = []
    try:
        # Warm up: the first sessions allocate what every later one reuses.
        warm = [socket.create_connection(("127.0.0.1", server.port), timeout=10)
                for _ in range(20)]
        for s in warm:
            assert s.recv(512).startswith(b"220 ")
        for s in warm:
            s.close()
        time.sleep(0.2)
        before = _steady_rss(server, worker)
        for _ in range(IDLE_CONNECTIONS):
            socks.append(socket.create_connection(("127.0.0.1", server.port), timeout=10))
        greeting = replies.greeting("mx.test.invalid").wire
        for s in socks:  # every one accepted and greeted by the worker
            data = b""
            while not data.endswith(b"\r\n"):
                piece = s.recv(512)
                assert piece, "closed before the greeting"
                data += piece
            assert data == greeting
        after = _steady_rss(server, worker)
    finally:
        for s in socks:
            s.close()
    per_connection = (after - before) * 1024 / IDLE_CONNECTIONS
    print(f"worker RSS {before} KiB -> {after} KiB with {IDLE_CONNECTIONS} idle connections: "
          f"{per_connection / 1024:.1f} KiB per connection")
    assert per_connection < 16 * 1024


TRICKLING = 200


def _enter_data(port: int, count: int) -> list[socket.socket]:
    socks = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(count)]
    for s in socks:
        s.sendall(b"EHLO x\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n")
    for s in socks:
        data = b""
        while not data.endswith(replies.START_INPUT.wire):
            piece = s.recv(4096)
            assert piece, "closed before the 354"
            data += piece
    return socks


def _burst_then_trickle(socks: list[socket.socket], seconds: float) -> None:
    """5 KB of body at once, then 62 bytes every 0.1 s (above min_data_rate)."""
    for s in socks:
        s.sendall(b"X" * 5000 + b"\r\n")
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for s in socks:
            s.sendall(b"Y" * 60 + b"\r\n")
        time.sleep(0.1)


def test_trickling_bodies_hold_no_large_buffer(make_server):
    # A body that filled the command buffer is read into the large one, and keeps it
    # while it streams; a client that sent 5 KB and then trickles (under a command
    # buffer's worth a second) has it trimmed within two of the worker's ticks, and
    # holds the small buffer, not 256 KiB. Measured while the trickle goes on.
    server = make_server({"server": {"workers": 1, "max_connections": TRICKLING + 10}})
    [worker] = server.worker_pids()
    warm = _enter_data(server.port, 40)  # what every later session reuses, the pool too
    _burst_then_trickle(warm, 0.3)
    for s in warm:
        s.close()
    time.sleep(0.2)
    before = _steady_rss(server, worker)
    socks = _enter_data(server.port, TRICKLING)
    try:
        _burst_then_trickle(socks, 3.0)  # ticks are a second apart: two have passed
        after = server.rss_kib(worker)
    finally:
        for s in socks:
            s.close()
    per_connection = (after - before) / TRICKLING
    print(f"worker RSS {before} KiB -> {after} KiB with {TRICKLING} trickling bodies: "
          f"{per_connection:.1f} KiB per connection")
    assert per_connection < 48


def test_closed_connections_leave_no_memory_behind(make_server):
    # Each session leaves timer entries due minutes later (the idle deadline); thousands
    # of short connections must not keep their sessions alive until then.
    server = make_server({"server": {"workers": 1}})
    [worker] = server.worker_pids()

    def churn(count: int) -> None:
        for _ in range(count):
            with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
                assert s.recv(512).startswith(b"220 ")
                s.sendall(b"QUIT\r\n")
                assert s.recv(512).startswith(b"221 ")

    churn(1000)  # warm up: what every later session reuses
    before = _steady_rss(server, worker)
    churn(4000)
    after = _steady_rss(server, worker)
    print(f"worker RSS {before} KiB -> {after} KiB after 4000 more connections")
    assert after - before < 2 * 1024


def test_pipelined_junk_commands_end_in_421(make_server, raw_clients):
    # With the defaults (100 junk commands, 20 errors) a flood of NOOPs gets 120 answers,
    # the last followed by 421, instead of an answer for every one of them.
    server = make_server({"server": {"workers": 1}})
    client = raw_clients(server.port)
    client.hello()  # EHLO is the first junk command
    client.send(b"NOOP\r\n" * 1000)
    rest = client.wait_closed(10)
    assert rest == replies.OK.wire * 119 + replies.TOO_MANY_ERRORS.wire
