"""The bpf(2) map calls the agent needs once its programs are loaded, without bcc.

bcc (with LLVM inside) compiles and loads the programs; what runs for hours
afterwards only updates a few small maps (namespaces, the proxy's pids,
interface roles) and reads the per-CPU counters. Doing that through the
syscall directly lets the agent drop bcc from its process
(:mod:`hopscope.agent.bpfprog` hands the loaded objects over across an
``exec``): LLVM alone is about 60 MB of the agent's memory.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import struct
from pathlib import Path

from hopscope.errors import HopscopeError

#: bpf(2) commands (include/uapi/linux/bpf.h)
MAP_LOOKUP_ELEM, MAP_UPDATE_ELEM, MAP_DELETE_ELEM, MAP_GET_NEXT_KEY = 1, 2, 3, 4
PROG_TEST_RUN = 10
OBJ_GET_INFO_BY_FD = 15
_NR_BPF = {"x86_64": 321, "aarch64": 280}
_ATTR = struct.Struct("<I4xQQQ")  # map_fd, key, value | next_key, flags
# prog_fd, retval, data size in, size out, data in, data out, repeat, duration (ns)
_TEST_RUN = struct.Struct("<IIIIQQII")
# BPF_OBJ_GET_INFO_BY_FD: bpf_fd, info_len, info
_INFO = struct.Struct("<IIQ")
# the head of struct bpf_map_info: type, id, key_size, value_size, max_entries
_MAP_INFO = struct.Struct("<IIIII")

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class BpfSysError(HopscopeError):
    """A bpf(2) call failed."""


def _bpf(cmd: int, attr: ctypes.Array[ctypes.c_char]) -> int:
    nr = _NR_BPF.get(platform.machine())
    if nr is None:
        raise BpfSysError(f"no bpf(2) syscall number known for {platform.machine()}")
    r = _libc.syscall(nr, cmd, attr, len(attr))
    if r < 0:
        return -ctypes.get_errno()
    return int(r)


def prog_test_run(prog_fd: int, data: bytes, repeat: int = 1) -> tuple[int, int]:
    """Run a loaded program ``repeat`` times on ``data`` (a frame, for a classifier) inside
    the kernel (BPF_PROG_TEST_RUN): (its return value, its mean ns per run). What it sends
    to maps and ring buffers goes there as from a real run."""
    buf = ctypes.create_string_buffer(data, len(data))
    out = ctypes.create_string_buffer(len(data) + 256)
    attr = ctypes.create_string_buffer(80)
    _TEST_RUN.pack_into(attr, 0, prog_fd, 0, len(data), len(out), ctypes.addressof(buf),
                        ctypes.addressof(out), repeat, 0)
    r = _bpf(PROG_TEST_RUN, attr)
    if r < 0:
        raise BpfSysError(f"program fd {prog_fd}: BPF_PROG_TEST_RUN failed: {os.strerror(-r)}")
    _fd, retval, *_sizes, ns = _TEST_RUN.unpack_from(attr, 0)
    return retval, ns


def possible_cpus(path: str = "/sys/devices/system/cpu/possible") -> int:
    """How many CPUs a per-CPU map has values for (``0-1,4-7`` -> 6)."""
    try:
        text = Path(path).read_text().strip()
    except OSError:
        return os.cpu_count() or 1
    n = 0
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        n += int(hi or lo) - int(lo) + 1
    return n


def map_shape(fd: int) -> tuple[int, int, int]:
    """(key size, value size, max entries) of the map ``fd`` as the kernel made it."""
    info = ctypes.create_string_buffer(_MAP_INFO.size)
    attr = ctypes.create_string_buffer(_INFO.pack(fd, _MAP_INFO.size, ctypes.addressof(info)),
                                       _INFO.size)
    r = _bpf(OBJ_GET_INFO_BY_FD, attr)
    if r < 0:
        raise BpfSysError(f"map fd {fd}: BPF_OBJ_GET_INFO_BY_FD failed: {os.strerror(-r)}")
    _type, _id, key_size, value_size, max_entries = _MAP_INFO.unpack(info.raw)
    return key_size, value_size, max_entries


class Map:
    """One map by its fd, with fixed-size integer keys and values (little-endian).

    The sizes are checked against the kernel's map at once: a mirror that drifted from
    bpf/maps.h would otherwise read past its buffers or write short values."""

    def __init__(self, fd: int, key_size: int, value_size: int, per_cpu: bool = False) -> None:
        got = map_shape(fd)[:2]
        if got != (key_size, value_size):
            raise BpfSysError(
                f"map fd {fd}: the kernel's map has {got[0]}-byte keys and {got[1]}-byte "
                f"values, the agent expected {key_size} and {value_size}: bpf/maps.h and "
                f"agent/bpfprog.py MAPS disagree (a mismatched install?)")
        self.fd = fd
        self.key_size = key_size
        self.value_size = value_size
        self.ncpu = possible_cpus() if per_cpu else 1
        self._stride = (value_size + 7) & ~7 if per_cpu else value_size

    def _call(self, cmd: int, key: bytes, value: ctypes.Array[ctypes.c_char] | None,
              flags: int = 0) -> int:
        kbuf = ctypes.create_string_buffer(key, self.key_size)
        attr = ctypes.create_string_buffer(_ATTR.pack(
            self.fd, ctypes.addressof(kbuf), ctypes.addressof(value) if value is not None else 0,
            flags), _ATTR.size)
        return _bpf(cmd, attr)

    def _key(self, k: int) -> bytes:
        return k.to_bytes(self.key_size, "little")

    def set(self, key: int, value: int) -> None:
        val = ctypes.create_string_buffer(value.to_bytes(self.value_size, "little"),
                                          self.value_size)
        r = self._call(MAP_UPDATE_ELEM, self._key(key), val)
        if r < 0:
            raise BpfSysError(f"map fd {self.fd}: cannot set {key}: {os.strerror(-r)}")

    def delete(self, key: int) -> bool:
        r = self._call(MAP_DELETE_ELEM, self._key(key), None)
        if r < 0 and r != -errno.ENOENT:
            raise BpfSysError(f"map fd {self.fd}: cannot delete {key}: {os.strerror(-r)}")
        return r == 0

    def get(self, key: int) -> list[int] | None:
        """The value (one per CPU for a per-CPU map), or None when the key is absent."""
        buf = ctypes.create_string_buffer(self._stride * self.ncpu)
        r = self._call(MAP_LOOKUP_ELEM, self._key(key), buf)
        if r == -errno.ENOENT:
            return None
        if r < 0:
            raise BpfSysError(f"map fd {self.fd}: cannot read {key}: {os.strerror(-r)}")
        raw = buf.raw
        return [int.from_bytes(raw[i * self._stride:i * self._stride + self.value_size],
                               "little") for i in range(self.ncpu)]

    def list_keys(self) -> list[int]:
        out: list[int] = []
        nxt = ctypes.create_string_buffer(self.key_size)
        key: bytes | None = None
        while True:
            kbuf = ctypes.create_string_buffer(key or b"", self.key_size)
            attr = ctypes.create_string_buffer(_ATTR.pack(
                self.fd, ctypes.addressof(kbuf) if key is not None else 0,
                ctypes.addressof(nxt), 0), _ATTR.size)
            r = _bpf(MAP_GET_NEXT_KEY, attr)
            if r == -errno.ENOENT:
                return out
            if r < 0:
                raise BpfSysError(f"map fd {self.fd}: cannot list keys: {os.strerror(-r)}")
            key = nxt.raw[:self.key_size]
            out.append(int.from_bytes(key, "little"))
