"""`hopscope demo`, the README's first command, end to end (root)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from hopscope.demo import DEMO_PREFIX
from hopscope.testbed import netns

pytestmark = pytest.mark.privileged


def test_demo_runs_explains_and_leaves_nothing_behind() -> None:
    r = subprocess.run([sys.executable, "-m", "hopscope", "demo", "--requests", "60"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    out = r.stdout
    assert "Per-hop latency over" in out and "█" in out
    # the two faults, each found where it was injected
    assert "UFW's 20 ms hold on node2 shows up in `ingress`" in out
    assert "syn_unanswered   at node3/nic" in out
    assert "died at its NIC" in out
    assert netns.list_namespaces(DEMO_PREFIX) == []
