"""Benchmark: the same work as NautilusTrader, side by side in one run (issue 9, last target).

The work. An exponential moving average of period 100 over every trade of a Binance trades
CSV (``id,price,qty,quote_qty,time,is_buyer_maker``, with a header line), read from disk:
the bundled 21,313 real BTCUSDT perpetual trades and 1M generated ones
(``scripts/make_synthetic_trades.py``, written to ``--data-dir`` and kept).

- **ours**: ``Replay([Source(csv, format="binance_trades")])`` feeding a :class:`Pipeline`
  of one custom :class:`Stage` (``EmaStage`` below: reads ``price``/``kind``, writes ``ema``,
  carries the EMA value and count between batches, one numba ``nogil`` loop per batch on
  the stage's worker thread), 4096-row batches (``--batch``), every row checked and
  accounted for as in ``nautilus-pipeline run``.
- **theirs**: ``nautilus_trader`` (the ``bench`` extra, never a core dependency): the CSV
  read with ``pd.read_csv`` and turned into ``TradeTick`` objects by their
  ``TradeTickDataWrangler``, a ``BacktestEngine`` (log level ERROR) with a BINANCE margin
  venue and their test kit's ``BTCUSDT-PERP`` instrument (price precision 1), the ticks
  added with ``add_data``, a ``Strategy`` that subscribes to the instrument's trade ticks
  with an ``ExponentialMovingAverage(100)`` registered for them (their documented way: the
  strategy's ``handle_trade_tick`` updates the registered indicator on every trade, then
  calls ``on_trade_tick``, left as their no-op: the cheapest path they offer), then
  ``engine.run()``.

Same EMA. NautilusTrader 1.221.0, ``nautilus_trader/indicators/averages.pyx`` (read in the
installed package): ``alpha = 2.0 / (period + 1.0)``; ``update_raw(x)`` sets ``value = x``
on the first input and then *always* does ``value = alpha * x + (1.0 - alpha) * value``
(so the first value is the first price, through that multiply-add's rounding), and counts
the input. ``ema_update`` below does the same operations in the same order (no fastmath,
so no fused multiply-add). One difference is theirs by design: a trade enters their EMA as
``Price.raw_to_f64(raw)``, the price through their fixed-point ``Price`` (1e-16 scale),
which moves 44-45 % of the distinct prices of these files by 1 ulp from the double our
reader parses from the same text (the script counts them). The final EMA values are still
bit-identical on both files here (21K: 61663.07399699256, 1M: 61830.13182660374, difference
0.0 in every run); on other files they may differ in the last digits (a 100K generated file
gave 1.5e-11, 2 ulp).

Timing. Each side runs as its own process (this script re-invoked with ``--child``), the
sides interleaved; the parent takes wall and CPU time from ``os.wait4``. *Process wall* is
the whole process: interpreter start, imports, reading, processing, exit. *End to end* is
timed inside the process, after the imports: for ours from building the pipeline and
replay to the pipeline closed (CSV read, checked, replayed, every batch through the stage);
for theirs from building the engine to ``engine.run()`` returning (engine and venue set-up,
``pd.read_csv``, wrangling, ``add_data`` with its sort, the run; the phases are printed).
Numba loading our cached kernel (0.3-1.1 s here, most of it numba initialising its CPU
target and importing scipy.linalg) is code loading, like their imports: it runs before our
clock starts, and is printed. A first round is discarded (page cache, numba's kernel cache,
byte code), then the median of ``--repeats`` process runs per side.

Pandas and scipy. With pandas installed (nautilus_trader needs it) our reader's first
Arrow → numpy conversion used to make pyarrow import pandas (0.2-0.6 s inside our end-to-end
time); ``io/arrow_numpy.py`` removed that (e5a5f30). scipy is no dependency of ours, but numba
imports ``scipy.linalg`` when its CPU target starts to *compile*, if scipy is installed. The
row "pandas+scipy hidden" runs our side with both imports failing, as in an install of our
core dependencies. The child prints the modules imported inside our clock and whether pandas
or scipy is in the process at all: with both installed, only ``threadpoolctl`` (the
pipeline's BLAS limit, ~5 ms with its scan of the loaded libraries) is imported inside the
clock, and neither pandas nor scipy is ever imported (numba loads our cached kernels without
scipy). Hiding them no longer changes what runs: the gap between the two rows at 43403f7
(0.222 vs 0.198 s, medians of 3) was the run-to-run spread; in the loaded runs of
``docs/measurements/dev_bench_vs_nautilus_loaded_c999ceb.txt`` either row is the faster one.

Where our 1M time went (issue 9, phases timed by hand in one process on the 2-core dev VM):
pyarrow's threaded CSV parse was the largest part, then the Arrow → tick-column conversions,
checks and re-batching (which copied every row once), and the reader and the loop taking
turns (one batch read ahead, so a chunk's parse ran while the loop waited). Now: plain Binance blocks are parsed by a numba byte parser straight into tick columns
(``io/binance_fast.py``, both cores, same bits), the replay reads 65,536 rows ahead
(``READ_AHEAD_ROWS``) so the reader's next chunk overlaps the loop's delivery, and batches
are views of the blocks (only one straddling two blocks is copied).

Measured on the 2-core dev VM, loaded by other agents' test suites, our side only, this
branch against its base (``--ab``, process runs per tree alternating): at 3901577, 15 runs,
load average 2.3-2.7, end to end median 0.201 s against 0.257 s (x0.78), fastest 0.178 against
0.214 s (``docs/measurements/dev_bench_vs_nautilus_ab_3901577.txt``); at dc0baa3, 11 runs,
load 4-6, median 0.291 against 0.352 s (x0.83), fastest 0.194 against 0.262 s
(``dev_bench_vs_nautilus_ab_dc0baa3.txt``); the same EMA in every run. The whole script at
4331df1 (load average 3.2-3.5; ``dev_bench_vs_nautilus_loaded_4331df1.txt``): ours 0.189 s,
nautilus_trader 5.356 s, 28.3x end to end; the 21K file's whole process 1.06x. Their
single-threaded side keeps a core under that load (5.356 s, as on the quiet VM), ours shares
its two. The full script's rows, four runs from the two trees one after another, are in
``docs/measurements/dev_bench_vs_nautilus_loaded_c999ceb.txt``: ours 0.270 and 0.209 s
(34.3x and 30.2x nautilus_trader's time in the same runs) against the base's 0.710 and 0.384
s (15.6x, 21.2x). The quiet-VM round of 43403f7 gave ours 0.222 s and theirs 5.368 s (24.2x);
a quiet round of this branch is still to be run.

Run: ``python scripts/bench_vs_nautilus.py [--rows 1000000] [--repeats 3] [--batch 4096]``
in an environment with ``pip install -e '.[bench]'`` (on this VM a separate venv, so that
the shared one stays without nautilus_trader); without nautilus_trader its rows say
"nautilus_trader not installed (pip install '.[bench]')".
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
BUNDLED = ROOT / "nautilus_pipeline/data/binance-um-btcusdt-trades-20240808.csv"
PERIOD = 100
SYMBOL = "BTCUSDT-PERP"
NOT_INSTALLED = "nautilus_trader not installed (pip install '.[bench]')"


# --- ours --------------------------------------------------------------------------------
def child_ours(csv: str, batch_size: int) -> dict:
    import numpy as np
    from numba import njit

    import nautilus_pipeline as nt
    from nautilus_pipeline.events import KIND_TRADE
    from nautilus_pipeline.io import Replay, Source

    @njit(cache=True, nogil=True)
    def ema_update(price, kind, out, alpha, value, count):
        """NautilusTrader's EMA update over the trade rows; state (value, count) in and out."""
        beta = 1.0 - alpha
        for i in range(price.shape[0]):
            if kind[i] == KIND_TRADE:
                x = price[i]
                if count == 0:
                    value = x
                value = alpha * x + beta * value
                count += 1
            out[i] = value if count else np.nan
        return value, count

    class EmaStage(nt.Stage):
        """EMA(period) of the trade price, NautilusTrader's definition; writes ``ema``."""

        name = "ema"
        reads = ("price", "kind")
        writes = (nt.ColumnSpec("ema", np.dtype(np.float64), fill=np.nan),)

        def __init__(self, period: int):
            self.alpha = 2.0 / (period + 1.0)

        async def start(self, ctx: nt.StageContext) -> None:
            self.value, self.count = 0.0, 0
            self.first_batch_done: float | None = None

        async def process(self, lease: nt.Lease, stream: nt.ComputeStream,
                          ctx: nt.StageContext) -> None:
            self.value, self.count = await stream.run(
                ema_update, lease["price"], lease["kind"], lease["ema"],
                self.alpha, self.value, self.count,
            )
            if self.first_batch_done is None:
                self.first_batch_done = time.perf_counter()

    async def main() -> dict:
        stage = EmaStage(PERIOD)
        t_load = time.perf_counter()  # numba loads the cached kernel (code loading, as imports)
        ema_update(np.zeros(1), np.zeros(1, np.uint8), np.empty(1), stage.alpha, 0.0, 0)
        loaded = set(sys.modules)
        t0 = time.perf_counter()
        async with nt.Pipeline([stage], batch_size=batch_size) as pipe:
            replay = Replay([Source(csv, format="binance_trades", symbol=SYMBOL)],
                            symbols=pipe.symbols)
            async for lease in replay.batches(pipe.pool):
                await pipe.publish_batch(lease, "replay")
        e2e = time.perf_counter() - t0
        replay.accounting.check()
        return {"ticks": stage.count, "e2e_s": e2e, "ema": stage.value,
                "jit_load_s": t0 - t_load, "first_batch_s": stage.first_batch_done - t0,
                "pandas_imported": "pandas" in sys.modules, "scipy_imported": "scipy" in sys.modules,
                "imported_in_clock": sorted(m for m in set(sys.modules) - loaded if "." not in m)}

    nt.configure_logging(level="warning")
    return nt.run(main())


class _HidePandas:
    """A meta path finder that makes ``import pandas`` (and ``import scipy``) fail, as in an
    install of our core dependencies only (neither is one of them)."""

    def find_spec(self, name: str, path: object = None, target: object = None) -> None:
        if name.split(".")[0] in ("pandas", "scipy"):
            raise ModuleNotFoundError(f"No module named {name!r} (hidden by the benchmark)")


# --- theirs ------------------------------------------------------------------------------
def child_nautilus(csv: str) -> dict:
    try:
        import numpy as np
        import pandas as pd
        from nautilus_trader.backtest.engine import BacktestEngine, BacktestEngineConfig
        from nautilus_trader.config import LoggingConfig, StrategyConfig
        from nautilus_trader.indicators import ExponentialMovingAverage
        from nautilus_trader.model.currencies import USDT
        from nautilus_trader.model.enums import AccountType, OmsType
        from nautilus_trader.model.identifiers import InstrumentId, TraderId, Venue
        from nautilus_trader.model.objects import Money, Price
        from nautilus_trader.persistence.wranglers import TradeTickDataWrangler
        from nautilus_trader.test_kit.providers import TestInstrumentProvider
        from nautilus_trader.trading.strategy import Strategy
    except ImportError as exc:
        return {"error": f"{NOT_INSTALLED}: {exc}"}

    class EmaConfig(StrategyConfig, frozen=True):
        instrument_id: str
        period: int = PERIOD

    class EmaStrategy(Strategy):
        def __init__(self, config: EmaConfig):
            super().__init__(config)
            self.ema = ExponentialMovingAverage(config.period)

        def on_start(self) -> None:
            instrument_id = InstrumentId.from_str(self.config.instrument_id)
            self.register_indicator_for_trade_ticks(instrument_id, self.ema)
            self.subscribe_trade_ticks(instrument_id)

    t0 = time.perf_counter()
    engine = BacktestEngine(BacktestEngineConfig(
        trader_id=TraderId("BENCH-001"), logging=LoggingConfig(log_level="ERROR")))
    engine.add_venue(venue=Venue("BINANCE"), oms_type=OmsType.NETTING,
                     account_type=AccountType.MARGIN, base_currency=None,
                     starting_balances=[Money(1_000_000, USDT)])
    instrument = TestInstrumentProvider.btcusdt_perp_binance()
    engine.add_instrument(instrument)
    t1 = time.perf_counter()
    df = pd.read_csv(csv, usecols=["id", "price", "qty", "time", "is_buyer_maker"])
    df = df.rename(columns={"id": "trade_id", "qty": "quantity", "is_buyer_maker": "buyer_maker"})
    df.index = pd.to_datetime(df.pop("time"), unit="ms", utc=True)
    ticks = TradeTickDataWrangler(instrument).process(df)
    t2 = time.perf_counter()
    engine.add_data(ticks)
    strategy = EmaStrategy(EmaConfig(instrument_id=str(instrument.id)))
    engine.add_strategy(strategy)
    t3 = time.perf_counter()
    engine.run()
    t4 = time.perf_counter()
    out = {"ticks": strategy.ema.count, "e2e_s": t4 - t0, "ema": strategy.ema.value,
           "setup_s": t1 - t0, "load_s": t2 - t1, "add_s": t3 - t2, "run_s": t4 - t3}
    # After the clock: how many distinct prices come back from Price's fixed point changed,
    # and by how many ulps at most (the EMA sees Price.raw_to_f64(raw), not the CSV's double).
    distinct = np.unique(df["price"].to_numpy())
    back = np.array([Price(x, instrument.price_precision).as_double() for x in distinct])
    ulps = np.abs(back - distinct) / np.spacing(distinct)
    out.update(prices=len(distinct), prices_changed=int((ulps > 0).sum()), max_ulps=float(ulps.max()))
    engine.dispose()
    return out


# --- parent ------------------------------------------------------------------------------
def run_child(side: str, csv: pathlib.Path, extra: list[str], tree: pathlib.Path = ROOT) -> dict:
    """One side in its own process (this script as ``tree`` has it, that tree's package
    first on the path); its result plus wall and CPU time from ``os.wait4``."""
    cmd = [sys.executable, str(tree / "scripts" / pathlib.Path(__file__).name), "--child", side, str(csv), *extra]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tree), os.environ.get("PYTHONPATH", "")])}
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, cwd=tree, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = code = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(), err.read().decode()
    if code != 0:
        raise SystemExit(f"{side} on {csv} failed ({code}):\n{stderr[-3000:]}")
    result = json.loads(stdout.strip().splitlines()[-1])
    result.update(wall_s=wall, cpu_s=usage.ru_utime + usage.ru_stime,
                  rss_mb=usage.ru_maxrss / 1024)
    return result


def median_of(runs: list[dict]) -> dict:
    if "error" in runs[0]:
        return runs[0]
    timed = {k for k, v in runs[0].items() if k.endswith("_s") or k == "rss_mb"}
    med = {k: statistics.median(r[k] for r in runs) if k in timed else v
           for k, v in runs[0].items()}
    med["ema_same_every_run"] = all(r["ema"] == runs[0]["ema"] for r in runs)
    return med


def make_trades(rows: int, folder: pathlib.Path) -> pathlib.Path:
    path = folder / f"synthetic-trades-{rows}.csv"
    if not path.exists():
        subprocess.run([sys.executable, str(ROOT / "scripts/make_synthetic_trades.py"),
                        "--rows", str(rows), "--out", str(path)],
                       check=True, stdout=subprocess.DEVNULL)
    return path


def ab(other: pathlib.Path, csv: pathlib.Path, repeats: int, extra: list[str]) -> None:
    """Our end to end on ``csv``, this tree beside ``other``, process runs alternating."""
    from nautilus_pipeline.machine import describe

    trees = {"this tree": ROOT, str(other): other}
    for tree in trees.values():  # warm-up, discarded (page cache, numba's kernel cache)
        run_child("ours", csv, extra, tree)
    runs: dict[str, list[dict]] = {k: [] for k in trees}
    for _ in range(repeats):
        for name, tree in trees.items():
            runs[name].append(run_child("ours", csv, extra, tree))
    print(f"machine: {describe()}; load average {os.getloadavg()[0]:.2f} at the end")
    print(f"our side on {csv.name}, {repeats} process runs per tree, alternating")
    print()
    print("| tree | end to end s: median | min | max | process wall s: median | EMA |")
    print("|---|---:|---:|---:|---:|---|")
    for name, rs in runs.items():
        e2e = [r["e2e_s"] for r in rs]
        print(f"| {name} | {statistics.median(e2e):.3f} | {min(e2e):.3f} | {max(e2e):.3f} | "
              f"{statistics.median(r['wall_s'] for r in rs):.3f} | {rs[0]['ema']!r} |")
    first, second = (statistics.median(r["e2e_s"] for r in rs) for rs in runs.values())
    print(f"\nend to end, this tree / the other: {first / second:.3f}; "
          f"same EMA in every run: {len({r['ema'] for rs in runs.values() for r in rs}) == 1}")


SIDES = {
    "ours": "nautilus_pipeline",
    "ours-nopandas": "nautilus_pipeline, pandas+scipy hidden",
    "nautilus": "nautilus_trader",
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000, help="generated trades for the big file")
    ap.add_argument("--repeats", type=int, default=3, help="process runs per side and file")
    ap.add_argument("--batch", type=int, default=4096, help="our pipeline's batch size")
    ap.add_argument("--data-dir", type=pathlib.Path, default=pathlib.Path(tempfile.gettempdir()),
                    help="where the generated CSV is written (kept for the next run)")
    ap.add_argument("--ab", type=pathlib.Path, metavar="TREE",
                    help="only our side on the big file, this tree against another checkout's, "
                         "--repeats process runs each, alternating (a before/after on a noisy machine)")
    ap.add_argument("--child", nargs=2, metavar=("SIDE", "CSV"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if not args.child:
        from nautilus_pipeline.machine import cache_bytecode_in_child_processes

        print(cache_bytecode_in_child_processes())
    if args.ab:
        ab(args.ab.resolve(), make_trades(args.rows, args.data_dir), args.repeats, ["--batch", str(args.batch)])
        return
    if args.child:
        side, csv = args.child
        if side == "ours-nopandas":
            sys.meta_path.insert(0, _HidePandas())
        result = child_nautilus(csv) if side == "nautilus" else child_ours(csv, args.batch)
        print(json.dumps(result))
        return

    from nautilus_pipeline.machine import describe

    have_nt = importlib.util.find_spec("nautilus_trader") is not None
    nt_version = importlib.metadata.version("nautilus_trader") if have_nt else None
    have_pandas = importlib.util.find_spec("pandas") is not None
    files = [("bundled 21K", BUNDLED),
             (f"generated {args.rows / 1e6:g}M", make_trades(args.rows, args.data_dir))]
    sides = ["ours"] + (["ours-nopandas"] if have_pandas else []) + (["nautilus"] if have_nt else [])
    extra = ["--batch", str(args.batch)]
    for side in sides:  # warm-up, discarded: page cache, numba's kernel cache, byte code
        run_child(side, BUNDLED, extra)
    for side in sides[:-1] if have_nt else sides:  # ours on the big file too (its parser's kernel)
        run_child(side, files[1][1], extra)
    results: dict[tuple[str, str], dict] = {}
    for label, path in files:
        runs: dict[str, list[dict]] = {s: [] for s in sides}
        for _ in range(args.repeats):
            for side in sides:  # interleaved, so that a noisy moment hits every side
                runs[side].append(run_child(side, path, extra))
        for side in sides:
            results[label, side] = median_of(runs[side])

    print(f"machine: {describe()}")
    print(f"nautilus_trader {nt_version or '(not installed)'}; EMA({PERIOD}) of every trade's "
          f"price; our batch size {args.batch}; median of {args.repeats} runs, each side its own "
          "process, interleaved")
    print()
    print("| file | impl | ticks | end to end s | ticks/s | process wall s | CPU s | max RSS MB |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for label, _ in files:
        for side, name in SIDES.items():
            r = results.get((label, side))
            if r is None or "error" in r:
                if side == "nautilus":
                    print(f"| {label} | {(r or {}).get('error', NOT_INSTALLED)} | | | | | | |")
                continue
            print(f"| {label} | {name} | {r['ticks']:,} | {r['e2e_s']:.3f} | "
                  f"{r['ticks'] / r['e2e_s']:,.0f} | {r['wall_s']:.3f} | {r['cpu_s']:.2f} | "
                  f"{r['rss_mb']:.0f} |")
    print()
    print("ours/theirs: end to end = their end-to-end time / ours (ticks/s ratio); process wall "
          "= their whole-process wall / ours (> 1: ours is faster)")
    for label, _ in files:
        theirs = results.get((label, "nautilus"))
        if theirs is not None and "error" in theirs:
            theirs = None
        print(f"{label}:")
        for side in ("ours", "ours-nopandas"):
            ours = results.get((label, side))
            if ours is None:
                continue
            line = (f"  {SIDES[side]}: EMA {ours['ema']!r}; numba kernel load "
                    f"{ours['jit_load_s']:.3f} s (before the end-to-end clock), first batch "
                    f"through the stage {ours['first_batch_s']:.3f} s after it starts; modules "
                    f"imported inside the clock: {', '.join(ours['imported_in_clock']) or 'none'}; "
                    f"pandas/scipy in the process: {ours['pandas_imported']}/{ours['scipy_imported']}")
            if theirs is not None:
                line += (f"; end to end {theirs['e2e_s'] / ours['e2e_s']:.1f}x, process wall "
                         f"{theirs['wall_s'] / ours['wall_s']:.2f}x, CPU "
                         f"{theirs['cpu_s'] / ours['cpu_s']:.2f}x less")
            print(line)
        if theirs is None:
            print(f"  {NOT_INSTALLED}")
            continue
        ours = results[label, "ours"]
        print(f"  nautilus_trader: EMA {theirs['ema']!r}; phases: engine set-up "
              f"{theirs['setup_s']:.3f} s, read_csv + wrangle {theirs['load_s']:.3f} s, add_data "
              f"{theirs['add_s']:.3f} s, run {theirs['run_s']:.3f} s")
        same = all(r["ema_same_every_run"] for r in results.values() if "ema" in r)
        print(f"  EMA difference ours - theirs: {ours['ema'] - theirs['ema']:.3e} "
              f"(every run gave the same value on each side: {same}); "
              f"{theirs['prices_changed']} of {theirs['prices']} distinct prices change in "
              f"nautilus_trader's fixed-point Price, by <= {theirs['max_ulps']:.0f} ulp")


if __name__ == "__main__":
    main()
