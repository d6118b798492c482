#!/usr/bin/env bash
# One entry point for a fresh Debian 12 / Ubuntu 22.04+ machine (as root):
#   ./dev.sh demo    set up, then run `hopscope demo` on the built-in network replica
#   ./dev.sh test    set up, then run the test suite (what CI runs)
#   ./dev.sh setup   only install the system packages and the venv
#   ./dev.sh bench   set up, then run the benchmarks in bench/
# Set-up is idempotent: packages already present and an up-to-date venv are kept.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cd "$here"
venv="$here/.venv"

APT_PACKAGES=(
  python3 python3-venv python3-dev gcc make
  python3-bpfcc bpfcc-tools bpftool linux-headers-amd64
  iproute2 iptables ufw tcpdump tshark procps kmod ipvsadm ipset
  libnetfilter-queue-dev
  qemu-system-x86 debootstrap e2fsprogs
)

need_root() {
  if [ "$(id -u)" -ne 0 ]; then
    echo "dev.sh: '$1' needs root (apt packages, network namespaces): run it with sudo" >&2
    exit 77
  fi
}

setup_apt() {
  local missing=()
  for p in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "dev.sh: installing ${missing[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    echo "wireshark-common wireshark-common/install-setuid boolean false" | debconf-set-selections
    apt-get update -qq
    if ! apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null; then
      # one by one: package names differ between Debian and Ubuntu
      # (linux-headers-amd64 is Debian's; Ubuntu ships bpftool in linux-tools)
      local failed=()
      for p in "${missing[@]}"; do
        apt-get install -y -qq --no-install-recommends "$p" >/dev/null 2>&1 || failed+=("$p")
      done
      if [ ${#failed[@]} -gt 0 ]; then
        echo "dev.sh: could not install: ${failed[*]} (see hopscope doctor for what each is for)" >&2
      fi
    fi
  fi
}

setup_venv() {
  # bcc is a Debian package (python3-bpfcc): the venv sees it through
  # --system-site-packages. Never `pip install bcc` (an unrelated library).
  local stamp="$venv/.hopscope-stamp" want
  want=$(cat pyproject.toml requirements-test.txt | sha256sum | cut -c1-16)
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    return
  fi
  [ -x "$venv/bin/python" ] || /usr/bin/python3 -m venv --system-site-packages "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip
  "$venv/bin/python" -m pip install -q -r requirements-test.txt -e ".[dev]"
  echo "$want" > "$stamp"
}

setup_native() {
  # The replay hot path compiles with mypyc when the package installs (setup.py).
  # Rebuild when a compiled module's source changed since; until then the
  # Python sources run (hopscope/__init__.py notices), never a stale build.
  if ! "$venv/bin/python" -c 'import sys, hopscope; sys.exit(1 if hopscope.STALE else 0)'; then
    echo "dev.sh: compiling the replay hot path with mypyc (about a minute)" >&2
    "$venv/bin/python" -m pip install -q --no-deps -e .
  fi
  # An editable install leaves the modules' bytecode to the first import, which
  # cannot write it where PYTHONDONTWRITEBYTECODE is set: every command would
  # compile them again (10 ms of each start). A wheel's install writes it.
  "$venv/bin/python" -m compileall -q hopscope agent collector bpf systemd > /dev/null
}

cmd=${1:-help}
shift || true
case "$cmd" in
  setup)
    need_root setup; setup_apt; setup_venv; setup_native ;;
  demo)
    need_root demo; setup_apt; setup_venv; setup_native
    exec "$venv/bin/hopscope" demo "$@" ;;
  test)
    need_root test; setup_apt; setup_venv; setup_native
    "$venv/bin/ruff" check hopscope agent collector tests bench vm
    "$venv/bin/mypy"
    exec "$venv/bin/pytest" "$@" ;;
  bench)
    need_root bench; setup_apt; setup_venv; setup_native
    for b in bench/*.py; do case "$b" in */_*) continue;; esac; "$venv/bin/python" "$b"; done ;;
  *)
    sed -n '2,7p' "$0"; exit 2 ;;
esac
