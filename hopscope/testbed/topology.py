"""The network replica, described: names, addresses, interfaces, pods, ports.

This module is pure data (no root needed, nothing touches the system). It
is the contract between the builder (:mod:`hopscope.testbed.build`), the
load generator, faults, captures and the demo.

Two layers:

* :class:`Topology` -- what a replica *is*. Fully determined by its
  ``prefix``: :func:`default_topology` gives the one ``hopscope testbed up``
  builds. Every namespace name starts with the prefix (``hs-`` by default);
  interface names are fixed *inside* their namespace (``eth0``,
  ``flannel.1``, ``cni0``, ``veth<8 hex>``), so nothing is ever created in
  the root namespace and names stay within the kernel's 15 characters.
* :class:`Instance` -- a running replica: the topology plus what ``up``
  recorded (run directory, pids, log paths, phase). ``up`` writes it as JSON
  to :func:`state_path` (``/run/hopscope/testbed-<key>.json``, where the key
  is the prefix without its trailing ``-``); :func:`load_instance` reads it.

Address plan (documentation ranges only, so nothing leaves the replica)::

    edge (Cloudflare POP)   203.0.113.162/25  gw 203.0.113.129 (inet, to-edge)
    public node network     203.0.113.0/25    gw 203.0.113.1 (inet, br-pub)
      nodeN eth0            203.0.113.1N      (node1 .11, node2 .12, node3 .13)
    private network         198.51.100.0/24 (inet, br-priv, no gateway)
      node2 eth1 .12, node3 eth1 .13
    pod network             10.42.0.0/16; nodeN: flannel.1 10.42.N.0/32,
                            cni0 10.42.N.1/24, pod api-N 10.42.N.5
    Service api             ClusterIP 10.43.167.83:8000 (10.43.0.0/16)

VXLAN underlay per node pair: node1<->node2 and node1<->node3 over the
public NIC (as on Hetzner without a private network), node2<->node3 over the
private NIC ``eth1``.

Interface roles are the hop model's observation points: ``nic`` (public NIC,
traffic to/from the edge), ``underlay`` (carries VXLAN), ``overlay``
(``flannel.1``), ``pod`` (``cni0`` and the host side of pod veths).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from hopscope.errors import TestbedError, UsageError

#: Default namespace prefix.
DEFAULT_PREFIX = "hs-"
#: Base directory of state files and run directories (override: HOPSCOPE_RUN_BASE).
RUN_BASE_DEFAULT = "/run/hopscope"

HOST = "api.myhoneydue.com"
CLUSTER_CIDR = "10.42.0.0/16"
SERVICE_CIDR = "10.43.0.0/16"
CLUSTER_IP = "10.43.167.83"
SERVICE_PORT = 8000
#: kube-proxy's name for the service port: "<namespace>/<service>:<port name>".
SERVICE_PORT_NAME = "honeydue/api:http"
VXLAN_VNI = 1
VXLAN_PORT = 8472
VXLAN_DEV = "flannel.1"
CNI_BRIDGE = "cni0"
OVERLAY_MTU = 1450

# 192.0.2.0/24 is avoided: hosts like this one use it for their own NIC.
EDGE_IP = "203.0.113.162"
EDGE_GW = "203.0.113.129"
EDGE_NET = "203.0.113.128/25"
PUBLIC_NET = "203.0.113.0/25"
PUBLIC_GW = "203.0.113.1"
PRIVATE_NET = "198.51.100.0/24"

# Roles (observation points of the hop model).
ROLE_NIC = "nic"
ROLE_UNDERLAY = "underlay"
ROLE_OVERLAY = "overlay"
ROLE_POD = "pod"

_PREFIX_RE = re.compile(r"^[a-z][a-z0-9]{0,9}-$")


def normalize_prefix(prefix: str) -> str:
    """Return ``prefix`` ending in ``-``; raise UsageError when it is not usable.

    A prefix is a lower-case letter, then up to 9 letters or digits, then
    ``-`` (added when missing): ``hs-``, ``t4f2a-``.
    """
    p = prefix if prefix.endswith("-") else prefix + "-"
    if not _PREFIX_RE.match(p):
        raise UsageError(
            f"testbed prefix {prefix!r} is not usable: use a lower-case letter followed by "
            "up to 9 letters or digits (e.g. 'hs' or 't4f2a')"
        )
    return p


def prefix_key(prefix: str) -> str:
    """The prefix without its trailing ``-`` (used in file names)."""
    return normalize_prefix(prefix)[:-1]


def run_base() -> Path:
    """Directory holding state files and run directories."""
    return Path(os.environ.get("HOPSCOPE_RUN_BASE", RUN_BASE_DEFAULT))


def state_path(prefix: str) -> Path:
    """``/run/hopscope/testbed-<key>.json``: the running instance's state."""
    return run_base() / f"testbed-{prefix_key(prefix)}.json"


def run_dir(prefix: str) -> Path:
    """``/run/hopscope/testbed-<key>/``: logs, configs, UFW copies, control files."""
    return run_base() / f"testbed-{prefix_key(prefix)}"


def _hex(seed: str, n: int) -> str:
    return hashlib.sha256(seed.encode()).hexdigest()[:n]


@dataclass(frozen=True)
class Iface:
    """One interface inside a namespace.

    ``peer`` is ``"<role-name>:<ifname>"`` of the other end of a veth (the
    role name is a key of :meth:`Topology.namespaces`), or ``""``.
    """

    name: str
    roles: tuple[str, ...] = ()
    addrs: tuple[str, ...] = ()  # "ip/len"
    mac: str = ""
    peer: str = ""
    master: str = ""  # bridge it is enslaved to, if any
    kind: str = "veth"  # veth | bridge | vxlan


@dataclass(frozen=True)
class Node:
    """One k3s node (a Hetzner server)."""

    name: str  # node1
    index: int  # 1
    public_ip: str  # 203.0.113.11 on eth0
    private_ip: str  # 198.51.100.12 on eth1, or "" when the node has no private NIC
    pod_cidr: str  # 10.42.1.0/24
    vtep_ip: str  # 10.42.1.0 (flannel.1, /32)
    cni_ip: str  # 10.42.1.1 (cni0, /24)
    vtep_mac: str  # flannel.1 MAC, published to the other nodes
    interfaces: tuple[Iface, ...] = ()


@dataclass(frozen=True)
class Pod:
    """One api pod: its own namespace behind a veth on its node's cni0."""

    name: str  # api-2
    node: str  # node2
    ip: str  # 10.42.2.5
    port: int  # 8000
    veth: str  # host-side veth name on the node, veth<8 hex>
    mac: str


@dataclass(frozen=True)
class Topology:
    """The whole replica. Build one with :func:`default_topology`."""

    prefix: str
    nodes: tuple[Node, ...]
    pods: tuple[Pod, ...]
    #: frozenset-free encoding: "node1-node2" -> "public" | "private"
    underlay: dict[str, str] = field(default_factory=dict)
    edge_ip: str = EDGE_IP
    edge_gw: str = EDGE_GW
    public_gw: str = PUBLIC_GW
    cluster_ip: str = CLUSTER_IP
    service_port: int = SERVICE_PORT
    host: str = HOST
    http_port: int = 80

    # -- names ---------------------------------------------------------------
    def ns(self, what: str) -> str:
        """Namespace name of ``edge``, ``inet``, a node name or a pod name."""
        return f"{self.prefix}{what}"

    def namespaces(self) -> dict[str, str]:
        """role-name -> namespace name, for every namespace of the replica."""
        out = {"edge": self.ns("edge"), "inet": self.ns("inet")}
        for n in self.nodes:
            out[n.name] = self.ns(n.name)
        for p in self.pods:
            out[p.name] = self.ns(p.name)
        return out

    def node(self, name: str) -> Node:
        for n in self.nodes:
            if n.name == name:
                return n
        raise UsageError(
            f"no node {name!r} in the replica: use one of {', '.join(self.node_names())}"
        )

    def node_names(self) -> list[str]:
        return [n.name for n in self.nodes]

    def pod(self, name: str) -> Pod:
        for p in self.pods:
            if p.name == name:
                return p
        raise UsageError(f"no pod {name!r} in the replica: use one of "
                         f"{', '.join(p.name for p in self.pods)}")

    def pods_on(self, node: str) -> list[Pod]:
        return [p for p in self.pods if p.node == node]

    def pod_by_ip(self, ip: str) -> Pod | None:
        for p in self.pods:
            if p.ip == ip:
                return p
        return None

    def node_by_ip(self, ip: str) -> Node | None:
        """The node owning ``ip`` (public, private, VTEP or cni0 address)."""
        for n in self.nodes:
            if ip in (n.public_ip, n.private_ip, n.vtep_ip, n.cni_ip):
                return n
        return None

    # -- underlay -------------------------------------------------------------
    def underlay_kind(self, a: str, b: str) -> str:
        """``public`` or ``private``: the network carrying VXLAN between a and b."""
        key = "-".join(sorted((a, b)))
        return self.underlay.get(key, "public")

    def underlay_ip(self, local: str, remote: str) -> str:
        """The address of ``remote`` that ``local`` sends VXLAN to (fdb dst)."""
        r = self.node(remote)
        return r.private_ip if self.underlay_kind(local, remote) == "private" else r.public_ip

    def underlay_ifname(self, local: str, remote: str) -> str:
        """The interface on ``local`` carrying VXLAN to ``remote`` (eth0 or eth1)."""
        return "eth1" if self.underlay_kind(local, remote) == "private" else "eth0"

    def interfaces(self, node: str) -> tuple[Iface, ...]:
        """Interfaces of a node namespace, with their roles."""
        return self.node(node).interfaces

    def interfaces_by_role(self, node: str, role: str) -> list[str]:
        """Names of a node's interfaces playing ``role`` (nic/underlay/overlay/pod)."""
        return [i.name for i in self.node(node).interfaces if role in i.roles]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict[str, Any]) -> Topology:
        def iface(x: dict[str, Any]) -> Iface:
            return Iface(**{**x, "roles": tuple(x["roles"]), "addrs": tuple(x["addrs"])})

        nodes = tuple(
            Node(**{**n, "interfaces": tuple(iface(i) for i in n["interfaces"])})
            for n in d["nodes"]
        )
        pods = tuple(Pod(**p) for p in d["pods"])
        rest = {k: v for k, v in d.items() if k not in ("nodes", "pods")}
        return Topology(nodes=nodes, pods=pods, **rest)


def _mac(seed: str) -> str:
    h = _hex(seed, 10)
    # locally administered, unicast
    return "0e:" + ":".join(h[i : i + 2] for i in range(0, 10, 2))


def default_topology(prefix: str = DEFAULT_PREFIX) -> Topology:
    """The replica ``hopscope testbed up`` builds: edge, inet, 3 nodes, 3 api pods."""
    prefix = normalize_prefix(prefix)
    has_private = {1: False, 2: True, 3: True}
    underlay = {"node1-node2": "public", "node1-node3": "public", "node2-node3": "private"}
    pod_specs = [("api-1", 1), ("api-2", 2), ("api-3", 3)]

    pods: list[Pod] = []
    for name, idx in pod_specs:
        pods.append(
            Pod(
                name=name,
                node=f"node{idx}",
                ip=f"10.42.{idx}.5",
                port=SERVICE_PORT,
                veth="veth" + _hex(f"{prefix}{name}", 8),
                mac=_mac(f"{prefix}{name}/eth0"),
            )
        )

    nodes: list[Node] = []
    for idx in (1, 2, 3):
        name = f"node{idx}"
        private_ip = f"198.51.100.1{idx}" if has_private[idx] else ""
        carries_public = any(
            name in k.split("-") and v == "public" for k, v in underlay.items()
        )
        carries_private = any(
            name in k.split("-") and v == "private" for k, v in underlay.items()
        )
        eth0_roles = (ROLE_NIC, ROLE_UNDERLAY) if carries_public else (ROLE_NIC,)
        ifaces = [
            Iface("eth0", eth0_roles, (f"203.0.113.1{idx}/{PUBLIC_NET.split('/')[1]}",),
                  _mac(f"{prefix}{name}/eth0"), f"inet:n{idx}-eth0"),
        ]
        if private_ip:
            ifaces.append(
                Iface("eth1", (ROLE_UNDERLAY,) if carries_private else (),
                      (f"{private_ip}/24",), _mac(f"{prefix}{name}/eth1"), f"inet:n{idx}-eth1")
            )
        vtep_mac = _mac(f"{prefix}{name}/{VXLAN_DEV}")
        ifaces.append(Iface(VXLAN_DEV, (ROLE_OVERLAY,), (f"10.42.{idx}.0/32",), vtep_mac,
                            kind="vxlan"))
        ifaces.append(Iface(CNI_BRIDGE, (ROLE_POD,), (f"10.42.{idx}.1/24",),
                            _mac(f"{prefix}{name}/{CNI_BRIDGE}"), kind="bridge"))
        for p in pods:
            if p.node == name:
                ifaces.append(Iface(p.veth, (ROLE_POD,), (), "", f"{p.name}:eth0",
                                    master=CNI_BRIDGE))
        nodes.append(
            Node(
                name=name,
                index=idx,
                public_ip=f"203.0.113.1{idx}",
                private_ip=private_ip,
                pod_cidr=f"10.42.{idx}.0/24",
                vtep_ip=f"10.42.{idx}.0",
                cni_ip=f"10.42.{idx}.1",
                vtep_mac=vtep_mac,
                interfaces=tuple(ifaces),
            )
        )
    return Topology(prefix=prefix, nodes=tuple(nodes), pods=tuple(pods), underlay=underlay)


@dataclass
class Instance:
    """A running (or partly built) replica, as recorded in its state file.

    ``pids`` maps a process name to its pid: ``traefik@node1``,
    ``pod@api-2``. ``logs`` maps the same names to log paths; pods also have
    ``control`` files (JSON ``{"service_ms": N}``; write it, then send
    SIGUSR1 to the pod's pid, or wait 0.25 s: the server also polls its
    mtime). ``phase`` is the last phase ``up`` completed (``ready`` when
    fully up).
    """

    topology: Topology
    run_dir: str
    phase: str = "starting"
    created_ns: int = 0
    up_seconds: float = 0.0
    pids: dict[str, int] = field(default_factory=dict)
    logs: dict[str, str] = field(default_factory=dict)
    controls: dict[str, str] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def prefix(self) -> str:
        return self.topology.prefix

    def ns(self, what: str) -> str:
        """Namespace of ``edge``, ``inet``, a node or a pod."""
        return self.topology.ns(what)

    def traefik_pid(self, node: str) -> int | None:
        return self.pids.get(f"traefik@{node}")

    def pod_pid(self, pod: str) -> int | None:
        return self.pids.get(f"pod@{pod}")

    def pod_log(self, pod: str) -> str:
        return self.logs.get(f"pod@{pod}", "")

    def pod_control(self, pod: str) -> str:
        return self.controls.get(f"pod@{pod}", "")

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": 1,
            "prefix": self.prefix,
            "run_dir": self.run_dir,
            "phase": self.phase,
            "created_ns": self.created_ns,
            "up_seconds": self.up_seconds,
            "namespaces": self.topology.namespaces(),
            "pids": self.pids,
            "logs": self.logs,
            "controls": self.controls,
            "extra": self.extra,
            "topology": self.topology.to_dict(),
        }

    @staticmethod
    def from_dict(d: dict[str, Any]) -> Instance:
        return Instance(
            topology=Topology.from_dict(d["topology"]),
            run_dir=d["run_dir"],
            phase=d.get("phase", ""),
            created_ns=int(d.get("created_ns", 0)),
            up_seconds=float(d.get("up_seconds", 0.0)),
            pids={k: int(v) for k, v in d.get("pids", {}).items()},
            logs=dict(d.get("logs", {})),
            controls=dict(d.get("controls", {})),
            extra=dict(d.get("extra", {})),
        )

    def save(self) -> None:
        """Write the state file atomically."""
        path = state_path(self.prefix)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        tmp.replace(path)


def load_instance(prefix: str = DEFAULT_PREFIX) -> Instance:
    """Load the running replica with ``prefix``; TestbedError when it is not up."""
    path = state_path(prefix)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise TestbedError(
            f"no testbed with prefix {normalize_prefix(prefix)!r} is up (no {path}): "
            f"run `hopscope testbed up --prefix {prefix_key(prefix)}` first"
        ) from None
    except (OSError, ValueError) as exc:
        raise TestbedError(
            f"cannot read testbed state {path}: {exc}; run `hopscope testbed down "
            f"--prefix {prefix_key(prefix)}` and bring it up again"
        ) from exc
    return Instance.from_dict(data)
