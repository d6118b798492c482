"""The collector's storage: finished requests, drops, clock offsets, raw batches.

:class:`Store` is the interface the server and the query CLI use;
:class:`SqliteStore` implements it with the standard library's ``sqlite3``
in WAL mode (one writer, readers in other processes do not block it).

Tables (all times integer nanoseconds):

``requests``  one row per stitched request (``request_id`` unique): the
              columns queries filter on, the whole hop-model request
              object as JSON, and the clock offsets its hops used
              (``clock``, JSON; ``trace`` shows them)
``hops``      one row per hop of a stored request (for ``hop_stats``)
``drops``     one row per drop (unique by node, point, kind, flow, first_ns)
``offsets``   per node, the latest clock offset against the reference
``agents``    per agent id, the highest batch seq stored (de-duplication
              by (agent, seq) survives restarts)
``batches``   every batch as the agent sent it (the frame's msgpack body:
              observations, clock samples, loss counters): its bytes in a
              segment file beside the database (``<db>.batches/``, see
              :mod:`~hopscope.collector.batchlog`), synced before this row
              (segment, offset, length) is committed in the same
              transaction that advances ``agents``: what the collector acks
              is durable, and a restarted collector re-stitches from them.
              (Stores written before kept the observations in the row's
              ``obs`` column, re-encoded as one msgpack array; both read
              back.)
"""

from __future__ import annotations

import json
import logging
import os
import re
import sqlite3
import time
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import msgpack
from hopscope.collector import wire
from hopscope.collector.batchlog import BatchLog, log_dir

from hopscope.errors import UsageError
from hopscope.model import Observation
from hopscope.render import percentile

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS requests (
    id INTEGER PRIMARY KEY,
    request_id TEXT NOT NULL UNIQUE,
    start_ns INTEGER NOT NULL,
    total_ns INTEGER,
    status INTEGER,
    path TEXT,
    ingress_node TEXT,
    pod_node TEXT,
    stored_ns INTEGER NOT NULL,
    json TEXT NOT NULL,
    clock TEXT
);
CREATE INDEX IF NOT EXISTS requests_start ON requests(start_ns);
CREATE INDEX IF NOT EXISTS requests_stored ON requests(stored_ns);
CREATE TABLE IF NOT EXISTS hops (
    req INTEGER NOT NULL REFERENCES requests(id) ON DELETE CASCADE,
    name TEXT NOT NULL,
    dir TEXT NOT NULL,
    node TEXT NOT NULL,
    duration_ns INTEGER NOT NULL,
    parent TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS hops_req ON hops(req);
CREATE TABLE IF NOT EXISTS drops (
    id INTEGER PRIMARY KEY,
    key TEXT NOT NULL UNIQUE,
    node TEXT,
    kind TEXT,
    first_ns INTEGER NOT NULL,
    stored_ns INTEGER NOT NULL,
    json TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS drops_first ON drops(first_ns);
CREATE TABLE IF NOT EXISTS offsets (
    node TEXT PRIMARY KEY,
    offset_ns INTEGER NOT NULL,
    error_ns INTEGER NOT NULL,
    reference TEXT NOT NULL,
    updated_ns INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS agents (
    agent TEXT PRIMARY KEY,
    seq INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS batches (
    agent TEXT NOT NULL,
    seq INTEGER NOT NULL,
    node TEXT NOT NULL,
    received_ns INTEGER NOT NULL,
    obs BLOB NOT NULL,
    seg INTEGER,
    off INTEGER,
    len INTEGER,
    PRIMARY KEY (agent, seq)
);
CREATE INDEX IF NOT EXISTS batches_received ON batches(received_ns);
-- a batch stored advances its agent's seq in the same statement (so: atomically)
CREATE TRIGGER IF NOT EXISTS batches_seq AFTER INSERT ON batches BEGIN
    INSERT INTO agents(agent, seq) VALUES (NEW.agent, NEW.seq)
        ON CONFLICT(agent) DO UPDATE SET seq = max(seq, excluded.seq);
END;
"""

_DUR = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ns|us|µs|ms|s|m|h|d)?\s*$")
_UNITS = {"ns": 1, "us": 1_000, "µs": 1_000, "ms": 1_000_000, "s": 1_000_000_000,
          "m": 60_000_000_000, "h": 3_600_000_000_000, "d": 86_400_000_000_000}


#: SQLite's integers: what a time, a duration or a limit may be
INT64_MAX = (1 << 63) - 1

#: rows a prune deletes in one transaction. On a copy of a soak's store (207,575 requests,
#: the machine quiet) a step of 500 requests and their hop rows took 19 to 90 ms (1.5 s when
#: its commit checkpointed the WAL), one of 2,000 140 to 190 ms, and a tenth of the store at
#: once (what a step was before) 1.0 s; docs/collector.md, "Storage"
PRUNE_CHUNK = 500


def in_range(value: int, what: str) -> int:
    """``value`` if SQLite can hold it, else a usage error naming ``what``."""
    if not -INT64_MAX - 1 <= value <= INT64_MAX:
        raise UsageError(f"{what}: out of range (at most {INT64_MAX} ns or items)")
    return value


def parse_duration(text: str, *, default_unit: str = "s") -> int:
    """``300ms``, ``1.5s``, ``250us``, ``10m``, ``1h`` -> integer nanoseconds."""
    m = _DUR.match(str(text))
    if not m:
        raise UsageError(f"bad duration {text!r}: use a number and a unit, e.g. 300ms, 1.5s, "
                         "250us, 10m, 1h")
    num, unit = m.group(1), m.group(2) or default_unit
    whole, _, frac = num.partition(".")
    scale = _UNITS[unit]
    ns = int(whole) * scale
    if frac:
        ns += int(frac) * scale // (10 ** len(frac))
    if ns > INT64_MAX:
        bare = "" if m.group(2) else f" (a number without a unit is in {default_unit})"
        raise UsageError(f"bad duration {text!r}: longer than 292 years{bare}")
    return ns


class Store(Protocol):
    """What the collector stores and the query side reads."""

    def put_requests(self, requests: list[dict[str, Any]],
                     clock: Mapping[str, dict[str, dict[str, int]]] | None = None) -> int: ...
    def put_drops(self, drops: list[dict[str, Any]]) -> int: ...
    def put_offsets(self, offsets: dict[str, Any]) -> None: ...
    def query_requests(self, since_ns: int | None = None, until_ns: int | None = None,
                       slower_than_ns: int | None = None, path: str | None = None,
                       status_class: str | None = None, node: str | None = None,
                       limit: int | None = None) -> list[dict[str, Any]]: ...
    def get_request(self, request_id: str) -> dict[str, Any] | None: ...
    def trace(self, request_id: str) -> dict[str, Any] | None: ...
    def hop_stats(self, since_ns: int | None = None,
                  by: str | None = None) -> list[dict[str, Any]]: ...
    def query_drops(self, since_ns: int | None = None) -> list[dict[str, Any]]: ...
    def prune(self, max_age_ns: int | None = None, max_bytes: int | None = None,
              raw_max_age_ns: int | None = None) -> int: ...


def completeness(r: dict[str, Any]) -> tuple[int, int, int]:
    """How much of a request was seen, to keep the better of two stitches of one id:
    whether it is whole (no ``incomplete``, an upstream request), how many of its ends
    (ingress node, pod node) are known, how many hops it has."""
    flags = r.get("flags") or ()
    return _rank("incomplete" in flags, "no_upstream" in flags, r.get("ingress_node"),
                 r.get("pod_node"), len(r.get("hops") or ()))


def _rank(incomplete: bool, no_upstream: bool, ingress: str | None, pod: str | None,
          hops: int) -> tuple[int, int, int]:
    return ((not incomplete) + (not no_upstream), (ingress is not None) + (pod is not None),
            hops)


#: a request's path without its query string, in SQL (what ``path=`` and ``--by path`` use)
_PATH_SQL = "CASE WHEN instr({col}, '?') > 0 THEN substr({col}, 1, instr({col}, '?') - 1) " \
    "ELSE {col} END"


def _better(r: dict[str, Any], old: list[Any]) -> bool:
    """Does stitch ``r`` replace the stored one (``old``: ``_rank``'s arguments)? Only when
    it ranks higher and knows every end the stored one knows: of two halves of a request
    (one node's part each, its late-window past or off), neither replaces the other, so
    that no node's hops are lost to another's."""
    _inc, _nou, ingress, pod, _hops = old
    if ingress is not None and r.get("ingress_node") is None:
        return False
    if pod is not None and r.get("pod_node") is None:
        return False
    return completeness(r) > _rank(*old)


#: a stored request's completeness, from its row (SQLite reads the JSON, not Python)
_RANK_SQL = ("SELECT id, instr(json_extract(json, '$.flags'), '\"incomplete\"') > 0, "
             "instr(json_extract(json, '$.flags'), '\"no_upstream\"') > 0, ingress_node, "
             "pod_node, json_array_length(json, '$.hops') FROM requests WHERE request_id = ?")


def _drop_key(d: dict[str, Any]) -> str:
    return "|".join(str(d.get(k, "")) for k in ("node", "point", "kind", "flow", "first_ns"))


def _status_filter(status_class: str) -> tuple[str, list[int]]:
    s = status_class.strip().lower()
    if re.fullmatch(r"[1-5]xx", s):
        lo = int(s[0]) * 100
        return "status BETWEEN ? AND ?", [lo, lo + 99]
    if re.fullmatch(r"\d{3}", s):
        return "status = ?", [int(s)]
    if s in ("none", "0", "---"):
        return "(status IS NULL OR status = 0)", []
    raise UsageError(f"bad status {status_class!r}: use a class like 5xx or a code like 503")


#: rows of one multi-row INSERT (SQLite allows 500 in a VALUES list, 32766 parameters)
_ROWS_PER_INSERT = 256


def _batch_observations(blob: bytes) -> Sequence[Observation]:
    """The observations of a stored batch: a frame body (a msgpack map), or, in stores
    written by earlier versions, the observations alone (a msgpack array)."""
    if blob[:1] and (0x80 <= blob[0] <= 0x8F or blob[0] in (0xDE, 0xDF)):
        frame = wire.decode_body(blob)
        if not isinstance(frame, wire.Batch):
            raise wire.BadFrame(f"a stored batch decodes to a {type(frame).__name__} frame")
        return frame.obs
    rows = msgpack.unpackb(blob, raw=False)
    return [tuple.__new__(Observation, r) for r in rows]


def _hop_rows(r: dict[str, Any]) -> list[tuple[str, str, str, int, str]]:
    """(name, dir, node, duration_ns, parent) of every hop of a request, each sub-hop right
    after its hop, ``parent`` the path of names above it ("ingress", "ingress/kernel_in")."""
    out: list[tuple[str, str, str, int, str]] = []

    def walk(hops: list[dict[str, Any]], parent: str) -> None:
        for h in hops:
            out.append((h["name"], h["dir"], h["node"], int(h["duration_ns"]), parent))
            if h.get("children"):
                walk(h["children"], f"{parent}/{h['name']}" if parent else h["name"])

    walk(r.get("hops") or [], "")
    return out


class SqliteStore:
    """:class:`Store` on SQLite (WAL). One instance per thread; integer ns everywhere."""

    def __init__(self, path: str | os.PathLike[str], *, readonly: bool = False) -> None:
        self.path = Path(path)
        try:
            if readonly:
                if not self.path.exists():
                    raise UsageError(f"no collector database at {self.path}")
                self.db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=10)
                tables = {r[0] for r in self.db.execute(
                    "SELECT name FROM sqlite_master WHERE type = 'table'")}
                if not {"requests", "batches"} & tables:
                    self.db.close()
                    raise UsageError(f"database {self.path}: not a hopscope collector store "
                                     "(no requests or batches table): give the file the "
                                     "collector's --db names")
            else:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self.db = sqlite3.connect(self.path, timeout=10, isolation_level=None)
                self.db.execute("PRAGMA journal_mode=WAL")
                self.db.execute("PRAGMA synchronous=NORMAL")
                self.db.executescript(_SCHEMA)
                cols = {r[1] for r in self.db.execute("PRAGMA table_info(batches)")}
                for c in ("seg", "off", "len"):  # a store from before the segment files
                    if c not in cols:
                        self.db.execute(f"ALTER TABLE batches ADD COLUMN {c} INTEGER")
                if "clock" not in {r[1] for r in self.db.execute("PRAGMA table_info(requests)")}:
                    self.db.execute("ALTER TABLE requests ADD COLUMN clock TEXT")
                if "parent" not in {r[1] for r in self.db.execute("PRAGMA table_info(hops)")}:
                    # a store from before the sub-hops had rows (its requests' have none)
                    self.db.execute("ALTER TABLE hops ADD COLUMN parent TEXT NOT NULL DEFAULT ''")
            self.db.execute("PRAGMA foreign_keys=ON")
        except sqlite3.Error as exc:
            raise UsageError(f"database {self.path}: {exc}") from None

        self.batch_log = BatchLog(log_dir(self.path))
        self.replaced = 0  # stored requests replaced by a more complete stitch
        self._seg_cols = "seg, off, len" if "seg" in {
            r[1] for r in self.db.execute("PRAGMA table_info(batches)")} else "NULL, NULL, NULL"
        # a store from before requests kept their clock offsets (read-only: not added)
        self._clock_col = "clock" if "clock" in {
            r[1] for r in self.db.execute("PRAGMA table_info(requests)")} else "NULL"
        self._parent_col = "h.parent" if "parent" in {
            r[1] for r in self.db.execute("PRAGMA table_info(hops)")} else "''"

    def close(self) -> None:
        self.batch_log.close()
        self.db.close()

    # -- the agents' batches (durable before the ack) --------------------------
    def agent_seqs(self) -> dict[str, int]:
        return {a: s for a, s in self.db.execute("SELECT agent, seq FROM agents")}

    def put_batch(self, agent: str, seq: int, node: str, obs: list[Observation],
                  received_ns: int | None = None) -> None:
        """Store one batch's observations and advance the agent's seq, in one transaction.

        (Observations built here, not received: they are encoded as a batch body.)"""
        body = wire.encode_batch(agent, seq, node, 0, obs)[wire.HEADER_SIZE:]
        self.put_batches([(agent, seq, node, body)], received_ns)

    def put_batches(self, batches: list[tuple[str, int, str, bytes]],
                    received_ns: int | None = None) -> None:
        """Store received batches, ``(agent, seq, node, frame body)`` each, and advance
        their agents' seqs: the bodies appended to the segment files and synced, then
        their rows in one statement, which advances the seqs too (a trigger): a group
        commit.

        The bodies must have been decoded and checked (``wire.decode_body``) first:
        they are stored as they are."""
        if not batches:
            return
        now = time.time_ns() if received_ns is None else received_ns
        where = self.batch_log.append([b[3] for b in batches])
        rows = [(agent, seq, node, now, *loc)
                for (agent, seq, node, _body), loc in zip(batches, where, strict=True)]
        if len(rows) <= _ROWS_PER_INSERT:
            # one statement: atomic on its own (the trigger advances ``agents``), and one
            # step of SQLite for the GIL to be given up and taken back
            self._insert_batches(rows)
            return
        with self._tx():
            for i in range(0, len(rows), _ROWS_PER_INSERT):
                self._insert_batches(rows[i:i + _ROWS_PER_INSERT])

    def _insert_batches(self, rows: list[tuple[Any, ...]]) -> None:
        values = ",".join(["(?, ?, ?, ?, x'', ?, ?, ?)"] * len(rows))
        self.db.execute(
            "INSERT OR IGNORE INTO batches(agent, seq, node, received_ns, obs, seg, off, len)"
            f" VALUES {values}", [x for r in rows for x in r])

    def iter_batches(self) -> Iterator[tuple[str, int, str, Sequence[Observation]]]:
        """Every retained batch, per agent in seq order: (agent, seq, node, observations)."""
        for agent, seq, node, blob, seg, off, n in self.db.execute(
                f"SELECT agent, seq, node, obs, {self._seg_cols} FROM batches"
                " ORDER BY agent, seq"):
            if seg is not None:
                blob = self.batch_log.read(seg, off, n)
            yield agent, seq, node, _batch_observations(blob)

    # -- results ----------------------------------------------------------------
    class _Tx:
        def __init__(self, db: sqlite3.Connection) -> None:
            self.db = db

        def __enter__(self) -> None:
            self.db.execute("BEGIN IMMEDIATE")

        def __exit__(self, et: object, ev: object, tb: object) -> None:
            self.db.execute("COMMIT" if et is None else "ROLLBACK")

    def _tx(self) -> SqliteStore._Tx:
        return SqliteStore._Tx(self.db)

    def put_requests(self, requests: list[dict[str, Any]],
                     clock: Mapping[str, dict[str, dict[str, int]]] | None = None) -> int:
        """Store finished requests; returns the new rows.

        ``clock``: request id -> the clock offsets its hops used (``trace`` shows them).
        A request id already stored keeps its row, unless the new request is more
        complete (:func:`completeness`: a node's data came late and the stitcher
        completed it), which then replaces the row and its hops (counted in
        :attr:`replaced`)."""
        n = 0
        now = time.time_ns()
        clock = clock or {}
        with self._tx():
            for r in requests:
                used = clock.get(r["request_id"])
                row = (r["request_id"], int(r["start_ns"]), r.get("total_ns"), r.get("status"),
                       r.get("path"), r.get("ingress_node"), r.get("pod_node"), now,
                       json.dumps(r, separators=(",", ":")),
                       None if used is None else json.dumps(used, separators=(",", ":")))
                cur = self.db.execute(
                    "INSERT OR IGNORE INTO requests(request_id, start_ns, total_ns, status, path, "
                    "ingress_node, pod_node, stored_ns, json, clock) VALUES (?,?,?,?,?,?,?,?,?,?)",
                    row)
                if cur.rowcount == 1:
                    n += 1
                    rowid = cur.lastrowid
                else:
                    (rowid, *old), = self.db.execute(_RANK_SQL, (r["request_id"],))
                    if not _better(r, old):
                        continue
                    self.db.execute(
                        "UPDATE requests SET start_ns=?, total_ns=?, status=?, path=?, "
                        "ingress_node=?, pod_node=?, stored_ns=?, json=?, clock=? WHERE id=?",
                        (*row[1:], rowid))
                    self.db.execute("DELETE FROM hops WHERE req = ?", (rowid,))
                    self.replaced += 1
                self.db.executemany(
                    "INSERT INTO hops(req, name, dir, node, duration_ns, parent) "
                    "VALUES (?,?,?,?,?,?)", [(rowid, *h) for h in _hop_rows(r)])
        return n

    _KEY_COLUMNS = {"requests": "request_id", "drops": "key"}

    def stored_keys(self, table: str, keys: list[str]) -> set[str]:
        """Which of ``keys`` are stored in ``table`` (``requests`` by id, ``drops`` by key)."""
        col = self._KEY_COLUMNS[table]
        uniq = list(set(keys))
        have: set[str] = set()
        for i in range(0, len(uniq), 500):
            chunk = uniq[i:i + 500]
            have.update(x for (x,) in self.db.execute(
                f"SELECT {col} FROM {table} WHERE {col} IN ({','.join('?' * len(chunk))})",
                chunk))
        return have

    def put_drops(self, drops: list[dict[str, Any]]) -> int:
        n = 0
        now = time.time_ns()
        with self._tx():
            for d in drops:
                cur = self.db.execute(
                    "INSERT OR IGNORE INTO drops(key, node, kind, first_ns, stored_ns, json) "
                    "VALUES (?,?,?,?,?,?)", (_drop_key(d), d.get("node"), d.get("kind"),
                                             int(d.get("first_ns", 0)), now,
                                             json.dumps(d, separators=(",", ":"))))
                n += cur.rowcount
        return n

    def put_offsets(self, offsets: dict[str, Any]) -> None:
        """``{"reference": NODE, "clock_offsets": {node: {offset_ns, error_ns}}}``."""
        ref = str(offsets.get("reference", ""))
        now = time.time_ns()
        with self._tx():
            for node, o in (offsets.get("clock_offsets") or {}).items():
                self.db.execute(
                    "INSERT INTO offsets(node, offset_ns, error_ns, reference, updated_ns) "
                    "VALUES (?,?,?,?,?) ON CONFLICT(node) DO UPDATE SET offset_ns=excluded.offset_ns,"
                    " error_ns=excluded.error_ns, reference=excluded.reference, "
                    "updated_ns=excluded.updated_ns",
                    (node, int(o["offset_ns"]), int(o["error_ns"]), ref, now))

    def offsets(self) -> tuple[str, dict[str, dict[str, int]]]:
        """(reference, clock_offsets) as the envelope carries them."""
        ref = ""
        out: dict[str, dict[str, int]] = {}
        for node, off, err, r in self.db.execute(
                "SELECT node, offset_ns, error_ns, reference FROM offsets ORDER BY node"):
            ref = r
            out[node] = {"offset_ns": off, "error_ns": err}
        return ref, out

    def envelope(self, requests: list[dict[str, Any]],
                 drops: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """The hop-model envelope around stored requests (offsets: the latest stored)."""
        ref, offs = self.offsets()
        return {"requests": requests, "drops": drops or [], "clock_offsets": offs,
                "reference": ref}

    # -- queries ----------------------------------------------------------------
    def newest_start_ns(self) -> int | None:
        row = self.db.execute("SELECT max(start_ns) FROM requests").fetchone()
        return None if row is None or row[0] is None else int(row[0])

    def count_requests(self) -> int:
        return int(self.db.execute("SELECT count(*) FROM requests").fetchone()[0])

    def query_requests(self, since_ns: int | None = None, until_ns: int | None = None,
                       slower_than_ns: int | None = None, path: str | None = None,
                       status_class: str | None = None, node: str | None = None,
                       limit: int | None = None) -> list[dict[str, Any]]:
        """Requests in start order; with ``limit``, the newest ``limit`` of those matching.

        ``path`` is exact (the query string aside, unless it has one: ``/api/tasks/``
        matches ``/api/tasks/?residence=42``), or a prefix when it ends with ``*``;
        ``status_class``
        is ``5xx``-style or an exact code; ``node`` matches the ingress or the
        pod node; ``slower_than_ns`` keeps ``total_ns > slower_than_ns``.
        """
        where: list[str] = []
        args: list[Any] = []
        if since_ns is not None:
            where.append("start_ns >= ?")
            args.append(int(since_ns))
        if until_ns is not None:
            where.append("start_ns < ?")
            args.append(int(until_ns))
        if slower_than_ns is not None:
            where.append("total_ns > ?")
            args.append(int(slower_than_ns))
        if path:
            if path.endswith("*"):
                where.append("substr(path, 1, ?) = ?")
                args += [len(path) - 1, path[:-1]]
            elif "?" in path:  # with its query string: that one
                where.append("path = ?")
                args.append(path)
            else:
                where.append(f"{_PATH_SQL.format(col='path')} = ?")
                args.append(path)
        if status_class:
            w, a = _status_filter(status_class)
            where.append(w)
            args += a
        if node:
            where.append("(ingress_node = ? OR pod_node = ?)")
            args += [node, node]
        sql = "SELECT json FROM requests"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY start_ns DESC, request_id DESC"
        if limit is not None:
            sql += " LIMIT ?"
            args.append(max(0, int(limit)))
        rows = [json.loads(j) for (j,) in self.db.execute(sql, args)]
        rows.reverse()
        return rows

    def get_request(self, request_id: str) -> dict[str, Any] | None:
        row = self.db.execute("SELECT json FROM requests WHERE request_id = ?",
                              (request_id,)).fetchone()
        return None if row is None else dict(json.loads(row[0]))

    def trace(self, request_id: str) -> dict[str, Any] | None:
        """One request's envelope, with the clock offsets its hops used (the latest stored
        when the request was stored without them)."""
        row = self.db.execute(f"SELECT json, {self._clock_col} FROM requests "
                              "WHERE request_id = ?", (request_id,)).fetchone()
        if row is None:
            return None
        env = self.envelope([json.loads(row[0])])
        if row[1] is not None:
            env["clock_offsets"] = json.loads(row[1])
        return env

    def hop_stats(self, since_ns: int | None = None,
                  by: str | None = None) -> list[dict[str, Any]]:
        """Per (group,) hop name and dir: count, p50, p90, p99, max (integer ns, nearest rank).

        ``by``: ``None`` (one group), ``"node"`` (the hop's node) or ``"path"``
        (the request's path, without its query string). A ``total`` row per group covers
        whole requests. Sub-hops (eBPF's split of ``ingress``) follow their hop, with
        ``parent``: the names above them ("ingress", "ingress/kernel_in").
        """
        if by not in (None, "", "node", "path"):
            raise UsageError(f"bad --by {by!r}: use node or path")
        since = -(1 << 62) if since_ns is None else int(since_ns)
        gcol = {"node": "h.node", "path": _PATH_SQL.format(col="r.path")}.get(by or "", "''")
        vals: dict[tuple[str, str, str, str], list[int]] = defaultdict(list)
        order: list[tuple[str, str, str, str]] = []
        subs: dict[tuple[str, str], list[tuple[str, str, str, str]]] = defaultdict(list)
        for g, name, dir_, dur, parent in self.db.execute(
                f"SELECT {gcol}, h.name, h.dir, h.duration_ns, {self._parent_col} FROM hops h "
                "JOIN requests r ON r.id = h.req WHERE r.start_ns >= ? ORDER BY r.start_ns, h.rowid",
                (since,)):
            k = (g or "", parent, name, dir_)
            if k not in vals:
                # a sub-hop is listed under its hop, wherever it was first seen
                (subs[(k[0], parent)] if parent else order).append(k)
            vals[k].append(dur)
        tcol = {"node": "ingress_node", "path": _PATH_SQL.format(col="path")}.get(by or "", "''")
        for g, tot in self.db.execute(
                f"SELECT {tcol}, total_ns FROM requests WHERE start_ns >= ? AND total_ns IS NOT NULL"
                " ORDER BY start_ns", (since,)):
            k = (g or "", "", "total", "")
            if k not in vals:
                order.append(k)
            vals[k].append(tot)

        def tree(k: tuple[str, str, str, str]) -> list[tuple[str, str, str, str]]:
            path = f"{k[1]}/{k[2]}" if k[1] else k[2]
            return [k] + [x for ck in subs.get((k[0], path), ()) for x in tree(ck)]

        out: list[dict[str, Any]] = []
        for k in sorted(order, key=lambda k: (k[0], k[2] == "total")):
            for t in tree(k):
                v = sorted(vals[t])
                row: dict[str, Any] = {"name": t[2], "dir": t[3], "count": len(v),
                                       "p50": percentile(v, 0.5), "p90": percentile(v, 0.9),
                                       "p99": percentile(v, 0.99), "max": v[-1]}
                if t[1]:
                    row["parent"] = t[1]
                if by:
                    row = {by: t[0], **row}
                out.append(row)
        return out

    def query_drops(self, since_ns: int | None = None) -> list[dict[str, Any]]:
        since = -(1 << 62) if since_ns is None else int(since_ns)
        return [json.loads(j) for (j,) in self.db.execute(
            "SELECT json FROM drops WHERE first_ns >= ? ORDER BY first_ns, key", (since,))]

    # -- retention ----------------------------------------------------------------
    def _page_bytes(self) -> int:
        """The database's pages in use (freed pages are reused, not returned)."""
        pc = self.db.execute("PRAGMA page_count").fetchone()[0]
        fl = self.db.execute("PRAGMA freelist_count").fetchone()[0]
        ps = self.db.execute("PRAGMA page_size").fetchone()[0]
        return int((pc - fl) * ps)

    def used_bytes(self) -> int:
        """The database's pages in use and every segment file on disk."""
        return self._page_bytes() + self.batch_log.size()

    def _referenced_segments(self) -> set[int]:
        return {seg for (seg,) in self.db.execute(
            "SELECT DISTINCT seg FROM batches WHERE seg IS NOT NULL")}

    def _remove_segments(self) -> None:
        """The segment files no stored batch points into any more."""
        self.batch_log.remove_unreferenced(self._referenced_segments())

    def _held_bytes(self) -> int:
        """What ``--max-db-bytes`` weighs: the database's pages in use and the segments that
        stored batches point into. Not the segment being written once no row points into
        it: deleting rows cannot shrink it (it goes when the writer moves on), so counting
        it would prune every request for nothing."""
        return self._page_bytes() + self.batch_log.size(self._referenced_segments())

    def prune(self, max_age_ns: int | None = None, max_bytes: int | None = None,
              raw_max_age_ns: int | None = None) -> int:
        """Delete what is older than ``max_age_ns`` (by the time it was stored), then the
        oldest requests (by start) until the database uses at most ``max_bytes``;
        raw batches older than ``raw_max_age_ns`` (default, and at most: ``max_age_ns``,
        so that a restart does not stitch again requests that retention deleted).
        Returns the requests deleted. (All at once: :meth:`prune_steps` in steps.)"""
        run = self.prune_steps(max_age_ns, max_bytes, raw_max_age_ns)
        for _ in run:
            pass
        return run.deleted

    def prune_steps(self, max_age_ns: int | None = None, max_bytes: int | None = None,
                    raw_max_age_ns: int | None = None, chunk: int = PRUNE_CHUNK) -> PruneRun:
        """:meth:`prune` as an iterator of steps, each one transaction that deletes at
        most ``chunk`` rows of a table: the caller may do other work between two steps
        (the collector serves its event loop), and the store is consistent after each.
        The requests deleted so far are the run's ``deleted``."""
        return PruneRun(self, max_age_ns, max_bytes, raw_max_age_ns, chunk)

    def _delete_chunk(self, table: str, where: str, args: tuple[Any, ...], chunk: int,
                      order: str = "") -> int:
        """One transaction: at most ``chunk`` rows of ``table`` matching ``where`` (in
        ``order``) deleted. Returns how many."""
        key = "id" if table in ("requests", "drops") else "rowid"
        with self._tx():
            return int(self.db.execute(
                f"DELETE FROM {table} WHERE {key} IN (SELECT {key} FROM {table} "
                f"WHERE {where} {order} LIMIT ?)", (*args, chunk)).rowcount)


class PruneRun:
    """One prune, step by step (``SqliteStore.prune_steps``): iterate it to run it."""

    def __init__(self, store: SqliteStore, max_age_ns: int | None, max_bytes: int | None,
                 raw_max_age_ns: int | None, chunk: int) -> None:
        if chunk < 1:
            raise UsageError(f"prune chunk {chunk}: must be at least 1")
        self.store = store
        self.deleted = 0  # requests, by age and by size
        self.by_size = 0  # requests deleted to bring the store under max_bytes
        self.batches = 0  # raw batches
        self._steps = self._run(max_age_ns, max_bytes, raw_max_age_ns, chunk)

    def __iter__(self) -> Iterator[None]:
        return self

    def __next__(self) -> None:
        return next(self._steps)

    def _all(self, table: str, where: str, args: tuple[Any, ...], chunk: int,
             order: str = "", limit: int | None = None) -> Iterator[int]:
        """Delete the matching rows of ``table`` (at most ``limit``), a chunk a step;
        yields each step's count."""
        left = limit
        while left is None or left > 0:
            n = chunk if left is None else min(chunk, left)
            done = self.store._delete_chunk(table, where, args, n, order)
            if left is not None:
                left -= done
            yield done
            if done < n:
                return

    def _run(self, max_age_ns: int | None, max_bytes: int | None,
             raw_max_age_ns: int | None, chunk: int) -> Iterator[None]:
        s = self.store
        now = time.time_ns()
        ages = [a for a in (raw_max_age_ns, max_age_ns) if a is not None]
        raw_age = min(ages) if ages else None
        if max_age_ns is not None:
            cut = (now - max_age_ns,)
            for n in self._all("requests", "stored_ns < ?", cut, chunk):
                self.deleted += n
                yield
            for _n in self._all("drops", "stored_ns < ?", cut, chunk):
                yield
        if raw_age is not None:
            for n in self._all("batches", "received_ns < ?", (now - raw_age,), chunk):
                self.batches += n
                yield
        s._remove_segments()
        if max_bytes is not None:
            for _ in range(64):
                if s._held_bytes() <= max_bytes:
                    break
                n = s.count_requests()
                nb = s.db.execute("SELECT count(*) FROM batches").fetchone()[0]
                if n == 0 and nb == 0:
                    break
                if nb:  # the oldest quarter of the raw batches
                    for k in self._all("batches", "1", (), chunk, "ORDER BY received_ns",
                                       max(1, nb // 4)):
                        self.batches += k
                        yield
                    s._remove_segments()
                if n:  # and the oldest tenth of the requests
                    for k in self._all("requests", "1", (), chunk, "ORDER BY start_ns",
                                       max(1, n // 10)):
                        self.by_size += k
                        self.deleted += k
                        yield
        if self.deleted or self.batches:
            log.info("event=pruned requests=%d by_size=%d raw_batches=%d db=%s",
                     self.deleted, self.by_size, self.batches, s.path)


def resolve_since(store: SqliteStore, since: str | int | None, anchor: str = "auto",
                  now_ns: int | None = None) -> int | None:
    """``since`` (a duration back from the anchor, or an absolute integer ns) -> ns.

    ``anchor``: ``now`` (the wall clock), ``newest`` (the newest stored
    request's start), or ``auto``: now, unless nothing stored is that recent
    (a database of old captures), then the newest stored request.
    """
    if since is None or since == "":
        return None
    if isinstance(since, int) or (str(since).isdigit() and len(str(since)) > 12):
        return in_range(int(since), f"since {since}")
    back = parse_duration(str(since), default_unit="s")
    now = time.time_ns() if now_ns is None else now_ns
    if anchor == "now":
        return now - back
    newest = store.newest_start_ns()
    if anchor == "newest":
        return (newest if newest is not None else now) - back
    if anchor != "auto":
        raise UsageError(f"bad anchor {anchor!r}: use now, newest or auto")
    if newest is not None and newest < now - back:
        return newest - back
    return now - back


