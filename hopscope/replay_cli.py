"""``hopscope replay``: stitch captures offline."""

from __future__ import annotations

import sys

import click

from hopscope.render import render_envelope
from hopscope.replay import JsonWriter, node_files, parse_cidrs, summary_line
from hopscope.replay import replay as run_replay


def _warn(msg: str) -> None:
    click.echo(f"hopscope: warning: {msg}", err=True)


@click.command()
@click.argument("files", nargs=-1, type=click.Path(dir_okay=False))
@click.option("--node", "named", multiple=True, metavar="NAME=FILE",
              help="A capture and its node's name (default: the file's stem names the node).")
@click.option("--json", "as_json", is_flag=True, help="Print the hop-model JSON envelope.")
@click.option("--reference", metavar="NODE", help="Node whose clock the others are set against "
              "(default: the first node given).")
@click.option("--pod-cidr", default="10.42.0.0/16", show_default=True, help="Cluster pod network.")
@click.option("--service-cidr", default="10.43.0.0/16", show_default=True,
              help="Cluster service (ClusterIP) network.")
@click.option("--entry-port", "entry_ports", multiple=True, type=click.IntRange(1, 65535),
              default=(80,),
              show_default=True, help="Port Traefik listens on for Cloudflare (repeatable).")
@click.option("--jobs", "-j", type=click.IntRange(1, 64), default=None,
              help="Processes to use (default: the CPUs; large captures are split by flow).")
@click.option("--all", "show_all", is_flag=True, help="Show a waterfall for every request.")
@click.option("--limit", default=20, show_default=True, type=click.IntRange(0, None),
              help="Waterfalls to show (slowest and flagged).")
def replay(files: tuple[str, ...], named: tuple[str, ...], as_json: bool, reference: str | None,
           pod_cidr: str, service_cidr: str, entry_ports: tuple[int, ...], jobs: int | None,
           show_all: bool, limit: int) -> None:
    """Stitch per-node captures into per-request hop timings.

    One capture per node (pcap or pcapng; tcpdump -i any, dumpcap with
    named interfaces); the file's stem names the node:

        hopscope replay node1.pcapng node2.pcapng
    """
    pairs = node_files(files, named)
    cidrs = parse_cidrs(pod_cidr, service_cidr)
    if as_json:
        # requests are written as they are stitched: memory stays flat on big captures
        writer = JsonWriter(sys.stdout)
        res = run_replay(pairs, reference=reference, cidrs=cidrs, entry_ports=entry_ports,
                         warn=_warn, jobs=jobs, stream=True, emit=writer.request)
        writer.close(res.envelope)
        return
    res = run_replay(pairs, reference=reference, cidrs=cidrs, entry_ports=entry_ports,
                     warn=_warn, jobs=jobs)
    click.echo(render_envelope(res.envelope, max_requests=None if show_all else limit))
    click.echo("\n" + summary_line(res))
