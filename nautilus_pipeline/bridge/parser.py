"""nats-py's protocol parser, with large payloads collected in one copy.

nats-py (2.x) parses what its read loop hands it, ≤ 32 KiB at a time, by appending each
piece to one ``bytearray`` and slicing a message's payload out of it once it is whole
(``bytes(buf[a:b])``: a slice, then a copy of the slice). For a tick batch of ~400 kB (16,384
trades) that is ~13 appends to a buffer whose front was cut off by the previous message, so
CPython cannot grow it in place: every growth allocates a new buffer and copies what it
holds, then the payload is copied twice more.

:class:`CollectingParser` lets nats-py's parser do everything it does (control lines,
``+OK``/``PING``/``INFO``/``-ERR``, small messages, headers) and takes over only once a
message's header block is in and its payload (≥ :data:`LARGE`) is not: the pieces that
follow are kept as they come (references, no copy) and joined once into the payload's
``bytes`` (one copy), which is then dispatched exactly as nats-py would (``_process_msg``
with the same arguments). The trailing CRLF is skipped wherever it falls. Installed on a
connection by :func:`install` (the bridge's ``connect``); ``reset`` (reconnection) drops a
half-collected message as nats-py drops its buffer.

Measured by ``python scripts/bench_bridge.py --only parser bridge-cpu`` (a durable pull
consumer of 16384-tick messages: read, decode, ack; alternating, medians of 5; 2-core dev VM
shared with other jobs, load ~2.5; ``docs/measurements/dev_bench_bridge_parser_cb7a05a.txt``):
this process's CPU per 4096 ticks 62 -> 49 µs (no run of one overlaps a run of the other),
the parser's per message (its dispatch of the message included) 72 -> 41 µs; the rest of
the saving falls outside the parser (presumably the allocator's: no 0.4 MB buffer grown and
freed per message). It also takes away what made larger messages
cost the consumer more: at 32768 ticks a message the bridge alone now costs this process
what it costs at 16384 (84 µs per 4096 ticks both; 126 vs 118 at 79077ce, before the
parser), and with nats-server's 78 vs 88 µs, 158 vs 174 µs together.

It is tested against nats-py's own parser on the same bytes cut at random places
(``tests/test_bridge_parser.py``): the same calls, in the same order, with the same values.
"""

from __future__ import annotations

from typing import Any

from nats.protocol.parser import AWAITING_CONTROL_LINE, AWAITING_MSG_PAYLOAD, CRLF_SIZE, Parser

LARGE = 1 << 16
"""Payloads from this size (bytes) are collected in pieces; smaller ones go nats-py's way."""


class CollectingParser(Parser):
    """``nats.protocol.parser.Parser`` with large payloads joined once (module docstring)."""

    _pieces: list[Any] | None = None
    """A large payload's pieces so far (None: none is being collected)."""
    _left = 0
    """Its bytes still to come."""
    _hdr: bytes | None = None
    """Its header block."""
    _crlf = 0
    """Bytes of the CRLF after a collected payload still to skip."""

    def reset(self) -> None:
        super().reset()
        self._pieces, self._left, self._hdr, self._crlf = None, 0, None, 0

    async def parse(self, data: bytes = b"") -> None:
        if self._pieces is not None:
            if len(data) < self._left:
                self._pieces.append(data)
                self._left -= len(data)
                return
            view = memoryview(data)
            self._pieces.append(view[: self._left])
            data = view[self._left :]
            payload = b"".join(self._pieces)
            hdr, arg = self._hdr, self.msg_arg
            self._pieces, self._hdr, self._left = None, None, 0
            self.state = AWAITING_CONTROL_LINE
            self._crlf = CRLF_SIZE
            await self.nc._process_msg(arg["sid"], arg["subject"], arg["reply"], payload, hdr)
        if self._crlf and data:
            skip = min(self._crlf, len(data))
            data = data[skip:]
            self._crlf -= skip
            if self._crlf:
                return
        await super().parse(data)
        self._collect_if_large()

    def _collect_if_large(self) -> None:
        """After nats-py's parser stopped for want of bytes: when it waits for the rest of a
        large payload whose header block is in, take the payload's start out of its buffer
        and collect the rest in pieces."""
        if self.state != AWAITING_MSG_PAYLOAD:
            return
        buf, start = self.buf, self.header_needed
        payload_size = self.needed - start
        if payload_size < LARGE or len(buf) >= self.needed or len(buf) < start:
            return
        with memoryview(buf) as view:
            self._hdr = bytes(view[:start]) if start > 0 else None
            first = bytes(view[start:])
        buf.clear()
        self.header_needed = 0
        self._pieces = [first]
        self._left = payload_size - len(first)


def install(nc: Any) -> Any:
    """Make the parser of connection ``nc`` (nats-py ``Client``) a :class:`CollectingParser`;
    returns ``nc``. The parser object stays the same, its class changes: whatever it holds
    (half a line read before, its state) carries on, and a ``parse`` under way finishes as
    nats-py's. A parser of another class (another nats-py version's) is left alone."""
    if type(nc._ps) is Parser:
        nc._ps.__class__ = CollectingParser
    return nc
