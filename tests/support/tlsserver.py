"""TLS for the integration tests: a trustme CA, certificate files, client contexts, a
server configured with TLS listeners, a TLS client over RawClient, and /metrics samples.

The certificates name "mx.test.invalid" and 127.0.0.1 (smtplib checks the address it
dialled). Every wait is bounded, as in conftest.py.
"""

from __future__ import annotations

import http.client
import os
import re
import socket
import ssl
import time
from pathlib import Path

import trustme

HOST = "127.0.0.1"
NAME = "mx.test.invalid"
STATS_WAIT_S = 5.0  # workers publish their counters about once a second


class Pki:
    """A CA and the certificates it issued; pairs are written as PEM files on request."""

    def __init__(self) -> None:
        self.ca = trustme.CA()

    def issue(self) -> trustme.LeafCert:
        return self.ca.issue_cert(NAME, HOST)

    @staticmethod
    def write(leaf: trustme.LeafCert, cert: Path, key: Path,
              key_of: trustme.LeafCert | None = None) -> None:
        """Write `leaf`'s certificate and key (or another leaf's key) by rename, so that a
        reader never sees half a file."""
        for path, pem in ((cert, leaf.cert_chain_pems[0].bytes()),
                          (key, (key_of or leaf).private_key_pem.bytes())):
            tmp = path.with_name(path.name + ".new")
            tmp.write_bytes(pem)
            os.replace(tmp, path)

    def client_context(self, maximum: ssl.TLSVersion | None = None) -> ssl.SSLContext:
        context = ssl.create_default_context()
        self.ca.configure_trust(context)
        if maximum is not None:
            context.maximum_version = maximum
        return context


def der(leaf: trustme.LeafCert) -> bytes:
    return ssl.PEM_cert_to_DER_cert(leaf.cert_chain_pems[0].bytes().decode())


def free_ports(count: int) -> list[int]:
    """`count` different ports free now (all bound at once: the kernel may hand a
    port it just released to the next bind)."""
    socks = [socket.socket() for _ in range(count)]
    try:
        for sock in socks:
            sock.bind((HOST, 0))
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def tls_overrides(cert: Path, key: Path, listen: list, **sections: dict) -> dict:
    """Server overrides: `listen` entries, one certificate pair, statistics on a port
    that none of the listeners names."""
    taken = {int(re.search(r":(\d+)$", entry if isinstance(entry, str) else entry["address"])
                 .group(1)) for entry in listen}
    stats = next(port for port in free_ports(len(taken) + 1) if port not in taken)
    overrides = {
        "server": {"listen": listen, "workers": 1},
        "tls": {"certificates": [{"cert": str(cert), "key": str(key)}]},
        "stats": {"listen": f"{HOST}:{stats}"},
        # Stored as it came over the wire, so bodies compare byte for byte.
        "delivery": {"line_endings": "crlf"},
    }
    for section, values in sections.items():
        overrides.setdefault(section, {}).update(values)
    return overrides


def listening_ports(server) -> list[int]:
    """The ports of the server's listeners, in the order of `server.listen`."""
    return [int(p) for p in re.findall(r"listening on 127\.0\.0\.1:(\d+)", server.log_text())]


def stats_port(server) -> int:
    return int(server.config["stats"]["listen"].rsplit(":", 1)[1])


def metrics(server) -> dict[str, float]:
    """Every sample of /metrics, keyed by its name and labels as written."""
    conn = http.client.HTTPConnection(HOST, stats_port(server), timeout=5)
    try:
        conn.request("GET", "/metrics")
        response = conn.getresponse()
        assert response.status == 200
        text = response.read().decode()
    finally:
        conn.close()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            samples[key] = float(value)
    return samples


def failures_key(reason: str) -> str:
    return f'minismtp_tls_handshake_failures_total{{reason="{reason}"}}'


def wait_for_metric(server, key: str, value: float, timeout: float = STATS_WAIT_S
                    ) -> dict[str, float]:
    """Poll /metrics until `key` shows `value`; fail with the last value seen."""
    deadline = time.monotonic() + timeout
    while True:
        samples = metrics(server)
        if samples.get(key) == value:
            return samples
        if time.monotonic() >= deadline:
            raise AssertionError(f"{key} is {samples.get(key)}, expected {value}")
        time.sleep(0.1)


def start_tls(client, context: ssl.SSLContext) -> ssl.SSLSocket:
    """Wrap a RawClient's socket after its 220 to STARTTLS (or at once for implicit TLS):
    the client's reads and writes then go through TLS."""
    assert client.buf == b"", f"plaintext left unread before the handshake: {client.buf!r}"
    client.sock = context.wrap_socket(client.sock, server_hostname=NAME)
    return client.sock


def client_hello(context: ssl.SSLContext) -> bytes:
    """The bytes of a ClientHello, made without a connection (memory BIOs)."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=NAME)
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass
    hello = outgoing.read()
    assert hello[:1] == b"\x16", hello[:16]  # a handshake record
    return hello
