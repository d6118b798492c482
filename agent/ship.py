"""``hopscope agent ship``: send a node's capture to the collector.

Every batch is encoded (and checked) once, appended to the spool, then sent;
the spool is acked as the collector's acks arrive. While the collector is
unreachable the batches wait in the spool and the agent reconnects with
exponential backoff; on reconnect it replays the spool in seq order (the
collector de-duplicates by (agent, seq), so resending is harmless).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import ssl
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from hopscope.agent.events import RawEvents
from hopscope.collector import wire
from hopscope.collector.spool import Spool

from hopscope.capture import CaptureReader
from hopscope.errors import AuthFailed, BadVersion, HopscopeError, PeerClosed, WireError
from hopscope.model import Observation

log = logging.getLogger(__name__)

#: batches sent and not yet acked, at most
WINDOW = 16
#: no ack for this long: the connection is taken for dead
ACK_TIMEOUT = 10.0


@dataclass
class ShipConfig:
    capture: str
    node: str
    host: str
    port: int
    token: bytes
    agent: str = ""
    spool_dir: str | None = None
    spool_max: int = 256 << 20  # bytes; past that the oldest batches go (counted)
    batch: int = 1000
    ssl_context: ssl.SSLContext | None = None
    server_hostname: str | None = None
    backoff_min: float = 0.1
    backoff_max: float = 5.0
    wait: float = 300.0  # after the capture ends: how long to keep trying to deliver
    pace: float = 0.0  # seconds to sleep between batches


@dataclass
class ShipResult:
    batches: int = 0
    observations: int = 0
    acked: int = -1
    connects: int = 0
    spooled_left: int = 0
    errors: list[str] = field(default_factory=list)


def _chunks(reader: CaptureReader, size: int) -> Iterator[list[Observation]]:
    buf: list[Observation] = []
    for b in reader:
        buf.extend(b)
        while len(buf) >= size:
            yield buf[:size]
            buf = buf[size:]
    if buf:
        yield buf


class Shipper:
    def __init__(self, cfg: ShipConfig, spool: Spool) -> None:
        self.cfg = cfg
        self.spool = spool
        self.agent = cfg.agent or default_agent_id(cfg.node)
        self.started_ns = time.time_ns()
        self.res = ShipResult()
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.sent = -1  # highest seq written on this connection
        self.acked = -1
        self.max_frame = wire.MAX_FRAME
        self.next_try = 0.0
        self.backoff = cfg.backoff_min
        self.seq = spool.last_seq + 1

    async def _connect(self) -> bool:
        if self.writer is not None:
            return True
        if time.monotonic() < self.next_try:
            return False
        hello = wire.Hello(self.agent, self.cfg.node, self.cfg.token, self.started_ns)
        try:
            r, w, welcome = await wire.open_agent_connection(
                self.cfg.host, self.cfg.port, hello,
                ssl_context=self.cfg.ssl_context,
                server_hostname=self.cfg.server_hostname, timeout=5.0)
        except (AuthFailed, BadVersion):
            raise
        except (OSError, TimeoutError, WireError) as exc:
            self._failed(f"cannot reach the collector at {self.cfg.host}:{self.cfg.port}: "
                         f"{exc or type(exc).__name__}{self._tls_hint(exc)}")
            return False
        self.reader, self.writer = r, w
        self.res.connects += 1
        # the backoff goes back to its minimum once an ack shows progress, not here: a
        # collector that welcomes and then refuses must not be dialled ten times a second
        self.max_frame = welcome.max_frame
        self.acked = welcome.acked
        self.sent = welcome.acked
        self.spool.ack(welcome.acked)
        if welcome.acked >= self.seq:
            self.seq = welcome.acked + 1
        log.info("connected to %s:%d as %s (acked %d, %d batches spooled)", self.cfg.host,
                 self.cfg.port, self.agent, welcome.acked, len(self.spool))
        return True

    def _tls_hint(self, exc: BaseException) -> str:
        """A connection cut before the welcome is most often TLS on one end only, or a
        collector that wants a client certificate (its handshake failures happen before
        it sees the connection, so its log says nothing)."""
        if isinstance(exc, ssl.SSLError):
            return ""  # says what failed already
        cut = isinstance(exc, (PeerClosed, ConnectionError))
        if cut and self.cfg.ssl_context is not None:
            return (" (does the collector speak TLS on this port, and want a client "
                    "certificate: --tls-cert/--tls-key?)")
        if cut:
            return " (does the collector want TLS on this port: --tls-ca?)"
        return ""

    def _failed(self, why: str) -> None:
        log.warning("%s; retrying in %.1f s (%d batches spooled)", why, self.backoff,
                    len(self.spool))
        self.next_try = time.monotonic() + self.backoff
        self.backoff = min(self.cfg.backoff_max, self.backoff * 2)

    async def _drop_connection(self, why: str) -> None:
        if self.writer is not None:
            await wire.close_writer(self.writer)
        self.reader = self.writer = None
        self._failed(why)

    async def _read_ack(self) -> None:
        assert self.reader is not None
        frame = await asyncio.wait_for(wire.read_frame(self.reader, wire.HELLO_MAX_FRAME), ACK_TIMEOUT)
        if isinstance(frame, wire.Ack):
            if frame.seq > self.acked:
                self.backoff = self.cfg.backoff_min
            self.acked = max(self.acked, frame.seq)
            self.res.acked = self.acked
            self.spool.ack(frame.seq)
        elif isinstance(frame, wire.ErrorFrame):
            exc = wire.error_from_frame(frame)
            if frame.code == "bad-frame" and frame.seq >= 0:
                log.warning("batch %d refused for good (%s): dropped from the spool",
                            frame.seq, frame.message)
                self.spool.refused(frame.seq)
                self.spool.ack(frame.seq)
            raise exc
        else:
            raise wire.BadFrame(f"expected an ack, got a {type(frame).__name__.lower()} frame")

    async def pump(self, until_empty: bool = False) -> None:
        """Send what the spool holds beyond what was sent; read acks (all when ``until_empty``)."""
        if not await self._connect():
            return
        assert self.writer is not None
        try:
            for seq in self.spool.seqs():
                if seq <= self.sent:
                    continue
                while self.sent - self.acked >= WINDOW:
                    await self._read_ack()
                data = self.spool.read(seq)
                if data is None:
                    continue
                self.writer.write(data)
                await self.writer.drain()
                self.sent = seq
            while self.sent > self.acked and (until_empty or self.sent - self.acked >= WINDOW):
                await self._read_ack()
        except (AuthFailed, BadVersion):
            raise
        except (OSError, TimeoutError, WireError) as exc:
            await self._drop_connection("connection to the collector lost: "
                                        f"{exc or type(exc).__name__}")

    async def run(self) -> ShipResult:
        reader = CaptureReader(self.cfg.capture, self.cfg.node, directions=False)
        for obs in _chunks(reader, self.cfg.batch):
            self.append(obs)
            self.res.batches += 1
            self.res.observations += len(obs)
            await self.pump()
            if self.cfg.pace:
                await asyncio.sleep(self.cfg.pace)
        deadline = time.monotonic() + self.cfg.wait
        while len(self.spool) and time.monotonic() < deadline:
            await self.pump(until_empty=True)
            if len(self.spool) and self.writer is None:
                await asyncio.sleep(max(0.0, min(self.next_try - time.monotonic(),
                                                 deadline - time.monotonic())))
        if self.writer is not None:
            with contextlib.suppress(OSError, WireError):
                await wire.write_frame(self.writer, wire.Bye("end of capture"))
            await wire.close_writer(self.writer)
            self.writer = None
        self.res.spooled_left = len(self.spool)
        self.res.acked = self.acked
        return self.res

    def append(self, obs: list[Observation], clock: Sequence[tuple[int, int]] = (),
               lost: Mapping[str, int] | None = None, raw: RawEvents | None = None) -> None:
        """Encode one batch (with ``raw``: a v3 batch carrying the ring's records too) and
        spool it under the next seq. Its ``lost`` map (``lost`` and the spool's own drop
        counters) counts the batches spooling it drops too."""
        def encode() -> bytes:
            return wire.encode_batch(self.agent, self.seq, self.cfg.node, time.time_ns(), obs,
                                     clock=list(clock), lost={**(lost or {}), **self.spool_lost()},
                                     max_frame=self.max_frame, check=True, raw=raw)

        frame = encode()
        # room first (16 bytes of slack: the counters may grow a byte or two), then the
        # counters, so that they include what making room dropped
        if self.spool.make_room(len(frame) + 16):
            frame = encode()
        self.spool.append(self.seq, frame)
        self.seq += 1

    def spool_lost(self) -> dict[str, int]:
        """The spool's drop counters, for the batch's cumulative ``lost`` map."""
        return {"spool_batches": self.spool.dropped_batches,
                "spool_bytes": self.spool.dropped_bytes}


async def ship(cfg: ShipConfig) -> ShipResult:
    """Ship one capture; the spool directory is a temporary one unless ``spool_dir``."""
    tmp: tempfile.TemporaryDirectory[str] | None = None
    spool_dir = cfg.spool_dir
    if spool_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="hopscope-spool-")
        spool_dir = os.path.join(tmp.name, "spool")
    try:
        with Spool(Path(spool_dir), max_bytes=cfg.spool_max) as spool:
            res = await Shipper(cfg, spool).run()
    finally:
        if tmp is not None:
            tmp.cleanup()
    if res.spooled_left:
        raise HopscopeError(f"the collector at {cfg.host}:{cfg.port} did not take "
                            f"{res.spooled_left} batches within {cfg.wait:g} s"
                            + (f"; they stay in the spool {cfg.spool_dir}" if cfg.spool_dir
                               else " (no --spool: they are lost)"))
    return res


def default_agent_id(node: str) -> str:
    return f"hopscope-agent@{node or socket.gethostname()}"
