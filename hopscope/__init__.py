"""hopscope: per-request hop-latency profiler for small Kubernetes clusters."""

from __future__ import annotations

import hashlib
import os
import sys

__version__ = "0.1.0"

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


def _choose() -> tuple[bool, str, bool]:
    """Compiled or pure, for all the compiled modules at once (they call each other in C)."""
    try:
        from hopscope._compiled import SOURCES
    except ImportError:
        return False, "not built with mypyc (no hopscope/_compiled.py)", True
    if not SOURCES:
        return False, "the build did not compile (see the install's output)", False
    here = os.path.dirname(os.path.abspath(__file__))
    reason = ""
    stale = False
    if os.environ.get("HOPSCOPE_PURE", "") not in ("", "0"):
        reason = "HOPSCOPE_PURE is set"
    else:
        for mod, digest in SOURCES.items():
            src = os.path.join(here, mod.rpartition(".")[2] + ".py")
            try:
                with open(src, "rb") as f:
                    if hashlib.sha256(f.read()).hexdigest() != digest:
                        reason = (f"{src} changed since it was compiled (rebuild: "
                                  "pip install -e . or ./dev.sh setup)")
                        stale = True
                        break
            except OSError:
                continue  # no source beside the extension: nothing it could be stale against
    if reason:
        _source_first(frozenset(SOURCES))
        return False, reason, stale
    return True, "", False


COMPILED, PURE_REASON, STALE = _choose()
