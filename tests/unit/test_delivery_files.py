"""Stored files as a Maildir reader sees them: line endings, the recipients recorded,
modes and group (delivery.line_endings, envelope_recipients, file_mode, dir_mode, group).
"""

from __future__ import annotations

import grp
import os
import pwd
import random
import stat
from email.parser import BytesParser
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support.smtpdriver import MODES, OPEN, Client, stuff

from minismtp.config import ConfigError, dump_config, load_config
from minismtp.delivery import DeliveryError, Peer, make_backend
from minismtp.delivery.maildir import MaildirBackend, to_lf
from minismtp.smtp.events import Envelope

PEER = Peer("192.0.2.7", 40123)
BODY = (b"Subject: caf\xc3\xa9\r\n\r\nline one\r\n.dot\r\nbare\rCR\r\n\r\n\r\n"
        + b"y" * 3000 + b"\r\nlast\r\n")


def envelope(*recipients: str) -> Envelope:
    return Envelope(helo="client.example", esmtp=True, sender="a@example.org",
                    recipients=recipients or ("b@example.net",))


def backend(tmp_path: Path, layout: str = "single", **options: object) -> MaildirBackend:
    b = make_backend("maildir", str(tmp_path / "mail"), False, layout, "mx.example.net",
                     **options)
    assert isinstance(b, MaildirBackend)
    b.prepare()
    return b


def stored_files(tmp_path: Path) -> list[Path]:
    return sorted((tmp_path / "mail" / "new").iterdir())


def only_file(tmp_path: Path) -> bytes:
    (path,) = stored_files(tmp_path)
    return path.read_bytes()


def head_and_body(data: bytes, body_length: int) -> tuple[bytes, bytes]:
    return data[:len(data) - body_length], data[len(data) - body_length:]


# --- line endings -----------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_lf_file_from_the_cores_chunks(tmp_path: Path, mode: str) -> None:
    """The core's body pieces, however the client's bytes were split, written one by
    one: the file holds the body with LF line ends, a bare CR kept as it is."""
    client = Client(mode, seed=7)
    client.send(OPEN + stuff(BODY) + b".\r\n")
    # What the sink relies on: no CRLF is split between two pieces.
    for before, after in zip(client.chunks, client.chunks[1:]):
        assert not (before.endswith(b"\r") and after.startswith(b"\n")), (before, after)
    sink = backend(tmp_path).open(envelope(), PEER)
    for chunk in client.chunks:
        sink.write(memoryview(chunk))
    sink.commit()
    expected = BODY.replace(b"\r\n", b"\n")
    head, body = head_and_body(only_file(tmp_path), len(expected))
    assert body == expected
    assert b"\r" not in head and head.startswith(b"Return-Path: <a@example.org>\n")
    assert head.endswith(b"\n") and b"\n\tby mx.example.net (minismtp) with ESMTP id " in head


def test_lf_file_from_normalized_bare_lf_lines(tmp_path: Path) -> None:
    client = Client("bytewise", bare_lf="normalize")
    client.send(OPEN + b"Subject: lf\n\nline one\n..dot\r\nline two\n\r\n.\r\n")
    sink = backend(tmp_path).open(envelope(), PEER)
    for chunk in client.chunks:
        sink.write(chunk)
    sink.commit()
    assert only_file(tmp_path).endswith(b"\nSubject: lf\n\nline one\n.dot\nline two\n\n")


@pytest.mark.parametrize("shift", [-2, -1, 0, 1])
def test_lf_pieces_longer_than_a_stretch(tmp_path: Path, shift: int) -> None:
    """A piece longer than the stretch the sink converts at a time: a CRLF across the
    stretch's edge (each shift puts the CR, the LF or neither right at it) and bare CRs
    come out as in a conversion of the whole piece."""
    from minismtp.delivery.maildir import _LF_STRETCH

    lead = b"a" * (_LF_STRETCH + shift - 1)
    piece = lead + b"\r\n" + b"b\rc\r\n" * 30000 + b"\r\r\n" + b"z" * _LF_STRETCH + b"\r\n"
    sink = backend(tmp_path).open(envelope(), PEER)
    sink.write(memoryview(piece))
    sink.commit()
    expected = piece.replace(b"\r\n", b"\n")
    assert only_file(tmp_path)[-len(expected):] == expected


def test_crlf_keeps_the_wire_form(tmp_path: Path) -> None:
    sink = backend(tmp_path, line_endings="crlf").open(envelope(), PEER)
    sink.write(BODY)
    sink.commit()
    head, body = head_and_body(only_file(tmp_path), len(BODY))
    assert body == BODY
    assert head.endswith(b"\r\n") and b"\n" not in head.replace(b"\r\n", b"")


def test_lf_files_read_back_by_the_email_parser(tmp_path: Path) -> None:
    sink = backend(tmp_path).open(envelope(), PEER)
    sink.write(BODY)
    sink.commit()
    msg = BytesParser().parsebytes(only_file(tmp_path))
    assert msg["Delivered-To"] == "b@example.net" and "\r" not in msg["Received"]
    assert msg.get_payload(decode=True) == BODY.split(b"\r\n\r\n", 1)[1].replace(b"\r\n", b"\n")


# --- envelope recipients ----------------------------------------------------------------

@pytest.mark.parametrize("layout", ["single", "per_recipient"])
@pytest.mark.parametrize("record, one, several", [
    ("one", [b"to@example.net"], []),
    ("all", [b"to@example.net"], [b"to@example.net", b"bcc@example.net"]),
    ("none", [], []),
])
def test_envelope_recipients_recorded(tmp_path: Path, layout: str, record: str,
                                      one: list[bytes], several: list[bytes]) -> None:
    b = backend(tmp_path, layout, envelope_recipients=record)
    found = []
    for recipients in (("to@example.net",), ("to@example.net", "bcc@example.net")):
        sink = b.open(envelope(*recipients), PEER)
        sink.write(b"Subject: x\r\n\r\nhi\r\n")
        sink.commit()
        box = (tmp_path / "mail" / "example.net" / "to" / "new" if layout == "per_recipient"
               else tmp_path / "mail" / "new")
        newest = max(box.iterdir(), key=lambda p: p.stat().st_mtime_ns)
        data = newest.read_bytes()
        for path in box.iterdir():
            path.unlink()
        found.append([line[len(b"Delivered-To: "):] for line in data.split(b"\n")
                      if line.startswith(b"Delivered-To: ")])
        assert (b"\tfor <to@example.net>;" in data) == (len(recipients) == 1
                                                        and record != "none")
    if layout == "per_recipient" and record == "all":
        several = []  # one file in each mailbox: it names nobody
    assert found == [one, several]


# --- modes and group ----------------------------------------------------------------------

def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_default_modes_are_private(tmp_path: Path) -> None:
    b = backend(tmp_path, "per_recipient")
    sink = b.open(envelope("x@example.net"), PEER)
    sink.commit()
    root = tmp_path / "mail"
    for directory in (root, root / "tmp", root / "example.net", root / "example.net" / "x",
                      root / "example.net" / "x" / "new"):
        assert _mode(directory) == 0o700, directory
    (path,) = (root / "example.net" / "x" / "new").iterdir()
    assert _mode(path) == 0o600


def test_configured_modes_are_exact_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o077)
    try:
        b = backend(tmp_path, "per_recipient", file_mode=0o640, dir_mode=0o750)
        sink = b.open(envelope("x@example.net"), PEER)
        sink.commit()
    finally:
        os.umask(old)
    root = tmp_path / "mail"
    for directory in (root, root / "tmp", root / "example.net" / "x" / "cur"):
        assert _mode(directory) == 0o750, directory
    (path,) = (root / "example.net" / "x" / "new").iterdir()
    assert _mode(path) == 0o640


def _other_group() -> grp.struct_group:
    """A group this process may give files to, other than its own (as root: any)."""
    for group in grp.getgrall():
        if group.gr_gid != os.getegid() and (os.geteuid() == 0
                                             or group.gr_gid in os.getgroups()):
            return group
    pytest.skip("no second group to give files to")


def test_group_owns_files_and_directories(tmp_path: Path) -> None:
    group = _other_group()
    b = backend(tmp_path, "per_recipient", group=group.gr_name, file_mode=0o640,
                dir_mode=0o750)
    sink = b.open(envelope("x@example.net"), PEER)
    sink.commit()
    root = tmp_path / "mail"
    for directory in (root, root / "tmp", root / "example.net" / "x" / "new"):
        st = directory.stat()
        assert st.st_gid == group.gr_gid, directory
        assert stat.S_IMODE(st.st_mode) == 0o750 | stat.S_ISGID, directory
    (path,) = (root / "example.net" / "x" / "new").iterdir()
    assert path.stat().st_gid == group.gr_gid and _mode(path) == 0o640


def test_group_passes_on_by_the_directory_where_chown_is_not_allowed(
        tmp_path: Path, monkeypatch) -> None:
    group = _other_group()
    b = backend(tmp_path, group=group.gr_name, file_mode=0o640)
    b._chgrp_files = False  # as a worker outside the group: no fchown, the set-gid dir
    sink = b.open(envelope(), PEER)
    sink.commit()
    (path,) = stored_files(tmp_path)
    assert path.stat().st_gid == group.gr_gid


def test_a_directory_that_lost_the_group_or_its_bit_is_logged_by_name(
        tmp_path: Path, caplog) -> None:
    """Outside the group the kernel clears the set-group-ID bit without an error (and
    what is then made inside gets the maker's group): said, naming the directory."""
    from minismtp.delivery.maildir import _check_group

    group = _other_group()
    kept, lost = tmp_path / "kept", tmp_path / "lost"
    for directory in (kept, lost):
        directory.mkdir()
        os.chown(directory, -1, group.gr_gid)
    kept.chmod(0o750 | stat.S_ISGID)
    lost.chmod(0o750)
    _check_group(str(kept), group.gr_gid, str(kept))
    assert caplog.text == ""
    _check_group(str(lost), group.gr_gid, str(lost))
    assert (f'delivery: directory "{lost}" has group {group.gr_gid} and mode 0750, not '
            f"group {group.gr_gid} with the set-group-ID bit") in caplog.text


def test_missing_group_is_named() -> None:
    with pytest.raises(DeliveryError, match='delivery.group: no such group "no-such-grp"'):
        make_backend("maildir", "unused", False, "single", "h", group="no-such-grp")


# --- settings --------------------------------------------------------------------------------

@pytest.mark.parametrize("raw, mode", [
    ("0640", 0o640), ("640", 0o640), ("0o750", 0o750), ("0777", 0o777),
])
def test_modes_parse(raw: object, mode: int) -> None:
    config = load_config(overrides={"delivery.file_mode": raw})
    assert config.delivery.file_mode == mode


@pytest.mark.parametrize("written, mode", [
    ('"0640"', 0o640), ("0640", 0o640), ("0o640", 0o640), ("00640", 0o640), ("0_640", 0o640),
])
def test_modes_in_the_file_parse_when_written_in_octal(tmp_path: Path, written: str,
                                                      mode: int) -> None:
    path = tmp_path / "modes.yaml"
    path.write_text(f"delivery:\n  file_mode: {written}\n")
    config = load_config(path)
    assert config.delivery.file_mode == mode and type(config.delivery.file_mode) is int


@pytest.mark.parametrize("key, written, example", [
    ("file_mode", "470", "0640"),  # decimal 470 is 0o726: world-writable files
    ("file_mode", "416", "0640"),  # decimal 416 is 0o640, but nobody means that
    ("dir_mode", "750", "0750"),
])
def test_a_mode_yaml_reads_as_decimal_is_refused(tmp_path: Path, key: str, written: str,
                                                 example: str) -> None:
    path = tmp_path / "modes.yaml"
    path.write_text(f"delivery:\n  {key}: {written}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.problems == [
        f'delivery.{key}: must be written in octal and quoted, such as "{example}", got '
        f"{written}, which YAML reads as decimal"]


def test_integers_written_in_octal_elsewhere_are_plain_ints(tmp_path: Path) -> None:
    path = tmp_path / "octal.yaml"
    path.write_text("server:\n  workers: 010\nfaults:\n  seed: 07\n"
                    "limits:\n  per_client: {max_sessions: 010}\n")
    config = load_config(path)
    assert (config.server.workers, config.faults.seed) == (8, 7)
    assert config.limits.per_client.max_sessions == 8
    for number in (config.server.workers, config.faults.seed,
                   config.limits.per_client.max_sessions):
        assert type(number) is int
    assert "workers: 8\n" in dump_config(config)


@pytest.mark.parametrize("key, raw", [
    ("file_mode", "0400"),  # the owner could not write
    ("dir_mode", "0600"),  # nor search its directories
    ("file_mode", "0x1a4"), ("file_mode", "rw-r-----"), ("file_mode", "01640"),
    ("dir_mode", True),
])
def test_bad_modes_are_refused(key: str, raw: object) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(overrides={f"delivery.{key}": raw})
    [problem] = info.value.problems
    assert problem.startswith(f"delivery.{key}: must be an octal mode such as ")


def test_envelope_recipients_and_line_endings_choices() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(overrides={"delivery.envelope_recipients": "first",
                               "delivery.line_endings": "CRLF"})
    assert info.value.problems == [
        'delivery.line_endings: must be one of "lf", "crlf", got "CRLF"',
        'delivery.envelope_recipients: must be one of "all", "one", "none", got "first"',
    ]


def test_random_chunk_edges_never_split_a_crlf() -> None:
    """The guarantee the lf conversion rests on, over many random splittings of a body
    dense with CR, LF, CRLF and dots, under each bare-LF policy."""
    rng = random.Random(1)
    pieces = [b"a", b"\r", b"\n", b"\r\n", b".", b"\r\n.", b"\r\n..", b"\n."]
    for policy in ("normalize", "reject", "accept"):
        for seed in range(40):
            body = b"".join(rng.choice(pieces) for _ in range(200)) + b"\r\n.\r\n"
            client = Client("random", seed=seed, bare_lf=policy)
            client.send(OPEN + body)
            for before, after in zip(client.chunks, client.chunks[1:]):
                assert not (before.endswith(b"\r") and after.startswith(b"\n"))


@pytest.mark.parametrize("piece, lf", [
    (b"a\r\nb\r\n", b"a\nb\n"),
    (b"a\rb\r\n", b"a\rb\n"),  # a bare CR stays
    (b"a\r\r\n", b"a\r\n"),  # CR, then a CRLF
    (b"\r\n\r\n", b"\n\n"),
    (b"end\r", b"end\r"),  # a CR that ends a piece is bare: no LF follows it (see above)
    (b"\n\r\n", b"\n\n"),  # a bare LF (bare_lf accept) stays a line end
    (b"", b""),
])
def test_to_lf(piece: bytes, lf: bytes) -> None:
    assert to_lf(memoryview(bytearray(piece))) == lf == piece.replace(b"\r\n", b"\n")


@given(st.lists(st.sampled_from([b"a", b"\r", b"\n", b"\r\n", b"\r\r\n", b"."]),
                max_size=40).map(b"".join))
@settings(max_examples=200, deadline=None)
def test_to_lf_is_replace(piece: bytes) -> None:
    assert to_lf(memoryview(piece)) == piece.replace(b"\r\n", b"\n")


def test_check_config_problems_for_the_group(tmp_path: Path, monkeypatch) -> None:
    from minismtp import startup

    group = _other_group()
    config = load_config(overrides={"delivery.path": str(tmp_path / "mail"),
                                    "delivery.group": group.gr_name})
    monkeypatch.setattr(startup.os, "geteuid", lambda: 0)
    assert startup.delivery_problems(config) == []
    monkeypatch.setattr(startup.os, "geteuid", lambda: 4242)  # not root, not a member
    monkeypatch.setattr(startup.os, "getegid", lambda: 4242)
    monkeypatch.setattr(startup.os, "getgroups", lambda: [4242])
    assert startup.delivery_problems(config) == [
        f'delivery.group: this user is not in group "{group.gr_name}", so cannot give it '
        "the files (run as root, or join it)"]
    missing = load_config(overrides={"delivery.group": "no-such-grp"})
    assert startup.delivery_problems(missing) == ['delivery.group: no such group "no-such-grp"']


def test_check_config_warns_of_a_maildir_closed_to_the_group(tmp_path: Path) -> None:
    """An existing Maildir a reader in delivery.group cannot get into is said, as a
    warning: minismtp stores there all the same, and the reader may get in otherwise."""
    from minismtp import startup

    group = _other_group()
    mail = tmp_path / "mail"
    for sub in ("", "tmp", "new", "cur"):
        (mail / sub).mkdir(mode=0o700)
        (mail / sub).chmod(0o700)
    single = load_config(overrides={"delivery.path": str(mail), "delivery.group": group.gr_name})
    warnings = startup.delivery_warnings(single)
    assert [w.split(" (")[0] for w in warnings] == [
        f'delivery.group: "{mail / sub}" is closed to group "{group.gr_name}"'
        for sub in ("", "new", "cur")]
    assert warnings[0].endswith(f"cannot get in: chgrp {group.gr_name} and chmod g+rwxs it")
    assert startup.delivery_problems(single) == []  # not a problem: storing works
    for sub in ("", "new", "cur"):  # as the README's install step makes them
        os.chown(mail / sub, -1, group.gr_gid)
        (mail / sub).chmod(0o2750)  # read-only for the group: Dovecot cannot move mail
    assert len(startup.delivery_warnings(single)) == 3
    for sub in ("", "new", "cur"):  # as the README's install step makes them
        (mail / sub).chmod(0o2770)
    assert startup.delivery_warnings(single) == []
    (mail / "cur").chmod(0o2710)  # searchable, not readable
    assert len(startup.delivery_warnings(single)) == 1
    # per_recipient: a reader only passes through the root.
    mail.chmod(0o2710)
    per_recipient = load_config(overrides={"delivery.path": str(mail),
                                           "delivery.group": group.gr_name,
                                           "delivery.layout": "per_recipient"})
    assert startup.delivery_warnings(per_recipient) == []
    mail.chmod(0o2700)
    assert len(startup.delivery_warnings(per_recipient)) == 1
    # Open to everyone, or no group: nothing to say.
    mail.chmod(0o755)
    assert startup.delivery_warnings(per_recipient) == []
    assert startup.delivery_warnings(load_config(overrides={"delivery.path": str(mail)})) == []


def test_check_config_counts_on_the_group_root_gives_at_start(tmp_path: Path,
                                                               monkeypatch) -> None:
    """As root with server.user the master gives the Maildir's directories the group at
    start, keeping their modes: only the modes then matter."""
    from minismtp import startup

    group = _other_group()
    mail = tmp_path / "mail"
    mail.mkdir(mode=0o750)
    mail.chmod(0o750)
    os.chown(mail, -1, os.getegid())
    config = load_config(overrides={"delivery.path": str(mail), "delivery.group": group.gr_name,
                                    "delivery.layout": "per_recipient",
                                    "server.user": pwd.getpwuid(os.geteuid()).pw_name})
    monkeypatch.setattr(startup.os, "geteuid", lambda: 0)
    assert startup.delivery_warnings(config) == []
    mail.chmod(0o700)
    assert len(startup.delivery_warnings(config)) == 1


def test_check_config_refuses_a_delivery_path_that_is_no_directory(tmp_path: Path,
                                                                  capsys) -> None:
    """serve could not make a Maildir there (it exited 1, a reload said "File exists"):
    check-config says so, and why."""
    from minismtp import startup
    from minismtp.cli import main

    afile = tmp_path / "afile"
    afile.write_text("x\n")
    for path, problem in [
        ("/dev/null", 'delivery.path "/dev/null": not a directory'),
        (afile, f'delivery.path "{afile}": not a directory'),
        (afile / "mail", f'delivery.path "{afile / "mail"}": "{afile}" is not a directory'),
        (afile / "a" / "b", f'delivery.path "{afile / "a" / "b"}": "{afile}" is not a directory'),
    ]:
        config = load_config(overrides={"delivery.path": str(path)})
        assert startup.delivery_problems(config) == [problem]
        assert startup.delivery_problems(config, serving=True) == [problem]
    written = tmp_path / "minismtp.yaml"
    written.write_text(f'delivery:\n  path: "{afile}/mail"\n')
    assert main(["check-config", "--config", str(written)]) == 2
    assert capsys.readouterr().err == (
        f'minismtp: delivery.path "{afile}/mail": "{afile}" is not a directory\n')


def _problems_as(user: pwd.struct_passwd, config) -> list[str]:
    """startup.delivery_problems(config) in a child running as `user`, all ids."""
    import json

    from minismtp import startup

    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 1
        try:
            os.close(read_end)
            os.setgroups([])
            os.setresgid(user.pw_gid, user.pw_gid, user.pw_gid)
            os.setresuid(user.pw_uid, user.pw_uid, user.pw_uid)
            os.write(write_end, json.dumps(startup.delivery_problems(config, serving=True)
                                           + ["warnings:"]
                                           + startup.delivery_warnings(config)).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        data = pipe.read()
    assert os.waitpid(pid, 0)[1] == 0
    found = json.loads(data)
    problems, warnings = found[:found.index("warnings:")], found[found.index("warnings:") + 1:]
    # check-config (not serving) says the same as a warning: it may run as someone else
    assert warnings == [f"{p} (serve and a reload refuse it when run as this user)"
                        for p in problems]
    return problems


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run as another user")
def test_check_config_asks_whether_this_user_can_write_the_maildir(tmp_path_factory) -> None:
    """Without server.user the workers store as whoever runs: serve failed with "cannot
    create: Permission denied" or "not writable" where check-config had said nothing."""
    import shutil
    import tempfile

    from minismtp import startup

    nobody = pwd.getpwnam("nobody")
    base = Path(tempfile.mkdtemp(prefix="minismtp-access-", dir="/tmp"))
    try:
        base.chmod(0o755)  # searchable by all, writable by root only
        maildir = base / "maildir"
        for sub in ("", "tmp", "new", "cur"):
            (maildir / sub).mkdir(mode=0o755)
        who = 'this user ("nobody")'
        cases = [
            (base / "mail", f'{who} cannot create it: may not write in "{base}"'),
            (base / "deeper" / "mail", f'{who} cannot create it: may not write in "{base}"'),
            (maildir, f"{who} may not write in its tmp/"),
        ]
        for path, problem in cases:
            config = load_config(overrides={"delivery.path": str(path)})
            assert _problems_as(nobody, config) == [f'delivery.path "{path}": {problem}']
        per_recipient = load_config(overrides={"delivery.path": str(maildir),
                                               "delivery.layout": "per_recipient"})
        assert _problems_as(nobody, per_recipient) == [
            f'delivery.path "{maildir}": {who} may not write in it']
        for sub in ("tmp", "new"):
            os.chown(maildir / sub, nobody.pw_uid, nobody.pw_gid)
        single = load_config(overrides={"delivery.path": str(maildir)})
        assert _problems_as(nobody, single) == []  # root/ and cur/ are not written
        (maildir / "new").rmdir()  # to be made: then the root must be writable
        assert _problems_as(nobody, single) == [
            f'delivery.path "{maildir}": {who} may not write in it']
        # with server.user, as root, the master gives the Maildir to that user instead
        as_root = load_config(overrides={"delivery.path": str(base / "mail"),
                                         "server.user": "nobody"})
        assert startup.delivery_problems(as_root) == []
    finally:
        shutil.rmtree(base)
