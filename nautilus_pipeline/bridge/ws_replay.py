"""A local websocket server that replays a Binance capture as combined-stream frames.

For the websocket source's tests and benchmark (loopback only, never the exchange): it
serves the frames of a capture (``<recv ns> <json>`` lines, ``.gz`` read transparently) at
``speed`` times the recorded pace (``None``: as fast as the client takes them), shared by
every connection like a live feed (a client that reconnects gets what comes next, not the
start), with faults to inject:

- ``drop_after``: abort the first connection (no close frame) after that many frames;
- ``lost_on_reconnect``: frames that go by while the client is away (never sent to it);
- ``malformed_at``: frame numbers sent damaged (cut in half: not JSON);
- ``skip_trade_ids``: an inclusive range of trade ids never sent (the exchange lost them);
- ``stall_after``: after that many frames, send nothing more and keep the connection open
  until the client closes it (a quiet market; ``client_closed`` is then set).

At the end it closes with code 1000 ("end of replay").
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from pathlib import Path

import orjson

from ..io.files import iter_lines


def capture_frames(path: str | Path) -> list[tuple[int, str]]:
    """(receive ns, frame text) of the capture's combined-stream lines (the REST snapshot
    lines, which have no ``stream``, are left out)."""
    out = []
    for _, line in iter_lines(str(path)):
        head, _, body = line.partition(b" ")
        if body.startswith(b'{"stream"'):
            out.append((int(head), body.decode()))
    return out


class CaptureReplayServer:
    """``async with CaptureReplayServer(path) as server:`` → ``server.url``."""

    def __init__(self, capture: str | Path, *, speed: float | None = None,
                 drop_after: int | None = None, lost_on_reconnect: int = 0,
                 malformed_at: Iterable[int] = (), skip_trade_ids: tuple[int, int] | None = None,
                 stall_after: int | None = None):
        self.frames = capture_frames(capture)
        self.speed = speed
        self.drop_after = drop_after
        self.lost_on_reconnect = lost_on_reconnect
        self.malformed_at = set(malformed_at)
        self.skip_trade_ids = skip_trade_ids
        self.stall_after = stall_after
        self.client_closed = asyncio.Event()
        self.position = 0
        self.connections = 0
        self.sent = 0
        self.url = ""
        self._server = None

    async def __aenter__(self) -> CaptureReplayServer:
        from websockets.asyncio.server import serve

        self._server = await serve(self._handle, "127.0.0.1", 0, compression=None, max_size=1 << 22)
        port = next(iter(self._server.sockets)).getsockname()[1]
        self.url = f"ws://127.0.0.1:{port}/stream?streams=replay"
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._server.close()
        await self._server.wait_closed()

    def _skipped(self, text: str) -> bool:
        if self.skip_trade_ids is None or '@trade"' not in text:
            return False
        tid = orjson.loads(text)["data"]["t"]
        lo, hi = self.skip_trade_ids
        return lo <= tid <= hi

    async def _handle(self, ws) -> None:
        self.connections += 1
        if self.connections > 1:
            self.position += self.lost_on_reconnect
        loop = asyncio.get_running_loop()
        t0_wall, t0_rec = loop.time(), None
        sent_here = 0
        while self.position < len(self.frames):
            recv, text = self.frames[self.position]
            self.position += 1
            if self.speed is not None:
                t0_rec = recv if t0_rec is None else t0_rec
                wait = t0_wall + (recv - t0_rec) / 1e9 / self.speed - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
            if self._skipped(text):
                continue
            if self.position in self.malformed_at:
                text = text[: len(text) // 2]
            await ws.send(text)
            self.sent += 1
            sent_here += 1
            if self.connections == 1 and self.drop_after is not None and sent_here >= self.drop_after:
                ws.transport.abort()  # no close frame: a dropped connection
                return
            if self.stall_after is not None and self.sent >= self.stall_after:
                await ws.wait_closed()
                self.client_closed.set()
                return
        await ws.close(1000, "end of replay")
