"""Profile: one batch job (``replay_job``) of a definition over one file, where its time goes.

Prints the import time, the ``bucket_volume = "auto"`` calibration over the file
(``calibrate_chain``), the job's wall and replay time, and (``--profile``) the cProfile
table by cumulative time. Started N times at once (``for i in $(seq 16); do ... & done``)
it shows what a job pays beside N-1 others on one host, e.g. CUDA contexts on one GPU
(``docs/measurements/gpu_batch_gpu_phases_ac96238_h200.txt``). Run:
``python scripts/profile_batch_job.py FILE --definition pipelines/gpu.toml --symbol SYM00USDT [--tag c0] [--profile]``.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time

t0 = time.perf_counter()
from nautilus_pipeline.batch.job import replay_job  # noqa: E402 (the import is timed)
from nautilus_pipeline.batch.plan import calibrate_chain  # noqa: E402

t_import = time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("file")
    ap.add_argument("--definition", default="pipelines/gpu.toml")
    ap.add_argument("--symbol", default="SYM00USDT")
    ap.add_argument("--format", default=None, help="the file's format (default: from its name)")
    ap.add_argument("--tag", default="alone", help="a name for this process's line (and out dir)")
    ap.add_argument("--profile", action="store_true", help="print the cProfile table (top 35)")
    args = ap.parse_args()
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
