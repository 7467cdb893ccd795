"""The unit of work of a batch: one symbol over a run of consecutive files, state in and out.

:func:`replay_job` is pure in the sense that matters to an executor: its inputs are the
definition, the files, an output folder and the state of the file before (snapshot bytes);
it returns paths, accounting and the state after, never data. It installs no signal handler
and runs its own event loop (on a process's main thread, one kept from job to job:
:func:`_job_loop`), so it runs on any thread of any process (a process pool worker, a Ray
task). Its outputs are written under a temporary name beside ``out_dir`` and moved in
at the end, file by file, replacing what a previous attempt left: a retried job (a worker
killed mid-job) leaves one copy of its outputs, never two, and a job killed half-way leaves
only a temporary folder that the merge ignores.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import dataclasses
import os
import shutil
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from .. import config
from ..app import Run, replay_into, write_atomic
from .plan import needs_calibration, with_overrides

TMP_MARK = ".tmp-"
"""Temporary job folders are named ``.<job>.tmp-<pid>-<random>`` (the pid: who is writing)."""


@dataclass(frozen=True)
class JobResult:
    """What a job did: where its outputs are, every row of its files accounted for, the
    state to carry into the next file, and how long it took (seconds, in the worker)."""

    job_id: str
    files: tuple[str, ...]
    out_dir: str
    paths: dict[str, str]
    accounting: dict[str, dict[str, Any]]
    ticks: dict[str, int]
    outputs: dict[str, int]
    state: bytes = field(repr=False)
    wall_s: float = 0.0
    run_s: float = 0.0
    pid: int = 0
    symbols: tuple[str, ...] = ()
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    last_ts_ns: int | None = None  # the replay key of the last tick delivered (None: none)
    last_file: str | None = None  # the file it came from
    started_at: float = 0.0  # epoch seconds in the worker: the job taken up (executors.run_job)
    ended_at: float = 0.0  # epoch seconds in the worker: the result about to be returned
    phases: dict[str, float] = field(default_factory=dict)  # seconds outside the replay, by phase
    # (PHASES): what a job's ``in_worker_s`` is made of
    cpu_s: float = 0.0  # the worker process's CPU seconds over the job, all its threads
    cpu: int | None = None  # the CPU its worker is pinned to (executors.worker_cpus; None: not pinned)

    @property
    def last(self) -> tuple[str | None, int | None]:
        """(file, key) of the last tick: what the chain's next file must not start before."""
        return self.last_file, self.last_ts_ns


def replay_job(definition: config.PipelineDef | str | Path, files: Sequence[str | Path],
               out_dir: str | Path, state_in: bytes | None = None, *, job_id: str = "job",
               last: bool = True, overrides: dict[str, dict[str, Any]] | None = None,
               trace_every: int = 1, batch_size: int | None = None, format: str | None = None,
               symbol: str | None = None) -> JobResult:
    """Replay ``files`` (consecutive, one symbol) from ``state_in`` into ``out_dir``.

    ``last``: the chain ends here (the stream's end closes the open VPIN bar and marks the
    trace's last row); otherwise what is still open is carried in the returned state.
    ``overrides``: stage keys by stage name (the chain's ``bucket_volume``). A
    ``bucket_volume = "auto"`` they leave is worked out here, over ``files``, as one run over
    them does (read once, the replay served from what was read), and returned in the
    result's ``overrides``: what the executors do for a chain of one file, instead of a
    calibration task reading the file once more (:func:`~.plan.calibrates_in_job`).
    A file that cannot be read raises :class:`~nautilus_pipeline.errors.DataError` naming it.
    """
    if not files:
        raise ValueError(f"job {job_id}: replay_job needs at least one file")
    t0, cpu0 = time.perf_counter(), time.process_time()
    clock = _Phases()
    d = definition if isinstance(definition, config.PipelineDef) else config.load(definition)
    d = with_overrides(d, overrides or {})
    d = dataclasses.replace(d, outputs={**d.outputs, "formats": ["parquet"]})
    final = Path(out_dir)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}{TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        clock.mark("definition")
        run = Run(d, ticks=[str(f) for f in files], out_dir=tmp, trace_every=trace_every,
                  batch_size=batch_size, format=format, symbol=symbol, execution="serial")
        resolved = _resolved_overrides(d, run, overrides or {})
        clock.mark("build")
        with _job_loop() as loop:
            state, run_s, run_cpu = loop.run_until_complete(_execute(run, state_in, last))
            clock.skip(run_s)
            clock.mark("loop")
        last_ts = run.replay.progress.ts_reached_ns
        if run.sink.error is not None:
            raise OSError(f"job {job_id}: an output could not be written: {run.sink.error}")
        s = dataclasses.replace(run._summarise(run_s), cpu_s=run_cpu).as_dict()
        write_atomic(tmp / "summary.json", orjson.dumps(
            s, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY))
        clock.mark("summary")
        names = _publish(tmp, final)
        clock.mark("publish")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    del run  # its pipeline, pool and readers freed here, timed, not after the job's end stamp
    clock.mark("free")
    accounting = {f: s["accounting"]["sources"].get(f, {"read": 0, "delivered": 0, "rejected": 0,
                                                         "quarantined": 0, "by_reason": {}})
                  for f in (str(x) for x in files)}
    t = s["ticks"]
    return JobResult(
        job_id=job_id, files=tuple(str(f) for f in files), out_dir=str(final),
        paths={n.rsplit(".", 1)[0]: str(final / n) for n in names if n.endswith(".parquet")},
        accounting=accounting,
        ticks={k: int(t[k]) for k in ("read", "delivered", "rejected", "quarantined", "processed",
                                      "failed_in_stages", "failed_batches")},
        outputs=dict(s["outputs"]), state=state, wall_s=time.perf_counter() - t0, run_s=run_s,
        pid=os.getpid(), symbols=tuple(s["symbols"]), overrides=resolved,
        last_ts_ns=last_ts, last_file=None if last_ts is None else str(files[-1]),
        phases=clock.phases, cpu_s=time.process_time() - cpu0,
    )


def _resolved_overrides(d: config.PipelineDef, run: Run,
                        overrides: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """``overrides`` with the ``bucket_volume = "auto"`` the run worked out itself, in the
    shape :func:`~.plan.calibrate_chain` gives (stage name → {"bucket_volume": {symbol: V}})."""
    out = dict(overrides)
    for name in needs_calibration(d):
        stage = next(s for s in run.stages if s.name == name)
        out[name] = {"bucket_volume": {str(k): float(v) for k, v in stage.bucket_volume.items()}}
    return out


PHASES = ("setup", "definition", "build", "loop", "summary", "publish", "free")
"""A job's time outside its replay: ``setup`` (in :func:`~.executors.run_job`: the worker's
set-up, the chain's order check), ``definition`` (the overrides applied, the temporary
folder named), ``build`` (``Run``: sources opened, stages, pipeline, pool, sinks), ``loop``
(the event loop's hand-over, its first job's start, leftover tasks cancelled; the replay
itself, ``run_s``, is left out), ``summary`` (the run's summary made, its ``summary.json``
written; until 941e889 the summary was made on the loop and counted in ``loop``),
``publish`` (the renames into place), ``free`` (the run's objects released: its slabs,
readers; in a worker that no warm-up reached, after its first job, the collector's freeze:
:func:`~.executors._freeze_survivors`). ``run_s`` itself holds the pipeline's start and
stop."""


class _Phases:
    """Consecutive phase durations (seconds) from one ``perf_counter``: each ``mark`` ends a phase."""

    def __init__(self) -> None:
        self.phases: dict[str, float] = {}
        self._t = time.perf_counter()

    def mark(self, name: str) -> None:
        now = time.perf_counter()
        self.phases[name] = self.phases.get(name, 0.0) + now - self._t
        self._t = now

    def skip(self, seconds: float) -> None:
        """``seconds`` of the phase under way are not its own (the replay's)."""
        self._t += seconds


_kept_loop: asyncio.AbstractEventLoop | None = None
"""The main thread's event loop, kept from one job to the next (see :func:`_job_loop`)."""


@contextlib.contextmanager
def _job_loop() -> Iterator[asyncio.AbstractEventLoop]:
    """The event loop a job runs on: uvloop where installed, and, unlike ``asyncio.run`` in
    a main thread, with no SIGINT handler. On a process's main thread (a pool worker's, a
    Ray task's) one loop serves every job, instead of a loop made and closed per job (its
    ``new_event_loop``, ``shutdown_asyncgens`` and ``close``): the ``loop`` phase went from
    2.2 ms (median, the summary's making in it then) to 0.3 ms, the summary now 1.1 ms of its
    own (``docs/measurements/dev_bench_batch_ab_60ae7d0.txt``). A job leaves nothing on it (the pipeline's scope awaits or cancels every task it
    starts); what a failed job left is cancelled before the next one, so no job sees
    another's tasks. On any other thread a job gets its own loop and closes it, as a thread
    may end and a loop must not outlive it unclosed."""
    global _kept_loop
    if threading.current_thread() is not threading.main_thread():
        loop = _new_loop()
        try:
            yield loop
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()
        return
    if _kept_loop is None or _kept_loop.is_closed():
        _kept_loop = _new_loop()
        atexit.register(_close_kept_loop, _kept_loop)
    try:
        yield _kept_loop
    finally:
        _cancel_left_tasks(_kept_loop)


def _cancel_left_tasks(loop: asyncio.AbstractEventLoop) -> None:
    left = asyncio.all_tasks(loop)
    if not left:
        return
    for task in left:
        task.cancel()
    loop.run_until_complete(asyncio.gather(*left, return_exceptions=True))


def _close_kept_loop(loop: asyncio.AbstractEventLoop) -> None:
    if not loop.is_closed() and not loop.is_running():
        _cancel_left_tasks(loop)
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


def _new_loop() -> asyncio.AbstractEventLoop:
    from ..runtime import loop_factory

    factory = loop_factory(True)
    return factory() if factory is not None else asyncio.new_event_loop()


async def _execute(run: Run, state_in: bytes | None, last: bool) -> tuple[bytes, float, float]:
    """:meth:`Run.execute` with a restore after start and a snapshot after the drain;
    returns the snapshot, the replay's wall time (the pipeline's start and stop in it) and
    the process's CPU time over it (the summary's ``cpu_s``, as ``Run.execute`` measures it).
    The summary is made after the loop (``summary``, a phase of its own)."""
    from ..report.timeline import TIMELINE_FILE

    pipe, replay, sink, timeline = run.pipeline, run.replay, run.sink, run.timeline
    t0, cpu0 = time.perf_counter(), time.process_time()
    try:
        async with pipe:
            sink.attach(pipe.bus)
            if state_in is not None:
                pipe.restore(state_in)
            run.interrupted = await replay_into(pipe, replay)
            await pipe.drain()
            state = pipe.snapshot()
            if not last:
                pipe.end_segment()
        timeline.sample(pipe, replay.progress.ts_reached_ns)
        timeline.write(run.out_dir / TIMELINE_FILE)
    finally:
        sink.close()
    return state, time.perf_counter() - t0, time.process_time() - cpu0


def _publish(tmp: Path, final: Path) -> list[str]:
    """Move every file of ``tmp`` into ``final``, replacing, and remove what a previous
    attempt left there that this one did not write. Returns the names published."""
    final.mkdir(parents=True, exist_ok=True)
    names = sorted(p.name for p in tmp.iterdir() if p.is_file())
    for name in names:
        os.replace(tmp / name, final / name)
    for old in final.iterdir():
        if old.name not in names and old.is_file():
            with contextlib.suppress(OSError):
                old.unlink()
    return names


__all__ = ["PHASES", "JobResult", "replay_job"]
