"""``PullFeed``: the ingress's open pull request, on a real ``nats-server -js``.

A message published while the feed waits is handed over at once, the request for the rest
of its batch still open for the next read; deliveries nobody took are nak'ed at close and redelivered at once; a request the
server forgot in a restart is replaced, so the feed goes on.
"""

from __future__ import annotations

import asyncio

import pytest

nats = pytest.importorskip("nats", reason="the NATS bridge needs the live extra (nats-py)")

from nats.js.api import AckPolicy, ConsumerConfig  # noqa: E402

from nautilus_pipeline.bridge import ensure_stream  # noqa: E402
from nautilus_pipeline.bridge.pull import PullFeed  # noqa: E402
from nautilus_pipeline.bridge.server import NatsServer  # noqa: E402

SUBJECT = "ticks.trades.BINANCE.X"


@pytest.fixture
def nats_server(tmp_path):
    server = NatsServer(tmp_path / "nats").start()
    yield server
    server.kill()


async def _feed(nc, durable: str, expires_s: float = 0.25) -> PullFeed:
    js = nc.jetstream()
    await ensure_stream(js, "TICKS", ["ticks.>"])
    await js.add_consumer("TICKS", ConsumerConfig(durable_name=durable, ack_policy=AckPolicy.EXPLICIT,
                                                  ack_wait=60))
    return await PullFeed(nc, "TICKS", durable, expires_s=expires_s).open()


async def test_one_message_is_handed_over_while_the_request_for_more_stays_open(nats_server):
    nc = await nats.connect(nats_server.url)
    try:
        feed = await _feed(nc, "one", expires_s=60.0)
        assert await feed.get(8, timeout=0.05) == []  # the request is open, nothing yet
        waiting = asyncio.ensure_future(feed.get(8, timeout=30.0))
        await asyncio.sleep(0.05)
        await nc.jetstream().publish(SUBJECT, b"tick")
        msgs = await waiting
        assert [m.data for m in msgs] == [b"tick"]
        assert (feed.requests, feed._credit) == (1, 7)  # the same request, 7 still to come
        await msgs[0].ack()
        await nc.jetstream().publish(SUBJECT, b"tick 2")
        assert [m.data for m in await feed.get(8, timeout=30.0)] == [b"tick 2"]
        assert feed.requests == 1
        await feed.close()
    finally:
        await nc.close()


async def test_ask_requests_ahead_at_the_half_mark_and_get_takes_no_more_than_its_limit(nats_server):
    nc = await nats.connect(nats_server.url)
    try:
        js = nc.jetstream()
        feed = await _feed(nc, "ahead", expires_s=30.0)
        for i in range(10):
            await js.publish(SUBJECT, b"%d" % i)
        await feed.ask(6)  # nothing here, no request open: ask for 6
        assert (feed.requests, feed._credit) == (1, 6)
        got = []
        while len(got) < 2:
            got += await feed.get(6, timeout=5.0, limit=2 - len(got))
        for _ in range(1000):  # the other 4 of the request arrive and wait
            if feed.ready == 4:
                break
            await feed._wait(0.01)
        assert [m.data for m in got] == [b"0", b"1"] and feed.ready == 4
        await feed.ask(6)  # 4 waiting, more than half of 6: no request
        assert feed.requests == 1
        got = await feed.get(6, timeout=5.0, limit=2)
        assert [m.data for m in got] == [b"2", b"3"] and feed.ready == 2
        await feed.ask(6)  # 2 waiting, half or less: ask for the 4 missing
        assert (feed.requests, feed._credit) == (2, 4)
        for m in got:
            await m.ack()
        await feed.close()
    finally:
        await nc.close()


async def test_deliveries_not_taken_are_nakked_at_close_and_redelivered_at_once(nats_server):
    nc = await nats.connect(nats_server.url)
    try:
        js = nc.jetstream()
        feed = await _feed(nc, "nak", expires_s=30.0)
        assert await feed.get(4, timeout=0.05) == []  # a request for 4 is open
        for i in range(3):
            await js.publish(SUBJECT, b"%d" % i)
        await nc.flush()
        for _ in range(1000):  # delivered, not taken
            if len(feed._ready) == 3:
                break
            await feed._wait(0.01)
        assert len(feed._ready) == 3
        assert await feed.close() == 3
        again = await PullFeed(nc, "TICKS", "nak").open()
        got = []
        while len(got) < 3:  # redelivered now, not after the consumer's 60 s ack_wait
            got += await again.get(4, timeout=5.0)
        assert [(m.data, m.metadata.num_delivered) for m in got] == [(b"0", 2), (b"1", 2), (b"2", 2)]
        await again.close()
    finally:
        await nc.close()


async def test_a_request_the_restarted_server_forgot_is_replaced(nats_server):
    nc = await nats.connect(nats_server.url, max_reconnect_attempts=-1, reconnect_time_wait=0.1)
    try:
        feed = await _feed(nc, "lost", expires_s=0.5)
        assert await feed.get(4, timeout=0.05) == []
        nats_server.kill()
        nats_server.start()
        got = []
        for _ in range(200):  # until the client has reconnected and the message is in
            try:
                await nc.jetstream().publish(SUBJECT, b"after", timeout=0.5)
                break
            except (nats.errors.TimeoutError, nats.js.errors.NoStreamResponseError,
                    nats.errors.NoRespondersError, nats.errors.ConnectionReconnectingError):
                await asyncio.sleep(0.05)
        while not got:
            got = await feed.get(4, timeout=10.0)
        assert [m.data for m in got] == [b"after"]
        assert feed.requests >= 2  # the first was gone with the old server process
        await feed.close()
    finally:
        await nc.close()
