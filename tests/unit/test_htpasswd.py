"""The users file: htpasswd -B's format, every refusal named by file and line, and
`verify` for known and unknown users."""

from __future__ import annotations

import os
from pathlib import Path

import bcrypt
import pytest

from minismtp.htpasswd import Users, UsersFileError, seconds_per_check

ALICE_PW = "correct horse"
# Made once (cost 4, the cheapest) so the tests stay quick; $2y$ is what htpasswd writes.
ALICE = bcrypt.hashpw(ALICE_PW.encode(), bcrypt.gensalt(4)).decode().replace("$2b$", "$2y$", 1)
BOB = bcrypt.hashpw("j\u00f6rg's p\u00e4ss".encode(), bcrypt.gensalt(4)).decode()
CAROL = bcrypt.hashpw(b"x", bcrypt.gensalt(4, prefix=b"2a")).decode()
SALT_END, HASH_END = 28, 59  # the last characters of the salt and of the hash


def changed(hashed: str, at: int) -> str:
    """`hashed` with the character at `at` set to one whose padding bits are not zero."""
    return hashed[:at] + ("B" if hashed[at] != "B" else "D") + hashed[at + 1:]


def write(tmp_path: Path, text: str | bytes) -> str:
    path = tmp_path / "users"
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return str(path)


def test_load_and_verify(tmp_path):
    path = write(tmp_path, f"# users\n\nalice:{ALICE}\r\nbob:{BOB}\n  # indented comment\n"
                           f"carol:{CAROL}")
    users = Users.load(path)
    assert len(users) == 3 and "alice" in users and "dave" not in users
    assert users.verify("alice", ALICE_PW)
    assert not users.verify("alice", ALICE_PW + " ")
    assert not users.verify("alice", "")
    assert users.verify("bob", "j\u00f6rg's p\u00e4ss")
    assert users.verify("carol", "x")
    assert not users.verify("Alice", ALICE_PW)  # names are exact
    assert ALICE_PW not in repr(users) and ALICE not in repr(users)


def test_unknown_user_is_false_even_with_a_real_password(tmp_path):
    users = Users.load(write(tmp_path, f"alice:{ALICE}\n"))
    assert not users.verify("mallory", ALICE_PW)  # checked against alice's hash, ignored
    assert not Users({}).verify("anyone", "anything")


def test_an_unknown_user_costs_the_costliest_hash(monkeypatch):
    """Refusing a user who does not exist takes a check against the file's costliest hash,
    so no user's refusal takes longer than a stranger's: timing names no user."""
    costly = bcrypt.hashpw(b"y", bcrypt.gensalt(5)).decode()
    users = Users.parse(f"alice:{ALICE}\ndave:{costly}\nbob:{BOB}\n".encode())
    checked = []
    monkeypatch.setattr(bcrypt, "checkpw", lambda secret, hashed: checked.append(hashed))
    assert not users.verify("mallory", "y")
    assert checked == [costly.encode()]


def test_long_and_odd_passwords(tmp_path):
    long_pw = "p" * 72
    hashed = bcrypt.hashpw(long_pw.encode(), bcrypt.gensalt(4)).decode()
    users = Users.parse(f"long:{hashed}\n".encode())
    # bcrypt reads 72 bytes; htpasswd -B hashed a longer password the same way
    assert users.verify("long", long_pw + "more")
    assert not users.verify("long", "\udcff\x00" * 100)  # surrogates, NUL: just False


def test_empty_file(tmp_path):
    assert len(Users.load(write(tmp_path, ""))) == 0


@pytest.mark.parametrize("line, problem", [
    ("alice", 'expected "user:hash"'),
    (":" + ALICE, "bad user name"),
    ("alice:{SHA}qvTGHdzF6KLavt4PO0gs2a6pQ00=", "SHA-1 ({SHA}) hashes are not supported"),
    ("alice:$apr1$abcdefgh$0123456789abcdefghijkl", "MD5-crypt ($apr1$) hashes are not supported"),
    ("alice:$6$salt$" + "a" * 86, "SHA-512-crypt ($6$) hashes are not supported"),
    ("alice:abJnggxhB/yWI", "crypt hashes are not supported"),
    ("alice:secret", "not a bcrypt hash (plain text?)"),
    ("alice:$2y$05$short", "malformed bcrypt hash"),
    ("alice:" + ALICE.replace("$04$", "$03$"), "bcrypt cost 3 is out of range"),
    # one check at cost 31 holds a thread for days: AUTH would never answer
    ("alice:" + ALICE.replace("$04$", "$31$"),
     'user "alice": bcrypt cost 31 is out of range (4 to 17, as htpasswd -B -C takes)'),
    ("alice:" + ALICE.replace("$04$", "$18$"), "bcrypt cost 18 is out of range (4 to 17"),
    # bcrypt raises on every check against such a salt; such a hash matches no password
    ("alice:" + changed(ALICE, SALT_END), "malformed bcrypt hash (its salt or hash"),
    ("alice:" + changed(ALICE, HASH_END), "malformed bcrypt hash (its salt or hash"),
])
def test_bad_lines_name_file_and_line(tmp_path, line, problem):
    path = write(tmp_path, f"# first\nbob:{BOB}\n{line}\n")
    with pytest.raises(UsersFileError) as caught:
        Users.load(path)
    assert len(caught.value.problems) == 1
    message = caught.value.problems[0]
    assert message.startswith(f"{path}:3: ") and problem in message


def test_every_problem_at_once(tmp_path):
    path = write(tmp_path, f"alice:{ALICE}\nalice:{BOB}\nbad\n\xff:x\n".encode("latin-1"))
    with pytest.raises(UsersFileError) as caught:
        Users.load(path)
    assert caught.value.problems == [
        f'{path}:2: user "alice" is already defined on line 1',
        f'{path}:3: expected "user:hash" (as htpasswd -B writes it)',
        f"{path}:4: not UTF-8 text",
    ]


def test_unreadable(tmp_path):
    with pytest.raises(UsersFileError, match="cannot read"):
        Users.load(tmp_path / "missing")
    with pytest.raises(UsersFileError, match="not a regular file"):
        Users.load(tmp_path)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(UsersFileError, match="not a regular file"):
        Users.load(fifo)  # no hang


def test_costs_up_to_htpasswd_s_most_are_taken(tmp_path):
    users = Users.load(write(tmp_path, f"alice:{ALICE.replace('$04$', '$17$')}\nbob:{BOB}\n"))
    assert (len(users), users.max_cost) == (2, 17)


def test_seconds_per_check_doubles_with_each_step():
    assert 0 < seconds_per_check(4) < 1
    assert 2 ** 10 * seconds_per_check(4) > seconds_per_check(14) / 4  # noise, not halving
