"""hopscope.memtrim: freed memory that glibc kept between live allocations goes back to
the kernel (what the agent and the collector do every minute)."""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest

CHILD = r"""
import json
from hopscope import memtrim

def anon_kb():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1])

big, keep = [], []
for i in range(300):  # 100 KB blocks from the heap, each pinned in by a small one after it
    big.append(bytes(100_000) + bytes([i % 256]))
    keep.append(bytes(2_000) + bytes([i % 256]))
big.clear()  # 30 MB free inside the heap, below the pinned blocks: not returned by free()
before = anon_kb()
ns = memtrim.trim()
print(json.dumps({"before": before, "after": anon_kb(), "ns": ns, "kept": len(keep)}))
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc_trim is glibc's")
def test_trim_returns_the_free_memory_inside_the_heap() -> None:
    cp = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True,
                        timeout=60, check=True)
    r = json.loads(cp.stdout)
    assert r["ns"] > 0
    assert r["before"] - r["after"] > 20_000, r  # kB: most of the 30 MB freed
