"""The command line's NATS parts: ``publish`` and ``run --nats``.

``nautilus-pipeline publish FILE... --nats URL [--speed X] [--format F --symbol S]`` reads tick
files (the readers and checks of a replay, paced by ``--speed``) and publishes them as
batches on ``ticks.<kind>.<venue>.<symbol>`` into the ``TICKS`` stream, created if needed;
it ends when JetStream has stored every batch. ``publish --ws URL --nats URL`` publishes a live
Binance combined-stream websocket instead (:mod:`.websocket_feed`: micro-batched at ``--batch``
ticks or ``--flush-us``, reconnecting, gaps counted), until Ctrl-C/SIGTERM or ``--until-idle``
seconds without a frame; what the feed counted (frames, gaps, missing ids, bad frames,
reconnects) is in the summary line it prints.

``nautilus-pipeline run PIPELINE --ws URL`` feeds the pipeline from the websocket in its own
process (no state, no NATS); ``nautilus-pipeline run PIPELINE --nats URL --durable NAME
[--out DIR] [--until-idle S]`` consumes the stream live instead of reading files. The outputs are those of a file run
(signals/VPIN/risk as JSON lines and Parquet, trace, summary). With a durable name the
bridge keeps its state in the server (see :mod:`.state`), and with it the length of each
output file at that snapshot: after a crash (``kill -9``) the same command restores the
state, cuts the output files back to those lengths, and carries on, so its outputs at the
end equal those of one uninterrupted run, ``trace.parquet`` included (its rows are spooled to
``trace.parts/`` at each snapshot: :mod:`.trace_spool`).
It stops at ``--until-idle`` seconds without a message (then closes like the end of a file:
the open VPIN bar is emitted), or on Ctrl-C/SIGTERM with a drain and a snapshot, leaving
the stream's end to the next run (exit 130/143).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
import time
from pathlib import Path
from typing import Any

import orjson

DEFAULT_URL = "nats://127.0.0.1:4222"
DEFAULT_BATCH = 16384
"""``publish --batch``: ticks per message (``TickPublisher``'s default, measured there)."""
SINK_OFFSETS = "sink_offsets"
TRACE_PARTS = "trace_parts"


def add_publish_parser(sub: Any, fmt: type, format_type: Any) -> None:
    """Register ``publish`` on the command line's subparsers."""
    pub = sub.add_parser(
        "publish", help="publish tick files into a NATS JetStream stream (for 'run --nats')",
        formatter_class=fmt, epilog="""examples:
  nautilus-pipeline publish trades.csv --nats nats://127.0.0.1:4222 --symbol BTCUSDT-PERP
  nautilus-pipeline publish a.csv b.csv --nats nats://host:4222 --speed 10   # paced, 10x market
  nautilus-pipeline publish --ws 'wss://stream.binance.com:9443/stream?streams=btcusdt@trade' \\
                    --nats nats://127.0.0.1:4222                            # live, until Ctrl-C""")
    pub.add_argument("files", nargs="*", metavar="FILE")
    pub.add_argument("--ws", metavar="URL", help="instead of files: a live Binance combined-stream "
                     "websocket (e.g. wss://stream.binance.com:9443/stream?streams=btcusdt@trade/"
                     "btcusdt@bookTicker), micro-batched and published until Ctrl-C/SIGTERM")
    pub.add_argument("--ws-client", choices=("auto", "picows", "websockets"), default="auto",
                     help="with --ws: websocket client library (default: picows if installed)")
    pub.add_argument("--flush-us", type=float, default=1000.0,
                     help="with --ws: a batch leaves this long after its first tick, or at --batch ticks (default 1000)")
    pub.add_argument("--until-idle", type=float, metavar="SECONDS",
                     help="with --ws: stop after this long without a frame")
    pub.add_argument("--nats", default=DEFAULT_URL, metavar="URL", help=f"server (default {DEFAULT_URL})")
    pub.add_argument("--format", type=format_type, help="reader for the files (default: detected)")
    pub.add_argument("--symbol", help="instrument name for single-symbol files")
    pub.add_argument("--speed", type=float, default=None, help="pace at X times market speed (default: as fast as possible)")
    pub.add_argument("--batch", type=int, default=DEFAULT_BATCH,
                     help=f"ticks per message (default {DEFAULT_BATCH}: fewer, larger messages cost the "
                          "server and the consumer less CPU per tick; one over the server's max_payload "
                          "is sent in halves)")
    pub.add_argument("--storage", choices=("file", "memory"), default="file",
                     help="storage of a stream this command creates (default file; memory costs the "
                          "server less CPU but a restarted server has lost it)")
    pub.add_argument("--venue", default="BINANCE", help="venue token of the subjects (default BINANCE)")
    pub.add_argument("--stream", default="TICKS", help="stream name (default TICKS)")
    pub.add_argument("--log-format", choices=("auto", "json", "console"), default="auto")
    pub.add_argument("--log-level", default="warning", choices=("debug", "info", "warning", "error"))


def add_run_arguments(run: Any) -> None:
    """``run``'s options for consuming a stream instead of files."""
    run.add_argument("--nats", metavar="URL", help="consume tick batches from this NATS server "
                     "instead of reading files (see 'publish')")
    run.add_argument("--durable", metavar="NAME", help="with --nats: durable consumer; its state "
                     "(snapshots, output lengths) is kept in the server, so a restart resumes")
    run.add_argument("--subject", default="ticks.>", help="with --nats: subjects to consume (default ticks.>)")
    run.add_argument("--ws", metavar="URL", help="feed the pipeline from a live Binance combined-stream "
                     "websocket in this process instead of files (no state: see 'publish --ws' and --nats "
                     "for a restartable live run)")
    run.add_argument("--ws-client", choices=("auto", "picows", "websockets"), default="auto",
                     help="with --ws: websocket client library (default: picows if installed)")
    run.add_argument("--flush-us", type=float, default=1000.0,
                     help="with --ws: a batch leaves this long after its first tick, or when full (default 1000)")
    run.add_argument("--until-idle", type=float, metavar="SECONDS",
                     help="with --nats or --ws: stop after this long without a message (frame)")
    run.add_argument("--snapshot-every", type=int, default=64, metavar="N",
                     help="with --nats --durable: store the state every N messages (default 64)")
    run.add_argument("--export", nargs="*", metavar="PATTERN", default=None,
                     help="with --nats: bus topics to publish to the EVENTS stream (e.g. 'signals.>')")


def cmd_publish(args: argparse.Namespace) -> int:
    from ..errors import ConfigError
    from ..runtime import run

    if args.batch < 1:
        raise ConfigError(f"--batch must be >= 1, got {args.batch}")
    if args.speed is not None and not args.speed > 0:
        raise ConfigError(f"--speed must be > 0, got {args.speed}")
    if args.ws is not None:
        return run(_publish_ws(args))
    return run(_publish(args))


def publish_usage_error(args: argparse.Namespace) -> str | None:
    """What is wrong with ``publish``'s options as a whole (the command line exits 2), or None."""
    if bool(args.files) == (args.ws is not None):
        return "publish: give tick FILEs or --ws URL (one of them)"
    if args.ws is not None:
        if args.format or args.symbol or args.speed is not None:
            return "--format, --symbol and --speed apply to files, not --ws"
        if not args.flush_us > 0 or (args.until_idle is not None and not args.until_idle > 0):
            return "--flush-us and --until-idle must be > 0"
    elif args.until_idle is not None:
        return "--until-idle applies to --ws"
    return None


async def _publish_ws(args: argparse.Namespace) -> int:
    """``publish --ws URL``: the live websocket source into the ticks stream (see the module docstring)."""
    from .nats_bridge import connect
    from .publisher import TICKS_SUBJECTS, TickPublisher, ensure_stream
    from .websocket_feed import BinanceWebsocketFeed

    feed = BinanceWebsocketFeed(args.ws, flush_ticks=args.batch, flush_us=args.flush_us,
                                client=args.ws_client)
    stop = asyncio.Event()
    got: list[int] = []
    loop = asyncio.get_running_loop()

    def on_signal(signum: int) -> None:
        got.append(signum)
        stop.set()

    nc = await connect(args.nats)
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)
    watcher = (loop.create_task(_idle_watch(feed, stop, args.until_idle))
               if args.until_idle is not None else None)
    t0 = time.perf_counter()
    ticks = 0
    try:
        js = nc.jetstream()
        await ensure_stream(js, args.stream, [TICKS_SUBJECTS], storage=args.storage)
        # a spot bookTicker has no exchange time: the feed's rows are in receive order
        pub = TickPublisher(js, venue=args.venue, batch_size=args.batch, order_by="ts_recv_ns")
        async for symbol, cols in feed.batches(stop):
            await pub.publish(cols, symbol)
            ticks += len(cols["ts_ns"])
        await pub.flush()
    finally:
        stop.set()
        if watcher is not None:
            await watcher
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(sig)
        await nc.close()
    st = feed.stats
    print(orjson.dumps({"ticks": ticks, "messages": pub.messages, "duplicates": pub.duplicates,
                        "wall_s": round(time.perf_counter() - t0, 3), "stream": args.stream,
                        "client": feed.client, "frames": st.frames, "trades": st.trades,
                        "quotes": st.quotes, "bad_frames": st.bad_frames, "gaps": st.gaps,
                        "missing_ids": st.missing_ids, "duplicate_frames": st.duplicates,
                        "ignored_frames": st.ignored, "reconnects": st.reconnects}).decode())
    if got:
        return 143 if got[0] == signal.SIGTERM else 130
    return 0


async def _publish(args: argparse.Namespace) -> int:
    import numpy as np

    from ..errors import ConfigError
    from ..events import TICK_COLUMN_NAMES
    from ..io import Replay, Source
    from ..memory import BufferPool
    from .nats_bridge import connect
    from .publisher import TICKS_SUBJECTS, TickPublisher, ensure_stream

    sources = [Source(f, format=args.format, symbol=args.symbol) for f in args.files]
    clocks = set()  # the clock each file is replayed by
    for src in sources:
        reader, validator = src.open()
        try:
            clocks.add(validator.order_by)
        finally:
            validator.close()
            close = getattr(reader, "close", None)
            if close is not None:
                close()
    if len(clocks) > 1:
        raise ConfigError(f"publish: these files replay by different clocks ({sorted(clocks)}); "
                         "publish the files of each clock separately")
    replay = Replay(sources, speed=args.speed)
    pool = BufferPool(capacity=args.batch, slabs=2, name="publish")
    nc = await connect(args.nats)
    t0 = time.perf_counter()
    try:
        js = nc.jetstream()
        await ensure_stream(js, args.stream, [TICKS_SUBJECTS], storage=args.storage)
        pub = TickPublisher(js, venue=args.venue, batch_size=args.batch, order_by=clocks.pop())
        ticks = 0
        async for lease in replay.batches(pool, holder="publish"):
            try:
                sids = lease["symbol_id"]
                for sid in np.unique(sids):
                    rows = np.flatnonzero(sids == sid)
                    cols = {name: lease[name][rows] for name in TICK_COLUMN_NAMES
                            if name != "symbol_id"}
                    await pub.publish(cols, replay.symbols.name_of(int(sid)))
                ticks += lease.length
            finally:
                lease.release()
        await pub.flush()
    finally:
        await nc.close()
    replay.accounting.check()
    wall = time.perf_counter() - t0
    print(orjson.dumps({"ticks": ticks, "messages": pub.messages, "duplicates": pub.duplicates,
                        "wall_s": round(wall, 3), "stream": args.stream}).decode())
    return 0


def _nats_pipe_settings(args: argparse.Namespace) -> dict[str, Any]:
    return {"batch_size": args.batch, "execution": args.execution,
            "pipeline_settings": {"cores": getattr(args, "cores", None)}}


async def run_live(args: argparse.Namespace) -> int:
    """``run PIPELINE --nats URL``: the pipeline of ``Run`` fed by the bridge (see the module docstring)."""
    from ..app import Run, write_atomic
    from ..stages.recorder import RecorderStage
    from .nats_bridge import NatsBridge
    from .trace_spool import TraceSpool

    run = Run(args.pipeline, out_dir=args.out, trace_every=args.trace_every,
              **{k: v for k, v in _nats_pipe_settings(args).items() if v is not None})
    pipe, sink = run.pipeline, run.sink
    recorder = next((s for s in run.stages if isinstance(s, RecorderStage)), None)
    trace = TraceSpool(recorder, pipe) if recorder is not None else None
    if any(sd.values.get("bucket_volume") == "auto" for sd in run.definition.stages):
        print(f"warning: {run.name}: bucket_volume = \"auto\" was worked out from the definition's own "
              "files, not from the stream; symbols that they do not hold have no bucket volume. Give "
              "a number or a table per symbol for live runs.", file=sys.stderr)
    stop = asyncio.Event()
    got: list[int] = []
    loop = asyncio.get_running_loop()

    def on_signal(signum: int) -> None:
        got.append(signum)
        stop.set()

    def on_restore(saved: Any) -> None:
        if saved is not None and sink is not None:
            sink.resume(saved.extra.get(SINK_OFFSETS, {}))
        if sink is not None:
            sink.attach(pipe.bus)
        if trace is not None:
            trace.start(saved.extra.get(TRACE_PARTS, 0) if saved is not None else None)

    def save_extra() -> dict[str, Any]:
        extra: dict[str, Any] = {SINK_OFFSETS: sink.offsets()} if sink is not None else {}
        if trace is not None:
            extra[TRACE_PARTS] = trace.spool()
        return extra

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)
    t0 = time.perf_counter()
    try:
        bridge = NatsBridge(pipe, servers=args.nats, ingest=args.subject, durable=args.durable,
                            export=args.export or (), on_restore=on_restore, save_extra=save_extra,
                            snapshot_every=args.snapshot_every)
        async with bridge:
            waiters = [asyncio.ensure_future(stop.wait())]
            if args.until_idle is not None:
                waiters.append(asyncio.ensure_future(bridge.wait_idle(args.until_idle)))
            try:
                done, _ = await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for w in waiters:
                    w.cancel()
                await asyncio.gather(*waiters, return_exceptions=True)
            for w in done:
                w.result()
            if got:
                bridge.end_of_stream = False  # a stop, not the stream's end: the next run goes on
        if trace is not None:
            trace.finish()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(sig)
        if sink is not None:
            sink.close()
    wall = time.perf_counter() - t0
    flow = pipe.tick_flow()
    summary = {"pipeline": run.name, "nats": args.nats, "durable": args.durable, "wall_s": wall,
               "ticks": {"processed": flow.ticks_out, "failed_in_stages": flow.ticks_failed,
                         "bad_messages": (bridge.stats().get("ingress") or {}).get("bad_messages", 0),
                         "rejected_out_of_order":
                             (bridge.stats().get("ingress") or {}).get("rejected_out_of_order", 0)},
               "bridge": bridge.stats(), "stages": pipe.stats()["stages"],
               "outputs": dict(sink.counts) if sink is not None else {}}
    write_atomic(run.out_dir / "summary.json",
                 orjson.dumps(summary, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY))
    ing = summary["bridge"]["ingress"] or {}
    print(f"{run.name}: {flow.ticks_out:,} ticks from {args.nats} ({ing.get('messages', 0)} messages"
          f", restored from stream sequence {summary['bridge']['restored_from_seq']}), "
          f"outputs in {Path(run.out_dir)}", file=sys.stderr)
    if got:
        return 143 if got[0] == signal.SIGTERM else 130
    if summary["ticks"]["rejected_out_of_order"]:
        print(f"{run.name}: {summary['ticks']['rejected_out_of_order']} ticks went back in time on their "
              "batch's clock and were dropped (logged as ticks_out_of_order)", file=sys.stderr)
    if summary["ticks"]["bad_messages"]:  # messages refused as unreadable: bad data, exit 4
        print(f"{run.name}: {summary['ticks']['bad_messages']} messages were not tick batches this "
              "pipeline can read (logged as bad_tick_message; terminated, not redelivered)", file=sys.stderr)
        return 4
    return 5 if flow.ticks_failed else 0


async def run_ws(args: argparse.Namespace) -> int:
    """``run PIPELINE --ws URL``: the pipeline of ``Run`` fed by the live websocket source in this
    process (no NATS, no state: a restart starts afresh), micro-batched at the pipeline's batch
    size or ``--flush-us``; until Ctrl-C/SIGTERM or ``--until-idle`` seconds without a frame. The
    outputs are those of a file run (signals/VPIN/risk, trace, summary)."""
    from ..app import Run, write_atomic
    from .websocket_feed import BinanceWebsocketFeed

    run = Run(args.pipeline, out_dir=args.out, trace_every=args.trace_every,
              **{k: v for k, v in _nats_pipe_settings(args).items() if v is not None})
    pipe, sink = run.pipeline, run.sink
    if any(sd.values.get("bucket_volume") == "auto" for sd in run.definition.stages):
        print(f"warning: {run.name}: bucket_volume = \"auto\" was worked out from the definition's own "
              "files, not from the websocket; symbols that they do not hold have no bucket volume. "
              "Give a number or a table per symbol for live runs.", file=sys.stderr)
    feed = BinanceWebsocketFeed(args.ws, flush_ticks=pipe.batch_size, flush_us=args.flush_us,
                                client=args.ws_client)
    stop = asyncio.Event()
    got: list[int] = []
    loop = asyncio.get_running_loop()

    def on_signal(signum: int) -> None:
        got.append(signum)
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)
    watcher = None
    t0 = time.perf_counter()
    try:
        async with pipe:
            if sink is not None:
                sink.attach(pipe.bus)
            if args.until_idle is not None:  # idle from now on: starting the stages took its time
                watcher = loop.create_task(_idle_watch(feed, stop, args.until_idle))
            async for symbol, cols in feed.batches(stop):
                # A spot bookTicker carries no exchange time: a quote is stamped when received
                # and a trade with its exchange time, earlier than the quote before it as a
                # rule (the network's latency). Checked on ts_ns, nearly every trade of a
                # trade+bookTicker stream was rejected; the order checked is the receive
                # order, as the capture reader replays these streams. Rows out of it are
                # dropped and counted, not fatal.
                await pipe.ingest(cols, symbol=symbol, policy="reject", order_by="ts_recv_ns")
            await pipe.drain()
    finally:
        stop.set()
        if watcher is not None:
            await watcher
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(sig)
        if sink is not None:
            sink.close()
    wall = time.perf_counter() - t0
    flow = pipe.tick_flow()
    st = feed.stats
    acc = pipe.ingest_accounting
    admitted = acc.total.as_dict() if acc is not None else {"read": 0, "delivered": 0, "rejected": 0,
                                                            "quarantined": 0, "by_reason": {}}
    summary = {"pipeline": run.name, "ws": args.ws, "client": feed.client, "wall_s": wall,
               "ticks": {"processed": flow.ticks_out, "failed_in_stages": flow.ticks_failed,
                         "rejected": admitted["rejected"], "rejected_by_reason": admitted["by_reason"]},
               "feed": {"frames": st.frames, "trades": st.trades, "quotes": st.quotes,
                        "bad_frames": st.bad_frames, "gaps": st.gaps, "missing_ids": st.missing_ids,
                        "duplicates": st.duplicates, "ignored": st.ignored, "reconnects": st.reconnects,
                        "batches": st.batches},
               "stages": pipe.stats()["stages"],
               "outputs": dict(sink.counts) if sink is not None else {}}
    write_atomic(run.out_dir / "summary.json",
                 orjson.dumps(summary, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY))
    print(f"{run.name}: {flow.ticks_out:,} ticks from {args.ws} ({st.frames:,} frames, {st.gaps} gaps, "
          f"{st.bad_frames} bad frames, {st.reconnects} reconnects, {admitted['rejected']} rows "
          f"rejected), outputs in {Path(run.out_dir)}", file=sys.stderr)
    if got:
        return 143 if got[0] == signal.SIGTERM else 130
    return 5 if flow.ticks_failed else 0


async def _idle_watch(feed: Any, stop: asyncio.Event, idle_s: float) -> None:
    """Set ``stop`` once the feed has had no frame for ``idle_s`` seconds."""
    loop = asyncio.get_running_loop()
    seen, since = -1, loop.time()
    while not stop.is_set():
        if feed.stats.frames != seen:
            seen, since = feed.stats.frames, loop.time()
        elif loop.time() - since >= idle_s:
            stop.set()
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), min(idle_s / 4, 0.25))
