"""``hopscope demo``: the replica, live agents, traffic with faults, a report.

What it does, in about a minute (root):

1. builds the network replica (:mod:`hopscope.testbed`) under its own prefix;
2. starts the live agent (``hopscope agent run``) on every node, inside the
   node's namespace, and captures every node's interfaces beside it;
3. sends Cloudflare-style traffic: a clean phase, then a phase with a 20 ms
   hold in node2's INPUT chain before UFW (``fault delay --at ufw``), then a
   few connection attempts to node3 while UFW denies HTTP there
   (``fault ufw-deny-http``);
4. stitches what the agents saw (with the ``kernel_in``/``proxy``/
   ``service_nat`` sub-hops and the kernel's drop reasons), replays the
   captures through the same stitcher as a cross-check, prints a few
   waterfalls, the per-hop table and the drops, and says what they show;
5. tears the replica down, whatever happened.

When the agents cannot run here (no BPF, say), the report comes from the
captures alone and says so.
"""

from __future__ import annotations

import contextlib
import logging
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from hopscope.errors import HopscopeError, PrivilegeError, TestbedError
from hopscope.render import drop_lines, fmt_ns, hop_table, waterfall
from hopscope.replay import replay

log = logging.getLogger(__name__)

DEMO_PREFIX = "hsdemo-"
DELAY_NODE = "node2"
DELAY_MS = 20
DENY_NODE = "node3"


def _say(msg: str) -> None:
    click.echo(click.style("==> ", fg="cyan", bold=True) + msg, err=True)


def run_demo(out_dir: Path, prefix: str = DEMO_PREFIX, requests: int = 150,
             say: Callable[[str], None] = _say) -> dict[str, Any]:
    """Run the whole demo. Returns ``{"agents": envelope | None, "replay": envelope,
    "agents_error": str}``: what the live agents stitched, and the captures' replay."""
    if os.geteuid() != 0:
        raise PrivilegeError("hopscope demo builds network namespaces: run it as root "
                             "(sudo ./dev.sh demo)")
    from hopscope.testbed import build, faults
    from hopscope.testbed.agents import AgentSet, running_agents, stitch_records
    from hopscope.testbed.capture import capturing
    from hopscope.testbed.traffic import TrafficConfig, run_traffic

    # A demo killed earlier may have left its replica: remove it first.
    build.down(prefix)
    t0 = time.monotonic()
    say("building the replica: edge, 3 nodes (UFW, Traefik, kube-proxy, flannel VXLAN), 3 api pods")
    agents_env: dict[str, Any] | None = None
    agents_error = ""
    with build.replica(prefix, access_log=False) as inst:
        say(f"replica up in {time.monotonic() - t0:.1f} s; starting the agent on every node")
        topo = inst.topology
        nodes = [n.name for n in topo.nodes]
        with contextlib.ExitStack() as stack:
            agents: AgentSet | None = None
            try:
                agents = stack.enter_context(running_agents(inst, out_dir / "agents"))
                say("agents attached (tc classifiers, tracepoints); capturing every node's "
                    "interfaces beside them")
            except HopscopeError as exc:
                agents_error = str(exc)
                say(f"the agents could not start ({exc}); going on with captures alone")
            cap = stack.enter_context(capturing(inst, out_dir))
            say(f"phase 1: {requests} requests from the edge to all nodes, no fault")
            run_traffic(topo, TrafficConfig(count=requests, concurrency=4, new_conn_ratio=0.2,
                                            seed=1))
            say(f"phase 2: UFW on {DELAY_NODE} holds HTTP packets {DELAY_MS} ms "
                f"(fault delay --at ufw); {requests // 2} more requests")
            faults.add_delay(inst, "ufw", DELAY_NODE, DELAY_MS)
            try:
                run_traffic(topo, TrafficConfig(count=requests // 2, concurrency=4,
                                                new_conn_ratio=0.5, seed=2))
            finally:
                faults.clear(inst)
            say(f"phase 3: UFW on {DENY_NODE} denies 80/tcp (fault ufw-deny-http); "
                "2 connection attempts")
            faults.add_ufw_deny_http(inst, DENY_NODE)
            try:
                run_traffic(topo, TrafficConfig(count=2, concurrency=2, new_conn_ratio=1.0,
                                                nodes=[DENY_NODE], timeout=4.0,
                                                connect_timeout=3.5, seed=3))
            finally:
                faults.clear(inst)
        # the agents have stopped (detached) and the captures are closed here
        if agents is not None:
            say("stitching what the agents saw")
            agents_env = stitch_records(agents, nodes)
        files = cap.result.files if cap.result is not None else []
        say("replaying the captures as a cross-check: " + ", ".join(str(f) for f in files))
        rep = replay([(f.name.split(".")[0], f) for f in files], progress=False).envelope
    say(f"replica torn down; {time.monotonic() - t0:.1f} s in all")
    return {"agents": agents_env, "replay": rep, "agents_error": agents_error}


def agreement(a: dict[str, Any], b: dict[str, Any]) -> tuple[int, int, int]:
    """(requests compared, hops compared, largest difference in ns) of two envelopes' shared
    requests, over the top-level hops both have in the same order."""
    by_b = {r["request_id"]: r for r in b["requests"]}
    nreq = nhops = worst = 0
    for r in a["requests"]:
        o = by_b.get(r["request_id"])
        if o is None or [(h["name"], h["node"]) for h in r["hops"]] != [
                (h["name"], h["node"]) for h in o["hops"]]:
            continue
        nreq += 1
        for x, y in zip(r["hops"], o["hops"], strict=True):
            nhops += 1
            worst = max(worst, abs(x["duration_ns"] - y["duration_ns"]))
    return nreq, nhops, worst


def report(res: dict[str, Any]) -> str:
    """Waterfalls worth seeing, the per-hop table, drops, and what they show."""
    env = res["agents"] or res["replay"]
    live = res["agents"] is not None
    reqs = env["requests"]
    parts: list[str] = []

    def ingress(r: dict[str, Any]) -> int:
        return next((h["duration_ns"] for h in r["hops"] if h["name"] == "ingress"), 0)

    cross = [r for r in reqs if r["pod_node"] and r["pod_node"] != r["ingress_node"]
             and "incomplete" not in r["flags"]]
    delayed = [r for r in reqs if r["ingress_node"] == DELAY_NODE and ingress(r) > DELAY_MS * 500_000]
    shown: list[dict[str, Any]] = []
    if cross:
        shown.append(cross[len(cross) // 2])
    if delayed:
        shown.append(delayed[len(delayed) // 2])
    same = [r for r in reqs if r["pod_node"] == r["ingress_node"] and r not in shown]
    if same:
        shown.append(same[0])
    src = ("the agents (eBPF: tc classifiers and tracepoints)" if live
           else "the captures (the agents did not run: " + res.get("agents_error", "") + ")")
    parts.append(f"Requests as stitched from {src}:")
    for r in shown:
        parts.append(waterfall(r))
    parts.append(f"Per-hop latency over {len(reqs)} requests:\n{hop_table(reqs)}")
    drops = env["drops"]
    if drops:
        parts.append(drop_lines(drops))
    others = [r for r in reqs if r["ingress_node"] != DELAY_NODE]
    lines = []
    if delayed and others:
        moved = _largest_other_shift(delayed, others)
        lines.append(
            f"UFW's {DELAY_MS} ms hold on {DELAY_NODE} shows up in `ingress` of the requests that "
            f"entered {DELAY_NODE} (median {fmt_ns(_median(delayed, 'ingress'))} vs "
            f"{fmt_ns(_median(others, 'ingress'))} elsewhere); the other hops' medians moved by "
            f"{fmt_ns(moved)} at most.")
        if live:
            lines.append(
                f"Inside `ingress`, the agents put it in `kernel_in` (NIC to the proxy's socket: "
                f"median {fmt_ns(_median(delayed, 'kernel_in'))} vs "
                f"{fmt_ns(_median(others, 'kernel_in'))} elsewhere), not in the proxy "
                f"({fmt_ns(_median(delayed, 'proxy'))} vs {fmt_ns(_median(others, 'proxy'))}).")
    syn = [d for d in drops if d["kind"] == "syn_unanswered"]
    if syn:
        why = {d["reason"] for d in syn if d.get("reason")}
        rules = {d["rule"] for d in syn if d.get("rule")}
        lines.append(f"The connection attempts to {DENY_NODE} died at its NIC: SYNs never answered "
                     f"({sum(d['packets'] for d in syn)} packets), which is what a UFW deny looks "
                     "like" + (f"; the kernel's drop reason: {', '.join(sorted(why))}" if why
                               else "")
                     + (f", by the rule {'; '.join(sorted(rules))}." if rules else "."))
    if live:
        nreq, nhops, worst = agreement(env, res["replay"])
        lines.append(f"Cross-check: the replay of the captures agrees with the agents on {nreq} "
                     f"requests ({nhops} hops), within {fmt_ns(worst)} at most.")
    if lines:
        parts.append("What this shows:\n  " + "\n  ".join(lines))
    return "\n\n".join(parts)


def _median(reqs: list[dict[str, Any]], hop: str) -> int:
    """The median of a hop (or of a sub-hop of ``ingress``) over requests."""
    vals = [h["duration_ns"] for r in reqs for top in r["hops"]
            for h in (top, *(top.get("children") or ())) if h["name"] == hop]
    return int(statistics.median(vals)) if vals else 0


def _largest_other_shift(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> int:
    """The largest change of a median, between two sets of requests, over hops other than ingress."""
    names = {h["name"] for r in a for h in r["hops"]} & {h["name"] for r in b for h in r["hops"]}
    names -= {"ingress", "edge_rtt"}
    return max((abs(_median(a, n) - _median(b, n)) for n in names), default=0)


@click.command()
@click.option("--requests", default=150, show_default=True, help="Requests in the clean phase.")
@click.option("--keep", "keep_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Keep the captures and the agents' records and logs in this directory "
                   "(default: a temporary one, removed).")
@click.option("--prefix", default=DEMO_PREFIX, show_default=True,
              help="Namespace prefix of the demo's replica (a replica left under it by a "
                   "killed demo is removed first).")
@click.option("--json", "as_json", is_flag=True, help='Print {"agents": envelope, "replay": envelope, "agents_error": ""} '
                   "as JSON instead.")
def demo(requests: int, keep_dir: Path | None, prefix: str, as_json: bool) -> None:
    """Build the replica, run the agents, send traffic with two faults, explain (root, ~20 s)."""
    import json

    from hopscope.testbed.topology import normalize_prefix

    if not 10 <= requests <= 5000:
        raise click.BadParameter("give 10..5000", param_hint="--requests")
    prefix = normalize_prefix(prefix)
    try:
        if keep_dir is not None:
            keep_dir.mkdir(parents=True, exist_ok=True)
            res = run_demo(keep_dir, prefix=prefix, requests=requests)
        else:
            with tempfile.TemporaryDirectory(prefix="hopscope-demo-") as tmp:
                res = run_demo(Path(tmp), prefix=prefix, requests=requests)
    except HopscopeError:
        raise
    except OSError as exc:
        raise TestbedError(f"demo failed: {exc}") from None
    if as_json:
        click.echo(json.dumps(res))
        return
    click.echo(report(res))
