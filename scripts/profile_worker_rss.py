"""Profile: one batch worker's memory and time, its warm-up and then one job, as ``batch`` runs them.

Why. A batch worker builds a pool per job (kept from job to job) and replays one batch at a
time; what its slabs cost is resident memory in every worker (16 workers on one host) and
pages first touched. This starts one worker the way ``batch`` does (the fork server, the
pool initializer), runs :func:`~nautilus_pipeline.batch.executors.warm_up` on the definition
and then one job over FILE, and prints the seconds of each and the worker's peak RSS after
each (``getrusage`` in the worker). ``--label`` names the row, for A/Bs of two checkouts
run one after the other with their own ``PYTHONPATH`` (run it from a folder outside both:
the fork server would import a checkout found in the current folder).

    cd /tmp && PYTHONPATH=/path/to/checkout python /path/to/checkout/scripts/profile_worker_rss.py \
        /path/to/checkout/pipelines/gpu.toml FILE --label after
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import resource
import tempfile
import time


def _peak_rss_mb() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("definition")
    ap.add_argument("file", help="a tick file for the one job")
    ap.add_argument("--label", default="this checkout")
    ap.add_argument("--workers", type=int, default=16,
                    help="the batch's worker count, for the slab memory it resolves (default 16)")
    args = ap.parse_args()
    from nautilus_pipeline.batch import executors, worker_memory
    from nautilus_pipeline.batch.plan import JobSpec
    from nautilus_pipeline.config import load

    d = worker_memory(load(args.definition), args.workers)
    with tempfile.TemporaryDirectory(prefix="nautilus-rss-") as out:
        work = executors.Work(d, out)
        spec = JobSpec("S/0000", "S", 0, (args.file,), True, None)
        with cf.ProcessPoolExecutor(1, mp_context=executors._worker_context(),
                                    initializer=executors._pool_init, initargs=("warning", 1)) as pool:
            t = time.perf_counter()
            pool.submit(executors.warm_up, "warning", 1, d).result()
            warm_s, warm_rss = time.perf_counter() - t, pool.submit(_peak_rss_mb).result()
            t = time.perf_counter()
            res = pool.submit(executors.run_job, work, spec, {}, 1, None).result()
            job_s, job_rss = time.perf_counter() - t, pool.submit(_peak_rss_mb).result()
    print(f"{args.label}: warm-up {warm_s:.2f} s, peak RSS after it {warm_rss} MB; job {job_s:.2f} s "
          f"(run {res.run_s:.2f}), peak RSS after it {job_rss} MB")


if __name__ == "__main__":
    main()
