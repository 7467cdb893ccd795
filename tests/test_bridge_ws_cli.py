"""``nautilus-pipeline publish --ws URL --nats URL``: the live websocket source on the command line.

Against a local server replaying the bundled Binance capture (loopback, ``bridge/ws_replay.py``)
and a real ``nats-server -js``: the command publishes into the TICKS stream exactly the ticks
the capture reader gives (trades and quotes, in order), on each websocket client; a skipped
id range at the exchange is reported in its summary as one more gap of that size; and
``run --nats`` (the default chain, its bucket volume set for ETHUSDT) then consumes it all.
``run PIPELINE --ws URL`` (the websocket in the pipeline's own process) writes the signal, VPIN
and risk files of a file run over the capture's trades, byte for byte, when its micro-batches
are the file run's batches (flushed at the batch size only).
"""

from __future__ import annotations

import asyncio
import gzip
import os
import sys
from pathlib import Path

import numpy as np
import orjson
import pytest

nats = pytest.importorskip("nats", reason="the NATS bridge needs the live extra (nats-py)")
pytest.importorskip("websockets", reason="the websocket source needs the live extra (websockets)")

from nats.js.api import AckPolicy, ConsumerConfig  # noqa: E402

from nautilus_pipeline.bridge import decode_batch  # noqa: E402
from nautilus_pipeline.bridge.server import NatsServer  # noqa: E402
from nautilus_pipeline.bridge.websocket_feed import CLIENTS  # noqa: E402
from nautilus_pipeline.bridge.ws_replay import CaptureReplayServer  # noqa: E402
from nautilus_pipeline.events import KIND_QUOTE, KIND_TRADE  # noqa: E402
from nautilus_pipeline.io.binance import BinanceFeedReader  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CAPTURE = "binance-feed-spot-ethusdt_20240808.jsonl.gz"
TRADE_COLS = ("ts_ns", "price", "size", "side", "trade_id")
QUOTE_COLS = ("bid", "ask", "bid_size", "ask_size")


@pytest.fixture
def nats_server(tmp_path):
    server = NatsServer(tmp_path / "nats").start()
    yield server
    server.kill()


@pytest.fixture(params=CLIENTS)
def client(request):
    if request.param == "picows":
        pytest.importorskip("picows", reason="the picows client needs the live extra (picows)")
    return request.param


@pytest.fixture(scope="module")
def capture(sample_dir):
    path = sample_dir / CAPTURE
    chunks = list(BinanceFeedReader(path).chunks())
    return path, {k: np.concatenate([c.columns[k] for c in chunks]) for k in chunks[0].columns}


async def _cli(*args: str) -> tuple[int, str, str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "nautilus_pipeline.cli", *args, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 300)
    return proc.returncode, out.decode(), err.decode()


async def _publish_ws(server: CaptureReplayServer, url: str, *extra: str) -> dict:
    code, out, err = await _cli("publish", "--ws", server.url, "--nats", url, "--until-idle", "1",
                                "--batch", "512", *extra)
    assert code == 0, err[-3000:]
    return orjson.loads(out.strip().splitlines()[-1])


async def _stream_rows(url: str) -> tuple[dict, list[int]]:
    """Every row in the TICKS stream, messages in stream order, and each message's length."""
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        n = (await js.stream_info("TICKS")).state.messages
        sub = await js.pull_subscribe("ticks.>", stream="TICKS",
                                      config=ConsumerConfig(ack_policy=AckPolicy.NONE))
        msgs = []
        while len(msgs) < n:
            msgs.extend(await sub.fetch(n - len(msgs), timeout=5))
    finally:
        await nc.close()
    batches = [decode_batch(m.data) for m in msgs]
    assert {b.symbol for b in batches} == {"ETHUSDT"}
    rows = {k: np.concatenate([b.columns[k] for b in batches]) for k in batches[0].columns}
    return rows, [b.length for b in batches]


def _eth_definition(tmp: Path, capture: Path | None = None) -> Path:
    """The default chain with a bucket volume for ETHUSDT (the bundled one calibrates
    BTCUSDT-PERP), its source the capture."""
    default = (REPO / "nautilus_pipeline" / "pipelines" / "default.toml").read_text()
    old_source = ('path = "package:binance-um-btcusdt-trades-20240808.csv"\nformat = "binance_trades"\n'
                  'symbol = "BTCUSDT-PERP"')
    assert 'bucket_volume = "auto"' in default and old_source in default
    path = tmp / "eth.toml"
    path.write_text(default.replace('bucket_volume = "auto"', "bucket_volume = 5.0").replace(
        old_source, f'path = "{capture or REPO / "nautilus_pipeline" / "data" / CAPTURE}"\n'
                    'format = "binance_feed"'))
    return path


def _split(cols: dict) -> tuple[dict, dict]:
    return ({k: cols[k][cols["kind"] == KIND_TRADE] for k in TRADE_COLS},
            {k: cols[k][cols["kind"] == KIND_QUOTE] for k in QUOTE_COLS})


def _natural_gaps(ids: np.ndarray) -> tuple[int, int]:
    steps = np.diff(ids)
    return int((steps > 1).sum()), int((steps[steps > 1] - 1).sum())


async def test_publish_ws_puts_the_ticks_of_the_capture_into_the_stream(nats_server, capture, client):
    path, ref = capture
    async with CaptureReplayServer(path) as server:
        summary = await _publish_ws(server, nats_server.url, "--ws-client", client)
    rows, lengths = await _stream_rows(nats_server.url)
    ref_t, ref_q = _split(ref)
    got_t, got_q = _split(rows)
    for k in TRADE_COLS:
        np.testing.assert_array_equal(got_t[k], ref_t[k], err_msg=k)
    for k in QUOTE_COLS:
        np.testing.assert_array_equal(got_q[k], ref_q[k], err_msg=k)
    np.testing.assert_array_equal(rows["kind"], ref["kind"])  # trades and quotes in the capture's order
    assert max(lengths) <= 512
    assert summary["client"] == client
    assert (summary["ticks"], summary["trades"], summary["quotes"]) == (
        len(ref["ts_ns"]), len(ref_t["ts_ns"]), len(ref_q["bid"]))
    assert summary["frames"] == len(server.frames) and summary["bad_frames"] == 0
    assert (summary["gaps"], summary["missing_ids"]) == _natural_gaps(ref_t["trade_id"])
    assert summary["messages"] == len(lengths)


async def test_a_skipped_id_range_is_reported_and_run_nats_consumes_what_was_published(
        nats_server, capture, tmp_path):
    path, ref = capture
    ids = _split(ref)[0]["trade_id"]
    lo, hi = int(ids[1000]), int(ids[1049])
    async with CaptureReplayServer(path, skip_trade_ids=(lo, hi)) as server:
        summary = await _publish_ws(server, nats_server.url)
    gaps, missing = _natural_gaps(ids)
    assert (summary["gaps"], summary["missing_ids"]) == (gaps + 1, missing + hi - lo + 1)
    assert summary["ticks"] == len(ref["ts_ns"]) - 50

    definition = _eth_definition(tmp_path)
    code, _, err = await _cli("run", str(definition), "--nats", nats_server.url, "--durable", "ws",
                              "--out", str(tmp_path / "out"), "--until-idle", "1", "--no-progress")
    assert code == 0, err[-3000:]
    done = orjson.loads((tmp_path / "out" / "summary.json").read_bytes())
    assert done["ticks"]["processed"] == summary["ticks"]
    assert done["bridge"]["ingress"]["messages"] == summary["messages"]


async def test_publish_needs_files_or_ws_not_both():
    for args in ((), ("x.csv", "--ws", "ws://127.0.0.1:1/stream"), ("x.csv", "--until-idle", "1")):
        code, _, err = await _cli("publish", *args)
        assert code == 2 and "nautilus-pipeline: error:" in err, err


async def test_run_ws_writes_the_outputs_of_the_file_run_over_the_capture(capture, tmp_path, client):
    # the capture's trades only: a spot bookTicker has no exchange time, so a replayed quote is
    # stamped now (the file run: its recorded receive time), which no file run can equal
    path = tmp_path / "trades.jsonl"
    with gzip.open(capture[0], "rt") as src:
        path.write_text("".join(line for line in src if '@trade"' in line))
    ref = {k: v[capture[1]["kind"] == KIND_TRADE] for k, v in capture[1].items()}
    definition = _eth_definition(tmp_path, path)
    code, _, err = await _cli("run", str(definition), "--out", str(tmp_path / "file"), "--no-progress")
    assert code == 0, err[-3000:]
    async with CaptureReplayServer(path) as server:
        code, _, err = await _cli("run", str(definition), "--ws", server.url, "--ws-client", client,
                                  "--flush-us", "60e6", "--until-idle", "1", "--out", str(tmp_path / "ws"),
                                  "--no-progress")
    assert code == 0, err[-3000:]
    summary = orjson.loads((tmp_path / "ws" / "summary.json").read_bytes())
    assert summary["client"] == client and summary["feed"]["bad_frames"] == 0
    assert summary["ticks"]["processed"] == len(ref["ts_ns"]) and summary["ticks"]["rejected"] == 0
    for family in ("signals", "vpin", "risk"):
        got = (tmp_path / "ws" / f"{family}.jsonl").read_bytes()
        assert got == (tmp_path / "file" / f"{family}.jsonl").read_bytes(), family
        assert got, family  # something to compare


async def test_run_ws_keeps_the_trades_of_a_trade_and_bookticker_stream(capture, tmp_path):
    """Trades and spot quotes together (the README's own stream): a quote is stamped when
    received, a trade with its exchange time, earlier; checked on ts_ns every trade after a
    quote was rejected. The receive order is what is checked, so every tick is processed."""
    definition = _eth_definition(tmp_path)
    async with CaptureReplayServer(capture[0]) as server:
        code, _, err = await _cli("run", str(definition), "--ws", server.url, "--ws-client", "websockets",
                                  "--flush-us", "60e6", "--until-idle", "1", "--out", str(tmp_path / "ws"),
                                  "--no-progress")
    assert code == 0, err[-3000:]
    summary = orjson.loads((tmp_path / "ws" / "summary.json").read_bytes())
    feed = summary["feed"]
    assert feed["trades"] == int((capture[1]["kind"] == KIND_TRADE).sum()) and feed["quotes"] > 0
    assert summary["ticks"]["rejected"] == 0, summary["ticks"]
    assert summary["ticks"]["processed"] == feed["trades"] + feed["quotes"]
