"""Sharded batch replays: many files, many symbols, many cores or hosts (issue 10).

``run_batch`` plans (:mod:`.plan`: files grouped by symbol, ordered by first timestamp,
chained), runs the jobs (:mod:`.job`, one per file, state carried by snapshots) on an executor
(:mod:`.executors`: ``local`` process pool or ``ray``), and merges their outputs
(:mod:`.merge`: one Parquet dataset per kind partitioned by symbol, and ``summary.json``).
The merged outputs equal those of one sequential run per symbol over its files, row for row
and bit for bit after sorting by (symbol, ts_ns): the tests check it.

Exit codes (as ``run``): 0 ok, 4 a chain failed on its data (the file is named; the other
chains completed), 5 a stage failed on some batches, 1 another failure (a worker that kept
dying), 130 interrupted (what finished is merged and summarised).
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import config
from ..app import check_out_dir, code_version
from .executors import (
    EXECUTORS,
    LocalExecutor,
    Outcome,
    Progress,
    RayExecutor,
    Work,
    threads_per_worker,
)
from .job import JobResult, replay_job
from .merge import merge_outputs, summarise, write_summary
from .plan import Chain, JobSpec, calibrate_chain, expand_inputs, needs_calibration, plan

EXIT_OK, EXIT_ERROR, EXIT_DATA, EXIT_STAGE, EXIT_INTERRUPTED = 0, 1, 4, 5, 130


@dataclass(frozen=True)
class BatchReport:
    """What a batch did (``summary`` is what ``summary.json`` holds) and its exit code."""

    summary: dict[str, Any]
    exit_code: int
    outcome: Outcome


def run_batch(definition: str | Path, inputs: Sequence[str | Path], out: str | Path, *,
              executor: str = "local", workers: int | None = None, ray_address: str | None = None,
              batch_size: int | None = None, format: str | None = None, symbol: str | None = None,
              trace_every: int = 0, progress: Progress | None = None,
              log_level: str = "warning") -> BatchReport:
    """Replay ``inputs`` (files or globs) through ``definition`` into ``out``; see the module doc."""
    t0 = time.perf_counter()
    if executor not in EXECUTORS:
        raise config.ConfigError(f"executor must be one of {sorted(EXECUTORS)}, got {executor!r}")
    d = config.load(definition)
    out = Path(out)
    check_out_dir(out, "--out")
    files = expand_inputs([str(i) for i in inputs])
    runner = (RayExecutor(workers, address=ray_address) if executor == "ray"
              else LocalExecutor(workers))
    if isinstance(runner, LocalExecutor):
        runner.prepare(log_level)
    try:
        chains = plan(d, files, format=format, symbol=symbol, trace_every=trace_every)
    except BaseException:
        runner.close()
        raise
    work = Work(str(d.path), str(out), batch_size=batch_size, format=format, symbol=symbol,
                log_level=log_level, calibrate=bool(needs_calibration(d)),
                threads=threads_per_worker(workers or os.cpu_count() or 1))
    progress = progress or Progress()
    progress.start(sum(len(c.files) for c in chains))
    t_plan = time.perf_counter()
    outcome = runner.run(work, chains, progress)
    _remove_leftovers(out)
    t_run = time.perf_counter()
    merged = merge_outputs(out, outcome.results)
    t_merge = time.perf_counter()
    overheads = {r.job_id: outcome.returned_at[r.job_id] - outcome.submitted_at[r.job_id] - r.wall_s
                 for r in outcome.results if r.job_id in outcome.returned_at and r.job_id in outcome.submitted_at}
    summary = summarise(chains, outcome.results, outcome.failures, merged, meta={
        "pipeline": d.name, "definition": str(d.path), "executor": executor,
        "workers": getattr(runner, "workers", None), "ray_address": ray_address,
        "interrupted": outcome.interrupted, "retries": outcome.retries,
        "executor_startup_s": outcome.startup_s, "wall_s": time.perf_counter() - t0,
        "plan_s": t_plan - t0, "run_s": t_run - t_plan, "merge_s": t_merge - t_run,
        "code_version": code_version(),
    })
    for job in summary["jobs"]:
        job["overhead_s"] = overheads.get(job["job"])
        job["attempts"] = outcome.attempts.get(job["job"])
    write_summary(out, summary)
    if outcome.interrupted:
        code = EXIT_INTERRUPTED
    elif outcome.data_failures:
        code = EXIT_DATA
    elif outcome.failures:
        code = EXIT_ERROR
    elif summary["totals"]["failed_batches"]:
        code = EXIT_STAGE
    else:
        code = EXIT_OK
    return BatchReport(summary, code, outcome)


def _remove_leftovers(out: Path) -> None:
    """Temporary folders of jobs whose worker died or was stopped (every worker is done now)."""
    import shutil

    from .job import TMP_MARK

    for tmp in (out / "jobs").glob(f"*/.*{TMP_MARK}*"):
        shutil.rmtree(tmp, ignore_errors=True)


__all__ = ["BatchReport", "Chain", "JobResult", "JobSpec", "LocalExecutor", "Progress", "RayExecutor",
           "calibrate_chain", "expand_inputs", "plan", "replay_job", "run_batch"]
