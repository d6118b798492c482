"""``hopscope pcap ID -o FILE``: one request's packets, from every node, as one pcapng.

The packets come from captures given on the command line (replayed to find
the request) or from the collector's store (``--db``: the observation
batches it keeps, ``collector serve --raw-keep``). A request's packets are
those of every TCP flow whose message start carries its id (the client's
connection at the NIC, the proxy's upstream connection on the overlay, the
underlay and the pod's veth), from its start (or the connection's SYN) to the
next request on the connection (:class:`hopscope.agent.pktbuf.PacketBuffer`).
Each interface is an interface block named ``node/ifname``; each packet's
comment names its point, direction, the hop boundary it marks and the request
(``overlay: out, ingress | encap, 8ccc9856a34ef348-DFW``: the end of
``ingress``, the start of ``encap``).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import click

from hopscope.errors import UsageError
from hopscope.model import IN, KIND_PACKET, NIC, OUT, OVERLAY, POD, UNDERLAY, Observation

#: (ingress node?, point, direction) -> "hop before | hop after", for a request that
#: crossed to another node, and for one served on its ingress node
_CROSS = {
    (True, NIC, IN): "· | ingress", (True, OVERLAY, OUT): "ingress | encap",
    (True, UNDERLAY, OUT): "encap | wire", (False, UNDERLAY, IN): "wire | decap",
    (False, OVERLAY, IN): "decap | deliver", (False, POD, OUT): "deliver | app",
    (False, POD, IN): "app | route", (False, OVERLAY, OUT): "route | encap",
    (False, UNDERLAY, OUT): "encap | wire", (True, UNDERLAY, IN): "wire | decap",
    (True, OVERLAY, IN): "decap | egress", (True, NIC, OUT): "egress | ·",
}
_SAME = {
    (True, NIC, IN): "· | ingress", (True, POD, OUT): "ingress | app",
    (True, POD, IN): "app | egress", (True, NIC, OUT): "egress | ·",
}


def hop_comment(req: dict[str, Any], o: Observation) -> str:
    """Where a packet of ``req`` sits on its path: point, direction, hop boundary."""
    a, b = req.get("ingress_node"), req.get("pod_node")
    table = _SAME if b == a else _CROSS
    where = table.get((o.node == a, o.point, o.direction), "")
    return f"{o.direction or '?'}, {where + ', ' if where else ''}{req['request_id']}"


def _point(o: Observation) -> Observation:
    """Fill in a capture's point (the tracker infers it the same way)."""
    if o.point:
        return o
    from hopscope.tcpflow import point_for_ifname

    p = UNDERLAY if o.vni >= 0 else point_for_ifname(o.ifname.split("/")[-1]) or NIC
    return o._replace(point=p)


def request_packets(rid: str, obs: Iterable[Observation]) -> list[Observation]:
    from hopscope.agent.pktbuf import PacketBuffer

    pkts = sorted((o for o in obs if o.kind == KIND_PACKET), key=lambda o: o.ts_real_ns)
    buf = PacketBuffer(max(1, len(pkts)))
    buf.add(_point(o) for o in pkts)
    return buf.request(rid, 1 << 62)


def _warn(msg: str) -> None:
    click.echo(f"hopscope: warning: {msg}", err=True)


def _from_captures(rid: str, files: tuple[str, ...], named: tuple[str, ...]
                   ) -> tuple[dict[str, Any] | None, list[Observation]]:
    from hopscope.capture import CaptureReader
    from hopscope.replay import node_files, replay

    pairs = node_files(files, named)
    env = replay(pairs, progress=False, warn=_warn).envelope
    req = next((r for r in env["requests"] if r["request_id"] == rid), None)
    obs: list[Observation] = []
    for node, path in pairs:  # again, all of them (the replay showed the warnings)
        for batch in CaptureReader(path, node, warn=lambda _msg: None):
            obs += batch
    return req, obs


def _from_store(rid: str, db: str) -> tuple[dict[str, Any] | None, list[Observation]]:
    from hopscope.collector.store import SqliteStore

    store = SqliteStore(db, readonly=True)
    try:
        req = store.get_request(rid)
        obs = [o for _a, _s, _n, batch in store.iter_batches() for o in batch]
    finally:
        store.close()
    return req, obs


@click.command("pcap")
@click.argument("request_id")
@click.argument("captures", nargs=-1, type=click.Path(dir_okay=False))
@click.option("-o", "--out", "out", required=True, type=click.Path(dir_okay=False),
              help="Write the pcapng here.")
@click.option("--node", "named", multiple=True, metavar="NAME=FILE",
              help="A capture and its node's name (default: the file's stem names the node).")
@click.option("--db", default=None, type=click.Path(dir_okay=False),
              help="Read the collector's store instead of captures.")
@click.option("--json", "as_json", is_flag=True,
              help='Print what was written as JSON: {"request_id", "out", "packets", "nodes", '
                   '"stitched"}.')
def pcap(request_id: str, captures: tuple[str, ...], out: str, named: tuple[str, ...],
         db: str | None, as_json: bool) -> None:
    """Write one request's packets, from every node, as one pcapng (for Wireshark).

    \b
        hopscope pcap 8ccc9856a34ef348-DFW node1.pcapng node2.pcapng -o req.pcapng
        hopscope pcap 8ccc9856a34ef348-DFW --db /var/lib/hopscope-collector/collector.db -o req.pcapng
    """
    import json

    from hopscope.errors import HopscopeError
    from hopscope.pcapwrite import write_pcapng

    if db and (captures or named):
        raise UsageError("give the captures (FILE... or --node NAME=FILE) or --db, not both")
    if not db and not (captures or named):
        raise UsageError("where are the packets? give the captures (FILE... or --node "
                         "NAME=FILE) or the collector's store (--db PATH)")
    if db and not Path(db).exists():
        raise UsageError(f"--db {db}: no such file")
    if out == "-":
        raise UsageError("-o -: give a file name (the pcapng is written whole, then renamed "
                         "into place)")
    if not Path(out).resolve().parent.is_dir():
        raise UsageError(f"-o {out}: no directory {Path(out).resolve().parent} to write it in")
    if not request_id.strip():
        raise UsageError("empty request id: give one from `hopscope requests` (its cf-ray)")
    req, obs = _from_store(request_id, db) if db else _from_captures(request_id, captures, named)
    pkts = request_packets(request_id, obs)
    if not pkts:
        where = "the store's kept batches" if db else "these captures"
        raise HopscopeError(f"no packets of request {request_id} in {where}: is the id right "
                         "(hopscope requests lists them)?")
    info = req or {"request_id": request_id}
    try:
        n = write_pcapng(out, pkts, lambda o: hop_comment(info, o))
    except OSError as exc:
        raise HopscopeError(f"cannot write {out}: {exc.strerror or exc}") from None
    nodes = sorted({o.node for o in pkts})
    if as_json:
        click.echo(json.dumps({"request_id": request_id, "out": out, "packets": n,
                               "nodes": nodes, "stitched": req is not None}))
        return
    click.echo(f"{n} packets of {request_id} from {', '.join(nodes)} written to {out}"
               + ("" if req else " (the request itself was not stitched: no hop comments)"),
               err=True)

