"""hopscope: per-request hop-latency profiler for small Kubernetes clusters."""

from __future__ import annotations

import _imp
import os
import sys
import zlib

__version__ = "0.1.0"

#: the modules setup.py compiles (its ``COMPILED``)
NATIVE = frozenset(("hopscope.model", "hopscope.capture", "hopscope.tcpflow", "hopscope.stitch",
                    "hopscope.ringwalk"))
#: True when the replay hot path runs as mypyc-compiled C extensions (see setup.py)
COMPILED = False
#: why it does not, when it does not ("" when it does)
PURE_REASON = ""
#: True when a build would change that: never built, or a source edited since (``./dev.sh`` rebuilds)
STALE = False


def _source_first(names: frozenset[str]) -> None:
    """From now on, load ``names`` from their Python sources, not from the extensions beside them."""
    import importlib.machinery
    import importlib.util
    from collections.abc import Sequence
    from types import ModuleType

    class SourceFirst:
        def find_spec(self, fullname: str, path: Sequence[str] | None,
                      target: ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
            if fullname not in names:
                return None
            for d in path or ():
                src = os.path.join(d, fullname.rpartition(".")[2] + ".py")
                if os.path.exists(src):
                    return importlib.util.spec_from_file_location(
                        fullname, src, loader=importlib.machinery.SourceFileLoader(fullname, src))
            return None

    sys.meta_path.insert(0, SourceFirst())


def source_digest(text: bytes) -> str:
    """What the build records of each compiled source (``setup.py``): its size and CRC-32.

    A CRC, not a cryptographic hash: it guards against edits, not attacks, and
    costs nothing at start-up (hashlib's import alone takes 4 ms).
    """
    return f"{len(text)}:{zlib.crc32(text):08x}"


def _choose() -> tuple[bool, str, bool]:
    """Compiled or pure, for all the compiled modules at once (they call each other in C)."""
    try:
        from hopscope._compiled import SOURCES
    except ImportError:
        _source_first(NATIVE)  # whatever extension may lie there, it is not a known build
        return False, "not built with mypyc (no hopscope/_compiled.py)", True
    if not SOURCES:
        _source_first(NATIVE)
        return False, "the build did not compile (see the install's output)", False
    here = os.path.dirname(os.path.abspath(__file__))
    reason = ""
    stale = False
    if os.environ.get("HOPSCOPE_PURE", "") not in ("", "0"):
        reason = "HOPSCOPE_PURE is set"
    elif not all(any(os.path.exists(os.path.join(here, mod.rpartition(".")[2] + sfx))
                     for sfx in _imp.extension_suffixes()) for mod in SOURCES):
        reason = "the build's extensions are missing"
        stale = True
    else:
        for mod, digest in SOURCES.items():
            src = os.path.join(here, mod.rpartition(".")[2] + ".py")
            try:
                with open(src, "rb") as f:
                    if source_digest(f.read()) != digest:
                        reason = (f"{src} changed since it was compiled (rebuild: "
                                  "pip install -e . or ./dev.sh setup)")
                        stale = True
                        break
            except OSError:
                continue  # no source beside the extension: nothing it could be stale against
    if reason:
        _source_first(NATIVE)
        return False, reason, stale
    return True, "", False


COMPILED, PURE_REASON, STALE = _choose()
