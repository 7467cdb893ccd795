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

import contextlib
import os
import signal
import threading
import time
from collections.abc import Iterator, Sequence
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
from .merge import merge_outputs, output_kinds, summarise, write_summary
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
    """Replay ``inputs`` (files or globs) through ``definition`` into ``out``; see the module doc.

    A ``KeyboardInterrupt`` (Ctrl-C; the CLI turns SIGTERM into one) at any phase still ends
    in a ``summary.json`` that says what finished: while planning, every file ``not_run``;
    while the jobs run, the jobs that finished, merged; while merging, the kinds merged so
    far (``merge_incomplete`` lists the others; every finished job's own outputs stay in
    ``OUT/jobs/``). ``interrupted_in`` names the phase."""
    t0 = time.perf_counter()
    if executor not in EXECUTORS:
        raise config.ConfigError(f"executor must be one of {sorted(EXECUTORS)}, got {executor!r}")
    d = config.load(definition)
    out = Path(out)
    check_out_dir(out, "--out")
    files = expand_inputs([str(i) for i in inputs])
    runner = (RayExecutor(workers, address=ray_address) if executor == "ray"
              else LocalExecutor(workers))
    chains: list[Chain] = []
    outcome = Outcome()
    merged: dict[str, dict[str, Any]] = {}
    kinds: list[str] = []
    phase, stopped_in = "plan", None
    times = {"plan_s": 0.0, "run_s": 0.0, "merge_s": 0.0}
    t_phase = t0
    try:
        runner.prepare(log_level)
        try:
            chains = plan(d, files, format=format, symbol=symbol, trace_every=trace_every)
        except BaseException:
            runner.close()  # the workers started for the batch
            raise
        work = Work(str(d.path), str(out), batch_size=batch_size, format=format, symbol=symbol,
                    log_level=log_level, calibrate=bool(needs_calibration(d)),
                    threads=threads_per_worker(workers or os.cpu_count() or 1))
        progress = progress or Progress()
        progress.start(sum(len(c.files) for c in chains))
        times["plan_s"], t_phase, phase = time.perf_counter() - t0, time.perf_counter(), "run"
        runner.run(work, chains, progress, outcome)
        if outcome.interrupted:  # the executor caught it: merge what finished
            stopped_in = "run"
        _remove_leftovers(out)
        times["run_s"], t_phase, phase = time.perf_counter() - t_phase, time.perf_counter(), "merge"
        kinds = output_kinds(outcome.results)
        merge_outputs(out, outcome.results, merged=merged)
        times["merge_s"] = time.perf_counter() - t_phase
    except KeyboardInterrupt:
        stopped_in = phase
        times[f"{phase}_s"] = time.perf_counter() - t_phase
        outcome.interrupted = True
        runner.close()
        outcome.in_order(chains)
        if phase == "run":
            _remove_leftovers(out)
    with _shielded():  # a second Ctrl-C must not cost the summary
        summary = _summary(d, files, chains, outcome, merged, kinds, runner, executor, ray_address,
                           stopped_in, times, t0)
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


def _summary(d: config.PipelineDef, files: Sequence[Path], chains: list[Chain], outcome: Outcome,
             merged: dict[str, dict[str, Any]], kinds: list[str], runner: Any, executor: str,
             ray_address: str | None, stopped_in: str | None, times: dict[str, float],
             t0: float) -> dict[str, Any]:
    planned = {f.path for c in chains for f in c.files}
    overheads = {r.job_id: outcome.returned_at[r.job_id] - outcome.submitted_at[r.job_id] - r.wall_s
                 for r in outcome.results if r.job_id in outcome.returned_at and r.job_id in outcome.submitted_at}
    summary = summarise(chains, outcome.results, outcome.failures, merged, meta={
        "pipeline": d.name, "definition": str(d.path), "executor": executor,
        "workers": getattr(runner, "workers", None), "ray_address": ray_address,
        "interrupted": outcome.interrupted, "interrupted_in": stopped_in, "retries": outcome.retries,
        "executor_startup_s": outcome.startup_s, "workers_warm_s": outcome.warm_s,
        "ray_cluster": outcome.cluster, "wall_s": time.perf_counter() - t0, **times,
        "code_version": code_version(),
    }, unplanned=[str(f) for f in files if str(f) not in planned])
    summary["merge_incomplete"] = [k for k in kinds if k not in merged] if stopped_in == "merge" else []
    for job in summary["jobs"]:
        job["overhead_s"] = overheads.get(job["job"])
        job["attempts"] = outcome.attempts.get(job["job"])
    return summary


@contextlib.contextmanager
def _shielded() -> Iterator[None]:
    """SIGINT and SIGTERM ignored for the moment it takes (in the main thread only: signal
    handlers belong to it)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _remove_leftovers(out: Path) -> None:
    """Temporary folders of jobs whose worker died or was stopped (every worker is done now)."""
    import shutil

    from .job import TMP_MARK

    for tmp in (out / "jobs").glob(f"*/.*{TMP_MARK}*"):
        shutil.rmtree(tmp, ignore_errors=True)


__all__ = ["BatchReport", "Chain", "JobResult", "JobSpec", "LocalExecutor", "Progress", "RayExecutor",
           "calibrate_chain", "expand_inputs", "plan", "replay_job", "run_batch"]
