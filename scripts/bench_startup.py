"""Benchmark: a process's start-up, phase by phase, each phase in fresh processes, side by side.

Why. On a 21K-trade file the whole process is mostly start-up (imports, numba initialising
its CPU target, loading cached kernels, starting the pipeline), so that is what decides
the whole-process race against NautilusTrader (``scripts/bench_vs_nautilus.py``). Each row
is a child interpreter that runs the steps up to that phase and reports wall and CPU time
per step (``time.perf_counter``, ``time.process_time``); rows are interleaved and repeated,
medians printed. CPU time is the steadier figure on a shared machine.

Phases:
- ``import``: ``import nautilus_pipeline`` (after ``numpy``/``numba``, timed separately);
- ``io``: ``from nautilus_pipeline.io import Replay, Source`` (pyarrow and the readers);
- ``numba``: the first call of a cached numba kernel (``splitmix_seed``: numba's CPU target; with scipy
  installed numba imports ``scipy.linalg`` there, for its own BLAS bindings);
- ``start``: the default definition's stages built and the pipeline started (the stages'
  kernels loaded and warmed) and one live tick through it, ``batch_size=1``.

``--trees A B``: the same rows for other checkouts (their root on ``PYTHONPATH``), to put a
change beside its parent in one run. ``--hide scipy`` runs a variant with ``import scipy``
failing, as in an install without it (scipy is no dependency of this package; numba
imports it if present).

    python scripts/bench_startup.py [--repeats 5] [--trees . /tmp/parent] [--hide scipy]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
STEPS = ("numpy+numba", "import", "io", "numba", "start")

CHILD = r"""
import json, sys, time
hide = sys.argv[1].split(",") if sys.argv[1] else []
if hide:
    class _Hide:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in hide:
                raise ModuleNotFoundError(f"No module named {name!r} (hidden)")
    sys.meta_path.insert(0, _Hide())
definition = sys.argv[2]
out = {}
def step(name, t, c):
    out[name] = (time.perf_counter() - t, time.process_time() - c)
    return time.perf_counter(), time.process_time()
t, c = time.perf_counter(), time.process_time()
import numpy as np
import numba
t, c = step("numpy+numba", t, c)
import nautilus_pipeline
t, c = step("import", t, c)
from nautilus_pipeline.io import Replay, Source
t, c = step("io", t, c)
from nautilus_pipeline.kernels.montecarlo import splitmix_seed
splitmix_seed(0)  # one small cached kernel: numba's CPU target starts here
t, c = step("numba", t, c)
from nautilus_pipeline import config
from nautilus_pipeline.events import TradeTick
from nautilus_pipeline.runtime import configure_logging, run
configure_logging(level="error")
async def main():
    d = config.load(definition)
    pipe = config.build_pipeline(d, config.build_stages(d, []), batch_size=1)
    async with pipe:
        await pipe.publish_tick(TradeTick("BTCUSDT-PERP", 1, 100.0, 0.01, 1))
run(main())
t, c = step("start", t, c)
out["scipy_imported"] = "scipy" in sys.modules
sys.stdout.write(json.dumps(out))
"""


def child(tree: pathlib.Path, hide: str, definition: pathlib.Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    done = subprocess.run([sys.executable, "-c", CHILD, hide, str(definition)], env=env,
                          capture_output=True, text=True, cwd=tree)
    if done.returncode != 0:
        raise SystemExit(f"child failed in {tree}:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout)


def main() -> None:
    from nautilus_pipeline.machine import cache_bytecode_in_child_processes, describe

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--trees", nargs="*", type=pathlib.Path, default=[ROOT])
    ap.add_argument("--hide", default="", help="comma-separated modules to hide in a second variant")
    args = ap.parse_args()
    print(cache_bytecode_in_child_processes())
    definition = pathlib.Path(os.environ.get("TMPDIR", "/tmp")) / "bench_startup_live.toml"
    text = (ROOT / "pipelines/default.toml").read_text()
    definition.write_text(text.replace('bucket_volume = "auto"', "bucket_volume = 2.0"))
    hides = ["", args.hide] if args.hide else [""]
    variants = [(tree.resolve(), h) for tree in args.trees for h in hides]
    for v in variants:  # warm-up, discarded: byte code, page cache, numba's cache
        child(v[0], v[1], definition)
    runs: dict[tuple, list[dict]] = {v: [] for v in variants}
    for _ in range(args.repeats):
        for v in variants:  # interleaved: a noisy moment hits every variant
            runs[v].append(child(v[0], v[1], definition))
    print(f"machine: {describe()}; load average {os.getloadavg()[0]:.2f} at the end")
    print(f"start-up by phase, median of {args.repeats} fresh processes each, "
          "wall / CPU seconds (each phase after the previous one)")
    head = f"{'tree':<28} {'hidden':<7} " + " ".join(f"{s:>15}" for s in (*STEPS, "total"))
    print(head)
    print("-" * len(head))
    for (tree, hide), rs in runs.items():
        cells = []
        for s in STEPS:
            w = statistics.median(r[s][0] for r in rs)
            c = statistics.median(r[s][1] for r in rs)
            cells.append(f"{w:>7.3f}/{c:<7.3f}")
        tw = statistics.median(sum(r[s][0] for s in STEPS) for r in rs)
        tc = statistics.median(sum(r[s][1] for s in STEPS) for r in rs)
        cells.append(f"{tw:>7.3f}/{tc:<7.3f}")
        label = str(tree)[-28:]
        print(f"{label:<28} {hide or '-':<7} " + " ".join(cells)
              + ("" if not rs[0]["scipy_imported"] else "  (scipy imported)"))


if __name__ == "__main__":
    main()
