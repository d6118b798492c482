"""Lay out the project's packages for import in the test VM (run by vm/init, in the guest).

The repository is shared read-only into the guest, and its directories do not sit
where Python imports them from: pyproject.toml's ``[tool.setuptools] package-dir``
maps them (``hopscope`` -> ``hopscope/``, ``hopscope.agent`` -> ``agent/``, ...), which
the host's editable install honours with an import hook. Here the same mapping is
applied by copying, into a tmpfs directory (``SITE``), each mapped directory to the
place its package name gives it, i.e. the layout a built wheel installs. The image's
venv has a ``.pth`` file naming ``SITE``, so every Python of the venv imports from it.

Also written: a minimal ``<name>-<version>.dist-info`` (so ``importlib.metadata`` finds
the project), and for each ``[project.scripts]`` entry an executable in ``BIN``.
With ``--bind-over-repo`` each top-level package is bind-mounted over the repository's
directory of the same name, so a ``python -m ...`` started from the repository root
(whose working directory comes first on ``sys.path``) imports the same files.

Standard library only (the guest's /usr/bin/python3 runs it).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any


def package_dirs(pyproject: dict[str, Any]) -> dict[str, str]:
    """Package name -> repository directory, parents before their subpackages."""
    st = pyproject.get("tool", {}).get("setuptools", {})
    mapping: dict[str, str] = dict(st.get("package-dir", {}))
    root = mapping.pop("", None)
    for pkg in st.get("packages", []):
        top = pkg.split(".")[0]
        if top not in mapping and not any(pkg == k or pkg.startswith(k + ".") for k in mapping):
            mapping[top] = f"{root}/{top}" if root else top
    return dict(sorted(mapping.items(), key=lambda kv: kv[0].count(".")))


def lay_out(repo: Path, site: Path, bin_dir: Path, *, python: str) -> list[str]:
    """Copy the packages into ``site``; return the top-level package names."""
    pyproject = tomllib.loads((repo / "pyproject.toml").read_text())
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    tops: list[str] = []
    for pkg, rel in package_dirs(pyproject).items():
        src = repo / rel
        if not src.is_dir():
            print(f"layout: {pkg} -> {rel}/: no such directory, skipped", file=sys.stderr)
            continue
        dest = site.joinpath(*pkg.split("."))
        shutil.copytree(src, dest, ignore=ignore, dirs_exist_ok=True, symlinks=True)
        if "." not in pkg:
            tops.append(pkg)
    project = pyproject.get("project", {})
    name, version = project.get("name", "hopscope"), project.get("version", "0")
    dist = site / f"{name.replace('-', '_')}-{version}.dist-info"
    dist.mkdir(parents=True, exist_ok=True)
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    scripts: dict[str, str] = project.get("scripts", {})
    if scripts:
        (dist / "entry_points.txt").write_text(
            "[console_scripts]\n" + "".join(f"{k} = {v}\n" for k, v in scripts.items()))
    bin_dir.mkdir(parents=True, exist_ok=True)
    for script, target in scripts.items():
        mod, _, attr = target.partition(":")
        body = (f"from {mod} import {attr}\nsys.exit({attr}())\n" if attr else
                f"import runpy\nrunpy.run_module({mod!r}, run_name='__main__')\n")
        exe = bin_dir / script
        exe.write_text(f"#!{python}\nimport sys\n{body}")
        exe.chmod(0o755)
    return tops


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repo", type=Path, required=True)
    p.add_argument("--site", type=Path, required=True)
    p.add_argument("--bin", type=Path, required=True)
    p.add_argument("--python", default="/opt/hopscope-venv/bin/python",
                   help="interpreter of the console scripts")
    p.add_argument("--bind-over-repo", action="store_true")
    a = p.parse_args()
    if a.site.exists():
        shutil.rmtree(a.site)
    a.site.mkdir(parents=True)
    tops = lay_out(a.repo, a.site, a.bin, python=a.python)
    if a.bind_over_repo:
        for top in tops:
            target = a.repo / top
            if target.is_dir():
                subprocess.run(["mount", "--bind", str(a.site / top), str(target)], check=True)
    print(f"layout: {', '.join(tops)} in {a.site}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
