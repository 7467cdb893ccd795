"""Why pipelines run BLAS single-threaded: the default model per batch, 1 BLAS thread vs all.

Stages call their kernels one batch at a time on the event loop's thread; a multi-threaded
BLAS then competes with the loop, the reader thread and the other stages for the cores.
This times the bundled model's numpy forward pass (float32) at a few batch sizes with
threadpoolctl limiting BLAS to 1 thread and to every core, side by side in one run: on an
idle machine, and beside another process doing its own matrix products (another
pipeline, a notebook, a test run), which is what a production box looks like.

    python scripts/bench_blas_threads.py
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import time

import numpy as np
from threadpoolctl import threadpool_info, threadpool_limits

from nautilus_pipeline.machine import describe
from nautilus_pipeline.model.runners import make_runner
from nautilus_pipeline.model.spec import load_default_model


def median_ms(fn, budget_s: float) -> float:
    for _ in range(3):
        fn()
    times = []
    deadline = time.perf_counter() + budget_s
    while len(times) < 5 or time.perf_counter() < deadline:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times)) * 1e3


def _spin() -> None:
    """Keep cores busy as another BLAS user would (its own matrix products, threads unset)."""
    a = np.random.default_rng(1).random((256, 256))
    while True:
        a @ a


def table(runner, spec, weights, cores: int, budget: float) -> list[tuple[int, float, float]]:
    rng = np.random.default_rng(0)
    rows = []
    for n in (64, 1024, 4096):
        x = (rng.standard_normal((n, spec.n_inputs)) * weights.std + weights.mean).astype(np.float32)
        out = np.empty(n, np.float32)
        cells = []
        for threads in (1, cores):
            with threadpool_limits(threads, user_api="blas"):
                cells.append(median_ms(lambda x=x, out=out: runner.predict(x, out), budget))
        rows.append((n, cells[0], cells[1]))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget", type=float, default=1.0, help="seconds per cell")
    args = ap.parse_args()
    spec, weights = load_default_model()
    runner = make_runner("numpy", spec, weights)
    blas = ", ".join(sorted({f"{i['internal_api']} {i.get('version')}" for i in threadpool_info()
                             if i["user_api"] == "blas"}))
    cores = os.cpu_count() or 1
    print(f"machine: {describe()}; BLAS: {blas}")
    print(f"model: {spec.n_inputs} → {' → '.join(map(str, spec.hidden))} → 1, numpy float32; median of {args.budget}s per cell\n")
    idle = table(runner, spec, weights, cores, args.budget)
    busy_proc = multiprocessing.Process(target=_spin, daemon=True)
    busy_proc.start()
    try:
        busy = table(runner, spec, weights, cores, args.budget)
    finally:
        busy_proc.terminate()
        busy_proc.join()
    print(f"{'':>6} {'idle machine':^34} {'another BLAS user running':^34}")
    head = f"{'1 thread ms':>12} {f'{cores} threads ms':>13} {'ratio':>7}"
    print(f"{'batch':>6} {head} {head}")
    for (n, a1, an), (_, b1, bn) in zip(idle, busy, strict=True):
        print(f"{n:>6} {a1:>12.3f} {an:>13.3f} {an / a1:>6.1f}x {b1:>12.3f} {bn:>13.3f} {bn / b1:>6.1f}x")


if __name__ == "__main__":
    main()
