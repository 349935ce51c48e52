"""limits.per_client: its parser, and a worker's gate over a real table (no sockets)."""

from __future__ import annotations

import ipaddress
from types import SimpleNamespace

import pytest

from minismtp.anvil import ClientTable
from minismtp.clientlimits import ClientGate, PerClient
from minismtp.config import ConfigError, dump_config, load_config
from minismtp.delivery import Peer
from minismtp.smtp.events import RcptTo
from minismtp.smtp.replies import Reply
from minismtp.stats import PER_CLIENT_REASONS, WorkerStats

T0 = 60.0 * 1000


def per_client(**keys) -> PerClient:
    return load_config(overrides={"limits.per_client": keys}).limits.per_client


def problems(value) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(overrides={"limits.per_client": value})
    return info.value.problems


def test_defaults_are_off():
    limits = load_config().limits.per_client
    assert limits == PerClient() and not limits.enabled
    assert limits.table_size == 16384 and limits.exempt == ()


def test_keys_parse_and_dump_back():
    config = load_config(overrides={"limits.per_client": {
        "max_sessions": 50, "max_new_sessions_per_minute": "600",
        "max_recipients_per_minute": 6000, "exempt": ["10.0.0.0/8", "2001:db8::/32"],
        "table_size": 4096}})
    limits = config.limits.per_client
    assert limits == PerClient(50, 600, 6000, (ipaddress.ip_network("10.0.0.0/8"),
                                               ipaddress.ip_network("2001:db8::/32")), 4096)
    assert limits.ipv6_prefix_length == 84
    assert per_client(ipv6_prefix_length=64).ipv6_prefix_length == 64
    assert limits.enabled
    assert "max_recipients_per_minute: 6000" in dump_config(config)
    assert per_client(max_recipients_per_minute=1).enabled
    assert not per_client(exempt=["10.0.0.0/8"]).enabled


def test_every_bad_key_is_named():
    assert problems({"max_sessions": -1, "max_session": 3, "table_size": 1000,
                     "exempt": ["10.0.0.1/8"]}) == [
        "limits.per_client.max_sessions: must be an integer >= 0 (0: no limit), got -1",
        'limits.per_client.max_session: unknown key (did you mean "max_sessions"?)',
        "limits.per_client.table_size: must be a power of two from 1024 to 65536, got 1000",
        'limits.per_client.exempt: must be networks in CIDR form, host bits zero, got '
        '"10.0.0.1/8"',
    ]
    assert problems(5) == ["limits.per_client: must be a mapping (max_sessions, "
                           "max_new_sessions_per_minute, max_recipients_per_minute, exempt, "
                           "table_size, ipv6_prefix_length), got 5"]
    assert problems({"ipv6_prefix_length": 0}) == [
        "limits.per_client.ipv6_prefix_length: must be an integer from 1 to 128, got 0"]
    assert problems({"exempt": "10.0.0.0/8"})[0].startswith(
        "limits.per_client.exempt: must be a list of networks")
    assert problems({"exempt": ["::ffff:10.0.0.0/104"]}) == [
        'limits.per_client.exempt: "::ffff:10.0.0.0/104" is IPv4-mapped, which matches no '
        'client (IPv4 ones are matched as IPv4): write "10.0.0.0/8"']


def make_gate(limits: PerClient, table: ClientTable, slot: int = 0):
    loop = SimpleNamespace(now=T0)
    stats = WorkerStats(0)
    table.hand_out(slot)
    return ClientGate(limits, table, slot, loop, stats, "mx.test"), loop, stats


def session(address: str) -> SimpleNamespace:
    return SimpleNamespace(peer=Peer(address, 4000), client_entry=-1, end="", profile=None)


def refused(stats: WorkerStats) -> dict[str, int]:
    return {r: n for r, n in zip(PER_CLIENT_REASONS, stats.per_client_refused) if n}


def test_gate_admits_refuses_and_releases():
    table = ClientTable(1024, 2)
    gate, _, stats = make_gate(PerClient(max_sessions=2), table)
    first, second, third = (session("192.0.2.7") for _ in range(3))
    assert gate.admit(first) is None and gate.admit(second) is None
    assert first.client_entry == second.client_entry >= 0
    reply = gate.admit(third)
    assert reply.wire == b"421 4.7.0 mx.test Error: too many connections from 192.0.2.7\r\n"
    assert third.client_entry == -1 and "too many sessions" in third.end
    assert refused(stats) == {"sessions": 1}
    gate.release(first)
    assert first.client_entry == -1
    assert gate.admit(third) is None


def recipient_check(gate: ClientGate):
    """The gate's RCPT handler, as Decisions puts it before its own: a function of a
    session that gives the handler's refusal, or None where it went on."""
    outcomes: list[Reply | None] = []
    handler = gate.check_recipients(lambda session, event: outcomes.append(None),
                                    lambda session, reply: outcomes.append(reply))

    def check(session: SimpleNamespace) -> Reply | None:
        handler(session, RcptTo("rcpt@example.org"))
        return outcomes.pop()
    return check


def test_gate_rate_and_recipients():
    table = ClientTable(1024, 2)
    gate, loop, stats = make_gate(PerClient(max_new_sessions_per_minute=1,
                                            max_recipients_per_minute=2), table)
    one, two = session("2001:db8::5"), session("2001:db8::5")
    assert gate.admit(one) is None
    assert gate.admit(two).wire == (b"421 4.7.0 mx.test Error: too many connections per "
                                    b"minute from 2001:db8::5\r\n")
    check = recipient_check(gate)
    assert [check(one) for _ in range(2)] == [None, None]
    assert check(one).wire == \
        b"450 4.7.1 Error: too many recipients from 2001:db8::5\r\n"
    gate.flush()
    loop.now = T0 + 120  # two minutes on
    assert check(one) is None
    assert refused(stats) == {"new_sessions": 1, "recipients": 1}


def test_exempt_clients_are_neither_limited_nor_counted():
    table = ClientTable(1024, 2)
    gate, _, stats = make_gate(PerClient(max_sessions=1, max_recipients_per_minute=1,
                                         exempt=(ipaddress.ip_network("192.0.2.0/24"),
                                                 ipaddress.ip_network("2001:db8::/64"))),
                               table)
    for address in ("192.0.2.1", "192.0.2.255", "::ffff:192.0.2.9", "2001:db8::1",
                    "2001:db8::ffff:1"):
        sessions = [session(address) for _ in range(3)]
        assert all(gate.admit(s) is None and s.client_entry == -1 for s in sessions), address
        assert recipient_check(gate)(sessions[0]) is None
    assert table.lookup(bytes(10) + b"\xff\xff" + bytes([192, 0, 2, 1])) is None
    for address in ("192.0.3.1", "2001:db8:0:1::1"):
        assert gate.admit(session(address)) is None
        assert gate.admit(session(address)) is not None, address
    assert refused(stats) == {"sessions": 2}


def test_a_wide_ipv6_exemption_is_warned_of():
    from minismtp.config import load_config

    config = load_config(overrides={"limits.per_client": {
        "max_sessions": 5, "exempt": ["::/0", "2001:db8::/32", "10.0.0.0/8"]}})
    assert config.warnings == ("limits.per_client.exempt: ::/0 exempts IPv6 clients only; "
                               "IPv4 clients need an IPv4 network (0.0.0.0/0 for all)",)


def test_exempt_networks_cover_their_own_family_only():
    """An IPv4 client's key is IPv4-mapped IPv6, but ::/0 means every IPv6 client, not
    every client; and 0.0.0.0/0 every IPv4 client, whatever form its address came in."""
    every_v6 = (ipaddress.ip_network("::/0"),)
    gate, _, _ = make_gate(PerClient(max_sessions=1, exempt=every_v6), ClientTable(1024, 2))
    assert gate.admit(session("2001:db8::1")) is None
    assert gate.admit(session("2001:db8::1")) is None  # exempt: not counted
    assert gate.admit(session("192.0.2.1")) is None  # counted
    assert gate.admit(session("::ffff:192.0.2.1")) is not None  # the same client, refused
    every_v4 = (ipaddress.ip_network("0.0.0.0/0"),)
    gate, _, _ = make_gate(PerClient(max_sessions=1, exempt=every_v4), ClientTable(1024, 2))
    assert all(gate.admit(session(a)) is None for a in ("192.0.2.1", "::ffff:192.0.2.1") * 2)
    assert gate.admit(session("2001:db8::1")) is None
    assert gate.admit(session("2001:db8::1")) is not None


def test_ipv6_clients_count_by_network():
    table = ClientTable(1024, 2)
    gate, _, _ = make_gate(PerClient(max_sessions=1), table)  # ipv6_prefix_length 84
    assert gate.admit(session("2001:db8::1")) is None
    refusal = gate.admit(session("2001:db8::ff:2"))  # the same /84
    assert refusal.wire.endswith(b"too many connections from 2001:db8::ff:2\r\n")
    assert gate.admit(session("2001:db8::1000:0:0:1")) is None  # another /84
    assert gate.admit(session("192.0.2.1")) is None and gate.admit(session("192.0.2.2")) is None
    apart, _, _ = make_gate(PerClient(max_sessions=1, ipv6_prefix_length=128),
                            ClientTable(1024, 2))
    assert apart.admit(session("2001:db8::1")) is None
    assert apart.admit(session("2001:db8::2")) is None


def test_the_recipient_check_is_skipped_for_uncounted_sessions():
    table = ClientTable(1024, 2)
    gate, _, _ = make_gate(PerClient(max_recipients_per_minute=1), table)
    odd = session("not an address")
    assert gate.admit(odd) is None and odd.client_entry == -1
    assert recipient_check(gate)(odd) is None


@pytest.mark.parametrize("prefix", [84, 127, 128])
def test_ipv6_loopback_is_a_client_of_its_own_not_a_free_entry(prefix):
    """Masked to its network, ::1 would be all zeros, the key of a free entry: a new
    client landing there would take it over, with ::1's sessions still counted on it.
    Network keys carry a host bit instead; only "::" itself (no client) is not counted."""
    table = ClientTable(1024, 2)
    gate, _, _ = make_gate(PerClient(max_sessions=1, ipv6_prefix_length=prefix), table)
    loopback = session("::1")
    assert gate.admit(loopback) is None and loopback.client_entry >= 0
    assert gate.admit(session("::1")) is not None  # one session at a time
    assert table.lookup(gate.keys["::1"]) == loopback.client_entry
    assert gate.keys["::1"] != bytes(16)
    assert gate.admit(session("2001:db8::1")) is None  # others count apart
    if prefix == 128:
        unspecified = session("::")
        assert gate.admit(unspecified) is None and unspecified.client_entry == -1
    else:
        assert gate.admit(session("::")) is not None  # in ::1's network
    gate.release(loopback)
    assert gate.admit(session("::1")) is None
