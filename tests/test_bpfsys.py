"""The bpf(2) calls made without bcc (agent/bpfsys.py, agent/features.py): their attribute
layouts against the UAPI header, and the map-shape check against a map the kernel made."""

from __future__ import annotations

import ctypes
import os
import struct
from pathlib import Path

import pytest
from conftest import c_values, needs_gcc
from hopscope.agent import bpfsys
from hopscope.agent import features as ft

_ATTR = bpfsys._ATTR
_RUN = bpfsys._TEST_RUN
_LOAD = ft.PROG_LOAD_HEAD


def _offs(st: struct.Struct) -> list[int]:
    """Each field's offset in ``st`` (fields of one code letter, no repeats but padding)."""
    out, fmt = [], st.format[1:]
    pos = 0
    i = 0
    while i < len(fmt):
        n = ""
        while fmt[i].isdigit():
            n += fmt[i]
            i += 1
        code = fmt[i]
        i += 1
        if code == "x":
            pos += int(n or 1)
            continue
        if code == "s":
            out.append(pos)
            pos += int(n)
            continue
        for _ in range(int(n or 1)):
            out.append(pos)
            pos += struct.calcsize("<" + code)
    return out


#: (C member of union bpf_attr or struct bpf_map_info: the offset the Python side packs it at)
WANT = {
    "union bpf_attr, map_fd": _offs(_ATTR)[0],
    "union bpf_attr, key": _offs(_ATTR)[1],
    "union bpf_attr, value": _offs(_ATTR)[2],
    "union bpf_attr, next_key": _offs(_ATTR)[2],
    "union bpf_attr, flags": _offs(_ATTR)[3],
    "union bpf_attr, test.prog_fd": _offs(_RUN)[0],
    "union bpf_attr, test.retval": _offs(_RUN)[1],
    "union bpf_attr, test.data_size_in": _offs(_RUN)[2],
    "union bpf_attr, test.data_size_out": _offs(_RUN)[3],
    "union bpf_attr, test.data_in": _offs(_RUN)[4],
    "union bpf_attr, test.data_out": _offs(_RUN)[5],
    "union bpf_attr, test.repeat": _offs(_RUN)[6],
    "union bpf_attr, test.duration": _offs(_RUN)[7],
    "union bpf_attr, info.bpf_fd": _offs(bpfsys._INFO)[0],
    "union bpf_attr, info.info_len": _offs(bpfsys._INFO)[1],
    "union bpf_attr, info.info": _offs(bpfsys._INFO)[2],
    "struct bpf_map_info, type": _offs(bpfsys._MAP_INFO)[0],
    "struct bpf_map_info, key_size": _offs(bpfsys._MAP_INFO)[2],
    "struct bpf_map_info, value_size": _offs(bpfsys._MAP_INFO)[3],
    "struct bpf_map_info, max_entries": _offs(bpfsys._MAP_INFO)[4],
    "union bpf_attr, prog_type": _offs(_LOAD)[0],
    "union bpf_attr, insn_cnt": _offs(_LOAD)[1],
    "union bpf_attr, insns": _offs(_LOAD)[2],
    "union bpf_attr, license": _offs(_LOAD)[3],
    "union bpf_attr, log_level": _offs(_LOAD)[4],
    "union bpf_attr, log_size": _offs(_LOAD)[5],
    "union bpf_attr, log_buf": _offs(_LOAD)[6],
    "union bpf_attr, kern_version": _offs(_LOAD)[7],
    "union bpf_attr, prog_flags": _offs(_LOAD)[8],
    "union bpf_attr, prog_name": ft.PROG_NAME_OFF,
    "union bpf_attr, expected_attach_type": ft.EXPECTED_ATTACH_TYPE_OFF,
    "union bpf_attr, attach_btf_id": ft.ATTACH_BTF_ID_OFF,
}


@needs_gcc
def test_attr_layouts_match_the_uapi_header(tmp_path: Path) -> None:
    got = c_values(tmp_path, ["<linux/bpf.h>"], {m: f"offsetof({m})" for m in WANT})
    assert got == WANT


def _array_map(value_size: int) -> int:
    """A 4-entry array map with ``value_size``-byte values (BPF_MAP_CREATE); its fd."""
    attr = ctypes.create_string_buffer(struct.pack("<IIII", 2, 4, value_size, 4), 72)
    fd = bpfsys._bpf(0, attr)  # BPF_MAP_CREATE, BPF_MAP_TYPE_ARRAY
    assert fd >= 0, os.strerror(-fd)
    return fd


@pytest.mark.privileged
def test_map_checks_its_shape_against_the_kernel() -> None:
    fd = _array_map(8)
    try:
        assert bpfsys.map_shape(fd) == (4, 8, 4)
        m = bpfsys.Map(fd, 4, 8)
        m.set(2, 0x1122334455667788)
        assert m.get(2) == [0x1122334455667788] and m.list_keys() == [0, 1, 2, 3]
        with pytest.raises(bpfsys.BpfSysError, match="8-byte values, the agent expected 4 and 1"):
            bpfsys.Map(fd, 4, 1)
        with pytest.raises(bpfsys.BpfSysError, match=r"4-byte keys .* expected 8 and 8"):
            bpfsys.Map(fd, 8, 8)
    finally:
        os.close(fd)
    other = os.open("/dev/null", os.O_RDONLY)  # not a BPF object
    try:
        with pytest.raises(bpfsys.BpfSysError, match="BPF_OBJ_GET_INFO_BY_FD failed"):
            bpfsys.map_shape(other)
    finally:
        os.close(other)
