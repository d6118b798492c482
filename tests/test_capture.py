"""The capture reader, on small captures crafted with scapy and written with struct."""

from __future__ import annotations

import ipaddress
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import IPv6, IPv6ExtHdrDestOpt, IPv6ExtHdrHopByHop, IPv6ExtHdrRouting
from scapy.layers.l2 import ARP, Dot1Q, Ether
from scapy.layers.vxlan import VXLAN
from scapy.packet import Raw

import hopscope.capture as capmod
from hopscope.capture import CaptureReader, read_all
from hopscope.errors import NotACaptureError
from hopscope.model import ACK, IN, OUT, PSH, SYN, addr_str, make_packet

TS = 1_795_766_400_123_456_789  # ns
PAYLOAD = b"POST /api/tasks/ HTTP/1.1\r\nHost: api.myhoneydue.com\r\n\r\n"


def tcp_pkt(src: str = "162.158.90.17", dst: str = "178.104.247.152", sport: int = 40123,
            dport: int = 80, seq: int = 1000, ack: int = 2000, flags: str = "PA",
            payload: bytes = PAYLOAD, ip_id: int = 4242) -> bytes:
    return bytes(IP(src=src, dst=dst, id=ip_id, flags="DF") /
                 TCP(sport=sport, dport=dport, seq=seq, ack=ack, flags=flags) / payload)


def eth(l3: bytes, etype: int = 0x0800) -> bytes:
    return bytes(Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02", type=etype)) + l3


def pcap(path: Path, linktype: int, records: list[tuple[int, bytes]], nano: bool = True,
         endian: str = "<", snaplen: int = 262144) -> Path:
    """Records longer than ``snaplen`` are cut to it, their original length kept (tcpdump -s)."""
    magic = 0xA1B23C4D if nano else 0xA1B2C3D4
    out = [struct.pack(endian + "IHHiIII", magic, 2, 4, 0, 0, snaplen, linktype)]
    for ts, data in records:
        sec, frac = divmod(ts, 1_000_000_000)
        if not nano:
            frac //= 1000
        kept = data[:snaplen]
        out.append(struct.pack(endian + "IIII", sec, frac, len(kept), len(data)) + kept)
    path.write_bytes(b"".join(out))
    return path


def _opt(endian: str, code: int, val: bytes) -> bytes:
    return struct.pack(endian + "HH", code, len(val)) + val + b"\0" * (-len(val) % 4)


def _block(endian: str, btype: int, body: bytes) -> bytes:
    n = 12 + len(body)
    return struct.pack(endian + "II", btype, n) + body + struct.pack(endian + "I", n)


def pcapng(path: Path, ifaces: list[tuple[str, int, int]], packets: list[tuple[int, int, bytes, int | None]],
           endian: str = "<", spb: list[bytes] | None = None, sections: int = 1,
           snaplen: int = 262144) -> Path:
    """ifaces: (name, linktype, tsresol byte); packets: (ifid, ts_in_units, data, epb_flags),
    cut to ``snaplen`` bytes (the original length kept, as tcpdump -s writes them; the
    interfaces' own snap length field stays 0, as editcap -s leaves it)."""
    out = []
    for _ in range(sections):
        shb = struct.pack(endian + "IHHq", 0x1A2B3C4D, 1, 0, -1) + _opt(endian, 0, b"")
        out.append(_block(endian, 0x0A0D0D0A, shb))
        for name, lt, res in ifaces:
            opts = _opt(endian, 2, name.encode()) + _opt(endian, 9, bytes([res])) + _opt(endian, 0, b"")
            out.append(_block(endian, 1, struct.pack(endian + "HHI", lt, 0, 0) + opts))
        for ifid, ts, whole, fl in packets:
            data = whole[:snaplen]
            body = struct.pack(endian + "IIIII", ifid, ts >> 32, ts & 0xFFFFFFFF, len(data),
                               len(whole))
            body += data + b"\0" * (-len(data) % 4)
            if fl is not None:
                body += _opt(endian, 2, struct.pack(endian + "I", fl)) + _opt(endian, 0, b"")
            out.append(_block(endian, 6, body))
        for data in spb or []:
            out.append(_block(endian, 3, struct.pack(endian + "I", len(data)) + data + b"\0" * (-len(data) % 4)))
    path.write_bytes(b"".join(out))
    return path


def check_tcp(ob: object, ts: int = TS) -> None:
    assert ob.ts_real_ns == ts  # type: ignore[attr-defined]
    assert addr_str(ob.src) == "162.158.90.17" and addr_str(ob.dst) == "178.104.247.152"  # type: ignore[attr-defined]
    assert (ob.sport, ob.dport, ob.seq, ob.ack) == (40123, 80, 1000, 2000)  # type: ignore[attr-defined]
    assert ob.flags == ACK | PSH and ob.plen == len(PAYLOAD) and ob.payload == PAYLOAD  # type: ignore[attr-defined]
    assert ob.ip_id == 4242 and ob.vni == -1 and ob.node == "node1"  # type: ignore[attr-defined]


@pytest.mark.parametrize("nano", [True, False])
@pytest.mark.parametrize("endian", ["<", ">"])
def test_pcap_ethernet_both_resolutions_and_byte_orders(tmp_path: Path, nano: bool, endian: str) -> None:
    ts = TS if nano else TS // 1000 * 1000
    p = pcap(tmp_path / "a.pcap", 1, [(ts, eth(tcp_pkt()))], nano=nano, endian=endian)
    obs, stats = read_all(p, "node1")
    assert len(obs) == 1 and stats.packets == 1 and not stats.truncated
    check_tcp(obs[0], ts)
    assert stats.format == ("pcap-ns" if nano else "pcap-us")


def test_vlan_raw_ip_and_ipv6(tmp_path: Path) -> None:
    vlan = bytes(Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / Dot1Q(vlan=4000, type=0x0800)) + tcp_pkt()
    obs, _ = read_all(pcap(tmp_path / "v.pcap", 1, [(TS, vlan)]), "node1")
    check_tcp(obs[0])
    obs, _ = read_all(pcap(tmp_path / "r.pcap", 101, [(TS, tcp_pkt())]), "node1")
    check_tcp(obs[0])
    v6 = bytes(IPv6(src="2a01:4f8::1", dst="2a01:4f8::2") / TCP(sport=1, dport=80, seq=5, flags="S"))
    obs, _ = read_all(pcap(tmp_path / "6.pcap", 101, [(TS, v6)]), "node1")
    assert addr_str(obs[0].dst) == "2a01:4f8::2" and obs[0].flags == SYN and obs[0].ip_id == -1


def test_vxlan_inner_packet_with_outer_addresses(tmp_path: Path) -> None:
    inner = bytes(Ether(src="6a:1b:2c:3d:4e:5f", dst="6a:aa:bb:cc:dd:ee", type=0x0800)) + tcp_pkt()
    for port in (8472, 4789):
        outer = bytes(IP(src="178.104.247.152", dst="178.105.32.198") / UDP(sport=51234, dport=port) /
                      VXLAN(vni=1, flags=0x08) / Raw(inner))
        obs, _ = read_all(pcap(tmp_path / f"x{port}.pcap", 1, [(TS, eth(outer))]), "node1")
        check_tcp(obs[0]._replace(vni=-1))
        assert obs[0].vni == 1
        assert addr_str(obs[0].outer_src) == "178.104.247.152"
        assert addr_str(obs[0].outer_dst) == "178.105.32.198"


def test_non_tcp_and_fragments_are_passed_over(tmp_path: Path) -> None:
    recs = [
        (TS, bytes(Ether(type=0x0806) / ARP())),
        (TS + 1, eth(bytes(IP(src="10.42.0.5", dst="10.43.0.10") / UDP(sport=5353, dport=53) / (b"\x00" * 12)))),
        (TS + 2, eth(bytes(IP(src="1.1.1.1", dst="2.2.2.2") / ICMP()))),
        (TS + 3, eth(bytes(IP(src="1.1.1.1", dst="2.2.2.2", frag=100, proto=6) / (b"x" * 40)))),
        (TS + 4, eth(tcp_pkt())),
    ]
    obs, st = read_all(pcap(tmp_path / "n.pcap", 1, recs), "node1")
    assert len(obs) == 1 and st.packets == 5 and st.skipped == 4
    check_tcp(obs[0], TS + 4)


def test_classic_pcap_with_a_frame_check_sequence(tmp_path: Path) -> None:
    """Link type 0x24000001: Ethernet, FCS present (bit 26), 4 bytes long (bits 28-31)."""
    p = pcap(tmp_path / "fcs.pcap", 0x24000001, [(TS, eth(tcp_pkt()) + b"\xde\xad\xbe\xef")])
    obs, st = read_all(p, "node1")
    assert len(obs) == 1 and not st.warnings, st.warnings
    check_tcp(obs[0])  # the FCS is not payload


def test_ipv4_total_length_zero_and_ipv6_extension_headers(tmp_path: Path) -> None:
    # TSO / BIG TCP: a sender's capture can hold an IPv4 packet whose total length is 0
    tso = bytes(IP(src="162.158.90.17", dst="178.104.247.152", id=4242, flags="DF", len=0) /
                TCP(sport=40123, dport=80, seq=1000, ack=2000, flags="PA") / PAYLOAD)
    obs, _ = read_all(pcap(tmp_path / "tso.pcap", 1, [(TS, eth(tso))]), "node1")
    check_tcp(obs[0])
    for ext in (IPv6ExtHdrDestOpt(), IPv6ExtHdrHopByHop(), IPv6ExtHdrDestOpt() / IPv6ExtHdrRouting()):
        v6 = bytes(IPv6(src="2a01:4f8::1", dst="2a01:4f8::2") / ext /
                   TCP(sport=1, dport=80, seq=5, flags="PA") / PAYLOAD)
        obs, _ = read_all(pcap(tmp_path / "6x.pcap", 101, [(TS, v6)]), "node1")
        assert len(obs) == 1, ext.summary()
        assert (obs[0].sport, obs[0].dport, obs[0].seq) == (1, 80, 5), ext.summary()
        assert obs[0].payload == PAYLOAD and obs[0].plen == len(PAYLOAD)


def test_ipv4_mapped_ipv6_addresses_read_as_ipv4() -> None:
    mapped = ipaddress.IPv6Address("::ffff:162.158.90.17").packed
    assert addr_str(mapped) == "162.158.90.17"
    assert addr_str(ipaddress.IPv6Address("2a01:4f8::1").packed) == "2a01:4f8::1"


def test_pcapng_tsoffset_and_flags_after_other_options(tmp_path: Path) -> None:
    e = "<"
    shb = struct.pack(e + "IHHq", 0x1A2B3C4D, 1, 0, -1) + _opt(e, 0, b"")
    idb = struct.pack(e + "HHI", 1, 0, 0) + _opt(e, 2, b"eth0") + _opt(e, 9, bytes([9])) + \
        _opt(e, 14, struct.pack(e + "q", 100)) + _opt(e, 0, b"")  # if_tsoffset: +100 s
    blocks = [_block(e, 0x0A0D0D0A, shb), _block(e, 1, idb)]
    for fl in (1, 2):  # inbound, outbound; after an opt_comment, not first
        data = eth(tcp_pkt())
        body = struct.pack(e + "IIIII", 0, TS >> 32, TS & 0xFFFFFFFF, len(data), len(data))
        body += data + b"\0" * (-len(data) % 4)
        body += _opt(e, 1, b"a comment") + _opt(e, 2, struct.pack(e + "I", fl)) + _opt(e, 0, b"")
        blocks.append(_block(e, 6, body))
    p = tmp_path / "o.pcapng"
    p.write_bytes(b"".join(blocks))
    obs, _ = read_all(p, "node1")
    assert [o.direction for o in obs] == [IN, OUT]
    check_tcp(obs[0], TS + 100 * 1_000_000_000)


def test_linux_cooked_v1_and_v2_directions_and_ifindex(tmp_path: Path) -> None:
    def sll(pkttype: int) -> bytes:
        return struct.pack(">HHH8sH", pkttype, 1, 6, b"\x02" * 6 + b"\0\0", 0x0800) + tcp_pkt()

    obs, _ = read_all(pcap(tmp_path / "s1.pcap", 113, [(TS, sll(0)), (TS + 1, sll(4))]), "node1")
    assert [o.direction for o in obs] == [IN, OUT] and obs[0].ifname == "any"
    check_tcp(obs[0])

    def sll2(ifindex: int, pkttype: int) -> bytes:
        return struct.pack(">HHIHBB8s", 0x0800, 0, ifindex, 1, pkttype, 6, b"\x02" * 8) + tcp_pkt()

    obs, _ = read_all(pcap(tmp_path / "s2.pcap", 276, [(TS, sll2(2, 0)), (TS + 1, sll2(7, 4))]), "node1")
    assert [(o.ifname, o.direction) for o in obs] == [("if2", IN), ("if7", OUT)]
    check_tcp(obs[0])


@pytest.mark.parametrize("endian", ["<", ">"])
def test_pcapng_interfaces_resolutions_flags_spb_sections(tmp_path: Path, endian: str) -> None:
    ifaces = [("eth0", 1, 9), ("flannel.1", 1, 6), ("any", 276, 0x80 | 30)]
    sll2 = struct.pack(">HHIHBB8s", 0x0800, 0, 5, 1, 0, 6, b"\x02" * 8) + tcp_pkt()
    pk = [
        (0, TS, eth(tcp_pkt()), 2),  # outbound per epb_flags
        (1, TS // 1000, eth(tcp_pkt()), None),
        (2, (TS * (1 << 30)) // 1_000_000_000, sll2, None),
    ]
    p = pcapng(tmp_path / "n.pcapng", ifaces, pk, endian=endian, spb=[eth(tcp_pkt())], sections=2)
    obs, st = read_all(p, "node1")
    assert st.format == "pcapng" and st.packets == 8
    assert [o.ifname for o in obs] == ["eth0", "flannel.1", "if5", "eth0"] * 2
    check_tcp(obs[0])
    assert obs[0].direction == OUT and obs[1].direction == ""
    assert obs[1].ts_real_ns == TS // 1000 * 1000
    assert abs(obs[2].ts_real_ns - TS) <= 1  # 2^-30 s resolution
    assert obs[3].ts_real_ns == obs[2].ts_real_ns  # SPB: previous packet's time
    assert any("simple packet" in w for w in st.warnings)
    assert set(st.interfaces) == {"eth0", "flannel.1", "any"}


def test_records_across_read_blocks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    recs = [(TS + i, eth(tcp_pkt(seq=i, payload=b"x" * (i % 700)))) for i in range(300)]
    p1 = pcap(tmp_path / "b.pcap", 1, recs)
    p2 = pcapng(tmp_path / "b.pcapng", [("eth0", 1, 9)], [(0, t, d, None) for t, d in recs])
    big = [read_all(p, "node1")[0] for p in (p1, p2)]
    monkeypatch.setattr(capmod, "BLOCK", 97)
    small = [read_all(p, "node1")[0] for p in (p1, p2)]
    assert big == small and len(big[0]) == 300
    assert big[0] == [o._replace(ifname="") for o in big[1]]
    assert [o.seq for o in big[0]] == list(range(300))


@pytest.mark.parametrize("kind", ["pcap", "pcapng"])
def test_truncated_file_yields_what_it_holds_and_one_warning(tmp_path: Path, kind: str) -> None:
    recs = [(TS + i, eth(tcp_pkt(seq=i))) for i in range(10)]
    p = pcap(tmp_path / "t.pcap", 1, recs) if kind == "pcap" else pcapng(
        tmp_path / "t.pcapng", [("eth0", 1, 9)], [(0, t, d, None) for t, d in recs])
    data = p.read_bytes()
    p.write_bytes(data[: len(data) - 30])
    warnings: list[str] = []
    r = CaptureReader(p, "node1", warn=warnings.append)
    obs = [o for b in r for o in b]
    assert len(obs) == 9 and r.stats.truncated
    assert len(warnings) == 1 and "truncated" in warnings[0]


@pytest.mark.parametrize("kind", ["pcap", "pcapng"])
def test_a_snap_length_is_read_and_said_once(tmp_path: Path, kind: str) -> None:
    """tcpdump -s N keeps N bytes of a packet and its original length: a segment keeps
    its whole length (the stitcher reads on past the bytes left out), and a VXLAN packet
    whose TCP header was cut is left out; the reader says so once, with what was kept."""
    head = PAYLOAD[:-2] + b"X-Pad: " + b"p" * 200 + b"\r\n\r\n"
    vx = bytes(IP(src="178.104.247.152", dst="178.105.32.198") / UDP(sport=40000, dport=8472)
               / VXLAN(vni=1, flags=0x08)) + eth(tcp_pkt(src="10.42.0.1", dst="10.42.1.5"))
    recs = [(TS, eth(tcp_pkt(payload=head))), (TS + 1, eth(tcp_pkt(flags="S", payload=b""))),
            (TS + 2, eth(vx))]

    def read(snap: int) -> tuple[list[capmod.Observation], CaptureReader, list[str]]:
        p = pcap(tmp_path / "s.pcap", 1, recs, snaplen=snap) if kind == "pcap" else pcapng(
            tmp_path / "s.pcapng", [("eth0", 1, 9)], [(0, t, d, None) for t, d in recs],
            snaplen=snap)
        warnings: list[str] = []
        r = CaptureReader(p, "node1", warn=warnings.append)
        return [o for b in r for o in b], r, warnings

    obs, r, warnings = read(100)
    assert (r.stats.cut, r.stats.cut_max) == (2, 100) and warnings == [
        f"{r.path}: 2 of 3 packets were cut short by the capture's snap length (at most 100 "
        "bytes kept): a request head longer than that is read in part, flagged truncated (an "
        "id past the cut is lost), and a VXLAN packet (50 bytes of headers more) whose TCP "
        "header it cut is left out; capture whole packets (tcpdump -s 0)"]
    assert [(o.plen, bytes(o.payload)) for o in obs] == [(len(head), head[:100 - 54]), (0, b"")]
    obs, r, warnings = read(130)  # the VXLAN packet keeps its TCP header, not all the payload
    assert (r.stats.cut, r.stats.cut_max) == (2, 130) and len(warnings) == 1
    assert "at most 130 bytes kept" in warnings[0] and "VXLAN" not in warnings[0]
    assert [o.vni for o in obs] == [-1, -1, 1]
    assert (obs[2].plen, bytes(obs[2].payload)) == (len(PAYLOAD), PAYLOAD[:130 - 104])
    obs, r, warnings = read(262144)
    assert r.stats.cut == 0 and warnings == [] and obs[0].payload == head


@pytest.mark.parametrize("content", [b"", b"hello world, not a capture at all" * 10,
                                     b"\x1f\x8b\x08\x00gzip", b"\x0a\x0d\x0d\x0a" + b"\xff" * 40])
def test_not_a_capture_is_one_clear_error(tmp_path: Path, content: bytes) -> None:
    p = tmp_path / "node1.pcap"
    p.write_bytes(content)
    with pytest.raises(NotACaptureError) as ei:
        read_all(p, "node1")
    assert str(p) in str(ei.value)
    r = subprocess.run([sys.executable, "-m", "hopscope", "replay", str(p)], capture_output=True, text=True)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hopscope: ")


def test_cli_missing_file_and_bad_arguments(tmp_path: Path) -> None:
    for args in (["replay", str(tmp_path / "nope.pcap")], ["replay"], ["replay", "--node", "x"],
                 ["replay", str(tmp_path)]):
        r = subprocess.run([sys.executable, "-m", "hopscope", *args], capture_output=True, text=True)
        assert r.returncode == 2, (args, r.stderr)
        assert "Traceback" not in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr


@pytest.mark.parametrize("kind", ["pcap", "pcapng"])
def test_shards_partition_flows_exactly(tmp_path: Path, kind: str) -> None:
    """n readers with shard=(k, n) see every TCP packet once, every copy of a flow in one shard."""
    recs = []
    for i in range(64):
        fwd = tcp_pkt(src=f"10.42.1.{i % 7}", dst="10.42.2.5", sport=40000 + i, dport=8000, seq=i)
        back = tcp_pkt(src="10.42.2.5", dst=f"10.42.1.{i % 7}", sport=8000, dport=40000 + i, seq=i)
        inner = bytes(Ether(type=0x0800)) + fwd
        vx = bytes(IP(src="203.0.113.11", dst="203.0.113.12") / UDP(sport=50000 + i, dport=8472) /
                   VXLAN(vni=1, flags=0x08) / Raw(inner))
        recs += [(TS + 3 * i, eth(fwd)), (TS + 3 * i + 1, eth(vx)), (TS + 3 * i + 2, eth(back))]
    recs.append((TS + 999, bytes(Ether(type=0x0806) / ARP())))
    p = pcap(tmp_path / "s.pcap", 1, recs) if kind == "pcap" else pcapng(
        tmp_path / "s.pcapng", [("eth0", 1, 9)], [(0, t, d, None) for t, d in recs])
    full, _ = read_all(p, "node1")
    for n in (2, 3):
        parts = [[o for b in CaptureReader(p, "node1", shard=(k, n)) for o in b] for k in range(n)]
        assert sorted(o for part in parts for o in part) == sorted(full)
        assert all(parts)
        for i in range(64):  # both directions and the VXLAN copy of flow i: one shard
            owners = {k for k, part in enumerate(parts) for o in part if 40000 + i in (o.sport, o.dport)}
            assert len(owners) == 1


def test_flow_hash_is_symmetric_and_read_from_raw_bytes() -> None:
    """The 16-bit hash: the same both ways, and the same from the raw IPv4 header as from the tuple."""
    for i in range(200):
        a, b = f"10.42.{i % 5}.{i}", f"203.0.{i % 3}.{255 - i}"
        raw = tcp_pkt(src=a, dst=b, sport=1024 + 37 * i, dport=80 + i)
        ob = read_one_packet(raw)
        back = read_one_packet(tcp_pkt(src=b, dst=a, sport=80 + i, dport=1024 + 37 * i))
        h = capmod.flow_hash(ob)
        assert 0 <= h < 65536
        assert capmod.flow_hash(back) == h == capmod._ip_hash(raw, 0, len(raw))
    assert len({capmod.flow_hash(read_one_packet(tcp_pkt(sport=40000 + i))) for i in range(256)}) == 256
    assert capmod._ip_hash(bytes(IP(src="10.0.0.1", dst="10.0.0.2") / UDP(dport=53)), 0, 28) \
        == capmod.NOT_TCP


def read_one_packet(l3: bytes) -> capmod.Observation:
    ob = capmod._decode_ip(l3, 0, len(l3), 0x0800, TS, "n", "eth0", "")
    assert ob is not None
    return ob


@pytest.mark.parametrize("n", [2, 3])
def test_shares_even_out_heavy_flows(tmp_path: Path, n: int) -> None:
    """Heavy flows that a hash modulo n puts in one shard: the flows after them even the load out."""
    recs = []
    heavy = [p for p in range(40000, 60000)
             if capmod.flow_hash(make_packet(TS, "n", "eth0", "10.42.0.1", p, "10.42.0.9",
                                             8000)) % 6 == 0][:4]
    t = TS
    for _ in range(60):  # four pooled upstream connections, busy from the start
        for p in heavy:
            t += 1000
            recs.append((t, eth(tcp_pkt(src="10.42.0.1", dst="10.42.0.9", sport=p, dport=8000,
                                        payload=b"x" * 1200))))
    for i in range(800):  # then many short client connections
        t += 1000
        recs.append((t, eth(tcp_pkt(src=f"198.51.100.{i % 250}", sport=30000 + i,
                                    payload=b"GET / HTTP/1.1\r\n\r\n"))))
    p = pcapng(tmp_path / "h.pcapng", [("eth0", 1, 9)], [(0, ts, d, None) for ts, d in recs])
    full, _ = read_all(p, "node1")
    size = {k: sum(len(o.payload) + capmod.PACKET_WEIGHT for o in part)
            for k, part in enumerate(
                [[o for b in CaptureReader(p, "node1", shard=(k, n)) for o in b] for k in range(n)])}
    assert sum(size.values()) == sum(len(o.payload) + capmod.PACKET_WEIGHT for o in full)
    total = sum(size.values())
    # the heavy flows are 61 % of the load; hashed modulo n, shard 0 would get them all
    modulo = sum(len(o.payload) + capmod.PACKET_WEIGHT for o in full
                 if capmod.flow_hash(o) % n == 0)
    assert modulo > 1.15 * total / n
    assert max(size.values()) < 1.15 * total / n, size
