"""Replay's plumbing: node naming, parallel sharding, the CLI's outputs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import click
import pytest

import hopscope.capture as capmod
import hopscope.replay as rp
import hopscope.stitch as stitch
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


def _by_id(reqs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(reqs, key=lambda r: (r["request_id"], r["start_ns"]))


@pytest.mark.parametrize("case", SETS, ids=[str(s.relative_to(PCAPS)) for s in SETS])
@pytest.mark.parametrize("jobs", [1, 3])
def test_streaming_join_equals_batch(case: Path, jobs: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Handing over every few packets and draining as we go gives the batch result."""
    files = sorted(p for p in case.iterdir() if p.suffix in (".pcap", ".pcapng"))
    pairs = [(p.name.split(".")[0], p) for p in files]
    batch = rp.replay(pairs, jobs=1, progress=False).envelope
    monkeypatch.setattr(rp, "TAKE_EVERY", 4)
    monkeypatch.setattr(rp, "PARALLEL_MIN_BYTES", 0)
    emitted: list[dict[str, Any]] = []
    res = rp.replay(pairs, jobs=jobs, progress=False, emit=emitted.append, stream=True)
    rest = list(res.envelope["requests"])
    assert _by_id(emitted + rest) == _by_id(batch["requests"])
    assert res.envelope["drops"] == batch["drops"]
    assert res.envelope["clock_offsets"] == batch["clock_offsets"]


def test_streaming_drains_before_the_end(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a long capture, requests come out while it is read and little stays pending."""
    case = PCAPS / "replica-clean"
    pairs = [(p.stem, p) for p in sorted(case.glob("*.pcapng"))]
    monkeypatch.setattr(rp, "TAKE_EVERY", 16)
    monkeypatch.setattr(capmod, "BLOCK", 8192)  # small batches from these small files
    monkeypatch.setattr(stitch, "LINGER_NS", 1_000_000)  # this capture spans seconds
    pending: list[int] = []
    orig = stitch.Stitcher.drain

    def spy(self: stitch.Stitcher, final: bool = False) -> list[dict[str, Any]]:
        out = orig(self, final)
        pending.append(len(self._clients))
        return out

    monkeypatch.setattr(stitch.Stitcher, "drain", spy)
    emitted: list[dict[str, Any]] = []
    res = rp.replay(pairs, jobs=1, progress=False, emit=emitted.append, stream=True)
    rest = list(res.envelope["requests"])
    assert len(emitted) > len(rest) and len(emitted) + len(rest) == 60
    assert max(pending) < 30


def test_workers_end_with_the_parent(tmp_path: Path) -> None:
    """kill -9 of `hopscope replay` leaves no worker behind."""
    import signal
    import time

    import psutil

    cap = tmp_path / "node1.pcapng"
    subprocess.run([sys.executable, str(PCAPS.parent / "bench" / "_gencap.py"), "--packets",
                    "60000", "-o", str(cap), "-q"], check=True, timeout=120)
    assert cap.stat().st_size >= rp.PARALLEL_MIN_BYTES
    proc = subprocess.Popen([sys.executable, "-m", "hopscope", "replay", "-j", "2", "--json",
                             str(cap)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        parent = psutil.Process(proc.pid)
        deadline = time.monotonic() + 20
        workers: list[psutil.Process] = []
        while len(workers) < 2 and time.monotonic() < deadline and proc.poll() is None:
            workers = parent.children()
            time.sleep(0.02)
        assert len(workers) == 2, "the replay ended before its workers were seen"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        _gone, alive = psutil.wait_procs(workers, timeout=10)
        assert not alive, alive
    finally:
        if proc.poll() is None:
            proc.kill()


def test_cli_loads_only_the_command_it_runs() -> None:
    """Every subcommand resolves to a command of its own name, and ``hopscope replay``
    imports neither the collector nor the agent (0.35 s of every start when it did)."""
    from hopscope import cli

    ctx = click.Context(cli.main)
    for name in cli.COMMANDS:
        cmd = cli.main.get_command(ctx, name)
        assert cmd is not None and cmd.name == name
    assert cli.main.list_commands(ctx) == sorted(cli.COMMANDS)
    probe = ("import sys; from hopscope import cli; import click; "
             "cli.main.get_command(click.Context(cli.main), 'replay'); "
             "print(sorted(m for m in sys.modules if m.startswith(('hopscope.collector', "
             "'hopscope.agent', 'hopscope.testbed', 'bcc', 'asyncio'))))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True).stdout
    assert json.loads(out.replace("'", '"')) == []


def _pure_ack(o: Any) -> bool:
    return o.plen == 0 and not o.flags & 0x07


@pytest.mark.parametrize("fmt", ["pcapng", "pcap"])
def test_replay_passes_over_pure_acks_but_the_handshakes(tmp_path: Path, fmt: str) -> None:
    """Replay's readers leave out pure ACKs (a third of the packets) but the first one after each
    SYN-ACK at each interface, and stitch exactly what they stitch with every packet."""
    from hopscope.capture import CaptureReader
    from hopscope.stitch import Stitcher

    cap = tmp_path / f"node1.{fmt}"
    subprocess.run([sys.executable, str(PCAPS.parent / "bench" / "_gencap.py"), "--packets",
                    "20000", "-o", str(cap), "-q", *(["--pcap"] if fmt == "pcap" else [])],
                   check=True, timeout=120)
    every = [o for b in CaptureReader(cap, "node1", directions=False) for o in b]
    fewer = [o for b in CaptureReader(cap, "node1", directions=False, pure_acks=False) for o in b]
    # the oracle: the same packets in the same order, without the pure ACKs nobody waits for
    want: set[tuple[object, ...]] = set()
    kept = []
    for o in every:
        if o.flags & 0x12 == 0x12 and o.plen == 0:
            want.add((o.ifname, o.vni, o.dst, o.dport, o.src, o.sport))
        if _pure_ack(o):
            k = (o.ifname, o.vni, o.src, o.sport, o.dst, o.dport)
            if k not in want:
                continue
            want.discard(k)
        kept.append(o)
    assert fewer == kept
    acks = sum(map(_pure_ack, every))
    assert acks > len(every) // 4 and sum(map(_pure_ack, fewer)) < acks // 5

    def stitched(obs: list[Any]) -> Any:
        st = Stitcher(["node1"])
        st.feed("node1", obs)
        return json.loads(json.dumps(st.result()))

    a, b = stitched(every), stitched(fewer)
    assert len(a["requests"]) > 500
    assert a == b
