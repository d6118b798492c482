"""The agent's event struct: the Python mirror against bpf/hopscope.h, and decoding."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from hopscope.agent import events as ev

from hopscope.model import (
    KIND_IPVS,
    KIND_NF,
    KIND_PACKET,
    KIND_QUEUED,
    KIND_WRITE,
    NIC,
    PROXY,
    UNDERLAY,
)


def _offsets() -> dict[str, int]:
    out, pos = {}, 0
    import struct

    for name, code in ev.FIELDS:
        out[name] = pos
        pos += struct.calcsize("<" + code)
    out["payload"] = pos
    return out


@pytest.mark.skipif(shutil.which("gcc") is None, reason="no C compiler")
def test_python_mirror_matches_the_header(tmp_path: Path) -> None:
    names = [n for n, _ in ev.FIELDS] + ["payload"]
    body = "\n".join(f'    printf("{n} %zu\\n", offsetof(struct hs_event, {n}));' for n in names)
    src = tmp_path / "layout.c"
    src.write_text(f"""#include <stddef.h>
#include <stdio.h>
#include <linux/types.h>
#include "hopscope.h"
int main(void) {{
{body}
    printf("sizeof %zu\\n", sizeof(struct hs_event));
    printf("HS_EVENT_HDR %d\\n", HS_EVENT_HDR);
    return 0;
}}
""")
    exe = tmp_path / "layout"
    subprocess.run(["gcc", "-I", str(ev.BPF_DIR), "-o", str(exe), str(src)], check=True)
    got = dict(line.split() for line in subprocess.run(
        [str(exe)], check=True, capture_output=True, text=True).stdout.splitlines())
    want = _offsets()
    for n in names:
        assert int(got[n]) == want[n], n
    assert int(got["HS_EVENT_HDR"]) == ev.HDR_SIZE
    assert int(got["sizeof"]) == ev.HDR_SIZE + ev.PAYLOAD_MAX
    d = ev.header_defines()
    assert d["HS_PAYLOAD_MAX"] == ev.PAYLOAD_MAX
    assert (d["HS_EV_PKT"], d["HS_EV_KERNEL"], d["HS_EV_DROP"], d["HS_EV_STATE"]) == (
        ev.EV_PKT, ev.EV_KERNEL, ev.EV_DROP, ev.EV_STATE)
    assert d["HS_STAT_MAX"] == len(ev.STATS)
    assert (d["HS_ROLE_NIC"], d["HS_ROLE_OVERLAY"], d["HS_ROLE_UNDERLAY"], d["HS_ROLE_POD"],
            d["HS_ROLE_NIC_UNDERLAY"]) == (ev.ROLE_NIC, ev.ROLE_OVERLAY, ev.ROLE_UNDERLAY,
                                           ev.ROLE_POD, ev.ROLE_NIC_UNDERLAY)


def _raw(**kw: object) -> bytes:
    vals = {n: (b"\0\0\0\0" if code == "4s" else 0) for n, code in ev.FIELDS}
    vals["vni"] = ev.NO_VNI
    payload = kw.pop("payload", b"")
    vals.update(kw)
    vals["caplen"] = len(payload)  # type: ignore[arg-type]
    return ev.EVENT.pack(*(vals[n] for n, _ in ev.FIELDS)) + payload  # type: ignore[arg-type]


def test_decode_packets_writes_and_socket_events() -> None:
    ifaces = {3: ev.Iface("eth0", "nic+underlay"), 5: ev.Iface("flannel.1", "overlay")}
    dec = ev.Decoder("node1", ifaces, lambda: 1_000, {12: "NETFILTER_DROP"})
    a, b = bytes([203, 0, 113, 9]), bytes([203, 0, 113, 11])
    recs = [
        _raw(ts_mono_ns=100, kind=ev.EV_PKT, ifindex=3, saddr=a, daddr=b, sport=40000, dport=80,
             seq=7, plen=18, tcp_flags=0x18, proto=6, payload=b"GET / HTTP/1.1\r\n\r\n"),
        _raw(ts_mono_ns=200, kind=ev.EV_PKT, ifindex=3, vni=1, osaddr=a, odaddr=b, saddr=a,
             daddr=b, sport=1, dport=2, proto=6, dir=ev.DIR_OUT),
        _raw(ts_mono_ns=300, aux_ns=250, kind=ev.EV_PKT, ifindex=5, saddr=a, daddr=b, sport=3,
             dport=8000, seq=9, plen=5, proto=6, dir=ev.DIR_OUT, payload=b"GET /"),
        _raw(ts_mono_ns=400, kind=ev.EV_KERNEL, saddr=a, daddr=b, sport=40000, dport=80, seq=7,
             plen=18, proto=6),
        _raw(ts_mono_ns=500, kind=ev.EV_DROP, ifindex=3, reason=12, saddr=a, daddr=b, proto=6),
        _raw(ts_mono_ns=600, kind=99),
    ]
    buf = b"".join(recs)
    spans, at = [], 0
    for r in recs:
        spans.append((at, len(r)))
        at += len(r)
    out: list = []
    assert dec.decode(buf, spans, out) == 1  # the unknown kind
    pkt, vx, write, up, queued, drop = out
    assert (pkt.kind, pkt.point, pkt.direction, pkt.ts_real_ns, pkt.ts_mono_ns) == (
        KIND_PACKET, NIC, "in", 1_100, 100)
    assert pkt.payload == b"GET / HTTP/1.1\r\n\r\n" and pkt.vni == -1 and pkt.outer_src == b""
    assert (vx.point, vx.vni, vx.outer_src, vx.direction) == (UNDERLAY, 1, a, "out")
    assert (write.kind, write.point, write.ts_mono_ns, write.seq, write.dport) == (
        KIND_WRITE, PROXY, 250, 9, 8000)
    assert (up.kind, up.ts_mono_ns, up.point) == (KIND_PACKET, 300, "overlay")
    assert (queued.kind, queued.seq, queued.plen, queued.ts_real_ns) == (KIND_QUEUED, 7, 18, 1_400)
    assert drop.payload == b"NETFILTER_DROP" and drop.point == NIC


def test_decode_kprobe_events() -> None:
    dec = ev.Decoder("node1", {}, lambda: 0, {})
    a, b, rs = bytes([203, 0, 113, 9]), bytes([10, 43, 0, 10]), bytes([10, 42, 2, 5])
    recs = [
        _raw(ts_mono_ns=100, aux_ns=2_500, kind=ev.EV_NF, saddr=a, daddr=b, sport=40000,
             dport=80, seq=7, plen=18, proto=6, reason=2),
        _raw(ts_mono_ns=200, kind=ev.EV_IPVS, saddr=a, daddr=b, sport=41000, dport=8000,
             seq=99, proto=6, osaddr=rs, reason=8000, dir=ev.DIR_OUT),
    ]
    spans = [(0, len(recs[0])), (len(recs[0]), len(recs[1]))]
    out: list = []
    assert dec.decode(b"".join(recs), spans, out) == 0
    nf, ipvs = out
    assert (nf.kind, nf.ts_mono_ns, nf.ack, nf.payload, nf.seq, nf.plen) == (
        KIND_NF, 100, 2_500, b"QUEUED", 7, 18)
    assert (ipvs.kind, ipvs.seq, ipvs.payload, ipvs.dport) == (KIND_IPVS, 99, b"10.42.2.5:8000",
                                                               8000)
    d = ev.header_defines()
    assert (d["HS_EV_NF"], d["HS_EV_IPVS"]) == (ev.EV_NF, ev.EV_IPVS)
    assert {d["HS_NF_ACCEPT"]: b"ACCEPT", d["HS_NF_QUEUED"]: b"QUEUED",
            d["HS_NF_DROP"]: b"DROP"} == ev.NF_VERDICTS
