#!/usr/bin/env python3
"""Wire codec speed: hopscope's batch encoder and frame decoder beside a bare msgpack loop.

Observations per second, the same observations in both schema versions
(v2: by column, what agents write; v1: one row per observation), best of
``--repeat`` runs:

* ``encode v2`` / ``v1``: :func:`hopscope.collector.wire.encode_batch`,
  every batch (framed bytes), ``check=True`` as an agent encodes;
* ``decode v2`` / ``v1``: :class:`~hopscope.collector.wire.FrameDecoder` fed
  the whole stream in 64 KiB reads (as from a socket): framing, msgpack,
  the checks (v2: every column's code, length and indexes; v1: every field
  of every row), and for v1 the Observation tuples (v2 builds them on first
  use); each batch is dropped once decoded, as the bare loops drop theirs;
* ``  of which row checks``: v1's :func:`~hopscope.collector.wire.check_rows` alone;
* ``decode v2/v1, keeping all``: the same, but every Observation is built
  and kept (as a collector keeps them until stitched). Slower because of
  the cyclic garbage collector: Observation is a tuple *subclass*, which
  CPython never untracks, so every collection of an older generation walks
  all of them;
* ``bare Unpacker v2``, ``v1 (lists)``: ``msgpack.Unpacker()`` iterated
  over the same bodies (the length prefixes stripped), building Python
  objects and nothing else; ``(tuples)``: with ``use_list=False``, as the
  decoder unpacks.

Target: decode >= 500k observations/s.

    python bench/wire_codec.py                     # 100k observations, batches of 1,000
    python bench/wire_codec.py --batch 5000 --repeat 9
"""

from __future__ import annotations

import argparse
import gc
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path

import msgpack

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hopscope.collector.wire import Batch, FrameDecoder, check_rows, encode_batch

from hopscope.model import ACK, PSH, Observation, make_packet

T0 = 1_764_000_000_000_000_000


def observations(n: int, seed: int = 1) -> list[Observation]:
    """One busy ingress node: ACKs, request headers (some payload), VXLAN copies."""
    rnd = random.Random(seed)
    ifaces = ("eth0", "flannel.1", "cni0", "veth3a1f2b")
    headers = (b"GET /api/v1/items?page=2 HTTP/1.1\r\nHost: api.example.com\r\nCF-Ray: "
               b"8f3a9c2d1e4b5a6c-FRA\r\nUser-Agent: Mozilla/5.0\r\nAccept: */*\r\n\r\n")
    out = []
    t = T0
    for i in range(n):
        t += rnd.randrange(1, 20_000)
        iface = ifaces[i % 4]
        payload = headers[: rnd.randrange(60, len(headers))] if i % 5 == 0 else b""
        vx = iface == "eth0" and i % 8 == 0
        out.append(make_packet(
            t, "node1", iface, f"162.158.{i % 200}.{i % 250}", 30000 + i % 30000,
            "178.104.247.152", 80, seq=rnd.getrandbits(32), ack=rnd.getrandbits(32),
            flags=ACK | (PSH if payload else 0), payload=payload, point="", direction="in",
            ip_id=i & 0xFFFF, vni=1 if vx else -1, outer_src="178.104.247.152" if vx else b"",
            outer_dst="178.104.247.153" if vx else b"", ts_mono_ns=t - T0 + 5_000_000_000))
    return out


def best(fn: Callable[[], object], repeat: int) -> float:
    b = float("inf")
    for _ in range(repeat):
        gc.collect()
        t0 = time.perf_counter()
        fn()
        b = min(b, time.perf_counter() - t0)
    return b


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--observations", type=int, default=100_000)
    ap.add_argument("--batch", type=int, default=1000, help="observations per batch frame")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--read", type=int, default=64 << 10, help="bytes per feed() (socket read)")
    a = ap.parse_args(argv)

    obs = observations(a.observations)
    n = len(obs)
    parts = [obs[i:i + a.batch] for i in range(0, n, a.batch)]

    def enc(version: int) -> Callable[[], list[bytes]]:
        def run() -> list[bytes]:
            return [encode_batch("agent-node1", s, "node1", T0, p, [(5, T0)], {"ring": 0},
                                 version=version, check=True) for s, p in enumerate(parts)]
        return run

    frames = {v: enc(v)() for v in (1, 2)}
    streams = {v: b"".join(f) for v, f in frames.items()}
    bodies = {v: b"".join(x[4:] for x in f) for v, f in frames.items()}
    reads = {v: [st[i:i + a.read] for i in range(0, len(st), a.read)]
             for v, st in streams.items()}

    def dec(version: int, keep: bool = False) -> Callable[[], list[Observation] | int]:
        def run() -> list[Observation] | int:
            d = FrameDecoder()
            k = 0
            got: list[Observation] = []
            for r in reads[version]:
                for f in d.feed(r):
                    assert isinstance(f, Batch)
                    if keep:
                        got += f.obs  # v2: builds the rows
                    else:
                        k += len(f.obs)
            d.eof()
            return got if keep else k
        return run

    row_sets = [msgpack.unpackb(f[4:], use_list=False)["obs"] for f in frames[1]]

    def checks() -> None:
        for rows in row_sets:
            check_rows(rows)

    def bare(version: int, use_list: bool) -> Callable[[], None]:
        def run() -> None:
            u = msgpack.Unpacker(use_list=use_list, max_buffer_size=len(bodies[version]))
            u.feed(bodies[version])
            for _ in u:
                pass
        return run

    for v in (1, 2):
        assert dec(v, keep=True)() == obs and dec(v)() == n, f"v{v} round trip failed"

    rows = [
        ("encode v2", best(enc(2), a.repeat)),
        ("encode v1", best(enc(1), a.repeat)),
        ("decode v2", best(dec(2), a.repeat)),
        ("decode v2, keeping all", best(dec(2, keep=True), a.repeat)),
        ("decode v1", best(dec(1), a.repeat)),
        ("  of which row checks", best(checks, a.repeat)),
        ("decode v1, keeping all", best(dec(1, keep=True), a.repeat)),
        ("bare Unpacker v2", best(bare(2, False), a.repeat)),
        ("bare Unpacker v1 (lists)", best(bare(1, True), a.repeat)),
        ("bare Unpacker v1 (tuples)", best(bare(1, False), a.repeat)),
    ]
    secs = dict(rows)
    print(f"{n:,} observations in {len(frames[2])} batches of {a.batch:,}; on the wire"
          f" {len(streams[2]):,} bytes as v2 ({len(streams[2]) / n:.1f} per observation),"
          f" {len(streams[1]):,} as v1 ({len(streams[1]) / n:.1f}); best of {a.repeat};"
          f" Python {sys.version.split()[0]}, msgpack {msgpack.version}")
    print(f"{'':26} {'seconds':>9} {'obs/s':>12}")
    for name, s in rows:
        print(f"{name:26} {s:9.4f} {n / s:12,.0f}")
    for v in (2, 1):
        print(f"decode v{v} speed / bare Unpacker v1 (tuples) speed:"
              f" {secs['bare Unpacker v1 (tuples)'] / secs[f'decode v{v}']:.2f}")
    for what in ("encode v{}", "decode v{}", "decode v{}, keeping all"):
        k2, k1 = what.format(2), what.format(1)
        print(f"{k2} / {k1} speed: {secs[k1] / secs[k2]:.2f}")
    ok = n / secs["decode v2"] >= 500_000
    print(f"target decode >= 500,000 obs/s: {'met' if ok else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
