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
