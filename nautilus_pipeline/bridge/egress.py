"""Egress: chosen bus topics published to a JetStream stream, exactly once per event.

Each exported pattern (``signals.>``, ``vpin.>``, ``risk.>``, ``deadletter.>``) is a bus
subscription under the bus's overflow policy (``block`` by default: a stalled server slows
the pipeline instead of losing events). Its handler encodes the event (orjson) and
publishes it asynchronously; at most ``max_in_flight`` publishes wait for their JetStream
ack at a time, the handler awaiting the oldest when the window is full.

De-duplication. Every message carries ``Nats-Msg-Id = <pipeline>:<topic>:<n>``, ``n`` the
event's number on its topic (1, 2, ...). The numbers are part of the bridge's stored state,
so a pipeline restored from a snapshot after a crash numbers the events it emits again
exactly as before, and JetStream stores each of them once (within the stream's duplicate
window, which the bridge sets to ``duplicate_window_s``). A drop policy other than
``block`` makes what is exported depend on timing; the numbering then stays unique but a
replay may export other events.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import structlog

from ..bus import Event, EventBus, Subscription
from ..errors import PipelineError
from .subjects import SubjectError, subject, subject_pattern
from .wire import encode_event

log = structlog.get_logger("nautilus_pipeline.bridge.egress")


class EgressError(PipelineError):
    """JetStream refused or never acknowledged exported events (says how many and why)."""


@dataclass
class EgressStats:
    published: int = 0
    acked: int = 0
    duplicates: int = 0
    refused_topics: int = 0
    failed: int = 0


class Egress:
    """Bus events on ``patterns`` → JetStream subjects (the topics themselves)."""

    def __init__(self, pipeline: str, bus: EventBus, js: Any, patterns: Sequence[str], *,
                 max_in_flight: int = 256, overflow: str | None = None, maxsize: int | None = None,
                 ack_timeout: float = 10.0):
        if max_in_flight < 1:
            raise PipelineError(f"egress max_in_flight must be >= 1, got {max_in_flight}")
        self.pipeline = pipeline
        self.bus = bus
        self.js = js
        self.patterns = list(patterns)
        self.subjects = [subject_pattern(p) for p in self.patterns]
        self.max_in_flight = max_in_flight
        self.overflow = overflow
        self.maxsize = maxsize
        self.ack_timeout = ack_timeout
        self.seqs: dict[str, int] = {}
        self.stats = EgressStats()
        self._inflight: collections.deque[asyncio.Future] = collections.deque()
        self._subs: list[Subscription] = []
        self._progress = asyncio.Event()
        self._errors: list[str] = []

    def start(self) -> None:
        for pattern in self.patterns:
            self._subs.append(self.bus.subscribe(
                pattern, self._handle, name=f"nats-egress:{pattern}",
                maxsize=self.maxsize, overflow=self.overflow,
            ))

    async def _handle(self, event: Event) -> None:
        try:
            await self._export(event)
        finally:
            self._progress.set()

    async def _export(self, event: Event) -> None:
        try:
            subj = subject(event.topic)
        except SubjectError as exc:
            self.stats.refused_topics += 1
            log.error("topic_not_exportable", topic=event.topic, error=str(exc))
            return
        topic = event.topic
        n = self.seqs.get(topic, 0) + 1
        self.seqs[topic] = n
        data = encode_event(event)
        while len(self._inflight) >= self.max_in_flight:
            await self._settle_one()
        fut = await self.js.publish_async(
            subj, data, headers={"Nats-Msg-Id": f"{self.pipeline}:{topic}:{n}"})
        self._inflight.append(fut)
        self.stats.published += 1
        while self._inflight and self._inflight[0].done():
            await self._settle_one()

    async def _settle_one(self) -> None:
        fut = self._inflight.popleft()
        try:
            ack = await asyncio.wait_for(fut, self.ack_timeout)
        except Exception as exc:  # a refused publish, or no ack in time
            self.stats.failed += 1
            if len(self._errors) < 5:
                self._errors.append(f"{type(exc).__name__}: {exc}")
            log.error("export_failed", error=f"{type(exc).__name__}: {exc}")
            return
        self.stats.acked += 1
        if ack.duplicate:
            self.stats.duplicates += 1

    async def settle(self) -> None:
        """Wait until every event queued for export has been handed to JetStream.

        The bridge calls it before a snapshot, so the stored per-topic numbers count every
        event the pipeline emitted for the batches the snapshot covers.
        """
        while any(s.published > s.delivered + s.errors + s.dropped for s in self._subs):
            self._progress.clear()
            with contextlib.suppress(TimeoutError):  # a drop wakes nobody: look again soon
                await asyncio.wait_for(self._progress.wait(), 0.01)

    async def flush(self) -> None:
        """Wait for every in-flight publish's ack; raise :class:`EgressError` if any failed."""
        await self.settle()
        while self._inflight:
            await self._settle_one()
        if self.stats.failed:
            raise EgressError(f"{self.stats.failed} exported events were not stored by JetStream "
                              f"(first errors: {self._errors})")

    async def close(self, drain: bool = True) -> None:
        """Take the subscriptions off the bus (draining their queues), then flush."""
        for sub in self._subs:
            if not self.bus.closed:
                await self.bus.unsubscribe(sub, drain=drain)
        self._subs.clear()
        if drain:
            await self.flush()
        else:
            for fut in self._inflight:
                fut.cancel()
            self._inflight.clear()
