"""Benchmark: the whole pipeline, as a replay and live, serial beside concurrent, in one run.

Replay. ``nautilus-pipeline run pipelines/default.toml`` on generated trades
(``scripts/make_synthetic_trades.py``), each configuration in its own process, one after
the other: ``--execution serial`` (every stage on the loop thread, one kernel at a time)
and ``--execution concurrent`` (large batches on the stages' worker threads). Reported:
ticks/s of the replay (the run's own ``wall_s``), whole-process wall time, cores busy
(the process's user + system CPU time over its wall time), per-stage p50 per batch, and
whether the outputs (signals, VPIN buckets, risk events) are byte-identical to the serial
run's.

Live. The full default chain (VPIN with a fixed bucket volume) and a one-stage chain
(features only), a probe stage at the end recording publish → last-stage time per tick;
ticks published one at a time with ``Pipeline.publish_tick``, paced (1,000 ticks/s) and
at the maximum rate, ``batch_size`` 1 and 4096 (the micro-batcher). Beside them, in the
same process, the floor: one tick passed through a chain of 4 ``asyncio.Queue`` hops.

Ratios measured side by side in one run are what count on a noisy machine. Run:
``python scripts/bench_pipeline.py [--rows 2000000 10000000] [--live-ticks 5000]``;
``--baseline DIR --repeat N`` (DIR another checkout, e.g. a ``git worktree``) instead runs
the concurrent replay of both checkouts alternately and prints each run and the medians.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import pathlib
import subprocess
import sys
import tempfile
import time

import numpy as np
import orjson

ROOT = pathlib.Path(__file__).resolve().parent.parent
OUTPUTS = ("signals.jsonl", "vpin.jsonl", "risk.jsonl")
MARKDOWN: list[str] = []  # the same tables as markdown (``--markdown``), for the README


# --- replay ------------------------------------------------------------------------------
def make_trades(rows: int, folder: pathlib.Path) -> pathlib.Path:
    path = folder / f"trades-{rows}.csv"
    if not path.exists():
        subprocess.run(
            [sys.executable, str(ROOT / "scripts/make_synthetic_trades.py"), "--rows", str(rows),
             "--out", str(path)],
            check=True, stdout=subprocess.DEVNULL,
        )
    return path


def run_replay(ticks: pathlib.Path, execution: str, out: pathlib.Path, batch: int | None,
               switch: float | None = None, env: dict[str, str] | None = None,
               definition: pathlib.Path | None = None, extra: list[str] | None = None,
               code: pathlib.Path | None = None) -> dict:
    """One replay in its own process; ``code``: the checkout whose package it runs (``--baseline``
    A/Bs), found through PYTHONPATH from a folder outside every checkout (``python -c`` puts the
    current folder first on ``sys.path``)."""
    argv = [
        "nautilus-pipeline", "run", str(definition or ROOT / "pipelines/default.toml"),
        "--ticks", str(ticks), "--format", "binance_trades", "--symbol", "BTCUSDT-PERP",
        "--out", str(out), "--execution", execution, "--no-progress",
    ]
    if batch:
        argv += ["--batch", str(batch)]
    argv += extra or []
    source = (
        "import sys\n"
        + (f"sys.setswitchinterval({switch})\n" if switch else "")
        + f"sys.argv = {argv!r}\n"
        "from nautilus_pipeline.cli import main\n"
        "sys.exit(main())\n"
    )
    cmd = [sys.executable, "-c", source]
    t0 = time.perf_counter()
    env = {**os.environ, **(env or {})}
    if code is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(code), *filter(None, [os.environ.get("PYTHONPATH")])])
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env,
                            cwd=ticks.parent if code is not None else None)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read().decode() if proc.stderr else ""
    if proc.returncode != 0:
        raise SystemExit(f"run failed ({proc.returncode}): {' '.join(cmd)}\n{err[-2000:]}")
    summary = orjson.loads((out / "summary.json").read_bytes())
    return {
        "summary": summary,
        "process_wall": wall,
        "cores": (usage.ru_utime + usage.ru_stime) / wall,
        # over the run's own wall_s (the window ticks/s is measured over: the pipeline's start,
        # the replay, the drain), without the process's imports and the read-once pre-read
        "run_cores": summary["cpu_s"] / summary["wall_s"] if summary.get("wall_s") else 0.0,
        "rss_mb": usage.ru_maxrss / 1024,
    }


def same_outputs(a: pathlib.Path, b: pathlib.Path) -> bool:
    return all((a / n).read_bytes() == (b / n).read_bytes() for n in OUTPUTS)


def one_lane_definition(folder: pathlib.Path) -> pathlib.Path:
    """default.toml with the inference stage on one lane (``lanes = 1``), for ``--lanes-ab``."""
    text = (ROOT / "pipelines/default.toml").read_text()
    marker = 'type = "inference"'
    assert marker in text
    text = text.replace(marker, marker + "\nlanes = 1", 1)
    path = folder / "one-lane.toml"
    path.write_text(text)
    return path


def replay_table(rows_list: list[int], folder: pathlib.Path, batch: int | None,
                 switch: float | None, malloc_pad: bool, lanes_ab: bool = False,
                 cores_ab: int | None = None) -> None:
    print("\nreplay: pipelines/default.toml on generated trades (each run its own process)")
    head = (f"{'trades':>11} {'execution':>10} {'ticks/s':>11} {'process s':>9} {'cores':>5} {'run':>5} "
            f"{'RSS MB':>6} {'same':>5}  per-stage p50 µs per batch")
    print(head)
    print("-" * len(head))
    print("(cores: the process's CPU over its wall time; run: over the run's own wall_s, the window of "
          "ticks/s, without imports and the read-once pre-read)")
    MARKDOWN.extend(["", "| trades | execution | ticks/s | process s | cores busy (process) | cores busy (run) "
                     "| same outputs as serial | per-stage p50 µs per batch |", "|---:|---|---:|---:|---:|---:|---|---|"])
    for rows in rows_list:
        ticks = make_trades(rows, folder)
        base = None
        configs = [("serial", None, None), ("concurrent", None, None)]
        if lanes_ab:
            # inference on one lane, beside the default two, then the default again
            configs += [("concurrent", None, "one-lane"), ("concurrent", None, None)]
        if cores_ab:
            # the placement before the core budget (a worker for every heavy stage and the
            # second lane: --cores N with N > the workers), between two runs of the default
            configs += [("concurrent", None, f"cores={cores_ab}"), ("concurrent", None, None)]
        if switch:
            configs.append(("concurrent", switch, None))
        if malloc_pad:
            # the allocator's top pad made a 25-30 % difference while VaR reports allocated
            # ~8 MB of temporaries each (issue 9); with no per-batch temporaries it makes none
            configs.append(("concurrent", None, {"MALLOC_TOP_PAD_": str(64 << 20)}))
        for k, (execution, sw, env) in enumerate(configs):
            out = folder / f"out-{rows}-{k}-{execution}"
            one_lane = env == "one-lane"
            cores = env[len("cores="):] if isinstance(env, str) and env.startswith("cores=") else None
            r = run_replay(ticks, execution, out, batch, sw, None if isinstance(env, str) else env,
                           one_lane_definition(folder) if one_lane else None,
                           ["--cores", cores] if cores else None)
            s = r["summary"]
            delivered = s["ticks"]["delivered"]
            rate = delivered / s["wall_s"]
            same = "-" if base is None else ("yes" if same_outputs(base, out) else "NO")
            base = base or out
            stages = " ".join(
                f"{st['stage']} {st['batch_latency']['p50_us']:,.0f}" for st in s["stages"]
            )
            label = execution if sw is None else f"conc+{sw * 1e6:.0f}µs"
            label = "conc+pad" if isinstance(env, dict) else label
            label = "conc lanes1" if one_lane else label
            label = f"conc {cores} cores" if cores else label
            print(f"{rows:>11,} {label:>10} {rate:>11,.0f} {r['process_wall']:>9.2f} "
                  f"{r['cores']:>5.2f} {r['run_cores']:>5.2f} {r['rss_mb']:>6.0f} {same:>5}  {stages}")
            MARKDOWN.append(f"| {rows:,} | {label} | {rate:,.0f} | {r['process_wall']:.2f} | "
                            f"{r['cores']:.2f} | {r['run_cores']:.2f} | {'' if same == '-' else same} | {stages} |")


def replay_ab(rows_list: list[int], folder: pathlib.Path, batch: int | None, baseline: pathlib.Path,
              repeat: int, extra: list[str]) -> None:
    """The concurrent replay of ``baseline`` and of this checkout, alternately, ``repeat``
    times each (the order swapped every round), and the medians; ``extra``: more ``run``
    options for both."""
    import statistics

    print(f"\nreplay A/B: pipelines/default.toml, concurrent {' '.join(extra)}; before = {baseline}, after = {ROOT}")
    head = (f"{'trades':>11} {'code':>7} {'version':>18} {'ticks/s':>11} {'process s':>9} {'cores':>5} "
            f"{'run':>5} {'RSS MB':>6} {'same':>5}  per-stage p50 µs per batch")
    print(head)
    print("-" * len(head))
    for rows in rows_list:
        ticks = make_trades(rows, folder)
        for code in (baseline, ROOT):  # each checkout's numba cache filled, not timed
            run_replay(ticks, "concurrent", folder / "out-ab-warm", batch, extra=extra, code=code)
        got: dict[str, list[dict]] = {"before": [], "after": []}
        reference = None
        for i in range(repeat):
            for tag in (("before", "after") if i % 2 == 0 else ("after", "before")):
                out = folder / f"out-ab-{rows}-{tag}-{i}"
                r = run_replay(ticks, "concurrent", out, batch, extra=extra,
                               code=baseline if tag == "before" else ROOT)
                s = r["summary"]
                rate = s["ticks"]["delivered"] / s["wall_s"]
                same = "-" if reference is None else ("yes" if same_outputs(reference, out) else "NO")
                reference = reference or out
                got[tag].append({"rate": rate, "process": r["process_wall"], "cores": r["cores"],
                                 "run": r["run_cores"], "rss": r["rss_mb"]})
                stages = " ".join(f"{st['stage']} {st['batch_latency']['p50_us']:,.0f}" for st in s["stages"])
                print(f"{rows:>11,} {tag:>7} {s.get('code_version', '?'):>18} {rate:>11,.0f} "
                      f"{r['process_wall']:>9.2f} {r['cores']:>5.2f} {r['run_cores']:>5.2f} {r['rss_mb']:>6.0f} {same:>5}  {stages}")
        for tag, runs in got.items():
            med = {k: statistics.median(x[k] for x in runs) for k in runs[0]}
            print(f"{rows:>11,} {tag:>7} {'median of ' + str(len(runs)):>18} {med['rate']:>11,.0f} "
                  f"{med['process']:>9.2f} {med['cores']:>5.2f} {med['run']:>5.2f} {med['rss']:>6.0f}")


# --- live --------------------------------------------------------------------------------
def live_definition(folder: pathlib.Path) -> pathlib.Path:
    text = (ROOT / "pipelines/default.toml").read_text()
    text = text.replace('bucket_volume = "auto"', "bucket_volume = 2.0")
    path = folder / "live.toml"
    path.write_text(text)
    return path


async def live_run(definition: pathlib.Path, n: int, batch: int, paced: bool, full: bool):
    from nautilus_pipeline import config
    from nautilus_pipeline import stage as stage_module
    from nautilus_pipeline.events import TradeTick
    from nautilus_pipeline.stage import Stage

    # (a checkout from before Stage.process_now has no NOT_NOW: A/B runs against one)
    NOT_NOW = getattr(stage_module, "NOT_NOW", object())
    t_pub = np.zeros(n, dtype=np.int64)
    lat = np.zeros(n, dtype=np.int64)

    class Probe(Stage):
        """The last stage: publish → here per tick. One row costs scalar reads, not numpy
        fancy indexing (~1.5 µs a tick, a tenth of the chain's own cost)."""

        name = "probe"
        reads = ("ts_ns",)

        def process_now(self, lease, stream, ctx):
            if lease.length != 1:
                return NOT_NOW
            now = time.perf_counter_ns()
            i = lease.slab.columns["ts_ns"].item(0)
            lat[i] = now - t_pub.item(i)
            return None

        async def process(self, lease, stream, ctx):
            if self.process_now(lease, stream, ctx) is None:
                return
            now = time.perf_counter_ns()
            ts = lease["ts_ns"]
            lat[ts] = now - t_pub[ts]

    d = config.load(definition)
    stages = config.build_stages(d, [])
    if not full:
        stages = stages[:1]
    stages.append(Probe())
    pipe = config.build_pipeline(d, stages, batch_size=batch)
    rng = np.random.default_rng(1)
    prices = 100.0 * np.exp(np.cumsum(rng.normal(0.0, 1e-4, n)))
    ticks = [TradeTick("BTCUSDT-PERP", i, float(prices[i]), 0.01, 1 if i % 2 else -1)
             for i in range(n)]
    async with pipe:
        t0, cpu0 = time.perf_counter(), time.process_time()
        for i, tick in enumerate(ticks):
            t_pub[i] = time.perf_counter_ns()
            await pipe.publish_tick(tick)
            if paced:
                await asyncio.sleep(0.001)
        await pipe.drain()
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    us = lat[n // 10 :] / 1e3  # the first tenth warms caches up
    return np.percentile(us, 50), np.percentile(us, 99), us.max(), n / wall, cpu / n * 1e6


async def queue_floor(n: int, hops: int = 4):
    """One tick at a time through ``hops`` asyncio.Queue hops: the loop's own floor."""
    queues = [asyncio.Queue() for _ in range(hops + 1)]
    lat = np.zeros(n, dtype=np.int64)

    async def hop(i):
        while True:
            item = await queues[i].get()
            await queues[i + 1].put(item)

    tasks = [asyncio.create_task(hop(i)) for i in range(hops)]
    try:
        for i in range(n):
            t0 = time.perf_counter_ns()
            await queues[0].put(i)
            await queues[hops].get()
            lat[i] = time.perf_counter_ns() - t0
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    us = lat[n // 10 :] / 1e3
    return np.percentile(us, 50), np.percentile(us, 99), us.max(), float("nan"), float("nan")


def live_table(n: int, folder: pathlib.Path, repeats: int = 1) -> None:
    from nautilus_pipeline.runtime import configure_logging, run

    configure_logging(level="error")
    definition = live_definition(folder)
    each = f"{n:,} ticks each" + (f", the median of {repeats} runs by ticks/s" if repeats > 1 else "")
    print(f"\nlive: publish_tick → last stage, {each}, uvloop where installed; CPU µs/tick: the "
          "process's CPU time (all threads) over the run, per tick (what a loaded machine's "
          "wall clock hides)")
    head = (f"{'chain':<26} {'batch':>5} {'rate':>10} {'p50 µs':>9} {'p99 µs':>9} {'max µs':>9} "
            f"{'ticks/s':>10} {'CPU µs/tick':>11}")
    print(head)
    print("-" * len(head))
    p50, p99, mx, _, _ = run(queue_floor(n))
    print(f"{'4 asyncio.Queue hops':<26} {'-':>5} {'max':>10} {p50:>9.1f} {p99:>9.1f} {mx:>9.1f} {'-':>10} "
          f"{'-':>11}")
    MARKDOWN.extend(["", f"| live: publish_tick → last stage, {n:,} ticks | batch | rate | p50 µs "
                     "| p99 µs | max µs | ticks/s | CPU µs/tick |", "|---|---:|---|---:|---:|---:|---:|---:|",
                     f"| 4 `asyncio.Queue` hops (the floor) | – | max | {p50:.1f} | {p99:.1f} | "
                     f"{mx:.1f} | – | – |"])
    for full in (True, False):
        label = "full default chain" if full else "features only"
        for batch in (1, 4096):
            for paced in (True, False):
                paced_n = min(n, 2000) if paced else n
                runs = sorted((run(live_run(definition, paced_n, batch, paced, full))
                               for _ in range(repeats)), key=lambda r: r[3])
                p50, p99, mx, rate, cpu = runs[len(runs) // 2]
                print(f"{label:<26} {batch:>5} {'1,000/s' if paced else 'max':>10} {p50:>9.1f} "
                      f"{p99:>9.1f} {mx:>9.1f} {rate:>10,.0f} {cpu:>11.1f}")
                MARKDOWN.append(f"| {label} | {batch} | {'1,000/s' if paced else 'max'} | {p50:.1f} "
                                f"| {p99:.1f} | {mx:.1f} | {rate:,.0f} | {cpu:.1f} |")


async def offload_rows(definition: pathlib.Path, sizes: tuple[int, ...], reps: int):
    """Per stage, the time of one batch inline by rows, and the worker-thread round trip."""
    from nautilus_pipeline import config
    from nautilus_pipeline.compute.cpu import CpuStream

    d = config.load(definition)
    pipe = config.build_pipeline(d, config.build_stages(d, []), batch_size=max(sizes),
                                 execution="serial")
    rng = np.random.default_rng(0)
    table = {}
    async with pipe:
        lease = await pipe.pool.acquire("bench")
        cols = lease.columns
        n_max = max(sizes)
        ts0 = 0
        for n in sizes:
            times = {r.stage.name: [] for r in pipe.runners}
            for _ in range(reps):
                lease.length = n
                cols["ts_ns"][:n] = ts0 + np.arange(n) * 1_000_000
                ts0 += n * 1_000_000
                cols["price"][:n] = 100.0 * np.exp(np.cumsum(rng.normal(0, 1e-4, n)))
                cols["size"][:n] = 0.01
                cols["side"][:n] = 1
                cols["kind"][:n] = 0
                cols["symbol_id"][:n] = 0
                for r in pipe.runners:
                    t = time.perf_counter_ns()
                    await r._process(lease)
                    times[r.stage.name].append(time.perf_counter_ns() - t)
            table[n] = {k: float(np.median(v)) / 1e3 for k, v in times.items()}
        lease.release("bench")
        assert n_max
    worker = CpuStream(offload=True)
    hops = []
    for _ in range(2000):
        t = time.perf_counter_ns()
        await worker.run(int)
        hops.append(time.perf_counter_ns() - t)
    worker.close()
    return table, float(np.median(hops)) / 1e3


def offload_table(folder: pathlib.Path) -> None:
    from nautilus_pipeline.runtime import configure_logging, run

    configure_logging(level="error")
    sizes = (1, 16, 64, 256, 1024, 4096)
    table, hop = run(offload_rows(live_definition(folder), sizes, 30))
    names = list(table[sizes[0]])
    print(f"\noffload: one batch inline per stage (µs, median of 30) vs a worker round trip "
          f"of {hop:.1f} µs")
    head = f"{'rows':>6} " + " ".join(f"{n:>10}" for n in names)
    print(head)
    print("-" * len(head))
    MARKDOWN.extend(["", f"| rows | {' | '.join(names)} | (worker round trip {hop:.1f} µs) |",
                     "|---:|" + "---:|" * (len(names) + 1)])
    for n in sizes:
        print(f"{n:>6} " + " ".join(f"{table[n][k]:>10.1f}" for k in names))
        MARKDOWN.append(f"| {n} | " + " | ".join(f"{table[n][k]:.1f}" for k in names) + " | |")


async def hop_costs(calls: int, repeats: int) -> dict[str, float]:
    """The live hop's parts, ns, each the min over ``repeats`` loops of ``calls``: the pool's
    lease taken and given back; ``publish_tick`` (``batch_size=1``) into one stage whose
    ``process_now`` does nothing and into six (their difference over five: one hop); each
    default stage's ``process_now`` of one trade row, called again and again on one lease
    (the time stepping on, so that every call is a new tick, no VaR report due)."""
    from nautilus_pipeline import config
    from nautilus_pipeline.events import TradeTick
    from nautilus_pipeline.pipeline import Pipeline
    from nautilus_pipeline.stage import Stage

    class Null(Stage):
        reads = ("ts_ns",)

        def process_now(self, lease, stream, ctx):
            return None

        async def process(self, lease, stream, ctx):
            return None

    def best(loop) -> float:
        out = float("inf")
        for _ in range(repeats):
            t = time.perf_counter_ns()
            loop()
            out = min(out, (time.perf_counter_ns() - t) / calls)
        return out

    got: dict[str, float] = {}
    ticks = [TradeTick("X", i, 100.0, 0.01, 1) for i in range(calls)]
    for k in (1, 6):
        stages = [Null() for _ in range(k)]
        for j, st in enumerate(stages):
            st.name = f"null{j}"
        async with Pipeline(stages, batch_size=1, memory="host") as pipe:
            if k == 1:
                pool = pipe.pool

                def lease_pair(pool=pool):
                    for _ in range(calls):
                        lease = pool.acquire_nowait("ingress")
                        lease.length = 1
                        lease.release("ingress")

                got["lease acquire + release"] = best(lease_pair)
            out = float("inf")
            for _ in range(repeats):
                t = time.perf_counter_ns()
                for tick in ticks:
                    await pipe.publish_tick(tick)
                out = min(out, (time.perf_counter_ns() - t) / calls)
            got[f"publish_tick into {k} null stage{'s' if k > 1 else ''}"] = out
    got["one hop (6 null stages - 1, / 5)"] = (got["publish_tick into 6 null stages"]
                                               - got["publish_tick into 1 null stage"]) / 5
    d = config.load(live_definition(pathlib.Path(tempfile.mkdtemp(prefix="bench_hops-"))))
    stages = config.build_stages(d, [])
    for st in stages:
        if hasattr(st, "var_every"):
            st.var_every = 0  # a report is not a hop's cost
    async with config.build_pipeline(d, stages, batch_size=1) as pipe:
        for i in range(500):  # every stage's state for the symbol, the open VPIN bar
            await pipe.publish_tick(TradeTick("BTCUSDT-PERP", i, 100.0 + (i % 7) * 0.1, 0.01,
                                              1 if i % 2 else -1))
        lease = pipe.pool.acquire_nowait("bench")
        lease.length = 1
        cols = lease.columns
        ts = cols["ts_ns"]
        ts[0], cols["price"][0], cols["size"][0], cols["side"][0] = 1000, 100.2, 0.01, 1
        cols["kind"][0] = cols["symbol_id"][0] = 0

        def steps() -> None:
            for _ in range(calls):
                ts[0] += 1

        step = best(steps)
        for r in pipe.runners:
            process_now, stream, ctx = r.stage.process_now, r.stream, r.ctx

            def one_row(process_now=process_now, stream=stream, ctx=ctx):
                for _ in range(calls):
                    ts[0] += 1
                    done = process_now(lease, stream, ctx)
                    if done is not None and hasattr(done, "close"):
                        done.close()  # an event's awaitable (a signal): not this table's

            got[f"{r.stage.name}.process_now, 1 row"] = best(one_row) - step
        lease.release("bench")
    return got


def hop_table() -> None:
    from nautilus_pipeline.runtime import configure_logging, run

    configure_logging(level="error")
    calls, repeats = 2000, 9
    got = run(hop_costs(calls, repeats))
    print(f"\nlive hop: the parts of one live tick, ns (min of {repeats} x {calls:,} calls)")
    print(f"{'part':<40} {'ns':>8}")
    MARKDOWN.extend(["", "| live hop part | ns |", "|---|---:|"])
    for label, ns in got.items():
        print(f"{label:<40} {ns:>8.0f}")
        MARKDOWN.append(f"| {label} | {ns:.0f} |")


def dispatch_table() -> None:
    """What one call of a numba kernel from Python costs by its arguments: an empty kernel
    of k arrays, and one of an address table (``kernels.addresses``) reading k columns."""
    from numba import njit

    from nautilus_pipeline.kernels.addresses import column, column_addresses

    def empty(k: int):
        names = ", ".join(f"a{i}" for i in range(k))
        scope: dict = {}
        exec(f"def f({names}):\n    return 0", scope)  # a kernel of k arguments
        return njit(scope["f"])

    @njit
    def through_table(table, k):
        total = 0.0
        for j in range(k):
            total += column(table, j, np.float64)[0]
        return total

    def best_ns(fn, *args, calls=100_000):
        fn(*args)
        best = float("inf")
        for _ in range(5):
            t = time.perf_counter_ns()
            for _ in range(calls):
                fn(*args)
            best = min(best, (time.perf_counter_ns() - t) / calls)
        return best

    print("\ndispatch: one call of a numba kernel from Python, ns (min of 5 x 100,000 calls)")
    print(f"{'arguments':<36} {'ns':>8}")
    MARKDOWN.extend(["", "| numba call from Python | ns |", "|---|---:|"])
    for k in (1, 7, 14, 27):
        arrays = [np.zeros(8) for _ in range(k)]
        rows = [(f"{k} arrays", best_ns(empty(k), *arrays)),
                (f"1 address table of {k} columns", best_ns(
                    through_table, column_addresses({str(j): a for j, a in enumerate(arrays)},
                                                    [(str(j), np.float64) for j in range(k)]), k))]
        for label, ns in rows:
            print(f"{label:<36} {ns:>8.0f}")
            MARKDOWN.append(f"| {label} | {ns:.0f} |")


def main() -> None:
    from nautilus_pipeline.machine import cache_bytecode_in_child_processes, describe

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="*", default=[2_000_000, 10_000_000],
                    help="sizes of the generated replays (none: skip the replay table)")
    ap.add_argument("--batch", type=int, help="replay batch size (default: the definition's)")
    ap.add_argument("--live-ticks", type=int, default=5000, help="0: skip the live table")
    ap.add_argument("--live-repeats", type=int, default=1,
                    help="runs of each live configuration; the median by ticks/s is printed "
                         "(a 3,000-tick run at max rate lasts ~30 ms: one stall of a loaded "
                         "machine halves its rate)")
    ap.add_argument("--switch-interval", type=float,
                    help="also run concurrent with this GIL switch interval (s), e.g. 0.0005")
    ap.add_argument("--lanes-ab", action="store_true",
                    help="also the concurrent replay with inference on one lane (lanes = 1), "
                         "then the default (two) again")
    ap.add_argument("--cores-ab", type=int, metavar="N",
                    help="also the concurrent replay with --cores N (e.g. 16: a worker thread for "
                         "every heavy stage and inference's second lane, the placement before "
                         "the core budget), then the default again")
    ap.add_argument("--malloc-pad", action="store_true",
                    help="also run concurrent with MALLOC_TOP_PAD_=64MiB (allocation churn check)")
    ap.add_argument("--offload", action="store_true", help="also print the offload table")
    ap.add_argument("--dispatch", action="store_true",
                    help="also print what a numba call costs by its arguments")
    ap.add_argument("--hops", action="store_true",
                    help="also print the parts of a live tick (lease, hop, each process_now)")
    ap.add_argument("--data", help="folder for the generated files (default: a temporary one)")
    ap.add_argument("--markdown", type=pathlib.Path, help="also write the tables as markdown here")
    ap.add_argument("--baseline", type=pathlib.Path,
                    help="another checkout (git worktree): instead of the replay table, its concurrent "
                         "replay and this checkout's alternately (A/B), --repeat times each")
    ap.add_argument("--repeat", type=int, default=3, help="with --baseline: runs of each checkout")
    ap.add_argument("--run-args", default="", help="with --baseline: more 'run' options for both, e.g. '--trace-every 1'")
    args = ap.parse_args()
    print(f"machine: {describe()}; load average {os.getloadavg()[0]:.2f} at the start")
    MARKDOWN.append(f"machine: {describe()}; load average {os.getloadavg()[0]:.2f} at the start")
    print(cache_bytecode_in_child_processes())
    folder = pathlib.Path(args.data or tempfile.mkdtemp(prefix="bench_pipeline-"))
    folder.mkdir(parents=True, exist_ok=True)
    if args.rows and args.baseline:
        replay_ab(args.rows, folder, args.batch, args.baseline.resolve(), args.repeat, args.run_args.split())
    elif args.rows:
        replay_table(args.rows, folder, args.batch, args.switch_interval, args.malloc_pad,
                     args.lanes_ab, args.cores_ab)
    if args.dispatch:
        dispatch_table()
    if args.hops:
        hop_table()
    if args.offload:
        offload_table(folder)
    if args.live_ticks:
        live_table(args.live_ticks, folder, args.live_repeats)
    print(f"load average {os.getloadavg()[0]:.2f} at the end")
    if args.markdown:
        MARKDOWN.append(f"\nload average {os.getloadavg()[0]:.2f} at the end")
        args.markdown.write_text("\n".join(MARKDOWN) + "\n")


if __name__ == "__main__":
    main()
