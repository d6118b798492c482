"""`hopscope demo`, the README's first command, end to end (root)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import unique_prefix

from hopscope.testbed import build, netns

pytestmark = pytest.mark.privileged


@pytest.fixture
def prefix() -> Iterator[str]:
    """The demo's replica under a name of its own; removed whatever the demo did (a demo
    killed at the timeout leaves it)."""
    p = unique_prefix("d")
    try:
        yield p
    finally:
        build.down(p)


def test_demo_runs_explains_and_leaves_nothing_behind(tmp_path: Path, prefix: str) -> None:
    r = subprocess.run([sys.executable, "-m", "hopscope", "demo", "--requests", "60",
                        "--prefix", prefix, "--keep", str(tmp_path)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    out = r.stdout
    assert "Requests as stitched from the agents" in out
    assert "Per-hop latency over" in out and "█" in out
    # the two faults, each found where it was injected, and the agents' finer view
    assert "UFW's 20 ms hold on node2 shows up in `ingress`" in out
    assert "the agents put it in `kernel_in`" in out
    assert "  kernel_in" in out  # sub-hop rows in the waterfalls and the table
    assert "syn_unanswered      node3/nic" in out and "reason=NETFILTER_DROP" in out
    assert "died at its NIC" in out and "drop reason: NETFILTER_DROP" in out
    assert "by the rule ufw-user-input: " in out and "--dport 80 -j DROP." in out
    assert "Cross-check: the replay of the captures agrees with the agents on" in out
    assert netns.list_namespaces(prefix) == []
    # the agents detached: their logs end with what they sent and lost
    for n in ("node1", "node2", "node3"):
        log = (tmp_path / "agents" / f"agent-{n}.log").read_text()
        assert "detached; events" in log


def test_demo_json_has_both_envelopes(prefix: str) -> None:
    r = subprocess.run([sys.executable, "-m", "hopscope", "demo", "--requests", "10", "--json",
                        "--prefix", prefix], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(r.stdout)
    assert res["agents_error"] == ""
    live = {q["request_id"] for q in res["agents"]["requests"]}
    rep = {q["request_id"] for q in res["replay"]["requests"]}
    assert len(live) >= 15 and live == rep
