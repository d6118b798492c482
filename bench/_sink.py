"""A collector that only takes batches in: what agent_overhead.py's agents ship to.

``python bench/_sink.py --listen ADDR:PORT --token-file F --out DIR`` accepts
agents as the collector does (hello checked against the token, a welcome), then
appends every byte an agent sends after its hello to ``DIR/<node>.frames`` and
acks each batch as it arrives, storing and stitching nothing. The file holds
the agent's frames as its ``--record`` file would (``agent.run.read_record``
reads both), so the bench stitches them after the phase.

Why not the collector: on this 2-CPU machine its stitching (about 3,000
requests/s, bench/collector_ingest.py) would take a CPU from the replica it
measures, and on a cluster it runs off the nodes. What an agent does to ship
(encode, spool, send, read the acks) is the same either way.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hopscope.collector import wire

_SAFE = re.compile(r"[^A-Za-z0-9_.-]")


async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, token: bytes,
                out: Path) -> None:
    try:
        hello = await wire.accept_hello(reader, writer, token)
    except (wire.WireError, OSError):
        return
    writer.write(wire.encode(wire.Welcome("bench-sink", -1, wire.MAX_FRAME)))
    dec = wire.FrameDecoder(wire.MAX_FRAME)
    with open(out / f"{_SAFE.sub('_', hello.node)}.frames", "ab") as f:
        while chunk := await reader.read(1 << 20):
            f.write(chunk)
            for fr in dec.feed(chunk):
                if isinstance(fr, wire.Batch):
                    writer.write(wire.encode(wire.Ack(fr.seq)))
                elif isinstance(fr, wire.Bye):
                    break
            await writer.drain()
    with contextlib.suppress(OSError):
        await wire.close_writer(writer)


async def main_async(host: str, port: int, token: bytes, out: Path, ready: Path) -> None:
    server = await asyncio.start_server(lambda r, w: serve(r, w, token, out), host, port,
                                        limit=wire.STREAM_LIMIT)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    ready.write_text(str(os.getpid()))
    async with server:
        await stop.wait()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--listen", required=True, help="ADDR:PORT")
    ap.add_argument("--token-file", required=True, type=Path)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--ready-file", required=True, type=Path)
    a = ap.parse_args()
    host, _, port = a.listen.rpartition(":")
    a.out.mkdir(parents=True, exist_ok=True)
    asyncio.run(main_async(host, int(port), wire.read_token(str(a.token_file)), a.out,
                           a.ready_file))
    return 0


if __name__ == "__main__":
    sys.exit(main())
