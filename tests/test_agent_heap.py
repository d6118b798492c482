"""The agent keeps the memory it frees for the next batch (``keep_heap``): allocating and
freeing blocks of a batch's size, over and over in a thread as the agent's shipping
thread does, then costs no page faults."""

from __future__ import annotations

import subprocess
import sys

CHILD = r"""
import resource, sys, threading
from hopscope.agent.run import keep_heap
if sys.argv[1] == "keep":
    keep_heap()
out = []
def work():
    for i in range(3):
        b = bytes(1 << 20); del b
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for i in range(200):  # a batch's records, then the frame made of them
        b = bytes(600_000 + (i % 7) * 100_000)
        c = bytearray(b)
        del b, c
    out.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
t = threading.Thread(target=work)
t.start()
t.join()
print(out[0])
"""


def _faults(mode: str) -> int:
    cp = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True,
                        timeout=120, check=True)
    return int(cp.stdout.split()[-1])


def test_freed_batches_are_reused_without_page_faults() -> None:
    default, kept = _faults("default"), _faults("keep")
    # by default most blocks are mapped afresh (or the heap's top given back): their pages
    # fault in again, up to 300 of them a block
    assert default > 20 * 200, default
    assert kept < default / 10 and kept < 2 * 200, (default, kept)
