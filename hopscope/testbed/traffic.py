"""Bounded HTTP load from the replica's edge namespace, the way Cloudflare sends it.

Requests are plaintext HTTP/1.1 to a node's public address on port 80 with
``Host: api.myhoneydue.com``, a unique ``CF-Ray: <16 hex>-DFW``,
``CF-Connecting-IP``, ``X-Forwarded-For``, ``X-Forwarded-Proto: https``
(SSL mode Flexible); with ``cookies``, a browser's ``Cookie`` header of one of
those sizes (0: none) before the ``CF-Ray``, so that heads of several KB, whose
``CF-Ray`` is past the 2 KB an agent keeps of a segment, are sent too; with
``set_cookies``, an ``X-Set-Cookie-Bytes`` header of one of those sizes, which
the replica's pods answer with a ``Set-Cookie`` of that many bytes (answers
whose heads are longer than an agent keeps of a segment).
``concurrency`` workers each hold one connection; before each request a
worker opens a new one with probability ``new_conn_ratio`` (and always after
an error or ``Connection: close``). A new connection goes to the next node
in round-robin order, like
Cloudflare's per-connection DNS round robin over the origin addresses.

Every request gives one record (a JSON line with ``--out``):

=====================  ==========================================================
``cf_ray``             the request's CF-Ray
``node``               node the request entered (``node1``)
``dst`` / ``src``      ``ip:port`` of the client connection (edge side)
``conn``               connection number (per run), ``new_conn`` true on its first request
``method``/``path``    ``POST``/``GET`` ``/api/tasks/``
``head_bytes``         the request's head, bytes (its blank line included)
``resp_head_bytes``    the response's head, bytes (0 when no response)
``status``             HTTP status, 0 when no response
``t_connect_ns``       wall clock when connect() started (new connections), else null
``t_start_real_ns``    wall clock just before the request was written
``t_first_byte_ns``    wall clock when the first response bytes were read, or null
``t_end_ns``           wall clock when the response was complete (or the error happened)
``served_by``          ``<pod>@<node>`` from the pod's ``X-Served-By`` header, or ""
``error``              null, or what went wrong (``timeout``, ``connect: ...``)
=====================  ==========================================================

Always bounded: by ``count`` (default 100 when no duration is given), by
``duration`` and by ``max_seconds``; every socket operation has a timeout.
No request is started after the deadline; one in flight then may still take
up to ``timeout`` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import math
import random
import socket
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from hopscope.errors import UsageError
from hopscope.testbed import netns
from hopscope.testbed.topology import Topology

log = logging.getLogger(__name__)

PATH = "/api/tasks/"
USER_AGENT = "HoneyDue/2.4.1 (iPhone; iOS 18.1; Scale/3.00)"
CLIENT_NET = ipaddress.ip_network("198.18.0.0/15")  # benchmarking range: header values only
TITLES = ("Replace HVAC filter", "Clean gutters", "Test smoke detectors", "Flush water heater",
          "Check roof shingles", "Service garage door")


@dataclass
class TrafficConfig:
    """What to send. ``nodes`` empty means all nodes."""

    count: int | None = None
    duration: float | None = None
    concurrency: int = 4
    post_ratio: float = 0.5
    new_conn_ratio: float = 0.1
    nodes: list[str] = field(default_factory=list)
    timeout: float = 35.0  # per request (Traefik answers 504/502 after its 30 s dial timeout)
    connect_timeout: float = 3.0
    max_seconds: float = 600.0
    seed: int | None = None
    #: sizes of a Cookie header, one picked at random per request (0: none); empty: none
    cookies: tuple[int, ...] = ()
    #: sizes of a Set-Cookie the pod is asked to answer with, one picked per request (0: none)
    set_cookies: tuple[int, ...] = ()

    def validate(self) -> None:
        if self.count is not None and self.count < 1:
            raise UsageError("--count must be at least 1")
        if self.duration is not None and not 0 < self.duration <= self.max_seconds:
            raise UsageError(f"--duration must be in (0, {self.max_seconds:.0f}] seconds")
        if not 1 <= self.concurrency <= 512:
            raise UsageError("--concurrency must be between 1 and 512")
        for name, v in (("--post-ratio", self.post_ratio),
                        ("--new-conn-ratio", self.new_conn_ratio)):
            if not 0.0 <= v <= 1.0:
                raise UsageError(f"{name} must be between 0 and 1, got {v}")
        if not self.timeout > 0:
            raise UsageError(f"--timeout {self.timeout}: give a positive number of seconds")
        if not self.connect_timeout > 0:
            raise UsageError(f"connect timeout {self.connect_timeout}: must be positive")


@dataclass
class TrafficResult:
    """Summary of a run (and the records when asked to keep them)."""

    sent: int
    elapsed_s: float
    by_status: dict[str, int]
    by_node: dict[str, int]
    served_by: dict[str, int]
    p50_ms: float | None
    p99_ms: float | None
    rate: float
    new_conns: int
    records: list[dict[str, Any]] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d.pop("records")
        return d

    def text(self) -> str:
        st = ", ".join(f"{k}: {v}" for k, v in sorted(self.by_status.items()))
        nodes = ", ".join(f"{k}: {v}" for k, v in sorted(self.by_node.items()))
        pods = ", ".join(f"{k}: {v}" for k, v in sorted(self.served_by.items()))
        p50 = f"{self.p50_ms:.2f}" if self.p50_ms is not None else "-"
        p99 = f"{self.p99_ms:.2f}" if self.p99_ms is not None else "-"
        return (
            f"{self.sent} requests in {self.elapsed_s:.2f} s ({self.rate:.0f} req/s), "
            f"{self.new_conns} connections\n"
            f"  status: {st}\n"
            f"  entered: {nodes}\n"
            f"  served by: {pods or '-'}\n"
            f"  latency ms: p50 {p50}  p99 {p99}"
        )


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100) of values, None when empty."""
    if not values:
        return None
    s = sorted(values)
    k = max(0, min(len(s) - 1, math.ceil(q / 100.0 * len(s)) - 1))
    return s[k]


class _Response:
    __slots__ = ("body", "close", "head_bytes", "headers", "status")

    def __init__(self) -> None:
        self.status = 0
        self.head_bytes = 0
        self.headers: dict[str, str] = {}
        self.body = b""
        self.close = False


async def _read_response(reader: asyncio.StreamReader, on_first: Callable[[], None]) -> _Response:
    """Read one HTTP/1.1 response; call on_first when the first bytes arrive."""
    buf = bytearray()
    first = True
    while b"\r\n\r\n" not in buf:
        chunk = await reader.read(65536)
        if not chunk:
            raise ConnectionError("connection closed before the response headers")
        if first:
            on_first()
            first = False
        buf += chunk
        if len(buf) > 1 << 20:
            raise ConnectionError("response headers too large")
    head, _, rest = bytes(buf).partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    resp = _Response()
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/"):
        raise ConnectionError(f"bad status line {lines[0]!r}")
    resp.status = int(parts[1])
    resp.head_bytes = len(head) + 4
    for ln in lines[1:]:
        k, _, v = ln.partition(":")
        resp.headers[k.strip().lower()] = v.strip()
    resp.close = resp.headers.get("connection", "").lower() == "close" or parts[0] == "HTTP/1.0"
    body = bytearray(rest)
    if resp.headers.get("transfer-encoding", "").lower() == "chunked":
        resp.body = await _read_chunked(reader, body)
    elif "content-length" in resp.headers:
        n = int(resp.headers["content-length"])
        while len(body) < n:
            chunk = await reader.read(n - len(body))
            if not chunk:
                raise ConnectionError("connection closed in the response body")
            body += chunk
        resp.body = bytes(body[:n])
    elif resp.status in (204, 304) or 100 <= resp.status < 200:
        resp.body = b""
    else:  # body until close
        while True:
            chunk = await reader.read(65536)
            if not chunk:
                break
            body += chunk
        resp.body = bytes(body)
        resp.close = True
    return resp


async def _read_chunked(reader: asyncio.StreamReader, pending: bytearray) -> bytes:
    buf = pending
    out = bytearray()

    async def need(n: int) -> None:
        while len(buf) < n:
            chunk = await reader.read(65536)
            if not chunk:
                raise ConnectionError("connection closed in a chunked body")
            buf.extend(chunk)

    while True:
        while b"\r\n" not in buf:
            await need(len(buf) + 1)
        line, _, _ = bytes(buf).partition(b"\r\n")
        del buf[: len(line) + 2]
        size = int(line.split(b";", 1)[0].strip() or b"0", 16)
        if size == 0:
            while True:
                while b"\r\n" not in buf:
                    await need(len(buf) + 1)
                tl, _, _ = bytes(buf).partition(b"\r\n")
                del buf[: len(tl) + 2]
                if not tl:
                    return bytes(out)
        await need(size + 2)
        out += buf[:size]
        del buf[: size + 2]


class _Run:
    def __init__(self, topo: Topology, cfg: TrafficConfig,
                 sink: Callable[[dict[str, Any]], None]) -> None:
        self.topo = topo
        self.cfg = cfg
        self.sink = sink
        self.rng = random.Random(cfg.seed)
        self.targets = [(n, topo.node(n).public_ip) for n in (cfg.nodes or topo.node_names())]
        self.limit = cfg.count if cfg.count is not None else (None if cfg.duration else 100)
        span = cfg.duration if cfg.duration is not None else cfg.max_seconds
        self.deadline = time.monotonic() + min(span, cfg.max_seconds)
        self.issued = 0
        self.next_target = 0
        self.conns = 0

    def claim(self) -> bool:
        if self.limit is not None and self.issued >= self.limit:
            return False
        if time.monotonic() >= self.deadline:
            return False
        self.issued += 1
        return True

    def pick(self) -> tuple[str, str]:
        t = self.targets[self.next_target % len(self.targets)]
        self.next_target += 1
        return t

    def request_bytes(self, method: str, ray: str, host_ip: str) -> bytes:
        client = str(CLIENT_NET[self.rng.randrange(1, CLIENT_NET.num_addresses - 1)])
        body = b""
        if method == "POST":
            body = json.dumps({"title": self.rng.choice(TITLES),
                               "residence_id": self.rng.randrange(1, 5000),
                               "due": "2026-12-01"}).encode()
        hdrs = [
            f"{method} {PATH} HTTP/1.1",
            f"Host: {self.topo.host}",
            f"User-Agent: {USER_AGENT}",
            "Accept: application/json",
            "Accept-Encoding: gzip, br",
            "Authorization: Token 3f6c2a9d1e8b7c4a5f0e9d8c7b6a5f4e3d2c1b0a",
        ]
        size = self.rng.choice(self.cfg.cookies) if self.cfg.cookies else 0
        if size:
            hdrs.append("Cookie: sid=" + "".join(self.rng.choices("0123456789abcdef", k=size)))
        size = self.rng.choice(self.cfg.set_cookies) if self.cfg.set_cookies else 0
        if size:
            hdrs.append(f"X-Set-Cookie-Bytes: {size}")
        hdrs += [
            f"CF-Ray: {ray}",
            f"CF-Connecting-IP: {client}",
            "CF-IPCountry: US",
            'CF-Visitor: {"scheme":"https"}',
            f"X-Forwarded-For: {client}",
            "X-Forwarded-Proto: https",
            "CDN-Loop: cloudflare",
            "Connection: Keep-Alive",
        ]
        if body:
            hdrs += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
        return ("\r\n".join(hdrs) + "\r\n\r\n").encode() + body

    async def worker(self) -> None:
        reader: asyncio.StreamReader | None = None
        writer: asyncio.StreamWriter | None = None
        node, host_ip = "", ""
        conn_id = 0
        src = ""

        def close() -> None:
            nonlocal reader, writer
            if writer is not None:
                with contextlib.suppress(Exception):
                    writer.close()
            reader = writer = None

        try:
            while self.claim():
                if writer is not None and self.rng.random() < self.cfg.new_conn_ratio:
                    close()
                method = "POST" if self.rng.random() < self.cfg.post_ratio else "GET"
                ray = f"{self.rng.getrandbits(64):016x}-DFW"
                rec: dict[str, Any] = {"cf_ray": ray, "method": method, "path": PATH,
                                       "status": 0, "resp_head_bytes": 0, "new_conn": False,
                                       "t_connect_ns": None,
                                       "t_first_byte_ns": None, "served_by": "", "error": None}
                if writer is None:
                    node, host_ip = self.pick()
                    self.conns += 1
                    conn_id = self.conns
                    rec["new_conn"] = True
                    rec["t_connect_ns"] = time.time_ns()
                    try:
                        reader, writer, src = await self._connect(host_ip)
                    except (OSError, TimeoutError) as exc:
                        rec.update(node=node, dst=f"{host_ip}:{self.topo.http_port}", src="",
                                   conn=conn_id, t_start_real_ns=rec["t_connect_ns"],
                                   t_end_ns=time.time_ns(),
                                   error=f"connect: {exc or 'timeout'}")
                        self.sink(rec)
                        close()
                        continue
                assert reader is not None and writer is not None
                rec.update(node=node, dst=f"{host_ip}:{self.topo.http_port}", src=src,
                           conn=conn_id)
                data = self.request_bytes(method, ray, host_ip)
                rec["head_bytes"] = data.index(b"\r\n\r\n") + 4

                def first(rec: dict[str, Any] = rec) -> None:
                    rec["t_first_byte_ns"] = time.time_ns()

                rec["t_start_real_ns"] = time.time_ns()
                try:
                    writer.write(data)
                    resp = await asyncio.wait_for(self._exchange(writer, reader, first),
                                                  self.cfg.timeout)
                    rec["status"] = resp.status
                    rec["resp_head_bytes"] = resp.head_bytes
                    rec["served_by"] = resp.headers.get("x-served-by", "")
                    rec["t_end_ns"] = time.time_ns()
                    if resp.close:
                        close()
                except TimeoutError:
                    rec["t_end_ns"] = time.time_ns()
                    rec["error"] = f"timeout after {self.cfg.timeout:g} s"
                    close()
                except (OSError, ConnectionError, ValueError, asyncio.IncompleteReadError) as exc:
                    rec["t_end_ns"] = time.time_ns()
                    rec["error"] = f"{type(exc).__name__}: {exc}"
                    close()
                self.sink(rec)
        finally:
            close()

    async def _exchange(self, writer: asyncio.StreamWriter, reader: asyncio.StreamReader,
                        first: Callable[[], None]) -> _Response:
        await writer.drain()
        return await _read_response(reader, first)

    async def _connect(self, host_ip: str
                       ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, str]:
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            await asyncio.wait_for(loop.sock_connect(sock, (host_ip, self.topo.http_port)),
                                   self.cfg.connect_timeout)
        except BaseException:
            sock.close()
            raise
        la = sock.getsockname()
        reader, writer = await asyncio.open_connection(sock=sock, limit=1 << 20)
        return reader, writer, f"{la[0]}:{la[1]}"

    async def main(self) -> None:
        await asyncio.gather(*(self.worker() for _ in range(self.cfg.concurrency)))


def run_traffic(topo: Topology, cfg: TrafficConfig, out: str | Path | None = None,
                keep: bool = False,
                on_record: Callable[[dict[str, Any]], None] | None = None) -> TrafficResult:
    """Send ``cfg``'s load from the edge namespace of the replica ``topo``.

    Writes a JSON line per request to ``out`` when given; returns the
    summary (and the records when ``keep``). Needs root (setns).
    """
    cfg.validate()
    for n in cfg.nodes:
        topo.node(n)  # raises UsageError on an unknown node
    netns.require_root("hopscope testbed traffic")
    lat: list[float] = []
    by_status: Counter[str] = Counter()
    by_node: Counter[str] = Counter()
    served: Counter[str] = Counter()
    records: list[dict[str, Any]] = []
    try:
        fh: IO[str] | None = open(out, "w") if out else None  # noqa: SIM115
    except OSError as exc:
        raise UsageError(f"--out {out}: {exc.strerror or exc}") from None

    def sink(rec: dict[str, Any]) -> None:
        by_status[str(rec["status"]) if not rec["error"] else "error"] += 1
        by_node[rec["node"]] += 1
        if rec["served_by"]:
            served[rec["served_by"]] += 1
        if not rec["error"]:
            lat.append((rec["t_end_ns"] - rec["t_start_real_ns"]) / 1e6)
        if fh is not None:
            fh.write(json.dumps(rec, separators=(",", ":")) + "\n")
        if keep:
            records.append(rec)
        if on_record is not None:
            on_record(rec)

    r = _Run(topo, cfg, sink)
    t0 = time.monotonic()
    try:
        netns.call_in_netns(topo.ns("edge"), lambda: asyncio.run(r.main()))
    finally:
        if fh is not None:
            fh.close()
    elapsed = time.monotonic() - t0
    sent = sum(by_status.values())
    return TrafficResult(
        sent=sent, elapsed_s=round(elapsed, 3), by_status=dict(by_status),
        by_node=dict(by_node), served_by=dict(served),
        p50_ms=percentile(lat, 50), p99_ms=percentile(lat, 99),
        rate=round(sent / elapsed, 1) if elapsed > 0 else 0.0, new_conns=r.conns,
        records=records,
    )
