"""The bridge's state in the KV bucket, larger than one message: chunks and a manifest.

Specifications, on a real ``nats-server -js`` whose ``max_payload`` is 32 KiB: a state many
times that size is stored as chunks and read back byte for byte; a smaller state later
purges the chunks nobody reads; a new store (a restarted process) never writes into the
slot the manifest points to; a ``kill -9`` of the saving process between two chunk puts
leaves the previous state whole, at a chosen chunk and at random moments; and a pipeline of
many symbols (its state 4x ``max_payload``) killed mid-stream and restarted exports exactly
the events of one uninterrupted run.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import orjson
import pytest

nats = pytest.importorskip("nats", reason="the NATS bridge needs the live extra (nats-py)")

from nats.js.api import AckPolicy, ConsumerConfig  # noqa: E402
from nats.js.errors import BucketNotFoundError, KeyDeletedError, KeyNotFoundError  # noqa: E402

from nautilus_pipeline.bridge import (  # noqa: E402
    STATE_BUCKET,
    SavedState,
    StateError,
    TickPublisher,
    decode_event,
)
from nautilus_pipeline.bridge.publisher import ensure_stream  # noqa: E402
from nautilus_pipeline.bridge.server import NatsServer  # noqa: E402
from nautilus_pipeline.bridge.state import MANIFEST_MAGIC, StateStore  # noqa: E402
from nautilus_pipeline.testing import trades_frame  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MAX_PAYLOAD = 32 * 1024


@pytest.fixture
def small_server(tmp_path):
    server = NatsServer(tmp_path / "nats", max_payload=MAX_PAYLOAD).start()
    yield server
    server.kill()


def _payload(seq: int, size: int = 200_000) -> bytes:
    """A snapshot body that differs with ``seq`` everywhere (a mixed one would show)."""
    return np.random.default_rng(seq).integers(0, 256, size, dtype=np.uint8).tobytes()


async def _store(url: str, key: str = "big") -> tuple[object, StateStore]:
    nc = await nats.connect(url)
    store = StateStore(nc.jetstream(), "state_test", key, max_payload=nc.max_payload)
    await store.open()
    return nc, store


async def _keys(store: StateStore) -> list[str]:
    """The bucket's live keys: its stream's subjects, each read back (a deleted or purged key
    raises). Not ``kv.keys()``: nats-py's watcher there can put its end marker before the
    first entry it was sent (its consumer info read as nothing pending, nothing delivered
    yet), and the list comes back empty (``NoKeysError``; seen once in CI)."""
    prefix = f"$KV.{store.bucket}."
    info = await store.js.stream_info(f"KV_{store.bucket}", subjects_filter=f"{prefix}>")
    keys = []
    for subject in info.state.subjects or {}:
        key = subject[len(prefix):]
        try:
            await store.kv.get(key)
        except (KeyNotFoundError, KeyDeletedError):
            continue
        keys.append(key)
    return sorted(keys)


async def test_a_state_many_times_max_payload_is_stored_in_chunks_and_read_back(small_server):
    nc, store = await _store(small_server.url)
    try:
        assert nc.max_payload == MAX_PAYLOAD
        assert await store.load("p") is None
        big = _payload(1)
        await store.save(SavedState("p", 7, big, {"signals": 3}, ticks=10, batches=2, extra={"a": 1}))
        got = await store.load("p")
        assert (got.stream_seq, got.snapshot, got.egress_seqs, got.ticks, got.batches, got.extra) == (
            7, big, {"signals": 3}, 10, 2, {"a": 1})
        chunks = [k for k in await _keys(store) if k.startswith("big.s1.")]
        assert len(chunks) == -(-len(SavedState("p", 7, big, {"signals": 3}, 10, 2, {"a": 1}).encode())
                                // store.chunk_bytes) > 6
        # the next generation goes to the other slot; a smaller one after it purges slot 1's extra chunks
        await store.save(SavedState("p", 8, _payload(2)))
        await store.save(SavedState("p", 9, b"small"))
        assert (await store.load("p")).snapshot == b"small"
        assert [k for k in await _keys(store) if k.startswith("big.s1.")] == ["big.s1.0"]
        with pytest.raises(StateError, match="holds the state of pipeline 'p', not 'q'"):
            await store.load("q")
    finally:
        await nc.close()


async def test_a_restarted_store_writes_into_the_slot_the_manifest_does_not_point_to(small_server):
    nc, store = await _store(small_server.url)
    try:
        await store.save(SavedState("p", 1, _payload(1)))
        head = orjson.loads((await store.kv.get("big")).value[len(MANIFEST_MAGIC):])
        assert (head["generation"], head["slot"]) == (1, 1)
        _, fresh = await _store(small_server.url)  # no load() first
        await fresh.save(SavedState("p", 2, _payload(2)))
        head = orjson.loads((await store.kv.get("big")).value[len(MANIFEST_MAGIC):])
        assert (head["generation"], head["slot"]) == (2, 0)
        assert (await store.load("p")).snapshot == _payload(2)
    finally:
        await nc.close()


async def test_a_damaged_chunk_is_refused_saying_so(small_server):
    nc, store = await _store(small_server.url)
    try:
        await store.save(SavedState("p", 1, _payload(1)))
        await store.kv.put("big.s1.2", b"not this")
        with pytest.raises(StateError, match="sha256 is not the manifest's"):
            await store.load("p")
        await store.kv.purge("big.s1.3")
        with pytest.raises(StateError, match=r"lacks chunks \[3\]"):
            await store.load("p")
    finally:
        await nc.close()


SAVER = """
import asyncio, sys
import nats
import numpy as np
from nautilus_pipeline.bridge import SavedState
from nautilus_pipeline.bridge.state import StateStore

def payload(seq):
    return np.random.default_rng(seq).integers(0, 256, 200_000, dtype=np.uint8).tobytes()

async def main(url, stall_at):
    nc = await nats.connect(url)
    store = StateStore(nc.jetstream(), "state_test", "big", max_payload=nc.max_payload)
    await store.open()
    await store.load("p")
    seq, stall_at = 0, int(stall_at)
    put = store.kv.put
    stored = set()  # keys whose put the server has acknowledged
    async def stalling_put(key, value):
        # seq 2's slot is the one the manifest does not point to: the store's next generation's
        free = (store.generation + 1) % 2
        if seq == 2 and key == f"big.s{free}.{stall_at}":
            # the puts run concurrently: wait until chunks 0..stall_at-1 are stored, then stall
            while not all(f"big.s{free}.{i}" in stored for i in range(stall_at)):
                await asyncio.sleep(0.001)
            print("mid-save", free, flush=True)
            await asyncio.Event().wait()  # killed here
        out = await put(key, value)
        stored.add(key)
        return out
    if stall_at >= 0:
        store.kv.put = stalling_put
    while True:
        seq += 1
        await store.save(SavedState("p", seq, payload(seq)))
        print("saved", seq, flush=True)
        if stall_at >= 0 and seq == 2:
            raise SystemExit("seq 2 was saved whole: the stall did not happen")

asyncio.run(main(*sys.argv[1:]))
"""


def _saver(url: str, stall_at: int) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, "-c", SAVER, url, str(stall_at)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read()[-2000:]


async def test_a_kill_9_between_two_chunk_puts_leaves_the_previous_state_whole(small_server):
    proc = _saver(small_server.url, stall_at=3)
    try:
        lines = [await asyncio.to_thread(proc.stdout.readline) for _ in range(2)]
        assert lines[0] == "saved 1\n" and lines[1].startswith("mid-save "), proc.stderr.read()[-2000:]
    finally:
        _kill(proc)
    free = int(lines[1].split()[1])
    nc, store = await _store(small_server.url)
    try:
        got = await store.load("p")
        assert got.stream_seq == 1 and got.snapshot == _payload(1)
        head = orjson.loads((await store.kv.get("big")).value[len(MANIFEST_MAGIC):])
        assert (head["generation"], head["slot"]) == (1, 1 - free)
        # the free slot holds seq 2's chunks 0..2, byte for byte, and never chunk 3; the
        # manifest still points to seq 1's slot and ignores them
        seq2 = SavedState("p", 2, _payload(2)).encode()
        step = store.chunk_bytes
        for i in range(3):
            assert (await store.kv.get(f"big.s{free}.{i}")).value == seq2[i * step : (i + 1) * step]
        with pytest.raises(KeyNotFoundError):
            await store.kv.get(f"big.s{free}.3")
        await store.save(SavedState("p", 3, _payload(3)))  # the next save overwrites them
        assert (await store.load("p")).snapshot == _payload(3)
    finally:
        await nc.close()


async def test_kill_9_at_random_moments_of_repeated_saves_always_leaves_one_whole_state(small_server):
    rng = random.Random(5)
    last = 0
    for _ in range(5):
        proc = _saver(small_server.url, stall_at=-1)
        try:
            first = await asyncio.to_thread(proc.stdout.readline)
            assert first.startswith("saved"), proc.stderr.read()[-2000:]
            await asyncio.sleep(rng.uniform(0.0, 0.3))
        finally:
            _kill(proc)
        nc, store = await _store(small_server.url)
        try:
            got = await store.load("p")
            assert got.snapshot == _payload(got.stream_seq)
            assert got.stream_seq >= 1
            last = got.stream_seq
        finally:
            await nc.close()
    assert last >= 1


# --- a pipeline of many symbols through the bridge ------------------------------------------
SYMBOLS = [f"SYM{i:02d}" for i in range(16)]
TOPICS = ["signals.>", "vpin.>", "risk.>"]
BATCH = 256
PER_SYMBOL = 24 * BATCH

CONSUMER = """
import asyncio, sys
import orjson
import nautilus_pipeline as nt
from nautilus_pipeline.bridge import NatsBridge
sys.path.insert(0, sys.argv[3])
from test_bridge_state import TOPICS, many_symbol_pipeline

async def main(url, durable, _tests):
    async with NatsBridge(many_symbol_pipeline(), servers=url, ingest="ticks.>", durable=durable,
                          export=TOPICS, snapshot_every=4) as bridge:
        await bridge.wait_idle(1.0)
    print(orjson.dumps(bridge.stats()).decode())

nt.configure_logging(level="warning")
asyncio.run(main(*sys.argv[1:]))
"""


def many_symbol_pipeline():
    """The default chain with one bucket volume for every symbol (the bundled definition
    calibrates it for BTCUSDT-PERP only)."""
    import nautilus_pipeline as nt
    from nautilus_pipeline.stages import (
        FeaturesStage,
        InferenceStage,
        RiskStage,
        SignalStage,
        VpinStage,
    )

    inference = InferenceStage()
    stages = [FeaturesStage(inference.input_names), inference, VpinStage(2.0, bar_ns=0), RiskStage(), SignalStage()]
    return nt.Pipeline(stages, name="many", batch_size=BATCH)


def _frames() -> dict[str, object]:
    return {s: trades_frame(PER_SYMBOL, seed=40 + i) for i, s in enumerate(SYMBOLS)}


async def _reference(frames) -> dict[str, list]:
    """In process, fed in the order the stream holds the batches (round robin by message)."""
    import dataclasses

    pipe = many_symbol_pipeline()
    got: dict[str, list] = {t: [] for t in TOPICS}

    def as_json(payload):
        row = dataclasses.asdict(payload) if dataclasses.is_dataclass(payload) else payload
        return orjson.loads(orjson.dumps(row, option=orjson.OPT_SERIALIZE_NUMPY))

    async with pipe:
        for t in TOPICS:
            pipe.bus.subscribe(t, lambda e, t=t: got[t].append(as_json(e.payload)), maxsize=1 << 20)
        for start in range(0, PER_SYMBOL, BATCH):
            for s in SYMBOLS:
                await pipe.ingest({k: v[start:start + BATCH] for k, v in frames[s].items()}, symbol=s)
                await pipe.drain()
    return got


def _consumer(url: str, durable: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, "-c", CONSUMER, url, durable, str(REPO / "tests")], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


async def test_a_pipeline_whose_state_is_4x_max_payload_survives_kill_9_mid_stream(small_server):
    frames = _frames()
    reference = await _reference(frames)
    assert all(reference[t] for t in TOPICS)
    nc = await nats.connect(small_server.url)
    try:
        js = nc.jetstream()
        await ensure_stream(js, "TICKS", ["ticks.>"])
        pub = TickPublisher(js, batch_size=BATCH)
        for start in range(0, PER_SYMBOL, BATCH):
            for s in SYMBOLS:
                await pub.publish({k: v[start:start + BATCH] for k, v in frames[s].items()}, s)
        await pub.flush()
        total_messages = len(SYMBOLS) * PER_SYMBOL // BATCH

        first = _consumer(small_server.url, "many")
        try:
            kv = None
            while True:  # until a snapshot of every symbol is stored
                try:
                    kv = kv or await js.key_value(STATE_BUCKET)
                    head = orjson.loads((await kv.get("many")).value[len(MANIFEST_MAGIC):])
                    if head["bytes"] > 4 * MAX_PAYLOAD:
                        break
                except (BucketNotFoundError, KeyNotFoundError):
                    pass
                assert first.poll() is None, first.stderr.read()[-3000:]
                await asyncio.sleep(0.005)
        finally:
            _kill(first)
        assert head["chunks"] >= 4 and head["bytes"] > 4 * MAX_PAYLOAD  # more than one message could hold

        second = _consumer(small_server.url, "many")
        out, err = await asyncio.to_thread(second.communicate, timeout=300)
        assert second.returncode == 0, err[-3000:]
        stats = orjson.loads(out.strip().splitlines()[-1])
        restored_from = stats["restored_from_seq"]
        assert restored_from is not None and 0 < restored_from < total_messages
        assert stats["ingress"]["ticks"] == (total_messages - restored_from) * BATCH

        n = (await js.stream_info("EVENTS")).state.messages
        assert n == sum(len(v) for v in reference.values())
        sub = await js.pull_subscribe(">", stream="EVENTS",
                                      config=ConsumerConfig(ack_policy=AckPolicy.NONE))
        msgs: list = []
        while len(msgs) < n:
            msgs.extend(await sub.fetch(n - len(msgs), timeout=2))
        exported: dict[str, list] = {t: [] for t in TOPICS}
        for m in msgs:
            event = decode_event(m.data)
            exported[event["topic"].split(".")[0] + ".>"].append(event["payload"])
        for t in TOPICS:
            assert exported[t] == reference[t], t
    finally:
        await nc.close()
