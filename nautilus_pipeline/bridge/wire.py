"""How batches and events look on the wire.

A **tick batch** is one message: the raw column buffers, back to back, after a small orjson
header. Arrow IPC was the alternative; for a dozen fixed-width columns it adds a schema
message and per-buffer metadata that we would only parse back into the same numpy arrays,
while raw buffers decode as ``np.frombuffer`` views of the message (no copy until the
slab is filled). Layout::

    b"NPB1" | uint32 LE header length | header (orjson) | pad to 8 | column buffers (each padded to 8)

The header holds ``symbol`` (the instrument's name: ``symbol_id`` is local to a process's
symbol table, so it is not sent), ``length``, the columns as ``[name, dtype, nbytes]`` and
``first_seq``/``last_seq`` (the exchange's sequence, here the first and last ``trade_id``;
-1 when the venue gives none). Only tick columns travel; a missing one takes its default.

An **event** (signals, VPIN buckets, risk events, dead letters: low rate) is one orjson
object: ``{"topic", "payload"}`` with the payload as the output sinks write it.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from ..bus import DeadLetter, Event
from ..errors import DataError
from ..events import TICK_COLUMNS
from ..io.sinks import event_record

MAGIC = b"NPB1"
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
    """A decoded tick batch: header fields and read-only column views of the message."""

    symbol: str
    length: int
    first_seq: int
    last_seq: int
    columns: dict[str, np.ndarray]


def encode_batch(columns: Mapping[str, np.ndarray], symbol: str) -> bytes:
    """One message for rows of one symbol (tick column name → array, ``symbol_id`` ignored)."""
    names = [n for n in WIRE_COLUMNS if n in columns]
    if "ts_ns" not in names:
        raise WireError("encode_batch: the ts_ns column is required")
    unknown = sorted(set(columns) - set(_SPECS))
    if unknown:
        raise WireError(f"encode_batch: unknown tick columns {unknown}")
    n = len(columns["ts_ns"])
    arrays = []
    for name in names:
        arr = np.ascontiguousarray(columns[name], dtype=_SPECS[name].dtype)
        if arr.shape != (n,):
            raise WireError(f"encode_batch: column {name!r} has shape {arr.shape}, expected ({n},)")
        arrays.append(arr)
    ids = columns.get("trade_id")
    first, last = (int(ids[0]), int(ids[-1])) if ids is not None and n else (-1, -1)
    header = orjson.dumps({
        "symbol": symbol, "length": n, "first_seq": first, "last_seq": last,
        "columns": [[name, arr.dtype.str, arr.nbytes] for name, arr in zip(names, arrays, strict=True)],
    })
    parts = [MAGIC, _LEN.pack(len(header)), header, b"\0" * _pad(8 + len(header))]
    for arr in arrays:
        parts.append(arr.tobytes())
        parts.append(b"\0" * _pad(arr.nbytes))
    return b"".join(parts)


def decode_batch(data: bytes) -> Batch:
    """The batch in ``data``; a :class:`WireError` names what does not fit."""
    if data[:4] != MAGIC:
        raise WireError(f"not a tick batch: starts with {bytes(data[:4])!r}, expected {MAGIC!r}")
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
        columns = _columns(data, symbol, n, cols, offset)
    except WireError:
        raise
    except (TypeError, ValueError, KeyError) as exc:  # a header of the wrong shape: never a crash
        raise WireError(f"tick batch of {symbol!r}: header's columns unreadable: {exc}") from None
    if "ts_ns" not in columns:
        raise WireError(f"tick batch of {symbol!r} has no ts_ns column")
    return Batch(symbol, n, int(header.get("first_seq", -1)), int(header.get("last_seq", -1)), columns)


def _columns(data: bytes, symbol: str, n: int, cols: Any, offset: int) -> dict[str, np.ndarray]:
    columns: dict[str, np.ndarray] = {}
    for name, dtype, nbytes in cols:
        spec = _SPECS.get(name)
        if spec is None or name == "symbol_id":
            raise WireError(f"tick batch of {symbol!r}: unknown column {name!r}")
        if np.dtype(dtype) != spec.dtype or nbytes != n * spec.dtype.itemsize:
            raise WireError(f"tick batch of {symbol!r}: column {name!r} is {dtype} x {nbytes} bytes, "
                            f"expected {spec.dtype.str} x {n * spec.dtype.itemsize}")
        if offset + nbytes > len(data):
            raise WireError(f"tick batch of {symbol!r} cut short in column {name!r}")
        columns[name] = np.frombuffer(data, dtype=spec.dtype, count=n, offset=offset)
        offset += nbytes + _pad(nbytes)
    return columns


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
