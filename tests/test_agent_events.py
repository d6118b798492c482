"""The agent's event struct: the Python mirror against bpf/hopscope.h, and decoding."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import c_output, needs_gcc
from hopscope.agent import bpfprog
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


@needs_gcc
def test_python_mirror_matches_the_header(tmp_path: Path) -> None:
    names = [n for n, _ in ev.FIELDS] + ["payload"]
    body = "\n".join(f'    printf("{n} %zu\\n", offsetof(struct hs_event, {n}));' for n in names)
    body += r"""
    printf("sizeof %zu\n", sizeof(struct hs_event));
    printf("HS_EVENT_HDR %d\n", HS_EVENT_HDR);
    printf("proxy_set %zu\n", sizeof(struct hs_proxy_set));
    struct hs_proxy_set ps = {{3, 70000}};
    const unsigned char *b = (const unsigned char *)&ps;
    printf("proxy_bytes ");
    for (size_t i = 0; i < sizeof(ps); i++)
        printf("%02x", b[i]);
    printf("\n");"""
    out = c_output(tmp_path, ["<linux/types.h>", '"hopscope.h"'], body,
                   ["-I", str(ev.BPF_DIR), f"-DHS_MAX_PROXY={bpfprog.MAX_PROXY}"])
    got = dict(line.split() for line in out.splitlines())
    want = _offsets()
    for n in names:
        assert int(got[n]) == want[n], n
    assert int(got["HS_EVENT_HDR"]) == ev.HDR_SIZE
    assert int(got["sizeof"]) == ev.HDR_SIZE + ev.PAYLOAD_MAX
    # the proxy set the agent writes (bpfprog.proxy_set_value), as the compiler lays it out
    assert int(got["proxy_set"]) == bpfprog.MAPS["proxy_set"][1] == 4 * bpfprog.MAX_PROXY
    assert bytes.fromhex(got["proxy_bytes"]) == bpfprog.proxy_set_value([3, 70000]).to_bytes(
        4 * bpfprog.MAX_PROXY, "little")
    d = ev.header_defines()
    assert d["HS_PAYLOAD_MAX"] == ev.PAYLOAD_MAX and d["HS_MAX_PROXY"] == bpfprog.MAX_PROXY
    assert (d["HS_EV_PKT"], d["HS_EV_KERNEL"], d["HS_EV_DROP"], d["HS_EV_STATE"]) == (
        ev.EV_PKT, ev.EV_KERNEL, ev.EV_DROP, ev.EV_STATE)
    assert d["HS_STAT_MAX"] == len(ev.STATS)
    assert (d["HS_ROLE_NIC"], d["HS_ROLE_OVERLAY"], d["HS_ROLE_UNDERLAY"], d["HS_ROLE_POD"],
            d["HS_ROLE_NIC_UNDERLAY"]) == (ev.ROLE_NIC, ev.ROLE_OVERLAY, ev.ROLE_UNDERLAY,
                                           ev.ROLE_POD, ev.ROLE_NIC_UNDERLAY)
    assert (d["HS_DIR_IN"], d["HS_DIR_OUT"]) == (ev.DIR_IN, ev.DIR_OUT)
    assert (d["HS_WHY_CONTROL"], d["HS_WHY_HS_ACK"], d["HS_WHY_START"], d["HS_WHY_FOLLOW"]) == (
        ev.WHY_CONTROL, ev.WHY_HS_ACK, ev.WHY_START, ev.WHY_FOLLOW)
    assert d["HS_NO_VNI"] == ev.NO_VNI
    assert ev.header_defines(ev.BPF_DIR / "maps.h")["HS_MAX_IFINDEX"] == bpfprog.MAX_IFINDEX


#: the counters' names in the header (HS_STAT_*) and in the mirror (source_what), where they
#: are not the one lower-cased
_STAT_NAMES = {"HS_STAT_PROXY_WRITES": "tc_proxy_writes", "HS_STAT_TC_IPV6": "tc_ipv6_skipped"}


def test_counters_mirror_the_header_by_name() -> None:
    """Each per-CPU counter is read from the index the programs count it at: a swapped
    entry would report one source's losses as another's."""
    d = {k: v for k, v in ev.header_defines().items()
         if k.startswith("HS_STAT_") and k != "HS_STAT_MAX"}
    want = {_STAT_NAMES.get(k, k.removeprefix("HS_STAT_").lower()): v for k, v in d.items()}
    assert want == ev.STAT_INDEX


def test_map_shapes_mirror_maps_h() -> None:
    """The key and value sizes the agent reads and writes its maps with (bpfprog.MAPS), from
    the declarations in bpf/maps.h (the loader also checks them against the kernel's)."""
    sizes = {"__u8": 1, "__u32": 4, "__u64": 8, "__s64": 8,
             "struct hs_proxy_set": 4 * bpfprog.MAX_PROXY}
    text = (ev.BPF_DIR / "maps.h").read_text()
    decl = {}
    for m in re.finditer(r"^BPF_(PERCPU_ARRAY|ARRAY|HASH)\((\w+), ([\w ]+?)(?:, ([\w ]+?))?"
                         r"(?:, \w+)?\);", text, re.M):
        kind, name, a, b = m.groups()
        if name not in bpfprog.MAPS:
            continue
        if kind == "HASH":
            decl[name] = (sizes[a], sizes[b], False)
        else:  # arrays: a __u32 index, the value type
            decl[name] = (4, sizes[a], kind == "PERCPU_ARRAY")
    assert decl == {k: v for k, v in bpfprog.MAPS.items() if k != "events"}


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


class _Ring:
    """RingReader.take's contract, over records given up front."""

    def __init__(self, events: list[bytes]) -> None:
        from hopscope.agent.ringbuf import ring_records

        self.blob = ring_records(events)
        self.n = len(events)

    def take(self, limit: int, kind_at: int, kinds: frozenset[int], max_bytes: int
             ) -> tuple[bytes, int, list[int]]:
        from hopscope.agent.ringbuf import walk_records

        blob, n, self.blob, self.n = self.blob, self.n, b"", 0
        return blob, n, [(at, ln) for at, ln in walk_records(blob) if blob[at + kind_at] in kinds]


def test_raw_mode_ships_records_and_decodes_only_drops(tmp_path: Path) -> None:
    """An agent that only records (or ships) copies its ring's records out raw (wire v3):
    the drops are decoded on the node and marked discarded in the copy, so that
    read_record (like the collector) gets every event exactly once, in time order; once
    the ring is empty, one empty batch moves the cut past the last records shipped."""
    from hopscope.agent.run import Agent, AgentConfig, read_record
    from hopscope.collector import wire

    rec = tmp_path / "agent-node1.obs"
    agent = Agent(AgentConfig(node="node1", record=str(rec)))
    agent.raw, agent.offset = True, 1_000
    agent.ifaces.update({3: ev.Iface("eth0", "nic")})
    agent.decoder = ev.Decoder("node1", agent.ifaces, lambda: agent.offset, {12: "NF_X"})
    a, b = bytes([203, 0, 113, 9]), bytes([203, 0, 113, 11])
    events = [_raw(ts_mono_ns=t, kind=ev.EV_PKT, ifindex=3, saddr=a, daddr=b, sport=40000,
                   dport=80, seq=t, proto=6) for t in (300, 100, 200)]
    events.insert(1, _raw(ts_mono_ns=150, kind=ev.EV_DROP, ifindex=3, reason=12, saddr=a,
                          daddr=b, proto=6))
    agent.ring = _Ring(events)
    assert agent._take_raw() == 4 and len(agent.pending) == 1  # the drop, decoded here
    agent._ship_raw(cut=250)
    agent._ship_raw(cut=10_000)  # the ring is empty: one empty batch with the new cut
    agent._ship_raw(cut=20_000)  # and no more
    agent._record.close()
    with open(rec, "rb") as f:
        frames = wire.FrameDecoder(1 << 24).feed(f.read())
    assert [type(fr.obs).__name__ for fr in frames] == ["RawObs", "RawObs"]  # type: ignore[union-attr]
    first, second = (fr.obs for fr in frames)  # type: ignore[union-attr]
    assert (first.cut_mono_ns, second.cut_mono_ns) == (250, 10_000)
    assert [o.kind for o in first.decoded] == ["drop"] and len(second) == 0
    assert [(o.kind, o.ts_mono_ns) for o in first] == [  # the drop once, not again raw
        ("drop", 150), (KIND_PACKET, 300), (KIND_PACKET, 100), (KIND_PACKET, 200)]
    got = read_record(str(rec))
    assert [(o.kind, o.ts_mono_ns, o.ts_real_ns) for o in got] == [
        (KIND_PACKET, 100, 1_100), ("drop", 150, 1_150), (KIND_PACKET, 200, 1_200),
        (KIND_PACKET, 300, 1_300)]
    assert got[1].payload == b"NF_X" and agent.raw_records == 4 and agent.observations == 1


def test_consumer_position_is_stored_whole() -> None:
    """The ring's consumer position goes to the kernel in one 8-byte store. A reader on
    another CPU (here a forked child, as the kernel's producers are) loading the word while
    RingReader releases records across a carry into byte 3 must only ever see the old or
    the new value: a byte-wise store (``struct.pack_into``) showed it 0x00000010 on the way
    from 0x00FFFFF8 to 0x01000010, a ring 16 MiB fuller than it was, and the kernel refused
    events (one in 10,000 in the replica)."""
    import mmap
    import os

    from hopscope.agent.ringbuf import RingReader, u64_word

    if (os.cpu_count() or 1) < 2:
        pytest.skip("needs two CPUs: the reader must run beside the writer")
    a, b = 0x00FF_FFF8, 0x0100_0010
    shared = mmap.mmap(-1, 4096)  # anonymous, shared with the child
    word = u64_word(shared)
    flags = memoryview(shared).cast("B")[8:40].cast("Q")  # [go, stop, torn, loads]
    word[0] = a
    pid = os.fork()
    if pid == 0:  # the child: load the word until told to stop
        try:
            torn = loads = 0
            flags[0] = 1
            while not flags[1]:
                v = word[0]
                if v != a and v != b:
                    torn += 1
                loads += 1
            flags[2], flags[3] = torn, loads
        finally:
            os._exit(0)
    try:
        while not flags[0]:
            pass
        ring = RingReader.__new__(RingReader)
        ring._cons_pos = word
        for _ in range(200_000):
            ring._release(b)
            ring._release(a)
    finally:
        flags[1] = 1
        os.waitpid(pid, 0)
    torn, loads = flags[2], flags[3]
    del word, flags, ring
    shared.close()
    assert loads > 10_000  # the child did load the word while the stores went on
    assert torn == 0


def _walk_impls() -> list[tuple[str, object]]:
    """``hopscope.ringwalk.walk`` as loaded (compiled when built) and from its source."""
    import importlib.util

    from hopscope import ringwalk

    spec = importlib.util.spec_from_file_location("_ringwalk_source",
                                                  ringwalk.__file__.rpartition("/")[0]
                                                  + "/ringwalk.py")
    assert spec is not None and spec.loader is not None
    src = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(src)
    return [("loaded", ringwalk.walk), ("source", src.walk)]


def test_ring_walk_against_a_reference() -> None:
    """The walk ``RingReader.take`` stands on (compiled with mypyc when built): random rings
    of records of every size, some discarded, one still being written, from a base offset
    that is not 0, with byte caps and record limits; it stops where a plain reading of the
    same records says, and marks exactly the kept records of the wanted kinds."""
    import random

    from hopscope.ringwalk import BUSY, DISCARD

    rnd = random.Random(11)
    kind_at = ev.KIND_AT
    for _case in range(300):
        base = 8 * rnd.randrange(0, 64)
        recs = []
        for _ in range(rnd.randrange(0, 40)):
            size = rnd.choice([ev.HDR_SIZE, ev.HDR_SIZE + rnd.randrange(0, 1024), 3, kind_at])
            recs.append((size, rnd.random() < 0.1, rnd.choice([1, 3, 3, 2]) if size > kind_at
                         else 0))
        busy_at = rnd.randrange(0, len(recs) + 1) if rnd.random() < 0.3 else -1
        buf = bytearray(base)
        starts = []
        for i, (size, discarded, kind) in enumerate(recs):
            starts.append(len(buf))
            hdr = size | (DISCARD if discarded else 0) | (BUSY if i == busy_at else 0)
            data = bytearray(rnd.randbytes(size))
            if size > kind_at:
                data[kind_at] = kind
            buf += hdr.to_bytes(4, "little") + bytes(4) + data + bytes(-size % 8)
        end = len(buf)
        buf += bytes(64)
        words = memoryview(bytes(buf)).cast("I")
        limit = rnd.choice([1 << 16, rnd.randrange(1, 8)])
        max_bytes = rnd.choice([1 << 62, rnd.randrange(0, 4000)])
        kinds = rnd.choice([frozenset(), frozenset({3}), frozenset({1, 3})])
        # the reference: record by record
        at, n, marked = base, 0, []
        for i, (size, discarded, kind) in enumerate(recs):
            nxt = starts[i] + 8 + size + (-size % 8)
            if i == busy_at or n == limit or (nxt > base + max_bytes and n):
                break
            if kinds and size > kind_at and not discarded and kind in kinds:
                marked.append((starts[i] + 8 - base, size))
            at, n = nxt, n + 1
        for name, walk in _walk_impls():
            got = walk(words, base, end, base + max_bytes, limit, kind_at, kinds)  # type: ignore[operator]
            assert got == (at, n, marked), (name, _case)
