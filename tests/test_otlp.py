"""OTLP/HTTP trace export against a local receiver (127.0.0.1, ephemeral port).

The receiver decodes every POST with the official ``opentelemetry-proto``
classes. The retry and queue tests drive the exporter's waits through an
injected ``sleep`` that records what it was asked to wait and returns at
once (or blocks until the test lets it go), so nothing depends on timing.
"""

from __future__ import annotations

import asyncio
import email.utils
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from hopscope.collector.metrics import CollectorMetrics
from hopscope.collector.otlp import (
    OtlpConfig,
    OtlpExporter,
    otlp_config,
    parse_endpoint,
    parse_retry_after,
    request_spans,
    span_id,
    trace_id,
)
from hopscope.collector.server import Collector
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status
from test_metrics import collector_cfg, replayed, run, samples, scrape, ship_case, value

from hopscope.cli import main
from hopscope.errors import UsageError


class Receiver:
    """An OTLP/HTTP trace receiver: decodes each POST, answers from a script (then 200)."""

    def __init__(self, script: list[tuple[int, dict[str, str]]] | None = None) -> None:
        self.script = list(script or [])
        self.posts: list[tuple[str, dict[str, str], ExportTraceServiceRequest]] = []
        self.raw: list[bytes] = []
        self.lock = threading.Lock()
        rec = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                msg = ExportTraceServiceRequest()
                msg.ParseFromString(body)
                with rec.lock:
                    rec.posts.append((self.path, dict(self.headers.items()), msg))
                    rec.raw.append(body)
                    status, headers = rec.script.pop(0) if rec.script else (200, {})
                out = ExportTraceServiceResponse().SerializeToString() if status == 200 else b""
                self.send_response(status)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(out)))
                for k, v in headers.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(out)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def spans(self) -> list[Span]:
        return [s for _p, _h, m in self.posts for rs in m.resource_spans
                for ss in rs.scope_spans for s in ss.spans]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    r.thread.start()
    try:
        yield r
    finally:
        r.server.shutdown()
        r.server.server_close()


class Waits:
    """The exporter's ``sleep``: records each wait; blocks while ``hold`` is clear."""

    def __init__(self, block: bool = False) -> None:
        self.waits: list[float] = []
        self.entered = threading.Event()
        self.hold = threading.Event()
        if not block:
            self.hold.set()

    def __call__(self, seconds: float) -> bool:
        self.waits.append(seconds)
        self.entered.set()
        assert self.hold.wait(30), "the test never released the exporter"
        return False


def _req(rid: str, start: int = 1_795_000_000_000_000_000) -> dict[str, Any]:
    """A same-node request with the eBPF sub-hops under ingress (as the live agent makes)."""
    hops = []
    t = start
    for name, dir_, dur in (("ingress", "request", 335_700), ("app", "server", 489_000),
                            ("egress", "response", 186_600)):
        hops.append({"name": name, "dir": dir_, "node": "node1", "start_ns": t,
                     "duration_ns": dur, "children": []})
        t += dur
    kids, k = [], start
    for name, dur in (("kernel_in", 15_300), ("proxy", 304_600), ("service_nat", 15_800)):
        kids.append({"name": name, "dir": "request", "node": "node1", "start_ns": k,
                     "duration_ns": dur, "children": []})
        k += dur
    hops[0]["children"] = kids
    return {"request_id": rid, "method": "GET", "path": "/api/tasks/?x=1",
            "host": "api.myhoneydue.com", "status": 200, "ingress_node": "node1",
            "pod_node": "node1", "start_ns": start, "total_ns": t - start, "hops": hops,
            "flags": []}


def _attrs(s: Span) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kv in s.attributes:
        kind = kv.value.WhichOneof("value")
        v = getattr(kv.value, kind)
        out[kv.key] = [x.string_value for x in v.values] if kind == "array_value" else v
    return out


def _check_trace(spans: list[Span], r: dict[str, Any]) -> None:
    """The spans of one request: root, then one per hop under it, sub-hops under their hop."""
    tid = trace_id(r["request_id"])
    mine = [s for s in spans if s.trace_id == tid]
    roots = [s for s in mine if not s.parent_span_id]
    assert len(roots) == 1
    root = roots[0]
    assert root.kind == Span.SpanKind.SPAN_KIND_SERVER
    assert root.name == f"{r['method']} {r['path'].split('?')[0]}"
    assert root.start_time_unix_nano == r["start_ns"]
    assert root.end_time_unix_nano - root.start_time_unix_nano == r["total_ns"]
    ra = _attrs(root)
    for k in ("request_id", "method", "path", "host", "status", "ingress_node", "pod_node",
              "total_ns"):
        assert ra[f"hopscope.{k}"] == r[k], k
    assert ra.get("hopscope.flags", []) == r["flags"]
    top = [s for s in mine if s.parent_span_id == root.span_id]
    assert len(top) == len(r["hops"])
    nkids = sum(len(h["children"]) for h in r["hops"])
    assert len(mine) == 1 + len(r["hops"]) + nkids
    assert len({s.span_id for s in mine}) == len(mine)  # unique span ids
    for s, h in zip(top, r["hops"], strict=True):
        assert s.name == h["name"] and s.kind == Span.SpanKind.SPAN_KIND_INTERNAL
        assert s.start_time_unix_nano == h["start_ns"]
        assert s.end_time_unix_nano - s.start_time_unix_nano == h["duration_ns"]
        a = _attrs(s)
        assert (a["hopscope.hop"], a["hopscope.dir"], a["hopscope.node"]) == \
            (h["name"], h["dir"], h["node"])
        assert a["hopscope.request_id"] == r["request_id"]
        kids = [k for k in mine if k.parent_span_id == s.span_id]
        assert [(k.name, k.start_time_unix_nano, k.end_time_unix_nano - k.start_time_unix_nano)
                for k in kids] == [(c["name"], c["start_ns"], c["duration_ns"])
                                   for c in h["children"]]


# --------------------------------------------------------------------------


def test_cross_node_request_exported_as_a_trace(tmp_path: Path, receiver: Receiver) -> None:
    """Two agents ship pcaps/cross-node-public; the receiver decodes one trace per request."""
    want = replayed("cross-node-public")
    cross = [r for r in want["requests"] if r["ingress_node"] != r["pod_node"]]
    assert cross and all(r["pod_node"] for r in cross)
    cfg = OtlpConfig(endpoint=receiver.url, headers={"Authorization": "Bearer t0k"},
                     batch_delay=0.05)

    async def go() -> str:
        c = Collector(collector_cfg(tmp_path, otlp=cfg))
        await c.start()
        try:
            await ship_case(c, "cross-node-public")
            assert c.exporter is not None
            assert await asyncio.to_thread(c.exporter.flush, 20)
            return (await scrape(c))[1]
        finally:
            await c.stop()

    fams = samples(run(go))
    assert receiver.posts
    for path, headers, msg in receiver.posts:
        assert path == "/v1/traces"
        assert headers["Content-Type"] == "application/x-protobuf"
        assert headers["Authorization"] == "Bearer t0k"
        res = {kv.key: kv.value.string_value for kv in msg.resource_spans[0].resource.attributes}
        assert res["service.name"] == "hopscope"
    spans = receiver.spans()
    assert len({s.trace_id for s in spans}) == len(want["requests"])
    for r in want["requests"]:
        _check_trace(spans, r)
    wire = [s for s in spans if s.trace_id == trace_id(cross[0]["request_id"])
            and s.name == "wire"]
    assert [_attrs(s)["hopscope.node"] for s in wire] == ["node1->node2", "node2->node1"]
    assert _attrs(wire[0])["hopscope.from_node"] == "node1"
    nspans = len(spans)
    assert value(fams, "hopscope_otlp_exported_requests", "hopscope_otlp_exported_requests_total"
                 ) == len(want["requests"])
    assert value(fams, "hopscope_otlp_exported_spans", "hopscope_otlp_exported_spans_total"
                 ) == nspans
    for reason in ("queue_full", "rejected", "retries_exhausted", "shutdown"):
        assert value(fams, "hopscope_otlp_dropped_requests",
                     "hopscope_otlp_dropped_requests_total", reason=reason) == 0


def test_sub_hops_are_children_of_their_hop(receiver: Receiver) -> None:
    r = _req("e8c7a01d68815fda-DFW")
    exp = OtlpExporter(OtlpConfig(endpoint=receiver.url + "/", batch_delay=60))
    exp.start()
    exp.submit([r])
    assert exp.flush(20)  # does not wait out batch_delay
    exp.close()
    assert len(receiver.posts) == 1 and receiver.posts[0][0] == "/v1/traces"
    _check_trace(receiver.spans(), r)
    ingress = next(s for s in receiver.spans() if s.name == "ingress")
    kids = [s for s in receiver.spans() if s.parent_span_id == ingress.span_id]
    assert [k.name for k in kids] == ["kernel_in", "proxy", "service_nat"]
    assert _attrs(kids[1])["hopscope.parent_hop"] == "ingress"


def test_ids_deterministic_and_status() -> None:
    a, b = request_spans(_req("r-1")), request_spans(_req("r-1"))
    assert [(s.trace_id, s.span_id, s.parent_span_id) for s in a] == \
        [(s.trace_id, s.span_id, s.parent_span_id) for s in b]
    assert a[0].span_id == span_id("r-1", "request") and len(a[0].trace_id) == 16
    assert request_spans(_req("r-2"))[0].trace_id != a[0].trace_id
    assert a[0].status.code == Status.StatusCode.STATUS_CODE_UNSET
    bad = {**_req("r-3"), "status": 502, "flags": ["no_upstream"]}
    assert request_spans(bad)[0].status.code == Status.StatusCode.STATUS_CODE_ERROR
    gone = {**_req("r-4"), "status": None, "total_ns": None, "flags": ["no_response"]}
    s = request_spans(gone)[0]
    assert s.status.code == Status.StatusCode.STATUS_CODE_ERROR
    assert s.end_time_unix_nano >= s.start_time_unix_nano


def test_retry_on_503_then_200(receiver: Receiver) -> None:
    receiver.script = [(503, {})]
    waits = Waits()
    exp = OtlpExporter(OtlpConfig(endpoint=receiver.url, backoff_initial=0.5, jitter=0,
                                  batch_delay=60), sleep=waits)
    exp.start()
    exp.submit([_req("a"), _req("b")])
    assert exp.flush(20)
    exp.close()
    assert len(receiver.posts) == 2
    assert receiver.raw[0] == receiver.raw[1]  # the same batch, sent again
    assert waits.waits == [0.5]  # the first backoff step
    assert exp.posts == {"ok": 1, "retryable": 1, "rejected": 0}
    assert exp.exported_requests == 2 and sum(exp.dropped.values()) == 0


def test_retry_after_honoured(receiver: Receiver) -> None:
    later = email.utils.formatdate(time.time() + 30, usegmt=True)
    receiver.script = [(429, {"Retry-After": "3"}), (503, {"Retry-After": later}),
                       (502, {}), (504, {})]
    waits = Waits()
    exp = OtlpExporter(OtlpConfig(endpoint=receiver.url, backoff_initial=0.25, jitter=0,
                                  batch_delay=60), sleep=waits)
    exp.start()
    exp.submit([_req("a")])
    assert exp.flush(20)
    exp.close()
    assert len(receiver.posts) == 5 and exp.exported_requests == 1
    assert waits.waits[0] == 3.0  # Retry-After in seconds
    assert 27 <= waits.waits[1] <= 30  # Retry-After as an HTTP date
    assert waits.waits[2:] == [1.0, 2.0]  # no Retry-After: backoff 0.25 s * 2 ** (attempt - 1)
    assert exp.posts["retryable"] == 4


def test_not_retryable_status_drops_the_batch(receiver: Receiver) -> None:
    receiver.script = [(400, {})]
    waits = Waits()
    exp = OtlpExporter(OtlpConfig(endpoint=receiver.url, batch_delay=60), sleep=waits)
    exp.start()
    exp.submit([_req("a"), _req("b")])
    assert exp.flush(20)
    exp.submit([_req("c")])
    assert exp.flush(20)
    exp.close()
    assert len(receiver.posts) == 2 and not waits.waits
    assert exp.dropped["rejected"] == 2 and exp.exported_requests == 1


def test_bounded_queue_receiver_down() -> None:
    """Nothing listens: the queue stays bounded, the oldest are dropped and counted."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # connection refused from now on
    waits = Waits(block=True)
    exp = OtlpExporter(OtlpConfig(endpoint=f"http://127.0.0.1:{port}", batch_size=2,
                                  queue_size=5, backoff_initial=0.4, jitter=0, retry_for=1.0,
                                  batch_delay=60), sleep=waits)
    m = CollectorMetrics(process=False)
    m.registry.register(exp)
    exp.start()
    exp.submit([_req("r0"), _req("r1")])  # a full batch: the worker takes it at once
    assert waits.entered.wait(20)  # the POST was refused; the worker waits to retry
    exp.submit([_req(f"r{i}") for i in range(2, 22)])
    assert exp.queued() == 5
    fams = samples(m.exposition()[0].decode())
    assert value(fams, "hopscope_otlp_queue_requests", "hopscope_otlp_queue_requests") == 5
    assert value(fams, "hopscope_otlp_dropped_requests", "hopscope_otlp_dropped_requests_total",
                 reason="queue_full") == 15
    kept = [r["request_id"] for _t, r in exp._q]
    assert kept == [f"r{i}" for i in range(17, 22)]  # the newest are kept
    waits.hold.set()
    assert exp.flush(30)
    exp.close()
    # every batch: refused, one backoff wait (0.4 s), refused again, then 0.4 + 0.8 > 1.0: given up
    assert exp.dropped == {"queue_full": 15, "rejected": 0, "retries_exhausted": 7,
                           "shutdown": 0}
    assert exp.posts == {"ok": 0, "retryable": 8, "rejected": 0}
    assert waits.waits == [0.4] * 4
    assert exp.exported_requests == 0


def test_close_gives_up_on_a_dead_receiver() -> None:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    exp = OtlpExporter(OtlpConfig(endpoint=f"http://127.0.0.1:{port}", batch_delay=60,
                                  retry_for=3600, backoff_max=3600))
    exp.start()
    exp.submit([_req(f"r{i}") for i in range(3)])
    exp.close(timeout=0.2)  # the worker is in a backoff wait: close interrupts it
    assert exp.dropped["shutdown"] == 3
    exp.submit([_req("late")])
    assert exp.dropped["shutdown"] == 4


def test_config_parsing() -> None:
    assert parse_endpoint("http://tempo:4318") == ("http", "tempo", 4318, "/v1/traces")
    assert parse_endpoint("https://otlp.example/api/traces") == \
        ("https", "otlp.example", None, "/api/traces")
    assert otlp_config(None) is None
    cfg = otlp_config("http://127.0.0.1:4318", ["Authorization=Bearer a=b", "X-Scope-OrgID=1"])
    assert cfg is not None and cfg.headers == {"Authorization": "Bearer a=b",
                                               "X-Scope-OrgID": "1"}
    for bad in ("ftp://x", "127.0.0.1:4318", "http://:4318"):
        with pytest.raises(UsageError):
            parse_endpoint(bad)
    with pytest.raises(UsageError):
        otlp_config("http://x:1", ["novalue"])
    with pytest.raises(UsageError):
        otlp_config(None, ["A=b"])
    assert parse_retry_after("7") == 7.0
    assert parse_retry_after("soon") is None
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412470.0) == 10.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412490.0) == 0.0


def test_cli_rejects_bad_otlp_options(tmp_path: Path) -> None:
    tok = tmp_path / "token"
    tok.write_text("0123456789abcdef0123456789abcdef\n")
    tok.chmod(0o600)
    base = ["collector", "serve", "--token-file", str(tok), "--db", str(tmp_path / "db")]
    res = CliRunner().invoke(main, [*base, "--otlp-endpoint", "ftp://nope"])
    assert res.exit_code == 2 and "bad OTLP endpoint" in res.output
    res = CliRunner().invoke(main, [*base, "--otlp-header", "A=b"])
    assert res.exit_code == 2 and "--otlp-header needs --otlp-endpoint" in res.output
