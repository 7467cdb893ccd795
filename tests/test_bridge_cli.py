"""``publish`` and ``run --nats`` on the command line, against a real nats-server.

The bundled Binance file is published into JetStream; ``run default --nats`` consuming it
writes the same signal, VPIN and risk files (JSON lines byte for byte, Parquet as tables)
as ``run default`` reading the file, and the same ``trace.parquet``. Killed with SIGKILL
mid-stream and started again (the same command), it still ends with those files: 0 ticks
lost, 0 duplicated, the trace whole.
"""

from __future__ import annotations

import asyncio
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pyarrow.parquet as pq
import pytest

nats = pytest.importorskip("nats", reason="the NATS bridge needs the live extra (nats-py)")

from nautilus_pipeline.bridge import STATE_BUCKET  # noqa: E402
from nautilus_pipeline.bridge.server import NatsServer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
FILE = REPO / "nautilus_pipeline" / "data" / "binance-um-btcusdt-trades-20240808.csv"
FAMILIES = ("signals", "vpin", "risk")


@pytest.fixture
def nats_server(tmp_path):
    server = NatsServer(tmp_path / "nats").start()
    yield server
    server.kill()


def _cli(*args: str, **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, "-m", "nautilus_pipeline.cli", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _ok(*args: str) -> str:
    proc = _cli(*args)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    return out


MESSAGE = 256
"""Ticks per published message, and the batch size of the file runs compared with: each
message becomes one batch, so both runs see the same batches. (With the file run at its
default 4096, the outputs would also depend on the engine giving the same bits for any batch
size, which tests/test_engine_inline.py checks on its own; these tests are about the bridge.)"""


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """One uninterrupted file run of the default pipeline over the bundled file."""
    out = tmp_path_factory.mktemp("ref") / "out"
    _ok("run", "default", "--out", str(out), "--no-progress", "--batch", str(MESSAGE))
    return out


@pytest.fixture(scope="module")
def sparse_reference(tmp_path_factory) -> Path:
    """The same with a trace of one trade in 7 (plus fills and each symbol's last trade)."""
    out = tmp_path_factory.mktemp("ref7") / "out"
    _ok("run", "default", "--out", str(out), "--no-progress", "--trace-every", "7", "--batch", str(MESSAGE))
    return out


def _publish(url: str, batch: int) -> dict:
    return orjson.loads(_ok("publish", str(FILE), "--nats", url, "--symbol", "BTCUSDT-PERP",
                            "--format", "binance_trades", "--batch", str(batch)).strip().splitlines()[-1])


def _same(a, b) -> bool:
    """Equal values, NaN equal to NaN (but not to null)."""
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and a == b


def _assert_same_outputs(ref: Path, out: Path) -> None:
    for family in FAMILIES:
        assert (out / f"{family}.jsonl").read_bytes() == (ref / f"{family}.jsonl").read_bytes(), family
        mine, theirs = pq.read_table(out / f"{family}.parquet"), pq.read_table(ref / f"{family}.parquet")
        assert mine.schema == theirs.schema, family
        assert _same(mine.to_pylist(), theirs.to_pylist()), family
    mine, theirs = pq.read_table(out / "trace.parquet"), pq.read_table(ref / "trace.parquet")
    assert mine.schema == theirs.schema
    assert mine.num_rows == theirs.num_rows > 0
    assert _same(mine.to_pylist(), theirs.to_pylist()), "trace"


def test_publish_then_run_nats_writes_the_outputs_of_the_file_run(nats_server, reference, tmp_path):
    published = _publish(nats_server.url, MESSAGE)
    assert (published["ticks"], published["messages"]) == (21_313, 84)
    out = tmp_path / "live"
    _ok("run", "default", "--nats", nats_server.url, "--durable", "live", "--out", str(out),
        "--until-idle", "1")
    _assert_same_outputs(reference, out)
    summary = orjson.loads((out / "summary.json").read_bytes())
    assert summary["ticks"]["processed"] == 21_313
    assert summary["bridge"]["ingress"]["messages"] == 84


async def _wait_for_state(url: str, durable: str, timeout: float = 120.0) -> None:
    import nats.js.errors

    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                kv = await js.key_value(STATE_BUCKET)
                await kv.get(durable)
                return
            except (nats.js.errors.BucketNotFoundError, nats.js.errors.KeyNotFoundError):
                await asyncio.sleep(0.005)
        raise TimeoutError(f"no state of {durable!r} after {timeout}s")
    finally:
        await nc.close()


@pytest.mark.parametrize("trace_every", [0, 7])
def test_kill_9_mid_stream_then_the_same_run_gives_the_outputs_of_one_run(
        nats_server, reference, sparse_reference, tmp_path, trace_every):
    reference = sparse_reference if trace_every else reference
    assert _publish(nats_server.url, MESSAGE)["messages"] == 84
    out = tmp_path / "live"
    cmd = ("run", "default", "--nats", nats_server.url, "--durable", "crashy", "--out", str(out),
           "--until-idle", "1", "--snapshot-every", "4", "--trace-every", str(trace_every))
    first = _cli(*cmd)
    try:
        asyncio.run(_wait_for_state(nats_server.url, "crashy"))
    finally:
        first.send_signal(signal.SIGKILL)
        first.communicate(timeout=60)
    assert first.returncode == -signal.SIGKILL
    assert (out / "signals.jsonl").exists() and not (out / "summary.json").exists()

    _ok(*cmd)
    summary = orjson.loads((out / "summary.json").read_bytes())
    restored = summary["bridge"]["restored_from_seq"]
    assert restored is not None and 0 < restored < 84  # it was killed mid-stream
    assert summary["bridge"]["ingress"]["messages"] == 84 - restored
    assert len(list((out / "trace.parts").glob("*.parquet"))) >= 1  # rows from before the kill
    _assert_same_outputs(reference, out)


def test_sigterm_drains_and_the_next_run_carries_on_to_the_outputs_of_one_run(nats_server, reference, tmp_path):
    assert _publish(nats_server.url, MESSAGE)["messages"] == 84
    out = tmp_path / "live"
    common = ("run", "default", "--nats", nats_server.url, "--durable", "termed", "--out", str(out),
              "--snapshot-every", "4")
    first = _cli(*common)  # no --until-idle: runs until a signal
    try:
        asyncio.run(_wait_for_state(nats_server.url, "termed"))
    finally:
        first.send_signal(signal.SIGTERM)
        _, err = first.communicate(timeout=120)
    assert first.returncode == 143, err[-3000:]
    stopped = orjson.loads((out / "summary.json").read_bytes())
    assert 0 < stopped["ticks"]["processed"] < 21_313  # stopped mid-stream

    _ok(*common, "--until-idle", "1")
    summary = orjson.loads((out / "summary.json").read_bytes())
    assert summary["ticks"]["processed"] + stopped["ticks"]["processed"] == 21_313
    _assert_same_outputs(reference, out)


def test_no_server_is_one_error_line_and_exit_1(tmp_path):
    from nautilus_pipeline.bridge.server import free_port

    url = f"nats://127.0.0.1:{free_port()}"
    for args in (("publish", str(FILE), "--nats", url),
                 ("run", "default", "--nats", url, "--durable", "x", "--out", str(tmp_path / "o"))):
        proc = _cli(*args)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 1, err[-2000:]
        assert "cannot connect to NATS" in err and "Traceback" not in err


def test_nats_options_without_nats_are_refused():
    proc = _cli("run", "default", "--durable", "x")
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2 and "apply to --nats runs" in err


def test_a_message_that_is_not_a_tick_batch_makes_the_run_exit_4_and_says_so(nats_server, tmp_path):
    async def garbage() -> None:
        nc = await nats.connect(nats_server.url)
        try:
            js = nc.jetstream()
            await js.add_stream(name="TICKS", subjects=["ticks.>"])
            await js.publish("ticks.trades.BINANCE.BTCUSDT-PERP", b"not a batch")
        finally:
            await nc.close()

    asyncio.run(garbage())
    proc = _cli("run", "default", "--nats", nats_server.url, "--durable", "bad", "--out", str(tmp_path / "o"),
                "--no-progress", "--until-idle", "1")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 4, err[-3000:]
    assert "1 messages were not tick batches" in err
    summary = orjson.loads((tmp_path / "o" / "summary.json").read_bytes())
    assert summary["ticks"]["bad_messages"] == 1
