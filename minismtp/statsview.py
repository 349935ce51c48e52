"""`minismtp stats`: fetch the master's /stats and show totals and per-second rates.

Untrusted input: the HTTP answer from whatever listens at `stats.listen`, which need not
be minismtp at all (the port is free whenever minismtp is not running). The whole fetch
has one deadline, however slowly the bytes come; the answer read is bounded; a redirect is
not followed; and an answer that is not the JSON shape `statsformat.to_json` makes is
reported in one line, like every other failure: no traceback. Its text (names, codes,
even counts, and what an error quotes of it) reaches the terminal with every control
character escaped, so it can neither drive the terminal nor forge lines.
"""

from __future__ import annotations

import http.client
import io
import json
import re
import socket
import sys
import time
import unicodedata
import urllib.parse
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, TextIO

from minismtp import exitcodes
from minismtp.config import ListenAddress, StatsConfig
from minismtp.stats import LATENCY_BOUNDS

_TIMEOUT_S = 2.0  # for the whole fetch: connecting, asking, and reading the answer
_MAX_BYTES = 1 << 20  # a real answer is a few KiB even with every code and rule
_MAX_HEAD_BYTES = 64 * 1024  # the status line and headers, beyond the body's bound
_RECV_BYTES = 65536
_CLEAR = "\x1b[H\x1b[2J"  # cursor home, clear screen
_LOOPBACK = {"0.0.0.0": "127.0.0.1", "::": "::1"}  # a wildcard is reached via loopback
# Candidates for escaping: all but printable ASCII; `_shown` keeps letters and the like.
_NOT_PLAIN = re.compile(r"[^\x20-\x7e]")
_COUNTERS = (("connections", ("connections", "total")), ("transactions", ("transactions",)),
             ("messages accepted", ("messages_accepted",)))


class FetchError(Exception):
    """The statistics could not be fetched; the message is one line for the operator."""


@dataclass(frozen=True, slots=True)
class Sample:
    at: float  # time.monotonic() when fetched
    doc: dict[str, Any]


def stats_url(address: ListenAddress) -> str:
    host = _LOOPBACK.get(address.host, address.host)
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{address.port}/stats"


def fetch(url: str, timeout_s: float = _TIMEOUT_S) -> Sample:
    """GET `url` directly (proxy settings in the environment are for the outside world,
    not for our own master), all within `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    parts = urllib.parse.urlsplit(url)
    try:
        sock = _connect(parts.hostname or "", parts.port or 80, deadline)
    except TimeoutError:
        raise FetchError(f"cannot reach {url}: no answer within {timeout_s:g}s") from None
    except OSError as exc:
        hint = (" (is minismtp running with this configuration?)"
                if isinstance(exc, ConnectionRefusedError) else "")
        raise FetchError(f"cannot reach {url}: {exc.strerror or exc}{hint}") from None
    try:
        with sock:
            status, data = _exchange(sock, parts, deadline)
    except TimeoutError:
        raise FetchError(f"cannot read {url}: no whole answer within {timeout_s:g}s") from None
    except (OSError, http.client.HTTPException) as exc:  # resets, bad HTTP
        raise FetchError(f"cannot read {url}: {exc or type(exc).__name__}") from None
    except ValueError:  # more than any statistics
        raise FetchError(f"{url} did not answer with minismtp statistics") from None
    if status != HTTPStatus.OK:  # a redirect too: not followed
        raise FetchError(f"{url} answered {_status_text(status)}")
    try:
        doc = json.loads(data)
        _check(doc)
        sample = Sample(time.monotonic(), doc)
        render(url, sample, None)  # its optional sections too: shown, or refused here
    except (ValueError, TypeError, KeyError, AttributeError, RecursionError, ArithmeticError):
        raise FetchError(f"{url} did not answer with minismtp statistics") from None
    return sample


def _status_text(status: int) -> str:
    """The status as "404 Not Found", in our words: the peer's own are not printed."""
    try:
        return f"{status} {HTTPStatus(status).phrase}"
    except ValueError:
        return str(status)


def _left(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError
    return left


def _connect(host: str, port: int, deadline: float) -> socket.socket:
    """Connect to the first address of `host` that answers, all before `deadline`."""
    error: OSError = OSError(f"no address for {host}")
    for family, kind, proto, _, address in socket.getaddrinfo(host, port,
                                                              type=socket.SOCK_STREAM):
        sock = socket.socket(family, kind, proto)
        try:
            sock.settimeout(_left(deadline))
            sock.connect(address)
            return sock
        except TimeoutError:  # the deadline is past, for the other addresses too
            sock.close()
            raise
        except OSError as exc:
            sock.close()
            error = exc
    raise error


def _exchange(sock: socket.socket, parts: urllib.parse.SplitResult,
              deadline: float) -> tuple[int, bytes]:
    """Send the request, read the answer before `deadline`, to EOF or to the end its
    Content-Length gives (a server may keep the connection open despite our "close"):
    (status, body). ValueError if the answer is larger than any statistics."""
    sock.settimeout(_left(deadline))
    sock.sendall(f"GET {parts.path or '/'} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
                 "Accept: application/json\r\nConnection: close\r\n\r\n".encode("ascii"))
    received = bytearray()
    while chunk := sock.recv(_RECV_BYTES):
        received += chunk
        if len(received) > _MAX_HEAD_BYTES + _MAX_BYTES:
            raise ValueError
        if _whole(received):
            break
        sock.settimeout(_left(deadline))
    response = http.client.HTTPResponse(_Received(bytes(received)))  # type: ignore[arg-type]
    response.begin()
    body = response.read(_MAX_BYTES + 1)
    if len(body) > _MAX_BYTES:
        raise ValueError
    return response.status, body


_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*([0-9]{1,10})[ \t]*\r\n",
                             re.IGNORECASE)


def _whole(received: bytearray) -> bool:
    """Whether the answer so far has its head and all the body its Content-Length says."""
    head_end = received.find(b"\r\n\r\n")
    if head_end < 0:
        return False
    length = _CONTENT_LENGTH.search(received, 0, head_end + 2)
    return length is not None and len(received) - head_end - 4 >= int(length.group(1))


class _Received:
    """An answer read whole, for http.client to parse (chunked, Content-Length or EOF)."""

    def __init__(self, data: bytes) -> None:
        self._data = data

    def makefile(self, mode: str) -> io.BytesIO:
        return io.BytesIO(self._data)


def _check(doc: object) -> None:
    """Raise unless `doc` has every field the display uses, with numbers where expected."""
    if not isinstance(doc, dict):
        raise TypeError
    numbers = [doc["workers"], doc["connections"]["open"], doc["connections"]["total"],
               doc["transactions"], doc["messages_accepted"], doc["bytes_received"],
               *doc["rejections"].values(), *doc["faults"].values(),
               doc["end_of_data_seconds"]["sum"], doc["end_of_data_seconds"]["count"],
               *doc["end_of_data_seconds"]["buckets"].values()]
    if not all(isinstance(n, (int, float)) and not isinstance(n, bool) for n in numbers):
        raise TypeError
    for bound in doc["end_of_data_seconds"]["buckets"]:
        float(bound)  # "0.0005" ... "+Inf"; anything else raises ValueError
    _within_counters(doc)


def _within_counters(value: object) -> None:
    """Raise ValueError for a number no counter can hold (the board's are 64-bit), in
    any section: its rates would overflow a float, or not be numbers at all."""
    if isinstance(value, dict):
        for item in value.values():
            _within_counters(item)
    elif isinstance(value, list):
        for item in value:
            _within_counters(item)
    elif isinstance(value, (int, float)) and not -2**64 < value < 2**64:
        raise ValueError  # also NaN (never within) and the infinities


def _field(doc: dict[str, Any], path: tuple[str, ...]) -> float:
    value: object = doc
    for key in path:  # a code or rule missing from an earlier sample counted 0 then
        value = value.get(key, 0) if isinstance(value, dict) else 0
    return value if isinstance(value, (int, float)) else 0


def _size(nbytes: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes:.0f} B"


def _seconds(value: float) -> str:
    return f"{value * 1000:.1f} ms" if value < 1 else f"{value:.2f} s"


def _latency(doc: dict[str, Any]) -> str:
    latency = doc["end_of_data_seconds"]
    count = latency["count"]
    if not count:
        return "no messages yet"
    parts = [f"mean {_seconds(latency['sum'] / count)}"]
    for quantile in (0.5, 0.99):
        for bound, cumulative in latency["buckets"].items():
            if cumulative >= quantile * count:  # bucket bounds: an upper estimate
                upper = float(bound)
                within = (f"over {_seconds(LATENCY_BOUNDS[-1])}" if upper == float("inf")
                          else f"<= {_seconds(upper)}")
                parts.append(f"p{quantile * 100:g} {within}")
                break
    return ", ".join(parts)


def render(url: str, current: Sample, previous: Sample | None) -> str:
    """The screen: totals, and rates over the time since `previous` when there is one."""
    doc = current.doc
    elapsed = current.at - previous.at if previous else 0.0

    def rate(path: tuple[str, ...]) -> float | None:
        if previous is None or elapsed <= 0:
            return None
        delta = _field(doc, path) - _field(previous.doc, path)
        return delta / elapsed if delta >= 0 else None  # negative: the server restarted

    def row(label: str, total: str, per_s: str) -> str:
        return f"{label:<28}{total:>14}{per_s:>14}".rstrip()

    def shown(value: float | None, fmt: str = "{:.1f}") -> str:
        return "-" if value is None else fmt.format(value)

    lines = [f"minismtp statistics from {url}: {doc['workers']} worker(s)", "",
             row("", "total", "per second"),
             row("connections open", str(doc["connections"]["open"]), "")]
    for label, path in _COUNTERS:
        lines.append(row(label, str(_field(doc, path)), shown(rate(path))))
    received = rate(("bytes_received",))
    lines.append(row("received", _size(doc["bytes_received"]),
                     "-" if received is None else f"{_size(received)}/s"))
    for code, count in doc["rejections"].items():
        lines.append(row(f"rejected {code}", str(count), shown(rate(("rejections", code)))))
    for name, count in doc["faults"].items():
        lines.append(row(f"fault {name}", str(count), shown(rate(("faults", name)))))
    listeners = doc.get("listeners")  # absent from a server older than listener profiles
    for name, entry in (listeners.items() if isinstance(listeners, dict) else ()):
        for label, key in (("sessions", "sessions"), ("messages", "messages_accepted")):
            lines.append(row(f"{name}: {label}", str(_field(entry, (key,))),
                             shown(rate(("listeners", name, key)))))
        faults = entry.get("faults") if isinstance(entry, dict) else None
        for rule, count in (faults.items() if isinstance(faults, dict) else ()):
            lines.append(row(f"{name}: fault {rule}", str(count),
                             shown(rate(("listeners", name, "faults", rule)))))
    tls = doc.get("tls")  # absent from a server older than TLS
    if tls and (tls["sessions"] or any(tls["handshake_failures"].values())):
        lines.append(row("tls sessions", str(tls["sessions"]),
                         shown(rate(("tls", "sessions")))))
        for reason, count in tls["handshake_failures"].items():
            if count:
                lines.append(row(f"tls failed: {reason}", str(count), ""))
    auth = doc.get("auth")  # absent from a server older than AUTH
    if auth and any(auth.values()):
        for label, key in (("auth succeeded", "successes"), ("auth failed", "failures"),
                           ("auth temporary failures", "temporary_failures")):
            lines.append(row(label, str(auth[key]), shown(rate(("auth", key)))))
    proxy = doc.get("proxy")  # absent from a server older than the PROXY protocol
    if proxy and (proxy["headers"] or any(proxy["failures"].values())):
        lines.append(row("proxy headers", str(proxy["headers"]),
                         shown(rate(("proxy", "headers")))))
        for reason, count in proxy["failures"].items():
            if count:
                lines.append(row(f"proxy refused: {reason}", str(count), ""))
    per_client = doc.get("per_client")  # absent from a server older than limits.per_client
    if per_client:
        for reason, count in per_client["refused"].items():
            if count:
                lines.append(row(f"per-client refused: {reason}", str(count),
                                 shown(rate(("per_client", "refused", reason)))))
        if per_client["unchecked"]:
            lines.append(row("per-client unchecked", str(per_client["unchecked"]), ""))
    lines.append(f"{'end of data latency':<28}{_latency(doc)}")
    return "\n".join(map(_printable, lines)) + "\n"


def _printable(text: str) -> str:
    """`text` with each control character (ESC, CR, LF, C1, bidi and other format
    characters, lone surrogates, line separators) written as a Python escape, "\\x1b":
    the peer's text may neither send the terminal commands nor make lines of its own."""
    return _NOT_PLAIN.sub(_shown, text)


def _shown(match: re.Match[str]) -> str:
    char = match.group()
    if unicodedata.category(char) in ("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"):
        return ascii(char)[1:-1]
    return char  # a letter, a sign, a space: as it is


def run(config: StatsConfig, source: str | None, once: bool, out: TextIO = sys.stdout, *,
        interval_s: float = 1.0) -> int:
    """Print totals and rates once (with `once`, or when `out` is not a terminal), else
    refresh in place every `interval_s` until Ctrl-C. `source`: the file `config` is
    from (None: the built-in defaults)."""
    address = config.listen
    where = source or "the built-in defaults (use --config FILE)"
    if address is None:
        print(f"minismtp: stats.listen is not set in {where}", file=sys.stderr)
        return exitcodes.CONFIG
    if address.port == 0:  # the master picks a free port each run; nothing to find
        print(f"minismtp: stats.listen has port 0 in {where}; "
              "set a fixed port to use this command", file=sys.stderr)
        return exitcodes.CONFIG
    url = stats_url(address)
    try:
        previous = fetch(url)
        if once or not out.isatty():
            time.sleep(interval_s)  # a second sample, for rates
            out.write(render(url, fetch(url), previous))
            return exitcodes.OK
        out.write(_CLEAR + render(url, previous, None))
        while True:
            out.flush()
            time.sleep(interval_s)
            current = fetch(url)
            out.write(_CLEAR + render(url, current, previous))
            previous = current
    except FetchError as exc:
        print(f"minismtp: {_printable(str(exc))}", file=sys.stderr)  # it may quote the peer
        return exitcodes.FAILURE
    except KeyboardInterrupt:
        return exitcodes.OK
    finally:
        out.flush()
