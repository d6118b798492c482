"""OTLP/HTTP trace export: every stitched request as one trace.

One trace per request: a root span for the request (``start_ns`` to
``start_ns + total_ns``, kind SERVER, named ``METHOD /path``), one child span
per hop (``start_ns`` to ``start_ns + duration_ns``, kind INTERNAL, named by
the hop), and under a hop one span per sub-hop (``kernel_in``, ``proxy``,
``service_nat`` under ``ingress``). Each span carries the hop-model fields as
``hopscope.*`` attributes. The trace id is derived from the request id
(BLAKE2b), span ids from the request id and the hop's place in the request,
so exporting a request again yields the same ids.

Requests are encoded with the official ``opentelemetry-proto`` classes
(:class:`ExportTraceServiceRequest`) and POSTed as
``application/x-protobuf`` by one worker thread with the standard library's
``http.client``:

* **batched**: a POST carries up to ``batch_size`` requests, and a request
  waits at most ``batch_delay`` seconds for its batch to fill;
* **bounded queue**: at most ``queue_size`` requests wait; when it is full
  the oldest is dropped (``hopscope_otlp_dropped_requests_total{reason=
  "queue_full"}``), so a dead receiver never grows the collector's memory;
* **retry**: 429, 502, 503, 504 and connection errors are retried with
  exponential backoff (``backoff_initial`` doubling to ``backoff_max``,
  minus up to ``jitter`` of it), or after the ``Retry-After`` the receiver
  asked for (seconds or an HTTP date, capped at ``retry_after_max``); a
  batch whose waits would exceed ``retry_for`` is dropped
  (``retries_exhausted``). Any other status drops the batch (``rejected``).

:meth:`OtlpExporter.submit` only appends to the queue (the collector's event
loop never waits on the network); encoding and HTTP happen in the worker.
"""

from __future__ import annotations

import email.utils
import hashlib
import http.client
import logging
import random
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import (
    AnyValue,
    ArrayValue,
    InstrumentationScope,
    KeyValue,
)
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.proto.trace.v1.trace_pb2 import ScopeSpans, Span, Status
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

from hopscope import __version__
from hopscope.errors import UsageError

log = logging.getLogger(__name__)

#: Statuses that mean "try again later" (OTLP/HTTP spec); every other non-2xx drops the batch.
RETRYABLE = frozenset({429, 502, 503, 504})
DROP_REASONS = ("queue_full", "rejected", "retries_exhausted", "shutdown")


@dataclass
class OtlpConfig:
    """Where and how to export. Times in seconds."""

    endpoint: str  # http(s)://host[:port][/path]; no path: /v1/traces
    headers: dict[str, str] = field(default_factory=dict)
    service_name: str = "hopscope"
    batch_size: int = 256  # requests per POST
    batch_delay: float = 2.0  # a queued request waits at most this long for its batch to fill
    queue_size: int = 8192  # requests waiting; when full, the oldest is dropped
    timeout: float = 10.0  # per POST
    backoff_initial: float = 1.0
    backoff_max: float = 30.0
    jitter: float = 0.2  # a backoff wait is shortened by up to this fraction, at random
    retry_for: float = 60.0  # a batch is dropped once its retry waits would exceed this
    retry_after_max: float = 120.0  # a longer Retry-After is capped to this


def parse_endpoint(url: str) -> tuple[str, str, int | None, str]:
    """``http(s)://host[:port][/path]`` -> (scheme, host, port, path); path default /v1/traces."""
    u = urlsplit(url.strip())
    if u.scheme not in ("http", "https") or not u.hostname:
        raise UsageError(f"bad OTLP endpoint {url!r}: use http://HOST:PORT or "
                         "https://HOST:PORT/v1/traces")
    try:
        port = u.port
    except ValueError:
        raise UsageError(f"bad OTLP endpoint {url!r}: bad port") from None
    path = u.path if u.path not in ("", "/") else "/v1/traces"
    if u.query:
        path += "?" + u.query
    return u.scheme, u.hostname, port, path


def parse_headers(items: Iterable[str]) -> dict[str, str]:
    """``KEY=VALUE`` strings (``--otlp-header``) -> a dict."""
    out: dict[str, str] = {}
    for item in items:
        k, sep, v = item.partition("=")
        k, v = k.strip(), v.strip()
        if not sep or not k or any(ch in item for ch in "\r\n\0") or " " in k or ":" in k:
            raise UsageError(f"bad OTLP header {item!r}: use KEY=VALUE, e.g. "
                             "'Authorization=Bearer TOKEN'")
        out[k] = v
    return out


def otlp_config(endpoint: str | None, headers: Iterable[str] = ()) -> OtlpConfig | None:
    """``--otlp-endpoint`` and ``--otlp-header`` -> a checked config, or None (no export)."""
    hs = list(headers)
    if not endpoint:
        if hs:
            raise UsageError("--otlp-header needs --otlp-endpoint")
        return None
    parse_endpoint(endpoint)
    return OtlpConfig(endpoint=endpoint.strip(), headers=parse_headers(hs))


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """A ``Retry-After`` header: delay seconds or an HTTP date -> seconds (>= 0), else None."""
    if value is None:
        return None
    v = value.strip()
    try:
        secs = float(v)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(v)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        ref = datetime.now(UTC).timestamp() if now is None else now
        secs = when.timestamp() - ref
    if secs != secs:  # NaN
        return None
    return max(0.0, secs)


# --------------------------------------------------------------------------
# request -> spans


def trace_id(request_id: str) -> bytes:
    """16 bytes, the same for the same request id (never all zero)."""
    d = hashlib.blake2b(request_id.encode(), digest_size=16, person=b"hopscope.trace").digest()
    return d if any(d) else b"\0" * 15 + b"\1"


def span_id(request_id: str, part: str) -> bytes:
    """8 bytes for one span of a request: ``part`` is ``request``, ``3`` (hop 3) or ``0.1``."""
    d = hashlib.blake2b(f"{request_id}\0{part}".encode(), digest_size=8,
                        person=b"hopscope.span").digest()
    return d if any(d) else b"\0" * 7 + b"\1"


def _kv(key: str, value: Any) -> KeyValue:
    if isinstance(value, bool):
        return KeyValue(key=key, value=AnyValue(bool_value=value))
    if isinstance(value, int):
        return KeyValue(key=key, value=AnyValue(int_value=value))
    if isinstance(value, list | tuple):
        return KeyValue(key=key, value=AnyValue(array_value=ArrayValue(
            values=[AnyValue(string_value=str(v)) for v in value])))
    return KeyValue(key=key, value=AnyValue(string_value=str(value)))


def _attrs(pairs: Iterable[tuple[str, Any]]) -> list[KeyValue]:
    return [_kv(k, v) for k, v in pairs if v is not None and v != ""]


_KV_CACHE: dict[tuple[str, str], KeyValue] = {}


def _skv(key: str, value: str) -> KeyValue:
    """A string attribute of few values (hop names, dirs, nodes): built once, copied after."""
    kv = _KV_CACHE.get((key, value))
    if kv is None:
        if len(_KV_CACHE) >= 4096:
            _KV_CACHE.clear()
        kv = _KV_CACHE[(key, value)] = KeyValue(key=key, value=AnyValue(string_value=value))
    return kv


_INTERNAL = Span.SpanKind.SPAN_KIND_INTERNAL
_SERVER = Span.SpanKind.SPAN_KIND_SERVER


def _add_hop_span(out: Any, rid_kv: KeyValue, rid: str, tid: bytes, parent: bytes, part: str,
                  h: Mapping[str, Any], parent_hop: str | None) -> bytes:
    start = int(h["start_ns"])
    dur = int(h["duration_ns"])
    name = str(h["name"])
    node = str(h.get("node") or "")
    attrs = [_skv("hopscope.hop", name), _skv("hopscope.dir", str(h.get("dir") or "")),
             _skv("hopscope.node", node), rid_kv]
    src, arrow, dst = node.partition("->")
    if arrow:
        attrs += [_skv("hopscope.from_node", src), _skv("hopscope.to_node", dst)]
    if parent_hop:
        attrs.append(_skv("hopscope.parent_hop", parent_hop))
    sid = span_id(rid, part)
    out.add(trace_id=tid, span_id=sid, parent_span_id=parent, name=name, kind=_INTERNAL,
            start_time_unix_nano=start, end_time_unix_nano=start + max(0, dur),
            attributes=attrs)
    return sid


def add_request_spans(out: Any, r: Mapping[str, Any]) -> int:
    """Append one stitched request's spans (the root first) to ``out`` (a repeated ``Span``
    field, e.g. ``ScopeSpans.spans``); returns how many."""
    rid = str(r["request_id"])
    tid = trace_id(rid)
    root = span_id(rid, "request")
    start = int(r["start_ns"])
    total = r.get("total_ns")
    hops: Sequence[Mapping[str, Any]] = r.get("hops") or ()
    if total is not None:
        end = start + int(total)
    else:
        end = max([start, *(int(h["start_ns"]) + int(h["duration_ns"]) for h in hops)])
    method = str(r.get("method") or "")
    path = str(r.get("path") or "")
    status = r.get("status")
    flags = list(r.get("flags") or [])
    bad = [f for f in ("no_response", "reset") if f in flags]
    if isinstance(status, int) and status >= 500:
        st = Status(code=Status.StatusCode.STATUS_CODE_ERROR, message=f"HTTP {status}")
    elif bad:
        st = Status(code=Status.StatusCode.STATUS_CODE_ERROR, message=", ".join(bad))
    else:
        st = Status()
    url_path, _, query = path.partition("?")
    rid_kv = KeyValue(key="hopscope.request_id", value=AnyValue(string_value=rid))
    out.add(trace_id=tid, span_id=root, name=f"{method} {url_path}" if method else "request",
            kind=_SERVER, start_time_unix_nano=start, end_time_unix_nano=max(start, end),
            status=st, attributes=[rid_kv, *_attrs([
                ("hopscope.method", method), ("hopscope.path", path),
                ("hopscope.host", r.get("host")), ("hopscope.status", status),
                ("hopscope.ingress_node", r.get("ingress_node")),
                ("hopscope.pod_node", r.get("pod_node")), ("hopscope.start_ns", start),
                ("hopscope.total_ns", total), ("hopscope.flags", flags),
                ("http.request.method", method), ("url.path", url_path), ("url.query", query),
                ("server.address", r.get("host")), ("http.response.status_code", status)])])
    n = 1
    for i, h in enumerate(hops):
        hid = _add_hop_span(out, rid_kv, rid, tid, root, str(i), h, None)
        n += 1
        for j, c in enumerate(h.get("children") or ()):
            _add_hop_span(out, rid_kv, rid, tid, hid, f"{i}.{j}", c, str(h["name"]))
            n += 1
    return n


def request_spans(r: Mapping[str, Any]) -> list[Span]:
    """One stitched request (hop-model object) -> its spans, the root first."""
    ss = ScopeSpans()
    add_request_spans(ss.spans, r)
    return list(ss.spans)


def encode_requests(requests: Iterable[Mapping[str, Any]], resource: Resource,
                    scope: InstrumentationScope) -> tuple[bytes, int]:
    """(serialized ExportTraceServiceRequest, number of spans) for some requests."""
    msg = ExportTraceServiceRequest()
    rs = msg.resource_spans.add()
    rs.resource.CopyFrom(resource)
    ss = rs.scope_spans.add()
    ss.scope.CopyFrom(scope)
    n = 0
    for r in requests:
        n += add_request_spans(ss.spans, r)
    return msg.SerializeToString(), n


# --------------------------------------------------------------------------
# the exporter


class OtlpExporter:
    """The bounded queue and the worker thread that POSTs batches to the endpoint.

    ``sleep(seconds) -> bool`` is how the worker waits between retries
    (``True``: stop waiting, the exporter is being shut down); the default
    waits on an event that :meth:`close` sets. Tests pass their own.
    Counters are exposed through :meth:`collect` (register the exporter with
    a prometheus-client registry).
    """

    def __init__(self, cfg: OtlpConfig, *, collector: str = "",
                 sleep: Callable[[float], bool] | None = None) -> None:
        self.cfg = cfg
        self.scheme, self.host, self.port, self.path = parse_endpoint(cfg.endpoint)
        self.url = f"{self.scheme}://{self.host}{f':{self.port}' if self.port else ''}{self.path}"
        if cfg.batch_size < 1 or cfg.queue_size < 1:
            raise UsageError("OTLP batch and queue sizes must be at least 1")
        self.resource = Resource(attributes=_attrs([
            ("service.name", cfg.service_name), ("service.version", __version__),
            ("service.instance.id", collector)]))
        self.scope = InstrumentationScope(name="hopscope.collector", version=__version__)
        self._q: deque[tuple[float, Mapping[str, Any]]] = deque()
        self._cond = threading.Condition()
        self._abort = threading.Event()
        self._sleep = sleep if sleep is not None else self._abort.wait
        self._stopping = False
        self._flushing = 0
        self._inflight = 0
        self._failing = False
        self._last_full_log = -1e18
        self._thread: threading.Thread | None = None
        self._ssl = ssl.create_default_context() if self.scheme == "https" else None
        # counters (under _cond)
        self.exported_requests = 0
        self.exported_spans = 0
        self.rejected_spans = 0
        self.dropped: dict[str, int] = dict.fromkeys(DROP_REASONS, 0)
        self.posts: dict[str, int] = {"ok": 0, "retryable": 0, "rejected": 0}

    # -- the collector's side ------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="hopscope-otlp", daemon=True)
            self._thread.start()
            log.info("event=otlp_start endpoint=%s batch=%d delay_s=%g queue=%d", self.url,
                     self.cfg.batch_size, self.cfg.batch_delay, self.cfg.queue_size)

    def submit(self, requests: Iterable[Mapping[str, Any]]) -> None:
        """Queue stitched requests for export (never blocks on the network)."""
        now = time.monotonic()
        cap = self.cfg.queue_size
        full = 0
        with self._cond:
            if self._stopping:
                n = sum(1 for _ in requests)
                self.dropped["shutdown"] += n
                return
            q = self._q
            for r in requests:
                if len(q) >= cap:
                    q.popleft()
                    full += 1
                q.append((now, r))
            if full:
                self.dropped["queue_full"] += full
            self._cond.notify_all()
        if full and now - self._last_full_log >= 60:
            self._last_full_log = now
            log.warning("event=otlp_queue_full dropped=%d queue=%d endpoint=%s (the oldest "
                        "requests are dropped; see hopscope_otlp_dropped_requests_total)",
                        full, cap, self.url)

    def queued(self) -> int:
        with self._cond:
            return len(self._q)

    def flush(self, timeout: float | None = None) -> bool:
        """Export everything queued now (without waiting for batches to fill); True when the
        queue is empty and nothing is in flight within ``timeout``."""
        with self._cond:
            self._flushing += 1
            self._cond.notify_all()
            try:
                return self._cond.wait_for(lambda: not self._q and not self._inflight, timeout)
            finally:
                self._flushing -= 1

    def close(self, timeout: float = 5.0) -> None:
        """Stop taking requests; export what is queued for up to ``timeout`` s; then give up
        (what is left counts as dropped, reason ``shutdown``)."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        t = self._thread
        if t is not None:
            t.join(timeout)
            if t.is_alive():
                self._abort.set()
                with self._cond:
                    self._cond.notify_all()
                t.join(min(timeout, self.cfg.timeout) + 1)
        with self._cond:
            left = len(self._q)
            self._q.clear()
            self.dropped["shutdown"] += left
            self._cond.notify_all()
        log.info("event=otlp_stop exported=%d dropped=%s", self.exported_requests,
                 ",".join(f"{k}:{v}" for k, v in self.dropped.items() if v) or "0")

    # -- the worker ------------------------------------------------------------------
    def _take(self) -> list[Mapping[str, Any]] | None:
        """The next batch, or None when stopped and empty (or aborted)."""
        bs, delay = self.cfg.batch_size, self.cfg.batch_delay
        with self._cond:
            while True:
                if self._abort.is_set():
                    self.dropped["shutdown"] += len(self._q)
                    self._q.clear()
                    self._cond.notify_all()
                    return None
                q = self._q
                timeout: float | None = None
                if q:
                    if self._stopping or self._flushing or len(q) >= bs:
                        break
                    timeout = q[0][0] + delay - time.monotonic()
                    if timeout <= 0:
                        break
                elif self._stopping:
                    return None
                self._cond.wait(timeout)
            n = min(len(q), bs)
            batch = [q.popleft()[1] for _ in range(n)]
            self._inflight = n
            return batch

    def _run(self) -> None:
        while True:
            batch = self._take()
            if batch is None:
                return
            try:
                self._export(batch)
            except Exception:  # a bug, not the network: never kill the worker
                log.exception("event=otlp_export_failed requests=%d", len(batch))
                self._drop(batch, "rejected")
            finally:
                with self._cond:
                    self._inflight = 0
                    self._cond.notify_all()

    def _drop(self, batch: Sequence[Any], reason: str) -> None:
        with self._cond:
            self.dropped[reason] += len(batch)

    def _post(self, body: bytes) -> tuple[int, dict[str, str], bytes]:
        conn: http.client.HTTPConnection
        if self._ssl is not None:
            conn = http.client.HTTPSConnection(self.host, self.port, timeout=self.cfg.timeout,
                                               context=self._ssl)
        else:
            conn = http.client.HTTPConnection(self.host, self.port, timeout=self.cfg.timeout)
        try:
            headers = {**self.cfg.headers, "Content-Type": "application/x-protobuf",
                       "User-Agent": f"hopscope-collector/{__version__}"}
            conn.request("POST", self.path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read(1 << 20)
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data
        finally:
            conn.close()

    def _backoff(self, attempt: int) -> float:
        b = min(self.cfg.backoff_max, self.cfg.backoff_initial * 2 ** (attempt - 1))
        return b * (1 - self.cfg.jitter * random.random())

    def _export(self, batch: list[Mapping[str, Any]]) -> None:
        body, nspans = encode_requests(batch, self.resource, self.scope)
        waited = 0.0
        attempt = 0
        while True:
            attempt += 1
            retry_after: float | None = None
            try:
                status, headers, data = self._post(body)
            except (OSError, http.client.HTTPException) as exc:
                status, headers, data = 0, {}, b""
                why = f"{type(exc).__name__}: {exc}"
            else:
                why = f"HTTP {status}"
                retry_after = parse_retry_after(headers.get("retry-after"))
            if 200 <= status < 300:
                self._exported(batch, nspans, headers, data)
                return
            if status and status not in RETRYABLE:
                with self._cond:
                    self.posts["rejected"] += 1
                    self.dropped["rejected"] += len(batch)
                log.warning("event=otlp_rejected endpoint=%s status=%d requests=%d body=%r",
                            self.url, status, len(batch), data[:200])
                return
            with self._cond:
                self.posts["retryable"] += 1
            wait = retry_after if retry_after is not None else self._backoff(attempt)
            wait = min(wait, self.cfg.retry_after_max)
            if not self._failing:
                self._failing = True
                log.warning("event=otlp_failing endpoint=%s why=%s (retrying)", self.url, why)
            if waited + wait > self.cfg.retry_for:
                self._drop(batch, "retries_exhausted")
                log.warning("event=otlp_gave_up endpoint=%s why=%s requests=%d attempts=%d",
                            self.url, why, len(batch), attempt)
                if retry_after is not None:  # the receiver asked for a pause: honour it anyway
                    self._sleep(wait)
                return
            log.debug("event=otlp_retry endpoint=%s why=%s attempt=%d wait_s=%.3f", self.url,
                      why, attempt, wait)
            if self._sleep(wait) or self._abort.is_set():
                self._drop(batch, "shutdown")
                return
            waited += wait

    def _exported(self, batch: Sequence[Any], nspans: int, headers: Mapping[str, str],
                  data: bytes) -> None:
        rejected = 0
        if data and "protobuf" in headers.get("content-type", ""):
            resp = ExportTraceServiceResponse()
            try:
                resp.ParseFromString(data)
            except DecodeError:
                pass
            else:
                rejected = int(resp.partial_success.rejected_spans)
                if rejected or resp.partial_success.error_message:
                    log.warning("event=otlp_partial endpoint=%s rejected_spans=%d msg=%s",
                                self.url, rejected, resp.partial_success.error_message)
        with self._cond:
            self.posts["ok"] += 1
            self.exported_requests += len(batch)
            self.exported_spans += nspans - rejected
            self.rejected_spans += rejected
        if self._failing:
            self._failing = False
            log.info("event=otlp_recovered endpoint=%s", self.url)

    # -- metrics -----------------------------------------------------------------------
    def collect(self) -> Iterator[Metric]:
        with self._cond:
            queued, exported, spans, rejected = (len(self._q), self.exported_requests,
                                                 self.exported_spans, self.rejected_spans)
            dropped, posts = dict(self.dropped), dict(self.posts)
        yield GaugeMetricFamily("hopscope_otlp_queue_requests",
                                "Stitched requests waiting to be exported over OTLP.", queued)
        yield GaugeMetricFamily("hopscope_otlp_queue_capacity_requests",
                                "The OTLP queue's bound; when full the oldest is dropped.",
                                self.cfg.queue_size)
        yield CounterMetricFamily("hopscope_otlp_exported_requests",
                                  "Requests exported (as traces) and accepted.", exported)
        yield CounterMetricFamily("hopscope_otlp_exported_spans",
                                  "Spans exported and accepted.", spans)
        yield CounterMetricFamily("hopscope_otlp_rejected_spans",
                                  "Spans the receiver rejected in a partial success.", rejected)
        d = CounterMetricFamily("hopscope_otlp_dropped_requests", "Requests not exported, by "
                                "reason: queue_full (oldest dropped), rejected (non-retryable "
                                "status), retries_exhausted, shutdown.", labels=["reason"])
        for k, v in dropped.items():
            d.add_metric([k], float(v))
        yield d
        p = CounterMetricFamily("hopscope_otlp_posts", "POSTs to the OTLP endpoint, by "
                                "result: ok, retryable (429/502/503/504 or a connection "
                                "error), rejected.", labels=["result"])
        for k, v in posts.items():
            p.add_metric([k], float(v))
        yield p
