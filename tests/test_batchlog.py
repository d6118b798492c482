"""The collector's raw batches: segment files, their rows, old stores, the writer thread."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hopscope.collector import wire
from hopscope.collector.batchlog import BatchLog, log_dir
from hopscope.collector.store import SqliteStore
from hopscope.collector.writer import BatchWriter

from hopscope.errors import WriterFailed
from hopscope.model import Observation, make_packet

T0 = 1_764_000_000_000_000_000


def obs(n: int, tag: int = 0) -> list[Observation]:
    return [make_packet(T0 + 1000 * i + tag, "node1", "eth0", "162.158.1.2", 40000 + i,
                        "178.104.247.152", 80, seq=i, ack=tag, payload=b"x" * (i % 50),
                        point="nic", direction="in", ip_id=i, ts_mono_ns=i)
            for i in range(n)]


def batch(seq: int, n: int = 20, agent: str = "a1", node: str = "node1") -> wire.Batch:
    """A batch as the collector decodes it off the wire (with its body)."""
    frame = wire.encode_batch(agent, seq, node, T0 + seq, obs(n, seq), [(1, T0)], {"ring": seq})
    b = wire.decode_body(frame[wire.HEADER_SIZE:])
    assert isinstance(b, wire.Batch) and b.body
    return b


def rows(b: wire.Batch) -> tuple[str, int, str, bytes]:
    return (b.agent, b.seq, b.node, b.body)


def test_segments_roll_read_back_and_a_second_writer_starts_its_own(tmp_path: Path) -> None:
    lg = BatchLog(tmp_path / "seg", segment_max=500)
    bodies = [bytes([i]) * (300 + i) for i in range(10)]
    where = [w for i in range(0, 10, 3) for w in lg.append(bodies[i:i + 3])]
    assert [n for _s, _o, n in where] == [len(b) for b in bodies]
    # a new segment once the one being written is past segment_max
    assert sorted({s for s, _o, _n in where}) == [1, 2, 3, 4]
    assert [lg.read(*w) for w in where] == bodies
    other = BatchLog(tmp_path / "seg")
    (s, o, n), = other.append([b"yz"])
    assert (s, o) == (5, 0) and other.read(s, o, n) == b"yz"
    assert lg.read(*where[0]) == bodies[0]  # readers of any instance
    with pytest.raises(OSError, match="wanted"):
        lg.read(5, 0, 3)
    lg.close()
    other.close()


def test_remove_unreferenced_keeps_what_rows_point_into_and_the_newest(tmp_path: Path) -> None:
    lg = BatchLog(tmp_path / "seg", segment_max=10)
    for i in range(4):
        lg.append([b"0123456789" + bytes([i])])
    assert lg.segments() == [1, 2, 3, 4]
    assert lg.remove_unreferenced({2}) == 2
    assert lg.segments() == [2, 4]  # 4: being written, never removed
    assert lg.size() == 22
    lg.close()


def test_store_keeps_bodies_in_segments_and_seqs_in_one_statement(tmp_path: Path) -> None:
    s = SqliteStore(tmp_path / "c.db")
    bs = [batch(i) for i in range(5)]
    s.put_batches([rows(b) for b in bs[:3]])
    s.put_batches([rows(bs[4]), rows(bs[3])])
    s.put_batches([rows(batch(1, n=3))])  # a duplicate: ignored, and the seq does not go back
    assert s.agent_seqs() == {"a1": 4}
    got = list(s.iter_batches())
    assert [(a, q, nd) for a, q, nd, _o in got] == [("a1", i, "node1") for i in range(5)]
    assert [o for *_x, o in got] == [b.obs for b in bs]
    assert log_dir(tmp_path / "c.db").is_dir()
    # the database holds where the bytes are, not the bytes
    assert s.db.execute("SELECT max(length(obs)) FROM batches").fetchone()[0] == 0
    assert s.used_bytes() > sum(len(b.body) for b in bs)
    s.close()


def test_prune_removes_old_batches_and_their_segments(tmp_path: Path) -> None:
    s = SqliteStore(tmp_path / "c.db")
    s.batch_log.segment_max = 1
    for i in range(4):
        s.put_batches([rows(batch(i))], received_ns=T0 + i)
    assert s.batch_log.segments() == [1, 2, 3, 4]
    s.prune(raw_max_age_ns=1)  # every batch is older than that
    assert s.db.execute("SELECT count(*) FROM batches").fetchone()[0] == 0
    assert s.batch_log.segments() == [4]  # the one being written stays
    assert s.agent_seqs() == {"a1": 3}  # the seq outlives its batches
    s.close()


def test_a_store_from_before_the_segment_files_reads_back(tmp_path: Path) -> None:
    db = tmp_path / "old.db"
    old = obs(3)
    con = sqlite3.connect(db)
    con.executescript("""
        CREATE TABLE agents (agent TEXT PRIMARY KEY, seq INTEGER NOT NULL);
        CREATE TABLE batches (agent TEXT NOT NULL, seq INTEGER NOT NULL, node TEXT NOT NULL,
            received_ns INTEGER NOT NULL, obs BLOB NOT NULL, PRIMARY KEY (agent, seq));
    """)
    con.execute("INSERT INTO batches VALUES ('a1', 0, 'node1', 1, ?)",
                (msgpack.packb(old, use_bin_type=True),))
    con.execute("INSERT INTO agents VALUES ('a1', 0)")
    con.commit()
    con.close()
    ro = SqliteStore(db, readonly=True)  # read-only: no columns added, still read
    assert [o for *_x, o in ro.iter_batches()] == [old]
    ro.close()
    s = SqliteStore(db)
    s.put_batches([rows(batch(1))])
    got = [o for *_x, o in s.iter_batches()]
    assert got == [old, batch(1).obs] and s.agent_seqs() == {"a1": 1}
    s.close()


def _collect(w: BatchWriter, bs: list[wire.Batch],
             submitted: threading.Event | None = None) -> list[BaseException | None]:
    results: list[BaseException | None] = []
    done = threading.Event()

    def cb(exc: BaseException | None) -> None:
        results.append(exc)
        if len(results) == len(bs):
            done.set()

    for b in bs:
        w.submit(b, cb)
    if submitted is not None:
        submitted.set()
    assert done.wait(30)
    return results


def test_writer_groups_batches_and_reports_each(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    db = tmp_path / "c.db"
    SqliteStore(db).close()
    # the first commit waits until all 40 are queued: those queued meanwhile are written
    # together, in one more commit (at most 64 a group)
    submitted = threading.Event()
    put = SqliteStore.put_batches

    def held(self: SqliteStore, rows: Any) -> None:
        assert submitted.wait(30)
        put(self, rows)

    monkeypatch.setattr(SqliteStore, "put_batches", held)
    w = BatchWriter(db)
    bs = [batch(i, n=200) for i in range(40)]
    assert _collect(w, bs, submitted) == [None] * 40
    w.close()
    assert w.batches == 40 and w.commits <= 2
    s = SqliteStore(db, readonly=True)
    assert [q for _a, q, _n, _o in s.iter_batches()] == list(range(40))
    s.close()
    with pytest.raises(Exception, match="closed"):
        w.submit(bs[0], lambda e: None)


def test_writer_retries_then_stops_for_good(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            caplog: pytest.LogCaptureFixture) -> None:
    db = tmp_path / "c.db"
    SqliteStore(db).close()
    calls: list[int] = []
    real = SqliteStore.put_batches

    def flaky(self: SqliteStore, batches: Any, received_ns: Any = None) -> None:
        calls.append(len(batches))
        if len(calls) in (1, 3, 4, 5, 6):  # the first once; the second for good (4 tries)
            raise sqlite3.OperationalError("database or disk is full")
        real(self, batches, received_ns)

    monkeypatch.setattr(SqliteStore, "put_batches", flaky)
    w = BatchWriter(db, retry_wait=0.01)
    assert _collect(w, [batch(0)]) == [None]  # failed once, stored on the retry
    res = _collect(w, [batch(1)])
    assert isinstance(res[0], WriterFailed) and "disk is full" in str(res[0])
    with pytest.raises(WriterFailed):  # nothing after it: no hole behind an agent's seq
        w.submit(batch(2), lambda e: None)
    w.close()
    assert calls == [1, 1, 1, 1, 1, 1]
    assert "event=batch_writer_failed" in caplog.text
    s = SqliteStore(db, readonly=True)
    assert s.agent_seqs() == {"a1": 0}
    s.close()


def test_writer_queue_future_in_the_event_loop(tmp_path: Path) -> None:
    db = tmp_path / "c.db"
    SqliteStore(db).close()
    w = BatchWriter(db)

    async def go() -> None:
        futs = [w.queue(batch(i)) for i in range(3)]
        await asyncio.gather(*futs)
        await w.queue(batch(3))

    asyncio.run(go())
    w.close()
    s = SqliteStore(db, readonly=True)
    assert s.agent_seqs() == {"a1": 3}
    s.close()


def _request(i: int) -> dict[str, Any]:
    return {"request_id": f"r{i:04d}", "start_ns": T0 + i, "total_ns": 1000, "status": 200,
            "path": "/api/tasks/", "ingress_node": "node1", "pod_node": "node2",
            "hops": [{"name": "ingress", "dir": "request", "node": "node1",
                      "duration_ns": 500}], "pad": "x" * 2000}


def _filled(path: Path) -> SqliteStore:
    """12 raw batches, a segment each (the oldest can go one by one), and 200 requests."""
    s = SqliteStore(path)
    s.batch_log.segment_max = 1
    for i in range(12):
        s.put_batches([rows(batch(i, n=200))], received_ns=T0 + i)
    s.put_requests([_request(i) for i in range(200)])
    return s


def test_prune_by_size_drops_the_oldest_batches_and_requests(tmp_path: Path) -> None:
    s = _filled(tmp_path / "c.db")
    before = s.used_bytes()
    assert 0 < s.batch_log.size() < before  # the segments count
    cap = before // 2
    deleted = s.prune(max_bytes=cap)
    assert s.used_bytes() <= cap, (s.used_bytes(), cap)
    kept = [q for _a, q, _n, _o in s.iter_batches()]
    assert kept and kept == list(range(12 - len(kept), 12))  # the newest stay
    assert len(s.batch_log.segments()) == len(kept)
    ids = [r["request_id"] for r in s.query_requests(limit=1000)]
    assert deleted == 200 - len(ids) and ids == sorted(ids)
    assert ids[-1] == "r0199"  # the oldest went first
    assert s.agent_seqs() == {"a1": 11}
    s.close()


def _counts(s: SqliteStore) -> tuple[int, int, int]:
    return tuple(s.db.execute(f"SELECT count(*) FROM {t}").fetchone()[0]  # type: ignore[return-value]
                 for t in ("requests", "hops", "batches"))


def test_a_prune_in_steps_holds_no_transaction_between_them(tmp_path: Path) -> None:
    """The collector runs a prune a step at a time, storing between two steps: each step
    deletes at most a chunk of a table's rows in its own transaction, another connection
    can write between two steps, and the end is what one prune leaves."""
    one = _filled(tmp_path / "one.db")
    cap = one.used_bytes() // 2
    deleted = one.prune(max_bytes=cap)
    s = _filled(tmp_path / "steps.db")
    other = SqliteStore(tmp_path / "steps.db")
    other.db.execute("PRAGMA busy_timeout=200")  # a transaction left open: 'locked', fast
    run = s.prune_steps(max_bytes=cap, chunk=7)
    before, steps = _counts(s), 0
    for _ in run:
        steps += 1
        now = _counts(s)
        gone = [b - a for b, a in zip(before, now, strict=True)]
        assert 0 <= gone[0] <= 7 and 0 <= gone[2] <= 7, gone  # requests, batches
        assert gone[1] == gone[0]  # each request's hop row went with it, no other
        other.put_offsets({"reference": "node1", "clock_offsets": {"node2": {
            "offset_ns": steps, "error_ns": 0}}})  # BEGIN IMMEDIATE: needs the lock
        before = now
    assert run.deleted == deleted > 7 and steps > deleted // 7
    assert s.used_bytes() <= cap
    assert ([r["request_id"] for r in s.query_requests(limit=1000)]
            == [r["request_id"] for r in one.query_requests(limit=1000)])
    assert ([q for _a, q, _n, _o in s.iter_batches()]
            == [q for _a, q, _n, _o in one.iter_batches()])
    for st in (one, s, other):
        st.close()
    # by age too: 12 raw batches, 5 a step
    s = _filled(tmp_path / "age.db")
    run = s.prune_steps(raw_max_age_ns=1, chunk=5)
    left = []
    for _ in run:
        left.append(_counts(s)[2])
    assert left[:3] == [7, 2, 0] and run.batches == 12 and run.deleted == 0
    s.close()


def test_a_dead_segment_being_written_does_not_prune_requests(tmp_path: Path) -> None:
    """The segment being written stays until the writer moves on, even when no row points
    into it any more: the size cap must not delete requests to make up for it."""
    s = SqliteStore(tmp_path / "c.db")
    for i in range(12):
        s.put_batches([rows(batch(i, n=200))], received_ns=T0 + i)
    s.put_requests([_request(i) for i in range(200)])
    s.prune(raw_max_age_ns=1)  # every batch goes; its segment, the one being written, stays
    assert s.db.execute("SELECT count(*) FROM batches").fetchone()[0] == 0
    (seg,) = s.batch_log.segments()
    dead = s.batch_log.size()
    assert dead > 0
    cap = s.used_bytes() - dead // 2  # over the cap only because of the dead segment
    assert s.prune(max_bytes=cap) == 0
    assert s.count_requests() == 200
    # the writer moves on: a new segment, and the dead one goes
    s.batch_log.segment_max = 1
    s.put_batches([rows(batch(12, n=2))], received_ns=T0 + 12)
    s.put_batches([rows(batch(13, n=2))], received_ns=T0 + 13)
    s.prune()
    assert seg not in s.batch_log.segments()
    s.close()


def test_raw_batches_go_with_the_retention_when_it_is_shorter(tmp_path: Path) -> None:
    """Else a restart would stitch again, count and export again the requests that
    retention deleted."""
    s = SqliteStore(tmp_path / "c.db")
    now = time.time_ns()
    s.put_batches([rows(batch(0, n=2))], received_ns=now - 120 * 10**9)
    s.put_batches([rows(batch(1, n=2))], received_ns=now)
    s.prune(max_age_ns=60 * 10**9, raw_max_age_ns=900 * 10**9)
    assert [q for _a, q, _n, _o in s.iter_batches()] == [1]
    s.close()


def test_a_large_group_is_stored_in_one_transaction(tmp_path: Path) -> None:
    s = SqliteStore(tmp_path / "c.db")
    b = batch(0, n=2)
    s.put_batches([("a1", i, "node1", b.body) for i in range(600)])  # > one INSERT's rows
    assert s.agent_seqs() == {"a1": 599}
    assert s.db.execute("SELECT count(*) FROM batches").fetchone()[0] == 600
    s.close()
