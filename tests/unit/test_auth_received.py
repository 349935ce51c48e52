"""The Received header of an authenticated session: ESMTPA, ESMTPSA and their SMTPUTF8
forms (RFC 3848, RFC 6531), and never the account name."""

from __future__ import annotations

import pytest

from minismtp.delivery.base import Peer
from minismtp.delivery.untrusted import trace_headers
from minismtp.smtp.events import Envelope

TLS = "TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits)"
USER = "submitter-account"


@pytest.mark.parametrize(("esmtp", "smtputf8", "tls", "word"), [
    (True, False, None, "ESMTPA"),
    (True, False, TLS, "ESMTPSA"),
    (True, True, None, "UTF8SMTPA"),
    (True, True, TLS, "UTF8SMTPSA"),
    (False, False, None, "SMTP"),  # AUTH needs EHLO: an envelope like this cannot occur
])
def test_protocol_word(esmtp: bool, smtputf8: bool, tls: str | None, word: str) -> None:
    envelope = Envelope("client.example", esmtp, "a@example.org", ("b@example.net",),
                        smtputf8=smtputf8, tls=tls, authenticated_as=USER)
    headers = trace_headers(envelope, Peer("192.0.2.7", 1), "mx.example.net", "Q1", 0.0)
    assert f" with {word} id Q1".encode() in headers
    assert USER.encode() not in headers


def test_not_authenticated_stays_esmtp() -> None:
    envelope = Envelope("client.example", True, "a@example.org", ("b@example.net",), tls=TLS)
    headers = trace_headers(envelope, Peer("192.0.2.7", 1), "mx.example.net", "Q1", 0.0)
    assert b" with ESMTPS id Q1" in headers
