"""A listener's `auth` mapping: parsing, every refusal with its key path, the users file
loaded and checked at load time (check-config names file and line), and dump_config
round trips."""

from __future__ import annotations

import socket
from pathlib import Path

import bcrypt
import pytest
import yaml

from minismtp.cli import main
from minismtp.config import dump_config, load_config
from minismtp.htpasswd import Users
from minismtp.values import ListenAddress, Listener, ListenerAuth
from support.configfiles import problems_of

HASH = bcrypt.hashpw(b"pw", bcrypt.gensalt(4)).decode().replace("$2b$", "$2y$", 1)


def users_file(tmp_path: Path, text: str | None = None) -> str:
    path = tmp_path / "users"
    path.write_text(f"# made by htpasswd -B\nalice:{HASH}\n" if text is None else text)
    return str(path)


def config_file(tmp_path: Path, listen: str) -> Path:
    path = tmp_path / "minismtp.yaml"
    path.write_text(f"server:\n  listen:\n{listen}\n", encoding="utf-8")
    return path


def test_default_is_off():
    config = load_config(overrides={"server.listen": ["127.0.0.1:2525"]})
    assert config.server.listen[0].auth == ListenerAuth()
    assert not config.server.listen[0].auth.offered


def test_htpasswd_listener_loads_its_users(tmp_path):
    users = users_file(tmp_path)
    config = load_config(config_file(tmp_path, f"""\
    - address: "127.0.0.1:2587"
      auth: {{mode: htpasswd, users_file: "{users}", require: true, allow_plaintext: true}}
    - address: "127.0.0.1:2588"
      auth: {{mode: accept_any, allow_plaintext: true}}"""))
    first, second = config.server.listen
    assert first == Listener(ListenAddress("127.0.0.1", 2587, socket.AF_INET), "none",
                             auth=ListenerAuth("htpasswd", users, True, True,
                                               users=Users.load(users)))
    assert first.auth.users.verify("alice", "pw")
    assert second.auth == ListenerAuth("accept_any", allow_plaintext=True)
    assert any("accept_any takes every password" in w for w in config.warnings)


def test_without_bcrypt_an_htpasswd_listener_is_a_problem_not_a_traceback(
        tmp_path, monkeypatch, capsys):
    """Installed without the auth extra: check-config names the key and what to install,
    exit 2."""
    import sys

    monkeypatch.setitem(sys.modules, "bcrypt", None)  # as if it were not installed
    monkeypatch.delitem(sys.modules, "minismtp.htpasswd")
    users = users_file(tmp_path)
    path = config_file(tmp_path, f"""\
    - address: "127.0.0.1:2587"
      auth: {{mode: htpasswd, users_file: "{users}", allow_plaintext: true}}""")
    assert main(["check-config", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "server.listen[0].auth.users_file: checking htpasswd passwords needs the bcrypt " \
        "package (bcrypt is missing): pip install 'minismtp[auth]'" in err
    assert "Traceback" not in err


def test_a_users_file_mixing_bcrypt_costs_is_warned_of(tmp_path):
    """A user whose hash is cheaper than the costliest is refused sooner than a stranger
    (checked against the costliest): the timing tells that user exists."""
    costly = bcrypt.hashpw(b"pw", bcrypt.gensalt(5)).decode()
    users = users_file(tmp_path, f"alice:{HASH}\nbob:{costly}\n")
    listen = (f'    - {{address: "127.0.0.1:2587", auth: {{mode: htpasswd, users_file: '
              f'"{users}", allow_plaintext: true}}}}')
    config = load_config(config_file(tmp_path, listen))
    assert config.warnings == (
        f"server.listen[0].auth.users_file: {users} mixes bcrypt costs 4, 5: a user with a "
        "cheaper hash is refused sooner than one that does not exist, which tells the user "
        "exists; rehash them at one cost (htpasswd -B -C)",)
    assert load_config(config_file(tmp_path, listen.replace(users, users_file(tmp_path)))
                       ).warnings == ()


def test_a_users_file_with_a_slow_cost_is_warned_of(tmp_path, monkeypatch):
    """Every stranger is checked at the costliest hash, on a worker's two checker
    threads: from cost 15 (about a second) AUTH slows for everyone."""
    from minismtp import htpasswd

    monkeypatch.setattr(htpasswd, "seconds_per_check", lambda cost: 0.01 * 2 ** (cost - 8))
    slow = HASH.replace("$04$", "$15$")  # made by hand: no check runs here
    users = users_file(tmp_path, f"alice:{HASH}\nbob:{slow}\n")
    listen = (f'    - {{address: "127.0.0.1:2587", auth: {{mode: htpasswd, users_file: '
              f'"{users}", allow_plaintext: true}}}}')
    warnings = load_config(config_file(tmp_path, listen)).warnings
    assert warnings[1:] == (
        f"server.listen[0].auth.users_file: {users} has bcrypt cost 15: one password check "
        "takes about 1.3 s here, and a worker runs 2 at a time (a stranger's is checked at "
        "the costliest); 10 to 12 is usual (htpasswd -B -C)",)
    fine = users_file(tmp_path, f"alice:{HASH.replace('$04$', '$14$')}\n")
    assert load_config(config_file(tmp_path, listen.replace(users, fine))).warnings == ()


def test_a_users_file_with_cost_31_fails_check_config(tmp_path, capsys):
    users = users_file(tmp_path, f"alice:{HASH.replace('$04$', '$31$')}\n")
    path = config_file(tmp_path, f'    - {{address: "127.0.0.1:2587", auth: {{mode: htpasswd, '
                                 f'users_file: "{users}", allow_plaintext: true}}}}')
    assert main(["check-config", "--config", str(path)]) == 2
    assert capsys.readouterr().err == (
        f'minismtp: server.listen[0].auth.users_file: {users}:1: user "alice": bcrypt cost 31 '
        "is out of range (4 to 17, as htpasswd -B -C takes)\n")


@pytest.mark.parametrize("auth, problem", [
    ("{mode: htpasswd, allow_plaintext: true}",
     "server.listen[0].auth.users_file: needed by mode: htpasswd"),
    ('{mode: accept_any, users_file: "/x", allow_plaintext: true}',
     "server.listen[0].auth.users_file: only for mode: htpasswd"),
    ("{mode: off, require: true}",
     "server.listen[0].auth.require: needs a mode other than off"),
    ("{require: true}", "server.listen[0].auth.require: needs a mode other than off"),
    ("{mode: ldap}",
     'server.listen[0].auth.mode: must be one of "off", "accept_any", "htpasswd", got "ldap"'),
    ("{mode: on}", "server.listen[0].auth.mode: must be one of"),
    ("{mode: accept_any, requires: true}",
     'server.listen[0].auth.requires: unknown key (did you mean "require"?)'),
    ('{mode: accept_any, allow_plaintext: "yes"}',
     'server.listen[0].auth.allow_plaintext: must be true or false, got "yes"'),
    ("htpasswd", "server.listen[0].auth: must be a mapping"),
    ("{mode: accept_any}", "server.listen[0].auth: AUTH is offered only under TLS"),
])
def test_refusals(tmp_path, auth, problem):
    problems = problems_of(config_file(tmp_path, f"""\
    - address: "127.0.0.1:2587"
      auth: {auth}"""))
    assert len(problems) == 1 and problems[0].startswith(problem), problems


def test_users_file_problems_name_file_and_line(tmp_path, capsys):
    users = users_file(tmp_path, f"alice:{HASH}\nbob:$apr1$abcdefgh$0123456789abcdefghijkl\n"
                                 f"alice:{HASH}\n")
    path = config_file(tmp_path, f"""\
    - address: "127.0.0.1:2587"
      auth: {{mode: htpasswd, users_file: "{users}", allow_plaintext: true}}
    - address: "127.0.0.1:2588"
      auth: {{mode: htpasswd, users_file: "{users}", allow_plaintext: true}}""")
    assert problems_of(path)[:2] == [
        f"server.listen[0].auth.users_file: {users}:2: user \"bob\": MD5-crypt ($apr1$) "
        "hashes are not supported, only bcrypt: rehash with htpasswd -B",
        f'server.listen[0].auth.users_file: {users}:3: user "alice" is already defined '
        "on line 1",
    ]
    assert main(["check-config", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{users}:2:" in err and f"{users}:3:" in err


def test_missing_users_file(tmp_path):
    path = config_file(tmp_path, f"""\
    - address: "127.0.0.1:2587"
      auth: {{mode: htpasswd, users_file: "{tmp_path}/nope", allow_plaintext: true}}""")
    assert problems_of(path) == [
        f"server.listen[0].auth.users_file: {tmp_path}/nope: cannot read: "
        "No such file or directory"]


def test_dump_round_trips(tmp_path):
    users = users_file(tmp_path)
    config = load_config(config_file(tmp_path, f"""\
    - "127.0.0.1:2525"
    - address: "127.0.0.1:2587"
      auth: {{mode: htpasswd, users_file: "{users}", require: true, allow_plaintext: true}}
    - address: "127.0.0.1:2588"
      auth: {{mode: accept_any, allow_plaintext: true}}
    - address: "127.0.0.1:2589"
      auth: {{mode: off, allow_plaintext: true}}"""))
    text = dump_config(config)
    assert yaml.safe_load(text)["server"]["listen"] == [
        "127.0.0.1:2525",
        {"address": "127.0.0.1:2587", "tls": "none", "auth": {
            "mode": "htpasswd", "users_file": users, "require": True, "allow_plaintext": True}},
        {"address": "127.0.0.1:2588", "tls": "none",
         "auth": {"mode": "accept_any", "allow_plaintext": True}},
        {"address": "127.0.0.1:2589", "tls": "none",
         "auth": {"mode": "off", "allow_plaintext": True}},
    ]
    again = tmp_path / "again.yaml"
    again.write_text(text)
    assert load_config(again) == config


def test_a_changed_users_file_changes_the_config(tmp_path):
    """A reload compares configurations: new users must make them differ."""
    users = users_file(tmp_path)
    path = config_file(tmp_path, f"""\
    - address: "127.0.0.1:2587"
      auth: {{mode: htpasswd, users_file: "{users}", allow_plaintext: true}}""")
    before = load_config(path)
    assert load_config(path) == before
    users_file(tmp_path, f"alice:{HASH}\nbob:{HASH}\n")
    assert load_config(path) != before


def test_workers_offer_auth_as_each_listener_says(tmp_path):
    """The core's settings per listener (session.protocol_settings), with no TLS context
    at all: AUTH where the listener has it, nowhere else; no "not served" warning."""
    from minismtp.session import protocol_settings
    from minismtp.smtp.protocol import AUTH_MECHANISMS

    config = load_config(config_file(tmp_path, """\
    - address: "127.0.0.1:2587"
      auth: {mode: accept_any, require: true, allow_plaintext: true}
    - "127.0.0.1:2525\""""))
    offering, plain = (protocol_settings(config, entry, tls=False)
                       for entry in config.server.listen)
    assert (offering.auth_mechanisms, offering.auth_plaintext, offering.auth_required) \
        == (AUTH_MECHANISMS, True, True)
    assert not offering.starttls
    assert (plain.auth_mechanisms, plain.auth_required) == ((), False)
    assert not any("not served" in warning for warning in config.warnings)
