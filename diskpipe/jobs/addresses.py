"""Whether a download may connect to an address: the denied networks, their
explicit exceptions, and every IPv4 address an IPv6 address carries.

An IPv6 address can stand for an IPv4 one: IPv4-mapped (`::ffff:a.b.c.d`),
IPv4-compatible (`::a.b.c.d`), SIIT (`::ffff:0:a.b.c.d`), NAT64
(`64:ff9b::a.b.c.d`, local-use `64:ff9b:1::/48`), 6to4 (`2002:AABB:CCDD::`),
Teredo (`2001:0:SSSS:SSSS:..:~CCCC:~CCCC`) and ISATAP (`..:0:5efe:a.b.c.d`).
A translator or tunnel on the way may deliver such a packet to the IPv4
address, so each one found is judged like a plain IPv4 address, and any
denied one refuses the whole address.

The exceptions (`allowed_networks`) match the address as it is connected
to, never an embedded one: allowing `127.0.0.1/32` for a test server does
not allow `::ffff:127.0.0.1` or `64:ff9b::7f00:1`. An embedded address can
only add a reason to refuse. Anything that cannot be judged is refused.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from functools import lru_cache

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

_NAT64_WELL_KNOWN = ipaddress.IPv6Network("64:ff9b::/96")  # RFC 6052
_NAT64_LOCAL_USE = ipaddress.IPv6Network("64:ff9b:1::/48")  # RFC 8215
_NAT64_LOCAL_USE_96 = ipaddress.IPv6Network("64:ff9b:1::/96")
_SIIT = ipaddress.IPv6Network("::ffff:0:0:0/96")  # RFC 2765 "IPv4-translated"
_COMPATIBLE = ipaddress.IPv6Network("::/96")  # RFC 4291 (deprecated)
_ISATAP_IDS = (0x00005EFE, 0x02005EFE)  # RFC 5214 interface identifier, bits 64..95


class Unreadable(ValueError):
    """An address that may embed an IPv4 address we cannot read unambiguously."""


def _low_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address:
    return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)


def embedded_ipv4(address: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """Every IPv4 address `address` may lead to, in any of the embeddings above."""
    found: list[ipaddress.IPv4Address] = []
    if address.ipv4_mapped is not None:
        found.append(address.ipv4_mapped)
    for network in (_COMPATIBLE, _SIIT, _NAT64_WELL_KNOWN):
        if address in network:
            found.append(_low_ipv4(address))
    if address in _NAT64_LOCAL_USE:
        # RFC 6052 lets a site's translator use a /48, /56, /64 or /96 prefix
        # here, each with the IPv4 address at another place. Only the /96
        # form (everything between the /48 and the last 32 bits zero) reads
        # the same under every choice; any other is refused, not guessed.
        if address not in _NAT64_LOCAL_USE_96:
            raise Unreadable(f"{address} is a local-use NAT64 address whose IPv4 address depends on the prefix length")
        found.append(_low_ipv4(address))
    if address.sixtofour is not None:
        found.append(address.sixtofour)
    if address.teredo is not None:
        server, client = address.teredo  # the client's address is stored inverted
        found.extend((server, client))
    if (int(address) >> 32) & 0xFFFFFFFF in _ISATAP_IDS:
        found.append(_low_ipv4(address))
    return found


class AddressJudge:
    """Judges addresses against denied networks and their exceptions."""

    def __init__(self, denied: Iterable[str], allowed: Iterable[str]) -> None:
        self.denied: tuple[Network, ...] = tuple(ipaddress.ip_network(network) for network in denied)
        self.allowed: tuple[Network, ...] = tuple(ipaddress.ip_network(network) for network in allowed)

    def _is_denied(self, address: Address) -> bool:
        return any(address in network for network in self.denied)

    def refusal(self, text: str) -> str | None:
        """None when `text` (an address from getaddrinfo) may be connected to;
        otherwise why not."""
        try:
            address = ipaddress.ip_address(text.split("%", 1)[0])
        except ValueError:
            return f"{text} (not an IP address)"
        if any(address in network for network in self.allowed):
            return None
        if self._is_denied(address):
            return str(address)
        if isinstance(address, ipaddress.IPv6Address):
            try:
                embedded = embedded_ipv4(address)
            except Unreadable as error:
                return str(error)
            for inner in embedded:
                if self._is_denied(inner):
                    return f"{address} (embeds {inner})"
        return None


@lru_cache(maxsize=32)
def judge(denied: tuple[str, ...], allowed: tuple[str, ...]) -> AddressJudge:
    """One judge per configuration (the networks are parsed once)."""
    return AddressJudge(denied, allowed)
