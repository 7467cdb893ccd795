"""A run: a pipeline definition (plus overrides) assembled into sources, stages, a recorder,
a pipeline, a replay and sinks, driven to the end, and summarised.

Why one object. The command line, the test kit and the examples all turn a definition into
a running pipeline; written three times, the steps drifted (the CLI set a source's format
after the source had validated it; the replay → pipeline holder name had to be matched by
hand). :class:`Run` is the only place that does it: sources are validated when it is
constructed, it owns the replay → pipeline handoff (:func:`replay_into`), and
:meth:`Run.execute` returns a typed :class:`Summary`. The CLI adds only what a terminal
needs (signals, a progress bar, Prometheus, the printed tables, exit codes).

Reading once. A definition with ``bucket_volume = "auto"`` must see the whole input before
the first batch; the run's own replay reads it (:meth:`~nautilus_pipeline.io.Replay.scan`)
and keeps what it read for the replay, so the files are read once (up to the replay's
read-once budget). The row total for progress comes from that read, from Parquet metadata,
or, only when a progress bar is shown for plain text, from counting its lines.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import functools
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import orjson

from . import config
from .errors import ConfigError
from .pipeline import Pipeline

REPLAY_HOLDER = "replay"
"""The lease holder name of batches the replay hands to the pipeline."""


async def replay_into(pipe: Pipeline, replay: Any, *, stop: asyncio.Event | None = None,
                      on_batch: Callable[[], None] | None = None) -> bool:
    """Feed a replay's batches into a running pipeline until the end or ``stop``.

    Returns True if stopped early. Waiting for the next batch (a paced replay across a gap,
    a slow read) races the stop event, so a stop is never held up by a wait; a batch that
    was ready as the stop came is released, not sent. ``on_batch`` runs after each batch
    (progress, metrics); returning True from it stops the feed.
    """
    stop = stop if stop is not None else asyncio.Event()
    async with contextlib.aclosing(replay.batches(pipe.pool, holder=REPLAY_HOLDER)) as batches:
        stopped = asyncio.ensure_future(stop.wait())
        try:
            while True:
                nxt = asyncio.ensure_future(_next(batches))
                await asyncio.wait({nxt, stopped}, return_when=asyncio.FIRST_COMPLETED)
                if not nxt.done():
                    nxt.cancel()
                    late = (await asyncio.gather(nxt, return_exceptions=True))[0]
                    if hasattr(late, "release"):
                        late.release(REPLAY_HOLDER)
                    return True
                lease = nxt.result()
                if lease is None:
                    return False
                await pipe.publish_batch(lease, REPLAY_HOLDER)
                if on_batch is not None and on_batch():
                    return True
                if stop.is_set():
                    return True
        finally:
            stopped.cancel()
            await asyncio.gather(stopped, return_exceptions=True)


async def _next(batches):
    try:
        return await anext(batches)
    except StopAsyncIteration:
        return None


@dataclass(frozen=True)
class TickCounts:
    """Where every tick of a run went. ``read = delivered + rejected + quarantined`` (plus rows
    read ahead of an interrupt); ``delivered = processed + failed_in_stages``."""

    read: int
    delivered: int
    rejected: int
    quarantined: int
    by_reason: dict[str, int]
    processed: int
    failed_in_stages: int
    failed_batches: int
    ticks_per_s: float


@dataclass(frozen=True)
class Summary:
    """What a run did: its accounting, per-stage latencies, the pool, outputs, the machine.

    ``as_dict()`` is the ``summary.json`` a run writes (what ``report`` reads)."""

    pipeline: str
    definition: str
    machine: str
    interrupted: bool
    wall_s: float
    ticks: TickCounts
    accounting: dict[str, Any]
    stages: list[dict[str, Any]]
    pool: dict[str, Any]
    leaked_leases: list[str]
    outputs: dict[str, int]
    vpin_threshold: float
    symbols: list[str]
    files: list[str]
    code_version: str
    fees: dict[str, float] | None
    cpu_s: float = field(default=0.0, compare=False)
    """The process's CPU time (user + system, every thread) over ``wall_s``: cores busy is
    ``cpu_s / wall_s``."""
    cores: dict[str, Any] = field(default_factory=dict, compare=False)
    """The cores the stages might keep busy (``in_use``) and what took a worker thread's
    core (``workers``): ``Pipeline.stats()["cores"]``."""
    write_error: str | None = field(default=None, compare=False)

    def as_dict(self) -> dict[str, Any]:
        """``dataclasses.asdict`` less ``write_error``, with plain values passed through as
        they are: ``asdict`` deep-copies every leaf (the stages' latency buckets among them),
        most of the time of making a run's summary, which every batch job paid."""
        return {f.name: _plain(getattr(self, f.name)) for f in fields(self) if f.name != "write_error"}


_ATOMS = frozenset({int, float, str, bool, type(None)})


def _plain(value: Any) -> Any:
    """What ``asdict`` makes of ``value`` (new dicts, lists and tuples; dataclasses as dicts),
    the immutable leaves kept instead of copied."""
    kind = type(value)
    if kind in _ATOMS:
        return value
    if kind is dict:
        return {_plain(k): _plain(v) for k, v in value.items()}
    if kind is list:
        return [_plain(v) for v in value]
    if kind is tuple:
        return tuple(_plain(v) for v in value)
    if is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # a named tuple
        return kind(*[_plain(v) for v in value])
    if isinstance(value, list | tuple):
        return kind(_plain(v) for v in value)
    if isinstance(value, dict):
        return kind((_plain(k), _plain(v)) for k, v in value.items())
    return copy.deepcopy(value)  # numpy scalars, anything else: as asdict does


class Run:
    """One replay of a definition's sources (or ``ticks`` files) through its pipeline.

    ``definition``: a path to a TOML definition, the name of a bundled one (``"default"``),
    or a loaded :class:`~nautilus_pipeline.config.PipelineDef`. The keyword arguments override
    the definition: ``ticks`` (files replacing its sources; ``format``/``symbol`` apply to
    them), ``order_by``, ``speed``, ``batch_size``, ``execution``, ``out_dir``; ``outputs=False``
    writes no files (no sinks, trace, timeline or summary.json: for tests and embedding);
    ``clock`` paces the replay (a :class:`~nautilus_pipeline.io.replay.ManualClock` in tests);
    ``pipeline_settings`` overrides other ``[pipeline]`` settings (``slabs``, ``memory``, ...).
    Everything is built and validated here; :meth:`execute` runs it.
    """

    def __init__(
        self,
        definition: str | Path | config.PipelineDef,
        *,
        ticks: Sequence[str | Path] | None = None,
        format: str | None = None,
        symbol: str | None = None,
        order_by: str | None = None,
        mapping: Mapping[str, Any] | None = None,
        speed: float | None = None,
        batch_size: int | None = None,
        execution: str | None = None,
        out_dir: str | Path | None = None,
        outputs: bool = True,
        trace_every: int = 0,
        clock: Any = None,
        pipeline_settings: Mapping[str, Any] | None = None,
    ):
        from .compute import warmup
        from .io import Replay
        from .symbols import SymbolTable

        self.definition = (definition if isinstance(definition, config.PipelineDef)
                           else config.load(definition))
        d = self.definition
        if (format or symbol or mapping) and not ticks:
            raise ConfigError(f"{'format' if format else 'symbol' if symbol else 'mapping'} applies to ticks files; give ticks "
                              "(or set it in the definition's [[sources]])")
        self.out_dir = Path(out_dir if out_dir is not None else d.outputs["dir"])
        self.writes_outputs = outputs
        if outputs:  # before anything is read
            check_out_dir(self.out_dir, "out_dir" if out_dir is not None else f"{d.path}: outputs.dir")
        self.sources = config.make_sources(d, [str(t) for t in ticks] if ticks else None, self.out_dir,
                                           format=format, symbol=symbol, order_by=order_by,
                                           mapping=dict(mapping) if mapping else None)
        if not self.sources:
            raise ConfigError(f"{d.path}: no [[sources]]; give tick files with --ticks FILE")
        settings = {k: v for k, v in dict(pipeline_settings or {}).items() if v is not None}
        if batch_size is not None:
            settings["batch_size"] = batch_size
        if execution is not None:
            settings["execution"] = execution
        allowed = d.pipeline["symbols"]
        self.symbols = settings.pop("symbols", None) or (
            SymbolTable(allowed=allowed) if allowed else SymbolTable())
        speed = speed if speed is not None else d.replay["speed"]
        # CUDA's start and the stages' device kernels on a thread while the input is read
        # (compute.warmup: None when no stage names a usable CUDA stream)
        warm = warmup.start(d.stages)
        try:
            self.replay = Replay(self.sources, speed=speed or None, clock=clock, symbols=self.symbols)
            self.stages = config.build_stages(d, self.sources, self.replay)
        finally:
            if warm is not None:
                warm.join()
        self.expected_rows: int | None = self.replay.kept_rows
        if outputs:
            from .stages.recorder import TRACE_COLUMNS, RecorderStage

            known = self.expected_rows or _rows_from_metadata(self.sources)
            every = trace_every or max(1, (known or _rows_upper_bound(self.sources)) // 200_000)
            written = {c.name for s in self.stages for c in s.writes} | {
                "ts_ns", "symbol_id", "kind", "price", "bid", "ask"}
            self.stages.append(RecorderStage(self.out_dir / "trace.parquet", every=every,
                                             available=tuple(c for c in TRACE_COLUMNS if c in written)))
        self.pipeline = config.build_pipeline(d, self.stages, symbols=self.symbols, **settings)
        self.sink = None
        self.timeline = None
        if outputs:
            from .io.sinks import EventSink
            from .report.timeline import LatencyTimeline

            self.sink = EventSink(self.out_dir, d.outputs["topics"], d.outputs["formats"])
            self.timeline = LatencyTimeline()
        self.interrupted = False
        self.summary: Summary | None = None

    @property
    def name(self) -> str:
        return self.definition.name

    def estimate_rows(self) -> int | None:
        """Ticks the replay will deliver when cheap to know (the read-once pass, Parquet
        metadata), else the data lines of plain-text inputs (this one reads them)."""
        if self.expected_rows is None:
            self.expected_rows = _rows_from_metadata(self.sources) or estimate_rows(self.sources)
        return self.expected_rows

    async def execute(self, *, stop: asyncio.Event | None = None,
                      on_batch: Callable[[], bool | None] | None = None) -> Summary:
        """Replay everything (or until ``stop``), drain, write the outputs, return the summary.

        A file that cannot be written (a full disk) ends the run as it stands: the summary is
        still returned, with ``write_error`` set, and summary.json is written if it can be.
        """
        pipe, replay, sink, timeline = self.pipeline, self.replay, self.sink, self.timeline
        write_error: OSError | None = None

        def after_batch() -> bool:
            if timeline is not None:
                timeline.maybe_sample(pipe, replay.progress.ts_reached_ns)
            stop_now = bool(on_batch()) if on_batch is not None else False
            return stop_now or (sink is not None and sink.error is not None)

        t0, cpu0 = time.perf_counter(), time.process_time()
        try:
            async with pipe:
                if sink is not None:
                    sink.attach(pipe.bus)
                self.interrupted = await replay_into(pipe, replay, stop=stop, on_batch=after_batch)
            if timeline is not None:
                from .report.timeline import TIMELINE_FILE

                timeline.sample(pipe, replay.progress.ts_reached_ns)
                timeline.write(self.out_dir / TIMELINE_FILE)
        except OSError as exc:  # a stage writing its file at the end (trace.parquet) on a full disk
            write_error = exc
        finally:
            if sink is not None:
                sink.close()
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        write_error = write_error or (sink.error if sink is not None else None)
        summary = _replace(self._summarise(wall), cpu_s=cpu)
        if self.writes_outputs:
            try:
                write_atomic(self.out_dir / "summary.json", orjson.dumps(
                    summary.as_dict(), option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY))
            except OSError as exc:
                write_error = write_error or exc
        if write_error is not None:
            e = write_error
            summary = _replace(summary, write_error=f"{e.strerror or e}")
        self.summary = summary
        return summary

    def _summarise(self, wall: float) -> Summary:
        from .machine import describe
        from .stages.risk import RiskStage
        from .stages.vpin import VpinStage

        pipe, replay = self.pipeline, self.replay
        acct = replay.accounting.total
        stats = pipe.stats()
        processed = stats["ticks"]["ticks_out"]
        vpin = next((s for s in pipe.stages if isinstance(s, VpinStage)), None)
        risk = next((s for s in pipe.stages if isinstance(s, RiskStage)), None)
        return Summary(
            pipeline=self.name,
            definition=str(self.definition.path),
            machine=describe(),
            interrupted=self.interrupted,
            wall_s=wall,
            ticks=TickCounts(
                read=acct.read, delivered=acct.delivered, rejected=acct.rejected,
                quarantined=acct.quarantined, by_reason=dict(acct.by_reason), processed=processed,
                failed_in_stages=stats["ticks"]["ticks_failed"],
                failed_batches=sum(s["failures"] for s in stats["stages"]),
                ticks_per_s=processed / wall if wall > 0 else 0.0,
            ),
            accounting=replay.accounting.as_dict(),
            stages=stats["stages"],
            cores=stats["cores"],
            pool=stats["pool"],
            leaked_leases=stats["leaked_leases"],
            outputs=dict(self.sink.counts) if self.sink is not None else {},
            vpin_threshold=vpin.threshold if vpin is not None else 0.9,
            symbols=pipe.symbols.names,
            files=[str(s.path) for s in replay.sources],
            code_version=code_version(),
            fees=None if risk is None else {"fee_rate": risk.limits.fee_rate,
                                            "fee_per_order": risk.limits.fee_per_order},
        )


def check_out_dir(out: Path, what: str, error: type[Exception] = ConfigError) -> None:
    """Refuse an output folder that cannot be written, before anything is read."""
    if out.exists() and not out.is_dir():
        raise error(f"{what} {out}: is a file, not a folder; give a folder for the outputs")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise error(f"{what} {out}: cannot create the output folder ({exc.strerror or exc})") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise error(f"{what} {out}: the output folder is not writable; pick another with --out")


def _replace(summary: Summary, **changes: Any) -> Summary:
    from dataclasses import replace

    return replace(summary, **changes)


def write_atomic(path: Path, data: bytes) -> None:
    """Write a file whole or not at all (a full disk leaves no half summary.json)."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


@functools.cache
def code_version() -> str:
    """``0.1.0`` plus the git commit of the checkout when there is one (``0.1.0+g1a2b3c4``).
    Once per process: the ``git`` call costs 4-9 ms (loaded dev VM), which every batch job's
    summary paid."""
    import subprocess

    from . import __version__

    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=Path(__file__).parent,
                             capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return __version__
    return f"{__version__}+g{out.stdout.strip()}" if out.returncode == 0 and out.stdout.strip() else __version__


# --- row counts ------------------------------------------------------------------------
def _rows_from_metadata(sources: Sequence[Any]) -> int | None:
    """Rows of the sources when every one is Parquet (from its footer, no data read)."""
    total = 0
    for src in sources:
        if not Path(src.path).name.lower().endswith(".parquet"):
            return None
        try:
            import pyarrow.parquet as pq

            total += pq.ParquetFile(src.path).metadata.num_rows
        except Exception:  # a damaged file: its reader will say what is wrong with it
            return None
    return total or None


def estimate_rows(sources: Sequence[Any]) -> int | None:
    """Data rows in the sources when cheap to know: Parquet metadata, or the lines of plain
    text (a last line without a newline counted, a header line not)."""
    total = 0
    for src in sources:
        path = Path(src.path)
        name = path.name.lower()
        try:
            if name.endswith(".parquet"):
                import pyarrow.parquet as pq

                total += pq.ParquetFile(path).metadata.num_rows
            elif name.endswith((".csv", ".jsonl", ".txt")) and path.stat().st_size < 8 << 30:
                total += _count_data_lines(path)
            else:
                return None
        except Exception:  # a damaged file: its reader will say what is wrong with it
            return None
    return total or None


def _rows_upper_bound(sources: Sequence[Any]) -> int:
    """Rows an input may hold, for the trace's sampling only, from file sizes: one per 10
    bytes of a compressed or binary file (the bundled captures take 19-41 bytes per tick),
    one per 40 bytes of plain text (the bundled CSVs take 48-90)."""
    total = 0
    for src in sources:
        with contextlib.suppress(OSError):
            size = Path(src.path).stat().st_size
            plain = Path(src.path).name.lower().endswith((".csv", ".jsonl", ".txt"))
            total += size // (40 if plain else 10)
    return total


def _count_data_lines(path: Path) -> int:
    lines, first, last_byte = 0, b"", b"\n"
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 24), b""):
            if not first:
                first = chunk[:4096].split(b"\n", 1)[0]
            lines += chunk.count(b"\n")
            last_byte = chunk[-1:]
    if last_byte != b"\n":
        lines += 1
    return lines - int(_is_header(first))


def _is_header(line: bytes) -> bool:
    """A first line of names, not values: a field that is neither a number nor a date/time,
    or a JSON line (never a header)."""
    text = line.decode("utf-8", "replace").strip()
    if not text or text.startswith("{"):
        return False
    for f in text.replace(";", ",").replace("\t", ",").split(","):
        f = f.strip().strip('"')
        if f and not any(ch.isdigit() for ch in f) and f.lower() not in ("true", "false", "buy", "sell"):
            return True
    return False


__all__ = ["REPLAY_HOLDER", "Run", "Summary", "TickCounts", "estimate_rows", "replay_into"]
