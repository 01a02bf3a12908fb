"""Where a webhook may be sent: the URL's parts, and the addresses its host resolved to, each one checked.

Targets must be http(s) with a valid port, and every address the host resolves to must be public: the worker
would otherwise be a way into the operator's network (loopback, private ranges, the cloud metadata service).
IPv6 forms that carry an IPv4 address are judged by that IPv4 address, since a gateway on the path turns
them back into it: NAT64 (64:ff9b::/96, and the local-use 64:ff9b:1::/48 at every RFC 6052 prefix length),
6to4 (2002::/16), Teredo (2001::/32), IPv4-mapped (::ffff:a.b.c.d) and IPv4-compatible (::a.b.c.d).

The host is resolved once, here; the sender connects to one of these very addresses (worker/webhook_post.py)
rather than resolving again, so a name that answers public then loopback (DNS rebinding) cannot slip past.
`resolve` is a seam: tests hand in a resolver that answers what they need.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], Sequence[str]]  # (host, port) -> its addresses as text, as getaddrinfo gives them

NAT64 = ipaddress.IPv6Network("64:ff9b::/96")  # RFC 6052's well-known prefix: IPv4 in the last 32 bits
NAT64_LOCAL = ipaddress.IPv6Network("64:ff9b:1::/48")  # RFC 8215: the operator picks the prefix length inside
IPV4_COMPATIBLE = ipaddress.IPv6Network("::/96")  # deprecated (RFC 4291), still routed by some stacks
# RFC 6052 section 2.2: where the 32 bits of IPv4 sit in an address of each NAT64 prefix length (bits 64-71,
# the "u" octet, are always skipped); byte slices of the 16-byte address
NAT64_LAYOUTS: tuple[tuple[slice, ...], ...] = (
    (slice(6, 8), slice(9, 11)),  # /48
    (slice(7, 8), slice(9, 12)),  # /56
    (slice(9, 13),),  # /64
    (slice(12, 16),),  # /96
)


class WebhookError(ValueError):
    """A webhook URL that may not be called; the message says why."""


@dataclass(frozen=True)
class Target:
    """A checked webhook URL: connect to `addresses[0]`, say `host` in the Host header and TLS's SNI."""

    url: str
    scheme: str  # http or https
    host: str  # the name, as the URL gives it (no brackets around IPv6)
    port: int
    addresses: tuple[IPAddress, ...]  # what `host` resolved to, each one allowed; never empty


def system_resolver(host: str, port: int) -> list[str]:
    return [info[4][0] for info in socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP)]


def embedded_ipv4(address: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses an IPv6 address stands for (several where the layout is the operator's); [] for none."""
    if address.ipv4_mapped is not None:
        return [address.ipv4_mapped]
    if address.sixtofour is not None:
        return [address.sixtofour]
    if address.teredo is not None:
        return list(address.teredo)  # (server, client): both are reached
    if address in NAT64 or address in IPV4_COMPATIBLE:
        return [ipaddress.IPv4Address(address.packed[12:])]
    if address in NAT64_LOCAL:
        packed = address.packed
        return [ipaddress.IPv4Address(b"".join(packed[s] for s in layout)) for layout in NAT64_LAYOUTS]
    return []


def is_public(address: IPAddress) -> bool:
    """Routable on the internet: not loopback, private, link-local, reserved, nor an IPv6 form of one of those."""
    if isinstance(address, ipaddress.IPv6Address):
        inner = embedded_ipv4(address)
        if inner:
            return all(v4.is_global for v4 in inner)
    return address.is_global


def parse(url: str) -> tuple[str, str, int]:
    """(scheme, host, port) of an http(s) URL; WebhookError names what is wrong."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise WebhookError("must be an http or https URL with a host")
    try:
        port = parts.port
    except ValueError as exc:  # not a number, or outside 0-65535
        raise WebhookError(f"invalid port in {parts.netloc!r}: a number from 1 to 65535") from exc
    if port == 0:
        raise WebhookError(f"invalid port in {parts.netloc!r}: a number from 1 to 65535")
    return parts.scheme, parts.hostname, port or (443 if parts.scheme == "https" else 80)


def check_url(url: str, allow_private: bool, resolve: Resolver = system_resolver) -> Target:
    """The Target, once every address `url`'s host resolves to may be called; else WebhookError.
    allow_private: loopback and private addresses too (tests, trusted networks); the host is still resolved
    once and that address used."""
    scheme, host, port = parse(url)
    try:
        addresses = tuple(ipaddress.ip_address(a.split("%", 1)[0]) for a in resolve(host, port))
    except (OSError, ValueError) as exc:  # socket.gaierror is an OSError
        raise WebhookError(f"host {host!r} does not resolve") from exc
    if not addresses:
        raise WebhookError(f"host {host!r} does not resolve")
    if not allow_private:
        for address in addresses:
            if not is_public(address):
                raise WebhookError(f"host {host!r} resolves to a non-public address ({address})")
    return Target(url, scheme, host, port, addresses)
