"""Interface discovery over netlink (pyroute2: what the agent's rescans and doctor use in
their own namespace) against iproute2's JSON output (``ip -n NAME -j``, what doctor uses
for a named one): ``features.node_listing`` gives the same links, addresses, default
routes and VXLAN underlays (found through their FDB peers' routes), so the same roles.

A namespace of its own per test holds what a node has: loopback, a public NIC with the
default routes (IPv4 and IPv6), a VXLAN bound to it by address and device (flannel's
way) and one with neither whose underlay is found through its FDB peer's route, a
``cni0`` bridge with a pod veth whose peer is in a second namespace (``link_netnsid``),
and a veth left alone. Both namespaces are removed whatever happens.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import unique_prefix

pytestmark = pytest.mark.privileged

SETUP = """
link add eth0 type veth peer name wire0
addr add 203.0.113.11/24 dev eth0
addr add 2001:db8::11/64 dev eth0 nodad
link set eth0 up
link set wire0 up
link set lo up
route add default via 203.0.113.1 dev eth0
route add default via 2001:db8::1 dev eth0
link add flannel.1 type vxlan id 1 dstport 8472 local 203.0.113.11 dev eth0 nolearning
link set flannel.1 up
link add vxb type vxlan id 2 dstport 4789 nolearning
link set vxb up
link add cni0 type bridge
link set cni0 up
link add veth1 type veth peer name peer1
link set veth1 master cni0
link set veth1 up
link add other0 type veth peer name other1
"""

CHILD = r"""
import json, sys
from hopscope.agent import features as ft
name = sys.argv[1]
keys = ("ifindex", "ifname", "operstate", "link_type", "master", "link_netnsid")

def links(ls):
    out = {}
    for link in ls:
        li = link.get("linkinfo") or {}
        data = li.get("info_data") or {}
        vx = ("id", "port", "local", "link") if li.get("info_kind") == "vxlan" else ()
        out[link["ifname"]] = [*(link.get(k) for k in keys), li.get("info_kind"),
                               *(data.get(k) for k in vx)]
    return out

def addrs(ls):
    return {a["ifname"]: sorted(ai["local"] for ai in a.get("addr_info", []))
            for a in ls if a.get("addr_info")}

def roles(ls, ad, dflt, rd):
    return sorted((i.name, i.role, i.point, i.master, json.dumps(i.vxlan, sort_keys=True))
                  for i in ft.classify_interfaces(ls, dflt, ad, rd))

got = {}
for how, ns in (("netlink", None), ("iproute2", name)):
    ls = ft.node_listing(ns)  # None: the agent's rescan, one socket, one dump of the links
    got[how] = {"links": links(ls.links), "addrs": addrs(ls.addrs), "defaults": ls.defaults,
                "route_devs": ls.route_devs,
                "roles": roles(ls.links, ls.addrs, ls.defaults, ls.route_devs),
                "pod_nsids": sorted(ft.pod_peer_nsids(ls.links))}
print("RESULT " + json.dumps(got))
"""


def _ip(*argv: str) -> None:
    subprocess.run(["ip", *argv], check=True, capture_output=True, text=True, timeout=20)


@pytest.fixture
def node_ns() -> Iterator[str]:
    prefix = unique_prefix("n")
    name, pod = f"{prefix}node", f"{prefix}pod"
    try:
        _ip("netns", "add", name)
        _ip("netns", "add", pod)
        for line in SETUP.strip().splitlines():
            _ip("-n", name, *line.split())
        _ip("-n", name, "link", "set", "peer1", "netns", pod)
        _ip("-n", name, "neigh", "add", "203.0.113.1", "lladdr", "02:00:00:00:00:01",
            "dev", "eth0")
        _ip("-n", name, "route", "add", "198.51.100.0/24", "via", "203.0.113.1")
        subprocess.run(["bridge", "-n", name, "fdb", "append", "00:00:00:00:00:00", "dev",
                        "vxb", "dst", "198.51.100.7"], check=True, capture_output=True,
                       timeout=20)
        yield name
    finally:
        for ns in (name, pod):
            subprocess.run(["ip", "netns", "delete", ns], capture_output=True, timeout=20)


def test_netlink_listings_match_iproute2(node_ns: str) -> None:
    cp = subprocess.run(["ip", "netns", "exec", node_ns, sys.executable, "-c", CHILD, node_ns],
                        capture_output=True, text=True, timeout=120)
    line = next((ln for ln in cp.stdout.splitlines() if ln.startswith("RESULT ")), None)
    assert line is not None, cp.stderr[-2000:]
    got: dict[str, Any] = json.loads(line[7:])
    nl, ip = got["netlink"], got["iproute2"]
    for what in ("links", "addrs", "defaults", "route_devs", "roles", "pod_nsids"):
        assert nl[what] == ip[what], what
    # and what the namespace holds was seen (not two empty answers agreeing)
    roles = {r[0]: r[1] for r in nl["roles"]}
    assert roles["eth0"] == "public NIC + underlay"
    assert roles["flannel.1"] == roles["vxb"] == "overlay (VXLAN)"
    assert roles["cni0"] == "pod bridge" and roles["veth1"] == "pod veth"
    assert roles["lo"] == "loopback" and roles["other0"] == "other"
    # vxb's FDB peer, 198.51.100.7, routes through eth0
    assert nl["defaults"] == ["eth0"] and nl["route_devs"] == {"vxb": ["eth0"]}
    assert nl["links"]["flannel.1"][-4:] == [1, 8472, "203.0.113.11", "eth0"]
    assert nl["links"]["veth1"][4] == "cni0" and nl["links"]["veth1"][5] is not None
    assert nl["addrs"]["eth0"] == sorted(["203.0.113.11", "2001:db8::11",
                                          *[a for a in nl["addrs"]["eth0"] if "fe80" in a]])
    assert len(nl["pod_nsids"]) == 1
