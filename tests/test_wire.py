"""The collector wire protocol: frames, the push decoder, auth, asyncio and TLS on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
import itertools
import logging
import os
import re
import shutil
import ssl
import subprocess
import tracemalloc
import typing
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hopscope.agent import events as ev
from hopscope.agent import ringbuf
from hopscope.collector import wire
from hopscope.collector.wire import (
    HELLO_MAX_FRAME,
    MAX_FRAME,
    OBS_FIELDS_V1,
    Ack,
    Batch,
    Bye,
    ErrorFrame,
    Frame,
    FrameDecoder,
    Hello,
    SeqTracker,
    Welcome,
    decode_body,
    encode,
    encode_batch,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hopscope.errors import (
    AuthFailed,
    BadFrame,
    BadVersion,
    FrameTooLarge,
    PeerClosed,
    UsageError,
    WireError,
)
from hopscope.model import Observation, Reorder, make_packet

TOKEN = b"s3cret-token-0123456789abcdef"
T0 = 1_764_000_000_000_000_000


def obs(n: int = 3, node: str = "node1") -> list[Observation]:
    return [
        make_packet(T0 + 1000 * i, node, "eth0" if i % 2 else "flannel.1", "162.158.1.2",
                    40000 + i, "10.42.1.17" if i % 3 else "2001:db8::1", 80,
                    seq=(1 << 32) - 1 - i, ack=i, payload=b"GET / HTTP/1.1\r\n" * (i % 3),
                    point="nic", direction="in", ip_id=i, vni=1 if i % 2 else -1,
                    outer_src="178.104.247.152" if i % 2 else b"",
                    outer_dst="178.104.247.153" if i % 2 else b"", ts_mono_ns=5_000_000 + i)
        for i in range(n)
    ]


def body(frame: dict[str, Any]) -> bytes:
    """A framed msgpack map, built by hand (for frames encode() would not write)."""
    b: bytes = msgpack.packb(frame, use_bin_type=True)
    return len(b).to_bytes(4, "big") + b


def row(**over: Any) -> tuple[Any, ...]:
    """An observation row with some fields replaced by anything at all."""
    d = obs(1)[0]._asdict()
    d.update(over)
    return tuple(d.values())


def batch_map(**over: Any) -> dict[str, Any]:
    d: dict[str, Any] = {"v": 1, "t": "batch", "agent": "a1", "seq": 1, "node": "node1",
                         "ts_real_ns": T0, "obs": [tuple(o) for o in obs(2)]}
    d.update(over)
    return d


def decode_all(data: bytes, max_frame: int = MAX_FRAME) -> list[Frame]:
    d = FrameDecoder(max_frame)
    out: list[Frame] = d.feed(data)
    d.eof()
    return out


# ---------------------------------------------------------------------------
# Round trips

ALL_FRAMES: list[Frame] = [
    Hello("agent-node1", "node1", TOKEN, T0),
    Welcome("collector-1", 41, MAX_FRAME),
    Welcome("", -1, 1024),
    Batch("agent-node1", 42, "node1", T0 + 5, obs(7), [(10, T0), (20, T0 + 10)],
          {"perf_ring": 3, "spool_batches": 0}),
    Batch("a", 0, "n", 0, []),
    Ack(42),
    Ack(-1),
    ErrorFrame("auth", "wrong token", -1),
    ErrorFrame("bad-frame", "batch 3: ...", 3),
    Bye("shutting down"),
    Bye(),
]


@pytest.mark.parametrize("frame", ALL_FRAMES, ids=lambda f: type(f).__name__)
def test_every_frame_type_round_trips(frame: Frame) -> None:
    data = encode(frame)
    assert int.from_bytes(data[:4], "big") == len(data) - 4
    assert decode_all(data) == [frame]
    assert decode_body(data[4:]) == frame


def test_observations_round_trip_exactly() -> None:
    sent = obs(50)
    data = encode_batch("a1", 7, "node1", T0, sent, [(1, 2)], {"x": 1})
    (b,) = decode_all(data)
    assert isinstance(b, Batch)
    assert b.obs == sent
    assert all(type(o) is Observation for o in b.obs)
    assert [type(x) for x in b.obs[1]] == [type(x) for x in sent[1]]
    assert b.obs[1].payload == sent[1].payload and b.obs[1].src == sent[1].src
    assert b.clock == [(1, 2)] and b.lost == {"x": 1}
    assert "obs=<50>" in repr(b)  # a batch never dumps its observations into a log line


def test_wire_row_layout_is_the_models() -> None:
    """The v1 row is Observation's field order and types; a model change needs a new v."""
    assert tuple(n for n, _ in OBS_FIELDS_V1) == Observation._fields
    hints = typing.get_type_hints(Observation)
    assert [hints[n] for n, _ in OBS_FIELDS_V1] == [t for _, t in OBS_FIELDS_V1]
    # v2's columns: the same fields in the same order; ints as ints, str by table, bytes by
    # table but the payload, which is concatenated
    assert tuple(n for n, _ in wire.OBS_COLUMNS_V2) == Observation._fields
    want = {int: "int", str: "str", bytes: "addr"}
    assert [k for _, k in wire.OBS_COLUMNS_V2] == [
        "blob" if n == "payload" else want[hints[n]] for n in Observation._fields]


def test_hello_repr_hides_the_token() -> None:
    assert TOKEN.decode() not in repr(Hello("a", "n", TOKEN, 1))


def test_encode_refuses_over_the_cap() -> None:
    with pytest.raises(FrameTooLarge, match="send smaller batches"):
        encode_batch("a", 1, "n", 0, obs(50), max_frame=1000)


def test_the_kept_packer_starts_every_frame_afresh() -> None:
    """Frames are packed by one Packer per thread, kept between frames, and copied out of
    its buffer once with their length prefix: each frame is exactly what msgpack.packb
    gives, framed, after a frame that failed half-way or was refused by size, after one
    too large to keep the buffer of, and from several threads at once."""
    import threading

    def packb(obj: object) -> bytes:  # through the kept packer, without the prefix
        return wire._pack_framed(obj, "frame", wire.MAX_FRAME, "frame")[wire.HEADER_SIZE:]

    good = encode_batch("a", 1, "n", 0, obs(3))
    body = msgpack.packb(msgpack.unpackb(good[wire.HEADER_SIZE:]), use_bin_type=True)
    assert good == len(body).to_bytes(wire.HEADER_SIZE, "big") + body
    with pytest.raises(BadFrame):
        packb({"ok": b"x" * 1000, "bad": object()})
    assert encode_batch("a", 1, "n", 0, obs(3)) == good
    with pytest.raises(FrameTooLarge):  # packed whole, refused by size: the view let go
        encode_batch("a", 1, "n", 0, obs(50), max_frame=1000)
    assert encode_batch("a", 1, "n", 0, obs(3)) == good
    big = packb({"b": bytes(wire._PACKER_KEEP + 1)})
    assert msgpack.unpackb(big) == {"b": bytes(wire._PACKER_KEEP + 1)}
    assert encode_batch("a", 1, "n", 0, obs(3)) == good
    raw = [os.urandom(n) for n in (10, 300_000, 7, 70_000)]
    errors: list[str] = []

    def pack(k: int) -> None:
        for i in range(200):
            body = raw[(k + i) % len(raw)]
            want = msgpack.packb({"k": k, "i": i, "body": body}, use_bin_type=True)
            if packb({"k": k, "i": i, "body": body}) != want:
                errors.append(f"thread {k} frame {i}")

    threads = [threading.Thread(target=pack, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_encode_check_refuses_a_bad_row() -> None:
    bad = obs(2)
    bad[1] = bad[1]._replace(sport="80")  # type: ignore[arg-type]
    encode_batch("a", 1, "n", 0, bad, version=1)  # rows, not checked: the collector refuses it
    with pytest.raises(BadFrame, match=r"cannot encode batch 1 of agent 'a': field 'sport'"):
        encode_batch("a", 1, "n", 0, bad)  # a column must be all ints
    for version in (1, 2):
        with pytest.raises(BadFrame, match=r"observation 1 field 'sport' must be int, got str"):
            encode_batch("a", 1, "n", 0, bad, check=True, version=version)
        for i, over in enumerate([{"node": b"n"}, {"src": "10.0.0.1"}, {"payload": "GET"},
                                  {"outer_dst": None}, {"kind": 7}]):
            rows = obs(3)
            rows[i % 3] = rows[i % 3]._replace(**over)
            (name,) = over
            with pytest.raises(BadFrame, match=rf"observation {i % 3} field '{name}' must be"):
                encode_batch("a", 1, "n", 0, rows, check=True, version=version)
    with pytest.raises(BadFrame, match=r"field 'seq': argument out of range"):
        encode_batch("a", 1, "n", 0, [obs(1)[0]._replace(seq=1 << 64)])
    with pytest.raises(BadFrame, match="must have 21 fields"):
        encode_batch("a", 1, "n", 0, [obs(1)[0][:20]])  # type: ignore[list-item]


# ---------------------------------------------------------------------------
# Schema v2: batches by column


def test_v1_and_v2_batches_carry_the_same_observations() -> None:
    """v2 is what agents write; v1 rows (old agents, old spools and stores) still decode."""
    sent = obs(50)
    one, two = (encode_batch("a1", 7, "node1", T0, sent, [(1, 2)], {"x": 1}, version=v)
                for v in (1, 2))
    assert msgpack.unpackb(one[4:])["v"] == 1 and "obs" in msgpack.unpackb(one[4:])
    assert msgpack.unpackb(two[4:])["v"] == 2 and "cols" in msgpack.unpackb(two[4:])
    (b1,), (b2,) = decode_all(one), decode_all(two)
    assert isinstance(b1, Batch) and isinstance(b2, Batch)
    assert list(b1.obs) == list(b2.obs) == sent
    assert [type(x) for o in b2.obs for x in o] == [type(x) for o in sent for x in o]
    assert (b1.clock, b1.lost) == (b2.clock, b2.lost) == ([(1, 2)], {"x": 1})
    assert len(two) < len(one)


def test_v2_rows_are_built_on_first_use_only() -> None:
    (b,) = decode_all(encode_batch("a1", 1, "node1", T0, obs(20)))
    assert isinstance(b, Batch) and isinstance(b.obs, wire.ObsColumns)
    assert len(b.obs) == 20 and bool(b.obs) and repr(b.obs) == "<20 observations>"
    assert b.obs._rows is None  # what the collector does before it acks builds no tuple
    assert b.obs[3] == obs(20)[3] and b.obs[-2:] == obs(20)[-2:]
    assert b.obs._rows is not None and b.obs._arrays is None  # the columns are let go
    assert b.obs == obs(20) and b.obs == tuple(obs(20)) and b.obs != obs(19)
    (e,) = decode_all(encode_batch("a1", 2, "node1", T0, []))
    assert isinstance(e, Batch) and len(e.obs) == 0 and list(e.obs) == [] and not e.obs


def test_v2_columns_widen_to_what_their_values_need() -> None:
    """Each int column takes the narrowest code that fits; any int64 value round-trips."""
    o = obs(3)
    wide = [o[0]._replace(flags=300, plen=70_000, sport=0, proto=255, ip_id=-1, vni=-1),
            o[1]._replace(seq=0, ack=(1 << 32) - 1, flags=-5, ts_mono_ns=-(1 << 63)),
            o[2]._replace(plen=0, ts_real_ns=(1 << 63) - 1, vni=(1 << 40))]
    data = encode_batch("a", 1, "n", 0, wide)
    types = dict(zip(Observation._fields, msgpack.unpackb(data[4:])["types"], strict=True))
    assert (types["flags"], types["plen"], types["proto"], types["vni"]) == ("h", "I", "B", "q")
    assert (types["ts_real_ns"], types["seq"], types["ack"]) == ("q", "I", "I")
    (b,) = decode_all(data)
    assert isinstance(b, Batch) and list(b.obs) == wide
    many = [o[0]._replace(src=i.to_bytes(4, "big"), ifname=f"veth{i}") for i in range(300)]
    m = msgpack.unpackb(encode_batch("a", 1, "n", 0, many)[4:])
    assert len(m["addrs"]) == 302 and m["types"][col("src")] == "H"
    (b,) = decode_all(encode_batch("a", 1, "n", 0, many))
    assert isinstance(b, Batch) and list(b.obs) == many


def event(**kw: Any) -> bytes:
    vals: dict[str, Any] = {n: (b"\0\0\0\0" if c == "4s" else 0) for n, c in ev.FIELDS}
    vals.update(vni=ev.NO_VNI, kind=ev.EV_PKT, proto=6, ifindex=3, saddr=bytes([203, 0, 113, 9]),
                daddr=bytes([203, 0, 113, 11]), sport=40000, dport=80)
    payload = kw.pop("payload", b"")
    vals.update(kw, caplen=len(payload))
    return ev.EVENT.pack(*(vals[n] for n, _ in ev.FIELDS)) + payload


IFACES = ((3, "eth0", "nic"), (5, "flannel.1", "overlay"))


def raw_events(events: list[bytes], cut: int = 1 << 40, discard: set[int] = frozenset(),  # type: ignore[assignment]
               ifaces: tuple[tuple[int, str, str], ...] = IFACES) -> ev.RawEvents:
    return ev.RawEvents(ringbuf.ring_records(events, discard), ifaces, 1_000, cut)


def test_v3_batches_carry_raw_records_decoded_as_the_agent_would() -> None:
    """What the agent ships raw decodes, at the collector, to what it would have decoded."""
    evs = [event(ts_mono_ns=100 + i, seq=i, plen=5, payload=b"GET /"[: 1 + i % 5])
           for i in range(7)]
    evs.append(event(ts_mono_ns=90, aux_ns=80, ifindex=5, dir=ev.DIR_OUT, dport=8000))
    drop = obs(1)[0]._replace(kind="drop", payload=b"NETFILTER_DROP")
    raw = raw_events(evs, cut=104, discard={2})
    data = encode_batch("a1", 9, "node1", T0, [drop], [(1, 2)], {"tc_lost": 0}, raw=raw)
    assert msgpack.unpackb(data[4:])["v"] == wire.RAW_VERSION == 3
    (b,) = decode_all(data)
    assert isinstance(b, Batch) and isinstance(b.obs, wire.RawObs)
    assert wire.batch_size(b) == 8 and b.obs._rows is None  # counted without decoding
    assert b.obs.cut_mono_ns == 104 and (b.clock, b.lost) == ([(1, 2)], {"tc_lost": 0})
    want: list[Observation] = [drop]
    recs = [(at, n) for k, (at, n) in enumerate(_spans(evs)) if k != 2]
    assert ev.Decoder("node1", {i: ev.Iface(n, p) for i, n, p in IFACES}, lambda: 1_000,
                      {}).decode(raw.records, recs, want) == 0
    assert list(b.obs) == want and len(b.obs) == 9  # the discarded record left out; a write
    assert [o.kind for o in b.obs].count("write") == 1
    assert b.obs.bad == 0 and b"GET /" in {o.payload for o in b.obs}
    assert wire.batch_body(Batch(b.agent, b.seq, b.node, b.ts_real_ns, b.obs, b.clock,
                                 b.lost)) == data[4:]  # re-encoded as it came
    # an interface the agent did not name: that record is counted, not made up
    (u,) = decode_all(encode_batch("a1", 10, "node1", T0, [],
                                   raw=raw_events([event(ifindex=77), event()])))
    assert isinstance(u, Batch) and isinstance(u.obs, wire.RawObs)
    assert len(u.obs) == 1 and u.obs.bad == 1


def _spans(evs: list[bytes]) -> list[tuple[int, int]]:
    out, at = [], 0
    for e in evs:
        out.append((at + 8, len(e)))
        at += 8 + len(e) + (-len(e) % 8)
    return out


def v3_map(**raw_over: Any) -> dict[str, Any]:
    d: dict[str, Any] = msgpack.unpackb(
        encode_batch("a1", 1, "node1", T0, [], raw=raw_events([event(), event()]))[4:])
    d["raw"].update(raw_over)
    return d


@pytest.mark.parametrize(("frame", "msg"), [
    ({**v3_map(), "raw": None}, "a v3 batch needs a map 'raw'"),
    (v3_map(layout=ev.LAYOUT + 1), "run the same hopscope version"),
    (v3_map(recs="x"), "'raw.recs' must be a bin"),
    (v3_map(recs=ringbuf.ring_records([event()])[:-4]), "beyond the end"),
    (v3_map(recs=ringbuf.ring_records([event()]) + b"\0\0\0"), "3 bytes after the last record"),
    (v3_map(recs=(ringbuf.BUSY | 8).to_bytes(4, "little") + bytes(12)), "still being written"),
    (v3_map(ifaces=[[3, "eth0", "moon"]]), "'raw.ifaces' must hold [ifindex, name, point]"),
    (v3_map(ifaces=[["3", "eth0", "nic"]]), "'raw.ifaces' must hold"),
    (v3_map(offset_ns="0"), "'offset_ns' must be an int"),
    (v3_map(cut_mono_ns=None), "'cut_mono_ns' must be an int"),
])
def test_bad_v3_batches_are_refused_with_a_clear_message(frame: dict[str, Any], msg: str) -> None:
    with pytest.raises(BadFrame, match=re.escape(msg)):
        decode_body(body(frame)[4:])


def test_reorder_puts_raw_batches_back_in_time_order() -> None:
    """The collector's (and read_record's) reorder: each batch up to its cut, in order."""
    ro = Reorder()
    a = [o._replace(ts_mono_ns=t) for o, t in zip(obs(4), (30, 10, 50, 20), strict=True)]
    b = [o._replace(ts_mono_ns=t) for o, t in zip(obs(3), (40, 25, 60), strict=True)]
    assert [o.ts_mono_ns for o in ro.push(a, 30)] == [10, 20, 30]
    assert [o.ts_mono_ns for o in ro.push([], -1)] == [] and len(ro) == 1
    assert [o.ts_mono_ns for o in ro.push(b, 50)] == [25, 40, 50]
    assert [o.ts_mono_ns for o in ro.flush()] == [60] and len(ro) == 0


def v2_map(**over: Any) -> dict[str, Any]:
    d: dict[str, Any] = msgpack.unpackb(encode_batch("a1", 1, "node1", T0, obs(3))[4:])
    d.update(over)
    return d


def col(name: str) -> int:
    return Observation._fields.index(name)


def with_col(name: str, data: bytes, code: str | None = None) -> dict[str, Any]:
    m = v2_map()
    m["cols"][col(name)] = data
    if code is not None:
        t = list(m["types"])
        t[col(name)] = code
        m["types"] = "".join(t)
    return m


@pytest.mark.parametrize(("frame", "msg"), [
    (v2_map(n=-1), "field 'n' must be an int >= 0, got -1"),
    (v2_map(n=4), "column 'ts_real_ns' holds 24 bytes, 4 values of type 'q' take 32"),
    (v2_map(n=True), "field 'n' must be an int >= 0, got True"),
    (v2_map(types="q" * 20), "field 'types' must be a str of 21 type codes"),
    (v2_map(types=None), "field 'types' must be a str of 21 type codes"),
    (v2_map(cols=[b""] * 20), "field 'cols' must be an array of 21 bin"),
    (v2_map(cols=["x"] * 21), "field 'cols' must be an array of 21 bin"),
    (v2_map(strs=["a", b"b"]), "field 'strs' must be an array of str"),
    (v2_map(addrs=["10.0.0.1"]), "field 'addrs' must be an array of bin"),
    (v2_map(blob="GET"), "field 'blob' must be a bin, got str"),
    (with_col("seq", b"\x00" * 24, "d"), "column 'seq' has type code 'd', allowed: bBhHiIq"),
    (with_col("seq", b"\x00" * 24, "Q"), "column 'seq' has type code 'Q'"),
    (with_col("node", b"\x00" * 3, "b"), "column 'node' has type code 'b', allowed: BHI"),
    (with_col("seq", b"\x00" * 11), "column 'seq' holds 11 bytes, 3 values of type 'I' take 12"),
    (with_col("ifname", b"\x00\x01c"), "column 'ifname' indexes entry 99 of a table of"),
    (with_col("src", b"\x00\x01c"), "column 'src' indexes entry 99 of a table of"),
    (with_col("payload", b"\x00\x00\x00\x00\x00\x01", "H"),
     "the payload lengths add up to 256 bytes, 'blob' holds 48"),
    (v2_map(blob=b"x" * 33), "the payload lengths add up to 48 bytes, 'blob' holds 33"),
])
def test_bad_v2_batches_are_refused_with_a_clear_message(frame: dict[str, Any], msg: str) -> None:
    with pytest.raises(BadFrame, match=re.escape(msg)) as info:
        decode_all(body(frame))
    assert "\n" not in str(info.value) and str(info.value).startswith("batch 1: ")


def test_frames_other_than_batches_are_written_as_v1() -> None:
    """Their fields are unchanged since v1, so a collector or agent of v1 reads them."""
    for f in ALL_FRAMES:
        v = msgpack.unpackb(encode(f)[4:])["v"]
        assert v == (2 if isinstance(f, Batch) else 1)
    for v in (1, 2):
        (f,) = decode_all(body({"v": v, "t": "ack", "seq": 4}))
        assert f == Ack(4)


# ---------------------------------------------------------------------------
# Refusals


@pytest.mark.parametrize(("frame", "exc", "msg"), [
    (batch_map(v=4), BadVersion, "schema version 4 is not supported"),
    (batch_map(v="1"), BadFrame, "'v' must be an int"),
    ({"t": "ack", "seq": 1}, BadFrame, "no schema version"),
    ({"v": 1, "seq": 1}, BadFrame, "no type"),
    ({"v": 1, "t": "pong"}, BadFrame, "unknown frame type 'pong'"),
    (batch_map(seq=-1), BadFrame, "'seq' = -1 is out of range"),
    (batch_map(seq=True), BadFrame, "'seq' must be an int, got bool"),
    (batch_map(agent=""), BadFrame, "'agent' must be 1 to 255 printable"),
    (batch_map(agent="a\nb"), BadFrame, "'agent' must be 1 to 255 printable"),
    (batch_map(node=None), BadFrame, "'node' must be a str, got nil"),
    ({"v": 1, "t": "batch", "agent": "a", "seq": 1, "ts_real_ns": 1, "obs": []}, BadFrame,
     "'node' is missing"),
    ({"v": 1, "t": "ack"}, BadFrame, "ack frame: field 'seq' is missing"),
    (batch_map(obs={"a": 1}), BadFrame, "'obs' must be an array, got map"),
    (batch_map(obs=[1, 2]), BadFrame, "observation 0 must be an array, got int"),
    (batch_map(obs=[row()[:20]]), BadFrame, "observation 0 has 20 fields"),
    (batch_map(obs=[(*row(), 1)]), BadFrame, "observation 0 has 22 fields"),
    (batch_map(obs=[row(), row(ts_real_ns=1.5)]), BadFrame,
     "observation 1 field 'ts_real_ns' must be int, got float"),
    (batch_map(obs=[row(flags=True)]), BadFrame, "field 'flags' must be int, got bool"),
    (batch_map(obs=[row(src="1.2.3.4")]), BadFrame, "field 'src' must be bytes, got str"),
    (batch_map(obs=[row(node=b"node1")]), BadFrame, "field 'node' must be str, got bytes"),
    (batch_map(obs=[row(payload=None)]), BadFrame, "field 'payload' must be bytes, got nil"),
    (batch_map(obs=[row(vni=[1])]), BadFrame, "field 'vni' must be int, got array"),
    (batch_map(clock=[[1, 2, 3]]), BadFrame, "'clock' must hold"),
    (batch_map(clock=[[1, "2"]]), BadFrame, "'clock' must hold"),
    (batch_map(lost={"ring": -1}), BadFrame, "'lost' must map"),
    (batch_map(lost={"ring": 1.0}), BadFrame, "'lost' must map"),
    ({"v": 1, "t": "hello", "agent": "a", "node": "n", "token": "text", "started_ns": 1},
     BadFrame, "'token' must be bytes"),
])
def test_bad_frames_are_refused_with_a_clear_message(
        frame: dict[str, Any], exc: type[WireError], msg: str) -> None:
    with pytest.raises(exc, match=msg) as info:
        decode_all(body(frame))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(("raw", "msg"), [
    (b"\x00\x00\x00\x00", "empty frame"),
    (b"\x00\x00\x00\x03abc", "not valid msgpack"),
    (b"\x00\x00\x00\x01\xc1", "not valid msgpack"),  # 0xc1: never used
    (b"\x00\x00\x00\x02\x93\x01", "not valid msgpack"),  # truncated inside the body
    (b"\x00\x00\x00\x01\x01", "must be a msgpack map, got int"),
    (b"\x00\x00\x00\x04\xd4\x05\x01\x02", "extension type 5 is not allowed"),
    (body({"v": 1, "t": "ack", "seq": msgpack.Timestamp(1)}), "must be an int, got Timestamp"),
    (b"\x00\x00\x00\x05\xdd\xff\xff\xff\xff", "not valid msgpack"),  # array of 4G elements
    (b"\x00\x00\x00\x05\xdf\xff\xff\xff\xff", "not valid msgpack"),  # map of 4G pairs
    (b"\x00\x00\x00\x05\xdb\xff\xff\xff\xff", "not valid msgpack"),  # str of 4 GiB
    (b"\x00\x00\x04\x00" + b"\x91" * 1024, "not valid msgpack"),  # nesting 1024 deep
])
def test_garbage_bodies_are_bad_frames(raw: bytes, msg: str) -> None:
    with pytest.raises(BadFrame, match=msg):
        decode_all(raw)


def test_error_frames_are_read_whatever_their_version() -> None:
    """So that an agent can read why a newer (or older) collector refused it."""
    (f,) = decode_all(body({"v": 9, "t": "error", "code": "version", "message": "speak 9"}))
    assert f == ErrorFrame("version", "speak 9", -1)
    assert isinstance(wire.error_from_frame(f), BadVersion)


def test_unknown_fields_are_ignored() -> None:
    """Additive changes within a version: a receiver ignores keys it does not know."""
    (f,) = decode_all(body({"v": 1, "t": "ack", "seq": 3, "future": [1, 2]}))
    assert f == Ack(3)


@pytest.mark.parametrize(("head", "hint"), [
    (b"GET / HTTP/1.1\r\n", "look like text"),
    (bytes([0x16, 0x03, 0x01, 0x02, 0x00]), "TLS handshake"),
    (b"\xff\xff\xff\xff", "over the cap"),
])
def test_huge_length_prefix_is_refused_before_allocating(head: bytes, hint: str) -> None:
    d = FrameDecoder()
    tracemalloc.start()
    try:
        with pytest.raises(FrameTooLarge, match=hint):
            d.feed(head)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert d.buffered == 0
    assert peak < 64 << 10
    with pytest.raises(FrameTooLarge):  # sticky: the stream cannot be trusted any more
        d.feed(encode(Ack(1)))


def test_a_frame_at_the_cap_is_not_preallocated() -> None:
    d = FrameDecoder()
    tracemalloc.start()
    try:
        assert d.feed(MAX_FRAME.to_bytes(4, "big") + b"\x85" + b"x" * 99) == []
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert d.buffered == 100
    assert peak < 64 << 10
    with pytest.raises(BadFrame, match=f"after 100 of {MAX_FRAME} body bytes"):
        d.eof()


def test_one_over_the_cap_is_refused_and_the_cap_can_change() -> None:
    data = encode(Ack(1))
    n = len(data) - 4
    with pytest.raises(FrameTooLarge, match=f"frame of {n} bytes announced, over the cap of"
                                            f" {n - 1} bytes"):
        FrameDecoder(n - 1).feed(data)
    d = FrameDecoder(n - 1)
    d.max_frame = n  # raised after the hello, say
    assert d.feed(data) == [Ack(1)]


def test_good_frames_before_a_bad_one_come_first_then_the_error() -> None:
    d = FrameDecoder()
    assert d.feed(encode(Ack(1)) + encode(Ack(2)) + b"\x00\x00\x00\x01\xc1") == [Ack(1), Ack(2)]
    assert isinstance(d.failed, BadFrame)
    with pytest.raises(BadFrame):
        d.feed(b"")
    with pytest.raises(BadFrame):
        d.eof()


def test_eof_inside_a_length_prefix() -> None:
    d = FrameDecoder()
    assert d.feed(b"\x00\x00") == []
    with pytest.raises(BadFrame, match="after 2 of 4 length-prefix bytes"):
        d.eof()


def test_feed_accepts_bytearray_and_memoryview_without_pinning_them() -> None:
    data = bytearray(encode(Ack(5)) + encode(Bye("x"))[:3])
    d = FrameDecoder()
    assert d.feed(memoryview(data)) == [Ack(5)]
    data.extend(b"more")  # would raise BufferError if the decoder kept an export
    assert d.feed(data[:0]) == []
    for bad in (b"\xff\xff\xff\xff", b"\x00\x00\x00\x01\xc1"):  # errors keep no export either
        data = bytearray(bad)
        d = FrameDecoder()
        with pytest.raises(WireError):
            d.feed(data)
        data.extend(b"more")
        with pytest.raises(WireError):
            d.feed(data)


def test_rows_are_checked_across_chunks() -> None:
    rows = [row()] * 5000
    rows[4500] = row(dport="80")
    with pytest.raises(BadFrame, match="observation 4500 field 'dport' must be int, got str"):
        decode_all(body(batch_map(obs=rows)))
    rows[4500] = row()
    (b,) = decode_all(body(batch_map(obs=rows)))
    assert isinstance(b, Batch) and len(b.obs) == 5000 and b.obs[4999] == obs(1)[0]


# ---------------------------------------------------------------------------
# Property tests on the decoder

names = st.text(st.characters(codec="utf-8", categories=["L", "N", "P", "S", "Zs"]),
                min_size=1, max_size=12).filter(str.isprintable)
i64 = st.integers(-(1 << 63), (1 << 63) - 1)
small_bytes = st.binary(max_size=24)
observations = st.builds(
    lambda *f: Observation(*f),
    i64, i64, st.text(max_size=8), st.text(max_size=8), st.sampled_from(["", "nic", "pod"]),
    st.sampled_from(["", "in", "out"]), st.just("pkt"), st.integers(0, 255), small_bytes,
    small_bytes, st.integers(0, 65535), st.integers(0, 65535), st.integers(0, (1 << 32) - 1),
    st.integers(0, (1 << 32) - 1), st.integers(0, 255), st.integers(0, 65535),
    st.integers(-1, 65535), small_bytes, st.integers(-1, (1 << 24) - 1), small_bytes, small_bytes,
)
frames_st: st.SearchStrategy[Frame] = st.one_of(
    st.builds(Hello, names, names, st.binary(min_size=1, max_size=64), i64),
    st.builds(Welcome, st.text(max_size=20), st.integers(-1, 1 << 40), st.integers(1, MAX_FRAME)),
    st.builds(Batch, names, st.integers(0, (1 << 63) - 1), names, i64,
              st.lists(observations, max_size=4), st.lists(st.tuples(i64, i64), max_size=3),
              st.dictionaries(st.text(max_size=10), st.integers(0, 1 << 62), max_size=3)),
    st.builds(Ack, st.integers(-1, (1 << 63) - 1)),
    st.builds(ErrorFrame, st.sampled_from(["auth", "version", "bad-frame", "internal"]),
              st.text(max_size=40), st.integers(-1, 1 << 40)),
    st.builds(Bye, st.text(max_size=20)),
)


def chunks(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


def feed_all(d: FrameDecoder, parts: list[bytes]) -> list[Frame]:
    """Feed every part, checking the bound after each; stop at the first (wire) error."""
    out: list[Frame] = []
    for p in parts:
        try:
            out += d.feed(p)
        except WireError:
            assert d.buffered <= 4 + d.max_frame
            return out
        assert d.buffered <= 4 + d.max_frame
    with contextlib.suppress(WireError):
        d.eof()
    return out


PROPS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
caps = st.sampled_from([1, 7, 64, 300, HELLO_MAX_FRAME, MAX_FRAME])


@PROPS
@given(st.binary(max_size=600), st.lists(st.integers(0, 1 << 16), max_size=12), caps)
def test_arbitrary_bytes_raise_only_wire_errors_and_stay_bounded(
        data: bytes, cuts: list[int], cap: int) -> None:
    feed_all(FrameDecoder(cap), chunks(data, cuts))


@PROPS
@given(st.lists(st.binary(max_size=80), max_size=4), st.lists(st.integers(0, 1 << 16),
       max_size=8), caps)
def test_arbitrary_bodies_behind_valid_prefixes_raise_only_wire_errors(
        bodies: list[bytes], cuts: list[int], cap: int) -> None:
    data = b"".join(len(b).to_bytes(4, "big") + b for b in bodies)
    feed_all(FrameDecoder(cap), chunks(data, cuts))


scalars = (st.none() | st.booleans() | st.integers(-(1 << 63), (1 << 64) - 1) | st.floats()
           | st.text(max_size=8) | st.binary(max_size=8))
msgpack_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                                                                max_size=4),
    max_leaves=20,
)
fields = st.sampled_from(["v", "t", "agent", "node", "seq", "ts_real_ns", "obs", "clock",
                          "lost", "token", "started_ns", "acked", "max_frame", "code",
                          "message", "reason", "collector"])


@PROPS
@given(st.sampled_from(["hello", "welcome", "batch", "ack", "error", "bye", "x"]),
       st.dictionaries(fields, msgpack_values, max_size=8),
       st.lists(st.lists(scalars | st.lists(scalars, max_size=2), min_size=20, max_size=22),
                max_size=3))
def test_plausible_maps_raise_only_wire_errors(t: str, extra: dict[str, Any],
                                               rows: list[list[Any]]) -> None:
    m = {"v": 1, "t": t, "agent": "a", "node": "n", "seq": 1, "ts_real_ns": 1, "obs": rows}
    m.update(extra)
    with contextlib.suppress(WireError):
        decode_all(body(m))


codes = st.text(st.sampled_from("bBhHiIqQdfx"), min_size=21, max_size=21)


@PROPS
@given(st.lists(observations, max_size=5), st.data())
def test_plausible_v2_batches_raise_only_wire_errors_and_their_rows_build(
        rows: list[Observation], data: st.DataObject) -> None:
    """Columns, codes, tables and counts altered at random: a batch either is refused
    with a wire error or decodes to rows that build (later, in the collector) without one."""
    m: dict[str, Any] = msgpack.unpackb(encode_batch("a", 1, "n", 0, rows)[4:])
    for key in data.draw(st.lists(st.sampled_from(["n", "types", "cols", "strs", "addrs",
                                                   "blob", "one col"]), max_size=3)):
        if key == "n":
            m["n"] = data.draw(st.integers(-2, 8) | msgpack_values)
        elif key == "types":
            m["types"] = data.draw(codes | msgpack_values)
        elif key == "cols":
            m["cols"] = data.draw(st.lists(st.binary(max_size=40), min_size=20, max_size=22))
        elif key == "one col" and m["cols"]:  # of 21, or of what "cols" drew
            m["cols"][data.draw(st.integers(0, len(m["cols"]) - 1))] = data.draw(
                st.binary(max_size=40))
        elif key == "strs":
            m["strs"] = data.draw(st.lists(st.text(max_size=4) | st.binary(max_size=4),
                                           max_size=4))
        elif key == "addrs":
            m["addrs"] = data.draw(st.lists(st.binary(max_size=16), max_size=4))
        else:
            m["blob"] = data.draw(st.binary(max_size=64))
    try:
        (b,) = decode_all(body(m))
    except WireError:
        return
    assert isinstance(b, Batch) and len(list(b.obs)) == len(b.obs)
    assert all(type(o) is Observation and len(o) == 21 for o in b.obs)


@PROPS
@given(st.lists(st.tuples(st.sampled_from([ev.EV_PKT, ev.EV_KERNEL, ev.EV_STATE, ev.EV_NF,
                                           ev.EV_IPVS, 9]), st.integers(0, 9),
                          st.binary(max_size=24)), max_size=5),
       st.sets(st.integers(0, 4)), st.data())
def test_plausible_v3_batches_raise_only_wire_errors_and_their_rows_build(
        evs: list[tuple[int, int, bytes]], discard: set[int], data: st.DataObject) -> None:
    """Raw records and their tables altered at random: refused with a wire error, or
    decoded (later, in the collector) to rows without one, every record counted."""
    raw = raw_events([event(kind=k, ifindex=i, payload=p, aux_ns=i % 2) for k, i, p in evs],
                     discard=discard)
    m: dict[str, Any] = msgpack.unpackb(encode_batch("a", 1, "n", 0, [], raw=raw)[4:])
    for key in data.draw(st.lists(st.sampled_from(["recs", "cut", "ifaces", "header",
                                                   "layout"]), max_size=3)):
        r = m["raw"]
        if key == "recs":
            r["recs"] = data.draw(st.binary(max_size=200) | msgpack_values)
        elif key == "header" and type(r["recs"]) is bytes and len(r["recs"]) >= 8:
            at = data.draw(st.integers(0, len(r["recs"]) // 8 - 1)) * 8
            r["recs"] = r["recs"][:at] + data.draw(st.binary(min_size=4, max_size=4)) \
                + r["recs"][at + 4:]
        elif key == "ifaces":
            r["ifaces"] = data.draw(st.lists(st.tuples(st.integers(-1, 9), st.text(max_size=3),
                                                       st.sampled_from(["nic", "pod", "x"]))
                                             | msgpack_values, max_size=3))
        elif key == "cut":
            r["cut_mono_ns"] = data.draw(st.integers(-(1 << 63), (1 << 63) - 1) | msgpack_values)
        else:
            r["layout"] = data.draw(st.integers(0, 1 << 32) | msgpack_values)
    try:
        (b,) = decode_all(body(m))
    except WireError:
        return
    assert isinstance(b, Batch) and isinstance(b.obs, wire.RawObs)
    rows = list(b.obs)
    assert all(type(o) is Observation and len(o) == 21 for o in rows)
    kept = len(ringbuf.walk_records(b.obs.raw.records))
    writes = sum(o.kind == "write" for o in rows)
    assert len(rows) - writes + b.obs.bad == kept == wire.batch_size(b)


@PROPS
@given(st.lists(frames_st, min_size=1, max_size=5), st.lists(st.integers(0, 1 << 16),
       max_size=16))
def test_valid_frames_split_anywhere_decode_identically(frames: list[Frame],
                                                        cuts: list[int]) -> None:
    data = b"".join(encode(f) for f in frames)
    d = FrameDecoder()
    out: list[Frame] = []
    for part in chunks(data, cuts):
        out += d.feed(part)
        assert d.buffered <= 4 + MAX_FRAME
    d.eof()
    assert out == frames
    one_by_one = FrameDecoder()
    assert [f for i in range(len(data)) for f in one_by_one.feed(data[i:i + 1])] == frames


@PROPS
@given(st.lists(frames_st, min_size=1, max_size=3), st.data())
def test_corrupted_valid_streams_raise_only_wire_errors(frames: list[Frame],
                                                        data: st.DataObject) -> None:
    raw = bytearray(b"".join(encode(f) for f in frames))
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(raw)))
    feed_all(FrameDecoder(data.draw(caps)), [bytes(raw[:cut]), bytes(raw[cut:])])


# ---------------------------------------------------------------------------
# Tokens


def test_read_token(tmp_path: Path) -> None:
    p = tmp_path / "token"
    p.write_bytes(b"  " + TOKEN + b"\n\n")
    p.chmod(0o600)
    assert wire.read_token(p) == TOKEN
    p.chmod(0o400)
    assert wire.read_token(str(p)) == TOKEN


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o620, 0o602, 0o644])
def test_read_token_refuses_a_file_others_can_read(tmp_path: Path, mode: int) -> None:
    p = tmp_path / "token"
    p.write_bytes(TOKEN)
    p.chmod(mode)
    with pytest.raises(UsageError, match=f"accessible to group or others \\(mode {mode:04o}\\):"
                                         f" run `chmod 600 {p}`"):
        wire.read_token(p)


def test_read_token_refuses_missing_short_and_odd_files(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="No such file"):
        wire.read_token(tmp_path / "nope")
    p = tmp_path / "short"
    p.write_bytes(b"  abc \n")
    p.chmod(0o600)
    with pytest.raises(UsageError, match="holds 3 bytes, fewer than 16"):
        wire.read_token(p)
    big = tmp_path / "big"
    big.write_bytes(b"x" * 10000)
    big.chmod(0o600)
    with pytest.raises(UsageError, match="over 4096 bytes"):
        wire.read_token(big)
    d = tmp_path / "dir"
    d.mkdir(mode=0o700)
    with pytest.raises(UsageError):
        wire.read_token(d)


def test_token_check_is_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[bytes, bytes]] = []
    real = wire.hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return bool(real(a, b))

    monkeypatch.setattr(wire.hmac, "compare_digest", spy)
    wire.check_hello(Hello("a", "n", TOKEN, 1), TOKEN)
    with pytest.raises(AuthFailed, match="wrong token from agent 'a' on node 'n'"):
        wire.check_hello(Hello("a", "n", TOKEN[:-1] + b"X", 1), TOKEN)
    with pytest.raises(AuthFailed):
        wire.check_hello(Hello("a", "n", b"", 1), TOKEN)
    assert len(calls) == 3
    assert all(len(a) == len(b) == 32 for a, b in calls)  # digests: lengths do not leak


# ---------------------------------------------------------------------------
# asyncio streams


def run(coro: Coroutine[Any, Any, Any], timeout: float = 10.0) -> Any:
    return asyncio.run(asyncio.wait_for(coro, timeout))


def reader_with(data: bytes) -> asyncio.StreamReader:
    r = asyncio.StreamReader()
    r.feed_data(data)
    r.feed_eof()
    return r


def test_read_frame_and_truncation_at_eof() -> None:
    async def main() -> None:
        data = encode(Ack(3))
        r = reader_with(data + data[:-1])
        assert await wire.read_frame(r) == Ack(3)
        with pytest.raises(BadFrame, match=f"after {len(data) - 5} of {len(data) - 4} body"):
            await wire.read_frame(r)
        with pytest.raises(BadFrame, match="after 3 of 4 length-prefix bytes"):
            await wire.read_frame(reader_with(data[:3]))
        with pytest.raises(PeerClosed):
            await wire.read_frame(reader_with(b""))
        r = reader_with(b"\x7f\xff\xff\xff" + b"x" * 100)
        with pytest.raises(FrameTooLarge):
            await wire.read_frame(r)
        assert await r.read(10) == b"x" * 10  # the cap was checked before reading the body
        with pytest.raises(FrameTooLarge):
            await wire.read_frame(reader_with(encode(Ack(3))), max_frame=3)

    run(main())


# --- loopback collector and agent ----------------------------------------------


class Collector:
    def __init__(self, max_frame: int = MAX_FRAME, hello_timeout: float = 5.0) -> None:
        self.stored: list[Batch] = []
        self.seqs = SeqTracker()
        self.max_frame = max_frame
        self.hello_timeout = hello_timeout
        self.port = 0

    async def handle(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await wire.serve_agent(r, w, token=TOKEN, store=self.stored.append, seqs=self.seqs,
                               collector="c1", max_frame=self.max_frame,
                               hello_timeout=self.hello_timeout)


@asynccontextmanager
async def collector(ssl_ctx: ssl.SSLContext | None = None, max_frame: int = MAX_FRAME,
                    hello_timeout: float = 5.0) -> AsyncIterator[Collector]:
    c = Collector(max_frame, hello_timeout)
    server = await asyncio.start_server(c.handle, "127.0.0.1", 0, ssl=ssl_ctx)
    c.port = server.sockets[0].getsockname()[1]
    try:
        yield c
    finally:
        server.close()
        await server.wait_closed()


def hello(token: bytes = TOKEN, agent: str = "agent-node1") -> Hello:
    return Hello(agent, "node1", token, T0)


async def send_batches(r: asyncio.StreamReader, w: asyncio.StreamWriter,
                       seqs: list[int]) -> list[int]:
    acks = []
    for s in seqs:
        await wire.write_frame(w, encode_batch("agent-node1", s, "node1", T0 + s, obs(3),
                                               [(s, T0 + s)], {"ring": s}))
        a = await wire.read_frame(r)
        assert isinstance(a, Ack)
        acks.append(a.seq)
    return acks


async def session(port: int, ctx: ssl.SSLContext | None = None) -> None:
    kw: dict[str, Any] = {"ssl_context": ctx, "server_hostname": "localhost"} if ctx else {}
    r, w, welcome = await wire.open_agent_connection("127.0.0.1", port, hello(), **kw)
    assert welcome == Welcome("c1", -1, MAX_FRAME)
    assert await send_batches(r, w, [0, 1, 1, 0, 2]) == [0, 1, 1, 1, 2]  # replays: re-acked
    await wire.write_frame(w, Bye("done"))
    with pytest.raises(PeerClosed):
        await wire.read_frame(r)
    await wire.close_writer(w)
    # a reconnect learns what is stored, and duplicates stay duplicates
    r, w, welcome = await wire.open_agent_connection("127.0.0.1", port, hello(), **kw)
    assert welcome.acked == 2
    assert await send_batches(r, w, [2, 3]) == [2, 3]
    await wire.close_writer(w)


def check_stored(c: Collector) -> None:
    assert [b.seq for b in c.stored] == [0, 1, 2, 3]
    assert c.stored[1].obs == obs(3) and c.stored[1].lost == {"ring": 1}
    assert c.seqs.snapshot() == {"agent-node1": 3}


def test_loopback_hello_welcome_batch_ack(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "hopscope.collector.wire")

    async def main() -> None:
        async with collector() as c:
            await session(c.port)
        check_stored(c)

    run(main())
    assert "agent 'agent-node1' on 'node1' connected from 127.0.0.1:" in caplog.text
    assert "said bye: done" in caplog.text


def refusal(caplog: pytest.LogCaptureFixture) -> str:
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("refused")]
    assert len(lines) == 1, caplog.text
    return lines[0]


def test_loopback_wrong_token_is_refused(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        async with collector() as c:
            with pytest.raises(AuthFailed, match="the peer refused: wrong token"):
                await wire.open_agent_connection("127.0.0.1", c.port, hello(b"x" * 29))
        assert c.stored == []

    run(main())
    line = refusal(caplog)
    assert line.startswith("refused 127.0.0.1:")
    assert line.endswith("wrong token from agent 'agent-node1' on node 'node1'")
    assert TOKEN.decode() not in caplog.text


def test_loopback_wrong_version_is_refused(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        async with collector() as c:
            r, w = await asyncio.open_connection("127.0.0.1", c.port)
            w.write(body({"v": 4, "t": "hello", "agent": "a", "node": "n", "token": TOKEN,
                          "started_ns": 1}))
            f = await wire.read_frame(r)
            assert isinstance(f, ErrorFrame) and f.code == "version"
            with pytest.raises(BadVersion, match="schema version 4 is not supported"):
                raise wire.error_from_frame(f)
            with pytest.raises(PeerClosed):
                await wire.read_frame(r)
            await wire.close_writer(w)

    run(main())
    assert "schema version 4 is not supported (this side speaks 3)" in refusal(caplog)


@pytest.mark.parametrize(("garbage", "code", "logged"), [
    (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "too-large", "look like text: not a hopscope peer"),
    (b"\x00\x01\x00\x01" + b"\x00" * 8, "too-large", f"over the cap of {HELLO_MAX_FRAME}"),
    (b"\x00\x00\x00\x02\x93\x01", "bad-frame", "not valid msgpack"),
    (encode(Ack(1)), "bad-frame", "expected a hello frame first, got ack"),
    (b"\x00\x00\x10", "bad-frame", "after 3 of 4 length-prefix bytes"),
    (b"\x00\x00\x10\x00abc", "bad-frame", "after 3 of 4096 body bytes"),
])
def test_loopback_garbage_is_refused(caplog: pytest.LogCaptureFixture, garbage: bytes,
                                     code: str, logged: str) -> None:
    async def main() -> None:
        async with collector() as c:
            r, w = await asyncio.open_connection("127.0.0.1", c.port)
            w.write(garbage)
            w.write_eof()
            f = await wire.read_frame(r)
            assert isinstance(f, ErrorFrame) and f.code == code
            await wire.close_writer(w)

    run(main())
    assert logged in refusal(caplog)


def test_loopback_silent_peer_times_out(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        async with collector(hello_timeout=0.2) as c:
            r, w = await asyncio.open_connection("127.0.0.1", c.port)
            f = await wire.read_frame(r)
            assert isinstance(f, ErrorFrame) and f.code == "bad-frame"
            await wire.close_writer(w)

    run(main())
    assert "no hello within 0.2 s" in refusal(caplog)


def test_loopback_bad_batches_after_the_hello(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        async with collector(max_frame=2000) as c:
            r, w, welcome = await wire.open_agent_connection("127.0.0.1", c.port, hello())
            assert welcome.max_frame == 2000
            assert await send_batches(r, w, [5]) == [5]
            w.write(encode_batch("someone-else", 6, "node1", T0, obs(1)))
            f = await wire.read_frame(r)
            assert isinstance(f, ErrorFrame) and (f.code, f.seq) == ("bad-frame", 6)
            assert "not from this connection's agent 'agent-node1'" in f.message
            await wire.close_writer(w)

            r, w, _ = await wire.open_agent_connection("127.0.0.1", c.port, hello())
            w.write(encode_batch("agent-node1", 6, "node1", T0, obs(40)))
            f = await wire.read_frame(r)
            assert isinstance(f, ErrorFrame) and f.code == "too-large"
            assert isinstance(wire.error_from_frame(f), FrameTooLarge)
            await wire.close_writer(w)
        assert [b.seq for b in c.stored] == [5]

    run(main())
    assert "over the cap of 2000 bytes" in caplog.text


def test_async_store_and_two_connections_of_one_agent_store_once() -> None:
    stored: list[int] = []
    seqs = SeqTracker()

    async def slow_store(b: Batch) -> None:
        await asyncio.sleep(0.05)
        stored.append(b.seq)

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await wire.serve_agent(r, w, token=TOKEN, store=slow_store, seqs=seqs)

    async def main() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            conns = [await wire.open_agent_connection("127.0.0.1", port, hello())
                     for _ in range(2)]
            for _, w, _ in conns:  # the same batch on both, at once
                w.write(encode_batch("agent-node1", 0, "node1", T0, obs(1)))
            for r, w, _ in conns:
                assert await wire.read_frame(r) == Ack(0)
                await wire.close_writer(w)
        finally:
            server.close()
            await server.wait_closed()

    run(main())
    assert stored == [0]


def test_store_failure_closes_with_internal_error(caplog: pytest.LogCaptureFixture) -> None:
    def boom(b: Batch) -> None:
        raise RuntimeError("disk on fire")

    async def main() -> None:
        c = Collector()
        seqs = SeqTracker()

        async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            await wire.serve_agent(r, w, token=TOKEN, store=boom, seqs=seqs)

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            r, w, _ = await wire.open_agent_connection("127.0.0.1", port, hello())
            w.write(encode_batch("agent-node1", 0, "node1", T0, obs(1)))
            f = await wire.read_frame(r)
            assert f == ErrorFrame("internal", "internal error: see the collector's log", 0)
            await wire.close_writer(w)
        finally:
            server.close()
            await server.wait_closed()
        assert seqs.acked("agent-node1") == -1  # not stored: not acked
        assert c.stored == []

    run(main())
    assert "disk on fire" in caplog.text


# --- TLS -------------------------------------------------------------------------


def _pki_cryptography(d: Path) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def save(stem: str, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> None:
        (d / f"{stem}.key").write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))
        (d / f"{stem}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(name("hopscope test CA"))
          .issuer_name(name("hopscope test CA")).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(hours=1))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False,
                                       False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                         critical=False)
          .sign(ca_key, hashes.SHA256()))
    save("ca", ca_key, ca)
    for stem, eku in (("server", ExtendedKeyUsageOID.SERVER_AUTH),
                      ("client", ExtendedKeyUsageOID.CLIENT_AUTH)):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (x509.CertificateBuilder().subject_name(name(f"hopscope {stem}"))
                .issuer_name(ca.subject).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(hours=1))
                .not_valid_after(now + datetime.timedelta(days=1))
                .add_extension(x509.SubjectAlternativeName([
                    x509.DNSName("localhost"),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
                .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                    ca_key.public_key()), critical=False)
                .sign(ca_key, hashes.SHA256()))
        save(stem, key, cert)


def _pki_openssl(d: Path) -> None:
    def sh(*argv: str) -> None:
        subprocess.run(["openssl", *argv], cwd=d, check=True, capture_output=True, timeout=30)

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    sh("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "1",
       "-subj", "/CN=hopscope test CA",
       "-addext", "basicConstraints=critical,CA:TRUE",
       "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    for stem, eku in (("server", "serverAuth"), ("client", "clientAuth")):
        (d / f"{stem}.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n"
                                       f"extendedKeyUsage={eku}\n")
        sh("req", "-new", *ec, "-keyout", f"{stem}.key", "-out", f"{stem}.csr",
           "-subj", f"/CN=hopscope {stem}")
        sh("x509", "-req", "-in", f"{stem}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
           "-CAcreateserial", "-out", f"{stem}.pem", "-days", "1", "-extfile", f"{stem}.ext")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA, a server certificate (localhost, 127.0.0.1) and a client certificate.

    Made with the cryptography package when it is importable, else with the
    openssl command (HOPSCOPE_TEST_PKI=openssl forces it); skipped with neither.
    """
    d = tmp_path_factory.mktemp("pki")
    try:
        if os.environ.get("HOPSCOPE_TEST_PKI") == "openssl":
            raise ImportError
        import cryptography  # noqa: F401
    except ImportError:
        if not shutil.which("openssl"):
            pytest.skip("neither the cryptography package nor the openssl command is available")
        _pki_openssl(d)
    else:
        _pki_cryptography(d)
    return d


def test_loopback_tls(pki: Path) -> None:
    srv = wire.server_ssl_context(pki / "server.pem", pki / "server.key")
    cli = wire.client_ssl_context(pki / "ca.pem")

    async def main() -> None:
        async with collector(srv) as c:
            await session(c.port, cli)
        check_stored(c)

    run(main())


def test_loopback_mutual_tls(pki: Path, caplog: pytest.LogCaptureFixture) -> None:
    srv = wire.server_ssl_context(pki / "server.pem", pki / "server.key", ca=pki / "ca.pem")
    cli = wire.client_ssl_context(pki / "ca.pem", pki / "client.pem", pki / "client.key")
    anonymous = wire.client_ssl_context(pki / "ca.pem")
    untrusting = wire.client_ssl_context(pki / "client.pem")  # does not trust the server's CA

    async def main() -> None:
        async with collector(srv) as c:
            await session(c.port, cli)
            with pytest.raises((ssl.SSLError, ConnectionError, WireError)):
                await wire.open_agent_connection("127.0.0.1", c.port, hello(),
                                                 ssl_context=anonymous, timeout=5)
            with pytest.raises(ssl.SSLCertVerificationError):
                await wire.open_agent_connection("127.0.0.1", c.port, hello(),
                                                 ssl_context=untrusting, timeout=5)
        check_stored(c)

    run(main())


def test_tls_client_against_a_plain_collector_is_refused_with_a_hint(
        pki: Path, caplog: pytest.LogCaptureFixture) -> None:
    cli = wire.client_ssl_context(pki / "ca.pem")

    async def main() -> None:
        async with collector() as c:
            with pytest.raises((ssl.SSLError, ConnectionError, WireError)):
                await wire.open_agent_connection("127.0.0.1", c.port, hello(),
                                                 ssl_context=cli, timeout=5)
            for _ in range(100):  # the refusal is logged by the server's task
                if any(r.getMessage().startswith("refused") for r in caplog.records):
                    break
                await asyncio.sleep(0.02)

    run(main())
    assert "looks like a TLS handshake: is TLS on at one end only?" in refusal(caplog)


def test_tls_setup_errors_are_usage_errors(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="TLS server set-up"):
        wire.server_ssl_context(tmp_path / "missing.pem", tmp_path / "missing.key")
    with pytest.raises(UsageError, match="TLS client set-up"):
        wire.client_ssl_context(tmp_path / "missing-ca.pem")


@asynccontextmanager
async def serving(store: Any, seqs: SeqTracker) -> AsyncIterator[int]:
    """``serve_agent`` with this store on an ephemeral port of 127.0.0.1: the port."""
    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await wire.serve_agent(r, w, token=TOKEN, store=store, seqs=seqs)

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


def test_batches_are_handed_over_while_earlier_ones_are_stored_and_acked_in_order() -> None:
    """The store is called for batch N+1 while N is still in flight; whatever order the
    store finishes them in, they are committed and acked in seq order."""
    seqs = SeqTracker()
    handed: list[int] = []
    pending: dict[int, asyncio.Future[None]] = {}

    def store(b: Batch) -> asyncio.Future[None]:
        handed.append(b.seq)
        pending[b.seq] = asyncio.get_running_loop().create_future()
        return pending[b.seq]

    async def main() -> list[int]:
        async with serving(store, seqs) as port:
            r, w, _ = await wire.open_agent_connection("127.0.0.1", port, hello())
            for seq in range(3):
                w.write(encode_batch("agent-node1", seq, "node1", T0, obs(2)))
            while len(handed) < 3:  # all three handed over, none stored yet
                await asyncio.sleep(0.01)
            assert seqs.acked("agent-node1") == -1
            pending[2].set_result(None)
            pending[1].set_result(None)
            await asyncio.sleep(0.05)
            assert seqs.acked("agent-node1") == -1  # 1 and 2 wait for 0
            pending[0].set_result(None)
            acks = [await wire.read_frame(r) for _ in range(3)]
            await wire.close_writer(w)
            return [a.seq for a in acks if isinstance(a, Ack)]

    assert run(main()) == [0, 1, 2]
    assert handed == [0, 1, 2] and seqs.acked("agent-node1") == 2


def test_a_failed_batch_stops_the_ones_after_it(caplog: pytest.LogCaptureFixture) -> None:
    """Batch 0's store fails after 1's was handed over: 1 is not stored either (no hole
    behind the agent's seq), nothing is acked, the connection is refused."""
    seqs = SeqTracker()
    stored: list[int] = []
    gate: asyncio.Future[None] | None = None

    async def store(b: Batch) -> None:
        if b.seq == 0:
            assert gate is not None
            await gate
            raise RuntimeError("disk on fire")
        stored.append(b.seq)

    async def main() -> Any:
        nonlocal gate
        gate = asyncio.get_running_loop().create_future()
        async with serving(store, seqs) as port:
            r, w, _ = await wire.open_agent_connection("127.0.0.1", port, hello())
            for seq in range(2):
                w.write(encode_batch("agent-node1", seq, "node1", T0, obs(1)))
            await asyncio.sleep(0.1)
            gate.set_result(None)
            f = await wire.read_frame(r)
            await wire.close_writer(w)
            return f

    f = run(main())
    assert f == ErrorFrame("internal", "internal error: see the collector's log", 0)
    assert stored == [] and seqs.acked("agent-node1") == -1
    assert seqs.is_new("agent-node1", 0)  # withdrawn: sent again, it is new
    assert "disk on fire" in caplog.text
