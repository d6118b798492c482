"""The mypyc build of the replay hot path (``setup.py``) against the Python sources.

The compiled modules and their sources must give the same output byte for
byte; an edited source must never be shadowed by a stale build; and where a
C compiler, the Python headers and mypyc are present (as ``./dev.sh`` and CI
install them), the build must have compiled.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

import hopscope

ROOT = Path(__file__).resolve().parent.parent
PCAPS = ROOT / "pcaps"
COMPILED_MODULES = ("hopscope.model", "hopscope.capture", "hopscope.tcpflow", "hopscope.stitch")

_PROBE = ("import json, importlib, hopscope; "
          "print(json.dumps({'compiled': hopscope.COMPILED, 'stale': hopscope.STALE, "
          "'reason': hopscope.PURE_REASON, 'files': {m: importlib.import_module(m).__file__ "
          "for m in " + repr(COMPILED_MODULES) + "}}))")


def _probe(env: dict[str, str] | None = None, pythonpath: Path | None = None) -> dict[str, object]:
    e = {k: v for k, v in os.environ.items() if k != "HOPSCOPE_PURE"}
    e.update(env or {})
    if pythonpath is not None:
        e["PYTHONPATH"] = str(pythonpath)
    got = subprocess.run([sys.executable, "-c", _PROBE], env=e, capture_output=True, text=True,
                         timeout=60, cwd=pythonpath or ROOT)
    assert got.returncode == 0, got.stderr
    out: dict[str, object] = json.loads(got.stdout)
    return out


def _can_compile() -> str:
    """Why this machine cannot build the extensions ("" when it can)."""
    if shutil.which(sysconfig.get_config_var("CC").split()[0] if sysconfig.get_config_var("CC")
                    else "cc") is None:
        return "no C compiler"
    if not (Path(sysconfig.get_paths()["include"]) / "Python.h").exists():
        return "no Python headers (python3-dev)"
    if importlib.util.find_spec("mypyc") is None:
        return "mypyc (mypy) is not installed"
    return ""


needs_build = pytest.mark.skipif(not hopscope.COMPILED and bool(_can_compile()),
                                 reason=f"cannot compile here: {_can_compile()}")


@needs_build
def test_the_build_compiled() -> None:
    """With a compiler, headers and mypyc at hand the hot path runs compiled (else it is 1.7x slower)."""
    got = _probe()
    assert got["compiled"] is True, f"running the Python sources: {got['reason']}"
    files = got["files"]
    assert isinstance(files, dict)
    for mod, path in files.items():
        assert str(path).endswith(".so"), f"{mod} loaded from {path}"


@needs_build
def test_pure_switch_loads_every_source() -> None:
    got = _probe({"HOPSCOPE_PURE": "1"})
    assert got["compiled"] is False and got["reason"] == "HOPSCOPE_PURE is set"
    files = got["files"]
    assert isinstance(files, dict)
    assert all(str(p).endswith(".py") for p in files.values()), files


@needs_build
def test_an_edited_source_is_never_shadowed_by_the_build(tmp_path: Path) -> None:
    """Edit one compiled module's source: all of them load from source (they call each other in C)."""
    pkg = Path(hopscope.__file__).resolve().parent
    shutil.copytree(pkg, tmp_path / "hopscope", ignore=shutil.ignore_patterns("__pycache__"))
    src = tmp_path / "hopscope" / "tcpflow.py"
    src.write_text(src.read_text() + "\n# edited\n")
    got = _probe(pythonpath=tmp_path)
    assert got["compiled"] is False and got["stale"] is True
    assert "tcpflow.py changed since it was compiled" in str(got["reason"])
    files = got["files"]
    assert isinstance(files, dict)
    for mod, path in files.items():
        assert str(path).startswith(str(tmp_path)) and str(path).endswith(".py"), (mod, path)


def _cases() -> list[Path]:
    return sorted(p.parent for p in PCAPS.rglob("expected.json") if "bad" not in p.parts)


@needs_build
@pytest.mark.parametrize("case", _cases(), ids=lambda p: str(p.relative_to(PCAPS)))
def test_compiled_and_pure_print_the_same_bytes(case: Path) -> None:
    files = json.loads((case / "expected.json").read_text())["files"]
    outs = []
    for pure in ("0", "1"):
        env = {**os.environ, "HOPSCOPE_PURE": pure}
        got = subprocess.run([sys.executable, "-m", "hopscope", "replay", "--json", "--jobs", "2",
                              *files], cwd=case, env=env, capture_output=True, timeout=120)
        assert got.returncode == 0, got.stderr.decode(errors="replace")
        outs.append(got.stdout)
    assert json.loads(outs[0])["requests"], "a case without requests compares nothing"
    assert outs[0] == outs[1]
