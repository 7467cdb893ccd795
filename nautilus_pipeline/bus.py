"""The in-process event bus: topics, bounded per-subscription queues, overflow policies.

Design, and what was weighed:

- **One queue and one consumer task per subscription.** Delivery order within a
  subscription is publish order, a slow subscriber delays only itself (or its publishers,
  under ``block``), and each subscription's backlog is visible. The alternative, calling
  handlers inline from ``publish``, is faster for trivial handlers but lets one slow or
  failing handler stall every publisher; NautilusTrader's ``MessageBus`` is synchronous for
  that speed, but our stages await compute streams, so we need queues.
- **Own queue, not ``asyncio.Queue``.** A ``deque`` plus one waiter future per side does the
  same job with fewer allocations and lets ``drop_oldest``/``conflate`` touch the queue
  directly. ``scripts/bench_bus.py`` measures the bus against a plain chain of
  ``asyncio.Queue``s doing the same work.
- **Handler latency is sampled** (every event for the first 1024, then one in eight):
  ``scripts/bench_bus.py`` run against a build that timed every event put the bus at
  1.66-1.84x the queue chain at one tick per event, over the 1.5x target; sampled, 1.4x.
- **Routing is cached per topic.** Patterns are matched once per distinct topic and the
  matching subscriptions kept in a dict until the next (un)subscribe, so publishing costs
  a dict lookup, not a pattern scan.

Topic grammar: topics are dot-separated segments (``ticks.trades.BINANCE.ETHUSDT``).
A subscription pattern is a topic in which a segment may be ``*`` (exactly one segment)
and whose last segment may be ``>`` or ``**`` (one or more remaining segments). So
``ticks.*.BINANCE.>`` matches ``ticks.trades.BINANCE.ETHUSDT`` but not ``ticks.trades``.

Overflow policies (per subscription, when its bounded queue is full):
``block`` the publisher awaits room (backpressure); ``drop_oldest`` evicts the oldest
queued event; ``drop_newest`` discards the event being published; ``conflate`` keeps only
the latest event per key (``key=`` of ``publish``, default the topic) — a newer event
replaces the queued one in place. Every drop is counted in the subscription's metrics and
logged at debug level; none is silent.

Errors: with ``on_error="isolate"`` a raising handler is logged with topic, handler and
event, counted, and the event is republished on ``deadletter.<topic>`` as a
:class:`DeadLetter`; the bus keeps running. With ``on_error="fail_fast"`` the bus stops,
and the owner sees :class:`HandlerError` (from ``async with``, ``publish`` and
``wait_closed``).

Leases: when a payload is a :class:`~nautilus_pipeline.memory.Lease`, the bus retains it
once per subscription it is queued in and releases it after that handler returns (or when
the event is dropped or discarded), so a batch returns to the pool exactly when its last
subscriber is done with it.
"""

from __future__ import annotations

import asyncio
import collections
import enum
import inspect
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog

from .errors import (
    BusClosedError,
    ConfigError,
    HandlerError,
    NoResponderError,
    RequestTimeoutError,
    WouldBlockError,
)
from .memory import Lease
from .metrics import LatencyHistogram, SubscriptionMetrics
from .topics import DEADLETTER_PREFIX, deadletter

log = structlog.get_logger("nautilus_pipeline.bus")


# Handler latency is timed for the first _TIME_ALL events of a subscription, then for one
# event in _SAMPLE_MASK + 1: two clock reads and a histogram update per event were the
# largest cost left on the hot path (see the module docstring); a 1-in-8 sample keeps the
# percentiles.
_TIME_ALL = 1024
_SAMPLE_MASK = 7


class Overflow(enum.StrEnum):
    BLOCK = "block"
    DROP_OLDEST = "drop_oldest"
    DROP_NEWEST = "drop_newest"
    CONFLATE = "conflate"


class OnError(enum.StrEnum):
    ISOLATE = "isolate"
    FAIL_FAST = "fail_fast"


class Event:
    """One published message. ``seq`` is the bus-wide publish sequence number."""

    __slots__ = ("key", "payload", "reply", "seq", "topic")

    def __init__(self, topic: str, payload: Any, seq: int, key: Any, reply: asyncio.Future | None):
        self.topic = topic
        self.payload = payload
        self.seq = seq
        self.key = key
        self.reply = reply

    def __repr__(self) -> str:
        return f"Event(topic={self.topic!r}, seq={self.seq}, payload={_describe(self.payload)})"


@dataclass(frozen=True)
class DeadLetter:
    """An event whose handler raised, with who raised what."""

    event: Event
    subscription: str
    error: BaseException


Handler = Callable[[Event], Any]


def _describe(payload: Any) -> str:
    text = repr(payload)
    return text if len(text) <= 200 else text[:197] + "..."


def validate_pattern(pattern: str) -> tuple[str, ...]:
    """Split and check a subscription pattern; raise ConfigError naming what is wrong."""
    if not pattern or not isinstance(pattern, str):
        raise ConfigError(f"topic pattern must be a non-empty string, got {pattern!r}")
    parts = tuple(pattern.split("."))
    for i, part in enumerate(parts):
        if not part:
            raise ConfigError(f"topic pattern {pattern!r} has an empty segment")
        if part in (">", "**") and i != len(parts) - 1:
            raise ConfigError(
                f"topic pattern {pattern!r}: {part!r} matches the rest of a topic and must be "
                "the last segment"
            )
        if part not in ("*", ">", "**") and ("*" in part or ">" in part):
            raise ConfigError(
                f"topic pattern {pattern!r}: wildcards stand alone as a segment "
                "('*' one segment, '>' or '**' the rest)"
            )
    return parts


def topic_matches(parts: tuple[str, ...], topic: str) -> bool:
    """Whether a topic matches a pattern already split by :func:`validate_pattern`."""
    segs = topic.split(".")
    for i, part in enumerate(parts):
        if part in (">", "**"):
            return len(segs) > i
        if i >= len(segs) or (part != "*" and part != segs[i]):
            return False
    return len(segs) == len(parts)


class Subscription:
    """A handler on a pattern, with its own bounded queue, consumer task and metrics."""

    __slots__ = (
        "_closing", "_conflate", "_conflated", "_not_empty", "_not_full", "_queue", "_task",
        "active", "bus", "delivered", "discarded", "dropped", "errors", "handler", "high_water",
        "is_coroutine", "latency", "maxsize", "name", "overflow", "parts", "pattern",
        "published", "responder",
    )

    def __init__(
        self,
        bus: EventBus,
        pattern: str,
        handler: Handler,
        *,
        name: str,
        maxsize: int,
        overflow: Overflow,
        responder: bool,
    ):
        self.bus = bus
        self.pattern = pattern
        self.parts = validate_pattern(pattern)
        self.handler = handler
        self.name = name
        self.maxsize = maxsize
        self.overflow = overflow
        self.responder = responder
        self.is_coroutine = inspect.iscoroutinefunction(handler) or inspect.iscoroutinefunction(
            type(handler).__call__
        )
        self._conflate = overflow is Overflow.CONFLATE
        # Counters live on the subscription itself (one attribute hop on the hot path);
        # ``metrics`` returns them as a SubscriptionMetrics snapshot.
        self.published = 0
        self.delivered = 0
        self.dropped = 0
        self.errors = 0
        self.discarded = 0
        self.high_water = 0
        self.latency = LatencyHistogram()
        self._queue: collections.deque[Event] = collections.deque()
        self._conflated: dict[Any, Event] = {}
        self._not_empty: asyncio.Future | None = None
        self._not_full: collections.deque[asyncio.Future] = collections.deque()
        self._closing = False
        self._task: asyncio.Task | None = None
        self.active = True

    # --- producer side -----------------------------------------------------------------
    @property
    def metrics(self) -> SubscriptionMetrics:
        m = SubscriptionMetrics(
            published=self.published,
            delivered=self.delivered,
            dropped=self.dropped,
            errors=self.errors,
            discarded=self.discarded,
            queue_depth=len(self._queue),
            queue_high_water=self.high_water,
        )
        m.latency = self.latency
        return m

    async def _put(self, event: Event) -> None:
        q = self._queue
        if len(q) >= self.maxsize and self.overflow is Overflow.BLOCK:
            while len(q) >= self.maxsize and self.active:
                fut = asyncio.get_running_loop().create_future()
                self._not_full.append(fut)
                try:
                    await fut
                finally:
                    if fut in self._not_full:
                        self._not_full.remove(fut)
            if not self.active:
                self.published += 1
                self.dropped += 1
                return
        self._queue_event_sync(event)

    def _queue_event_sync(self, event: Event) -> None:
        """Queue now, applying the drop policies (a ``block`` queue has room: callers wait)."""
        self.published += 1
        q = self._queue
        if len(q) >= self.maxsize:
            if self.overflow is Overflow.CONFLATE and event.key in self._conflated:
                old = self._conflated[event.key]
                q[_index_of(q, old)] = event
                self._conflated[event.key] = event
                self._drop(old)
                return
            if self.overflow is Overflow.DROP_NEWEST:
                self.dropped += 1
                log.debug("event_dropped", subscription=self.name, topic=event.topic,
                          policy="drop_newest")
                return
            self._drop(self._pop())  # DROP_OLDEST, or CONFLATE with a new key
        self._push(event)

    def _push(self, event: Event) -> None:
        if type(event.payload) is Lease:
            event.payload.retain(self.name)
        if self._conflate:
            self._conflated[event.key] = event
        q = self._queue
        q.append(event)
        if len(q) > self.high_water:
            self.high_water = len(q)
        w = self._not_empty
        if w is not None and not w.done():
            w.set_result(None)

    def _pop(self) -> Event:
        event = self._queue.popleft()
        self._after_pop(event)
        return event

    def _after_pop(self, event: Event) -> None:
        """Forget a conflation key and wake one publisher waiting for room."""
        if self._conflate and self._conflated.get(event.key) is event:
            del self._conflated[event.key]
        while self._not_full:
            fut = self._not_full.popleft()
            if not fut.done():
                fut.set_result(None)
                break

    def _drop(self, event: Event) -> None:
        self.dropped += 1
        log.debug("event_dropped", subscription=self.name, topic=event.topic, policy=str(self.overflow))
        self._finish(event)
        if event.reply is not None and not event.reply.done():
            event.reply.set_exception(
                NoResponderError(f"request on {event.topic!r} dropped by {self.name!r} ({self.overflow})")
            )

    def _finish(self, event: Event) -> None:
        payload = event.payload
        if type(payload) is Lease:
            payload.release(self.name)

    # --- consumer side -----------------------------------------------------------------
    async def _consume(self) -> None:
        q = self._queue
        not_full = self._not_full
        conflate = self._conflate
        loop = asyncio.get_running_loop()
        perf = time.perf_counter_ns
        handler = self.handler
        is_coroutine = self.is_coroutine
        hist = self.latency
        counts = hist.counts
        while True:
            if not q:
                if self._closing:
                    return
                self._not_empty = loop.create_future()
                await self._not_empty
                self._not_empty = None
                continue
            event = q.popleft()
            if not_full or conflate:
                self._after_pop(event)
            n = self.delivered
            timed = n < _TIME_ALL or not n & _SAMPLE_MASK
            if timed:
                t0 = perf()
            try:
                result = handler(event)
                if is_coroutine or inspect.isawaitable(result):
                    result = await result
            except Exception as exc:
                self.errors += 1
                self._finish(event)
                try:
                    await self.bus._handler_failed(self, event, exc)
                except Exception:  # reporting must never kill the consumer and hang the bus
                    self.bus._report_errors += 1
                if self.bus._failure is not None:
                    return
                continue
            except BaseException:  # cancellation (or exit): the lease still goes back
                self._finish(event)
                raise
            if timed:  # LatencyHistogram.record, inlined
                ns = perf() - t0
                if ns < 32:
                    counts[ns if ns > 0 else 0] += 1
                else:
                    shift = ns.bit_length() - 5
                    counts[(shift << 4) + (ns >> shift)] += 1
                hist.total_ns += ns
                if ns > hist.max_ns:
                    hist.max_ns = ns
            self.delivered = n + 1
            if type(event.payload) is Lease:
                event.payload.release(self.name)
            if event.reply is not None and not event.reply.done():
                event.reply.set_result(result)

    def _wake(self) -> None:
        w = self._not_empty
        if w is not None and not w.done():
            w.set_result(None)
        while self._not_full:
            fut = self._not_full.popleft()
            if not fut.done():
                fut.set_result(None)

    def _discard_queued(self) -> None:
        while self._queue:
            event = self._queue.popleft()
            self.discarded += 1
            self._finish(event)
            if event.reply is not None and not event.reply.done():
                event.reply.set_exception(BusClosedError(f"bus closed before {self.name!r} answered"))
        self._conflated.clear()

    def stats(self) -> dict[str, object]:
        return {"pattern": self.pattern, "overflow": str(self.overflow), **self.metrics.as_dict()}

    def __repr__(self) -> str:
        return f"Subscription({self.name!r}, pattern={self.pattern!r}, overflow={self.overflow})"


def _index_of(q: collections.deque[Event], event: Event) -> int:
    for i, e in enumerate(q):
        if e is event:
            return i
    raise RuntimeError("conflated event vanished from its queue")  # pragma: no cover


class EventBus:
    """Topic-based publish/subscribe inside one asyncio loop.

    Use it as ``async with EventBus() as bus:``; leaving the block closes the bus, draining
    queued events (``close(drain=False)`` cancels them instead). After close no task of
    the bus is left running.
    """

    def __init__(
        self,
        *,
        on_error: str | OnError = OnError.ISOLATE,
        default_maxsize: int = 1024,
        default_overflow: str | Overflow = Overflow.BLOCK,
        name: str = "bus",
    ):
        self.name = name
        self.on_error = OnError(on_error)
        self.default_maxsize = default_maxsize
        self.default_overflow = Overflow(default_overflow)
        self._subs: list[Subscription] = []
        self._routes: dict[str, tuple[Subscription, ...]] = {}
        self._seq = 0
        self._closing = False
        # publish refuses while this is set: before ``async with`` (nobody would consume
        # the queues, so a publish would block forever) and from close on
        self._refuse = True
        self._closed = asyncio.Event()
        self._failure: HandlerError | None = None
        self._close_started = False
        self._stopper: asyncio.Task | None = None
        self._started = False
        self._unrouted = 0
        self._report_errors = 0  # failures while reporting a handler failure (logging broke)
        self._names: collections.Counter[str] = collections.Counter()

    # --- lifecycle ---------------------------------------------------------------------
    async def __aenter__(self) -> EventBus:
        self._started = True
        self._refuse = self._closing
        for sub in self._subs:
            self._start(sub)
        return self

    async def __aexit__(self, exc_type, exc, tb) -> None:
        await self.close(drain=exc_type is None)
        if self._failure is not None and exc_type is None:
            raise self._failure

    def _start(self, sub: Subscription) -> None:
        if sub._task is None:
            sub._task = asyncio.get_running_loop().create_task(
                sub._consume(), name=f"{self.name}:{sub.name}"
            )

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    @property
    def failure(self) -> HandlerError | None:
        return self._failure

    async def close(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop accepting events; drain queued ones (default) or cancel them; await every task.

        With ``drain=True`` and a ``timeout``, whatever is still queued after ``timeout``
        seconds is cancelled and counted as discarded.
        """
        if self._close_started:
            await self._closed.wait()
            await self._await_stopper()
            return
        self._close_started = True
        self._closing = True
        self._refuse = True
        tasks = [s._task for s in self._subs if s._task is not None]
        if drain and self._failure is None:
            for sub in self._subs:
                sub._closing = True
                sub._wake()
            if tasks:
                _, pending = await asyncio.wait(tasks, timeout=timeout)
                for t in pending:
                    t.cancel()
                if pending:
                    await asyncio.gather(*pending, return_exceptions=True)
        else:
            for t in tasks:
                t.cancel()
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)
        for sub in self._subs:
            sub.active = False
            sub._discard_queued()
            sub._wake()
            sub._task = None
        self._closed.set()
        log.debug("bus_closed", bus=self.name, drained=drain)
        await self._await_stopper()

    async def _await_stopper(self) -> None:
        stopper = self._stopper
        if stopper is not None and stopper is not asyncio.current_task():
            await asyncio.gather(stopper, return_exceptions=True)

    async def wait_closed(self) -> None:
        """Wait until the bus is closed; raise the handler error if it closed fail-fast."""
        await self._closed.wait()
        if self._failure is not None:
            raise self._failure

    # --- subscribing -------------------------------------------------------------------
    def subscribe(
        self,
        pattern: str,
        handler: Handler,
        *,
        name: str | None = None,
        maxsize: int | None = None,
        overflow: str | Overflow | None = None,
    ) -> Subscription:
        """Call ``handler(event)`` for every event whose topic matches ``pattern``.

        ``handler`` may be a coroutine function or a plain callable. ``maxsize`` bounds this
        subscription's queue; ``overflow`` says what happens when it is full.
        """
        return self._add(pattern, handler, name, maxsize, overflow, responder=False)

    def respond(self, topic: str, handler: Handler, *, name: str | None = None) -> Subscription:
        """Answer ``request``\\ s on ``topic``: the handler's return value is the reply."""
        return self._add(topic, handler, name, None, None, responder=True)

    def _add(self, pattern, handler, name, maxsize, overflow, *, responder) -> Subscription:
        if self._closing:
            raise BusClosedError(f"cannot subscribe to {pattern!r}: bus {self.name!r} is closed")
        if not callable(handler):
            raise ConfigError(f"handler for {pattern!r} is not callable: {handler!r}")
        base = name or getattr(handler, "__qualname__", None) or type(handler).__name__
        self._names[base] += 1
        unique = base if self._names[base] == 1 else f"{base}#{self._names[base]}"
        maxsize = self.default_maxsize if maxsize is None else maxsize
        if maxsize < 1:
            raise ConfigError(f"subscription {unique!r}: maxsize must be >= 1, got {maxsize}")
        sub = Subscription(
            self,
            pattern,
            handler,
            name=unique,
            maxsize=maxsize,
            overflow=Overflow(overflow or self.default_overflow),
            responder=responder,
        )
        self._subs.append(sub)
        self._routes.clear()
        if self._started:
            self._start(sub)
        return sub

    async def unsubscribe(self, sub: Subscription, drain: bool = True) -> None:
        """Remove a subscription, draining (or discarding) what it has queued."""
        if sub not in self._subs:
            return
        self._subs.remove(sub)
        self._routes.clear()
        task = sub._task
        if task is not None:
            if drain:
                sub._closing = True
                sub._wake()
                await asyncio.gather(task, return_exceptions=True)
            else:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        sub.active = False
        sub._discard_queued()
        sub._wake()
        sub._task = None

    def _route(self, topic: str) -> tuple[Subscription, ...]:
        subs = self._routes.get(topic)
        if subs is None:
            # checked once per distinct topic (routes are cached): events go to concrete
            # topics; a wildcard is for subscribing ("signals.*" must not reach "signals.>")
            if any(seg in ("*", ">", "**") for seg in topic.split(".")):
                raise ConfigError(
                    f"cannot publish on {topic!r}: wildcards are for subscriptions; publish on "
                    "a concrete topic such as 'signals.BTCUSDT'"
                )
            subs = tuple(s for s in self._subs if topic_matches(s.parts, topic))
            self._routes[topic] = subs
        return subs

    # --- publishing --------------------------------------------------------------------
    def _check_open(self, topic: str) -> None:
        if self._failure is not None:
            raise self._failure
        if self._closing:
            raise BusClosedError(f"cannot publish on {topic!r}: bus {self.name!r} is closed")
        if not self._started:
            raise BusClosedError(
                f"cannot publish on {topic!r}: bus {self.name!r} is not running; enter it "
                "first ('async with EventBus() as bus:')"
            )

    async def publish(self, topic: str, payload: Any, *, key: Any = None) -> int:
        """Deliver ``payload`` to every subscription matching ``topic``; return how many.

        Under ``block`` this awaits room in full queues (backpressure). ``key`` groups
        events for ``conflate`` subscriptions (default: the topic).
        """
        if self._refuse:
            self._check_open(topic)
        subs = self._routes.get(topic)
        if subs is None:
            subs = self._route(topic)
        if not subs:
            self._unrouted += 1
            return 0
        self._seq += 1
        event = Event(topic, payload, self._seq, topic if key is None else key, None)
        is_lease = type(payload) is Lease
        for sub in subs:
            q = sub._queue
            if len(q) < sub.maxsize and not sub._conflate:
                # Hot path, Subscription._push inlined: room in the queue, nothing to evict.
                sub.published += 1
                if is_lease:
                    payload.retain(sub.name)
                q.append(event)
                if len(q) > sub.high_water:
                    sub.high_water = len(q)
                w = sub._not_empty
                if w is not None and not w.done():
                    w.set_result(None)
            else:
                await sub._put(event)
        return len(subs)

    def publish_nowait(self, topic: str, payload: Any, *, key: Any = None) -> int:
        """Publish from synchronous code. Full ``block`` subscriptions raise
        :class:`WouldBlockError` instead of waiting (drop policies apply as usual)."""
        self._check_open(topic)
        subs = self._route(topic)
        if not subs:
            self._unrouted += 1
            return 0
        full = [s.name for s in subs if s.overflow is Overflow.BLOCK and len(s._queue) >= s.maxsize]
        if full:
            raise WouldBlockError(
                f"publish_nowait on {topic!r}: queues of {full} are full (policy block); "
                "await publish() to wait for room"
            )
        self._seq += 1
        event = Event(topic, payload, self._seq, topic if key is None else key, None)
        for sub in subs:
            sub._queue_event_sync(event)
        return len(subs)

    async def request(self, topic: str, payload: Any = None, *, timeout: float = 5.0) -> Any:
        """Send a control query to ``topic`` and await the first responder's reply."""
        self._check_open(topic)
        responders = [s for s in self._route(topic) if s.responder]
        if not responders:
            raise NoResponderError(
                f"no responder on {topic!r}; register one with bus.respond({topic!r}, handler)"
            )
        fut: asyncio.Future = asyncio.get_running_loop().create_future()
        self._seq += 1
        event = Event(topic, payload, self._seq, topic, fut)
        for sub in responders:
            await sub._put(event)
        try:
            return await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            raise RequestTimeoutError(
                f"request on {topic!r} got no reply within {timeout}s "
                f"(responders: {[s.name for s in responders]})"
            ) from None

    # --- failures ----------------------------------------------------------------------
    async def _handler_failed(self, sub: Subscription, event: Event, exc: Exception) -> None:
        log.error(
            "handler_failed",
            bus=self.name,
            subscription=sub.name,
            topic=event.topic,
            seq=event.seq,
            payload=_describe(event.payload),
            error=f"{type(exc).__name__}: {exc}",
            policy=str(self.on_error),
            exc_info=exc,
        )
        if event.reply is not None and not event.reply.done():
            event.reply.set_exception(exc)
        if self.on_error is OnError.FAIL_FAST:
            if self._failure is None:
                err = HandlerError(
                    f"handler {sub.name!r} failed on {event.topic!r} (event {event.seq}): "
                    f"{type(exc).__name__}: {exc}",
                    subscription=sub.name, topic=event.topic, event=event,
                )
                err.__cause__ = exc
                self._failure = err
                self._closing = True
                self._refuse = True
                # Stop from a fresh task: close() awaits this very consumer task.
                loop = asyncio.get_running_loop()
                self._stopper = loop.create_task(self.close(drain=False), name=f"{self.name}:fail_fast")
            return
        if event.topic.startswith(DEADLETTER_PREFIX):
            return  # a failing dead-letter handler must not loop
        letter = DeadLetter(event, sub.name, exc)
        dl_topic = deadletter(event.topic)
        for dl_sub in self._route(dl_topic):
            if dl_sub is sub:
                continue  # a catch-all that just failed would wait on its own full queue
            self._seq += 1
            await dl_sub._put(Event(dl_topic, letter, self._seq, dl_topic, None))

    # --- introspection -----------------------------------------------------------------
    @property
    def subscriptions(self) -> list[Subscription]:
        return list(self._subs)

    def tasks(self) -> list[asyncio.Task]:
        """The consumer tasks this bus owns right now (empty after close)."""
        return [s._task for s in self._subs if s._task is not None]

    def stats(self) -> dict[str, Any]:
        """Per-subscription metrics plus bus totals."""
        return {
            "published": self._seq,
            "unrouted": self._unrouted,
            "report_errors": self._report_errors,
            "subscriptions": {s.name: s.stats() for s in self._subs},
        }

