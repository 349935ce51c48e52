"""The stats HTTP responder and `minismtp stats`, over real loopback sockets.

The server is driven the way the master drives it: a selector loop in the test's own
thread calls handle() and expire(), while the client side runs in a helper thread.
Every wait is bounded.
"""

from __future__ import annotations

import contextlib
import http.client
import io
import json
import re
import select
import selectors
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from minismtp import stats, statsformat, statsview
from minismtp.cli import main
from minismtp.config import StatsConfig, load_config, parse_listen
from minismtp.stats import StatsBoard, Totals, WorkerStats
from minismtp.statsformat import to_json
from minismtp.statshttp import StatsHttpServer, pages

LOOP_LIMIT_S = 10.0
NAMES = ["busy-rcpt"]


def sample_totals() -> Totals:
    board = StatsBoard(1, 2)
    stats = WorkerStats(2)
    stats.connections_total, stats.messages_accepted, stats.bytes_received = 5, 4, 2_500_000
    stats.replies[450] += 2
    stats.faults[0] += 1
    stats.observe_latency(0.002)
    stats.publish(board, 0)
    return board.totals([0], Totals(), rule_names={0: NAMES})


@dataclass
class Harness:
    server: StatsHttpServer
    sel: selectors.BaseSelector
    port: int

    def run(self, client: Callable[[], object]) -> object:
        """Serve until `client` (in a thread) returns; give back its result or raise."""
        outcome: dict[str, object] = {}

        def target() -> None:
            try:
                outcome["value"] = client()
            except BaseException as exc:  # noqa: BLE001 - re-raised in the test thread
                outcome["error"] = exc

        thread = threading.Thread(target=target, daemon=True)
        thread.start()
        deadline = time.monotonic() + LOOP_LIMIT_S
        while thread.is_alive():
            assert time.monotonic() < deadline, "client did not finish"
            for key, mask in self.sel.select(0.02):
                assert key.data is self.server
                self.server.handle(key, mask)
            self.server.expire(time.monotonic())
        thread.join()
        if "error" in outcome:
            raise outcome["error"]  # type: ignore[misc]
        return outcome["value"]


def make_harness(get_body=None, backlog: int = 16, **kwargs) -> Iterator[Harness]:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(backlog)
    sel = selectors.DefaultSelector()
    server = StatsHttpServer(listener, get_body or pages(lambda: (sample_totals(), NAMES)),
                             **kwargs)
    server.register(sel)
    try:
        yield Harness(server, sel, listener.getsockname()[1])
    finally:
        server.close()
        assert listener.fileno() == -1
        assert not sel.get_map()
        sel.close()


@pytest.fixture
def harness() -> Iterator[Harness]:
    yield from make_harness(timeout_s=0.5, max_clients=3)


def request(port: int, method: str, path: str) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request(method, path)
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def exchange(port: int, data: bytes, *, pause_s: float = 0.0) -> bytes:
    """Send raw bytes (optionally one at a time), then read to EOF."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        if pause_s:
            for byte in data:
                sock.sendall(bytes([byte]))
                time.sleep(pause_s)
        else:
            sock.sendall(data)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
        return b"".join(chunks)


# --- the responder ------------------------------------------------------------------


def test_metrics(harness):
    status, headers, body = harness.run(lambda: request(harness.port, "GET", "/metrics"))
    assert status == 200
    assert headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    assert int(headers["Content-Length"]) == len(body)
    assert headers["Connection"] == "close"
    text = body.decode()
    assert "minismtp_messages_accepted_total 4\n" in text
    assert 'minismtp_faults_injected_total{rule="busy-rcpt"} 1\n' in text


def test_stats_json(harness):
    status, headers, body = harness.run(lambda: request(harness.port, "GET", "/stats?x=1"))
    assert (status, headers["Content-Type"]) == (200, "application/json")
    assert json.loads(body) == to_json(sample_totals(), NAMES)


@pytest.mark.parametrize(("method", "path", "status"), [
    ("GET", "/nope", 404),
    ("GET", "/metrics/", 404),
    ("POST", "/metrics", 405),
    ("DELETE", "/stats", 405),
])
def test_other_requests(harness, method, path, status):
    got, headers, _ = harness.run(lambda: request(harness.port, method, path))
    assert got == status
    if status == 405:
        assert headers["Allow"] == "GET, HEAD"


@pytest.mark.parametrize(("path", "status"), [("/metrics", 200), ("/stats", 200),
                                              ("/nope", 404)])
def test_head_is_answered_as_get_without_the_body(harness, path, status):
    _, get_headers, body = harness.run(lambda: request(harness.port, "GET", path))
    response = harness.run(lambda: exchange(harness.port, f"HEAD {path} HTTP/1.1\r\n\r\n"
                                                        .encode()))
    head, _, rest = response.partition(b"\r\n\r\n")
    assert rest == b""
    assert head.startswith(b"HTTP/1.1 %d " % status)
    assert f"Content-Length: {len(body)}".encode() in head.split(b"\r\n")
    assert f"Content-Type: {get_headers['Content-Type']}".encode() in head.split(b"\r\n")


@pytest.mark.parametrize(("data", "status"), [
    (b"GET /stats HTTP/1.0\r\n\r\n", b"200"),
    (b"GET /stats HTTP/1.0\n\n", b"200"),  # bare LF line ends, as some tools send
    (b"GET http://127.0.0.1/metrics HTTP/1.1\r\nHost: x\r\n\r\n", b"200"),
    (b"GET /stats HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc", b"200"),
    (b"\r\nGET /stats HTTP/1.1\r\n\r\n", b"200"),  # an empty line first (RFC 9112 2.2)
    (b"\n\r\nGET /stats HTTP/1.0\n\n", b"200"),
    (b"GET /stats HTTP/1.9\r\n\r\n", b"200"),  # served as 1.1 (RFC 9110 section 2.5)
    (b"GET /stats\r\n\r\n", b"400"),  # HTTP/0.9 style
    (b"GET /stats HTTP/2.0\r\n\r\n", b"505"),  # another major version (RFC 9110 15.6.6)
    (b"GET /stats HTTP/0.9\r\n\r\n", b"505"),
    (b"GET /stats HTTP/1.1junk\r\n\r\n", b"400"),  # not DIGIT "." DIGIT (RFC 9112 2.3)
    (b"GET /stats HTTP/1.10\r\n\r\n", b"400"),
    (b"GET /stats HTTP/1.\r\n\r\n", b"400"),
    (b"GET /stats http/1.1\r\n\r\n", b"400"),  # HTTP-name is case-sensitive
    (b"GET stats HTTP/1.1\r\n\r\n", b"400"),
    (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", b"400"),  # TLS hello
    (b"GET /stats HTTP/1.1\r\nno colon here\r\n\r\n", b"400"),
    (b"GET /stats HTTP/1.1\r\nX: " + b"a" * 10000 + b"\r\n\r\n", b"431"),
    (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n\r\n", b"431"),
])
def test_raw_requests(harness, data, status):
    response = harness.run(lambda: exchange(harness.port, data))
    assert response.startswith(b"HTTP/1.1 " + status + b" ")


@pytest.mark.parametrize(("data", "status"), [
    (b"HEAD stats HTTP/1.1\r\n\r\n", b"400"),
    (b"HEAD /stats HTTP/1.1\r\nno colon here\r\n\r\n", b"400"),
    (b"HEAD /stats HTTP/1.1junk\r\n\r\n", b"400"),
    (b"HEAD /stats HTTP/2.0\r\n\r\n", b"505"),
    (b"HEAD /stats HTTP/1.1\r\nX: " + b"a" * 10000 + b"\r\n\r\n", b"431"),
    (b"\r\nHEAD /stats HTTP/1.1\r\n\r\n", b"200"),
], ids=["target", "header", "version", "major", "too-large", "empty-line-first"])
def test_an_answer_to_head_never_has_a_body(harness, data, status):
    response = harness.run(lambda: exchange(harness.port, data))
    head, end, rest = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 " + status + b" ") and end and rest == b""


def test_an_empty_line_before_the_request_may_come_apart_from_it(harness):
    response = harness.run(lambda: exchange(harness.port, b"\r\nGET /stats HTTP/1.0\r\n\r\n",
                                            pause_s=0.002))  # one byte at a time
    assert response.startswith(b"HTTP/1.1 200 OK\r\n")


def test_oversized_headers_never_complete(harness):
    # Headers that keep coming: answered once 8 KiB have arrived, not buffered forever.
    def client() -> bytes:
        with socket.create_connection(("127.0.0.1", harness.port), timeout=5) as sock:
            sock.sendall(b"GET /stats HTTP/1.1\r\n" + b"X-Filler: abcdefgh\r\n" * 500)
            return sock.recv(4096)
    assert harness.run(client).startswith(b"HTTP/1.1 431 Request Header Fields Too Large")


def test_request_split_into_single_bytes(harness):
    response = harness.run(lambda: exchange(harness.port, b"GET /stats HTTP/1.0\r\n\r\n",
                                            pause_s=0.002))
    assert response.startswith(b"HTTP/1.1 200 OK\r\n")


def send_and_wait_for_close(port: int, sent: bytes) -> tuple[bytes, float]:
    """Send `sent`, then wait for the server's close: (what came, seconds waited)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(sent)
        start = time.monotonic()
        try:
            data = sock.recv(100)
        except ConnectionResetError:
            data = b""
        return data, time.monotonic() - start


@pytest.mark.parametrize("sent", [b"", b"GET /metrics HTTP/1.1\r\n"])
def test_silent_client_is_closed_after_the_deadline(harness, sent):
    data, waited = harness.run(lambda: send_and_wait_for_close(harness.port, sent))
    assert data == b""
    assert 0.2 < waited < 3.0  # timeout_s=0.5: closed by expire(), not by the client
    assert not harness.server._clients


def is_closed_by_server(sock: socket.socket) -> bool:
    """True if the server closed `sock` (EOF or reset); False if it is still open."""
    sock.setblocking(False)
    try:
        return sock.recv(1) == b""
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True


def connect(port: int, source: str = "127.0.0.1") -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(source, 0))


def test_a_full_table_closes_the_client_waiting_longest(harness):
    def client() -> tuple[bytes, list[bool]]:
        idle = [connect(harness.port) for _ in range(3)]  # max_clients=3, nothing sent
        try:
            wait_until_accepted(harness, 3)
            response = exchange(harness.port, b"GET /stats HTTP/1.0\r\n\n")
            time.sleep(0.05)
            return response, [is_closed_by_server(sock) for sock in idle]
        finally:
            for sock in idle:
                sock.close()
    response, closed = harness.run(client)
    assert response.startswith(b"HTTP/1.1 200 OK")  # at once: not after the idle deadline
    assert closed == [True, False, False]


def read_to_eof(sock: socket.socket) -> bytes:
    """All the server sent before closing (b"" if it reset the connection)."""
    sock.settimeout(5)
    chunks = []
    try:
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    except ConnectionResetError:
        return b""
    return b"".join(chunks)


@pytest.mark.parametrize("full", ["table", "address"])
@pytest.mark.parametrize(("sent", "answer"), [
    (b"GET /stats HTTP/1.0\r\n\r\n", b"HTTP/1.1 200 OK"),  # whole: answered first
    (b"GET /stats HTTP/1.0\r\n", b""),  # a part: still waiting, so it goes
    (b"", b""),  # nothing: it goes
])
def test_a_request_already_sent_is_read_before_its_place_is_taken(full, sent, answer):
    # The oldest client sends its request once accepted, but the listener's event comes
    # before that client's read event in the same turn: the new connection must not cost
    # it an answer that is already in the kernel.
    for harness in make_harness(max_clients=4, max_per_address=2):
        server, socks = harness.server, []
        listener = harness.sel.get_key(server.sock)
        try:
            socks.append(oldest := connect(harness.port, "127.0.0.2"))
            server.handle(listener, selectors.EVENT_READ)  # accepted: nothing to read yet
            [held] = server._clients.values()
            oldest.sendall(sent)
            if sent:
                assert select.select([held.sock], [], [], 5)[0]  # in the kernel, unread
            socks += [connect(harness.port, a) for a in ("127.0.0.2", "127.0.0.3", "127.0.0.4")]
            server.handle(listener, selectors.EVENT_READ)  # the table is full now
            newcomer = "127.0.0.2" if full == "address" else "127.0.0.5"
            socks.append(connect(harness.port, newcomer))
            server.handle(listener, selectors.EVENT_READ)  # not the oldest's read event
            got = read_to_eof(oldest)
            assert (got[:len(answer)] if answer else got) == answer
            assert [kept_by_server(harness, sock) for sock in socks[1:]] == [True] * 4
            assert sum(server._per_address.values()) == len(server._clients) == 4
        finally:
            for sock in socks:
                sock.close()


def wait_until_accepted(harness: Harness, count: int) -> None:
    deadline = time.monotonic() + 5
    while len(harness.server._clients) < count:
        assert time.monotonic() < deadline, "the server did not accept in time"
        time.sleep(0.01)


def test_clients_being_answered_are_not_closed_for_new_ones():
    # Three slow readers of a large answer hold every place (max_clients=3): a new client
    # waits in the backlog until their deadline frees one, instead of closing them.
    body = b"x" * (4 << 20)
    for harness in make_harness(lambda path: (200, "application/octet-stream", body),
                                timeout_s=0.5, max_clients=3):
        harness.server._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)

        def client() -> tuple[bytes, float]:
            readers = [connect(harness.port) for _ in range(3)]
            try:
                for sock in readers:
                    sock.sendall(b"GET /big HTTP/1.0\r\n\r\n")
                deadline = time.monotonic() + 5
                while not all(c.answered for c in list(harness.server._clients.values())) \
                        or len(harness.server._clients) < 3:
                    assert time.monotonic() < deadline
                    time.sleep(0.01)
                start = time.monotonic()
                sock = connect(harness.port)
                sock.sendall(b"GET /small HTTP/1.0\r\n\r\n")
                head = sock.recv(15)
                sock.close()
                return head, time.monotonic() - start
            finally:
                for sock in readers:
                    sock.close()
        head, waited = harness.run(client)
        assert head == b"HTTP/1.1 200 OK"
        assert waited > 0.2  # served once the readers reached their 0.5 s deadline


def test_connections_are_limited_per_address():
    for harness in make_harness(max_clients=10, max_per_address=2):
        def client() -> tuple[list[bool], list[bool], bytes]:
            first = [connect(harness.port, "127.0.0.2") for _ in range(3)]
            other = [connect(harness.port, "127.0.0.3") for _ in range(2)]
            try:
                wait_until_accepted(harness, 4)
                time.sleep(0.05)
                a = [is_closed_by_server(sock) for sock in first]
                b = [is_closed_by_server(sock) for sock in other]
                with connect(harness.port, "127.0.0.3") as sock:  # pushes out 127.0.0.3's oldest
                    sock.sendall(b"GET /stats HTTP/1.0\r\n\r\n")
                    response = sock.recv(15)
                time.sleep(0.05)
                return a, b + [is_closed_by_server(sock) for sock in other], response
            finally:
                for sock in first + other:
                    sock.close()
        first, other, response = harness.run(client)
        assert first == [True, False, False]
        assert other == [False, False, True, False]
        assert response == b"HTTP/1.1 200 OK"


def test_hundreds_of_idle_connections_do_not_lock_out_a_dashboard():
    # The limits the master runs with: 32 clients, 4 per address, 2 s for a request.
    for harness in make_harness(backlog=64):
        assert (harness.server.max_clients, harness.server.max_per_address,
                harness.server.request_timeout_s) == (32, 4, 2.0)

        def client() -> tuple[int, bytes, list[bool]]:
            idle: list[socket.socket] = []
            try:
                for _ in range(300):
                    idle.append(connect(harness.port))
                status, _, body = request(harness.port, "GET", "/metrics")
                time.sleep(0.05)
                return status, body, [is_closed_by_server(sock) for sock in idle]
            finally:
                for sock in idle:
                    sock.close()
        status, body, closed = harness.run(client)
        assert status == 200 and b"minismtp_messages_accepted_total 4\n" in body
        # the dashboard took one of the address's 4 places: the 3 newest idle ones stay
        assert closed == [True] * 297 + [False] * 3


def answered_and_kept_open(port: int, source: str = "127.0.0.1") -> socket.socket:
    """A client that reads its whole answer (to the server's EOF) but does not close: the
    server lingers on it, waiting for that close."""
    sock = connect(port, source)
    sock.sendall(b"GET /stats HTTP/1.0\r\n\r\n")
    while sock.recv(65536):
        pass
    return sock


def kept_by_server(harness: Harness, sock: socket.socket) -> bool:
    """True if the server still holds the connection of `sock` (which may have had the
    server's EOF already: lingering)."""
    held = {client.sock.getpeername() for client in list(harness.server._clients.values())}
    return sock.getsockname() in held


def test_answered_clients_that_linger_make_room_for_back_to_back_requests():
    # Each scraper of one address reads its answer and is gone before the server has
    # seen its close: those places must not refuse the next scrape.
    for harness in make_harness(timeout_s=5, max_clients=10, max_per_address=2):
        def client() -> tuple[list[bytes], list[bool]]:
            held = [answered_and_kept_open(harness.port) for _ in range(2)]
            try:
                wait_until_accepted(harness, 2)
                responses = [exchange(harness.port, b"GET /stats HTTP/1.0\r\n\r\n")[:15]
                             for _ in range(3)]
                time.sleep(0.05)
                return responses, [kept_by_server(harness, sock) for sock in held]
            finally:
                for sock in held:
                    sock.close()
        responses, kept = harness.run(client)
        assert responses == [b"HTTP/1.1 200 OK"] * 3
        # The first scrape found both places taken: the oldest lingering client gave its
        # place up. Whether the second had to go depends on whether the server had seen
        # the first scrape's close by the next one.
        assert kept[0] is False


def test_a_lingering_client_gives_up_its_place_before_one_waiting_for_its_request():
    for harness in make_harness(timeout_s=5, max_clients=3):
        def client() -> tuple[bytes, list[bool]]:
            idle = connect(harness.port, "127.0.0.2")  # the oldest: nothing sent yet
            held = [answered_and_kept_open(harness.port, f"127.0.0.{n}") for n in (3, 4)]
            try:
                wait_until_accepted(harness, 3)
                response = exchange(harness.port, b"GET /stats HTTP/1.0\r\n\r\n")[:15]
                time.sleep(0.05)
                return response, [kept_by_server(harness, sock) for sock in [idle, *held]]
            finally:
                for sock in [idle, *held]:
                    sock.close()
        response, kept = harness.run(client)
        assert response == b"HTTP/1.1 200 OK"
        assert kept == [True, False, True]  # the oldest lingering one made room


def test_a_request_must_arrive_within_the_request_timeout():
    for harness in make_harness(timeout_s=30, request_timeout_s=0.3):
        data, waited = harness.run(lambda: send_and_wait_for_close(  # never the blank line
            harness.port, b"GET /metrics HTTP/1.1\r\n"))
        assert data == b"" and waited < 5  # closed by the request deadline, not the 30 s one
        assert not harness.server._clients and not harness.server._per_address


def test_reset_by_the_client_is_not_an_error(harness):
    def client() -> bytes:
        sock = socket.create_connection(("127.0.0.1", harness.port), timeout=5)
        sock.sendall(b"GET /stats HTTP/1.1\r\n")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()  # RST
        time.sleep(0.1)
        return exchange(harness.port, b"GET /stats HTTP/1.0\r\n\r\n")
    assert harness.run(client).startswith(b"HTTP/1.1 200 ")


def test_a_failing_page_gives_500_and_the_server_goes_on():
    def get_body(path: str):
        if path == "/boom":
            raise RuntimeError("bug")
        return 200, "text/plain", b"fine"
    for harness in make_harness(get_body):
        assert harness.run(lambda: request(harness.port, "GET", "/boom"))[0] == 500
        assert harness.run(lambda: request(harness.port, "GET", "/x"))[2] == b"fine"


def test_a_large_answer_to_a_slow_reader_is_written_in_parts():
    body = bytes(range(256)) * 2048  # 512 KiB, 64 times the send buffer
    for harness in make_harness(lambda path: (200, "application/octet-stream", body)):
        # Accepted sockets inherit the listener's small send buffer: many partial sends.
        harness.server._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)

        def client() -> bytes:
            with socket.create_connection(("127.0.0.1", harness.port), timeout=5) as sock:
                sock.sendall(b"GET /big HTTP/1.0\r\n\r\n")
                time.sleep(0.2)  # the server meets a full buffer and waits to write
                chunks = []
                while chunk := sock.recv(65536):
                    chunks.append(chunk)
                return b"".join(chunks)
        response = harness.run(client)
        head, _, got = response.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 OK") and got == body


def test_a_page_is_rendered_again_after_its_age_or_a_new_shape():
    now, shape, renders = [100.0], ["generation 1"], []

    def current() -> tuple[Totals, list[str]]:
        renders.append(now[0])
        return sample_totals(), NAMES

    get_body = pages(current, lambda: shape[0], clock=lambda: now[0])  # max_age_s=0.25
    first = get_body("/metrics")
    now[0] += 0.125
    assert get_body("/metrics") is first and renders == [100.0]  # young: as it was
    assert get_body("/stats")[1] == "application/json"  # each page has its own age
    assert get_body("/nope") is None
    now[0] += 0.125  # the first is 0.25 s old now
    assert get_body("/metrics") == first and get_body("/metrics")
    shape[0] = "generation 2"  # a reload, a worker started or gone: at once
    assert get_body("/metrics") == first and get_body("/stats")
    assert renders == [100.0, 100.125, 100.25, 100.25, 100.25]


# --- minismtp stats -------------------------------------------------------------------


def config_for(port: int) -> StatsConfig:
    return StatsConfig(parse_listen(f"127.0.0.1:{port}"))


def test_view_once_prints_totals_and_rates(harness):
    out = io.StringIO()
    code = harness.run(lambda: statsview.run(config_for(harness.port), None, True, out,
                                             interval_s=0.05))
    assert code == 0
    text = out.getvalue()
    assert f"from http://127.0.0.1:{harness.port}/stats: 1 worker(s)" in text
    assert "\x1b[" not in text
    lines = {line[:28].strip(): line[28:].split() for line in text.splitlines()}
    assert lines["messages accepted"] == ["4", "0.0"]  # unchanged between the samples
    assert lines["received"] == ["2.5", "MB", "0", "B/s"]
    assert lines["rejected 450"] == ["2", "0.0"]
    assert lines["fault busy-rcpt"] == ["1", "0.0"]
    assert "end of data latency         mean 2.0 ms, p50 <= 2.5 ms, p99 <= 2.5 ms" in text


class FakeTerminal(io.StringIO):
    def __init__(self, screens: int) -> None:
        super().__init__()
        self.screens = screens

    def isatty(self) -> bool:
        return True

    def write(self, text: str) -> int:
        if text.startswith("\x1b[H\x1b[2J"):
            self.screens -= 1
            if self.screens < 0:
                raise KeyboardInterrupt  # the operator's Ctrl-C
        return super().write(text)


def test_view_refreshes_on_a_terminal_until_ctrl_c(harness):
    out = FakeTerminal(screens=3)
    code = harness.run(lambda: statsview.run(config_for(harness.port), None, False, out,
                                             interval_s=0.02))
    assert code == 0
    assert out.getvalue().count("\x1b[H\x1b[2J") == 3
    assert out.getvalue().count("messages accepted") == 3


def test_view_of_something_else(capsys):
    for harness in make_harness(lambda path: (200, "text/html", b"<html>hello</html>")):
        code = harness.run(lambda: statsview.run(config_for(harness.port), None, True,
                                                 io.StringIO(), interval_s=0.01))
    assert code == 1
    assert capsys.readouterr().err == (
        f"minismtp: http://127.0.0.1:{harness.port}/stats did not answer with minismtp "
        "statistics\n")


_GOOD = {"workers": 1, "connections": {"open": 0, "total": 0}, "transactions": 0,
         "messages_accepted": 0, "bytes_received": 0, "rejections": {}, "faults": {},
         "end_of_data_seconds": {"sum": 0, "count": 0, "buckets": {"+Inf": 0}}}


@pytest.mark.parametrize("body", [
    json.dumps({**_GOOD, "tls": {"sessions": 1}}).encode(),  # its failures missing
    json.dumps({**_GOOD, "auth": {"x": 1}}).encode(),
    json.dumps({**_GOOD, "per_client": [1]}).encode(),
    b"[" * 200_000 + b"]" * 200_000,  # nested past the JSON decoder's recursion
    json.dumps({**_GOOD, "bytes_received": 10**400}).encode(),  # no counter holds it
    json.dumps({**_GOOD, "listeners": {"mx": {"sessions": 10**30}}}).encode(),
    json.dumps({**_GOOD, "end_of_data_seconds": {"sum": float("nan"), "count": 1,
                                                 "buckets": {"+Inf": 1}}}).encode(),
], ids=["tls", "auth", "per_client", "nested", "huge", "huge-optional", "nan"])
def test_view_of_a_look_alike_is_one_line(capsys, body):
    """An answer shaped like the statistics but not theirs: one line, never a traceback."""
    for harness in make_harness(lambda path: (200, "application/json", body)):
        code = harness.run(lambda: statsview.run(config_for(harness.port), None, True,
                                                 io.StringIO(), interval_s=0.01))
    assert code == 1
    assert capsys.readouterr().err.endswith("did not answer with minismtp statistics\n")


def test_view_when_nothing_listens(capsys):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, never listening: connections are refused
        assert statsview.run(config_for(port), None, True, io.StringIO()) == 1
    assert capsys.readouterr().err == (
        f"minismtp: cannot reach http://127.0.0.1:{port}/stats: Connection refused "
        "(is minismtp running with this configuration?)\n")


def test_view_without_stats_listen(tmp_path, capsys):
    path = tmp_path / "m.yaml"
    path.write_text("stats:\n  listen: null\n")
    assert main(["stats", "--config", str(path), "--once"]) == 2
    assert capsys.readouterr().err == f"minismtp: stats.listen is not set in {path}\n"
    assert main(["stats"]) == 2
    assert "stats.listen is not set in the built-in defaults" in capsys.readouterr().err


Answer = Callable[[socket.socket, threading.Event], None]


@contextlib.contextmanager
def raw_server(answer: Answer) -> Iterator[int]:
    """A loopback server that reads each request, then lets `answer(conn, stop)` write to
    the connection before closing it; gives its port. Stopped (and `stop` set) on exit."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.05)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(5)
                with contextlib.suppress(OSError):
                    conn.recv(4096)
                    answer(conn, stop)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        thread.join(5)
        listener.close()


def test_a_fetch_has_one_deadline_however_slowly_bytes_come():
    def trickle(conn: socket.socket, stop: threading.Event) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n")
        for byte in json.dumps(_GOOD).encode()[:100]:  # 10 s at most
            if stop.wait(0.1):
                return
            conn.sendall(bytes([byte]))  # each well within the deadline

    with raw_server(trickle) as port:
        url = f"http://127.0.0.1:{port}/stats"
        start = time.monotonic()
        with pytest.raises(statsview.FetchError) as info:
            statsview.fetch(url, timeout_s=0.5)
        assert time.monotonic() - start < 2
    assert str(info.value) == f"cannot read {url}: no whole answer within 0.5s"


def reply_with(head: bytes, body: bytes = b"") -> Answer:
    return lambda conn, stop: conn.sendall(head + b"\r\n\r\n" + body)


def test_an_answer_whole_by_its_content_length_is_taken_without_waiting_for_eof():
    """A server that keeps the connection open after a whole answer (ignoring our
    Connection: close) is read to the end its Content-Length gives, not to the deadline."""
    good = json.dumps(_GOOD).encode()

    def answer_and_stay(conn: socket.socket, stop: threading.Event) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                     b"CONTENT-LENGTH:  %d\r\n\r\n" % len(good) + good)
        stop.wait(10)  # open until the test ends

    with raw_server(answer_and_stay) as port:
        start = time.monotonic()
        assert statsview.fetch(f"http://127.0.0.1:{port}/stats", timeout_s=5).doc == _GOOD
        assert time.monotonic() - start < 2


def test_a_redirect_is_not_followed():
    good = json.dumps(_GOOD).encode()
    with raw_server(reply_with(b"HTTP/1.1 200 OK\r\nContent-Type: application/json", good)) \
            as elsewhere:
        assert statsview.fetch(f"http://127.0.0.1:{elsewhere}/stats").doc == _GOOD
        moved = reply_with(b"HTTP/1.1 302 Found\r\nLocation: http://127.0.0.1:%d/stats\r\n"
                           b"Content-Length: 0" % elsewhere)
        with raw_server(moved) as port:
            url = f"http://127.0.0.1:{port}/stats"
            with pytest.raises(statsview.FetchError) as info:
                statsview.fetch(url)
    assert str(info.value) == f"{url} answered 302 Found"


@pytest.mark.parametrize(("status_line", "said"), [
    (b"HTTP/1.1 404 \x1b[2J\x1b[31mall is well", "404 Not Found"),
    (b"HTTP/1.1 599 made up", "599"),
])
def test_an_error_status_is_told_in_our_words(status_line, said):
    with raw_server(reply_with(status_line + b"\r\nContent-Length: 0")) as port:
        url = f"http://127.0.0.1:{port}/stats"
        with pytest.raises(statsview.FetchError) as info:
            statsview.fetch(url)
    assert str(info.value) == f"{url} answered {said}"


def test_the_peer_s_text_cannot_drive_the_terminal():
    doc = to_json(Totals(workers=1), [])
    doc["rejections"]["\x1b]0;owned\x07\x1b[2J"] = 1
    doc["faults"]["\u202eevil"] = 2
    doc["listeners"]["mx\r\nmessages accepted"] = {"sessions": 3, "messages_accepted": 0,
                                                    "faults": {"\x9b8m": 4}}
    doc["auth"]["successes"] = "\x1b[8m"  # not a count: shown as it is, escaped
    doc["tls"]["handshake_failures"]["\ud800"] = 5  # a lone surrogate: no encoding takes it
    text = statsview.render("http://x/stats", statsview.Sample(1.0, doc), None)
    text.encode("utf-8")
    assert not [char for char in text if char != "\n" and not char.isprintable()]
    assert "rejected \\x1b]0;owned\\x07\\x1b[2J" in text
    assert "fault \\u202eevil" in text
    assert "mx\\r\\nmessages accepted: sessions" in text  # one line, not two
    assert "mx\\r\\nmessages accepted: fault \\x9b8m" in text
    assert re.search(r"^auth succeeded +\\x1b\[8m +-$", text, re.M)
    assert "tls failed: \\ud800" in text


def test_an_error_quoting_the_peer_is_escaped(capsys):
    with raw_server(reply_with(b"\x1b[2J\x1b[31mHTTP/1.1 200 OK")) as port:
        assert statsview.run(config_for(port), None, True, io.StringIO()) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"minismtp: cannot read http://127.0.0.1:{port}/stats: ")
    assert "\\x1b[2J\\x1b[31mHTTP/1.1 200 OK\\r\\n" in err
    assert "\x1b" not in err and err.count("\n") == 1


@pytest.mark.parametrize(("listen", "url"), [
    ("0.0.0.0:9025", "http://127.0.0.1:9025/stats"),
    ("[::]:9025", "http://[::1]:9025/stats"),
    ("[::1]:9", "http://[::1]:9/stats"),
    ("stats.example:80", "http://stats.example:80/stats"),
])
def test_stats_url(listen, url):
    address = load_config(overrides={"stats.listen": listen}).stats.listen
    assert statsview.stats_url(address) == url


def test_stats_view_shows_proxy_counts_only_when_there_are_some():
    quiet = statsview.Sample(1.0, statsformat.to_json(stats.Totals(workers=1), []))
    assert "proxy" not in statsview.render("http://x/stats", quiet, None)
    totals = stats.Totals(workers=1, proxy_headers=5)
    totals.proxy_failures[stats.PROXY_FAILURES.index("untrusted source")] = 2
    text = statsview.render("http://x/stats", statsview.Sample(1.0, statsformat.to_json(totals, [])),
                            None)
    assert re.search(r"proxy headers +5", text)
    assert re.search(r"proxy refused: untrusted source +2", text)
    assert "proxy refused: timeout" not in text


def test_stats_view_shows_each_listener_with_its_rates():
    def sample(at: float, sessions: int, faults: int) -> statsview.Sample:
        totals = stats.Totals(workers=1, faults={("chaos", "busy"): faults})
        totals.listeners = {"mx": [sessions, 3], "chaos": [1, 0]}
        return statsview.Sample(at, statsformat.to_json(totals, [("chaos", "busy")]))

    text = statsview.render("http://x/stats", sample(3.0, 10, 4), sample(1.0, 4, 0))
    assert re.search(r"^mx: sessions +10 +3\.0$", text, re.M)
    assert re.search(r"^mx: messages +3 +0\.0$", text, re.M)
    assert re.search(r"^chaos: sessions +1 +0\.0$", text, re.M)
    assert re.search(r"^chaos: fault busy +4 +2\.0$", text, re.M)
    older = statsformat.to_json(stats.Totals(workers=1), [])
    del older["listeners"]  # a server from before listener profiles
    assert "sessions" not in statsview.render("http://x/stats",
                                              statsview.Sample(1.0, older), None)


def test_stats_view_shows_per_client_refusals_only_when_there_are_some():
    quiet = statsview.Sample(1.0, statsformat.to_json(stats.Totals(workers=1), []))
    assert "per-client" not in statsview.render("http://x/stats", quiet, None)
    totals = stats.Totals(workers=1, per_client_unchecked=1)
    totals.per_client_refused[stats.PER_CLIENT_REASONS.index("recipients")] = 7
    text = statsview.render("http://x/stats",
                            statsview.Sample(1.0, statsformat.to_json(totals, [])), None)
    assert re.search(r"per-client refused: recipients +7", text)
    assert "per-client refused: sessions" not in text
    assert re.search(r"per-client unchecked +1", text)
