"""Output sinks: bus events (signals, VPIN buckets, risk events) to JSON lines and Parquet.

An :class:`EventSink` subscribes to topic patterns and appends each event to
``<dir>/<family>.jsonl`` as it arrives (orjson, one object a line: a crash loses nothing
already written), then writes ``<dir>/<family>.parquet`` with pyarrow at close. The family
is the topic's first segment (``signals.BTCUSDT`` → ``signals``). Events are dataclasses;
the symbol is taken from the event, the topic is kept in a ``topic`` field.

Write errors (a full disk, a folder removed under the run). The first ``OSError`` is kept in
``EventSink.error`` and writing stops: each JSON-lines file is cut back to its last complete
line, a Parquet file that could not be written whole is removed, and nothing is retried per
event (the command line stops the run and reports the error once). Lines are buffered
(64 KiB) and written with ``os.write`` so the sink knows the offset of the last whole line.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson
import pyarrow.parquet as pq

from ..bus import Event, EventBus, Subscription
from .arrow_numpy import table_from_rows
from .parquet_out import dictionary_columns

_FIELDS: dict[type, tuple[str, ...]] = {}
"""A dataclass payload's field names, per class (``dataclasses.fields`` per event was a
third of a signal's cost in the sink: 28K signals in a 1M-trade batch job)."""


def event_record(event: Event) -> dict[str, Any]:
    """A flat dict of an event's payload (dataclass or mapping) plus its topic."""
    payload = event.payload
    names = _FIELDS.get(type(payload))
    if names is None and dataclasses.is_dataclass(payload) and not isinstance(payload, type):
        names = _FIELDS[type(payload)] = tuple(f.name for f in dataclasses.fields(payload))
    if names is not None:
        row = {n: getattr(payload, n) for n in names}
    elif isinstance(payload, dict):
        row = dict(payload)
    else:
        row = {"value": payload}
    row["topic"] = event.topic
    for key, value in row.items():
        if isinstance(value, tuple):
            row[key] = list(value)
        elif hasattr(value, "value") and isinstance(getattr(value, "value", None), str):
            row[key] = value.value  # enums (Side) as their string
    return row


def _nan_for_null(value: Any) -> Any:
    if value is None:
        return float("nan")
    if isinstance(value, dict):
        return {k: _nan_for_null(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_nan_for_null(v) for v in value]
    return value


class _Lines:
    """An append-only file of whole lines: buffered, and cut back to the last whole line on error."""

    def __init__(self, path: Path, keep: int = 0):
        self.path = path
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | (0 if keep else os.O_TRUNC), 0o644)
        if keep:  # carry on a previous run's file from its first ``keep`` bytes
            os.ftruncate(self.fd, keep)
            os.lseek(self.fd, keep, os.SEEK_SET)
        self.buf = bytearray()
        self.good = keep  # bytes of the file that are whole lines

    def write(self, line: bytes) -> None:
        self.buf += line
        if len(self.buf) >= 1 << 16:
            self.flush()

    def flush(self) -> None:
        view = memoryview(self.buf)
        try:
            while view:
                n = os.write(self.fd, view)
                view = view[n:]
        except OSError:
            with contextlib.suppress(OSError):
                os.ftruncate(self.fd, self.good)
            raise
        finally:
            view.release()
        self.good += len(self.buf)
        self.buf.clear()

    def close(self) -> None:
        if self.fd < 0:
            return
        try:
            if self.buf:
                self.flush()
        finally:
            os.close(self.fd)
            self.fd = -1


class EventSink:
    """Writes every event matching ``topics`` to JSON lines now and Parquet at close."""

    def __init__(self, directory: str | Path, topics: Sequence[str], formats: Sequence[str] = ("jsonl", "parquet")):
        self.dir = Path(directory)
        self.topics = list(topics)
        self.formats = set(formats)
        self._rows: dict[str, list[dict[str, Any]]] = {}
        self._files: dict[str, _Lines] = {}
        self._subs: list[Subscription] = []
        self.counts: dict[str, int] = {}
        self.error: OSError | None = None
        self._closed = False

    def attach(self, bus: EventBus) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        for pattern in self.topics:
            self._subs.append(
                bus.subscribe(pattern, self._write, name=f"sink:{pattern}", maxsize=65_536)
            )

    def offsets(self) -> dict[str, int]:
        """Bytes of whole JSON lines per family, flushed now: what :meth:`resume` keeps when a
        live run restarts from the snapshot taken at this point (the NATS bridge stores them)."""
        for fh in self._files.values():
            fh.flush()
        return {family: fh.good for family, fh in self._files.items()}

    def resume(self, offsets: dict[str, int]) -> None:
        """Carry on the JSON lines a crashed run wrote, cut back to ``offsets`` (from
        :meth:`offsets` at its last snapshot), before :meth:`attach`. The rows kept are read
        back for the Parquet files; orjson wrote NaN as null and no event field is None,
        so null reads back as NaN."""
        self.dir.mkdir(parents=True, exist_ok=True)
        for family, size in offsets.items():
            path = self.dir / f"{family}.jsonl"
            with open(path, "rb") as f:
                data = f.read(size)
            if len(data) != size:
                raise OSError(f"{path}: {len(data)} bytes, the stored state says {size}: the "
                              "output folder is not the one of the interrupted run")
            rows = [_nan_for_null(orjson.loads(line)) for line in data.splitlines()]
            self._files[family] = _Lines(path, keep=size)
            self.counts[family] = len(rows)
            if "parquet" in self.formats:
                self._rows[family] = rows

    def _write(self, event: Event) -> None:
        if self.error is not None or self._closed:
            return
        family = event.topic.split(".", 1)[0]
        row = event_record(event)
        self.counts[family] = self.counts.get(family, 0) + 1
        try:
            if "jsonl" in self.formats:
                fh = self._files.get(family)
                if fh is None:
                    fh = self._files[family] = _Lines(self.dir / f"{family}.jsonl")
                fh.write(orjson.dumps(row, option=orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_APPEND_NEWLINE))
        except OSError as e:
            self._fail(e)
            return
        if "parquet" in self.formats:
            self._rows.setdefault(family, []).append(row)

    def _fail(self, e: OSError) -> None:
        if self.error is None:
            self.error = e.with_traceback(None)  # no frames kept alive (pyarrow's open writer)
        for fh in self._files.values():
            with contextlib.suppress(OSError):
                fh.buf.clear()
                fh.close()
        self._files.clear()
        self._rows.clear()

    def close(self) -> dict[str, Path]:
        """Flush JSON lines, write Parquet files; return family → parquet path. Events that
        arrive later (a bus not closed after an error) are not written."""
        self._closed = True
        for fh in list(self._files.values()):
            try:
                fh.close()
            except OSError as e:
                self._fail(e)
        self._files.clear()
        written = {}
        for family, rows in self._rows.items():
            if rows and self.error is None:
                path = self.dir / f"{family}.parquet"
                try:
                    table = table_from_rows(rows)  # (not pa.Table.from_pylist: io/arrow_numpy.py)
                    pq.write_table(table, path, use_dictionary=dictionary_columns(table.schema))
                except OSError as e:
                    self.error = self.error or e.with_traceback(None)
                    with contextlib.suppress(OSError):
                        path.unlink()
                    continue
                written[family] = path
        self._rows.clear()
        return written
