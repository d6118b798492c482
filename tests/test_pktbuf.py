"""The agent's rolling packet buffer and the pcapng writer behind slow-request exports."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from hopscope.agent.pktbuf import PacketBuffer, flow_key

from hopscope.capture import read_all
from hopscope.model import ACK, FIN, IN, OUT, PSH, SYN, Observation, make_packet
from hopscope.pcapwrite import frame, write_pcapng

CLIENT, EDGE_PORT = "203.0.113.50", 41000
NODE_IP = "203.0.113.11"
POD, POD_PORT = "10.42.1.5", 8080
T0 = 1_790_000_000_000_000_000


def req_bytes(rid: str, path: str = "/api/tasks/") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: api\r\nCF-Ray: {rid}\r\n\r\n".encode()


def conn(ts: int, rids: list[str], sport: int = EDGE_PORT, ifname: str = "eth0",
         dst: str = NODE_IP, dport: int = 80, vni: int = -1) -> list[Observation]:
    """A connection: handshake, then each request and its response, then FIN."""
    osrc, odst = ("192.168.0.11", "192.168.0.12") if vni >= 0 else ("", "")

    seqs = {"c": 1000, "s": 5000}  # next sequence number of the client and of the server

    def p(t: int, who: str, flags: int, payload: bytes = b"") -> Observation:
        src, spt, d, dpt = (CLIENT, sport, dst, dport) if who == "c" else (dst, dport, CLIENT,
                                                                          sport)
        other = "s" if who == "c" else "c"
        o = make_packet(t, "node1", ifname, src, spt, d, dpt, flags=flags, payload=payload,
                        seq=seqs[who], ack=seqs[other] if flags & ACK else 0,
                        direction=IN if who == "c" else OUT, point="nic", ip_id=t % 65536,
                        vni=vni, outer_src=osrc, outer_dst=odst)
        seqs[who] += len(payload) + (1 if flags & (SYN | FIN) else 0)
        return o

    out = [p(ts, "c", SYN), p(ts + 10, "s", SYN | ACK), p(ts + 20, "c", ACK)]
    t = ts + 100
    for rid in rids:
        out.append(p(t, "c", PSH | ACK, req_bytes(rid)))
        out.append(p(t + 50, "s", PSH | ACK, b"HTTP/1.1 200 OK\r\nContent-Length: 900\r\n\r\n"))
        out.append(p(t + 60, "s", PSH | ACK, b"x" * 900))
        out.append(p(t + 70, "c", ACK))
        t += 1000
    out.append(p(t, "c", FIN | ACK))
    return out


def test_a_request_gets_its_own_packets_and_its_connections_handshake() -> None:
    buf = PacketBuffer(1000)
    a = conn(T0, ["r1", "r2", "r3"])
    b = conn(T0 + 5, ["other"], sport=EDGE_PORT + 1)
    buf.add(sorted(a + b, key=lambda o: o.ts_real_ns))
    first = buf.request("r1", T0 + 10**9)
    # handshake + request + response (2 segments) + client ACK; not r2, not the other connection
    assert [o.ts_real_ns - T0 for o in first] == [0, 10, 20, 100, 150, 160, 170]
    second = buf.request("r2", T0 + 10**9)
    assert [o.ts_real_ns - T0 for o in second] == [1100, 1150, 1160, 1170]
    last = buf.request("r3", T0 + 10**9)
    assert [o.ts_real_ns - T0 for o in last] == [2100, 2150, 2160, 2170, 3100]  # and the FIN
    assert [o.ts_real_ns - T0 for o in buf.request("r3", T0 + 2155)] == [2100, 2150]
    assert buf.request("nope", T0 + 10**9) == []
    # only message starts keep their payload; every packet keeps its length
    assert all(o.payload == b"" for o in first if o.plen == 900)
    assert [o.payload for o in first if o.plen and o.plen != 900] == [
        a[3].payload, a[4].payload]
    assert [o.plen for o in first] == [o.plen for o in a[:7]]


def test_the_same_flow_at_several_interfaces_is_one_request() -> None:
    """The proxy's upstream connection crosses flannel.1 and the underlay (VXLAN)."""
    buf = PacketBuffer(1000)
    over = conn(T0, ["up1"], sport=50000, ifname="flannel.1", dst=POD, dport=POD_PORT)
    under = [o._replace(ifname="eth0", ts_real_ns=o.ts_real_ns + 3, vni=1,
                        outer_src=bytes([192, 168, 0, 11]), outer_dst=bytes([192, 168, 0, 12]))
             for o in over]
    buf.add(sorted(over + under, key=lambda o: o.ts_real_ns))
    got = buf.request("up1", T0 + 10**9)
    assert len(got) == 2 * 8 and {o.ifname for o in got} == {"flannel.1", "eth0"}
    assert len({flow_key(o) for o in got}) == 1


def test_the_buffer_is_bounded_and_forgets_the_oldest() -> None:
    buf = PacketBuffer(50)
    for i in range(30):
        buf.add(conn(T0 + i * 10_000, [f"r{i}"], sport=20000 + i))
    assert len(buf) == 50 and buf.evicted == 30 * 8 - 50
    assert buf.request("r0", T0 + 10**9) == []  # gone
    assert len(buf.request("r29", T0 + 10**9)) == 8
    with pytest.raises(ValueError):
        PacketBuffer(0)


def test_frames_are_rebuilt_with_lengths_and_vxlan() -> None:
    o = conn(T0, ["r1"])[3]
    data, orig = frame(o)
    assert orig == 14 + 20 + 20 + o.plen and data.endswith(req_bytes("r1"))
    stripped = o._replace(payload=b"", plen=900)
    assert frame(stripped) == (frame(stripped)[0], 14 + 40 + 900)
    v = o._replace(vni=7, outer_src=bytes([192, 168, 0, 11]), outer_dst=bytes([192, 168, 0, 12]))
    vdata, vorig = frame(v)
    assert vorig == orig + 14 + 20 + 8 + 8 and vdata.endswith(data)
    with pytest.raises(ValueError):
        frame(o._replace(src=b"\0" * 16, dst=b"\0" * 16))


def test_pcapng_round_trip_through_our_reader(tmp_path: Path) -> None:
    pkts = conn(T0, ["r1", "r2"])
    vx = [o._replace(ifname="eth1", vni=1, outer_src=bytes([192, 168, 0, 11]),
                     outer_dst=bytes([192, 168, 0, 12])) for o in conn(T0 + 7, ["u1"], 50001)]
    path = tmp_path / "req.pcapng"
    assert write_pcapng(path, pkts + vx, lambda o: "hop x") == len(pkts) + len(vx)
    back, stats = read_all(path, "node1")
    assert stats.warnings == [] and len(back) == len(pkts) + len(vx)
    want = sorted(pkts + vx, key=lambda o: o.ts_real_ns)
    for a, b in zip(back, want, strict=True):
        assert (a.ts_real_ns, a.src, a.sport, a.dst, a.dport, a.seq, a.ack, a.flags, a.plen,
                a.payload, a.vni) == (b.ts_real_ns, b.src, b.sport, b.dst, b.dport, b.seq, b.ack,
                                      b.flags, b.plen, b.payload, b.vni)
        assert a.ifname == f"node1/{b.ifname}" and a.direction == b.direction


@pytest.mark.skipif(shutil.which("tshark") is None, reason="tshark is not installed")
def test_tshark_reads_it_with_comments_and_no_warnings(tmp_path: Path) -> None:
    path = tmp_path / "req.pcapng"
    write_pcapng(path, conn(T0, ["r1"]), lambda o: "ingress")
    r = subprocess.run(["tshark", "-r", str(path), "-T", "fields", "-e", "frame.comment",
                        "-e", "tcp.flags.str", "-e", "http.request.uri",
                        "-e", "frame.interface_name", "-e", "_ws.expert.severity"],
                       capture_output=True, text=True, timeout=60)
    err = [line for line in r.stderr.splitlines() if "could be dangerous" not in line]
    assert r.returncode == 0 and err == [], r.stderr
    rows = [line.split("\t") for line in r.stdout.splitlines()]
    assert len(rows) == 8
    assert all(row[0] == "nic: ingress" and row[3] == "node1/eth0" for row in rows)
    assert [row[2] for row in rows].count("/api/tasks/") == 1
    # expert info (comment 0x100000, chat 0x200000, note 0x400000): nothing at warning (0x600000)
    sev = [int(v) for row in rows for v in row[4].split(",") if v]
    assert sev and max(sev) < 0x600000, rows
