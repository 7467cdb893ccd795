"""Profile: a batch worker's warm-up, N workers at once, phase by phase (issue 15's start-up).

A pool of N workers is started as ``batch`` starts its own (the fork server and its
preload, ``batch.executors._worker_context``); each worker, at the same moment, times:
``import torch``; CUDA's context (``torch.cuda.init`` and a first matmul); the rest of
``executors.warm_up`` on the definition (the bundled 21K-trade sample replayed through it:
numba kernels, the model, the stages' device start); and the same replay again, warm. It
shows which of them grows with N (what the workers queue for on one GPU) and which does
not; then the pool's stop (every worker told to stop and joined, what a batch's end waits for:
the workers' CUDA contexts torn down). Prints one table row per N (median and max over the
workers, seconds).

Run (the lent GPU host): ``python scripts/profile_worker_warm.py --workers 1 4 16``.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import statistics
import tempfile
import time
from pathlib import Path


def _phases(definition: str, start_at: float, profile_to: str | None = None) -> dict[str, float]:
    """One worker's phases (seconds), begun at the epoch second ``start_at`` with the others;
    ``profile_to``: this worker's warm-up under cProfile, its top functions written there."""
    while time.time() < start_at:
        time.sleep(0.001)
    out: dict[str, float] = {"late": time.time() - start_at}
    t = time.perf_counter()
    import torch

    out["import torch"] = time.perf_counter() - t
    t = time.perf_counter()
    if torch.cuda.is_available():
        torch.cuda.init()
        x = torch.ones((64, 64), device="cuda")
        (x @ x).sum().item()
    out["CUDA context"] = time.perf_counter() - t
    from nautilus_pipeline.batch import executors
    from nautilus_pipeline.batch.job import replay_job
    from nautilus_pipeline.config import load

    d = load(definition)
    t = time.perf_counter()
    if profile_to:
        import cProfile
        import io
        import pstats

        prof = cProfile.Profile()
        prof.runcall(executors.warm_up, "warning", 1, d)
        text = io.StringIO()
        stats = pstats.Stats(prof, stream=text).sort_stats("cumulative")
        stats.print_stats(45)
        stats.sort_stats("tottime").print_stats(25)
        Path(profile_to).write_text(text.getvalue())
    else:
        executors.warm_up("warning", 1, d)
    out["warm_up (sample replay)"] = time.perf_counter() - t
    t = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="nautilus-warm-again-") as tmp:
        replay_job(d, [executors.WARM_SAMPLE], Path(tmp) / "w", None, trace_every=1)
    out["the replay again"] = time.perf_counter() - t
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--definition", default="pipelines/gpu.toml")
    ap.add_argument("--profile-to", metavar="PREFIX",
                    help="one worker of each row warms up under cProfile (slower), its top functions "
                         "in PREFIX-<workers>.txt")
    args = ap.parse_args()
    from nautilus_pipeline.batch import executors

    names = ["late", "import torch", "CUDA context", "warm_up (sample replay)", "the replay again"]
    print(f"definition {args.definition}; seconds, median / max over the workers started at once "
          "(the pool's stop: one wall time, every worker told to stop and joined)")
    print("| workers | " + " | ".join(names) + " | all of it (max) | the pool's stop |")
    print("|---:|" + "---:|" * (len(names) + 2))
    for n in args.workers:
        ctx = executors._worker_context()
        pool = cf.ProcessPoolExecutor(max_workers=n, mp_context=ctx)
        try:
            # the workers start (the fork server's preload) before the common moment
            list(pool.map(time.sleep, [0.0] * n))
            start_at = time.time() + 1.0
            profile = [f"{args.profile_to}-{n}.txt" if args.profile_to else None] + [None] * (n - 1)
            rows = list(pool.map(_phases, [args.definition] * n, [start_at] * n, profile))
        finally:
            t = time.perf_counter()
            pool.shutdown(wait=True)  # every worker told to stop, and joined: what a batch's end waits for
            stop = time.perf_counter() - t
        totals = [sum(r[k] for k in names[1:]) for r in rows]
        cells = [f"{statistics.median(r[k] for r in rows):.2f} / {max(r[k] for r in rows):.2f}" for k in names]
        print(f"| {n} | " + " | ".join(cells) + f" | {max(totals):.2f} | {stop:.2f} |", flush=True)


if __name__ == "__main__":
    main()
