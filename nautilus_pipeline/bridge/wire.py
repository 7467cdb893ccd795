"""How batches and events look on the wire.

A **tick batch** is one message: the raw column buffers, back to back, after a small orjson
header. Arrow IPC was the alternative; for a dozen fixed-width columns it adds a schema
message and per-buffer metadata that we would only parse back into the same numpy arrays,
while raw buffers decode as ``np.frombuffer`` views of the message (no copy until the
slab is filled). Layout::

    b"NPB2" | uint32 LE header length | header (orjson) | pad to 8 | column buffers (each padded to 8)

The header holds ``symbol`` (the instrument's name: ``symbol_id`` is local to a process's
symbol table, so it is not sent), ``length``, the columns as ``[name, dtype, nbytes]`` and
``first_seq``/``last_seq`` (the exchange's sequence, here the first and last ``trade_id``;
-1 when the venue gives none) and ``order_by``, the clock the rows are in time order on
(``ts_ns``, or ``ts_recv_ns`` for a live feed whose quotes carry no exchange time; the
ingress checks that order, ``ts_ns`` when a header has none). Only tick columns travel; a
missing one takes its default.

Two columns of a batch are mostly redundant: a trade batch's ``kind`` is one value, and its
``trade_id`` counts up by one. A column whose values are all the same bits travels as that
one value (``[name, dtype, itemsize, "const"]``), an integer column that is
``first + 0, 1, 2, ...`` as its first value (``[name, dtype, itemsize, "range"]``); both
decode to exactly the values sent: a trade batch goes from 34 to 25 bytes a tick. Fewer
bytes helped less than fewer messages, though: most of nats-server's and the consumer's CPU
is per message (the bridge alone, this process + the server, 308 → 214 µs per 4,096 ticks
from 4,096- to 16,384-tick messages; ``scripts/bench_bridge.py --only bridge-cpu``, loaded
dev VM, ``docs/measurements/dev_bench_bridge_cpu_79077ce.txt``), hence the publisher's
16,384-tick default. ``NPB1`` (every column in full) still decodes.

An **event** (signals, VPIN buckets, risk events, dead letters: low rate) is one orjson
object: ``{"topic", "payload"}`` with the payload as the output sinks write it.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

from ..bus import DeadLetter, Event
from ..errors import DataError
from ..events import TICK_COLUMNS
from ..io.sinks import event_record

MAGIC = b"NPB2"
_MAGIC_V1 = b"NPB1"
_CONST, _RANGE = "const", "range"
ORDER_CLOCKS = ("ts_ns", "ts_recv_ns")
_LEN = struct.Struct("<I")
_SPECS = {c.name: c for c in TICK_COLUMNS}
WIRE_COLUMNS: tuple[str, ...] = tuple(c.name for c in TICK_COLUMNS if c.name != "symbol_id")
"""The tick columns a batch carries (all but ``symbol_id``: the symbol is in the header)."""


class WireError(DataError):
    """A message that is not a batch or event this module wrote (says what is wrong)."""


def _pad(n: int) -> int:
    return -n % 8


@dataclass(frozen=True)
class Batch:
    """A decoded tick batch: header fields, read-only column views of the message, and the
    columns that travelled as one value (``constants``) or as a first value counting up by
    one (``ranges``)."""

    symbol: str
    length: int
    first_seq: int
    last_seq: int
    raw: dict[str, np.ndarray]
    constants: dict[str, np.ndarray] = field(default_factory=dict)
    ranges: dict[str, np.ndarray] = field(default_factory=dict)
    order_by: str = "ts_ns"

    def __contains__(self, name: str) -> bool:
        return name in self.raw or name in self.constants or name in self.ranges

    def copy_into(self, name: str, out: np.ndarray, start: int = 0) -> None:
        """Rows ``start : start + len(out)`` of column ``name`` into ``out`` (one copy from the
        message, or a fill: no array in between for a constant)."""
        col = self.raw.get(name)
        if col is not None:
            out[...] = col[start : start + len(out)]
        elif name in self.constants:
            out.fill(self.constants[name][0])
        else:
            first = self.ranges[name][0]
            out[...] = np.arange(start, start + len(out), dtype=out.dtype)
            out += first

    @property
    def columns(self) -> dict[str, np.ndarray]:
        """Every column as an array (the constants and ranges made full)."""
        out = dict(self.raw)
        for name, v in self.constants.items():
            out[name] = np.full(self.length, v[0], dtype=v.dtype)
        for name, v in self.ranges.items():
            out[name] = np.arange(self.length, dtype=v.dtype) + v[0]
        return out


def _encoding(arr: np.ndarray) -> str | None:
    """``"const"`` when every value has the bits of the first, ``"range"`` when an integer
    column is ``first + 0, 1, 2, ...``; else None (sent in full)."""
    if len(arr) < 2:
        return None
    bits = arr.view(np.dtype(f"u{arr.dtype.itemsize}")) if arr.dtype.kind == "f" else arr
    if (bits == bits[0]).all():
        return _CONST
    if arr.dtype.kind in "iu":
        step = np.diff(arr)
        if (step == 1).all():
            return _RANGE
    return None


def encode_batch(columns: Mapping[str, np.ndarray], symbol: str, *, compact: bool = True,
                 order_by: str = "ts_ns") -> bytes:
    """One message for rows of one symbol (tick column name → array, ``symbol_id`` ignored),
    in time order on ``order_by``. ``compact=False``: every column in full, as ``NPB1`` (for
    consumers of an older version)."""
    if order_by not in ORDER_CLOCKS:
        raise WireError(f"encode_batch: order_by must be one of {ORDER_CLOCKS}, got {order_by!r}")
    names = [n for n in WIRE_COLUMNS if n in columns]
    if "ts_ns" not in names:
        raise WireError("encode_batch: the ts_ns column is required")
    unknown = sorted(set(columns) - set(_SPECS))
    if unknown:
        raise WireError(f"encode_batch: unknown tick columns {unknown}")
    n = len(columns["ts_ns"])
    entries, buffers = [], []
    for name in names:
        arr = np.ascontiguousarray(columns[name], dtype=_SPECS[name].dtype)
        if arr.shape != (n,):
            raise WireError(f"encode_batch: column {name!r} has shape {arr.shape}, expected ({n},)")
        how = _encoding(arr) if compact and name != "ts_ns" else None
        if how is None:
            entries.append([name, arr.dtype.str, arr.nbytes])
            buffers.append(arr)
        else:
            entries.append([name, arr.dtype.str, arr.dtype.itemsize, how])
            buffers.append(arr[:1])
    ids = columns.get("trade_id")
    first, last = (int(ids[0]), int(ids[-1])) if ids is not None and n else (-1, -1)
    header = orjson.dumps({"symbol": symbol, "length": n, "first_seq": first, "last_seq": last,
                           "order_by": order_by, "columns": entries})
    parts = [MAGIC if compact else _MAGIC_V1, _LEN.pack(len(header)), header, b"\0" * _pad(8 + len(header))]
    for arr in buffers:
        parts.append(arr.tobytes())
        parts.append(b"\0" * _pad(arr.nbytes))
    return b"".join(parts)


def decode_batch(data: bytes) -> Batch:
    """The batch in ``data``; a :class:`WireError` names what does not fit."""
    magic = data[:4]
    if magic != MAGIC and magic != _MAGIC_V1:
        raise WireError(f"not a tick batch: starts with {bytes(magic)!r}, expected {MAGIC!r}")
    if len(data) < 8:
        raise WireError(f"tick batch cut short: {len(data)} bytes")
    (hlen,) = _LEN.unpack_from(data, 4)
    try:
        header = orjson.loads(data[8 : 8 + hlen])
        symbol, n = header["symbol"], int(header["length"])
        cols = header["columns"]
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise WireError(f"tick batch header unreadable: {exc}") from None
    offset = 8 + hlen + _pad(8 + hlen)
    try:
        raw, constants, ranges = _columns(data, symbol, n, cols, offset, magic == MAGIC)
    except WireError:
        raise
    except (TypeError, ValueError, KeyError) as exc:  # a header of the wrong shape: never a crash
        raise WireError(f"tick batch of {symbol!r}: header's columns unreadable: {exc}") from None
    if "ts_ns" not in raw:
        raise WireError(f"tick batch of {symbol!r} has no ts_ns column")
    order_by = header.get("order_by", "ts_ns")
    if order_by not in ORDER_CLOCKS:
        raise WireError(f"tick batch of {symbol!r}: unknown order_by {order_by!r}")
    return Batch(symbol, n, int(header.get("first_seq", -1)), int(header.get("last_seq", -1)),
                 raw, constants, ranges, order_by)


def _columns(data: bytes, symbol: str, n: int, cols: Any, offset: int, v2: bool
             ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, np.ndarray]]:
    raw: dict[str, np.ndarray] = {}
    constants: dict[str, np.ndarray] = {}
    ranges: dict[str, np.ndarray] = {}
    for entry in cols:
        name, dtype, nbytes, *how = entry
        spec = _SPECS.get(name)
        if spec is None or name == "symbol_id":
            raise WireError(f"tick batch of {symbol!r}: unknown column {name!r}")
        encoding = how[0] if v2 and len(how) == 1 else None
        if how and (encoding not in (_CONST, _RANGE) or (encoding == _RANGE and spec.dtype.kind not in "iu")):
            raise WireError(f"tick batch of {symbol!r}: column {name!r} has an unknown encoding {how!r}")
        count = 1 if encoding else n
        if np.dtype(dtype) != spec.dtype or nbytes != count * spec.dtype.itemsize:
            raise WireError(f"tick batch of {symbol!r}: column {name!r} is {dtype} x {nbytes} bytes, "
                            f"expected {spec.dtype.str} x {count * spec.dtype.itemsize}")
        if offset + nbytes > len(data):
            raise WireError(f"tick batch of {symbol!r} cut short in column {name!r}")
        values = np.frombuffer(data, dtype=spec.dtype, count=count, offset=offset)
        (constants if encoding == _CONST else ranges if encoding == _RANGE else raw)[name] = values
        offset += nbytes + _pad(nbytes)
    return raw, constants, ranges


def _default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Event):
        return {"topic": value.topic, "seq": value.seq}
    if isinstance(value, BaseException):
        return f"{type(value).__name__}: {value}"
    return repr(value)


def event_payload(event: Event) -> dict[str, Any]:
    """The JSON-ready payload of a bus event (a dead letter names its event and error)."""
    payload = event.payload
    if isinstance(payload, DeadLetter):
        inner = payload.event
        return {"subscription": payload.subscription, "error": _default(payload.error),
                "event_topic": inner.topic, "event_seq": inner.seq, "event": repr(inner)}
    record = event_record(event)
    record.pop("topic", None)
    return record


def encode_event(event: Event) -> bytes:
    """One orjson message for a bus event: ``{"topic", "payload"}``."""
    return orjson.dumps({"topic": event.topic, "payload": event_payload(event)},
                        default=_default, option=orjson.OPT_SERIALIZE_NUMPY)


def decode_event(data: bytes) -> dict[str, Any]:
    """``{"topic", "payload"}`` from :func:`encode_event`."""
    try:
        out = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise WireError(f"event message is not JSON: {exc}") from None
    if not isinstance(out, dict) or "topic" not in out:
        raise WireError(f"event message has no topic: {bytes(data[:80])!r}")
    return out
