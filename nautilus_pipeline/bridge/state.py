"""The bridge's state in a JetStream key-value bucket: what a restarted consumer resumes from.

One key per durable consumer holds, as of the last snapshot: the pipeline's stage snapshots
(``Pipeline.snapshot()``: every stage's per-symbol state), the ticks stream's sequence they
cover (every message up to it went through the pipeline, none after it), and the egress's
per-topic event numbers. A snapshot is taken with the pipeline idle (drained, exports
handed to JetStream), every N batches, when the stream goes quiet and on drain; only then
are the messages it covers acknowledged. After a crash the bridge restores the state and
re-reads the stream from the next sequence, so each tick is processed once in the state's
history; events emitted again carry the same ``Nats-Msg-Id`` and are stored once.

Why a KV bucket and not a local file: the state then lives where the stream lives (same
server, same replication), so a consumer can restart on another host. Layout of a value::

    b"NPS1" | uint32 LE header length | header (orjson) | snapshot bytes
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any

import orjson

from ..errors import PipelineError

MAGIC = b"NPS1"
_LEN = struct.Struct("<I")
_KEY_OK = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_=/.")


class StateError(PipelineError):
    """A stored state that cannot be read or does not belong to this pipeline."""


@dataclass
class SavedState:
    """A snapshot and what it covers."""

    pipeline: str
    stream_seq: int
    snapshot: bytes
    egress_seqs: dict[str, int] = field(default_factory=dict)
    ticks: int = 0
    batches: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    """What the bridge's owner stores beside the snapshot (the command line: its output files' lengths)."""

    def encode(self) -> bytes:
        header = orjson.dumps({"pipeline": self.pipeline, "stream_seq": self.stream_seq,
                               "egress_seqs": self.egress_seqs, "ticks": self.ticks,
                               "batches": self.batches, "extra": self.extra})
        return MAGIC + _LEN.pack(len(header)) + header + self.snapshot

    @classmethod
    def decode(cls, data: bytes, where: str) -> SavedState:
        if data[:4] != MAGIC or len(data) < 8:
            raise StateError(f"{where}: not a stored bridge state (starts with {bytes(data[:4])!r})")
        (hlen,) = _LEN.unpack_from(data, 4)
        try:
            h = orjson.loads(data[8 : 8 + hlen])
            return cls(h["pipeline"], int(h["stream_seq"]), bytes(data[8 + hlen :]),
                       dict(h["egress_seqs"]), int(h["ticks"]), int(h["batches"]),
                       dict(h.get("extra") or {}))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise StateError(f"{where}: stored state header unreadable: {exc}") from None


def state_key(durable: str) -> str:
    bad = sorted({c for c in durable if c not in _KEY_OK})
    if bad:
        raise StateError(f"durable name {durable!r} cannot be a KV key (holds {bad!r})")
    return durable


class StateStore:
    """Load and save one :class:`SavedState` under ``key`` in bucket ``bucket``."""

    def __init__(self, js: Any, bucket: str, key: str, max_payload: int | None = None):
        self.js = js
        self.max_payload = max_payload
        self.bucket = bucket
        self.key = state_key(key)
        self.kv: Any = None
        self.saves = 0

    async def open(self) -> None:
        import nats.js.errors

        try:
            self.kv = await self.js.key_value(self.bucket)
        except nats.js.errors.BucketNotFoundError:
            self.kv = await self.js.create_key_value(bucket=self.bucket, history=1)

    async def load(self, pipeline: str) -> SavedState | None:
        import nats.js.errors

        try:
            entry = await self.kv.get(self.key)
        except nats.js.errors.KeyNotFoundError:
            return None
        if not entry.value:
            return None
        saved = SavedState.decode(entry.value, f"KV {self.bucket}/{self.key}")
        if saved.pipeline != pipeline:
            raise StateError(f"KV {self.bucket}/{self.key} holds the state of pipeline "
                             f"{saved.pipeline!r}, not {pipeline!r}: use another durable name")
        return saved

    async def save(self, state: SavedState) -> None:
        data = state.encode()
        limit = self.max_payload
        if limit and len(data) > limit - 1024:
            raise StateError(
                f"the state of {state.pipeline!r} is {len(data):,} bytes, more than the server takes in "
                f"one message ({limit:,}, its max_payload): raise max_payload in the nats-server "
                "configuration (up to 64 MB), or give each pipeline fewer symbols")
        await self.kv.put(self.key, data)
        self.saves += 1
