"""The live agent's shipping thread (``agent.run.LiveShip``) against a collector's wire end."""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
from pathlib import Path

import pytest
from hopscope.agent import run as agent_run
from hopscope.agent.run import LiveShip
from hopscope.agent.ship import ShipConfig
from hopscope.collector import wire

from hopscope.model import Observation, make_packet

TOKEN = b"s3cret-token-for-liveship-0123456789"
T0 = 1_764_000_000_000_000_000


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _obs(k: int) -> list[Observation]:
    return [make_packet(T0 + k * 1000 + i, "node1", "eth0", "10.0.0.1", 1000 + k, "10.0.0.2",
                        80, payload=b"x" * 400) for i in range(3)]


class Collector:
    """``wire.serve_agent`` on a port, in a thread: the batches it stored, in order."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.batches: list[wire.Batch] = []
        self.seqs = wire.SeqTracker()
        self._loop = asyncio.new_event_loop()
        self._up = threading.Event()
        self._stop: asyncio.Event | None = None
        self.t = threading.Thread(target=self._loop.run_until_complete, args=(self._main(),))

    async def _main(self) -> None:
        self._stop = asyncio.Event()

        async def conn(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            await wire.serve_agent(r, w, token=TOKEN, store=self.batches.append,
                                   seqs=self.seqs)

        server = await asyncio.start_server(conn, "127.0.0.1", self.port,
                                            limit=wire.STREAM_LIMIT)
        self._up.set()
        async with server:
            await self._stop.wait()

    def __enter__(self) -> Collector:
        self.t.start()
        assert self._up.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self.t.join(10)


def _cfg(port: int, spool: Path) -> ShipConfig:
    return ShipConfig(capture="", node="node1", host="127.0.0.1", port=port, token=TOKEN,
                      agent="liveship-test", spool_dir=str(spool), backoff_min=0.05,
                      backoff_max=0.2)


def _files(spool: Path) -> list[str]:
    """The batch files in the spool (none before the thread made it)."""
    return sorted(n for n in os.listdir(spool) if n.endswith(".hsb")) if spool.exists() else []


def test_batches_wait_on_disk_while_the_collector_is_away_then_all_arrive_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Away: the memory tier fills (a few batches) and the rest go to disk. Up: every batch
    arrives exactly once, in put order, and the spool is left empty."""
    monkeypatch.setattr(agent_run, "SPOOL_MEMORY", 8 << 10)  # a few batches' worth
    port = _free_port()
    spool = tmp_path / "spool"
    ship = LiveShip(_cfg(port, spool))
    sent: list[list[Observation]] = []
    for k in range(40):
        obs = _obs(k)
        sent.append(obs)
        ship.put(obs, [], {})
    deadline = time.monotonic() + 10
    while len(_files(spool)) < 20 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(_files(spool)) >= 20, _files(spool)  # spilled: the collector is away
    with Collector(port) as coll:
        for k in range(40, 60):  # more while it is up
            obs = _obs(k)
            sent.append(obs)
            ship.put(obs, [], {})
        ship.close()
    got = [list(b.obs) for b in coll.batches]
    assert got == sent
    assert [b.seq for b in coll.batches] == list(range(len(sent)))
    assert _files(spool) == [] and ship.dropped == 0


def test_with_the_collector_up_no_batch_touches_the_disk(tmp_path: Path) -> None:
    """The memory tier: a collector that acks means no spool file, ever (watched while the
    batches flow, not only at the end)."""
    port = _free_port()
    spool = tmp_path / "spool"
    seen: set[str] = set()
    with Collector(port) as coll:
        ship = LiveShip(_cfg(port, spool))
        for k in range(100):
            ship.put(_obs(k), [], {"tc_lost": 0})
            if k % 10 == 0:
                time.sleep(0.03)
            seen.update(_files(spool))
        ship.close()
    assert len(coll.batches) == 100 and not seen
    assert (spool / "last_seq").read_text().strip() == "99"
    assert coll.batches[-1].lost.get("tc_lost") == 0


def test_a_batch_put_after_the_thread_died_is_counted(tmp_path: Path) -> None:
    """The spool directory is unusable: the thread stops (logged), and batches put after
    that are counted as dropped instead of waiting for ever."""
    blocker = tmp_path / "file"
    blocker.write_text("x")
    ship = LiveShip(_cfg(_free_port(), blocker / "spool"))
    ship.t.join(10)
    ship.put(_obs(1), [], {}, None, 5)
    assert ship.dropped == 3 + 5
    ship.close()


def test_without_a_spool_directory_the_temporary_one_goes_with_the_agent(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No --spool: the spool lives in a temporary directory while shipping, removed at the
    stop (it had been left in /tmp by every run)."""
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    port = _free_port()
    with Collector(port) as coll:
        cfg = _cfg(port, tmp_path)
        cfg.spool_dir = None
        ship = LiveShip(cfg)
        ship.put(_obs(0), [], {})
        deadline = time.monotonic() + 10
        while not list(tmp_path.glob("hopscope-spool-*")) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert list(tmp_path.glob("hopscope-spool-*"))  # there while it runs
        ship.close()
    assert len(coll.batches) == 1
    assert not list(tmp_path.glob("hopscope-spool-*"))


def test_a_stop_with_the_collector_away_keeps_every_batch_in_the_spool(tmp_path: Path) -> None:
    """Stopped while the collector is away (and no reconnect is due before the drain's end):
    the batches memory held are written to the spool, said, and shipped by the next start,
    each once. (They had been lost: the stop's wait for the thread ran out first.)"""
    port = _free_port()
    spool = tmp_path / "spool"
    cfg = _cfg(port, spool)
    cfg.backoff_min = cfg.backoff_max = 60.0  # the next try lies past the drain
    ship = LiveShip(cfg)
    sent = [_obs(k) for k in range(10)]
    for obs in sent:
        ship.put(obs, [], {})
    ship.close()
    assert not ship.t.is_alive()
    assert ship.left == 10 and ship.kept_in == str(spool)
    assert len(_files(spool)) == 10  # memory written out at the stop
    with Collector(port) as coll:
        again = LiveShip(_cfg(port, spool))
        again.close()
    assert [list(b.obs) for b in coll.batches] == sent and again.left == 0
    assert _files(spool) == []
