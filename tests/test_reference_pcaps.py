"""The reference captures in ``pcaps/`` against ``hopscope replay --json``.

Every ``pcaps/**/expected.json`` is one case: its captures are replayed in
the scenario's directory and the output is compared with what the capture
was crafted to contain (``pcaps/craft.py``; ``pcaps/README.md`` explains
each scenario and its timing table). Hop durations are compared exactly.

Besides hopscope, this file checks the reference data itself:

* ``craft.py`` rewrites the committed files byte for byte;
* every capture opens in tshark without errors, with valid IP/TCP checksums;
* an independent oracle reads the captures back with tshark and re-derives
  each request's hops, the drops and the clock-offset midpoints from the
  bytes alone, following docs/hop-model.md; they must equal expected.json.
  (It guards the reference data, not hopscope: it is a second, deliberately
  naive reading of the same rules.)

``expected.json`` keys: ``files``, ``exit_code``, ``stderr_contains``,
optional ``stderr_line_count`` / ``stderr_prefix``, ``requests`` (``null``:
not checked), ``drops`` (a set), ``clock_offsets`` (node ->
``true_offset_ns``, checked as ``|offset_ns - true| <= error_ns``). A
request's ``pod_node`` is compared only when the key is present.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
PCAPS = ROOT / "pcaps"
CASES = sorted(p.parent for p in PCAPS.rglob("expected.json"))
TSHARK = shutil.which("tshark")


def _case_id(d: Path) -> str:
    return d.relative_to(PCAPS).as_posix()


def _expected(case: Path) -> dict[str, Any]:
    return json.loads((case / "expected.json").read_text())


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def _lines(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.strip()]


# ---------------------------------------------------------------------------
# hopscope replay


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_replay_matches_expected(case: Path) -> None:
    exp = _expected(case)
    proc = subprocess.run(
        [sys.executable, "-m", "hopscope", "replay", "--json", *exp["files"]],
        cwd=case, capture_output=True, text=True, timeout=300, env=_env(),
    )
    err = proc.stderr
    assert "Traceback" not in err, err
    assert proc.returncode == exp["exit_code"], f"exit {proc.returncode}, stderr:\n{err}"
    for s in exp["stderr_contains"]:
        assert s in err, f"{s!r} not in stderr:\n{err}"
    if "stderr_line_count" in exp:
        assert len(_lines(err)) == exp["stderr_line_count"], f"stderr:\n{err}"
    if "stderr_prefix" in exp:
        assert all(ln.startswith(exp["stderr_prefix"]) for ln in _lines(err)), f"stderr:\n{err}"
    if exp["requests"] is None:
        return

    doc = json.loads(proc.stdout)
    got = {r["request_id"]: r for r in doc["requests"]}
    want = {r["request_id"]: r for r in exp["requests"]}
    assert sorted(got) == sorted(want), "request ids differ"
    problems = []
    for rid, w in want.items():
        g = got[rid]
        for key in ("status", "method", "path", "ingress_node", "pod_node", "total_ns"):
            if key in w and g.get(key) != w[key]:
                problems.append(f"{rid} {key}: got {g.get(key)!r}, expected {w[key]!r}")
        g_hops = [(h["name"], h["dir"], h["node"], h["duration_ns"]) for h in g["hops"]]
        w_hops = [(h["name"], h["dir"], h["node"], h["duration_ns"]) for h in w["hops"]]
        if g_hops != w_hops:
            problems.append(f"{rid} hops:\n  got      {g_hops}\n  expected {w_hops}")
        flags = set(g.get("flags", []))
        if not set(w["flags_include"]) <= flags:
            problems.append(f"{rid} flags {sorted(flags)} lack {sorted(set(w['flags_include']) - flags)}")
        if flags & set(w["flags_exclude"]):
            problems.append(f"{rid} flags {sorted(flags)} include {sorted(flags & set(w['flags_exclude']))}")
    assert not problems, "\n".join(problems)

    def drop_key(d: dict[str, Any]) -> tuple[Any, ...]:
        return (d["kind"], d["node"], d["point"], d["packets"], d["flow"])

    assert sorted(map(drop_key, doc["drops"])) == sorted(map(drop_key, exp["drops"]))

    for node, w in exp["clock_offsets"].items():
        assert node in doc["clock_offsets"], f"no clock offset for {node}"
        g = doc["clock_offsets"][node]
        assert abs(g["offset_ns"] - w["true_offset_ns"]) <= g["error_ns"], (node, g, w)


# ---------------------------------------------------------------------------
# The reference data itself


def test_craft_is_deterministic(tmp_path: Path) -> None:
    subprocess.run([sys.executable, str(PCAPS / "craft.py"), "--out", str(tmp_path)],
                   check=True, timeout=120, env=_env())

    def files(top: Path, skip_top: bool) -> set[Path]:
        # replica-*/ are recordings of the live replica (record_replica.py), not crafted
        return {p.relative_to(top) for p in top.rglob("*")
                if p.is_file() and "__pycache__" not in p.parts and not (skip_top and p.parent == top)
                and not p.relative_to(top).parts[0].startswith("replica-")}

    made, committed = files(tmp_path, False), files(PCAPS, True)
    assert made == committed
    for rel in sorted(made):
        assert (tmp_path / rel).read_bytes() == (PCAPS / rel).read_bytes(), f"{rel} differs"


CAPTURES = sorted(p for c in CASES for p in c.iterdir()
                  if p.name.startswith("node") and c.parent.name != "bad")
TSHARK_FIELDS = [
    "frame.number", "frame.time_epoch", "frame.interface_name", "sll.ifindex", "vxlan.vni",
    "ip.src", "ip.dst", "ip.id", "tcp.srcport", "tcp.dstport", "tcp.seq_raw", "tcp.ack_raw",
    "tcp.flags", "tcp.len", "tcp.payload", "ip.checksum.status", "tcp.checksum.status",
    "_ws.malformed",
]


@functools.cache
def _tshark(path: Path) -> tuple[list[dict[str, Any]], int, str]:
    cmd = [str(TSHARK), "-n", "-r", str(path),
           "-o", "tcp.desegment_tcp_streams:FALSE", "-o", "tcp.analyze_sequence_numbers:FALSE",
           "-o", "ip.check_checksum:TRUE", "-o", "tcp.check_checksum:TRUE",
           "-o", "udp.check_checksum:TRUE", "-d", "udp.port==8472,vxlan",
           "-T", "fields", "-E", "separator=\t", "-E", "occurrence=a", "-E", "aggregator=,"]
    for f in TSHARK_FIELDS:
        cmd += ["-e", f]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    rows = []
    for line in proc.stdout.splitlines():
        v: dict[str, Any] = dict(zip(TSHARK_FIELDS, line.split("\t"), strict=True))
        sec, frac = v["frame.time_epoch"].split(".")
        v["t"] = int(sec) * 10**9 + int(frac.ljust(9, "0"))
        rows.append(v)
    err = "\n".join(ln for ln in proc.stderr.splitlines() if "Running as user" not in ln)
    return rows, proc.returncode, err


@pytest.mark.skipif(TSHARK is None, reason="tshark not installed")
@pytest.mark.parametrize("capture", CAPTURES, ids=lambda p: p.relative_to(PCAPS).as_posix())
def test_capture_is_clean_for_tshark(capture: Path) -> None:
    rows, rc, err = _tshark(capture)
    assert rc == 0 and not err, err
    assert rows
    for r in rows:
        statuses = (r["ip.checksum.status"] + "," + r["tcp.checksum.status"]).split(",")
        assert "2" not in statuses, f"bad checksum in frame {r['frame.number']}"
        assert "1" in statuses, f"checksum not verified in frame {r['frame.number']}"
        assert not r["_ws.malformed"], f"malformed frame {r['frame.number']}"


# -- the oracle ------------------------------------------------------------


def _craft() -> Any:
    sys.path.insert(0, str(PCAPS))
    try:
        import craft  # type: ignore[import-not-found]
    finally:
        sys.path.remove(str(PCAPS))
    return craft


class _Pkt:
    def __init__(self, node: str, point: str, t: int, r: dict[str, Any]):
        last = lambda v: v.split(",")[-1]  # noqa: E731  (the inner header of a VXLAN packet)
        self.node, self.point, self.t = node, point, t
        self.flow = (last(r["ip.src"]), int(r["tcp.srcport"]), last(r["ip.dst"]), int(r["tcp.dstport"]))
        self.outer_src = r["ip.src"].split(",")[0] if r["vxlan.vni"] else ""
        self.ip_id = int(last(r["ip.id"]), 16)
        self.seq, self.ack = int(r["tcp.seq_raw"]), int(r["tcp.ack_raw"] or 0)
        self.rseq = 0
        self.flags, self.len = int(r["tcp.flags"], 16), int(r["tcp.len"])
        self.payload = bytes.fromhex(r["tcp.payload"].replace(":", ""))


def _point(name: str, vxlan: bool) -> str | None:
    if vxlan:
        return "underlay"
    for prefixes, point in ((("eth", "en"), "nic"), (("flannel", "vxlan"), "overlay"), (("cni", "veth"), "pod")):
        if name.startswith(prefixes):
            return point
    return None


def _load(craft: Any, case: Path, files: list[str]) -> list[_Pkt]:
    pkts = []
    for f in files:
        node = f.split(".")[0]
        names = {i: n for n, i in craft.NODES[node]["index"].items()}
        names.update({p[3]: p[1] for p in craft.NODES[node]["pods"].values()})
        rows, _, _ = _tshark(case / f)
        for r in rows:
            if not r["tcp.srcport"]:
                continue
            name = r["frame.interface_name"] or (names[int(r["sll.ifindex"])] if r["sll.ifindex"] else "")
            point = _point(name, bool(r["vxlan.vni"]))
            assert point, f"{f} frame {r['frame.number']}: no interface to classify by"
            pkts.append(_Pkt(node, point, r["t"], r))
    # sequence numbers relative to the first one seen on each flow, signed:
    # a stream may wrap past 2**32
    ref: dict[tuple[Any, ...], int] = {}
    for p in pkts:
        r0 = ref.setdefault(p.flow, p.seq)
        p.rseq = (p.seq - r0 + 2**31) % 2**32 - 2**31
    return pkts


def _rev(fl: tuple[Any, ...]) -> tuple[Any, ...]:
    return (fl[2], fl[3], fl[0], fl[1])


def _stream(pkts: list[_Pkt], fl: tuple[Any, ...]) -> tuple[int, bytes]:
    segs: dict[int, bytes] = {}
    for p in pkts:
        if p.flow == fl and p.len:
            segs.setdefault(p.rseq, p.payload)
    base, data = min(segs), bytearray()
    for s in sorted(segs):
        assert s - base <= len(data), "hole in a stream"
        data[s - base : s - base + len(segs[s])] = segs[s]
    return base, bytes(data)


def _messages(data: bytes) -> list[tuple[int, int]]:
    """(start, end of headers) of every HTTP/1.1 message of a stream."""
    out, off = [], 0
    while off < len(data):
        he = data.index(b"\r\n\r\n", off) + 4
        head = data[off:he].lower()
        out.append((off, he))
        if b"transfer-encoding: chunked" in head:
            n, off = -1, he
            while n:
                eol = data.index(b"\r\n", off)
                n = int(data[off:eol], 16)
                off = eol + 2 + n + 2
        else:
            cl = [int(ln.split(b":")[1]) for ln in head.split(b"\r\n") if ln.startswith(b"content-length:")]
            off = he + (cl[0] if cl else 0)
    return out


def _first(pkts: list[_Pkt], fl: tuple[Any, ...], seq: int, node: str, point: str) -> int:
    return min(p.t for p in pkts if p.flow == fl and p.node == node and p.point == point
               and p.len and p.rseq <= seq < p.rseq + p.len)


def _hops(m: dict[str, int], a: str, b: str | None) -> list[tuple[str, str, str, int]]:
    if b is None:
        spec = [("ingress+egress", "request+response", a, "nic_in", "nic_out")]
    elif a != b:
        spec = [("ingress", "request", a, "nic_in", "a_ov"), ("encap", "request", a, "a_ov", "a_ul"),
                ("wire", "request", f"{a}->{b}", "a_ul", "b_ul"), ("decap", "request", b, "b_ul", "b_ov"),
                ("deliver", "request", b, "b_ov", "b_pod_c"), ("app", "server", b, "b_pod_c", "b_pod_r"),
                ("route", "response", b, "b_pod_r", "b_ov_r"), ("encap", "response", b, "b_ov_r", "b_ul_r"),
                ("wire", "response", f"{b}->{a}", "b_ul_r", "a_ul_r"), ("decap", "response", a, "a_ul_r", "a_ov_r"),
                ("egress", "response", a, "a_ov_r", "nic_out")]
    else:
        spec = [("ingress", "request", a, "nic_in", "pod_f")]
        if m["pod_c"] != m["pod_f"]:
            spec.append(("deliver", "request", a, "pod_f", "pod_c"))
        spec += [("app", "server", a, "pod_c", "pod_r"), ("egress", "response", a, "pod_r", "nic_out")]
    hops = [(n, d, nd, m[t] - m[f]) for n, d, nd, f, t in spec]
    if "edge_rtt" in m:
        hops.append(("edge_rtt", "request", a, m["edge_rtt"]))
    return hops


def _oracle(craft: Any, case: Path, exp: dict[str, Any], files: list[str]) -> list[str]:
    offsets = {k: v["true_offset_ns"] for k, v in exp["clock_offsets"].items()}
    raw = _load(craft, case, files)
    pkts = []
    for p in raw:
        q = _Pkt.__new__(_Pkt)
        q.__dict__.update(p.__dict__, t=p.t - offsets.get(p.node, 0))
        pkts.append(q)
    errors = []
    for r in exp["requests"]:
        ray = b"cf-ray: " + r["request_id"].lower().encode()
        c = next(p for p in pkts if p.point == "nic" and ray in p.payload.lower())
        a, F = c.node, c.flow
        base, data = _stream([p for p in pkts if p.node == a and p.point == "nic"], F)
        msgs = _messages(data)
        n = max(i for i, (s, _) in enumerate(msgs) if s <= data.lower().index(ray))
        start, he = msgs[n]
        assert data[start:].startswith(f"{r['method']} {r['path']} HTTP/1.1\r\n".encode())
        m = {"nic_in": _first(pkts, F, base + he - 1, a, "nic")}
        rbase, rdata = _stream(pkts, _rev(F))
        rs = _messages(rdata)[n][0]
        m["nic_out"] = _first(pkts, _rev(F), rbase + rs, a, "nic")
        got: dict[str, Any] = {"status": int(rdata[rs + 9 : rs + 12]), "ingress_node": a, "pod_node": None}
        ups = [p for p in pkts if p.point != "nic" and ray in p.payload.lower()]
        b = None
        if ups:
            U = ups[0].flow
            ubase, udata = _stream(pkts, U)
            umsgs = _messages(udata)
            k = max(i for i, (s, _) in enumerate(umsgs) if s <= udata.lower().index(ray))
            s0, s1 = ubase + umsgs[k][0], ubase + umsgs[k][1] - 1
            (b,) = {p.node for p in pkts if p.flow == U and p.point == "pod" and p.len}
            vbase, vdata = _stream(pkts, _rev(U))
            r0 = vbase + _messages(vdata)[k][0]
            got["pod_node"] = b
            if a != b:
                for key, fl, seq, node, point in [
                    ("a_ov", U, s0, a, "overlay"), ("a_ul", U, s0, a, "underlay"), ("b_ul", U, s0, b, "underlay"),
                    ("b_ov", U, s0, b, "overlay"), ("b_pod_c", U, s1, b, "pod"), ("b_pod_r", _rev(U), r0, b, "pod"),
                    ("b_ov_r", _rev(U), r0, b, "overlay"), ("b_ul_r", _rev(U), r0, b, "underlay"),
                    ("a_ul_r", _rev(U), r0, a, "underlay"), ("a_ov_r", _rev(U), r0, a, "overlay")]:
                    m[key] = _first(pkts, fl, seq, node, point)
            else:
                m["pod_f"] = _first(pkts, U, s0, a, "pod")
                m["pod_c"] = _first(pkts, U, s1, a, "pod")
                m["pod_r"] = _first(pkts, _rev(U), r0, a, "pod")
            # a retransmission: the same seq twice at one point, with a new IPv4 id
            ids: dict[tuple[str, str, int], set[int]] = defaultdict(set)
            for p in pkts:
                if p.flow == U and p.len and not p.outer_src:
                    ids[(p.node, p.point, p.rseq)].add(p.ip_id)
            retx = any(len(v) > 1 for v in ids.values())
            if retx != ("retransmit" in r["flags_include"]):
                errors.append(f"{r['request_id']}: the bytes say retransmit={retx}")
        if n == 0:
            synack = [p for p in pkts if p.flow == _rev(F) and p.node == a and p.flags & 0x12 == 0x12]
            if synack:
                t_sa = min(p.t for p in synack)
                m["edge_rtt"] = min(p.t for p in pkts if p.flow == F and p.node == a and p.flags & 0x12 == 0x10
                                    and p.ack == (synack[0].seq + 1) % 2**32 and p.t > t_sa) - t_sa
        got["total_ns"] = m["nic_out"] - m["nic_in"]
        got["hops"] = _hops(m, a, b)
        want = dict(r, hops=[(h["name"], h["dir"], h["node"], h["duration_ns"]) for h in r["hops"]])
        for key, v in got.items():
            if key in want and want[key] != v:
                errors.append(f"{r['request_id']} {key}: expected {want[key]!r}, the bytes say {v!r}")

    # drops: SYNs never answered by a SYN-ACK (kind refused if a RST came back),
    # at the last point that saw them; copies of one SYN on cni0 and veth count once
    drops = set()
    syns: dict[tuple[Any, ...], list[_Pkt]] = defaultdict(list)
    for p in pkts:
        if p.flags & 0x12 == 0x02:
            syns[p.flow].append(p)
    for fl, ps in syns.items():
        back = [p for p in pkts if p.flow == _rev(fl)]
        if any(p.flags & 0x12 == 0x12 for p in back):
            continue
        firsts: dict[tuple[str, str], int] = {}
        for p in ps:
            firsts.setdefault((p.node, p.point), p.t)
        node, point = max(firsts, key=lambda k: firsts[k])
        drops.add(("refused" if any(p.flags & 0x04 for p in back) else "syn_unanswered", node, point,
                   len({p.ip_id for p in ps if (p.node, p.point) == (node, point)}),
                   f"{fl[0]}:{fl[1]} -> {fl[2]}:{fl[3]}"))
    want_drops = {(d["kind"], d["node"], d["point"], d["packets"], d["flow"]) for d in exp["drops"]}
    if drops != want_drops:
        errors.append(f"drops: the bytes say {sorted(drops)}, expected {sorted(want_drops)}")

    # clock offsets: midpoint of [max(t3 - t4), min(t2 - t1)] over copies seen at
    # both nodes' underlay, on the capture clocks
    owner = {}
    for node, c in craft.NODES.items():
        owner[c["public_ip"]] = owner[c["priv_ip"]] = node
    seen: dict[tuple[Any, ...], dict[str, Any]] = defaultdict(dict)
    for p in raw:
        if p.point == "underlay":
            key = (p.flow, p.seq, p.ip_id, p.flags, p.len)  # one packet, seen on both nodes
            seen[key].setdefault(p.node, p.t)
            seen[key]["from"] = owner[p.outer_src]
    ref = files[0].split(".")[0]
    for node, true in offsets.items():
        up = [s[node] - s[ref] for s in seen.values() if node in s and ref in s and s["from"] == ref]
        down = [s[node] - s[ref] for s in seen.values() if node in s and ref in s and s["from"] == node]
        if not up or not down or (max(down) + min(up)) / 2 != true:
            errors.append(f"clock {node}: interval [{max(down, default=None)}, {min(up, default=None)}], true offset {true}")
    return errors


@pytest.mark.skipif(TSHARK is None, reason="tshark not installed")
@pytest.mark.parametrize("case", [c for c in CASES if _expected(c)["requests"] is not None], ids=_case_id)
def test_expected_agrees_with_the_bytes(case: Path) -> None:
    craft = _craft()
    exp = _expected(case)
    files = exp["files"]
    if case.parent.name == "formats":
        # No interface names to classify by (or, for the multi-section file,
        # names tshark 4.0 misreads): render the same timeline as plain named
        # pcapng, check that tshark reads the very same packets at the very
        # same times from both, and run the oracle on the named copy.
        with tempfile.TemporaryDirectory() as tmp:
            cl, base, _ = craft.formats_timeline()
            named = []
            for node in cl.nodes.values():
                craft.L.write_pcapng(os.path.join(tmp, f"{node.name}.pcapng"), node, base)
                named.append(f"{node.name}.pcapng")
                (f,) = [f for f in files if f.split(".")[0] == node.name]

                def key(r: dict[str, Any]) -> tuple[Any, ...]:
                    return (r["t"], r["ip.src"], r["ip.dst"], r["ip.id"], r["tcp.seq_raw"], r["tcp.len"], r["tcp.payload"])

                assert [key(r) for r in _tshark(case / f)[0]] == [key(r) for r in _tshark(Path(tmp) / named[-1])[0]], f
            errors = _oracle(craft, Path(tmp), exp, named)
    else:
        errors = _oracle(craft, case, exp, files)
    assert not errors, "\n".join(errors)
