#!/usr/bin/env python3
"""What one run of the agent's tc classifier costs, path by path, beside an empty one.

``bench/agent_overhead.py`` measures the programs in the replica at saturation
(``kernel.bpf_stats_enabled``): an average over every packet, with the
packets' cache misses, the other programs and this VM's steal time in it.
This bench isolates the programs themselves: ``BPF_PROG_TEST_RUN`` runs
``hs_tc_ingress``/``hs_tc_egress`` (``bpf/tc.c``, loaded with the agent's own
settings by :class:`~hopscope.agent.bpfprog.AgentProgram`) on crafted frames,
``--repeat`` times in the kernel per call, and reports the kernel's own
average per run, the best of ``--calls`` calls. Beside it, in the same run,
an empty classifier (``bench/_noop_tc.py``: two instructions) on the same
frames: the floor of the test-run harness itself. Nothing is attached to any interface; the
interface-role map gets one entry for the loopback device's index (the
test run's skb is on ``lo``), set per case.

Paths (what ``bpf/tc.c`` does with each frame):

* ``not IPv4``: an ARP frame, the first test;
* ``UDP``: IPv4 but neither TCP nor VXLAN;
* ``pure ACK``: TCP without payload, no handshake waiting for it;
* ``body segment``: TCP payload that does not start a message, flow not followed;
* ``SYN``: a control segment, sent to user space without payload;
* ``start 60 B`` / ``start 560 B``: a segment that starts an HTTP message, sent with
  its payload (a head that ends in it: no follow-up expected);
* ``start, head open``: a start whose head does not end in the segment (the flow
  is followed: an update of the ``follow`` LRU hash; and no blank line in it, so the
  head cut scans all of it);
* ``VXLAN start 560 B`` (underlay role): the same start inside VXLAN;
* ``response, head + body``: a response whose 110-byte head and 490 bytes of body share
  the segment (the replica's responses look so), on the way out: sent with its head (the
  blank line found by ``hs_head_len``'s scan from both ends, the body cut off);
* ``response, body past cap``: the same with 1,301 bytes of body, more than the 1,023
  bytes of the classifier's first look (the replica's task lists);
* ``POST, head + body``: a 580-byte request head and a 90-byte body (the replica's
  POSTs): the blank line near the end.

Needs root and bcc (as the agent). ``--json`` prints the results as JSON.

    python bench/tc_paths.py
    python bench/tc_paths.py --repeat 2000 --calls 7
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import _noop_tc  # bench/, beside this script (the same empty classifier as agent_overhead's)
from hopscope.agent import bpfprog, bpfsys


def test_run(fd: int, frame: bytes, repeat: int) -> tuple[int, int]:
    """(the program's return value, its average ns per run) over ``repeat`` runs."""
    return bpfsys.prog_test_run(fd, frame, repeat)


def frames() -> list[tuple[str, int, str, bytes]]:
    """(path, interface role, direction, frame)."""
    from scapy.layers.inet import IP, TCP, UDP
    from scapy.layers.l2 import ARP, Ether
    from scapy.layers.vxlan import VXLAN

    eth = Ether(dst="02:00:00:00:00:01", src="02:00:00:00:00:02")
    ip = IP(src="162.158.1.2", dst="178.104.247.152")
    small = b"GET /healthz HTTP/1.1\r\nHost: api.example.com\r\nAccept: */*\r\n\r\n"[:60]
    small = small[:-4] + b"\r\n\r\n"
    big = (b"POST /api/tasks/ HTTP/1.1\r\nHost: api.example.com\r\nCf-Ray: 8f3a6b2c1d4e5f60-FRA"
           b"\r\nX-Forwarded-For: 203.0.113.7\r\n" + b"X-Pad: " + b"a" * 420 + b"\r\n\r\n")[:560]
    big = big[:-4] + b"\r\n\r\n"
    open_head = big[:-4] + b"\r\nX-"
    post = big[:-4] + b"\r\nContent-Length: 90\r\n\r\n" + b'{"title": "' + b"t" * 77 + b'"}'
    response = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 490\r\n"
                b"X-Served-By: api-3@node3\r\n\r\n" + b"[" + b"1," * 244 + b"1]")
    long_body = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 1301"
                 b"\r\nX-Served-By: api-3@node3\r\n\r\n" + b"[" + b"1," * 649 + b"1]")
    nic, underlay = bpfprog.ROLE_CODES["nic"], bpfprog.ROLE_CODES["underlay"]

    def tcp(sport: int, flags: str, payload: bytes = b"", seq: int = 1000) -> bytes:
        return bytes(eth / ip / TCP(sport=sport, dport=80, flags=flags, seq=seq, ack=5)
                     / payload)

    inner = (Ether(dst="0a:00:00:00:00:01", src="0a:00:00:00:00:02")
             / IP(src="10.42.0.0", dst="10.42.1.17") / TCP(sport=41000, dport=8000, flags="PA")
             / big)
    vx = bytes(eth / IP(src="10.0.0.1", dst="10.0.0.2") / UDP(sport=33000, dport=8472)
               / VXLAN(vni=1, flags=0x08) / inner)
    return [
        ("not IPv4", nic, "in", bytes(eth / ARP())),
        ("UDP", nic, "in", bytes(eth / ip / UDP(sport=53, dport=53) / (b"x" * 40))),
        ("pure ACK", nic, "in", tcp(40000, "A")),
        ("body segment", nic, "in", tcp(40001, "PA", b"x" * 1400)),
        ("SYN", nic, "in", tcp(40002, "S")),
        ("start 60 B", nic, "in", tcp(40003, "PA", small)),
        ("start 560 B", nic, "in", tcp(40004, "PA", big)),
        ("start, head open", nic, "in", tcp(40005, "PA", open_head)),
        ("VXLAN start 560 B", underlay, "in", vx),
        ("response, head + body", nic, "out", tcp(40006, "PA", response)),
        ("response, body past cap", nic, "out", tcp(40007, "PA", long_body)),
        ("POST, head + body", nic, "in", tcp(40008, "PA", post)),
    ]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--repeat", type=int, default=500, help="runs per test-run call (500)")
    ap.add_argument("--calls", type=int, default=5, help="calls per path; the best counts (5)")
    ap.add_argument("--json", action="store_true", help="also print JSON on stdout")
    a = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("tc_paths: needs root (it loads BPF programs)", file=sys.stderr)
        return 2
    bpfprog.prepare_kernel_env()
    # a ring large enough that no run of this bench finds it full (a full ring is
    # the cheap path: the reserve fails and a counter goes up)
    pages = 1 << max(10, (a.repeat * a.calls * 12 * 1100 // 4096).bit_length())
    prog = bpfprog.AgentProgram(bpfprog.Settings(ringbuf_pages=pages))
    tc_in, tc_out = prog._tc_fds()
    noop_fd = _noop_tc.load()
    roles = prog._maps["ifroles"]
    lo = 1  # the test run's skb device
    rows: list[dict[str, Any]] = []
    for name, role, d, frame in frames():
        roles.set(lo, role)
        fd = tc_in if d == "in" else tc_out
        before = prog.stats()
        best = base = 1 << 62
        for _ in range(a.calls):
            rv, ns = test_run(fd, frame, a.repeat)
            if rv != 0:  # TC_ACT_OK: every frame passes unchanged
                raise SystemExit(f"{name}: the classifier returned {rv}, not TC_ACT_OK")
            best = min(best, ns)
            base = min(base, test_run(noop_fd, frame, a.repeat)[1])
        after = prog.stats()
        sent = after["tc_sent"] - before["tc_sent"]
        lost = after["tc_lost"] - before["tc_lost"]
        rows.append({"path": name, "program": f"hs_tc_{'ingress' if d == 'in' else 'egress'}",
                     "frame_bytes": len(frame), "ns_per_run": best, "noop_ns": base,
                     "over_noop_ns": best - base, "events_per_run": sent / (a.calls * a.repeat),
                     "lost": lost})
    roles.set(lo, 0)  # an array: back to "no role"
    out = sys.stderr if a.json else sys.stdout
    print(f"BPF_PROG_TEST_RUN, {a.repeat} runs per call, best of {a.calls}; kernel"
          f" {os.uname().release}; ring {pages} pages", file=out)
    print(f"{'path':20} {'program':14} {'bytes':>6} {'ns/run':>7} {'noop ns':>8}"
          f" {'over noop':>10} {'x noop':>7} {'events/run':>11} {'lost':>5}", file=out)
    for r in rows:
        print(f"{r['path']:20} {r['program']:14} {r['frame_bytes']:6} {r['ns_per_run']:7}"
              f" {r['noop_ns']:8} {r['over_noop_ns']:10} {r['ns_per_run'] / max(1, r['noop_ns']):7.1f}"
              f" {r['events_per_run']:11.2f} {r['lost']:5}", file=out)
    if a.json:
        json.dump({"repeat": a.repeat, "calls": a.calls, "kernel": os.uname().release,
                   "rows": rows}, sys.stdout, indent=2)
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
