"""Replay's plumbing: node naming, parallel sharding, the CLI's outputs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import hopscope.replay as rp
from hopscope.errors import UsageError

PCAPS = Path(__file__).resolve().parent.parent / "pcaps"
SETS = sorted(p.parent for p in PCAPS.glob("**/expected.json") if "bad" not in p.parts)


def test_node_names_from_stems_and_flags(tmp_path: Path) -> None:
    assert rp.node_files(["/x/node1.pcapng", "node2.pcap.gz"]) == [
        ("node1", Path("/x/node1.pcapng")), ("node2", Path("node2.pcap.gz"))]
    assert rp.node_files(["a.pcap"], ["hetzner1=/tmp/b.pcap"]) == [
        ("hetzner1", Path("/tmp/b.pcap")), ("a", Path("a.pcap"))]
    with pytest.raises(UsageError, match="two captures for node 'node1'"):
        rp.node_files(["a/node1.pcap", "b/node1.pcapng"])
    with pytest.raises(UsageError, match="NAME=FILE"):
        rp.node_files([], ["oops"])
    with pytest.raises(UsageError, match="no capture given"):
        rp.node_files([])


def test_plan_shards_spreads_jobs_over_big_files() -> None:
    big, small = 100 << 20, 1 << 10
    assert rp.plan_shards([big], 2) == [2]
    assert rp.plan_shards([big], 1) == [1]
    assert rp.plan_shards([small], 4) == [1]
    assert rp.plan_shards([big, big], 2) == [1, 1]
    assert rp.plan_shards([small, big], 3) == [1, 2]


@pytest.mark.parametrize("case", SETS, ids=[str(s.relative_to(PCAPS)) for s in SETS])
def test_parallel_replay_equals_serial(case: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    files = sorted(p for p in case.iterdir() if p.suffix in (".pcap", ".pcapng"))
    pairs = [(p.name.split(".")[0], p) for p in files]
    serial = rp.replay(pairs, jobs=1, progress=False).envelope
    monkeypatch.setattr(rp, "PARALLEL_MIN_BYTES", 0)  # split even these small files
    parallel = rp.replay(pairs, jobs=3, progress=False).envelope
    assert parallel == serial
    assert serial["requests"]


def test_cli_json_is_the_envelope_and_text_has_waterfalls() -> None:
    case = PCAPS / "cross-node-public"
    files = [str(p) for p in sorted(case.glob("*.pcapng"))]
    r = subprocess.run([sys.executable, "-m", "hopscope", "replay", "--json", *files],
                       capture_output=True, text=True, check=True)
    env = json.loads(r.stdout)
    assert set(env) == {"requests", "drops", "clock_offsets", "reference"}
    req = env["requests"][0]
    assert set(req) == {"request_id", "method", "path", "host", "status", "ingress_node",
                        "pod_node", "start_ns", "total_ns", "hops", "flags"}
    assert set(req["hops"][0]) == {"name", "dir", "node", "start_ns", "duration_ns", "children"}
    assert all(isinstance(h["duration_ns"], int) for h in req["hops"])
    r = subprocess.run([sys.executable, "-m", "hopscope", "replay", *files],
                       capture_output=True, text=True, check=True)
    assert req["request_id"] in r.stdout
    assert "Per-hop latency over" in r.stdout and "█" in r.stdout
    assert "Traceback" not in r.stderr
