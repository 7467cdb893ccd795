"""The bridge's state in a JetStream key-value bucket: what a restarted consumer resumes from.

A state holds, as of the last snapshot: the pipeline's stage snapshots (``Pipeline.snapshot()``:
every stage's per-symbol state), the ticks stream's sequence they cover (every message up to
it went through the pipeline, none after it), and the egress's per-topic event numbers. A
snapshot is taken with the pipeline idle (drained, exports handed to JetStream), every N
batches, when the stream goes quiet and on drain; only then are the messages it covers
acknowledged. After a crash the bridge restores the state and re-reads the stream from the
next sequence, so each tick is processed once in the state's history; events emitted again
carry the same ``Nats-Msg-Id`` and are stored once.

Why a KV bucket and not a local file: the state then lives where the stream lives (same
server, same replication), so a consumer can restart on another host.

Size. The state grows with the symbols (about 11 KB each for the default stages), and one
NATS message is at most the server's ``max_payload`` (1 MB by default: ~90 symbols). So the
state is stored as chunks of at most ``max_payload`` less a margin, plus a small manifest
written last::

    <durable>              manifest: b"NPM1" | orjson {generation, slot, chunks, bytes, sha256, ...}
    <durable>.s0.<i>       chunk i of the generations stored in slot 0 (even generations)
    <durable>.s1.<i>       chunk i of slot 1 (odd generations)
    chunk value:           the i-th piece of  b"NPS1" | uint32 LE header length | header (orjson) | snapshot

A save writes generation g's chunks into slot g % 2, the slot the manifest does not point
to, then the manifest: one KV put, the switch. A crash mid-save (``kill -9`` between two
chunk puts) leaves the manifest on generation g - 1, whose slot was not touched, so a
restart never reads a mixed state; the manifest's sha256 over the chunks checks that.
Two slots rather than a key per generation: KV deletes leave markers, so keys named by
generation would grow without bound; the slots are overwritten in place (history 1).
Chunks rather than one key per symbol: ``Pipeline.snapshot()`` is one pipeline-wide value
(stages snapshot all their symbols at once, and a restore needs all of them), so per-symbol
keys would still need a manifest to switch atomically, and would cut the engine's format
apart for nothing. A state in the older single-value layout (``NPS1`` under ``<durable>``)
is still read.
"""

from __future__ import annotations

import asyncio
import hashlib
import struct
from dataclasses import dataclass, field
from typing import Any

import orjson

from ..errors import PipelineError

MAGIC = b"NPS1"
MANIFEST_MAGIC = b"NPM1"
CHUNK_MARGIN = 4096
"""Bytes of a message left to its subject and headers when a chunk fills ``max_payload``."""
DEFAULT_CHUNK = 1 << 20
PUTS_IN_FLIGHT = 8
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
    """Load and save a :class:`SavedState` under ``key`` in bucket ``bucket`` (chunked, see
    the module docstring); ``max_payload`` (the server's) sizes the chunks."""

    def __init__(self, js: Any, bucket: str, key: str, max_payload: int | None = None,
                 chunk_bytes: int | None = None):
        self.js = js
        self.max_payload = max_payload
        self.bucket = bucket
        self.key = state_key(key)
        if chunk_bytes is None:
            chunk_bytes = max(max_payload - CHUNK_MARGIN, 1024) if max_payload else DEFAULT_CHUNK
        if chunk_bytes < 1 or (max_payload and chunk_bytes > max_payload - 512):
            raise StateError(f"chunk_bytes={chunk_bytes} does not fit the server's max_payload {max_payload}")
        self.chunk_bytes = chunk_bytes
        self.kv: Any = None
        self.saves = 0
        self.generation: int | None = None  # of the state stored now (0: none; None: not read yet)
        self._chunks_in_slot: dict[int, int] = {}  # chunks this process wrote per slot

    async def open(self) -> None:
        import nats.js.errors

        try:
            self.kv = await self.js.key_value(self.bucket)
        except nats.js.errors.BucketNotFoundError:
            self.kv = await self.js.create_key_value(bucket=self.bucket, history=1)

    def _chunk_key(self, slot: int, index: int) -> str:
        return f"{self.key}.s{slot}.{index}"

    async def _get(self, key: str) -> bytes | None:
        import nats.js.errors

        try:
            entry = await self.kv.get(key)
        except nats.js.errors.KeyNotFoundError:
            return None
        return entry.value or None

    async def load(self, pipeline: str) -> SavedState | None:
        where = f"KV {self.bucket}/{self.key}"
        head = await self._get(self.key)
        self.generation = 0
        if head is None:
            return None
        if head[:4] == MAGIC:  # the single-value layout of earlier versions
            data = head
        elif head[:4] == MANIFEST_MAGIC:
            data = await self._read_chunks(head, where)
        else:
            raise StateError(f"{where}: not a stored bridge state (starts with {bytes(head[:4])!r})")
        saved = SavedState.decode(data, where)
        if saved.pipeline != pipeline:
            raise StateError(f"{where} holds the state of pipeline "
                             f"{saved.pipeline!r}, not {pipeline!r}: use another durable name")
        return saved

    async def _read_chunks(self, head: bytes, where: str) -> bytes:
        try:
            m = orjson.loads(head[4:])
            generation, slot, count = int(m["generation"]), int(m["slot"]), int(m["chunks"])
            size, digest = int(m["bytes"]), str(m["sha256"])
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise StateError(f"{where}: manifest unreadable: {exc}") from None
        parts = await asyncio.gather(*(self._get(self._chunk_key(slot, i)) for i in range(count)))
        missing = [i for i, p in enumerate(parts) if p is None]
        if missing:
            raise StateError(f"{where}: generation {generation} lacks chunks {missing} of {count} "
                             f"(keys {self._chunk_key(slot, missing[0])}...): the bucket was changed by hand?")
        data = b"".join(parts)
        if len(data) != size or hashlib.sha256(data).hexdigest() != digest:
            raise StateError(f"{where}: generation {generation}'s {count} chunks hold {len(data):,} bytes "
                             f"whose sha256 is not the manifest's ({size:,} bytes): damaged or mixed")
        self.generation = generation
        return data

    async def save(self, state: SavedState) -> None:
        """Chunks into the free slot, then the manifest (the switch), then stale chunks purged."""
        data = state.encode()
        if self.generation is None:  # never read: the slot in use must not be the one written
            head = await self._get(self.key)
            known = head is not None and head[:4] == MANIFEST_MAGIC
            self.generation = int(orjson.loads(head[4:])["generation"]) if known else 0
        generation = self.generation + 1
        slot = generation % 2
        step = self.chunk_bytes
        chunks = [data[i : i + step] for i in range(0, len(data), step)] or [b""]
        window = asyncio.Semaphore(PUTS_IN_FLIGHT)

        async def put(index: int, chunk: bytes) -> None:
            async with window:
                await self.kv.put(self._chunk_key(slot, index), chunk)

        await asyncio.gather(*(put(i, c) for i, c in enumerate(chunks)))
        manifest = orjson.dumps({"generation": generation, "slot": slot, "chunks": len(chunks),
                                 "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
                                 "pipeline": state.pipeline, "stream_seq": state.stream_seq})
        await self.kv.put(self.key, MANIFEST_MAGIC + manifest)
        self.generation = generation
        self.saves += 1
        before = self._chunks_in_slot.get(slot, 0)
        self._chunks_in_slot[slot] = len(chunks)
        for index in range(len(chunks), before):  # a smaller state: what the manifest no longer reads
            await self.kv.purge(self._chunk_key(slot, index))
