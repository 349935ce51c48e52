"""Listening sockets as the master binds them, and what accepted sockets inherit."""

from __future__ import annotations

import socket

import pytest

from minismtp.arbiter import bind
from minismtp.values import parse_listen


@pytest.mark.parametrize("text", ["127.0.0.1:0", "[::1]:0"])
def test_accepted_sockets_inherit_no_delay(text):
    # The worker no longer sets TCP_NODELAY per connection: it relies on this.
    address = parse_listen(text)
    try:
        listener = bind(address, 16, reuse_port=False)
    except OSError as exc:
        pytest.skip(f"{text} not available here: {exc}")
    with listener, socket.create_connection(listener.getsockname()[:2], timeout=5):
        assert not listener.getblocking()
        assert listener.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        listener.settimeout(5)
        accepted, _ = listener.accept()
        with accepted:
            assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
