"""The error tree.

Every error hopscope raises on purpose derives from :class:`HopscopeError`.
The CLI prints ``hopscope: <message>`` (one line, no traceback) and exits
with the error's ``exit_code``.

::

    HopscopeError                 exit 1
    +-- CaptureError              a capture file cannot be read at all   (exit 2)
    |   +-- NotACaptureError      the file is not pcap or pcapng
    +-- UsageError                bad arguments or configuration         (exit 2)
    +-- PrivilegeError            needs root / a capability               (exit 77)
    +-- TestbedError              the network replica failed              (exit 1)
    +-- WireError                 a peer broke the collector wire protocol (exit 1)
    |   +-- FrameTooLarge         a length prefix over the frame cap
    |   +-- BadFrame              not a valid frame (garbage, truncated, bad field)
    |   +-- BadVersion            a schema version this side does not speak
    |   +-- AuthFailed            wrong or missing token
    |   +-- PeerClosed            the connection ended between two frames
    +-- SpoolError                the agent's on-disk spool is unusable    (exit 1)
    +-- StoreError                the collector could not store a batch    (exit 1)
        +-- WriterFailed          its writer stopped after a write failed for good
        +-- WriterClosed          its writer was closed (the collector is stopping)
        +-- StoreSkipped          an earlier batch of the same agent was not stored

Messages say what failed, on what, and what to do.
"""

from __future__ import annotations


class HopscopeError(Exception):
    """Base class of every error hopscope raises on purpose."""

    exit_code = 1


class CaptureError(HopscopeError):
    """A capture file could not be read."""

    exit_code = 2


class NotACaptureError(CaptureError):
    """The file is neither pcap nor pcapng."""


class UsageError(HopscopeError):
    """Bad arguments, configuration or input."""

    exit_code = 2


class PrivilegeError(HopscopeError):
    """The operation needs root or a capability that this process lacks."""

    exit_code = 77


class TestbedError(HopscopeError):
    """The network replica could not be built, changed or removed."""

    __test__ = False  # not a pytest test class


class WireError(HopscopeError):
    """A peer sent something the collector wire protocol does not allow.

    After any of these the connection is closed (see ``docs/wire.md``).
    """


class FrameTooLarge(WireError):
    """A frame's length prefix is over the cap (checked before any allocation)."""


class BadFrame(WireError):
    """Not a valid frame: garbage, truncated, not msgpack, a missing or mistyped field.

    ``seq``: the batch's sequence number when the frame was a batch that far (the refusal
    names it, and the agent drops that batch instead of sending it again), else -1."""

    seq = -1


class BadVersion(WireError):
    """The frame's schema version is not one this side speaks."""


class AuthFailed(WireError):
    """The hello's token is wrong (or the collector refused ours)."""


class PeerClosed(WireError):
    """The connection ended cleanly between two frames (no frame was cut)."""


class SpoolError(HopscopeError):
    """The on-disk spool cannot be used (directory, lock, sequence order)."""


class StoreError(HopscopeError):
    """The collector could not store an agent's batch (it is refused, not acked)."""


class WriterFailed(StoreError):
    """The batch writer stopped after a write failed for good (see the collector's log)."""


class WriterClosed(StoreError):
    """A batch was submitted to a batch writer that is closed."""


class StoreSkipped(StoreError):
    """A batch not stored because an earlier batch of its agent failed to store."""
