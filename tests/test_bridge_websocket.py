"""The live Binance websocket source against a local server replaying the bundled capture.

The server (loopback, ``bridge/ws_replay.py``) sends the capture's frames as a combined
stream; faults are injected there. Specifications: a clean replay gives the ticks the capture
reader gives (trades: time, price, size, side, id; quotes: bid/ask and sizes); a dropped
connection is re-opened and the trades that went by meanwhile are counted as missing ids; a
malformed frame is counted and the rest arrive; a skipped id range is one gap of its size;
batches never exceed ``flush_ticks``.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

pytest.importorskip("websockets", reason="the websocket source needs the live extra (websockets)")

from nautilus_pipeline.bridge.websocket_feed import CLIENTS, BinanceWebsocketFeed, client_api
from nautilus_pipeline.bridge.ws_replay import CaptureReplayServer
from nautilus_pipeline.errors import PipelineError
from nautilus_pipeline.events import KIND_QUOTE, KIND_TRADE
from nautilus_pipeline.io.binance import BinanceFeedReader

CAPTURE = "binance-feed-spot-ethusdt_20240808.jsonl.gz"
TRADE_COLS = ("ts_ns", "price", "size", "side", "trade_id")
QUOTE_COLS = ("bid", "ask", "bid_size", "ask_size")


@pytest.fixture(params=CLIENTS)
def client(request):
    """Each websocket client library the feed runs on (the live extra installs both)."""
    if request.param == "picows":
        pytest.importorskip("picows", reason="the picows client needs the live extra (picows)")
    return request.param


@pytest.fixture(scope="module")
def capture(sample_dir):
    path = sample_dir / CAPTURE
    chunks = list(BinanceFeedReader(path).chunks())
    cols = {k: np.concatenate([c.columns[k] for c in chunks]) for k in chunks[0].columns}
    return path, cols


async def _receive(server: CaptureReplayServer, client: str, **kw) -> tuple[BinanceWebsocketFeed, dict, list[int]]:
    feed = BinanceWebsocketFeed(server.url, end_on_close=True, reconnect_delay_s=0.01, client=client, **kw)
    assert feed.client == client
    parts, sizes = [], []
    async for symbol, cols in feed.batches():
        assert symbol == "ETHUSDT"
        parts.append(cols)
        sizes.append(len(cols["ts_ns"]))
    got = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    return feed, got, sizes


def _split(cols: dict) -> tuple[dict, dict]:
    trades = {k: cols[k][cols["kind"] == KIND_TRADE] for k in TRADE_COLS}
    quotes = {k: cols[k][cols["kind"] == KIND_QUOTE] for k in QUOTE_COLS}
    return trades, quotes


def _natural_gaps(ids: np.ndarray) -> tuple[int, int]:
    steps = np.diff(ids)
    return int((steps > 1).sum()), int((steps[steps > 1] - 1).sum())


async def test_a_clean_replay_gives_the_ticks_of_the_capture_reader(capture, client):
    path, ref = capture
    async with CaptureReplayServer(path) as server:
        feed, got, sizes = await _receive(server, client, flush_ticks=512)
    ref_t, ref_q = _split(ref)
    got_t, got_q = _split(got)
    for k in TRADE_COLS:
        np.testing.assert_array_equal(got_t[k], ref_t[k], err_msg=k)
    for k in QUOTE_COLS:
        np.testing.assert_array_equal(got_q[k], ref_q[k], err_msg=k)
    st = feed.stats
    assert (st.trades, st.quotes) == (len(ref_t["ts_ns"]), len(ref_q["bid"]))
    assert st.ignored == 3434 and st.bad_frames == 0 and st.duplicates == 0 and st.reconnects == 0
    assert (st.gaps, st.missing_ids) == _natural_gaps(ref_t["trade_id"])
    assert max(sizes) <= 512


async def test_a_dropped_connection_is_reopened_and_what_went_by_is_counted(capture, client):
    path, ref = capture
    async with CaptureReplayServer(path, drop_after=5000, lost_on_reconnect=400) as server:
        feed, got, _ = await _receive(server, client)
        assert server.connections == 2
    st = feed.stats
    assert st.reconnects == 1
    ref_ids = _split(ref)[0]["trade_id"]
    got_ids = _split(got)[0]["trade_id"]
    assert np.all(np.diff(got_ids) > 0)  # nothing twice
    lost = np.setdiff1d(ref_ids[(ref_ids > got_ids[0]) & (ref_ids < got_ids[-1])], got_ids)
    assert len(lost) > 0
    natural_gaps, natural_missing = _natural_gaps(ref_ids)
    assert st.missing_ids == natural_missing + len(lost)
    assert st.gaps > natural_gaps
    # every trade that arrived is the capture's trade of that id
    idx = np.searchsorted(ref_ids, got_ids)
    ref_t, got_t = _split(ref)[0], _split(got)[0]
    for k in TRADE_COLS:
        np.testing.assert_array_equal(got_t[k], ref_t[k][idx], err_msg=k)


async def test_a_malformed_frame_is_counted_and_the_rest_arrive(capture, client):
    path, ref = capture
    async with CaptureReplayServer(path, malformed_at=[100, 2000]) as server:
        damaged = [server.frames[i - 1][1] for i in (100, 2000)]
        feed, got, _ = await _receive(server, client)
    st = feed.stats
    assert st.bad_frames == 2
    ticks_lost = sum('@trade"' in f or '@bookTicker"' in f for f in damaged)
    assert st.trades + st.quotes == len(ref["ts_ns"]) - ticks_lost == len(got["ts_ns"])


async def test_a_skipped_id_range_is_one_gap_of_its_size(capture, client):
    path, ref = capture
    ids = _split(ref)[0]["trade_id"]
    lo, hi = int(ids[1000]), int(ids[1049])
    async with CaptureReplayServer(path, skip_trade_ids=(lo, hi)) as server:
        feed, got, _ = await _receive(server, client)
    natural_gaps, natural_missing = _natural_gaps(ids)
    inside = int(((ids >= lo) & (ids <= hi)).sum())
    assert inside == 50
    assert feed.stats.gaps == natural_gaps + 1
    assert feed.stats.missing_ids == natural_missing + (hi - lo + 1)
    assert len(_split(got)[0]["trade_id"]) == len(ids) - inside


def test_trade_and_aggregate_trade_ids_of_one_symbol_are_separate_sequences():
    feed = BinanceWebsocketFeed("ws://127.0.0.1:1/stream")
    for i in (100, 101, 102):
        assert feed._in_sequence("trade", {"s": "BTCUSDT", "t": i})
        assert feed._in_sequence("aggTrade", {"s": "BTCUSDT", "a": i - 90})  # a lower id space
    assert feed.stats.duplicates == 0 and feed.stats.gaps == 0
    assert not feed._in_sequence("trade", {"s": "BTCUSDT", "t": 101})  # a real duplicate
    assert feed.stats.duplicates == 1


async def test_a_stop_while_no_batch_is_open_ends_the_feed_without_waiting_for_a_frame(capture, client):
    """The server goes quiet (no frame will come) and the feed waits in ``recv()`` with no
    batch open: setting ``stop`` from another task still ends it, every tick received so far
    delivered and the connection closed by the client."""
    path, _ = capture
    stop = asyncio.Event()
    async with CaptureReplayServer(path, stall_after=50) as server:
        feed = BinanceWebsocketFeed(server.url, flush_ticks=1 << 20, flush_us=1000.0, client=client)
        ticks = 0
        all_in = asyncio.Event()

        async def consume() -> None:
            nonlocal ticks
            async for _, cols in feed.batches(stop):
                ticks += len(cols["ts_ns"])
                if feed.stats.frames == 50 and ticks == feed.stats.trades + feed.stats.quotes:
                    all_in.set()

        async def stop_when_all_in() -> None:
            await all_in.wait()
            await asyncio.sleep(0.05)  # the feed is back in recv(), waiting for a 51st frame
            stop.set()

        async with asyncio.timeout(30), asyncio.TaskGroup() as tg:  # a hang guard, not a timing assertion
            tg.create_task(consume())
            tg.create_task(stop_when_all_in())
        async with asyncio.timeout(30):
            await server.client_closed.wait()
    assert server.sent == 50 and feed.stats.frames == 50
    assert ticks == feed.stats.trades + feed.stats.quotes > 0
    assert feed.stats.reconnects == 0


def test_an_unknown_client_is_refused_naming_the_choices():
    with pytest.raises(PipelineError, match="expected one of auto, picows, websockets"):
        client_api("aiohttp")
