"""A listener's `proxy_protocol` mapping and `limits.proxy_timeout`: parsing, refusals with
their key paths, and dump_config round trips."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import yaml

from minismtp.config import dump_config, load_config
from minismtp.values import ProxyProtocol
from support.configfiles import problems_of


def config_file(tmp_path: Path, listen: str, extra: str = "") -> Path:
    path = tmp_path / "minismtp.yaml"
    path.write_text(f"server:\n  listen:\n{listen}\n{extra}", encoding="utf-8")
    return path


def test_default_is_none_and_the_timeout_ten_seconds():
    config = load_config(overrides={"server.listen": ["127.0.0.1:2525"]})
    assert config.server.listen[0].proxy_protocol is None
    assert config.limits.proxy_timeout == 10.0


def test_parsed_with_networks_and_a_default_version(tmp_path):
    config = load_config(config_file(tmp_path, """\
    - address: "127.0.0.1:2525"
      proxy_protocol: {version: any, trusted: ["127.0.0.1/32", "10.0.0.0/8", "::1/128"]}
    - address: "127.0.0.1:2526"
      proxy_protocol: {trusted: ["192.0.2.0/24"]}""", "limits:\n  proxy_timeout: 3s\n"))
    first, second = config.server.listen
    assert first.proxy_protocol == ProxyProtocol("any", (
        ipaddress.ip_network("127.0.0.1/32"), ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("::1/128")))
    assert second.proxy_protocol == ProxyProtocol("v2", (ipaddress.ip_network("192.0.2.0/24"),))
    assert config.limits.proxy_timeout == 3.0


def test_refusals_name_their_paths(tmp_path):
    path = config_file(tmp_path, """\
    - address: "127.0.0.1:2525"
      proxy_protocol: {version: v3, trusted: ["10.0.0.1/8"], trustd: []}
    - address: "127.0.0.1:2526"
      proxy_protocol: {version: v1}
    - address: "127.0.0.1:2527"
      proxy_protocol: yes
    - address: "127.0.0.1:2528"
      proxy_protocol: {trusted: []}
    - address: "127.0.0.1:2529"
      proxy_protocol: {trusted: ["::ffff:127.0.0.1/128"]}""")
    problems = problems_of(path)
    assert [p.split(":")[0] for p in problems] == [
        "server.listen[0].proxy_protocol.version",
        "server.listen[0].proxy_protocol.trusted",
        "server.listen[0].proxy_protocol.trustd",
        "server.listen[1].proxy_protocol.trusted",
        "server.listen[2].proxy_protocol",
        "server.listen[3].proxy_protocol.trusted",
        "server.listen[4].proxy_protocol.trusted",
    ], problems
    assert 'must be one of "v1", "v2", "any"' in problems[0]
    assert "host bits" in problems[1]
    assert problems[-1].endswith('"::ffff:127.0.0.1/128" is IPv4-mapped, which matches no '
                                'client (IPv4 ones are matched as IPv4): write "127.0.0.1/32"')


def test_dump_round_trips(tmp_path):
    config = load_config(config_file(tmp_path, """\
    - "127.0.0.1:2525"
    - address: "127.0.0.1:2526"
      proxy_protocol: {version: v1, trusted: ["127.0.0.1/32", "fd00::/8"]}""",
                                     "limits:\n  proxy_timeout: 2500ms\n"))
    text = dump_config(config)
    document = yaml.safe_load(text)
    assert document["server"]["listen"] == [
        "127.0.0.1:2525",
        {"address": "127.0.0.1:2526", "tls": "none",
         "proxy_protocol": {"version": "v1", "trusted": ["127.0.0.1/32", "fd00::/8"]}},
    ]
    again = tmp_path / "again.yaml"
    again.write_text(text)
    assert load_config(again) == config
