"""Reply values: wire format, validation, and the per-message fast path."""

import pytest

from minismtp.smtp import replies
from minismtp.smtp.replies import Reply


def test_single_line_wire_carries_the_enhanced_code() -> None:
    assert replies.NEED_MAIL.wire == b"503 5.5.1 Error: need MAIL command\r\n"


def test_multiline_wire_uses_continuation_dashes() -> None:
    wire = replies.ehlo("mx.test", 1000).wire
    assert wire == (b"250-mx.test\r\n250-PIPELINING\r\n250-SIZE 1000\r\n250-8BITMIME\r\n"
                    b"250-ENHANCEDSTATUSCODES\r\n250 SMTPUTF8\r\n")


def test_greeting_and_helo_have_no_enhanced_code() -> None:
    assert replies.greeting("mx.test").wire == b"220 mx.test ESMTP minismtp\r\n"
    assert replies.helo("mx.test").wire == b"250 mx.test\r\n"


@pytest.mark.parametrize("queue_id", ["1795909492.M887665P8879Q1", "Q1", "x"])
def test_queued_wire_equals_the_reply_value(queue_id: str) -> None:
    assert replies.queued_wire(queue_id) == replies.queued(queue_id).wire


@pytest.mark.parametrize("queue_id", ["a\r\n250 fake", "id\x00", "ü"])
def test_queued_wire_refuses_unsafe_ids(queue_id: str) -> None:
    with pytest.raises(ValueError):
        replies.queued_wire(queue_id)


@pytest.mark.parametrize("text", ["line\r\nbreak", "tab\there", "nul\x00"])
def test_reply_text_cannot_inject_lines(text: str) -> None:
    with pytest.raises(ValueError):
        Reply(550, "5.0.0", text)


def test_enhanced_code_must_match_the_class() -> None:
    with pytest.raises(ValueError):
        Reply(450, "5.2.0", "mismatch")


def test_parse_config_text() -> None:
    reply = Reply.parse("450 4.2.0 Mailbox busy")
    assert (reply.code, reply.enhanced, reply.text) == (450, "4.2.0", "Mailbox busy")
    assert not reply.is_positive
    assert Reply.parse("554").wire == b"554 5.0.0 Error\r\n"
    with pytest.raises(ValueError):
        Reply.parse("hello")
