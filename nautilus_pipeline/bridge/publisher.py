"""Tick batches into the ticks stream (the feed side: ``nautilus-pipeline publish``, tests, bench).

Subjects are ``ticks.<kind>.<venue>.<symbol>`` (``topics.ticks``): a batch of one kind of row
goes to ``trades``, ``quotes`` or ``book``; a batch that interleaves kinds goes whole to
``mixed``, with its ``kind`` column, so the consumer sees the rows in the file's order (split
by kind, a quote between two trades would reach the features stage out of place). A row of
any other kind is refused, never dropped. Each message carries a ``Nats-Msg-Id`` made of its
subject, first and last timestamps, row count and the CRC-32 of its bytes, so a publisher that
restarts and sends the same rows again is stored once (within the stream's duplicate window),
while two different batches share an id only if they agree on all of those and their CRCs
collide (2^-32). CRC-32 rather than a cryptographic hash: it runs at ~6 GB/s here (21 µs for a
139 kB batch) where blake2b took 119 µs, a fifth of the whole publish of a 4096-tick batch, and
nobody forges these ids.

Ticks per message: 16384 by default. Reading a stream, nats-server's and the consumer's CPU
go mostly per message, not per byte: the bridge alone (``scripts/bench_bridge.py --only
bridge-cpu``, a pipeline of one stage that does nothing, 4M ticks filled before, 2-core dev VM
loaded by other jobs, medians of 5 alternating; ``docs/measurements/dev_bench_bridge_cpu_94274bc.txt``)
spent 303 µs of CPU per 4096 ticks (141 this process, 154 nats-server) with 4096-tick messages
and 211 µs (103 + 113) with 16384-tick ones. Publishing, the publisher's CPU went from 127 to
94 µs per 4096 ticks, and the server's while it stored them did not fall (246 and 287 µs;
``--only transport``, ``dev_bench_bridge_transport_8c7deec.txt``). The consumer splits a
message into slabs of its pipeline's ``batch_size``; 16384 rows are a multiple of the usual
slab sizes, so a stream of one symbol is cut into the same batches as an in-process ingest. A
message that would pass the server's ``max_payload`` with its headers (1 MB by default: 16384 rows of quotes
sent in full are 1.2 MB) is sent as two halves instead, each with its own id, the same on
every publish of the same rows.

Acknowledgements are asynchronous: up to ``max_in_flight`` messages wait for their JetStream
ack at once (a bounded window, settled oldest first); ``flush`` waits for all of them.
"""

from __future__ import annotations

import asyncio
import collections
import zlib
from collections.abc import Mapping
from typing import Any

import numpy as np

from .. import topics
from ..errors import ConfigError
from ..events import KIND_BOOK, KIND_QUOTE, KIND_TRADE
from .subjects import name as check_name
from .wire import encode_batch

_KIND_SUBJECTS = {KIND_TRADE: "trades", KIND_QUOTE: "quotes", KIND_BOOK: "book"}

_KNOWN_KIND = np.zeros(256, bool)
_KNOWN_KIND[list(_KIND_SUBJECTS)] = True

TICKS_STREAM = "TICKS"
TICKS_SUBJECTS = "ticks.>"
DEFAULT_BATCH = 16384
"""Ticks per message (see the module docstring)."""
_HEADERS = len(b"NATS/1.0\r\nNats-Msg-Id: \r\n\r\n")
"""A message's header block, but its id: the server counts it into ``max_payload``."""
STORAGES = ("file", "memory")
"""A stream's storage: ``file`` survives a server restart, ``memory`` does not."""


async def ensure_stream(js: Any, stream: str, subjects: list[str], *,
                        duplicate_window_s: float = 600.0, storage: str = "file") -> None:
    """Create ``stream`` over ``subjects`` if it is missing; add subjects it lacks if not.

    ``storage="memory"`` keeps a new stream in the server's memory only: less server CPU per
    message (``scripts/bench_bridge.py``), but a restarted server has lost it, acknowledged
    messages included; ``file`` (the default) is what survives a crash. An existing stream
    keeps its storage (the server does not change it)."""
    import nats.js.errors
    from nats.js.api import StorageType, StreamConfig

    check_name(stream)
    if storage not in STORAGES:
        raise ConfigError(f"storage must be one of {STORAGES}, got {storage!r}")
    try:
        info = await js.stream_info(stream)
    except nats.js.errors.NotFoundError:
        await js.add_stream(StreamConfig(name=stream, subjects=subjects, storage=StorageType(storage),
                                         duplicate_window=duplicate_window_s))
        return
    have = list(info.config.subjects or [])
    missing = [s for s in subjects if s not in have]
    if missing:
        info.config.subjects = have + missing
        await js.update_stream(info.config)


class TickPublisher:
    """Publish tick columns as batches of ``batch_size`` rows, at most ``max_in_flight`` unacked."""

    def __init__(self, js: Any, *, venue: str = "BINANCE", batch_size: int = DEFAULT_BATCH,
                 max_in_flight: int = 256, compact: bool = True, order_by: str = "ts_ns",
                 max_payload: int | None = None):
        self.js = js
        self.max_payload = max_payload or getattr(getattr(js, "_nc", None), "max_payload", None) or 1 << 20
        """Largest message the server takes (default: the connection's, as the server said)."""
        self.compact = compact
        """False: every column in full (wire ``NPB1``), for consumers of an older version."""
        self.order_by = order_by
        """The clock the rows are in time order on (``ts_recv_ns`` for a live websocket feed)."""
        self.venue = venue
        self.batch_size = batch_size
        self.max_in_flight = max_in_flight
        self.messages = 0
        self.duplicates = 0
        self._inflight: collections.deque[asyncio.Future] = collections.deque()

    async def publish(self, columns: Mapping[str, np.ndarray], symbol: str) -> int:
        """Publish the rows in order, ``batch_size`` to a message; returns messages sent."""
        cols = {k: np.asarray(v) for k, v in columns.items() if k != "symbol_id"}
        n = len(cols["ts_ns"])
        kinds = cols.get("kind", np.zeros(n, np.uint8))
        if kinds.dtype == np.uint8:  # a table lookup: np.unique sorts (and imports numpy.ma)
            known = _KNOWN_KIND[kinds]
            unknown = [] if known.all() else sorted(set(kinds[~known].tolist()))
        else:
            unknown = sorted(set(np.unique(kinds).tolist()) - set(_KIND_SUBJECTS))
        if unknown:
            raise ConfigError(f"publish {symbol!r}: rows of kind {unknown} have no ticks subject "
                              f"(known: {_KIND_SUBJECTS})")
        before = self.messages
        for start in range(0, n, self.batch_size):
            idx = slice(start, start + self.batch_size)
            part = {k: v[idx] for k, v in cols.items()}
            k = kinds[idx]
            kind = _KIND_SUBJECTS[int(k[0])] if (k == k[0]).all() else "mixed"
            await self._send(topics.ticks(kind, self.venue, symbol), part, symbol)
        return self.messages - before

    async def _send(self, subj: str, part: Mapping[str, np.ndarray], symbol: str) -> None:
        data = encode_batch(part, symbol, compact=self.compact, order_by=self.order_by)
        ts = part["ts_ns"]
        msg_id = f"{subj}:{int(ts[0])}:{int(ts[-1])}:{len(ts)}:{zlib.crc32(data):08x}"
        # the server bounds headers and payload together (nats-py checks the payload only)
        if len(data) + _HEADERS + len(msg_id) > self.max_payload and len(ts) > 1:  # two halves
            half = (len(ts) + 1) // 2
            await self._send(subj, {k: v[:half] for k, v in part.items()}, symbol)
            await self._send(subj, {k: v[half:] for k, v in part.items()}, symbol)
            return
        while len(self._inflight) >= self.max_in_flight:
            await self._settle_one()
        self._inflight.append(await self.js.publish_async(subj, data, headers={"Nats-Msg-Id": msg_id}))
        self.messages += 1

    async def _settle_one(self) -> None:
        ack = await self._inflight.popleft()
        if ack.duplicate:
            self.duplicates += 1

    async def flush(self) -> None:
        """Wait until JetStream has acknowledged every message sent (stored: it survives a crash)."""
        while self._inflight:
            await self._settle_one()
