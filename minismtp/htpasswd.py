"""Users and their bcrypt password hashes, from a file in the format `htpasswd -B` writes.

Untrusted input: the users file comes from the operator (mistakes, not malice: every bad
line is reported as "path:line: what is wrong", all at once); the user name and password
given to `verify` come from an SMTP client (any text, any length).

Format: one `user:hash` per line; blank lines and lines starting with "#" are skipped.
Only bcrypt hashes are taken (`$2y$`, `$2b$`, `$2a$`, as `htpasswd -B` makes them). The
other kinds htpasswd can write are refused by name: MD5-crypt (`$apr1$`, its default
before 2.4), SHA-1 (`{SHA}`), crypt (`-d`) and plain text are all far cheaper to guess.

Checking a hash costs milliseconds of CPU by design, so `verify` belongs off the event
loop (authcheck.py runs it on threads). A user that does not exist costs a check against
the file's costliest hash (its result ignored), so no user takes longer to refuse than a
stranger; where the file mixes costs, a user with a cheaper hash is refused sooner than
a stranger, which tells that user exists: `mixed_costs` names them, and check-config
warns. bcrypt.checkpw compares in constant time.
"""

from __future__ import annotations

import os
import re
import time

import bcrypt

from minismtp.smallfile import NotRegularFile, TooLarge, read_small_file

# RFC-less but fixed: $2x$ cost $ 22 salt + 31 hash characters of bcrypt's base64.
_BCRYPT_SHAPE = re.compile(r"\$2[aby]\$(\d\d)\$[./A-Za-z0-9]{53}")
# The salt's 22 characters carry 16 bytes and the hash's 31 carry 23: the last character
# of each has its low 4 (salt) or 2 (hash) bits zero. A salt that breaks this makes
# bcrypt raise on every check; a hash that does can match no password. Either is a
# character changed by hand or by a copy, worth naming at load.
_BCRYPT = re.compile(r"\$2[aby]\$\d\d\$[./A-Za-z0-9]{21}[.Oeu][./A-Za-z0-9]{30}"
                     r"[.CGKOSWaeimquy26]")
_OTHER_KINDS = (  # what htpasswd writes besides bcrypt, by its prefix
    ("$apr1$", "MD5-crypt ($apr1$)"),
    ("{SHA}", "SHA-1 ({SHA})"),
    ("$1$", "MD5-crypt ($1$)"),
    ("$5$", "SHA-256-crypt ($5$)"),
    ("$6$", "SHA-512-crypt ($6$)"),
)
_DES_CRYPT = re.compile(r"[./A-Za-z0-9]{13}")
# For a user that is not in the file, when the file has nobody to borrow a hash from.
_DUMMY_HASH = b"$2b$10$SKJo9u7wq0vca1VG9k5kUOMnkckekWTleXfQPWNwizpva4bXQdfgG"
# Each step of the cost doubles a check. htpasswd -C takes 4 to 17; bcrypt itself allows
# 31, where one check holds a checker thread for days and AUTH never answers.
MIN_COST, MAX_COST = 4, 17
SLOW_COST = 15  # about a second or more a check on common hardware: worth a warning
_MAX_FILE_BYTES = 16 << 20  # read by the master at start and on HUP: bounded
BCRYPT_MAX_PASSWORD_BYTES = 72  # bcrypt ignores what follows; htpasswd -B does the same


class UsersFileError(ValueError):
    """The users file cannot be used; `problems` holds one "path:line: ..." line each."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


class Users:
    """The users of one file. Load with `Users.load(path)` (or `Users.parse`), then call
    `verify(user, password)` from a thread that may block for a bcrypt check."""

    def __init__(self, hashes: dict[str, bytes], path: str = "") -> None:
        self._hashes = dict(hashes)
        self.path = path
        # A real hash of the file, so an unknown user costs what a known one does: the
        # costliest, so that no user takes longer to refuse than one that does not exist.
        self._decoy = max(self._hashes.values(), key=_cost, default=_DUMMY_HASH)

    def __len__(self) -> int:
        return len(self._hashes)

    @property
    def mixed_costs(self) -> tuple[int, ...]:
        """The bcrypt costs of the file, lowest first, when there is more than one."""
        costs = sorted({_cost(hashed) for hashed in self._hashes.values()})
        return tuple(costs) if len(costs) > 1 else ()

    @property
    def max_cost(self) -> int:
        """The costliest hash's bcrypt cost, which every stranger's check pays."""
        return _cost(self._decoy)

    def __contains__(self, user: object) -> bool:
        return user in self._hashes

    def __repr__(self) -> str:
        return f"Users({self.path!r}, {len(self)} users)"

    # By content, so a reload can tell whether the file changed (config.Config equality).
    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Users):
            return NotImplemented
        return self._hashes == other._hashes

    def __hash__(self) -> int:
        return hash(frozenset(self._hashes.items()))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Users:
        """Read and check the file; raise UsersFileError listing every problem."""
        path = os.fspath(path)
        return cls.parse(_read(path), path)

    @classmethod
    def parse(cls, data: bytes, path: str = "<users>") -> Users:
        hashes: dict[str, bytes] = {}
        where_defined: dict[str, int] = {}
        problems: list[str] = []
        for number, raw in enumerate(data.split(b"\n"), 1):
            problem = _parse_line(raw, hashes, where_defined, number)
            if problem:
                problems.append(f"{path}:{number}: {problem}")
        if problems:
            raise UsersFileError(problems)
        return cls(hashes, path)

    def verify(self, user: str, password: str) -> bool:
        """True if `password` is `user`'s. Blocks for one bcrypt check whatever the
        answer (tens of milliseconds at the usual costs)."""
        secret = password.encode("utf-8", "surrogateescape")[:BCRYPT_MAX_PASSWORD_BYTES]
        stored = self._hashes.get(user)
        if stored is None:
            bcrypt.checkpw(secret, self._decoy)  # the same work, the answer ignored
            return False
        return bcrypt.checkpw(secret, stored)


def _parse_line(raw: bytes, hashes: dict[str, bytes], where_defined: dict[str, int],
                number: int) -> str:
    """Add one line's user to `hashes`; return what is wrong with it, or ""."""
    try:
        line = raw.decode("utf-8").rstrip("\r\n\t ")
    except UnicodeDecodeError:
        return "not UTF-8 text"
    if not line.strip() or line.lstrip().startswith("#"):
        return ""
    user, colon, hashed = line.partition(":")
    if not colon:
        return 'expected "user:hash" (as htpasswd -B writes it)'
    if not user or not user.isprintable() or user != user.strip():
        return f"bad user name {user!r}"
    if user in where_defined:
        return f'user "{user}" is already defined on line {where_defined[user]}'
    if not _BCRYPT_SHAPE.fullmatch(hashed):
        return f'user "{user}": {_hash_problem(hashed)}'
    cost = _cost(hashed)
    if not MIN_COST <= cost <= MAX_COST:
        return (f'user "{user}": bcrypt cost {cost} is out of range ({MIN_COST} to '
                f"{MAX_COST}, as htpasswd -B -C takes)")
    if not _BCRYPT.fullmatch(hashed):
        return (f'user "{user}": malformed bcrypt hash (its salt or hash does not decode: '
                f"a character changed?)")
    hashes[user] = hashed.encode("ascii")
    where_defined[user] = number
    return ""


def seconds_per_check(cost: int) -> float:
    """About how long one check at `cost` takes on this machine: a cheap hash timed,
    scaled (each step of the cost doubles the work)."""
    timed_cost = 6
    started = time.perf_counter()
    bcrypt.hashpw(b"timing", bcrypt.gensalt(timed_cost))
    return (time.perf_counter() - started) * 2 ** (cost - timed_cost)


def _cost(hashed: str | bytes) -> int:
    return int(hashed[4:6])  # "$2b$NN$..."


def _hash_problem(hashed: str) -> str:
    for prefix, kind in _OTHER_KINDS:
        if hashed.startswith(prefix):
            return f"{kind} hashes are not supported, only bcrypt: rehash with htpasswd -B"
    if _DES_CRYPT.fullmatch(hashed):
        return "crypt hashes are not supported, only bcrypt: rehash with htpasswd -B"
    if hashed.startswith("$2"):
        return "malformed bcrypt hash"
    return "not a bcrypt hash (plain text?): make it with htpasswd -B"


def _read(path: str) -> bytes:
    """The file's bytes; a FIFO, a directory or a huge file is a problem, not a hang."""
    try:
        return read_small_file(path, _MAX_FILE_BYTES)
    except OSError as exc:
        raise UsersFileError([f"{path}: cannot read: {exc.strerror or exc}"]) from None
    except NotRegularFile:
        raise UsersFileError([f"{path}: not a regular file"]) from None
    except TooLarge:
        raise UsersFileError([f"{path}: larger than {_MAX_FILE_BYTES} bytes"]) from None
