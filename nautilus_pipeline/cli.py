"""The ``nautilus-pipeline`` command line: run, report, devices, inspect, validate.

Exit codes: 0 success; 2 bad arguments; 3 bad pipeline definition; 4 unreadable or bad
data; 5 the run finished but a stage failed on some batches (their ticks were dead-lettered;
``summary.json`` counts them); 1 any other error (an output that cannot be written: a full
disk); 130 interrupted by Ctrl-C (SIGINT) and 143 terminated (SIGTERM): the run drains,
writes what it processed and prints its summary first; a second signal stops at once.
Errors are one line on stderr, no traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
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
EXIT_STAGE_FAILED, EXIT_TERMINATED = 5, 143


class UsageError(PipelineError):
    """A command-line argument that is wrong in a way argparse cannot see (exit 2)."""


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived before the run was under way (while reading, calibrating, building)."""


# Signals whose exception was raised before the run's own handlers took over. Python drops
# an exception raised while a finaliser or a weakref callback runs ("Exception ignored in"),
# so a raise alone can be lost; the run checks this list before it starts (see
# _raise_if_a_signal_was_lost).
_signals_raised: list[int] = []


def _raise_terminated(signum: int, frame: object) -> None:
    _signals_raised.append(signum)
    raise Terminated()


def _raise_interrupted(signum: int, frame: object) -> None:
    # Not signal.default_int_handler: asyncio.Runner would replace that with a handler that
    # only cancels the main task at its next await, i.e. after a long synchronous pre-read.
    _signals_raised.append(signum)
    raise KeyboardInterrupt()


def _quiet_lost_signal(previous):
    """A ``sys.unraisablehook`` that drops the swallowed exception of a signal noted in
    ``_signals_raised`` (raised again before the run; its traceback, from a finaliser or a C
    callback such as llvmlite's while numba loads a reader's parser, is no error), and
    passes anything else to ``previous``."""

    def hook(unraisable) -> None:
        if _signals_raised and isinstance(unraisable.exc_value, KeyboardInterrupt):
            return
        previous(unraisable)

    return hook


def _raise_if_a_signal_was_lost() -> None:
    """Stop now if a signal came before the run started and its exception was swallowed."""
    if _signals_raised:
        raise Terminated() if _signals_raised[0] == signal.SIGTERM else KeyboardInterrupt()


def _ranged(kind: type, lo: float | None = None, hi: float | None = None, what: str = ""):
    """An argparse ``type`` accepting ``kind`` values in ``[lo, hi]`` (argparse exits 2 otherwise)."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if (isinstance(value, float) and not math.isfinite(value)) or (lo is not None and value < lo) \
                or (hi is not None and value > hi):
            bounds = f">= {lo}" if hi is None else f"from {lo} to {hi:,}"
            raise argparse.ArgumentTypeError(f"{text} is out of range: {what} {bounds}")
        return value

    return parse


FORMAT_NAMES = ("arrow", "binance_agg_trades", "binance_feed", "binance_trades", "csv", "databento", "histdata",
                "json", "jsonl", "lobster", "parquet", "tardis_book_l2", "tardis_book_snapshot", "tardis_quotes", "tardis_trades",
                "truefx")
"""The readers' format names (``io.READERS``; a test keeps the two equal), for ``--help``."""
MAP_HELP = ("column mapping for generic CSV/Parquet/JSON files: field=column[:option],... e.g. "
            "ts=time:ms,price=px,size=qty,side=side:buy/sell (pipelines/README.md lists the fields)")


def _column_map(text: str) -> dict:
    from .errors import ConfigError
    from .io.table import mapping_from_text

    try:
        return mapping_from_text(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _format_name(text: str) -> str:
    from .io import READERS

    if text not in READERS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a format; one of {', '.join(sorted(READERS))}")
    return text

EXAMPLES = {  # shown under each command's --help
    "run": """examples:
  nautilus-pipeline run default                               # a bundled definition, from any folder
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
  nautilus-pipeline inspect glbx-mbp1.dbn.zst --format databento
  nautilus-pipeline inspect data/* --json > inventory.json   # exit code: the worst file's""",
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
    run.add_argument("pipeline", help="pipeline definition: a TOML file, or the name of a bundled "
                     "one (default, vpin, quotes, portfolio, gpu)")
    from .config import MAX_BATCH_SIZE

    run.add_argument("--ticks", nargs="+", metavar="FILE", help="replay these files instead of the definition's sources")
    run.add_argument("--format", type=_format_name, help="reader for the --ticks files (default: detected; see "
                     f"'inspect'): {', '.join(FORMAT_NAMES)}")
    run.add_argument("--map", type=_column_map, metavar="FIELD=COL,...", help=MAP_HELP + "; applies to --ticks")
    run.add_argument("--symbol", help="instrument name for single-symbol --ticks files")
    run.add_argument("--order-by", choices=("ts_event", "ts_recv"),
                     help="timestamp every source is replayed by (overrides the definition; default "
                          "per source: event time, receive time where the venue's event times go back)")
    run.add_argument("--speed", type=_ranged(float, 0, None, "a speed"),
                     help="0 = as fast as possible; X = X times faster than the market")
    run.add_argument("--batch", type=_ranged(int, 1, MAX_BATCH_SIZE, "a number of ticks"),
                     help="ticks per batch (overrides pipeline.batch_size)")
    run.add_argument("--execution", choices=("concurrent", "serial"),
                     help="overrides pipeline.execution (serial: every stage on the loop thread)")
    run.add_argument("--cores", type=_ranged(int, 1, 65_536, "a number of cores"),
                     help="cores the stages may keep busy, the loop's included (overrides "
                          "pipeline.cores; default: every core this process may use)")
    run.add_argument("--out", help="output folder (overrides outputs.dir)")
    run.add_argument("--log-format", choices=("auto", "json", "console"), default="auto",
                     help="logs on stderr: JSON lines or console (default: console on a terminal)")
    run.add_argument("--log-level", default="warning", choices=("debug", "info", "warning", "error"))
    run.add_argument("--no-progress", action="store_true", help="no progress bar even on a terminal")
    run.add_argument("--metrics-addr", metavar="HOST:PORT",
                     help="serve Prometheus metrics on HOST:PORT while the run lasts "
                          "(host defaults to 127.0.0.1: ':9100' is local only)")
    run.add_argument("--metrics-port", metavar="PORT", help="same as --metrics-addr 127.0.0.1:PORT")
    run.add_argument("--trace-every", type=_ranged(int, 0, None, "a number of trades"), default=0,
                     help="keep every Nth trade in trace.parquet for the report (default: about 200k points)")

    from .bridge.cli import add_publish_parser, add_run_arguments  # the NATS bridge's options

    add_run_arguments(run)
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
    ins.add_argument("--format", type=_format_name, help=f"reader to use (default: detected): {', '.join(FORMAT_NAMES)}")
    ins.add_argument("--map", type=_column_map, metavar="FIELD=COL,...", help=MAP_HELP)
    ins.add_argument("--symbol", help="instrument name for single-symbol files")
    ins.add_argument("--json", action="store_true", help="one JSON array on stdout, an object per file")
    ins.add_argument("--log-format", choices=("auto", "json", "console"), default="auto",
                     help="logs and errors on stderr: JSON lines or console (default: console on a terminal)")
    ins.add_argument("--log-level", default="warning", choices=("debug", "info", "warning", "error"))

    val = sub.add_parser("validate", help="check a pipeline definition without running it",
                         epilog=EXAMPLES["validate"], formatter_class=fmt)
    val.add_argument("pipelines", nargs="+", metavar="PIPELINE")
    _add_batch_parser(sub, fmt)
    add_publish_parser(sub, fmt, _format_name)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from .runtime import configure_logging

    configure_logging(getattr(args, "log_format", "auto"), getattr(args, "log_level", "warning"))
    _ERRORS.json = getattr(args, "log_format", "auto") == "json"
    handlers = {"run": cmd_run, "report": cmd_report, "devices": cmd_devices,
                "inspect": cmd_inspect, "validate": cmd_validate, "batch": cmd_batch,
                "publish": _cmd_publish}
    from .prometheus import MetricsAddressError

    try:
        return handlers[args.command](args)
    except (MetricsAddressError, UsageError) as exc:
        return _fail(exc, EXIT_USAGE)
    except ConfigError as exc:
        return _fail(exc, EXIT_CONFIG)
    except DataError as exc:
        return _fail(exc, EXIT_DATA)
    except PipelineError as exc:
        return _fail(exc, EXIT_ERROR)
    except OSError as exc:  # an output that cannot be written (full disk, removed folder)
        where = f": {exc.filename}" if getattr(exc, "filename", None) else ""
        return _fail(f"{exc.strerror or exc}{where}", EXIT_ERROR)
    except Terminated:
        print("terminated", file=sys.stderr)
        return EXIT_TERMINATED
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


class _ERRORS:
    """How the final error is written: one plain line, or (``--log-format json``) one JSON
    log line like every other line on stderr."""

    json = False


def _fail(exc: Exception | str, code: int) -> int:
    if _ERRORS.json:
        import structlog

        structlog.get_logger("nautilus_pipeline.cli").error(
            "command_failed", error=str(exc), error_type=type(exc).__name__, exit_code=code)
    else:
        print(f"nautilus-pipeline: error: {exc}", file=sys.stderr)
    return code


# --- run -------------------------------------------------------------------------------
def cmd_run(args: argparse.Namespace) -> int:
    from .io.files import check_file
    from .runtime import run

    if args.nats is None and (args.durable or args.export is not None):
        raise UsageError("--durable and --export apply to --nats runs")
    if args.nats is None and args.ws is None and args.until_idle is not None:
        raise UsageError("--until-idle applies to --nats and --ws runs")
    if args.nats is not None and args.ws is not None:
        raise UsageError("give --nats or --ws, not both ('publish --ws' feeds a stream that 'run --nats' reads)")
    if (args.nats is not None or args.ws is not None) and args.ticks:
        raise UsageError(f"--{'nats' if args.nats is not None else 'ws'} feeds the pipeline instead of "
                         "files: give --ticks or that, not both")
    if args.ws is not None and not args.flush_us > 0:
        raise UsageError(f"--flush-us must be > 0, got {args.flush_us}")
    if (args.format or args.symbol or args.map) and not args.ticks:
        raise UsageError(f"--{'format' if args.format else 'symbol' if args.symbol else 'map'} applies to --ticks files; give --ticks FILE "
                         "(or set it in the definition's [[sources]])")
    if args.out is not None:
        _check_out(Path(args.out), "--out", UsageError)
    for f in args.ticks or ():
        try:
            if Path(f).is_dir():  # a NautilusTrader catalog folder: its files are checked
                from .io.nautilus import catalog_files

                catalog_files(f)
            else:
                check_file(f)
        except DataError as exc:
            raise DataError(f"--ticks {exc}") from None
    # Until the run is under way (and again after it), a signal stops at once: reading the
    # sources for bucket_volume = "auto" or building the stages can take long.
    _metrics_address(args)  # a malformed address is refused before anything is read
    _signals_raised.clear()
    previous = {signal.SIGINT: signal.signal(signal.SIGINT, _raise_interrupted),
                signal.SIGTERM: signal.signal(signal.SIGTERM, _raise_terminated)}
    unraisable = sys.unraisablehook
    sys.unraisablehook = _quiet_lost_signal(unraisable)
    try:
        if args.nats is not None:
            from .bridge.cli import run_live

            return run(run_live(args))
        if args.ws is not None:
            from .bridge.cli import run_ws

            return run(run_ws(args))
        return run(_run(args))
    finally:
        sys.unraisablehook = unraisable
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _cmd_publish(args: argparse.Namespace) -> int:
    from .bridge.cli import cmd_publish, publish_usage_error

    wrong = publish_usage_error(args)
    if wrong is not None:
        raise UsageError(wrong)
    return cmd_publish(args)


def _check_out(out: Path, what: str, error: type[PipelineError]) -> None:
    from .app import check_out_dir

    check_out_dir(out, what, error)


def _metrics_address(args: argparse.Namespace) -> str | None:
    """``--metrics-addr`` (or ``--metrics-port``) checked before the run: exit 2 when malformed."""
    from .prometheus import MetricsAddressError, parse_address

    if args.metrics_addr is not None and args.metrics_port is not None:
        raise MetricsAddressError("give --metrics-addr HOST:PORT or --metrics-port PORT, not both")
    address = args.metrics_addr if args.metrics_addr is not None else args.metrics_port
    if address is not None:
        try:
            parse_address(address)
        except MetricsAddressError as exc:
            if args.metrics_addr is None:  # name the option the user gave
                raise MetricsAddressError(
                    str(exc).replace("--metrics-addr", "--metrics-port", 1)) from None
            raise
    return address


async def _run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from .app import Run

    run = Run(args.pipeline, ticks=args.ticks, format=args.format, symbol=args.symbol, mapping=args.map,
              order_by=args.order_by, speed=args.speed, batch_size=args.batch,
              execution=args.execution, out_dir=args.out, trace_every=args.trace_every,
              pipeline_settings={"cores": args.cores})
    pipe, replay = run.pipeline, run.replay
    err = Console(stderr=True)
    show_progress = err.is_terminal and not args.no_progress

    metrics = None
    if _metrics_address(args) is not None:
        from .prometheus import MetricsAddressError, MetricsExporter

        try:
            metrics = MetricsExporter(_metrics_address(args), pipeline=run.name)
        except MetricsAddressError as exc:
            if args.metrics_addr is not None:
                raise
            raise MetricsAddressError(str(exc).replace("--metrics-addr", "--metrics-port", 1)) from None
    stop = asyncio.Event()
    got: list[int] = []  # signals received, in order
    loop = asyncio.get_running_loop()

    def on_signal(signum: int) -> None:
        got.append(signum)
        if len(got) == 1:
            stop.set()  # drain, write, summarise
        else:  # a second signal: stop at once (the default action of that signal)
            for sig in (signal.SIGINT, signal.SIGTERM):
                with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                    loop.remove_signal_handler(sig)
            signal.signal(signum, signal.SIG_DFL if signum != signal.SIGINT else signal.default_int_handler)
            os.kill(os.getpid(), signum)

    _raise_if_a_signal_was_lost()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):  # pragma: no cover - Windows
            loop.add_signal_handler(sig, on_signal, sig)
    try:
        expected = run.estimate_rows() if show_progress else None
        with _progress(err, show_progress, expected, replay) as advance:

            def on_batch() -> None:
                advance(replay.progress.ticks_delivered, replay.progress.ts_reached_ns)
                if metrics is not None:
                    metrics.update(pipe, replay)

            summary = await run.execute(stop=stop, on_batch=on_batch)
        if metrics is not None and summary.write_error is None:
            metrics.update(pipe, replay, force=True)
    finally:
        if metrics is not None:
            metrics.close()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):  # pragma: no cover
                loop.remove_signal_handler(sig)
        signal.signal(signal.SIGINT, _raise_interrupted)
        signal.signal(signal.SIGTERM, _raise_terminated)
    out_dir = run.out_dir
    report = summary.as_dict()
    _print_summary(report, out_dir)
    _warn_if_nothing_produced(report)
    if summary.write_error is not None:
        raise PipelineError(f"cannot write the outputs in {out_dir} ({summary.write_error}); the run stopped there: "
                            "its JSON lines end at a whole line, files that could not be written whole are not there")
    if summary.interrupted and got:
        return EXIT_TERMINATED if got[0] == signal.SIGTERM else EXIT_INTERRUPTED
    replay.accounting.check()
    failed = summary.ticks.failed_batches
    if failed:
        stages = ", ".join(f"{s['stage']} ({s['failures']})" for s in summary.stages if s["failures"])
        print(f"nautilus-pipeline: error: {failed} batch(es) failed in stages: {stages}; their "
              f"{summary.ticks.failed_in_stages:,} ticks were dead-lettered (see the logs)", file=sys.stderr)
        return EXIT_STAGE_FAILED
    return EXIT_OK


class _progress:
    """A rich progress bar on a terminal (nothing when piped): ticks of a total, ticks/s,
    market time and ETA. The total is exact when rows are cheap to count (Parquet metadata,
    lines of plain text less the header); for compressed or binary inputs (``.gz``/``.zst``/
    ``.dbn``) it is estimated from the bytes read so far (:class:`_TotalEstimate`) and
    becomes exact once every file has been read."""

    def __init__(self, console: Any, enabled: bool, total: int | None, replay: Any = None):
        self.enabled = enabled
        self.total = total
        self.console = console
        self.estimate = _TotalEstimate.of(replay) if total is None and replay is not None else None

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
            extra = {"total": self.estimate()} if self.estimate is not None else {}
            self.bar.update(task, completed=ticks, rate=f"{ticks / dt:,.0f}" if dt > 0 else "-",
                            market=market, **extra)

        return advance

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            self.bar.stop()


class _TotalEstimate:
    """The ticks a replay of compressed or binary files will deliver, estimated from the
    bytes its readers have consumed: ``rows read × file bytes / bytes read``, exact
    (``rows read − bad rows``) once every source is read. The readers stream through
    ``io.files.open_stream`` (pyarrow), one descriptor per file; its offset, from
    ``/proc/self/fdinfo`` (Linux), is how far the decompressor has got; a file seen open and
    now closed counts whole, and so do all once rows were read and none is open (small files
    are read in one block before the first poll). Without ``/proc`` the estimate waits for
    the end of the reading."""

    def __init__(self, replay: Any, sizes: dict[str, int]):
        self.replay = replay
        self.sizes = sizes
        self.total_bytes = sum(sizes.values())
        self._seen: set[str] = set()
        self._last = (-1.0, None)

    @classmethod
    def of(cls, replay: Any) -> _TotalEstimate | None:
        import os

        sizes = {}
        for src in replay.sources:
            path = Path(src.path)
            if not path.name.lower().endswith((".gz", ".zst", ".dbn")):
                return None  # plain text is memory-mapped: rows are counted up front instead
            try:
                sizes[os.path.realpath(path)] = path.stat().st_size
            except OSError:
                return None
        return cls(replay, sizes) if sizes else None

    def __call__(self) -> int | None:
        now = time.perf_counter()
        if now - self._last[0] < 0.2:
            return self._last[1]
        p = self.replay.progress
        if p.sources and p.sources_done == p.sources:
            acct = self.replay.accounting.total
            estimate = p.rows_read - acct.rejected - acct.quarantined
        else:
            done = self.bytes_read()
            estimate = round(p.rows_read * self.total_bytes / done) if done and p.rows_read else None
        self._last = (now, estimate)
        return estimate

    def bytes_read(self) -> int:
        """Compressed bytes consumed so far, over every source file."""
        import os

        pos: dict[str, int] = {}
        fds = os.listdir("/proc/self/fd") if os.path.isdir("/proc/self/fdinfo") else []
        for fd in fds:
            try:
                target = os.readlink(f"/proc/self/fd/{fd}")
                if target in self.sizes:
                    with open(f"/proc/self/fdinfo/{fd}") as fh:
                        offset = int(fh.readline().split()[1])
                    pos[target] = max(pos.get(target, 0), offset)
            except (OSError, ValueError, IndexError):
                continue
        if not pos and self.replay.progress.rows_read:
            self._seen.update(self.sizes)  # rows read and no file open: every file was read
        done = 0
        for path, size in self.sizes.items():
            if path in pos:
                self._seen.add(path)
                done += min(pos[path], size)
            elif path in self._seen:
                done += size
        return done


def _warn_if_nothing_produced(summary: dict[str, Any]) -> None:
    """A run that produced no outputs says so (on stderr, as a warning), not only rc 0."""
    if not any(summary["outputs"].values()):
        import structlog

        structlog.get_logger("nautilus_pipeline.cli").warning(
            "run_produced_nothing", pipeline=summary["pipeline"],
            ticks=summary["ticks"]["processed"],
            hint="no signal, VPIN bucket or risk event: the files may hold no trades "
                 "(see 'nautilus-pipeline inspect FILE')")


def _print_summary(summary: dict[str, Any], out_dir: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 140)
    t = summary["ticks"]
    title = f"{summary['pipeline']}: {t['processed']:,} ticks in {summary['wall_s']:.2f} s ({t['ticks_per_s']:,.0f} ticks/s"
    if summary.get("cpu_s") and summary["wall_s"] > 0:
        title += f", {summary['cpu_s'] / summary['wall_s']:.2f} cores busy"
    title += ")"
    if summary["interrupted"]:
        title += " (interrupted: partial run)"
    if t["failed_batches"]:
        title += f" ({t['failed_batches']} batches failed in stages)"
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
    """Every file, even after one fails; the exit code is the worst of them (0 < 1 < 3 < 4)."""
    results, worst = [], EXIT_OK
    for i, name in enumerate(args.files):
        try:
            info = _inspect_one(Path(name), args.format, args.symbol, args.map)
        except PipelineError as exc:
            code = _exit_code_of(exc)
            worst = max(worst, code)
            _fail(exc, code)
            info = {"file": name, "error": str(exc), "exit_code": code}
        results.append(info)
        if not args.json and "error" not in info:
            if i:
                print()
            _print_inspect(info)
    if args.json:
        sys.stdout.buffer.write(orjson.dumps(results, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY) + b"\n")
        sys.stdout.flush()
    return worst


def _exit_code_of(exc: PipelineError) -> int:
    if isinstance(exc, ConfigError):
        return EXIT_CONFIG
    if isinstance(exc, DataError):
        return EXIT_DATA
    return EXIT_ERROR


def _print_inspect(info: dict[str, Any]) -> None:
    width = max(len(k) for k in info)
    for k, v in info.items():
        if isinstance(v, list):
            v = ", ".join(map(str, v))
        elif isinstance(v, dict):
            v = ", ".join(f"{a}={b:,}" if isinstance(b, int) else f"{a}={b}" for a, b in v.items()) or "-"
        print(f"{k:<{width}}  {v}")


def _inspect_one(path: Path, format: str | None, symbol: str | None, mapping: dict | None = None) -> dict[str, Any]:
    import numpy as np

    from .events import KIND_BOOK, KIND_TRADE, SIDE_BUY, SIDE_SELL, TICK_COLUMNS
    from .io import Replay, Source, detect_format
    from .io.books import BookInventory
    from .io.files import check_file

    check_file(path)
    fmt = format or detect_format(path)
    options = {"mapping": mapping} if mapping else {}
    replay = Replay([Source(path, format=fmt, symbol=symbol, policy="reject", options=options)])
    rows = trades = buys = sells = book_rows = 0
    books = BookInventory()
    first = last = None
    present: set[str] = set()
    fills = {c.name: c.fill for c in TICK_COLUMNS}
    for block in replay.iter_arrays():
        n = len(block["ts_ns"])
        if not n:
            continue
        rows += n
        is_trade = block["kind"] == KIND_TRADE
        trades += int(is_trade.sum())
        buys += int((is_trade & (block["side"] == SIDE_BUY)).sum())
        sells += int((is_trade & (block["side"] == SIDE_SELL)).sum())
        book_rows += int((block["kind"] == KIND_BOOK).sum())
        books.add(block)
        first = int(block["ts_ns"][0]) if first is None else first
        last = int(block["ts_ns"][-1])
        for name, col in block.items():
            if name in ("symbol_id", "kind", "ts_ns") or name in present:
                continue
            fill = fills.get(name, 0)
            empty = np.isnan(col) if col.dtype.kind == "f" else col == fill
            if not empty.all():
                present.add(name)
    acct = replay.accounting.total

    def iso(ns: int | None) -> str:
        if ns is None:
            return "-"
        return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ns / 1e9)) + f".{ns % 1_000_000_000:09d}Z"

    span = (last - first) / 1e9 if first is not None and last is not None else math.nan
    return {
        "file": str(path),
        "format": fmt,
        "rows_read": acct.read,
        "ticks": rows,
        "trades": trades,
        "quotes": rows - trades - book_rows,
        "trade_sides": {"buy": buys, "sell": sells, "unknown": trades - buys - sells},
        "tick_columns_filled": sorted(present | {"ts_ns", "symbol_id", "kind"}),
        "first_ts": iso(first),
        "last_ts": iso(last),
        "span_s": span if not math.isnan(span) else None,
        "symbols": replay.symbols.names,
        "bad_rows": acct.rejected,
        "bad_rows_by_reason": dict(acct.by_reason),
        "lines_ignored": sum(replay.accounting.ignored.values()),
        **books.summary(replay.accounting),
    }


# --- validate --------------------------------------------------------------------------
def cmd_validate(args: argparse.Namespace) -> int:
    for name in args.pipelines:
        _validate_one(name)
    return EXIT_OK


def _validate_one(name: str) -> None:
    from . import config
    from .app import Run
    from .io.files import check_file

    definition = config.load(name)
    for src in config.make_sources(definition, None, None):
        try:
            check_file(src.path)
        except DataError as exc:
            raise DataError(f"{definition.path}: source {exc}") from None
    run = Run(definition, outputs=False)
    pipe = run.pipeline
    print(f"{definition.path}: ok — pipeline {definition.name!r}, {len(run.sources)} source(s), "
          f"stages {' → '.join(s.name for s in pipe.stages)}, batch {pipe.batch_size}")


# --- batch -----------------------------------------------------------------------------
BATCH_EXAMPLES = """examples:
  nautilus-pipeline batch default 'data/*-trades-2024-08-*.csv' --out out/aug --workers 8
  nautilus-pipeline batch default 'data/**/*.csv.gz' --out out/all --executor ray
  nautilus-pipeline batch default 'data/*.csv' --out out/c --executor ray --ray-address ray://head:10001

Files are grouped by symbol, each symbol's files replayed in time order with the state
carried from file to file; symbols run in parallel. Outputs: OUT/<kind>/symbol=<S>/ (Parquet,
one dataset per kind), OUT/summary.json, each job's own outputs in OUT/jobs/.
Exit codes: 0 ok, 2 bad arguments (a pattern matching nothing, mixed formats, a Ray
cluster that does not answer or refuses this driver's token), 3 bad
definition, 4 a symbol's file could not be read (named; the other symbols completed), 5 a
stage failed on some batches, 1 other failures, 130 interrupted (what finished is merged)."""


def _add_batch_parser(sub: Any, fmt: type) -> None:
    from .config import MAX_BATCH_SIZE

    b = sub.add_parser("batch", help="replay many files in parallel (by symbol), merged into one dataset",
                       epilog=BATCH_EXAMPLES, formatter_class=fmt)
    b.add_argument("pipeline", help="pipeline definition: a TOML file, or the name of a bundled one")
    b.add_argument("inputs", nargs="+", metavar="FILE_OR_GLOB", help="tick files or glob patterns (quote them)")
    b.add_argument("--out", required=True, help="output folder")
    b.add_argument("--executor", choices=("local", "ray"), default="local",
                   help="local: a process pool on this machine (default); ray: Ray tasks")
    b.add_argument("--workers", type=_ranged(int, 1, None, "a number of workers"),
                   help="processes (local) or CPUs of a local Ray (default: the machine's cores)")
    b.add_argument("--ray-address", metavar="ADDR", help="a running Ray cluster (default: start a local one)")
    b.add_argument("--cpus", default="none", metavar="none|auto|LIST",
                   help="local workers pinned one a CPU: none (the default), auto (when the workers fill "
                        "the CPUs), or a list such as 0,2,4-7 (without --workers: one worker a CPU listed)")
    b.add_argument("--format", type=_format_name, help="reader for the files (default: detected)")
    b.add_argument("--symbol", help="instrument name, for one-symbol files whose name does not say it")
    b.add_argument("--batch", type=_ranged(int, 1, MAX_BATCH_SIZE, "a number of ticks"),
                   help="ticks per batch (overrides pipeline.batch_size)")
    b.add_argument("--trace-every", type=_ranged(int, 0, None, "a number of trades"), default=0,
                   help="keep every Nth trade in the trace (default: about 200k points per symbol)")
    b.add_argument("--no-progress", action="store_true", help="no progress bar even on a terminal")
    b.add_argument("--log-format", choices=("auto", "json", "console"), default="auto",
                   help="logs on stderr: JSON lines or console (default: console on a terminal)")
    b.add_argument("--log-level", default="warning", choices=("debug", "info", "warning", "error"))


def cmd_batch(args: argparse.Namespace) -> int:
    """``batch``: plan, run on the executor, merge; Ctrl-C (or SIGTERM) stops the jobs and
    merges what finished."""
    from rich.console import Console

    from .batch import run_batch
    from .batch.executors import ClusterError, CpuListError
    from .batch.plan import InputError

    if args.ray_address and args.executor != "ray":
        raise UsageError("--ray-address needs --executor ray")
    err = Console(stderr=True)
    got: list[int] = []

    def on_term(signum: int, frame: object) -> None:
        got.append(signum)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        with _BatchProgress(err, err.is_terminal and not args.no_progress) as progress:
            report = run_batch(args.pipeline, args.inputs, args.out, executor=args.executor,
                               workers=args.workers, ray_address=args.ray_address, batch_size=args.batch,
                               format=args.format, symbol=args.symbol, trace_every=args.trace_every,
                               progress=progress, log_level=args.log_level, cpus=args.cpus)
    except (InputError, ClusterError, CpuListError) as exc:
        raise UsageError(str(exc)) from None
    finally:
        signal.signal(signal.SIGTERM, previous)
    s = report.summary
    t = s["totals"]
    done = sum(1 for f in s["files"].values() if f["status"] == "done")
    print(f"{s['pipeline']}: {done} of {len(s['files'])} files, {t['read']:,} ticks read = "
          f"{t['delivered']:,} delivered + {t['rejected']:,} rejected + {t['quarantined']:,} quarantined; "
          f"{len(s['jobs'])} jobs on {s['executor']} ({s['workers'] or 'cluster'} workers) in {s['wall_s']:.1f} s")
    for kind, o in s["outputs"].items():
        print(f"  {kind}: {o['rows']:,} rows in {o['path']}")
    for f in s["failed"]:
        _fail(f"{f['symbol']}: {f['error']}", EXIT_DATA)
    if s["interrupted"]:
        print("interrupted: what finished is merged (summary.json lists the files not run)", file=sys.stderr)
        return EXIT_TERMINATED if got else EXIT_INTERRUPTED
    return report.exit_code


class _BatchProgress:
    """A rich progress bar over a batch's jobs on a terminal (nothing when piped)."""

    def __init__(self, console: Any, enabled: bool):
        self.console, self.enabled = console, enabled
        self.bar: Any = None

    def __enter__(self) -> _BatchProgress:
        if self.enabled:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
            )

            self.bar = Progress(TextColumn("[bold]batch"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("jobs {task.fields[ticks]} ticks {task.fields[failed]}"),
                                TimeElapsedColumn(), console=self.console, transient=True)
            self.bar.start()
            self.task = self.bar.add_task("batch", total=None, ticks="0", failed="")
        self.ticks, self.failed = 0, 0
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()

    def start(self, jobs: int) -> None:
        if self.bar is not None:
            self.bar.update(self.task, total=jobs)

    def job_done(self, result: Any) -> None:
        self.ticks += result.ticks["read"]
        if self.bar is not None:
            self.bar.update(self.task, advance=1, ticks=f"{self.ticks:,}")

    def chain_failed(self, chain: str, error: str, jobs_left: int) -> None:
        self.failed += 1
        if self.bar is not None:
            self.bar.update(self.task, advance=jobs_left, failed=f"[red]{self.failed} failed")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
