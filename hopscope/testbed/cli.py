"""``hopscope testbed ...``.

Commands here: ``up``, ``down``, ``status``, ``traffic``. ``fault`` and
``capture`` come from :mod:`hopscope.testbed.faults` (``fault_group``) and
:mod:`hopscope.testbed.capture` (``capture_cmd``) when those modules exist:
see :func:`_register_optional` at the end of this file.
"""

from __future__ import annotations

import importlib
import json
import logging
import sys

import click

from hopscope.errors import HopscopeError, UsageError
from hopscope.testbed import build
from hopscope.testbed.topology import DEFAULT_PREFIX, load_instance

log = logging.getLogger(__name__)

prefix_option = click.option(
    "--prefix", default=DEFAULT_PREFIX, show_default=True,
    help="Namespace prefix of the replica (lets several replicas coexist).",
)


@click.group()
def testbed() -> None:
    """A network replica of the cluster in namespaces: edge, UFW, Traefik, kube-proxy, VXLAN, pods."""


@testbed.command()
@prefix_option
@click.option("--json", "as_json", is_flag=True, help="Print the state as JSON.")
@click.option("--service-ms", type=float, default=0.0, show_default=True,
              help="Service time of the api pods (changeable at run time).")
@click.option("--access-log/--no-access-log", default=True, show_default=True,
              help="Traefik access logs (JSON, with CF-Ray) in the run directory.")
@click.option("--dial-timeout", type=click.FloatRange(0.1, 300), default=build.DIAL_TIMEOUT_S,
              show_default=True, help="Traefik's upstream dial timeout, seconds (Traefik's own "
              "default, as on the cluster, is 30).")
@click.option("--service-proxy", type=click.Choice(build.SERVICE_PROXIES), default="iptables",
              show_default=True, help="kube-proxy's mode: iptables DNAT chains, or IPVS "
              "(a kernel with ip_vs: the test VM, production nodes).")
def up(prefix: str, as_json: bool, service_ms: float, access_log: bool,
       dial_timeout: float, service_proxy: str) -> None:
    """Build the replica (root). Refuses when one with this prefix is already up."""
    if not 0 <= service_ms <= 60_000:  # (nan too)
        raise UsageError(f"--service-ms {service_ms:g}: give 0 to 60000 ms")
    inst = build.up(prefix, service_ms=service_ms, access_log=access_log,
                    progress=build._stderr_progress, dial_timeout_s=dial_timeout,
                    service_proxy=service_proxy)
    if as_json:
        click.echo(json.dumps(inst.to_dict(), indent=2))
    else:
        t = inst.topology
        click.echo(f"testbed {inst.prefix} up in {inst.up_seconds:.1f} s; state "
                   f"{build.state_path(inst.prefix)}, logs in {inst.run_dir}")
        for n in t.nodes:
            pods = ", ".join(f"{p.name} {p.ip}" for p in t.pods_on(n.name))
            click.echo(f"  {n.name:6} ns {t.ns(n.name):12} eth0 {n.public_ip:15} "
                       f"eth1 {n.private_ip or '-':15} pods: {pods}")
        click.echo(f"  edge   ns {t.ns('edge'):12} {t.edge_ip}; Service api "
                   f"{t.cluster_ip}:{t.service_port}")


@testbed.command()
@prefix_option
def down(prefix: str) -> None:
    """Remove the replica: namespaces, processes, run directory (also after a partial up)."""
    res = build.down(prefix, progress=build._stderr_progress)
    click.echo(f"testbed {res['prefix']} down: {len(res['namespaces'])} namespaces, "
               f"{len(res['pids'])} processes removed in {res['seconds']:.1f} s")


@testbed.command()
@prefix_option
@click.option("--json", "as_json", is_flag=True, help="Print the state as JSON.")
def status(prefix: str, as_json: bool) -> None:
    """Show what runs: namespaces, processes, a request through each node."""
    st = build.status(prefix)
    if as_json:
        click.echo(json.dumps(st, indent=2))
        return
    if not st["up"]:
        extra = f" (stray namespaces: {', '.join(st['stray_namespaces'])})" \
            if st["stray_namespaces"] else ""
        click.echo(f"testbed {st['prefix']}: down{extra}")
        sys.exit(1 if st["stray_namespaces"] else 0)
    click.echo(f"testbed {st['prefix']}: {'healthy' if st['healthy'] else 'UNHEALTHY'} "
               f"(phase {st['phase']}, run dir {st['run_dir']})")
    for ns in st["namespaces"].values():
        click.echo(f"  ns {ns['ns']:14} {'ok' if ns['exists'] else 'MISSING'}")
    for name, p in st["processes"].items():
        click.echo(f"  {name:16} pid {p['pid']:<8} {'running' if p['alive'] else 'DEAD'}")
    for node, r in st["http"].items():
        click.echo(f"  edge -> {node}: HTTP {r.get('status')} {r.get('served_by', '')}"
                   f"{' ' + r['error'] if r.get('error') else ''}")
    if not st["probed"]:
        click.echo("  (requests through the nodes not tried: that needs root)")
    if not st["healthy"]:
        sys.exit(1)


@testbed.command()
@prefix_option
@click.option("--count", type=int, default=None, help="Requests to send (default 100).")
@click.option("--duration", type=float, default=None, help="Seconds to send for.")
@click.option("--concurrency", type=int, default=4, show_default=True)
@click.option("--post-ratio", type=float, default=0.5, show_default=True)
@click.option("--new-conn-ratio", type=float, default=0.1, show_default=True,
              help="Probability of opening a new connection before a request.")
@click.option("--node", "node", default="all", show_default=True,
              help="Node to send to (node1, node2, node3) or 'all' (round robin per connection).")
@click.option("--timeout", type=float, default=35.0, show_default=True,
              help="Per-request timeout, seconds.")
@click.option("--out", type=click.Path(dir_okay=False), default=None,
              help="Write one JSON line per request here.")
@click.option("--seed", type=int, default=None, help="Random seed (reproducible mix).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def traffic(prefix: str, count: int | None, duration: float | None, concurrency: int,
            post_ratio: float, new_conn_ratio: float, node: str, timeout: float,
            out: str | None, seed: int | None, as_json: bool) -> None:
    """Send bounded Cloudflare-style HTTP/1.1 load from the edge namespace."""
    from hopscope.testbed.traffic import TrafficConfig, run_traffic

    if count is not None and duration is not None:
        raise UsageError("give --count or --duration, not both")
    inst = load_instance(prefix)
    nodes = [] if node == "all" else [n.strip() for n in node.split(",") if n.strip()]
    cfg = TrafficConfig(count=count, duration=duration, concurrency=concurrency,
                        post_ratio=post_ratio, new_conn_ratio=new_conn_ratio, nodes=nodes,
                        timeout=timeout, seed=seed)
    res = run_traffic(inst.topology, cfg, out=out)
    if as_json:
        click.echo(json.dumps(res.summary(), indent=2))
    else:
        click.echo(res.text())
        if out:
            click.echo(f"  records: {out}")


@testbed.command("agents")
@prefix_option
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Directory for each agent's log, envelope and observations.")
@click.option("--count", type=click.IntRange(0, None), default=60, show_default=True,
              help="Requests to send while the agents run (0: none, wait for Ctrl-C or "
                   "SIGTERM).")
@click.option("--node", "node", default="all", show_default=True,
              help="Node to send to, or 'all'.")
@click.option("--json", "as_json", is_flag=True, help="Print the stitched envelope as JSON.")
def agents_cmd(prefix: str, out_dir: str, count: int, node: str, as_json: bool) -> None:
    """Run the live agent on every node (each in its namespace), send traffic, stop them
    (they detach), and stitch what all of them saw into one report."""
    import signal
    import time
    from pathlib import Path

    from hopscope.render import render_envelope
    from hopscope.testbed.agents import running_agents, stitch_records
    from hopscope.testbed.netns import require_root
    from hopscope.testbed.traffic import TrafficConfig, run_traffic

    require_root("testbed agents")
    inst = load_instance(prefix)
    names = [n.name for n in inst.topology.nodes]
    if node != "all" and node not in names:
        raise UsageError(f"--node {node}: the replica's nodes are {', '.join(names)} (or all)")
    try:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"--out {out_dir}: {exc.strerror or exc}") from None
    stop: list[int] = []

    def on_term(_sig: int, _frame: object) -> None:
        if count > 0:  # mid-traffic: unwind, the agents are stopped (detached) on the way
            raise KeyboardInterrupt
        stop.append(1)

    signal.signal(signal.SIGTERM, on_term)
    with running_agents(inst, Path(out_dir)) as agents:
        click.echo(f"agents running on {', '.join(names)} (logs in {out_dir})", err=True)
        if count > 0:
            nodes = [] if node == "all" else [node]
            res = run_traffic(inst.topology, TrafficConfig(count=count, concurrency=2,
                                                           nodes=nodes, seed=1))
            click.echo(res.text(), err=True)
        else:
            signal.signal(signal.SIGINT, lambda *_: stop.append(1))
            while not stop:
                time.sleep(0.2)
    env = stitch_records(agents, names)
    if as_json:
        click.echo(json.dumps(env))
    else:
        click.echo(render_envelope(env))


# -- registration hooks for the fault and capture commands -------------------------------
#: (module, attribute) pairs added to the ``testbed`` group when importable.
OPTIONAL_COMMANDS = (
    ("hopscope.testbed.faults", "fault_group"),
    ("hopscope.testbed.capture", "capture_cmd"),
)


def _register_optional() -> None:
    for mod_name, attr in OPTIONAL_COMMANDS:
        try:
            mod = importlib.import_module(mod_name)
        except ModuleNotFoundError as exc:
            if exc.name != mod_name:  # the module exists but one of its imports is missing
                log.debug("cannot import %s: %s", mod_name, exc)
            continue
        except (ImportError, HopscopeError) as exc:
            log.warning("testbed command from %s not available: %s", mod_name, exc)
            continue
        cmd = getattr(mod, attr, None)
        if isinstance(cmd, click.Command):
            testbed.add_command(cmd)


_register_optional()
