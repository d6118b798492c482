"""Human output: request waterfalls, the per-hop table, drops and clock offsets."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

BAR = 40


def fmt_ns(ns: int | None) -> str:
    """A duration for people: ``412.3 µs``, ``2.346 ms``, ``1.204 s``."""
    if ns is None:
        return "-"
    a = abs(ns)
    if a < 1_000:
        return f"{ns} ns"
    if a < 1_000_000:
        return f"{ns / 1_000:.1f} µs"
    if a < 1_000_000_000:
        return f"{ns / 1_000_000:.3f} ms"
    return f"{ns / 1_000_000_000:.3f} s"


def percentile(sorted_vals: Sequence[int], q: float) -> int:
    """Nearest-rank percentile of an already sorted list (integers stay integers)."""
    if not sorted_vals:
        return 0
    k = math.ceil(q * len(sorted_vals)) - 1
    return sorted_vals[max(0, min(len(sorted_vals) - 1, k))]


def waterfall(req: dict[str, Any], width: int = BAR) -> str:
    """One request: a header line and one line per hop with a proportional bar."""
    status = req.get("status") or "---"
    route = req.get("ingress_node") or "?"
    if req.get("pod_node") and req["pod_node"] != req.get("ingress_node"):
        route += f" -> {req['pod_node']}"
    flags = f"  [{', '.join(req['flags'])}]" if req.get("flags") else ""
    lines = [f"{req.get('method') or '?'} {req.get('path') or '?'} {status}  {req['request_id']}  "
             f"{route}  total {fmt_ns(req.get('total_ns'))}{flags}"]
    hops = req.get("hops") or []
    tiling = [h for h in hops if h["name"] != "edge_rtt"]
    if tiling:
        t0 = tiling[0]["start_ns"]
        span = max(1, sum(h["duration_ns"] for h in tiling))
        for h in hops:
            if h["name"] == "edge_rtt":
                bar = " " * width
            else:
                a = int((h["start_ns"] - t0) * width / span)
                b = int((h["start_ns"] - t0 + h["duration_ns"]) * width / span)
                a = max(0, min(width - 1, a))
                b = max(a + 1, min(width, b))
                bar = " " * a + "█" * (b - a) + " " * (width - b)
            lines.append(f"  {h['name']:<18} {h['node']:<14} {fmt_ns(h['duration_ns']):>11} |{bar}|")
            lines += _child_lines(h, 4)
    return "\n".join(lines)


def _child_lines(h: dict[str, Any], indent: int) -> list[str]:
    """Sub-hops under a hop, indented, with what they name (endpoint, verdict)."""
    out = []
    for c in h.get("children") or ():
        note = "".join(f" {k}={c[k]}" for k in ("endpoint", "verdict") if c.get(k))
        name = " " * indent + c["name"]
        out.append(f"{name:<20} {c['node']:<14} {fmt_ns(c['duration_ns']):>11} |{note}")
        out += _child_lines(c, indent + 2)
    return out


def hop_table(requests: Iterable[dict[str, Any]]) -> str:
    """Per hop (name, direction): count, p50, p90, p99, max; sub-hops (eBPF's split of
    ``ingress``) indented under their hop."""
    vals: dict[tuple[str, str], list[int]] = defaultdict(list)
    order: list[tuple[str, str]] = []
    subs: dict[tuple[str, str], list[tuple[str, str]]] = defaultdict(list)
    totals: list[int] = []
    for r in requests:
        if r.get("total_ns") is not None:
            totals.append(r["total_ns"])
        for h in r.get("hops") or []:
            k = (h["name"], h["dir"])
            if k not in vals:
                order.append(k)
            vals[k].append(h["duration_ns"])
            todo = [(k, c, 1) for c in h.get("children") or ()]
            while todo:
                pk, c, depth = todo.pop(0)
                ck = ("  " * depth + c["name"], c["dir"])
                if ck not in vals:
                    subs[pk].append(ck)
                vals[ck].append(c["duration_ns"])
                todo += [(ck, cc, depth + 1) for cc in c.get("children") or ()]
    def tree(k: tuple[str, str]) -> list[tuple[str, str]]:
        return [k] + [x for ck in subs[k] for x in tree(ck)]

    order = [x for k in order for x in tree(k)]
    rows = [("hop", "dir", "count", "p50", "p90", "p99", "max")]
    for k in order:
        v = sorted(vals[k])
        rows.append((k[0], k[1], str(len(v)), fmt_ns(percentile(v, 0.5)), fmt_ns(percentile(v, 0.9)),
                     fmt_ns(percentile(v, 0.99)), fmt_ns(v[-1])))
    if totals:
        v = sorted(totals)
        rows.append(("total", "", str(len(v)), fmt_ns(percentile(v, 0.5)), fmt_ns(percentile(v, 0.9)),
                     fmt_ns(percentile(v, 0.99)), fmt_ns(v[-1])))
    widths = [max(len(r[i]) for r in rows) for i in range(7)]
    out = []
    for j, row in enumerate(rows):
        out.append("  ".join(c.ljust(widths[i]) if i < 2 else c.rjust(widths[i])
                             for i, c in enumerate(row)).rstrip())
        if j == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def drop_lines(drops: Sequence[dict[str, Any]]) -> str:
    """The drops, one line each: kind, where, flow, packets, and what explains them."""
    lines = [f"Drops ({len(drops)}):"]
    for d in drops:
        extra = "".join(f" {k}={d[k]}" for k in ("reason", "rule", "request_id") if d.get(k))
        lines.append(f"  {d['kind']:<19} {d['node']}/{d['point']:<9} {d['flow']}  "
                     f"packets={d['packets']}{extra}")
    return "\n".join(lines)


def render_envelope(env: dict[str, Any], *, max_requests: int | None = 20,
                    width: int = BAR) -> str:
    """The whole human report of an envelope."""
    reqs = env.get("requests") or []
    parts: list[str] = []
    shown = reqs if max_requests is None else _pick(reqs, max_requests)
    for r in shown:
        parts.append(waterfall(r, width))
    if max_requests is not None and len(reqs) > len(shown):
        parts.append(f"... {len(reqs) - len(shown)} more requests (the slowest and the flagged "
                     "are shown; --all for every one, --json for machines)")
    if reqs:
        parts.append(f"Per-hop latency over {len(reqs)} requests:\n{hop_table(reqs)}")
    else:
        parts.append("No HTTP requests found.")
    drops = env.get("drops") or []
    if drops:
        parts.append(drop_lines(drops))
    offs = env.get("clock_offsets") or {}
    if offs:
        parts.append(offset_lines(offs, env.get("reference", "")))
    return "\n\n".join(parts)


def offset_lines(offs: dict[str, dict[str, int]], ref: str,
                 title: str = "Clock offsets") -> str:
    """Each node's clock minus the reference's, with the estimate's error bound."""
    lines = [f"{title} (node minus {ref}):"]
    for n, o in offs.items():
        err = "unknown" if o["error_ns"] < 0 else f"± {fmt_ns(o['error_ns'])}"
        lines.append(f"  {n}: {fmt_ns(o['offset_ns'])} {err}")
    return "\n".join(lines)


def trace_text(env: dict[str, Any]) -> str:
    """One request's waterfall and the clock offsets of the nodes it crossed (those its
    cross-node hops were corrected with)."""
    req = env["requests"][0]
    nodes = {n for h in req["hops"] for n in h["node"].split("->")}
    offs = {n: o for n, o in (env.get("clock_offsets") or {}).items() if n in nodes}
    text = waterfall(req)
    if offs:
        text += "\n\n" + offset_lines(offs, env.get("reference", ""), "Clock offsets used")
    return text


def _pick(reqs: list[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    """The requests worth showing: flagged ones and the slowest, in time order."""
    if len(reqs) <= n:
        return reqs
    flagged = [r for r in reqs if set(r.get("flags") or ()) - {"clock_skew_corrected"}]
    slow = sorted(reqs, key=lambda r: -(r.get("total_ns") or 0))
    chosen: dict[int, dict[str, Any]] = {}
    for r in flagged[: n // 2] + slow:
        if len(chosen) >= n:
            break
        chosen[id(r)] = r
    return sorted(chosen.values(), key=lambda r: r["start_ns"])
