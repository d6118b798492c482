"""The replica's pod server: keep-alive, and the control file's ``close_every``."""

from __future__ import annotations

import asyncio
import json
import socket
from pathlib import Path

from hopscope.testbed.podserver import PodServer


async def _heads(srv: PodServer, extra: list[str]) -> list[str]:
    """Keep-alive GETs on one connection, one per header line in ``extra``: the answers'
    heads, up to the one that closes it (and the server did close it)."""
    a, b = socket.socketpair()
    heads: list[str] = []
    try:
        sr, sw = await asyncio.open_connection(sock=b)
        serving = asyncio.create_task(srv.handle(sr, sw))
        cr, cw = await asyncio.open_connection(sock=a, limit=1 << 20)
        for line in extra:
            cw.write(f"GET /healthz HTTP/1.1\r\nHost: x\r\n{line}\r\n\r\n".encode())
            await cw.drain()
            head = (await cr.readuntil(b"\r\n\r\n")).decode("latin-1")
            length = int(next(ln.split(":", 1)[1] for ln in head.split("\r\n")
                              if ln.lower().startswith("content-length:")))
            await cr.readexactly(length)
            heads.append(head)
            if "connection: close" in head.lower():
                assert await cr.read() == b""  # and the server did close it
                break
        cw.close()
        await asyncio.wait_for(serving, 5)
    finally:
        a.close()
        b.close()
    return heads


async def _exchange(srv: PodServer, n: int) -> list[bool]:
    """``n`` keep-alive GETs on one connection; for each, whether the server kept it."""
    heads = await _heads(srv, [f"Cf-Ray: r{i}" for i in range(n)])
    return ["connection: close" not in h.lower() for h in heads]


def test_close_every_ends_every_nth_response(tmp_path: Path) -> None:
    ctl = tmp_path / "ctl.json"
    ctl.write_text(json.dumps({"service_ms": 0}))
    srv = PodServer("api-1", "node2", str(tmp_path / "log"), str(ctl), 0.0)
    assert asyncio.run(_exchange(srv, 5)) == [True] * 5  # keep-alive by default

    ctl.write_text(json.dumps({"service_ms": 0, "close_every": 3}))
    srv.reload_control(force=True)
    assert srv.close_every == 3
    # the server has answered 5: the 6th response closes, then every 3rd
    assert asyncio.run(_exchange(srv, 5)) == [False]
    assert asyncio.run(_exchange(srv, 5)) == [True, True, False]
    log = [json.loads(ln) for ln in (tmp_path / "log").read_text().splitlines()]
    assert [r["cf_ray"] for r in log] == ["r0", "r1", "r2", "r3", "r4", "r0", "r0", "r1", "r2"]


def test_an_answer_sets_the_cookie_asked_for(tmp_path: Path) -> None:
    """The traffic generator's `set_cookies`: a `Set-Cookie` of the bytes asked (at most
    16 KiB), none for a bad or zero ask."""
    ctl = tmp_path / "ctl.json"
    ctl.write_text(json.dumps({"service_ms": 0}))
    srv = PodServer("api-1", "node2", str(tmp_path / "log"), str(ctl), 0.0)
    heads = asyncio.run(_heads(srv, [f"X-Set-Cookie-Bytes: {ask}"
                                     for ask in ("3000", "0", "x", "99999")]))

    def cookie(head: str) -> int:
        got = [ln for ln in head.split("\r\n") if ln.startswith("Set-Cookie: sid=")]
        return len(got[0].split("=", 1)[1].split(";")[0]) if got else 0

    assert [cookie(h) for h in heads] == [3000, 0, 0, 16384]
    assert len(heads[0]) > 3000 and heads[0].startswith("HTTP/1.1 200 ")
