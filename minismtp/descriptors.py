"""File descriptors: how many connections a worker can hold under RLIMIT_NOFILE.

Untrusted input: none (the process's limits and the validated configuration).

Each connection takes a descriptor, and a message being received takes one more for its
file in tmp/. If idle connections may take them all, a client already in a transaction
gets 451 at DATA and new clients wait in the queue without a greeting. So the master
raises its soft limit towards the hard one before forking (workers inherit it), and hands
workers a connection cap that leaves a reserve for delivery and the worker's own
descriptors; beyond the cap a client gets `421 4.3.2` at once.
"""

from __future__ import annotations

import logging
import resource
from dataclasses import replace

from minismtp.config import Config

log = logging.getLogger("minismtp.master")

# stdio, selector, signal wakeup pair, commit thread wakeup, new/ directory, spares
WORKER_OWN_FDS = 24
MIN_DELIVERY_RESERVE = 16  # message files open at once, at the least


def descriptors_wanted(max_connections: int, listeners: int) -> int:
    """A soft limit under which `connection_cap` keeps `max_connections` whole."""
    return WORKER_OWN_FDS + listeners + max(
        max_connections + MIN_DELIVERY_RESERVE, -(-max_connections * 4 // 3))


def raise_soft_limit(wanted: int) -> int:
    """Raise the soft RLIMIT_NOFILE towards `wanted`, as far as the hard limit allows;
    return the soft limit now in effect."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        new = wanted if hard == resource.RLIM_INFINITY else min(hard, wanted)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
            soft = new
        except (ValueError, OSError):
            pass  # e.g. above fs.nr_open: keep what we have
    return soft


def connection_cap(soft_limit: int, listeners: int, configured: int) -> int:
    """Connections per worker: at most `configured`, leaving a quarter of the usable
    descriptors (at least MIN_DELIVERY_RESERVE) for message files."""
    if soft_limit == resource.RLIM_INFINITY:
        return configured
    usable = soft_limit - WORKER_OWN_FDS - listeners
    reserve = max(MIN_DELIVERY_RESERVE, usable // 4)
    return max(1, min(configured, usable - reserve))


def fit_connections(config: Config, sockets: int) -> Config:
    """`config` for the workers: the descriptor limit raised for server.max_connections,
    or max_connections lowered to what the limit leaves (logged)."""
    server = config.server
    soft = raise_soft_limit(descriptors_wanted(server.max_connections, sockets))
    cap = connection_cap(soft, sockets, server.max_connections)
    if cap < server.max_connections:
        log.warning("open file limit %d: at most %d connections per worker "
                    "(server.max_connections: %d); more get 421", soft, cap,
                    server.max_connections)
    return replace(config, server=replace(server, max_connections=cap))
