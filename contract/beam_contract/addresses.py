"""What counts as an inward address: loopback, link-local (the cloud metadata service), private,
shared, multicast, reserved, and the IPv6 forms that embed such an IPv4 address. Shared by the
transport worker's guard (beam_jobrunner.reach, on every address it connects to) and the
operator, which refuses a destination whose URL names such an address literally before any Job
(docs/security.md, "What a destination may reach")."""

from __future__ import annotations

import ipaddress
import re
import socket
from urllib.parse import urlsplit

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_SHARED = ipaddress.IPv4Network("100.64.0.0/10")  # RFC 6598, carrier-grade NAT
_RFC1918 = tuple(ipaddress.IPv4Network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"))
_ULA = ipaddress.IPv6Network("fc00::/7")
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")  # RFC 6052: a NAT64 gateway connects the embedded IPv4


def embedded_ipv4(ip: IPAddress) -> tuple[ipaddress.IPv4Address, str] | None:
    """The IPv4 address an IPv6 address stands for, and the form's name: IPv4-mapped
    (::ffff:a.b.c.d), IPv4-compatible (::a.b.c.d), NAT64 (64:ff9b::a.b.c.d) or 6to4 (2002::/16)."""
    if ip.version != 6:
        return None
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped, "IPv4-mapped"
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF), "NAT64"
    if ip.sixtofour is not None:
        return ip.sixtofour, "6to4"
    if int(ip) >> 32 == 0 and int(ip) > 1:  # :: and ::1 are themselves
        return ipaddress.IPv4Address(int(ip)), "IPv4-compatible"
    return None


def why_not_global(ip: IPAddress) -> str | None:
    """Why `ip` is not a globally routable unicast address (a phrase), or None if it is one."""
    inner = embedded_ipv4(ip)
    if inner is not None:
        v4, form = inner
        why = why_not_global(v4)
        return f"the {form} IPv6 form of {v4}, {why}" if why else None
    if ip.is_unspecified:
        return "an unspecified address"
    if ip.is_loopback:
        return "a loopback address"
    if ip.is_link_local:
        return "a link-local address"
    if ip.is_multicast:
        return "a multicast address"
    if ip.version == 4:
        if ip == ipaddress.IPv4Address("255.255.255.255"):
            return "a broadcast address"
        if ip in _SHARED:
            return "a shared (carrier-grade NAT) address"
        if any(ip in n for n in _RFC1918):
            return "a private address"
    elif ip in _ULA:
        return "a private (unique local) address"
    elif ip.is_site_local:
        return "a site-local address"
    if ip.is_reserved:
        return "a reserved address"
    if not ip.is_global:
        return "an address that is not globally routable"
    return None


def in_nets(ip: IPAddress, nets: tuple[IPNetwork, ...]) -> bool:
    inner = embedded_ipv4(ip)
    return any(ip in n or (inner is not None and inner[0] in n) for n in nets)


def norm_host(host: str) -> str:
    """A host name or literal as compared: brackets, a final dot and case dropped."""
    return host.strip().strip("[]").rstrip(".").lower()


def endpoint(text: str) -> tuple[str, int | None] | None:
    """(host, port) of "host:port", "[v6]:port", "scheme://host:port/..." or a bare host: a
    destination's URL, one of Kafka's bootstrap servers, an entry of a Secret's `endpoints`."""
    text = text.strip()
    # A scheme of its own: librdkafka's "SASL_SSL://" is no URL scheme (the underscore).
    m = re.match(r"^([A-Za-z][A-Za-z0-9_+.-]*)://(.*)$", text, re.S)
    scheme, rest = (m.group(1).lower(), m.group(2)) if m else ("", text)
    try:
        u = urlsplit(f"//{rest}")
        host, port = u.hostname, u.port
    except ValueError:
        return None
    if port is None:
        port = {"http": 80, "https": 443}.get(scheme)
    return (norm_host(host), port) if host else None


_INET_ATON_RE = re.compile(r"^(0x[0-9a-f]+|[0-9]+)(\.(0x[0-9a-f]+|[0-9]+)){0,3}$", re.I)


def literal_address(host: str) -> IPAddress | None:
    """The address a host written as an IP literal stands for, in any spelling the C library
    accepts without DNS (127.1, 2130706433, 0x7f000001, [::ffff:127.0.0.1]); None for a name."""
    host = norm_host(host)
    try:
        return ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        pass
    if _INET_ATON_RE.match(host):
        try:
            return ipaddress.IPv4Address(socket.inet_aton(host))
        except OSError:
            return None
    return None


def literal_refusal(
    host: str, allow: list[str] | tuple[str, ...], cluster_cidrs: list[str] | tuple[str, ...]
) -> str | None:
    """Why a destination host written as an IP literal is refused (a phrase), or None: it is a
    name (checked where the worker connects), allowed (a CIDR or the literal itself in
    `allow`), or globally routable and outside the cluster's CIDRs."""
    ip = literal_address(host)
    if ip is None:
        return None
    nets, names = [], set()
    for entry in allow:
        try:
            nets.append(ipaddress.ip_network(entry.strip().strip("[]"), strict=False))
        except ValueError:
            names.add(norm_host(entry))
    if in_nets(ip, tuple(nets)) or norm_host(host) in names:
        return None
    cluster = []
    for entry in cluster_cidrs:
        try:
            cluster.append(ipaddress.ip_network(entry.strip(), strict=False))
        except ValueError:
            continue
    if in_nets(ip, tuple(cluster)):
        return f"{ip}, an address of the cluster's own ranges (config.cluster_cidrs)"
    why = why_not_global(ip)
    return f"{ip}, {why}" if why else None
