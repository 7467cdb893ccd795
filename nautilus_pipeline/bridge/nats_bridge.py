"""``NatsBridge``: one pipeline wired to NATS JetStream (ingress, egress, state).

::

    async with NatsBridge(pipe, servers="nats://127.0.0.1:4222", ingest="ticks.>",
                          durable="btc-1", export=["signals.>", "vpin.>"]) as bridge:
        await bridge.wait_idle(5.0)     # or run until cancelled

On entry it connects, starts the pipeline if nobody has (and then closes it on exit),
creates the streams it needs (``TICKS`` over ``ticks.>``, ``EVENTS`` over the exported
patterns), restores the stored state of ``durable`` if there is one, and starts the
ingress task. On exit it stops fetching, drains the pipeline, stores a last snapshot and
acknowledges what it covers, closes the pipeline if it owns it (so the stages'
end-of-stream events are exported too), flushes the exports and closes the connection.
A task that failed (the server gone for good, a refused export) is raised there.
``bridge.end_of_stream = False`` before exit stops without closing what only the stream's
end closes (the open VPIN bar): the next run resumes from the snapshot and closes it.

Exported events carry ``Nats-Msg-Id = <instance>:<topic>:<n>``, the instance being the
durable name (else the pipeline's): two consumers of one definition on different streams
must not de-duplicate each other's events.

The consumer holds up to ``read_ahead`` messages beyond the pool's free slabs (default: the
pool's slab count) and acknowledges ``ack_every`` messages at a time, all of them whenever it
waits for more (:mod:`~.ingress` has the measurements); ``max_ack_pending`` defaults to what
that holds at most. ``ack_policy="all"`` makes a new consumer acknowledge cumulatively
(:mod:`~.ingress`); an existing durable consumer keeps the policy it was made with, and the
ingress acknowledges as that policy expects.

State is kept when a durable name is given and the pipeline can snapshot itself
(``Pipeline.snapshot``/``restore``); ``state=False`` turns it off (acks then follow the
leases only, and a crash replays from the consumer's ack floor into a fresh pipeline).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from typing import Any

import structlog

from ..errors import ConfigError, PipelineError
from ..pipeline import Pipeline
from .egress import Egress
from .ingress import Ingress
from .publisher import TICKS_STREAM, TICKS_SUBJECTS, ensure_stream
from .pull import PullFeed
from .state import SavedState, StateStore
from .subjects import name as check_name
from .subjects import subject_pattern

log = structlog.get_logger("nautilus_pipeline.bridge")

EVENTS_STREAM = "EVENTS"
STATE_BUCKET = "nautilus_state"
ACK_POLICIES = ("explicit", "all")


class NatsConnectError(PipelineError):
    """No NATS server answered at the given address(es)."""


async def connect(servers: str | Sequence[str], **options: Any) -> Any:
    """``nats.connect``, failing fast with one :class:`NatsConnectError` when no server answers.

    nats-py retries a first connection as long as later reconnections (60 tries, 2 s apart):
    a first attempt without retries says at once that nothing listens. Connection errors are
    logged as one line each (nats-py's default prints a traceback), and the connection then
    reconnects by itself, so a restarted server is picked up again. The connection parses
    large payloads (tick batches) in one copy (:mod:`~.parser`)."""
    import nats

    from .parser import install as install_parser

    async def log_error(exc: Exception) -> None:
        log.warning("nats_connection_error", error=f"{type(exc).__name__}: {exc}")

    options.setdefault("error_cb", log_error)
    try:
        probe = await nats.connect(servers, allow_reconnect=False, max_reconnect_attempts=1,
                                   reconnect_time_wait=0.05, connect_timeout=2,
                                   error_cb=options["error_cb"])
        await probe.close()
        nc = await nats.connect(servers, **options)
    except Exception as exc:  # NoServersError, OSError, a refused URL...
        raise NatsConnectError(f"cannot connect to NATS at {servers}: {type(exc).__name__}: {exc}; "
                               "is nats-server running (with -js)?") from None
    return install_parser(nc)


class NatsBridge:
    """Feed ``pipe`` from a JetStream stream and export its events (see the module docstring)."""

    def __init__(
        self,
        pipe: Pipeline,
        *,
        servers: str | Sequence[str] = "nats://127.0.0.1:4222",
        ingest: str | None = None,
        stream: str = TICKS_STREAM,
        durable: str | None = None,
        export: Sequence[str] = (),
        export_stream: str = EVENTS_STREAM,
        state: bool | None = None,
        state_bucket: str = STATE_BUCKET,
        snapshot_every: int = 64,
        max_ack_pending: int | None = None,
        ack_wait_s: float = 60.0,
        max_in_flight: int = 256,
        overflow: str | None = None,
        fetch_timeout: float = 0.25,
        read_ahead: int | None = None,
        ack_every: int = 4,
        ack_policy: str = "explicit",
        duplicate_window_s: float = 600.0,
        connect_options: dict[str, Any] | None = None,
        on_restore: Callable[[SavedState | None], None] | None = None,
        save_extra: Callable[[], dict[str, Any]] | None = None,
    ):
        self.pipe = pipe
        self.servers = [servers] if isinstance(servers, str) else list(servers)
        self.ingest = subject_pattern(ingest) if ingest is not None else None
        self.stream = check_name(stream)
        self.durable = check_name(durable, "consumer") if durable is not None else None
        self.export = list(export)
        self.export_stream = check_name(export_stream)
        can_snapshot = callable(getattr(pipe, "snapshot", None)) and callable(getattr(pipe, "restore", None))
        if state and not can_snapshot:
            raise ConfigError("NatsBridge(state=True) needs Pipeline.snapshot()/restore(), which "
                              "this pipeline lacks")
        if state and durable is None:
            raise ConfigError("NatsBridge(state=True) needs a durable consumer name (durable=...)")
        self.state = bool(durable is not None and ingest is not None and can_snapshot
                          if state is None else state)
        self._state_asked = bool(state)
        self.state_bucket = check_name(state_bucket, "bucket")
        if snapshot_every < 1:
            raise ConfigError(f"snapshot_every must be >= 1, got {snapshot_every}")
        self.snapshot_every = snapshot_every
        slabs = len(pipe.pool.slabs)
        needed = (snapshot_every if self.state else 0) + 2 * slabs
        if max_ack_pending is not None and max_ack_pending < needed:
            raise ConfigError(f"max_ack_pending={max_ack_pending} would stall the consumer: it must "
                              f"be >= {needed} (snapshot_every + 2 x the pool's {slabs} slabs)")
        self.ack_wait_s = ack_wait_s
        self.max_in_flight = max_in_flight
        self.overflow = overflow
        self.fetch_timeout = fetch_timeout
        if read_ahead is not None and read_ahead < 0:
            raise ConfigError(f"read_ahead must be >= 0, got {read_ahead}")
        self.read_ahead = slabs if read_ahead is None else read_ahead
        if ack_every < 1:
            raise ConfigError(f"ack_every must be >= 1, got {ack_every}")
        self.ack_every = ack_every
        if ack_policy not in ACK_POLICIES:
            raise ConfigError(f"ack_policy must be one of {ACK_POLICIES}, got {ack_policy!r}")
        self.ack_policy = ack_policy
        self.cumulative = False
        """The consumer in use acknowledges cumulatively (its policy, which an existing durable
        consumer keeps whatever ``ack_policy`` says: the server does not change it)."""
        self.max_ack_pending = max_ack_pending or needed + self.read_ahead + ack_every
        self.duplicate_window_s = duplicate_window_s
        self.connect_options = dict(connect_options or {})
        self.on_restore = on_restore
        self.save_extra = save_extra
        self.end_of_stream = True
        self.instance = self.durable or pipe.name
        self.nc: Any = None
        self.js: Any = None
        self.egress: Egress | None = None
        self.ingress: Ingress | None = None
        self._feed: PullFeed | None = None
        self.store: StateStore | None = None
        self.restored: SavedState | None = None
        self.snapshots = 0
        self._batches_since = 0
        self._own_pipe = False
        self._stop = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._last_activity = time.monotonic()

    # --- lifecycle ---------------------------------------------------------------------
    async def __aenter__(self) -> NatsBridge:
        try:
            await self._open()
        except BaseException:
            await self._abort()
            raise
        return self

    async def __aexit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            await self.close()
        else:
            await self._abort()

    async def _open(self) -> None:
        if not self.pipe._started:
            await self.pipe.start()
            self._own_pipe = True
        self.nc = await connect(self.servers, **self.connect_options)
        self.js = self.nc.jetstream(publish_async_max_pending=max(self.max_in_flight, 1))
        if self.export:
            self.egress = Egress(self.instance, self.pipe.bus, self.js, self.export,
                                 max_in_flight=self.max_in_flight, overflow=self.overflow)
            await ensure_stream(self.js, self.export_stream, self.egress.subjects,
                                duplicate_window_s=self.duplicate_window_s)
        covered = 0
        if self.state:
            self._check_snapshots()
        if self.state:
            self.store = StateStore(self.js, self.state_bucket, self.durable,
                                    max_payload=self.nc.max_payload)
            await self.store.open()
            self.restored = await self.store.load(self.pipe.name)
            if self.restored is not None:
                self.pipe.restore(self.restored.snapshot)
                covered = self.restored.stream_seq
                if self.egress is not None:
                    self.egress.seqs = dict(self.restored.egress_seqs)
                log.info("bridge_state_restored", durable=self.durable, stream_seq=covered,
                         ticks=self.restored.ticks)
        if self.on_restore is not None:
            self.on_restore(self.restored)
        if self.egress is not None:
            self.egress.start()
        if self.ingest is not None:
            self._feed = await self._consumer(covered)
            self.ingress = Ingress(
                self.pipe, self._feed, ack_on_release=not self.state, covered_seq=covered,
                fetch_timeout=self.fetch_timeout, read_ahead=self.read_ahead, ack_every=self.ack_every,
                cumulative=self.cumulative,
                on_idle=self._on_idle,
                after_message=self._after_message if self.state else None,
            )
            self._task = asyncio.get_running_loop().create_task(
                self.ingress.run(self._stop), name=f"nats-ingress:{self.pipe.name}")

    def _check_snapshots(self) -> None:
        """Every stage must snapshot for the state to mean anything: find out now, not at the
        first snapshot mid-stream. Asked for (``state=True``): an error; by default: no state."""
        from ..snapshot import SnapshotError

        try:
            self.pipe.snapshot()
        except SnapshotError as exc:
            if self._state_asked:
                raise ConfigError(f"NatsBridge(state=True): {exc}") from None
            log.warning("bridge_state_off", durable=self.durable, reason=str(exc),
                        effect="acks follow the leases; a restart replays unacknowledged messages "
                               "into a fresh pipeline")
            self.state = False

    async def _consumer(self, covered: int) -> PullFeed:
        """The pull consumer: resumed from the stored state, else from the consumer's ack floor."""
        import nats.js.errors
        from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

        try:
            await self.js.stream_info(self.stream)
        except nats.js.errors.NotFoundError:
            await ensure_stream(self.js, self.stream, [TICKS_SUBJECTS],
                                duplicate_window_s=self.duplicate_window_s)
        config = ConsumerConfig(
            ack_policy=AckPolicy(self.ack_policy), max_ack_pending=self.max_ack_pending,
            ack_wait=self.ack_wait_s, filter_subject=self.ingest,
        )
        if self.durable is not None and covered > 0:
            # The state decides where to resume: what it covers is done, the rest is not,
            # whatever the consumer had acknowledged (or not) before the crash.
            try:
                await self.js.delete_consumer(self.stream, self.durable)
            except nats.js.errors.NotFoundError:
                pass
            config.deliver_policy = DeliverPolicy.BY_START_SEQUENCE
            config.opt_start_seq = covered + 1
        elif self.durable is not None:
            # No state covers anything: resume from the consumer's ack floor, in stream order.
            # Resumed as it was, the consumer would deliver what it never delivered at once and
            # what the stopped run held unacknowledged only after ack_wait, older than what
            # this run had fed by then: taken for a redelivery (or out of time order) and lost
            # (review finding). Acks follow the stream's order here, so the floor is the last.
            try:
                info = await self.js.consumer_info(self.stream, self.durable)
            except nats.js.errors.NotFoundError:
                info = None
            if info is not None and info.num_ack_pending:
                floor = info.ack_floor.stream_seq if info.ack_floor is not None else 0
                await self.js.delete_consumer(self.stream, self.durable)
                config.deliver_policy = DeliverPolicy.BY_START_SEQUENCE
                config.opt_start_seq = floor + 1
                log.info("bridge_resume_from_ack_floor", durable=self.durable, ack_floor=floor,
                         unacknowledged=info.num_ack_pending)
        info = None
        if self.durable is not None:
            config.durable_name = self.durable
            try:
                info = await self.js.consumer_info(self.stream, self.durable)
            except nats.js.errors.NotFoundError:
                pass
        if info is None:
            info = await self.js.add_consumer(self.stream, config)
        name = info.name
        self.cumulative = info.config.ack_policy == AckPolicy.ALL
        return await PullFeed(self.nc, self.stream, name, expires_s=self.fetch_timeout).open()

    async def close(self) -> None:
        """Stop fetching, drain, store the last snapshot, close; raise what failed."""
        error: BaseException | None = None
        try:
            await self._stop_ingress()
            await self.pipe.drain()
            if self.ingress is not None and not self.state:
                await self.ingress.ack_drained()  # what finished in the drain (review finding)
            if self.state and self._batches_since:
                await self.snapshot()
            if not self.end_of_stream:
                self.pipe.end_segment()  # the stream goes on in the next run, from the snapshot
            if self._own_pipe:
                await self.pipe.close()
            if self.egress is not None:
                await self.egress.close(drain=True)
        except BaseException as exc:
            error = exc
            await self._stop_after_error()
        finally:
            await self._close_connection(drain=error is None)
        if error is not None:
            raise error

    async def _stop_after_error(self) -> None:
        """After a failed close: stop what is still running (the pipeline's tasks, the export
        subscriptions) without draining, so nothing is left orphaned; unacked messages are
        redelivered to the next run."""
        try:
            if self._own_pipe and self.pipe._started and not self.pipe._closed:
                await self.pipe.close(drain=False)
            if self.egress is not None:
                await self.egress.close(drain=False)
        except Exception as exc:  # the first error is the one the caller sees
            log.warning("bridge_close_cleanup_failed", error=f"{type(exc).__name__}: {exc}")

    async def _abort(self) -> None:
        """Stop without draining (an error or cancellation in the owner): unacked messages
        are redelivered later, so nothing is lost."""
        self._stop.set()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self._close_feed(nak_unread=False)
        if self._own_pipe and self.pipe._started:
            await self.pipe.close(drain=False)
        if self.egress is not None:
            await self.egress.close(drain=False)
        await self._close_connection(drain=False)

    async def _stop_ingress(self) -> None:
        self._stop.set()
        try:
            if self._task is not None:
                task, self._task = self._task, None
                await task  # re-raises what stopped it
        finally:
            await self._close_feed(nak_unread=True)

    async def _close_feed(self, nak_unread: bool) -> None:
        """End the pull request; what was delivered and not fed is nak'ed (redelivered now)."""
        if self._feed is not None:
            feed, self._feed = self._feed, None
            try:
                await feed.close(nak_unread=nak_unread)
            except Exception as exc:  # the connection gone: ack_wait redelivers them
                log.warning("bridge_pull_close_failed", error=f"{type(exc).__name__}: {exc}")

    async def _close_connection(self, drain: bool) -> None:
        if self.nc is not None and not self.nc.is_closed:
            try:
                if drain:
                    await self.nc.flush()
            finally:
                await self.nc.close()

    # --- state -------------------------------------------------------------------------
    async def snapshot(self) -> None:
        """Drain, store the pipeline's state with the stream sequence it covers, then ack."""
        if not self.state or self.ingress is None or self.store is None:
            raise PipelineError("this bridge keeps no state (give a durable name)")
        await self.pipe.drain()
        if self.egress is not None:
            # every exported event of the covered batches stored by JetStream (acked), not
            # just handed to the client: a crash after the save must not lose one
            await self.egress.flush()
        ing = self.ingress
        seq = ing.stats.last_seq
        prev = self.restored
        saved = SavedState(
            self.pipe.name, seq, self.pipe.snapshot(),
            dict(self.egress.seqs) if self.egress is not None else {},
            ticks=(prev.ticks if prev else 0) + ing.stats.ticks,
            batches=(prev.batches if prev else 0) + ing.stats.batches,
            extra=self.save_extra() if self.save_extra is not None else {},
        )
        await self.store.save(saved)
        await ing.ack_covered(seq)
        self.snapshots += 1
        self._batches_since = 0
        log.debug("bridge_snapshot", durable=self.durable, stream_seq=seq, bytes=len(saved.snapshot))

    async def _after_message(self) -> None:
        self._last_activity = time.monotonic()
        self._batches_since += 1
        if self._batches_since >= self.snapshot_every:
            await self.snapshot()

    async def _on_idle(self) -> None:
        if self.state and self._batches_since:
            await self.snapshot()

    # --- waiting -----------------------------------------------------------------------
    async def wait_idle(self, idle_s: float, poll_s: float = 0.05) -> None:
        """Return once no tick message has arrived for ``idle_s`` seconds and the pipeline
        is drained (``run --until-idle``, tests); raise if the ingress failed."""
        if self.ingress is None:
            raise PipelineError("this bridge has no ingress (give ingest=...)")
        seen = -1
        while True:
            if self._task is not None and self._task.done():
                self._task.result()
                raise PipelineError("the NATS ingress stopped")
            st = self.ingress.stats
            if st.messages != seen:
                seen = st.messages
                self._last_activity = time.monotonic()
            elif time.monotonic() - self._last_activity >= idle_s:
                await self.pipe.drain()
                if self.ingress.stats.messages == seen:
                    return
            await asyncio.sleep(poll_s)

    def stats(self) -> dict[str, Any]:
        """Counters of the ingress, egress and state (JSON-ready)."""
        import dataclasses

        return {
            "ingress": dataclasses.asdict(self.ingress.stats) if self.ingress else None,
            "egress": dataclasses.asdict(self.egress.stats) if self.egress else None,
            "snapshots": self.snapshots,
            "restored_from_seq": self.restored.stream_seq if self.restored else None,
        }
