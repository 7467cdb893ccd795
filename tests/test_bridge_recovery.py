"""Crash recovery through the bridge: SIGKILL of the consuming process, then the same
consumer again, exports exactly the events of one uninterrupted in-process run.

The consumer is a real child process (``python -c``) on a real ``nats-server -js``; it keeps
its state (stage snapshots + the stream sequence they cover + the export numbering) in the
server's KV bucket every 2 messages. The test kills it (SIGKILL) as soon as a snapshot is
stored, mid-stream, starts it again and lets it run until the stream is idle: the EVENTS
stream then holds every event of the in-process run once, in order (0 lost, 0 duplicated).
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest

nats = pytest.importorskip("nats", reason="the NATS bridge needs the live extra (nats-py)")

from nats.js.api import AckPolicy, ConsumerConfig  # noqa: E402

from nautilus_pipeline.bridge import STATE_BUCKET, TickPublisher, decode_event, ensure_stream  # noqa: E402
from nautilus_pipeline.bridge.server import NatsServer  # noqa: E402
from nautilus_pipeline.testing import trades_frame  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SYMBOL = "BTCUSDT-PERP"
TOPICS = ["signals.>", "vpin.>", "risk.>"]
BATCH = 1024

CONSUMER = """
import asyncio, sys
import orjson
import nautilus_pipeline as nt
from nautilus_pipeline.bridge import NatsBridge

async def main(url, durable, batch, topics):
    pipe = nt.Run("default", outputs=False, pipeline_settings={"batch_size": int(batch)}).pipeline
    async with NatsBridge(pipe, servers=url, ingest="ticks.>", durable=durable,
                          export=topics.split(","), snapshot_every=2) as bridge:
        await bridge.wait_idle(1.0)
    print(orjson.dumps(bridge.stats()).decode())

nt.configure_logging(level="warning")
asyncio.run(main(*sys.argv[1:]))
"""


@pytest.fixture
def nats_server(tmp_path):
    server = NatsServer(tmp_path / "nats").start()
    yield server
    server.kill()


def _consumer(url: str, durable: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, "-c", CONSUMER, url, durable, str(BATCH), ",".join(TOPICS)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


async def _reference(frame) -> dict[str, list]:
    from nautilus_pipeline import Run

    pipe = Run("default", outputs=False, pipeline_settings={"batch_size": BATCH}).pipeline
    got: dict[str, list] = {t: [] for t in TOPICS}
    async with pipe:
        for t in TOPICS:
            pipe.bus.subscribe(t, lambda e, t=t: got[t].append(_json(e.payload)), maxsize=1 << 20)
        await pipe.ingest(frame, symbol=SYMBOL)
        await pipe.drain()
    return got


def _json(payload):
    row = dataclasses.asdict(payload) if dataclasses.is_dataclass(payload) else payload
    return orjson.loads(orjson.dumps(row, option=orjson.OPT_SERIALIZE_NUMPY))


async def _exported(js) -> dict[str, list]:
    n = (await js.stream_info("EVENTS")).state.messages
    sub = await js.pull_subscribe(">", stream="EVENTS", config=ConsumerConfig(ack_policy=AckPolicy.NONE))
    msgs: list = []
    while len(msgs) < n:
        msgs.extend(await sub.fetch(n - len(msgs), timeout=2))
    got: dict[str, list] = {t: [] for t in TOPICS}
    for m in msgs:
        event = decode_event(m.data)
        got[event["topic"].split(".")[0] + ".>"].append(event["payload"])
    return got


async def _wait_for_snapshot(js, durable: str, timeout: float = 60.0) -> None:
    import nats.js.errors

    deadline = time.monotonic() + timeout
    kv = None
    while time.monotonic() < deadline:
        try:
            kv = kv or await js.key_value(STATE_BUCKET)
            await kv.get(durable)
            return
        except (nats.js.errors.BucketNotFoundError, nats.js.errors.KeyNotFoundError):
            await asyncio.sleep(0.005)
    raise TimeoutError(f"no snapshot of {durable!r} stored after {timeout}s")


@pytest.mark.parametrize("slabs_per_message", [1, 4])
async def test_sigkill_of_the_consumer_then_restart_loses_and_duplicates_nothing(nats_server, slabs_per_message):
    """Also with messages of several slabs (the publisher's default of 16384 ticks into
    4096-row slabs): a message cut by the kill comes back whole, its first slabs included."""
    frame = trades_frame(80 * BATCH, seed=21)
    messages = 80 // slabs_per_message
    reference = await _reference(frame)
    assert all(reference[t] for t in TOPICS)

    nc = await nats.connect(nats_server.url)
    try:
        js = nc.jetstream()
        await ensure_stream(js, "TICKS", ["ticks.>"])
        pub = TickPublisher(js, batch_size=BATCH * slabs_per_message)
        assert await pub.publish(frame, SYMBOL) == messages
        await pub.flush()

        first = _consumer(nats_server.url, "crash")
        try:
            await _wait_for_snapshot(js, "crash")
        finally:
            first.send_signal(signal.SIGKILL)
            first.wait()
        assert first.returncode == -signal.SIGKILL

        second = _consumer(nats_server.url, "crash")
        out, err = second.communicate(timeout=300)
        assert second.returncode == 0, err[-3000:]
        stats = orjson.loads(out.strip().splitlines()[-1])
        restored_from = stats["restored_from_seq"]
        assert restored_from is not None and 0 < restored_from < messages  # killed mid-stream
        assert stats["ingress"]["ticks"] == (messages - restored_from) * BATCH * slabs_per_message

        exported = await _exported(js)
        for t in TOPICS:
            assert exported[t] == reference[t], t
        total = sum(len(v) for v in reference.values())
        assert (await js.stream_info("EVENTS")).state.messages == total
    finally:
        await nc.close()
