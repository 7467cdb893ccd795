"""``CollectingParser`` against nats-py's own parser: the same bytes, cut anywhere, give the
same calls in the same order with the same values; and the bridge's connections use it.

The reference is ``nats.protocol.parser.Parser`` itself, fed the same stream in one piece;
the parser under test gets it in pieces cut at random places (inside control lines, header
blocks, payloads and the CRLF after a large payload), one byte at a time around the
boundaries, and switched from nats-py's class in the middle of a stream (``install``).
"""

from __future__ import annotations

import asyncio
import os
import random

import pytest

pytest.importorskip("nats", reason="the NATS bridge needs the live extra (nats-py)")

from nats.protocol.parser import Parser

from nautilus_pipeline.bridge.parser import LARGE, CollectingParser, install
from nautilus_pipeline.bridge.server import NatsServer


class _Recorder:
    """What a parser calls on its client, as plain values."""

    def __init__(self):
        self.calls: list[tuple] = []

    async def _process_msg(self, sid, subject, reply, data, headers):
        self.calls.append(("msg", sid, bytes(subject), bytes(reply), bytes(data), headers))

    async def _process_ping(self):
        self.calls.append(("ping",))

    async def _process_pong(self):
        self.calls.append(("pong",))

    async def _process_info(self, info):
        self.calls.append(("info", info))

    async def _process_err(self, err):
        self.calls.append(("err", err))


def _hmsg(sid: int, payload: bytes, reply: bytes = b"$JS.ACK.TICKS.c.1.7.7.1700000000000000000.0") -> bytes:
    hdr = b"NATS/1.0\r\nNats-Msg-Id: ticks.trades.X:1:2:3:abcd\r\n\r\n"
    return (b"HMSG _INBOX.x.%d %d %s %d %d\r\n" % (sid, sid, reply, len(hdr), len(hdr) + len(payload))
            + hdr + payload + b"\r\n")


def _msg(sid: int, payload: bytes) -> bytes:
    return b"MSG _INBOX.y %d _INBOX.r %d\r\n" % (sid, len(payload)) + payload + b"\r\n"


def _stream(rng: random.Random) -> bytes:
    parts = [b'INFO {"server_id":"x","max_payload":1048576}\r\n']
    for i in range(40):
        kind = rng.randrange(7)
        if kind == 0:
            parts.append(_hmsg(i, os.urandom(rng.randrange(LARGE, 5 * LARGE))))
        elif kind == 1:
            parts.append(_msg(i, os.urandom(rng.randrange(LARGE, 3 * LARGE))))
        elif kind == 2:
            parts.append(_hmsg(i, os.urandom(rng.randrange(0, 300))))
        elif kind == 3:
            parts.append(_msg(i, os.urandom(rng.randrange(0, 300))))
        elif kind == 4:
            parts.append(_hmsg(i, os.urandom(LARGE - 1)))  # just under: nats-py's way
        elif kind == 5:
            parts.append(rng.choice([b"PING\r\n", b"PONG\r\n", b"+OK\r\n"]))
        else:
            parts.append(_hmsg(i, b"\r\n" * (LARGE // 2 + 3)))  # CRLFs inside a payload
    return b"".join(parts)


def _cuts(data: bytes, rng: random.Random) -> list[bytes]:
    """Pieces of 1 byte to 40 kB or 700 kB (a read may hold several whole messages), with
    runs of 1-byte pieces."""
    out, i = [], 0
    while i < len(data):
        n = 1 if rng.random() < 0.2 else rng.randrange(1, rng.choice((40_000, 700_000)))
        out.append(data[i : i + n])
        i += n
    return out


async def _parse(parser: Parser, pieces: list[bytes]) -> list[tuple]:
    for piece in pieces:
        await parser.parse(piece)
    return parser.nc.calls


async def _reference(data: bytes) -> list[tuple]:
    return await _parse(Parser(_Recorder()), [data])


@pytest.mark.parametrize("seed", range(6))
async def test_pieces_cut_anywhere_give_the_calls_of_nats_pys_parser(seed):
    rng = random.Random(seed)
    data = _stream(rng)
    expected = await _reference(data)
    assert sum(1 for c in expected if c[0] == "msg") >= 30
    assert await _parse(CollectingParser(_Recorder()), _cuts(data, rng)) == expected


async def test_a_large_payload_in_one_byte_pieces_around_its_crlf_and_the_next_line():
    payload = os.urandom(LARGE + 10)
    data = _hmsg(1, payload) + b"PING\r\n" + _hmsg(2, payload[::-1]) + _msg(3, b"ok")
    expected = await _reference(data)
    first = len(_hmsg(1, payload))
    pieces = [data[: first - 3]] + [data[i : i + 1] for i in range(first - 3, first + 8)] + [data[first + 8 :]]
    assert await _parse(CollectingParser(_Recorder()), pieces) == expected


async def test_switched_from_nats_pys_class_mid_stream_it_carries_on_where_that_one_stopped():
    rng = random.Random(11)
    data = _stream(rng)
    expected = await _reference(data)
    pieces = _cuts(data, rng)
    parser = Parser(_Recorder())
    half = len(pieces) // 2
    await _parse(parser, pieces[:half])
    assert install(type("Client", (), {"_ps": parser})())._ps is parser  # the same object
    assert type(parser) is CollectingParser
    assert await _parse(parser, pieces[half:]) == expected


async def test_reset_drops_a_half_collected_payload_as_nats_py_drops_its_buffer():
    payload = os.urandom(2 * LARGE)
    frame = _hmsg(1, payload)
    parser = CollectingParser(_Recorder())
    await parser.parse(frame[: len(frame) // 2])
    await parser.parse(frame[len(frame) // 2 : len(frame) // 2 + 100])
    parser.reset()
    assert await _parse(parser, [_msg(2, b"after"), b"PONG\r\n"]) == [
        ("msg", 2, b"_INBOX.y", b"_INBOX.r", b"after", None), ("pong",)]


async def test_the_bridges_connections_parse_with_it(tmp_path):
    from nautilus_pipeline.bridge.nats_bridge import connect

    server = NatsServer(tmp_path / "nats").start()
    try:
        nc = await connect(server.url)
        try:
            assert type(nc._ps) is CollectingParser
            got: asyncio.Future = asyncio.get_running_loop().create_future()
            payload = os.urandom(3 * LARGE)

            async def cb(msg):
                got.set_result(msg.data)

            await nc.subscribe("big", cb=cb)
            await nc.publish("big", payload)
            assert await asyncio.wait_for(got, 5) == payload
        finally:
            await nc.close()
    finally:
        server.kill()
