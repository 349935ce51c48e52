"""MAIL and RCPT arguments on their own: paths, mailboxes and MAIL parameters."""

from __future__ import annotations

import pytest

from minismtp.smtp import replies
from minismtp.smtp import arguments
from minismtp.smtp.arguments import (
    ArgumentError, is_mailbox, parse_mail_parameters, parse_path, recipient_path, sender_path,
)


def refusal(call, *args) -> object:
    with pytest.raises(ArgumentError) as info:
        call(*args)
    return info.value.reply


@pytest.mark.parametrize("arg, address, params", [
    ("FROM:<a@b.test>", "a@b.test", []),
    ("from: <a@b.test>", "a@b.test", []),  # the prefix is case-blind; a space may follow
    ("FROM:<>", "", []),
    ("FROM:<a@b.test> SIZE=10 BODY=8BITMIME", "a@b.test", ["SIZE=10", "BODY=8BITMIME"]),
    ("FROM:<@relay.test:a@b.test>", "a@b.test", []),  # a source route is dropped
    ('FROM:<"a b>c"@b.test>', '"a b>c"@b.test', []),  # a quoted local part keeps its text
    ("FROM:<jörg@b.test>", "jörg@b.test", []),
])
def test_paths(arg, address, params):
    assert parse_path(arg, "FROM:", replies.BAD_SENDER) == (address, params)


@pytest.mark.parametrize("arg, reply", [
    ("TO <a@b.test>", replies.RCPT_SYNTAX),
    ("TO:a@b.test", replies.BAD_RECIPIENT),
    ("TO:<a@b.test>x", replies.BAD_RECIPIENT),
    ("TO:<@relay.test>", replies.BAD_RECIPIENT),  # a route leading nowhere
    ("TO:<a\x01@b.test>", replies.BAD_RECIPIENT),
    ("TO:<a\udcff@b.test>", replies.BAD_RECIPIENT),  # a byte that was not UTF-8
    ("TO:<" + "a" * 250 + "@b.test>", replies.BAD_RECIPIENT),  # over 256 octets
])
def test_bad_paths(arg, reply):
    assert refusal(parse_path, arg, "TO:", replies.BAD_RECIPIENT) is reply


def test_path_length_counts_octets_not_characters():
    fits = "a" * 247 + "@b.test"  # 256 octets with the brackets: the most allowed
    assert parse_path(f"TO:<{fits}>", "TO:", replies.BAD_RECIPIENT)[0] == fits
    wide = "é" * 124 + "@b.test"  # 124 characters, 248 octets: 257 with the brackets
    assert refusal(parse_path, f"TO:<{wide}>", "TO:", replies.BAD_RECIPIENT)


@pytest.mark.parametrize("address, ok", [
    ("a@b.test", True), ("a@b", True), ("@b.test", False), ("a@", False), ("ab", False),
    ("a@.b.test", False), ("a@b..test", False), ('"x@y"@b.test', True),
])
def test_is_mailbox(address, ok):
    assert is_mailbox(address) is ok


@pytest.mark.parametrize("params, expected", [
    ([], (None, None, False)),
    (["SIZE=1000"], (1000, None, False)),
    (["size=0", "body=7bit", "smtputf8"], (0, "7BIT", True)),
    (["BODY=8BITMIME"], (None, "8BITMIME", False)),
])
def test_mail_parameters(params, expected):
    assert parse_mail_parameters(params) == expected


@pytest.mark.parametrize("params, reply", [
    (["SIZE=abc"], replies.BAD_PARAMETER_VALUE),
    (["SIZE=١٢"], replies.BAD_PARAMETER_VALUE),  # non-ASCII digits
    (["SIZE=" + "9" * 21], replies.BAD_PARAMETER_VALUE),
    (["SIZE=1", "SIZE=2"], replies.BAD_PARAMETER_VALUE),
    (["BODY=BINARYMIME"], replies.BAD_PARAMETER_VALUE),
    (["SMTPUTF8=yes"], replies.BAD_PARAMETER_VALUE),
    (["AUTH=<>"], replies.UNKNOWN_PARAMETER),
])
def test_bad_mail_parameters(params, reply):
    assert refusal(parse_mail_parameters, params) is reply


def test_remembered_paths_give_the_same_answer_and_refusals_are_not_kept() -> None:
    arguments._SENDERS.clear()
    first = sender_path("FROM:<a@example.org> SIZE=10")
    assert first == ("a@example.org", ("SIZE=10",))
    assert sender_path("FROM:<a@example.org> SIZE=10") is first  # the remembered answer
    assert sender_path("FROM:<>") == ("", ())
    for bad in ("FROM:<a@>", "FROM:a@example.org"):
        for _ in range(2):  # refused the second time too: a refusal is not remembered
            with pytest.raises(ArgumentError):
                sender_path(bad)
        assert bad not in arguments._SENDERS
    assert recipient_path("TO:<Postmaster>") == ("Postmaster", ())
    with pytest.raises(ArgumentError) as refused:
        recipient_path("TO:<nobody>")
    assert refused.value.reply == replies.BAD_RECIPIENT


def test_remembered_paths_stay_bounded() -> None:
    arguments._RECIPIENTS.clear()
    for n in range(3 * arguments._MAX_REMEMBERED):
        assert recipient_path(f"TO:<u{n}@example.org>") == (f"u{n}@example.org", ())
        assert len(arguments._RECIPIENTS) <= arguments._MAX_REMEMBERED
