"""The collector wire protocol: agents -> collector over TCP (optionally TLS).

A frame is a 4-byte big-endian length followed by that many bytes of
msgpack: a map with the schema version ``v`` and the frame type ``t``
(``hello``, ``welcome``, ``batch``, ``ack``, ``error``, ``bye``) plus the
type's fields. A batch's observations travel by column (schema v2: one
packed array per :class:`~hopscope.model.Observation` field, strings and
addresses as indexes into per-batch tables, the payloads concatenated),
checked on arrival without a Python object per observation
(:class:`ObsColumns`); v1 batches (one msgpack array per observation) are
still read. A v3 batch also carries an agent's raw ring buffer records,
decoded here (:class:`RawObs`). The full contract (every field, versioning,
limits, auth, TLS, the spool, de-duplication) is in ``docs/wire.md``.

* :func:`encode` / :func:`encode_batch`: frame objects -> framed bytes.
* :class:`FrameDecoder`: a push decoder (``feed(bytes) -> [frames]``) whose
  buffer never holds more than ``4 + max_frame`` bytes; the length prefix
  is checked before anything is buffered for the body.
* :func:`read_frame` / :func:`write_frame`: the same over asyncio streams.
* :func:`read_token`, :func:`server_ssl_context`, :func:`client_ssl_context`.
* :func:`serve_agent` (the collector's side of one connection) and
  :func:`open_agent_connection` / :func:`client_hello` (the agent's).

Every refusal is a :class:`~hopscope.errors.WireError` subclass with a
one-line message saying what was wrong; the collector logs it as one line
and answers with an ``error`` frame before closing.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import hmac
import logging
import os
import ssl
import stat
import struct
import sys
import threading
import time
from array import array
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import accumulate, chain, count, repeat
from pathlib import Path
from typing import Any, TypeAlias, overload

import msgpack
from hopscope.agent.events import IFACE_POINTS, LAYOUT, RawEvents
from hopscope.agent.ringbuf import walk_records

from hopscope.errors import (
    AuthFailed,
    BadFrame,
    BadVersion,
    FrameTooLarge,
    HopscopeError,
    PeerClosed,
    StoreSkipped,
    UsageError,
    WireError,
)
from hopscope.model import Observation

log = logging.getLogger(__name__)

#: The newest schema version this module speaks: the ``v`` of the batches it writes
#: (columnar, :data:`OBS_COLUMNS_V2`). Every other frame type is unchanged since v1 and
#: written as ``v`` 1, so that a v1 peer reads it (docs/wire.md, *Versions*).
SCHEMA_VERSION = 2
#: The ``v`` of the frames other than batches this module writes.
CONTROL_VERSION = 1
#: The ``v`` of batches that carry the agent's raw ring buffer records (v2's columns
#: plus ``raw``: :class:`~hopscope.agent.events.RawEvents`), decoded here.
RAW_VERSION = 3
#: Versions the decoder accepts (``error`` frames are read whatever their version):
#: batches of v1 (rows), v2 (columns) and v3 (columns and raw records); for the other
#: frame types v2 and v3 mean v1.
SUPPORTED_VERSIONS = frozenset({1, 2, 3})
#: Default cap on a frame's body (the length prefix), in bytes.
MAX_FRAME = 8 << 20
#: Cap before the peer has authenticated: a hello is a few hundred bytes.
HELLO_MAX_FRAME = 64 << 10
#: Bytes of the length prefix.
HEADER_SIZE = 4
#: The collector's StreamReader limit for agent connections: it reads ahead up to
#: twice this, so that a batch of up to that size arrives without a pause and resume
#: of the transport per 64 KiB (asyncio's default limit)
STREAM_LIMIT = 1 << 20
#: Longest agent id / node / collector name, in characters.
MAX_NAME = 255
#: Longest token read from a token file, in bytes.
MAX_TOKEN = 4096
#: Shortest token accepted, in bytes (after stripping whitespace).
MIN_TOKEN = 16

#: The observation row of schema v1: field names and types, in order. It is
#: the model's field order; a change to the model needs a new schema version
#: (tests/test_wire.py checks that the two agree).
OBS_FIELDS_V1: tuple[tuple[str, type], ...] = (
    ("ts_real_ns", int), ("ts_mono_ns", int), ("node", str), ("ifname", str),
    ("point", str), ("direction", str), ("kind", str), ("proto", int),
    ("src", bytes), ("dst", bytes), ("sport", int), ("dport", int),
    ("seq", int), ("ack", int), ("flags", int), ("plen", int), ("ip_id", int),
    ("payload", bytes), ("vni", int), ("outer_src", bytes), ("outer_dst", bytes),
)
_NF = len(OBS_FIELDS_V1)

#: ``error`` frame codes and the exception each stands for.
ERROR_CODES: dict[str, type[WireError]] = {
    "auth": AuthFailed,
    "version": BadVersion,
    "too-large": FrameTooLarge,
    "bad-frame": BadFrame,
}


# --------------------------------------------------------------------------
# Frames


@dataclass(frozen=True, slots=True)
class Hello:
    """Agent -> collector, first frame: who I am, and the shared token."""

    agent: str
    node: str
    token: bytes = field(repr=False)
    started_ns: int  # the agent's start, wall clock (Unix ns): identifies its run


@dataclass(frozen=True, slots=True)
class Welcome:
    """Collector -> agent, the answer to a good hello."""

    collector: str
    acked: int  # highest seq already stored for this agent, -1 if none
    max_frame: int  # the body cap this collector enforces after the hello


@dataclass(frozen=True, slots=True)
class Batch:
    """Agent -> collector: observations, clock samples and loss counters."""

    agent: str
    seq: int  # per agent, strictly increasing across restarts
    node: str
    ts_real_ns: int  # when the batch was sent (agent's wall clock)
    #: a list, or (decoded from a v2 frame) :class:`ObsColumns` or (v3) :class:`RawObs`,
    #: rows built on first use
    obs: Sequence[Observation]
    clock: list[tuple[int, int]] = field(default_factory=list)  # (ts_mono_ns, ts_real_ns)
    lost: dict[str, int] = field(default_factory=dict)  # cumulative since started_ns
    #: the frame's body as received (empty when built locally): what the store keeps,
    #: so that it is not encoded again
    body: bytes = field(default=b"", compare=False)

    def __repr__(self) -> str:  # never dump thousands of observations into a log line
        return (f"Batch(agent={self.agent!r}, seq={self.seq}, node={self.node!r}, "
                f"ts_real_ns={self.ts_real_ns}, obs=<{batch_size(self)}>, "
                f"clock=<{len(self.clock)}>, lost={self.lost!r})")


@dataclass(frozen=True, slots=True)
class Ack:
    """Collector -> agent: every batch up to ``seq`` is stored (or was a duplicate)."""

    seq: int


@dataclass(frozen=True, slots=True)
class ErrorFrame:
    """Either way: why the sender is about to close the connection."""

    code: str  # a key of ERROR_CODES, or "internal"
    message: str
    seq: int = -1  # the batch refused, if the refusal is about one


@dataclass(frozen=True, slots=True)
class Bye:
    """Either way: an orderly close."""

    reason: str = ""


Frame: TypeAlias = Hello | Welcome | Batch | Ack | ErrorFrame | Bye


# --------------------------------------------------------------------------
# Encoding


#: one msgpack Packer per thread, kept between frames: ``msgpack.packb`` starts each frame
#: in a small buffer and grows it, which for a live agent's batch (a few hundred KB of raw
#: records) took 11 times as long as packing into a buffer already that size (measured
#: here: 175 against 16 µs for 200 KB). A thread that packed an unusually large frame
#: gets a fresh one next time (no thread keeps more than this much).
_PACKER_KEEP = 4 << 20
_packers = threading.local()


def _pack_framed(obj: Any, what: str, max_frame: int, frame_what: str, hint: str = "") -> bytes:
    """``obj`` packed by this thread's Packer, behind its length prefix, copied out of the
    packer's buffer once (a live agent's batch is a few hundred KB: packing, then copying
    out, then prefixing had been three copies). :class:`BadFrame` when a value cannot be
    packed, :class:`FrameTooLarge` beyond ``max_frame``."""
    p: msgpack.Packer | None = getattr(_packers, "p", None)
    if p is None:
        p = _packers.p = msgpack.Packer(use_bin_type=True, autoreset=False)
    try:
        p.reset()
        p.pack(obj)
    except (TypeError, ValueError, OverflowError) as exc:
        _packers.p = None  # its buffer holds part of the bad frame; start afresh
        raise BadFrame(f"cannot encode {what}: {exc}") from exc
    view = p.getbuffer()
    n = len(view)
    try:
        if n > max_frame:
            raise FrameTooLarge(f"{frame_what} encodes to {n} bytes, over the frame cap of "
                                f"{max_frame} bytes{hint}")
        return n.to_bytes(HEADER_SIZE, "big") + view
    finally:
        view.release()
        if n > _PACKER_KEEP:
            _packers.p = None


def encode_batch(
    agent: str,
    seq: int,
    node: str,
    ts_real_ns: int,
    obs: Sequence[Observation],
    clock: Iterable[tuple[int, int]] = (),
    lost: Mapping[str, int] | None = None,
    *,
    max_frame: int = MAX_FRAME,
    check: bool = False,
    version: int = SCHEMA_VERSION,
    raw: RawEvents | None = None,
) -> bytes:
    """One framed ``batch`` (length prefix included), ready for the socket or the spool.

    Version 2 (the default) packs ``obs`` by column (:func:`_columns`);
    version 1 as rows, for a collector that reads only v1. Either way
    :class:`BadFrame` is raised when a field cannot be encoded (v2: a str
    where an int goes, an int beyond 64 bits) and :class:`FrameTooLarge`
    when the batch is over ``max_frame``. With ``check`` the batch is also
    refused unless the collector will accept it (v1: every field's exact
    type, :func:`check_rows`; v2: the str and bytes fields, as the packed
    ints are ints by construction), so that a bad batch is refused here
    rather than spooled and sent forever; the message names the first bad
    observation and field.

    With ``raw`` the batch is a v3 batch: ``obs`` by column as in v2, and the
    agent's ring buffer records, which the collector decodes (:class:`RawObs`).
    """
    what = f"batch {seq} of agent {agent!r}"
    if raw is not None:
        version = RAW_VERSION
    elif version not in SUPPORTED_VERSIONS or version == RAW_VERSION:
        raise ValueError(f"cannot write batches of schema version {version}"
                         + (" without raw records" if version == RAW_VERSION else ""))
    head = {"v": version, "t": "batch", "agent": agent, "seq": seq, "node": node,
            "ts_real_ns": ts_real_ns, "clock": list(clock), "lost": dict(lost) if lost else {}}
    if version >= 2:
        head.update(_columns(obs, what, check))
        if raw is not None:
            head["raw"] = {"layout": raw.layout, "recs": raw.records,
                           "ifaces": [list(i) for i in raw.ifaces],
                           "offset_ns": raw.offset_ns, "cut_mono_ns": raw.cut_mono_ns}
    elif version == 1:
        if check:
            check_rows(obs, f"batch {seq}")
        head["obs"] = obs
    size = f"{len(obs)} observations" + (f", {len(raw.records)} bytes of raw records"
                                         if raw is not None else "")
    return _pack_framed(head, what, max_frame, f"batch {seq} ({size})", ": send smaller batches")


def batch_body(b: Batch) -> bytes:
    """The batch's frame body: as received, or encoded when it was built locally."""
    if b.body:
        return b.body
    if isinstance(b.obs, RawObs):
        return encode_batch(b.agent, b.seq, b.node, b.ts_real_ns, b.obs.decoded, b.clock,
                            b.lost, raw=b.obs.raw)[HEADER_SIZE:]
    return encode_batch(b.agent, b.seq, b.node, b.ts_real_ns, b.obs, b.clock,
                        b.lost)[HEADER_SIZE:]


def batch_size(b: Batch) -> int:
    """Observations in the batch, without decoding raw records (each counts as one)."""
    return b.obs.size if isinstance(b.obs, RawObs) else len(b.obs)


def encode(frame: Frame, *, max_frame: int = MAX_FRAME) -> bytes:
    """Any frame object -> framed bytes."""
    if isinstance(frame, Batch):
        return encode_batch(frame.agent, frame.seq, frame.node, frame.ts_real_ns, frame.obs,
                            frame.clock, frame.lost, max_frame=max_frame)
    body: dict[str, Any] = {"v": CONTROL_VERSION}
    if isinstance(frame, Hello):
        body.update(t="hello", agent=frame.agent, node=frame.node, token=bytes(frame.token),
                    started_ns=frame.started_ns)
    elif isinstance(frame, Welcome):
        body.update(t="welcome", collector=frame.collector, acked=frame.acked,
                    max_frame=frame.max_frame)
    elif isinstance(frame, Ack):
        body.update(t="ack", seq=frame.seq)
    elif isinstance(frame, ErrorFrame):
        body.update(t="error", code=frame.code, message=frame.message, seq=frame.seq)
    elif isinstance(frame, Bye):
        body.update(t="bye", reason=frame.reason)
    else:
        raise TypeError(f"not a frame: {type(frame).__name__}")
    return _pack_framed(body, f"{body['t']} frame", max_frame, f"{body['t']} frame")


# --------------------------------------------------------------------------
# Decoding


def _show(x: object, limit: int = 40) -> str:
    """A peer-supplied value, safe for a one-line message."""
    r = repr(x)
    return r if len(r) <= limit else r[: limit - 3] + "..."


def _tname(x: object) -> str:
    return {bool: "bool", int: "int", float: "float", str: "str", bytes: "bytes",
            tuple: "array", dict: "map", type(None): "nil"}.get(type(x), type(x).__name__)


def _refuse_ext(code: int, data: bytes) -> Any:
    raise BadFrame(f"msgpack extension type {code} is not allowed")


def _int(d: dict[Any, Any], key: str, t: str, lo: int = -(1 << 63), hi: int = (1 << 63) - 1,
         default: int | None = None) -> int:
    x = d.get(key, default)
    if x is None and key not in d:
        raise BadFrame(f"{t} frame: field {key!r} is missing")
    if type(x) is not int:
        raise BadFrame(f"{t} frame: field {key!r} must be an int, got {_tname(x)}")
    if not lo <= x <= hi:
        raise BadFrame(f"{t} frame: field {key!r} = {x} is out of range [{lo}, {hi}]")
    return x


def is_name(x: str) -> bool:
    """A node name or agent id the wire takes: 1 to MAX_NAME printable characters."""
    return 0 < len(x) <= MAX_NAME and x.isprintable()


def check_name(x: str, opt: str) -> None:
    """``x`` as a command-line option that ends up in the hello frame (a usage error here,
    not a refusal the agent would retry until its deadline)."""
    if not is_name(x):
        raise UsageError(f"{opt} {_show(x)}: must be 1 to {MAX_NAME} printable characters")


def _str(d: dict[Any, Any], key: str, t: str, default: str | None = None,
         name: bool = False) -> str:
    x = d.get(key, default)
    if x is None and key not in d:
        raise BadFrame(f"{t} frame: field {key!r} is missing")
    if type(x) is not str:
        raise BadFrame(f"{t} frame: field {key!r} must be a str, got {_tname(x)}")
    if name and not is_name(x):
        raise BadFrame(f"{t} frame: field {key!r} must be 1 to {MAX_NAME} printable"
                       f" characters, got {_show(x)}")
    return x


_ROW_TYPES = frozenset({tuple, list, Observation})
_CHUNK = 4096  # rows type-checked at a time: bounds the temporary lists
_EXPECTED = [ty for _, ty in OBS_FIELDS_V1] * _CHUNK


def check_rows(rows: Sequence[Any], what: str = "batch") -> None:
    """Raise :class:`BadFrame` unless every row is a schema-v1 observation row.

    Rows are arrays of exactly 21 fields whose types are exactly those of
    :data:`OBS_FIELDS_V1` (an ``int`` field takes an int, not a bool or a
    float). The check compares the list of every field's type with the
    expected one, 4096 rows at a time: all in C, no Python loop per
    observation (``bench/wire_codec.py`` measures it).
    """
    n = len(rows)
    if not n:
        return
    if not {*map(type, rows)} <= _ROW_TYPES:
        bad = next(i for i, r in enumerate(rows) if type(r) not in _ROW_TYPES)
        raise BadFrame(f"{what}: observation {bad} must be an array, got {_tname(rows[bad])}")
    if {*map(len, rows)} != {_NF}:
        bad = next(i for i, r in enumerate(rows) if len(r) != _NF)
        raise BadFrame(f"{what}: observation {bad} has {len(rows[bad])} fields,"
                       f" schema v{SCHEMA_VERSION} has {_NF}")
    for lo in range(0, n, _CHUNK):
        part = rows[lo:lo + _CHUNK]
        want = _EXPECTED if len(part) == _CHUNK else _EXPECTED[:len(part) * _NF]
        if [*map(type, chain.from_iterable(part))] != want:
            for j, r in enumerate(part, lo):
                for (name, ty), x in zip(OBS_FIELDS_V1, r, strict=True):
                    if type(x) is not ty:
                        raise BadFrame(f"{what}: observation {j} field {name!r} must be"
                                       f" {ty.__name__}, got {_tname(x)}")


_new = tuple.__new__


def _observations(d: dict[Any, Any], what: str) -> list[Observation]:
    rows = d.get("obs")
    if type(rows) is not tuple:
        raise BadFrame(f"{what}: field 'obs' must be an array, got {_tname(rows)}")
    check_rows(rows, what)
    return list(map(_new, repeat(Observation, len(rows)), rows))


# --------------------------------------------------------------------------
# Schema v2: a batch's observations by column

#: The columns of a v2 batch, in :class:`Observation` field order: each field's
#: coding. ``int``: the values themselves, fixed-width; ``str``: an index into the
#: batch's ``strs`` table; ``addr``: an index into its ``addrs`` table (bytes);
#: ``blob``: each payload's length, the payloads themselves concatenated in ``blob``.
OBS_COLUMNS_V2: tuple[tuple[str, str], ...] = (
    ("ts_real_ns", "int"), ("ts_mono_ns", "int"), ("node", "str"), ("ifname", "str"),
    ("point", "str"), ("direction", "str"), ("kind", "str"), ("proto", "int"),
    ("src", "addr"), ("dst", "addr"), ("sport", "int"), ("dport", "int"), ("seq", "int"),
    ("ack", "int"), ("flags", "int"), ("plen", "int"), ("ip_id", "int"), ("payload", "blob"),
    ("vni", "int"), ("outer_src", "addr"), ("outer_dst", "addr"),
)

#: ``array`` type codes allowed per coding, and their widths in bytes. Every column
#: is little-endian on the wire; an int column takes the narrowest code its values fit.
_INT_CODES = "bBhHiIq"
_INDEX_CODES = "BHI"
_WIDTH = {"b": 1, "B": 1, "h": 2, "H": 2, "i": 4, "I": 4, "q": 8}
_RANGE = {c: ((0, (1 << 8 * w) - 1) if c.isupper() else (-(1 << 8 * w - 1), (1 << 8 * w - 1) - 1))
          for c, w in _WIDTH.items()}
_LITTLE = sys.byteorder == "little"
_NO_COLUMNS = [b""] * _NF
_PAYLOAD = Observation._fields.index("payload")
if {c: array(c).itemsize for c in _WIDTH} != _WIDTH:  # pragma: no cover - exotic C ABIs
    raise ImportError(f"hopscope.collector.wire needs the array module's usual widths"
                      f" {_WIDTH}, got {({c: array(c).itemsize for c in _WIDTH})}")


def _int_code(lo: int, hi: int) -> str:
    """The narrowest type code that holds every value in [lo, hi]."""
    for c in ("BHI" if lo >= 0 else "bhi"):
        a, b = _RANGE[c]
        if a <= lo and hi <= b:
            return c
    return "q"


#: the code an int column is packed with first: what its values fit in practice (a
#: column that does not fit is packed with the narrowest code that fits, found then)
_FIRST_CODE = {"ts_real_ns": "q", "ts_mono_ns": "q", "proto": "B", "sport": "H", "dport": "H",
               "seq": "I", "ack": "I", "flags": "B", "plen": "H", "ip_id": "i", "vni": "i"}


@functools.lru_cache(maxsize=256)
def _struct(n: int, code: str) -> struct.Struct:
    return struct.Struct(f"<{n}{code}")


def _pack_int(n: int, col: Sequence[Any], first: str) -> tuple[str, bytes]:
    try:
        return first, _struct(n, first).pack(*col)
    except struct.error:
        code = _int_code(min(col), max(col))
        try:
            return code, _struct(n, code).pack(*col)
        except struct.error as exc:
            raise TypeError(exc) from None


def _pack_index(n: int, col: Sequence[Any], pos: dict[Any, int], size: int) -> tuple[str, bytes]:
    if size <= 0x100:
        return "B", bytes(map(pos.__getitem__, col))
    code = _int_code(0, size - 1)
    return code, _struct(n, code).pack(*map(pos.__getitem__, col))


def _columns(obs: Sequence[Observation], what: str, check: bool = False) -> dict[str, Any]:
    """The v2 fields of a batch: ``n``, ``types``, ``cols``, ``strs``, ``addrs``, ``blob``.

    All in C but the loop over the 21 columns: ``zip(*rows)`` transposes,
    ``dict.fromkeys`` collects each table's distinct values in order, ``map``
    turns values into indexes and ``struct`` packs them. With ``check``, the
    tables and payloads must hold only str and bytes as the collector requires
    (a few C calls); when they do not, or a field cannot be packed, the
    message comes from :func:`check_rows` (naming the observation and field).
    """
    n = len(obs)
    if not n:
        return {"n": 0, "types": "".join("q" if k == "int" else "B" for _, k in OBS_COLUMNS_V2),
                "cols": _NO_COLUMNS, "strs": [], "addrs": [], "blob": b""}
    try:
        return _pack_columns(n, list(zip(*obs, strict=True)), check)
    except (TypeError, OverflowError, ValueError) as exc:
        if check:
            check_rows(obs, what)
        raise BadFrame(f"cannot encode {what}: {exc}") from None


def _pack_columns(n: int, cols: list[tuple[Any, ...]], check: bool) -> dict[str, Any]:
    if len(cols) != _NF:
        raise ValueError(f"observations must have {_NF} fields, not {len(cols)}")
    strs = list(dict.fromkeys(chain.from_iterable(
        cols[i] for i, (_, k) in enumerate(OBS_COLUMNS_V2) if k == "str")))
    addrs = list(dict.fromkeys(chain.from_iterable(
        cols[i] for i, (_, k) in enumerate(OBS_COLUMNS_V2) if k == "addr")))
    if check and not ({*map(type, strs)} <= {str} and {*map(type, addrs)} <= {bytes}
                      and {*map(type, cols[_PAYLOAD])} <= {bytes}):
        raise TypeError("a str or bytes field holds another type")
    spos = dict(zip(strs, count()))
    apos = dict(zip(addrs, count()))
    types = []
    out = []
    blob = b""
    for (name, kind), col in zip(OBS_COLUMNS_V2, cols, strict=True):
        try:
            if kind == "int":
                code, packed = _pack_int(n, col, _FIRST_CODE[name])
            elif kind == "str":
                code, packed = _pack_index(n, col, spos, len(strs))
            elif kind == "addr":
                code, packed = _pack_index(n, col, apos, len(addrs))
            else:
                blob = b"".join(col)
                code, packed = _pack_int(n, tuple(map(len, col)), "H")
        except (TypeError, OverflowError) as exc:
            raise TypeError(f"field {name!r}: {exc}") from None
        types.append(code)
        out.append(packed)
    return {"n": n, "types": "".join(types), "cols": out, "strs": strs, "addrs": addrs,
            "blob": blob}


class _LazyRows(Sequence[Observation]):
    """A batch's observations, the :class:`Observation` tuples built on first use."""

    __slots__ = ()

    def rows(self) -> list[Observation]:
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self.rows())

    def __iter__(self) -> Iterator[Observation]:
        return iter(self.rows())

    @overload
    def __getitem__(self, i: int) -> Observation: ...

    @overload
    def __getitem__(self, i: slice) -> list[Observation]: ...

    def __getitem__(self, i: int | slice) -> Observation | list[Observation]:
        return self.rows()[i]

    def __eq__(self, other: object) -> bool:
        if isinstance(other, _LazyRows):
            return self.rows() == other.rows()
        if isinstance(other, list | tuple):
            return self.rows() == list(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]


class ObsColumns(_LazyRows):
    """The observations of a v2 batch, checked but kept by column until first used.

    What the collector needs before it acks (the count, the stored body) never
    builds a tuple; the first iteration, index or comparison builds the
    :class:`Observation` rows (all in C, as :func:`_columns` packs them) and
    keeps them, dropping the columns.
    """

    __slots__ = ("_addrs", "_arrays", "_blob", "_n", "_rows", "_strs")

    def __init__(self, n: int, arrays: list[array[int]], strs: tuple[str, ...],
                 addrs: tuple[bytes, ...], blob: bytes) -> None:
        self._n = n
        self._arrays: list[array[int]] | None = arrays
        self._strs = strs
        self._addrs = addrs
        self._blob = blob
        self._rows: list[Observation] | None = None

    def rows(self) -> list[Observation]:
        """The observations as :class:`Observation` tuples (built once)."""
        if self._rows is None:
            arrays = self._arrays
            assert arrays is not None
            blob = self._blob
            cols: list[Iterable[Any]] = []
            for (_, kind), a in zip(OBS_COLUMNS_V2, arrays, strict=True):
                if kind == "int":
                    cols.append(a)
                elif kind == "str":
                    cols.append(map(self._strs.__getitem__, a))
                elif kind == "addr":
                    cols.append(map(self._addrs.__getitem__, a))
                else:
                    ends = list(accumulate(a))
                    cols.append(map(blob.__getitem__, map(slice, chain((0,), ends), ends)))
            self._rows = list(map(_new, repeat(Observation, self._n), zip(*cols, strict=True)))
            self._arrays = None
            self._blob = b""
        return self._rows

    def __len__(self) -> int:
        return self._n

    def __repr__(self) -> str:
        return f"<{self._n} observations>"


def _bins(x: Any, size: int) -> bool:
    return type(x) is tuple and len(x) == size and {*map(type, x)} <= {bytes}


def _obs_columns(d: dict[Any, Any], what: str) -> ObsColumns:
    """Check a v2 batch's columns (every length, type code and index) and keep them."""
    n = d.get("n")
    if type(n) is not int or n < 0:
        raise BadFrame(f"{what}: field 'n' must be an int >= 0, got {_show(n)}")
    types: Any = d.get("types")
    cols: Any = d.get("cols")
    strs, addrs, blob = d.get("strs", ()), d.get("addrs", ()), d.get("blob", b"")
    if type(types) is not str or len(types) != _NF:
        raise BadFrame(f"{what}: field 'types' must be a str of {_NF} type codes")
    if not _bins(cols, _NF):
        raise BadFrame(f"{what}: field 'cols' must be an array of {_NF} bin")
    if type(strs) is not tuple or not {*map(type, strs)} <= {str}:
        raise BadFrame(f"{what}: field 'strs' must be an array of str")
    if type(addrs) is not tuple or not {*map(type, addrs)} <= {bytes}:
        raise BadFrame(f"{what}: field 'addrs' must be an array of bin")
    if type(blob) is not bytes:
        raise BadFrame(f"{what}: field 'blob' must be a bin, got {_tname(blob)}")
    arrays: list[array[int]] = []
    for (name, kind), code, col in zip(OBS_COLUMNS_V2, types, cols, strict=True):
        if code not in (_INT_CODES if kind == "int" else _INDEX_CODES):
            raise BadFrame(f"{what}: column {name!r} has type code {code!r}, allowed:"
                           f" {_INT_CODES if kind == 'int' else _INDEX_CODES}")
        if len(col) != n * _WIDTH[code]:
            raise BadFrame(f"{what}: column {name!r} holds {len(col)} bytes, {n} values of"
                           f" type {code!r} take {n * _WIDTH[code]}")
        a = array(code, col)
        if not _LITTLE:  # pragma: no cover - big-endian hosts
            a.byteswap()
        if n and kind != "int":
            top = len(strs) if kind == "str" else len(addrs) if kind == "addr" else -1
            if top >= 0 and max(a) >= top:
                raise BadFrame(f"{what}: column {name!r} indexes entry {max(a)} of a table"
                               f" of {top}")
        arrays.append(a)
    total = sum(arrays[_PAYLOAD])
    if total != len(blob):
        raise BadFrame(f"{what}: the payload lengths add up to {total} bytes, 'blob' holds"
                       f" {len(blob)}")
    return ObsColumns(n, arrays, strs, addrs, blob)


class RawObs(_LazyRows):
    """The observations of a v3 batch: those the agent decoded itself (``decoded``, by
    column as in v2) and then its raw ring buffer records (``raw``), decoded here on
    first use. ``cut_mono_ns``: the collector puts the node's observations back in time
    order up to it (:class:`~hopscope.model.Reorder`), as the agent would have."""

    __slots__ = ("_recs", "_rows", "bad", "cut_mono_ns", "decoded", "node", "raw", "size")

    def __init__(self, decoded: ObsColumns, raw: RawEvents, node: str,
                 recs: list[tuple[int, int]]) -> None:
        self.decoded = decoded
        self.raw = raw
        self.node = node
        self.cut_mono_ns = raw.cut_mono_ns
        #: observations before decoding: a raw record counts as one (batch_size)
        self.size = len(decoded) + len(recs)
        self._recs: list[tuple[int, int]] | None = recs  # walk_records(raw.records)
        self.bad = 0  # records that could not be decoded (an interface it did not name)
        self._rows: list[Observation] | None = None

    def rows(self) -> list[Observation]:
        if self._rows is None:
            rows = list(self.decoded)
            self.bad = self.raw.decode(self.node, rows, self._recs)
            self._rows = rows
            self._recs = None
        return self._rows

    def __repr__(self) -> str:
        return f"<{len(self.decoded)} observations and {len(self.raw.records)} bytes of records>"


def _raw(d: dict[Any, Any], what: str) -> tuple[RawEvents, list[tuple[int, int]]]:
    """Check a v3 batch's ``raw`` map (its records tile their bytes) and keep it."""
    raw = d.get("raw")
    if type(raw) is not dict:
        raise BadFrame(f"{what}: a v3 batch needs a map 'raw', got {_tname(raw)}")
    layout = _int(raw, "layout", what, lo=0)
    if layout != LAYOUT:
        raise BadFrame(f"{what}: raw records of event layout {layout}, this collector decodes"
                       f" layout {LAYOUT}: run the same hopscope version on agents and"
                       " collector")
    recs = raw.get("recs")
    if type(recs) is not bytes:
        raise BadFrame(f"{what}: field 'raw.recs' must be a bin, got {_tname(recs)}")
    ifaces = raw.get("ifaces", ())
    if type(ifaces) is not tuple or not all(
            type(i) is tuple and len(i) == 3 and type(i[0]) is int and type(i[1]) is str
            and i[2] in IFACE_POINTS for i in ifaces):
        raise BadFrame(f"{what}: field 'raw.ifaces' must hold [ifindex, name, point] entries"
                       f" (points: {', '.join(sorted(IFACE_POINTS))})")
    try:
        spans = walk_records(recs)
    except ValueError as exc:
        raise BadFrame(f"{what}: raw records: {exc}") from None
    return RawEvents(recs, ifaces, _int(raw, "offset_ns", what),
                     _int(raw, "cut_mono_ns", what), layout), spans


def _clock(d: dict[Any, Any], what: str) -> list[tuple[int, int]]:
    clock = d.get("clock", ())
    if type(clock) is not tuple:
        raise BadFrame(f"{what}: field 'clock' must be an array, got {_tname(clock)}")
    if clock and ({*map(type, clock)} != {tuple} or {*map(len, clock)} != {2}
                  or {*map(type, chain.from_iterable(clock))} != {int}):
        raise BadFrame(f"{what}: field 'clock' must hold [ts_mono_ns, ts_real_ns] int pairs")
    return list(clock)


def _lost(d: dict[Any, Any], what: str) -> dict[str, int]:
    lost = d.get("lost", {})
    if type(lost) is not dict:
        raise BadFrame(f"{what}: field 'lost' must be a map, got {_tname(lost)}")
    if lost and ({*map(type, lost)} != {str} or {*map(type, lost.values())} != {int}
                 or min(lost.values()) < 0):
        raise BadFrame(f"{what}: field 'lost' must map source names to counts >= 0")
    return lost


def _decode_map(d: dict[Any, Any], body: bytes | bytearray | memoryview = b"") -> Frame:
    t = d.get("t")
    v = d.get("v")
    if v is None:
        raise BadFrame("frame has no schema version 'v'")
    if type(v) is not int:
        raise BadFrame(f"schema version 'v' must be an int, got {_tname(v)}")
    if t == "error":  # error frames are read whatever their version (docs/wire.md)
        return ErrorFrame(_str(d, "code", "error"), _str(d, "message", "error", ""),
                          _int(d, "seq", "error", lo=-1, default=-1))
    if v not in SUPPORTED_VERSIONS:
        raise BadVersion(f"schema version {v} is not supported (this side speaks"
                         f" {max(SUPPORTED_VERSIONS)}); upgrade the older side")
    if t == "batch":
        seq = _int(d, "seq", "batch", lo=0)
        try:
            return _decode_batch(d, v, seq, body)
        except BadFrame as exc:
            exc.seq = seq  # refused for good: the agent drops it (docs/wire.md)
            raise
    if t == "ack":
        return Ack(_int(d, "seq", "ack", lo=-1))
    if t == "hello":
        token = d.get("token")
        if type(token) is not bytes:
            raise BadFrame(f"hello frame: field 'token' must be bytes (bin), got {_tname(token)}")
        return Hello(_str(d, "agent", "hello", name=True), _str(d, "node", "hello", name=True),
                     token, _int(d, "started_ns", "hello"))
    if t == "welcome":
        return Welcome(_str(d, "collector", "welcome", ""), _int(d, "acked", "welcome", lo=-1),
                       _int(d, "max_frame", "welcome", lo=1, hi=(1 << 32) - 1))
    if t == "bye":
        return Bye(_str(d, "reason", "bye", ""))
    if t is None:
        raise BadFrame("frame has no type 't'")
    raise BadFrame(f"unknown frame type {_show(t)}")


def _decode_batch(d: dict[Any, Any], v: int, seq: int,
                  body: bytes | bytearray | memoryview) -> Batch:
    what = f"batch {seq}"
    node = _str(d, "node", "batch", name=True)
    obs: Sequence[Observation]
    if v == RAW_VERSION:
        raw, spans = _raw(d, what)
        obs = RawObs(_obs_columns(d, what), raw, node, spans)
    else:
        obs = _obs_columns(d, what) if v == 2 else _observations(d, what)
    return Batch(_str(d, "agent", "batch", name=True), seq, node,
                 _int(d, "ts_real_ns", "batch"), obs, _clock(d, what), _lost(d, what),
                 bytes(body))


def decode_body(body: bytes | bytearray | memoryview) -> Frame:
    """One frame's body (without the length prefix) -> a frame object.

    Raises :class:`BadFrame` or :class:`BadVersion`; nothing else.
    """
    if not len(body):
        raise BadFrame("empty frame (length prefix 0)")
    try:
        d = msgpack.unpackb(body, use_list=False, raw=False, strict_map_key=True,
                            ext_hook=_refuse_ext)
    except WireError:
        raise
    except Exception as exc:  # msgpack's errors: ExtraData, FormatError, StackError, ...
        msg = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
        raise BadFrame(f"frame body is not valid msgpack ({len(body)} bytes): {msg}") from None
    if type(d) is not dict:
        raise BadFrame(f"frame body must be a msgpack map, got {_tname(d)}")
    return _decode_map(d, body)


def _hint(head: bytes) -> str:
    if head[:1] == b"\x16" and head[1:2] == b"\x03":
        return " (it looks like a TLS handshake: is TLS on at one end only?)"
    if head.isascii() and all(32 <= c < 127 for c in head):
        return f" (the first bytes {head!r} look like text: not a hopscope peer?)"
    return ""


def check_length(head: bytes | bytearray | memoryview, max_frame: int) -> int:
    """The body length from a 4-byte prefix; raises before anything is allocated for it."""
    n = int.from_bytes(head, "big")
    if n > max_frame:
        raise FrameTooLarge(f"frame of {n} bytes announced, over the cap of {max_frame}"
                            f" bytes{_hint(bytes(head))}")
    if n == 0:
        raise BadFrame("empty frame (length prefix 0)")
    return n


class FrameDecoder:
    """Push decoder: :meth:`feed` bytes as they arrive, get the complete frames.

    The buffer holds at most one length prefix and one body, so never more
    than ``4 + max_frame`` bytes; a prefix over ``max_frame`` is refused
    before any byte of its body is buffered. ``max_frame`` may be changed
    between calls (say, raised after the hello).

    Errors (:class:`FrameTooLarge`, :class:`BadFrame`, :class:`BadVersion`)
    are sticky: the stream cannot be trusted afterwards, so every later call
    raises the same error. A :meth:`feed` that decoded good frames before
    hitting the error returns those first; the next call raises it. Call
    :meth:`eof` when the stream ends: it raises if a frame was cut short.
    """

    __slots__ = ("_body", "_error", "_head", "_need", "max_frame")

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self.max_frame = max_frame
        self._head = bytearray()
        self._body = bytearray()
        self._need = -1  # body length being read, -1 while reading a prefix
        self._error: WireError | None = None

    @property
    def buffered(self) -> int:
        """Bytes held between calls (at most ``4 + max_frame``)."""
        return len(self._head) + len(self._body)

    @property
    def failed(self) -> WireError | None:
        """The error this decoder stopped on, if any."""
        return self._error

    def feed(self, data: bytes | bytearray | memoryview) -> list[Frame]:
        if self._error is not None:
            raise self._error.with_traceback(None)
        out: list[Frame] = []
        try:
            with memoryview(data) as mv, mv.cast("B") as mv:
                self._feed(mv, out)
        except WireError as exc:
            self._error = exc
            self._head.clear()
            self._body = bytearray()
            if not out:
                raise
        return out

    def _feed(self, mv: memoryview, out: list[Frame]) -> None:
        n = len(mv)
        pos = 0
        head = self._head
        while pos < n:
            if self._need < 0:
                if not head and n - pos >= HEADER_SIZE:
                    size = check_length(mv[pos:pos + HEADER_SIZE].tobytes(), self.max_frame)
                    pos += HEADER_SIZE
                else:
                    take = min(HEADER_SIZE - len(head), n - pos)
                    head += mv[pos:pos + take]
                    pos += take
                    if len(head) < HEADER_SIZE:
                        return
                    size = check_length(head, self.max_frame)
                    head.clear()
                self._need = size
            size = self._need
            body = self._body
            if not body and n - pos >= size:  # the whole body is here: no copy
                with mv[pos:pos + size] as part:
                    pos += size
                    self._need = -1
                    out.append(decode_body(part))
                continue
            take = min(size - len(body), n - pos)
            body += mv[pos:pos + take]
            pos += take
            if len(body) < size:
                return
            self._need = -1
            self._body = bytearray()  # frees the body's memory once decoded
            out.append(decode_body(body))

    def eof(self) -> None:
        """The stream ended: raise :class:`BadFrame` if it ended inside a frame."""
        if self._error is not None:
            raise self._error.with_traceback(None)
        if self._need >= 0:
            raise BadFrame(f"truncated frame: the stream ended after {len(self._body)} of"
                           f" {self._need} body bytes")
        if self._head:
            raise BadFrame(f"truncated frame: the stream ended after {len(self._head)} of"
                           f" {HEADER_SIZE} length-prefix bytes")


# --------------------------------------------------------------------------
# asyncio streams


async def read_frame(reader: asyncio.StreamReader, max_frame: int = MAX_FRAME) -> Frame:
    """Read one frame; the length prefix is checked against ``max_frame`` first.

    Raises :class:`PeerClosed` when the stream ends cleanly between frames
    (or the connection is reset), :class:`BadFrame` when it ends inside one,
    and whatever :func:`decode_body` raises.
    """
    try:
        head = await reader.readexactly(HEADER_SIZE)
    except asyncio.IncompleteReadError as exc:
        if not exc.partial:
            raise PeerClosed("the peer closed the connection") from None
        raise BadFrame(f"truncated frame: the connection closed after {len(exc.partial)} of"
                       f" {HEADER_SIZE} length-prefix bytes") from None
    except ConnectionError as exc:
        raise PeerClosed(f"the connection was lost: {exc}") from None
    size = check_length(head, max_frame)
    try:
        body = await reader.readexactly(size)
    except asyncio.IncompleteReadError as exc:
        raise BadFrame(f"truncated frame: the connection closed after {len(exc.partial)} of"
                       f" {size} body bytes") from None
    except ConnectionError as exc:
        raise BadFrame(f"truncated frame: the connection was lost inside a frame: {exc}") from None
    return decode_body(body)


async def write_frame(writer: asyncio.StreamWriter, frame: Frame | bytes,
                      max_frame: int = MAX_FRAME) -> None:
    """Write one frame (a frame object, or bytes already framed) and drain."""
    writer.write(frame if isinstance(frame, bytes) else encode(frame, max_frame=max_frame))
    await writer.drain()


def peer_name(writer: asyncio.StreamWriter) -> str:
    """``host:port`` of the other end, for log lines."""
    p = writer.get_extra_info("peername")
    if isinstance(p, tuple) and len(p) >= 2:
        return f"[{p[0]}]:{p[1]}" if ":" in str(p[0]) else f"{p[0]}:{p[1]}"
    return str(p or "?")


def error_code(exc: BaseException) -> str:
    for code, cls in ERROR_CODES.items():
        if isinstance(exc, cls):
            return code
    return "internal"


def error_from_frame(frame: ErrorFrame) -> WireError:
    """The exception an ``error`` frame stands for, on the side that received it."""
    cls = ERROR_CODES.get(frame.code, WireError)
    return cls(f"the peer refused: {frame.message or frame.code}")


async def refuse(writer: asyncio.StreamWriter, exc: BaseException, *, who: str = "",
                 seq: int = -1) -> None:
    """Log one line, send an ``error`` frame (best effort) and close."""
    log.warning("refused %s%s: %s", peer_name(writer), f" ({who})" if who else "", exc)
    text = str(exc)[:1000] if isinstance(exc, WireError) else "internal error: see the collector's log"
    try:
        writer.write(encode(ErrorFrame(error_code(exc), text, seq)))
        await asyncio.wait_for(writer.drain(), 2.0)
    except (OSError, TimeoutError, RuntimeError):
        pass
    await close_writer(writer)


async def close_writer(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(OSError, TimeoutError):
        await asyncio.wait_for(writer.wait_closed(), 2.0)


# --------------------------------------------------------------------------
# Authentication


def read_token(path: str | os.PathLike[str]) -> bytes:
    """The shared token from a file, whitespace stripped.

    Refuses (:class:`~hopscope.errors.UsageError`) a file that group or
    others may read or write (``mode & 0o077``), that is not a regular file,
    that is empty or holds fewer than :data:`MIN_TOKEN` bytes.
    """
    p = Path(path)
    try:
        with open(p, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise UsageError(f"token file {p} is not a regular file")
            if st.st_mode & 0o077:
                raise UsageError(f"token file {p} is accessible to group or others (mode"
                                 f" {stat.S_IMODE(st.st_mode):04o}): run `chmod 600 {p}`")
            raw = f.read(MAX_TOKEN + 1)
    except OSError as exc:
        raise UsageError(f"token file {p}: {exc.strerror or exc}") from None
    if len(raw) > MAX_TOKEN:
        raise UsageError(f"token file {p} is over {MAX_TOKEN} bytes: is it the right file?")
    token = raw.strip()
    if len(token) < MIN_TOKEN:
        raise UsageError(f"token file {p} holds {len(token)} bytes, fewer than {MIN_TOKEN}:"
                         f" write a random one, e.g. `openssl rand -hex 32 > {p}`")
    return token


def token_ok(got: bytes, want: bytes) -> bool:
    """Constant-time token comparison (hashed first, so lengths do not leak either)."""
    return hmac.compare_digest(hashlib.sha256(got).digest(), hashlib.sha256(want).digest())


def check_hello(hello: Hello, token: bytes) -> None:
    """Raise :class:`AuthFailed` unless the hello carries ``token``."""
    if not token_ok(hello.token, token):
        raise AuthFailed(f"wrong token from agent {_show(hello.agent)} on node"
                         f" {_show(hello.node)}")


# --------------------------------------------------------------------------
# TLS (standard library ssl)


def server_ssl_context(cert: str | os.PathLike[str], key: str | os.PathLike[str],
                       ca: str | os.PathLike[str] | None = None) -> ssl.SSLContext:
    """TLS 1.2+ server context; with ``ca``, agents must present a certificate it signed."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cert, key)
        if ca is not None:
            ctx.load_verify_locations(cafile=ca)
            ctx.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as exc:
        raise UsageError(f"TLS server set-up (cert {cert}, key {key}, ca {ca}): {exc}") from None
    return ctx


def client_ssl_context(ca: str | os.PathLike[str] | None = None,
                       cert: str | os.PathLike[str] | None = None,
                       key: str | os.PathLike[str] | None = None) -> ssl.SSLContext:
    """TLS 1.2+ client context verifying the collector (against ``ca``, else the system CAs).

    The host name is checked: connect with ``server_hostname`` set to a name
    (or IP address) in the collector's certificate. ``cert``/``key``: the
    agent's own certificate, for a collector that requires one.
    """
    try:
        ctx = ssl.create_default_context(cafile=ca)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        if cert is not None:
            ctx.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise UsageError(f"TLS client set-up (ca {ca}, cert {cert}, key {key}): {exc}") from None
    return ctx


# --------------------------------------------------------------------------
# The two ends of a connection


class SeqTracker:
    """The collector's de-duplication state: per agent, the highest seq stored.

    An agent sends its batches in seq order (a replay from its spool too),
    so "already seen" is ``seq <= highest stored or being stored``: a
    high-water mark per agent id, O(1) memory, is exactly de-duplication by
    (agent, seq). Batches are handed to the store as they arrive (several may
    be in flight), and finish in that order: each agent's last batch in
    flight is its ``tail``, which the next one waits for, also across two
    connections of one agent (an old one not yet seen dead, and its
    replacement).
    """

    def __init__(self, initial: Mapping[str, int] | None = None) -> None:
        self._hw: dict[str, int] = dict(initial or {})
        self._sub: dict[str, int] = {}
        self._tail: dict[str, asyncio.Task[None]] = {}

    def acked(self, agent: str) -> int:
        return self._hw.get(agent, -1)

    def is_new(self, agent: str, seq: int) -> bool:
        """Neither stored nor being stored."""
        return seq > max(self._hw.get(agent, -1), self._sub.get(agent, -1))

    def submitted(self, agent: str, seq: int) -> None:
        self._sub[agent] = max(seq, self._sub.get(agent, -1))

    def withdrawn(self, agent: str) -> None:
        """A batch failed to store: what is not stored is new again."""
        self._sub[agent] = self._hw.get(agent, -1)

    def commit(self, agent: str, seq: int) -> None:
        if seq > self._hw.get(agent, -1):
            self._hw[agent] = seq

    def tail(self, agent: str) -> asyncio.Task[None] | None:
        t = self._tail.get(agent)
        return None if t is None or t.done() else t

    def set_tail(self, agent: str, task: asyncio.Task[None]) -> None:
        self._tail[agent] = task

    def snapshot(self) -> dict[str, int]:
        return dict(self._hw)


async def accept_hello(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                       token: bytes, *, timeout: float | None = 10.0) -> Hello:
    """Read and check an agent's hello (capped at :data:`HELLO_MAX_FRAME`).

    On any failure: one log line, an ``error`` frame, the connection closed,
    and the :class:`WireError` raised.
    """
    try:
        try:
            frame = await asyncio.wait_for(read_frame(reader, HELLO_MAX_FRAME), timeout)
        except TimeoutError:
            raise BadFrame(f"no hello within {timeout:g} s") from None
        if not isinstance(frame, Hello):
            raise BadFrame(f"expected a hello frame first, got {type(frame).__name__.lower()}")
        check_hello(frame, token)
    except PeerClosed as exc:
        log.info("%s closed the connection before its hello: %s", peer_name(writer), exc)
        await close_writer(writer)
        raise
    except WireError as exc:
        await refuse(writer, exc)
        raise
    return frame


async def serve_agent(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    *,
    token: bytes,
    store: Callable[[Batch], Awaitable[None] | None],
    seqs: SeqTracker,
    collector: str = "",
    max_frame: int = MAX_FRAME,
    hello_timeout: float | None = 10.0,
    idle_timeout: float | None = None,
) -> None:
    """The collector's side of one agent connection, start to close.

    hello -> welcome (with the agent's acked seq) -> batches, each stored
    through ``store`` unless a duplicate, each answered by an ``ack`` of the
    highest seq stored -> bye or EOF. Bad input is refused: one warning line
    (peer, agent, reason), an ``error`` frame, close. Never raises for what
    the peer does; an exception from ``store`` is logged and closes the
    connection with an ``internal`` error.

    ``store(batch)`` is called as each new batch is decoded, in arrival
    order, while the next frames are read (up to :data:`MAX_INFLIGHT` at
    once); it may return an awaitable. The awaitables are awaited one after
    the other per agent (a coroutine function's body therefore runs only
    after the batch before it is stored); a batch is acked once its own is
    done. A store that queues the batch when called and completes the
    awaitable once it is durable (:meth:`Collector.store_batch
    <hopscope.collector.server.Collector.store_batch>`) stores batch N+1
    while N is still in flight.
    """
    try:
        hello = await accept_hello(reader, writer, token, timeout=hello_timeout)
    except WireError:
        return  # logged, answered and closed by accept_hello
    except OSError as exc:  # TLS record errors and the like
        log.info("%s: connection lost before the hello: %s", peer_name(writer), exc)
        await close_writer(writer)
        return
    who = f"agent {_show(hello.agent)} on {_show(hello.node)}"
    peer = peer_name(writer)
    seq = -1
    agent = hello.agent
    # batches in flight: the next frame is read and decoded while the ones before it
    # are being stored; each is acked as soon as it is stored, in order
    inflight: list[asyncio.Task[None]] = []
    failed: list[tuple[int, BaseException]] = []  # the first batch the store refused
    reading = False
    me = asyncio.current_task()

    async def finish(prev: asyncio.Task[None] | None, pending: Awaitable[None] | None,
                     seq: int) -> None:
        """After the agent's batch before it: this batch's store, then its seq."""
        if prev is not None:
            await asyncio.wait([prev])
            if prev.cancelled() or prev.exception() is not None:
                # not stored after a batch that was not: that would leave a hole behind
                # the agent's seq (the agent sends both again)
                if asyncio.iscoroutine(pending):
                    pending.close()
                seqs.withdrawn(agent)
                raise StoreSkipped(f"batch {seq} was not stored: an earlier batch of"
                                   f" {_show(agent)} failed to store")
        if pending is None:
            log.debug("%s: batch %d is a duplicate (acked %d)", who, seq, seqs.acked(agent))
            return
        try:
            await pending
        except BaseException:
            seqs.withdrawn(agent)
            raise
        seqs.commit(agent, seq)

    def stored(t: asyncio.Task[None], seq: int) -> None:
        inflight.remove(t)
        if t.cancelled():
            return
        exc = t.exception()
        if exc is not None:
            if not failed:
                failed.append((seq, exc))
                if reading and me is not None:
                    me.cancel()  # out of read_frame: the connection is refused
        elif not failed and not writer.is_closing():
            writer.write(encode(Ack(seqs.acked(agent))))

    refusal: BaseException | None = None
    try:
        await write_frame(writer, Welcome(collector, seqs.acked(agent), max_frame))
        log.info("%s connected from %s (acked %d)", who, peer, seqs.acked(agent))
        while not failed:
            seq = -1
            reading = True
            try:
                frame = await asyncio.wait_for(read_frame(reader, max_frame), idle_timeout)
            except TimeoutError:
                raise BadFrame(f"idle for {idle_timeout:g} s") from None
            finally:
                reading = False
            if isinstance(frame, Batch):
                seq = frame.seq
                if frame.agent != agent or frame.node != hello.node:
                    raise BadFrame(f"batch {seq} is from agent {_show(frame.agent)} on"
                                   f" {_show(frame.node)}, not from this connection's {who}")
                pending: Awaitable[None] | None = None
                if seqs.is_new(agent, seq):
                    seqs.submitted(agent, seq)
                    try:  # handed over now, in arrival order; awaited in that order
                        pending = store(frame) or _DONE
                    except Exception:
                        seqs.withdrawn(agent)
                        raise
                t = asyncio.create_task(finish(seqs.tail(agent), pending, seq))
                seqs.set_tail(agent, t)
                inflight.append(t)
                t.add_done_callback(functools.partial(stored, seq=seq))
                if len(inflight) >= MAX_INFLIGHT:
                    await asyncio.wait([inflight[0]])
                await writer.drain()
            elif isinstance(frame, Bye):
                await _settle(inflight)
                log.info("%s said bye%s", who, f": {frame.reason}" if frame.reason else "")
                break
            elif isinstance(frame, ErrorFrame):
                log.warning("%s reported an error: %s: %s", who, frame.code, frame.message)
                break
            else:
                raise BadFrame(f"unexpected {type(frame).__name__.lower()} frame from an agent")
    except asyncio.CancelledError:
        if not failed:  # the collector is stopping
            await _settle(inflight)  # what is being stored is stored (and acked)
            raise
    except PeerClosed as exc:
        log.info("%s: %s", who, exc)
    except WireError as exc:
        refusal = exc  # logged by refuse(); what came before the bad frame is stored
        if seq < 0 and isinstance(exc, BadFrame):
            seq = exc.seq  # a batch that did not decode: named, so that the agent drops it
    except OSError as exc:  # ssl.SSLError included
        log.info("%s: connection lost: %s", who, exc)
    except HopscopeError as exc:  # the store's own errors say what failed
        log.error("%s: storing batch %d failed: %s", who, seq, exc)
        refusal = exc
    except Exception as exc:
        log.exception("%s: storing batch %d failed", who, seq)
        refusal = exc
    await _settle(inflight)
    if failed:
        seq, why = failed[0]
        log.error("%s: storing batch %d failed: %s", who, seq, why)
        refusal = why
    if refusal is not None:
        await refuse(writer, refusal, who=who, seq=seq)
        return
    await close_writer(writer)


#: batches of one connection being stored at once (the next is read meanwhile)
MAX_INFLIGHT = 8


class _Done:
    """An awaitable that is already done (a store that returned None)."""

    def __await__(self) -> Any:
        return iter(())


_DONE = _Done()


async def _settle(tasks: list[asyncio.Task[None]]) -> None:
    """Wait for the batches in flight (never cancelled: a batch handed to the store is
    stored, and its seq committed, or the collector would feed it twice on a resend).
    Their errors are the done callback's business."""
    if tasks:
        await asyncio.wait(list(tasks))


async def client_hello(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                       hello: Hello, *, timeout: float | None = 10.0) -> Welcome:
    """Send the hello; return the collector's welcome or raise what its error frame says."""
    await write_frame(writer, hello)
    try:
        frame = await asyncio.wait_for(read_frame(reader, HELLO_MAX_FRAME), timeout)
    except TimeoutError:
        raise BadFrame(f"no answer to the hello within {timeout:g} s") from None
    if isinstance(frame, Welcome):
        return frame
    if isinstance(frame, ErrorFrame):
        raise error_from_frame(frame)
    raise BadFrame(f"expected a welcome, got a {type(frame).__name__.lower()} frame")


async def open_agent_connection(
    host: str, port: int, hello: Hello, *, ssl_context: ssl.SSLContext | None = None,
    server_hostname: str | None = None, timeout: float | None = 10.0,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, Welcome]:
    """Connect (TLS when ``ssl_context``), say hello; (reader, writer, welcome).

    Replay the spool after it: ``spool.ack(welcome.acked)``, then send what
    is left in order, then new batches; ``welcome.max_frame`` is the cap.
    """
    t0 = time.monotonic()
    reader, writer = await asyncio.wait_for(asyncio.open_connection(
        host, port, ssl=ssl_context,
        server_hostname=(server_hostname or host) if ssl_context else None), timeout)
    left = None if timeout is None else max(0.1, timeout - (time.monotonic() - t0))
    try:
        welcome = await client_hello(reader, writer, hello, timeout=left)
    except BaseException:
        await close_writer(writer)
        raise
    return reader, writer, welcome


__all__ = [
    "ERROR_CODES", "HEADER_SIZE", "HELLO_MAX_FRAME", "MAX_FRAME", "OBS_FIELDS_V1",
    "SCHEMA_VERSION", "SUPPORTED_VERSIONS", "Ack", "AuthFailed", "BadFrame", "BadVersion",
    "Batch", "Bye", "ErrorFrame", "Frame", "FrameDecoder", "FrameTooLarge", "Hello",
    "PeerClosed", "SeqTracker", "Welcome", "WireError", "accept_hello", "check_hello",
    "check_length", "check_rows", "client_hello", "client_ssl_context", "decode_body",
    "encode", "encode_batch", "open_agent_connection", "peer_name", "read_frame",
    "read_token", "refuse", "serve_agent", "server_ssl_context", "token_ok", "write_frame",
]
