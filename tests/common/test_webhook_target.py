"""The webhook address check (common/webhook_target.py): which URLs and addresses may be called, and that the
host is resolved once, by the resolver handed in."""

from __future__ import annotations

import ipaddress

import pytest

from common.webhook_target import WebhookError, check_url, is_public


@pytest.mark.parametrize(
    "url,reason",
    [
        ("http://127.0.0.1:9/hook", "non-public"),
        ("http://localhost/hook", "non-public"),
        ("http://10.1.2.3/hook", "non-public"),
        ("http://192.168.0.10/hook", "non-public"),
        ("http://169.254.169.254/latest/meta-data", "non-public"),  # cloud metadata
        ("http://[::1]/hook", "non-public"),
        ("ftp://example.com/x", "http or https"),
        ("http://no-such-host.invalid/hook", "does not resolve"),
        ("https://93.184.215.14:99999/hook", "invalid port"),
        ("https://93.184.215.14:http/hook", "invalid port"),
        ("https://93.184.215.14:0/hook", "invalid port"),
    ],
)
def test_private_and_odd_targets_are_refused(url, reason):
    with pytest.raises(WebhookError, match=reason):
        check_url(url, allow_private=False)


# IPv6 spellings of loopback, private and metadata IPv4 addresses: all passed the check before it unwrapped them
@pytest.mark.parametrize(
    "address",
    [
        "64:ff9b::7f00:1",  # NAT64 well-known prefix + 127.0.0.1
        "64:ff9b::a9fe:a9fe",  # NAT64 + 169.254.169.254 (cloud metadata)
        "64:ff9b:1:7f00:1::",  # local-use NAT64 /48 + 127.0.0.1
        "64:ff9b:1:0:a:0:100::",  # local-use NAT64 /64 + 10.0.0.1 (bits 72-103)
        "64:ff9b:1::a00:1",  # local-use NAT64 /96 + 10.0.0.1
        "2002:7f00:1::",  # 6to4 of 127.0.0.1
        "2002:a00:1::1",  # 6to4 of 10.0.0.1
        "::7f00:1",  # IPv4-compatible 127.0.0.1
        "::a9fe:a9fe",  # IPv4-compatible 169.254.169.254
        "::ffff:127.0.0.1",  # IPv4-mapped
        "::ffff:c0a8:1",  # IPv4-mapped 192.168.0.1
        "2001:0:4136:e378:8000:63bf:3fff:fdd2",  # Teredo, client 192.0.2.45 (documentation range)
    ],
)
def test_ipv6_forms_of_private_ipv4_addresses_are_refused(address):
    assert not is_public(ipaddress.ip_address(address))
    with pytest.raises(WebhookError, match="non-public"):
        check_url(f"http://[{address}]/hook", allow_private=False)


@pytest.mark.parametrize("address", ["64:ff9b::808:808", "2002:808:808::1", "::ffff:8.8.8.8", "2606:4700::1111"])
def test_ipv6_forms_of_public_addresses_pass(address):
    assert is_public(ipaddress.ip_address(address))


def test_public_addresses_pass_and_private_ones_when_allowed():
    target = check_url("https://93.184.215.14/hook", allow_private=False)
    assert (target.host, target.port) == ("93.184.215.14", 443)
    assert target.addresses == (ipaddress.ip_address("93.184.215.14"),)
    assert check_url("http://127.0.0.1:9/hook", allow_private=True).port == 9


def test_one_private_answer_among_public_ones_refuses_the_host():
    answers = {"hook.example": ["93.184.215.14", "10.0.0.7"]}
    with pytest.raises(WebhookError, match=r"10\.0\.0\.7"):
        check_url("https://hook.example/x", False, resolve=lambda host, port: answers[host])


def test_the_host_is_resolved_once_and_its_answer_kept():
    asked = []

    def resolve(host: str, port: int) -> list[str]:
        asked.append((host, port))
        return ["93.184.215.14"]

    target = check_url("http://hook.example:8080/x?y=1", False, resolve=resolve)
    assert asked == [("hook.example", 8080)]
    assert target.host == "hook.example" and target.addresses == (ipaddress.ip_address("93.184.215.14"),)
