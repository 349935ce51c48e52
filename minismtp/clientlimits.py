"""`limits.per_client`: sessions, new sessions and recipients per client address, counted
across all workers (anvil.py holds the counts); the setting's parser, and a worker's side.

Untrusted input: the operator's mapping (parse_per_client), and the client address, which
is either the socket's peer or the source of a PROXY header from a trusted balancer: the
address the limits are about, turned into a key by anvil.client_key. Replies name it;
it is an IP address in text, nothing the client could have written otherwise.

A worker with all three limits at 0 makes no ClientGate: its sessions never reach this
module. Otherwise `admit` runs once per session, once its real peer is known, before the
greeting: a session refused is greeted with 421 and closed; one admitted holds its
table entry (`session.client_entry`) until `release`. The RCPT handler that
`check_recipients` makes runs once per RCPT while
`limits.per_client.max_recipients_per_minute` is set. The per-minute counts a worker
makes wait in its own memory until `flush` adds them to the shared table (anvil.py),
which the loop calls at the end of a turn when they have waited FLUSH_S, and a worker
killed by SIGKILL loses at most that much of them. A worker reads a client's shared
counts when it first counts for it after its own flush, so another worker's counts
reach its checks within about twice FLUSH_S. One lock a turn, and one read of the
shared counts, not one per session and recipient, keep the limits cheap.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from minismtp import anvil
from minismtp.smtp import replies
from minismtp.smtp.events import RcptTo
from minismtp.smtp.replies import Reply
from minismtp.values import PathProblems, as_int, got, mapped_network_problem, parse_keys

if TYPE_CHECKING:
    from minismtp.loop import Loop
    from minismtp.session import Session
    from minismtp.stats import WorkerStats

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
RcptHandler = Callable[["Session", RcptTo], None]
FLUSH_S = 0.01  # the longest a worker keeps per-minute counts to itself
_V4_MAPPED = bytes(10) + b"\xff\xff"
_KEY_CACHE = 4096  # addresses whose keys a worker keeps
MIN_TABLE, MAX_TABLE = 1024, 65536


@dataclass(frozen=True, slots=True)
class PerClient:
    """The `limits.per_client` mapping; 0 = no such limit."""

    max_sessions: int = 0
    max_new_sessions_per_minute: int = 0
    max_recipients_per_minute: int = 0
    exempt: tuple[Network, ...] = ()  # clients never limited nor counted
    table_size: int = 16384  # clients tracked at once; fixed when the master starts
    ipv6_prefix_length: int = 84  # IPv6 clients counted by network (Postfix's default)

    @property
    def enabled(self) -> bool:
        return bool(self.max_sessions or self.max_new_sessions_per_minute
                    or self.max_recipients_per_minute)


def _count(value: object) -> int:
    number = as_int(value)
    if number is None or number < 0:
        raise ValueError(f"must be an integer >= 0 (0: no limit), got {got(value)}")
    return number


def _table_size(value: object) -> int:
    number = as_int(value)
    if number is None or not MIN_TABLE <= number <= MAX_TABLE or number & (number - 1):
        raise ValueError(f"must be a power of two from {MIN_TABLE} to {MAX_TABLE}, "
                         f"got {got(value)}")
    return number


def _exempt(value: object) -> tuple[Network, ...]:
    if value is None:
        return ()
    if not isinstance(value, (list, tuple)):
        raise ValueError(f'must be a list of networks ("10.0.0.0/8"), got {got(value)}')
    networks = []
    for item in value:
        try:
            if not isinstance(item, str) or len(item) > 64:
                raise ValueError
            network = ipaddress.ip_network(item, strict=True)
        except ValueError:
            raise ValueError(f"must be networks in CIDR form, host bits zero, got "
                             f"{got(item)}") from None
        if problem := mapped_network_problem(network):
            raise ValueError(f"{got(item)} is {problem}")
        networks.append(network)
    return tuple(networks)


def _prefix(value: object) -> int:
    number = as_int(value)
    if number is None or not 1 <= number <= 128:
        raise ValueError(f"must be an integer from 1 to 128, got {got(value)}")
    return number


_KEYS = {"max_sessions": _count, "max_new_sessions_per_minute": _count,
         "max_recipients_per_minute": _count, "exempt": _exempt, "table_size": _table_size,
         "ipv6_prefix_length": _prefix}


def parse_per_client(value: object) -> PerClient:
    """`limits.per_client`; problems as PathProblems (".max_sessions", ...)."""
    if value is None:
        return PerClient()
    if not isinstance(value, Mapping):
        raise ValueError(f"must be a mapping ({', '.join(_KEYS)}), got {got(value)}")
    fields, problems = parse_keys(value, _KEYS)
    if problems:
        raise PathProblems(problems)
    return PerClient(**fields)  # type: ignore[arg-type]


def dump_per_client(limits: PerClient) -> dict[str, object]:
    return {"max_sessions": limits.max_sessions,
            "max_new_sessions_per_minute": limits.max_new_sessions_per_minute,
            "max_recipients_per_minute": limits.max_recipients_per_minute,
            "exempt": [str(network) for network in limits.exempt],
            "table_size": limits.table_size,
            "ipv6_prefix_length": limits.ipv6_prefix_length}


# -- a worker's side -------------------------------------------------------------------

# Reasons of refusal, as counted (stats.PER_CLIENT_REASONS) and logged.
SESSIONS, NEW_SESSIONS, RECIPIENTS = "sessions", "new_sessions", "recipients"


class ClientGate:
    def __init__(self, limits: PerClient, table: anvil.ClientTable, slot: int,
                 loop: Loop, stats: WorkerStats, hostname: str) -> None:
        self.table = table
        self.slot = slot
        self.loop = loop
        self.stats = stats
        self.hostname = hostname
        self.max_sessions = limits.max_sessions
        self.max_new = limits.max_new_sessions_per_minute
        self.max_recipients = limits.max_recipients_per_minute
        # Each network as (value, mask) over 16-byte keys: one AND and compare per network.
        # By family: an IPv4 client's key is IPv4-mapped, inside IPv6 networks such as
        # ::/0 too, which are about IPv6 clients (as for PROXY's trusted and fault rules).
        self.exempt_v4 = [_key_match(net) for net in limits.exempt if net.version == 4]
        self.exempt_v6 = [_key_match(net) for net in limits.exempt if net.version == 6]
        # An IPv6 client is its network: one host has a /64 or more to pick addresses from.
        self.ipv6_mask = ((1 << 128) - 1) ^ ((1 << (128 - limits.ipv6_prefix_length)) - 1)
        # A network's key has its last (host) bit set: the network of ::1 (loopback), all
        # zeros once masked, would otherwise be the key that marks a free entry (anvil.py).
        self.ipv6_tag = 1 if limits.ipv6_prefix_length < 128 else 0
        self.flush_at = 0.0  # when the loop is to flush pending counts next
        # This worker's column of active sessions (table.close_session, without the call).
        self.active, self.column = table.column(slot)
        # Keys of recent addresses (b"": not counted): a client that comes back costs a
        # dict lookup, and its key's hash is computed once (bytes keep theirs). Bounded:
        # cleared when full.
        self.keys: dict[str, bytes] = {}

    def admit(self, session: Session) -> Reply | None:
        """Count the session against its client, or the 421 to greet it with."""
        address = session.peer.address
        key = self.keys.get(address)
        if key is None:
            key = self._key(address)
        if not key:
            return None  # exempt, or no address
        index = self.table.open_session(self.slot, key, self.loop.now, self.max_sessions,
                                        self.max_new)
        if index >= 0:
            session.client_entry = index
            return None
        if index == anvil.UNCOUNTED:
            self.stats.per_client_unchecked += 1
            return None
        if index == anvil.TOO_MANY_SESSIONS:
            self.stats.count_per_client_refusal(SESSIONS)
            session.end = "refused: too many sessions from this client"
            return replies.too_many_sessions_from(self._greeter(session), address)
        self.stats.count_per_client_refusal(NEW_SESSIONS)
        session.end = "refused: too many new sessions from this client in a minute"
        return replies.too_many_new_sessions_from(self._greeter(session), address)

    def _greeter(self, session: Session) -> str:
        """The name the session's listener greets with (server.hostname by default)."""
        profile = session.profile
        return self.hostname if profile is None else profile.hostname

    def _key(self, address: str) -> bytes:
        """The table key of `address` (an IPv6 one's network of `ipv6_prefix_length`
        bits, tagged), or b"" for one never counted (exempt, not an address, or "::"),
        remembered for the next session from it."""
        key = anvil.client_key(address) or b""
        ipv4 = key.startswith(_V4_MAPPED)
        exempt = self.exempt_v4 if ipv4 else self.exempt_v6
        if key and (exempt or not ipv4):
            number = int.from_bytes(key, "big")
            if any(number & mask == value for value, mask in exempt):
                key = b""
            elif not ipv4:
                key = (number & self.ipv6_mask | self.ipv6_tag).to_bytes(16, "big")
                if key == anvil.FREE_KEY:  # "::" with a 128-bit prefix: no client
                    key = b""
        if len(self.keys) >= _KEY_CACHE:
            self.keys.clear()
        self.keys[address] = key
        return key

    def flush(self) -> None:
        """At the end of a loop turn, when `table.pending` and `flush_at` has come."""
        now = self.loop.now
        self.table.flush(now)  # if the lock is taken, the counts wait for the next one
        self.flush_at = now + FLUSH_S

    def release(self, session: Session) -> None:
        self.active[self.column + session.client_entry] -= 1
        session.client_entry = -1

    def check_recipients(self, proceed: RcptHandler,
                         refuse: Callable[[Session, Reply], None]) -> RcptHandler:
        """A RCPT handler to put before `proceed` (a listener's own): past the client's
        recipients per minute, `refuse` with 450 4.7.1 (counted here, and by the core as
        an overshoot: decisions.py); else on to `proceed`, as for sessions not counted
        (exempt, or no room in the table). One call per RCPT: the table's count is the
        only other."""
        count, loop, limit, stats = self.table.recipient, self.loop, self.max_recipients, \
            self.stats

        def rcpt(session: Session, event: RcptTo) -> None:
            index = session.client_entry
            if index < 0 or count(index, loop.now, limit):
                proceed(session, event)
            else:
                stats.count_per_client_refusal(RECIPIENTS)
                refuse(session, replies.too_many_recipients_from(session.peer.address))
        return rcpt


def _key_match(network: Network) -> tuple[int, int]:
    """(value, mask) such that a key's int ANDed with mask is value iff it is inside."""
    if network.version == 4:
        value = (0xFFFF << 32) | int(network.network_address)
        host_bits = 32 - network.prefixlen
    else:
        value = int(network.network_address)
        host_bits = 128 - network.prefixlen
    mask = ((1 << 128) - 1) ^ ((1 << host_bits) - 1)
    return value, mask
