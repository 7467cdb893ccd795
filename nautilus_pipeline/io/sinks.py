"""Output sinks: bus events (signals, VPIN buckets, risk events) to JSON lines and Parquet.

An :class:`EventSink` subscribes to topic patterns and appends each event to
``<dir>/<family>.jsonl`` as it arrives (orjson, one object a line: a crash loses nothing
already written), then writes ``<dir>/<family>.parquet`` with pyarrow at close. The family
is the topic's first segment (``signals.BTCUSDT`` → ``signals``). Events are dataclasses;
the symbol is taken from the event, the topic is kept in a ``topic`` field.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

import orjson
import pyarrow as pa
import pyarrow.parquet as pq

from ..bus import Event, EventBus, Subscription


def event_record(event: Event) -> dict[str, Any]:
    """A flat dict of an event's payload (dataclass or mapping) plus its topic."""
    payload = event.payload
    if dataclasses.is_dataclass(payload):
        row = {f.name: getattr(payload, f.name) for f in dataclasses.fields(payload)}
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


class EventSink:
    """Writes every event matching ``topics`` to JSON lines now and Parquet at close."""

    def __init__(self, directory: str | Path, topics: Sequence[str], formats: Sequence[str] = ("jsonl", "parquet")):
        self.dir = Path(directory)
        self.topics = list(topics)
        self.formats = set(formats)
        self._rows: dict[str, list[dict[str, Any]]] = {}
        self._files: dict[str, IO[bytes]] = {}
        self._subs: list[Subscription] = []
        self.counts: dict[str, int] = {}

    def attach(self, bus: EventBus) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        for pattern in self.topics:
            self._subs.append(
                bus.subscribe(pattern, self._write, name=f"sink:{pattern}", maxsize=65_536)
            )

    def _write(self, event: Event) -> None:
        family = event.topic.split(".", 1)[0]
        row = event_record(event)
        self.counts[family] = self.counts.get(family, 0) + 1
        if "jsonl" in self.formats:
            fh = self._files.get(family)
            if fh is None:
                fh = self._files[family] = open(self.dir / f"{family}.jsonl", "wb")
            fh.write(orjson.dumps(row, option=orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_APPEND_NEWLINE))
        if "parquet" in self.formats:
            self._rows.setdefault(family, []).append(row)

    def close(self) -> dict[str, Path]:
        """Flush JSON lines, write Parquet files; return family → parquet path."""
        for fh in self._files.values():
            fh.close()
        self._files.clear()
        written = {}
        for family, rows in self._rows.items():
            if rows:
                path = self.dir / f"{family}.parquet"
                pq.write_table(pa.Table.from_pylist(rows), path)
                written[family] = path
        self._rows.clear()
        return written
