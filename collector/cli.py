"""Command line of the collector path.

``hopscope collector serve``, ``hopscope agent ship``, and the queries
``hopscope trace|requests|stats|drops`` (against a running collector's
HTTP API with ``--collector URL`` / ``$HOPSCOPE_COLLECTOR``, or straight
from its SQLite file with ``--db PATH``).
"""

from __future__ import annotations

import asyncio
import http.client
import json
import logging
import os
import sqlite3
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from hopscope.collector import wire
from hopscope.collector.otlp import otlp_config
from hopscope.collector.server import Collector, CollectorConfig, api_get, parse_hostport
from hopscope.collector.store import SqliteStore, in_range, parse_duration

from hopscope.config import config_option
from hopscope.errors import HopscopeError, UsageError
from hopscope.render import drop_lines, fmt_ns, render_envelope, trace_text
from hopscope.replay import parse_cidrs

log = logging.getLogger(__name__)


class Duration(click.ParamType):
    """A duration option (``300ms``, ``10m``, ...; a bare number is seconds): checked when
    given (on the command line or in a config file, which then names the file and the
    key), kept as its text. ``absolute``: more than 12 digits alone are a wall-clock time
    in ns instead (``--since``, as the HTTP API's ``since``)."""

    name = "duration"

    def __init__(self, absolute: bool = False) -> None:
        self.absolute = absolute

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> str:
        text = str(value)
        try:
            if self.absolute and text.isdigit() and len(text) > 12:
                in_range(int(text), f"since {text}")
            else:
                parse_duration(text)
        except UsageError as exc:
            self.fail(str(exc), param, ctx)
        return text


DURATION = Duration()
SINCE = Duration(absolute=True)


# --------------------------------------------------------------------------
# hopscope collector serve


@click.group()
def collector() -> None:
    """The collector: receives the agents' observations, stitches and stores requests."""


@collector.command("serve")
@config_option
@click.option("--listen", default="127.0.0.1:7000", show_default=True, metavar="HOST:PORT",
              help="Where agents connect.")
@click.option("--token-file", required=True, type=click.Path(dir_okay=False),
              help="The shared token (chmod 600).")
@click.option("--db", "db", required=True, type=click.Path(dir_okay=False),
              help="The SQLite store (created if missing); raw batches go in DB.batches/.")
@click.option("--http", "http", default=None, metavar="HOST:PORT",
              help="Serve the JSON API here (e.g. 127.0.0.1:7001).")
@click.option("--tls-cert", type=click.Path(dir_okay=False), help="TLS certificate (PEM).")
@click.option("--tls-key", type=click.Path(dir_okay=False), help="TLS key (PEM).")
@click.option("--tls-client-ca", type=click.Path(dir_okay=False),
              help="Require agent certificates signed by this CA.")
@click.option("--reference", metavar="NODE", help="Clock reference node (default: the first "
              "node that sends).")
@click.option("--pod-cidr", default="10.42.0.0/16", show_default=True)
@click.option("--service-cidr", default="10.43.0.0/16", show_default=True)
@click.option("--entry-port", "entry_ports", multiple=True, type=click.IntRange(1, 65535),
              default=(80,), show_default=True)
@click.option("--idle-flush", default="5s", show_default=True, type=DURATION,
              help="Flush a node that sent nothing for this long.")
@click.option("--late-window", default="5m", show_default=True, type=DURATION,
              help="Keep a request stored incomplete this long: a node's data that comes "
                   "later (an agent that was cut off) completes it (0: off).")
@click.option("--retention", default="7d", show_default=True, type=DURATION,
              help="Keep stored requests and drops this long.")
@click.option("--max-db-bytes", default=1 << 30, show_default=True,
              type=click.IntRange(1 << 20, None),
              help="Prune the oldest requests and raw batches beyond this size (the"
                   " database and its segment files).")
@click.option("--raw-keep", default="15m", show_default=True, type=DURATION,
              help="Keep the agents' raw batches this long (re-stitched after a restart).")
@click.option("--feed-backlog", default=64 << 20, show_default=True,
              type=click.IntRange(1 << 20, None),
              help="Bytes of acked batches that may wait for the stitcher; above it, acks"
                   " wait (a burst is taken in at full speed up to this much).")
@click.option("--otlp-endpoint", default=None, metavar="URL",
              help="Export every stitched request as a trace, OTLP/HTTP protobuf (e.g. "
                   "http://tempo:4318; no path: /v1/traces). Off by default.")
@click.option("--otlp-header", "otlp_headers", multiple=True, metavar="KEY=VALUE",
              help="An HTTP header for the OTLP endpoint (repeatable), e.g. "
                   "'Authorization=Bearer TOKEN'.")
def serve(listen: str, token_file: str, db: str, http: str | None, tls_cert: str | None,
          tls_key: str | None, tls_client_ca: str | None, reference: str | None,
          pod_cidr: str, service_cidr: str, entry_ports: tuple[int, ...], idle_flush: str,
          late_window: str, retention: str, max_db_bytes: int, raw_keep: str,
          feed_backlog: int, otlp_endpoint: str | None, otlp_headers: tuple[str, ...]) -> None:
    """Receive agents' batches, stitch requests, store them, serve the JSON API.

    \b
        hopscope collector serve --listen 0.0.0.0:7000 --token-file token \\
            --db /var/lib/hopscope-collector/collector.db --http 127.0.0.1:7001
    """
    if bool(tls_cert) != bool(tls_key):
        raise UsageError("--tls-cert and --tls-key go together")
    if tls_client_ca and not tls_cert:
        raise UsageError("--tls-client-ca needs --tls-cert and --tls-key (mutual TLS is TLS "
                         "first); without them the agents' port would be plain TCP")
    ctx = wire.server_ssl_context(tls_cert, tls_key, ca=tls_client_ca) if tls_cert and tls_key \
        else None
    cfg = CollectorConfig(
        db=db, token=wire.read_token(token_file), listen=parse_hostport(listen, "--listen"),
        http=parse_hostport(http, "--http") if http else None, ssl_context=ctx,
        reference=reference, cidrs=parse_cidrs(pod_cidr, service_cidr),
        entry_ports=entry_ports, idle_flush=parse_duration(idle_flush) / 1e9,
        late_ns=parse_duration(late_window),
        max_age_ns=parse_duration(retention), max_bytes=max_db_bytes,
        raw_keep_ns=parse_duration(raw_keep), feed_backlog=feed_backlog,
        otlp=otlp_config(otlp_endpoint, otlp_headers))
    logging.getLogger("hopscope").setLevel(min(logging.getLogger().level, logging.INFO))
    asyncio.run(Collector(cfg).serve_forever())


# --------------------------------------------------------------------------
# hopscope agent ship


@click.group()
def agent() -> None:
    """The node agent."""


@agent.command("ship")
@click.option("--from-pcap", "capture", required=True, type=click.Path(dir_okay=False),
              help="The node's capture (pcap or pcapng).")
@click.option("--node", required=True, help="This node's name.")
@click.option("--collector", "collector_addr", required=True, metavar="HOST:PORT")
@click.option("--token-file", required=True, type=click.Path(dir_okay=False))
@click.option("--agent-id", default=None, help="Stable agent id (default hopscope-agent@NODE).")
@click.option("--spool", "spool_dir", default=None, type=click.Path(file_okay=False),
              help="Spool directory (default: a temporary one, lost at exit).")
@click.option("--spool-max", "spool_max", default=256 << 20, show_default=True,
              type=click.IntRange(1 << 16, None),
              help="Bytes the spool may hold; past that the oldest batches are dropped "
                   "(counted, and reported to the collector as lost).")
@click.option("--batch", default=1000, show_default=True, type=click.IntRange(1, 100_000),
              help="Observations per batch.")
@click.option("--wait", default="300s", show_default=True,
              help="After the capture: how long to keep trying to deliver the spool.")
@click.option("--pace", default="0s", show_default=True, help="Pause between batches.")
@click.option("--tls-ca", type=click.Path(dir_okay=False), help="Use TLS, verifying with this CA.")
@click.option("--tls-cert", type=click.Path(dir_okay=False), help="Client certificate.")
@click.option("--tls-key", type=click.Path(dir_okay=False), help="Client key.")
@click.option("--server-name", default=None, help="The collector's name in its certificate.")
def ship(capture: str, node: str, collector_addr: str, token_file: str, agent_id: str | None,
         spool_dir: str | None, spool_max: int, batch: int, wait: str, pace: str, tls_ca: str | None,
         tls_cert: str | None, tls_key: str | None, server_name: str | None) -> None:
    """Read a capture and send it to the collector, spooling while it is unreachable."""
    from hopscope.agent.ship import ShipConfig
    from hopscope.agent.ship import ship as run_ship

    host, port = parse_hostport(collector_addr, "--collector")
    _check_names(node, agent_id)
    ctx = wire.client_ssl_context(tls_ca, tls_cert, tls_key) if tls_ca or tls_cert else None
    cfg = ShipConfig(capture=capture, node=node, host=host, port=port,
                     token=wire.read_token(token_file), agent=agent_id or "",
                     spool_dir=spool_dir, spool_max=spool_max, batch=batch, ssl_context=ctx,
                     server_hostname=server_name, wait=parse_duration(wait) / 1e9,
                     pace=parse_duration(pace) / 1e9)
    res = asyncio.run(run_ship(cfg))
    click.echo(f"shipped {res.observations} observations in {res.batches} batches "
               f"(acked up to seq {res.acked}, {res.connects} connections)", err=True)


@agent.command("run")
@config_option
@click.option("--node", default=None, help="This node's name (default: the host name).")
@click.option("--local", is_flag=True, help="Stitch this node's requests here and print their "
              "waterfalls as they complete.")
@click.option("--out", "out", default=None, type=click.Path(dir_okay=False),
              help="On stop, write this node's stitched requests as a JSON envelope here.")
@click.option("--collector", "collector_addr", default=None, metavar="HOST:PORT",
              help="Ship observations to the collector.")
@click.option("--token-file", default=None, type=click.Path(dir_okay=False),
              help="The shared token (with --collector).")
@click.option("--spool", "spool_dir", default=None, type=click.Path(file_okay=False),
              help="Spool directory for batches the collector has not taken yet.")
@click.option("--spool-max", "spool_max", default=256 << 20, show_default=True,
              type=click.IntRange(1 << 16, None),
              help="Bytes the spool may hold; past that the oldest batches are dropped "
                   "(counted, and reported to the collector as lost).")
@click.option("--proxy", default="traefik", show_default=True,
              help="The proxy's process name (followed across restarts).")
@click.option("--proxy-calls", default="write,writev,connect", show_default=True,
              metavar="CALL,...",
              help="The proxy's syscalls to trace for the proxy sub-hop, of write, writev, "
                   "sendto, sendmsg, connect. Each one traced runs for every such call of "
                   "every process on the node: the default is Traefik's (Go writes with "
                   "write, connects with connect); a proxy that sends with send() or "
                   "sendmsg() needs sendto or sendmsg (HAProxy sends with send(): sendto).")
@click.option("--entry-port", default=80, show_default=True, type=click.IntRange(1, 65535))
@click.option("--sched", type=click.Choice(["batch", "normal"]), default="batch",
              show_default=True,
              help="How the agent's threads are scheduled: batch (SCHED_BATCH: the agent, "
                   "which drains its ring buffer on a timer, never preempts the node's work "
                   "when it wakes; its share of the CPU is the same) or normal.")
@click.option("--iface", "ifaces", multiple=True, metavar="NAME=POINT",
              help="Attach to these interfaces only (point nic, overlay, underlay, pod or "
                   "nic+underlay); default: found by role.")
@click.option("--duration", default="0s", show_default=True, type=DURATION,
              help="Stop after this long (0: until SIGTERM/SIGINT).")
@click.option("--record", default=None, type=click.Path(dir_okay=False),
              help="Also write every observation here, for offline stitching "
                   "(hopscope.agent.run.read_record): msgpack, or wire v3 batches when the "
                   "events are shipped raw.")
@click.option("--source", type=click.Choice(["auto", "tc", "capture"]), default="auto",
              show_default=True,
              help="Where packets come from: tc classifiers (BPF), AF_PACKET capture (no BPF "
                   "at all), or auto: tc, and capture when the BPF programs cannot load.")
@click.option("--slow-pcap", default=None, type=click.Path(file_okay=False),
              help="Write the packets of every request slower than --slower-than, from the "
                   "rolling packet buffer, to DIR/NODE-REQUESTID.pcapng.")
@click.option("--slower-than", default="500ms", show_default=True, type=DURATION,
              help="What --slow-pcap calls slow (the request's total).")
@click.option("--packet-buffer", default=20_000, show_default=True,
              type=click.IntRange(100, 10_000_000),
              help="Recent packets kept for --slow-pcap (headers; payload of message starts).")
@click.option("--no-kprobes", is_flag=True,
              help="Do not use kprobes even where the kernel has them (netfilter time and "
                   "verdict, IPVS's choice).")
@click.option("--decode-here", is_flag=True,
              help="Decode the events on this node and ship observations (wire v2), for a "
                   "collector older than this agent. Default: when only the collector or "
                   "--record takes them, ship the ring buffer's records as they are (wire v3, "
                   "decoded by the collector: less CPU here).")
@click.option("--ready-file", default=None, type=click.Path(dir_okay=False), hidden=True)
def run_cmd(node: str | None, local: bool, out: str | None, collector_addr: str | None,
            token_file: str | None, spool_dir: str | None, spool_max: int, proxy: str,
            proxy_calls: str, entry_port: int, sched: str,
            ifaces: tuple[str, ...], duration: str, record: str | None, source: str,
            slow_pcap: str | None, slower_than: str, packet_buffer: int, no_kprobes: bool,
            decode_here: bool, ready_file: str | None) -> None:
    """Probe this node with eBPF (tc classifiers and tracepoints) until stopped.

    Must run as root (or with the unit's capabilities) in the node's network
    namespace. Everything attached is detached on SIGTERM/SIGINT; filters a
    killed agent left are removed at start.
    """
    import socket as _socket

    from hopscope.agent.bpfprog import PROXY_CALLS
    from hopscope.agent.run import AgentConfig, print_request, run_agent
    from hopscope.agent.ship import ShipConfig

    from hopscope.errors import PrivilegeError, UsageError

    if os.geteuid() != 0:
        raise PrivilegeError("agent run needs root (BPF, tc, tracefs): run it with sudo or as "
                             "the hopscope-agent service")
    for path, opt in ((out, "--out"), (record, "--record")):
        if path:
            _check_writable(path, opt)
    node = node or _socket.gethostname()
    _check_names(node, None)
    calls = tuple(dict.fromkeys(c.strip() for c in proxy_calls.split(",") if c.strip()))
    bad = [c for c in calls if c not in PROXY_CALLS]
    if bad or not calls:
        raise UsageError(f"--proxy-calls {proxy_calls!r}: expected a comma-separated list of "
                         f"{', '.join(PROXY_CALLS)}")
    override = {}
    for item in ifaces:
        name, sep, point = item.partition("=")
        if not sep or point not in ("nic", "overlay", "underlay", "pod", "nic+underlay"):
            raise UsageError(f"--iface {item!r}: expected NAME=POINT with POINT one of nic, "
                             "overlay, underlay, pod, nic+underlay")
        override[name] = point
    shipcfg = None
    if collector_addr:
        if not token_file:
            raise UsageError("--collector needs --token-file")
        host, port = parse_hostport(collector_addr, "--collector")
        shipcfg = ShipConfig(capture="", node=node, host=host, port=port,
                             token=wire.read_token(token_file), spool_dir=spool_dir,
                             spool_max=spool_max)
    if not (local or out or shipcfg or record or slow_pcap):
        raise UsageError("say where the observations go: --local, --out FILE, --record FILE, "
                         "--slow-pcap DIR or --collector")
    if slow_pcap:
        try:
            os.makedirs(slow_pcap, exist_ok=True)
        except OSError as exc:
            raise UsageError(f"--slow-pcap {slow_pcap}: {exc.strerror}") from None
    cfg = AgentConfig(node=node, local=local, out=out, proxy=proxy, proxy_calls=calls,
                      entry_port=entry_port, sched=sched,
                      interfaces=override, duration=parse_duration(duration) / 1e9,
                      ship=shipcfg, ready_file=ready_file, record=record, source=source,
                      slow_pcap=slow_pcap, slower_than_ns=parse_duration(slower_than),
                      packet_buffer=packet_buffer, kprobes=not no_kprobes,
                      decode_here=decode_here)
    agent = run_agent(cfg, print_request if local else None, handoff=True)
    st = agent.final_stats
    per = ", ".join(f"{k[:-5]} {v}/{st.get(k[:-5] + '_lost', 0)}" for k, v in st.items()
                    if k.endswith("_sent") and k != "flood_sent")
    pcaps = f"; {agent.exported} slow requests written to {slow_pcap}" if slow_pcap else ""
    raw = f" and {agent.raw_records} events shipped raw" if agent.raw else ""
    left = ""
    if agent.ship is not None and agent.ship.left:
        left = (f"; {agent.ship.left} batches not acked by the collector, "
                + (f"kept in {agent.ship.kept_in}" if agent.ship.kept_in else "lost"))
    click.echo(f"agent {node}: {agent.observations} observations{raw}, "
               f"{agent.nrequests} requests; events sent/lost: {per}{pcaps}{left}", err=True)


def _check_names(node: str, agent_id: str | None) -> None:
    """The names the hello frame carries, checked here: the collector's refusal of them
    would be retried until the agent's deadline."""
    from hopscope.agent.ship import default_agent_id

    wire.check_name(node, "--node")
    if agent_id is None:
        wire.check_name(default_agent_id(node), "--node (in the agent id)")
    else:
        wire.check_name(agent_id, "--agent-id")


def _check_writable(path: str, opt: str) -> None:
    """Refuse ``opt PATH`` now when nothing can be written there (not at the stop, with the
    run's results in hand): a file is made and removed beside it."""
    parent = Path(path).resolve().parent
    probe = parent / f".{Path(path).name}.hopscope-check-{os.getpid()}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        raise UsageError(f"{opt} {path}: cannot write in {parent}: "
                         f"{exc.strerror or exc}") from None
    os.close(fd)
    os.unlink(probe)


@agent.command("cleanup")
def cleanup_cmd() -> None:
    """Remove the tc filters a killed agent left in this network namespace.

    Found by name (hopscope-in/hopscope-out); other filters are not touched.
    The agent does this at start, and the systemd unit after every stop
    (ExecStopPost), so that a crashed agent leaves no classifier behind.
    """
    from hopscope.agent.bpfprog import remove_stale

    n = remove_stale()  # AgentError (one line) when some could not be removed
    click.echo(f"removed {n} hopscope tc filter(s) a previous agent left" if n
               else "no hopscope tc filters left", err=True)


# --------------------------------------------------------------------------
# queries


class _Source:
    """GET on the collector's API, or on its database directly; each answer checked to be
    what this version's commands read (a JSON object holding ``key``'s list)."""

    def __init__(self, collector_url: str | None, db: str | None) -> None:
        ctx = click.get_current_context(silent=True)
        if db and collector_url and ctx is not None and ctx.get_parameter_source(
                "collector_url") == click.core.ParameterSource.COMMANDLINE:
            raise UsageError("give --collector URL or --db PATH, not both")
        # (a --db given with $HOPSCOPE_COLLECTOR set reads the database)
        self.store: SqliteStore | None = None
        if db:
            self.store = SqliteStore(db, readonly=True)
            self.where = db
            return
        if not collector_url:
            raise UsageError("say where to read: --collector URL (or $HOPSCOPE_COLLECTOR) or "
                             "--db PATH")
        base = collector_url if "://" in collector_url else f"http://{collector_url}"
        scheme = urllib.parse.urlsplit(base).scheme
        if scheme not in ("http", "https"):
            raise UsageError(f"--collector {collector_url}: the collector's API is HTTP: give "
                             "http://HOST:PORT (its --http address)")
        self.where = base.rstrip("/")

    def get(self, target: str, key: str) -> dict[str, Any]:
        body = self._local(target) if self.store is not None else self._remote(target)
        if not isinstance(body, dict) or not isinstance(body.get(key), list):
            raise HopscopeError(
                f"{self.where}: the answer to {target.split('?')[0]} holds no {key!r} list: "
                "not a hopscope collector's API, or one of another version")
        return body

    def _local(self, target: str) -> Any:
        assert self.store is not None
        try:
            status, body = api_get(self.store, target)
        except sqlite3.Error as exc:
            raise HopscopeError(f"database {self.where}: {exc}: a store of another hopscope "
                                "version?") from None
        if status != 200:
            # a bad parameter is bad usage (exit 2), as the same answer over HTTP is
            err = UsageError if status == 400 else HopscopeError
            raise err(f"{self.where}: {body.get('error', f'HTTP {status}')}")
        return body

    def _remote(self, target: str) -> Any:
        url = self.where + target
        try:
            with urllib.request.urlopen(url, timeout=30) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            try:
                msg = json.loads(exc.read()).get("error", "")
            except (ValueError, AttributeError):
                msg = ""
            # 400: a parameter the collector refused, bad usage (exit 2) as with --db
            err = UsageError if exc.code == 400 else HopscopeError
            raise err(f"{url}: HTTP {exc.code}{': ' + msg if msg else ''}") from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise HopscopeError(f"cannot reach the collector at {self.where}: {reason} (is it "
                                "running, and is this its --http address?)") from None
        except (http.client.HTTPException, ValueError) as exc:
            # BadStatusLine: something that is not HTTP answered (the agents' port?)
            said = ascii(" ".join(str(exc).split())[:60])  # bytes of another protocol
            raise UsageError(  # the wrong address given, as a --db that is no store
                f"{self.where}: not the collector's HTTP API ({type(exc).__name__}: "
                f"{said}): give its --http address, not the agents' --listen port") from None

    def render(self, fn: Callable[[], str]) -> str:
        """``fn()``, an answer this version cannot lay out named as such (one line)."""
        try:
            return fn()
        except (KeyError, TypeError, AttributeError, ValueError, IndexError) as exc:
            raise HopscopeError(f"{self.where}: an answer this hopscope cannot read "
                                f"({type(exc).__name__}: {exc}): a collector of another "
                                "version?") from None


def _where(f: Callable[..., Any],
           json_help: str = "Print the hop-model JSON envelope.") -> Callable[..., Any]:
    f = click.option("--collector", "collector_url", envvar="HOPSCOPE_COLLECTOR",
                     metavar="URL", help="The collector's HTTP API (env HOPSCOPE_COLLECTOR).")(f)
    f = click.option("--db", "db", type=click.Path(dir_okay=False),
                     help="Read the collector's SQLite store directly.")(f)
    f = click.option("--json", "as_json", is_flag=True, help=json_help)(f)
    return f


def _since(default: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def deco(f: Callable[..., Any]) -> Callable[..., Any]:
        return _since_opts(f, default)
    return deco


def _since_opts(f: Callable[..., Any], default: str) -> Callable[..., Any]:
    f = click.option("--anchor", type=click.Choice(["auto", "now", "newest"]), default="auto",
                     show_default=True, help="What --since counts back from: now, the newest "
                     "stored request, or auto (now, unless nothing stored is that recent).")(f)
    return click.option("--since", default=default, show_default=True, type=SINCE,
                        help="How far back: 10m, 1h, 2d (a bare number: seconds); or from "
                        "when: a wall-clock time in ns (more than 12 digits).")(f)


def _qs(**kw: Any) -> str:
    return urllib.parse.urlencode({k: v for k, v in kw.items() if v is not None and v != ""})


def _dump(body: dict[str, Any]) -> None:
    click.echo(json.dumps(body, indent=1))


@click.command()
@click.argument("request_id")
@_where
def trace(request_id: str, collector_url: str | None, db: str | None, as_json: bool) -> None:
    """One request's hops (a waterfall), and the clock offsets they were corrected with."""
    if not request_id.strip():
        raise UsageError("empty request id: give one from `hopscope requests` (its cf-ray)")
    src = _Source(collector_url, db)
    env = src.get("/trace/" + urllib.parse.quote(request_id, safe=""), "requests")
    if as_json:
        _dump(env)
        return
    click.echo(src.render(lambda: trace_text(env)))


@click.command()
@_where
@_since("10m")
@click.option("--slower-than", default=None, type=DURATION,
              help="Only requests slower than this (300ms, 1.5s; a bare number: seconds).")
@click.option("--path", default=None, help="Only this path (whatever its query string, unless "
              "it has one; a prefix when it ends with *).")
@click.option("--status", default=None, help="Only this status class or code (5xx, 503).")
@click.option("--node", default=None, help="Only requests through this node.")
@click.option("--limit", default=100, show_default=True, type=click.IntRange(0, None),
              help="At most this many (the newest).")
def requests(collector_url: str | None, db: str | None, as_json: bool, since: str, anchor: str,
             slower_than: str | None, path: str | None, status: str | None, node: str | None,
             limit: int) -> None:
    """Stored requests, filtered; waterfalls and the per-hop table."""
    slower = str(parse_duration(slower_than)) if slower_than else None
    src = _Source(collector_url, db)
    env = src.get("/requests?" + _qs(
        since=since, anchor=anchor, slower_than=slower, path=path, status=status, node=node,
        limit=limit), "requests")
    if as_json:
        _dump(env)
        return
    click.echo(src.render(lambda: render_envelope({**env, "clock_offsets": {}},
                                                  max_requests=None)))


def _where_stats(f: Callable[..., Any]) -> Callable[..., Any]:
    return _where(f, 'Print the table as JSON: {"by", "since_ns", "hops": [{"name", "dir", '
                     '"count", "p50", "p90", "p99", "max"}]} (ns; a sub-hop\'s row also has '
                     '"parent", the hops above it: "ingress").')


@click.command()
@_where_stats
@_since("1h")
@click.option("--by", type=click.Choice(["node", "path"]), default=None,
              help="One table per node (the hop's) or per path.")
def stats(collector_url: str | None, db: str | None, as_json: bool, since: str, anchor: str,
          by: str | None) -> None:
    """Per-hop latency: count, p50, p90, p99, max."""
    src = _Source(collector_url, db)
    body = src.get("/stats?" + _qs(since=since, anchor=anchor, by=by), "hops")
    if as_json:
        _dump(body)
        return
    rows = body["hops"]
    if not rows:
        click.echo("No requests stored in that window.")
        return
    click.echo(src.render(lambda: _stats_text(rows, by)))


def _indent(parent: str) -> str:
    """Two spaces a level: a sub-hop of ``ingress`` one, of ``ingress/kernel_in`` two."""
    return "  " * (parent.count("/") + 1) if parent else ""


def _stats_text(rows: list[dict[str, Any]], by: str | None) -> str:
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(str(r.get(by, "")) if by else "", []).append(r)
    out = []
    for g, rs in groups.items():
        table = [("hop", "dir", "count", "p50", "p90", "p99", "max")]
        # sub-hops indented under their hop, as replay's and requests' tables have them
        table += [(_indent(r.get("parent", "")) + r["name"], r["dir"], str(r["count"]),
                   fmt_ns(r["p50"]), fmt_ns(r["p90"]), fmt_ns(r["p99"]), fmt_ns(r["max"]))
                  for r in rs]
        widths = [max(len(t[i]) for t in table) for i in range(7)]
        lines = [f"{by} {g}:"] if by else []
        for j, t in enumerate(table):
            lines.append("  ".join(c.ljust(widths[i]) if i < 2 else c.rjust(widths[i])
                                   for i, c in enumerate(t)).rstrip())
            if j == 0:
                lines.append("  ".join("-" * w for w in widths))
        out.append("\n".join(lines))
    return "\n\n".join(out)


@click.command()
@_where
@_since("1h")
def drops(collector_url: str | None, db: str | None, as_json: bool, since: str,
          anchor: str) -> None:
    """Drops: connection attempts unanswered, requests without a response."""
    src = _Source(collector_url, db)
    env = src.get("/drops?" + _qs(since=since, anchor=anchor), "drops")
    if as_json:
        _dump(env)
        return
    ds = env["drops"]
    if not ds:
        click.echo("No drops in that window.")
        return
    click.echo(src.render(lambda: drop_lines(ds)))

