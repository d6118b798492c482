"""Ring-buffer flood: every event generated is delivered or counted as lost, exactly."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.privileged

CHILD = r"""
import json, os
from hopscope.agent import bpfprog, events as ev
from hopscope.agent.ringbuf import RingReader
bpfprog.prepare_kernel_env()
s = bpfprog.Settings(ringbuf_pages=4)
prog = bpfprog.AgentProgram(s, source=bpfprog.BPF_DIR / "flood.c",
                            extra={"HS_FLOOD_TGID": os.getpid(), "HS_FLOOD_BURST": 64})
ring = RingReader(prog.ring_fd(), prog.ring_size)
delivered = 0
def count(buf, recs):
    global delivered
    for at, n in recs:
        assert n == ev.HDR_SIZE
        delivered += 1
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
                              "sent": st["flood_sent"], "lost": st["flood_lost"]}))
"""


def test_generated_equals_delivered_plus_lost() -> None:
    cp = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True,
                        timeout=120)
    line = next((ln for ln in cp.stdout.splitlines() if ln.startswith("RESULT ")), None)
    assert line is not None, cp.stderr[-2000:]
    r = json.loads(line[7:])
    assert r["lost"] > 0 and r["delivered"] > 0  # the buffer did overflow, and did deliver
    assert r["sent"] == r["delivered"]
    assert r["delivered"] + r["lost"] == r["generated"]
