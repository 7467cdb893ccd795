"""The ``nautilus-pipeline`` command line: run, report, devices, inspect, validate.

Exit codes: 0 success; 2 bad arguments; 3 bad pipeline definition; 4 unreadable or bad
data; 1 any other pipeline error; 130 interrupted (Ctrl-C: the run drains, writes what it
processed and prints its summary first). Errors are one line on stderr, no traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson

from . import __version__
from .errors import ConfigError, DataError, PipelineError

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_CONFIG, EXIT_DATA, EXIT_INTERRUPTED = 0, 1, 2, 3, 4, 130

EXAMPLES = {  # shown under each command's --help
    "run": """examples:
  nautilus-pipeline run pipelines/default.toml
  nautilus-pipeline run pipelines/vpin.toml --ticks my_trades.csv.gz --batch 1024 --out out/vpin
  nautilus-pipeline run pipelines/default.toml --speed 10          # 10x faster than the market
  nautilus-pipeline run pipelines/vpin.toml --ticks ETHUSDT-trades-2024-08-08.csv --format binance_trades --symbol ETHUSDT
  nautilus-pipeline run pipelines/default.toml --log-format json 2> run.log""",
    "report": """examples:
  nautilus-pipeline report out/default              # writes out/default/report.png
  nautilus-pipeline report out/default --html       # and a self-contained report.html""",
    "devices": """examples:
  nautilus-pipeline devices
  nautilus-pipeline devices --calibrate             # time the model on every usable backend""",
    "inspect": """examples:
  nautilus-pipeline inspect trades.csv
  nautilus-pipeline inspect data/*.csv data/*.parquet
  nautilus-pipeline inspect glbx-mbp1.dbn.zst --format databento""",
    "validate": """examples:
  nautilus-pipeline validate pipelines/default.toml
  nautilus-pipeline validate pipelines/*.toml""",
}


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="nautilus-pipeline",
        description="Replay tick files through an asyncio pipeline: features, inference, "
        "VPIN, risk and signals on numpy, torch, MLX or Core ML.",
        epilog="Run 'nautilus-pipeline COMMAND --help' for a command's options and examples.",
    )
    ap.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND", required=True)
    fmt = argparse.RawDescriptionHelpFormatter

    run = sub.add_parser("run", help="replay tick files through a pipeline", epilog=EXAMPLES["run"],
                         formatter_class=fmt)
    run.add_argument("pipeline", help="pipeline definition (TOML), e.g. pipelines/default.toml")
    run.add_argument("--ticks", nargs="+", metavar="FILE", help="replay these files instead of the definition's sources")
    run.add_argument("--format", help="reader for the --ticks files (default: detected; see 'inspect')")
    run.add_argument("--symbol", help="instrument name for single-symbol --ticks files")
    run.add_argument("--speed", type=float, help="0 = as fast as possible; X = X times faster than the market")
    run.add_argument("--batch", type=int, help="ticks per batch (overrides pipeline.batch_size)")
    run.add_argument("--out", help="output folder (overrides outputs.dir)")
    run.add_argument("--log-format", choices=("auto", "json", "console"), default="auto",
                     help="logs on stderr: JSON lines or console (default: console on a terminal)")
    run.add_argument("--log-level", default="warning", choices=("debug", "info", "warning", "error"))
    run.add_argument("--no-progress", action="store_true", help="no progress bar even on a terminal")
    run.add_argument("--metrics-port", type=int, metavar="PORT",
                     help="serve Prometheus metrics on this port while the run lasts")
    run.add_argument("--trace-every", type=int, default=0,
                     help="keep every Nth trade in trace.parquet for the report (default: about 200k points)")

    rep = sub.add_parser("report", help="draw price, signals, VPIN, P&L and latencies of a run",
                         epilog=EXAMPLES["report"], formatter_class=fmt)
    rep.add_argument("dir", help="a run's output folder")
    rep.add_argument("--html", action="store_true", help="also write a self-contained report.html")

    dev = sub.add_parser("devices", help="compute backends usable here, and why not the others",
                         epilog=EXAMPLES["devices"], formatter_class=fmt)
    dev.add_argument("--calibrate", action="store_true", help="time the default model per backend and batch size")
    dev.add_argument("--model", help="model file to calibrate (default: the bundled model)")

    ins = sub.add_parser("inspect", help="format, columns, rows, time span, symbols and bad rows of a tick file",
                         epilog=EXAMPLES["inspect"], formatter_class=fmt)
    ins.add_argument("files", nargs="+", metavar="FILE")
    ins.add_argument("--format", help="reader to use (default: detected)")
    ins.add_argument("--symbol", help="instrument name for single-symbol files")

    val = sub.add_parser("validate", help="check a pipeline definition without running it",
                         epilog=EXAMPLES["validate"], formatter_class=fmt)
    val.add_argument("pipelines", nargs="+", metavar="PIPELINE")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from .runtime import configure_logging

    configure_logging(getattr(args, "log_format", "auto"), getattr(args, "log_level", "warning"))
    handlers = {"run": cmd_run, "report": cmd_report, "devices": cmd_devices,
                "inspect": cmd_inspect, "validate": cmd_validate}
    try:
        return handlers[args.command](args)
    except ConfigError as exc:
        return _fail(exc, EXIT_CONFIG)
    except DataError as exc:
        return _fail(exc, EXIT_DATA)
    except PipelineError as exc:
        return _fail(exc, EXIT_ERROR)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def _fail(exc: Exception, code: int) -> int:
    print(f"nautilus-pipeline: error: {exc}", file=sys.stderr)
    return code


# --- run -------------------------------------------------------------------------------
def cmd_run(args: argparse.Namespace) -> int:
    from .runtime import run

    if args.batch is not None and args.batch < 1:
        raise ConfigError(f"--batch must be >= 1, got {args.batch}")
    if args.speed is not None and args.speed < 0:
        raise ConfigError(f"--speed must be >= 0, got {args.speed}")
    for f in args.ticks or ():
        if not Path(f).is_file():
            raise DataError(f"--ticks {f}: no such file")
    return run(_run(args))


async def _run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from . import config
    from .io import Replay
    from .io.sinks import EventSink
    from .stages.recorder import TRACE_COLUMNS, RecorderStage

    definition = config.load(args.pipeline)
    out_dir = Path(args.out or definition.outputs["dir"])
    sources = config.make_sources(definition, args.ticks, out_dir)
    if args.ticks:
        for src in sources:
            src.format = args.format or src.format
            src.symbol = args.symbol or src.symbol
    if not sources:
        raise ConfigError(f"{definition.path}: no [[sources]]; give tick files with --ticks FILE")
    stages = config.build_stages(definition, sources)
    expected = _estimate_rows(sources)
    every = args.trace_every or max(1, (expected or 0) // 200_000)
    written = {c.name for s in stages for c in s.writes} | {"ts_ns", "symbol_id", "price"}
    stages.append(RecorderStage(out_dir / "trace.parquet", every=every,
                                available=tuple(c for c in TRACE_COLUMNS if c in written)))
    pipe = config.build_pipeline(definition, stages, batch_size=args.batch)
    speed = args.speed if args.speed is not None else definition.replay["speed"]
    replay = Replay(sources, speed=speed or None, symbols=pipe.symbols)
    sink = EventSink(out_dir, definition.outputs["topics"], definition.outputs["formats"])
    err = Console(stderr=True)
    show_progress = err.is_terminal and not args.no_progress

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    try:
        loop.add_signal_handler(signal.SIGINT, stop.set)
    except (NotImplementedError, RuntimeError):  # pragma: no cover - Windows
        pass
    metrics = None
    if args.metrics_port is not None:
        from .prometheus import MetricsExporter

        metrics = MetricsExporter(args.metrics_port)
    t0 = time.perf_counter()
    interrupted = False
    try:
        async with pipe:
            sink.attach(pipe.bus)
            with _progress(err, show_progress, expected) as advance:
                interrupted = await _replay_into(pipe, replay, advance, metrics, stop)
        if metrics is not None:
            metrics.update(pipe, replay)
    finally:
        if metrics is not None:
            metrics.close()
        try:
            loop.remove_signal_handler(signal.SIGINT)
        except (NotImplementedError, RuntimeError):  # pragma: no cover
            pass
        sink.close()
    wall = time.perf_counter() - t0
    summary = _summary(definition, pipe, replay, sink, wall, interrupted)
    (out_dir / "summary.json").write_bytes(orjson.dumps(summary, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY))
    _print_summary(summary, out_dir)
    if not interrupted:
        replay.accounting.check()
    return EXIT_INTERRUPTED if interrupted else EXIT_OK


async def _replay_into(pipe, replay, advance, metrics, stop: asyncio.Event) -> bool:
    """Feed the replay's batches to the pipeline until the end or Ctrl-C; True if interrupted."""
    async with contextlib.aclosing(replay.batches(pipe.pool)) as batches:
        async for lease in batches:
            await pipe.publish_batch(lease, "replay")
            advance(replay.progress.ticks_delivered, replay.progress.ts_reached_ns)
            if metrics is not None:
                metrics.update(pipe, replay)
            if stop.is_set():
                return True
    return False


class _progress:
    """A rich progress bar (ticks, ticks/s, ETA) on a terminal; nothing when piped."""

    def __init__(self, console: Any, enabled: bool, total: int | None):
        self.enabled = enabled
        self.total = total
        self.console = console

    def __enter__(self):
        if not self.enabled:
            return lambda ticks, ts: None
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.bar = Progress(
            TextColumn("[bold]replay"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[rate]} ticks/s"), TextColumn("{task.fields[market]}"),
            TimeElapsedColumn(), TimeRemainingColumn(),
            console=self.console, transient=True,
        )
        self.bar.start()
        task = self.bar.add_task("replay", total=self.total, rate="-", market="")
        t0 = time.perf_counter()

        def advance(ticks: int, ts: int | None) -> None:
            dt = time.perf_counter() - t0
            market = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ts / 1e9)) if ts else ""
            self.bar.update(task, completed=ticks, rate=f"{ticks / dt:,.0f}" if dt > 0 else "-",
                            market=market)

        return advance

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            self.bar.stop()


def _estimate_rows(sources: list[Any]) -> int | None:
    """Rows in the sources when cheap to know (Parquet metadata, newlines of plain text)."""
    total = 0
    for src in sources:
        path = Path(src.path)
        name = path.name.lower()
        try:
            if name.endswith(".parquet"):
                import pyarrow.parquet as pq

                total += pq.ParquetFile(path).metadata.num_rows
            elif name.endswith((".csv", ".jsonl", ".txt")) and path.stat().st_size < 8 << 30:
                with open(path, "rb") as fh:
                    total += sum(chunk.count(b"\n") for chunk in iter(lambda: fh.read(1 << 24), b""))
            else:
                return None
        except OSError:
            return None
    return total or None


def _summary(definition, pipe, replay, sink, wall: float, interrupted: bool) -> dict[str, Any]:
    from .machine import describe

    acct = replay.accounting.total
    stats = pipe.stats()
    return {
        "pipeline": definition.name,
        "definition": str(definition.path),
        "machine": describe(),
        "interrupted": interrupted,
        "wall_s": wall,
        "ticks": {
            "read": acct.read,
            "delivered": acct.delivered,
            "rejected": acct.rejected,
            "quarantined": acct.quarantined,
            "by_reason": dict(acct.by_reason),
            "processed": stats["ticks"]["ticks_out"],
            "failed_in_stages": stats["ticks"]["ticks_failed"],
            "ticks_per_s": stats["ticks"]["ticks_out"] / wall if wall > 0 else 0.0,
        },
        "accounting": replay.accounting.as_dict(),
        "stages": stats["stages"],
        "pool": stats["pool"],
        "leaked_leases": stats["leaked_leases"],
        "outputs": dict(sink.counts),
        "vpin_threshold": next((s.params["threshold"] for s in pipe.stages if hasattr(s, "params")
                                and isinstance(s.params, dict) and "threshold" in s.params), 0.9),
        "symbols": pipe.symbols.names,
    }


def _print_summary(summary: dict[str, Any], out_dir: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 140)
    t = summary["ticks"]
    title = f"{summary['pipeline']}: {t['processed']:,} ticks in {summary['wall_s']:.2f} s ({t['ticks_per_s']:,.0f} ticks/s)"
    if summary["interrupted"]:
        title += " (interrupted: partial run)"
    ticks = Table(title=title, title_justify="left")
    for col in ("read", "delivered", "rejected", "quarantined", "failed in stages"):
        ticks.add_column(col, justify="right")
    ticks.add_row(*(f"{t[k]:,}" for k in ("read", "delivered", "rejected", "quarantined", "failed_in_stages")))
    console.print(ticks)
    if t["by_reason"]:
        console.print("bad rows by reason: " + ", ".join(f"{k}={v:,}" for k, v in t["by_reason"].items()))
    unsent = t["read"] - t["delivered"] - t["rejected"] - t["quarantined"]
    if summary["interrupted"] and unsent:
        console.print(f"read ahead but not replayed before the interrupt: {unsent:,} rows")

    st = Table(title="stages (latency per batch)", title_justify="left")
    for col in ("stage", "stream", "fallback", "batches", "rows/s", "p50 µs", "p95 µs", "p99 µs", "max µs", "fallbacks"):
        st.add_column(col, justify="right" if col not in ("stage", "stream", "fallback") else "left")
    for s in summary["stages"]:
        lat = s["batch_latency"]
        st.add_row(s["stage"], s["stream"], s["fallback"] or "-", f"{s['batches']:,}", f"{s['rows_per_s']:,.0f}",
                   *(f"{lat[k]:,.1f}" for k in ("p50_us", "p95_us", "p99_us", "max_us")), str(s["fallbacks"]))
    console.print(st)
    skipped = [(s["stage"], x) for s in summary["stages"] for x in s["skipped_streams"]]
    for stage, why in skipped:
        console.print(f"  {stage}: skipped {why}", markup=False)
    for s in summary["stages"]:
        for note in s.get("notes", ()):
            console.print(f"  {s['stage']}: {note}", markup=False)

    p = summary["pool"]
    pool = Table(title="buffer pool", title_justify="left")
    for col in ("slabs", "rows/slab", "memory", "high-water", "acquire waits", "wait s", "bytes h→d", "bytes d→h"):
        pool.add_column(col, justify="right")
    pool.add_row(str(p["slabs"]), f"{p['capacity']:,}", p["memory"], str(p["high_water"]), f"{p['acquire_waits']:,}",
                 f"{p['acquire_wait_s']:.3f}", f"{p['bytes_copied_h2d']:,}", f"{p['bytes_copied_d2h']:,}")
    console.print(pool)
    outs = ", ".join(f"{k}: {v:,}" for k, v in summary["outputs"].items()) or "none"
    console.print(f"outputs ({outs}) in {out_dir}/; draw them with: nautilus-pipeline report {out_dir}")
    console.print(f"machine: {summary['machine']}", markup=False)
    if summary["leaked_leases"]:
        console.print(f"[red]leaked leases: {summary['leaked_leases']}")


# --- report ----------------------------------------------------------------------------
def cmd_report(args: argparse.Namespace) -> int:
    from .report import write_report

    paths = write_report(Path(args.dir), html_page=args.html)
    for p in paths:
        print(p)
    return EXIT_OK


# --- devices ---------------------------------------------------------------------------
def cmd_devices(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from .compute import discover

    table = Table(title="compute streams", title_justify="left")
    table.add_column("stream")
    table.add_column("usable")
    table.add_column("runs on / why not")
    infos = discover()
    for info in infos:
        table.add_row(info.name, "yes" if info.usable else "no", escape(info.reason))
    console = Console(width=None if sys.stdout.isatty() else 160)
    console.print(table)
    if args.calibrate:
        from .model.runners import calibrate
        from .model.spec import DEFAULT_MODEL_PATH, load_model

        spec, weights = load_model(args.model or DEFAULT_MODEL_PATH)
        from threadpoolctl import threadpool_limits

        usable = [("numpy" if i.name == "cpu" else i.name) for i in infos if i.usable]
        with threadpool_limits(1, user_api="blas"):  # as a running pipeline has it
            cal = calibrate(usable, spec, weights)
        console.print(f"\nmodel {Path(args.model or DEFAULT_MODEL_PATH).name}: "
                      f"{spec.n_inputs} inputs → {' → '.join(map(str, spec.hidden))} → 1")
        console.print(cal.format(), markup=False)
        console.print("route: " + ", ".join(f"batch ≤ {b}: {r}" for b, r in cal.route.items()))
    return EXIT_OK


# --- inspect ---------------------------------------------------------------------------
def cmd_inspect(args: argparse.Namespace) -> int:
    for i, name in enumerate(args.files):
        if i:
            print()
        _inspect_one(Path(name), args.format, args.symbol)
    return EXIT_OK


def _inspect_one(path: Path, format: str | None, symbol: str | None) -> None:
    import numpy as np

    from .events import KIND_TRADE
    from .io import Replay, Source, detect_format

    if not path.is_file():
        raise DataError(f"{path}: no such file")
    fmt = format or detect_format(path)
    replay = Replay([Source(path, format=fmt, symbol=symbol, policy="reject")])
    rows = trades = 0
    first = last = None
    present: set[str] = set()
    for block in replay.iter_arrays():
        n = len(block["ts_ns"])
        if not n:
            continue
        rows += n
        trades += int((block["kind"] == KIND_TRADE).sum())
        first = int(block["ts_ns"][0]) if first is None else first
        last = int(block["ts_ns"][-1])
        for name, col in block.items():
            if col.dtype.kind == "f" and not np.isnan(col).all():
                present.add(name)
            elif col.dtype.kind in "iu" and name not in ("symbol_id", "kind") and (col != -1).any():
                present.add(name)
    acct = replay.accounting.total

    def iso(ns: int | None) -> str:
        if ns is None:
            return "-"
        return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ns / 1e9)) + f".{ns % 1_000_000_000:09d}Z"

    span = (last - first) / 1e9 if first is not None and last is not None else math.nan
    info = {
        "file": str(path),
        "format": fmt,
        "rows_read": acct.read,
        "ticks": rows,
        "trades": trades,
        "quotes": rows - trades,
        "tick_columns_filled": sorted(present | {"ts_ns", "symbol_id", "kind"}),
        "first_ts": iso(first),
        "last_ts": iso(last),
        "span_s": span,
        "symbols": replay.symbols.names,
        "bad_rows": acct.rejected,
        "bad_rows_by_reason": dict(acct.by_reason),
        "lines_ignored": sum(replay.accounting.ignored.values()),
    }
    width = max(len(k) for k in info)
    for k, v in info.items():
        print(f"{k:<{width}}  {', '.join(map(str, v)) if isinstance(v, list) else v}")


# --- validate --------------------------------------------------------------------------
def cmd_validate(args: argparse.Namespace) -> int:
    for name in args.pipelines:
        _validate_one(name)
    return EXIT_OK


def _validate_one(name: str) -> None:
    from . import config

    definition = config.load(name)
    sources = config.make_sources(definition, None, None)
    for src in sources:
        if not Path(src.path).is_file():
            raise DataError(f"{definition.path}: source {src.path} does not exist")
    stages = config.build_stages(definition, sources)
    pipe = config.build_pipeline(definition, stages)
    print(f"{definition.path}: ok — pipeline {definition.name!r}, {len(sources)} source(s), "
          f"stages {' → '.join(s.name for s in pipe.stages)}, batch {pipe.batch_size}")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
