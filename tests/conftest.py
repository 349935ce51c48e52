"""Fixtures shared by every directory: real servers and raw clients, each stopped or
closed when its test ends, also when it fails."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from support.rawclient import RawClient
from support.server import Server


@pytest.fixture
def make_server(tmp_path: Path) -> Iterator[Callable[..., Server]]:
    """Start servers with per-test overrides: make_server({"limits": {...}}, workers=1)."""
    started: list[Server] = []

    def make(overrides: dict | None = None, *, start: bool = True, **kwargs) -> Server:
        server = Server(tmp_path, overrides, **kwargs)
        started.append(server)
        if start:
            server.start()
        return server

    yield make
    for server in started:
        server.stop()


@pytest.fixture
def server(make_server) -> Server:
    return make_server()


@pytest.fixture
def raw_clients() -> Iterator[Callable[..., RawClient]]:
    """Open raw clients that are all closed when the test ends."""
    opened: list[RawClient] = []

    def connect(port: int, **kwargs) -> RawClient:
        client = RawClient(port, **kwargs)
        opened.append(client)
        return client

    yield connect
    for client in opened:
        client.close()


# --- certificates for TLS servers (trustme: a throwaway CA per test module) -------------

@pytest.fixture(scope="module")
def pki():
    from support.tlsserver import Pki  # trustme only where TLS is tested

    return Pki()


@pytest.fixture
def tls_files(pki, tmp_path):
    """A certificate and key for NAME and 127.0.0.1, as files: (cert, key)."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    pki.write(pki.issue(), cert, key)
    return cert, key

