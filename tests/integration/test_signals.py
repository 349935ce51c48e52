"""Signals to the master and to workers: crash recovery, graceful stop, reload, scaling."""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import tempfile
import threading
import time
from pathlib import Path

import pytest

from minismtp import exitcodes
from minismtp.smtp import replies

BODY_HEAD = b"Subject: in flight\r\n\r\n" + b"first half of the body\r\n" * 20
BODY_TAIL = b"second half of the body\r\n" * 20


def _start_data(client) -> None:
    client.hello()
    client.send(client.envelope("flight@example.org", ["r@example.org"]))
    assert [r.code for r in client.replies(3)] == [250, 250, 354]
    client.send(BODY_HEAD)


def test_killed_worker_is_replaced(make_server, raw_clients):
    server = make_server({"server": {"workers": 2}})
    before = server.worker_pids()
    victim = before[0]
    os.kill(victim, signal.SIGKILL)

    def replaced() -> list[int] | None:
        pids = server.worker_pids()
        return pids if len(pids) == 2 and victim not in pids else None

    after = server.wait_until(replaced, 5, message="a replacement worker")
    assert set(after) - set(before), after
    server.wait_for_log(rf"worker {victim} was killed by signal 9; replacing it")
    for _ in range(4):  # whichever worker answers, it stores the message
        client = raw_clients(server.port)
        client.hello()
        assert client.send_message(b"Subject: after\r\n\r\nstill here\r\n").code == 250
        client.cmd("QUIT", 221)
    assert len(server.maildir_messages()) == 4


def test_worker_killed_mid_data_publishes_nothing(make_server, raw_clients):
    server = make_server({"server": {"workers": 1}})
    [worker] = server.worker_pids()
    client = raw_clients(server.port)
    _start_data(client)
    server.wait_until(lambda: server.files("tmp"), 5, message="the message file in tmp/")
    os.kill(worker, signal.SIGKILL)
    assert client.wait_closed() == b""  # no reply at all for the half-received message
    assert server.files("new") == []
    assert len(server.files("tmp")) <= 1  # crash debris, removed by the next start's cleanup
    server.wait_until(lambda: (lambda p: len(p) == 1 and worker not in p)(server.worker_pids()),
                      5, message="a replacement worker")
    fresh = raw_clients(server.port)
    fresh.hello()
    assert fresh.send_message(b"Subject: fresh\r\n\r\nbody\r\n").code == 250
    assert len(server.files("new")) == 1


def _stop_mid_data(server, raw_clients):
    """SIGTERM with one client mid-DATA and one idle; return (busy client, worker pid, mark)."""
    [worker] = server.worker_pids()
    busy = raw_clients(server.port)
    _start_data(busy)
    idle = raw_clients(server.port)
    idle.hello()
    server.wait_until(lambda: server.files("tmp"), 5, message="the message file in tmp/")
    mark = server.mark()
    server.send_signal(signal.SIGTERM)
    # The idle session is told at once.
    assert idle.reply(timeout=5).raw == replies.SHUTTING_DOWN.wire
    assert idle.wait_closed() == b""
    time.sleep(0.3)
    assert server.proc.poll() is None, "the master must wait for the transaction in flight"
    busy.send(busy.stuff(BODY_HEAD + BODY_TAIL)[len(BODY_HEAD):])
    reply = busy.reply(timeout=5)
    assert reply.code == 250, reply
    [(key, stored)] = server.maildir_messages()
    assert key.startswith(reply.queue_id + ".")
    assert stored.endswith(server.stored_form(BODY_HEAD + BODY_TAIL))
    return busy, worker, mark


def test_sigterm_lets_data_in_flight_finish(make_server, raw_clients):
    server = make_server({"server": {"workers": 1, "shutdown_timeout": "3s"},
                          "logging": {"level": "debug"}})
    busy, worker, mark = _stop_mid_data(server, raw_clients)
    assert server.wait(10) == 0
    server.wait_for_log(rf"worker {worker} exited with status 0", since=mark)
    server.wait_for_log(r"master exiting", since=mark)
    assert server.count_log(r"replacing it|killing it|crashed", since=mark) == 0
    assert server.worker_pids() == []
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", server.port), timeout=2).close()


def test_transactions_still_open_at_shutdown_timeout_get_421_and_a_clean_close(
        make_server, raw_clients):
    """One client quiet after MAIL, one mid-DATA: when shutdown_timeout runs out, each is
    told why (421 4.3.2) and sees the connection end without a reset; nothing is stored."""
    server = make_server({"server": {"workers": 1, "shutdown_timeout": "1s"}})
    quiet = raw_clients(server.port)
    quiet.hello()
    quiet.cmd("MAIL FROM:<quiet@example.org>", 250)
    sending = raw_clients(server.port)
    _start_data(sending)
    server.send_signal(signal.SIGTERM)
    for client in (quiet, sending):
        assert client.reply(timeout=5).raw == replies.SHUTTING_DOWN.wire
        assert client.wait_closed() == b""  # a FIN: a reset would raise here
    assert server.wait(10) == 0
    assert server.files("new") == []
    assert server.files("tmp") == []


def test_a_client_connecting_during_a_graceful_stop_is_refused_at_once(make_server,
                                                                       raw_clients):
    """While a transaction in flight holds the stop open, nothing accepts any more: a new
    client must be refused (and try its next MX), not left to wait for a reset."""
    server = make_server({"server": {"workers": 2, "shutdown_timeout": "10s"}})
    busy = raw_clients(server.port)
    _start_data(busy)
    server.send_signal(signal.SIGTERM)

    def refused() -> bool:
        try:
            socket.create_connection(("127.0.0.1", server.port), timeout=2).close()
        except ConnectionRefusedError:
            return True
        return False

    server.wait_until(refused, 3, interval=0.1, message="new connections to be refused")
    assert server.proc.poll() is None, "the master must wait for the transaction in flight"
    busy.send(busy.stuff(BODY_HEAD + BODY_TAIL)[len(BODY_HEAD):])
    assert busy.reply(timeout=5).code == 250
    assert server.wait(10) == 0
    assert len(server.files("new")) == 1


def test_sigterm_closes_session_once_its_transaction_ends(make_server, raw_clients):
    """After the 250 the session is idle: 421, close, and no wait for shutdown_timeout."""
    server = make_server({"server": {"workers": 1, "shutdown_timeout": "30s"},
                          "logging": {"level": "debug"}})
    busy, worker, mark = _stop_mid_data(server, raw_clients)
    started = time.monotonic()
    assert busy.reply(timeout=5).raw == replies.SHUTTING_DOWN.wire
    assert busy.wait_closed() == b""
    assert server.wait(10) == 0
    assert time.monotonic() - started < 5
    server.wait_for_log(rf"worker {worker} exited with status 0", since=mark)


@pytest.mark.parametrize("pipelined", [b"MAIL FROM:<next@example.org>\r\n", b"STARTTLS\r\n"])
def test_sigterm_while_an_answer_is_delayed_sends_off_before_what_was_pipelined(
        make_server, raw_clients, tmp_path, pipelined):
    """The 250 after the body comes late (a fault delay; a group commit is alike), and the
    worker stops meanwhile: once it is out the session gets 421 and is closed, before the
    command pipelined after the body runs (no new transaction; no 220 to STARTTLS
    followed by plaintext)."""
    from support.tlsserver import Pki

    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    Pki.write(Pki().issue(), cert, key)
    server = make_server({"server": {"workers": 1, "shutdown_timeout": "30s"},
                          "tls": {"certificates": [{"cert": str(cert), "key": str(key)}]},
                          "faults": {"rules": [{"stage": "end_of_data", "delay": "1s"}]}})
    client = raw_clients(server.port)
    client.hello()
    client.send(client.envelope("a@example.org", ["r@example.org"]))
    assert [r.code for r in client.replies(3)] == [250, 250, 354]
    client.send(client.stuff(b"Subject: late\r\n\r\nhi\r\n") + pipelined)
    time.sleep(0.3)  # the body is in; its answer waits for the delay
    server.send_signal(signal.SIGTERM)
    assert client.reply(timeout=5).code == 250
    assert client.reply(timeout=5).raw == replies.SHUTTING_DOWN.wire
    assert client.wait_closed() == b""
    assert server.wait(10) == 0


def test_sigterm_just_after_a_worker_is_replaced_reaches_the_new_worker(make_server):
    """A worker forked a moment before a stop must stop too, not linger to the deadline."""
    server = make_server({"server": {"workers": 2, "shutdown_timeout": "10s"}})
    before = server.worker_pids()
    os.kill(before[0], signal.SIGKILL)

    def replaced() -> list[int] | None:
        pids = server.worker_pids()
        return pids if len(pids) == 2 and before[0] not in pids else None

    server.wait_until(replaced, 5, interval=0.001, message="a replacement worker")
    started = time.monotonic()
    server.send_signal(signal.SIGTERM)  # forwarded while the new worker is still starting
    assert server.wait(15) == 0
    assert time.monotonic() - started < 5  # not the 10 s shutdown_timeout and its grace


def test_sigterm_when_idle_exits_zero(make_server):
    server = make_server({"server": {"workers": 2}})
    server.send_signal(signal.SIGTERM)
    assert server.wait(10) == 0
    server.wait_for_log(r"master exiting")


def test_term_after_a_storm_of_hups_still_stops_the_server(make_server):
    """HUPs far faster than reloads run (each reload's check scans the files another
    program left in tmp/), then TERM: the stop is not lost behind them, and the HUPs that
    came while a reload ran make one more reload, not one each."""
    server = make_server({"server": {"workers": 1}})
    tmp = server.mail_dir / "tmp"
    for n in range(20000):
        (tmp / f"other-program-{n}").write_bytes(b"")
    mark = server.mark()
    sent = 0
    storm_ends = time.monotonic() + 1.0
    while time.monotonic() < storm_ends:
        os.kill(server.pid, signal.SIGHUP)
        sent += 1
        time.sleep(0.001)
    server.send_signal(signal.SIGTERM)
    assert server.wait(15) == 0
    assert server.count_log(r"reloaded ", since=mark) < sent / 4


def test_sigquit_exits_quickly(make_server, raw_clients):
    server = make_server({"server": {"workers": 2}})
    workers = server.worker_pids()
    client = raw_clients(server.port)
    _start_data(client)  # even a transaction in flight does not hold it up
    started = time.monotonic()
    server.send_signal(signal.SIGQUIT)
    server.wait(5)
    assert time.monotonic() - started < 3
    server.wait_until(lambda: not any(os.path.exists(f"/proc/{p}/stat") for p in workers),
                      5, message="workers gone")
    assert server.files("new") == []


def _greeting_hostname(port: int, timeout: float = 5.0) -> str:
    """The host name in the greeting. What may follow it in the same read (a 421 from an
    old worker that began stopping just after it greeted this idle client) is not the
    greeting's business."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        data = b""
        while b"\r\n" not in data:
            piece = s.recv(512)
            if not piece:
                raise ConnectionError(f"closed before a complete greeting: {data!r}")
            data += piece
        data = data[:data.index(b"\r\n") + 2]
        assert data.startswith(b"220 ") and data.endswith(b" ESMTP minismtp\r\n"), data
        try:
            s.sendall(b"QUIT\r\n")
        except OSError:
            pass
        return data[4:].split(b" ", 1)[0].decode()


def test_sighup_reload_changes_hostname_without_dropping_connections(make_server):
    server = make_server({"server": {"hostname": "old.test", "workers": 2}})
    assert _greeting_hostname(server.port) == "old.test"
    seen: list[str] = []
    seen_at: list[float] = []
    failures: list[str] = []
    stop = threading.Event()

    def hammer() -> None:
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline and not stop.is_set():
            try:
                seen.append(_greeting_hostname(server.port, timeout=3.0))
                seen_at.append(time.monotonic())
            except (OSError, AssertionError) as exc:
                failures.append(repr(exc))
            time.sleep(0.01)

    thread = threading.Thread(target=hammer, daemon=True)
    thread.start()
    time.sleep(0.5)
    old_workers = set(server.worker_pids())
    server.write_config({"server": {"hostname": "new.test"}})
    mark = server.mark()
    server.send_signal(signal.SIGHUP)
    server.wait_for_log(r"reloaded .*: starting generation 1 with 2 worker\(s\)", since=mark)
    thread.join(10)
    stop.set()
    assert not thread.is_alive()
    assert failures == []
    assert "old.test" in seen and "new.test" in seen
    assert seen[-1] == "new.test"
    assert set(seen) == {"old.test", "new.test"}
    # The old generation serves until every new worker accepts: for that moment either
    # name may answer; then it is retired, and only the new one does.
    overlap = [at for at, name in zip(seen_at, seen) if name == "old.test"][-1] - \
        [at for at, name in zip(seen_at, seen) if name == "new.test"][0]
    assert overlap < 1.0
    new_workers = server.wait_until(
        lambda: (lambda p: p if len(p) == 2 and not set(p) & old_workers else None)(
            server.worker_pids()), 10, message="the old generation to exit")
    assert not set(new_workers) & old_workers
    assert _greeting_hostname(server.port) == "new.test"


def test_sighup_with_broken_config_keeps_running(make_server):
    server = make_server({"server": {"hostname": "kept.test", "workers": 1}})
    [worker] = server.worker_pids()

    server.config_path.write_text("server: [unclosed\n  hostname: x\n")
    mark = server.mark()
    server.send_signal(signal.SIGHUP)
    server.wait_for_log(r"reload refused: config: invalid YAML in", since=mark)
    server.wait_for_log(r"reload refused: still running on the previous configuration",
                        since=mark)
    assert _greeting_hostname(server.port) == "kept.test"

    # A tagged value PyYAML cannot construct: one line naming the file, no traceback.
    server.config_path.write_text("logging: {level: !!bool maybe}\n")
    mark = server.mark()
    server.send_signal(signal.SIGHUP)
    server.wait_for_log(rf'reload refused: config: invalid YAML in "{server.config_path}" '
                        r'at line 1, column 18: "maybe" is not a valid !!bool$', since=mark)
    server.wait_for_log(r"reload refused: still running on the previous configuration",
                        since=mark)
    assert "Traceback" not in server.log_text(mark)

    server.config_path.write_text("server:\n  hostnme: other.test\n")
    mark = server.mark()
    server.send_signal(signal.SIGHUP)
    server.wait_for_log(r'reload refused: server\.hostnme: unknown key '
                        r'\(did you mean "hostname"\?\)', since=mark)
    assert _greeting_hostname(server.port) == "kept.test"
    assert server.worker_pids() == [worker]  # no new generation was started
    assert server.count_log(r"reloaded ") == 0

    if os.geteuid() == 0:  # server.user is looked up only when started as root
        server.write_config({"server": {"hostname": "other.test", "user": "no-such-user-x"}})
        mark = server.mark()
        server.send_signal(signal.SIGHUP)
        server.wait_for_log(r'reload refused: server\.user: no such user "no-such-user-x"',
                            since=mark)
        assert _greeting_hostname(server.port) == "kept.test"
        assert server.worker_pids() == [worker]


def _uid(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("Uid:"))


@pytest.mark.skipif(os.geteuid() != 0, reason="server.user applies only when started as root")
def test_sighup_keeps_the_running_server_user_and_applies_the_rest(make_server, raw_clients):
    """The Maildir is the workers' user's: a reload may not hand it to another while the
    old generation still stores in it."""
    # pytest's own temporary folders are root's alone (0700): the Maildir goes where
    # the worker, once `nobody`, can reach it.
    home = Path(tempfile.mkdtemp(prefix="minismtp-nobody-"))
    home.chmod(0o755)
    try:
        nobody = pwd.getpwnam("nobody").pw_uid
        server = make_server({"server": {"workers": 1, "user": "nobody"},
                              "delivery": {"path": str(home / "mail")}})
        mark = server.mark()
        server.reload({"server": {"hostname": "new.test", "user": "daemon"}})
        server.wait_for_log(r'reload: server\.user stays "nobody" until a restart$',
                            since=mark)
        [worker] = server.worker_pids()
        assert _uid(worker) == nobody
        assert (home / "mail").stat().st_uid == (home / "mail" / "tmp").stat().st_uid == nobody
        assert _greeting_hostname(server.port) == "new.test"
        client = raw_clients(server.port)
        client.hello()
        assert client.send_message(b"Subject: after\r\n\r\nstill nobody's\r\n").code == 250
        server.stop()
    finally:
        shutil.rmtree(home, ignore_errors=True)


def test_ttin_ttou_change_worker_count(make_server):
    server = make_server({"server": {"workers": 1}})
    [first] = server.worker_pids()
    server.send_signal(signal.SIGTTIN)
    two = server.wait_for_workers(2)
    assert first in two
    server.send_signal(signal.SIGTTIN)
    server.wait_for_workers(3)
    server.send_signal(signal.SIGTTOU)
    server.wait_for_workers(2)
    server.send_signal(signal.SIGTTOU)
    [survivor] = server.wait_for_workers(1)
    mark = server.mark()
    server.send_signal(signal.SIGTTOU)  # never below one
    server.wait_for_log(r"workers: 1$", since=mark)
    time.sleep(1.0)  # a master loop turn or two: nothing may be retired
    assert server.worker_pids() == [survivor]
    assert _greeting_hostname(server.port) == "mx.test.invalid"


def _sender(connect, stop: threading.Event, acked: list, turned_away: list,
            failures: list) -> None:
    """Send messages one connection each until `stop`; sort every outcome.

    A retiring worker may close a session that is between transactions with 421 4.3.2:
    the client tries again. Once MAIL is accepted, the transaction must end in 250.
    """
    for n in range(2000):  # bounded; `stop` normally ends it first
        if stop.is_set():
            return
        body = f"Subject: load {threading.get_ident()} {n}\r\n\r\nbody {n}\r\n".encode()
        try:
            with connect() as client:
                first = client.reply()
                if first.raw == replies.SHUTTING_DOWN.wire:
                    turned_away.append(first)
                    continue
                assert first.code == 220, first
                client.send(b"EHLO load.test\r\n" + client.envelope("l@example.org", ["r@x.org"]))
                hello = client.reply()
                if hello.raw == replies.SHUTTING_DOWN.wire:
                    turned_away.append(hello)
                    continue
                assert hello.code == 250, hello
                mail = client.reply()
                if mail.raw == replies.SHUTTING_DOWN.wire:
                    turned_away.append(mail)
                    continue
                assert mail.raw == replies.SENDER_OK.wire, mail
                assert client.reply().raw == replies.RECIPIENT_OK.wire
                assert client.reply().code == 354
                client.send(client.stuff(body) + b"QUIT\r\n")
                acked.append((client.reply().queue_id, body))
                assert client.reply().code in (221, 421)
        except (OSError, AssertionError) as exc:
            failures.append(repr(exc))


@pytest.mark.parametrize("signum", [signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU],
                         ids=["HUP", "TTIN", "TTOU"])
def test_no_acknowledged_message_lost_while_workers_change(make_server, raw_clients, signum):
    server = make_server({"server": {"workers": 2}})
    stop = threading.Event()
    acked: list = []
    turned_away: list = []
    failures: list = []
    threads = [threading.Thread(target=_sender,
                                args=(lambda: raw_clients(server.port), stop, acked,
                                      turned_away, failures),
                                daemon=True) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(0.5)
    server.write_config({"server": {"hostname": "reloaded.test"}})
    server.send_signal(signum)
    time.sleep(1.5)
    stop.set()
    for t in threads:
        t.join(15)
    assert not [t for t in threads if t.is_alive()]
    assert failures == []
    assert len(acked) > 20
    print(f"{len(acked)} messages acknowledged, {len(turned_away)} sessions turned away "
          f"between transactions")
    stored = {key.split(".")[0] + "." + key.split(".")[1]: data
              for key, data in server.maildir_messages()}
    assert len(stored) == len(acked)
    for queue_id, body in acked:
        assert stored[queue_id].endswith(server.stored_form(body))
    assert server.files("tmp") == []


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback here")
def test_reload_adding_an_address_with_reuse_port_keeps_the_old_one(make_server):
    server = make_server({"server": {"workers": 1, "reuse_port": True,
                                     "listen": ["127.0.0.1:0"]}})
    assert _greeting_hostname(server.port) == "mx.test.invalid"
    server.write_config({"server": {"listen": ["[::1]:0", "127.0.0.1:0"]}})
    mark = server.mark()
    server.send_signal(signal.SIGHUP)
    found = server.wait_for_log(r"listening on \[::1\]:(\d+)", since=mark)
    server.wait_for_log(r"reloaded .*: starting generation 1", since=mark)
    v6_port = int(found.group(1))
    server.wait_until(lambda: len(server.worker_pids()) == 1 and server.count_log(
        r"reloaded ") == 1, 10, message="the new generation")
    time.sleep(0.5)  # the old worker retires; the new one binds its own sockets
    # Each address still answers on its own port.
    assert _greeting_hostname(server.port) == "mx.test.invalid"
    with socket.create_connection(("::1", v6_port), timeout=5) as s:
        assert s.recv(512).startswith(b"220 ")


def test_worker_stop_during_a_busy_loop_turn_does_not_crash(make_server, raw_clients):
    # A stop closes the listening sockets while the loop may still hold a readiness event
    # for them from the same select(): accepting on a closed socket must not crash it.
    server = make_server({"server": {"workers": 1}, "delivery": {"fsync": False}})
    [worker] = server.worker_pids()
    streams = []
    for _ in range(3):
        client = raw_clients(server.port)
        client.hello()
        client.send(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n")
        for code in (250, 250, 354):
            client.expect(code)
        streams.append(client)
    stop = threading.Event()
    chunk = (b"x" * 998 + b"\r\n") * 512

    def pump(client) -> None:
        deadline = time.monotonic() + 3
        try:
            while not stop.is_set() and time.monotonic() < deadline:
                client.send(chunk)
        except OSError:
            pass

    threads = [threading.Thread(target=pump, args=(c,), daemon=True) for c in streams]
    for t in threads:
        t.start()
    time.sleep(0.5)
    os.kill(worker, signal.SIGTERM)
    with socket.create_connection(("127.0.0.1", server.port), timeout=5):
        time.sleep(0.5)
    stop.set()
    for t in threads:
        t.join(10)
    for client in streams:
        client.close()
    time.sleep(1.0)  # the worker finishes its stop; a crash would be logged by now
    bad = [line for line in server.lines
           if "crashed" in line or "Bad file descriptor" in line
           or f"exited with status {exitcodes.WORKER_CRASHED}" in line]
    assert bad == []
