"""The agent's on-disk spool: order, ack, restart, caps, corrupt files."""

from __future__ import annotations

import logging
import os
import stat
import tempfile
from pathlib import Path

import pytest
from hopscope.collector.spool import HEADER_SIZE, Spool
from hopscope.collector.wire import Batch, FrameDecoder, encode_batch
from hypothesis import given, settings
from hypothesis import strategies as st

from hopscope.errors import SpoolError
from hopscope.model import make_packet


def frame(seq: int, n: int = 2) -> bytes:
    obs = [make_packet(1_764_000_000_000_000_000 + i, "node1", "eth0", "1.2.3.4", 1000 + i,
                       "5.6.7.8", 80, payload=b"x" * (seq % 7)) for i in range(n)]
    return encode_batch("agent-node1", seq, "node1", seq, obs)


def test_order_and_exact_bytes(tmp_path: Path) -> None:
    with Spool(tmp_path / "s") as sp:
        frames = {s: frame(s) for s in (3, 4, 10, 11, 250)}
        for s, f in frames.items():
            assert sp.append(s, f)
        assert list(sp) == list(frames.items())
        assert len(sp) == 5 and sp.first_seq == 3 and sp.last_seq == 250
        assert sp.nbytes == sum(HEADER_SIZE + len(f) for f in frames.values())
        # what comes out is a frame stream the collector decodes, in order
        got = FrameDecoder().feed(b"".join(f for _, f in sp))
        assert [b.seq for b in got if isinstance(b, Batch)] == [3, 4, 10, 11, 250]


def test_seqs_must_increase(tmp_path: Path) -> None:
    with Spool(tmp_path) as sp:
        sp.append(5, b"a")
        with pytest.raises(SpoolError, match="seq 5 is not above the last one"):
            sp.append(5, b"b")
        with pytest.raises(SpoolError, match="seq 4 is not above"):
            sp.append(4, b"b")


def test_ack_drops_up_to_a_seq(tmp_path: Path) -> None:
    d = tmp_path / "s"
    with Spool(d) as sp:
        for s in range(6):
            sp.append(s, frame(s))
        assert sp.ack(2) == 3
        assert sp.seqs() == [3, 4, 5]
        assert sp.ack(2) == 0  # idempotent
        assert sp.ack(-1) == 0
        assert sorted(p.name for p in d.glob("*.hsb")) == [f"{s:020d}.hsb" for s in (3, 4, 5)]
        assert sp.dropped_batches == 0  # delivered is not dropped
        it = iter(sp)
        assert next(it)[0] == 3
        sp.ack(4)  # acking while replaying: the rest of the iteration follows
        assert [s for s, _ in it] == [5]


def test_restart_keeps_batches_and_the_last_seq(tmp_path: Path) -> None:
    d = tmp_path / "s"
    with Spool(d) as sp:
        for s in (1, 2, 3):
            sp.append(s, frame(s))
        sp.ack(1)
    with Spool(d) as sp:
        assert list(sp) == [(2, frame(2)), (3, frame(3))]
        assert sp.last_seq == 3
        sp.ack(3)
        assert len(sp) == 0
    with Spool(d) as sp:  # empty, but the sequence goes on
        assert len(sp) == 0 and sp.first_seq == -1 and sp.last_seq == 3
        with pytest.raises(SpoolError):
            sp.append(3, b"x")
        assert sp.append(4, b"x")


def test_leftover_temporary_files_are_removed(tmp_path: Path) -> None:
    d = tmp_path / "s"
    with Spool(d) as sp:
        sp.append(1, b"one")
    (d / f".tmp-{2:020d}.hsb").write_bytes(b"half a bat")
    with Spool(d) as sp:
        assert list(sp) == [(1, b"one")]
    assert not list(d.glob(".tmp-*"))


def test_one_process_at_a_time(tmp_path: Path) -> None:
    with Spool(tmp_path) as _, pytest.raises(SpoolError, match="in use by another process"):
        Spool(tmp_path)
    Spool(tmp_path).close()  # released on close


def test_files_are_private(tmp_path: Path) -> None:
    d = tmp_path / "s"
    with Spool(d) as sp:
        sp.append(1, b"captured payloads are sensitive")
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    assert stat.S_IMODE((d / f"{1:020d}.hsb").stat().st_mode) == 0o600


def test_byte_cap_drops_the_oldest_and_counts(tmp_path: Path,
                                              caplog: pytest.LogCaptureFixture) -> None:
    data = b"x" * 100
    with Spool(tmp_path, max_bytes=3 * (HEADER_SIZE + 100) + 50, fsync=True) as sp:
        for s in range(5):
            assert sp.append(s, data)
        assert sp.seqs() == [2, 3, 4]
        assert (sp.dropped_batches, sp.dropped_bytes) == (2, 200)
        assert sp.nbytes <= sp.max_bytes
        assert len(list(tmp_path.glob("*.hsb"))) == 3
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1  # rate-limited: one line, then the counters
    assert "full" in warnings[0] and "dropped the oldest" in warnings[0]


def test_file_cap_drops_the_oldest_and_counts(tmp_path: Path) -> None:
    with Spool(tmp_path, max_files=2) as sp:
        for s in range(4):
            sp.append(s, b"abc")
        assert sp.seqs() == [2, 3]
        assert (sp.dropped_batches, sp.dropped_bytes) == (2, 6)


def test_a_batch_over_the_cap_is_dropped_alone(tmp_path: Path) -> None:
    with Spool(tmp_path, max_bytes=200) as sp:
        assert sp.append(1, b"a" * 10)
        assert not sp.append(2, b"b" * 500)
        assert sp.seqs() == [1]
        assert (sp.dropped_batches, sp.dropped_bytes) == (1, 500)
        assert sp.last_seq == 2


def test_lower_caps_on_restart_apply_at_once(tmp_path: Path) -> None:
    with Spool(tmp_path) as sp:
        for s in range(5):
            sp.append(s, b"z" * 10)
    with Spool(tmp_path, max_files=2) as sp:
        assert sp.seqs() == [3, 4]
        assert sp.dropped_batches == 3


def test_corrupt_and_partial_files_are_skipped(tmp_path: Path,
                                               caplog: pytest.LogCaptureFixture) -> None:
    d = tmp_path / "s"
    with Spool(d) as sp:
        for s in range(7):
            sp.append(s, frame(s))

    def path(s: int) -> Path:
        return d / f"{s:020d}.hsb"

    raw = path(1).read_bytes()
    path(1).write_bytes(raw[:-3])  # torn write
    rot = bytearray(path(2).read_bytes())
    rot[-1] ^= 0xFF
    path(2).write_bytes(bytes(rot))  # bit rot: checksum
    path(3).write_bytes(b"")  # empty
    path(4).write_bytes(b"NOPE" + path(4).read_bytes()[4:])  # not a spool file
    huge = bytearray(path(5).read_bytes())
    huge[12:16] = (0xFFFFFFFF).to_bytes(4, "big")  # announces 4 GiB: never allocated
    path(5).write_bytes(bytes(huge))
    (d / f"{99:020d}.hsb").write_bytes(path(6).read_bytes())  # seq 6's content under 99

    with Spool(d) as sp:
        assert len(sp) == 8
        got = list(sp)
        assert [s for s, _ in got] == [0, 6]
        assert got[1] == (6, frame(6))
        assert sp.corrupt_files == 6
        assert sp.seqs() == [0, 6]
        assert sp.nbytes == sum(HEADER_SIZE + len(frame(s)) for s in (0, 6))
    assert sorted(p.name for p in d.glob("*.hsb")) == [f"{s:020d}.hsb" for s in (0, 6)]
    lines = [r.getMessage() for r in caplog.records if "skipping batch" in r.getMessage()]
    assert len(lines) == 6
    assert any("checksum mismatch" in ln for ln in lines)
    assert any("bad magic" in ln for ln in lines)
    assert any("header says seq 6" in ln for ln in lines)
    assert any("the header announces" in ln for ln in lines)


def test_unreadable_last_seq_is_ignored(tmp_path: Path) -> None:
    with Spool(tmp_path) as sp:
        sp.append(1, b"a")
        sp.ack(1)
    (tmp_path / "last_seq").write_text("garbage")
    with Spool(tmp_path) as sp:
        assert sp.last_seq == -1


def test_unusable_directory(tmp_path: Path) -> None:
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(SpoolError, match="spool directory"):
        Spool(f / "sub")
    with pytest.raises(SpoolError, match="caps too small"):
        Spool(tmp_path, max_bytes=10)


ops = st.lists(st.one_of(st.tuples(st.just("append"), st.integers(0, 120)),
                         st.tuples(st.just("ack"), st.integers(0, 40)),
                         st.tuples(st.just("restart"), st.just(0))), max_size=30)


@settings(max_examples=60, deadline=None)
@given(ops, st.integers(HEADER_SIZE + 40, 600), st.integers(1, 6))
def test_spool_against_a_model(script: list[tuple[str, int]], max_bytes: int,
                               max_files: int) -> None:
    """Whatever the appends, acks and restarts: the spool holds what a simple model says."""
    with tempfile.TemporaryDirectory() as tmp:
        sp = Spool(os.path.join(tmp, "s"), max_bytes=max_bytes, max_files=max_files)
        model: list[tuple[int, bytes]] = []
        dropped = 0
        seq = 0
        try:
            for op, arg in script:
                if op == "append":
                    seq += 1
                    data = bytes([seq % 256]) * arg
                    if HEADER_SIZE + arg > max_bytes:
                        assert not sp.append(seq, data)
                        dropped += 1
                        continue
                    model.append((seq, data))
                    while (len(model) > max_files
                           or sum(HEADER_SIZE + len(d) for _, d in model) > max_bytes):
                        model.pop(0)
                        dropped += 1
                    assert sp.append(seq, data)
                elif op == "ack":
                    sp.ack(arg)
                    model = [(s, d) for s, d in model if s > arg]
                else:
                    sp.close()
                    dropped_before = sp.dropped_batches
                    sp = Spool(os.path.join(tmp, "s"), max_bytes=max_bytes,
                               max_files=max_files)
                    sp.dropped_batches += dropped_before
                    assert sp.last_seq == (seq or -1)
                assert list(sp) == model
                assert sp.dropped_batches == dropped
                assert sp.nbytes <= max_bytes and len(sp) <= max_files
        finally:
            sp.close()


mem_ops = st.lists(st.one_of(st.tuples(st.just("append"), st.integers(0, 120)),
                             st.tuples(st.just("ack"), st.integers(0, 40)),
                             st.tuples(st.just("restart"), st.just(0)),
                             st.tuples(st.just("crash"), st.just(0))), max_size=30)


@settings(max_examples=200, deadline=None)
@given(mem_ops, st.integers(HEADER_SIZE + 40, 600), st.integers(1, 6),
       st.sampled_from([HEADER_SIZE + 60, 250, 400, 1 << 20]))
def test_memory_first_spool_against_a_model(script: list[tuple[str, int]], max_bytes: int,
                                            max_files: int, memory: int) -> None:
    """With a memory tier: the same batches as on disk alone, only the ones that did not fit
    in memory (with every one held before them) are files, a clean stop writes memory to
    disk, and a crash loses exactly what memory held."""
    with tempfile.TemporaryDirectory() as tmp:
        d = os.path.join(tmp, "s")
        sp = Spool(d, max_bytes=max_bytes, max_files=max_files, memory_bytes=memory)
        model: list[tuple[int, bytes, bool]] = []  # seq, data, on disk
        seq = 0
        known = -1  # the last seq the spool was told of (a crash may forget some)
        try:
            for op, arg in script:
                if op == "append":
                    seq += 1
                    known = seq
                    data = bytes([seq % 256]) * arg
                    size = HEADER_SIZE + arg
                    if size > max_bytes:
                        assert not sp.append(seq, data)
                        continue
                    while model and (len(model) + 1 > max_files or size + sum(
                            HEADER_SIZE + len(x) for _, x, _ in model) > max_bytes):
                        model.pop(0)
                    in_mem = sum(HEADER_SIZE + len(x) for _, x, disk in model if not disk)
                    if in_mem + size <= memory:
                        model.append((seq, data, False))
                    else:  # spilled: everything held before it, and it
                        model = [(s, x, True) for s, x, _ in model] + [(seq, data, True)]
                    assert sp.append(seq, data)
                elif op == "ack":
                    sp.ack(arg)
                    model = [m for m in model if m[0] > arg]
                elif op == "restart":
                    sp.close()
                    model = [(s, x, True) for s, x, _ in model]
                    sp = Spool(d, max_bytes=max_bytes, max_files=max_files, memory_bytes=memory)
                    assert sp.last_seq == known
                else:  # kill -9: the lock goes with the process, memory is not written
                    os.close(sp._lock_fd)
                    sp._lock_fd = -1
                    model = [m for m in model if m[2]]
                    sp = Spool(d, max_bytes=max_bytes, max_files=max_files, memory_bytes=memory)
                    assert max((s for s, _, _ in model), default=-1) <= sp.last_seq <= seq
                    known = sp.last_seq
                assert list(sp) == [(s, x) for s, x, _ in model]
                files = sorted(int(n.split(".")[0]) for n in os.listdir(d) if n.endswith(".hsb"))
                assert files == [s for s, _, disk in model if disk]
        finally:
            sp.close()


def test_memory_first_writes_nothing_while_acked(tmp_path: Path) -> None:
    """A collector that keeps up: no batch file is ever written, and last_seq at most once
    a second, then at close."""
    with Spool(tmp_path, memory_bytes=1 << 20) as sp:
        for s in range(1, 200):
            assert sp.append(s, frame(s))
            assert sp.read(s) == frame(s)
            assert sp.ack(s) == 1
            assert not [n for n in os.listdir(tmp_path) if n.endswith(".hsb")]
        writes_during = (tmp_path / "last_seq").read_text().strip()
        assert int(writes_during) < 199  # written early, not after every ack
    assert (tmp_path / "last_seq").read_text().strip() == "199"
    with Spool(tmp_path, memory_bytes=1 << 20) as sp:
        assert sp.last_seq == 199 and len(sp) == 0
