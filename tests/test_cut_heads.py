"""Heads the source cut short, against the same traffic seen whole (a differential test).

Generated keep-alive traffic at one node's NIC: requests and answers with heads of up to
7 KB (a Cookie, a Set-Cookie), bodies with a Content-Length or chunked, connections that
end or stay open, segments of one MSS or GSO/GRO super-segments. Each run of it is given
to the stitcher three ways:

* whole packets (the reference: every request with the status it was answered with);
* as a capture cut to a snap length (`tcpdump -s`): 200 bytes (the CF-Ray, the second
  header line, kept), 600 and 1,500;
* as a live agent sends it: a message's start with at most 2,047 bytes, cut after its
  blank line; up to 8 segments after a start whose head did not end in those bytes;
  nothing else of a body (the classifier's rules, `bpf/tc.c`; docs/agent.md).

Every request comes out of each with the status of the whole packets; the live view's
times are exact; a capture's are within the request's own segments (a head whose blank
line the snap length left out ends in its first segment or the last one cut short). The
same holds, for the statuses, when some segments come out of order (a message's next
segment before it: a live source then misses what it would have followed) or twice.
"""

from __future__ import annotations

import random
from typing import Any

import pytest
from flows import CLIENT, NODE_IP, T0, Timeline

from hopscope.model import ACK, FIN, PSH, SYN, make_packet
from hopscope.model import NIC as AT_NIC
from hopscope.stitch import Stitcher

NIC = NODE_IP["node1"]
M32 = (1 << 32) - 1
MSS = 1448
#: what a live agent keeps of a segment, and how many it follows after an open head
KEEP, FOLLOW = 2047, 8
#: Ethernet, IPv4 and TCP headers ahead of the payload in a frame (make_packet's)
FRAME_HEADERS = 14 + 20 + 20


def _traffic(seed: int) -> list[list[tuple[str, int, bytes, bytes]]]:
    """Per connection, its exchanges: (CF-Ray, status, request, response)."""
    rng = random.Random(seed)
    conns = []
    for ci in range(rng.randint(1, 3)):
        exchanges = []
        for k in range(rng.randint(1, 5)):
            rid = f"{seed:06x}{ci:02x}{k:02x}{rng.getrandbits(24):06x}-DFW"
            method = rng.choice(["GET", "POST"])
            body = b'{"t": "%s"}' % (b"x" * rng.randint(0, 3000)) if method == "POST" else b""
            lines = [f"{method} /api/{k} HTTP/1.1", f"CF-Ray: {rid}", "Host: api.example.com"]
            pad = rng.choice([0, 0, 100, 1500, 3000, 6000])
            if pad:
                lines.append("Cookie: " + "c" * pad)
            if body:
                lines.append(f"Content-Length: {len(body)}")
            req = ("\r\n".join(lines) + "\r\n\r\n").encode() + body
            status = rng.choice([200, 201, 404, 500])
            rbody = b"y" * rng.choice([0, 10, 500, 2000, 9000])
            lines = [f"HTTP/1.1 {status} X", "Content-Type: application/json"]
            pad = rng.choice([0, 0, 200, 1800, 3000, 7000])
            if pad:
                lines.append("Set-Cookie: " + "s" * pad)
            if rbody and rng.random() < 0.25:
                lines.append("Transfer-Encoding: chunked")
                h = len(rbody) // 2
                enc = b"%x\r\n%s\r\n%x\r\n%s\r\n0\r\n\r\n" % (h, rbody[:h], len(rbody) - h,
                                                              rbody[h:])
            else:
                lines.append(f"Content-Length: {len(rbody)}")
                enc = rbody
            exchanges.append((rid, status, req, ("\r\n".join(lines) + "\r\n\r\n").encode() + enc))
        conns.append(exchanges)
    return conns


def _segments(rng: random.Random, data: bytes, gso: bool) -> list[tuple[int, bytes]]:
    out, pos = [], 0
    while pos < len(data):
        n = rng.choice([2 * MSS, 5 * MSS, 65000]) if gso and rng.random() < 0.6 else MSS
        out.append((pos, data[pos : pos + n]))
        pos += n
    return out


Packet = tuple[int, str, int, str, int, int, int, int, bytes]


def _packets(seed: int, gso: bool) -> tuple[list[Packet], dict[str, tuple[int, int]]]:
    """The packets in time order, and per request its status and the time its segments
    took to arrive (first to last)."""
    rng = random.Random(seed * 7 + 1)
    pkts: list[Packet] = []
    truth = {}
    for ci, exchanges in enumerate(_traffic(seed)):
        port, t = 40000 + ci, 1_000_000 + ci * 137_000
        c, s = 1000 + ci * 10**6, 5000 + ci * 10**6
        pkts += [(t, CLIENT, port, NIC, 80, c - 1, 0, SYN, b""),
                 (t + 10_000, NIC, 80, CLIENT, port, s - 1, c, SYN | ACK, b""),
                 (t + 20_000, CLIENT, port, NIC, 80, c, s, ACK, b"")]
        t += 50_000
        for rid, status, req, resp in exchanges:
            t0 = t
            for off, seg in _segments(rng, req, gso):
                pkts.append((t, CLIENT, port, NIC, 80, c + off, s, ACK | PSH, seg))
                t += 5_000
            truth[rid] = (status, t - 5_000 - t0)
            c += len(req)
            t += 300_000
            for off, seg in _segments(rng, resp, gso):
                pkts.append((t, NIC, 80, CLIENT, port, s + off, c, ACK | PSH, seg))
                t += 5_000
            s += len(resp)
            t += 200_000
        if rng.random() < 0.5:  # the connection ends, or stays open
            pkts += [(t, CLIENT, port, NIC, 80, c, s, FIN | ACK, b""),
                     (t + 10_000, NIC, 80, CLIENT, port, s, c + 1, FIN | ACK, b"")]
    pkts.sort(key=lambda p: p[0])
    return pkts, truth


def _head_cut(data: bytes) -> tuple[bytes, bool]:
    """A live agent's payload of a segment it sends: at most KEEP bytes, cut after the
    first blank line among them; and whether one was."""
    kept = data[:KEEP]
    i = kept.find(b"\r\n\r\n")
    return (kept[: i + 4], True) if i >= 0 else (kept, False)


def _stitch(pkts: list[Packet], view: str, snap: int = 0) -> dict[str, dict[str, Any]]:
    tl = Timeline()
    follow: dict[tuple[str, int], int] = {}
    for t, src, sport, dst, dport, seq, ack, flags, seg in pkts:
        live: dict[str, Any] = {}
        payload = seg
        if view == "snap":
            payload = seg[: max(0, snap - FRAME_HEADERS)]
        elif view == "live":
            live = {"point": AT_NIC, "ts_mono_ns": t}
            if seg:
                key = (src, sport)
                if seg.startswith((b"GET ", b"POST ", b"HTTP/1.")):
                    payload, done = _head_cut(seg)
                    follow.pop(key, None)
                    if not done:
                        follow[key] = FOLLOW
                elif key in follow:
                    payload, done = _head_cut(seg)
                    follow[key] -= 1
                    if done or not follow[key]:
                        del follow[key]
                else:
                    continue  # a body segment stays in the kernel
        tl.obs.setdefault("node1", []).append(make_packet(
            T0 + t, "node1", "eth0", src, sport, dst, dport, seq=seq & M32, ack=ack & M32,
            flags=flags, payload=payload, plen=len(seg), **live))
    # other traffic, later: time passes for the stitcher
    tl.add("node1", "eth0", 3_000_000_000, "198.51.100.1", 1, "198.51.100.2", 2, 1, 1, ACK)
    st = Stitcher(["node1"])
    st.feed("node1", tl.obs["node1"])
    return {r["request_id"]: r for r in st.result()["requests"]}


VIEWS = [("snap", 200, False), ("snap", 600, True), ("snap", 1500, False),
         ("live", 0, False), ("live", 0, True)]


@pytest.mark.parametrize("first", range(0, 240, 40))
def test_cut_heads_give_every_request_its_status(first: int) -> None:
    failures = []
    for seed in range(first, first + 40):
        for gso in (False, True):
            pkts, truth = _packets(seed, gso)
            whole = _stitch(pkts, "whole")
            assert {k: r["status"] for k, r in whole.items()} == {
                k: v[0] for k, v in truth.items()}, (seed, gso)
            assert all(r["flags"] == ["no_upstream"] for r in whole.values()), (seed, gso)
            for view, snap, g in VIEWS:
                if g != gso:
                    continue
                got = _stitch(pkts, view, snap)
                for rid, w in whole.items():
                    r = got.get(rid)
                    ok = r is not None and r["status"] == w["status"]
                    if ok and view == "live":
                        ok = (r["start_ns"], r["total_ns"]) == (w["start_ns"], w["total_ns"])
                    elif ok:  # within the request's own segments
                        ok = abs(r["start_ns"] - w["start_ns"]) <= truth[rid][1]
                        ok = ok and r["start_ns"] + r["total_ns"] == w["start_ns"] + w["total_ns"]
                    # nothing was lost, reordered or sent twice: the cut is all there is
                    ok = ok and set(r["flags"]) <= {"no_upstream", "truncated"}
                    if not ok:
                        failures.append((seed, view, snap, gso, rid, r and r["status"],
                                         w["status"], r and r["flags"]))
                if set(got) - set(whole):
                    failures.append((seed, view, snap, gso, "extra", sorted(set(got) - set(whole))))
    assert failures == [], failures[:5]


def _reordered(pkts: list[Packet], rng: random.Random) -> list[Packet]:
    """Up to three segments swapped with the next one of their flow, sent 5 us later."""
    pkts = list(pkts)
    data = [i for i, p in enumerate(pkts) if p[8]]
    for _ in range(3):
        i = rng.choice(data)
        j = next((k for k in range(i + 1, len(pkts)) if pkts[k][1:3] == pkts[i][1:3]), -1)
        if j > 0 and pkts[j][8] and pkts[j][0] - pkts[i][0] <= 5_000:
            a, b = pkts[i], pkts[j]
            pkts[i], pkts[j] = (a[0], *b[1:]), (b[0], *a[1:])
    return pkts


def _repeated(pkts: list[Packet], rng: random.Random) -> list[Packet]:
    """Three segments seen twice (a retransmission, or a second copy), 1 ns apart."""
    pkts = list(pkts)
    for _ in range(3):
        i = rng.choice([k for k, p in enumerate(pkts) if p[8]])
        pkts.insert(i + 1, (pkts[i][0] + 1, *pkts[i][1:]))
    return pkts


@pytest.mark.parametrize("first", range(0, 300, 50))
def test_segments_out_of_order_or_twice_change_no_status(first: int) -> None:
    failures = []
    for seed in range(first, first + 50):
        for gso in (False, True):
            pkts, _truth = _packets(seed, gso)
            whole = {k: r["status"] for k, r in _stitch(pkts, "whole").items()}
            for how, change in (("reordered", _reordered), ("repeated", _repeated)):
                changed = change(pkts, random.Random(seed * 13 + gso))
                for view, snap in (("whole", 0), ("snap", 600), ("snap", 1500), ("live", 0)):
                    got = {k: r["status"] for k, r in _stitch(changed, view, snap).items()}
                    if got != whole:
                        failures.append((seed, gso, how, view, snap, sorted(
                            (k, v, got.get(k)) for k, v in whole.items() if got.get(k) != v)[:2]))
    assert failures == [], failures[:5]
