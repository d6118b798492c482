"""Record captures of the live replica into pcaps/replica-*/ (root; about 20 s).

Each directory gets one pcapng per node (``hopscope testbed capture``) and
``truth.json``: what the traffic generator sent and saw, phase by phase
(CF-Ray, node entered, pod that served it, status, client-side times), and
the fault that was active. ``tests/test_replica_pcaps.py`` replays them and
compares with the truth. Nobody chose these bytes: they are what the real
kernel, UFW, Traefik, kube-proxy's rules and VXLAN produced.

    sudo .venv/bin/python pcaps/record_replica.py [--out pcaps]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path
from typing import Any

from hopscope.testbed import build, faults
from hopscope.testbed.capture import capturing
from hopscope.testbed.topology import Instance
from hopscope.testbed.traffic import TrafficConfig, run_traffic

KEEP = ("cf_ray", "node", "method", "path", "status", "served_by", "new_conn",
        "t_start_real_ns", "t_first_byte_ns", "t_end_ns", "error")


def _record(inst: Instance, out: Path, phases: list[tuple[str, TrafficConfig, Any]],
            fault: dict[str, Any] | None) -> None:
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    truth: dict[str, Any] = {"fault": fault, "phases": {}}
    with capturing(inst, out) as cap:
        for name, cfg, before in phases:
            if before is not None:
                before()
            try:
                res = run_traffic(inst.topology, cfg, keep=True)
            finally:
                faults.clear(inst)
            truth["phases"][name] = [{k: r.get(k) for k in KEEP} for r in res.records]
    assert cap.result is not None
    (out / "truth.json").write_text(json.dumps(truth, indent=1) + "\n")
    print(f"{out}: " + ", ".join(f"{f.name} {f.stat().st_size // 1024} KiB" for f in cap.result.files))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("record_replica.py builds network namespaces: run it as root")
    prefix = "hsrec-"
    build.down(prefix)
    with build.replica(prefix, access_log=False) as inst:
        _record(inst, args.out / "replica-clean", [
            ("clean", TrafficConfig(count=60, concurrency=3, new_conn_ratio=0.3, seed=21), None),
        ], None)
        _record(inst, args.out / "replica-ufw-delay", [
            ("clean", TrafficConfig(count=30, concurrency=2, nodes=["node2"], new_conn_ratio=0.3,
                                    seed=22), None),
            ("delayed", TrafficConfig(count=30, concurrency=2, nodes=["node2"], new_conn_ratio=0.3,
                                      seed=23), lambda: faults.add_delay(inst, "ufw", "node2", 20)),
        ], {"kind": "delay", "at": "ufw", "node": "node2", "ms": 20})


if __name__ == "__main__":
    main()
