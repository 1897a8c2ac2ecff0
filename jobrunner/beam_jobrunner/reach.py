"""What a destination may reach: the transport worker's guard against server-side request forgery.

A tenant chooses its destinations' addresses (webhook and NATS `url`, SNS `endpoint_url`, Kafka
`bootstrap_servers`). The worker refuses to connect them to any address that is not globally
routable (loopback, link-local such as the cloud metadata service at 169.254.169.254, private,
shared/CGNAT, multicast, unspecified, reserved, broadcast, and the IPv6 forms that embed such an
IPv4 address), and to the cluster's own CIDRs (env BEAM_CLUSTER_CIDRS) even where they are
public. An administrator allows exceptions (env BEAM_DESTINATION_ALLOW): exact host names as
written in the destination (case-insensitive), `*.suffix` patterns and CIDRs; an allowed entry
wins over every refusal.

Where the check happens:
- webhook (httpx), NATS (nats-py, asyncio) and SNS (boto3/urllib3): on the address actually
  connected to, by a process-wide guard on socket.socket.connect/connect_ex (install()). DNS is
  resolved before that, so a name that resolves inward is refused, and so is an IP literal
  (asyncio never calls getaddrinfo for those). getaddrinfo is wrapped only to remember which
  addresses an allowed host name resolved to, since connect() sees addresses, not names.
- Kafka (librdkafka, C code Python cannot hook): check_kafka_bootstrap() resolves and checks every
  bootstrap address before the producer exists, and check_kafka_brokers() every broker the
  cluster's metadata advertises before the first produce (sinks/kafka.py). DNS rebinding between
  that check and librdkafka's own resolution is not covered: the NetworkPolicy is the backstop.

The platform's own endpoints are not the tenant's choice. The staging store's emulator
(STORAGE_EMULATOR_HOST, dev and tests only) is exempt from the guard: exactly that host:port.
The managed Kafka (BEAM_KAFKA_BOOTSTRAP) is exempt only where the product itself connects to it,
a kafka destination without bootstrap_servers, whose topic is <namespace>.<name>. A tenant's
bootstrap_servers that reaches the managed Kafka under any other spelling (another name, a
decimal, hex or short IP, IPv4-mapped IPv6, another listener) is refused: its addresses are
resolved and compared with the managed Kafka's before any connection (check_kafka_bootstrap),
and after the metadata request its cluster id and advertised brokers are compared with the
managed cluster's (check_not_managed), before anything is produced.

The guard raises Refused, a BaseException: the libraries catch Exception or OSError around a
connect to retry or wrap it (nats-py retries every Exception until its timeout, botocore wraps
and retries), and a refusal must neither wait for retries nor lose its reason. transport.run turns
it into the PermanentError it carries (exit 2).
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from beam_contract.addresses import IPAddress, IPNetwork, embedded_ipv4, endpoint, in_nets, norm_host, why_not_global
from beam_contract.worker import Env
from beam_jobrunner.errors import PermanentError, TransientError

HINT = (
    "destinations may not reach loopback, link-local, private, multicast or cluster addresses unless an "
    "administrator allows the host or CIDR (config.destination_allow, docs/security.md)"
)

_HOST_RE = re.compile(r"^[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?(\.[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?)*$")


class Refused(BaseException):
    """Raised inside a library's connect; carries the PermanentError transport.run raises."""

    def __init__(self, error: PermanentError) -> None:
        super().__init__(error.message)
        self.error = error


def _ip(text: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(text.split("%", 1)[0].strip("[]"))
    except ValueError:
        return None


def _parse_nets(name: str, raw: str) -> tuple[IPNetwork, ...]:
    nets = []
    for entry in filter(None, (e.strip() for e in raw.split(","))):
        try:
            nets.append(ipaddress.ip_network(entry, strict=False))
        except ValueError:
            raise PermanentError(f"configuration: {name} entry {entry!r} is not a CIDR") from None
    return tuple(nets)


@dataclass
class Policy:
    """The refusals and the administrator's exceptions (Policy.from_env() reads the worker's env)."""

    allow_names: frozenset[str] = frozenset()
    allow_suffixes: tuple[str, ...] = ()  # ".example.internal" for "*.example.internal"
    allow_nets: tuple[IPNetwork, ...] = ()
    cluster_nets: tuple[IPNetwork, ...] = ()
    # (host as written, lower case; port) of the platform's own endpoints the guard exempts, set
    # by the operator: the staging emulator.
    platform: frozenset[tuple[str, int | None]] = frozenset()
    # (host, port) of the managed Kafka's bootstrap servers: never exempt for a tenant's address.
    managed_kafka: tuple[tuple[str, int], ...] = ()
    # Addresses an allowed host name resolved to, and (address, port) of the platform's endpoints.
    resolved_allowed: set[str] = field(default_factory=set)
    resolved_platform: set[tuple[str, int]] = field(default_factory=set)
    _managed_addresses: frozenset[tuple[str, int]] | None = None

    @classmethod
    def parse(cls, allow: str = "", cluster_cidrs: str = "", platform=(), managed_kafka=()) -> Policy:
        """`platform`: (host, port) of the platform's own endpoints; `managed_kafka`: those of
        the managed Kafka's bootstrap servers."""
        names, suffixes, nets = set(), [], []
        for entry in filter(None, (e.strip() for e in allow.split(","))):
            if "/" in entry or _ip(entry) is not None:
                try:
                    nets.append(ipaddress.ip_network(entry.strip("[]"), strict=False))
                    continue
                except ValueError:
                    pass
            host = norm_host(entry)
            if host.startswith("*.") and _HOST_RE.match(host[2:]):
                suffixes.append(host[1:])
            elif _HOST_RE.match(host):
                names.add(host)
            else:
                raise PermanentError(
                    f"configuration: {Env.DESTINATION_ALLOW} entry {entry!r} is neither a host name, "
                    "a *.suffix pattern nor a CIDR"
                )
        return cls(
            allow_names=frozenset(names),
            allow_suffixes=tuple(suffixes),
            allow_nets=tuple(nets),
            cluster_nets=_parse_nets(Env.CLUSTER_CIDRS, cluster_cidrs),
            platform=frozenset((norm_host(h), port) for h, port in platform),
            managed_kafka=tuple((norm_host(h), port) for h, port in managed_kafka),
        )

    @classmethod
    def from_env(cls) -> Policy:
        # Exempt: the staging store's emulator (dev, tests), which the operator sets, not the
        # tenant; only its host:port. The managed Kafka is compared with, never exempt.
        emulator = endpoint(os.environ.get(Env.STORAGE_EMULATOR_HOST, ""))
        return cls.parse(
            os.environ.get(Env.DESTINATION_ALLOW, ""),
            os.environ.get(Env.CLUSTER_CIDRS, ""),
            [emulator] if emulator is not None else [],
            kafka_bootstrap(os.environ.get(Env.KAFKA_BOOTSTRAP, "")),
        )

    def managed_addresses(self) -> frozenset[tuple[str, int]]:
        """(address, port) that the managed Kafka's bootstrap servers resolve to, resolved once."""
        if self._managed_addresses is None:
            found: set[tuple[str, int]] = set()
            for host, port in self.managed_kafka:
                try:
                    found |= resolve(host, port)
                except (OSError, UnicodeError):
                    pass  # unresolvable here: the cluster id comparison still holds
            self._managed_addresses = frozenset(found)
        return self._managed_addresses

    def host_allowed(self, host: str) -> bool:
        h = norm_host(host)
        if h in self.allow_names or any(h.endswith(s) for s in self.allow_suffixes):
            return True
        ip = _ip(h)
        return ip is not None and in_nets(ip, self.allow_nets)

    def is_platform(self, host: str, port: int | None) -> bool:
        return (norm_host(host), port) in self.platform

    def refusal(self, ip: IPAddress, port: int | None = None) -> str | None:
        """Why connecting to ip (port) is refused, or None when it is allowed."""
        if in_nets(ip, self.allow_nets) or str(ip) in self.resolved_allowed:
            return None
        if port is not None and (str(ip), port) in self.resolved_platform:
            return None
        if in_nets(ip, self.cluster_nets):
            return f"an address of the cluster's own ranges ({Env.CLUSTER_CIDRS})"
        return why_not_global(ip)

    def remember(self, host: str, port, infos) -> None:
        """Note what `host` resolved to, if it is an allowed name or a platform endpoint."""
        allowed = self.host_allowed(host)
        try:
            port = int(port) if port is not None else None
        except (TypeError, ValueError):
            port = None
        platform = self.is_platform(host, port)
        for family, _, _, _, sa in infos:
            if family not in (socket.AF_INET, socket.AF_INET6):
                continue
            ip = _ip(sa[0])
            if ip is None:
                continue
            _names[str(ip)] = host
            if allowed:
                self.resolved_allowed.add(str(ip))
            if platform and port is not None:
                self.resolved_platform.add((str(ip), port))


def _where(ip: IPAddress, port: int | None, name: str | None = None) -> str:
    hostport = f"[{ip}]" if ip.version == 6 else str(ip)
    if port is not None:
        hostport += f":{port}"
    if name and norm_host(name) != str(ip):
        return f"{name}:{port} ({ip})" if port is not None else f"{name} ({ip})"
    return hostport


def refusal_error(label: str, what: str, reason: str) -> PermanentError:
    return PermanentError(f"{label}: refused to connect to {what}: {reason}; {HINT}")


# --- the process-wide guard -------------------------------------------------------------------

_policy: Policy | None = None
_label = "transport"
_refused: list[PermanentError] = []
_names: dict[str, str] = {}  # address -> the host name it was last resolved from (messages only)
_local = threading.local()
_lock = threading.Lock()
_orig_connect = socket.socket.connect
_orig_connect_ex = socket.socket.connect_ex
_orig_getaddrinfo = socket.getaddrinfo


def policy() -> Policy:
    return _policy if _policy is not None else Policy.from_env()


def _checked(sock: socket.socket, address):
    """The address to connect to, once allowed; raises Refused otherwise."""
    p = _policy
    if p is None or getattr(_local, "unguarded", False):
        return address
    if sock.family not in (socket.AF_INET, socket.AF_INET6) or not isinstance(address, tuple):
        return address
    host, port = address[0], address[1]
    if isinstance(host, bytes):
        host = host.decode("idna")
    ip = _ip(host)
    if ip is None:
        # connect() with a host name resolves it in C, out of sight: resolve it here, check it,
        # and connect to exactly the address checked.
        infos = _getaddrinfo(host, port, sock.family, socket.SOCK_STREAM)
        if not infos:
            return address
        address = infos[0][4]
        ip = _ip(address[0])
    reason = p.refusal(ip, port)
    if reason is None:
        return address
    error = refusal_error(_label, _where(ip, port, _names.get(str(ip))), reason)
    _refused.append(error)
    sock.close()
    raise Refused(error)


def _connect(self, address):
    return _orig_connect(self, _checked(self, address))


def _connect_ex(self, address):
    return _orig_connect_ex(self, _checked(self, address))


def _getaddrinfo(host, port, *args, **kwargs):
    infos = _orig_getaddrinfo(host, port, *args, **kwargs)
    p = _policy
    if p is not None and host:
        p.remember(host.decode("idna") if isinstance(host, bytes) else str(host), port, infos)
    return infos


def install(p: Policy) -> None:
    """Guard every Python socket connect of this process with `p` (idempotent: the last wins)."""
    global _policy
    with _lock:
        _policy = p
        _refused.clear()
        socket.socket.connect = _connect
        socket.socket.connect_ex = _connect_ex
        socket.getaddrinfo = _getaddrinfo
    # Note where the platform's endpoints resolve now, for connects by address.
    for host, port in p.platform:
        try:
            _getaddrinfo(host, port, 0, socket.SOCK_STREAM)
        except (OSError, UnicodeError):
            pass


def uninstall() -> None:
    global _policy
    with _lock:
        _policy = None
        socket.socket.connect = _orig_connect
        socket.socket.connect_ex = _orig_connect_ex
        socket.getaddrinfo = _orig_getaddrinfo


@contextmanager
def destination(label: str) -> Iterator[None]:
    """Name the destination a refusal inside the block belongs to."""
    global _label
    _label = label
    _refused.clear()
    try:
        yield
    finally:
        _label = "transport"


def refused() -> PermanentError | None:
    """The first refusal inside the current destination() block, even if a library swallowed it."""
    return _refused[0] if _refused else None


@contextmanager
def unguarded() -> Iterator[None]:
    """For the platform's own calls in this thread only (the worker's cloud identity)."""
    _local.unguarded = True
    try:
        yield
    finally:
        _local.unguarded = False


# --- Kafka: checked before librdkafka connects ------------------------------------------------


def _canonical(ip: IPAddress) -> IPAddress:
    inner = embedded_ipv4(ip)
    return inner[0] if inner is not None and inner[1] in ("IPv4-mapped", "IPv4-compatible") else ip


def resolve(host: str, port: int) -> set[tuple[str, int]]:
    """(address, port) of every address `host` resolves to, IPv4 in IPv6 forms as IPv4."""
    out = set()
    for family, _, _, _, sa in _orig_getaddrinfo(host, port, 0, socket.SOCK_STREAM):
        if family in (socket.AF_INET, socket.AF_INET6) and (ip := _ip(sa[0])) is not None:
            out.add((str(_canonical(ip)), port))
    return out


def managed_kafka_refusal(label: str, what: str) -> PermanentError:
    return PermanentError(
        f"{label}: {what} is the operator's managed Kafka; omit bootstrap_servers to write to it, where the "
        "topic is <namespace>.<name> (docs/security.md)"
    )


def checkendpoint(label: str, what: str, host: str, port: int | None, p: Policy | None = None) -> None:
    """Resolve host and refuse (PermanentError) if any of its addresses is refused."""
    p = p or policy()
    if p.host_allowed(host):
        return
    try:
        infos = _orig_getaddrinfo(host, port, 0, socket.SOCK_STREAM)
    except (OSError, UnicodeError) as e:
        raise TransientError(f"{label}: cannot resolve {what} {host}: {getattr(e, 'strerror', None) or e}") from None
    for family, _, _, _, sa in infos:
        if family not in (socket.AF_INET, socket.AF_INET6):
            continue
        ip = _ip(sa[0])
        reason = p.refusal(ip, port) if ip is not None else None
        if reason is not None:
            raise refusal_error(label, f"{what} {_where(ip, port, host)}", reason)


def kafka_bootstrap(bootstrap: str, label: str = "") -> list[tuple[str, int]]:
    """(host, port) of each entry of a librdkafka bootstrap.servers ([proto://]host[:port]); with
    a label, an entry that cannot be read is refused (librdkafka might read it, unchecked)."""
    out = []
    for part in bootstrap.split(","):
        if not part.strip():
            continue
        ep = endpoint(part)
        if ep is None:
            if label:
                raise PermanentError(f"{label}: bootstrap server {part.strip()!r} is not host:port")
            continue
        out.append((ep[0], ep[1] or 9092))
    return out


def check_kafka_bootstrap(label: str, bootstrap: str, p: Policy | None = None) -> None:
    """Check a tenant's bootstrap servers. Naming the platform's managed Kafka there is refused:
    a topic written that way would be the bare name, not <namespace>.<name>, so one organization
    could write into another's topics (docs/security.md); the managed Kafka is reached by omitting
    bootstrap_servers."""
    p = p or policy()
    endpoints = kafka_bootstrap(bootstrap, label)
    managed = p.managed_addresses()
    for host, port in endpoints:
        if (norm_host(host), port) in p.managed_kafka:
            raise managed_kafka_refusal(label, f"bootstrap_servers {host}:{port}")
        if managed:
            try:
                mine = resolve(host, port)
            except (OSError, UnicodeError) as e:
                raise TransientError(
                    f"{label}: cannot resolve bootstrap server {host}: {getattr(e, 'strerror', None) or e}"
                ) from None
            if mine & managed:
                raise managed_kafka_refusal(label, f"bootstrap_servers {host}:{port}")
        checkendpoint(label, "bootstrap server", host, port, p)


def check_kafka_brokers(label: str, brokers, p: Policy | None = None) -> None:
    """Check every broker of a cluster's metadata (BrokerMetadata: .id, .host, .port)."""
    p = p or policy()
    for b in brokers:
        checkendpoint(label, f"advertised broker {b.id}", b.host, b.port, p)


def check_not_managed(label: str, cluster_id: str | None, brokers, managed, p: Policy | None = None) -> None:
    """Refuse a tenant's cluster that is the managed Kafka: the same cluster id, or an advertised
    broker at an address of the managed cluster's. `managed`: (cluster id, {(address, port)}) of
    the managed Kafka's own metadata (sinks/kafka.py asks it once per process)."""
    p = p or policy()
    managed_id, managed_brokers = managed
    if cluster_id and managed_id and cluster_id == managed_id:
        raise managed_kafka_refusal(label, f"bootstrap_servers (cluster {cluster_id})")
    taken = set(managed_brokers) | p.managed_addresses()
    for b in brokers:
        try:
            if resolve(b.host, b.port) & taken:
                raise managed_kafka_refusal(label, f"advertised broker {b.id} {b.host}:{b.port}")
        except (OSError, UnicodeError):
            continue  # check_kafka_brokers reported what cannot be resolved
