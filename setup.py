"""Build hook: compile the replay hot path with mypyc when it can be.

Everything else about the package is in ``pyproject.toml``. The modules in
:data:`COMPILED` (the capture reader, the per-node tracker, the stitcher and
the observation model) are plain, typed Python; mypyc (part of mypy) turns
them into C extensions that run the same code 1.5 to 3 times faster. The
Python sources ship beside them and are what runs when:

- the build could not compile (no C compiler or no Python headers, or
  ``HOPSCOPE_MYPYC=0`` at build time): a warning, then a pure-Python install;
- ``HOPSCOPE_PURE=1`` is set when hopscope runs;
- a source changed since it was compiled (an edited checkout): see
  ``hopscope/__init__.py``, which compares each source with the digest the
  build recorded in ``hopscope/_compiled.py``.
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_ext import build_ext

HERE = Path(__file__).resolve().parent
#: compiled together, as one mypyc group (cross-module calls are C calls)
COMPILED = ["hopscope/model.py", "hopscope/capture.py", "hopscope/tcpflow.py", "hopscope/stitch.py"]
STAMP = HERE / "hopscope" / "_compiled.py"
GROUP = "hopscope._native"


def _say(msg: str) -> None:
    print(f"hopscope build: {msg}", file=sys.stderr)


def _write_stamp(digests: dict[str, str]) -> None:
    lines = [
        '"""Written by setup.py: the sources compiled by mypyc, and their SHA-256."""',
        "",
        "SOURCES: dict[str, str] = {",
        *(f"    {mod!r}: {digest!r}," for mod, digest in sorted(digests.items())),
        "}",
        "",
    ]
    text = "\n".join(lines)
    if not STAMP.exists() or STAMP.read_text() != text:
        STAMP.write_text(text)


def _digests() -> dict[str, str]:
    return {p[:-3].replace("/", "."): hashlib.sha256((HERE / p).read_bytes()).hexdigest()
            for p in COMPILED}


class OptionalBuildExt(build_ext):
    """Compile the extensions; when that fails, install the pure-Python package instead."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:  # noqa: BLE001 - any compiler failure means "pure Python"
            self._fall_back(exc)

    def build_extension(self, ext: object) -> None:
        try:
            super().build_extension(ext)
        except Exception as exc:  # noqa: BLE001
            self._fall_back(exc)
            raise

    def _fall_back(self, exc: BaseException) -> None:
        _say(f"compiling with mypyc failed ({type(exc).__name__}: {exc}); installing the pure-Python "
             "modules (slower replay; install gcc and python3-dev, then reinstall, to compile)")
        _write_stamp({})
        self.extensions = []


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
    except (Exception, SystemExit) as exc:  # noqa: BLE001 - mypyc reports type errors by exiting
        _say(f"mypyc could not translate the sources ({exc}): not compiling")
        _write_stamp({})
        return []
    _write_stamp(_digests())
    return list(exts)


setup(ext_modules=_extensions(), cmdclass={"build_ext": OptionalBuildExt})
