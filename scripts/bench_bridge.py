"""Benchmark: the NATS JetStream bridge on loopback, against in-process ingest.

Starts its own ``nats-server -js`` (temporary store, free port) and measures, in one run:

1. **transport**: 4096-tick batches (the wire format of ``bridge/wire.py``) published by
   another process with JetStream acks, then consumed here with a durable pull consumer,
   acked and decoded: ticks/s each way, the paths of 148a742 and of now alternating;
2. **one-tick hop**: one 1-tick batch at a time, publish → durable pull consumer waiting for
   it, p50/p99 µs over ``--hops`` messages, 148a742's ``fetch(1)``, now's ``PullFeed``, and
   ``PullFeed`` on a stream in memory, alternating in chunks;
3. **parser**: a durable pull consumer of 16384-tick messages (another process filled the
   stream), its connection parsing with nats-py's parser or ``CollectingParser``
   (``bridge/parser.py``): this process's CPU per 4096 ticks and the parser's per message,
   alternating;
4. **websocket clients**: the bundled Binance capture's frames, framed once and written in
   64 KiB pieces by a server in another process (as fast as the client takes them), received
   by websockets and by picows alone and under ``BinanceWebsocketFeed`` (parsing, gap checks,
   micro-batching): frames/s, alternating;
5. **bridge-cpu**: the bridge alone, a stream filled before by another process read by
   ``NatsBridge`` into a pipeline of one stage that does nothing: CPU per 4096 ticks of this
   process and of nats-server for 4096- and 16384-tick messages, explicit and cumulative acks,
   file and memory storage, alternating;
6. **pipeline**: the default pipeline fed (a) in-process by ``Pipeline.ingest`` of the
   batches and (b) through ``NatsBridge`` from a stream another process filled before, or
   (c) fills while the pipeline consumes it (told to start once the bridge is connected),
   (b) and (c) with fb13fe4's 4096-tick messages and now's 16384 (and AckAll, memory storage),
   each stream on its own server; each run ending when the last tick is through the last
   stage; alternating ``--repeat`` times; ticks/s, the ratio to (a) (medians), and CPU per
   4096 ticks of this process, nats-server and the publisher;
7. **hop through the bridge**: publish a 1-tick batch → the ingress hands it to the default
   pipeline, 148a742's ``fetch`` reading and now's ``PullFeed``, alternating.

picows rows appear when picows is installed (the ``live`` extra).

Run: ``python scripts/bench_bridge.py [--ticks N] [--repeat R] [--hops H] [--only TABLE...]
[--modes ROW...]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from nautilus_pipeline.bridge import NatsBridge, decode_batch, encode_batch, ensure_stream  # noqa: E402
from nautilus_pipeline.bridge.pull import PullFeed  # noqa: E402
from nautilus_pipeline.bridge.server import NatsServer  # noqa: E402
from nautilus_pipeline.machine import cache_bytecode_in_child_processes, describe  # noqa: E402
from nautilus_pipeline.runtime import configure_logging, loop_factory  # noqa: E402
from nautilus_pipeline.stage import Stage  # noqa: E402
from nautilus_pipeline.testing import trades_frame  # noqa: E402

SYMBOL = "BTCUSDT-PERP"
BATCH = 4096
SECTIONS = ("transport", "hops", "websocket", "parser", "bridge-cpu", "pipeline", "bridge-hops")

PUBLISHER = """
import asyncio, collections, hashlib, sys, time
import nats, uvloop
from nautilus_pipeline.bridge import TickPublisher, ensure_stream
from nautilus_pipeline.testing import trades_frame

class Before(TickPublisher):
    # the publisher of 148a742: blake2b message ids, 64 acks in flight, the default loop
    async def publish(self, columns, symbol):
        import numpy as np
        from nautilus_pipeline import topics
        from nautilus_pipeline.bridge.publisher import _KIND_SUBJECTS
        n = len(columns["ts_ns"])
        kinds = np.asarray(columns.get("kind", np.zeros(n, np.uint8)))
        assert not set(np.unique(kinds).tolist()) - set(_KIND_SUBJECTS)
        for start in range(0, n, self.batch_size):
            idx = slice(start, start + self.batch_size)
            part = {k: np.asarray(v)[idx] for k, v in columns.items() if k != "symbol_id"}
            k = kinds[idx]
            kind = _KIND_SUBJECTS[int(k[0])] if (k == k[0]).all() else "mixed"
            await self._send(topics.ticks(kind, self.venue, symbol), part, symbol)

    async def _send(self, subj, part, symbol):
        from nautilus_pipeline.bridge.wire import encode_batch
        data = encode_batch(part, symbol, compact=False)  # 148a742's wire: every column in full
        digest = hashlib.blake2b(data, digest_size=12).hexdigest()
        msg_id = f"{subj}:{int(part['ts_ns'][0])}:{len(part['ts_ns'])}:{digest}"
        while len(self._inflight) >= self.max_in_flight:
            await self._settle_one()
        self._inflight.append(await self.js.publish_async(subj, data, headers={"Nats-Msg-Id": msg_id}))
        self.messages += 1

async def main(url, n, batch, mode, wait="go", wire="compact", storage="file"):
    frame = trades_frame(int(n), seed=7)
    nc = await nats.connect(url)
    js = nc.jetstream()
    pub = (Before(js, batch_size=int(batch), max_in_flight=64) if mode == "before"
           else TickPublisher(js, batch_size=int(batch), compact=wire == "compact"))
    # warm-up outside the timing (the client's first publish compiles its header regex and
    # subscribes its ack inbox; numpy's first calls import), into the stream deleted next
    await ensure_stream(js, "TICKS", ["ticks.>"])
    await pub.publish({k: v[: int(batch)] for k, v in frame.items()}, "WARM-UP")
    await pub.flush()
    # a new stream: a purge would keep the duplicate window, and the same batches again are duplicates
    await js.delete_stream("TICKS")
    await ensure_stream(js, "TICKS", ["ticks.>"], storage=storage)
    pub.messages = 0
    if wait == "wait":  # concurrent runs: the consumer says when
        print("ready", flush=True)
        sys.stdin.readline()
    t0, c0 = time.perf_counter(), time.process_time()
    await pub.publish(frame, "BTCUSDT-PERP")
    await pub.flush()
    print(time.perf_counter() - t0, time.process_time() - c0)
    await nc.close()

(asyncio.run if sys.argv[4] == "before" else uvloop.run)(main(*sys.argv[1:]))
"""


CPU: dict[str, list[tuple[float, float]]] = {"before": [], "now": [], "now-16k": []}
"""Per publish: (the publishing process's CPU s, nats-server's CPU s) while it published."""


def cpu_seconds(pid: int) -> float:
    """CPU time of process ``pid``'s threads (Linux ``/proc/<pid>/task/*/schedstat``, ns), s.

    ``/proc/<pid>/stat`` counts in clock ticks (10 ms here): over a 1M-tick run nats-server
    spends 2-5 of them, so its column moved in steps of 41 µs per 4096 ticks. The scheduler's
    own count is in ns; it misses threads that ended, which nats-server's (Go's) do not."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[0])
        except (OSError, ValueError, IndexError):  # a thread gone meanwhile
            pass
    return total / 1e9


def child_env() -> dict[str, str]:
    """The environment of a child process: this checkout first on its path, then what this
    process's path has (e.g. a folder of wheels installed with --target on the GPU host)."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)}


def publish_from_another_process(url: str, n: int, mode: str = "now", server_pid: int | None = None,
                                 wire: str = "compact", batch: int = BATCH, storage: str = "file",
                                 cpu_key: str | None = None) -> float:
    """Fill the TICKS stream (made anew) from a child process; returns its publish wall time (s)
    and records its CPU time and the server's in ``CPU[mode]``. ``wire="full"``: every column
    in full (NPB1, b22cc61's messages)."""
    env = child_env()
    s0 = cpu_seconds(server_pid) if server_pid else 0.0
    out = subprocess.run([sys.executable, "-c", PUBLISHER, url, str(n), str(batch), mode, "go", wire, storage], env=env,
                         check=True, capture_output=True, text=True).stdout
    server_cpu = cpu_seconds(server_pid) - s0 if server_pid else float("nan")  # warm-up included: ~1 batch
    wall, cpu = map(float, out.strip().splitlines()[-1].split())
    CPU[cpu_key or mode].append((cpu, server_cpu))
    return wall


async def consume_raw(url: str, durable: str, messages: int, mode: str = "now") -> float:
    """Durable pull consumer: read, decode, ack every message; wall time (s). ``now``: the
    ingress's open pull request (``PullFeed``, 64 asked at a time); ``before``: nats-py's
    ``fetch(64)`` as the ingress of 148a742 did."""
    import nats
    from nats.js.api import AckPolicy, ConsumerConfig

    nc = await nats.connect(url)
    js = nc.jetstream()
    config = ConsumerConfig(durable_name=durable, ack_policy=AckPolicy.EXPLICIT, max_ack_pending=1024)
    if mode == "before":
        sub = await js.pull_subscribe("ticks.>", durable=durable, stream="TICKS", config=config)

        async def take(k: int) -> list:
            return await sub.fetch(k, timeout=5)
    else:
        await js.add_consumer("TICKS", config)
        feed = await PullFeed(nc, "TICKS", durable).open()

        async def take(k: int) -> list:
            return await feed.get(k, 5.0)
    t0 = time.perf_counter()
    got = 0
    rows = 0
    while got < messages:
        for m in await take(min(64, messages - got)):
            rows += decode_batch(m.data).length
            await m.ack()
            got += 1
    await nc.flush()
    wall = time.perf_counter() - t0
    await nc.close()
    return wall


async def one_tick_hops(url: str, hops: int, mode: str = "now", warmup: int = 50) -> list[float]:
    """µs from publishing a 1-tick batch to its arrival at a durable pull consumer waiting for
    it: ``now`` through the ingress's open pull request (``PullFeed.get``, then ``ask`` as the
    ingress's loop does after each read, so a request used up is renewed before the next
    tick rather than by the read that waits for it), ``before`` a nats-py ``fetch(1)`` issued
    before the publish (148a742's bench); ``memory``: as ``now``, into a stream kept in memory."""
    import nats
    from nats.js.api import AckPolicy, ConsumerConfig

    nc = await nats.connect(url)
    js = nc.jetstream()
    stream, token = ("HOPM", "hopm") if mode == "memory" else ("HOP", "hop")
    await ensure_stream(js, stream, [f"{token}.>"], storage="memory" if mode == "memory" else "file")
    durable = f"hop-{mode}"
    config = ConsumerConfig(durable_name=durable, ack_policy=AckPolicy.EXPLICIT)
    if mode == "before":
        sub = await js.pull_subscribe("hop.>", durable=durable, stream="HOP", config=config)

        def take():
            return sub.fetch(1, timeout=5)
    else:
        try:
            await js.consumer_info(stream, durable)
        except nats.js.errors.NotFoundError:
            await js.add_consumer(stream, config)
        feed = await PullFeed(nc, stream, durable, expires_s=5.0).open()

        def take():
            return feed.get(64, 5.0)
    data = encode_batch(trades_frame(1, seed=1), SYMBOL)
    out = []
    for i in range(hops + warmup):
        fetch = asyncio.ensure_future(take())
        await asyncio.sleep(0)  # the pull request (if one is needed) goes out first
        await asyncio.sleep(0)
        t0 = time.perf_counter_ns()
        await nc.publish(f"{token}.BTCUSDT-PERP", data)
        msgs = await fetch
        dt = (time.perf_counter_ns() - t0) / 1e3
        for msg in msgs:
            await msg.ack()
        if mode != "before":
            await feed.ask(64)
        if i >= warmup:
            out.append(dt)
    if mode != "before":
        await feed.close()
    await nc.close()
    return out


def _timed(cls: type) -> type:
    """``cls`` whose ``parse`` adds its thread CPU time to ``PARSE[0]`` (calls to ``PARSE[1]``)."""
    parse = cls.parse

    async def timed(self, data=b""):
        t0 = time.thread_time()
        PARSE[1] += 1
        try:
            return await parse(self, data)
        finally:
            PARSE[0] += time.thread_time() - t0

    return type(f"Timed{cls.__name__}", (cls,), {"parse": timed})


PARSE = [0.0, 0]
"""Thread CPU s spent in the parser (dispatch of each message included) and its calls."""


async def consume_parsed(url: str, durable: str, messages: int, collecting: bool) -> tuple[float, float, int]:
    """Durable pull consumer (``PullFeed``): read, decode, ack every message, the connection
    parsing with nats-py's parser or ``CollectingParser``; (this process's CPU s, parser CPU
    s, parse calls)."""
    import nats
    from nats.js.api import AckPolicy, ConsumerConfig
    from nats.protocol.parser import Parser

    from nautilus_pipeline.bridge.parser import CollectingParser

    nc = await nats.connect(url)
    nc._ps.__class__ = _timed(CollectingParser if collecting else Parser)
    js = nc.jetstream()
    await js.add_consumer("TICKS", ConsumerConfig(durable_name=durable, ack_policy=AckPolicy.EXPLICIT,
                                                  max_ack_pending=1024))
    feed = await PullFeed(nc, "TICKS", durable).open()
    PARSE[:] = [0.0, 0]
    c0 = time.process_time()
    got = 0
    while got < messages:
        for m in await feed.get(16, 5.0):
            decode_batch(m.data)
            await m.ack()
            got += 1
    await nc.flush()
    cpu = time.process_time() - c0
    await feed.close()
    await nc.close()
    return cpu, PARSE[0], PARSE[1]


async def parser_table(url: str, server_pid: int, n: int, repeat: int) -> None:
    """The consumer's CPU with nats-py's protocol parser and with ``CollectingParser``
    (``bridge/parser.py``), 16384-tick messages filled before by another process, alternating."""
    big = n // 16384 * 16384
    publish_from_another_process(url, big, "now", server_pid, batch=16384, cpu_key="now-16k")
    messages = big // 16384
    per = big / BATCH
    runs: dict[bool, list[tuple[float, float, int]]] = {False: [], True: []}
    for r in range(repeat):
        for collecting in runs:
            runs[collecting].append(await consume_parsed(url, f"parse-{int(collecting)}-{r}", messages, collecting))
    print(f"| consume {big:,} ticks in 16384-tick messages (durable pull, decode, ack), median of "
          f"{repeat} alternating | CPU µs per 4096 ticks, this process | parser µs per message | "
          "parse calls per message |")
    print("|---|---:|---:|---:|")
    for collecting, label in ((False, "nats-py's parser"), (True, "CollectingParser (large payloads joined once)")):
        v = runs[collecting]
        print(f"| {label} | {statistics.median(c for c, _, _ in v) / per * 1e6:,.1f} | "
              f"{statistics.median(p for _, p, _ in v) / messages * 1e6:,.1f} | "
              f"{statistics.median(k for _, _, k in v) / messages:.1f} |")
    print("\nper run (CPU s, parser s): " + "; ".join(
        f"{'collecting' if k else 'nats-py'} {[(round(c, 3), round(p, 3)) for c, p, _ in v]}" for k, v in runs.items()) + "\n")


class _FetchFeed:
    """148a742's way of reading the consumer, for the hop through the bridge: nats-py's
    ``fetch(free slabs)``, a new pull request (or two) per read."""

    def __init__(self, sub):
        self.sub = sub

    ready = 0  # nothing is read ahead: each read is a fetch

    async def ask(self, target: int) -> None:
        """148a742 asked for nothing ahead of a read."""

    async def get(self, want: int, timeout: float, limit: int | None = None) -> list:
        import nats.errors

        try:
            return await self.sub.fetch(min(want, limit or want), timeout=timeout)
        except (TimeoutError, nats.errors.TimeoutError):
            return []

    async def close(self, nak_unread: bool = True) -> int:
        return 0


class _Bridge148(NatsBridge):
    async def _consumer(self, covered: int):
        feed = await super()._consumer(covered)  # the consumer, made as now
        await feed.close()
        return _FetchFeed(await self.js.pull_subscribe_bind(durable=feed.consumer, stream=self.stream))


async def bridge_hops(url: str, hops: int, mode: str, warmup: int = 5) -> list[float]:
    """µs from publishing a 1-tick batch to the ingress handing it to the default pipeline
    (``publish_batch``), the bridge waiting with an empty stream; each tick through the
    last stage before the next is sent. A fresh stream and durable per call."""
    import nats

    nc = await nats.connect(url)
    js = nc.jetstream()
    try:
        await js.delete_stream("TICKS")
    except nats.js.errors.NotFoundError:
        pass
    data = encode_batch(trades_frame(1, seed=1), SYMBOL)
    pipe = default_pipeline()
    arrived: list[int] = []
    wake = asyncio.Event()
    handoff = pipe.publish_batch

    async def timed(lease, holder):
        arrived.append(time.perf_counter_ns())
        wake.set()
        return await handoff(lease, holder)

    pipe.publish_batch = timed
    out = []
    async with pipe:
        cls = NatsBridge if mode == "now" else _Bridge148
        async with cls(pipe, servers=url, ingest="ticks.>", durable=f"bhop-{mode}", state=False):
            await asyncio.sleep(0.3)  # the consumer waiting
            for i in range(hops + warmup):
                wake.clear()
                t0 = time.perf_counter_ns()
                await nc.publish(f"ticks.trades.BINANCE.{SYMBOL}", data)
                await wake.wait()
                if i >= warmup:
                    out.append((arrived[-1] - t0) / 1e3)
                await pipe.drain()  # through the last stage before the next
    await nc.close()
    return out


WS_SERVER = """
import asyncio, base64, hashlib, struct, sys
from nautilus_pipeline.bridge.ws_replay import capture_frames

# The capture's frames framed once, up front, and written in large chunks after the
# handshake, then a close frame (1000): the server costs next to nothing, so the rates
# measured are the clients'. (CaptureReplayServer, the tests' server, sends frame by
# frame through websockets and was the bottleneck at ~35-50K frames/s here.) Written in
# pieces of CHUNK bytes, each drained before the next.
GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

def frame(payload, opcode=0x1):
    n = len(payload)
    if n < 126:
        head = struct.pack("!BB", 0x80 | opcode, n)
    elif n < 65536:
        head = struct.pack("!BBH", 0x80 | opcode, 126, n)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 127, n)
    return head + payload

async def main(path):
    blob = b"".join(frame(text.encode()) for _, text in capture_frames(path))
    close = frame(struct.pack("!H", 1000) + b"end of replay", 0x8)

    async def handle(reader, writer):
        request = await reader.readuntil(b"\\r\\n\\r\\n")
        key = next(line.split(b":", 1)[1].strip() for line in request.split(b"\\r\\n")
                   if line.lower().startswith(b"sec-websocket-key:"))
        accept = base64.b64encode(hashlib.sha1(key + GUID).digest())
        writer.write(b"HTTP/1.1 101 Switching Protocols\\r\\nUpgrade: websocket\\r\\n"
                     b"Connection: Upgrade\\r\\nSec-WebSocket-Accept: " + accept + b"\\r\\n\\r\\n")
        view = memoryview(blob)
        for start in range(0, len(blob), CHUNK):
            writer.write(view[start : start + CHUNK])
            await writer.drain()
        writer.write(close)
        await writer.drain()
        try:
            await asyncio.wait_for(reader.read(64), 10)  # the client's close frame
        except Exception:
            pass
        writer.close()  # then the TCP close, which a websockets client waits for

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    print(f"ws://127.0.0.1:{port}/stream?streams=replay", flush=True)
    await asyncio.sleep(3600)

CHUNK = int(sys.argv[2])
asyncio.run(main(sys.argv[1]))
"""


async def _picows_native_receive(url: str) -> int:
    """Frames received by picows's own listener API (no websockets-like layer)."""
    from picows import WSListener, WSMsgType, ws_connect

    class Count(WSListener):
        frames = 0

        def on_ws_frame(self, transport, frame):
            if frame.msg_type == WSMsgType.TEXT:
                frame.get_payload_as_bytes()
                Count.frames += 1
            elif frame.msg_type == WSMsgType.CLOSE:
                transport.disconnect()

    transport, _ = await ws_connect(Count, url, max_frame_size=1 << 22)
    await transport.wait_disconnected()
    return Count.frames


async def websocket_feed_rate(client: str, raw: str | None = None, chunk: int = 1 << 16) -> tuple[int, float]:
    """(frames, s) for the bundled capture through the websocket source on ``client``
    (``raw``: ``"api"`` the client's websockets-style ``recv`` loop alone, ``"native"``
    picows's listener callbacks alone), the replay server in another process."""
    from nautilus_pipeline.bridge.websocket_feed import BinanceWebsocketFeed, client_api

    capture = REPO / "nautilus_pipeline" / "data" / "binance-feed-spot-ethusdt_20240808.jsonl.gz"
    env = child_env()
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", WS_SERVER, str(capture), str(chunk),
                                                env=env, stdout=asyncio.subprocess.PIPE)
    try:
        url = (await proc.stdout.readline()).decode().strip()
        t0 = time.perf_counter()
        if raw == "native":
            n = await _picows_native_receive(url)
            return n, time.perf_counter() - t0
        if raw == "api":
            _, connect, closed, _ = client_api(client)
            n = 0
            async with connect(url, compression=None, max_size=1 << 22) as ws:
                try:
                    while True:
                        await ws.recv(decode=False)
                        n += 1
                except closed:
                    pass
            return n, time.perf_counter() - t0
        feed = BinanceWebsocketFeed(url, end_on_close=True, client=client)
        async for _ in feed.batches():
            pass
        return feed.stats.frames, time.perf_counter() - t0
    finally:
        proc.kill()
        await proc.wait()


def have_picows() -> bool:
    try:
        import picows  # noqa: F401
    except ImportError:
        return False
    return True


async def websocket_table(repeat: int) -> None:
    """The websocket rows: each client alone and under the feed, alternating, medians."""
    from importlib.metadata import version

    rows = [("websockets", "api", "websockets client alone (`recv` loop)"),
            ("websockets", None, "BinanceWebsocketFeed on websockets: + parse, gap checks, micro-batches")]
    if have_picows():
        rows += [("picows", "native", "picows client alone (its listener callbacks)"),
                 ("picows", "api", "picows client alone (`picows.websockets` `recv` loop)"),
                 ("picows", None, "BinanceWebsocketFeed on picows: + parse, gap checks, micro-batches")]
    rates: dict[int, list[float]] = {i: [] for i in range(len(rows))}
    frames = 0
    for _ in range(repeat):
        for i, (client, raw, _) in enumerate(rows):
            frames, s = await websocket_feed_rate(client, raw)
            rates[i].append(frames / s)
    versions = ", ".join(f"{m} {version(m)}" for m in ("websockets", "picows") if m == "websockets" or have_picows())
    print(f"| websocket, bundled capture ({frames:,} frames) pre-framed by a server in another "
          f"process; {versions}; median of {repeat} alternating | frames/s |")
    print("|---|---:|")
    for i, (_, _, label) in enumerate(rows):
        print(f"| {label} | {statistics.median(rates[i]):,.0f} |")
    if not have_picows():
        print("| picows | not installed |")
    print()


def default_pipeline():
    from nautilus_pipeline import Run

    return Run("default", outputs=False, pipeline_settings={"batch_size": BATCH}).pipeline


class Usage:
    """CPU seconds of this process and of nats-server over one run (Linux /proc, 10 ms ticks)."""

    def __init__(self, server_pid: int):
        self.server_pid = server_pid
        self.ours = self.server = 0.0

    def __enter__(self) -> Usage:
        self._c0, self._s0 = time.process_time(), cpu_seconds(self.server_pid)
        return self

    def __exit__(self, *exc: object) -> None:
        self.ours = time.process_time() - self._c0
        self.server = cpu_seconds(self.server_pid) - self._s0


class _Handoffs:
    """Counts the ticks handed to a pipeline (``publish_batch``): ``done`` is set once ``n``
    are in (the end of a bridged run is then one ``drain``, as in-process, instead of a
    polling loop on the same loop), ``first`` is when the first batch went in
    (``perf_counter``): a run's start (the bridge's connection, its consumer, the first
    fetch) told apart from its steady rate."""

    def __init__(self, pipe, n: int):
        self.done = asyncio.Event()
        self.first: float | None = None
        self.seen = 0
        handoff = pipe.publish_batch

        async def counted(lease, holder="source"):
            if self.first is None:
                self.first = time.perf_counter()
            self.seen += lease.length
            await handoff(lease, holder)
            if self.seen >= n:
                self.done.set()

        pipe.publish_batch = counted

    async def wait(self) -> None:
        await self.done.wait()


def _count_handoffs(pipe, n: int) -> _Handoffs:
    return _Handoffs(pipe, n)


async def in_process(frame: dict, usage: Usage | None = None) -> tuple[float, float]:
    """(wall, seconds to the first batch in) of ``frame`` ingested in-process."""
    pipe = default_pipeline()
    async with pipe:
        handed = _count_handoffs(pipe, len(frame["ts_ns"]))
        with usage or contextlib.nullcontext():
            t0 = time.perf_counter()
            await pipe.ingest(frame, symbol=SYMBOL)
            await pipe.drain()
            wall = time.perf_counter() - t0
    return wall, (handed.first or t0) - t0


async def through_bridge(url: str, durable: str, n: int, usage: Usage | None = None,
                         publisher: subprocess.Popen | None = None, **options) -> tuple[float, float]:
    """The default pipeline fed by ``NatsBridge`` until ``n`` ticks are through the last stage:
    (wall, seconds to the first batch in; the clock starts before the bridge connects).
    ``publisher``: a publishing process waiting for a line on its stdin, told to start once
    the bridge is connected (the stream is then filled while the pipeline consumes it);
    without it the stream was filled before."""
    pipe = default_pipeline()
    async with pipe:
        handed = _count_handoffs(pipe, n)
        bridge = NatsBridge(pipe, servers=url, ingest="ticks.>", durable=durable, state=False,
                            fetch_timeout=0.05, **options)
        with usage or contextlib.nullcontext():
            t0 = time.perf_counter()
            async with bridge:
                if publisher is not None:
                    publisher.stdin.write("go\n")
                    publisher.stdin.flush()
                await handed.wait()
                await pipe.drain()
                wall = time.perf_counter() - t0
                assert pipe.tick_flow().ticks_out == n, pipe.tick_flow()
    return wall, (handed.first or t0) - t0


def waiting_publisher(url: str, n: int, wire: str = "compact", batch: int = BATCH,
                      storage: str = "file") -> subprocess.Popen:
    """A publishing process (the one of ``publish_from_another_process``) that has made the
    TICKS stream anew and waits for a line on stdin before it publishes ``n`` ticks."""
    env = child_env()
    proc = subprocess.Popen([sys.executable, "-c", PUBLISHER, url, str(n), str(batch), "now", "wait", wire, storage],
                            env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    if proc.stdout.readline().strip() != "ready":
        proc.kill()
        raise RuntimeError("the publishing process did not start")
    return proc


SERVERS = {"4k": (4096, "file"), "16k": (16384, "file"), "16k-mem": (16384, "memory"), "32k": (32768, "file")}
"""Streams the pipeline rows read, each on its own server (the publisher makes ``TICKS`` anew):
ticks per message on the wire and the stream's storage."""

ALL = {"ack_policy": "all"}
MODES = [
    ("in-process `ingest`", "local", None, {}),
    ("filled before; fb13fe4 (4096-tick messages)", "pre-4k", "4k", {}),
    ("filled before; now (16384-tick messages)", "pre-16k", "16k", {}),
    ("filled before; now, AckAll", "pre-16k-all", "16k", ALL),
    ("filled before; now, memory storage", "pre-16k-mem", "16k-mem", {}),
    ("filled before; 32768-tick messages", "pre-32k", "32k", {}),
    ("filled before; 32768-tick messages, AckAll", "pre-32k-all", "32k", ALL),
    ("filled while consumed; fb13fe4", "live-4k", "4k", {}),
    ("filled while consumed; now", "live-16k", "16k", {}),
    ("filled while consumed; now, memory storage", "live-16k-mem", "16k-mem", {}),
]
"""The pipeline rows: label, key, server (``SERVERS``; None: in-process), NatsBridge options."""


def filled_servers(stack: contextlib.ExitStack, url: str, server_pid: int, keys, n: int) -> dict[str, tuple[str, int]]:
    """Key (``SERVERS``) → (url, pid) of a server whose stream holds ``n`` ticks published from
    another process in that key's message size and storage: ``"4k"`` on the run's own server,
    every other key on a server of its own (entered on ``stack``)."""
    servers = {}
    for key in keys:
        if key == "4k":
            servers[key] = (url, server_pid)
        else:
            extra = stack.enter_context(NatsServer(Path(stack.enter_context(tempfile.TemporaryDirectory()))))
            servers[key] = (extra.url, extra.proc.pid)
        batch, storage = SERVERS[key]
        publish_from_another_process(servers[key][0], n, "now", servers[key][1], batch=batch, storage=storage)
    return servers


async def pipeline_table(url: str, server_pid: int, n: int, repeat: int, only: list[str] | None = None) -> None:
    """The default pipeline: in-process ``ingest`` against ``NatsBridge`` fed from another
    process, the stream filled before or while the pipeline consumes it, for the ``MODES``
    (ticks per message, ack policy, storage), alternating; ticks/s, and CPU per 4096 ticks of
    this process, nats-server and the publisher."""
    frame = trades_frame(n, seed=7)
    await in_process(trades_frame(BATCH * 4, seed=1))  # warm-up: numba caches, imports
    per = n / BATCH  # CPU is shown per 4096 ticks, whatever the message size
    modes = [m for m in MODES if only is None or m[1] in only or m[1] == "local"]
    used = {m[2] for m in modes if m[2] is not None}
    with contextlib.ExitStack() as stack:
        servers = filled_servers(stack, url, server_pid, used, n)
        rates: dict[str, list[float]] = {m: [] for _, m, _, _ in modes}
        steady: dict[str, list[float]] = {m: [] for _, m, _, _ in modes}
        starts: dict[str, list[float]] = {m: [] for _, m, _, _ in modes}
        cpu: dict[str, list[tuple[float, float, float]]] = {m: [] for _, m, _, _ in modes}
        for r in range(repeat):
            for _, mode, key, options in modes:
                pub_cpu = 0.0
                if key is None:
                    usage = Usage(server_pid)
                    wall, first = await in_process(frame, usage)
                else:
                    (u, pid), (batch, storage) = servers[key], SERVERS[key]
                    usage = Usage(pid)
                    proc = (waiting_publisher(u, n, batch=batch, storage=storage)
                            if mode.startswith("live") else None)
                    wall, first = await through_bridge(u, f"bench-{mode}-{r}", n, usage, publisher=proc, **options)
                    if proc is not None:
                        out, _ = proc.communicate(timeout=120)
                        pub_cpu = float(out.strip().splitlines()[-1].split()[1])
                rates[mode].append(n / wall)
                steady[mode].append(n / (wall - first))
                starts[mode].append(first)
                cpu[mode].append((usage.ours, usage.server, pub_cpu))
    ml, sl = statistics.median(rates["local"]), statistics.median(steady["local"])
    print(f"| default pipeline, {n:,} ticks, median of {repeat} alternating | ticks/s | ÷ in-process | "
          "CPU µs per 4096 ticks: this process | nats-server | publisher | ÷ in-process, paired | "
          "start ms (to the first batch in) | ticks/s from the first batch | ÷ in-process |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for label, mode, _, _ in modes:
        m, st = statistics.median(rates[mode]), statistics.median(steady[mode])
        ours, server, pub = (statistics.median(c[i] for c in cpu[mode]) / per * 1e6 for i in range(3))
        # each run over the in-process run of its round: a load that changes between rounds
        # moves both sides of a pair alike
        paired = statistics.median(x / y for x, y in zip(rates[mode], rates["local"], strict=True))
        print(f"| {label} | {m:,.0f} | {m / ml:.3f} | {ours:,.0f} | {server:,.0f} | "
              f"{f'{pub:,.0f}' if mode.startswith('live') else '-'} | {paired:.3f} | "
              f"{1000 * statistics.median(starts[mode]):.1f} | {st:,.0f} | {st / sl:.3f} |")
    print("\nper run (ticks/s): " + "; ".join(f"{mode} {[round(x) for x in rates[mode]]}" for _, mode, _, _ in modes))
    print("target: JetStream ÷ in-process >= 0.95 (the publisher's CPU is its process time while it "
          "published, the server's includes the stream's deletion and ~1 warm-up message in live runs); "
          "'from the first batch': the run's ticks over its wall less its start (for the bridge: "
          "connecting, making the durable consumer, the first fetch; in-process: the first batch's copy)\n")


class _Noop(Stage):
    """A stage that reads the batch's clock and does nothing else: a pipeline whose own cost
    is next to nothing, so that this process's CPU is the bridge's (``bridge-cpu``)."""

    name = "noop"
    reads = ("ts_ns",)
    writes = ()
    streams = ("cpu",)

    async def process(self, lease, stream, ctx):
        return None


BRIDGE_CPU = [
    ("4096-tick messages, explicit acks (4 at a time), file (fb13fe4)", "4k", {}),
    ("4096-tick messages, AckAll", "4k", ALL),
    ("16384-tick messages, explicit acks", "16k", {}),
    ("16384-tick messages, AckAll", "16k", ALL),
    ("16384-tick messages, AckAll, memory storage", "16k-mem", ALL),
    ("32768-tick messages, explicit acks (why not larger still)", "32k", {}),
]


async def bridge_cpu_table(url: str, server_pid: int, n: int, repeat: int) -> None:
    """CPU per 4096 ticks of the bridge alone: a stream filled before, read by ``NatsBridge``
    into a pipeline of one stage that does nothing (4096-row slabs), this process and
    nats-server, for message sizes, ack policies and storage, alternating, medians."""
    from nautilus_pipeline import Pipeline

    per = n / BATCH
    with contextlib.ExitStack() as stack:
        servers = filled_servers(stack, url, server_pid, dict.fromkeys(k for _, k, _ in BRIDGE_CPU), n)
        cpu: dict[int, list[tuple[float, float, float]]] = {i: [] for i in range(len(BRIDGE_CPU))}
        for r in range(repeat):
            for i, (_, key, options) in enumerate(BRIDGE_CPU):
                u, pid = servers[key]
                pipe = Pipeline([_Noop()], batch_size=BATCH, slabs=8, execution="serial")
                usage = Usage(pid)
                async with pipe:
                    handed = _count_handoffs(pipe, n)
                    with usage:
                        t0 = time.perf_counter()
                        async with NatsBridge(pipe, servers=u, ingest="ticks.>", durable=f"cpu-{i}-{r}",
                                              state=False, fetch_timeout=0.05, **options):
                            await handed.wait()
                            await pipe.drain()
                        wall = time.perf_counter() - t0
                    assert pipe.tick_flow().ticks_out == n
                cpu[i].append((usage.ours, usage.server, n / wall))
    print(f"| the bridge alone: {n:,} ticks filled before, into a pipeline of one stage that does "
          f"nothing; median of {repeat} alternating | CPU µs per 4096 ticks: this process | "
          "nats-server | both | ticks/s |")
    print("|---|---:|---:|---:|---:|")
    for i, (label, _, _) in enumerate(BRIDGE_CPU):
        ours, server = (statistics.median(c[j] for c in cpu[i]) / per * 1e6 for j in range(2))
        both = statistics.median((c[0] + c[1]) for c in cpu[i]) / per * 1e6
        rate = statistics.median(c[2] for c in cpu[i])
        print(f"| {label} | {ours:,.0f} | {server:,.0f} | {both:,.0f} | {rate:,.0f} |")
    print("\nper run (this process, nats-server CPU s): " + "; ".join(
        f"{i}: {[(round(c[0], 3), round(c[1], 3)) for c in cpu[i]]}" for i in cpu) + "\n")


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q))


async def main(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp, NatsServer(Path(tmp)) as server:
        try:
            await measure(args, server)
        except BaseException:
            print(f"nats-server's log, last lines:\n{server._log_tail(3000)}", file=sys.stderr)
            raise


async def measure(args: argparse.Namespace, server: NatsServer) -> None:
    n = args.ticks // BATCH * BATCH
    messages = n // BATCH
    only = set(args.only or SECTIONS)
    url = server.url
    print(f"machine: {describe()}")
    print(cache_bytecode_in_child_processes())
    print(f"nats-server: {server_version()}, nats-py {nats_version()}; {n:,} ticks in {messages} "
          f"batches of {BATCH}\n")

    if "transport" in only:
        pub: dict[str, list[float]] = {"before": [], "now": [], "now-16k": []}
        con: dict[str, list[float]] = {"before": [], "now": []}
        for r in range(args.repeat):  # alternating: 148a742's paths, then this commit's
            for mode in ("before", "now"):
                pub[mode].append(n / publish_from_another_process(url, n, mode, server.proc.pid))
                con[mode].append(n / await consume_raw(url, f"raw-{mode}-{r}", messages, mode))
            big = n // 16384 * 16384  # now's default message size (consumed by the pipeline rows)
            pub["now-16k"].append(big / publish_from_another_process(url, big, "now", server.proc.pid, batch=16384,
                                                                     cpu_key="now-16k"))
        med = {k: statistics.median(v) for k, v in (("pub_b", pub["before"]), ("pub_n", pub["now"]),
                                                    ("con_b", con["before"]), ("con_n", con["now"]))}
        print(f"| transport (4096-tick batches, acked), median of {args.repeat} alternating | "
              "148a742 | now | now ÷ 148a742 |")
        print("|---|---:|---:|---:|")
        print(f"| publish, another process (148a742: blake2b ids, 64 in flight, default loop; now: "
              f"CRC-32 ids, 256 in flight, uvloop) | {med['pub_b']:,.0f} | {med['pub_n']:,.0f} | "
              f"{med['pub_n'] / med['pub_b']:.2f} |")
        print(f"| publish 16384-tick messages (now's default), another process | - | "
              f"{statistics.median(pub['now-16k']):,.0f} | - |")
        print(f"| consume: durable pull, decode, ack (148a742: fetch(64); now: open pull request) | "
              f"{med['con_b']:,.0f} | {med['con_n']:,.0f} | {med['con_n'] / med['con_b']:.2f} |")
        print(f"\nper run (ticks/s): publish {pub}, consume {con}".replace("'", ""))
        per = {m: (statistics.median(c for c, _ in CPU[m]) / messages * 1e6,
                   statistics.median(s for _, s in CPU[m]) / messages * 1e6) for m in CPU}
        big_per = (n // 16384 * 16384) / BATCH / messages  # the 16384-tick runs' ticks per 4096 of n
        per["now-16k"] = tuple(x / big_per for x in per["now-16k"])
        print(f"CPU per 4096-tick batch published (medians): publishing process {per['before'][0]:.0f} µs "
              f"(148a742) vs {per['now'][0]:.0f} µs (now); nats-server meanwhile {per['before'][1]:.0f} µs "
              f"vs {per['now'][1]:.0f} µs (its CPU includes the deletion of the last stream and ~1 "
              "warm-up batch)")
        print(f"with 16384-tick messages (now's default), per 4096 ticks: publishing process "
              f"{per['now-16k'][0]:.0f} µs, nats-server {per['now-16k'][1]:.0f} µs\n")

    if "hops" in only:
        hops: dict[str, list[float]] = {"before": [], "now": [], "memory": []}
        chunk = max(args.hops // 4, 1)
        load0 = os.getloadavg()[0]
        for _ in range(4):  # alternating chunks
            for mode in hops:
                hops[mode] += await one_tick_hops(url, chunk, mode)
        # the tail is the machine's: another process on a core for a few ms moves p99 by 10x
        print(f"| one-tick hop publish → durable consumer ({4 * chunk} hops each, alternating; load "
              f"{load0:.2f} -> {os.getloadavg()[0]:.2f}) | p50 µs | p99 µs |")
        print("|---|---:|---:|")
        print(f"| 148a742: fetch(1) waiting at the server | {pct(hops['before'], 50):.1f} | "
              f"{pct(hops['before'], 99):.1f} |")
        print(f"| now: the ingress's open pull request (PullFeed) | {pct(hops['now'], 50):.1f} | "
              f"{pct(hops['now'], 99):.1f} |")
        print(f"| now, into a stream in memory (``--storage memory``) | {pct(hops['memory'], 50):.1f} | "
              f"{pct(hops['memory'], 99):.1f} |\n")

    if "websocket" in only:
        await websocket_table(args.repeat)

    if "parser" in only:
        await parser_table(url, server.proc.pid, n, args.repeat)

    if "bridge-cpu" in only:
        await bridge_cpu_table(url, server.proc.pid, n, args.repeat)

    if "pipeline" in only:
        await pipeline_table(url, server.proc.pid, n, args.repeat, args.modes)

    if "bridge-hops" in only:
        b148: list[float] = []
        bnow: list[float] = []
        for _ in range(2):  # alternating
            b148 += await bridge_hops(url, args.hops // 4, "before")
            bnow += await bridge_hops(url, args.hops // 4, "now")
        print("| one-tick hop publish → the bridge's ingress hands it to the default pipeline | "
              "hops | p50 µs | p99 µs |")
        print("|---|---:|---:|---:|")
        print(f"| 148a742: nats-py fetch(free slabs) | {len(b148)} | {pct(b148, 50):,.1f} | "
              f"{pct(b148, 99):,.1f} |")
        print(f"| now: open pull request (PullFeed) | {len(bnow)} | {pct(bnow, 50):,.1f} | "
              f"{pct(bnow, 99):,.1f} |")


def server_version() -> str:
    from nautilus_pipeline.bridge.server import find_server

    return subprocess.run([find_server(), "--version"], capture_output=True, text=True).stdout.strip()


def nats_version() -> str:
    from importlib.metadata import version

    return version("nats-py")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ticks", type=int, default=1_000_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--hops", type=int, default=2000)
    ap.add_argument("--only", nargs="+", choices=SECTIONS, help="run only these tables (default: all)")
    ap.add_argument("--modes", nargs="+", choices=[m[1] for m in MODES[1:]],
                    help="the pipeline table's rows besides in-process (default: all)")
    configure_logging(level="warning")
    a = ap.parse_args()
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        runner.run(main(a))
