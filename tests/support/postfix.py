"""A throwaway Postfix instance relaying to minismtp: the `postfix` fixture.

Everything of the instance lives in one temporary directory: `conf/` (main.cf, master.cf,
given to every command with `-c`), `queue/` (queue_directory, made by `postfix start`),
`data/` and the log, `postfix.log` (`maillog_file`, written by the `postlog` service).
Its smtpd listens on a free 127.0.0.1 port for the test's injection; its smtp client
relays everything to `relayhost = [127.0.0.1]:<minismtp's port>`. It has no local
domain, no aliases and no chroot; its smtp client uses TLS when told to (`smtp_tls`: may,
encrypt) and logs in with SASL AUTH when given a user and password (`sasl`, kept in
`conf/sasl_passwd`, a texthash: map, which needs no postmap); it leaves the system's
Postfix (if any) alone.

Postfix's SASL client is Cyrus SASL's, whose PLAIN and LOGIN mechanisms are plugins from
another package (Debian's libsasl2-modules). Without them Postfix defers every message
("SASL authentication failed; ... no mechanism available"), which would look like a
minismtp fault, so the fixture checks for them first (`require_sasl_plugins`).

Postfix reads main.cf, or a texthash: map, changed in the last second or so again and
again until it has stayed unchanged for a moment ("pausing to let ... cool down", 0.3 s at
a time): two seconds at `postfix start`, more when the smtp client opens the map. The
fixture writes each whole before Postfix reads it, and dates it a minute back
(`write_settled`).

Postfix starts as root and runs its daemons as `mail_owner = postfix`, the user Debian's
package creates. The fixture stops the instance with `postfix -c conf stop` and then makes
sure none of its processes is left (killing any that are), also when the test fails.
"""

from __future__ import annotations

import glob
import os
import pwd
import re
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from support.neighbours import (INSTALL, end_processes, free_port, missing, process_tree,
                                program, require_root, start_time, wait_for_port)

START_ATTEMPTS = 3  # a free port can be taken between choosing it and binding it
COMMAND_TIMEOUT_S = 60
SETTLED_AGE_S = 60  # past Postfix's "cool down" wait for a file just changed

MAIN_CF = """\
compatibility_level = 3.6
queue_directory = {root}/queue
data_directory = {root}/data
mail_owner = postfix
setgid_group = postdrop
syslog_name = postfix-minismtp-test
maillog_file = {root}/postfix.log
maillog_file_prefixes = {root}
myhostname = relay.test.invalid
mydomain = test.invalid
myorigin = $myhostname
mydestination =
local_recipient_maps =
alias_maps =
alias_database =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
smtpd_relay_restrictions = permit_mynetworks, reject
relayhost = [127.0.0.1]:{relay_port}
smtp_tls_security_level = {smtp_tls}
smtpd_tls_security_level = none
biff = no
"""

# No chroot (column 5 "n"): the daemons need nothing copied into the queue directory.
MASTER_CF = """\
127.0.0.1:{port} inet n - n - - smtpd
pickup    unix  n - n 60 1 pickup
cleanup   unix  n - n -  0 cleanup
qmgr      unix  n - n 300 1 qmgr
rewrite   unix  - - n -  - trivial-rewrite
bounce    unix  - - n -  0 bounce
defer     unix  - - n -  0 bounce
trace     unix  - - n -  0 bounce
verify    unix  - - n -  1 verify
flush     unix  n - n 1000? 0 flush
proxymap  unix  - - n -  - proxymap
smtp      unix  - - n -  - smtp
relay     unix  - - n -  - smtp
showq     unix  n - n -  - showq
error     unix  - - n -  - error
retry     unix  - - n -  - error
discard   unix  - - n -  - discard
anvil     unix  - - n -  1 anvil
scache    unix  - - n -  1 scache
tlsmgr    unix  - - n 1000? 1 tlsmgr
postlog   unix-dgram n - n - 1 postlogd
"""

# The client logs in at the relayhost; its password map is looked up with the relayhost
# as written there. noanonymous only: the default also has noplaintext, which rules out
# PLAIN and LOGIN, the only mechanisms minismtp offers. The password still never goes in
# plaintext: the tests that log in set smtp_tls_security_level = encrypt (and minismtp
# offers AUTH only after STARTTLS unless a listener has allow_plaintext).
SASL_MAIN_CF = """\
smtp_sasl_auth_enable = yes
smtp_sasl_password_maps = texthash:{root}/conf/sasl_passwd
smtp_sasl_security_options = noanonymous
"""

# Where Debian (multiarch) and other builds of Cyrus SASL look for their plugins.
SASL_PLUGIN_GLOBS = ("/usr/lib/*/sasl2/lib{}.so*", "/usr/lib/sasl2/lib{}.so*",
                     "/usr/lib64/sasl2/lib{}.so*")
SASL_MECHANISMS = ("plain", "login")

QUEUES = ("maildrop", "incoming", "active", "deferred", "hold")
SENT = re.compile(r"status=sent \(250 2\.0\.0 Ok: queued as (\S+)\)")


def write_settled(path: Path, text: str, mode: int = 0o644) -> None:
    """Write a file Postfix reads, dated SETTLED_AGE_S back so that it reads it at once."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(path, mode)  # os.open's mode is for a new file, and the umask masks it
    written = time.time() - SETTLED_AGE_S
    os.utime(path, (written, written))


def require_sasl_plugins() -> None:
    """Cyrus SASL's PLAIN and LOGIN client plugins are installed, or the test is failed
    (CI) or skipped."""
    absent = [name for name in SASL_MECHANISMS
              if not any(glob.glob(pattern.format(name)) for pattern in SASL_PLUGIN_GLOBS)]
    if absent:
        missing(f"libsasl2-modules is not installed (Cyrus SASL's "
                f"{' and '.join(n.upper() for n in absent)} plugins, which Postfix's SASL "
                f"client needs, are missing); {INSTALL}")


class Postfix:
    def __init__(self, root: Path, relay_port: int, smtp_tls: str = "none",
                 main_cf: str = "", sasl: tuple[str, str] | None = None) -> None:
        self.root = root
        self.smtp_tls = smtp_tls  # smtp_tls_security_level of its client: none, may, encrypt
        self.extra_main_cf = main_cf  # more lines for main.cf
        self.sasl = sasl  # (user, password) its client logs in with at the relayhost
        self.conf = root / "conf"
        self.relay_port = relay_port
        self.port = 0
        self.log_path = root / "postfix.log"
        self.tree: dict[int, int] = {}
        self.started = False

    def _postfix(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([program("postfix"), "-c", str(self.conf), *args],
                              stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=COMMAND_TIMEOUT_S)

    def start(self) -> Postfix:
        for sub in ("conf", "queue", "data"):
            (self.root / sub).mkdir(exist_ok=True)
        owner = pwd.getpwnam("postfix")
        (self.root / "data").chmod(0o700)
        os.chown(self.root / "data", owner.pw_uid, owner.pw_gid)
        main_cf = MAIN_CF.format(root=self.root, relay_port=self.relay_port,
                                 smtp_tls=self.smtp_tls)
        if self.sasl is not None:
            self.write_sasl_passwd(*self.sasl)
            main_cf += SASL_MAIN_CF.format(root=self.root)
        write_settled(self.conf / "main.cf", main_cf + self.extra_main_cf)
        failures = []
        for _ in range(START_ATTEMPTS):
            self.port = free_port()
            (self.conf / "master.cf").write_text(MASTER_CF.format(port=self.port))
            result = self._postfix("start")
            self.started = True
            self.remember_processes()
            if result.returncode == 0 and wait_for_port(self.port, 15):
                return self
            failures.append(f"exit {result.returncode}: {result.stderr.strip()}")
            self.stop()
        raise AssertionError(f"Postfix did not start: {failures}\n{self.log()[-3000:]}")

    def write_sasl_passwd(self, user: str, password: str) -> None:
        """The password map: one line, keyed by the relayhost exactly as main.cf names it
        (`[host]:port`); the value is everything after the key, so the password may hold
        spaces (not a newline). Readable by root only, as a real one should be: the smtp
        client opens it before it drops privileges."""
        if any(c in user + password for c in "\r\n") or ":" in user:
            raise ValueError("a texthash: map line cannot hold that user or password")
        write_settled(self.conf / "sasl_passwd",
                      f"[127.0.0.1]:{self.relay_port} {user}:{password}\n", 0o600)

    def postqueue(self) -> str:
        """`postqueue -p` of the instance: what waits in its queues, and why."""
        result = subprocess.run([program("postqueue"), "-c", str(self.conf), "-p"],
                                stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                timeout=COMMAND_TIMEOUT_S)
        assert result.returncode == 0, f"postqueue -p: exit {result.returncode}: " \
                                       f"{result.stderr}"
        return result.stdout

    def master_pid(self) -> int | None:
        try:
            return int((self.root / "queue" / "pid" / "master.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def remember_processes(self) -> None:
        """Note the master and its children now: once the master is gone they are
        re-parented, and only this record still tells them apart."""
        pid = self.master_pid()
        if pid is not None and start_time(pid) is not None:
            self.tree.update(process_tree(pid))

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def sent_ids(self) -> list[str]:
        """minismtp's queue ids from the log's status=sent lines, one per delivery."""
        return SENT.findall(self.log())

    def queued(self) -> list[Path]:
        """Message files still in the instance's queues."""
        files = []
        for queue in QUEUES:
            directory = self.root / "queue" / queue
            if directory.is_dir():
                files += [p for p in directory.rglob("*") if p.is_file()]
        return files

    def stop(self) -> list[int]:
        """Stop the instance; returns the pids that had to be killed (none, normally)."""
        if not self.started:
            return []
        self.remember_processes()
        self._postfix("stop")
        self.started = False
        return end_processes(self.tree, timeout=20)


@pytest.fixture
def postfix(shared_tmp: Path) -> Iterator[Callable[[int], Postfix]]:
    """`postfix(relay_port, smtp_tls="none", main_cf="", sasl=None)` starts an instance
    relaying to 127.0.0.1:relay_port, with `main_cf` lines added to its main.cf, logging
    in there as `sasl = (user, password)` if given."""
    require_root("Postfix")
    program("postfix")
    try:
        pwd.getpwnam("postfix")
    except KeyError:
        missing("no `postfix` user (the postfix package creates it)")
    instances: list[Postfix] = []

    def start(relay_port: int, smtp_tls: str = "none", main_cf: str = "",
              sasl: tuple[str, str] | None = None) -> Postfix:
        if sasl is not None:
            require_sasl_plugins()
        root = shared_tmp / f"postfix{len(instances)}"
        root.mkdir()
        instance = Postfix(root, relay_port, smtp_tls, main_cf, sasl)
        instances.append(instance)
        return instance.start()

    yield start
    for instance in instances:
        killed = instance.stop()
        assert not killed, f"Postfix processes still running after stop: {killed}"
