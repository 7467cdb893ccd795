"""Profile: one batch job (``replay_job``) of a definition over one file, where its time goes.

Prints the import time, the ``bucket_volume = "auto"`` calibration over the file
(``calibrate_chain``), the job's wall and replay time, and (``--profile``) the cProfile
table by cumulative time. ``--warm-jobs N``: instead, a warm worker's N jobs in a row (as
a pool worker runs them: ``warm_up`` on the definition, then ``run_job`` each time),
each job's phases outside its replay (``batch.job.PHASES``) and the garbage collector's
passes in it (``gc.callbacks``: full ones timed one by one, young ones summed);
``--no-freeze`` leaves out the worker's ``gc.freeze`` once warm, to compare. Started N times at once (``for i in $(seq 16); do ... & done``)
it shows what a job pays beside N-1 others on one host, e.g. CUDA contexts on one GPU
(``docs/measurements/gpu_batch_gpu_phases_ac96238_h200.txt``). Run:
``python scripts/profile_batch_job.py FILE --definition pipelines/gpu.toml --symbol SYM00USDT [--tag c0] [--profile]``,
``python scripts/profile_batch_job.py FILE FILE2 --definition DEF --warm-jobs 8 [--no-freeze]`` (the
jobs take the files in turn).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time

t0 = time.perf_counter()
from nautilus_pipeline.batch.job import PHASES, replay_job  # noqa: E402 (the import is timed)
from nautilus_pipeline.batch.plan import calibrate_chain  # noqa: E402

t_import = time.perf_counter() - t0


def warm_jobs(definition: str, files: list[str], jobs: int, freeze: bool, tag: str) -> None:
    """``jobs`` jobs in this process as a warm pool worker runs them; a line per job."""
    import gc

    from nautilus_pipeline.batch import executors
    from nautilus_pipeline.batch.plan import JobSpec
    from nautilus_pipeline.config import load

    if not freeze:  # as if frozen already: warm_up and run_job then leave the collector alone
        executors._FROZEN = True
    d = load(definition)
    executors.warm_up("warning", 1, d)
    passes: list[tuple[int, float]] = []
    started = [0.0]

    def on_gc(phase: str, info: dict) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
        else:
            passes.append((info["generation"], time.perf_counter() - started[0]))

    gc.callbacks.append(on_gc)
    work = executors.Work(d, f"/tmp/profile-batch-job-{tag}")
    print(f"warm worker, gc.freeze {'on' if freeze else 'off'}: {gc.get_freeze_count():,} objects frozen, "
          f"{len(gc.get_objects()):,} tracked")
    print("| job | replay s | outside it ms | " + " | ".join(PHASES) + " | full collections ms | young ms (n) |")
    print("|---:|---:|---:|" + "---:|" * len(PHASES) + "---|---:|")
    for i in range(jobs):
        passes.clear()
        spec = JobSpec(f"S/{i:04d}", "S", i, (files[i % len(files)],), False, None)
        r = executors.run_job(work, spec, {}, 1, None)
        full = [ms for g, ms in passes if g == 2]
        young = [ms for g, ms in passes if g < 2]
        print(f"| {i} | {r.run_s:.3f} | {1000 * (r.ended_at - r.started_at - r.run_s):.2f} | "
              + " | ".join(f"{1000 * r.phases.get(k, 0.0):.2f}" for k in PHASES)
              + f" | {', '.join(f'{1000 * ms:.1f}' for ms in full) or '-'} | {1000 * sum(young):.1f} ({len(young)}) |",
              flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("file")
    ap.add_argument("more", nargs="*", help="--warm-jobs: more files, taken in turn")
    ap.add_argument("--warm-jobs", type=int, metavar="N", help="N jobs in a warm worker, phases and GC per job")
    ap.add_argument("--no-freeze", action="store_true", help="--warm-jobs: no gc.freeze once warm")
    ap.add_argument("--definition", default="pipelines/gpu.toml")
    ap.add_argument("--symbol", default="SYM00USDT")
    ap.add_argument("--format", default=None, help="the file's format (default: from its name)")
    ap.add_argument("--tag", default="alone", help="a name for this process's line (and out dir)")
    ap.add_argument("--profile", action="store_true", help="print the cProfile table (top 35)")
    args = ap.parse_args()
    if args.warm_jobs:
        warm_jobs(args.definition, [args.file, *args.more], args.warm_jobs, not args.no_freeze, args.tag)
        return
    t1 = time.perf_counter()
    overrides = calibrate_chain(args.definition, [args.file], args.symbol, format=args.format)
    t2 = time.perf_counter()
    prof = cProfile.Profile() if args.profile else None
    if prof is not None:
        prof.enable()
    result = replay_job(args.definition, [args.file], f"/tmp/profile-batch-job-{args.tag}",
                        overrides=overrides, job_id="job", format=args.format,
                        symbol=args.symbol)
    if prof is not None:
        prof.disable()
    print(f"[{args.tag}] import {t_import:.2f} s, calibrate_chain {t2 - t1:.2f} s, replay_job wall "
          f"{result.wall_s:.2f} (run_s {result.run_s:.2f}), total {time.perf_counter() - t0:.2f}", flush=True)
    if prof is not None:
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats("cumulative").print_stats(35)
        print(out.getvalue())


if __name__ == "__main__":
    main()
