"""The master's listening sockets: who accepts from which, and groups that never shrink."""

from __future__ import annotations

import socket
import time

import pytest

from minismtp.config import load_config
from minismtp.config import ListenAddress
from minismtp.listeners import (
    ListenerPool, bind, defers_accept, is_listening, shares_port, switch_reuse_port,
    worker_positions,
)
from minismtp.values import Listener


def config(reuse_port: bool, workers: int = 2, listen: tuple[str, ...] = ("127.0.0.1:0",)):
    return load_config(overrides={"server.reuse_port": reuse_port, "server.workers": workers,
                                  "server.listen": list(listen)})


@pytest.fixture
def pool():
    made = ListenerPool()
    yield made
    made.close()


@pytest.mark.parametrize("group_size", range(1, 9))
@pytest.mark.parametrize("target", range(1, 6))
def test_every_socket_of_a_group_has_exactly_one_worker_of_a_full_generation(group_size, target):
    taken = [p for index in range(target) for p in worker_positions(group_size, index, target)]
    assert sorted(taken) == list(range(group_size))


def test_reuse_port_gives_each_worker_its_own_socket(pool):
    on = config(reuse_port=True)
    pool.bind_missing(on)
    first, second = pool.for_worker(on, 0, 2), pool.for_worker(on, 1, 2)
    assert len(first) == len(second) == 1 and first[0] is not second[0]
    assert first[0].getsockname() == second[0].getsockname()
    assert all(shares_port(sock) for sock in first + second)
    # The next generation's workers get the very same sockets: no queue is dropped.
    assert pool.for_worker(on, 0, 2) == first and pool.for_worker(on, 1, 2) == second


def test_fewer_workers_share_out_every_socket_of_a_group(pool):
    on = config(reuse_port=True)
    pool.bind_missing(on)
    for index in range(4):
        pool.for_worker(on, index, 4)
    assert pool.count() == 4
    shares = [pool.for_worker(on, index, 3) for index in range(3)]
    assert sorted(id(s) for share in shares for s in share) == sorted(map(id, pool.all()))


def test_without_reuse_port_every_worker_takes_every_socket(pool):
    on, off = config(reuse_port=True), config(reuse_port=False)
    pool.bind_missing(on)
    pool.for_worker(on, 1, 2)
    assert pool.for_worker(off, 0, 2) == pool.for_worker(off, 1, 2) == pool.all()
    assert pool.count() == 2


@pytest.mark.parametrize("proxy", [False, True], ids=["plain", "proxy"])
def test_a_renewed_socket_keeps_its_place_and_port_and_waits_for_its_worker(pool, proxy):
    """A socket that listened for nobody is closed, and one bound as it was, but not
    listening, takes its place: every new connection goes to its listening sibling."""
    on = listening(PROXY if proxy else "127.0.0.1:0", reuse_port=True)
    pool.bind_missing(on)
    [first], [second] = pool.for_worker(on, 0, 2), pool.for_worker(on, 1, 2)
    second.listen()
    fresh = pool.renew(second)
    assert pool.all() == [first, fresh]
    assert second.fileno() == -1
    assert fresh.getsockname() == first.getsockname()
    assert shares_port(fresh) and not is_listening(fresh)
    deferring = proxy and hasattr(socket, "TCP_DEFER_ACCEPT")
    assert defers_accept(fresh) == defers_accept(first) == deferring
    assert pool.for_worker(on, 1, 2) == [fresh]
    first.settimeout(5.0)
    for _ in range(8):
        with socket.create_connection(first.getsockname()) as client:
            client.sendall(b"\r\n")  # first bytes: a deferring socket hands it over
            accepted, _ = first.accept()
            accepted.close()


def test_turning_reuse_port_on_lets_the_first_socket_take_siblings(pool):
    off, on = config(reuse_port=False), config(reuse_port=True)
    pool.bind_missing(off)
    [original] = pool.all()
    assert not shares_port(original)
    assert switch_reuse_port(pool, off, on) is on
    assert shares_port(original) and pool.count() == 2
    assert pool.for_worker(on, 0, 2) == [original]


def test_when_the_kernel_refuses_reuse_port_stays_off(pool, monkeypatch, caplog):
    off, on = config(reuse_port=False), config(reuse_port=True)
    pool.bind_missing(off)
    [original] = pool.all()

    def refuse(*args, **kwargs):
        raise OSError("cannot add a socket on 127.0.0.1:0: Address already in use")

    monkeypatch.setattr(pool, "grow", refuse)
    kept = switch_reuse_port(pool, off, on)
    assert kept.server.reuse_port is False and kept.server.workers == on.server.workers
    assert not shares_port(original) and pool.all() == [original]
    assert "server.reuse_port stays false until a restart" in caplog.text


def test_a_removed_address_closes_its_group(pool):
    both = config(reuse_port=False, listen=("127.0.0.1:0", "127.0.0.2:0"))
    pool.bind_missing(both)
    gone = pool.groups["127.0.0.2:0"][0]
    pool.drop_unlisted(config(reuse_port=False))
    assert list(pool.groups) == ["127.0.0.1:0"] and gone.fileno() == -1


def test_named_port0_repeats_keep_their_sockets_when_one_goes(pool):
    """Named repeats of a port-0 address are keyed by name: the one left keeps its own
    socket (its port, its queue), not its former neighbour's."""
    def named(*names):
        return load_config(overrides={"server.listen": [
            {"address": "127.0.0.1:0", "name": name} for name in names]})
    both = named("a", "b")
    pool.bind_missing(both)
    ports = {entry.name: sock.getsockname()[1]
             for sock, entry in pool.entries(both, pool.for_worker(both, 0, 1))}
    only_b = named("b")
    pool.bind_missing(only_b)
    pool.drop_unlisted(only_b)
    [(sock, entry)] = pool.entries(only_b, pool.for_worker(only_b, 0, 1))
    assert entry.name == "b" and sock.getsockname()[1] == ports["b"] != ports["a"]


def test_a_port0_entry_named_like_a_place_keeps_a_socket_of_its_own(pool):
    """Unnamed repeats are told apart by their place; a name such as "2" must not take
    the place of the second one."""
    three = load_config(overrides={"server.listen": [
        "127.0.0.1:0", {"address": "127.0.0.1:0", "name": "2"}, "127.0.0.1:0"]})
    pool.bind_missing(three)
    assert pool.count() == 3
    assert len({sock.getsockname() for sock in pool.all()}) == 3


def test_a_bind_failure_closes_what_the_call_bound(pool):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        clash = config(reuse_port=False, listen=("127.0.0.1:0", f"127.0.0.1:{port}"))
        with pytest.raises(OSError, match=f"cannot listen on 127.0.0.1:{port}"):
            pool.bind_missing(clash)
    assert pool.groups == {}


@pytest.mark.parametrize("reuse_port", [False, True])
def test_repeated_port_zero_listeners_each_get_a_socket_and_their_own_entry(pool, reuse_port):
    both = load_config(overrides={"server.reuse_port": reuse_port, "server.listen": [
        {"address": "127.0.0.1:0", "name": "plain"},
        {"address": "127.0.0.1:0", "name": "auth",
         "auth": {"mode": "accept_any", "allow_plaintext": True}},
    ]})
    pool.bind_missing(both)
    socks = pool.for_worker(both, 0, 2)
    assert len(socks) == 2 and socks[0].getsockname() != socks[1].getsockname()
    assert [entry.name for _, entry in pool.entries(both, socks)] == ["plain", "auth"]
    # A reload with the same entries keeps both sockets: nothing new is bound.
    assert pool.bind_missing(both) == {}
    pool.drop_unlisted(both)
    assert pool.count() == 2


PROXY = {"address": "127.0.0.1:0", "proxy_protocol": {"version": "v2", "trusted": ["127.0.0.1/32"]}}


def listening(*entries, reuse_port: bool = False):
    return load_config(overrides={"server.reuse_port": reuse_port, "server.workers": 2,
                                  "server.listen": list(entries)})


@pytest.mark.skipif(not hasattr(socket, "TCP_DEFER_ACCEPT"), reason="Linux's TCP_DEFER_ACCEPT")
@pytest.mark.parametrize("reuse_port", [False, True], ids=["shared", "reuse-port"])
def test_only_listeners_where_the_client_speaks_first_defer_accepting(pool, reuse_port):
    """A PROXY listener's socket defers accepting; a plain one never does (the server
    speaks first there: every client would wait out the deferral); every socket of a
    reuse_port group the same."""
    both = listening(PROXY, "127.0.0.1:0", reuse_port=reuse_port)
    pool.bind_missing(both)
    for index in range(2):
        pool.for_worker(both, index, 2)
    proxy_group, plain_group = pool.groups.values()
    assert len(proxy_group) == len(plain_group) == (2 if reuse_port else 1)
    assert all(defers_accept(sock) for sock in proxy_group)
    assert not any(defers_accept(sock) for sock in plain_group)


@pytest.mark.skipif(not hasattr(socket, "TCP_DEFER_ACCEPT"), reason="Linux's TCP_DEFER_ACCEPT")
def test_a_reload_sets_and_clears_the_deferral_on_the_same_socket(pool):
    plain = listening("127.0.0.1:0")
    pool.bind_missing(plain)
    (sock,) = pool.all()
    port = sock.getsockname()[1]
    as_proxy = listening({**PROXY, "address": f"127.0.0.1:{port}"})
    plain_again = listening(f"127.0.0.1:{port}")
    pool.groups = {str(as_proxy.server.listen[0]): [sock]}  # the same address, reloaded
    pool.set_deferral(as_proxy)
    assert defers_accept(sock)
    pool.set_deferral(plain_again)
    assert not defers_accept(sock)


@pytest.mark.skipif(not hasattr(socket, "TCP_DEFER_ACCEPT"), reason="Linux's TCP_DEFER_ACCEPT")
@pytest.mark.parametrize("tls, defers", [("implicit", True), ("starttls", False), ("none", False)])
def test_an_implicit_tls_listener_defers_accepting_and_a_starttls_one_does_not(tls, defers):
    """The ClientHello comes first on implicit TLS; on STARTTLS the greeting does."""
    address = ListenAddress("127.0.0.1", 0, socket.AF_INET)
    sock = bind(address, 16, False,
                defer_accept=Listener(address, tls=tls).client_speaks_first)
    with sock:
        assert defers_accept(sock) is defers


@pytest.mark.skipif(not hasattr(socket, "TCP_DEFER_ACCEPT"), reason="Linux's TCP_DEFER_ACCEPT")
def test_a_deferring_socket_hands_over_a_connection_once_its_first_bytes_are_in(pool):
    """What the deferral is for: accept() sees a connection with its header there, and
    not (yet) one that has said nothing (held about a second: checked while less than
    that has passed, as a loaded machine may take longer between the steps)."""
    proxy = listening(PROXY)
    pool.bind_missing(proxy)
    (sock,) = pool.all()
    address = sock.getsockname()
    silent = socket.create_connection(address)
    connected = time.monotonic()
    talking = socket.create_connection(address)
    try:
        talking.sendall(b"PROXY TCP4 198.51.100.9 127.0.0.1 40001 25\r\n")
        sock.settimeout(5.0)
        accepted, peer = sock.accept()
        with accepted:
            if time.monotonic() - connected < 0.9:
                assert peer == talking.getsockname()
            if peer == talking.getsockname():
                accepted.settimeout(0)
                assert accepted.recv(100).startswith(b"PROXY TCP4 ")  # there at accept
        remaining = 0.8 - (time.monotonic() - connected)
        if remaining > 0.05:
            sock.settimeout(remaining)
            with pytest.raises(TimeoutError):
                sock.accept()  # the silent one is held back
    finally:
        silent.close()
        talking.close()
