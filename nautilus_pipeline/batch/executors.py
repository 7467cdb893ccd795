"""Executors: who runs the jobs of a batch. ``local``, a process pool; ``ray``, Ray tasks.

Both run chains side by side and the jobs of one chain in order, each job given the state the
one before returned; both retry a job whose worker died (the job's outputs are renamed into
place, so a retry replaces them, never adds a second copy), and neither retries a job that
failed on its data (the same file fails the same way again: the chain is reported failed and
the others go on).

``local``: a ``ProcessPoolExecutor`` of workers forked from a fork server (not from the
driver: a forked child of a process with threads, numba's and BLAS's included, can
deadlock; the fork server is a fresh process, none of the driver's threads in it, that
imported the package once, so a worker starts without importing it again), reused across jobs, so a worker pays
its numba cache loads once; the numba cache on disk is shared. A
worker that dies breaks the whole pool (``BrokenProcessPool`` for every job in it, and the pool
terminates its other workers): the pool is made again and the jobs that were in it are
resubmitted. Only the job that was running on the worker that died counts an attempt
(``max_retries`` each): each job marks its worker as busy with it (a file named by the pid
under ``<out>/.workers``, removed when it ends), and the dead worker is the one whose exit
code is not the pool's SIGTERM. A job that was queued, or running on a worker the pool
terminated, is resubmitted without counting. If no worker can be told apart (one killed by
a SIGTERM from outside), every job that was running counts one.
Workers ignore SIGINT, so a Ctrl-C reaches the driver only, which terminates the workers and
keeps what finished.

What a warm worker keeps from one job to the next, so that a job's time outside its replay
is its own (issue 10's ≤ 1 %): the event loop (:func:`.job._job_loop`), the parsed ``.npz``
model (keyed by the file's bytes), the inference stage's built model runners
(:mod:`~nautilus_pipeline.model.shelf`: a ``torch:cuda`` runner's CUDA graphs are captured
once a worker, in its warm-up, not once a job; what a runner keeps between calls is scratch
and padding that no output reads), each ``Params`` class's resolved fields, and its heap's
freed pages (:func:`_keep_freed_memory`); and once warm it freezes what outlives the jobs
(:func:`_freeze_survivors`). Ray's build was 4× a local one's: 24 vs 6 ms (median, quiet
round at 44fe592), 11.2-11.9 vs 4.7 ms at 941e889; after, 1.7-3.5 vs 1.8-2.3 ms (two A/Bs,
``docs/measurements/dev_bench_batch_ab_60ae7d0.txt`` and ``..._b6d25a6.txt``). Most of the
gap was full collections, which walked every long-lived object of the worker (the modules,
Ray's own in a Ray worker): with the caches alone Ray's median build was 8.3 ms, with the
freeze 2.4 (``dev_bench_batch_freeze_step_cc14291.txt``). What is left on Ray: each Ray
worker's second job builds in 11-49 ms (its others 1.5-5 ms; the Ray rows of both A/Bs),
which no local worker shows; not explained yet. Nothing else is kept: the stages, the pool and the
readers are built anew for every job from the job's own definition, so no job reads
another's state.

``ray``: one Ray task per job (``max_retries`` for failed workers), a chain's jobs linked by
object refs (a job's argument is the ref of the previous job's result, so Ray runs it when
that one is done, wherever it ran). ``address`` connects to a running cluster; without it a
local Ray starts for the batch (and stops after it).
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import gc
import multiprocessing
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import structlog

from ..config import PipelineDef
from ..errors import ConfigError, DataError
from .job import JobResult, replay_job
from .plan import Chain, JobSpec, calibrate_chain, calibrates_in_job, check_follows

log = structlog.get_logger("nautilus_pipeline.batch")


@dataclass(frozen=True)
class Work:
    """What every job of a batch shares."""

    definition: str | PipelineDef  # the driver's, parsed once (a copy travels with each job)
    out: str
    batch_size: int | None = None
    format: str | None = None
    symbol: str | None = None
    log_level: str = "warning"
    calibrate: bool = False
    threads: int = 1  # pyarrow threads per worker: the machine's cores / workers
    busy_dir: str | None = None  # where a local worker marks the job it runs (see the module doc)

    def job_dir(self, spec: JobSpec) -> str:
        safe = spec.chain.replace(os.sep, "_").replace("/", "_")
        name = Path(spec.files[0]).name.split(".")[0]
        return str(Path(self.out) / "jobs" / safe / f"{spec.index:04d}-{name}")


@dataclass
class Outcome:
    """What an executor did: results (as they come; :meth:`in_order` sorts them), failed
    chains (error text and whether it was the data), retries after dead workers, and whether
    it was interrupted. The caller may pass it in, so that what finished is known even if the
    executor is stopped half-way."""

    results: list[JobResult] = field(default_factory=list)
    failures: dict[str, str] = field(default_factory=dict)
    data_failures: set[str] = field(default_factory=set)
    retries: int = 0
    interrupted: bool = False
    startup_s: float = 0.0  # from prepare to the executor ready to take jobs (local: every
    # worker's imports done; ray: ray.init)
    warm_s: float | None = None  # from prepare to every worker warm (warm_up)
    warm_at: dict[int, float] = field(default_factory=dict)  # worker pid → warm at (epoch s)
    close_s: float = 0.0  # stopping the workers after the last job (ray: ray.shutdown)
    submitted_at: dict[str, float] = field(default_factory=dict)  # epoch s, in the driver
    returned_at: dict[str, float] = field(default_factory=dict)  # epoch s, in the driver
    attempts: dict[str, int] = field(default_factory=dict)  # job → runs it took (local)
    cluster: dict[str, Any] | None = None  # ray: the cluster the jobs ran on

    def in_order(self, chains: list[Chain]) -> None:
        """Results in chain order, a chain's jobs in their order."""
        rank = {c.key: i for i, c in enumerate(chains)}
        self.results.sort(key=lambda r: (rank.get(r.job_id.rsplit("/", 1)[0], len(rank)), r.job_id))

    def fail(self, chain: str, exc: BaseException | str) -> None:
        if chain in self.failures:
            return
        cause = getattr(exc, "cause", None) or exc
        self.failures[chain] = cause if isinstance(cause, str) else f"{type(cause).__name__}: {cause}"
        if isinstance(cause, DataError | ConfigError | FileNotFoundError) or (
                isinstance(cause, str) and " cannot be read" in cause):
            self.data_failures.add(chain)


class Progress:
    """Callbacks of a batch's progress; the CLI draws a bar with them."""

    def start(self, jobs: int) -> None: ...

    def job_done(self, result: JobResult) -> None: ...

    def chain_failed(self, chain: str, error: str, jobs_left: int) -> None: ...


# --- what runs in a worker ------------------------------------------------------------------
_CONFIGURED = False


def _worker_setup(log_level: str, threads: int) -> None:
    """Once per worker process: JSON logs on stderr, pyarrow's thread pool cut to this
    worker's share of the cores (by default each process would start one thread per core
    for its CSV parsing: N workers, N × cores threads), freed memory kept
    (:func:`_keep_freed_memory`), the model runner shelf on (:mod:`..model.shelf`) and a
    closed pool's slabs kept for the next job's (:func:`..memory.keep_slabs`)."""
    global _CONFIGURED
    if not _CONFIGURED:
        import pyarrow

        from ..memory import keep_slabs
        from ..model import shelf
        from ..runtime import configure_logging

        configure_logging("json", log_level)
        pyarrow.set_cpu_count(max(1, threads))
        _keep_freed_memory()
        shelf.enable()  # a job's model runners serve the next job of this worker
        keep_slabs()  # ... and its pool's slabs
        _CONFIGURED = True


KEEP_FREED_BYTES = 64 << 20
"""Free memory at the top of a worker's heap that glibc keeps instead of handing it back."""
MMAP_ABOVE_BYTES = 32 << 20
"""Allocations from this size on are mapped apart (and unmapped when freed), as glibc's own
dynamic threshold would end at."""


def _keep_freed_memory() -> None:
    """A worker replays job after job, each building a pipeline whose pool is 8 slabs of ~1 MB
    (the default definition) and freeing it at the end. glibc handed those pages back to the
    kernel (its trim threshold follows the largest block freed, 2 MB here), so each job
    faulted its pool in again, zeroed. A warm worker's job building its run: 7.31 -> 5.49 ms
    (median, 8 jobs x 8 processes per checkout, alternating; set-up per job in all 13.3 ->
    12.6 ms; loaded dev VM: docs/measurements/dev_bench_batch_job_setup_phases_c1a92cf.txt).
    Costs up to :data:`KEEP_FREED_BYTES` of resident memory a worker. glibc only (Linux);
    elsewhere nothing is changed."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc
        return
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's malloc.h
    mallopt(m_trim_threshold, KEEP_FREED_BYTES)
    mallopt(m_mmap_threshold, MMAP_ABOVE_BYTES)


def threads_per_worker(workers: int) -> int:
    return max(1, (os.cpu_count() or 1) // max(1, workers))


def _pool_init(log_level: str, threads: int, cpus: tuple[int, ...] = (), lock_dir: str = "") -> None:
    """Process pool workers leave SIGINT to the driver (it cancels and keeps what finished),
    and take a CPU of ``cpus`` when given (:func:`_pin_worker`)."""
    global _IN_WORKER
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _IN_WORKER = True
    if cpus:
        _pin_worker(cpus, lock_dir)
    _worker_setup(log_level, threads)


class CpuListError(ConfigError):
    """A ``--cpus`` that cannot be honoured (a command-line error: exit 2)."""


def worker_cpus(spec: str | Sequence[int] | None, workers: int) -> tuple[int, ...]:
    """The CPUs a local batch's workers are pinned to, one worker each (empty: none pinned).

    ``"none"`` (or None, the default) pins nothing: the scheduler places the workers, and a
    machine that other programs share keeps them movable. ``"auto"`` pins only when the
    workers are as many as the CPUs this process may use (more than one): a machine given to
    the batch. A list (``"0,2,4-7"`` or ints) pins to those, one a worker: for hosts whose
    hidden SMT siblings ``scripts/probe_cpu_pairs.py`` finds (the lent GPU hosts' ``lscpu``
    says one thread a core while vector kernels run ~2x slower 16 at once), or to keep CPUs
    free for something else.

    What it gave on the 2-core dev VM: two lone replays at once moved 1.24-1.33M ticks/s
    together pinned one a CPU against 1.16-1.19M unpinned (``bench_batch.py --control 1 2 1 2
    --control-pin 0,1``; ``docs/measurements/dev_control_pinned_0c12166.txt``), but a batch of
    2 workers only 6.32 -> 6.22 s (medians of 4 alternating, within their spread;
    ``docs/measurements/dev_bench_batch_pinned_ab_8111c25.txt``: the driver's streaming merge
    and the fork server are not pinned and share the cores), so it is not the default."""
    usable = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if spec is None or spec == "none":
        return ()
    if spec == "auto":
        return tuple(usable) if len(usable) > 1 and workers == len(usable) else ()
    cpus = parse_cpus(spec) if isinstance(spec, str) else tuple(int(c) for c in spec)
    if not usable:
        raise CpuListError("--cpus: this platform cannot pin a process to a CPU (no sched_setaffinity)")
    if bad := sorted(set(cpus) - set(usable)):
        raise CpuListError(f"--cpus: CPU(s) {bad} are not usable here (usable: {_ranges(usable)})")
    if len(set(cpus)) != len(cpus):
        raise CpuListError(f"--cpus: a CPU is named twice in {spec!r}")
    if len(cpus) < workers:
        raise CpuListError(f"--cpus names {len(cpus)} CPU(s) for {workers} workers: one a worker")
    return cpus


def parse_cpus(text: str) -> tuple[int, ...]:
    """``"0,2,4-7"`` → (0, 2, 4, 5, 6, 7); a clear error for anything else."""
    cpus: list[int] = []
    try:
        for part in text.split(","):
            lo, _, hi = part.strip().partition("-")
            first, last = int(lo), int(hi or lo)
            if last < first or first < 0:
                raise ValueError(part)
            cpus += range(first, last + 1)
    except ValueError:
        raise CpuListError(f"--cpus: expected CPUs like 0,2,4-7, auto or none, got {text!r}") from None
    return tuple(cpus)


def _ranges(cpus: Sequence[int]) -> str:
    return ",".join(map(str, cpus))


_CPU_LOCK: int | None = None
"""The open, locked file by which this worker holds its CPU (closed by its death)."""
_PINNED_CPU: int | None = None
"""That CPU."""


def _pin_worker(cpus: tuple[int, ...], lock_dir: str) -> None:
    """Take the first of ``cpus`` no other worker of the batch holds, and stay on it. The
    claim is an ``flock`` on ``lock_dir/cpu-N``, which the kernel drops when the worker dies,
    so the worker that replaces a dead one takes the CPU it left (a process a stage forks
    without exec would hold it on: none does). Every thread the worker has is moved there
    (``/proc/self/task``; a worker forked from the fork server has one, a spawned one has
    BLAS's too), and the threads it starts later inherit it. No CPU free (should not happen:
    one a worker) or the claim impossible: not pinned, logged with the reason."""
    global _CPU_LOCK, _PINNED_CPU
    if _CPU_LOCK is not None:
        return
    import fcntl

    reason = "every CPU of the list is held by another worker"
    for cpu in cpus:
        try:
            fd = os.open(os.path.join(lock_dir, f"cpu-{cpu}"), os.O_CREAT | os.O_RDWR, 0o600)
        except OSError as exc:
            reason = f"its lock file cannot be made: {exc}"
            break
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            continue
        before = os.sched_getaffinity(0)
        try:
            _set_affinity_of_every_thread({cpu})
        except OSError as exc:
            with contextlib.suppress(OSError):  # as it was: not half pinned to a CPU it does not hold
                _set_affinity_of_every_thread(before)
            os.close(fd)
            reason = f"sched_setaffinity failed: {exc}"
            break
        _CPU_LOCK, _PINNED_CPU = fd, cpu
        return
    log.warning("batch_worker_not_pinned", cpus=list(cpus), reason=reason)


def _set_affinity_of_every_thread(cpus: set[int]) -> None:
    """``sched_setaffinity`` moves one thread: this one, then each other thread of the process."""
    os.sched_setaffinity(0, cpus)
    try:
        tids = [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:  # no /proc: only this thread (and the threads it starts) can be moved
        return
    for tid in tids:
        with contextlib.suppress(ProcessLookupError):  # a thread that ended meanwhile
            os.sched_setaffinity(tid, cpus)


def run_job(work: Work, spec: JobSpec, overrides: dict[str, Any], trace_every: int,
            state: bytes | None, last: tuple[str | None, int | None] | None = None) -> JobResult:
    """One job in a worker. ``last``: (file, key) of the chain's last tick so far; a file
    that starts before it is refused (:func:`~.plan.check_follows`), and a job that delivers
    no tick passes it on. ``started_at``/``ended_at`` (epoch s) are stamped here, so that
    the time a job spends in the engine outside its replay is measured per job."""
    started = time.time()
    with _busy(work, spec.job_id):
        _worker_setup(work.log_level, work.threads)
        check_follows(last, spec)
        setup = time.time() - started
        res = replay_job(work.definition, spec.files, work.job_dir(spec), state, job_id=spec.job_id,
                         last=spec.last, overrides=overrides, trace_every=trace_every,
                         batch_size=work.batch_size, format=work.format, symbol=work.symbol)
        if _IN_WORKER and not _FROZEN:  # a worker that was not warmed up: after its first job instead
            # (still marked busy: a worker that dies in this collection dies running the job)
            t = time.perf_counter()
            _freeze_survivors()
            res = replace(res, phases={**res.phases, "free": res.phases.get("free", 0.0) + time.perf_counter() - t})
    if res.last_ts_ns is None and last is not None:
        res = replace(res, last_file=last[0], last_ts_ns=last[1])
    return replace(res, started_at=started, ended_at=time.time(), phases={"setup": setup, **res.phases},
                   cpu=_PINNED_CPU)


WARM_SAMPLE = Path(__file__).resolve().parents[1] / "data" / "binance-um-btcusdt-trades-20240808.csv"
"""The bundled 21K-trade file a worker replays once, through the batch's definition, to warm up."""


def warm_up(log_level: str, threads: int,
            definition: str | PipelineDef | None = None) -> tuple[int, float, float]:
    """A worker's start, done while the driver plans the batch: the imports a job needs and,
    given the batch's ``definition``, one replay of :data:`WARM_SAMPLE` through it, which
    loads the numba kernels and the model (0.42 s of a worker's first job otherwise, against
    0.05-0.09 s for the same replay warm: measured on the loaded dev VM), so that a job's time
    is its replay's. Best effort: a definition the sample does not fit (a book pipeline, a
    ``--format``) warms the imports only. Returns the worker's pid, when its imports were
    done and when it was warm (epoch s).

    Tried: for a definition on a usable ``torch:cuda`` stream, torch imported here and the
    rest left to the first job, whose run warms CUDA and the kernels beside its read
    (:mod:`..compute.warmup`). On a lent H100's 16-core host, 16 workers, 16 files of 12M
    trades: the first job 4.8 s sooner, its build 2.9 s and its replay 0.9 s longer, 10.48M
    -> 10.75M ticks/s in one round: the work moved into the jobs rather than beside their
    read (16 workers, 16 cores), so it was not kept
    (``docs/measurements/gpu_batch_big12m_warm_in_read_trial_h100.txt``)."""
    _worker_setup(log_level, threads)
    from .. import app, stages  # noqa: F401
    from ..io import Replay  # noqa: F401

    imported = time.time()
    if definition is not None:
        with tempfile.TemporaryDirectory(prefix="nautilus-warm-") as tmp:
            try:
                replay_job(definition, [WARM_SAMPLE], Path(tmp) / "warm", None, trace_every=1)
            except Exception as exc:  # the jobs will say what is wrong, if anything is
                log.debug("batch_warm_up_replay_skipped", error=f"{type(exc).__name__}: {exc}")
    _freeze_survivors()
    return os.getpid(), imported, time.time()


_FROZEN = False
_IN_WORKER = False  # a pool worker or a Ray worker: set by _pool_init and _ray_job


def _freeze_survivors() -> None:
    """Once per worker, when it is warm: collect, then move every object alive (the
    modules, numba's dispatchers, pyarrow's and Ray's own) into the collector's permanent
    generation (``gc.freeze``), which no later collection walks. Those objects live as long
    as the worker anyway; the jobs' own are collected as before. Each full collection in a
    warm pool worker walked them all (133K objects): 47-90 ms, about every other job of 1M
    trades (in its build, 13-46 ms of a worker's first jobs, and in its replay), against
    2-8 ms frozen (``scripts/profile_batch_job.py --warm-jobs 8 [--no-freeze]``, dev VM:
    ``docs/measurements/dev_profile_batch_job_gc_b6d25a6.txt``). Where no warm-up ran (a Ray worker that took none), it is
    done after the worker's first job; never in a process that is no worker (a job run
    in-process by a test keeps the collector as it was)."""
    global _FROZEN
    if not _FROZEN:
        gc.collect()
        gc.freeze()
        _FROZEN = True


def run_calibration(work: Work, chain: Chain) -> dict[str, Any]:
    with _busy(work, _calibration_key(chain)):
        _worker_setup(work.log_level, work.threads)
        return calibrate_chain(work.definition, [f.path for f in chain.files], chain.symbol,
                               format=work.format)


def _calibration_key(chain: Chain) -> str:
    return f"{chain.key}/calibration"


@contextlib.contextmanager
def _busy(work: Work, key: str) -> Iterator[None]:
    """Mark this worker busy with ``key`` while it runs (the driver reads the mark when a
    worker dies, to count the attempt of the job that died with it, and only that one)."""
    if work.busy_dir is None:
        yield
        return
    mark = Path(work.busy_dir) / str(os.getpid())
    mark.parent.mkdir(parents=True, exist_ok=True)
    mark.write_text(key)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            mark.unlink()


def _died_with(processes: dict[int, Any], busy_dir: Path) -> set[str]:
    """Keys of the jobs that were running on the workers that died (``processes``: the
    broken pool's, all joined). The pool ends its other workers with SIGTERM; a worker with
    another exit code is one that died. Every mark is removed (those workers are gone)."""
    running = {}
    for pid in processes:
        mark = busy_dir / str(pid)
        with contextlib.suppress(OSError):
            running[pid] = mark.read_text()
            mark.unlink()
    dead = [pid for pid, proc in processes.items() if proc.exitcode not in (0, -signal.SIGTERM, None)]
    if not dead:  # no worker tells itself apart: every job that was running counts
        return set(running.values())
    return {running[pid] for pid in dead if pid in running}


def _ray_job(work: Work, spec: JobSpec, overrides: dict[str, Any], trace_every: int,
             previous: JobResult | None) -> JobResult:
    global _IN_WORKER
    _IN_WORKER = True
    if previous is None:
        return run_job(work, spec, overrides, trace_every, None)
    return run_job(work, spec, overrides, trace_every, previous.state, previous.last)


# --- local ------------------------------------------------------------------------------------
POOL_BREAKS_IN_A_ROW = 3
"""A local pool broken this many times in a row with no job known to have died on it (workers
that die starting, or between jobs) fails the chains left, instead of being made again and
again: no attempt is counted for such a break, so ``max_retries`` would never stop it."""

@dataclass
class _Task:
    chain: Chain
    index: int  # -1: the chain's calibration
    state: bytes | None = None
    attempt: int = 0
    last: tuple[str | None, int | None] | None = None  # the chain's last tick so far


class LocalExecutor:
    """Jobs on a pool of ``workers`` processes (default: the machine's cores)."""

    name = "local"

    def __init__(self, workers: int | None = None, *, max_retries: int = 2,
                 cpus: str | Sequence[int] | None = None):
        self.workers = workers or os.cpu_count() or 1
        self.max_retries = max_retries
        self.cpus = worker_cpus(cpus, self.workers)  # one a worker, or () (:func:`worker_cpus`)
        self._cpu_locks = ""  # the folder of the CPUs' lock files, made with a pool (_pool)
        self._ready: cf.ProcessPoolExecutor | None = None
        self._starting: threading.Thread | None = None
        self._warm: list[cf.Future] = []
        self._t_prepare = 0.0

    def prepare(self, log_level: str, definition: str | PipelineDef | None = None) -> None:
        """Start the workers now (the fork server's imports take seconds) and warm them up
        with ``definition`` (:func:`warm_up`), while the batch is planned."""
        threads = self.threads()
        self._t_prepare = time.time()
        pool = self._ready = self._pool(Work("", "", log_level=log_level, threads=threads))
        self._warm = []

        def start() -> None:
            # a submit starts a worker, which waits for the fork server's imports: in a thread,
            # so that the driver plans meanwhile
            for _ in range(self.workers):
                try:
                    self._warm.append(pool.submit(warm_up, log_level, threads, definition))
                except cf.process.BrokenProcessPool:
                    return  # a worker died starting: the batch's run finds the pool broken

        self._starting = threading.Thread(target=start, name="pool-start", daemon=True)
        self._starting.start()

    def _join_start(self) -> None:
        starting, self._starting = self._starting, None
        if starting is not None:
            starting.join()

    def _pool(self, work: Work) -> cf.ProcessPoolExecutor:
        if self.cpus and not self._cpu_locks:  # first pool, or a run after the last one's end
            self._cpu_locks = tempfile.mkdtemp(prefix="nautilus-pipeline-cpus-")
        return cf.ProcessPoolExecutor(max_workers=self.workers, mp_context=_worker_context(),
                                      initializer=_pool_init,
                                      initargs=(work.log_level, work.threads, self.cpus, self._cpu_locks))

    def close(self) -> None:
        """Stop workers started by :meth:`prepare` that no batch used."""
        self._join_start()
        if self._ready is not None:
            self._ready.shutdown(wait=False, cancel_futures=True)
            self._ready = None
        self._remove_cpu_locks()

    def threads(self) -> int:
        """pyarrow threads a worker: its share of the cores, one when pinned to a CPU."""
        return 1 if self.cpus else threads_per_worker(self.workers)

    def _remove_cpu_locks(self) -> None:
        if self._cpu_locks:
            shutil.rmtree(self._cpu_locks, ignore_errors=True)
            self._cpu_locks = ""

    def run(self, work: Work, chains: list[Chain], progress: Progress, out: Outcome | None = None) -> Outcome:
        out = Outcome() if out is None else out
        busy_dir = Path(work.out) / ".workers"
        work = replace(work, busy_dir=str(busy_dir))
        self._join_start()
        pool, self._ready = self._ready or self._pool(work), None
        warm, self._warm = self._warm, []
        pending: dict[cf.Future, _Task] = {}

        def submit(task: _Task) -> None:
            chain = task.chain
            try:
                if task.index < 0:
                    fut = pool.submit(run_calibration, work, chain)
                else:
                    spec = chain.jobs()[task.index]
                    out.submitted_at[spec.job_id] = time.time()
                    fut = pool.submit(run_job, work, spec, chain.overrides, chain.trace_every, task.state,
                                      task.last)
            except cf.process.BrokenProcessPool as exc:
                # a worker died since the results in hand came back: the task joins those
                # that died with the pool, resubmitted to the next one below
                fut = cf.Future()
                fut.set_exception(exc)
            pending[fut] = task

        def fail(chain: Chain, exc: BaseException | str, index: int) -> None:
            out.fail(chain.key, exc)
            progress.chain_failed(chain.key, out.failures[chain.key], len(chain.files) - max(index, 0))

        idle_breaks = 0  # pools broken in a row with no job known to be running on a dead worker
        try:
            for chain in chains:
                if chain.error is not None:
                    fail(chain, DataError(chain.error), 0)
                else:
                    submit(_Task(chain, -1 if work.calibrate and not calibrates_in_job(chain) else 0))
            while pending:
                done, _ = cf.wait(pending, return_when=cf.FIRST_COMPLETED)
                broken: list[_Task] = []
                for fut in done:
                    task = pending.pop(fut)
                    chain = task.chain
                    try:
                        value = fut.result()
                    except cf.process.BrokenProcessPool:
                        broken.append(task)
                        continue
                    except Exception as exc:
                        fail(chain, exc, task.index)
                        continue
                    idle_breaks = 0
                    if task.index < 0:
                        chain.overrides = value
                        submit(_Task(chain, 0))
                        continue
                    if task.index == 0 and work.calibrate and calibrates_in_job(chain):
                        chain.overrides = value.overrides  # what the job worked out
                    out.returned_at[value.job_id] = time.time()
                    out.attempts[value.job_id] = task.attempt + 1
                    out.results.append(value)
                    progress.job_done(value)
                    if task.index + 1 < len(chain.files):
                        submit(_Task(chain, task.index + 1, value.state, last=value.last))
                if broken:
                    # A worker died: every task in the pool failed with it. Make the pool again
                    # and resubmit them (their outputs are replaced on rename, never doubled);
                    # only the job(s) that died count an attempt.
                    again = broken + list(pending.values())
                    pending.clear()
                    processes = dict(getattr(pool, "_processes", None) or {})
                    pool.shutdown(wait=True, cancel_futures=True)
                    died = _died_with(processes, busy_dir)
                    idle_breaks = 0 if died else idle_breaks + 1
                    if idle_breaks >= POOL_BREAKS_IN_A_ROW:
                        # workers that die before any job starts (an import or start-up that
                        # fails, memory): no attempt is counted, so stop here, not loop on it
                        log.error("batch_pool_keeps_breaking", executor=self.name, times=idle_breaks)
                        for task in again:
                            fail(task.chain, f"the worker pool broke {idle_breaks} times in a row with no job "
                                 "running (workers that cannot start: see their log)", task.index)
                        continue
                    pool = self._pool(work)
                    log.warning("batch_worker_died", executor=self.name, died=sorted(died),
                                resubmitted=len(again))
                    for task in again:
                        if _key(task) not in died:
                            submit(task)
                        elif task.attempt >= self.max_retries:
                            fail(task.chain, f"a worker died running it {task.attempt + 1} times "
                                 f"(files from {task.chain.files[max(task.index, 0)].path})", task.index)
                        else:
                            out.retries += 1
                            submit(replace(task, attempt=task.attempt + 1))
        except KeyboardInterrupt:
            out.interrupted = True
            _terminate(pool)
        finally:
            t_close = time.time()
            pool.shutdown(wait=True, cancel_futures=True)
            out.close_s = time.time() - t_close
            shutil.rmtree(busy_dir, ignore_errors=True)
            self._remove_cpu_locks()
            done = [f.result() for f in warm if f.done() and not f.cancelled() and f.exception() is None]
            if warm and len(done) == len(warm):  # the pool's start: fork server, imports, every worker
                out.startup_s = max(imported for _, imported, _ in done) - self._t_prepare
                out.warm_s = max(at for _, _, at in done) - self._t_prepare
                out.warm_at.update({pid: at for pid, _, at in done})
        out.in_order(chains)
        return out


PRELOAD = ["nautilus_pipeline.batch.executors", "nautilus_pipeline.app", "nautilus_pipeline.stages",
           "nautilus_pipeline.io"]
"""What the fork server imports once, so that each worker forked from it starts with it.
(pandas was preloaded too while pyarrow imported it at a reader's first ``fill_null``; the
readers no longer ask pyarrow for it: :mod:`nautilus_pipeline.io.arrow_numpy`.)
Imports only: the threads they leave (BLAS's, pyarrow's allocator) handle a fork. Numba's
kernels are loaded by each worker's :func:`warm_up`, in parallel, while the driver plans (a
warm-up replay in the server, tried, cost a serial 1.5-2 s at start-up for ~0.3 s saved per
worker in parallel, and left pyarrow's thread pools and an io_uring thread running in the
process that forks). Nor is torch, for a definition with a torch stage: tried at 75c957c
(a torch:cpu inference stage, 2 files, ``--workers 2``, alternating,
``docs/measurements/dev_batch_preload_torch_ab_75c957c.txt``), the server's serial import
made the workers ready 0.6-0.8 s later than two workers importing it side by side. On a
lent H100's 16-core host, where 16 workers import it side by side in 4.1-4.5 s against
2.65 alone (``scripts/profile_worker_warm.py``,
``docs/measurements/gpu_worker_warm_c7374f3_h100.txt``), the server importing it for
``pipelines/gpu.toml --workers 16`` at 055580f did not pay either: its start 1.4 -> 4.0-5.6 s,
the workers warm no sooner, 8.62/8.06M ticks/s against 8.19/8.75M without
(``docs/measurements/gpu_batch_big12m_torch_preload_ab_055580f_h100.txt``)."""


_server_env: dict[str, str] | None = None
"""The environment the fork server started with (one per process, on first use)."""


def _worker_context() -> Any:
    """Workers forked from a fork server (a fresh process, with no thread of the driver's,
    that imported :data:`PRELOAD` once): N workers start in milliseconds instead of N
    interpreters importing numpy, pyarrow and numba side by side. ``spawn`` where there is
    no fork server (Windows), and where the one there is would give the
    workers another environment than the driver's now: the server lives as long as the
    driver and its workers inherit *its* environment, so a variable set or changed after
    the first batch (``NAUTILUS_PIPELINE_CACHE``, ``NUMBA_*``, BLAS threads, a test's
    ``monkeypatch.setenv``) would not reach them. Python's fork server is one per process:
    an application that uses its own gets this preload in it too.

    ``spawn`` too where the current folder holds another ``nautilus_pipeline`` than the
    one imported (a source checkout of another version): the fork server starts as
    ``python -c``, which puts the folder it runs in first on its sys.path (Python 3.11
    passes it the driver's sys.path and ignores it), so its workers imported that
    checkout's package and ran its jobs with the driver none the wiser (seen: an A/B of
    two checkouts started from one of them ran that one's workers in both columns).
    ``spawn`` gives each worker the driver's sys.path."""
    global _server_env
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    if _cwd_shadows_package():
        log.info("batch_workers_spawned", why=f"{Path.cwd()} holds another nautilus_pipeline than {_PACKAGE}")
        return multiprocessing.get_context("spawn")
    if _server_env is not None and _server_env != dict(os.environ):
        log.info("batch_workers_spawned", why="the environment changed since the fork server started")
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    if _server_env is None:
        _server_env = dict(os.environ)
    return ctx


_PACKAGE = Path(__file__).resolve().parents[1]
"""The folder of the ``nautilus_pipeline`` package the driver imported."""


def _cwd_shadows_package() -> bool:
    """Whether ``python -c`` started here would import another ``nautilus_pipeline``."""
    there = Path.cwd() / _PACKAGE.name
    try:
        return (there / "__init__.py").is_file() and there.resolve() != _PACKAGE
    except OSError:
        return False


def _key(task: _Task) -> str:
    return _calibration_key(task.chain) if task.index < 0 else task.chain.jobs()[task.index].job_id


def _terminate(pool: cf.ProcessPoolExecutor) -> None:
    """Stop the workers now (a Ctrl-C): jobs under way are dropped, their temporary folders
    ignored by the merge."""
    processes = dict(getattr(pool, "_processes", None) or {})
    pool.shutdown(wait=False, cancel_futures=True)
    for proc in processes.values():
        if proc.is_alive():
            proc.terminate()
    for proc in processes.values():
        proc.join(5)


# --- ray ------------------------------------------------------------------------------------
WARM_WAIT_S = 60.0
"""How long a Ray batch waits for its workers' warm-up tasks before it goes on without them."""


class RayExecutor:
    """Jobs as Ray tasks, on ``address``'s cluster or on a local Ray of ``workers`` CPUs."""

    name = "ray"

    def __init__(self, workers: int | None = None, *, address: str | None = None, max_retries: int = 3):
        self.workers = workers
        self.address = address
        self.max_retries = max_retries
        self._started = False
        self._starting: threading.Thread | None = None
        self._start_error: BaseException | None = None
        self._times: dict[str, float] = {}
        self._warm: list[Any] = []

    def prepare(self, log_level: str, definition: str | PipelineDef | None = None) -> None:
        """Start Ray (import, ``ray.init``) and one warm-up task per worker (:func:`warm_up`)
        in a thread now, while the driver plans the batch: seconds that no longer add up."""
        self._times = {"prepare": time.time()}
        self._start_error = None
        self._ready_event, self._hold = threading.Event(), threading.Event()

        def start() -> None:
            try:
                self._init()
                import ray

                self._times["init"] = time.time()
                task = ray.remote(num_cpus=1)(warm_up)
                cpus = int(ray.cluster_resources().get("CPU", 1))
                threads = threads_per_worker(self.workers or cpus)
                # one per worker the batch will use, not per CPU of a shared cluster
                self._warm = [task.remote(log_level, threads, definition)
                              for _ in range(min(cpus, self.workers or cpus))]
            except BaseException as exc:  # raised again in run()
                self._start_error = exc
            finally:
                self._ready_event.set()
            # A local Ray's processes die with the thread that started them (Linux's parent
            # death signal is per thread): this one lives until close().
            self._hold.wait()

        self._starting = threading.Thread(target=start, name="ray-start", daemon=True)
        self._starting.start()

    def close(self) -> None:
        """Stop the Ray this executor started, if any (also when stopped half-way through
        ``ray.init``)."""
        if self._starting is not None:
            self._ready_event.wait()  # ray.init is not stopped half-way
        ray = sys.modules.get("ray")
        if self._started and ray is not None and ray.is_initialized():
            ray.shutdown()
        self._started = False
        self._warm = []
        if self._starting is not None:
            self._hold.set()
            self._starting.join()
            self._starting = None

    def _init(self) -> bool:
        try:
            import ray
        except ImportError:
            raise ConfigError("--executor ray needs Ray: pip install 'nautilus-pipeline[cluster]'") from None
        if ray.is_initialized():
            return False
        self._started = True
        kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False,
                                  "configure_logging": False}
        if self.address:  # the cluster's workers must have nautilus_pipeline installed
            _connect(ray, self.address, kwargs)
        else:
            # A local Ray's workers inherit this process's environment (PYTHONPATH included);
            # a runtime_env with env_vars would do the same, and starts a runtime-env agent
            # that made ray.init seconds slower on the dev VM.
            # Nothing more is turned off: usage stats (RAY_USAGE_STATS_ENABLED=0), metrics
            # (enable_metrics_collection) and task events (task_events_report_interval_ms=0),
            # alone or together, left Ray's own processes at 1.6-2.4 CPU-s a batch
            # (`bench_batch.py --ray-options`, loaded VM:
            # docs/measurements/dev_bench_batch_ray_options_700a752.txt): in that run three had
            # medians below every default round (1.70-1.85 against 1.98-2.38), but inside the
            # others' rounds (task events off 1.64-2.35), and in a run ten minutes before all
            # were level (1.79-1.89 against 1.81), so none is kept. That CPU is the start-up of
            # the processes ray.init always starts (the minimal dashboard, its agent, the
            # runtime-env agent, the log and autoscaler monitors); ray.init has no option to
            # leave them out.
            ray.init(num_cpus=self.workers or os.cpu_count(), **kwargs)
        return True

    def run(self, work: Work, chains: list[Chain], progress: Progress, out: Outcome | None = None) -> Outcome:
        out = Outcome() if out is None else out
        try:
            if self._starting is None:  # not prepared: start now
                self._started = False
                self.prepare(work.log_level, work.definition)
            self._ready_event.wait()
            if self._start_error is not None:
                raise self._start_error
            import ray

            t_prepare = self._times["prepare"]
            out.startup_s = self._times["init"] - t_prepare
            warm, self._warm = self._warm, []
            # The jobs queue behind the warm-ups in any case: waiting is only to time them, so
            # a busy cluster that cannot run them soon is said, not sat out in silence.
            if warm:
                ready, pending = ray.wait(warm, num_returns=len(warm), timeout=WARM_WAIT_S)
                for ref in ready:  # a warm-up that failed (a worker lost) costs its timing only
                    try:
                        pid, _, at = ray.get(ref)
                    except Exception as exc:
                        log.warning("ray_warm_up_failed", error=f"{type(exc).__name__}: {exc}"[:300])
                        continue
                    out.warm_at[pid] = at
                if pending:
                    log.warning("ray_workers_not_warm", pending=len(pending), of=len(warm), waited_s=WARM_WAIT_S)
                elif out.warm_at:  # (every warm-up failed: no time to give)
                    out.warm_s = max(out.warm_at.values()) - t_prepare
            out.cluster = {"gcs_address": ray.get_runtime_context().gcs_address,
                           "nodes": len(ray.nodes()), "cpus": ray.cluster_resources().get("CPU"),
                           "started_here": self.address is None}
            return self._run(ray, work, chains, progress, out)
        finally:
            t_close = time.time()
            self.close()
            out.close_s = time.time() - t_close

    def _run(self, ray: Any, work: Work, chains: list[Chain], progress: Progress, out: Outcome) -> Outcome:
        job = ray.remote(num_cpus=1, max_retries=self.max_retries)(_ray_job)
        calibrate = ray.remote(num_cpus=1, max_retries=self.max_retries)(run_calibration)
        refs: dict[Any, tuple[Chain, JobSpec]] = {}
        for chain in chains:
            if chain.error is not None:
                out.fail(chain.key, DataError(chain.error))
                progress.chain_failed(chain.key, out.failures[chain.key], len(chain.files))
                continue
            overrides: Any = (calibrate.remote(work, chain) if work.calibrate and not calibrates_in_job(chain)
                              else chain.overrides)
            previous = None
            for spec in chain.jobs():
                out.submitted_at[spec.job_id] = time.time()
                previous = job.remote(work, spec, overrides, chain.trace_every, previous)
                refs[previous] = (chain, spec)
        pending = list(refs)
        try:
            while pending:
                ready, pending = ray.wait(pending, num_returns=1)
                for ref in ready:
                    chain, spec = refs[ref]
                    try:
                        res = ray.get(ref)
                    except Exception as exc:
                        if chain.key not in out.failures:
                            out.fail(chain.key, exc)
                            progress.chain_failed(chain.key, out.failures[chain.key],
                                                  len(chain.files) - spec.index)
                        continue
                    out.returned_at[res.job_id] = time.time()
                    out.results.append(res)
                    progress.job_done(res)
        except KeyboardInterrupt:
            out.interrupted = True
            for ref in pending:
                ray.cancel(ref, force=True)
        out.in_order(chains)
        first: dict[str, JobResult] = {}
        for res in out.results:
            first.setdefault(res.job_id.rsplit("/", 1)[0], res)
        for chain in chains:
            if work.calibrate and chain.key not in out.failures and chain.key in first:
                chain.overrides = first[chain.key].overrides
        return out


class ClusterError(ConfigError):
    """``--ray-address`` names no Ray cluster that this driver may use (none answers, or it
    refuses the driver's token)."""


TOKEN_HELP = ("a cluster started with token authentication (RAY_AUTH_MODE=token) needs the same "
              "RAY_AUTH_MODE=token and its token in this driver's environment: RAY_AUTH_TOKEN, "
              "RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token")


def _connect(ray: Any, address: str, kwargs: dict[str, Any]) -> None:
    """``ray.init(address=...)``, its failures said in one line that names the address."""
    try:
        ray.init(address=address, **kwargs)
    except ray.exceptions.AuthenticationError as exc:
        raise ClusterError(f"--ray-address {address}: the cluster needs a token and this driver "
                           f"has none ({str(exc).split('. ')[0]}); {TOKEN_HELP}") from None
    except ConnectionError as exc:
        raise ClusterError(f"--ray-address {address}: no Ray cluster this driver can use answered "
                           f"({exc}); {TOKEN_HELP}") from None


EXECUTORS: dict[str, Callable[..., Any]] = {"local": LocalExecutor, "ray": RayExecutor}
