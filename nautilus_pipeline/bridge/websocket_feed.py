"""A live Binance websocket source: combined streams → tick columns, micro-batched at the edge.

Binance's combined streams (``/stream?streams=ethusdt@trade/ethusdt@bookTicker``) send one
JSON frame per event: ``{"stream": "<sym>@trade|@aggTrade|@bookTicker", "data": {...}}``.
Each frame is parsed with the capture reader's rules (``io/binance.py``: same fields, units
and refusals), so a live run and a replay of its capture give the same ticks. Frames are
micro-batched: a batch leaves at ``flush_ticks`` ticks or ``flush_us`` after its first tick,
whichever comes first, one column dict per symbol (what ``Pipeline.ingest`` and
``TickPublisher.publish`` take).

Faults are counted and logged, never silent:

- a malformed frame (not JSON, a field missing or of the wrong type) is a ``bad_frame``;
- a gap in a symbol's trade ids (``t`` for trades, ``a`` for aggTrades) counts one ``gap``
  and its ``missing_ids``; an id at or below the last one seen is a ``duplicate``, dropped;
  a bookTicker whose update id ``u`` does not increase is a ``duplicate`` too (``u`` counts
  every book update, so its steps are not gaps);
- a connection that drops (an error, or any close unless ``end_on_close``) is re-opened
  after ``reconnect_delay_s``, at most ``max_reconnects`` times in a row without a frame; the
  ids then tell what the outage cost.

The client is ``picows`` when it is installed (a maintained Cython client; its
``picows.websockets`` layer has the ``websockets`` asyncio API, so the loop below is the same
for both), else ``websockets`` (pure asyncio); ``client=`` picks one. Measured side by side on
the bundled capture by ``scripts/bench_bridge.py`` (the README's table).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
import structlog

from ..errors import PipelineError
from ..io.binance import _Bad, _FeedBatch

log = structlog.get_logger("nautilus_pipeline.bridge.websocket")


class FeedError(PipelineError):
    """The websocket feed cannot go on (no connection after ``max_reconnects`` tries)."""


@dataclass
class FeedStats:
    """What the feed received and what it made of it (cumulative)."""

    frames: int = 0
    trades: int = 0
    quotes: int = 0
    ignored: int = 0
    bad_frames: int = 0
    gaps: int = 0
    missing_ids: int = 0
    duplicates: int = 0
    reconnects: int = 0
    batches: int = 0


CLIENTS = ("picows", "websockets")


def client_api(client: str = "auto") -> tuple[str, Any, type, type]:
    """(name, ``connect``, ``ConnectionClosed``, ``ConnectionClosedOK``) of a websocket client
    library: ``"picows"``, ``"websockets"``, or ``"auto"`` (picows when importable)."""
    if client not in ("auto", *CLIENTS):
        raise PipelineError(f"websocket client {client!r}: expected one of auto, {', '.join(CLIENTS)}")
    if client in ("auto", "picows"):
        try:
            from picows.websockets import ConnectionClosed, ConnectionClosedOK, connect
        except ImportError:
            if client == "picows":
                raise PipelineError("websocket client 'picows' is not installed "
                                    "(pip install picows, or client='websockets')") from None
        else:
            return "picows", connect, ConnectionClosed, ConnectionClosedOK
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed, ConnectionClosedOK

    return "websockets", connect, ConnectionClosed, ConnectionClosedOK


class BinanceWebsocketFeed:
    """``async for symbol, columns in feed.batches():`` ticks of a combined-stream URL."""

    def __init__(self, url: str, *, flush_ticks: int = 4096, flush_us: float = 1000.0,
                 reconnect_delay_s: float = 0.1, max_reconnects: int = 10,
                 end_on_close: bool = False, close_timeout_s: float = 1.0, client: str = "auto"):
        if flush_ticks < 1 or not flush_us > 0:
            raise PipelineError(f"flush_ticks must be >= 1 and flush_us > 0, got {flush_ticks}, {flush_us}")
        self.url = url
        self.flush_ticks = flush_ticks
        self.flush_s = flush_us / 1e6
        self.reconnect_delay_s = reconnect_delay_s
        self.max_reconnects = max_reconnects
        self.end_on_close = end_on_close
        self.close_timeout_s = close_timeout_s
        self.client, self._connect, self._closed, self._closed_ok = client_api(client)
        self.stats = FeedStats()
        self._last_id: dict[tuple[str, str], int] = {}
        self._last_u: dict[tuple[str, str], int] = {}

    async def batches(self, stop: asyncio.Event | None = None) -> AsyncIterator[tuple[str, dict[str, np.ndarray]]]:
        """Batches until ``stop`` is set (or the server closes, with ``end_on_close``)."""
        connect, ConnectionClosed, ConnectionClosedOK = self._connect, self._closed, self._closed_ok
        stop = stop or asyncio.Event()
        loop = asyncio.get_running_loop()
        failures = 0
        acc = _FeedBatch()
        due = 0.0  # when the batch in ``acc`` must leave
        while not stop.is_set():
            try:
                async with connect(self.url, max_size=1 << 22, compression=None,
                                   close_timeout=self.close_timeout_s) as ws, _closing_on(stop, ws):
                    while not stop.is_set():
                        out = None
                        try:
                            # One timer per batch (set at its first tick), not one per frame:
                            # a timeout context per frame cost as much as parsing the frame.
                            async with asyncio.timeout(due if len(acc) else None) as deadline:
                                while out is None and not stop.is_set():
                                    frame = await ws.recv(decode=False)
                                    failures = 0
                                    empty = not len(acc)
                                    self._parse(frame, acc)
                                    if empty and len(acc):
                                        due = loop.time() + self.flush_s
                                        deadline.reschedule(due)
                                    if len(acc) >= self.flush_ticks or (len(acc) and loop.time() >= due):
                                        out = self._flush(acc)
                                        acc = _FeedBatch()
                        except TimeoutError:  # the batch's flush_us ran out before flush_ticks
                            out = self._flush(acc)
                            acc = _FeedBatch()
                        for item in out or ():
                            yield item
            except ConnectionClosedOK:
                if self.end_on_close or stop.is_set():
                    break
                self._reconnecting("closed by the server")
            except (ConnectionClosed, OSError, TimeoutError) as exc:
                if stop.is_set():  # closed by ``_closing_on``, or failing as it closed
                    break
                failures += 1
                if failures > self.max_reconnects:
                    raise FeedError(f"{self.url}: no connection after {self.max_reconnects} tries "
                                    f"({type(exc).__name__}: {exc})") from None
                self._reconnecting(f"{type(exc).__name__}: {exc}")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.reconnect_delay_s)
        for item in self._flush(acc):
            yield item

    def _reconnecting(self, why: str) -> None:
        self.stats.reconnects += 1
        log.warning("websocket_reconnect", url=self.url, reason=why, reconnects=self.stats.reconnects)

    def _parse(self, frame: bytes, acc: _FeedBatch) -> None:
        st = self.stats
        st.frames += 1
        try:
            msg = orjson.loads(frame)
            if not isinstance(msg, dict):
                raise _Bad(None, None, f"a JSON {type(msg).__name__}, expected an object")
            stream = msg.get("stream")
            if not isinstance(stream, str) or "@" not in stream:
                st.ignored += 1
                return
            kind = stream.rpartition("@")[2] if "@depth" not in stream else "depth"
            if kind not in ("trade", "aggTrade", "bookTicker"):
                st.ignored += 1
                return
            d = msg.get("data")
            if not isinstance(d, dict):
                raise _Bad(None, "data", d)
            if not self._in_sequence(kind, d):
                return
            before = len(acc)
            if kind == "bookTicker":
                acc.add_quote(st.frames, time.time_ns(), d, frame)
            else:
                acc.add_trade(st.frames, time.time_ns(), d, "t" if kind == "trade" else "a", frame)
            if len(acc) > before:
                if kind == "bookTicker":
                    st.quotes += 1
                else:
                    st.trades += 1
        except (orjson.JSONDecodeError, _Bad) as exc:
            st.bad_frames += 1
            log.warning("websocket_bad_frame", url=self.url, frame=st.frames,
                        error=str(exc) if not isinstance(exc, _Bad) else f"{exc.field}: {exc.value!r}",
                        excerpt=frame[:200].decode("utf-8", "replace"))

    def _in_sequence(self, kind: str, d: dict[str, Any]) -> bool:
        """Gap and duplicate detection from the exchange's ids (False: drop this frame)."""
        sym = d.get("s")
        key = "u" if kind == "bookTicker" else ("t" if kind == "trade" else "a")
        ident = d.get(key)
        if not isinstance(sym, str) or type(ident) is not int:
            return True  # malformed: the parser refuses it with the field's name
        st = self.stats
        seen = self._last_u if kind == "bookTicker" else self._last_id
        sym = (sym, key)  # trade ids (t) and aggregate trade ids (a) are separate sequences
        last = seen.get(sym)
        if last is not None and ident <= last:
            st.duplicates += 1
            return False
        if last is not None and kind != "bookTicker" and ident > last + 1:
            st.gaps += 1
            st.missing_ids += ident - last - 1
            log.warning("websocket_gap", url=self.url, symbol=sym[0], id_field=key, after_id=last, next_id=ident,
                        missing=ident - last - 1)
        seen[sym] = ident
        return True

    def _flush(self, acc: _FeedBatch) -> list[tuple[str, dict[str, np.ndarray]]]:
        if not len(acc):
            return []
        chunk = acc.chunk(self.url, None)
        cols, codes = chunk.columns, chunk.columns["symbol_id"]
        out = []
        for code, symbol in enumerate(chunk.symbols):
            rows = np.flatnonzero(codes == code)
            if len(rows):
                out.append((symbol, {k: v[rows] for k, v in cols.items() if k != "symbol_id"}))
        self.stats.batches += 1
        return out


@contextlib.asynccontextmanager
async def _closing_on(stop: asyncio.Event, ws: Any) -> AsyncIterator[None]:
    """Close ``ws`` as soon as ``stop`` is set, so a ``recv()`` waiting for a frame that may
    never come (a quiet market, no batch open and so no flush timer) returns at once.

    A watcher task per connection rather than racing ``recv()`` against ``stop.wait()`` per
    frame: the race would cost a task and a wait per frame, the watcher nothing."""

    async def watch() -> None:
        await stop.wait()
        await ws.close(1000, "feed stopped")

    watcher = asyncio.get_running_loop().create_task(watch(), name="websocket-stop-watcher")
    try:
        yield
    finally:
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)  # a cancel of ours still propagates
