"""The server's TLS context: certificates, protocol floor, ciphers, session tickets.

Untrusted input: none from clients here; the certificate and key files named in the
configuration (read, checked and loaded by OpenSSL through `ssl`). Nothing here
implements cryptography: it only configures OpenSSL.

Build the context once, in the master, before forking (`server_context`): every worker
then inherits the same SSL_CTX, hence the same session-ticket keys, so a client that got
a ticket from one worker resumes its session with any other (TLS 1.3 tickets and TLS 1.2
tickets alike). A context built in each worker would have keys of its own, and
resumption would work only when the kernel happened to pick the same worker. A new
generation after a reload gets a new context (`reloaded_context`), hence new keys:
tickets from before the reload then fall back to a full handshake, nothing worse.

All pairs go into one context: OpenSSL keeps one certificate per key type (RSA, ECDSA,
Ed25519) and picks for each client the one its signature algorithms allow. Pairs of one
key type replace each other, so they are loaded last to first: the first listed wins.

With TLS 1.2 allowed, a context is not handed out before a TLS 1.2 handshake has been
completed with it in memory: tls.ciphers is OpenSSL's string, checked by OpenSSL only for
naming something, not for meeting the certificates (TLS 1.3 suites are never set here).
"""

from __future__ import annotations

import binascii
import logging
import re
import ssl
import tempfile
import time

from minismtp.config import ConfigError, TlsConfig
from minismtp.smallfile import NotRegularFile, TooLarge, read_small_file
from minismtp.values import got

__all__ = ["certificate_warnings", "describe", "reloaded_context", "server_context",
           "tls12_warnings"]

log = logging.getLogger("minismtp.master")

_VERSIONS = {"TLSv1.2": ssl.TLSVersion.TLSv1_2, "TLSv1.3": ssl.TLSVersion.TLSv1_3}
_MAX_PEM_BYTES = 1 << 20  # a certificate chain or a key is a few KB
# No renegotiation (a client-driven CPU cost, and the 2009 prefix-injection attacks):
# OpenSSL 1.1.0h and later; TLS 1.3 has none anyway.
_NO_RENEGOTIATION = getattr(ssl, "OP_NO_RENEGOTIATION", 0)


def _no_password() -> bytes:
    # Without a callback, OpenSSL would prompt on the terminal for an encrypted key.
    return b""


def server_context(config: TlsConfig) -> ssl.SSLContext:
    """The server-side context for `config`; ConfigError lists every problem, each
    naming its key (unreadable files, a key that does not fit its certificate, a cipher
    string that selects nothing, or names a TLS 1.3 suite, or with TLS 1.2 allowed leaves
    TLS 1.2 clients no cipher the certificates can serve). No client certificates are
    asked for."""
    problems: list[str] = []
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.verify_mode = ssl.CERT_NONE
    context.minimum_version = _VERSIONS[config.min_version]
    context.options |= (ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
                        | _NO_RENEGOTIATION)
    context.num_tickets = config.session_tickets
    if not config.session_tickets:  # none at all: TLS 1.2's stateless tickets too
        context.options |= ssl.OP_NO_TICKET
    if config.ciphers is not None:
        tls13 = _tls13_suite_in(config.ciphers)
        if tls13 is not None:
            problems.append(f"tls.ciphers: {got(tls13)} is a TLS 1.3 suite; TLS 1.3 suites "
                            "are OpenSSL's own, not set by tls.ciphers, which names TLS 1.2 "
                            f"ciphers only, got {got(config.ciphers)}")
        try:
            context.set_ciphers(config.ciphers)
        except ssl.SSLError:
            if tls13 is None:
                problems.append("tls.ciphers: selects no cipher OpenSSL knows, got "
                                f"{got(config.ciphers)}")
    for index in reversed(range(len(config.certificates))):
        problems[:0] = _load_pair(context, config, index)
    if not config.certificates:
        problems.append("tls.certificates: at least one {cert, key} pair is needed for TLS")
    if not problems and config.min_version == "TLSv1.2":
        problems.extend(_tls12_problems(context, config))
    if problems:
        raise ConfigError(problems)
    return context


# RFC 8446 B.4: OpenSSL takes these through SSL_CTX_set_ciphersuites, which `ssl` does not
# expose; in a cipher string (SSL_CTX_set_cipher_list) they select nothing.
_TLS13_SUITES = frozenset({"TLS_AES_128_GCM_SHA256", "TLS_AES_256_GCM_SHA384",
                           "TLS_CHACHA20_POLY1305_SHA256", "TLS_AES_128_CCM_SHA256",
                           "TLS_AES_128_CCM_8_SHA256"})


def _tls13_suite_in(ciphers: str) -> str | None:
    """The first TLS 1.3 suite named in the cipher string, or None. Beside TLS 1.2 names
    OpenSSL skips it silently: an operator would believe TLS 1.3 narrowed when it is not."""
    for word in re.split(r"[:, ;+]", ciphers):
        if word.lstrip("!-+").upper() in _TLS13_SUITES:
            return word.lstrip("!-+")
    return None


# A pair's key type -> the TLS 1.2 ciphers that authenticate with it (Ed25519 and Ed448
# sign for the ECDSA ones, RSA-PSS for the RSA ones).
_AUTH = {"RSA": "aRSA", "RSA-PSS": "aRSA", "ECDSA": "aECDSA", "Ed25519": "aECDSA",
         "Ed448": "aECDSA"}
_ANY_CIPHER = "ALL:COMPLEMENTOFALL"  # for a key of a type not told apart


def _tls12_problems(context: ssl.SSLContext, config: TlsConfig) -> list[str]:
    """Prove that a TLS 1.2 client can finish a handshake with `context`. Where the
    cipher string and the certificates do not meet (aRSA with only an ECDSA pair; eNULL
    under the default security level; DHE, there being no DH parameters), every TLS 1.2
    client fails with a handshake alert while TLS 1.3 works: a silent half-outage. One
    handshake per key type, the client offering only the ciphers that type signs for;
    the first that succeeds ends it (one handshake, a few ms, when all is well)."""
    kinds = _tls12_kinds(config)
    if any(_tls12_handshake(context, auth) for auth in kinds):
        return []
    named = ", ".join(name for names in kinds.values() for name in names)
    return [f"tls.ciphers: {got(config.ciphers)} leaves TLS 1.2 clients no cipher usable "
            f"with the certificates ({named}); only TLS 1.3 clients would get through "
            "(TLS 1.3 suites are OpenSSL's, not set here)"]


def _tls12_kinds(config: TlsConfig) -> dict[str, list[str]]:
    """The TLS 1.2 ciphers each pair's key type signs for -> those types' names."""
    kinds: dict[str, list[str]] = {}
    for pair in config.certificates:
        kind = _key_type(pair.key)
        names = kinds.setdefault(_AUTH.get(kind, _ANY_CIPHER), [])
        if (kind or "another type") not in names:
            names.append(kind or "another type")
    return kinds


def tls12_warnings(context: ssl.SSLContext, config: TlsConfig) -> list[str]:
    """With pairs of several key types, one line per type that no TLS 1.2 cipher of
    tls.ciphers can serve while another type's can (aRSA with an RSA and an ECDSA pair):
    that pair serves TLS 1.3 clients only, and a TLS 1.2 client offering only ciphers
    for its type fails its handshake. A handshake per type, at check and reload."""
    kinds = _tls12_kinds(config)
    if config.min_version != "TLSv1.2" or len(kinds) < 2:
        return []
    unserved = [auth for auth in kinds if not _tls12_handshake(context, auth)]
    if len(unserved) == len(kinds):
        return []  # none at all: server_context refuses it
    return [f"tls.ciphers: {got(config.ciphers)} leaves the {name} certificate no TLS 1.2 "
            f"cipher: it serves TLS 1.3 clients only, and a TLS 1.2 client that offers "
            f"only {name} ciphers fails its handshake"
            for auth in unserved for name in kinds[auth]]


_HANDSHAKE_ROUNDS = 8  # a TLS 1.2 full handshake takes two round trips


def _tls12_handshake(context: ssl.SSLContext, ciphers: str) -> bool:
    """Whether a TLS 1.2 client offering `ciphers` (weak and null ones too: the server's
    choice is what is tested) completes a handshake with `context`. All in memory, for a
    bounded number of rounds: nothing to wait on, no socket. It runs on the real context,
    at each check and reload (not per connection); its session stays in that context's
    cache like any client's, never to be resumed."""
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.check_hostname = False
    client.verify_mode = ssl.CERT_NONE
    client.minimum_version = client.maximum_version = ssl.TLSVersion.TLSv1_2
    client.set_ciphers(f"{ciphers}:@SECLEVEL=0")
    to_server, to_client = ssl.MemoryBIO(), ssl.MemoryBIO()
    sides = [client.wrap_bio(to_client, to_server),
             context.wrap_bio(to_server, to_client, server_side=True)]
    for _ in range(_HANDSHAKE_ROUNDS):
        for side in list(sides):
            try:
                side.do_handshake()
            except ssl.SSLWantReadError:
                continue
            except ssl.SSLError:
                return False  # no shared cipher, and the client's side of that alert
            sides.remove(side)
        if not sides:
            return True
    return False


def _probe_context(config: TlsConfig) -> ssl.SSLContext:
    """A fresh context to check one pair in alone, as strict as the real one about keys: its
    security level comes from tls.ciphers (`@SECLEVEL=0` lets a legacy 1024-bit key in)."""
    probe = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    if config.ciphers is not None:
        try:
            probe.set_ciphers(config.ciphers)
        except ssl.SSLError:
            pass  # reported for the real context
    return probe


def _load_pair(context: ssl.SSLContext, config: TlsConfig, index: int) -> list[str]:
    pair = config.certificates[index]
    where = f"tls.certificates[{index}]"
    problems = []
    for key, path in (("cert", pair.cert), ("key", pair.key)):
        try:  # a regular file of sane size: a FIFO would hang the master (on HUP too)
            read_small_file(path, _MAX_PEM_BYTES)
        except OSError as exc:
            problems.append(f'{where}.{key}: cannot read "{path}": {exc.strerror or exc}')
        except (NotRegularFile, TooLarge) as exc:
            problems.append(f'{where}.{key}: cannot read "{path}": '
                            f'{exc if isinstance(exc, NotRegularFile) else "too large"}')
    if problems:
        return problems
    try:
        # The pair alone first: in the shared context a key goes to its own type's slot,
        # and matches there the certificate of another pair of that type, while this
        # pair's certificate is left with no key (check_private_key sees only the slot
        # just filled). Alone, a key that is not this certificate's is refused.
        _probe_context(config).load_cert_chain(pair.cert, pair.key, password=_no_password)
        context.load_cert_chain(pair.cert, pair.key, password=_no_password)
    except ssl.SSLError as exc:
        # A key of the certificate's type but another pair's; a key of another type.
        if exc.reason in ("KEY_VALUES_MISMATCH", "NO_CERTIFICATE_ASSIGNED"):
            if _key_fits_a_later_certificate(config, pair):
                return [f'{where}.cert: "{pair.cert}" begins with another certificate than '
                        f'the one "{pair.key}" is the key of: the server\'s own certificate '
                        "must come first, then the ones that issued it"]
            return [f'{where}.key: "{pair.key}" is not the key of "{pair.cert}"']
        if exc.reason in _TOO_WEAK:
            return [f'{where}: "{pair.cert}" is too weak for the security level '
                    f"({exc.reason}): use a larger key or a stronger signature, or lower "
                    'the level in tls.ciphers (e.g. "DEFAULT:@SECLEVEL=0")']
        if _decode_cert(pair.cert) is None:
            return [f'{where}.cert: no PEM certificate in "{pair.cert}"']
        return [f'{where}.key: no PEM private key (unencrypted) in "{pair.key}"']
    return []


_PEM_CERTIFICATE = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----",
                              re.DOTALL)


def _key_fits_a_later_certificate(config: TlsConfig, pair: object) -> bool:
    """Whether the key is that of a certificate after the first in the file: a chain
    written in the wrong order (the CA's first), which OpenSSL reads as a mismatch, the
    first certificate being taken for the server's."""
    try:
        blocks = _PEM_CERTIFICATE.findall(read_small_file(pair.cert, _MAX_PEM_BYTES))
    except (OSError, NotRegularFile, TooLarge):
        return False
    for block in blocks[1:]:
        with tempfile.NamedTemporaryFile(suffix=".pem") as single:  # ssl reads files only
            single.write(block + b"\n")
            single.flush()
            try:
                _probe_context(config).load_cert_chain(single.name, pair.key,
                                                       password=_no_password)
            except ssl.SSLError:
                continue
            return True
    return False


# OpenSSL's reasons for a pair refused by the security level (tls.ciphers' @SECLEVEL).
_TOO_WEAK = frozenset({"EE_KEY_TOO_SMALL", "CA_KEY_TOO_SMALL", "CA_MD_TOO_WEAK"})


def _decode_cert(path: str) -> dict | None:
    """The certificate's fields, or None. `ssl` decodes files only through this private
    helper (CPython's own tests use it); without it, the date checks are skipped."""
    decode = getattr(ssl._ssl, "_test_decode_cert", None)  # type: ignore[attr-defined]
    if decode is None:
        return None
    try:
        return decode(path)
    except (ssl.SSLError, OSError, ValueError):
        return None


def certificate_warnings(config: TlsConfig, now: float | None = None) -> list[str]:
    """One line per certificate past its notAfter or before its notBefore: an expired
    certificate still encrypts (most MTAs do not verify), so it warns, not refuses. One
    per pair whose key type an earlier pair has: OpenSSL keeps one certificate per key
    type, the first listed here, and there is no choosing by name (SNI)."""
    now = time.time() if now is None else now
    warnings = []
    first_of_type: dict[str, int] = {}
    for index, pair in enumerate(config.certificates):
        kind = _key_type(pair.key)
        if kind is not None and first_of_type.setdefault(kind, index) != index:
            warnings.append(f"tls.certificates[{index}]: a second {kind} pair, never used: "
                            f"tls.certificates[{first_of_type[kind]}] serves every {kind} "
                            "client (one pair per key type)")
        fields = _decode_cert(pair.cert)
        if fields is None:
            continue
        where = f'tls.certificates[{index}].cert: "{pair.cert}"'
        try:
            not_before = ssl.cert_time_to_seconds(fields["notBefore"])
            not_after = ssl.cert_time_to_seconds(fields["notAfter"])
        except (KeyError, ValueError):
            continue
        if now > not_after:
            warnings.append(f"{where} expired on {fields['notAfter']}")
        elif now < not_before:
            warnings.append(f"{where} is not valid before {fields['notBefore']}")
    return warnings


# A private key's type from its PEM label, or for PKCS#8 ("PRIVATE KEY") from the
# algorithm's object identifier near its start (DER bytes of the OID's value).
# One run of base64 and whitespace after the label: two patterns that could both take
# whitespace would make a long blank run cost its square (seconds, on a hostile file).
_PEM_KEY = re.compile(rb"-----BEGIN ([A-Z ]*)PRIVATE KEY-----([A-Za-z0-9+/=\s]*?)-----END")
_LABELS = {b"RSA ": "RSA", b"EC ": "ECDSA"}
_OIDS = ((b"\x2a\x86\x48\x86\xf7\x0d\x01\x01\x01", "RSA"),  # rsaEncryption
         (b"\x2a\x86\x48\x86\xf7\x0d\x01\x01\x0a", "RSA-PSS"),
         (b"\x2a\x86\x48\xce\x3d\x02\x01", "ECDSA"),  # id-ecPublicKey
         (b"\x06\x03\x2b\x65\x70", "Ed25519"), (b"\x06\x03\x2b\x65\x71", "Ed448"))


def _key_type(path: str) -> str | None:
    """The key type of the PEM private key at `path`, or None where it cannot tell."""
    try:
        match = _PEM_KEY.search(read_small_file(path, _MAX_PEM_BYTES))
    except (OSError, NotRegularFile, TooLarge):
        return None
    if match is None:
        return None
    label, body = match.groups()
    if label in _LABELS:
        return _LABELS[label]
    if label:  # "ENCRYPTED ", and whatever else: not told apart
        return None
    try:
        head = binascii.a2b_base64(body)[:32]  # version, then the AlgorithmIdentifier
    except binascii.Error:
        return None
    return next((kind for oid, kind in _OIDS if oid in head), None)


def reloaded_context(current: ssl.SSLContext | None, config: TlsConfig
                     ) -> ssl.SSLContext | None:
    """For a reload: the context of the new configuration, or, if it cannot be built (a
    certificate replaced by a broken one meanwhile), `current`, with the reasons logged.
    None when the new configuration has no certificates. With no `current` to keep, the
    ConfigError is raised: the listeners meant for TLS must not come up without it."""
    if not config.certificates:
        return None
    try:
        context = server_context(config)
    except ConfigError as exc:
        if current is None:
            raise
        for problem in exc.problems:
            log.error("TLS reload refused: %s", problem)
        log.error("TLS reload refused: keeping the previous certificates")
        return current
    for warning in certificate_warnings(config) + tls12_warnings(context, config):
        log.warning("%s", warning)
    return context


def describe(ssl_object: ssl.SSLSocket | ssl.SSLObject) -> str:
    """Protocol and cipher in Postfix's words, for logs and the Received header (which
    wraps it as "(using ...)"): "TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256
    bits)". Python gives the secret bits only, so both figures are those."""
    cipher = ssl_object.cipher()
    if cipher is None:
        return "TLS (handshake not complete)"
    name, protocol, bits = cipher
    return f"{ssl_object.version() or protocol} with cipher {name} ({bits}/{bits} bits)"
