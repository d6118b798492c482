"""Build hook: compile the replay hot path with mypyc when it can be.

Everything else about the package is in ``pyproject.toml``. The modules in
:data:`COMPILED` (the capture reader, the per-node tracker, the stitcher,
the observation model, and the live agent's ring-buffer walk) are plain, typed Python; mypyc (part of mypy) turns
them into C extensions that run replay 1.4 to 2.4 times faster end to end. The
Python sources ship beside them and are what runs when:

- the build could not compile (no C compiler or no Python headers, or
  ``HOPSCOPE_MYPYC=0`` at build time): a warning, then a pure-Python install;
- ``HOPSCOPE_PURE=1`` is set when hopscope runs;
- a source changed since it was compiled (an edited checkout): see
  ``hopscope/__init__.py``, which compares each source with the size and
  CRC-32 the build recorded in ``hopscope/_compiled.py``.
"""

from __future__ import annotations

import os
import sys
import zlib
from pathlib import Path

from setuptools import setup
from setuptools.command.build_ext import build_ext

HERE = Path(__file__).resolve().parent
#: compiled together, as one mypyc group (cross-module calls are C calls)
COMPILED = ["hopscope/model.py", "hopscope/capture.py", "hopscope/tcpflow.py", "hopscope/stitch.py",
            "hopscope/ringwalk.py"]
STAMP = HERE / "hopscope" / "_compiled.py"
GROUP = "hopscope._native"


def _say(msg: str) -> None:
    print(f"hopscope build: {msg}", file=sys.stderr)


def _write_stamp(digests: dict[str, str], *also: Path) -> None:
    lines = [
        '"""Written by setup.py: the sources compiled by mypyc, and their size and CRC-32."""',
        "",
        "SOURCES: dict[str, str] = {",
        *(f"    {mod!r}: {digest!r}," for mod, digest in sorted(digests.items())),
        "}",
        "",
    ]
    text = "\n".join(lines)
    for path in (STAMP, *also):
        if path.parent.is_dir() and (not path.exists() or path.read_text() != text):
            path.write_text(text)


def _digest(text: bytes) -> str:
    """As ``hopscope.source_digest`` (not imported: the build must not import the package)."""
    return f"{len(text)}:{zlib.crc32(text):08x}"


def _digests() -> dict[str, str]:
    return {p[:-3].replace("/", "."): _digest((HERE / p).read_bytes()) for p in COMPILED}


class OptionalBuildExt(build_ext):
    """Compile the extensions; when that fails, install the pure-Python package instead."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:  # any compiler failure means "pure Python"
            _say(f"compiling with mypyc failed ({type(exc).__name__}: {exc}); installing the "
                 "pure-Python modules (slower replay; install gcc and python3-dev, then "
                 "reinstall, to compile)")
            for ext in self.extensions:  # no partial build left to be imported
                Path(self.get_ext_fullpath(ext.name)).unlink(missing_ok=True)
            self.extensions = []
            # the copy build_py already placed in the wheel's tree, too
            _write_stamp({}, Path(self.build_lib) / "hopscope" / "_compiled.py")


def _extensions() -> list[object]:
    if os.environ.get("HOPSCOPE_MYPYC", "1") == "0":
        _say("HOPSCOPE_MYPYC=0: not compiling")
        _write_stamp({})
        return []
    try:
        from mypyc.build import mypycify
    except ImportError:
        _say("mypyc (part of mypy) is not installed: not compiling")
        _write_stamp({})
        return []
    try:
        exts = mypycify(COMPILED, opt_level="3", group_name=GROUP)
    except (Exception, SystemExit) as exc:  # mypyc reports type errors by exiting
        _say(f"mypyc could not translate the sources ({exc}): not compiling")
        _write_stamp({})
        return []
    _write_stamp(_digests())
    return list(exts)


setup(ext_modules=_extensions(), cmdclass={"build_ext": OptionalBuildExt})
