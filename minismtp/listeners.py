"""The master's listening sockets: per configured address, a group of sockets that outlive
the workers accepting from them.

Untrusted input: none (addresses from the validated configuration).

A listening socket that is closed resets every connection queued on it, so the master
keeps each socket open for as long as its address is configured (until it stops), and a
worker that stops closes only its own descriptor. The next generation's workers inherit
the same sockets: no queue is ever dropped by a reload.

- `server.reuse_port` off: every worker accepts from every socket of every group (one
  socket per address, unless reuse_port was on earlier in this run).
- on: the sockets of a group share one port with SO_REUSEPORT and the kernel spreads new
  connections over them. Worker `index` of `target` accepts from sockets index,
  index + target, ... of each group, so with every index running each socket has a worker.
  A group grows before the worker that needs it is forked, and never shrinks while its
  address is configured: a shrunken group would drop a queue. A socket it grows by is
  bound but not listening: the kernel gives a SO_REUSEPORT socket its share of new
  connections from listen() on, so the worker that takes it calls listen() once it is
  set up (acceptor.py). A new generation that cannot start (TTIN, its workers crashing)
  so leaves no socket taking connections that no worker accepts, while the old one serves
  on the sockets it has. A socket cannot stop listening but by being closed: one that a
  generation dropped before it was ready made listen, and that nobody accepts from now,
  is `renew`ed by the master (arbiter.py): closed, with one bound as it was in its place.

Where the client speaks first (a PROXY header, a ClientHello: `client_speaks_first`), a
socket is set to defer accepting (Linux's TCP_DEFER_ACCEPT): the kernel hands a
connection over once its first bytes are in, so the worker reads them at accept instead
of watching the socket and waking up for them. A client that says nothing is handed over
anyway after about DEFER_ACCEPT_S (its handshake's ACK is then taken), and meets the
worker's own deadlines. A reload sets or clears it on every socket as the listener's
entry now says: on a listener where the server speaks first it would hold every client
back until that time is up.
"""

from __future__ import annotations

import errno
import logging
import socket
from dataclasses import replace

from minismtp.config import Config, ListenAddress
from minismtp.values import Listener

log = logging.getLogger("minismtp.master")

# Seconds the kernel holds a connection for its first bytes (rounded up to a retransmitted
# SYN-ACK: one, a second after the first); a balancer sends its header at once.
DEFER_ACCEPT_S = 1
_DEFER = getattr(socket, "TCP_DEFER_ACCEPT", None)  # Linux only


def bind(address: ListenAddress, backlog: int, reuse_port: bool, listen: bool = True,
         defer_accept: bool = False) -> socket.socket:
    """A listening socket for `address`; `defer_accept`: its listener's client speaks
    first (see the module docstring)."""
    sock = socket.socket(address.family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if address.family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((address.host, address.port))
        # Replies go out whole, one send per batch: no Nagle delay. Linux copies this to
        # every accepted socket, which saves the worker a syscall per connection.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if defer_accept:
            set_defer_accept(sock, True)
        if listen:
            sock.listen(backlog)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def set_defer_accept(sock: socket.socket, on: bool) -> None:
    """Let the kernel hand connections over only once their first bytes are in (see the
    module docstring), or at once. Where the option is missing, always at once."""
    if _DEFER is not None:
        sock.setsockopt(socket.IPPROTO_TCP, _DEFER, DEFER_ACCEPT_S if on else 0)


def defers_accept(sock: socket.socket) -> bool:
    return _DEFER is not None and bool(sock.getsockopt(socket.IPPROTO_TCP, _DEFER))


def bound_address(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"[{host}]:{port}" if sock.family == socket.AF_INET6 else f"{host}:{port}"


def is_listening(sock: socket.socket) -> bool:
    """Whether listen() was called on `sock` (a grown or added socket waits for its
    worker's: see the module docstring)."""
    return bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))


def shares_port(sock: socket.socket) -> bool:
    return bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT))


def worker_positions(group_size: int, index: int, target: int) -> range:
    """Which sockets of a group worker `index` of `target` accepts from (reuse_port on)."""
    return range(index, group_size, max(1, target))


def keyed(config: Config) -> list[tuple[str, Listener]]:
    """Each `server.listen` entry with the key of its group: its address text; only port 0
    may repeat, each repeat getting a port of its own, so that repeats neither share one
    socket nor lose theirs on a reload: a port-0 entry with a name of its own is keyed by
    it too (after a space, which neither a name nor an address has), and the text of
    unnamed repeats is followed by "#2", "#3"... (their place among them, the only thing
    that tells them apart)."""
    seen: dict[str, int] = {}
    found = []
    for listener in config.server.listen:
        text = str(listener)
        if listener.address.port == 0 and listener.name != str(listener.address):
            text = f"{text} {listener.name}"  # names are unique (profiles.resolve)
        seen[text] = n = seen.get(text, 0) + 1
        found.append((text if n == 1 else f"{text}#{n}", listener))
    return found


class ListenerPool:
    def __init__(self) -> None:
        self.groups: dict[str, list[socket.socket]] = {}  # by key (keyed())

    def count(self) -> int:
        return sum(len(group) for group in self.groups.values())

    def all(self) -> list[socket.socket]:
        return [sock for group in self.groups.values() for sock in group]

    def bind_missing(self, config: Config, listen: bool = True) -> dict[str, socket.socket]:
        """Bind the first socket of each address not bound yet and return those; on
        failure close what this call bound and raise OSError naming the address.
        `listen` False (a reload): the new generation's workers make them listen once
        set up (Acceptor.open_queues), so that an address no worker of a generation that
        cannot start would answer refuses connections instead of queueing them."""
        fresh: dict[str, socket.socket] = {}
        server = config.server
        entries = keyed(config)
        listed = {key for key, _ in entries}
        try:
            for key, address in entries:
                if key in self.groups:
                    continue
                try:
                    fresh[key] = bind(address, server.backlog, server.reuse_port, listen,
                                      defer_accept=address.client_speaks_first)
                except OSError as exc:
                    if exc.errno == errno.EADDRINUSE and (
                            old := self._dropped_on_port(address, listed)):
                        raise OSError(f"cannot listen on {address}: it overlaps {old}, "
                                      "which the running workers listen on until they "
                                      "stop: moving a listener to an address that overlaps "
                                      "its old one needs a restart") from exc
                    raise OSError(f"cannot listen on {address}: {exc.strerror}") from exc
        except OSError:
            for sock in fresh.values():
                sock.close()
            raise
        for text, sock in fresh.items():
            self.groups[text] = [sock]
        return fresh

    def _dropped_on_port(self, address: ListenAddress, listed: set[str]) -> str | None:
        """A bound address on `address`'s port that is no longer `listed`, if any: the
        likely holder of the port when `address` cannot be bound (127.0.0.1:25 moved to
        0.0.0.0:25). The old generation's workers keep its socket listening until they
        have stopped, so closing it first would not free the port; and stopping them
        first would refuse clients, which a reload never does."""
        for key, group in self.groups.items():
            sock = group[0]
            if key not in listed and sock.family == address.family \
                    and sock.getsockname()[1] == address.port:
                return bound_address(sock)
        return None

    def drop_unlisted(self, config: Config) -> None:
        """Close the groups of addresses the configuration no longer names."""
        wanted = {key for key, _ in keyed(config)}
        for text in [t for t in self.groups if t not in wanted]:
            for sock in self.groups.pop(text):
                sock.close()

    def set_deferral(self, config: Config) -> None:
        """Defer accepting on each group's sockets as its listener entry now needs."""
        for key, listener in keyed(config):
            for sock in self.groups.get(key, ()):
                set_defer_accept(sock, listener.client_speaks_first)

    def set_backlog(self, backlog: int) -> None:
        """On the listening sockets; one not listening yet gets it from its worker."""
        for sock in self.all():
            if is_listening(sock):
                sock.listen(backlog)  # Linux: listen() again only changes the backlog

    def allow_reuse_port(self, config: Config) -> None:
        """Let every group take SO_REUSEPORT sockets (reuse_port turned on by a reload):
        set it on the sockets bound without it and prove it with a second socket.

        Raises OSError, having changed nothing, when the kernel does not allow it.
        """
        changed = [sock for sock in self.all() if not shares_port(sock)]
        sizes = {text: len(group) for text, group in self.groups.items()}
        for sock in changed:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            self.grow(config, 2)
        except OSError:
            for text, size in sizes.items():
                group = self.groups[text]
                for sock in group[size:]:
                    sock.close()
                del group[size:]
            for sock in changed:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 0)
            raise

    def grow(self, config: Config, size: int) -> None:
        """Give every group of `config` still bound at least `size` sockets (reuse_port
        on)."""
        server = config.server
        for key, address in keyed(config):
            group = self.groups.get(key)
            if group is None:
                continue  # an older generation's address, closed by a reload
            port = group[0].getsockname()[1]  # the port the first one got (port 0)
            while len(group) < size:
                try:
                    group.append(bind(ListenAddress(address.host, port, address.family),
                                      server.backlog, reuse_port=True, listen=False,
                                      defer_accept=address.client_speaks_first))
                except OSError as exc:
                    raise OSError(f"cannot add a socket on {address}: {exc.strerror}") from exc

    def for_worker(self, config: Config, index: int, target: int) -> list[socket.socket]:
        """The sockets worker `index` of `target` on `config` accepts from; grows groups
        as needed."""
        if config.server.reuse_port:
            self.grow(config, index + 1)
        return self.share(config, index, target)

    def share(self, config: Config, index: int, target: int) -> list[socket.socket]:
        """The sockets worker `index` of `target` on `config` would take from the groups
        as they are. Only `config`'s addresses: the worker may be replacing one of an
        older generation, which serves while a reload's is starting, and keeps to its own."""
        groups = [self.groups[key] for key, _ in keyed(config) if key in self.groups]
        if not config.server.reuse_port:
            return [sock for group in groups for sock in group]
        return [group[position] for group in groups
                for position in worker_positions(len(group), index, target)]

    def renew(self, sock: socket.socket) -> socket.socket:
        """Close `sock`, one of a SO_REUSEPORT group, and put in its place in the group
        a socket bound as it was but not listening; return that one. A socket cannot
        stop listening but by being closed, and a sibling leaves the others' queues as
        they are. Raises OSError, having changed nothing, if the new one cannot be bound
        (it is bound first: the port stays held throughout)."""
        group = next(group for group in self.groups.values() if sock in group)
        host, port = sock.getsockname()[:2]
        # The backlog is the worker's to give, with its listen() (Acceptor.open_queues).
        fresh = bind(ListenAddress(host, port, sock.family), 0, reuse_port=True,
                     listen=False, defer_accept=defers_accept(sock))
        group[group.index(sock)] = fresh
        sock.close()
        return fresh

    def entries(self, config: Config, socks: list[socket.socket]
                ) -> list[tuple[socket.socket, Listener]]:
        """Each of `socks` with the `server.listen` entry of `config` it was bound for."""
        entry = dict(keyed(config))
        key = {sock: key for key, group in self.groups.items() for sock in group}
        return [(sock, entry[key[sock]]) for sock in socks]

    def close(self) -> None:
        for sock in self.all():
            sock.close()
        self.groups.clear()


def switch_reuse_port(pool: ListenerPool, current: Config, config: Config) -> Config:
    """`config`, or `config` with reuse_port kept off. Turning it off needs nothing (the
    workers share every socket); turning it on needs the sockets bound without it to take
    SO_REUSEPORT siblings. If the kernel refuses, it stays off (logged) and the rest of
    the reload still applies."""
    if not config.server.reuse_port or current.server.reuse_port:
        return config
    try:
        pool.allow_reuse_port(config)
    except OSError as exc:
        log.error("reload: server.reuse_port stays false until a restart: %s", exc)
        return replace(config, server=replace(config.server, reuse_port=False))
    return config
