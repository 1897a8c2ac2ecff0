"""A real Kubernetes node made of plain processes: containerd (CRI, runc), kubelet, kube-proxy
(iptables mode) and kube-scheduler, with Pods in network namespaces on a bridge of our own.

It complements beam_devstack.substrate.k8s (etcd, kube-apiserver, kube-controller-manager). Use:

    node = Node(NodeSettings(state_dir=..., apiserver_url="https://10.244.0.1:PORT",
                             ca_cert=pki/"ca.crt", ca_key=pki/"ca.key", images=[...]))
    node.prepare_network()  # before kube-apiserver starts: it must bind the bridge address
    ... start the control plane, bound and advertised on settings.node_ip ...
    node.start()            # containerd, images, scheduler, kubelet (waits Ready), kube-proxy
    node.stop_workloads()   # kubelet, kube-proxy, scheduler, containers, containerd
    ... stop the control plane (kube-apiserver hangs on SIGTERM once node_ip is gone) ...
    node.stop()             # bridge, chains, sysctls: every trace on the machine (see cleanup())

    python -m beam_devstack.substrate.node cleanup --state-dir D [--bridge B ...]   # after a kill -9

Settings, and why each one is what it is (the recipe in shared/reference/real-node, re-verified
on this machine kind: 2 cores, root without CAP_SYS_RESOURCE, cgroup v1 "hybrid", no registry):

Network
- `bridge` (default beamnode0), `node_ip` (10.244.0.1, the bridge's address), `pod_cidr`
  (10.244.0.0/24), `service_cidr` (10.96.0.0/16): private ranges on a bridge this module creates.
  node_ip must lie in pod_cidr (it is the Pods' gateway) and is the kubelet's `--node-ip`: Pods
  reach the host only there, so kube-apiserver must bind and advertise it (then Pods reach it
  through the `kubernetes` ClusterIP), and so must every host server that Pods use.
- Neither range may overlap an address or route of the machine, nor each other: start() refuses.
- A chain of our own in the mangle table, `BEAMNODE-<bridge>`, jumped to first from POSTROUTING,
  drops every packet that would leave by an interface other than lo and the bridge with a source
  or destination in pod_cidr or a destination in service_cidr. So a Pod (whose default route is the
  bridge) can never send a packet off the machine, nor can a host process that reaches a ClusterIP
  that kube-proxy has not (yet) rewritten. mangle POSTROUTING sees the final output interface and
  the post-DNAT destination, and neither kube-proxy nor the kubelet writes there (in filter, their
  KUBE-FORWARD chain is inserted before ours and ACCEPTs marked and established traffic).
- CNI: bridge plugin (isGateway, ipMasq false: nothing is masqueraded to the outside) with
  host-local IPAM under the state dir and a default route through the bridge. No portmap (no
  hostPort), no masquerading; containerd's CRI adds the loopback network itself.
- Pods get a resolv.conf of our own, `nameserver <node_ip>` (nothing listens there: lookups fail
  fast, on the machine), never the host's, whose nameserver is off the machine. clusterDNS is [].
- sysctls: net.ipv4.ip_forward=1 and net.bridge.bridge-nf-call-iptables=1 (Service DNAT for
  bridged traffic). The kubelet also sets vm.overcommit_memory, vm.panic_on_oom, kernel.panic,
  kernel.panic_on_oops, kernel.keys.root_max{keys,bytes}. The values found before the first
  start are recorded under /run/beam-backfill-node/ and restored by cleanup().

containerd (1.6 from Debian)
- Own config, root, state, socket (`<state>/containerd/containerd.sock`; a unix socket path must
  stay under 108 bytes, so the state dir must be short), runc state root and `opt` dir: nothing
  under /var/lib/containerd or /opt/containerd. Fixed paths it still uses: shim sockets
  /run/containerd/s/<sha256(socket/namespace/id)>, Pod netns /run/netns/cni-*, CNI result caches
  /var/lib/cni/results (`<network>-<id>-eth0`, `cni-loopback-<id>-lo`); cleanup() removes ours.
- The root (content store, snapshots: the imported images) stays across runs, so images are
  imported once (about 5 s for 3 images, then 0.02 s); containers are purged at every stop, and
  after a kill by a temporary containerd without the CRI plugin (which would restore sandboxes).
- `restrict_oom_score_adj = true`: without it every sandbox fails with `runc create failed: ...
  can't get final child's PID from pipe: EOF` (oom_score_adj -998 needs CAP_SYS_RESOURCE).
- `sandbox_image` = the local pause image (hack/node/build-images.sh), imported into the
  k8s.io namespace: no registry is reachable. runc (`/usr/sbin/runc`, SystemdCgroup false):
  crun fails with "cgroups in hybrid mode not supported".
- apparmor off, SELinux off; CNI plugins from /usr/lib/cni (Debian's containernetworking-plugins).

kubelet (v1.34)
- cgroupDriver cgroupfs, failCgroupV1 false (v1 is in maintenance mode in 1.34: re-test before
  moving past it), failSwapOn false, oomScoreAdj 0 (it cannot lower its own), makeIPTablesUtilChains
  false; it still creates KUBE-FIREWALL (filter) and KUBE-KUBELET-CANARY chains for iptables
  and ip6tables: cleanup() removes them.
- cgroupRoot `/beam-<bridge>` (created here in every hierarchy): the stack's Pods live in a
  subtree of their own, which is how cleanup() finds and kills container processes whose shims
  are gone, and which keeps the kubelet away from cgroups that are not its own.
- root-dir, cert-dir and podLogsDir under the state dir; `--node-ip` = node_ip, `address` =
  node_ip, port free by default (the apiserver reaches it there, with
  --kubelet-preferred-address-types=InternalIP), healthz on 127.0.0.1. x509 client auth against
  the cluster CA, anonymous off. Fixed paths it still writes: /var/log/containers/*.log links and
  /var/lib/kubelet/device-plugins/kubelet.sock (not under root-dir); cleanup() removes ours.
- imageGC thresholds 100/99: local images cannot be pulled again, so they must never be collected.
- Client identity system:node:<node_name> (group system:nodes) for the Node authorizer.

kube-proxy: mode iptables, clusterCIDR = pod_cidr, metrics/healthz on 127.0.0.1, oomScoreAdj 0,
conntrack sysctl tuning off (zeros), localhostNodePorts false, nodePortAddresses node_ip/32.
Identity system:kube-proxy. Writes the KUBE-* chains (nat, filter): cleanup() removes them.

kube-scheduler: `--leader-elect=false`, on 127.0.0.1; identity system:kube-scheduler (bootstrap
RBAC); `--authentication-skip-lookup` (the control plane has no requestheader CA: else "missing
content for CA bundle" twice a second). Without a scheduler Pods stay Pending.

Certificates: EC P-256 from beam_devstack.substrate.pki.issue_cert, signed by the control plane's CA
(k8s.py writes pki/ca.crt and ca.key): kubelet client and serving (SAN node_ip), kube-proxy,
kube-scheduler; kubeconfigs point at apiserver_url with file references.

One node per machine. kube-proxy and the kubelet own machine-wide iptables chains with fixed
names (KUBE-SERVICES, KUBE-FIREWALL, ...), two kube-proxies rewrite each other's rules, and the
kubelet's device-plugin socket has a fixed path, so a second node (whatever its settings) is
refused with NodeBusy naming the running one. The machine lock is /run/beam-backfill-node/node.lock
(flock, held by the starting process) plus the owner's settings and pids in node.json (for
detached nodes): a run that was killed is detected (its processes are gone) and cleaned with its
own recorded settings before the new one starts. Bridge, guard chain, cgroup root, CNI network
name, CIDRs and ports are all parameters; what is left shared is the fixed names above (running
each node in a network and mount namespace of its own would lift the limit).
"""

from __future__ import annotations

import argparse
import dataclasses
import fcntl
import hashlib
import ipaddress
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from beam_devstack.substrate.pki import issue_cert
from beam_devstack.substrate.proc import CACHE, ManagedProcess, free_port, http_ok, progress

K8S_VERSION = "v1.34.4"
BIN_DIR = CACHE / "bin" / f"kubernetes-{K8S_VERSION}"
KUBELET_BIN = BIN_DIR / "kubelet"
KUBE_PROXY_BIN = BIN_DIR / "kube-proxy"
SCHEDULER_BIN = BIN_DIR / "kube-scheduler"
HACK = Path(__file__).resolve().parents[2]
BUILD_NODE = HACK / "node" / "build-node.sh"
BUILD_IMAGES = HACK / "node" / "build-images.sh"

PAUSE_IMAGE = "localhost/beam-backfill/pause:1"
RUNC = "/usr/sbin/runc"
CNI_BIN_DIR = "/usr/lib/cni"
CONTAINERD = "containerd"
CTR = "ctr"
MACHINE_DIR = Path("/run/beam-backfill-node")
NETNS_DIR = Path("/run/netns")
CNI_RESULTS = Path("/var/lib/cni/results")
CONTAINER_LOG_LINKS = Path("/var/log/containers")
SHIM_SOCKETS = Path("/run/containerd/s")
KUBELET_DEVICE_PLUGINS = Path("/var/lib/kubelet/device-plugins")
# Set by the kubelet (setupKernelTunables) or by us; restored by cleanup().
SYSCTLS = [
    "net/ipv4/ip_forward",
    "net/bridge/bridge-nf-call-iptables",
    "vm/overcommit_memory",
    "vm/panic_on_oom",
    "kernel/panic",
    "kernel/panic_on_oops",
    "kernel/keys/root_maxkeys",
    "kernel/keys/root_maxbytes",
]
OUR_BINARIES = {"kubelet", "kube-proxy", "kube-scheduler", "containerd", "containerd-shim-runc-v2"}


class NodeBusy(RuntimeError):
    """Another node runs on this machine (see the module docstring: one node per machine)."""


def ensure_installed() -> None:
    """Build kubelet, kube-proxy and kube-scheduler with hack/node/build-node.sh if missing."""
    if all(p.is_file() and os.access(p, os.X_OK) for p in (KUBELET_BIN, KUBE_PROXY_BIN, SCHEDULER_BIN)):
        return
    progress("node", f"building kubelet, kube-proxy, kube-scheduler {K8S_VERSION} with {BUILD_NODE.name}")
    env = dict(os.environ, BEAM_CACHE=str(CACHE), K8S_VERSION=K8S_VERSION)
    subprocess.run(["bash", str(BUILD_NODE)], env=env, check=True)


def image_archive(name: str) -> Path:
    """The OCI archive of one of hack/node/build-images.sh's images (pause, python, build),
    built first if its inputs changed."""
    out = subprocess.run(["bash", str(BUILD_IMAGES), "archive", name], check=True, capture_output=True, text=True)
    return Path(out.stdout.strip().splitlines()[-1])


@dataclasses.dataclass
class NodeSettings:
    state_dir: Path
    apiserver_url: str = ""  # https://<node_ip>:<port>; needed by start(), not by cleanup()
    ca_cert: Path | None = None  # the cluster CA (k8s.py's pki/ca.crt): signs the node's certs
    ca_key: Path | None = None
    bridge: str = "beamnode0"
    node_ip: str = "10.244.0.1"
    pod_cidr: str = "10.244.0.0/24"
    service_cidr: str = "10.96.0.0/16"
    node_name: str = "beam-node"
    kubelet_port: int = 0  # on node_ip; 0: a free port (the apiserver learns it from the Node)
    kubelet_healthz_port: int = 0  # 127.0.0.1; 0: a free port
    proxy_healthz_port: int = 0
    proxy_metrics_port: int = 0
    scheduler_port: int = 0
    images: list[Path] = dataclasses.field(default_factory=list)  # OCI archives to import
    detach: bool = False  # True: processes outlive this Python process (beam-dev up)

    def __post_init__(self) -> None:
        self.state_dir = Path(self.state_dir).resolve()
        self.images = [Path(p) for p in self.images]

    @property
    def chain(self) -> str:
        return f"BEAMNODE-{self.bridge}"

    @property
    def cgroup_name(self) -> str:
        return f"beam-{self.bridge}"

    @property
    def cni_network(self) -> str:
        return f"beam-{self.bridge}"

    @property
    def containerd_socket(self) -> Path:
        return self.state_dir / "containerd" / "containerd.sock"

    @property
    def kubernetes_service_ip(self) -> str:
        return str(next(ipaddress.ip_network(self.service_cidr).hosts()))

    def to_json(self) -> dict[str, Any]:
        return {
            k: (str(v) if isinstance(v, Path) else v)
            for k, v in dataclasses.asdict(self).items()
            if k in ("state_dir", "bridge", "node_ip", "pod_cidr", "service_cidr", "node_name")
        }

    def validate(self) -> None:
        if not re.fullmatch(r"[a-zA-Z][a-zA-Z0-9_-]{0,14}", self.bridge):
            raise ValueError(f"bridge name {self.bridge!r}: 1-15 characters, letters, digits, _ and -")
        pods = ipaddress.ip_network(self.pod_cidr)
        svcs = ipaddress.ip_network(self.service_cidr)
        if ipaddress.ip_address(self.node_ip) not in pods:
            raise ValueError(f"node_ip {self.node_ip} is not in pod_cidr {self.pod_cidr} (it is the Pods' gateway)")
        if pods.overlaps(svcs):
            raise ValueError(f"pod_cidr {self.pod_cidr} overlaps service_cidr {self.service_cidr}")
        if len(str(self.containerd_socket)) + len(".ttrpc") >= 108:
            raise ValueError(f"state dir too long for a unix socket path: {self.containerd_socket}")

    def check_host(self) -> None:
        """Neither range may overlap an address or route of the machine (checked after the
        leftovers of a killed run, whose bridge would overlap, are cleaned)."""
        for net, what in (
            (ipaddress.ip_network(self.pod_cidr), "pod_cidr"),
            (ipaddress.ip_network(self.service_cidr), "service_cidr"),
        ):
            for other, where in _host_networks(exclude_dev=self.bridge):
                if net.overlaps(other):
                    raise ValueError(f"{what} {net} overlaps {other} ({where}) on this machine: choose another range")


class Node:
    def __init__(self, settings: NodeSettings) -> None:
        self.s = settings
        self.dir = settings.state_dir
        self.pki = self.dir / "pki"
        self.logs = self.dir / "logs"
        self.pids = self.dir / "pids"
        self.procs: dict[str, ManagedProcess] = {}
        self._lock_fd: int | None = None
        self.timings: dict[str, float] = {}

    # -- public --------------------------------------------------------------------------

    def prepare_network(self) -> Node:
        """Take the machine lock, clean what an earlier (killed) run left, then create the bridge
        with node_ip, our guard chain and the sysctls. Call before kube-apiserver starts."""
        t0 = time.monotonic()
        self.s.validate()
        ensure_installed()
        self._acquire_machine()
        try:
            self.s.check_host()
            _record_sysctls()
            _write_sysctl("net/ipv4/ip_forward", "1")
            _write_sysctl("net/bridge/bridge-nf-call-iptables", "1")
            _ip("link", "add", self.s.bridge, "type", "bridge")
            prefix = ipaddress.ip_network(self.s.pod_cidr).prefixlen
            _ip("addr", "add", f"{self.s.node_ip}/{prefix}", "dev", self.s.bridge)
            _ip("link", "set", self.s.bridge, "up")
            self._add_guard_chain()
        except BaseException:
            self.stop()
            raise
        self.timings["network"] = time.monotonic() - t0
        progress("node", f"bridge {self.s.bridge} {self.s.node_ip}/{prefix} up, guard chain mangle/{self.s.chain}")
        return self

    def join(self, plane) -> Node:
        """start() as a node of `plane` (a k8s.ControlPlane with this node's node_ip): its
        apiserver, and its CA, which signs the node's certificates."""
        self.s.apiserver_url = plane.server
        self.s.ca_cert, self.s.ca_key = plane.pki / "ca.crt", plane.pki / "ca.key"
        return self.start()

    def start(self) -> Node:
        """containerd, images, kube-scheduler, kubelet (until the Node is Ready), kube-proxy
        (until the `kubernetes` Service is written). On failure everything is stopped again."""
        if self._lock_fd is None:
            self.prepare_network()
        assert self.s.apiserver_url and self.s.ca_cert and self.s.ca_key, "apiserver_url, ca_cert, ca_key are needed"
        t0 = time.monotonic()
        try:
            for p in (
                "kubelet_port",
                "kubelet_healthz_port",
                "proxy_healthz_port",
                "proxy_metrics_port",
                "scheduler_port",
            ):
                if not getattr(self.s, p):
                    setattr(self.s, p, free_port())
            self._make_cgroup_root()
            self._write_pki()
            self._write_configs()
            self._start_containerd()
            self._import_images()
            self._start_scheduler()
            self._start_kubelet()
            self._start_kube_proxy()
        except BaseException:
            self.stop()
            raise
        self.timings["start"] = time.monotonic() - t0
        if self.s.detach and self._lock_fd is not None:
            # A detached node outlives this process: its owner record (node.json, whose live
            # processes _owner_alive finds) keeps other nodes off from now on. Holding the flock
            # too would make this very process's `beam-dev down` (hack/demo --down) take its
            # own node for another one, and leave it running.
            os.close(self._lock_fd)
            self._lock_fd = None
        progress(
            "node",
            f"node {self.s.node_name} Ready in {self.timings['start']:.1f}s "
            f"(scheduler, kubelet, kube-proxy, containerd on {self.s.containerd_socket})",
        )
        return self

    def stop_workloads(self) -> None:
        """Stop kube-proxy, the kubelet, the scheduler, every container and containerd, but keep
        the bridge (and so node_ip) and the lock: stop the control plane after this and before
        stop(). kube-apiserver bound on node_ip hangs on SIGTERM until SIGKILL once the address
        is gone."""
        for name in ("kube-proxy", "kubelet", "kube-scheduler"):
            proc = self.procs.pop(name, None)
            if proc is not None:
                proc.stop(grace=10)
        if self._lock_fd is not None:
            done = cleanup(self.s, containerd=self.procs.get("containerd"), locked=True, network=False)
            progress("node", f"workloads stopped: {', '.join(done) or 'nothing running'}")
        self.procs.pop("containerd", None)

    def stop(self) -> None:
        """Stop every process and remove every trace (see cleanup())."""
        if self._lock_fd is None and not self.procs:
            return  # never started (or already stopped): nothing of ours runs
        t0 = time.monotonic()
        for name in ("kube-proxy", "kubelet", "kube-scheduler"):
            proc = self.procs.pop(name, None)
            if proc is not None:
                proc.stop(grace=10)
        cleanup(self.s, containerd=self.procs.get("containerd"), locked=self._lock_fd is not None)
        self.procs.pop("containerd", None)
        self._release_machine()
        self.timings["stop"] = time.monotonic() - t0
        progress("node", f"node stopped and cleaned in {self.timings['stop']:.1f}s")

    def alive(self) -> bool:
        return bool(self.procs) and all(p.alive() for p in self.procs.values())

    def endpoints(self) -> dict[str, Any]:
        return {
            "node_name": self.s.node_name,
            "node_ip": self.s.node_ip,
            "bridge": self.s.bridge,
            "containerd_socket": str(self.s.containerd_socket),
            "pod_cidr": self.s.pod_cidr,
            "service_cidr": self.s.service_cidr,
            "state_dir": str(self.dir),
        }

    def ctr(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(
            [CTR, "--address", str(self.s.containerd_socket), "-n", "k8s.io", *args],
            capture_output=True,
            text=True,
            check=check,
            timeout=120,
        )

    def import_image(self, archive: Path) -> None:
        """Import an OCI archive (podman save --format oci-archive) where the CRI looks for images."""
        self.ctr("images", "import", str(archive))

    # -- machine lock --------------------------------------------------------------------

    def _acquire_machine(self) -> None:
        MACHINE_DIR.mkdir(parents=True, exist_ok=True)
        fd = os.open(MACHINE_DIR / "node.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise NodeBusy(
                f"another beam node runs on this machine: {_owner_text()}. kube-proxy's and the "
                f"kubelet's iptables chains are per machine, so one node per machine; stop it first "
                f"(its Node.stop(), or `python -m beam_devstack.substrate.node cleanup --state-dir DIR`)"
            ) from None
        owner = _read_owner()
        if owner and _owner_alive(owner):
            os.close(fd)
            raise NodeBusy(f"another beam node runs on this machine (detached): {_owner_text()}; stop it first")
        self._lock_fd = fd
        if owner:
            # Left by a run that was killed: clean with *its* settings (bridge, chain, dirs) first.
            progress("node", f"cleaning after an earlier run that did not stop: {json.dumps(owner['settings'])}")
            cleanup(_settings_from_owner(owner), locked=True)
        cleanup(self.s, locked=True)  # same settings: a leftover state dir, mounts, processes
        _write_owner(self.s, self.pids)

    def _release_machine(self) -> None:
        (MACHINE_DIR / "node.json").unlink(missing_ok=True)
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # -- network -------------------------------------------------------------------------

    def _add_guard_chain(self) -> None:
        c = self.s.chain
        rules = [
            "-o lo -j RETURN",
            f"-o {self.s.bridge} -j RETURN",
            f"-s {self.s.pod_cidr} -j DROP",
            f"-d {self.s.pod_cidr} -j DROP",
            f"-d {self.s.service_cidr} -j DROP",
        ]
        _iptables_restore(
            "iptables", "mangle", [f":{c} - [0:0]", *(f"-A {c} {r}" for r in rules), f"-I POSTROUTING 1 -j {c}"]
        )

    def _make_cgroup_root(self) -> None:
        for hier in _cgroup_hierarchies():
            d = hier / self.s.cgroup_name
            d.mkdir(exist_ok=True)
            for f in ("cpuset.cpus", "cpuset.mems"):  # an empty cpuset admits no task
                if (hier / f).exists() and not (d / f).read_text().strip():
                    (d / f).write_text((hier / f).read_text())

    # -- files ---------------------------------------------------------------------------

    def _write_pki(self) -> None:
        shutil.rmtree(self.pki, ignore_errors=True)
        self.pki.mkdir(parents=True)
        ca, key = Path(self.s.ca_cert), Path(self.s.ca_key)
        shutil.copy(ca, self.pki / "ca.crt")
        name = self.s.node_name
        issue_cert(self.pki / "kubelet", ca, key, f"system:node:{name}", org="system:nodes")
        issue_cert(
            self.pki / "kubelet-serving", ca, key, name, server=True, ips=(self.s.node_ip, "127.0.0.1"), dns=(name,)
        )
        issue_cert(self.pki / "kube-proxy", ca, key, "system:kube-proxy")
        issue_cert(self.pki / "kube-scheduler", ca, key, "system:kube-scheduler")
        for user in ("kubelet", "kube-proxy", "kube-scheduler"):
            write_kubeconfig(
                self.pki / f"{user}.kubeconfig",
                self.s.apiserver_url,
                self.pki / "ca.crt",
                self.pki / f"{user}.crt",
                self.pki / f"{user}.key",
                user,
            )

    def _write_configs(self) -> None:
        s, d = self.s, self.dir
        for sub in ("containerd", "cni/net.d", "cni/ipam", "kubelet", "pod-logs", "logs"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        (d / "resolv.conf").write_text(f"nameserver {s.node_ip}\noptions ndots:1 timeout:1 attempts:1\n")
        (d / "cni/net.d/10-beam.conflist").write_text(
            json.dumps(
                {
                    "cniVersion": "1.0.0",
                    "name": s.cni_network,
                    "plugins": [
                        {
                            "type": "bridge",
                            "bridge": s.bridge,
                            "isGateway": True,
                            "ipMasq": False,
                            "hairpinMode": True,
                            "ipam": {
                                "type": "host-local",
                                "dataDir": str(d / "cni/ipam"),
                                "ranges": [[{"subnet": s.pod_cidr, "gateway": s.node_ip}]],
                                "routes": [{"dst": "0.0.0.0/0"}],
                            },
                        }
                    ],
                },
                indent=2,
            )
        )
        cd = d / "containerd"
        (cd / "config.toml").write_text(_containerd_toml(cd, d / "cni/net.d", cri=True))
        (cd / "config-nocri.toml").write_text(_containerd_toml(cd, d / "cni/net.d", cri=False))
        (d / "kubelet-config.json").write_text(
            json.dumps(
                {
                    "apiVersion": "kubelet.config.k8s.io/v1beta1",
                    "kind": "KubeletConfiguration",
                    "containerRuntimeEndpoint": f"unix://{s.containerd_socket}",
                    "cgroupDriver": "cgroupfs",
                    "cgroupRoot": f"/{s.cgroup_name}",
                    "cgroupsPerQOS": True,
                    "enforceNodeAllocatable": ["pods"],
                    "failCgroupV1": False,
                    "failSwapOn": False,
                    "oomScoreAdj": 0,
                    "makeIPTablesUtilChains": False,
                    "protectKernelDefaults": False,
                    "address": s.node_ip,
                    "port": s.kubelet_port,
                    "readOnlyPort": 0,
                    "healthzBindAddress": "127.0.0.1",
                    "healthzPort": s.kubelet_healthz_port,
                    "tlsCertFile": str(self.pki / "kubelet-serving.crt"),
                    "tlsPrivateKeyFile": str(self.pki / "kubelet-serving.key"),
                    "rotateCertificates": False,
                    "serverTLSBootstrap": False,
                    "authentication": {
                        "anonymous": {"enabled": False},
                        "webhook": {"enabled": False},
                        "x509": {"clientCAFile": str(self.pki / "ca.crt")},
                    },
                    "authorization": {"mode": "AlwaysAllow"},
                    "resolvConf": str(d / "resolv.conf"),
                    "clusterDomain": "cluster.local",
                    "clusterDNS": [],
                    "podLogsDir": str(d / "pod-logs"),
                    "registerNode": True,
                    "serializeImagePulls": False,
                    "imageGCHighThresholdPercent": 100,
                    "imageGCLowThresholdPercent": 99,
                    "evictionHard": {
                        "memory.available": "100Mi",
                        "nodefs.available": "1%",
                        "imagefs.available": "1%",
                        "nodefs.inodesFree": "1%",
                    },
                    "syncFrequency": "10s",
                    "fileCheckFrequency": "10s",
                    "nodeStatusUpdateFrequency": "5s",
                    "kubeAPIQPS": 50,
                    "kubeAPIBurst": 100,
                    "localStorageCapacityIsolation": True,
                    "shutdownGracePeriod": "0s",
                },
                indent=2,
            )
        )
        (d / "kube-proxy-config.json").write_text(
            json.dumps(
                {
                    "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
                    "kind": "KubeProxyConfiguration",
                    "mode": "iptables",
                    "clientConnection": {"kubeconfig": str(self.pki / "kube-proxy.kubeconfig")},
                    "hostnameOverride": s.node_name,
                    "clusterCIDR": s.pod_cidr,
                    "bindAddress": "127.0.0.1",
                    "healthzBindAddress": f"127.0.0.1:{s.proxy_healthz_port}",
                    "metricsBindAddress": f"127.0.0.1:{s.proxy_metrics_port}",
                    "oomScoreAdj": 0,
                    "conntrack": {
                        "maxPerCore": 0,
                        "min": 0,
                        "tcpEstablishedTimeout": "0s",
                        "tcpCloseWaitTimeout": "0s",
                    },
                    "iptables": {"masqueradeAll": False, "localhostNodePorts": False},
                    "nodePortAddresses": [f"{s.node_ip}/32"],
                },
                indent=2,
            )
        )

    # -- processes -----------------------------------------------------------------------

    def _proc(self, name: str, argv: list[Any]) -> ManagedProcess:
        proc = ManagedProcess(
            name, argv, log_path=self.logs / f"{name}.log", detach=self.s.detach, pid_dir=self.pids
        ).start()
        self.procs[name] = proc
        _write_owner(self.s, self.pids)
        return proc

    def _start_containerd(self) -> None:
        t0 = time.monotonic()
        proc = self._proc(
            "containerd", [CONTAINERD, "--config", self.dir / "containerd/config.toml", "--log-level", "warn"]
        )
        (self.dir / "containerd/dirty").touch()
        proc.wait_ready(lambda: self.ctr("version", check=False).returncode == 0, 30, "serving its socket")
        proc.wait_ready(self._cri_ready, 30, "CRI runtime ready")
        self.timings["containerd"] = time.monotonic() - t0

    def _cri_ready(self) -> bool:
        out = subprocess.run(
            [CTR, "--address", str(self.s.containerd_socket), "plugins", "ls"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout
        return any(
            "io.containerd.grpc.v1" in line and " cri " in f" {line} " and line.rstrip().endswith("ok")
            for line in out.splitlines()
        )

    def _import_images(self) -> None:
        t0 = time.monotonic()
        have = set(self.ctr("images", "ls", "-q").stdout.split())
        stamp = self.dir / "containerd/imported.json"
        done = json.loads(stamp.read_text()) if stamp.exists() else {}
        for archive in self.s.images:
            ref = _archive_ref(archive)
            if done.get(str(archive)) == ref and ref in have:
                continue  # this very archive is in containerd's store already (kept across runs)
            self.import_image(archive)
            done[str(archive)] = ref
            stamp.write_text(json.dumps(done))
        if PAUSE_IMAGE not in set(self.ctr("images", "ls", "-q").stdout.split()):
            raise RuntimeError(
                f"sandbox image {PAUSE_IMAGE} is not in containerd: pass its archive in images "
                f"(beam_devstack.substrate.node.image_archive('pause'))"
            )
        self.timings["images"] = time.monotonic() - t0

    def _start_scheduler(self) -> None:
        kc = self.pki / "kube-scheduler.kubeconfig"
        proc = self._proc(
            "kube-scheduler",
            [
                SCHEDULER_BIN,
                f"--kubeconfig={kc}",
                f"--authentication-kubeconfig={kc}",
                f"--authorization-kubeconfig={kc}",
                "--bind-address=127.0.0.1",
                f"--secure-port={self.s.scheduler_port}",
                "--leader-elect=false",
                "--profiling=false",
                f"--cert-dir={self.dir / 'scheduler-certs'}",
                # The control plane has no front proxy (no requestheader CA); without this the
                # scheduler logs "missing content for CA bundle" twice a second.
                "--authentication-skip-lookup=true",
            ],
        )
        proc.wait_ready(
            lambda: http_ok(f"https://127.0.0.1:{self.s.scheduler_port}/healthz", verify=False), 60, "healthy"
        )

    def _start_kubelet(self) -> None:
        t0 = time.monotonic()
        proc = self._proc(
            "kubelet",
            [
                KUBELET_BIN,
                f"--config={self.dir / 'kubelet-config.json'}",
                f"--kubeconfig={self.pki / 'kubelet.kubeconfig'}",
                f"--hostname-override={self.s.node_name}",
                f"--node-ip={self.s.node_ip}",
                f"--root-dir={self.dir / 'kubelet'}",
                f"--cert-dir={self.dir / 'kubelet/pki'}",
                "-v=1",
            ],
        )
        proc.wait_ready(lambda: http_ok(f"http://127.0.0.1:{self.s.kubelet_healthz_port}/healthz"), 60, "healthy")
        proc.wait_ready(self._node_ready, 120, f"registered and Ready as Node {self.s.node_name}")
        self.timings["kubelet_ready"] = time.monotonic() - t0

    def _node_ready(self) -> bool:
        node = read_node(self.s.apiserver_url, self.pki, "kubelet", self.s.node_name)
        return any(c["type"] == "Ready" and c["status"] == "True" for c in node["status"].get("conditions", []))

    def _start_kube_proxy(self) -> None:
        proc = self._proc("kube-proxy", [KUBE_PROXY_BIN, f"--config={self.dir / 'kube-proxy-config.json'}"])
        want = self.s.kubernetes_service_ip
        proc.wait_ready(
            lambda: (
                want
                in subprocess.run(
                    ["iptables", "-w", "-t", "nat", "-S", "KUBE-SERVICES"], capture_output=True, text=True
                ).stdout
            ),
            60,
            f"writing the rules of the kubernetes Service {want}",
        )


def read_node(server: str, pki: Path, user: str, name: str) -> dict:
    """The Node `name` as JSON, read from the apiserver at `server` with the kubernetes client as
    `user` (pki/<user>.crt and .key, trusting pki/ca.crt). The answer's JSON, not the client's
    model: a wait polls this, and a field the model's validation refuses must not stall it."""
    from kubernetes import client

    cfg = client.Configuration()
    cfg.host = server
    cfg.ssl_ca_cert = str(pki / "ca.crt")
    cfg.cert_file, cfg.key_file = str(pki / f"{user}.crt"), str(pki / f"{user}.key")
    with client.ApiClient(cfg) as api:
        answer = client.CoreV1Api(api).read_node(name, _request_timeout=5, _preload_content=False)
        return json.loads(answer.data)


# --- cleanup -----------------------------------------------------------------------------


def cleanup(
    s: NodeSettings, *, containerd: ManagedProcess | None = None, locked: bool = False, network: bool = True
) -> list[str]:
    """Remove every trace of the node with settings s, whether it stopped or was killed:
    processes (by the state dir in their command line and by pid file), container processes (by
    the stack's cgroup subtree), containers in containerd (with a CRI-less containerd when ours is
    gone), shims, mounts under the state dir, the Pods' network namespaces, the bridge, our guard
    chain, the KUBE-* chains of kubelet and kube-proxy (iptables and ip6tables), CNI result files,
    /var/log/containers links into the state dir, the cgroup subtree, and the sysctls the node
    changed. Idempotent. Returns what it removed, for the log. network=False keeps the bridge,
    the chains, the sysctls and the cgroup root (Node.stop_workloads)."""
    done: list[str] = []
    d = s.state_dir
    own_lock = None
    if not locked:
        MACHINE_DIR.mkdir(parents=True, exist_ok=True)
        own_lock = os.open(MACHINE_DIR / "node.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(own_lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(own_lock)
            raise NodeBusy(f"a beam node runs on this machine ({_owner_text()}); it cleans up when it stops") from None
    try:
        # 0. Read the sandboxes' netns paths and ids from the OCI bundles first: when a sandbox's
        #    processes die, the CRI deletes its task and with it the bundle.
        netns = _bundle_netns(d / "containerd/state")
        sandboxes = _bundle_ids(d / "containerd/state")
        # 1. Our processes other than containerd: kubelet and kube-proxy first, so nothing restarts Pods.
        live = containerd is not None and containerd.alive()
        n = _kill_processes(d, keep={"containerd", "containerd-shim-runc-v2"} if live else set())
        if n:
            done.append(f"{n} processes")
        # 2. Container processes, by cgroup: they outlive a killed shim.
        n = _kill_cgroup(s.cgroup_name)
        if n:
            done.append(f"{n} container processes")
        # 3. Containers, their tasks and snapshots: through our containerd, or a temporary one
        #    without the CRI (so that it does not restore the sandboxes) when ours is gone.
        if (d / "containerd/dirty").exists() or (containerd is not None and containerd.alive()):
            n = _purge_containers(s, containerd)
            if n:
                done.append(f"{n} containers")
        if containerd is not None:
            containerd.stop(grace=10)
        n = _kill_processes(d)  # shims, a temporary containerd
        if n:
            done.append(f"{n} shims")
        (d / "containerd/dirty").unlink(missing_ok=True)
        # 4. Mounts under the state dir (rootfs overlays, shm, volumes), the Pods' netns.
        n = _umount_under(d)
        for ns in netns:
            if _umount(ns):
                n += 1
            Path(ns).unlink(missing_ok=True)
        if n:
            done.append(f"{n} mounts")
        for sub in ("containerd/state", "kubelet", "cni/ipam", "pod-logs", "scheduler-certs", "runc", "pids"):
            shutil.rmtree(d / sub, ignore_errors=True)
        if not network:
            return done
        # 5. Network: bridge, our chain, kubelet's and kube-proxy's chains.
        if subprocess.run(["ip", "link", "show", s.bridge], capture_output=True).returncode == 0:
            _ip("link", "del", s.bridge)
            done.append(f"bridge {s.bridge}")
        n = _remove_chains("iptables", lambda c: c == s.chain, tables=("mangle",))
        if n:
            done.append(f"chain {s.chain}")
        for tool in ("iptables", "ip6tables"):
            n = _remove_chains(tool, lambda c: c.startswith("KUBE-"))
            if n:
                done.append(f"{n} KUBE-* chains ({tool})")
        # 6. Files outside the state dir, cgroups, sysctls.
        n = _remove_machine_files(s, sandboxes)
        if n:
            done.append(f"{n} files outside the state dir")
        n = _remove_cgroup(s.cgroup_name)
        if n:
            done.append(f"{n} cgroups")
        if _restore_sysctls():
            done.append("sysctls restored")
    finally:
        if own_lock is not None:
            (MACHINE_DIR / "node.json").unlink(missing_ok=True)
            os.close(own_lock)
    if done:
        progress("node", f"cleaned {d}: {', '.join(done)}")
    return done


def _kill_processes(state_dir: Path, keep: Iterable[str] = ()) -> int:
    """SIGKILL our binaries whose command line names the state dir (never this process)."""
    keep = set(keep)
    me = {os.getpid(), os.getppid()}
    victims = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit() or int(p.name) in me:
            continue
        try:
            argv = (p / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if not argv or not argv[0]:
            continue
        exe = os.path.basename(argv[0].decode(errors="replace"))
        # "<state_dir>/": a state dir /x/node must not match another node's /x/node2.
        if exe in OUR_BINARIES and exe not in keep and (str(state_dir) + "/").encode() in b" ".join(argv):
            victims.append(int(p.name))
    for pid in victims:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    _wait_gone(victims, 10)
    return len(victims)


def _wait_gone(pids: list[int], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for pid in pids:
        while time.monotonic() < deadline:
            try:
                stat = Path(f"/proc/{pid}/stat").read_text()
            except OSError:
                break
            if stat.split(") ", 1)[1].startswith("Z"):
                try:
                    os.waitpid(pid, os.WNOHANG)  # a child of ours
                except ChildProcessError:
                    pass
            time.sleep(0.05)


def _cgroup_hierarchies() -> list[Path]:
    """Mount points of the cgroup v1 hierarchies and of the v2 one (hybrid: /sys/fs/cgroup/unified)."""
    out = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        fstype = right.split()[0]
        if fstype in ("cgroup", "cgroup2"):
            out.append(Path(left.split()[4]))
    return out


def _kill_cgroup(name: str) -> int:
    killed: set[int] = set()
    for _ in range(50):
        pids = set()
        for hier in _cgroup_hierarchies():
            root = hier / name
            # os.walk, not rglob: cgroups of containers that exit meanwhile vanish under the walk,
            # and rglob raises on a directory gone between listing and entering it.
            for parent, _, files in os.walk(root, onerror=lambda e: None):
                if "cgroup.procs" not in files:
                    continue
                try:
                    pids.update(int(x) for x in (Path(parent) / "cgroup.procs").read_text().split())
                except OSError:
                    pass
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        killed |= pids
        time.sleep(0.1)
    return len(killed)


def _remove_cgroup(name: str) -> int:
    n = 0
    for hier in _cgroup_hierarchies():
        root = hier / name
        if not root.is_dir():
            continue
        for parent, dirs, _ in os.walk(root, topdown=False, onerror=lambda e: None):  # deepest first
            for d in dirs:
                try:
                    (Path(parent) / d).rmdir()
                    n += 1
                except OSError:
                    pass
        try:
            root.rmdir()
            n += 1
        except OSError:
            pass
    return n


def _bundle_ids(task_state: Path) -> set[str]:
    return {p.name for p in task_state.glob("io.containerd.runtime.v2.task/*/*") if p.is_dir()}


def _remove_machine_files(s: NodeSettings, sandboxes: set[str]) -> int:
    """What containerd, CNI and the kubelet write outside the state dir, whatever we configure:
    shim sockets in /run/containerd/s (named sha256(<socket>/<namespace>/<id>)), CNI result
    caches in /var/lib/cni/results (ours: `<network>-<id>-eth0`, and `cni-loopback-<id>-lo` for
    the same ids), /var/log/containers links into our pod-logs, and the kubelet's device plugin
    socket (/var/lib/kubelet/device-plugins/kubelet.sock: a path fixed in the kubelet). Empty
    parent directories go too."""
    n = 0
    ids = set(sandboxes)
    if CNI_RESULTS.is_dir():
        for f in CNI_RESULTS.glob(f"{s.cni_network}-*-eth0"):
            ids.add(f.name[len(s.cni_network) + 1 : -len("-eth0")])
    files = [CNI_RESULTS / f"{s.cni_network}-{i}-eth0" for i in ids]
    files += [CNI_RESULTS / f"cni-loopback-{i}-lo" for i in ids]
    for i in ids:
        for ns in ("k8s.io",):
            digest = hashlib.sha256(f"{s.containerd_socket}/{ns}/{i}".encode()).hexdigest()
            files.append(SHIM_SOCKETS / digest)
    if CONTAINER_LOG_LINKS.is_dir():
        files += [
            p
            for p in CONTAINER_LOG_LINKS.iterdir()
            if p.is_symlink() and os.readlink(p).startswith(str(s.state_dir) + "/")
        ]
    files.append(KUBELET_DEVICE_PLUGINS / "kubelet.sock")
    for f in files:
        try:
            f.unlink()
            n += 1
        except FileNotFoundError:
            pass
    for empty in (
        SHIM_SOCKETS,
        SHIM_SOCKETS.parent,
        CNI_RESULTS,
        CNI_RESULTS.parent,
        CONTAINER_LOG_LINKS,
        KUBELET_DEVICE_PLUGINS,
        KUBELET_DEVICE_PLUGINS.parent,
        NETNS_DIR,
    ):
        try:
            empty.rmdir()
        except OSError:
            pass
    return n


def _bundle_netns(task_state: Path) -> list[str]:
    """Network namespaces of the sandboxes, read from the OCI bundles the shims were given."""
    out = []
    for cfg in task_state.glob("io.containerd.runtime.v2.task/*/*/config.json"):
        try:
            spec = json.loads(cfg.read_text())
        except (OSError, ValueError):
            continue
        for ns in spec.get("linux", {}).get("namespaces", []):
            path = ns.get("path", "")
            if ns.get("type") == "network" and path.startswith(("/var/run/netns/", "/run/netns/")):
                out.append(path)
    return sorted(set(out))


def _purge_containers(s: NodeSettings, containerd: ManagedProcess | None) -> int:
    sock = s.containerd_socket
    temp = None
    if containerd is None or not containerd.alive():
        cfg = s.state_dir / "containerd/config-nocri.toml"
        if not cfg.exists() or not (s.state_dir / "containerd/root").exists():
            return 0
        temp = ManagedProcess(
            "containerd-cleanup",
            [CONTAINERD, "--config", cfg, "--log-level", "warn"],
            log_path=s.state_dir / "logs/containerd-cleanup.log",
        ).start()
        try:
            temp.wait_ready(lambda: _ctr(sock, "version").returncode == 0, 30, "serving its socket")
        except Exception as e:  # noqa: BLE001 - cleanup goes on without it
            progress("node", f"cleanup: temporary containerd did not start ({e}); containers stay in its store")
            temp.stop()
            return 0
    n = 0
    try:
        for cid in _ctr(sock, "tasks", "ls", "-q").stdout.split():
            _ctr(sock, "tasks", "kill", "-s", "KILL", cid)
        for cid in _ctr(sock, "tasks", "ls", "-q").stdout.split():
            _ctr(sock, "tasks", "delete", "-f", cid)
        for cid in _ctr(sock, "containers", "ls", "-q").stdout.split():
            if _ctr(sock, "containers", "delete", cid).returncode == 0:
                n += 1
    finally:
        if temp is not None:
            temp.stop(grace=10)
    return n


def _ctr(sock: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [CTR, "--address", str(sock), "-n", "k8s.io", *args], capture_output=True, text=True, timeout=60
    )


def _mounts() -> list[str]:
    out = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        mp = line.split()[4].replace("\\040", " ")
        out.append(mp)
    return out


def _umount(path: str) -> bool:
    return subprocess.run(["umount", "-l", path], capture_output=True).returncode == 0


def _umount_under(d: Path) -> int:
    prefix = str(d) + "/"
    n = 0
    for _ in range(5):
        targets = sorted({m for m in _mounts() if m.startswith(prefix)}, key=len, reverse=True)
        if not targets:
            break
        n += sum(_umount(m) for m in targets)
    return n


def _iptables_restore(tool: str, table: str, lines: list[str]) -> None:
    data = f"*{table}\n" + "\n".join(lines) + "\nCOMMIT\n"
    subprocess.run([f"{tool}-restore", "-w", "--noflush"], input=data, text=True, check=True, capture_output=True)


def _remove_chains(tool: str, match, tables: Iterable[str] = ("filter", "nat", "mangle", "raw")) -> int:
    """Delete the chains `match` selects in the given tables, with every rule that jumps to them."""
    removed = 0
    for table in tables:
        out = subprocess.run([f"{tool}-save", "-t", table], capture_output=True, text=True).stdout
        chains = [ln[1:].split()[0] for ln in out.splitlines() if ln.startswith(":") and match(ln[1:].split()[0])]
        if not chains:
            continue
        lines = []
        for rule in out.splitlines():
            if rule.startswith("-A "):
                parts = rule.split()
                owner = parts[1]
                target = (
                    parts[parts.index("-j") + 1]
                    if "-j" in parts
                    else (parts[parts.index("-g") + 1] if "-g" in parts else "")
                )
                if target in chains and owner not in chains:
                    lines.append("-D" + rule[2:])
        lines += [f"-F {c}" for c in chains] + [f"-X {c}" for c in chains]
        _iptables_restore(tool, table, lines)
        removed += len(chains)
    return removed


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


def _host_networks(exclude_dev: str) -> list[tuple[ipaddress.IPv4Network, str]]:
    """IPv4 networks of the machine's addresses and routes (not those of our own bridge)."""
    out = []
    addrs = json.loads(subprocess.run(["ip", "-j", "-4", "addr"], capture_output=True, text=True).stdout or "[]")
    for link in addrs:
        if link.get("ifname") == exclude_dev:
            continue
        for a in link.get("addr_info", []):
            out.append(
                (ipaddress.ip_network(f"{a['local']}/{a['prefixlen']}", strict=False), f"address on {link['ifname']}")
            )
    routes = json.loads(
        subprocess.run(["ip", "-j", "-4", "route", "show", "table", "all"], capture_output=True, text=True).stdout
        or "[]"
    )
    for r in routes:
        dst = r.get("dst", "")
        if dst in ("default", "") or r.get("dev") == exclude_dev or r.get("type") in ("local", "broadcast"):
            continue
        try:
            out.append((ipaddress.ip_network(dst, strict=False), f"route via {r.get('dev', '?')}"))
        except ValueError:
            pass
    return out


# --- sysctls -----------------------------------------------------------------------------


def _sysctl_path(name: str) -> Path:
    return Path("/proc/sys") / name


def _write_sysctl(name: str, value: str) -> None:
    p = _sysctl_path(name)
    if p.exists():
        p.write_text(value)


def _record_sysctls() -> None:
    """Remember the machine's values once (the first start after boot, or after a restore)."""
    f = MACHINE_DIR / "sysctl.json"
    if f.exists():
        return
    values = {n: _sysctl_path(n).read_text().strip() for n in SYSCTLS if _sysctl_path(n).exists()}
    f.write_text(json.dumps(values))


def _restore_sysctls() -> bool:
    f = MACHINE_DIR / "sysctl.json"
    if not f.exists():
        return False
    for name, value in json.loads(f.read_text()).items():
        try:
            _write_sysctl(name, value)
        except OSError:
            pass
    f.unlink()
    return True


# --- machine owner record ----------------------------------------------------------------


def _write_owner(s: NodeSettings, pid_dir: Path) -> None:
    pids = {}
    for f in pid_dir.glob("*.pid") if pid_dir.is_dir() else ():
        try:
            pids[f.stem] = int(f.read_text())
        except ValueError:
            pass
    (MACHINE_DIR / "node.json").write_text(
        json.dumps({"settings": s.to_json(), "owner_pid": os.getpid(), "pids": pids})
    )


def _read_owner() -> dict | None:
    try:
        return json.loads((MACHINE_DIR / "node.json").read_text())
    except (OSError, ValueError):
        return None


def _owner_alive(owner: dict) -> bool:
    state = owner.get("settings", {}).get("state_dir", "\0") + "/"
    for pid in owner.get("pids", {}).values():
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        if state.encode() in argv:
            return True
    return False


def _owner_text() -> str:
    owner = _read_owner()
    if not owner:
        return "(no owner record)"
    s = owner["settings"]
    return (
        f"bridge {s['bridge']} {s['node_ip']}, pods {s['pod_cidr']}, services {s['service_cidr']}, "
        f"state dir {s['state_dir']}, started by pid {owner.get('owner_pid')}"
    )


def _settings_from_owner(owner: dict) -> NodeSettings:
    return NodeSettings(**owner["settings"])


# --- kubeconfigs (the certificates come from pki.issue_cert, the control plane's CA) ---------


def write_kubeconfig(path: Path, server: str, ca: Path, crt: Path, key: Path, user: str) -> None:
    """A kubeconfig (JSON is YAML) with file references."""
    path.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "beam-local", "cluster": {"server": server, "certificate-authority": str(ca)}}],
                "users": [{"name": user, "user": {"client-certificate": str(crt), "client-key": str(key)}}],
                "contexts": [{"name": "beam-local", "context": {"cluster": "beam-local", "user": user}}],
                "current-context": "beam-local",
            },
            indent=2,
        )
    )
    path.chmod(0o600)


# --- small helpers ---------------------------------------------------------------------


def _containerd_toml(cd: Path, cni_conf_dir: Path, *, cri: bool) -> str:
    disabled = [
        "io.containerd.snapshotter.v1.aufs",
        "io.containerd.snapshotter.v1.btrfs",
        "io.containerd.snapshotter.v1.zfs",
        "io.containerd.snapshotter.v1.devmapper",
        "io.containerd.tracing.processor.v1.otlp",
        "io.containerd.internal.v1.tracing",
    ]
    if not cri:
        disabled.append("io.containerd.grpc.v1.cri")
    return f"""version = 2
root = "{cd / "root"}"
state = "{cd / "state"}"
disabled_plugins = {json.dumps(disabled)}

[grpc]
  address = "{cd / "containerd.sock"}"

[plugins."io.containerd.internal.v1.opt"]
  path = "{cd / "opt"}"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  restrict_oom_score_adj = true
  disable_apparmor = true
  enable_selinux = false
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        BinaryName = "{RUNC}"
        Root = "{cd.parent / "runc"}"
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{CNI_BIN_DIR}"
    conf_dir = "{cni_conf_dir}"
    max_conf_num = 1
"""


def _archive_ref(archive: Path) -> str:
    import tarfile

    with tarfile.open(archive) as tar:
        index = json.load(tar.extractfile("index.json"))
    return index["manifests"][0].get("annotations", {}).get("org.opencontainers.image.ref.name", "")


def main(argv: list[str] | None = None) -> None:
    """`python -m beam_devstack.substrate.node cleanup --state-dir D [--bridge B]`: clean after a
    killed node (with the settings recorded under /run/beam-backfill-node when they exist)."""
    ap = argparse.ArgumentParser(prog="python -m beam_devstack.substrate.node")
    ap.add_argument("command", choices=["cleanup", "status"])
    ap.add_argument("--state-dir")
    ap.add_argument("--bridge", default="beamnode0")
    ap.add_argument("--pod-cidr", default="10.244.0.0/24")
    ap.add_argument("--service-cidr", default="10.96.0.0/16")
    ap.add_argument("--node-ip", default="10.244.0.1")
    a = ap.parse_args(argv)
    owner = _read_owner()
    if a.command == "status":
        print(json.dumps({"owner": owner, "alive": bool(owner and _owner_alive(owner))}, indent=2))
        return
    targets = []
    if owner:
        targets.append(_settings_from_owner(owner))
    if a.state_dir:
        targets.append(
            NodeSettings(
                state_dir=Path(a.state_dir),
                bridge=a.bridge,
                pod_cidr=a.pod_cidr,
                service_cidr=a.service_cidr,
                node_ip=a.node_ip,
            )
        )
    if not targets:
        sys.exit("nothing recorded under /run/beam-backfill-node: pass --state-dir (and the settings)")
    for s in targets:
        print(json.dumps({"state_dir": str(s.state_dir), "removed": cleanup(s)}))


if __name__ == "__main__":
    main()
