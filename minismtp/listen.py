"""Listening sockets: bound by the master (or by each worker with reuse_port).

Untrusted input: none (addresses come from the validated configuration).
"""

from __future__ import annotations

import socket

from minismtp.values import ListenAddress


def bind(address: ListenAddress, backlog: int, reuse_port: bool, listen: bool = True
         ) -> socket.socket:
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
        if listen:
            sock.listen(backlog)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def bound_address(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"[{host}]:{port}" if sock.family == socket.AF_INET6 else f"{host}:{port}"
