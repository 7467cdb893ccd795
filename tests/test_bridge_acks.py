"""The ingress's acknowledgements and the stream's options, against a real nats-server:
cumulative acks (the consumer's ``AckAll`` policy), messages larger than a slab, and memory
storage."""

from __future__ import annotations

import asyncio

import pytest

nats = pytest.importorskip("nats", reason="the NATS bridge needs the live extra (nats-py)")

from nats.js.api import AckPolicy, ConsumerConfig, StorageType  # noqa: E402

from nautilus_pipeline import Pipeline  # noqa: E402
from nautilus_pipeline.bridge import NatsBridge, TickPublisher, ensure_stream  # noqa: E402
from nautilus_pipeline.bridge.ingress import Ingress, _Pending  # noqa: E402
from nautilus_pipeline.bridge.pull import PullFeed  # noqa: E402
from nautilus_pipeline.bridge.server import NatsServer  # noqa: E402
from nautilus_pipeline.errors import ConfigError  # noqa: E402
from nautilus_pipeline.stage import Stage  # noqa: E402
from nautilus_pipeline.testing import trades_frame  # noqa: E402

SYMBOL = "BTCUSDT-PERP"


@pytest.fixture
def nats_server(tmp_path):
    server = NatsServer(tmp_path / "nats").start()
    yield server
    server.kill()


async def _settled(js, durable: str, floor: int, within_s: float = 10.0):
    """The consumer's info once the server has applied acks up to ``floor``: JetStream applies
    an ack after the client's flush returns (in the consumer's own goroutine), so an info
    read at once can be a moment behind (a loaded machine's full suite saw floor 0 for 3).
    A wait for the state, not a time bound: the last info is returned either way."""
    deadline = asyncio.get_running_loop().time() + within_s
    while True:
        info = await js.consumer_info("TICKS", durable)
        if info.ack_floor.stream_seq >= floor or asyncio.get_running_loop().time() > deadline:
            return info
        await asyncio.sleep(0.01)


class _Rows(Stage):
    """Keeps the ts_ns of every row and the length of every batch it is given."""

    name = "rows"
    reads = ("ts_ns",)
    writes = ()
    streams = ("cpu",)

    def __init__(self, delay_s: float = 0.0):
        self.ts: list[int] = []
        self.lengths: list[int] = []
        self.delay_s = delay_s

    async def process(self, lease, stream, ctx):
        self.ts += lease["ts_ns"].tolist()
        self.lengths.append(lease.length)
        if self.delay_s:
            await asyncio.sleep(self.delay_s)


async def _publish(url: str, frame: dict, batch_size: int, storage: str = "file") -> None:
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        await ensure_stream(js, "TICKS", ["ticks.>"], storage=storage)
        pub = TickPublisher(js, batch_size=batch_size)
        await pub.publish(frame, SYMBOL)
        await pub.flush()
    finally:
        await nc.close()


async def _acks_on_the_wire(url: str, durable: str):
    """A second connection that counts the acks the server receives for ``durable``."""
    nc = await nats.connect(url)
    seen = []

    async def count(msg):
        seen.append(msg.subject)

    await nc.subscribe(f"$JS.ACK.TICKS.{durable}.>", cb=count)
    await nc.flush()
    return nc, seen


@pytest.mark.parametrize("policy", ["explicit", "all"])
async def test_every_message_is_acknowledged_with_either_policy_and_all_with_fewer_acks(nats_server, policy):
    frame = trades_frame(1900, seed=6)
    await _publish(nats_server.url, frame, batch_size=100)  # 19 messages
    spy, seen = await _acks_on_the_wire(nats_server.url, f"acks-{policy}")
    rows = _Rows(delay_s=0.001)
    pipe = Pipeline([rows], batch_size=100, slabs=4, execution="serial")
    try:
        async with NatsBridge(pipe, servers=nats_server.url, ingest="ticks.>", durable=f"acks-{policy}",
                              state=False, ack_every=4, ack_policy=policy) as bridge:
            await bridge.wait_idle(0.3)
            await bridge.nc.flush()
            info = await _settled(bridge.js, f"acks-{policy}", 19)
            assert bridge.cumulative == (policy == "all")
            assert info.config.ack_policy == AckPolicy(policy)
            assert bridge.ingress.stats.acked == 19
            assert info.num_ack_pending == 0 and info.ack_floor.stream_seq == 19
        await spy.flush()
        if policy == "explicit":
            assert len(seen) == 19  # one per message
        else:
            assert 1 <= len(seen) <= 19 // 4 + 2  # one per group, the last when the stream ran dry
    finally:
        await spy.close()
    assert rows.ts == frame["ts_ns"].tolist()


async def test_a_cumulative_ack_waits_for_an_older_message_still_in_the_pipeline(nats_server):
    await _publish(nats_server.url, trades_frame(300, seed=1), batch_size=100)  # 3 messages
    nc = await nats.connect(nats_server.url)
    try:
        js = nc.jetstream()
        await js.add_consumer("TICKS", ConsumerConfig(durable_name="floor", ack_policy=AckPolicy.ALL))
        feed = await PullFeed(nc, "TICKS", "floor").open()
        msgs: list = []
        while len(msgs) < 3:
            msgs += await feed.get(3, 5.0)
        pipe = Pipeline([_Rows()], batch_size=100, slabs=2, execution="serial")
        ingress = Ingress(pipe, feed, cumulative=True)
        first, *later = (_Pending(m, m.metadata.sequence.stream, 1) for m in msgs)
        for p in (first, *later):
            ingress._open[p.seq] = p
        for p in later:  # the two newer ones done, the oldest still in a stage
            p.left = 0
            ingress._done.append(p)
        await ingress._ack_done()
        await nc.flush()
        info = await js.consumer_info("TICKS", "floor")
        assert ingress.stats.acked == 0
        assert info.ack_floor.stream_seq == 0 and info.num_ack_pending == 3
        first.left = 0
        ingress._done.append(first)
        await ingress._ack_done()
        await nc.flush()
        info = await _settled(js, "floor", 3)
        assert ingress.stats.acked == 3 and not ingress._open
        assert info.ack_floor.stream_seq == 3 and info.num_ack_pending == 0
        await feed.close()
    finally:
        await nc.close()


async def test_an_existing_durable_consumer_keeps_its_ack_policy(nats_server):
    await _publish(nats_server.url, trades_frame(1000, seed=3), batch_size=100)  # 10 messages
    nc = await nats.connect(nats_server.url)
    try:
        await nc.jetstream().add_consumer("TICKS", ConsumerConfig(durable_name="old", ack_policy=AckPolicy.EXPLICIT))
    finally:
        await nc.close()
    pipe = Pipeline([_Rows()], batch_size=100, slabs=4, execution="serial")
    async with NatsBridge(pipe, servers=nats_server.url, ingest="ticks.>", durable="old",
                          state=False, ack_policy="all") as bridge:
        await bridge.wait_idle(0.3)
        await bridge.nc.flush()
        assert not bridge.cumulative  # an ack per message, as the consumer expects
        info = await _settled(bridge.js, "old", 10)
        assert info.num_ack_pending == 0 and info.ack_floor.stream_seq == 10


async def test_a_message_of_several_slabs_is_fed_in_order_and_acked_once(nats_server):
    frame = trades_frame(5000, seed=4)
    await _publish(nats_server.url, frame, batch_size=2000)  # 3 messages: 2000, 2000, 1000 rows
    rows = _Rows()
    pipe = Pipeline([rows], batch_size=512, slabs=3, execution="serial")
    async with NatsBridge(pipe, servers=nats_server.url, ingest="ticks.>", durable="big",
                          state=False, ack_policy="all") as bridge:
        await bridge.wait_idle(0.3)
        await bridge.nc.flush()
        st = bridge.ingress.stats
        assert (st.messages, st.batches, st.acked) == (3, 4 + 4 + 2, 3)
        assert (await _settled(bridge.js, "big", 3)).ack_floor.stream_seq == 3
    assert rows.ts == frame["ts_ns"].tolist()
    assert rows.lengths == [512, 512, 512, 464] * 2 + [512, 488]


async def test_a_memory_stream_is_made_in_memory_and_an_unknown_storage_refused(nats_server):
    frame = trades_frame(600, seed=5)
    await _publish(nats_server.url, frame, batch_size=200, storage="memory")
    nc = await nats.connect(nats_server.url)
    try:
        js = nc.jetstream()
        info = await js.stream_info("TICKS")
        assert info.config.storage == StorageType.MEMORY and info.state.messages == 3
        with pytest.raises(ConfigError, match="storage must be one of"):
            await ensure_stream(js, "OTHER", ["other.>"], storage="disk")
    finally:
        await nc.close()
    rows = _Rows()
    pipe = Pipeline([rows], batch_size=200, slabs=2, execution="serial")
    async with NatsBridge(pipe, servers=nats_server.url, ingest="ticks.>", durable="mem", state=False) as bridge:
        await bridge.wait_idle(0.3)
    assert rows.ts == frame["ts_ns"].tolist()


def test_an_unknown_ack_policy_is_refused():
    pipe = Pipeline([_Rows()], batch_size=50, slabs=4)
    with pytest.raises(ConfigError, match="ack_policy must be one of"):
        NatsBridge(pipe, ingest="ticks.>", durable="x", state=False, ack_policy="none")


async def test_a_message_over_the_servers_max_payload_is_sent_in_halves_with_stable_ids(tmp_path):
    from nautilus_pipeline.bridge.cli import DEFAULT_BATCH
    from nautilus_pipeline.bridge.publisher import DEFAULT_BATCH as PUBLISHER_BATCH

    assert DEFAULT_BATCH == PUBLISHER_BATCH == 16384
    server = NatsServer(tmp_path / "small", max_payload=64 * 1024).start()
    try:
        frame = trades_frame(DEFAULT_BATCH, seed=8)  # ~410 kB as one message: 8 of ~51 kB fit
        nc = await nats.connect(server.url)
        try:
            js = nc.jetstream()
            await ensure_stream(js, "TICKS", ["ticks.>"])
            pub = TickPublisher(js)
            assert pub.max_payload == 64 * 1024  # the connection's, as the server said
            assert await pub.publish(frame, SYMBOL) == 8
            await pub.flush()
            again = TickPublisher(js)
            assert await again.publish(frame, SYMBOL) == 8
            await again.flush()
            assert again.duplicates == 8  # the same halves, the same ids
            assert (await js.stream_info("TICKS")).state.messages == 8
        finally:
            await nc.close()
        rows = _Rows()
        pipe = Pipeline([rows], batch_size=4096, slabs=2, execution="serial")
        async with NatsBridge(pipe, servers=server.url, ingest="ticks.>", durable="halves", state=False) as bridge:
            await bridge.wait_idle(0.3)
        assert rows.ts == frame["ts_ns"].tolist() and rows.lengths == [2048] * 8
    finally:
        server.kill()



async def test_a_message_that_fits_max_payload_only_without_its_headers_is_sent_in_halves(tmp_path):
    """The server bounds headers and payload together (``Nats-Msg-Id`` is ~80 bytes here):
    a batch whose encoding fits ``max_payload`` by fewer bytes than its headers take must be
    halved too, not sent whole (the server refuses it and drops the connection)."""
    from nautilus_pipeline.bridge.wire import encode_batch

    frame = trades_frame(1000, seed=3)
    size = len(encode_batch(frame, SYMBOL))
    server = NatsServer(tmp_path / "tight", max_payload=size + 16).start()
    try:
        nc = await nats.connect(server.url, max_reconnect_attempts=0)
        try:
            js = nc.jetstream()
            await ensure_stream(js, "TICKS", ["ticks.>"])
            pub = TickPublisher(js, batch_size=1000)
            sent = await asyncio.wait_for(pub.publish(frame, SYMBOL), 10)
            await asyncio.wait_for(pub.flush(), 10)
            assert sent == 2 and (await js.stream_info("TICKS")).state.messages == 2
        finally:
            await nc.close()
    finally:
        server.kill()
