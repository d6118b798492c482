"""The stitcher on observation streams with exactly known timings."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
from flows import (
    CLIENT,
    FLANNEL,
    NODE_IP,
    POD_IP,
    T0,
    Timeline,
    cross_node_request,
    http_request,
    http_response,
)
from hypothesis import given, settings
from hypothesis import strategies as st_

from hopscope.model import ACK, FIN, PSH, RST, SYN
from hopscope.model import NIC as AT_NIC
from hopscope.model import POD as AT_POD
from hopscope.stitch import Stitcher

TILING = ("ingress", "encap", "wire", "decap", "deliver", "app", "route", "encap", "wire", "decap",
          "egress")


def stitch(tl: Timeline, nodes: tuple[str, ...] = ("node1", "node2"), **kw: Any) -> dict[str, Any]:
    s = Stitcher(nodes, **kw)
    for n in nodes:
        s.feed(n, tl.sorted(n))
    return s.result()


def hops(req: dict[str, Any]) -> list[tuple[str, str, int]]:
    return [(h["name"], h["node"], h["duration_ns"]) for h in req["hops"]]


def expected_cross(truth: dict[str, int], a: str = "node1", b: str = "node2") -> list[tuple[str, str, int]]:
    return [
        ("ingress", a, truth["ingress"]), ("encap", a, truth["encap_req"]),
        ("wire", f"{a}->{b}", truth["wire_req"]), ("decap", b, truth["decap_req"]),
        ("deliver", b, truth["deliver"]), ("app", b, truth["app"]), ("route", b, truth["route"]),
        ("encap", b, truth["encap_resp"]), ("wire", f"{b}->{a}", truth["wire_resp"]),
        ("decap", a, truth["decap_resp"]), ("egress", a, truth["egress"]),
        ("edge_rtt", a, truth["edge_rtt"]),
    ]


def test_cross_node_hops_exact_and_tile_total() -> None:
    tl = Timeline()
    truth = cross_node_request(tl)
    env = stitch(tl)
    [r] = env["requests"]
    assert r["request_id"] == "8c1f2e3d4b5a6978-DFW"
    assert (r["method"], r["path"], r["host"], r["status"]) == ("POST", "/api/tasks/",
                                                                "api.myhoneydue.com", 201)
    assert (r["ingress_node"], r["pod_node"]) == ("node1", "node2")
    assert hops(r) == expected_cross(truth)
    assert r["total_ns"] == truth["total"]
    assert sum(h["duration_ns"] for h in r["hops"] if h["name"] != "edge_rtt") == r["total_ns"]
    assert r["start_ns"] == truth["start"]
    assert r["flags"] == []
    assert env["drops"] == []
    # hops are contiguous: each starts where the previous ended
    tiling = [h for h in r["hops"] if h["name"] != "edge_rtt"]
    for h1, h2 in itertools.pairwise(tiling):
        assert h1["start_ns"] + h1["duration_ns"] == h2["start_ns"]


def test_cross_node_deliver_ends_when_the_request_is_complete_at_the_pod() -> None:
    """The upstream request's head in two segments 20 µs apart at every point: `deliver` runs
    from the first byte at the overlay to the segment that completes the head at the pod,
    where `app` starts (the contract); the transit hops are the first byte's."""
    tl = Timeline()
    truth = cross_node_request(tl, split_upstream=20_000)
    [r] = stitch(tl)["requests"]
    assert truth["deliver"] == 30_000
    assert hops(r) == expected_cross(truth)
    tiling = [h for h in r["hops"] if h["name"] != "edge_rtt"]
    assert sum(h["duration_ns"] for h in tiling) == r["total_ns"] == truth["total"]
    app = next(h for h in r["hops"] if h["name"] == "app")
    assert app["start_ns"] == T0 + 510_000 + 200_000 + 80_000 + 20_000


def test_clock_skew_is_estimated_and_corrected() -> None:
    tl = Timeline()
    truth = cross_node_request(tl, skew_b=3_700_000)
    env = stitch(tl)
    [r] = env["requests"]
    assert hops(r) == expected_cross(truth)
    off = env["clock_offsets"]["node2"]
    assert abs(off["offset_ns"] - 3_700_000) <= off["error_ns"]
    assert off["error_ns"] <= 15_000
    assert "clock_skew_corrected" in r["flags"]
    assert env["reference"] == "node1"


def test_negative_skew_and_reference_choice() -> None:
    tl = Timeline()
    truth = cross_node_request(tl, skew_b=-2_500_000)
    env = stitch(tl, reference="node2")
    [r] = env["requests"]
    assert hops(r) == expected_cross(truth)
    off = env["clock_offsets"]["node1"]
    assert abs(off["offset_ns"] - 2_500_000) <= off["error_ns"]
    # absolute times are on node2's clock now
    assert r["start_ns"] == truth["start"] - 2_500_000


def test_retransmitted_vxlan_segment_lands_in_wire() -> None:
    tl = Timeline()
    truth = cross_node_request(tl, skew_b=1_000_000, lose_upstream_first=True)
    env = stitch(tl)
    [r] = env["requests"]
    assert hops(r) == expected_cross(truth)
    assert dict((n, d) for n, _, d in hops(r)[2:3])["wire"] == 204_015_000
    assert "retransmit" in r["flags"]
    # the handshake keeps the clock estimate tight despite the loss
    off = env["clock_offsets"]["node2"]
    assert abs(off["offset_ns"] - 1_000_000) <= off["error_ns"] <= 15_000


def test_missing_node_capture_merges_hops() -> None:
    tl = Timeline()
    truth = cross_node_request(tl)
    s = Stitcher(["node1"])
    s.feed("node1", tl.sorted("node1"))
    env = s.result()
    [r] = env["requests"]
    names = [h["name"] for h in r["hops"]]
    assert names == ["ingress", "encap", "wire+decap+deliver+app+route+encap+wire", "decap",
                     "egress", "edge_rtt"]
    assert "incomplete" in r["flags"]
    assert r["total_ns"] == truth["total"]
    assert sum(h["duration_ns"] for h in r["hops"][:-1]) == truth["total"]
    assert r["pod_node"] is None


def test_pod_node_alone_reports_orphan_upstream_request() -> None:
    tl = Timeline()
    cross_node_request(tl)
    s = Stitcher(["node2"])
    s.feed("node2", tl.sorted("node2"))
    env = s.result()
    [r] = env["requests"]
    assert r["request_id"] == "8c1f2e3d4b5a6978-DFW"
    assert r["total_ns"] is None and r["ingress_node"] is None and r["pod_node"] == "node2"
    assert "incomplete" in r["flags"]
    assert [h["name"] for h in r["hops"]] == ["decap", "deliver", "app", "route", "encap"]


def _drain_node(s: Stitcher, node: str, tl: Timeline) -> list[dict[str, Any]]:
    """``node``'s whole stream handed over at once, then a final drain (a collector whose
    every known node went idle)."""
    t = s.tracker(node)
    t.feed(tl.sorted(node))
    s.add(node, t.take(final=True))
    return s.drain(final=True)


@pytest.mark.parametrize("late", ["node2", "node1"])
def test_a_node_whose_data_comes_late_completes_the_request(late: str) -> None:
    """A collector drained a request without one node's part (the node's agent was cut
    off); when that part comes, the request comes out again, as if it had all come at
    once (same hops to the ns, same clock offset). Without ``late_ns`` it would come out
    a second time in pieces (an orphan, or a client request without upstream)."""
    tl = Timeline()
    truth = cross_node_request(tl)
    whole = stitch(tl)
    early = "node1" if late == "node2" else "node2"
    s = Stitcher(["node1", "node2"], late_ns=60_000_000_000)
    [first] = _drain_node(s, early, tl)
    assert "incomplete" in first["flags"], first
    [again] = _drain_node(s, late, tl)
    assert again == whole["requests"][0]
    assert hops(again) == expected_cross(truth)
    assert s.envelope([], [])["clock_offsets"] == whole["clock_offsets"]
    assert not s._late_all and not s._revived  # complete: nothing kept for it
    # without late_ns: the late part is stitched alone, and nothing is completed
    s = Stitcher(["node1", "node2"])
    _drain_node(s, early, tl)
    [alone] = _drain_node(s, late, tl)
    assert "incomplete" in alone["flags"] or "no_upstream" in alone["flags"], alone


def test_late_requests_kept_are_bounded_and_expire() -> None:
    tl = Timeline()
    cross_node_request(tl, ray="1111111111111111-DFW")
    cross_node_request(tl, ray="2222222222222222-DFW", t=5_000_000, cport=40124, uport=51001)
    s = Stitcher(["node1", "node2"], late_ns=5_000_000_000)
    s.late_max = 1
    assert len(_drain_node(s, "node1", tl)) == 2
    assert [x.rid for x in s._late_all] == ["2222222222222222-DFW"]  # the newer one
    # node1's clock 10 s on (later traffic): past late_ns, the kept request is let go
    s._last["node1"] += 10_000_000_000
    s.drain(final=True)
    assert not s._late_all and not s._late and not s._late_rid
    # node2's part now stands alone: orphans, nothing completed
    alone = _drain_node(s, "node2", tl)
    assert len(alone) == 2 and all(r["ingress_node"] is None for r in alone)


def _sizes(s: Stitcher) -> dict[str, int]:
    """How much each piece of a stitcher's pending state holds."""
    out = {k: len(getattr(s, k)) for k in (
        "_hs", "_synacks", "_ends", "_clients", "_groups", "_by_rid", "_no_id", "_syns",
        "_kdrops", "_late_all")}
    out["windows"] = sum(len(w) for w in s._pairs.values())
    for node, t in s.trackers.items():  # (their connections go after IDLE_NS: 5 min)
        out[f"{node}.sightings"] = len(t.sightings)
    return out


def test_a_long_stream_keeps_bounded_state() -> None:
    """A collector's stitcher never drains ``final`` while traffic goes on: everything
    it keeps (a connection's handshake for clock samples and for judging SYNs, clock
    windows, pending requests, ...) must be let go by age, not only at the end. 400
    connections, one a second, drained as they come: no piece of state may hold more
    than a few minutes' worth (the handshakes once grew with every connection)."""
    tl = Timeline()
    n = 400
    truths = [cross_node_request(tl, ray=f"{i:016x}-DFW", t=i * 1_000_000_000,
                                 cport=20000 + i, uport=30000 + i) for i in range(n)]
    s = Stitcher(["node1", "node2"], late_ns=60_000_000_000)
    streams = {node: tl.sorted(node) for node in ("node1", "node2")}
    out: list[dict[str, Any]] = []
    most: dict[str, int] = {}
    for k in range(0, n, 10):  # 10 s of traffic at a time, from both nodes
        end = T0 + (k + 10) * 1_000_000_000
        for node, obs in streams.items():
            s.feed(node, [o for o in obs if T0 + k * 1_000_000_000 <= o.ts_real_ns < end])
        out += s.poll()
        for key, v in _sizes(s).items():
            most[key] = max(most.get(key, 0), v)
    out += s.result()["requests"]
    assert [r["request_id"] for r in out] == [f"{i:016x}-DFW" for i in range(n)]
    assert all(hops(r) == expected_cross(t) for r, t in zip(out, truths, strict=True))
    # a SYN and a SYN-ACK per connection, for 2 * horizon_ns plus one 10 s step's worth of
    # connections (kept for good: 2 * n)
    window_s = 2 * s.horizon_ns // 1_000_000_000 + 10
    assert most["_hs"] <= 2 * window_s, most
    # every other piece: a step's worth or a few windows, far below one per connection
    assert max(v for k, v in most.items() if k not in ("_hs", "_synacks", "_ends")) <= 40, most
    assert most["_synacks"] <= 2 * window_s and most["_ends"] <= window_s, most  # 2 nodes


@pytest.mark.parametrize("drift", [40_000, 2_000_000])
def test_clocks_that_drift_apart_are_followed(drift: int) -> None:
    """node2's clock drifts from node1's by ``drift`` over 30 minutes (40 µs: NTP-disciplined
    clocks wander so; 2 ms: about 1 ppm). The bounds of the whole run contradict each other
    early on; the offsets, estimated per window of time, follow the drift: no hop is
    negative, the wire is right to a few µs, and the stitcher keeps a bounded number of
    windows while it streams."""
    tl = Timeline()
    n, step = 180, 10_000_000_000
    truths = [cross_node_request(tl, ray=f"{i:016x}-DFW", t=i * step, cport=20000 + i,
                                 uport=30000 + i, skew_b=drift * i // n) for i in range(n)]
    s = Stitcher(["node1", "node2"])
    used: dict[str, dict[str, dict[str, int]]] = {}
    s.offsets_used = used
    streams = {node: tl.sorted(node) for node in ("node1", "node2")}
    out: list[dict[str, Any]] = []
    most = 0
    minute = 60_000_000_000
    for k in range(0, n * step, minute):
        for node, obs in streams.items():
            s.feed(node, [o for o in obs if T0 + k <= o.ts_real_ns < T0 + k + minute])
        out += s.poll()
        most = max(most, max(len(w) for w in s._pairs.values()))
    env = s.result()
    out += env["requests"]
    assert len(out) == n and not s.warnings
    for r, t in zip(out, truths, strict=True):
        assert min(h["duration_ns"] for h in r["hops"]) >= 0, r["request_id"]
        wire = [h["duration_ns"] for h in r["hops"] if h["name"] == "wire"]
        assert abs(wire[0] - t["wire_req"]) <= 10_000 and abs(wire[1] - t["wire_resp"]) <= 10_000
    assert abs(env["clock_offsets"]["node2"]["offset_ns"] - drift * (n - 1) // n) <= 15_000
    # each request says which offsets its hops used: its own time's
    for i, r in enumerate(out):
        off = used[r["request_id"]]["node2"]
        assert abs(off["offset_ns"] - drift * i // n) <= off["error_ns"] + 10_000, (i, off)
    # the windows a request can still need (horizon_ns and linger_ns back, and the span),
    # plus a minute fed at a time: not one per 10 s of the whole run (180)
    assert most <= 20, most


def same_node(tl: Timeline, *, split_headers: bool = False, chunked: bool = False,
              pipelined: int = 1, t: int = 0, ray_prefix: str = "aa") -> list[dict[str, int]]:
    """Keep-alive client connection on node1 served by node1's own pod."""
    a = "node1"
    nic = NODE_IP[a]
    c, s_, u, p = 10, 20000, 30000, 40000
    tl.add(a, "eth0", t, CLIENT, 41000, nic, 80, c, 0, SYN)
    tl.add(a, "eth0", t + 10_000, nic, 80, CLIENT, 41000, s_, c + 1, SYN | ACK)
    tl.add(a, "eth0", t + 90_000, CLIENT, 41000, nic, 80, c + 1, s_ + 1, ACK)
    src, dst = "10.42.0.1", POD_IP[a]  # masqueraded to cni0's address
    tl.add(a, "cni0", t + 95_000, src, 52000, dst, 8000, u, 0, SYN)
    tl.add(a, "vethab12cd34", t + 96_000, src, 52000, dst, 8000, u, 0, SYN, ip_id=tl.ipid)
    tl.add(a, "vethab12cd34", t + 97_000, dst, 8000, src, 52000, p, u + 1, SYN | ACK)
    tl.add(a, "cni0", t + 98_000, dst, 8000, src, 52000, p, u + 1, SYN | ACK, ip_id=tl.ipid)
    cseq, sseq, useq, pseq = c + 1, s_ + 1, u + 1, p + 1
    truths = []
    tt = t + 200_000
    for i in range(pipelined):
        ray = f"{ray_prefix}{i:014x}-DFW"
        req = http_request("GET", f"/api/tasks/?page={i}", ray)
        if split_headers:
            cut = len(req) // 2
            tl.add(a, "eth0", tt, CLIENT, 41000, nic, 80, cseq, sseq, ACK, req[:cut])
            tl.add(a, "eth0", tt + 30_000, CLIENT, 41000, nic, 80, cseq + cut, sseq, ACK | PSH, req[cut:])
            complete = tt + 30_000
        else:
            tl.add(a, "eth0", tt, CLIENT, 41000, nic, 80, cseq, sseq, ACK | PSH, req)
            complete = tt
        cseq += len(req)
        ureq = http_request("GET", f"/api/tasks/?page={i}", ray, extra="X-Real-Ip: 198.51.100.77")
        uf = complete + 300_000
        # upstream request in two segments: first at uf, the rest 20 us later
        cut = 40
        tl.add(a, "cni0", uf, src, 52000, dst, 8000, useq, pseq, ACK, ureq[:cut])
        tl.add(a, "vethab12cd34", uf + 2_000, src, 52000, dst, 8000, useq, pseq, ACK, ureq[:cut],
               ip_id=tl.ipid)
        tl.add(a, "cni0", uf + 20_000, src, 52000, dst, 8000, useq + cut, pseq, ACK | PSH, ureq[cut:])
        tl.add(a, "vethab12cd34", uf + 22_000, src, 52000, dst, 8000, useq + cut, pseq, ACK | PSH,
               ureq[cut:], ip_id=tl.ipid)
        useq += len(ureq)
        body = b"[" + b'{"id": 1, "title": "x"},' * 150 + b"{}]"
        resp = http_response(200, body, chunked=chunked)
        rp = uf + 20_000 + 1_500_000
        # the response in 1448-byte segments, seen at the veth then at cni0
        off = 0
        k = 0
        while off < len(resp):
            seg = resp[off:off + 1448]
            tl.add(a, "vethab12cd34", rp + k * 3_000, dst, 8000, src, 52000, pseq + off, useq, ACK, seg)
            tl.add(a, "cni0", rp + k * 3_000 + 1_000, dst, 8000, src, 52000, pseq + off, useq, ACK, seg,
                   ip_id=tl.ipid)
            off += len(seg)
            k += 1
        pseq += len(resp)
        cresp = http_response(200, body, chunked=chunked)
        out = rp + 250_000
        off = 0
        k = 0
        while off < len(cresp):
            seg = cresp[off:off + 1448]
            tl.add(a, "eth0", out + k * 2_000, nic, 80, CLIENT, 41000, sseq + off, cseq, ACK, seg)
            off += len(seg)
            k += 1
        sseq += len(cresp)
        tl.add(a, "eth0", out + 60_000, CLIENT, 41000, nic, 80, cseq, sseq, ACK)
        truths.append({"ray": ray, "ingress": uf - complete, "deliver": 20_000, "app": 1_500_000,
                       "egress": 250_000, "total": out - complete, "start": T0 + complete})
        tt = out + 1_000_000
    return truths


@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("chunked", [False, True])
def test_same_node_keepalive_split_headers_multisegment(split: bool, chunked: bool) -> None:
    tl = Timeline()
    truths = same_node(tl, split_headers=split, chunked=chunked, pipelined=3)
    env = stitch(tl, nodes=("node1",))
    reqs = env["requests"]
    assert [r["request_id"] for r in reqs] == [t["ray"] for t in truths]
    for r, t in zip(reqs, truths, strict=True):
        assert r["pod_node"] == r["ingress_node"] == "node1"
        assert r["status"] == 200
        assert r["start_ns"] == t["start"]
        assert [(h["name"], h["duration_ns"]) for h in r["hops"] if h["name"] != "edge_rtt"] == [
            ("ingress", t["ingress"]), ("deliver", t["deliver"]), ("app", t["app"]),
            ("egress", t["egress"])]
        assert r["total_ns"] == t["total"]
        assert "retransmit" not in r["flags"]  # veth/cni0 copies are not retransmissions
    assert [h["name"] for h in reqs[0]["hops"]][-1] == "edge_rtt"
    assert all(h["name"] != "edge_rtt" for r in reqs[1:] for h in r["hops"])


def test_out_of_order_segments_are_reassembled() -> None:
    tl = Timeline()
    truths = same_node(tl, split_headers=True, pipelined=1)
    # swap the two halves of the client request in time: the second half arrives first
    obs = tl.obs["node1"]
    data = [o for o in obs if o.ifname == "eth0" and o.dport == 80 and o.plen]
    first, second = data[0], data[1]
    obs[obs.index(first)] = first._replace(ts_real_ns=second.ts_real_ns)
    obs[obs.index(second)] = second._replace(ts_real_ns=first.ts_real_ns)
    env = stitch(tl, nodes=("node1",))
    [r] = env["requests"]
    assert r["request_id"] == truths[0]["ray"]
    assert "out_of_order" in r["flags"]
    # complete = when the missing first half arrived (the later of the two)
    assert r["start_ns"] == truths[0]["start"]


def test_unanswered_syns_are_a_drop_at_the_nic() -> None:
    tl = Timeline()
    for k, dt in enumerate((0, 1_000_000_000, 3_000_000_000)):
        tl.add("node1", "eth0", dt, CLIENT, 40999, NODE_IP["node1"], 80, 777, 0, SYN)
        assert k < 3
    tl.add("node1", "eth0", 4_000_000_000, "10.0.0.9", 22, "10.0.0.8", 50000, 1, 1, ACK, b"SSH-2.0-x\r\n")
    env = stitch(tl, nodes=("node1",))
    assert env["requests"] == []
    assert env["drops"] == [{"node": "node1", "point": "nic", "kind": "syn_unanswered",
                             "flow": f"{CLIENT}:40999 -> {NODE_IP['node1']}:80", "packets": 3,
                             "first_ns": T0}]


def test_upstream_syn_lost_after_underlay_and_504() -> None:
    tl = Timeline()
    a, b, nic = "node1", "node2", NODE_IP["node1"]
    tl.add(a, "eth0", 0, CLIENT, 42000, nic, 80, 1, 0, SYN)
    tl.add(a, "eth0", 10_000, nic, 80, CLIENT, 42000, 100, 2, SYN | ACK)
    tl.add(a, "eth0", 50_000, CLIENT, 42000, nic, 80, 2, 101, ACK)
    req = http_request("POST", "/api/tasks/", "0123456789abcdef-DFW")
    tl.add(a, "eth0", 60_000, CLIENT, 42000, nic, 80, 2, 101, ACK | PSH, req)
    src, dst = FLANNEL[a], POD_IP[b]
    outer_ = (NODE_IP[a], NODE_IP[b])
    for k in range(3):
        t = 400_000 + k * 1_000_000_000
        ipid = tl.add(a, "flannel.1", t, src, 53000, dst, 8000, 555, 0, SYN)
        tl.add(a, "eth0", t + 30_000, src, 53000, dst, 8000, 555, 0, SYN, vxlan=outer_, ip_id=ipid)
        tl.add(b, "eth0", t + 45_000, src, 53000, dst, 8000, 555, 0, SYN, vxlan=outer_, ip_id=ipid)
    resp = http_response(504, b"Gateway Timeout")
    tl.add(a, "eth0", 30_060_000_000, nic, 80, CLIENT, 42000, 101, 2 + len(req), ACK | PSH, resp)
    env = stitch(tl)
    [r] = env["requests"]
    assert r["status"] == 504
    assert [(h["name"], h["duration_ns"]) for h in r["hops"]] == [
        ("ingress+egress", 30_060_000_000 - 60_000), ("edge_rtt", 40_000)]
    assert "no_upstream" in r["flags"]
    [d] = env["drops"]
    assert (d["kind"], d["node"], d["point"], d["packets"]) == ("syn_unanswered", "node2", "underlay", 3)
    assert d["flow"] == f"{src}:53000 -> {dst}:8000"


def test_refused_upstream_and_unanswered_request() -> None:
    tl = Timeline()
    a, nic = "node1", NODE_IP["node1"]
    req = http_request("GET", "/api/tasks/", "feedfacecafebeef-DFW")
    tl.add(a, "eth0", 0, CLIENT, 43000, nic, 80, 1, 1, ACK | PSH, req)  # no handshake seen
    tl.add(a, "cni0", 100_000, "10.42.0.1", 54000, POD_IP[a], 8000, 9, 0, SYN)
    tl.add(a, "cni0", 120_000, POD_IP[a], 8000, "10.42.0.1", 54000, 0, 10, RST | ACK)
    req2 = http_request("GET", "/api/tasks/", "0000000000000002-DFW")
    tl.add(a, "eth0", 5_000_000, CLIENT, 43001, nic, 80, 1, 1, ACK | PSH, req2)
    tl.add(a, "eth0", 3_000_000_000, "198.51.100.1", 1, "198.51.100.2", 2, 1, 1, ACK)  # time passes
    env = stitch(tl, nodes=("node1",))
    kinds = sorted((d["kind"], d["point"]) for d in env["drops"])
    assert kinds == [("refused", "pod"), ("request_unanswered", "nic"), ("request_unanswered", "nic")]
    assert all("no_response" in r["flags"] for r in env["requests"])


def test_probes_and_other_traffic_are_passed_over() -> None:
    tl = Timeline()
    truth = cross_node_request(tl, t=10_000_000)
    # kubelet probe to the pod on node2, no CF-Ray: not a request of the path
    probe = b"GET /healthz HTTP/1.1\r\nHost: 10.42.1.5:8080\r\nUser-Agent: kube-probe/1.30\r\n\r\n"
    tl.add("node2", "cni0", 1_000, "10.42.1.1", 39000, POD_IP["node2"], 8080, 1, 1, ACK | PSH, probe)
    tl.add("node2", "cni0", 2_000, POD_IP["node2"], 8080, "10.42.1.1", 39000, 1, 1 + len(probe), ACK | PSH,
           b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    # binary junk on port 80 and a FIN-only stray packet
    tl.add("node1", "eth0", 3_000, CLIENT, 44000, NODE_IP["node1"], 80, 5, 5, ACK | PSH, b"\x16\x03\x01\x02\x00")
    tl.add("node1", "eth0", 4_000, CLIENT, 44001, NODE_IP["node1"], 80, 5, 5, FIN | ACK)
    env = stitch(tl)
    assert [r["request_id"] for r in env["requests"]] == ["8c1f2e3d4b5a6978-DFW"]
    assert hops(env["requests"][0]) == expected_cross(truth)


def test_derived_id_links_by_method_path_and_time() -> None:
    tl = Timeline()
    truth = cross_node_request(tl, ray=None)
    env = stitch(tl)
    [r] = env["requests"]
    assert r["request_id"].startswith("h-") and len(r["request_id"]) == 18
    assert "derived_id" in r["flags"]
    assert hops(r) == expected_cross(truth)


def test_100_continue_is_not_the_response() -> None:
    tl = Timeline()
    a, nic = "node1", NODE_IP["node1"]
    body = b'{"title": "x"}'
    head = http_request("POST", "/api/tasks/", "1111111111111111-DFW", extra="Expect: 100-continue",
                        body=body)[: -len(body)]
    tl.add(a, "eth0", 0, CLIENT, 45000, nic, 80, 1, 1, ACK | PSH, head)
    tl.add(a, "eth0", 50_000, nic, 80, CLIENT, 45000, 1, 1 + len(head), ACK | PSH,
           b"HTTP/1.1 100 Continue\r\n\r\n")
    tl.add(a, "eth0", 90_000, CLIENT, 45000, nic, 80, 1 + len(head), 26, ACK | PSH, body)
    final = http_response(201)
    tl.add(a, "eth0", 700_000, nic, 80, CLIENT, 45000, 26, 1 + len(head) + len(body), ACK | PSH, final)
    env = stitch(tl, nodes=("node1",))
    [r] = env["requests"]
    assert r["status"] == 201
    assert r["total_ns"] == 700_000


@settings(max_examples=40, deadline=None)
@given(skew=st_.integers(-50_000_000, 50_000_000), start=st_.integers(0, 10**12),
       lose=st_.booleans())
def test_cross_node_hops_never_negative_and_tile(skew: int, start: int, lose: bool) -> None:
    tl = Timeline()
    truth = cross_node_request(tl, t=start, skew_b=skew, lose_upstream_first=lose)
    env = stitch(tl)
    [r] = env["requests"]
    assert all(h["duration_ns"] >= 0 for h in r["hops"])
    assert sum(h["duration_ns"] for h in r["hops"] if h["name"] != "edge_rtt") == truth["total"]
    assert hops(r) == expected_cross(truth)
    _ = TILING


def test_br_netfilter_unnated_synack_on_cni0_is_not_a_drop() -> None:
    """With br_netfilter the pod's SYN-ACK crosses cni0 already un-NATed (another 4-tuple)."""
    tl = Timeline()
    a, nic = "node1", NODE_IP["node1"]
    src, dst = "10.42.0.1", POD_IP[a]
    for ifname, t in (("cni0", 0), ("vethab12cd34", 1_000)):
        tl.add(a, ifname, t, src, 52000, dst, 8000, 10, 0, SYN, ip_id=7)
    tl.add(a, "vethab12cd34", 2_000, dst, 8000, src, 52000, 50, 11, SYN | ACK, ip_id=8)
    # on cni0: ClusterIP -> the node's address and Traefik's own port (pre-NAT)
    tl.add(a, "cni0", 3_000, "10.43.167.83", 8000, nic, 39999, 50, 11, SYN | ACK, ip_id=8)
    tl.add(a, "eth0", 3_000_000_000, "198.51.100.1", 1, "198.51.100.2", 2, 1, 1, ACK)
    env = stitch(tl, nodes=("node1",))
    assert env["drops"] == []


def test_a_502_without_id_does_not_borrow_a_later_upstream_request() -> None:
    tl = Timeline()
    a, nic = "node1", NODE_IP["node1"]
    req = http_request("GET", "/api/tasks/", None)
    tl.add(a, "eth0", 0, CLIENT, 46000, nic, 80, 1, 1, ACK | PSH, req)
    bad = http_response(502, b"Bad Gateway")
    tl.add(a, "eth0", 400_000, nic, 80, CLIENT, 46000, 1, 1 + len(req), ACK | PSH, bad)
    # a later request of the same method and path, and its upstream request
    tl.add(a, "eth0", 1_000_000, CLIENT, 46001, nic, 80, 1, 1, ACK | PSH, req)
    ureq = http_request("GET", "/api/tasks/", None, extra="X-Forwarded-Server: node1")
    tl.add(a, "cni0", 1_300_000, "10.42.0.1", 52001, POD_IP[a], 8000, 5, 5, ACK | PSH, ureq)
    resp = http_response(200)
    tl.add(a, "cni0", 1_900_000, POD_IP[a], 8000, "10.42.0.1", 52001, 5, 5 + len(ureq), ACK | PSH, resp)
    tl.add(a, "eth0", 2_100_000, nic, 80, CLIENT, 46001, 1, 1 + len(req), ACK | PSH, resp)
    env = stitch(tl, nodes=("node1",))
    first, second = env["requests"]
    assert first["status"] == 502 and "no_upstream" in first["flags"]
    assert second["status"] == 200 and second["pod_node"] == "node1"
    assert [h["name"] for h in second["hops"]] == ["ingress", "app", "egress"]
    assert second["hops"][0]["duration_ns"] == 300_000


def test_synack_dropped_at_the_client_nodes_underlay() -> None:
    """UFW on node1 drops the VXLAN that carries the pod's SYN-ACK back (ufw-block-vxlan)."""
    tl = Timeline()
    a, b = "node1", "node2"
    src, dst = FLANNEL[a], POD_IP[b]
    out_, back = (NODE_IP[a], NODE_IP[b]), (NODE_IP[b], NODE_IP[a])
    for k in range(3):
        t = k * 1_000_000_000
        ipid = tl.add(a, "flannel.1", t, src, 53100, dst, 8000, 900, 0, SYN)
        tl.add(a, "eth0", t + 30_000, src, 53100, dst, 8000, 900, 0, SYN, vxlan=out_, ip_id=ipid)
        tl.add(b, "eth0", t + 45_000, src, 53100, dst, 8000, 900, 0, SYN, vxlan=out_, ip_id=ipid)
        tl.add(b, "flannel.1", t + 60_000, src, 53100, dst, 8000, 900, 0, SYN, ip_id=ipid)
        tl.add(b, "cni0", t + 70_000, src, 53100, dst, 8000, 900, 0, SYN, ip_id=ipid)
        sa = tl.add(b, "cni0", t + 90_000, dst, 8000, src, 53100, 77, 901, SYN | ACK)
        tl.add(b, "flannel.1", t + 100_000, dst, 8000, src, 53100, 77, 901, SYN | ACK, ip_id=sa)
        tl.add(b, "eth0", t + 120_000, dst, 8000, src, 53100, 77, 901, SYN | ACK, vxlan=back, ip_id=sa)
        tl.add(a, "eth0", t + 135_000, dst, 8000, src, 53100, 77, 901, SYN | ACK, vxlan=back, ip_id=sa)
    tl.add(a, "eth0", 5_000_000_000, "198.51.100.1", 1, "198.51.100.2", 2, 1, 1, ACK)
    env = stitch(tl)
    [d] = env["drops"]
    assert (d["kind"], d["node"], d["point"], d["packets"]) == ("syn_unanswered", "node1", "underlay", 3)
    assert d["flow"] == f"{src}:53100 -> {dst}:8000"


def test_offsets_satisfy_every_pair_not_only_those_with_the_reference() -> None:
    """node2 and node3 are each loosely tied to node1 but tightly to each other."""
    from hopscope.stitch import _Bounds

    s = Stitcher(["node1", "node2", "node3"])
    pairs: dict[tuple[str, str], _Bounds] = {}
    pairs[("node1", "node2")] = _Bounds(lo=-50_000, hi=10_000)
    pairs[("node1", "node3")] = _Bounds(lo=-10_000, hi=50_000)
    pairs[("node3", "node2")] = _Bounds(lo=-5_000, hi=5_000)
    offs = s._offsets(pairs, strict=False)
    assert offs is not None
    assert offs["node1"].offset_ns == 0
    for (a, b), bd in pairs.items():
        assert bd.lo is not None and bd.hi is not None
        assert bd.lo <= offs[b].offset_ns - offs[a].offset_ns <= bd.hi
    # chaining each node's midpoint through node1 would have put them 40 us apart
    assert abs(offs["node2"].offset_ns - offs["node3"].offset_ns) <= 5_000


@settings(max_examples=200, deadline=None)
@given(truth=st_.lists(st_.integers(-10**9, 10**9), min_size=3, max_size=5),
       delays=st_.lists(st_.tuples(st_.integers(0, 10**6), st_.integers(0, 10**6)),
                        min_size=10, max_size=10),
       drop=st_.sets(st_.integers(0, 9), max_size=6))
def test_offsets_always_inside_every_bound(truth: list[int], delays: list[tuple[int, int]],
                                           drop: set[int]) -> None:
    """Bounds made from real one-way delays (never negative) are always all satisfied."""
    from hopscope.stitch import _Bounds

    nodes = [f"n{i}" for i in range(len(truth))]
    truth = [0, *truth[1:]]
    s = Stitcher(nodes)
    pairs: dict[tuple[str, str], _Bounds] = {}
    k = 0
    for i in range(len(nodes)):
        for j in range(i + 1, len(nodes)):
            if k in drop or k >= len(delays):
                k += 1
                continue
            fwd, back = delays[k]
            k += 1
            # a segment i -> j gives an upper bound, j -> i a lower bound on truth[j] - truth[i]
            pairs[(nodes[i], nodes[j])] = _Bounds(lo=truth[j] - truth[i] - back,
                                                  hi=truth[j] - truth[i] + fwd)
    offs = s._offsets(pairs, strict=False)
    assert offs is not None
    # every node linked to n0 through the kept pairs gets an offset (the rest: unknown)
    linked, grew = {"n0"}, True
    while grew:
        more = {b if a in linked else a for a, b in pairs if (a in linked) != (b in linked)}
        grew = bool(more)
        linked |= more
    assert {n for n in nodes if offs[n].error_ns >= 0} == linked
    for (a, b), bd in pairs.items():
        assert bd.lo is not None and bd.hi is not None
        if a in linked:
            assert bd.lo <= offs[b].offset_ns - offs[a].offset_ns <= bd.hi


def test_kprobe_events_split_kernel_in_and_name_the_ipvs_endpoint() -> None:
    """netfilter's INPUT hook time (nf_hook_slow) under kernel_in, and IPVS's choice
    (matched by the upstream SYN's sequence number, which the rewrite keeps)."""
    from hopscope.model import KERNEL, KIND_IPVS, KIND_NF, KIND_QUEUED, Observation

    tl = Timeline()
    cross_node_request(tl)
    obs = tl.obs["node1"]
    req = next(o for o in obs if o.ifname == "eth0" and o.dport == 80 and o.plen)
    syn = next(o for o in obs if o.ifname == "flannel.1" and o.flags == SYN)
    t = req.ts_real_ns

    def event(kind: str, ts: int, o: Observation, **kw: Any) -> Observation:
        return o._replace(**{"ts_real_ns": ts, "kind": kind, "point": KERNEL, "ifname": "",
                             "payload": b"", **kw})

    tl.obs["node1"] += [
        event(KIND_NF, t + 2_000, req, ack=7_000, payload=b"ACCEPT"),
        event(KIND_QUEUED, t + 15_000, req),
        # IPVS saw Traefik's SYN to the ClusterIP, before the rewrite: another flow, same ISN
        event(KIND_IPVS, syn.ts_real_ns - 5_000, syn, src=bytes([178, 104, 247, 152]),
              dst=bytes([10, 43, 0, 10]), payload=b"10.42.1.5:8000"),
    ]
    r = stitch(tl)["requests"][0]
    ing = r["hops"][0]
    kin, nat = ing["children"][0], ing["children"][-1]  # (no write seen: proxy+service_nat)
    assert (kin["name"], kin["duration_ns"]) == ("kernel_in", 15_000)
    assert [(c["name"], c["start_ns"] - kin["start_ns"], c["duration_ns"], c["verdict"])
            for c in kin["children"]] == [("netfilter", 2_000, 7_000, "ACCEPT")]
    assert (nat["name"], nat["endpoint"], nat["endpoint_by"]) == (
        "proxy+service_nat", "10.42.1.5:8000", "ipvs")
    # without the IPVS event the endpoint still comes from the rewritten packets
    tl.obs["node1"] = [o for o in tl.obs["node1"] if o.kind != KIND_IPVS]
    nat = stitch(tl)["requests"][0]["hops"][0]["children"][-1]
    assert nat["endpoint"] == f"{POD_IP['node2']}:8000" and "endpoint_by" not in nat


# -- the header parser --------------------------------------------------------------

_WANTED = (b"content-length", b"transfer-encoding", b"host", b"cf-ray", b"x-request-id")


def _reference_head(head: bytes) -> tuple[bool, bool, int, int, str, str, str, str]:
    """What _parse_head must return, written the obvious way: split, partition, compare."""
    lines = head.split(b"\r\n")
    vals: dict[bytes, bytes] = {}
    for line in lines[1:]:
        if not line:
            break
        name, sep, value = line.partition(b":")
        key = name.rstrip(b" \t").lower()
        if sep and key in _WANTED and key not in vals and key[-1:] not in (b" ", b"\t"):
            vals[key] = value
    clen = -1
    chunked = b"chunked" in vals.get(b"transfer-encoding", b"").lower()
    if b"content-length" in vals and not chunked:  # RFC 9112 6.3: chunked wins
        try:
            clen = int(vals[b"content-length"])
        except ValueError:
            clen = 0
    words = lines[0].split(b" ")
    if lines[0].startswith(b"HTTP/"):
        status = int(words[1]) if len(words) > 1 and words[1].isdigit() else 0
        return False, chunked, clen, status, "", "", "", ""
    rid = vals.get(b"cf-ray", b"").strip() or vals.get(b"x-request-id", b"").strip()
    return (True, chunked, max(clen, 0), 0, words[0].decode("ascii", "replace"),
            words[1].decode("utf-8", "replace") if len(words) > 1 else "",
            vals.get(b"host", b"").strip().decode("utf-8", "replace"), rid.decode("utf-8", "replace"))


_names = st_.sampled_from((*_WANTED, b"content-type", b"cf-connecting-ip", b"x-forwarded-for",
                           b"hostname", b"x-request-id-2", b"te", b"connection"))
_cased = _names.flatmap(lambda n: st_.lists(st_.booleans(), min_size=len(n), max_size=len(n)).map(
    lambda up: bytes(c - 32 if u and 97 <= c <= 122 else c for c, u in zip(n, up, strict=True))))
_value = st_.one_of(st_.integers(0, 10**6).map(lambda i: str(i).encode()),
                    st_.sampled_from([b"chunked", b"gzip, Chunked", b"", b"8e4f-AMS", b"a:80"]),
                    st_.binary(max_size=12).map(lambda b: bytes(c for c in b if c not in b"\r\n")))
_line = st_.tuples(_cased, st_.sampled_from([b"", b" ", b"\t", b" \t "]), _value,
                   st_.sampled_from([b"", b" ", b"  "])).map(
    lambda t: t[0] + t[1] + b":" + t[3] + t[2])


@settings(max_examples=400, deadline=None)
@given(first=st_.sampled_from([b"GET /api/x?y=1 HTTP/1.1", b"POST / HTTP/1.1", b"HTTP/1.1 200 OK",
                               b"HTTP/1.1 100 Continue", b"HTTP/1.1 bad", b"PATCH"]),
       lines=st_.lists(st_.one_of(_line, st_.just(b"junk without colon")), max_size=10))
def test_parse_head_matches_a_reference(first: bytes, lines: list[bytes]) -> None:
    """One pass with peeks (tcpflow._parse_head) == split-and-partition, on headers of any case."""
    from hopscope.tcpflow import _parse_head
    head = b"\r\n".join([first, *lines]) + b"\r\n\r\n"
    assert _parse_head(head) == _reference_head(head)


def test_parse_head_examples() -> None:
    from hopscope.tcpflow import _parse_head
    req = (b"GET /a HTTP/1.1\r\nHost : api.example.com\r\nCF-RAY:  8e4f-AMS \r\n"
           b"content-length: 12\r\nX-Request-Id: r1\r\nHost: second\r\n\r\n")
    assert _parse_head(req) == (True, False, 12, 0, "GET", "/a", "api.example.com", "8e4f-AMS")
    assert _parse_head(b"POST /b HTTP/1.1\r\nx-request-ID: r2\r\nTransfer-Encoding: gzip, chunked"
                       b"\r\n\r\n") == (True, True, 0, 0, "POST", "/b", "", "r2")
    assert _parse_head(b"HTTP/1.1 204 No Content\r\nContent-Lengthy: 3\r\n\r\n") == (
        False, False, -1, 204, "", "", "", "")


# -- edges of the message tracking (one node, the client's connection at the nic) ------------

NIC = NODE_IP["node1"]
M32 = (1 << 32) - 1


def _client(tl: Timeline, port: int, isn: int, t: int = 0) -> tuple[int, int]:
    """A handshake at eth0; (client's next seq, server's next seq)."""
    tl.add("node1", "eth0", t, CLIENT, port, NIC, 80, isn, 0, SYN)
    tl.add("node1", "eth0", t + 10_000, NIC, 80, CLIENT, port, 100, (isn + 1) & M32, SYN | ACK)
    tl.add("node1", "eth0", t + 50_000, CLIENT, port, NIC, 80, (isn + 1) & M32, 101, ACK)
    return (isn + 1) & M32, 101


def _later(tl: Timeline, t: int = 3_000_000_000) -> None:
    """Other traffic, later: time passes for the stitcher."""
    tl.add("node1", "eth0", t, "198.51.100.1", 1, "198.51.100.2", 2, 1, 1, ACK)


def _statuses(env: dict[str, Any]) -> list[tuple[str, int | None]]:
    return [(r["path"], r["status"]) for r in sorted(env["requests"], key=lambda r: r["start_ns"])]


def test_sequence_numbers_that_wrap_with_the_halves_out_of_order() -> None:
    tl = Timeline()
    c, s = _client(tl, 45000, 0xFFFFFF00)
    req = http_request("GET", "/o", "00000000000000aa-DFW", extra="X-Pad: " + "p" * 300)
    cut = 300  # the second half starts past 2^32
    assert c + cut > M32
    tl.add("node1", "eth0", 70_000, CLIENT, 45000, NIC, 80, (c + cut) & M32, s, ACK | PSH, req[cut:])
    tl.add("node1", "eth0", 80_000, CLIENT, 45000, NIC, 80, c, s, ACK | PSH, req[:cut])
    tl.add("node1", "eth0", 2_000_000, NIC, 80, CLIENT, 45000, s, (c + len(req)) & M32, ACK | PSH,
           http_response(201))
    _later(tl)
    [r] = stitch(tl, nodes=("node1",))["requests"]
    assert (r["path"], r["status"]) == ("/o", 201)
    assert "out_of_order" in r["flags"]


@pytest.mark.parametrize("second_id", [7, 8])
def test_a_second_copy_is_no_retransmission_but_a_resend_is(second_id: int) -> None:
    """The same packet seen twice (same seq, same IP id: `-i any`, merged captures) is one
    packet; the same bytes with another IP id were sent again."""
    tl = Timeline()
    c, s = _client(tl, 45001, 5000)
    req = http_request("GET", "/r", "00000000000000bb-DFW")
    tl.add("node1", "eth0", 60_000, CLIENT, 45001, NIC, 80, c, s, ACK | PSH, req, ip_id=7)
    tl.add("node1", "eth0", 65_000, CLIENT, 45001, NIC, 80, c, s, ACK | PSH, req, ip_id=second_id)
    tl.add("node1", "eth0", 2_000_000, NIC, 80, CLIENT, 45001, s, c + len(req), ACK | PSH,
           http_response(200))
    _later(tl)
    [r] = stitch(tl, nodes=("node1",))["requests"]
    assert r["status"] == 200
    assert ("retransmit" in r["flags"]) == (second_id != 7), r["flags"]


def test_pipelined_requests_are_answered_in_order() -> None:
    tl = Timeline()
    c, s = _client(tl, 45002, 9000)
    t = 60_000
    for k, path in enumerate(("/a", "/b", "/c")):
        req = http_request("GET", path, f"00000000000000c{k}-DFW")
        tl.add("node1", "eth0", t, CLIENT, 45002, NIC, 80, c, s, ACK | PSH, req)
        c += len(req)
        t += 10_000
    t = 1_000_000
    for status in (200, 201, 202):
        resp = http_response(status)
        tl.add("node1", "eth0", t, NIC, 80, CLIENT, 45002, s, c, ACK | PSH, resp)
        s += len(resp)
        t += 100_000
    _later(tl)
    env = stitch(tl, nodes=("node1",))
    assert _statuses(env) == [("/a", 200), ("/b", 201), ("/c", 202)]
    totals = [r["total_ns"] for r in sorted(env["requests"], key=lambda r: r["start_ns"])]
    assert totals == sorted(totals) and all(x is not None for x in totals)


def test_a_head_response_has_no_body_whatever_its_length_says() -> None:
    tl = Timeline()
    c, s = _client(tl, 45003, 1)
    t = 60_000
    for method, path, resp in (
            ("HEAD", "/h", b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n"),
            ("GET", "/g", b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")):
        req = http_request(method, path, f"00000000000000d{len(path)}{method[0]}-DFW")
        tl.add("node1", "eth0", t, CLIENT, 45003, NIC, 80, c, s, ACK | PSH, req)
        c += len(req)
        tl.add("node1", "eth0", t + 500_000, NIC, 80, CLIENT, 45003, s, c, ACK | PSH, resp)
        s += len(resp)
        t += 1_000_000
    _later(tl)
    assert _statuses(stitch(tl, nodes=("node1",))) == [("/h", 200), ("/g", 404)]


def test_chunked_framing_is_followed_to_the_next_response() -> None:
    """Chunk sizes are hex, each chunk's data ends in CRLF, data may hold a blank line: the
    next response starts inside the segment where the chunked body ends."""
    tl = Timeline()
    c, s = _client(tl, 45004, 77)
    body = b"5\r\nhello\r\n1e\r\n" + b"x" * 16 + b"\r\n\r\n" + b"y" * 10 + b"\r\n0\r\n\r\n"
    first = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + body
    second = b"HTTP/1.1 201 Created\r\nContent-Length: 1\r\n\r\nz"
    stream = first + second
    cut = len(first) - 7  # the second segment: the body's end, then the next response
    t = 60_000
    for path in ("/one", "/two"):
        req = http_request("GET", path, f"00000000000000e{len(path)}-DFW")
        tl.add("node1", "eth0", t, CLIENT, 45004, NIC, 80, c, s, ACK | PSH, req)
        c += len(req)
        t += 10_000
    tl.add("node1", "eth0", 1_000_000, NIC, 80, CLIENT, 45004, s, c, ACK | PSH, stream[:cut])
    tl.add("node1", "eth0", 1_200_000, NIC, 80, CLIENT, 45004, s + cut, c, ACK | PSH,
           stream[cut:])
    _later(tl)
    env = stitch(tl, nodes=("node1",))
    assert _statuses(env) == [("/one", 200), ("/two", 201)]


def test_a_reset_connection_is_flagged_and_its_request_has_no_status() -> None:
    tl = Timeline()
    c, s = _client(tl, 45005, 3)
    req = http_request("GET", "/x", "00000000000000ff-DFW")
    tl.add("node1", "eth0", 60_000, CLIENT, 45005, NIC, 80, c, s, ACK | PSH, req)
    tl.add("node1", "eth0", 500_000, NIC, 80, CLIENT, 45005, s, c + len(req), RST | ACK)
    _later(tl)
    env = stitch(tl, nodes=("node1",))
    [r] = env["requests"]
    assert "reset" in r["flags"] and r["status"] is None and r["total_ns"] is None
    assert [d["kind"] for d in env["drops"]] == ["reset"]


def test_the_envelope_keeps_the_contracts_key_order() -> None:
    """docs/hop-model.md's example: scripts may read the JSON in order."""
    tl = Timeline()
    cross_node_request(tl)
    env = stitch(tl)
    assert list(env)[:3] == ["requests", "drops", "clock_offsets"]
    [r] = env["requests"]
    order = ["request_id", "method", "path", "host", "status", "ingress_node", "pod_node",
             "start_ns", "total_ns", "hops", "flags"]
    assert [k for k in r if k in order] == order
    assert list(r["hops"][0])[:6] == ["name", "dir", "node", "start_ns", "duration_ns",
                                      "children"]
    assert list(env["clock_offsets"]["node2"]) == ["offset_ns", "error_ns"]


def test_transfer_encoding_chunked_overrides_content_length() -> None:
    """RFC 9112 6.3: a message with both is read as chunked (else its body's framing, and
    every later message on the connection, would be off)."""
    from hopscope.tcpflow import _parse_head
    for head in (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
                 b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\nContent-Length: 5\r\n\r\n"):
        assert _parse_head(head)[1:3] == (True, -1), head
    assert _parse_head(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\nContent-Length: 5\r\n"
                       b"\r\n")[1:3] == (False, 5)


@pytest.mark.parametrize("lo,hi", [(0, 1), (-7, 4), (10, 10), (-3, 0)])
def test_offset_error_covers_both_ends_of_an_odd_interval(lo: int, hi: int) -> None:
    """Every offset the bounds allow lies within offset ± error_ns (rounded up, not down)."""
    from hopscope.stitch import _Bounds

    s = Stitcher(("node1", "node2"), reference="node1")
    off = s._offsets({("node1", "node2"): _Bounds(lo=lo, hi=hi, samples=2)}, strict=True)
    assert off is not None
    o = off["node2"]
    assert o.offset_ns - o.error_ns <= lo and hi <= o.offset_ns + o.error_ns, (o, lo, hi)
    assert o.error_ns == (hi - lo + 1) // 2


def test_an_upgrade_is_answered_by_its_101() -> None:
    tl = Timeline()
    c, s = _client(tl, 45006, 11)
    req = http_request("GET", "/ws", "0000000000000101-DFW",
                       extra="Upgrade: websocket\r\nConnection: Upgrade")
    tl.add("node1", "eth0", 60_000, CLIENT, 45006, NIC, 80, c, s, ACK | PSH, req)
    resp = (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade"
            b"\r\n\r\n")
    tl.add("node1", "eth0", 400_000, NIC, 80, CLIENT, 45006, s, c + len(req), ACK | PSH, resp)
    tl.add("node1", "eth0", 900_000, NIC, 80, CLIENT, 45006, s + len(resp), c + len(req),
           ACK | PSH, b"\x81\x05hello")  # a WebSocket frame, not HTTP
    _later(tl)
    [r] = stitch(tl, nodes=("node1",))["requests"]
    assert (r["path"], r["status"]) == ("/ws", 101)
    assert r["total_ns"] == 400_000 - 60_000


def test_a_lone_syn_just_before_the_capture_ends_is_no_drop() -> None:
    """A client's SYN in the capture's last second may well have been answered after it."""
    tl = Timeline()
    tl.add("node1", "eth0", 0, "198.51.100.1", 1, "198.51.100.2", 2, 1, 1, ACK)
    tl.add("node1", "eth0", 1_000_000_000, CLIENT, 46000, NIC, 80, 5, 0, SYN)
    tl.add("node1", "eth0", 1_500_000_000, "198.51.100.1", 1, "198.51.100.2", 2, 1, 1, ACK)
    assert stitch(tl, nodes=("node1",))["drops"] == []
    _later(tl, 4_000_000_000)  # the same SYN, then seconds of traffic: unanswered
    [d] = stitch(tl, nodes=("node1",))["drops"]
    assert (d["kind"], d["packets"]) == ("syn_unanswered", 1)


def test_kernel_in_ends_when_the_completing_segment_is_queued() -> None:
    """Headers in two segments, each queued on the proxy's socket in turn: kernel_in ends at
    the second's queuing (the one that completes the head), not the first's, even when the
    second is the head's last byte alone."""
    from hopscope.model import KERNEL, KIND_QUEUED, Observation

    tl = Timeline()
    cross_node_request(tl)
    obs = tl.obs["node1"]
    req = next(o for o in obs if o.ifname == "eth0" and o.dport == 80 and o.plen)
    cut = req.payload.index(b"\r\n\r\n") + 3  # the head's last byte alone completes it
    t = req.ts_real_ns
    first = req._replace(ts_real_ns=t - 10_000, payload=req.payload[:cut], plen=cut)
    last = req._replace(seq=(req.seq + cut) & M32, payload=req.payload[cut:cut + 1], plen=1,
                        ip_id=req.ip_id + 50_000)
    obs[obs.index(req)] = last
    obs.append(first)
    if req.plen > cut + 1:  # the body, after
        obs.append(req._replace(ts_real_ns=t + 1_000, seq=(req.seq + cut + 1) & M32,
                                payload=req.payload[cut + 1:], plen=req.plen - cut - 1,
                                ip_id=req.ip_id + 50_001))

    def queued(ts: int, o: Observation) -> Observation:
        return o._replace(ts_real_ns=ts, kind=KIND_QUEUED, point=KERNEL, ifname="", payload=b"")

    obs += [queued(t - 7_000, first), queued(t + 15_000, last)]
    r = stitch(tl)["requests"][0]
    kin = r["hops"][0]["children"][0]
    assert kin["name"] == "kernel_in" and kin["start_ns"] + kin["duration_ns"] == t + 15_000


def test_a_hole_in_a_head_the_capture_never_fills_is_flagged_not_lost() -> None:
    """More segments held behind a hole than the tracker keeps: it skips the hole, reads the
    head on, and the request comes out flagged `capture_gap` (it vanished before)."""
    tl = Timeline()
    c, s = _client(tl, 45007, 20)
    req = http_request("GET", "/big", "00000000000000ab-DFW",
                       extra="\r\n".join(f"X-H{k}: v" for k in range(700)))
    t = 60_000
    for k, off in enumerate(range(0, len(req), 10)):
        if k == 30:
            continue  # never captured: inside the X-H headers
        tl.add("node1", "eth0", t, CLIENT, 45007, NIC, 80, c + off, s, ACK | PSH,
               req[off:off + 10])
        t += 1_000
    tl.add("node1", "eth0", t + 500_000, NIC, 80, CLIENT, 45007, s, c + len(req), ACK | PSH,
           http_response(200))
    _later(tl)
    [r] = stitch(tl, nodes=("node1",))["requests"]
    assert (r["request_id"], r["path"], r["status"]) == ("00000000000000ab-DFW", "/big", 200)
    assert "capture_gap" in r["flags"]


def test_an_upstream_request_sent_before_the_client_request_is_not_its_own() -> None:
    """Without an id, a client request links to the first upstream request of its method and
    path that starts after it is complete: one sent before (its client side not captured)
    is another request's."""
    tl = Timeline()
    a, nic = "node1", NODE_IP["node1"]
    ureq = http_request("GET", "/x", None, extra="X-Forwarded-Server: node1")
    resp = http_response(200)
    tl.add(a, "cni0", 0, "10.42.0.1", 52000, POD_IP[a], 8000, 5, 5, ACK | PSH, ureq)
    tl.add(a, "cni0", 200_000, POD_IP[a], 8000, "10.42.0.1", 52000, 5, 5 + len(ureq), ACK | PSH,
           resp)
    req = http_request("GET", "/x", None)
    tl.add(a, "eth0", 1_000_000, CLIENT, 46002, nic, 80, 1, 1, ACK | PSH, req)
    tl.add(a, "cni0", 1_300_000, "10.42.0.1", 52001, POD_IP[a], 8000, 5, 5, ACK | PSH, ureq)
    tl.add(a, "cni0", 1_900_000, POD_IP[a], 8000, "10.42.0.1", 52001, 5, 5 + len(ureq),
           ACK | PSH, resp)
    tl.add(a, "eth0", 2_100_000, nic, 80, CLIENT, 46002, 1, 1 + len(req), ACK | PSH, resp)
    env = stitch(tl, nodes=("node1",))
    [r] = [r for r in env["requests"] if r["ingress_node"] == "node1"]
    assert (r["hops"][0]["name"], r["hops"][0]["duration_ns"]) == ("ingress", 300_000)


def test_of_two_upstream_attempts_with_the_id_the_first_is_linked() -> None:
    """Traefik's first attempt (reset by the pod) and its retry carry the same CF-Ray: the
    client request links to the first that starts after it, and ingress ends there."""
    tl = Timeline()
    a, nic = "node1", NODE_IP["node1"]
    ray = "0000000000000aaa-DFW"
    req = http_request("GET", "/y", ray)
    ureq = http_request("GET", "/y", ray, extra="X-Forwarded-Server: node1")
    resp = http_response(200)
    tl.add(a, "eth0", 0, CLIENT, 46003, nic, 80, 1, 1, ACK | PSH, req)
    tl.add(a, "cni0", 300_000, "10.42.0.1", 52002, POD_IP[a], 8000, 5, 5, ACK | PSH, ureq)
    tl.add(a, "cni0", 350_000, POD_IP[a], 8000, "10.42.0.1", 52002, 5, 5 + len(ureq), RST | ACK)
    tl.add(a, "cni0", 5_000_000, "10.42.0.1", 52003, POD_IP[a], 8000, 9, 9, ACK | PSH, ureq)
    tl.add(a, "cni0", 5_600_000, POD_IP[a], 8000, "10.42.0.1", 52003, 9, 9 + len(ureq),
           ACK | PSH, resp)
    tl.add(a, "eth0", 5_800_000, nic, 80, CLIENT, 46003, 1, 1 + len(req), ACK | PSH, resp)
    _later(tl)
    env = stitch(tl, nodes=("node1",))
    [r] = [r for r in env["requests"] if r["ingress_node"] == "node1"]
    assert r["status"] == 200
    assert (r["hops"][0]["name"], r["hops"][0]["duration_ns"]) == ("ingress", 300_000)


def _live(tl: Timeline, node: str, ifname: str, point: str, t: int, src: str, sport: int,
          dst: str, dport: int, seq: int, ack: int, data: bytes, keep: int = 2047) -> None:
    """A segment as an agent reports it: a live clock, the point named, and of its payload
    only the first ``keep`` bytes (``plen`` is the whole)."""
    from hopscope.model import make_packet

    tl.obs.setdefault(node, []).append(make_packet(
        T0 + t, node, ifname, src, sport, dst, dport, seq=seq & M32, ack=ack, flags=ACK | PSH,
        payload=data[:keep], plen=len(data), point=point, ts_mono_ns=t))


def _cookie_head(first: str, ray_line: str, upstream: bool, body: bytes) -> bytes:
    """A head of ~7 KB: a browser's Cookie, and the CF-Ray where the client (after it, past
    the first 2,047 bytes) or Traefik (Go writes names in order: before it) puts it; the
    Content-Length after the Cookie either way."""
    cookie = "Cookie: sid=" + "c" * 6000
    lines = [first, "Host: api.myhoneydue.com"]
    lines += [ray_line, cookie] if upstream else [cookie, ray_line]
    lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def test_a_head_longer_than_an_agent_keeps_is_stitched_truncated() -> None:
    """A live source keeps 2,047 bytes of a segment. The client's 7 KB head in one GSO
    segment reaches the stitcher cut, its CF-Ray and blank line among the bytes left out,
    its body in a segment of its own: the request still comes out, flagged `truncated`,
    named by the upstream's Cf-Ray, its head complete when the segment that held it was
    seen (not the body's). The upstream head comes in two segments, the first cut, the
    second cut after the blank line (the body stays in the kernel) with the Content-Length
    left out: the bytes cut are not taken for a message, and on both keep-alive connections
    the next request is read whole. Beside it, a request that node2 sends to node1's pod
    (decapsulated on node1 in the same window) is not taken for its upstream: node1 did not
    send it; nor is the upstream request of another client of node1's whose id came whole
    (it starts first in the window, but that client awaits it)."""
    tl = Timeline()
    a, nic, veth = "node1", NODE_IP["node1"], "vethab12cd34"
    src, pod = "10.42.0.1", POD_IP["node1"]
    # node2's request first reaches node1 at 1,310 us (its own client is complete later
    # than ours, so ours is linked first)
    cross_node_request(tl, a="node2", b="node1", t=550_000, cport=40200, uport=51200)
    c, s, u, p = 1_000, 90_000, 5_000, 70_000
    body = b'{"title": "x"}'
    req = _cookie_head("POST /api/tasks/ HTTP/1.1", "CF-Ray: 1111111111111111-DFW", False, body)
    ureq = _cookie_head("POST /api/tasks/ HTTP/1.1", "Cf-Ray: 1111111111111111-DFW", True, body)
    head, uhead = len(req) - len(body), len(ureq) - len(body)
    _live(tl, a, "eth0", AT_NIC, 700_000, CLIENT, 41000, nic, 80, c, s, req[:head])
    _live(tl, a, "eth0", AT_NIC, 710_000, CLIENT, 41000, nic, 80, c + head, s, body)
    cut = uhead - 6  # "14\r\n\r\n": the Content-Length's line begins in the bytes left out
    _live(tl, a, veth, AT_POD, 1_400_000, src, 52000, pod, 8000, u, p, ureq[:cut])
    _live(tl, a, veth, AT_POD, 1_410_000, src, 52000, pod, 8000, u + cut, p, ureq[cut:], keep=6)
    resp = http_response(201)
    _live(tl, a, veth, AT_POD, 2_400_000, pod, 8000, src, 52000, p, u + len(ureq), resp)
    _live(tl, a, "eth0", AT_NIC, 2_600_000, nic, 80, CLIENT, 41000, s, c + len(req), resp)
    # another client's POST meanwhile, its head whole, its upstream first in the window
    req3 = http_request("POST", "/api/tasks/", "3333333333333333-DFW", body=body)
    _live(tl, a, "eth0", AT_NIC, 800_000, CLIENT, 41001, nic, 80, 7, 9, req3)
    _live(tl, a, veth, AT_POD, 1_350_000, src, 52001, pod, 8000, 3, 4, req3)
    _live(tl, a, veth, AT_POD, 1_900_000, pod, 8000, src, 52001, 4, 3 + len(req3), resp)
    _live(tl, a, "eth0", AT_NIC, 2_000_000, nic, 80, CLIENT, 41001, 9, 7 + len(req3), resp)
    # the next request on both connections, a small one
    req2 = http_request("GET", "/api/tasks/", "2222222222222222-DFW")
    _live(tl, a, "eth0", AT_NIC, 3_000_000, CLIENT, 41000, nic, 80, c + len(req), s + len(resp),
          req2)
    _live(tl, a, veth, AT_POD, 3_300_000, src, 52000, pod, 8000, u + len(ureq), p + len(resp),
          req2)
    _live(tl, a, veth, AT_POD, 3_800_000, pod, 8000, src, 52000, p + len(resp),
          u + len(ureq) + len(req2), resp)
    _live(tl, a, "eth0", AT_NIC, 3_900_000, nic, 80, CLIENT, 41000, s + len(resp),
          c + len(req) + len(req2), resp)
    _later(tl)
    env = stitch(tl)
    got = {r["request_id"]: r for r in env["requests"]}
    assert set(got) == {"1111111111111111-DFW", "2222222222222222-DFW", "3333333333333333-DFW",
                        "8c1f2e3d4b5a6978-DFW"}
    r1, r2, r3 = (got[f"{k * 4}{k * 12}-DFW"] for k in "123")
    assert r1["flags"] == ["truncated"] and (r1["method"], r1["status"]) == ("POST", 201)
    assert [(h["name"], h["duration_ns"]) for h in r1["hops"]] == [
        ("ingress", 700_000), ("deliver", 10_000), ("app", 990_000), ("egress", 200_000)]
    assert r2["flags"] == [] and [(h["name"], h["duration_ns"]) for h in r2["hops"]] == [
        ("ingress", 300_000), ("app", 500_000), ("egress", 100_000)]
    assert r3["flags"] == [] and [(h["name"], h["duration_ns"]) for h in r3["hops"]] == [
        ("ingress", 550_000), ("app", 550_000), ("egress", 100_000)]
    decoy = got["8c1f2e3d4b5a6978-DFW"]
    assert (decoy["ingress_node"], decoy["pod_node"], decoy["flags"]) == ("node2", "node1", [])


def test_a_head_a_capture_cut_short_is_read_on_past_the_bytes_left_out() -> None:
    """A capture whose snap length keeps 100 bytes of each segment (tcpdump -s): a head in
    three segments loses bytes in the first two; it is read on past them, without the lines
    they cut short, and the line end that starts the third segment is no blank line: the
    CF-Ray after it is read, and the blank line after that completes the head."""
    tl = Timeline()
    c, s = _client(tl, 45100, 100)
    req = (b"GET /long HTTP/1.1\r\nHost: api.myhoneydue.com\r\nX-A: " + b"a" * 150
           + b"\r\nX-C: " + b"c" * 150 + b"\r\nCF-Ray: 00000000000000cd-DFW\r\n\r\n")
    at = [0, 148, req.index(b"\r\nCF-Ray")]  # the third segment starts with a line end
    assert at[1] > 100 and at[2] - at[1] > 100 and len(req) - at[2] < 100
    for k, (lo, hi) in enumerate(zip(at, [*at[1:], len(req)], strict=True)):
        tl.add("node1", "eth0", 60_000 + k * 10_000, CLIENT, 45100, NIC, 80, c + lo, s,
               ACK | PSH, req[lo:hi][:100])
        tl.obs["node1"][-1] = tl.obs["node1"][-1]._replace(plen=hi - lo)
    resp = http_response(200, b"x" * 400)
    tl.add("node1", "eth0", 1_000_000, NIC, 80, CLIENT, 45100, s, c + len(req), ACK | PSH,
           resp[:100])
    tl.obs["node1"][-1] = tl.obs["node1"][-1]._replace(plen=len(resp))
    _later(tl)
    [r] = stitch(tl, nodes=("node1",))["requests"]
    assert (r["request_id"], r["path"], r["status"]) == ("00000000000000cd-DFW", "/long", 200)
    assert r["flags"] == ["no_upstream", "truncated"]
    assert r["start_ns"] == T0 + 80_000 and r["total_ns"] == 920_000


def _cut_keepalive(snap: int) -> Timeline:
    """Four requests on one keep-alive connection at node1's NIC, as a capture that keeps
    ``snap`` bytes of a segment saw them: each response is a 176-byte head (a Set-Cookie)
    and a body, in two segments; the last answer ends the traffic on the connection."""
    tl = Timeline()
    c, s = _client(tl, 45100, 100)
    t = 100_000
    for k in range(4):
        req = http_request("GET", f"/p{k}", f"00000000000000{k:02x}-DFW")
        tl.add("node1", "eth0", t, CLIENT, 45100, NIC, 80, c, s, ACK | PSH, req[:snap])
        tl.obs["node1"][-1] = tl.obs["node1"][-1]._replace(plen=len(req))
        c = (c + len(req)) & M32
        t += 500_000 + k * 100_000
        body = b"y" * (300 + 50 * k)
        resp = (b"HTTP/1.1 20%d OK\r\nContent-Type: application/json\r\nSet-Cookie: a=" % k
                + b"z" * 120 + b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        for lo, hi in ((0, len(resp) - 100), (len(resp) - 100, len(resp))):
            tl.add("node1", "eth0", t, NIC, 80, CLIENT, 45100, s, c, ACK | PSH, resp[lo:hi][:snap])
            tl.obs["node1"][-1] = tl.obs["node1"][-1]._replace(plen=hi - lo)
            s = (s + hi - lo) & M32
            t += 10_000
        t += 200_000
    return tl


@pytest.mark.parametrize("snap", [100, 30, 2000])
def test_answers_whose_heads_a_capture_cut_short_on_a_keep_alive_connection(snap: int) -> None:
    """A snap length that cuts the response heads before their blank lines: a client sends
    its next request once it has the answer, so that request ends the answer's head (read
    in its whole lines: the status); the last answer's head ends with the connection. Each
    request comes out with its own status and time (before: the first answer's head read
    on into the next answers, and only the first request came out, without a status).
    At 30 bytes the CF-Ray is lost too (the id derived); 2,000 keep everything."""
    tl = _cut_keepalive(snap)
    _later(tl)
    reqs = sorted(stitch(tl, nodes=("node1",))["requests"], key=lambda r: r["start_ns"])
    assert [(r["path"], r["status"], r["total_ns"]) for r in reqs] == [
        (f"/p{k}", 200 + k, 500_000 + k * 100_000) for k in range(4)]
    want = {100: ["no_upstream", "truncated"], 30: ["derived_id", "no_upstream", "truncated"],
            2000: ["no_upstream"]}[snap]
    assert all(r["flags"] == want for r in reqs)
    if snap == 100:
        assert [r["request_id"] for r in reqs] == [f"00000000000000{k:02x}-DFW" for k in range(4)]


def test_an_answer_cut_short_has_its_status_when_the_connection_idles_on() -> None:
    """A live stitcher hands a request over once it has waited its settling time, the
    connection still open (keep-alive): an answer whose head was cut short has its status
    from its first segment."""
    from hopscope.tcpflow import SETTLE_NS, NodeTracker

    tl = _cut_keepalive(100)
    _later(tl, SETTLE_NS + 10_000_000)
    tr = NodeTracker("node1")
    tr.feed(sorted(tl.obs["node1"], key=lambda o: o.ts_real_ns))
    done = tr.take()
    assert [(s.path, s.status, s.settled) for s in done.sightings] == [
        (f"/p{k}", 200 + k, True) for k in range(4)]


def test_an_answer_whose_length_the_capture_lost_does_not_swallow_the_next() -> None:
    """A hole in an answer's head that the capture never fills, its Content-Length among
    the bytes lost: the head is read on past the hole, and the body's length is unknown;
    the next answer on the keep-alive connection is found by its start (before, the
    answer was taken as delimited by the close, and the next one never came out)."""
    tl = Timeline()
    c, s = _client(tl, 45008, 20)
    req = http_request("GET", "/a", "00000000000000ac-DFW")
    tl.add("node1", "eth0", 60_000, CLIENT, 45008, NIC, 80, c, s, ACK | PSH, req)
    c += len(req)
    resp = (b"HTTP/1.1 200 OK\r\nServer: hopscope-test\r\nContent-Length: 9\r\n"
            + b"".join(b"X-H%d: v\r\n" % k for k in range(700)) + b"\r\n" + b'{"id": 1}')
    lost = resp.index(b"Content-Length") // 10
    assert lost * 10 > resp.index(b"\r\n")  # the status line kept
    t = 500_000
    for k, off in enumerate(range(0, len(resp), 10)):
        if k != lost:  # never captured
            tl.add("node1", "eth0", t, NIC, 80, CLIENT, 45008, s + off, c, ACK | PSH,
                   resp[off:off + 10])
        t += 1_000
    s += len(resp)
    req2 = http_request("GET", "/b", "00000000000000ad-DFW")
    tl.add("node1", "eth0", t + 100_000, CLIENT, 45008, NIC, 80, c, s, ACK | PSH, req2)
    tl.add("node1", "eth0", t + 600_000, NIC, 80, CLIENT, 45008, s, c + len(req2), ACK | PSH,
           http_response(201))
    _later(tl)
    got = {r["path"]: r for r in stitch(tl, nodes=("node1",))["requests"]}
    assert (got["/a"]["status"], got["/b"]["status"]) == (200, 201)
    assert "capture_gap" in got["/a"]["flags"] and got["/b"]["total_ns"] == 500_000


def test_concurrent_requests_forwarded_out_of_order_each_take_their_own_upstream() -> None:
    """Two clients' GETs on node1, each with a 7 KB Cookie a live agent cut before the
    CF-Ray: linked by line and time. The first to come is held (in UFW or Traefik) and
    forwarded after the second: taken first come, first served, the first took the
    second's upstream request and the second found none in its window (seen once in ten
    runs of the replica's agreement test). The one whose answer came first now claims
    first, and each takes its own (named by its upstream's Cf-Ray)."""
    tl = Timeline()
    a, nic, veth = "node1", NODE_IP["node1"], "vethab12cd34"
    src, pod = "10.42.0.1", POD_IP["node1"]
    resp = http_response(200)
    for k, (port, uport, t, fwd, answered) in enumerate(
            ((41000, 52000, 0, 1_100_000, 1_276_000), (41001, 52001, 400_000, 700_000,
                                                         1_050_000))):
        ray = f"{'ab'[k] * 16}-DFW"
        req = _cookie_head("GET /api/tasks/ HTTP/1.1", f"CF-Ray: {ray}", False, b"")
        ureq = _cookie_head("GET /api/tasks/ HTTP/1.1", f"Cf-Ray: {ray}", True, b"")
        _live(tl, a, "eth0", AT_NIC, t, CLIENT, port, nic, 80, 1, 1, req)
        _live(tl, a, veth, AT_POD, fwd, src, uport, pod, 8000, 1, 1, ureq)
        _live(tl, a, veth, AT_POD, fwd + 100_000, pod, 8000, src, uport, 1, 1 + len(ureq), resp)
        _live(tl, a, "eth0", AT_NIC, answered, nic, 80, CLIENT, port, 1, 1 + len(req), resp)
    _later(tl)
    got = {r["request_id"]: r for r in stitch(tl, nodes=("node1",))["requests"]}
    assert set(got) == {"aaaaaaaaaaaaaaaa-DFW", "bbbbbbbbbbbbbbbb-DFW"}
    assert [(h["name"], h["duration_ns"]) for h in got["aaaaaaaaaaaaaaaa-DFW"]["hops"]] == [
        ("ingress", 1_100_000), ("app", 100_000), ("egress", 76_000)]
    assert [(h["name"], h["duration_ns"]) for h in got["bbbbbbbbbbbbbbbb-DFW"]["hops"]] == [
        ("ingress", 300_000), ("app", 100_000), ("egress", 250_000)]


def test_other_ports_at_the_nic_make_no_sighting_that_holds_the_watermark() -> None:
    """At the public NIC only the entry port's connections are requests of the model. The
    node's other TCP there (an agent's batches to its collector, whose bytes hold request
    heads) made sightings that no answer ever settled: each held the node's watermark back
    for SETTLE_NS, and a live collector stored nothing meanwhile (bench/soak.py)."""
    from hopscope.agent.run import Agent, AgentConfig

    from hopscope.tcpflow import NodeTracker

    tl = Timeline()
    # a segment of the agent's connection to its collector that starts with a request head
    tl.add("node1", "eth0", 1_000, NIC, 40568, "203.0.113.1", 7000, 1, 1, ACK | PSH,
           http_request("POST", "/api/tasks/", "1d4d11804c6e6fbb-DFW"))
    c, s = _client(tl, 45010, 20, t=2_000_000)
    req = http_request("GET", "/a", "00000000000000ae-DFW")
    tl.add("node1", "eth0", 3_000_000, CLIENT, 45010, NIC, 80, c, s, ACK | PSH, req)
    tl.add("node1", "eth0", 3_500_000, NIC, 80, CLIENT, 45010, s, c + len(req), ACK | PSH,
           http_response(200))
    obs = sorted(tl.obs["node1"], key=lambda o: o.ts_real_ns)
    every_port, entry_only = NodeTracker("node1"), NodeTracker("node1", entry_ports=(80,))
    every_port.feed(obs)
    entry_only.feed(obs)
    held, taken = every_port.take(), entry_only.take()
    assert held.last_ts == obs[0].ts_real_ns  # the head on port 7000, never answered
    assert taken.last_ts == obs[-1].ts_real_ns
    assert [x.path for x in taken.sightings] == ["/a"] and taken.sightings[0].settled
    # the stitchers' trackers have their entry ports, an agent's its own
    st = Stitcher(["node1"], entry_ports=(8080,))
    assert st.tracker("node1").entry_ports == {8080}
    assert Agent(AgentConfig(node="node1", entry_port=8080)).tracker.entry_ports == {8080}
