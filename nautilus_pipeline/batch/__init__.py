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
import dataclasses
import itertools
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
    CpuListError,
    LocalExecutor,
    Outcome,
    Progress,
    RayExecutor,
    Work,
    parse_cpus,
    threads_per_worker,
    worker_cpus,
)
from .job import JobResult, replay_job
from .merge import StreamingMerge, chain_index, output_kinds, summarise, write_summary
from .plan import Chain, JobSpec, calibrate_chain, expand_inputs, needs_calibration, plan

EXIT_OK, EXIT_ERROR, EXIT_DATA, EXIT_STAGE, EXIT_INTERRUPTED = 0, 1, 4, 5, 130


@dataclass(frozen=True)
class BatchReport:
    """What a batch did (``summary`` is what ``summary.json`` holds) and its exit code."""

    summary: dict[str, Any]
    exit_code: int
    outcome: Outcome


def worker_memory(d: config.PipelineDef, workers: int) -> config.PipelineDef:
    """``memory = "auto"`` means host slabs in a batch of more than one worker.

    Pinned slabs pay for one process that streams a long replay to the GPU; a batch worker
    replays one file a job, and many of them pin at once. Measured on the lent H100 host
    (``pipelines/gpu.toml --workers 16`` on 16 files of 3M trades, alternating on one
    machine, ``docs/measurements/gpu_batch_shelf_memory_ab_f6939f2_h100.txt``): host slabs
    2.70M and 2.73M ticks/s for the whole command, pinned 2.22M, 2.34M and 2.06M (the
    workers' warm-up 11.5-11.8 s vs 12.7-14.5 s, median job 2.2 vs 3.0-3.3 s). An explicit
    ``memory`` in the definition is kept."""
    if workers <= 1 or d.pipeline.get("memory", "auto") != "auto":
        return d
    return dataclasses.replace(d, pipeline={**d.pipeline, "memory": "host"})


def run_batch(definition: str | Path, inputs: Sequence[str | Path], out: str | Path, *,
              executor: str = "local", workers: int | None = None, ray_address: str | None = None,
              batch_size: int | None = None, format: str | None = None, symbol: str | None = None,
              trace_every: int = 0, progress: Progress | None = None,
              log_level: str = "warning", cpus: str | Sequence[int] | None = None) -> BatchReport:
    """Replay ``inputs`` (files or globs) through ``definition`` into ``out``; see the module doc.

    A ``KeyboardInterrupt`` (Ctrl-C; the CLI turns SIGTERM into one) at any phase still ends
    in a ``summary.json`` that says what finished: while planning, every file ``not_run``;
    while the jobs run, the jobs that finished, merged; while merging, the kinds merged so
    far (``merge_incomplete`` lists the others; every finished job's own outputs stay in
    ``OUT/jobs/``). ``interrupted_in`` names the phase.

    ``cpus`` (local only): the CPUs the workers are pinned to, one each
    (:func:`.executors.worker_cpus`: None or ``"none"`` pins nothing, ``"auto"`` pins when the
    workers fill the CPUs, a list pins to those and, without ``workers``, sets one worker a CPU)."""
    t0, t0_epoch = time.perf_counter(), time.time()
    if executor not in EXECUTORS:
        raise config.ConfigError(f"executor must be one of {sorted(EXECUTORS)}, got {executor!r}")
    if cpus not in (None, "none") and executor != "local":
        raise CpuListError("--cpus pins the local executor's workers; Ray places its own")
    if cpus not in (None, "auto", "none") and workers is None:
        workers = len(parse_cpus(cpus) if isinstance(cpus, str) else tuple(cpus))
    if executor == "local":
        worker_cpus(cpus, workers or os.cpu_count() or 1)  # a bad --cpus refused before --out is made
    # without --workers: local, one a core; Ray, a cluster's workers (several)
    d = worker_memory(config.load(definition),
                      workers or ((os.cpu_count() or 1) if executor == "local" else 2))
    out = Path(out)
    check_out_dir(out, "--out")
    files = expand_inputs([str(i) for i in inputs])
    runner = (RayExecutor(workers, address=ray_address) if executor == "ray"
              else LocalExecutor(workers, cpus=cpus))
    chains: list[Chain] = []
    outcome = Outcome()
    merged: dict[str, dict[str, Any]] = {}
    kinds: list[str] = []
    phase, stopped_in = "plan", None
    times = {"plan_s": 0.0, "run_s": 0.0, "merge_s": 0.0}
    t_phase = t0
    merger: StreamingMerge | None = None
    try:
        runner.prepare(log_level, d)
        try:
            chains = plan(d, files, format=format, symbol=symbol, trace_every=trace_every)
        except BaseException:
            runner.close()  # the workers started for the batch
            raise
        work = Work(d, str(out), batch_size=batch_size, format=format, symbol=symbol,
                    log_level=log_level, calibrate=bool(needs_calibration(d)),
                    threads=runner.threads() if isinstance(runner, LocalExecutor)
                    else threads_per_worker(workers or os.cpu_count() or 1))
        merger = StreamingMerge(out)
        feed = _Feeding(progress or Progress(), merger)
        feed.start(sum(len(c.files) for c in chains))
        times["plan_s"], t_phase, phase = time.perf_counter() - t0, time.perf_counter(), "run"
        runner.run(work, chains, feed, outcome)
        if outcome.interrupted:  # the executor caught it: merge what finished
            stopped_in = "run"
        _remove_leftovers(out)
        times["run_s"], t_phase, phase = time.perf_counter() - t_phase, time.perf_counter(), "merge"
        kinds = output_kinds(outcome.results)
        merger.finish(outcome.results, merged=merged)
        times["merge_s"] = time.perf_counter() - t_phase  # what the merge left after the jobs
    except KeyboardInterrupt:
        stopped_in = phase
        times[f"{phase}_s"] = time.perf_counter() - t_phase
        outcome.interrupted = True
        runner.close()
        if merger is not None:
            merger.abort()
        outcome.in_order(chains)
        if phase == "run":
            _remove_leftovers(out)
    except BaseException:
        # any other failure: the merge thread joined and its half-written files removed, the
        # workers stopped, then the error goes on (review finding: they were left behind)
        if merger is not None:
            merger.abort()
        runner.close()
        raise
    with _shielded():  # a second Ctrl-C must not cost the summary
        summary = _summary(d, files, chains, outcome, merged, kinds, runner, executor, ray_address,
                           stopped_in, times, t0, t0_epoch, None if merger is None else merger.cpu_s)
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
             t0: float, t0_epoch: float, merge_cpu_s: float | None) -> dict[str, Any]:
    planned = {f.path for c in chains for f in c.files}
    engine = engine_times(outcome)
    returned = [outcome.returned_at[r.job_id] for r in outcome.results if r.job_id in outcome.returned_at]
    started = [r.started_at for r in outcome.results if r.started_at]
    summary = summarise(chains, outcome.results, outcome.failures, merged, meta={
        "pipeline": d.name, "definition": str(d.path), "executor": executor,
        "workers": getattr(runner, "workers", None), "ray_address": ray_address,
        # the CPUs the workers take, one each (None: not pinned); each job names its worker's
        "cpus": list(getattr(runner, "cpus", ()))[: getattr(runner, "workers", 0)] or None,
        "interrupted": outcome.interrupted, "interrupted_in": stopped_in, "retries": outcome.retries,
        "executor_startup_s": outcome.startup_s, "workers_warm_s": outcome.warm_s,
        "ray_cluster": outcome.cluster, "wall_s": time.perf_counter() - t0, **times,
        # the batch's fixed costs (epoch s differences, one host's clock): before the first
        # job's start (start-up and plan not hidden), after the last job's return (merge, summary)
        "first_job_start_s": min(started) - t0_epoch if started else None,
        "after_last_job_s": time.time() - max(returned) if returned else None,
        "merge_cpu_s": merge_cpu_s, "executor_close_s": outcome.close_s,
        "code_version": code_version(),
    }, unplanned=[str(f) for f in files if str(f) not in planned])
    summary["merge_incomplete"] = [k for k in kinds if k not in merged] if stopped_in == "merge" else []
    for job in summary["jobs"]:
        job.update(engine.get(job["job"], {}))
        job["attempts"] = outcome.attempts.get(job["job"])
    return summary


def engine_times(outcome: Outcome) -> dict[str, dict[str, float]]:
    """Per job, the time it spent in the engine outside its replay (seconds):

    - ``dispatch_s``: from when it could start (submitted, its chain's previous job ended, its
      worker free of the job before and warm) to its start in the worker: scheduling, the
      arguments' transfer (the state carried in), a queue's hop;
    - ``in_worker_s``: in the worker but not replaying (building the run, restoring the
      state, writing its summary, renaming its outputs into place);
    - ``return_s``: from its end in the worker to the driver holding its result;
    - ``overhead_s``: the three together.

    Epoch clocks of the worker and the driver: exact on one host; across a Ray cluster's
    hosts the clocks' offset adds to ``dispatch_s`` and ``return_s``."""
    by_pid: dict[int, list[JobResult]] = {}
    for r in outcome.results:
        by_pid.setdefault(r.pid, []).append(r)
    previous_on_worker = {}
    for runs in by_pid.values():
        runs.sort(key=lambda r: r.started_at)
        for before, after in itertools.pairwise(runs):
            previous_on_worker[after.job_id] = before.ended_at
    ended = {r.job_id: r.ended_at for r in outcome.results}
    out = {}
    for r in outcome.results:
        if not (r.started_at and r.job_id in outcome.submitted_at and r.job_id in outcome.returned_at):
            continue
        chain, index = chain_index(r.job_id)
        before_in_chain = ended.get(f"{chain}/{index - 1:04d}", 0.0)
        free = max(outcome.submitted_at[r.job_id], before_in_chain, previous_on_worker.get(r.job_id, 0.0),
                   outcome.warm_at.get(r.pid, 0.0))
        times = {"dispatch_s": r.started_at - free, "in_worker_s": r.ended_at - r.started_at - r.run_s,
                 "return_s": outcome.returned_at[r.job_id] - r.ended_at}
        out[r.job_id] = {**times, "overhead_s": sum(times.values())}
    return out


class _Feeding(Progress):
    """The caller's progress, and each finished job handed to the streaming merge."""

    def __init__(self, inner: Progress, merger: StreamingMerge):
        self.inner, self.merger = inner, merger

    def start(self, jobs: int) -> None:
        self.inner.start(jobs)

    def job_done(self, result: JobResult) -> None:
        self.merger.add(result)
        self.inner.job_done(result)

    def chain_failed(self, chain: str, error: str, jobs_left: int) -> None:
        self.inner.chain_failed(chain, error, jobs_left)


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
           "calibrate_chain", "engine_times", "expand_inputs", "plan", "replay_job", "run_batch"]
