#!/usr/bin/env python3
"""Write hopscope's reference captures and their expected output.

Every packet's timestamp is chosen here, so every hop duration is known
exactly; ``expected.json`` of each scenario comes from the timing tables in
this file (``tm`` dicts, see :func:`_craftlib.exchange`), never from running
hopscope.  Re-running reproduces the same bytes (fixed seeds, no clock).

    python pcaps/craft.py                 # rewrite pcaps/<scenario>/
    python pcaps/craft.py --out DIR       # write the scenarios under DIR
    python pcaps/craft.py --only drops    # some scenarios only
    python pcaps/craft.py --tables        # print the timing tables (for README.md)
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import random
import sys
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _craftlib as L
from _craftlib import MS

HERE = os.path.dirname(os.path.abspath(__file__))

# ---------------------------------------------------------------------------
# The cluster (see shared/seed/12-data-flow.md): three Hetzner nodes, k3s,
# Flannel VXLAN (10.42.<N>.0/24 per node, flannel.1 holds 10.42.<N>.0, cni0
# 10.42.<N>.1), Traefik on the host network of every node.

GW_PUBLIC = L.mac("d2:74:7f:6e:37:e3")  # Hetzner's 172.31.1.1 gateway
GW_PRIVATE = L.mac("d2:74:7f:6e:37:c1")  # 10.0.0.1 of the private network

NODES: dict[str, dict[str, Any]] = {
    "node1": dict(
        hostname="hetzner1", public_ip="178.104.247.152", pub_mac="96:00:03:b2:4e:71",
        priv_ip="10.0.0.2", priv_mac="86:00:00:6f:a1:22", vtep="6a:3f:9c:12:8e:41", subnet=0,
        cni_mac="9e:4a:61:0c:d2:55",
        index={"lo": 1, "eth0": 2, "eth1": 3, "flannel.1": 4, "cni0": 5},
        # pod ip: (pod eth0 MAC, host-side veth, its MAC, its ifindex)
        pods={
            "10.42.0.7": ("ce:71:04:b8:29:aa", "vethd40c91e2", "8a:63:dd:20:5f:17", 7),
            "10.42.0.9": ("7a:d4:2c:0b:e9:36", "veth1f7a03bc", "f2:0e:4b:93:c6:81", 8),
        },
    ),
    "node2": dict(
        hostname="hetzner2", public_ip="178.105.32.198", pub_mac="96:00:03:b2:6c:0d",
        priv_ip="10.0.0.3", priv_mac="86:00:00:6f:a1:3e", vtep="6a:d1:07:5e:b2:9c", subnet=1,
        cni_mac="3a:5f:c8:21:7b:e0",
        index={"lo": 1, "eth0": 2, "eth1": 3, "flannel.1": 4, "cni0": 5},
        pods={
            "10.42.1.5": ("5e:2b:9a:c4:71:08", "veth5b8e7a1c", "2a:c9:10:f3:6e:5d", 9),
            "10.42.1.8": ("d6:40:8e:15:a3:72", "veth9c2e4d07", "b6:1d:59:e0:84:2f", 11),
        },
    ),
    "node3": dict(
        hostname="hetzner3", public_ip="178.104.249.189", pub_mac="96:00:03:b3:01:9a",
        priv_ip="10.0.0.4", priv_mac="86:00:00:6f:a1:5c", vtep="6a:82:e4:3b:19:07", subnet=2,
        cni_mac="f6:10:9d:44:a2:3b",
        index={"lo": 1, "eth0": 2, "eth1": 3, "flannel.1": 4, "cni0": 5},
        pods={"10.42.2.6": ("0e:9b:3d:62:f1:c4", "veth7e21c9a4", "a2:58:31:c7:0f:e6", 6)},
    ),
}

CLEAN = ["incomplete", "retransmit", "out_of_order", "clock_skew_corrected", "no_upstream", "no_response", "derived_id", "reset", "truncated"]


def make_cluster(spec: dict[str, list[str]], *, underlay: str, base: int, offsets: dict[str, int] | None = None) -> L.Cluster:
    """``spec``: node -> interface names it has (pods' veths by pod IP or veth name)."""
    nodes = {}
    for name, ifnames in spec.items():
        c = NODES[name]
        ifaces: dict[str, L.Iface] = {}
        pods: dict[str, L.Pod] = {}
        for ip, (pmac, veth, _, _) in c["pods"].items():
            pods[ip] = L.Pod(ip, L.mac(pmac), veth)
        for ifn in ifnames:
            if ifn == "eth0":
                ifaces[ifn] = L.Iface(ifn, c["index"][ifn], L.mac(c["pub_mac"]))
            elif ifn == "eth1":
                ifaces[ifn] = L.Iface(ifn, c["index"][ifn], L.mac(c["priv_mac"]))
            elif ifn == "flannel.1":
                ifaces[ifn] = L.Iface(ifn, c["index"][ifn], L.mac(c["vtep"]))
            elif ifn == "cni0":
                ifaces[ifn] = L.Iface(ifn, c["index"][ifn], L.mac(c["cni_mac"]))
            else:
                (ip,) = [ip for ip, p in c["pods"].items() if p[1] == ifn]
                _, _, vmac, idx = c["pods"][ip]
                ifaces[ifn] = L.Iface(ifn, idx, L.mac(vmac))
        private = underlay == "private"
        nodes[name] = L.Node(
            name=name, hostname=c["hostname"], public_ip=c["public_ip"], pub_if="eth0",
            pub_mac=L.mac(c["pub_mac"]), pub_gw_mac=GW_PUBLIC,
            ul_if="eth1" if private else "eth0",
            ul_ip=c["priv_ip"] if private else c["public_ip"],
            ul_mac=L.mac(c["priv_mac"] if private else c["pub_mac"]),
            ul_gw_mac=GW_PRIVATE if private else GW_PUBLIC,
            ul_hops=1 if private else 3,
            vtep_mac=L.mac(c["vtep"]), flannel_ip=f"10.42.{c['subnet']}.0", cni_ip=f"10.42.{c['subnet']}.1",
            cni_mac=L.mac(c["cni_mac"]), ifaces=ifaces, pods=pods,
            clock_offset_ns=(offsets or {}).get(name, 0),
        )
    return L.Cluster(nodes, base)


# ---------------------------------------------------------------------------
# Ends of connections


class Ends:
    """Deterministic sockets for one scenario."""

    def __init__(self, scenario: str):
        self.rng = random.Random(f"hopscope-pcaps/{scenario}")

    def _common(self) -> dict[str, int]:
        r = self.rng
        return dict(isn=r.getrandbits(32), ip_id=r.getrandbits(16), ts_off=r.getrandbits(32))

    def cloudflare(self, ip: str, lead: int, port: int | None = None) -> L.End:
        port = port or self.rng.randrange(32768, 61000)
        return L.End(ip, port, win=1026, syn_win=65535, mss=1460, wscale=10, ttl=56, lead=lead, **self._common())

    def node80(self, node: L.Node) -> L.End:
        return L.End(node.public_ip, 80, win=502, syn_win=65160, mss=1460, wscale=7, ttl=64, **self._common())

    def traefik(self, node: L.Node, pod_ip: str, port: int | None = None) -> L.End:
        local = pod_ip.startswith(node.cni_ip.rsplit(".", 1)[0] + ".")
        src = node.cni_ip if local else node.flannel_ip  # masqueraded to the outgoing interface
        port = port or self.rng.randrange(32768, 61000)
        return L.End(src, port, win=501, syn_win=63450, mss=1410, wscale=7, ttl=64, **self._common())

    def pod(self, ip: str) -> L.End:
        return L.End(ip, 8000, win=505, syn_win=64308, mss=1410, wscale=7, ttl=64, **self._common())

    def ray(self) -> str:
        return "%016x-DFW" % self.rng.getrandbits(64)

    def token(self) -> str:
        return "%040x" % self.rng.getrandbits(160)


def task_json(rng: random.Random, n: int, *, created: str) -> list[dict[str, Any]]:
    titles = ["Replace HVAC filter", "Clean gutters", "Test smoke detectors", "Flush water heater", "Reseal grout in shower",
              "Service garage door opener", "Check sump pump", "Winterize sprinklers", "Clean dryer vent", "Inspect roof shingles"]
    out = []
    for i in range(n):
        out.append({
            "id": 1180 + i, "residence_id": 42, "title": titles[i % len(titles)], "priority": rng.choice(["low", "medium", "high"]),
            "status": rng.choice(["open", "scheduled", "done"]), "due_date": f"2025-12-{1 + (i * 3) % 28:02d}",
            "assignee_id": None if i % 3 else 17, "recurrence": rng.choice(["none", "monthly", "quarterly", "yearly"]),
            "notes": "", "created_at": created, "updated_at": created,
        })
    return out


def jbytes(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def make_req(e: Ends, node: L.Node, edge_ip: str, method: str, path: str, status: int, *, user_ip: str, token: str,
             body: bytes = b"", resp_body: bytes, date: str, extra: tuple[tuple[str, str], ...] = (),
             up_chunks: list[int] | None = None, client_chunks: list[int] | None = None, **kw: Any) -> L.Req:
    ray = e.ray()
    client_msg = L.cf_request(method, path, ray=ray, user_ip=user_ip, token=token, body=body, extra=extra)
    return L.Req(
        ray=ray, method=method, path=path, status=status, client_msg=client_msg,
        up_msg=L.traefik_request(client_msg, edge_ip=edge_ip, server=node.hostname),
        resp_up=L.app_response(status, resp_body, date, chunk_sizes=up_chunks),
        resp_client=L.traefik_response(status, resp_body, date, chunk_sizes=client_chunks),
        **kw,
    )


# ---------------------------------------------------------------------------
# Small pieces shared by the scenarios


def dumps(doc: Any) -> str:
    """JSON with every innermost object (a hop, a drop) on one line."""
    import re

    text = json.dumps(doc, indent=1)
    text = re.sub(r"\{\n\s+([^{}\[\]]*?)\n\s*\}", lambda m: "{" + " ".join(x.strip() for x in m.group(1).split("\n")) + "}", text)
    return re.sub(r"\[\n\s+([^{}\[\]]*?)\n\s*\]", lambda m: "[" + " ".join(x.strip() for x in m.group(1).split("\n")) + "]", text) + "\n"


def padded(make: Callable[[str], bytes], target: int) -> bytes:
    """``make(pad)`` with the pad string chosen so that the result is ``target`` bytes long."""
    n = max(0, target - len(make("")))
    for k in range(max(0, n - 8), n + 8):
        out = make("x" * k)
        if len(out) == target:
            return out
    raise AssertionError(f"cannot pad to {target}")


def solo_in(cl: L.Cluster, P: L.Paths, a: L.Node, client: L.Conn, msg: bytes, t: int, *, ack: bool = True) -> None:
    """A one-segment request from Cloudflare, and node A's quick ACK."""
    cl.client_in(a, t, client.send(client.a, t, "PA", msg))
    if ack:
        cl.client_out(a, t + P.client_ack, client.send(client.b, t + P.client_ack, "A"), client)


def solo_out(cl: L.Cluster, P: L.Paths, a: L.Node, client: L.Conn, msg: bytes, t: int) -> None:
    """A one-segment response to Cloudflare, and Cloudflare's ACK one RTT later."""
    cl.client_out(a, t, client.send(client.b, t, "PA", msg), client)
    t_in = t + 2 * client.a.lead + P.cf_ack_jitter
    cl.client_in(a, t_in, client.send(client.a, t_in, "A"))


def ssh_noise(cl: L.Cluster, e: Ends, node: L.Node, times: list[int]) -> None:
    """An admin's SSH session on the public NIC: TCP that is not HTTP."""
    admin = L.End("84.150.21.77", 51022, win=2047, ttl=51, **e._common())
    sshd = L.End(node.public_ip, 22, win=501, ttl=64, **e._common())
    conn = L.Conn(admin, sshd, established=True)
    for i, t in enumerate(times):
        n = 36 + 16 * e.rng.randrange(0, 6)
        data = bytes(e.rng.getrandbits(8) for _ in range(n))
        if i % 2 == 0:
            cl.noise(node, t, "eth0", "in", conn.send(admin, t, "PA", data))
        else:
            cl.noise(node, t, "eth0", "out", conn.send(sshd, t, "PA", data))


def write_all(sc: Scenario, cl: L.Cluster, base: int, **kw: Any) -> list[str]:
    files = []
    for n in cl.nodes.values():
        f = f"{n.name}.pcapng"
        L.write_pcapng(os.path.join(sc.dir, f), n, base, **kw)
        files.append(f)
    return files


def fin(cl: L.Cluster) -> None:
    cl.finalize()
    if len(cl.nodes) > 1:
        cl.check_symmetric()


def edge(rec: dict[str, Any], t_sa: int, t_ack: int) -> dict[str, Any]:
    rec["_moments"]["edge_rtt"] = t_ack - t_sa
    return rec


# ---------------------------------------------------------------------------
# 1. cross-node-public


def s_cross_node_public(out: str) -> Scenario:
    sc = Scenario("cross-node-public", out)
    base = 1764234842_118_227_431
    cl = make_cluster({"node1": ["eth0", "flannel.1"], "node2": ["eth0", "flannel.1", "cni0", "veth5b8e7a1c"]}, underlay="public", base=base)
    n1 = cl.nodes["node1"]
    e = Ends(sc.name)
    P = L.Paths()
    lead = 52_406_188
    client = L.Conn(e.cloudflare("172.70.222.14", lead), e.node80(n1))
    up = L.Conn(e.traefik(n1, "10.42.1.5"), e.pod("10.42.1.5"))
    token = e.token()
    date = L.http_date(base)
    user = "70.121.34.188"

    t_sa, t_ack = L.client_handshake(cl, n1, client, 0, P, 2 * lead + 1)
    body = jbytes({"residence_id": 42, "title": "Replace HVAC filter", "priority": "medium", "due_date": "2025-12-01",
                   "recurrence": "quarterly", "notes": "MERV 11, 20x25x1 - garage shelf"})
    created = task_json(e.rng, 1, created="2025-11-27T09:14:02.224Z")[0]
    r1 = make_req(e, n1, client.a.ip, "POST", "/api/tasks/", 201, user_ip=user, token=token, body=body,
                  resp_body=jbytes(created), date=date)
    tm1 = dict(t=t_ack + 9_812, syn=388_517, ingress=873_422, encap=34_218, wire=121_733, decap=19_406, deliver=29_877,
               app=2_861_340, route=24_905, encap_r=33_127, wire_r=143_260, decap_r=20_114, egress=96_381)
    rec1 = edge(L.exchange(cl, P, n1, client, up, r1, tm1, new_up=True, ack_client=(0,), pod_ack=True), t_sa, t_ack)

    r2 = make_req(e, n1, client.a.ip, "GET", "/api/tasks/?residence=42", 200, user_ip=user, token=token,
                  resp_body=jbytes({"count": 9, "next": None, "results": task_json(e.rng, 9, created="2025-11-20T18:02:11.507Z")}), date=date)
    tm2 = dict(t=tm1["t"] + 412_118_774, ingress=436_218, encap=32_660, wire=118_000, decap=18_902, deliver=28_450,
               app=1_734_902, route=23_118, encap_r=31_004, wire_r=126_415, decap_r=19_277, egress=88_903)
    rec2 = L.exchange(cl, P, n1, client, up, r2, tm2)
    fin(cl)
    files = write_all(sc, cl, base)
    sc.expected(files, [rec1, rec2], offsets={"node2": 0})
    return sc


# ---------------------------------------------------------------------------
# 2. cross-node-private


def s_cross_node_private(out: str) -> Scenario:
    sc = Scenario("cross-node-private", out)
    base = 1764235517_604_118_920
    cl = make_cluster({"node1": ["eth0", "eth1", "flannel.1"], "node3": ["eth0", "eth1", "flannel.1", "cni0", "veth7e21c9a4"]},
                      underlay="private", base=base)
    n1, n3 = cl.nodes["node1"], cl.nodes["node3"]
    e = Ends(sc.name)
    P = L.Paths(encap=29_880, wire=61_000, decap=17_455)
    date = L.http_date(base)

    # B's SYN first; A's request completes while B's is in flight, so
    # Traefik opens a second upstream connection for B.
    lead_a, lead_b = 48_112_905, 51_730_442
    ca = L.Conn(e.cloudflare("162.158.91.210", lead_a), e.node80(n1))
    cb = L.Conn(e.cloudflare("172.70.41.36", lead_b), e.node80(n1))
    up_a = L.Conn(e.traefik(n1, "10.42.2.6"), e.pod("10.42.2.6"))
    up_b = L.Conn(e.traefik(n1, "10.42.2.6"), e.pod("10.42.2.6"))
    sb, ab = L.client_handshake(cl, n1, cb, 0, P, 2 * lead_b + 1)
    sa, aa = L.client_handshake(cl, n1, ca, 5_650_000, P, 2 * lead_a + 1)
    body = jbytes({"residence_id": 7, "title": "Clean dryer vent", "priority": "high", "due_date": "2025-12-04", "recurrence": "yearly"})
    ra = make_req(e, n1, ca.a.ip, "POST", "/api/tasks/", 201, user_ip="99.43.160.22", token=e.token(), body=body,
                  resp_body=jbytes(task_json(e.rng, 1, created="2025-11-27T09:25:17.710Z")[0]), date=date)
    rb = make_req(e, n1, cb.a.ip, "GET", "/api/tasks/118/", 200, user_ip="107.77.201.5", token=e.token(),
                  resp_body=jbytes(task_json(e.rng, 1, created="2025-10-02T14:40:09.118Z")[0]), date=date)
    tma = dict(t=aa + 9_812, syn=402_118, ingress=731_506, encap=31_512, wire=64_908, decap=18_003, deliver=26_974,
               app=2_504_733, route=23_841, encap_r=30_106, wire_r=61_000, decap_r=17_455, egress=91_227)
    tmb = dict(t=ab + 11_406, syn=377_902, ingress=709_215, encap=29_880, wire=72_316, decap=19_588, deliver=28_105,
               app=1_212_664, route=25_530, encap_r=32_419, wire_r=66_201, decap_r=18_760, egress=84_415)
    assert tma["t"] < tmb["t"] < tma["t"] + 3 * MS
    rec_a = edge(L.exchange(cl, P, n1, ca, up_a, ra, tma, new_up=True, ack_client=(0,), pod_ack=True), sa, aa)
    rec_b = edge(L.exchange(cl, P, n1, cb, up_b, rb, tmb, new_up=True, ack_client=(0,), pod_ack=True), sb, ab)
    ssh_noise(cl, e, n1, [2_118_406, 2_164_930, 48_002_117, tma["t"] + 1_000_311, tma["t"] + 1_047_902])
    ssh_noise(cl, e, n3, [60_306_559, 60_350_118])
    fin(cl)
    files = write_all(sc, cl, base, epb_flags=False)
    sc.expected(files, [rec_a, rec_b], offsets={"node3": 0})
    return sc


# ---------------------------------------------------------------------------
# 3. keepalive-split (cross-node, node1 -> node2, public underlay)


def s_keepalive_split(out: str) -> Scenario:
    sc = Scenario("keepalive-split", out)
    base = 1764236011_350_662_077
    cl = make_cluster({"node1": ["eth0", "flannel.1"], "node2": ["eth0", "flannel.1", "cni0", "veth5b8e7a1c"]}, underlay="public", base=base)
    n1 = cl.nodes["node1"]
    e = Ends(sc.name)
    P = L.Paths(wire=104_500)
    lead = 50_871_330
    # Both connections were open before the capture started: no handshakes.
    # Two sequence spaces wrap past 2**32 inside R1's response: the pod's
    # (in its 3rd segment) and node1:80's (in its 4th segment to Cloudflare).
    origin, pod = e.node80(n1), e.pod("10.42.1.5")
    origin.isn, pod.isn = 2**32 - 5000, 2**32 - 2900
    client = L.Conn(e.cloudflare("162.158.90.48", lead), origin, established=True)
    up = L.Conn(e.traefik(n1, "10.42.1.5"), pod, established=True)
    token, user, date = e.token(), "72.177.4.219", L.http_date(base)
    # Go's TCP keep-alive on the idle upstream connection (15 s): Traefik's
    # probe (seq = snd_nxt - 1, no data) and the pod's ACK.
    t = 1_000_000
    probe = up.send(up.a, t, "A", seq=(up.a.nxt - 1) & 0xFFFFFFFF)
    seen = cl.up_xnode(n1, t, probe, P.encap, P.wire, P.decap, P.deliver, P.veth_lag)
    t = seen["B.veth"] + P.pod_synack
    cl.down_xnode(n1, t, up.send(up.b, t, "A"), P.bridge_lag, P.route, P.encap, P.wire, P.decap)

    # R1: headers in two segments (287 bytes, then the rest 311 us later);
    # response: Content-Length, 4 x 1448 + 517 bytes to Cloudflare.
    tasks = task_json(e.rng, 14, created="2025-11-27T09:33:31.350Z")

    def body1(pad: str) -> bytes:
        tasks[-1]["notes"] = pad
        return jbytes({"count": 14, "next": None, "results": tasks})

    resp1 = padded(lambda pad: L.traefik_response(200, body1(pad), date), 4 * 1448 + 517)
    b1 = L.parse_headers(resp1)[2]
    r1 = make_req(e, n1, client.a.ip, "GET", "/api/tasks/?residence=42&page=1", 200, user_ip=user, token=token, resp_body=b1, date=date)
    r1.client_sizes = [287, len(r1.client_msg) - 287]
    r1.client_gaps = [311_406]
    assert L.seg_index(r1.client_sizes, L.headers_end(r1.client_msg) - 1) == 1
    assert [len(x) for x in [r1.resp_client]] == [4 * 1448 + 517]
    tm1 = dict(t=2_604_771, ingress=452_906, encap=33_417, wire=104_500, decap=19_211, deliver=28_764,
               app=3_807_155, route=24_306, encap_r=32_090, wire_r=117_844, decap_r=19_630, egress=61_802)
    rec1 = L.exchange(cl, P, n1, client, up, r1, tm1, ack_client=(0, 1))

    # R2: chunked response; Traefik's chunk boundaries differ from the pod's,
    # and the size line of its second chunk straddles a segment boundary.
    tasks2 = task_json(e.rng, 20, created="2025-11-12T07:51:40.003Z")
    b2 = jbytes({"residence": 42, "export": "full", "tasks": tasks2})
    hdr2 = len(L.traefik_response(200, b"", date, chunk_sizes=[])) - len(b"0\r\n\r\n")
    c1 = 1448 - 2 - hdr2 - 5 - 2  # first chunk: '<3 hex>\r\n' + data + '\r\n', next size line cut after 2 chars
    assert 0x100 <= c1 <= 0xFFF
    client_chunks = [c1, 2048, len(b2) - c1 - 2048]
    up_chunks = [2048, 2048, len(b2) - 4096]
    r2 = make_req(e, n1, client.a.ip, "GET", "/api/tasks/export/?residence=42", 200, user_ip=user, token=token, resp_body=b2,
                  date=date, up_chunks=up_chunks, client_chunks=client_chunks)
    assert r2.resp_client[1446:1448] == b"80" and r2.resp_client[1448:1451] == b"0\r\n", r2.resp_client[1440:1456]
    tm2 = dict(t=tm1["t"] + 112_118_052, ingress=418_337, encap=31_880, wire=109_272, decap=18_902, deliver=27_990,
               app=5_911_460, route=22_971, encap_r=31_306, wire_r=104_500, decap_r=19_004, egress=73_118)
    rec2 = L.exchange(cl, P, n1, client, up, r2, tm2)

    # R3: right behind the chunked response: its framing must end at "0\r\n\r\n".
    r3 = make_req(e, n1, client.a.ip, "GET", "/api/residences/42/", 200, user_ip=user, token=token,
                  resp_body=jbytes({"id": 42, "name": "Maple St", "timezone": "America/Chicago", "members": [17, 23]}), date=date)
    tm3 = dict(t=tm2["t"] + 158_440_617, ingress=401_775, encap=32_005, wire=113_610, decap=19_877, deliver=29_102,
               app=1_106_338, route=23_499, encap_r=31_772, wire_r=109_913, decap_r=19_415, egress=79_064)
    rec3 = L.exchange(cl, P, n1, client, up, r3, tm3)

    # R4: a POST whose header terminator straddles two segments ("...\r\n\r" |
    # "\n{body..."), with the rest of the body in a third segment 41 us later:
    # complete = the 2nd segment, not the last. Traefik forwards it in one write
    # once it has the whole body.
    body4 = jbytes({"residence_id": 42, "title": "Inspect roof shingles", "priority": "medium", "due_date": "2026-03-15",
                    "recurrence": "yearly", "notes": "After the hail on 11/19; photos in the album 'roof 2025'. " * 6})
    r4 = make_req(e, n1, client.a.ip, "POST", "/api/tasks/", 201, user_ip=user, token=token, body=body4,
                  resp_body=jbytes(task_json(e.rng, 1, created="2025-11-27T09:33:31.912Z")[0]), date=date)
    he = L.headers_end(r4.client_msg)
    r4.client_sizes = [he - 1, 201, len(r4.client_msg) - he - 200]
    r4.client_gaps = [9_306, 41_207]
    assert r4.client_msg[he - 4 : he - 1] == b"\r\n\r"
    tm4 = dict(t=tm3["t"] + 161_907_330, ingress=497_152, encap=33_004, wire=106_218, decap=19_466, deliver=28_931,
               app=3_402_117, route=24_055, encap_r=32_281, wire_r=111_076, decap_r=19_702, egress=85_690)
    rec4 = L.exchange(cl, P, n1, client, up, r4, tm4)
    assert tm4["ingress"] > sum(r4.client_gaps[1:]) + 400_000  # Traefik waited for the body
    fin(cl)
    files = write_all(sc, cl, base)
    sc.expected(files, [rec1, rec2, rec3, rec4], offsets={"node2": 0})
    return sc


# ---------------------------------------------------------------------------
# 4. same-node


def s_same_node(out: str) -> Scenario:
    sc = Scenario("same-node", out)
    base = 1764236530_771_904_006
    cl = make_cluster({"node1": ["eth0", "flannel.1", "cni0", "vethd40c91e2"]}, underlay="public", base=base)
    n1 = cl.nodes["node1"]
    e = Ends(sc.name)
    P = L.Paths()
    lead = 49_660_217
    client = L.Conn(e.cloudflare("172.70.100.201", lead), e.node80(n1))
    up = L.Conn(e.traefik(n1, "10.42.0.7"), e.pod("10.42.0.7"))
    token, user, date = e.token(), "70.121.34.188", L.http_date(base)
    t_sa, t_ack = L.client_handshake(cl, n1, client, 0, P, 2 * lead + 1)
    body = jbytes({"residence_id": 42, "title": "Test smoke detectors", "priority": "high", "due_date": "2025-12-07", "recurrence": "monthly"})
    r1 = make_req(e, n1, client.a.ip, "POST", "/api/tasks/", 201, user_ip=user, token=token, body=body,
                  resp_body=jbytes(task_json(e.rng, 1, created="2025-11-27T09:42:10.872Z")[0]), date=date)
    tm1 = dict(t=t_ack + 10_118, syn=391_207, ingress=452_118, app=2_390_511, egress=64_902)
    rec1 = edge(L.exchange(cl, P, n1, client, up, r1, tm1, new_up=True, ack_client=(0,), pod_ack=True), t_sa, t_ack)

    # R2: a 4.4 kB cookie: the headers span 4 segments from Cloudflare and 4
    # segments upstream; 'deliver' is first -> complete at the pod.
    cookie = "; ".join(f"_ga_{i:02d}={e.rng.getrandbits(300):x}" for i in range(55))
    r2 = make_req(e, n1, client.a.ip, "GET", "/api/tasks/?residence=42&status=open", 200, user_ip=user, token=token,
                  resp_body=jbytes({"count": 3, "next": None, "results": task_json(e.rng, 3, created="2025-11-01T10:00:00.000Z")}),
                  date=date, extra=(("cookie", cookie),))
    assert len(L.split(len(r2.client_msg), 1448)) == 4 and len(L.split(len(r2.up_msg), 1398)) == 4
    tm2 = dict(t=tm1["t"] + 1_870_552_318, ingress=471_630, app=1_502_207, egress=70_911)
    rec2 = L.exchange(cl, P, n1, client, up, r2, tm2)
    fin(cl)
    files = write_all(sc, cl, base)
    sc.expected(files, [rec1, rec2])
    return sc


# ---------------------------------------------------------------------------
# 5. vxlan-retransmit


def s_vxlan_retransmit(out: str) -> Scenario:
    sc = Scenario("vxlan-retransmit", out)
    base = 1764237104_226_019_774
    cl = make_cluster({"node1": ["eth0", "flannel.1"], "node2": ["eth0", "flannel.1", "cni0", "veth5b8e7a1c"]}, underlay="public", base=base)
    n1 = cl.nodes["node1"]
    e = Ends(sc.name)
    P = L.Paths(wire=112_340)
    lead = 53_004_871
    client = L.Conn(e.cloudflare("172.71.10.88", lead), e.node80(n1))
    up = L.Conn(e.traefik(n1, "10.42.1.5"), e.pod("10.42.1.5"))
    t_sa, t_ack = L.client_handshake(cl, n1, client, 0, P, 2 * lead + 1)
    body = jbytes({"residence_id": 42, "title": "Flush water heater", "priority": "low", "due_date": "2026-01-15", "recurrence": "yearly"})
    r1 = make_req(e, n1, client.a.ip, "POST", "/api/tasks/", 201, user_ip="24.28.61.140", token=e.token(), body=body,
                  resp_body=jbytes(task_json(e.rng, 1, created="2025-11-27T09:51:44.438Z")[0]), date=L.http_date(base))
    # The first copy of the upstream request leaves node1's underlay and is
    # lost; TCP retransmits it 204.4 ms later (new IPv4 id, same seq).
    tm1 = dict(t=t_ack + 9_977, syn=385_330, ingress=861_442, encap=32_871, rto=204_417_338, encap2=33_906, wire2=115_207,
               decap=19_340, deliver=28_802, app=2_688_015, route=24_711, encap_r=31_950, wire_r=112_340, decap_r=19_918, egress=90_406)
    rec1 = edge(L.exchange(cl, P, n1, client, up, r1, tm1, new_up=True, ack_client=(0,), pod_ack=True), t_sa, t_ack)
    rec1["flags_include"] = ["retransmit"]
    assert rec1["_moments"]["B.underlay"] - rec1["_moments"]["A.underlay"] == tm1["rto"] + tm1["encap2"] + tm1["wire2"] - tm1["encap"]
    fin(cl)
    files = write_all(sc, cl, base)
    sc.expected(files, [rec1], offsets={"node2": 0})
    return sc


# ---------------------------------------------------------------------------
# 6. drops


def s_drops(out: str) -> Scenario:
    sc = Scenario("drops", out)
    base = 1764237760_005_440_318
    cl = make_cluster({"node1": ["eth0", "flannel.1", "cni0", "veth1f7a03bc"],
                       "node2": ["eth0", "flannel.1", "cni0", "veth5b8e7a1c", "veth9c2e4d07"]}, underlay="public", base=base)
    n1 = cl.nodes["node1"]
    e = Ends(sc.name)
    P = L.Paths(wire=109_880)
    date = L.http_date(base)
    drops = []

    # (a) a Cloudflare edge whose SYNs to node1:80 are never answered
    lost = L.Conn(e.cloudflare("162.158.90.17", 51_200_000, port=40123), e.node80(n1))
    for t in (0, 1_004_118_226, 3_012_402_913):
        cl.client_in(n1, t, lost.send(lost.a, t, "S", seq=lost.a.isn))
    drops.append({"kind": "syn_unanswered", "node": "node1", "point": "nic", "packets": 3,
                  "flow": "162.158.90.17:40123 -> 178.104.247.152:80"})

    # a request that works (node1 -> pod 10.42.1.5 on node2): clock bounds both ways
    lead = 52_118_004
    c_ok = L.Conn(e.cloudflare("172.70.40.113", lead), e.node80(n1))
    up_ok = L.Conn(e.traefik(n1, "10.42.1.5"), e.pod("10.42.1.5"))
    sa, aa = L.client_handshake(cl, n1, c_ok, 200_118_335, P, 2 * lead + 1)
    r_ok = make_req(e, n1, c_ok.a.ip, "GET", "/api/tasks/?residence=42", 200, user_ip="70.121.34.188", token=e.token(),
                    resp_body=jbytes({"count": 2, "next": None, "results": task_json(e.rng, 2, created="2025-11-20T18:02:11.507Z")}), date=date)
    tm_ok = dict(t=aa + 10_007, syn=390_114, ingress=869_227, encap=32_118, wire=109_880, decap=19_004, deliver=28_337,
                 app=1_640_290, route=23_965, encap_r=31_207, wire_r=115_440, decap_r=19_551, egress=87_330)
    rec_ok = edge(L.exchange(cl, P, n1, c_ok, up_ok, r_ok, tm_ok, new_up=True, ack_client=(0,), pod_ack=True), sa, aa)

    # (c) a dead pod on node1 (10.42.0.9): its kernel answers the SYN with a RST, Traefik answers 502
    lead_c = 50_337_119
    c_c = L.Conn(e.cloudflare("172.71.150.26", lead_c), e.node80(n1))
    up_c = L.Conn(e.traefik(n1, "10.42.0.9", port=38722), e.pod("10.42.0.9"))
    sc_, ac_ = L.client_handshake(cl, n1, c_c, 1_500_227_804, P, 2 * lead_c + 1)
    body = jbytes({"residence_id": 42, "title": "Check sump pump", "priority": "medium", "due_date": "2025-12-10", "recurrence": "none"})
    ray_c = e.ray()
    msg_c = L.cf_request("POST", "/api/tasks/", ray=ray_c, user_ip="66.68.12.9", token=e.token(), body=body)
    t_c = ac_ + 9_640
    solo_in(cl, P, n1, c_c, msg_c, t_c)
    t_syn = t_c + 388_906
    syn = up_c.syn(t_syn)
    seen = cl.up_local(n1, t_syn, syn, P.veth_lag)
    t_rst = seen["A.veth"] + 9_118
    cl.down_local(n1, t_rst, up_c.refuse(t_rst, syn), P.bridge_lag)
    tm_c = dict(t=t_c, syn=388_906, total=491_377)
    solo_out(cl, P, n1, c_c, L.traefik_error(502, date), t_c + tm_c["total"])
    rec_c = {"request_id": ray_c, "method": "POST", "path": "/api/tasks/", "status": 502, "ingress_node": "node1",
             "total_ns": tm_c["total"], "flags_include": ["no_upstream"], "flags_exclude": ["retransmit", "clock_skew_corrected", "derived_id"],
             "_moments": {"nic_complete": t_c, "nic_resp": t_c + tm_c["total"], "edge_rtt": ac_ - sc_}}
    rec_c["hops"] = L.hops_from_moments(rec_c["_moments"], "node1", None)
    drops.append({"kind": "refused", "node": "node1", "point": "pod", "packets": 1, "flow": "10.42.0.1:38722 -> 10.42.0.9:8000"})

    # (b) the upstream SYNs to pod 10.42.1.8 on node2 are dropped on node2
    # after its underlay (UFW without 8472/udp): seen on node1 flannel.1,
    # node1 eth0 and node2 eth0, never on node2 flannel.1. Traefik's dial
    # times out after 30 s: 504.
    lead_b = 51_006_442
    c_b = L.Conn(e.cloudflare("172.70.211.42", lead_b, port=52817), e.node80(n1))
    up_b = L.Conn(e.traefik(n1, "10.42.1.8", port=47310), e.pod("10.42.1.8"))
    sb, ab = L.client_handshake(cl, n1, c_b, 4_000_561_207, P, 2 * lead_b + 1)
    ray_b = e.ray()
    msg_b = L.cf_request("GET", "/api/tasks/7/", ray=ray_b, user_ip="98.6.211.70", token=e.token())
    t_b = ab + 10_233
    solo_in(cl, P, n1, c_b, msg_b, t_b)
    t_dial = t_b + 392_770
    for k, dt in enumerate((0, 1_004_096_118, 3_012_288_441, 7_028_710_096, 15_060_904_513)):
        t = t_dial + dt
        seg = up_b.syn(t) if k == 0 else up_b.send(up_b.a, t, "S", seq=up_b.a.isn)
        cl.up_xnode(n1, t, seg, P.encap + 1_310 * k, P.wire + 2_207 * k, 0, 0, 0, stop="B.underlay")
    tm_b = dict(t=t_b, dial=392_770, total=392_770 + 30_000_000_000 + 71_404)
    solo_out(cl, P, n1, c_b, L.traefik_error(504, date), t_b + tm_b["total"])
    rec_b = {"request_id": ray_b, "method": "GET", "path": "/api/tasks/7/", "status": 504, "ingress_node": "node1", "pod_node": None,
             "total_ns": tm_b["total"], "flags_include": ["no_upstream"], "flags_exclude": ["retransmit", "clock_skew_corrected", "derived_id"],
             "_moments": {"nic_complete": t_b, "nic_resp": t_b + tm_b["total"], "edge_rtt": ab - sb}}
    rec_b["hops"] = L.hops_from_moments(rec_b["_moments"], "node1", None)
    drops.append({"kind": "syn_unanswered", "node": "node2", "point": "underlay", "packets": 5, "flow": "10.42.0.0:47310 -> 10.42.1.8:8000"})

    fin(cl)
    files = write_all(sc, cl, base)
    sc.expected(files, [rec_ok, rec_c, rec_b], drops=drops, offsets={"node2": 0})
    return sc


# ---------------------------------------------------------------------------
# 7. clock-skew


def s_clock_skew(out: str) -> Scenario:
    sc = Scenario("clock-skew", out)
    base = 1764238302_440_913_552
    skew = 3_700_000
    cl = make_cluster({"node1": ["eth0", "flannel.1"], "node2": ["eth0", "flannel.1", "cni0", "veth5b8e7a1c"]}, underlay="public",
                      base=base, offsets={"node2": skew})
    n1 = cl.nodes["node1"]
    e = Ends(sc.name)
    W = 87_000  # every packet, both directions: the midpoint estimate is exact
    P = L.Paths(wire=W)
    date = L.http_date(base)
    lead1, lead2 = 52_770_118, 49_318_604
    c1 = L.Conn(e.cloudflare("172.70.222.14", lead1), e.node80(n1))
    c2 = L.Conn(e.cloudflare("162.158.91.7", lead2), e.node80(n1))
    up = L.Conn(e.traefik(n1, "10.42.1.5"), e.pod("10.42.1.5"))
    token = e.token()
    recs = []
    s1, a1 = L.client_handshake(cl, n1, c1, 0, P, 2 * lead1 + 1)
    body = jbytes({"residence_id": 42, "title": "Service garage door opener", "priority": "low", "due_date": "2026-02-01", "recurrence": "yearly"})
    specs = [
        (c1, "POST", "/api/tasks/", 201, body, dict(t=a1 + 9_533, syn=387_604, ingress=866_310, encap=33_170, decap=19_512, deliver=29_006,
                                                    app=3_120_448, route=24_733, encap_r=32_508, decap_r=20_331, egress=93_112)),
        (c1, "GET", "/api/tasks/?residence=42", 200, b"", dict(t=a1 + 9_533 + 250_311_907, ingress=441_207, encap=31_990, decap=19_004,
                                                                deliver=28_118, app=1_404_776, route=23_340, encap_r=31_115, decap_r=19_606, egress=86_990)),
    ]
    for k, (conn, method, path, status, b, tm) in enumerate(specs):
        tm.update(wire=W, wire_r=W)
        resp = jbytes(task_json(e.rng, 1 if status == 201 else 4, created="2025-11-27T10:11:42.440Z"))
        r = make_req(e, n1, conn.a.ip, method, path, status, user_ip="70.121.34.188", token=token, body=b, resp_body=resp, date=date)
        rec = L.exchange(cl, P, n1, conn, up, r, tm, new_up=(k == 0), ack_client=(0,), pod_ack=(k == 0))
        if k == 0:
            edge(rec, s1, a1)
        recs.append(rec)
    t2 = specs[1][5]["t"] + 120_000_000
    s2, a2 = L.client_handshake(cl, n1, c2, t2, P, 2 * lead2 + 1)
    for k, (method, path, status, dt, tm) in enumerate([
        ("GET", "/api/residences/42/", 200, 10_412, dict(ingress=452_660, encap=32_841, decap=18_977, deliver=27_880, app=988_104, route=22_907,
                                                        encap_r=31_448, decap_r=19_230, egress=79_551)),
        ("POST", "/api/tasks/", 201, 10_412 + 611_004_877, dict(ingress=447_019, encap=33_306, decap=19_118, deliver=28_640, app=2_817_303,
                                                                 route=24_102, encap_r=32_016, decap_r=19_887, egress=91_740)),
    ]):
        tm = dict(t=a2 + dt, **tm, wire=W, wire_r=W)
        b = body if method == "POST" else b""
        resp = jbytes(task_json(e.rng, 1, created="2025-11-27T10:11:43.100Z"))
        r = make_req(e, n1, c2.a.ip, method, path, status, user_ip="99.43.160.22", token=token, body=b, resp_body=resp, date=date)
        rec = L.exchange(cl, P, n1, c2, up, r, tm, ack_client=(0,) if k == 0 else ())
        if k == 0:
            edge(rec, s2, a2)
        recs.append(rec)
    for rec in recs:
        rec["flags_include"] = ["clock_skew_corrected"]
    fin(cl)
    files = write_all(sc, cl, base, epb_flags=False)
    sc.expected(files, recs, offsets={"node2": skew})
    return sc


# ---------------------------------------------------------------------------
# 8. tcpdump-any: classic pcap, nanoseconds, LINUX_SLL2, no interface names


def s_tcpdump_any(out: str) -> Scenario:
    sc = Scenario("tcpdump-any", out)
    base = 1764238911_902_337_145
    cl = make_cluster({"node1": ["eth0", "flannel.1", "cni0", "vethd40c91e2"], "node2": ["eth0", "flannel.1", "cni0", "veth5b8e7a1c"]},
                      underlay="public", base=base)
    n1 = cl.nodes["node1"]
    e = Ends(sc.name)
    P = L.Paths(wire=121_006)
    date = L.http_date(base)
    lead1, lead2 = 51_990_334, 50_402_716
    c1 = L.Conn(e.cloudflare("172.70.90.3", lead1), e.node80(n1))
    c2 = L.Conn(e.cloudflare("162.158.90.222", lead2), e.node80(n1))
    up1 = L.Conn(e.traefik(n1, "10.42.1.5"), e.pod("10.42.1.5"))
    up2 = L.Conn(e.traefik(n1, "10.42.0.7"), e.pod("10.42.0.7"))
    s1, a1 = L.client_handshake(cl, n1, c1, 0, P, 2 * lead1 + 1)
    body = jbytes({"residence_id": 42, "title": "Winterize sprinklers", "priority": "high", "due_date": "2025-12-02", "recurrence": "yearly"})
    r1 = make_req(e, n1, c1.a.ip, "POST", "/api/tasks/", 201, user_ip="70.121.34.188", token=e.token(), body=body,
                  resp_body=jbytes(task_json(e.rng, 1, created="2025-11-27T10:21:51.998Z")[0]), date=date)
    tm1 = dict(t=a1 + 9_704, syn=389_902, ingress=870_118, encap=33_554, wire=124_870, decap=19_660, deliver=29_313,
               app=2_775_061, route=24_620, encap_r=32_871, wire_r=131_442, decap_r=20_009, egress=94_227)
    rec1 = edge(L.exchange(cl, P, n1, c1, up1, r1, tm1, new_up=True, ack_client=(0,), pod_ack=True), s1, a1)
    # a second request served by the pod on node1 itself
    s2, a2 = L.client_handshake(cl, n1, c2, 1_402_118_077, P, 2 * lead2 + 1)
    r2 = make_req(e, n1, c2.a.ip, "GET", "/api/tasks/?residence=42", 200, user_ip="99.43.160.22", token=e.token(),
                  resp_body=jbytes({"count": 2, "next": None, "results": task_json(e.rng, 2, created="2025-11-20T18:02:11.507Z")}), date=date)
    tm2 = dict(t=a2 + 10_861, syn=388_420, ingress=447_903, app=1_318_866, egress=66_275)
    rec2 = edge(L.exchange(cl, P, n1, c2, up2, r2, tm2, new_up=True, ack_client=(0,), pod_ack=True), s2, a2)
    fin(cl)
    files = []
    for n in cl.nodes.values():
        L.write_pcap(os.path.join(sc.dir, f"{n.name}.pcap"), n, base, nsec=True, linktype=L.LINKTYPE_LINUX_SLL2)
        files.append(f"{n.name}.pcap")
    sc.expected(files, [rec1, rec2], offsets={"node2": 0})
    return sc


# ---------------------------------------------------------------------------
# 9. formats: one request, whole microseconds, in several containers


def formats_timeline() -> tuple[L.Cluster, int, list[dict[str, Any]]]:
    base = 1764239400_512_640_000
    cl = make_cluster({"node1": ["eth0", "flannel.1"], "node2": ["eth0", "flannel.1", "cni0", "veth5b8e7a1c"]}, underlay="public", base=base)
    n1 = cl.nodes["node1"]
    e = Ends("formats")
    P = L.Paths(encap=31_000, wire=118_000, decap=19_000, deliver=27_000, veth_lag=2_000, bridge_lag=2_000, route=22_000,
                synack_lat=21_000, pod_synack=11_000, ack_lat=5_000, up_gap=2_000, resp_gap=4_000, client_gap=1_000,
                traefik_ack=14_000, client_ack=27_000, pod_ack=39_000, client_seg_gap=1_000, cf_ack_jitter=1_000)
    lead = 52_406_000
    client = L.Conn(e.cloudflare("172.70.222.14", lead), e.node80(n1))
    up = L.Conn(e.traefik(n1, "10.42.1.5"), e.pod("10.42.1.5"))
    t_sa, t_ack = L.client_handshake(cl, n1, client, 0, P, 2 * lead)
    body = jbytes({"residence_id": 42, "title": "Clean gutters", "priority": "medium", "due_date": "2025-12-06", "recurrence": "quarterly"})
    r1 = make_req(e, n1, client.a.ip, "POST", "/api/tasks/", 201, user_ip="70.121.34.188", token=e.token(), body=body,
                  resp_body=jbytes(task_json(e.rng, 1, created="2025-11-27T10:30:00.515Z")[0]), date=L.http_date(base))
    tm1 = dict(t=t_ack + 10_000, syn=389_000, ingress=874_000, encap=34_000, wire=122_000, decap=20_000, deliver=30_000,
               app=2_861_000, route=25_000, encap_r=33_000, wire_r=143_000, decap_r=20_000, egress=96_000)
    rec1 = edge(L.exchange(cl, P, n1, client, up, r1, tm1, new_up=True, ack_client=(0,), pod_ack=True), t_sa, t_ack)
    fin(cl)
    for n in cl.nodes.values():
        assert all((base + f.t) % 1000 == 0 for f in n.frames), "formats: timestamps must be whole microseconds"
    return cl, base, [rec1]


def s_formats(out: str) -> Scenario:
    top = Scenario("formats", out)
    variants: list[tuple[str, Callable[[str, L.Node, int], str]]] = [
        ("pcap-us-ether", lambda d, n, b: _pcap(d, n, b, nsec=False, linktype=L.LINKTYPE_ETHERNET)),
        ("pcap-ns-sll", lambda d, n, b: _pcap(d, n, b, nsec=True, linktype=L.LINKTYPE_LINUX_SLL)),
        ("pcapng-be", lambda d, n, b: _pcapng(d, n, b, sections=[L.Section(endian=">", tsresol=6 if n.name == "node1" else 9)], epb_flags=False)),
        ("pcapng-multisection", _multisection),
        ("raw-ip", lambda d, n, b: _pcap(d, n, b, nsec=True, linktype=L.LINKTYPE_RAW) if n.name == "node1" else _pcapng(d, n, b)),
    ]
    for sub, writer in variants:
        sc = Scenario(f"formats/{sub}", out)
        cl, base, recs = formats_timeline()
        files = [writer(sc.dir, n, base) for n in cl.nodes.values()]
        sc.expected(files, recs, offsets={"node2": 0})
    return top


def _pcap(d: str, n: L.Node, base: int, *, nsec: bool, linktype: int) -> str:
    L.write_pcap(os.path.join(d, f"{n.name}.pcap"), n, base, nsec=nsec, linktype=linktype)
    return f"{n.name}.pcap"


def _pcapng(d: str, n: L.Node, base: int, **kw: Any) -> str:
    L.write_pcapng(os.path.join(d, f"{n.name}.pcapng"), n, base, **kw)
    return f"{n.name}.pcapng"


def _multisection(d: str, n: L.Node, base: int) -> str:
    if n.name != "node1":
        return _pcapng(d, n, base)
    # node1: two sections, as `cat a.pcapng b.pcapng` gives. The first is
    # little-endian with if_tsresol 9; the second big-endian, its interfaces
    # in the other order, and without if_tsresol (the default: microseconds).
    # The cut falls between the upstream handshake and the upstream request.
    frames = sorted(n.frames, key=lambda f: (f.t, f.order))
    cut = next(f.t for f in frames if f.ifname == "flannel.1" and len(f.l3) > 100)
    return _pcapng(d, n, base, sections=[L.Section("<", ["eth0", "flannel.1"], 9, None, cut),
                                         L.Section(">", ["flannel.1", "eth0"], None, cut, None)])


# ---------------------------------------------------------------------------
# 10. bad inputs


def s_bad(out: str) -> Scenario:
    top = Scenario("bad", out)
    # truncated: a same-node capture of three requests, cut in the middle of
    # the block that holds the third request.
    sc = Scenario("bad/truncated", out)
    base = 1764240033_118_404_552
    cl = make_cluster({"node1": ["eth0", "cni0", "vethd40c91e2"]}, underlay="public", base=base)
    n1 = cl.nodes["node1"]
    e = Ends("bad-truncated")
    P = L.Paths()
    lead = 50_118_772
    client = L.Conn(e.cloudflare("172.70.34.9", lead), e.node80(n1))
    up = L.Conn(e.traefik(n1, "10.42.0.7"), e.pod("10.42.0.7"))
    token, date = e.token(), L.http_date(base)
    t_sa, t_ack = L.client_handshake(cl, n1, client, 0, P, 2 * lead + 1)
    recs = []
    t = t_ack + 9_880
    for k, tm in enumerate([dict(syn=390_551, ingress=451_207, app=1_911_340, egress=66_018),
                            dict(ingress=402_336, app=1_377_902, egress=70_446),
                            dict(ingress=398_114, app=1_254_870, egress=64_331)]):
        tm = dict(t=t, **tm)
        r = make_req(e, n1, client.a.ip, "GET", f"/api/tasks/{1180 + k}/", 200, user_ip="70.121.34.188", token=token,
                     resp_body=jbytes(task_json(e.rng, 1, created="2025-11-27T10:40:33.118Z")[0]), date=date)
        rec = L.exchange(cl, P, n1, client, up, r, tm, new_up=(k == 0), ack_client=(0,) if k == 0 else (), tag=f"r{k}")
        if k == 0:
            edge(rec, t_sa, t_ack)
        recs.append(rec)
        t += 287_330_114
    fin(cl)
    L.write_pcapng(os.path.join(sc.dir, "node1.pcapng"), n1, base, cut_tag="r2.client.0", cut_into=301)
    sc.expected(["node1.pcapng"], recs[:2], stderr_contains=["truncated"], extra={"stderr_line_count": 1})

    # garbage: random bytes
    sc = Scenario("bad/garbage", out)
    rng = random.Random("hopscope-pcaps/bad-garbage")
    data = bytes(rng.getrandbits(8) for _ in range(4096))
    assert data[:4] not in (b"\xd4\xc3\xb2\xa1", b"\xa1\xb2\xc3\xd4", b"\x4d\x3c\xb2\xa1", b"\xa1\xb2\x3c\x4d", b"\x0a\x0d\x0d\x0a")
    with open(os.path.join(sc.dir, "node1.pcap"), "wb") as fh:
        fh.write(data)
    doc = {"files": ["node1.pcap"], "exit_code": 2, "stderr_contains": [], "stderr_line_count": 1, "stderr_prefix": "hopscope:",
           "requests": None, "drops": None, "clock_offsets": {}}
    with open(os.path.join(sc.dir, "expected.json"), "w") as fh:
        fh.write(dumps(doc))
    return top


# ---------------------------------------------------------------------------
# Output


class Scenario:
    def __init__(self, name: str, out: str):
        self.name = name
        self.dir = os.path.join(out, name)
        os.makedirs(self.dir, exist_ok=True)

    def expected(self, files: list[str], requests: list[dict[str, Any]], *, drops: list[dict[str, Any]] | None = None,
                 offsets: dict[str, int] | None = None, exit_code: int = 0, stderr_contains: list[str] | None = None,
                 extra: dict[str, Any] | None = None) -> None:
        reqs = []
        for r in sorted(requests, key=lambda r: r["_moments"]["nic_complete"]):
            r = dict(r)
            m = r.pop("_moments")
            r.setdefault("hops", L.hops_from_moments(m, r["ingress_node"], r.get("pod_node")))
            r.setdefault("flags_include", [])
            r.setdefault("flags_exclude", [f for f in CLEAN if f not in r["flags_include"]])
            keys = ["request_id", "method", "path", "status", "ingress_node", "pod_node", "total_ns", "hops", "flags_include", "flags_exclude"]
            r = {k: r[k] for k in keys if k in r}
            tiling = [h for h in r["hops"] if h["name"] != "edge_rtt"]
            assert sum(h["duration_ns"] for h in tiling) == r["total_ns"], r["request_id"]
            reqs.append(r)
        doc: dict[str, Any] = {"files": files, "exit_code": exit_code, "stderr_contains": stderr_contains or []}
        if extra:
            doc.update(extra)
        doc["requests"] = reqs
        doc["drops"] = drops or []
        doc["clock_offsets"] = {k: {"true_offset_ns": v} for k, v in (offsets or {}).items()}
        with open(os.path.join(self.dir, "expected.json"), "w") as fh:
            fh.write(dumps(doc))


SCENARIOS: dict[str, Callable[[str], Scenario]] = {
    "cross-node-public": s_cross_node_public,
    "cross-node-private": s_cross_node_private,
    "keepalive-split": s_keepalive_split,
    "same-node": s_same_node,
    "vxlan-retransmit": s_vxlan_retransmit,
    "drops": s_drops,
    "clock-skew": s_clock_skew,
    "tcpdump-any": s_tcpdump_any,
    "formats": s_formats,
    "bad": s_bad,
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=HERE, help="directory to write the scenario directories into (default: pcaps/)")
    ap.add_argument("--only", nargs="*", help="scenarios to write")
    ap.add_argument("--tables", action="store_true", help="print each scenario's timing tables")
    args = ap.parse_args(argv)
    for name, fn in SCENARIOS.items():
        if args.only and name not in args.only:
            continue
        fn(args.out)
    if args.tables:
        print_tables(args.out, args.only)
    return 0


def print_tables(out: str, only: list[str] | None) -> None:
    """The expected hops of every scenario as Markdown tables (microseconds, exact to the ns)."""
    arrow = {"request": " ->", "response": " <-", "server": "", "request+response": ""}
    for path in sorted(glob.glob(os.path.join(out, "**", "expected.json"), recursive=True)):
        rel = os.path.relpath(os.path.dirname(path), out)
        if only and rel.split("/")[0] not in only:
            continue
        with open(path) as fh:
            doc = json.load(fh)
        if not doc["requests"]:
            continue
        cols: list[tuple[str, str]] = []
        for r in doc["requests"]:
            for h in r["hops"]:
                if (h["name"], h["dir"]) not in cols:
                    cols.append((h["name"], h["dir"]))
        canon = [("ingress", "request"), ("encap", "request"), ("wire", "request"), ("decap", "request"), ("deliver", "request"),
                 ("app", "server"), ("route", "response"), ("encap", "response"), ("wire", "response"), ("decap", "response"),
                 ("egress", "response"), ("ingress+egress", "request+response"), ("edge_rtt", "request")]
        order = sorted(cols, key=canon.index)
        print(f"`{rel}`\n")
        print("| request | | total | " + " | ".join(n + arrow[d] for n, d in order) + " |")
        print("|---|---|---:|" + "---:|" * len(order))
        for r in doc["requests"]:
            hops = {(h["name"], h["dir"]): h["duration_ns"] for h in r["hops"]}
            cells = [f"{hops[c] / 1000:,.3f}" if c in hops else "" for c in order]
            what = f"{r['method']} {r['path']} -> {r['status']}"
            print(f"| `{r['request_id'][:8]}` | {what} | {r['total_ns'] / 1000:,.3f} | " + " | ".join(cells) + " |")
        print()


if __name__ == "__main__":
    sys.exit(main())
