"""Where a local Ray's start-up goes, as ``batch --executor ray`` starts it (issue 10).

Each repeat is a fresh process: ``import ray``, then ``ray.init`` with the batch executor's
options (``include_dashboard=False``, ``log_to_driver=False``, ``num_cpus``), profiled, then
the first round trip of one trivial task per CPU (a worker process each), then
``ray.shutdown``. ``ray.init`` is split into the waits inside it that Ray itself runs: the API
server's start (it starts even without the dashboard), the node's registration (the raylet
waits for its dashboard agent), the driver's connection, and the rest. ``--system-config``
adds a ``_system_config`` (JSON) to compare, side by side in one run; e.g.
``python scripts/profile_ray_start.py --repeat 3 --system-config '{"enable_metrics_collection": false}'``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

# the functions of ray.init that wait for Ray's own processes (cumulative time in each)
PARTS = {"api server": "start_api_server", "node registration": "get_node", "driver connect": "connect"}


def child(cpus: int, system_config: str) -> None:
    import cProfile
    import pstats

    t = time.perf_counter()
    import ray

    t_import = time.perf_counter() - t
    kwargs = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False, "num_cpus": cpus}
    if system_config:
        kwargs["_system_config"] = json.loads(system_config)
    prof = cProfile.Profile()
    t = time.perf_counter()
    prof.runcall(ray.init, **kwargs)
    t_init = time.perf_counter() - t
    stats = pstats.Stats(prof).stats
    parts = {}
    for label, fn in PARTS.items():
        parts[label] = max((v[3] for (path, _, name), v in stats.items()
                            if name == fn and "ray" in path), default=0.0)

    @ray.remote(num_cpus=1)
    def pid() -> int:
        return os.getpid()

    t = time.perf_counter()
    ray.get([pid.remote() for _ in range(cpus)])
    t_tasks = time.perf_counter() - t
    t = time.perf_counter()
    ray.shutdown()
    t_down = time.perf_counter() - t
    print(json.dumps({"import": t_import, "init": t_init, **parts, "tasks": t_tasks, "shutdown": t_down}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--system-config", default="", help="a _system_config (JSON) to compare with none")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(int(args.child[0]), args.child[1])
        return
    configs = [""] + ([args.system_config] if args.system_config else [])
    print(f"load before: {os.getloadavg()[0]:.2f}; {os.cpu_count()} cores; {args.repeat} fresh processes per config, "
          "alternating")
    print()
    print("| config | import ray s | ray.init s | of which: api server | node registration | driver connect | "
          "rest | first task per CPU s | shutdown s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    results: dict[str, list[dict]] = {c: [] for c in configs}
    for _ in range(args.repeat):
        for c in configs:
            done = subprocess.run([sys.executable, __file__, "--child", str(args.cpus), c],
                                  capture_output=True, text=True, check=True)
            results[c].append(json.loads(done.stdout.strip().splitlines()[-1]))
    for c, rows in results.items():
        for r in rows:
            rest = r["init"] - sum(r[k] for k in PARTS)
            print(f"| {c or 'batch executor options'} | {r['import']:.2f} | {r['init']:.2f} | "
                  f"{r['api server']:.2f} | {r['node registration']:.2f} | {r['driver connect']:.2f} | "
                  f"{rest:.2f} | {r['tasks']:.2f} | {r['shutdown']:.2f} |")
    print()
    print(f"load after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
