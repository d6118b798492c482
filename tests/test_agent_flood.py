"""Ring-buffer flood: every event generated is delivered or counted as lost, exactly,
whether the records are decoded from the ring (``drain``) or copied out raw (``take``, what
the agent ships to the collector: wire v3)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.privileged

CHILD = r"""
import json, os, sys
from hopscope.agent import bpfprog, events as ev
from hopscope.agent.ringbuf import RingReader, walk_records
bpfprog.prepare_kernel_env()
s = bpfprog.Settings(ringbuf_pages=4)
prog = bpfprog.AgentProgram(s, source=bpfprog.BPF_DIR / "flood.c",
                            extra={"HS_FLOOD_TGID": os.getpid(), "HS_FLOOD_BURST": 64})
ring = RingReader(prog.ring_fd(), prog.ring_size)
delivered = 0
marked = 0
nbytes = 0  # ring bytes of the records delivered: headers and padding included
seqs = []
def count(buf, recs):
    global delivered, nbytes
    for at, n in recs:
        assert n == ev.HDR_SIZE
        seqs.append(ev.EVENT.unpack_from(buf, at)[4])
        delivered += 1
        nbytes += (n + 8 + 7) & ~7
def take(ring):
    global marked
    while True:  # small copies: the byte cap splits the ring's contents
        blob, n, kinds = ring.take(1 << 16, ev.KIND_AT, frozenset({ev.EV_PKT}), 4096)
        if not n:
            return
        assert len(blob) <= 4096 and len(walk_records(blob)) == n
        marked += len(kinds)
        count(blob, walk_records(blob))
if sys.argv[1] == "take":
    ring.drain = lambda handle: take(ring)
calls = 0
for round_ in range(40):
    for _ in range(25):   # 25 * 64 events of 72 (+8) bytes into 16 KiB: most are lost
        os.getpid()
        calls += 1
    if round_ % 2:
        ring.drain(count)  # sometimes drain, sometimes let it overflow
ring.drain(count)
st = prog.stats()
prog.close()
print("RESULT " + json.dumps({"generated": calls * 64, "delivered": delivered,
                              "sent": st["flood_sent"], "lost": st["flood_lost"],
                              "marked": marked, "consumed": ring.consumed, "bytes": nbytes,
                              "bursts_in_order": all(
                                  (b - a) % 64 == 1 or b == 0 for a, b in zip(seqs, seqs[1:]))}))
"""


@pytest.mark.parametrize("how", ["drain", "take"])
def test_generated_equals_delivered_plus_lost(how: str) -> None:
    cp = subprocess.run([sys.executable, "-c", CHILD, how], capture_output=True, text=True,
                        timeout=120)
    line = next((ln for ln in cp.stdout.splitlines() if ln.startswith("RESULT ")), None)
    assert line is not None, cp.stderr[-2000:]
    r = json.loads(line[7:])
    assert r["lost"] > 0 and r["delivered"] > 0  # the buffer did overflow, and did deliver
    assert r["sent"] == r["delivered"]
    assert r["delivered"] + r["lost"] == r["generated"]
    assert r["bursts_in_order"]  # each record read once, in the order written
    assert r["consumed"] == r["bytes"] > 0  # what the agent's loop paces itself by
    if how == "take":
        assert r["marked"] == r["delivered"]  # every record's kind byte was looked at
