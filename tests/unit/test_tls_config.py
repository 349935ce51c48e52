"""TLS in the configuration: listener entries, tls.* keys, the checks check-config makes
on certificate files, and the server context built from them (minismtp/tls.py)."""

from __future__ import annotations

import datetime
import os
import pathlib
import socket
import ssl
from pathlib import Path

import pytest
import yaml

trustme = pytest.importorskip("trustme")

from minismtp import tls  # noqa: E402
from minismtp.cli import main  # noqa: E402
from minismtp.config import (  # noqa: E402
    CertificatePair, ConfigError, ListenAddress, Listener, TlsConfig, dump_config, load_config,
)
from support.configfiles import problems_of  # noqa: E402


@pytest.fixture(scope="module")
def ca():
    return trustme.CA()


def write_pair(directory: Path, cert, name: str) -> tuple[str, str]:
    cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
    cert.cert_chain_pems[0].write_to_path(str(cert_path))
    cert.private_key_pem.write_to_path(str(key_path))
    return str(cert_path), str(key_path)


@pytest.fixture
def pair(tmp_path, ca):
    return write_pair(tmp_path, ca.issue_cert("mx.test"), "ecdsa")


@pytest.fixture
def rsa_pair(tmp_path, ca):
    return write_pair(tmp_path, ca.issue_cert("mx.test", key_type=trustme.KeyType.RSA), "rsa")


def config_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "minismtp.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def with_certs(tmp_path: Path, pair: tuple[str, str], listen: str, extra: str = "") -> Path:
    cert, key = pair
    return config_file(tmp_path, f"""\
server:
  listen:
{listen}
tls:
  certificates:
    - {{cert: "{cert}", key: "{key}"}}
{extra}""")


V4 = socket.AF_INET


# --- listeners ---------------------------------------------------------------------


def test_listeners_without_certificates_are_plaintext():
    config = load_config(overrides={"server.listen": ["127.0.0.1:2525", "[::1]:25"]})
    assert [listener.tls for listener in config.server.listen] == ["none", "none"]
    assert config.tls == TlsConfig()


def test_listener_entries_strings_and_mappings(tmp_path, pair):
    path = with_certs(tmp_path, pair, """\
    - "127.0.0.1:2525"
    - address: "127.0.0.1:465"
      tls: implicit
    - address: "127.0.0.1:587"
      tls: starttls
      require_tls: true
    - {address: "127.0.0.1:2526", tls: none}""")
    config = load_config(path)
    assert config.server.listen == (
        Listener(ListenAddress("127.0.0.1", 2525, V4), "starttls"),  # default with certs
        Listener(ListenAddress("127.0.0.1", 465, V4), "implicit"),
        Listener(ListenAddress("127.0.0.1", 587, V4), "starttls", require_tls=True),
        Listener(ListenAddress("127.0.0.1", 2526, V4), "none"),
    )
    # What binds and names a listener sees its address.
    first = config.server.listen[1]
    assert (first.host, first.port, first.family, str(first)) == (
        "127.0.0.1", 465, V4, "127.0.0.1:465")
    assert config.tls.certificates == (CertificatePair(*pair),)


def test_dump_round_trips_listeners_and_tls(tmp_path, pair, rsa_pair):
    path = with_certs(tmp_path, pair, """\
    - "127.0.0.1:2525"
    - {address: "127.0.0.1:465", tls: implicit}
    - {address: "127.0.0.1:587", require_tls: true}
    - {address: "127.0.0.1:2526", tls: none}""", f"""\
    - {{cert: "{rsa_pair[0]}", key: "{rsa_pair[1]}"}}
  min_version: TLSv1.3
  ciphers: "ECDHE+AESGCM"
  session_tickets: 0
limits:
  tls_handshake_timeout: 5s
""")
    config = load_config(path)
    text = dump_config(config)
    document = yaml.safe_load(text)
    assert document["server"]["listen"] == [
        "127.0.0.1:2525",
        {"address": "127.0.0.1:465", "tls": "implicit"},
        {"address": "127.0.0.1:587", "tls": "starttls", "require_tls": True},
        {"address": "127.0.0.1:2526", "tls": "none"},
    ]
    assert document["tls"] == {
        "certificates": [{"cert": pair[0], "key": pair[1]},
                         {"cert": rsa_pair[0], "key": rsa_pair[1]}],
        "min_version": "TLSv1.3", "ciphers": "ECDHE+AESGCM", "session_tickets": 0}
    assert document["limits"]["tls_handshake_timeout"] == "5s"
    assert load_config(config_file(tmp_path, text)) == config


def test_dump_without_certificates_keeps_plain_strings():
    config = load_config(overrides={"server.listen": ["127.0.0.1:2525"]})
    assert yaml.safe_load(dump_config(config))["server"]["listen"] == ["127.0.0.1:2525"]


LISTENER_PROBLEMS = [
    ('- {address: "127.0.0.1:25", tsl: implicit}',
     'server.listen[0].tsl: unknown key (did you mean "tls"?)'),
    ('- {address: "127.0.0.1:25", tls: yes}',
     'server.listen[0].tls: must be one of "none", "starttls", "implicit", got true'),
    ('- {address: "127.0.0.1:25", tls: STARTTLS}',
     'server.listen[0].tls: must be one of "none", "starttls", "implicit", got "STARTTLS"'),
    ('- {address: "127.0.0.1:25", require_tls: "yes"}',
     'server.listen[0].require_tls: must be true or false, got "yes"'),
    ("- {tls: implicit}", 'server.listen[0]: missing key "address"'),
    ('- {address: "127.0.0.1"}',
     'server.listen[0].address: missing port (use "host:port" or "[v6addr]:port"), '
     'got "127.0.0.1"'),
    ('- "127.0.0.1:25"\n    - {address: "127.0.0.1:25", tls: none}',
     'server.listen[1]: duplicate address, got "127.0.0.1:25"'),
]


@pytest.mark.parametrize("entries, problem", LISTENER_PROBLEMS)
def test_listener_problems(tmp_path, entries, problem):
    assert problems_of(config_file(tmp_path, f"server:\n  listen:\n    {entries}\n")) == [problem]


@pytest.mark.parametrize("mode", ["starttls", "implicit"])
def test_tls_mode_without_certificates_names_the_key(tmp_path, mode):
    path = config_file(tmp_path, f"""\
server:
  listen:
    - "127.0.0.1:25"
    - {{address: "127.0.0.1:465", tls: {mode}}}
""")
    assert problems_of(path) == [f'server.listen[1].tls: "{mode}" needs tls.certificates']


def test_require_tls_needs_starttls(tmp_path, pair):
    path = with_certs(tmp_path, pair, '    - {address: "127.0.0.1:25", tls: none, '
                                      "require_tls: true}")
    assert problems_of(path) == ["server.listen[0].require_tls: needs tls: starttls"]


# --- tls.* ---------------------------------------------------------------------------


TLS_KEY_PROBLEMS = [
    ("min_version: TLSv1.1",
     'tls.min_version: must be one of "TLSv1.2", "TLSv1.3", got "TLSv1.1"'),
    ("ciphers: ''", 'tls.ciphers: must be an OpenSSL cipher string of printable ASCII or null, '
                     'got ""'),
    ("session_tickets: -1", "tls.session_tickets: must be an integer from 0 to 16, got -1"),
    ("certificates: a.pem", 'tls.certificates: must be a list of {cert, key} mappings, '
                            'got "a.pem"'),
    ("certificates: [a.pem]",
     'tls.certificates[0]: must be a mapping with cert and key, got "a.pem"'),
    ("certificates: [{cert: a.pem}]", 'tls.certificates[0]: missing key "key"'),
    ("certificates: [{cert: a.pem, key: a.key, chain: c.pem}]",
     "tls.certificates[0].chain: unknown key"),
    ("certificates: [{cert: a.pem, kee: a.key}]",
     'tls.certificates[0].kee: unknown key (did you mean "key"?)'),
    ("certfiicates: []", 'tls.certfiicates: unknown key (did you mean "certificates"?)'),
]


@pytest.mark.parametrize("line, problem", TLS_KEY_PROBLEMS)
def test_tls_key_problems(tmp_path, line, problem):
    problems = problems_of(config_file(tmp_path, f"tls:\n  {line}\n"))
    assert problem in problems


def test_unreadable_files_are_named(tmp_path):
    missing = tmp_path / "missing.pem"
    path = config_file(tmp_path, f'tls:\n  certificates:\n    - {{cert: "{missing}", '
                                 f'key: "{missing}.key"}}\n')
    assert problems_of(path) == [
        f'tls.certificates[0].cert: cannot read "{missing}": No such file or directory',
        f'tls.certificates[0].key: cannot read "{missing}.key": No such file or directory',
    ]


def test_a_fifo_or_a_directory_is_named_not_waited_on(tmp_path):
    """A FIFO named as a key would hang check-config, the start, or the master on HUP."""
    import signal

    fifo = tmp_path / "key.pem"
    os.mkfifo(fifo)
    path = config_file(tmp_path, f'tls:\n  certificates:\n    - {{cert: "{tmp_path}", '
                                 f'key: "{fifo}"}}\n')

    def hung(signum, frame):
        raise AssertionError("still waiting on the FIFO after 10 s")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(10)
    try:
        problems = problems_of(path)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert problems == [
        f'tls.certificates[0].cert: cannot read "{tmp_path}": Is a directory',
        f'tls.certificates[0].key: cannot read "{fifo}": not a regular file',
    ]


@pytest.mark.parametrize("other_type", [False, True])
def test_key_that_does_not_fit_its_certificate(tmp_path, ca, pair, rsa_pair, other_type):
    if other_type:
        key = rsa_pair[1]
    else:
        key = write_pair(tmp_path, ca.issue_cert("mx.test"), "other")[1]
    path = config_file(tmp_path, f'tls:\n  certificates:\n    - {{cert: "{pair[0]}", '
                                 f'key: "{key}"}}\n')
    assert problems_of(path) == [
        f'tls.certificates[0].key: "{key}" is not the key of "{pair[0]}"']


def test_a_chain_in_the_wrong_order_is_named_so(tmp_path, ca):
    """The issuer's certificate first, then the server's: OpenSSL takes the first for the
    server's and finds the key does not fit it; the key fits the second."""
    leaf = ca.create_child_ca().issue_cert("mx.test")
    cert, key = tmp_path / "chain.crt", tmp_path / "leaf.key"
    cert.write_bytes(b"".join(pem.bytes() for pem in reversed(leaf.cert_chain_pems)))
    leaf.private_key_pem.write_to_path(str(key))
    path = config_file(tmp_path, f'tls:\n  certificates:\n    - {{cert: "{cert}", '
                                 f'key: "{key}"}}\n')
    assert problems_of(path) == [
        f'tls.certificates[0].cert: "{cert}" begins with another certificate than the one '
        f'"{key}" is the key of: the server\'s own certificate must come first, then the '
        "ones that issued it"]
    cert.write_bytes(b"".join(pem.bytes() for pem in leaf.cert_chain_pems))  # the right order
    assert load_config(path).tls.certificates == (CertificatePair(str(cert), str(key)),)


@pytest.mark.parametrize("first", ["rsa", "ecdsa"])
def test_a_key_that_fits_another_pairs_certificate_is_refused(tmp_path, pair, rsa_pair,
                                                              first, capsys):
    """The first pair names the second pair's key: in the shared context that key would
    fit the second certificate, its type's slot, and leave the first with none (clients
    of its type then fail the handshake). Each pair is checked alone."""
    pairs = {"rsa": rsa_pair, "ecdsa": pair}
    mine, other = pairs[first], pairs["ecdsa" if first == "rsa" else "rsa"]
    path = config_file(tmp_path, f"""\
tls:
  certificates:
    - {{cert: "{mine[0]}", key: "{other[1]}"}}
    - {{cert: "{other[0]}", key: "{other[1]}"}}
""")
    problem = f'tls.certificates[0].key: "{other[1]}" is not the key of "{mine[0]}"'
    assert problems_of(path) == [problem]
    assert main(["check-config", "--config", str(path)]) == 2
    assert capsys.readouterr().err == f"minismtp: {problem}\n"
    with pytest.raises(ConfigError) as info:
        tls.server_context(TlsConfig((CertificatePair(mine[0], other[1]),
                                      CertificatePair(*other))))
    assert info.value.problems == [problem]


def test_files_that_are_not_pem(tmp_path, pair):
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    path = config_file(tmp_path, f'tls:\n  certificates:\n    - {{cert: "{junk}", '
                                 f'key: "{pair[1]}"}}\n    - {{cert: "{pair[0]}", '
                                 f'key: "{junk}"}}\n')
    assert problems_of(path) == [
        f'tls.certificates[0].cert: no PEM certificate in "{junk}"',
        f'tls.certificates[1].key: no PEM private key (unencrypted) in "{junk}"',
    ]


def test_bad_cipher_string(tmp_path, pair):
    path = with_certs(tmp_path, pair, '    - "127.0.0.1:25"', '  ciphers: "NO-SUCH-CIPHER"\n')
    assert problems_of(path) == [
        'tls.ciphers: selects no cipher OpenSSL knows, got "NO-SUCH-CIPHER"']


def test_a_tls_1_3_suite_in_tls_ciphers_is_named_as_one(tmp_path, pair):
    """TLS 1.3 suites are OpenSSL's: a cipher string cannot set them. Alone such a name
    selects nothing; beside TLS 1.2 names OpenSSL skips it, and TLS 1.3 is not narrowed."""
    for ciphers in ("TLS_AES_128_GCM_SHA256", "ECDHE+AESGCM:!TLS_CHACHA20_POLY1305_SHA256"):
        name = ciphers.rpartition("!")[2] if "!" in ciphers else ciphers
        for version in ("TLSv1.2", "TLSv1.3"):
            path = with_certs(tmp_path, pair, '    - "127.0.0.1:25"',
                              f'  min_version: {version}\n  ciphers: "{ciphers}"\n')
            assert problems_of(path) == [
                f'tls.ciphers: "{name}" is a TLS 1.3 suite; TLS 1.3 suites are OpenSSL\'s '
                "own, not set by tls.ciphers, which names TLS 1.2 ciphers only, got "
                f'"{ciphers}"']


def no_tls_1_2_cipher(ciphers: str, kinds: str) -> str:
    return (f'tls.ciphers: "{ciphers}" leaves TLS 1.2 clients no cipher usable with the '
            f"certificates ({kinds}); only TLS 1.3 clients would get through (TLS 1.3 "
            "suites are OpenSSL's, not set here)")


@pytest.mark.parametrize("ciphers, kinds", [
    ("eNULL", "ECDSA"),  # no encryption: below the default security level
    ("aRSA", "ECDSA"),  # RSA-signed ciphers, an ECDSA certificate only
    ("aECDSA", "RSA"),
    ("DHE-RSA-AES128-GCM-SHA256", "RSA"),  # DHE: the server has no DH parameters
])
def test_ciphers_that_leave_tls_1_2_clients_nothing_are_refused(tmp_path, pair, rsa_pair,
                                                                 ciphers, kinds):
    """Every TLS 1.2 client would fail its handshake (a handshake failure alert) while TLS
    1.3 works: check-config proves a TLS 1.2 handshake with the context it built."""
    chosen = pair if kinds == "ECDSA" else rsa_pair
    path = with_certs(tmp_path, chosen, '    - "127.0.0.1:25"', f'  ciphers: "{ciphers}"\n')
    assert problems_of(path) == [no_tls_1_2_cipher(ciphers, kinds)]


def test_every_key_type_without_a_tls_1_2_cipher_is_named(pair, rsa_pair):
    config = TlsConfig((CertificatePair(*rsa_pair), CertificatePair(*pair)), ciphers="aNULL")
    with pytest.raises(ConfigError) as info:
        tls.server_context(config)
    assert info.value.problems == [no_tls_1_2_cipher("aNULL", "RSA, ECDSA")]


@pytest.mark.parametrize("ciphers, pairs, cipher", [
    ("aRSA", "ecdsa rsa", "ECDHE-RSA-AES256-GCM-SHA384"),  # the RSA pair serves TLS 1.2
    ("ECDHE-ECDSA-AES128-GCM-SHA256", "ecdsa", "ECDHE-ECDSA-AES128-GCM-SHA256"),
    ("eNULL:@SECLEVEL=0", "rsa", "ECDHE-RSA-NULL-SHA"),  # asked for by name: it works
    (None, "ecdsa", "ECDHE-ECDSA-AES256-GCM-SHA384"),
])
def test_ciphers_a_certificate_can_serve_are_accepted(pair, rsa_pair, client_context,
                                                      ciphers, pairs, cipher):
    chosen = tuple(CertificatePair(*{"ecdsa": pair, "rsa": rsa_pair}[name])
                   for name in pairs.split())
    context = tls.server_context(TlsConfig(chosen, "TLSv1.2", ciphers))
    client_context.maximum_version = ssl.TLSVersion.TLSv1_2
    client_context.set_ciphers("ALL:COMPLEMENTOFALL:@SECLEVEL=0")
    assert handshake_with(context, client_context).cipher()[0] == cipher


def test_with_tls_1_3_only_a_cipher_string_is_not_probed(pair):
    """No TLS 1.2 client is let in: nothing to prove of the TLS 1.2 ciphers."""
    context = tls.server_context(TlsConfig((CertificatePair(*pair),), "TLSv1.3", "aRSA"))
    assert context.minimum_version == ssl.TLSVersion.TLSv1_3


def test_reload_keeps_the_old_context_when_tls_1_2_would_have_no_cipher(pair, caplog):
    current = tls.server_context(TlsConfig((CertificatePair(*pair),)))
    assert tls.reloaded_context(current, TlsConfig((CertificatePair(*pair),),
                                                   ciphers="aRSA")) is current
    assert no_tls_1_2_cipher("aRSA", "ECDSA") in caplog.text
    assert "keeping the previous" in caplog.text


def test_expired_certificate_is_a_warning(tmp_path, ca, capsys):
    past = datetime.datetime(2020, 1, 1, tzinfo=datetime.timezone.utc)
    old = write_pair(tmp_path, ca.issue_cert("mx.test", not_before=past,
                                             not_after=past + datetime.timedelta(days=1)), "old")
    path = with_certs(tmp_path, old, '    - "127.0.0.1:25"')
    config = load_config(path)
    assert config.warnings == (
        f'tls.certificates[0].cert: "{old[0]}" expired on Jan  2 00:00:00 2020 GMT',)
    assert main(["check-config", "--config", str(path)]) == 0
    assert capsys.readouterr().err == f"minismtp: warning: {config.warnings[0]}\n"


def test_a_key_type_left_without_tls_1_2_ciphers_is_a_warning(tmp_path, pair, rsa_pair,
                                                               capsys, caplog):
    """aRSA with an ECDSA and an RSA pair: accepted (the RSA pair serves TLS 1.2), but the
    ECDSA certificate serves TLS 1.3 clients only: check-config and a reload say so."""
    cert, key = pair
    path = with_certs(tmp_path, rsa_pair, '    - "127.0.0.1:25"',
                      f'    - {{cert: "{cert}", key: "{key}"}}\n  ciphers: "aRSA"\n')
    warning = ('tls.ciphers: "aRSA" leaves the ECDSA certificate no TLS 1.2 cipher: it '
               "serves TLS 1.3 clients only, and a TLS 1.2 client that offers only ECDSA "
               "ciphers fails its handshake")
    config = load_config(path)
    assert config.warnings == (warning,)
    assert main(["check-config", "--config", str(path)]) == 0
    assert capsys.readouterr().err == f"minismtp: warning: {warning}\n"
    current = tls.server_context(config.tls)
    assert tls.reloaded_context(current, config.tls) is not current
    assert warning in caplog.text


@pytest.mark.parametrize("ciphers, version, pairs", [
    (None, "TLSv1.2", "ecdsa rsa"),  # OpenSSL's default: both types served
    ("aRSA", "TLSv1.3", "ecdsa rsa"),  # no TLS 1.2 client to serve
    ("aRSA", "TLSv1.2", "rsa"),  # one type, served
])
def test_no_key_type_warning_where_each_type_is_served(pair, rsa_pair, ciphers, version,
                                                       pairs):
    chosen = tuple(CertificatePair(*{"ecdsa": pair, "rsa": rsa_pair}[name])
                   for name in pairs.split())
    config = TlsConfig(chosen, version, ciphers)
    assert tls.tls12_warnings(tls.server_context(config), config) == []


def test_certificate_not_yet_valid_is_a_warning(tmp_path, ca):
    future = datetime.datetime(2100, 1, 1, tzinfo=datetime.timezone.utc)
    early = write_pair(tmp_path, ca.issue_cert("mx.test", not_before=future,
                                               not_after=future + datetime.timedelta(days=9)),
                       "early")
    config = load_config(with_certs(tmp_path, early, '    - "127.0.0.1:25"'))
    assert config.warnings == (
        f'tls.certificates[0].cert: "{early[0]}" is not valid before Jan  1 00:00:00 2100 GMT',)


def test_a_second_pair_of_one_key_type_is_warned_of(tmp_path, ca, pair, rsa_pair):
    """OpenSSL keeps one certificate per key type, the first listed: another RSA pair
    (for another domain, say; there is no SNI) would never be served."""
    other = write_pair(tmp_path, ca.issue_cert("other.test", key_type=trustme.KeyType.RSA),
                       "other")
    pairs = [rsa_pair, pair, other]
    config = TlsConfig(tuple(CertificatePair(*p) for p in pairs))
    assert tls.certificate_warnings(config) == [
        "tls.certificates[2]: a second RSA pair, never used: tls.certificates[0] serves every "
        "RSA client (one pair per key type)"]
    assert tls.certificate_warnings(TlsConfig(tuple(CertificatePair(*p)
                                                    for p in pairs[:2]))) == []


def test_a_long_blank_run_in_a_key_file_is_read_at_once(tmp_path, rsa_pair):
    """A stray BEGIN line, 200,000 blank lines, then the key (OpenSSL loads it): telling
    the key type must not take the square of the run (a master hung on HUP)."""
    import signal

    key = tmp_path / "padded.key"
    key.write_bytes(b"-----BEGIN PRIVATE KEY-----" + b"\n" * 200_000
                    + pathlib.Path(rsa_pair[1]).read_bytes())

    def hung(signum, frame):
        raise AssertionError("still reading the key file after 10 s")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(10)
    try:
        assert tls._key_type(str(key)) == "RSA"  # the key after the stray line
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_check_config_exits_2_with_one_line_per_problem(tmp_path, pair, rsa_pair, capsys):
    path = config_file(tmp_path, f"""\
server:
  listen: [{{address: "127.0.0.1:465", tls: implicit, nope: 1}}]
tls:
  certificates:
    - {{cert: "{pair[0]}", key: "{rsa_pair[1]}"}}
""")
    assert main(["check-config", "--config", str(path)]) == 2
    assert capsys.readouterr().err == (
        "minismtp: server.listen[0].nope: unknown key\n")
    path = with_certs(tmp_path, (pair[0], rsa_pair[1]), '    - "127.0.0.1:25"',
                      '  ciphers: "NO-SUCH-CIPHER"\n')
    assert main(["check-config", "--config", str(path)]) == 2
    assert capsys.readouterr().err == (
        f'minismtp: tls.certificates[0].key: "{rsa_pair[1]}" is not the key of "{pair[0]}"\n'
        'minismtp: tls.ciphers: selects no cipher OpenSSL knows, got "NO-SUCH-CIPHER"\n')


# --- the context ------------------------------------------------------------------------


def test_server_context_settings(pair):
    context = tls.server_context(TlsConfig((CertificatePair(*pair),), "TLSv1.3", None, 3))
    assert context.minimum_version == ssl.TLSVersion.TLSv1_3
    assert context.num_tickets == 3
    assert context.verify_mode == ssl.CERT_NONE
    for option in (ssl.OP_NO_COMPRESSION, ssl.OP_CIPHER_SERVER_PREFERENCE,
                   getattr(ssl, "OP_NO_RENEGOTIATION", 0)):
        assert context.options & option == option
    assert not context.options & ssl.OP_NO_TICKET


def test_no_session_tickets_means_none_in_tls_1_2_either(pair):
    context = tls.server_context(TlsConfig((CertificatePair(*pair),), "TLSv1.2", None, 0))
    assert context.num_tickets == 0 and context.options & ssl.OP_NO_TICKET


def handshake_with(context: ssl.SSLContext, client: ssl.SSLContext,
                   session: ssl.SSLSession | None = None) -> ssl.SSLObject:
    """A whole handshake in memory; the client object once done (and its first read, so
    that TLS 1.3 tickets arrive)."""
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    server = context.wrap_bio(s_in, s_out, server_side=True)
    peer = client.wrap_bio(c_in, c_out, server_hostname="mx.test", session=session)
    done = [False, False]
    for _ in range(20):
        for index, side in enumerate((peer, server)):
            if not done[index]:
                try:
                    side.do_handshake()
                    done[index] = True
                except ssl.SSLWantReadError:
                    pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if all(done):
            server.write(b"220 x\r\n")
            c_in.write(s_out.read())
            assert peer.read(100) == b"220 x\r\n"
            return peer
    raise AssertionError("no handshake")


@pytest.fixture
def client_context(ca):
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


def test_ecdsa_and_rsa_pairs_serve_each_client_its_kind(pair, rsa_pair, client_context):
    context = tls.server_context(TlsConfig((CertificatePair(*pair), CertificatePair(*rsa_pair))))
    client_context.maximum_version = ssl.TLSVersion.TLSv1_2
    client_context.set_ciphers("ECDHE-RSA-AES128-GCM-SHA256")
    peer = handshake_with(context, client_context)
    assert "RSA" in peer.cipher()[0]
    client_context.set_ciphers("ECDHE-ECDSA-AES128-GCM-SHA256")
    peer = handshake_with(context, client_context)
    assert "ECDSA" in peer.cipher()[0]


def test_sessions_resume_with_the_shared_context(pair, client_context):
    """What every forked worker inherits: one context, one set of ticket keys."""
    context = tls.server_context(TlsConfig((CertificatePair(*pair),)))
    first = handshake_with(context, client_context)
    assert not first.session_reused and first.session is not None
    second = handshake_with(context, client_context, session=first.session)
    assert second.session_reused


def test_describe(pair, client_context):
    context = tls.server_context(TlsConfig((CertificatePair(*pair),)))
    peer = handshake_with(context, client_context)
    name, _, bits = peer.cipher()
    assert tls.describe(peer) == f"TLSv1.3 with cipher {name} ({bits}/{bits} bits)"


def test_reload_keeps_the_old_context_when_the_new_pair_is_broken(pair, rsa_pair, caplog):
    good = TlsConfig((CertificatePair(*pair),))
    current = tls.server_context(good)
    broken = TlsConfig((CertificatePair(pair[0], rsa_pair[1]),))
    assert tls.reloaded_context(current, broken) is current
    assert "is not the key of" in caplog.text and "keeping the previous" in caplog.text
    fresh = tls.reloaded_context(current, TlsConfig((CertificatePair(*rsa_pair),)))
    assert fresh is not current and isinstance(fresh, ssl.SSLContext)
    assert tls.reloaded_context(current, TlsConfig()) is None


def test_reload_with_no_context_to_keep_refuses_a_broken_pair(pair, rsa_pair):
    """The first certificates a reload brings cannot be loaded: no context to fall back
    on, so the reload is refused rather than its TLS listeners served in plaintext."""
    broken = TlsConfig((CertificatePair(pair[0], rsa_pair[1]),))
    with pytest.raises(ConfigError, match="is not the key of"):
        tls.reloaded_context(None, broken)


def test_sessions_resume_across_forked_processes(pair, client_context):
    """The context built before fork: a ticket from one child resumes with another (a
    context built in each child would have ticket keys of its own: no resumption)."""
    context = tls.server_context(TlsConfig((CertificatePair(*pair),)))

    def session_via_child(session):
        server_end, client_end = socket.socketpair()
        pid = os.fork()
        if pid == 0:  # the "worker": serve one handshake, then exit without returning
            code = 1
            try:
                client_end.close()
                server_end.settimeout(10)
                with context.wrap_socket(server_end, server_side=True) as secure:
                    secure.sendall(b"220 x\r\n")
                    secure.recv(100)
                code = 0
            finally:
                os._exit(code)
        server_end.close()
        client_end.settimeout(10)
        with client_context.wrap_socket(client_end, server_hostname="mx.test",
                                        session=session) as secure:
            assert secure.recv(100) == b"220 x\r\n"  # the tickets arrive with it
            reused, got = secure.session_reused, secure.session
            secure.sendall(b"QUIT\r\n")
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        return reused, got

    reused, session = session_via_child(None)
    assert not reused
    reused, _ = session_via_child(session)
    assert reused


@pytest.fixture(scope="module")
def weak_pair(tmp_path_factory):
    """A self-signed 1024-bit RSA pair: below OpenSSL's default security level."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "legacy.test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .sign(key, hashes.SHA256()))
    directory = tmp_path_factory.mktemp("weak")
    cert_path, key_path = directory / "weak.crt", directory / "weak.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(cert_path), str(key_path)


def test_a_weak_key_is_refused_by_name_at_the_default_security_level(tmp_path, weak_pair):
    path = with_certs(tmp_path, weak_pair, '    - "127.0.0.1:25"')
    [problem] = problems_of(path)
    assert problem.startswith(f'tls.certificates[0]: "{weak_pair[0]}" is too weak for the '
                              "security level (EE_KEY_TOO_SMALL)"), problem


def test_a_weak_key_loads_where_tls_ciphers_lowers_the_security_level(tmp_path, weak_pair):
    """Each pair is checked alone in a context of its own: that context takes the
    security level from tls.ciphers as the real one does."""
    path = with_certs(tmp_path, weak_pair, '    - "127.0.0.1:25"',
                      '  ciphers: "DEFAULT:@SECLEVEL=0"\n')
    config = load_config(str(path))
    assert tls.server_context(config.tls).cert_store_stats() is not None
