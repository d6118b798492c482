"""The replica's api pod: a small HTTP/1.1 keep-alive JSON server.

Run inside a pod namespace::

    python -m hopscope.testbed.podserver --listen 0.0.0.0:8000 --name api-2 \\
        --node node2 --log /run/hopscope/testbed-hs/pod-api-2.log \\
        --control /run/hopscope/testbed-hs/pod-api-2.control.json --service-ms 0

Endpoints: ``POST /api/tasks/`` (201, the created task as JSON),
``GET /api/tasks/`` (200, JSON list of the last tasks), ``GET /healthz``
(200). Anything else: 404. Every request is answered with
``X-Served-By: <pod>@<node>``.

Each request is logged as one JSON line to ``--log``: ``ts_ns`` (wall
clock when the request was complete), ``cf_ray``, ``method``, ``path``,
``status``, ``peer`` (the connection's source, ``ip:port``), ``pod``,
``node``, ``service_ms``.

Service time: ``--service-ms`` at start; at run time write
``{"service_ms": N}`` to the ``--control`` file. ``"close_every": N`` makes
every Nth response end its connection (``Connection: close``), so that the
proxy in front has to open new upstream connections (0, the default: never).
The server re-reads the file on SIGUSR1 and also notices a changed mtime
within 0.25 s.

Sockets use TCP_NODELAY (a keep-alive server without it stalls 40 ms per
response on delayed ACKs).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import time
from collections import deque
from typing import IO, Any

log = logging.getLogger(__name__)

MAX_HEADER = 64 * 1024
MAX_BODY = 1024 * 1024
IDLE_TIMEOUT = 120.0
REASONS = {200: "OK", 201: "Created", 400: "Bad Request", 404: "Not Found",
           405: "Method Not Allowed", 413: "Payload Too Large"}


class PodServer:
    """State of one pod server."""

    def __init__(self, name: str, node: str, log_path: str, control: str,
                 service_ms: float) -> None:
        self.name = name
        self.node = node
        self.control = control
        self.service_ms = service_ms
        self.close_every = 0
        self._control_mtime = 0.0
        self._control_checked = 0.0
        self.tasks: deque[dict[str, Any]] = deque(maxlen=20)
        self.next_id = 1
        self.count = 0
        self.logf: IO[str] | None = open(log_path, "a", buffering=1) if log_path else None  # noqa: SIM115

    # -- control -----------------------------------------------------------------
    def reload_control(self, force: bool = False) -> None:
        if not self.control:
            return
        now = time.monotonic()
        if not force and now - self._control_checked < 0.25:
            return
        self._control_checked = now
        try:
            st = os.stat(self.control)
        except OSError:
            return
        if not force and st.st_mtime == self._control_mtime:
            return
        self._control_mtime = st.st_mtime
        try:
            with open(self.control) as f:
                data = json.load(f)
            ms = float(data.get("service_ms", self.service_ms))
            close_every = int(data.get("close_every", 0))
        except (OSError, ValueError, TypeError, AttributeError) as exc:
            log.warning("control file %s unreadable: %s", self.control, exc)
            return
        if ms != self.service_ms:
            log.warning("%s: service time %.3f ms -> %.3f ms", self.name, self.service_ms, ms)
        self.service_ms = max(0.0, ms)
        self.close_every = max(0, close_every)

    # -- HTTP ----------------------------------------------------------------------
    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        peer = writer.get_extra_info("peername")
        peer_s = f"{peer[0]}:{peer[1]}" if peer else "?"
        try:
            while True:
                try:
                    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), IDLE_TIMEOUT)
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                        TimeoutError, ConnectionError):
                    return
                keep = await self._one(head, reader, writer, peer_s)
                if not keep:
                    return
        except ConnectionError:
            return
        finally:
            with contextlib.suppress(Exception):
                writer.close()

    async def _one(self, head: bytes, reader: asyncio.StreamReader,
                   writer: asyncio.StreamWriter, peer: str) -> bool:
        lines = head.decode("latin-1").split("\r\n")
        try:
            method, target, version = lines[0].split(" ", 2)
        except ValueError:
            await self._send(writer, 400, {"error": "bad request line"}, False)
            return False
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if not line:
                continue
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip()
        body = b""
        if headers.get("transfer-encoding", "").lower() == "chunked":
            body = await self._read_chunked(reader)
        elif "content-length" in headers:
            try:
                n = int(headers["content-length"])
            except ValueError:
                n = -1
            if n < 0 or n > MAX_BODY:
                await self._send(writer, 413, {"error": "body too large"}, False)
                return False
            if n:
                body = await reader.readexactly(n)
        ts_ns = time.time_ns()
        conn_hdr = headers.get("connection", "").lower()
        keep = (version == "HTTP/1.1" and conn_hdr != "close") or conn_hdr == "keep-alive"

        self.reload_control()
        if self.service_ms > 0:
            await asyncio.sleep(self.service_ms / 1000.0)

        path = target.split("?", 1)[0]
        status: int
        payload: Any
        if path in ("/api/tasks/", "/api/tasks"):
            if method == "POST":
                try:
                    req = json.loads(body) if body else {}
                except ValueError:
                    req = {}
                task = {"id": self.next_id, "title": str(req.get("title", "task"))
                        if isinstance(req, dict) else "task",
                        "residence_id": req.get("residence_id") if isinstance(req, dict) else None,
                        "pod": self.name, "node": self.node}
                self.next_id += 1
                self.tasks.append(task)
                status, payload = 201, task
            elif method == "GET":
                status, payload = 200, list(self.tasks)
            else:
                status, payload = 405, {"error": "method not allowed"}
        elif path == "/healthz":
            status, payload = 200, {"ok": True, "pod": self.name}
        else:
            status, payload = 404, {"error": "not found"}

        self.count += 1
        if self.close_every and self.count % self.close_every == 0:
            keep = False
        if self.logf is not None:
            rec = {"ts_ns": ts_ns, "cf_ray": headers.get("cf-ray", ""), "method": method,
                   "path": path, "status": status, "peer": peer, "pod": self.name,
                   "node": self.node, "service_ms": self.service_ms}
            self.logf.write(json.dumps(rec, separators=(",", ":")) + "\n")
        try:  # the traffic generator's ask for a long answer head (at most 16 KiB)
            cookie = min(max(int(headers.get("x-set-cookie-bytes", "0")), 0), 16384)
        except ValueError:
            cookie = 0
        await self._send(writer, status, payload, keep, cookie)
        return keep

    async def _read_chunked(self, reader: asyncio.StreamReader) -> bytes:
        out = bytearray()
        while True:
            size_line = await reader.readuntil(b"\r\n")
            size = int(size_line.split(b";", 1)[0].strip() or b"0", 16)
            if size == 0:
                # trailers until empty line
                while (await reader.readuntil(b"\r\n")) != b"\r\n":
                    pass
                return bytes(out)
            out += await reader.readexactly(size)
            await reader.readexactly(2)
            if len(out) > MAX_BODY:
                raise ConnectionError("chunked body too large")

    async def _send(self, writer: asyncio.StreamWriter, status: int, payload: Any,
                    keep: bool, cookie: int = 0) -> None:
        body = json.dumps(payload, separators=(",", ":")).encode()
        head = (
            f"HTTP/1.1 {status} {REASONS.get(status, 'Unknown')}\r\n"
            "Content-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n"
            + (f"Set-Cookie: sid={'c' * cookie}; Path=/; HttpOnly\r\n" if cookie else "")
            + f"X-Served-By: {self.name}@{self.node}\r\n"
            + ("" if keep else "Connection: close\r\n")
            + "\r\n"
        ).encode()
        writer.write(head + body)
        await writer.drain()


async def serve(args: argparse.Namespace) -> None:
    srv = PodServer(args.name, args.node, args.log, args.control, args.service_ms)
    srv.reload_control(force=True)
    host, _, port = args.listen.rpartition(":")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind((host or "0.0.0.0", int(port)))
    sock.listen(1024)
    server = await asyncio.start_server(srv.handle, sock=sock)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGUSR1, lambda: srv.reload_control(force=True))
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    log.warning("%s on %s listening on %s (service %.3f ms)", srv.name, srv.node,
                args.listen, srv.service_ms)
    async with server:
        await stop.wait()
    if srv.logf is not None:
        srv.logf.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="hopscope replica api pod")
    p.add_argument("--listen", default="0.0.0.0:8000")
    p.add_argument("--name", default="api")
    p.add_argument("--node", default="")
    p.add_argument("--log", default="", help="request log (JSON lines)")
    p.add_argument("--control", default="", help='control file: {"service_ms": N}')
    p.add_argument("--service-ms", type=float, default=0.0)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s")
    asyncio.run(serve(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
