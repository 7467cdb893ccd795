"""A JetStream pull consumer read as a stream: messages handed over the moment they arrive.

nats-py's ``PullSubscription.fetch(n)`` sends up to two pull requests per call (a
``no_wait`` probe, then a waiting one) and waits through ``next_msg``, which creates a task
and a timer per message; a request ends with each call. Here the consumer keeps one pull
request open (``batch`` = the credit it was given, ``expires`` a short
lease), its deliveries land in a queue through the subscription's callback, and
:meth:`PullFeed.get` returns whatever has arrived as soon as there is something. The
request is the JetStream API's own (``$JS.API.CONSUMER.MSG.NEXT.<stream>.<consumer>``,
replies on an inbox of ours); the messages are nats-py's, acknowledged as usual.

One request at a time, each on its own reply subject (``<inbox>.<n>``): a status that ends
a request (408 expired, 404/409) says which one it ends, so a late status of an old
request never cancels the credit of the current one. A request that neither delivers all
of its batch nor ends within ``expires`` + ``lost_after_s`` (the server restarted and
forgot it) is taken as lost and replaced. Deliveries beyond the credit (a lost request
that was not lost after all) are kept, not dropped: the caller's flow control (the pool)
holds them.
"""

from __future__ import annotations

import asyncio
import collections
import time
from typing import Any

import orjson
import structlog

from ..errors import PipelineError

log = structlog.get_logger("nautilus_pipeline.bridge.pull")

_STATUS = "Status"
_HEARTBEAT = "100"
_RETRY_AFTER_REFUSAL_S = 0.05
"""Pause before asking again after a request refused at once (409: the consumer's limits)."""


class ConsumerGone(PipelineError):
    """The server says the consumer no longer exists (deleted under us)."""


class PullFeed:
    """Deliveries of durable (or ephemeral) pull consumer ``consumer`` on ``stream``."""

    def __init__(self, nc: Any, stream: str, consumer: str, *, expires_s: float = 0.25,
                 lost_after_s: float = 1.0):
        self.nc = nc
        self.stream = stream
        self.consumer = consumer
        self.expires_s = expires_s
        self.lost_after_s = lost_after_s
        self.api_subject = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}"
        self.requests = 0
        self.statuses: collections.Counter[str] = collections.Counter()
        self._prefix = ""
        self._sub: Any = None
        self._ready: collections.deque[Any] = collections.deque()
        self._wake: asyncio.Future | None = None
        self._credit = 0  # messages the open request may still deliver
        self._current = ""  # its reply subject
        self._deadline = 0.0  # when it counts as lost
        self._not_before = 0.0
        self._gone: str | None = None

    async def open(self) -> PullFeed:
        self._prefix = self.nc.new_inbox()
        self._sub = await self.nc.subscribe(f"{self._prefix}.*", cb=self._on_msg,
                                            pending_msgs_limit=-1, pending_bytes_limit=-1)
        return self

    async def close(self, nak_unread: bool = True) -> int:
        """Stop reading; what arrived and was not taken is nak'ed (redelivered at once to the
        next reader, not after ``ack_wait``). Returns how many.

        The subscription is drained (unsubscribe, then a round trip to the server): the
        server drops a pull request whose reply subject has no interest, so the open request
        ends with it, and whatever it delivered before lands here and is nak'ed."""
        if self._sub is not None:
            sub, self._sub = self._sub, None
            try:
                await sub.drain()
            except Exception as exc:  # a closed connection: nothing to unsubscribe from
                log.debug("pull_drain_failed", error=f"{type(exc).__name__}: {exc}")
        self._credit = 0
        unread = list(self._ready)
        self._ready.clear()
        if nak_unread and not self.nc.is_closed:
            for msg in unread:
                await msg.nak()
        return len(unread)

    # --- deliveries ----------------------------------------------------------------------
    async def _on_msg(self, msg: Any) -> None:
        headers = msg.headers
        status = headers.get(_STATUS) if headers else None
        if status is None:
            if self._credit > 0:
                self._credit -= 1
            self._ready.append(msg)
        else:
            self.statuses[status] += 1
            if status != _HEARTBEAT and msg.subject == self._current:
                self._credit = 0  # this request is over
                if status == "409":
                    desc = headers.get("Description", "")
                    if "Consumer Deleted" in desc:
                        self._gone = desc
                    else:  # a limit of the consumer's: do not ask again at once
                        self._not_before = time.monotonic() + _RETRY_AFTER_REFUSAL_S
        if self._wake is not None:
            set_none(self._wake)

    async def _request(self, batch: int) -> None:
        self.requests += 1
        self._current = f"{self._prefix}.{self.requests}"
        self._credit = batch
        self._deadline = time.monotonic() + self.expires_s + self.lost_after_s
        body = orjson.dumps({"batch": batch, "expires": int(self.expires_s * 1e9)})
        await self.nc.publish(self.api_subject, body, reply=self._current)

    @property
    def ready(self) -> int:
        """Messages delivered and not yet taken."""
        return len(self._ready)

    async def ask(self, target: int) -> None:
        """Top up without waiting: when no request is open and fewer than half of ``target``
        messages are delivered and not taken, request the rest (``target`` minus those).
        The reader asks ahead of its need, so that what it takes next is already here
        instead of a round trip away; half as the low mark makes the requests few and large."""
        if self._gone is not None or target <= 0:
            return
        now = time.monotonic()
        if self._credit > 0 and now > self._deadline:
            log.info("pull_request_lost", consumer=self.consumer, credit=self._credit)
            self._credit = 0
        have = len(self._ready)
        if self._credit == 0 and have <= target // 2 and now >= self._not_before:
            await self._request(target - have)

    async def get(self, want: int, timeout: float, limit: int | None = None) -> list[Any]:
        """The messages that have arrived (at most ``limit``; the others stay for the next
        read), waiting up to ``timeout`` s for the first; a pull request for ``want`` is
        opened first when none is open. ``[]``: none came."""
        end = time.monotonic() + timeout
        while not self._ready:
            if self._gone is not None:
                raise ConsumerGone(f"consumer {self.consumer!r} of stream {self.stream!r}: {self._gone}")
            now = time.monotonic()
            left = end - now
            if left <= 0:
                break
            if self._credit > 0 and now > self._deadline:
                log.info("pull_request_lost", consumer=self.consumer, credit=self._credit)
                self._credit = 0
            if self._credit == 0 and want > 0:
                if now >= self._not_before:
                    await self._request(want)
                else:
                    left = min(left, self._not_before - now)
            if self._credit > 0:
                left = min(left, max(self._deadline - now, 0.0) + 1e-3)
            await self._wait(left)
        ready = self._ready
        if limit is None or limit >= len(ready):
            out = list(ready)
            ready.clear()
        else:
            out = [ready.popleft() for _ in range(max(limit, 0))]
        return out

    async def _wait(self, timeout: float) -> None:
        """Until the next delivery or status, or ``timeout`` s (a timer, not a task per wait)."""
        loop = asyncio.get_running_loop()
        wake = self._wake = loop.create_future()
        timer = loop.call_later(timeout, set_none, wake)
        try:
            await wake
        finally:
            timer.cancel()
            self._wake = None


def set_none(fut: asyncio.Future) -> None:
    """Resolve a wake-up future unless it is done (a timer and a delivery may both fire)."""
    if not fut.done():
        fut.set_result(None)
