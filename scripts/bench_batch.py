"""Batch replays: one process over every file vs ``batch`` on N local workers vs Ray (issue 10).

Generates ``--symbols`` × ``--days`` files of ``--trades`` trades each (Binance USD-M trades
layout, a random walk per symbol), then, one after the other on this machine:

- ``sequential``: one process replays each symbol's files in turn (``nt.Run`` per symbol over
  its files), the baseline a user has without ``batch``;
- ``local N``: ``run_batch(..., executor="local", workers=N)`` for each N of ``--workers``;
- ``ray N``: the same on a local Ray of N CPUs (``--executors local,ray`` for every N, or
  ``--ray`` for the largest only; needs the ``cluster`` extra, the local rows do not).

E.g. ``python scripts/bench_batch.py --trades 1000000 --workers 1,2 --ray`` (dev VM) or
``--symbols 16 --days 2 --trades 600000 --workers 1,2,4,8,16 --executors local`` (16 cores).

Printed per row: ticks/s over the wall time (planning, calibration, jobs and merge
included), the speedup over one local worker and its efficiency (speedup / N; the target is
≥ 0.8 up to the core count), and the engine's cost in two parts, never lumped:

- per job (the target: ≤ 1 % of job time for jobs ≥ 1 s): the time each job spends in the
  engine outside its replay, measured per job from stamps in the worker and the driver
  (``summary.json``'s ``dispatch_s + in_worker_s + return_s``, see ``batch.engine_times``);
  median over the jobs, in ms and as a share of the median job (its replay, ``run_s``);
- per batch (fixed): the time to the first job's start (start-up and planning not hidden),
  what is left after the last job's result (the merge's tail, the summary), and the rest
  of the slots' idle time (``wall × P − Σ replay − Σ per-job − P × (first + last)`` with
  P = min(N, symbols): chains of unequal length, waits), summed over the slots.

Start-up is its own column: the local pool's fork server and imports, or Ray's import and
``ray.init`` (target ≤ 5 s), then when every worker is warm (kernels loaded by a warm-up
replay); both begun while the batch is planned. Every configuration's merged outputs are
checked equal to the first one's.

Below the table: a job's time in the worker outside its replay by phase (``JobResult.phases``:
building the run, the loop, the summary, the renames, ...), and the CPU seconds of every
process of the batch (the workers, in and out of their jobs; the driver; the pool's fork
server or Ray's own processes; the machine's, and so what no process of the batch used:
other users' load on a shared VM).

Alone, not a batch: ``--worker-setup JOBS`` (a warm worker's time outside its replay, in
this process vs a Ray task, alternating), ``--ray-floor JOBS`` (Ray's own dispatch and
return for trivial tasks, with and without busy cores), ``--ray-options ROUNDS``
(Ray's own processes' CPU under each ``ray.init`` option that could drop some), ``--merge-read OUT`` (a finished
batch's parts read the streaming merge's old way and its new), ``--control N...`` (N
independent processes at once: how the machine itself scales).

``--baseline DIR`` (another checkout, e.g. ``git worktree`` or ``git archive`` of the
commit before) runs every batch row of that checkout and of this one alternately,
``--repeat`` times each, and prints their walls side by side (medians, ratio): the A/B a
loaded machine needs.

Uses the default pipeline with its model on the CPU stream (``streams = ["cpu"]``), so the
numbers measure processes, not a GPU shared by all workers.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from nautilus_pipeline.config import find_definition  # noqa: E402


def generate(folder: Path, symbols: int, days: int, trades: int, seed: int = 1) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    rng = np.random.default_rng(seed)
    for s in range(symbols):
        sym = f"SYM{s:02d}USDT"
        t0 = 1_722_470_400_000
        price0 = 100.0 * (1 + s)
        for d in range(days):
            ts = t0 + d * 86_400_000 + np.sort(rng.integers(0, 86_400_000, trades))
            price = price0 * np.exp(np.cumsum(rng.normal(0, 2e-4, trades)))
            price0 = float(price[-1])
            # rounded last: Binance's files hold lot-sized decimals (0.306), never the float
            # noise of a sum (1.0659999999999998), which sent every block to pyarrow's parse
            # instead of the numba parser real files take (io/binance_fast.py)
            qty = np.round(rng.exponential(0.5, trades) + 0.001, 3)
            table = pa.table({
                "id": np.arange(d * trades, (d + 1) * trades, dtype=np.int64),
                "price": np.round(price, 4), "qty": qty, "quote_qty": np.round(price * qty, 4),
                "time": ts.astype(np.int64), "is_buyer_maker": rng.random(trades) < 0.5,
            })
            p = folder / f"{sym}-trades-2024-08-{d + 1:02d}.csv"
            pacsv.write_csv(table, p, pacsv.WriteOptions(quoting_style="none"))
            out.append(p)
    return out


def definition(folder: Path, trades: int, pool_memory: str | None = None) -> Path:
    """The default pipeline with the model on the CPU stream and a fixed VPIN bucket volume
    (a day's volume / 50, as 'auto' would give): 'auto' would make the batch read every file
    once more to calibrate, which the sequential run does not (it keeps what it read)."""
    text = find_definition("default").read_text()
    text = text.replace('streams = ["coreml:ane", "mlx:gpu", "torch:cuda", "torch:mps", "cpu"]', 'streams = ["cpu"]')
    text = re.sub(r'bucket_volume = "auto".*', f"bucket_volume = {trades * 0.501 / 50:.3f}", text)
    if pool_memory is not None:  # e.g. host: no pinned slabs (a CUDA context per worker) on a GPU host
        text = text.replace("[pipeline]\n", f'[pipeline]\nmemory = "{pool_memory}"\n', 1)
    p = folder / "bench_default_cpu.toml"
    p.write_text(text)
    return p


def sequential_child(defn: str, out: str, files: list[str]) -> None:
    """Run in a child process: each symbol's files through one Run, one symbol after another."""
    import asyncio

    import nautilus_pipeline as nt
    from nautilus_pipeline.batch import plan
    from nautilus_pipeline.config import load

    nt.configure_logging(level="warning")
    t0 = time.perf_counter()
    ticks = 0
    for chain in plan(load(defn), [Path(f) for f in files]):
        run = nt.Run(defn, ticks=[f.path for f in chain.files], out_dir=Path(out) / chain.symbol,
                     trace_every=chain.trace_every, execution="serial")
        summary = asyncio.run(run.execute())
        ticks += summary.ticks.read
    print(orjson.dumps({"ticks": ticks, "wall_s": time.perf_counter() - t0}).decode())


def batch_child(defn: str, pattern: str, out: str, executor: str, workers: str) -> None:
    """Run in a child process: one batch; prints its wall time, exit code and summary."""
    import nautilus_pipeline as nt
    from nautilus_pipeline.batch import run_batch

    nt.configure_logging(level="warning")
    sampler = _ProcessCpu()
    machine0, driver0, t = _machine_cpu_s(), time.process_time(), time.perf_counter()
    report = run_batch(defn, [pattern], out, executor=executor, workers=int(workers))
    wall = time.perf_counter() - t
    machine, driver, processes = _machine_cpu_s() - machine0, time.process_time() - driver0, sampler.stop()
    print(orjson.dumps({"wall_s": wall, "exit_code": report.exit_code, "summary": report.summary,
                        "driver_cpu_s": driver, "machine_cpu_s": machine,
                        "processes_cpu_s": {str(pid): v for pid, v in processes.items()}}).decode())


class _ProcessCpu:
    """CPU seconds of every process this batch starts (its pool's fork server and workers, or
    Ray's processes and workers: the driver's descendants), from ``/proc`` sampled every 0.5 s
    on a thread: pid → [name, CPU s]. Each is born during the batch, so counts from 0; one that
    ends loses what it used after the last sample. (Its own cost is in the driver's CPU.)"""

    def __init__(self) -> None:
        import threading

        self._me = os.getpid()
        self._names: dict[int, str] = {}
        self.seen: dict[int, list] = {}
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _scan(self) -> None:
        stats: dict[int, tuple[int, float]] = {}  # pid → (parent, CPU s)
        for name in os.listdir("/proc") if os.path.isdir("/proc") else ():
            if name.isdigit():
                try:
                    fields = Path(f"/proc/{name}/stat").read_text().rpartition(")")[2].split()
                except OSError:
                    continue
                stats[int(name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"))
        ours = {self._me}
        for _ in range(6):  # Ray's workers are the raylet's children, the pool's the fork server's
            ours |= {pid for pid, (parent, _) in stats.items() if parent in ours}
        for pid in ours - {self._me}:
            if pid not in self._names:
                try:
                    cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                except OSError:
                    continue
                self._names[pid] = _process_name(cmd)
            self.seen[pid] = [self._names[pid], stats[pid][1]]

    def _run(self) -> None:
        while not self._done.wait(0.5):
            self._scan()

    def stop(self) -> dict[int, list]:
        self._done.set()
        self._thread.join()
        return self.seen


def _process_name(cmd: str) -> str:
    """A short name for a batch's process: ``ray::IDLE``, ``raylet``, ``gcs_server``, ..."""
    words = cmd.split()
    if not words:
        return "?"
    if words[0].startswith("ray::"):
        return words[0]
    for w in words:
        base = w.rsplit("/", 1)[-1]
        if base in ("raylet", "gcs_server") or (base.endswith(".py") and base != "bench_batch.py"):
            return base
    if "forkserver" in cmd:
        return "forkserver"
    if "multiprocessing" in cmd or "spawn_main" in cmd:
        return "pool worker"
    return words[0].rsplit("/", 1)[-1]


def _machine_cpu_s() -> float:
    """CPU seconds every process on this machine has used (Linux ``/proc/stat``: user, nice,
    system, irq, softirq, steal; idle and iowait left out); NaN elsewhere."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except OSError:
        return float("nan")
    busy = sum(int(fields[i]) for i in (0, 1, 2, 5, 6, 7))
    return busy / os.sysconf("SC_CLK_TCK")


def control_child(defn: str, out: str, file: str, start_at: float) -> None:
    """Run in a child process: one file through ``replay_job``, started at ``start_at`` (so
    that N children replay at the same time); prints its job time, its CPU (user and system
    apart), page faults and context switches (``getrusage`` over the job) and each stage's
    busy time (its batches' latencies summed, from the job's ``summary.json``): where a job
    beside N others loses its time."""
    import resource

    import nautilus_pipeline as nt
    from nautilus_pipeline.batch import replay_job

    nt.configure_logging(level="warning")
    import pyarrow

    pyarrow.set_cpu_count(1)
    sample = ROOT / "nautilus_pipeline" / "data" / "binance-um-btcusdt-trades-20240808.csv"
    replay_job(defn, [sample], out + "-warm", None, trace_every=1)  # load the kernels first
    time.sleep(max(0.0, start_at - time.time()))
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    res = replay_job(defn, [file], out, None, trace_every=1)
    job_s = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    summary = orjson.loads((Path(out) / "summary.json").read_bytes())
    stages = {st["stage"]: st["batch_latency"]["count"] * st["batch_latency"]["mean_us"] / 1e6
              for st in summary["stages"] if st.get("batch_latency")}
    print(orjson.dumps({"ticks": res.ticks["read"], "job_s": job_s, "run_s": res.run_s,
                        "user_s": r1.ru_utime - r0.ru_utime, "sys_s": r1.ru_stime - r0.ru_stime,
                        "minflt": r1.ru_minflt - r0.ru_minflt, "majflt": r1.ru_majflt - r0.ru_majflt,
                        "nvcsw": r1.ru_nvcsw - r0.ru_nvcsw, "nivcsw": r1.ru_nivcsw - r0.ru_nivcsw,
                        "stages": stages}).decode())


SETUP_CHILD = """
import sys, orjson
import nautilus_pipeline as nt
from nautilus_pipeline.batch import executors
from nautilus_pipeline.batch.plan import JobSpec
from nautilus_pipeline.config import load

defn, out, file, jobs = sys.argv[1:]
nt.configure_logging(level="warning")
parsed = "PipelineDef" in str(executors.Work.__annotations__["definition"])  # this checkout's way
work = executors.Work(load(defn) if parsed else defn, out)
executors.warm_up("warning", 1)
setups, phases = [], []
for i in range(int(jobs) + 1):  # the first one loads the kernels: not counted
    res = executors.run_job(work, JobSpec(f"S/{i:04d}", "S", i, (file,), False, None), {}, 1, None)
    setups.append(res.wall_s - res.run_s)
    phases.append(getattr(res, "phases", {}))
print(nt.__file__)
print(orjson.dumps({"setup_s": setups[1:], "phases": phases[1:]}).decode())
"""
"""Run with ``python -c`` and the checkout on ``PYTHONPATH`` (this file would put its own
checkout first): a warm worker's ``jobs`` jobs of ``file`` in a row, each built as that
checkout's ``run_batch`` builds it; prints their set-up times (seconds in ``replay_job``
outside the replay)."""


def job_setup_ab(baseline: Path, defn: Path, work: Path, file: Path, jobs: int, repeat: int) -> None:
    """A warm worker's per-job set-up, ``baseline``'s and this checkout's, alternately."""
    got: dict[str, list[float]] = {"before": [], "after": []}
    phases: dict[str, list[dict]] = {"before": [], "after": []}
    for i in range(repeat):
        for code in ((baseline, ROOT) if i % 2 == 0 else (ROOT, baseline)):
            tag = "before" if code == baseline else "after"
            others = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep)
                      if p and Path(p).resolve() not in (ROOT, code)]
            env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(code), *others])}
            proc = subprocess.run([sys.executable, "-c", SETUP_CHILD, str(defn), str(work / f"setup-{tag}-{i}"),
                                   str(file), str(jobs)], capture_output=True, text=True, env=env, check=True,
                                  cwd=work)  # not this checkout: python -c puts the folder it runs in first
            package, result = proc.stdout.strip().splitlines()[-2:]
            assert Path(package).resolve().is_relative_to(code), (package, code)
            got[tag] += orjson.loads(result)["setup_s"]
            phases[tag] += orjson.loads(result).get("phases", [])
    b, a = float(np.median(got["before"])), float(np.median(got["after"]))
    print()
    print(f"a warm worker's set-up per job (replay_job outside its replay), {jobs} jobs x {repeat} processes "
          f"per checkout, alternating; {file.name}:")
    print()
    print("| set-up per job | before | after | after / before |")
    print("|---|---:|---:|---:|")
    print(f"| median ms | {1000 * b:.1f} | {1000 * a:.1f} | {a / b:.2f} |")
    print(f"| p90 ms | {1000 * np.quantile(got['before'], 0.9):.1f} | {1000 * np.quantile(got['after'], 0.9):.1f} | |")
    names = [k for k in PHASE_ORDER if all(k in ph for rows in phases.values() for ph in rows)]
    for k in names if all(phases.values()) else []:  # both checkouts stamp phases
        pb, pa_ = (float(np.median([ph[k] for ph in phases[t]])) for t in ("before", "after"))
        print(f"| {k} (median ms) | {1000 * pb:.2f} | {1000 * pa_:.2f} | {pa_ / pb if pb else float('nan'):.2f} |")


def _pin_to(cpu: int):
    """A ``preexec_fn``: the child on ``cpu`` from before its exec, every thread it starts too."""
    return lambda: os.sched_setaffinity(0, {cpu})


def _cpu_list(text: str) -> list[int]:
    """``0,2,4`` or ``0-7`` or both: the CPUs, in order."""
    cpus: list[int] = []
    try:
        for part in text.split(","):
            lo, _, hi = part.partition("-")
            cpus += list(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        raise SystemExit(f"--control-pin: expected CPUs like 0,2,4 or 0-7, got {text!r}") from None
    return cpus


def control(defn: Path, work: Path, files: list[Path], counts: list[int],
            envs: list[str] | None = None, pins: list[str] | None = None, lead: float = 25.0) -> None:
    """N independent processes, each one job on its own file, all at once: how the machine
    itself scales (no pool, no scheduling, no merge), beside the batch rows. Below the table,
    where the time went, per process (means): CPU user and system, page faults, context
    switches, and each stage's busy time, N at once ÷ 1 alone. ``envs``: the whole series
    again under each extra environment (``NAME=VALUE[,NAME=VALUE]``), a lever tried side by
    side; ``pins``: the series again with process i pinned to the i-th CPU of each list
    (``0,2,4`` or ``0-7``; ``sched_setaffinity``), which cores share what."""
    variants = [("", {}, None)] + [(e, dict(kv.split("=", 1) for kv in e.split(",")), None) for e in envs or []]
    variants += [(f"processes pinned to CPUs {pin}", {}, _cpu_list(pin)) for pin in pins or []]
    for label, _, cpus in variants:
        if cpus is not None and len(set(cpus)) < max(counts):
            raise SystemExit(f"--control-pin: {label} names {len(set(cpus))} CPU(s) for up to "
                             f"{max(counts)} processes (one a CPU)")
    for label, extra, cpus in variants:
        print()
        print(f"environment: {label or '(as is)'}")
        print()
        print("| independent processes at once | mean job s | ticks/s together | vs 1 process |")
        print("|---:|---:|---:|---:|")
        base, rows = None, []
        for n in counts:
            start_at = time.time() + lead  # after every child's imports and warm-up
            procs = [subprocess.Popen([sys.executable, __file__, "--control-child", str(defn),
                                       str(work / f"ctl-{n}-{i}"), str(files[i % len(files)]), str(start_at)],
                                      stdout=subprocess.PIPE, text=True, env={**os.environ, **extra},
                                      preexec_fn=_pin_to(cpus[i % len(cpus)]) if cpus else None)
                     for i in range(n)]
            results = [orjson.loads(p.communicate()[0].strip().splitlines()[-1]) for p in procs]
            rate = sum(r["ticks"] for r in results) / max(r["job_s"] for r in results)
            base = base or rate
            rows.append((n, results))
            print(f"| {n} | {np.mean([r['job_s'] for r in results]):.2f} | {rate:,.0f} | {rate / base:.2f}x |")
        _control_breakdown(rows)


def _control_breakdown(rows: list[tuple[int, list[dict]]]) -> None:
    """Per-process means of the control's rusage and stage times, each run beside the first."""
    if "user_s" not in rows[0][1][0]:
        return
    keys = [("job_s", "job s", 2), ("run_s", "replay s", 2), ("user_s", "CPU user s", 2),
            ("sys_s", "CPU system s", 2), ("minflt", "minor faults", 0), ("majflt", "major faults", 0),
            ("nvcsw", "voluntary switches", 0), ("nivcsw", "involuntary switches", 0)]
    stages = list(rows[0][1][0]["stages"])
    names = [f"{n} at once" + (f" (run {i + 1})" if [m for m, _ in rows].count(n) > 1 else "")
             for i, (n, _) in enumerate(rows)]
    print()
    print("| per process (mean) | " + " | ".join(names) + " | "
          + " | ".join(f"{name} ÷ first" for name in names[1:]) + " |")
    print("|---|" + "---:|" * (2 * len(rows) - 1))

    def line(label: str, vals: list[float], digits: int) -> None:
        ratio = [f"{v / vals[0]:.2f}" if vals[0] else "" for v in vals[1:]]
        print(f"| {label} | " + " | ".join(f"{v:,.{digits}f}" for v in vals) + " | " + " | ".join(ratio) + " |")

    def mean(results: list[dict], get) -> float:
        return float(np.mean([get(r) for r in results]))

    for key, label, digits in keys:
        line(label, [mean(res, lambda r, k=key: r[k]) for _, res in rows], digits)
    for st in stages:
        line(f"stage {st} busy s", [mean(res, lambda r, k=st: r["stages"].get(k, 0.0)) for _, res in rows], 3)
    line("replay outside the stages s", [mean(res, lambda r: r["run_s"] - sum(r["stages"].values()))
                                         for _, res in rows], 3)


def _floor_step(previous: object, payload: bytes) -> dict:
    started = time.time()
    sum(range(20_000))  # ~0.5 ms of work
    return {"started": started, "ended": time.time(), "state": payload}


def ray_floor(jobs: int, payload_bytes: int = 17_152) -> None:
    """Ray's own per-task cost on this machine, as ``batch.engine_times`` measures a job's:
    chains of trivial tasks, each given the ref of the one before (a result of a JobResult's
    size, its state included), on a local Ray of this machine's cores; dispatch (the one before
    ended → this one started) and return (ended → in the driver). Once with the cores idle,
    once beside one busy-looping process per core (as a batch's workers keep them busy)."""
    import ray

    cores = os.cpu_count() or 1
    ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        task = ray.remote(num_cpus=1)(_floor_step)
        ray.get([task.remote(None, b"") for _ in range(cores)])  # the workers started
        time.sleep(2)
        print()
        print(f"| Ray alone, {cores} CPUs, chains of {jobs} trivial tasks | dispatch ms (median, p90) | "
              "return ms (median, p90) |")
        print("|---|---:|---:|")
        for busy in (0, cores):  # (the cores are "idle" of ours only: on a shared VM others run)
            burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(busy)]
            try:
                for chains in (1, cores):
                    disp, ret = _floor_chains(ray, task, chains, jobs, b"x" * payload_bytes)
                    print(f"| {chains} chain(s), {'no busy loop of ours' if not busy else f'{busy} busy-looping processes'} | "
                          f"{1000 * np.median(disp):.1f}, {1000 * np.quantile(disp, 0.9):.1f} | "
                          f"{1000 * np.median(ret):.1f}, {1000 * np.quantile(ret, 0.9):.1f} |")
            finally:
                for b in burners:
                    b.kill()
                    b.wait()
    finally:
        ray.shutdown()


RAY_OPTIONS = {
    "as run_batch": ({}, {}),
    "usage stats off": ({"RAY_USAGE_STATS_ENABLED": "0"}, {}),
    "metrics off": ({}, {"enable_metrics_collection": False}),
    "task events off": ({}, {"task_events_report_interval_ms": 0}),
    "all three": ({"RAY_USAGE_STATS_ENABLED": "0"},
                  {"enable_metrics_collection": False, "task_events_report_interval_ms": 0}),
}
"""``--ray-options``: what a local Ray can be started without, beyond ``run_batch``'s own
``include_dashboard=False, log_to_driver=False`` (environment, ``_system_config``)."""


def _busy_step(previous: object, seconds: float) -> bytes:
    t = time.process_time()
    while time.process_time() - t < seconds:
        pass
    return b"x" * 17_152  # a JobResult's size


def ray_options_child(name: str) -> None:
    """Run in a child process: a local Ray of 2 CPUs started with ``RAY_OPTIONS[name]``, 2
    chains of 4 tasks of 1 CPU-second each (a batch's shape), stopped; the CPU seconds of
    Ray's own processes (its workers left out), ``ray.init``'s time."""
    env, system_config = RAY_OPTIONS[name]
    os.environ.update(env)
    sampler = _ProcessCpu()
    t0 = time.perf_counter()
    import ray

    kwargs = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
    ray.init(num_cpus=2, **kwargs, **({"_system_config": system_config} if system_config else {}))
    init_s = time.perf_counter() - t0
    task = ray.remote(num_cpus=1)(_busy_step)
    refs = []
    for _ in range(2):
        previous = None
        for _ in range(4):
            previous = task.remote(previous, 1.0)
            refs.append(previous)
    ray.get(refs)
    ray.shutdown()
    own: dict[str, float] = {}
    for proc, cpu in sampler.stop().values():
        if not proc.startswith("ray::IDLE"):
            own[proc] = own.get(proc, 0.0) + cpu
    print(orjson.dumps({"init_s": init_s, "wall_s": time.perf_counter() - t0, "own": own}).decode())


def ray_options(rounds: int) -> None:
    """Each of :data:`RAY_OPTIONS` in a fresh process, ``rounds`` rounds, alternating."""
    got: dict[str, list[dict]] = {k: [] for k in RAY_OPTIONS}
    for i in range(rounds):
        names = list(RAY_OPTIONS) if i % 2 == 0 else list(reversed(RAY_OPTIONS))
        for name in names:
            proc = subprocess.run([sys.executable, __file__, "--ray-options-child", name],
                                  capture_output=True, text=True, check=True)
            got[name].append(orjson.loads(proc.stdout.strip().splitlines()[-1]))
    print()
    print(f"a local Ray of 2 CPUs, 2 chains x 4 tasks of 1 CPU-s, {rounds} rounds alternating (medians):")
    print()
    print("| ray.init with | Ray's own processes CPU s | every round | ray.init s | wall s |")
    print("|---|---:|---|---:|---:|")
    for name, rs in got.items():
        own = [sum(r["own"].values()) for r in rs]
        print(f"| {name} | {np.median(own):.2f} | {', '.join(f'{x:.2f}' for x in own)} | "
              f"{np.median([r['init_s'] for r in rs]):.2f} | {np.median([r['wall_s'] for r in rs]):.2f} |")
    last = got["as run_batch"][-1]["own"]
    print()
    print("Ray's processes in the last 'as run_batch' round, CPU s: "
          + ", ".join(f"{k} {v:.2f}" for k, v in sorted(last.items(), key=lambda kv: -kv[1])))


def _warm_worker_jobs(defn: str, file: str, out: str, jobs: int) -> list[dict]:
    """In a worker (this process, or a Ray task): warmed as a batch warms it, then ``jobs``
    jobs of ``file`` in a row, as ``run_batch`` builds them; each one's time outside its
    replay and its phases (ms)."""
    from nautilus_pipeline.batch import executors
    from nautilus_pipeline.batch.plan import JobSpec
    from nautilus_pipeline.config import load

    d = load(defn)
    executors.warm_up("warning", 1, d)
    work = executors.Work(d, out)
    rows = []
    for i in range(jobs + 1):  # the first one not counted
        res = executors.run_job(work, JobSpec(f"S/{i:04d}", "S", i, (file,), False, None), {}, 1, None)
        rows.append({"in_worker": 1000 * (res.ended_at - res.started_at - res.run_s),
                     **{k: 1000 * v for k, v in res.phases.items()}})
    return rows[1:]


def worker_setup(defn: Path, work: Path, file: Path, jobs: int, repeat: int) -> None:
    """A warm worker's time outside its replay alone (no other job, no merge beside it), in
    this process (as a local pool worker runs it) and in a Ray task on a local Ray of one CPU,
    alternately: whether a Ray worker itself adds to it."""
    import ray

    got: dict[str, list[dict]] = {"local": [], "ray": []}
    for i in range(repeat):
        for where in (("local", "ray") if i % 2 == 0 else ("ray", "local")):
            out = str(work / f"setup-{where}-{i}")
            if where == "local":
                got[where] += _warm_worker_jobs(str(defn), str(file), out, jobs)
                continue
            ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False, configure_logging=False)
            try:
                task = ray.remote(num_cpus=1)(_warm_worker_jobs)
                got[where] += ray.get(task.remote(str(defn), str(file), out, jobs))
            finally:
                ray.shutdown()
    print()
    print(f"a warm worker alone, {jobs} jobs of {file.name} x {repeat} rounds each, alternating (median ms):")
    print()
    keys = list(got["local"][0])
    print("| where | " + " | ".join(keys) + " |")
    print("|---|" + "---:|" * len(keys))
    for where, rows in got.items():
        print(f"| {where} | " + " | ".join(f"{np.median([r[k] for r in rows]):.1f}" for k in keys) + " |")


def _floor_chains(ray: object, task: object, chains: int, jobs: int, payload: bytes) -> tuple[list, list]:
    submitted, refs = {}, {}
    for c in range(chains):
        previous = None
        for i in range(jobs):
            submitted[(c, i)] = time.time()
            previous = task.remote(previous, payload)
            refs[previous] = (c, i)
    results, returned, pending = {}, {}, list(refs)
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        for ref in ready:
            results[refs[ref]] = ray.get(ref)
            returned[refs[ref]] = time.time()
    disp = [v["started"] - max(submitted[k], results[(k[0], k[1] - 1)]["ended"])
            for k, v in results.items() if k[1] > 0]
    ret = [returned[k] - v["ended"] for k, v in results.items()]
    return disp, ret


def merge_read_ab(out: Path, repeat: int) -> None:
    """A finished batch's job parts (``OUT/jobs``) read as the streaming merge reads them, the
    old way (the footer, the symbol column, then the whole part through ``pq.read_table``)
    and the new (one ``ParquetFile``, one read), alternately; CPU seconds (this process, all
    its threads: pyarrow reads on its pool), and the tables checked the same, bit for bit."""
    import pyarrow.compute as pc

    parts = [p for p in sorted((out / "jobs").glob("*/*/*.parquet")) if p.stem != "latency"]

    def before(p: Path) -> tuple[pa.Table, list]:
        pq.read_metadata(p).schema.to_arrow_schema()
        symbols = pc.unique(pq.read_table(p, columns=["symbol"])["symbol"].cast(pa.string())).to_pylist()
        return pq.read_table(p), symbols

    def after(p: Path) -> tuple[pa.Table, list]:
        with pq.ParquetFile(p) as pf:
            pf.schema_arrow  # noqa: B018 (as the merge asks for it)
            table = pf.read()
        return table, pc.unique(table["symbol"].cast(pa.string())).to_pylist()

    def ipc(table: pa.Table) -> bytes:
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, table.schema) as w:
            w.write_table(table.combine_chunks())
        return sink.getvalue().to_pybytes()

    same = all(ipc(before(p)[0]) == ipc(after(p)[0]) and before(p)[1] == after(p)[1] for p in parts)
    got: dict[str, list[float]] = {"before": [], "after": []}
    for i in range(repeat):
        for f in ((before, after) if i % 2 == 0 else (after, before)):
            c = time.process_time()
            for p in parts:
                f(p)
            got[f.__name__].append(time.process_time() - c)
    b, a = float(np.median(got["before"])), float(np.median(got["after"]))
    print(f"{len(parts)} parts of {out / 'jobs'}, {repeat} passes each, alternating; CPU s a pass (median): "
          f"before {b:.3f}, after {a:.3f}, after / before {a / b:.2f}; tables identical: {'yes' if same else 'NO'}")


def merged_digest(out: Path) -> dict[str, int]:
    """Rows per merged kind, and a digest of the signals in (symbol, ts) order."""
    digest = {}
    for kind in ("signals", "vpin", "risk"):
        if (out / kind).exists():
            t = pq.read_table(out / kind)
            t = t.set_column(t.column_names.index("symbol"), "symbol", t["symbol"].cast(pa.string()))
            t = t.sort_by([("symbol", "ascending"), ("ts_ns", "ascending")])
            digest[kind] = hash(repr(t.to_pylist()))
    return digest


def _counts(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def run_batch_row(code: Path, defn: Path, work: Path, executor: str, n: int, tag: str,
                  n_symbols: int) -> dict:
    """One batch in a child process of checkout ``code`` (as a CLI run is: it starts its own
    pool or Ray, none left warm by the row before); its numbers."""
    out = work / f"out-{executor}-{n}-{tag}"
    # a fresh folder: files renamed over a previous run's (a --dir used again) cost 3-6 ms a
    # job more on ext4, which writes a replaced file's data back at the rename (auto_da_alloc;
    # docs/measurements/dev_bench_batch_reused_dir_9888403.txt)
    shutil.rmtree(out, ignore_errors=True)
    others = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep)
              if p and Path(p).resolve() not in (ROOT, code)]  # e.g. a folder of wheels' installs
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(code), *others])}
    proc = subprocess.run([sys.executable, str(code / "scripts" / "bench_batch.py"), "--batch-child", str(defn),
                           str(work / "in" / "*.csv"), str(out), executor, str(n)],
                          capture_output=True, text=True, env=env, cwd=work)
    # cwd: not a checkout. The pool's fork server starts as ``python -c``, which puts the
    # folder it runs in first on its sys.path (Python 3.11 ignores the driver's sys.path
    # there): run from the other checkout, its workers imported that checkout's package,
    # not ``code``'s (the local rows of --baseline A/Bs up to 6c11124 ran after's workers
    # in both columns when started from after's checkout)
    if proc.returncode:
        raise SystemExit(f"{executor} --workers {n} ({code}) failed: {proc.stderr[-3000:]}")
    r = orjson.loads(proc.stdout.strip().splitlines()[-1])
    s, wall = r["summary"], r["wall_s"]
    workers_code = {orjson.loads(p.read_bytes())["code_version"] for p in out.glob("jobs/*/*/summary.json")}
    assert workers_code == {s["code_version"]}, f"{code}: workers ran {workers_code}, the driver {s['code_version']}"
    assert r["exit_code"] == 0 and s["accounting_closes"], s["failed"]
    jobs = s["jobs"]
    slots = min(n, n_symbols)
    replay = sum(j["run_s"] for j in jobs)
    row = {"config": f"{executor} --workers {n}", "n": n, "wall": wall, "ticks": s["totals"]["read"],
           "jobs": len(jobs), "job_s": float(np.median([j["run_s"] for j in jobs])),
           "startup": s["executor_startup_s"], "warm": s.get("workers_warm_s"),
           "plan": s["plan_s"], "merge": s["merge_s"], "digest": merged_digest(out),
           # the old, lumped figure, for the A/B: (wall x P - sum of job walls) / jobs
           "lumped": (wall * slots - sum(j["wall_s"] for j in jobs)) / len(jobs),
           # figures both checkouts' summaries give: a job's set-up in the worker (replay_job
           # outside its replay), and how much longer a chain's first job replays than its others
           # (a worker's first job loading the kernels, where the warm-up does not)
           "setup": float(np.median([j["wall_s"] - j["run_s"] for j in jobs])),
           "first_excess": _first_excess(jobs)}
    if "phases" in jobs[0]:  # this checkout's: where in_worker_s goes, and CPU per process
        names = sorted({k for j in jobs for k in j["phases"]}, key=lambda k: [*PHASE_ORDER, k].index(k))
        row["phases"] = {k: float(np.median([j["phases"].get(k, 0.0) for j in jobs])) for k in names}
        by_worker: dict[int, list[dict]] = {}
        for j in sorted(jobs, key=lambda j: j["job"]):
            by_worker.setdefault(j["pid"], []).append(j)
        row["builds"] = [[j["phases"].get("build", 0.0) for j in js] for js in by_worker.values()]
        job_pids = {j["pid"] for j in jobs}
        procs = {int(pid): v for pid, v in (r.get("processes_cpu_s") or {}).items()}
        others: dict[str, float] = {}
        for pid, (name, cpu) in procs.items():
            if pid not in job_pids:
                others[name] = others.get(name, 0.0) + cpu
        row["cpu"] = {"workers_jobs": float(np.sum([j["cpu_s"] for j in jobs])),
                      "workers_all": float(sum(procs[p][1] for p in job_pids if p in procs)),
                      "cores_per_job": float(np.median([j["cpu_s"] / j["wall_s"] for j in jobs])),
                      "driver": r.get("driver_cpu_s"), "machine": r.get("machine_cpu_s"),
                      "engine": dict(sorted(others.items(), key=lambda kv: -kv[1]))}
    if "in_worker_s" in jobs[0]:  # stamped per job (this checkout; not the baseline's)
        per_job = [j["overhead_s"] for j in jobs]
        first, last = s["first_job_start_s"], s["after_last_job_s"]
        row.update({
            "per_job": float(np.median(per_job)), "per_job_sum": float(np.sum(per_job)),
            "dispatch": float(np.median([j["dispatch_s"] for j in jobs])),
            "in_worker": float(np.median([j["in_worker_s"] for j in jobs])),
            "return": float(np.median([j["return_s"] for j in jobs])),
            "first": first, "last": last, "merge_cpu": s.get("merge_cpu_s"), "close": s.get("executor_close_s"),
            "rest": wall * slots - replay - float(np.sum(per_job)) - slots * (first + last)})
    return row


PHASE_ORDER = ["setup", "definition", "build", "loop", "summary", "publish", "free"]


def _first_excess(jobs: list[dict]) -> float:
    """Median over chains of (its first job's replay − the median replay of its other jobs)."""
    chains: dict[str, list[tuple[int, float]]] = {}
    for j in jobs:
        chain, index = j["job"].rsplit("/", 1)
        chains.setdefault(chain, []).append((int(index), j["run_s"]))
    excess = [sorted(c)[0][1] - float(np.median([r for _, r in sorted(c)[1:]])) for c in chains.values() if len(c) > 1]
    return float(np.median(excess)) if excess else float("nan")


def print_rounds(configs: list[tuple[str, int]], runs: dict[tuple[str, int], list[dict]]) -> None:
    """Each round's walls and each row's efficiency against the same round's one local worker
    (the table above: each row's median run): how far a ratio moves with the lone run."""
    rounds = len(next(iter(runs.values())))
    base = runs.get(("local", 1))
    print()
    print(f"per round ({rounds}, the order of the rows reversed every other round): wall s"
          + ("; efficiency vs that round's local --workers 1" if base else ""))
    print()
    print("| run | " + " | ".join(f"round {i + 1}" for i in range(rounds)) + " | median efficiency |")
    print("|---|" + "---:|" * (rounds + 1))
    for executor, n in configs:
        cells, effs = [], []
        for i, row in enumerate(runs[(executor, n)]):
            cell = f"{row['wall']:.1f}"
            if base:
                eff = (row["ticks"] / row["wall"]) / (base[i]["ticks"] / base[i]["wall"]) / n
                effs.append(eff)
                cell += f" ({eff:.2f})"
            cells.append(cell)
        print(f"| {executor} --workers {n} | " + " | ".join(cells) + " | "
              + (f"{float(np.median(effs)):.2f}" if effs else "") + " |")


def print_rows(rows: list[dict]) -> None:
    base = next((r for r in rows if r["config"].startswith("local") and r["n"] == 1), None)
    print()
    print("| run | ticks/s | wall s | speedup vs 1 worker | efficiency | median job s | per-job engine ms "
          "(median) | per-job % of job | to first job s | after last job s | other idle slot-s | "
          "start-up s | workers warm s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        rate = r["ticks"] / r["wall"]
        speed = rate / (base["ticks"] / base["wall"]) if base else None
        eff = f"{speed / r['n']:.2f}" if speed and not r["config"].startswith("sequential") else ""
        per = (f"{1000 * r['per_job']:.1f} | {100 * r['per_job'] / r['job_s']:.2f} %" if "per_job" in r
               else " | ")
        fixed = (f"{r['first']:.2f} | {r['last']:.2f} | {r['rest']:.2f}" if "first" in r else " |  | ")
        start = "" if not r.get("startup") else f"{r['startup']:.1f}"
        warm = "" if not r.get("warm") else f"{r['warm']:.1f}"
        print(f"| {r['config']} | {rate:,.0f} | {r['wall']:.1f} | {f'{speed:.2f}x' if speed else ''} | {eff} | "
              f"{r['job_s']:.2f} | "
              f"{per} | {fixed} | {start} | {warm} |")
    print()
    print("per job (median, ms): dispatch (could start → started in the worker) + in the worker outside its "
          "replay + return (ended → result in the driver); per batch: plan and merge (the merge streams while "
          "the jobs run: its CPU in total, and what it left after the last job):")
    for r in rows:
        if "per_job" in r:
            print(f"  {r['config']}: dispatch {1000 * r['dispatch']:.1f} + in worker {1000 * r['in_worker']:.1f} "
                  f"+ return {1000 * r['return']:.1f}; Σ per-job {r['per_job_sum']:.2f} s over {r['jobs']} jobs; "
                  f"plan {r['plan']:.2f} s (while starting); after the last job: the executor's stop {r['close']:.2f} s, "
                  f"then the merge's tail {r['merge']:.2f} s (its thread's CPU in all {r['merge_cpu'] or 0:.2f} s, "
                  "the rest while the jobs ran)")
    print()
    print("in the worker outside the replay, by phase (median ms; batch.job.PHASES), and CPU seconds over the batch "
          "(the workers' over their jobs, the driver process's, the machine's from /proc/stat: the other processes "
          "on it included, Ray's own and, on a shared VM, other users'):")
    for r in rows:
        if "phases" in r:
            c = r["cpu"]
            print(f"  {r['config']}: " + " + ".join(f"{k} {1000 * v:.1f}" for k, v in r["phases"].items())
                  + f"; CPU: workers {c['workers_all']:.1f} s ({c['workers_jobs']:.1f} in their jobs, "
                  f"{c['cores_per_job']:.2f} cores a job, median), driver {c['driver'] or 0:.1f} s, the engine's other "
                  "processes " + (", ".join(f"{k} {v:.2f}" for k, v in c["engine"].items() if v >= 0.01) or "none")
                  + f" s; machine {c['machine'] or 0:.1f} s of {r['wall']:.1f} s x {os.cpu_count()} cores, so "
                  f"{(c['machine'] or 0) - c['workers_all'] - (c['driver'] or 0) - sum(c['engine'].values()):.1f} s "
                  "in no process of this batch")
    print()
    print("build per job (ms), by worker, its jobs in chain order (a chain's jobs run in order):")
    for r in rows:
        if "builds" in r:
            print(f"  {r['config']}: " + "; ".join(", ".join(f"{1000 * b:.1f}" for b in w) for w in r["builds"]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--symbols", type=int, default=2)
    ap.add_argument("--days", type=int, default=4)
    ap.add_argument("--trades", type=int, default=250_000, help="trades per file")
    ap.add_argument("--workers", type=_counts, nargs="+", default=[[1, 2]],
                    help="worker counts, e.g. 1,2,4,8,16 or 1 2 4 (default 1,2)")
    ap.add_argument("--executors", default="local",
                    help="local, ray or local,ray: ray runs each worker count on a local Ray of that "
                         "many CPUs (needs the cluster extra; local rows need no Ray)")
    ap.add_argument("--ray", action="store_true", help="also on a local Ray, at the largest --workers")
    ap.add_argument("--no-sequential", action="store_true")
    ap.add_argument("--dir", help="work folder (default: a temporary one)")
    ap.add_argument("--baseline", help="another checkout: its batch rows and this one's, alternately (A/B)")
    ap.add_argument("--repeat", type=int, default=1, help="with --baseline: runs of each row per checkout")
    ap.add_argument("--rounds", type=int, default=1,
                    help="every batch row this many times (order reversed every other round); the table "
                         "shows each row's median run (an odd R gives a true median), then each round's efficiencies")
    ap.add_argument("--control-env", nargs="+", metavar="NAME=VALUE[,NAME=VALUE]",
                    help="with --control: the series again under each of these environments")
    ap.add_argument("--control-lead", type=float, default=25.0,
                    help="with --control: seconds from the children's start to their timed job (imports, warm-up)")
    ap.add_argument("--control-pin", nargs="+", metavar="CPUS",
                    help="with --control: the series again with process i on the i-th CPU of each list")
    ap.add_argument("--control", type=int, nargs="+", metavar="N",
                    help="only: N independent one-job processes at once, for each N (machine scaling)")
    ap.add_argument("--job-setup", type=int, metavar="JOBS",
                    help="only, with --baseline: a warm worker's set-up per job, JOBS jobs of one file in a row, "
                         "--repeat processes per checkout, alternating")
    ap.add_argument("--merge-read", metavar="OUT",
                    help="only: a finished batch's parts read the merge's old way and its new, alternately")
    ap.add_argument("--pool-memory", choices=("auto", "host", "pinned"),
                    help="the definition's [pipeline] memory (default: as default.toml, auto)")
    ap.add_argument("--worker-setup", type=int, metavar="JOBS",
                    help="only: a warm worker's time outside its replay, JOBS jobs of one file, in this process and "
                         "in a Ray task, --repeat rounds alternating")
    ap.add_argument("--ray-floor", type=int, metavar="JOBS",
                    help="only: Ray's own dispatch and return for chains of JOBS trivial tasks, cores idle and busy")
    ap.add_argument("--ray-options", type=int, metavar="ROUNDS",
                    help="only: Ray's own processes' CPU under each of RAY_OPTIONS, ROUNDS rounds alternating")
    ap.add_argument("--ray-options-child", help=argparse.SUPPRESS)
    ap.add_argument("--sequential-child", nargs="+", help=argparse.SUPPRESS)
    ap.add_argument("--control-child", nargs=4, help=argparse.SUPPRESS)
    ap.add_argument("--batch-child", nargs=5, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.control_child:
        defn, out, file, start_at = args.control_child
        control_child(defn, out, file, float(start_at))
        return
    if args.batch_child:
        batch_child(*args.batch_child)
        return
    if args.sequential_child:
        defn, out, *files = args.sequential_child
        sequential_child(defn, out, files)
        return
    if args.ray_floor:
        ray_floor(args.ray_floor)
        return
    if args.ray_options_child:
        ray_options_child(args.ray_options_child)
        return
    if args.ray_options:
        ray_options(args.ray_options)
        return
    if args.merge_read:
        merge_read_ab(Path(args.merge_read), max(args.repeat, 2))
        return

    import nautilus_pipeline as nt
    from nautilus_pipeline.machine import cache_bytecode_in_child_processes, describe

    print(cache_bytecode_in_child_processes())
    nt.configure_logging(level="warning")
    work = Path(args.dir or tempfile.mkdtemp(prefix="bench_batch_"))
    t0 = time.perf_counter()
    files = generate(work / "in", args.symbols, args.days, args.trades)
    defn = definition(work, args.trades, args.pool_memory)
    print(f"machine: {describe()}; {os.cpu_count()} cores")
    print(f"input: {args.symbols} symbols x {args.days} days x {args.trades:,} trades = "
          f"{len(files) * args.trades:,} trades in {len(files)} files (generated in {time.perf_counter() - t0:.1f} s)")
    if args.control:
        control(defn, work, files, args.control, args.control_env, args.control_pin, args.control_lead)
        return
    if args.worker_setup:
        worker_setup(defn, work, files[0], args.worker_setup, max(args.repeat, 2))
        return
    if args.job_setup:
        if not args.baseline:
            ap.error("--job-setup needs --baseline")
        job_setup_ab(Path(args.baseline).resolve(), defn, work, files[0], args.job_setup, args.repeat)
        return
    rows = []
    if not args.no_sequential:
        t = time.perf_counter()
        proc = subprocess.run([sys.executable, __file__, "--sequential-child", str(defn), str(work / "seq"),
                               *map(str, files)], capture_output=True, text=True, check=True)
        wall = time.perf_counter() - t
        r = orjson.loads(proc.stdout.strip().splitlines()[-1])
        rows.append({"config": "sequential (1 process)", "n": 1, "wall": wall, "ticks": r["ticks"],
                     "jobs": len(files), "job_s": r["wall_s"] / len(files), "startup": None})
    counts = sorted({n for group in args.workers for n in group})
    executors = [e.strip() for e in args.executors.split(",") if e.strip()]
    if bad := [e for e in executors if e not in ("local", "ray")]:
        ap.error(f"--executors: unknown {bad} (local, ray)")
    configs = [(e, n) for e in executors for n in counts]
    if args.ray and "ray" not in executors:
        configs.append(("ray", max(counts)))
    if args.baseline:
        ab(Path(args.baseline).resolve(), defn, work, configs, args.repeat, args.symbols, rows)
        return
    digests = []
    runs: dict[tuple[str, int], list[dict]] = {}
    for r in range(args.rounds):
        for executor, n in (configs if r % 2 == 0 else configs[::-1]):  # a drifting machine: both ways
            row = run_batch_row(ROOT, defn, work, executor, n, f"run{r}", args.symbols)
            runs.setdefault((executor, n), []).append(row)
            digests.append(row["digest"])
    for cfg in configs:  # each row's median run (by wall; of an even count, the faster middle one)
        rows.append(sorted(runs[cfg], key=lambda row: row["wall"])[(len(runs[cfg]) - 1) // 2])
    same = len({tuple(sorted(d.items())) for d in digests}) <= 1
    print_rows(rows)
    if args.rounds > 1:
        print_rounds(configs, runs)
    print()
    print(f"merged outputs identical across the batch runs: {'yes' if same else 'NO'}")


def ab(baseline: Path, defn: Path, work: Path, configs: list[tuple[str, int]], repeat: int,
       n_symbols: int, rows: list[dict]) -> None:
    """Every batch row of ``baseline`` and of this checkout, alternately, ``repeat`` times."""
    for code in (baseline, ROOT):  # each checkout's numba cache filled once, not timed
        run_batch_row(code, defn, work, "local", 1, "fill", n_symbols)
    runs: dict[tuple[str, int, str], list[dict]] = {}
    for i in range(repeat):
        for executor, n in configs:
            order = (baseline, ROOT) if i % 2 == 0 else (ROOT, baseline)
            for code in order:
                tag = "before" if code == baseline else "after"
                runs.setdefault((executor, n, tag), []).append(
                    run_batch_row(code, defn, work, executor, n, f"{tag}{i}", n_symbols))
    digests = {tuple(sorted(r["digest"].items())) for rs in runs.values() for r in rs}
    print()
    print(f"A/B, {repeat} runs of each, alternating (before = {baseline}, after = {ROOT}); medians:")
    print()
    print("| run | before wall s | after wall s | after / before | before ticks/s | after ticks/s | "
          "before lumped overhead / job | after lumped overhead / job |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for executor, n in configs:
        b, a = runs[(executor, n, "before")], runs[(executor, n, "after")]
        wb, wa = float(np.median([r["wall"] for r in b])), float(np.median([r["wall"] for r in a]))
        lb, la = float(np.median([r["lumped"] for r in b])), float(np.median([r["lumped"] for r in a]))
        print(f"| {executor} --workers {n} | {wb:.2f} | {wa:.2f} | {wa / wb:.2f} | {b[0]['ticks'] / wb:,.0f} | "
              f"{a[0]['ticks'] / wa:,.0f} | {lb:.2f} s | {la:.2f} s |")
    print()
    print("| run | set-up in the worker ms, before | after | a chain's first job − its others s, before | after | "
          "merge after the jobs s, before | after |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for executor, n in configs:
        b, a = runs[(executor, n, "before")], runs[(executor, n, "after")]

        def med(rs: list[dict], key: str) -> float:
            return float(np.median([r[key] for r in rs]))

        print(f"| {executor} --workers {n} | {1000 * med(b, 'setup'):.1f} | {1000 * med(a, 'setup'):.1f} | "
              f"{med(b, 'first_excess'):.2f} | {med(a, 'first_excess'):.2f} | {med(b, 'merge'):.2f} | "
              f"{med(a, 'merge'):.2f} |")
    print("(set-up: a job's wall in replay_job minus its replay; merge after the jobs: summary.json's merge_s)")
    print()
    print("walls of every run: " + "; ".join(
        f"{e} {n} {t}: " + ", ".join(f"{r['wall']:.2f}" for r in runs[(e, n, t)])
        for e, n in configs for t in ("before", "after")))
    print("lumped overhead / job = (wall x min(N, symbols) - sum of job walls) / jobs (the old figure; "
          "the after rows split it below)")
    def median_runs(tag: str) -> list[dict]:
        return [min(runs[(e, n, tag)], key=lambda r: abs(r["wall"] - float(np.median(
            [x["wall"] for x in runs[(e, n, tag)]])))) for e, n in configs]

    for tag, code in (("before", baseline), ("after", ROOT)):
        print()
        print(f"{tag} ({code}), the run of each row with the median wall:")
        print_rows(rows + median_runs(tag))
    print()
    print(f"merged outputs identical across every run, before and after: {'yes' if len(digests) == 1 else 'NO'}")


if __name__ == "__main__":
    main()
