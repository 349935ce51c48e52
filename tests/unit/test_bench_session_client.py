"""bench/session_client.py: what S1E's client says, against a scripted server that
answers only what the client must have sent by then."""

from __future__ import annotations

import base64
import importlib.util
import socket
import sys
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
AUTH = b"AUTH PLAIN " + base64.b64encode(b"\0bench\0secret") + b"\r\n"
MAIL = b"MAIL FROM:<bench@client.bench>\r\n"


@pytest.fixture
def session_client(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    spec = importlib.util.spec_from_file_location("session_client",
                                                  ROOT / "bench" / "session_client.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("pipeline_client", None)


def serve_one(listener: socket.socket, after_ehlo: bytes, heard: list[bytes]) -> None:
    """One session: after EHLO's 250, wait until the client has sent `after_ehlo` whole
    (and nothing more) before answering any of it, then take the rest of the session."""
    conn, _ = listener.accept()
    with conn:
        conn.settimeout(5)
        data = b""

        def until(ending: bytes) -> None:
            nonlocal data
            while not data.endswith(ending):
                chunk = conn.recv(65536)
                if not chunk:
                    raise ConnectionError("client went away")
                data += chunk

        conn.sendall(b"220 scripted ESMTP\r\n")
        until(b"EHLO client.bench\r\n")
        conn.sendall(b"250-scripted\r\n250 PIPELINING\r\n")
        data = b""
        until(after_ehlo)
        heard.append(data)
        pipelined = after_ehlo.endswith(MAIL)
        conn.sendall(b"235 2.7.0 ok\r\n" + (b"250 2.1.0 ok\r\n" if pipelined else b""))
        for command, reply in ((b"" if pipelined else MAIL, b"250 2.1.0 ok\r\n"),
                               (b"RCPT TO:<sink@server.bench>\r\n", b"250 ok\r\n"),
                               (b"DATA\r\n", b"354 go\r\n"), (b"\r\n.\r\n", b"250 queued\r\n"),
                               (b"QUIT\r\n", b"221 bye\r\n")):
            if command:
                data = b""
                until(command)
                conn.sendall(reply)


@pytest.mark.parametrize("pipelined", [True, False], ids=["pipelined", "lockstep"])
def test_auth_plain_goes_out_with_mail_from_only_when_pipelined(session_client, pipelined):
    """Pipelined, AUTH PLAIN and MAIL FROM arrive before either is answered (a lockstep
    client would wait for the 235 and hang here); lockstep, AUTH arrives alone."""
    listener = socket.create_server(("127.0.0.1", 0))
    heard: list[bytes] = []
    server = threading.Thread(target=serve_one, daemon=True,
                              args=(listener, AUTH + MAIL if pipelined else AUTH, heard))
    server.start()
    try:
        result = session_client.run("127.0.0.1", listener.getsockname()[1], 1, 1, 100, 10.0,
                                    auth=("bench", "secret"), pipeline_auth=pipelined)
        server.join(10)
    finally:
        listener.close()
    assert heard == [AUTH + MAIL if pipelined else AUTH]
    assert (result["messages"], result["auths"], result["errors"]) == (1, 1, 0)
